"""What several test files share: tiny random models, LoRA with a non-zero B, a tiny training setup, the check of a
quantized export, the tiny-model overrides and the Hydra compose call, and the two ways of running an entry point (a
fresh interpreter, or the same steps in this process). Test files import from here, never from each other;
conftest.py turns the builders into fixtures."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import random
import signal
import subprocess
import sys
import traceback
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from npft_lightning.core.layers import decoder_blocks, decoder_linears
from npft_lightning.lm.datamodule import CausalLMDataModule
from npft_lightning.lm.models import ByteTokenizer
from npft_lightning.quant import (
    fake_quantized,
    load_quantized,
    quantized_size_report,
    save_quantized,
)
from npft_lightning.training.module import NPFTModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
VOCAB = 256
# A subprocess that runs longer than this is stuck: the test fails instead of hanging the suite.
ENTRY_TIMEOUT = 300
# Overrides of the entries' configs for the tiny model: evaluation windows within its context of 512 (each test adds
# data.max_eval_windows), then short training windows and a small outlier calibration, then a quiet short run (no
# curvature probe, one quantizer, no progress bars).
TINY_EVAL = ["model=tiny-llama", "data.eval_seq_len=128"]
TINY_TRAIN = [*TINY_EVAL, "data.seq_len=64", "outliers.calibration_windows=2", "outliers.calibration_length=64"]
QUIET_TRAIN = ["curvature=null", "quant=[rtn4]", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


# ------------------------------------------------------------------------------------------ tiny models
def make_tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """A 2-block LLaMA of width 64 with random weights (``config`` overrides LlamaConfig's fields)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True) | config
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def make_peaked_llama(hidden_size: int = 64, intermediate_size: int = 128, scale: float = 5.0) -> LlamaForCausalLM:
    """A tiny random llama with its matrices scaled up, so that attention (a wrong Q/K layout) and quantization errors
    show in the logits; widths that are multiples of 256 take llama.cpp's K-quants without a fallback."""
    model = make_tiny_llama(hidden_size=hidden_size, intermediate_size=intermediate_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def make_tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
    )
    return OPTForCausalLM(cfg).eval()

def make_tiny_gemma3(seed: int = 0, peaked: bool = False) -> nn.Module:
    """conf/model/tiny-gemma3.yaml's model: two layers (a 32-token sliding window, then global attention).
    ``peaked``: its matrices scaled up and its norm weights random (Gemma's init leaves them 0, i.e. a scale of 1),
    so a wrong norm offset, window, rope base or query scale shows in the logits."""
    from npft_lightning.lm.models import TINY_DEFAULTS, build_tiny_model

    model = build_tiny_model(**{**TINY_DEFAULTS, "arch": "gemma3", "max_position_embeddings": 256, "seed": seed}).eval()
    if peaked:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(5.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model



class QuadraticModel(nn.Module):
    """loss = ½ dᵀA d + bᵀd with d = vec(W) − w*; one Linear in ``layers`` so ``decoder_linears`` finds it."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w_star: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)])
        with torch.no_grad():
            self.layers[0].weight.copy_(w0)
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.register_buffer("w_star", w_star)

    @classmethod
    def random(cls, diagonal: bool, rows: int = 4, cols: int = 8, seed: int = 0) -> QuadraticModel:
        """A random positive-definite A (diagonal, or dense), b ≠ 0 (not at a minimum: a real gradient term), all in
        float64."""
        g = torch.Generator().manual_seed(seed)
        n = rows * cols
        if diagonal:
            A = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5)
        else:
            m = torch.randn(n, n, generator=g, dtype=torch.float64)
            A = m @ m.T / n + torch.eye(n, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
        w_star = torch.randn(n, generator=g, dtype=torch.float64)
        return cls(A, b, w_star, torch.randn(rows, cols, generator=g, dtype=torch.float64))

    def forward(self, input_ids=None, labels=None):
        d = self.layers[0].weight.reshape(-1) - self.w_star
        return SimpleNamespace(loss=0.5 * d @ (self.A @ d) + self.b @ d)


def last_block_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder block's output for ``ids`` (no gradient)."""
    out: list[torch.Tensor] = []
    _, blocks = decoder_blocks(model)
    handle = blocks[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return out[0]


@contextlib.contextmanager
def layer_input_and_output(layer: nn.Module):
    """``{"raw": the input the layer was called with, "out": its output}`` of its last call inside the block. The
    input is recorded by a pre-hook registered on entry: it sees the input before the pre-hooks registered later
    (fake quantization's, a perturbation's) change it."""
    seen: dict[str, torch.Tensor] = {}
    pre = layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("raw", args[0].detach().clone()))
    post = layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
    try:
        yield seen
    finally:
        pre.remove()
        post.remove()


# ------------------------------------------------------------------------------------------ LoRA
def fill_lora_b(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Every LoRA B drawn from N(0, std²) (PEFT starts it at zero), so the merged weight W + s·BA differs from W as
    after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)
    return model


def tiny_adapter(path: Path) -> Path:
    """A saved LoRA adapter (q_proj, down_proj; non-zero B) for ``model=tiny-llama``, so merging it changes the model."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from peft import get_peft_model

    cfg = OmegaConf.load(CONF / "model" / "tiny-llama.yaml")
    cfg.cache_dir = str(path.parent / "cache")
    model, _ = instantiate(cfg).load()
    peft_model = fill_lora_b(get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])), std=0.2)
    peft_model.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------------------ training
# The decoder linears of a llama, all LoRA targets of :func:`make_module`.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RepeatedText:
    """A small in-memory corpus (same interface as the real corpora)."""

    name = "repeated"

    def text(self, split: str) -> str:
        rng = torch.Generator().manual_seed({"train": 0, "validation": 1, "test": 2}[split])
        words = ["alpha", "beta", "gamma", "delta", "noise", "weight", "quant", "lightning"]
        idx = torch.randint(0, len(words), (3000,), generator=rng)
        return " ".join(words[i] for i in idx)

    def fingerprint(self) -> str:
        return "repeated-v1"


def make_datamodule(**kw):
    """The datamodule of :class:`RepeatedText`, byte tokens, windows of 32 (``kw`` overrides), set up for fit."""
    args = dict(seq_len=32, eval_seq_len=64, batch_size=2, max_eval_windows=2, seed=0) | kw
    dm = CausalLMDataModule(RepeatedText(), tokenizer=ByteTokenizer(), **args)
    dm.setup("fit")
    return dm


def make_module():
    """The NPFT LightningModule of the tiny llama with LoRA (r=4) on every decoder linear, B non-zero."""
    return fill_lora_b(NPFTModule(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class WeightSpy(Callback):
    """Records the decoder weights the forward pass sees, and the weights after each batch."""

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append({k: v.weight.detach().clone() for k, v in pl_module.decoder_linears().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({k: v.weight.detach().clone() for k, v in pl_module.decoder_linears().items()})


# ------------------------------------------------------------------------------------------ quantized export
def fake_quant_reference(model: nn.Module, quantizer, batch: torch.Tensor, calibration: torch.Tensor | None = None,
                         deltas: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Decoder weights and logits of a copy of ``model`` inside ``fake_quantized``."""
    model = copy.deepcopy(model)
    linears = decoder_linears(model)
    with torch.no_grad(), fake_quantized(model, linears, quantizer, deltas, calibration):
        return {name: lin.weight.clone() for name, lin in linears.items()}, model(input_ids=batch).logits


def assert_export_exact(model: nn.Module, quantizer, path: Path, batch: torch.Tensor,
                        calibration: torch.Tensor | None = None) -> dict:
    """Save ``model`` quantized by ``quantizer`` to ``path``, load it back: the same weights and logits as fake
    quantization, ``model`` untouched; the artefact's size report."""
    weights, logits = fake_quant_reference(model, quantizer, batch, calibration)
    originals = {name: lin.weight.clone() for name, lin in decoder_linears(model).items()}
    save_quantized(model, decoder_linears(model), quantizer, path, calibration=calibration)
    assert all(torch.equal(lin.weight, originals[n]) for n, lin in decoder_linears(model).items())  # model untouched

    loaded = load_quantized(path)
    loaded_linears = decoder_linears(loaded)
    assert loaded_linears.keys() == weights.keys()
    for name, lin in loaded_linears.items():
        assert torch.equal(lin.weight, weights[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, logits)
    return quantized_size_report(path)


# ------------------------------------------------------------------------------------------ configs
def compose(task: str, *overrides: str, hydra: bool = False):
    """``conf/<task>.yaml`` composed with ``overrides`` by Hydra's compose API (``hydra``: keep the hydra node, as a run
    sees it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name=task):
            return hydra_compose(task, overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------------------ entry points
def run_python(args: list[str], cwd: Path = ROOT, timeout: int = ENTRY_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``python <args>`` in a fresh interpreter, as a user runs it: this checkout (and tests/, for test-only callbacks
    a config names by ``_target_``) on the path, ``HYDRA_FULL_ERROR`` unset, ``env`` added."""
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path} | env
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def entry_args(entry: str, run_dir: Path, *args: str) -> list[str]:
    """The command line of ``entry``: ``train.py`` / ``eval.py`` / ``analyze.py`` writing into ``run_dir``, or one of the
    ``python -m npft_lightning`` tools (``export``, ``report``)."""
    if entry.endswith(".py"):
        return [str(ROOT / entry), f"hydra.run.dir={run_dir}", *args]
    return ["-m", "npft_lightning", entry, *args]


def run_entry(entry: str, run_dir: Path, *args: str, timeout: int = ENTRY_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``entry`` (see :func:`entry_args`) in a fresh interpreter, started in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_python(entry_args(entry, run_dir, *args), cwd=run_dir, timeout=timeout, **env)


def run_sweep(sweep_dir: Path, *args: str, timeout: int = ENTRY_TIMEOUT) -> subprocess.CompletedProcess:
    """``python train.py -m hydra.sweep.dir=<sweep_dir> <args>`` in a fresh interpreter, started beside ``sweep_dir``."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_python([str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *args], cwd=sweep_dir.parent, timeout=timeout)


def run_in_process(entry: str, run_dir: Path, *args: str, timeout: int = ENTRY_TIMEOUT) -> subprocess.CompletedProcess:
    """What :func:`run_entry` prints and returns, from the same steps run in this process (no interpreter start, no
    torch import: a fraction of a second for a check that fires before the model loads).

    The steps of ``train.py`` / ``eval.py`` / ``analyze.py``: the command-line checks, the config composed by
    Hydra's compose API with the hydra node set as Hydra's run sets it, then ``cli.run``; the tools' ``main``.
    Not covered: Hydra's logging setup and the interpreter's own start; a few cases keep :func:`run_entry` for them.
    The environment, the random generators and the signal handlers are put back afterwards; past ``timeout`` seconds
    (a check that no longer fires, so the run goes on to train) the run stops with a ``TimeoutError``.
    """

    def stop(signum, frame):
        raise TimeoutError(f"{entry} {' '.join(args)} ran past {timeout} s")

    out, err = io.StringIO(), io.StringIO()
    environ, sigint = dict(os.environ), signal.getsignal(signal.SIGINT)
    states = random.getstate(), np.random.get_state()
    code = 0
    sigalrm = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng(devices=[]):
            try:
                if entry.endswith(".py"):
                    _hydra_entry(entry.removesuffix(".py"), [f"hydra.run.dir={run_dir}", *args])
                else:
                    from npft_lightning.__main__ import main

                    main([entry, *args])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:  # noqa: BLE001 - an uncaught error is a traceback and exit code 1, as in a subprocess
                traceback.print_exc()
                code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, sigalrm)
        HydraConfig.instance().cfg = None
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGINT, sigint)
        random.setstate(states[0])
        np.random.set_state(states[1])
    return subprocess.CompletedProcess([entry, *args], code, out.getvalue(), err.getvalue())


def _hydra_entry(task: str, argv: list[str]) -> None:
    """The ``__main__`` block of ``<task>.py`` and what ``@hydra.main`` does before calling ``cli.run``."""
    from omegaconf import open_dict, read_write

    from npft_lightning.cli import check_group_choices, check_overrides, run

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    check_group_choices(argv, str(CONF))
    check_overrides(argv, str(CONF), task)
    cfg = compose(task, *argv, hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).absolute())
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    Path(HydraConfig.get().runtime.output_dir).mkdir(parents=True, exist_ok=True)
    run(cfg, task)


# ------------------------------------------------------------------ probes of a real fit (the recipes' tests)
SEED, STEP_PROBABILITY, STEPS = 26, 0.15, 4
PERTURBED = {0, 2}  # what seed 26 draws for steps 0-3 at q = 0.15; checked below against the callback


class ForwardProbe(Callback):
    """Test-only: per training step, the weight each base linear's forward read, the LoRA updates, the batch,
    the loss, and the base weights after the step. Place it after ``NoisePerturbation``."""

    def __init__(self):
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        self.deltas: dict[int, dict[str, torch.Tensor]] = {}
        self.batch: dict[int, torch.Tensor] = {}
        self.loss: dict[int, float] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.validation_seen: list[dict[str, torch.Tensor]] = []
        self._handles = []
        self._step = -1
        self._in_validation_batch = False

    def _record(self, trainer: pl.Trainer, name: str, module: torch.nn.Module, args) -> None:
        if self._in_validation_batch:
            self.validation_seen[-1].setdefault(name, module.weight.detach().clone())
        elif trainer.training:
            self.seen.setdefault(self._step, {}).setdefault(name, module.weight.detach().clone())

    def on_fit_start(self, trainer, pl_module):
        for name, linear in pl_module.decoder_linears().items():
            self._handles.append(linear.register_forward_pre_hook(partial(self._record, trainer, name)))

    def on_fit_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.deltas[self._step] = {n: d.clone() for n, d in pl_module.lora_deltas().items()}
        self.batch[self._step] = batch.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss[self._step] = float(loss)
        self.after[self._step] = {n: lin.weight.detach().clone() for n, lin in pl_module.decoder_linears().items()}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._in_validation_batch = True
        self.validation_seen.append({})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._in_validation_batch = False


class StepLogger(pl.loggers.Logger):
    """Keeps every logged metric per step."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name = "steps"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)


def make_trainer(callbacks, steps: int = STEPS, logger=False, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", max_steps=steps, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


# ---------------------------------------------------------------------------------------------
# GGUF export: a written file reads back to the fake-quant weights
# ---------------------------------------------------------------------------------------------

GGUF_LINEAR_NAMES = {  # Hugging Face leaf -> GGUF tensor of block i
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def assert_gguf_reads_back(model: nn.Module, quantizer, path: Path, calibration: torch.Tensor | None = None) -> dict[str, str]:
    """Write ``model`` with ``quantizer`` (fake-quantized first on ``calibration`` where it needs windows); every
    decoder linear, dequantized by the gguf package (and unpermuted), equals the fake-quant weight bit for bit.
    Returns GGUF name -> ggml type name (lower case) of the decoder linears."""
    from gguf import GGUFReader

    from npft_lightning.lm.models import ByteTokenizer
    from npft_lightning.quant import fake_quantized
    from npft_lightning.quant.gguf_export import (
        BYTES,
        gguf_size_report,
        read_gguf_weights,
        unpermute_rows,
        write_gguf,
    )

    copied = copy.deepcopy(model)
    linears = decoder_linears(copied)
    sizes: dict = {}
    with torch.no_grad(), fake_quantized(copied, linears, quantizer, calibration=calibration, sizes=sizes):
        expected = {name: lin.weight.clone() for name, lin in linears.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = write_gguf(model, ByteTokenizer(), quantizer, path, BYTES)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    assert report["bytes"] == path.stat().st_size and not list(path.parent.glob(".*"))  # no temporary left
    # the size the fake-quant validation reports is the linears' size in this very file
    assert sizes["gguf_bits_per_weight"] == gguf_size_report(path)["bits_per_weight_linears"]
    cfg = model.config
    weights = read_gguf_weights(path)
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}
    linear_types = {}
    for name, weight in expected.items():
        block = int(name.split(".")[2])
        leaf = ".".join(name.split(".")[3:])
        gguf_name = f"blk.{block}.{GGUF_LINEAR_NAMES[leaf]}.weight"
        stored = weights[gguf_name]
        if cfg.model_type != "llama":
            pass  # gemma3: llama.cpp's NEOX-style rope reads q / k rows as they are
        elif leaf == "self_attn.q_proj":
            stored = unpermute_rows(stored, cfg.num_attention_heads)
        elif leaf == "self_attn.k_proj":
            stored = unpermute_rows(stored, cfg.num_key_value_heads)
        assert torch.equal(stored.view(torch.int32), weight.view(torch.int32)), gguf_name
        linear_types[gguf_name] = types[gguf_name]
    return linear_types
