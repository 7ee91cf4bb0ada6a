"""The bad-input catalogue: each entry through the real ``train.py`` in a subprocess -> exit code 2, one line, no traceback.

The README's Troubleshooting table lists the same entries. Every error here fires before training
starts: most before the model loads (about 2 s), the rest right after a tiny model loads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_entry import ROOT, run_train

TINY = ["model=tiny-llama", "data.eval_seq_len=128", "data.max_eval_windows=1"]
# Errors that fire only once the data is read: keep everything else small.
SMALL = [*TINY, "data.seq_len=64", "outliers.calibration_windows=2", "outliers.calibration_length=64", "curvature=null"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the message is the one for a machine without a GPU")

# name: (overrides, the text the one line must contain). "{x}" fields are the files of the `assets` fixture.
CASES = {
    # --- command line (before Hydra runs the job)
    "unknown model": (["model=opt-13b"], "unknown model 'opt-13b'; choose one of:"),
    "unknown quantizer in a list": (["quant=[rtn4,rtn5]"], "unknown quant 'rtn5'"),
    "unknown noise": (["noise=loud"], "unknown noise 'loud'"),
    "unknown outlier selector": (["outliers=hessian"], "unknown outliers 'hessian'"),
    "unknown data": (["data=c4"], "unknown data 'c4'"),
    "misspelt key": (["trainer.max_step=5"], "trainer.max_step is not a config key (trainer.max_step=5); did you mean trainer.max_steps?"),
    "adding a key that exists": (["+trainer.max_steps=5"], "trainer.max_steps is already in the config"),
    "run dir under a file": (["hydra.run.dir={afile}/run"], "hydra.run.dir={afile}/run cannot be created or written ({afile} is a file"),
    "run dir in /proc": (["hydra.run.dir=/proc/npft-run"], "hydra.run.dir=/proc/npft-run cannot be created or written"),
    # --- config values (before the model loads)
    "bits outside 2..8": ([*TINY, "quant.rtn4.bits=9"], "quant.rtn4.bits=9 is outside 2..8"),
    "requant budget outside [0, 100)": ([*TINY, "quant=requant_rtn4", "quant.requant_rtn4.outlier_ratio=100"],
                                        "quant.requant_rtn4: requant outlier_ratio=100.0 is outside [0, 100)"),
    "requant steps not dividing the budget": ([*TINY, "quant=requant_rtn4", "quant.requant_rtn4.significant_step=0.03"],
                                              "quant.requant_rtn4: requant significant_step=0.03 does not divide significant_ratio=0.05"),
    "requant base that is no weight quantizer": ([*TINY, "quant=requant_rtn4", "quant.requant_rtn4.base=rtn4"],
                                                 "quant.requant_rtn4: requant base='rtn4' is not a weight quantizer"),
    "negative noise scale": ([*TINY, "noise.scale=-1"], "noise.scale=-1 must be a finite number >= 0"),
    "non-finite noise scale": ([*TINY, "noise.scale=nan"], "noise.scale=nan must be a finite number >= 0"),
    "bad noise schedule": ([*TINY, "noise.schedule=hourly"], "noise.schedule=hourly is not one of per_step, per_epoch"),
    "bad noise ramp": ([*TINY, "noise.ramp=steep"], "noise.ramp=steep is not one of constant, linear, cosine"),
    "ratio zero": ([*TINY, "outliers.ratio=0"], "outliers.ratio=0 must be a percentage in (0, 100]"),
    "ratio above 100": ([*TINY, "outliers.ratio=150"], "outliers.ratio=150 must be a percentage in (0, 100]"),
    "unknown outlier budget": ([*TINY, "outliers.budget=half"], "outliers budget='half' is not one of per_matrix, global, adaptive"),
    "unknown outlier method": ([*TINY, "outliers.method=hessian"], "outliers method='hessian' is not one of"),
    "no calibration windows": ([*TINY, "outliers.calibration_windows=0"], "outliers calibration_windows=0 must be an integer >= 1"),
    "batch size zero": ([*TINY, "data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    "lora rank zero": ([*TINY, "peft.r=0"], "peft.r=0 must be an integer >= 1"),
    "learning rate zero": ([*TINY, "optimizer.lr=0"], "optimizer.lr=0 must be a positive finite number"),
    "unknown lr decay": ([*TINY, "schedule.lr_decay=step"], "schedule.lr_decay=step is not one of linear, cosine, constant"),
    "negative max_steps": ([*TINY, "trainer.max_steps=-5"], "trainer.max_steps=-5 must be -1 (no limit"),
    "unknown precision": ([*TINY, "trainer.precision=fp16"], "trainer.precision=fp16 is not one of 32-true, bf16-mixed"),
    "unknown model dtype": ([*TINY, "model.dtype=fp8"], "model.dtype=fp8 is not one of float32"),
    "missing model folder": (["model=local", "model.path=/nonexistent/model"], "model.path=/nonexistent/model does not exist"),
    "folder without config.json": (["model=local", "model.path={notamodel}"], "model.path={notamodel} has no config.json"),
    "unreadable text file": ([*TINY, "data=text_files", "data.corpus.train=[/nonexistent/corpus.txt]"],
                             "data.corpus.train: /nonexistent/corpus.txt matches no readable file"),
    "empty corpus": ([*TINY, "data=text_files", "data.corpus.train=[{empty}]"], "data.corpus.train: {empty} is empty (0 bytes)"),
    "checkpoint missing": ([*TINY, "ckpt_path={tmp}/run/checkpoints/last.ckpt"], "ckpt_path={tmp}/run/checkpoints/last.ckpt does not exist"),
    "checkpoint corrupt": ([*TINY, "ckpt_path={garbage}"], "ckpt_path={garbage} is not a usable checkpoint: it is truncated"),
    "output dir not writable": ([*TINY, "paths.output_dir={afile}/out"], "paths.output_dir={afile}/out cannot be created or written ({afile} is a file"),
    "ddp without GPUs": pytest.param([*TINY, "trainer=ddp"], "needs a CUDA GPU, but none is visible (torch.cuda.is_available() is False); use trainer=ddp_cpu",
                                     marks=NO_GPU),
    "gpu trainer without GPUs": pytest.param([*TINY, "trainer=gpu"], "needs a CUDA GPU, but none is visible", marks=NO_GPU),
    "float16 on the CPU": ([*TINY, "trainer.precision=16-mixed"], "trainer.precision=16-mixed (float16) is for CUDA GPUs; on the CPU use trainer.precision=32-true"),
    # --- against the model (seconds after it loads, before any training)
    "hub model not cached": (["model=opt-1.3b", "quant=rtn4"], "model 'opt-1.3b' (facebook/opt-1.3b) is not in the local Hugging Face cache"),
    "group size not dividing": ([*TINY, "quant=rtn4_g32", "quant.rtn4_g32.group_size=48"],
                                "group_size=48 does not divide the 64 input features of model.layers.0"),
    "window longer than context": (["model=tiny-llama", "data.eval_seq_len=100000"], "data.eval_seq_len=100000 is longer than the model's context of 512"),
    "training window longer than context": ([*TINY, "data.seq_len=4096"], "data.seq_len=4096 is longer than the model's context of 512"),
    "lora targets match nothing": ([*TINY, "peft.target_modules=[c_attn]"], "peft.target_modules ['c_attn'] match no linear layer"),
    "architecture without default LoRA targets": (["model=local", "model.path={neox}", "data.eval_seq_len=128"],
                                                  "no default LoRA targets for model_type='gpt_neox'; the decoder blocks hold the linear layers "
                                                  "['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'query_key_value']"),
    "corpus shorter than one window": ([*SMALL, "data=text_files", "data.corpus.train=[{short}]", "data.corpus.validation=[{short}]",
                                        "data.corpus.test=[{short}]"],
                                       "the train split of text_files has 40 tokens, fewer than one window of seq_len=64"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """Bad inputs on disk: a file where a folder should be, garbage and empty files, a model folder of an unknown architecture."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from npft_lightning.models import ByteTokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("forty bytes of text, one window needs 64")
    (root / "notamodel").mkdir()
    config = GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=512)
    GPTNeoXForCausalLM(config).save_pretrained(root / "neox")
    ByteTokenizer().save_pretrained(root / "neox")
    (root / "hf").mkdir()  # an empty Hugging Face home: no hub model is cached
    return {name: str(root / name) for name in ("afile", "garbage.ckpt", "empty.txt", "short.txt", "notamodel", "neox", "hf")} | {"tmp": str(root)}


def _fill(text: str, assets: dict[str, str]) -> str:
    return text.format(**{k.split(".")[0]: v for k, v in assets.items()})


@pytest.mark.parametrize("overrides,expected", list(CASES.values()), ids=list(CASES.keys()))
def test_bad_input_gives_one_clear_line(tmp_path, monkeypatch, assets, overrides, expected):
    monkeypatch.setenv("HF_HOME", assets["hf"])
    proc = run_train(tmp_path, *[_fill(o, assets) for o in overrides], timeout=180)
    # Progress bars of work that finished before the error (loading a model's weights) are not error output.
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and _fill(expected, assets) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_catalogue_is_large_and_in_the_readme():
    """At least 25 entries, and the README's Troubleshooting table has at least as many rows."""
    assert len(CASES) >= 25
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Troubleshooting", 1)[1].split("| input |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) >= 25, len(rows)


def test_full_traceback_on_request(tmp_path):
    """HYDRA_FULL_ERROR=1 keeps the traceback of a user error for debugging."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", *TINY, "noise.scale=-1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "noise.scale=-1" in proc.stderr


def test_no_surprises_offline_and_no_remote_code(monkeypatch):
    """The entry points make every Hugging Face library offline (a value the user exported stands), and no
    model config runs code from a model repository."""
    from omegaconf import OmegaConf

    from npft_lightning.cli import set_offline_defaults
    from npft_lightning.models import CausalLMSpec

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    set_offline_defaults()
    assert [os.environ[k] for k in keys] == ["1", "1", "0"]
    for entry in ("train.py", "eval.py"):
        source = (ROOT / entry).read_text()
        assert source.index("set_offline_defaults()") < source.index("@hydra.main")

    assert CausalLMSpec(name="x").trust_remote_code is False
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).get("trust_remote_code") is False, path.name
