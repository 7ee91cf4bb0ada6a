"""``eval.py`` through the real Hydra entry: scores, the on-disk metrics, and the exported artefact."""

from __future__ import annotations

import errno
import json
import os

import pytest
from helpers import TINY_EVAL, compose, run_entry

TINY = [*TINY_EVAL, "data.max_eval_windows=2", "calibration.windows=4", "calibration.length=64",
        "calibration.sensitivity_windows=2", "print_config=false"]


def test_eval_scores_every_quantizer_and_the_export_reproduces_it(tmp_path):
    proc = run_entry("eval.py", tmp_path, *TINY, "quant=[rtn4,gptq4,kmeans3]", "splits=[validation,test]",
                     f"export_dir={tmp_path / 'exports'}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] is True
    for split in ("validation", "test"):
        row = metrics["ppl"][split]
        assert row["_windows"] == 2 and row["_tokens"] == 2 * 128
        assert {"fp", "rtn4", "gptq4", "kmeans3"} <= row.keys() and all(row[k] > 1 for k in ("fp", "rtn4", "gptq4", "kmeans3"))
    # The packed artefact, reloaded, scores exactly the fake-quant PPL of the first split.
    for name in ("rtn4", "gptq4", "kmeans3"):
        assert metrics["exports"][name]["ppl_reloaded"] == metrics["ppl"]["validation"][name], name
    output = proc.stderr + proc.stdout
    assert "validation gptq4: PPL" in output  # each result is reported as it comes
    # Each quantizer (GPTQ's calibration included) runs once per model, whatever the number of splits.
    assert output.count("quantized with gptq4 (") == 1 and output.count("quantized with rtn4 (") == 1
    assert {"quantize/gptq4", "validation/gptq4", "test/gptq4"} <= metrics["seconds"].keys()


def test_an_export_that_fails_midway_keeps_the_measured_results(tmp_path, monkeypatch):
    """The export folder was writable when the run started, then the disk fills: one line saying where the results are,
    and metrics.json holds every PPL measured before it. (``splits=test``, a bare name, is taken as ``[test]``.)"""
    import npft_lightning.tasks.evaluate as evaluation
    from npft_lightning.core.errors import UserError

    cfg = compose("eval", *TINY, "quant=[rtn4,rtn3]", "splits=test", f"export_dir={tmp_path / 'exports'}", f"paths.output_dir={tmp_path}")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluation, "save_quantized", full_disk)
    with pytest.raises(UserError, match=rf"export_dir=.*: writing rtn4 failed \({os.strerror(errno.ENOSPC)}\); the perplexities "
                                        rf"measured so far are in {tmp_path / 'metrics.json'}"):
        evaluation.evaluate(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] is False
    assert list(metrics["ppl"]) == ["test"] and {"fp", "rtn4"} <= metrics["ppl"]["test"].keys() and "rtn3" not in metrics["ppl"]["test"]
