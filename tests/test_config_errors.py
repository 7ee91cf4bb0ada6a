"""Bad input -> exit code 2 and one line naming the bad value, no traceback (the real entry, in a subprocess)."""

from __future__ import annotations

import pytest

from test_train_entry import run_train

TINY = ["model=tiny-llama", "data.eval_seq_len=128", "data.max_eval_windows=1"]

CASES = {
    "unknown model": (["model=opt-13b"], "unknown model 'opt-13b'; choose one of:"),
    "unknown quantizer in a list": (["quant=[rtn4,rtn5]"], "unknown quant 'rtn5'"),
    "unknown noise": (["noise=loud"], "unknown noise 'loud'"),
    "unknown outlier selector": (["outliers=hessian"], "unknown outliers 'hessian'"),
    "unknown data": (["data=c4"], "unknown data 'c4'"),
    "bits outside 2..8": ([*TINY, "quant.rtn4.bits=9"], "quant.rtn4.bits=9 is outside 2..8"),
    "negative noise scale": ([*TINY, "noise.scale=-1"], "noise.scale=-1"),
    "non-finite noise scale": ([*TINY, "noise.scale=nan"], "noise.scale=nan"),
    "ratio zero": ([*TINY, "outliers.ratio=0"], "outliers.ratio=0 must be a percentage in (0, 100]"),
    "ratio above 100": ([*TINY, "outliers.ratio=150"], "outliers.ratio=150"),
    "bad noise schedule": ([*TINY, "noise.schedule=hourly"], "noise.schedule=hourly"),
    "missing model folder": (["model=local", "model.path=/nonexistent/model"], "model.path=/nonexistent/model does not exist"),
    "group size not dividing": ([*TINY, "quant=rtn4_g32", "quant.rtn4_g32.group_size=48"],
                                "group_size=48 does not divide the 64 input features of model.layers.0"),
    "window longer than context": (["model=tiny-llama", "data.eval_seq_len=100000"], "data.eval_seq_len=100000 is longer than the model's context"),
    "lora targets match nothing": ([*TINY, "peft.target_modules=[c_attn]"], "peft.target_modules ['c_attn'] match no linear layer"),
    "unreadable text file": ([*TINY, "data=text_files", "data.corpus.train=[/nonexistent/corpus.txt]"], "/nonexistent/corpus.txt"),
}


@pytest.mark.parametrize("overrides,expected", CASES.values(), ids=CASES.keys())
def test_bad_input_gives_one_clear_line(tmp_path, overrides, expected):
    proc = run_train(tmp_path, *overrides, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
