"""Checks on the composed config that run before anything heavy is loaded, so errors come in seconds.

Each problem raises :class:`UserError` with one line naming the bad value and the fix. The checks
that need the model's shapes are in :func:`validate_against_model` (run right after loading).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from npft_lightning.core.errors import UserError
from npft_lightning.core.fs import check_checkpoint, check_writable_dir
from npft_lightning.tasks.check_values import (
    check_length,
    finite_number,
    is_int,
    is_number,
    positive_int,
    visible_gpus,
)

# Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT_STR), the ones that make sense here first.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
# ``ckpt_path`` values Lightning resolves itself instead of reading a file.
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# Integer options the group checks below do not cover: key -> (lowest value, null allowed, what the value means).
INTEGER_OPTIONS = {
    "data.num_workers": (0, False, "DataLoader worker processes (0 = load in the main process)"),
    "outliers.calibration_windows": (1, False, "windows the outlier scores are computed on"),
    "outliers.calibration_length": (2, False, "a window of one token has no next token to predict"),
    "outliers.calibration_seed": (0, False, "the seed of the calibration windows"),
    "outliers.batch_size": (1, False, "windows per backward pass of the outlier scoring"),
    "curvature.hutchinson_probes": (0, False, "0 = no Hutchinson estimate"),
    "model.tiny.hidden_size": (1, False, "the tiny model's width"),
    "model.tiny.intermediate_size": (1, False, "the tiny model's MLP width"),
    "model.tiny.num_layers": (1, False, "the tiny model's decoder blocks"),
    "model.tiny.num_heads": (1, False, "the tiny model's attention heads"),
    "model.tiny.num_kv_heads": (1, False, "the tiny model's key/value heads"),
    "model.tiny.max_position_embeddings": (2, False, "the tiny model's context"),
    "model.tiny.seed": (0, False, "the seed of the tiny model's random weights"),
    "trainer.num_sanity_val_steps": (-1, False, "-1 = every validation batch, 0 = no sanity check"),
    "trainer.log_every_n_steps": (1, False, "1 = log every step"),
    "trainer.check_val_every_n_epoch": (1, True, "1 = validate after every epoch"),
    "callbacks.model_checkpoint.save_top_k": (-1, False, "-1 keeps every step checkpoint, 0 only last.ckpt"),
    "callbacks.model_checkpoint.every_n_train_steps": (0, True, "steps between checkpoints (0 or null: at epoch ends only)"),
}
# Finite-number options: key -> (lowest value, lowest excluded, null allowed, what the value means).
NUMBER_OPTIONS = {
    "optimizer.weight_decay": (0.0, False, False, "e.g. 0.01 (0 = none)"),
    "trainer.gradient_clip_val": (0.0, False, True, "the largest gradient norm, e.g. 1.0 (null or 0 = no clipping)"),
    "curvature.sigma_rel": (0.0, True, False, "the probe's noise relative to the mean |w| of the outliers, e.g. 0.1"),
}
# PEFT's LoraConfig.bias values.
LORA_BIAS = ("none", "all", "lora_only")
# Lightning's LearningRateMonitor.logging_interval values.
LOGGING_INTERVALS = ("step", "epoch")
_ABSENT = object()












# ------------------------------------------------------------------------------------------ groups
def _check_numbers(cfg: DictConfig) -> None:
    """The plain integer and number options of :data:`INTEGER_OPTIONS` / :data:`NUMBER_OPTIONS` that the config has."""
    for key, (low, allow_none, what) in INTEGER_OPTIONS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            positive_int(key, value, what, allow_none=allow_none, low=low)
    for key, (low, strict, allow_none, what) in NUMBER_OPTIONS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            finite_number(key, value, what, low=low, strict=strict, allow_none=allow_none)


def _check_quant(name: str, q: DictConfig, prefix: str = "quant.") -> None:
    # Nested parts: the base of dense-and-sparse, the weight and activation parts of W/A quantizers.
    for part in ("base", "weight", "activation"):
        if isinstance(q.get(part), DictConfig):
            _check_quant(f"{name}.{part}", q[part], prefix)
    clip = q.get("clip_ratio")
    if clip is not None and not (is_number(clip) and 0 < clip <= 1):
        raise UserError(f"{prefix}{name}.clip_ratio={clip} must be in (0, 1]; 1 = no clipping")
    bits = q.get("bits")
    if bits is not None and not (is_int(bits) and 2 <= bits <= 8):
        raise UserError(f"{prefix}{name}.bits={bits} is outside 2..8; use an integer from 2 to 8")
    group = q.get("group_size")
    if group is not None and not (is_int(group) and group > 0):
        raise UserError(f"{prefix}{name}.group_size={group} must be a positive integer (a divisor of the input features) or null")
    _build(f"{prefix}{name}", q)


def _build(key: str, q: DictConfig) -> None:
    """The constructor of a quantizer or the outlier selector checks the rest of its settings (ReQuant's budgets, a
    ggml type, an activation method, a selection method); it needs no model, so build it now. Its one-line errors
    name the option by its key: ``quant bits=9`` of ``quant.rtn4`` becomes ``quant.rtn4.bits=9``."""
    from hydra.utils import instantiate

    from npft_lightning.tasks.one_line_errors import user_message

    if "_target_" not in q:
        return
    try:
        instantiate(q)
    except Exception as err:  # noqa: BLE001 - only the constructor's one-line errors are re-worded
        message = user_message(err)
        if message is None:
            raise
        option = re.match(r"(?:(?:requant|quant|activation|outliers) )?(\w+)=", message)
        raise UserError(f"{key}.{message[option.start(1):]}" if option else f"{key}: {message}") from None


def _check_calibration(calibration: DictConfig) -> None:
    positive_int("calibration.windows", calibration.get("windows"), "the windows GPTQ calibrates on, e.g. 128")
    check_length("calibration.length", calibration.get("length"))
    positive_int("calibration.sensitivity_windows", calibration.get("sensitivity_windows"),
                  "the windows of the Fisher that weights k-means, e.g. 16")
    seed = calibration.get("seed")
    if not is_int(seed) or seed < 0:
        raise UserError(f"calibration.seed={seed} must be an integer >= 0")


def _check_noise_and_outliers(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    from npft_lightning.npft.noise import RAMPS

    noise = cfg.get("noise")
    if noise is not None:
        scale = noise.get("scale")
        if scale is not None and (not is_number(scale) or scale < 0):
            raise UserError(f"noise.scale={scale} must be a finite number >= 0 (0 = no noise; noise=none is the control)")
        if noise.get("schedule") not in (None, "per_step", "per_epoch"):
            raise UserError(f"noise.schedule={noise.get('schedule')} is not one of per_step, per_epoch")
        if noise.get("ramp") not in (None, *RAMPS):
            raise UserError(f"noise.ramp={noise.get('ramp')} is not one of {', '.join(RAMPS)}")
        warmup = noise.get("warmup_steps")
        if warmup is not None and (not is_int(warmup) or warmup < 0):
            raise UserError(f"noise.warmup_steps={warmup} must be an integer >= 0 (steps without noise at the start)")
        for key, value in (("noise.step_probability", noise.get("step_probability")),
                           ("noise.distribution.probability", (noise.get("distribution") or {}).get("probability"))):
            if value is not None and (not is_number(value) or not 0 < value <= 1):
                raise UserError(f"{key}={value} must be in (0, 1] (1 = every time; e.g. 0.5 for half)")
        quantizer = (noise.get("distribution") or {}).get("quantizer")
        if isinstance(quantizer, DictConfig):  # the target of quant_error / uniform_step noise
            _check_quant("quantizer", quantizer, prefix="noise.distribution.")
        _check_noise_steps(noise)
        if "_target_" in noise:
            instantiate(noise)  # the distribution checks its own settings (a quant_error target needs no calibration, ...)
    outliers = cfg.get("outliers")
    if outliers is not None:
        ratio = outliers.get("ratio")
        if not is_number(ratio) or not (0 < ratio <= 100):
            raise UserError(f"outliers.ratio={ratio} must be a percentage in (0, 100]; 0.05 means 0.05 % of each matrix")
        # The selector's constructor checks method, budget, refresh and calibration sizes.
        _build("outliers", outliers)


def _check_imatrix(cfg: DictConfig) -> None:
    """train.py's ``imatrix``: calibration (with the calibration group), an imatrix file that reads as one, and
    something to weight: a noise target that takes an importance matrix, or one among the fake-quant quantizers."""
    from hydra.utils import instantiate

    from npft_lightning.quant.imatrix import read_imatrix
    from npft_lightning.tasks.build import (
        IMATRIX_CALIBRATION,
        build_quantizers,
        imatrix_targets,
    )

    source = cfg.get("imatrix")
    if source is None:
        return
    shown = str(source).lower() if isinstance(source, bool) else source  # as typed: true, not Python's True
    if not isinstance(source, str) or source in ("true", "false", "both", ""):
        raise UserError(f"imatrix={shown} is not one of calibration, null or the path of an imatrix file; imatrix=calibration "
                        f"computes one at the start of training (eval.py's true / both are its own llamacpp_types option)")
    if source == IMATRIX_CALIBRATION:
        if cfg.get("calibration") is None:
            raise UserError("imatrix=calibration is computed on calibration windows of the train split, but the calibration "
                            "group was removed; keep it (calibration=default) or give an imatrix file")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"imatrix={source} does not exist; give an imatrix file (llama-imatrix's, or the .imatrix.gguf "
                            f"of eval.py imatrix=true), or imatrix=calibration to compute one")
        read_imatrix(path)  # a file of another format is one line here
    noise = cfg.get("noise")
    distribution = instantiate(noise).distribution if noise is not None and "_target_" in noise else None
    target = getattr(distribution, "quantizer", None) if distribution is not None and distribution.enabled else None
    quantizers = build_quantizers(cfg)
    if target is not None and not imatrix_targets(target, {}):
        raise UserError(f"imatrix={source} weights the noise target, but noise.distribution.quantizer ({target.name}, "
                        f"{type(target).__name__}) takes no importance matrix; target a ggml or llama.cpp type (e.g. "
                        f"quant=[llamacpp_q4_k_m] 'noise.distribution.quantizer=${{quant.llamacpp_q4_k_m}}') or drop imatrix")
    if not imatrix_targets(target, quantizers):
        raise UserError(f"imatrix={source} weights ggml / llama.cpp quantizers, but neither the noise nor quant={list(quantizers)} "
                        f"has one; add one (e.g. quant=[llamacpp_q4_k_m]) or drop imatrix")


def check_imatrix_against_model(cfg: DictConfig, model) -> None:
    """train.py's ``imatrix`` against the loaded model: llama tensor names, and a file's entries of its shapes."""
    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.quant.imatrix import check_imatrix_fits, read_imatrix
    from npft_lightning.quant.importance import gguf_weight_name
    from npft_lightning.tasks.build import IMATRIX_CALIBRATION

    source = cfg.get("imatrix")
    if source is None:
        return
    linears = decoder_linears(model)
    try:
        names = {gguf_weight_name(name): linear.in_features for name, linear in linears.items()}
    except ValueError:
        raise UserError(f"imatrix={source}: an importance matrix names llama.cpp's tensors of a llama model, but "
                        f"model={(cfg.get('model') or {}).get('name')} ({type(model).__name__}) has other layers; drop imatrix") from None
    if source != IMATRIX_CALIBRATION:
        check_imatrix_fits(read_imatrix(Path(source).expanduser()), names, f"imatrix={source}")


def _check_noise_steps(noise: DictConfig) -> None:
    """Where the perturbed steps go, the grids they draw and what they distil towards (``npft.placement``, ``npft.distill``)."""
    from npft_lightning.npft.distill import TEACHERS
    from npft_lightning.npft.noise import RAMPS
    from npft_lightning.npft.placement import PLACEMENTS

    if noise.get("placement") not in (None, *PLACEMENTS):
        raise UserError(f"noise.placement={noise.get('placement')} is not one of {', '.join(PLACEMENTS)}")
    last = noise.get("last_fraction")
    if last is not None and (not is_number(last) or not 0 < last <= 1):
        raise UserError(f"noise.last_fraction={last} must be in (0, 1]: the last part of the run whose steps may be "
                        f"perturbed with noise.placement=last (e.g. 0.25 for the last quarter)")
    if noise.get("step_probability_ramp") not in (None, *RAMPS):
        raise UserError(f"noise.step_probability_ramp={noise.get('step_probability_ramp')} is not one of {', '.join(RAMPS)}")
    grids = (noise.get("distribution") or {}).get("quantizers")
    if grids is not None:
        if not isinstance(grids, ListConfig):
            raise UserError(f"noise.distribution.quantizers={grids} is not a list of {{quantizer: ..., weight: ...}}")
        for i, grid in enumerate(grids):
            if not isinstance(grid, DictConfig) or not isinstance(grid.get("quantizer"), DictConfig):
                raise UserError(f"noise.distribution.quantizers[{i}]={grid} is not a {{quantizer: <quantizer config>, weight: "
                                f"<number>}}, e.g. {{quantizer: ${{quant.rtn4}}, weight: 1}}")
            _check_quant(f"quantizers[{i}].quantizer", grid.quantizer, prefix="noise.distribution.")
            weight = grid.get("weight", 1.0)
            if not is_number(weight) or weight <= 0:
                raise UserError(f"noise.distribution.quantizers[{i}].weight={weight} must be a finite number > 0 (the grid's "
                                f"share of the quantized steps is its weight over the sum)")
    distill = noise.get("distill") or {}
    if distill.get("teacher") not in (None, *TEACHERS):
        raise UserError(f"noise.distill.teacher={distill.get('teacher')} is not one of {', '.join(TEACHERS)}, null "
                        f"(null = no distillation)")
    temperature, weight = distill.get("temperature"), distill.get("weight")
    if temperature is not None and (not is_number(temperature) or temperature <= 0):
        raise UserError(f"noise.distill.temperature={temperature} must be a finite number > 0, e.g. 1 (2 softens both "
                        f"distributions)")
    if weight is not None and (not is_number(weight) or not 0 < weight <= 1):
        raise UserError(f"noise.distill.weight={weight} must be in (0, 1]: the KL term's share of the loss (1 = the KL alone)")


def _check_data(data: DictConfig) -> None:
    for key in ("seq_len", "eval_seq_len"):
        if key in data:
            check_length(f"data.{key}", data.get(key))
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            positive_int(f"data.{key}", data.get(key), "see conf/data/wiki_vital.yaml")
    for key in ("max_train_windows", "max_eval_windows"):
        if key in data:
            positive_int(f"data.{key}", data.get(key), "null uses every window", allow_none=True)

    corpus = data.get("corpus") or {}
    if not str(corpus.get("_target_", "")).endswith("TextFiles"):
        return
    for split in ("train", "validation", "test"):
        patterns = corpus.get(split) or []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            path = Path(str(pattern)).expanduser()
            matches = glob.glob(str(path)) if glob.has_magic(str(path)) else [str(path)]
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise UserError(f"data.corpus.{split}: {pattern} matches no readable file; give .txt or .jsonl paths or globs")
            if all(f.stat().st_size == 0 for f in files):
                raise UserError(f"data.corpus.{split}: {pattern} is empty (0 bytes); give files that hold text")
            for file in files:
                check_text_file(f"data.corpus.{split}", file, str(corpus.get("jsonl_field", "text")))


# What the corpus check reads of each file: enough to tell text from a binary or wrong-format file, not the whole corpus.
TEXT_PROBE_BYTES = 1 << 16
JSONL_PROBE_LINES = 20


def check_text_file(key: str, path: Path, jsonl_field: str) -> None:
    """A corpus file is UTF-8 text (a ``.jsonl`` one: JSON objects with ``jsonl_field``), judged by its first 64 KiB;
    a bad line further into a ``.jsonl`` file is reported when the corpus is read, after the model loads."""
    import codecs

    from npft_lightning.lm.corpora.text_files import jsonl_problem

    if path.suffix == ".json":
        raise UserError(f"{key}: {path} is a .json file; the corpus reads .jsonl (one JSON object per line) and plain text: "
                        f"write one record per line to a .jsonl file")
    try:
        with open(path, "rb") as f:
            head = f.read(TEXT_PROBE_BYTES)
    except OSError as err:
        raise UserError(f"{key}: cannot read {path} ({err.strerror or err})") from None
    if b"\x00" in head:
        raise UserError(f"{key}: {path} is binary, not text (NUL bytes in its first 64 KiB); give .txt or .jsonl files "
                        f"(decompress a .gz first)")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at 64 KiB is fine
    except UnicodeDecodeError as err:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte 0x{head[err.start]:02x} at offset {err.start}); convert it, "
                        f"e.g. iconv -t utf-8") from None
    if path.suffix != ".jsonl":
        return
    lines = text.splitlines()
    if len(head) == TEXT_PROBE_BYTES:
        lines = lines[:-1]  # the last line may be cut by the probe
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()][:JSONL_PROBE_LINES]
    for number, line in numbered:
        problem = jsonl_problem(line, jsonl_field)
        if problem:
            raise UserError(f"{key}: {path}:{number} {problem}")


def _check_model(model: DictConfig) -> None:
    from npft_lightning.lm.models import DTYPES, TINY_ARCHS

    dtype = model.get("dtype")
    if dtype is not None and dtype not in (*DTYPES, "auto"):
        raise UserError(f"model.dtype={dtype} is not one of {', '.join([*DTYPES, 'auto'])}")
    tiny = model.get("tiny")
    if isinstance(tiny, DictConfig) and tiny.get("arch", "llama") not in TINY_ARCHS:
        raise UserError(f"model.tiny.arch={tiny.get('arch')} is not one of {', '.join(TINY_ARCHS)}")
    if model.get("path"):
        path = Path(str(model.path)).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path={model.path} does not exist; give a folder with config.json and the weights")
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={model.path} has no config.json, so it is not a Hugging Face model folder "
                            "(save one with save_pretrained)")


def _check_peft(peft: DictConfig) -> None:
    positive_int("peft.r", peft.get("r"), "the LoRA rank, e.g. peft.r=8")
    if peft.get("bias", "none") not in LORA_BIAS:
        raise UserError(f"peft.bias={peft.get('bias')} is not one of {', '.join(LORA_BIAS)} (which biases LoRA trains too)")
    if peft.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise UserError(f"peft.task_type={peft.get('task_type')} must be CAUSAL_LM: the tool fine-tunes causal language models")
    alpha = peft.get("lora_alpha")
    if alpha is not None and (not is_number(alpha) or alpha <= 0):
        raise UserError(f"peft.lora_alpha={alpha} must be a positive number, e.g. 32 (the update is scaled by alpha / r)")
    dropout = peft.get("lora_dropout")
    if dropout is not None and (not is_number(dropout) or not 0 <= dropout < 1):
        raise UserError(f"peft.lora_dropout={dropout} must be a probability in [0, 1), e.g. 0.05")


def check_targets(node: DictConfig | ListConfig, path: str = "") -> None:
    """Every ``_target_`` names something importable: a misspelt class is one line naming its key here, before
    the model loads, not a traceback from Hydra's ``instantiate`` wherever it is first built."""
    keys = range(len(node)) if isinstance(node, ListConfig) else [k for k in node.keys() if not (path == "" and k == "hydra")]
    for key in keys:
        name = f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}" if path else str(key)
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            check_targets(child, name)
        elif key == "_target_":
            problem = _import_problem(str(node[key]))
            if problem:
                raise UserError(f"{name}={node[key]} cannot be imported ({problem}); check the module and class name "
                                f"(the configs in conf/ name the right ones)")


def _import_problem(target: str) -> str | None:
    """Why the dotted path ``target`` names nothing importable (None when it does), without Hydra's own error log."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                return f"importing {module_name} failed: {err}"  # the module exists but imports something missing
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:cut])} has no {'.'.join(parts[cut:])}" if cut < len(parts) else None
            obj = getattr(obj, attr)
        return None
    return f"no module named {parts[0]}"


def _check_callbacks(callbacks: DictConfig) -> None:
    """Lightning's own callbacks check their settings only when the trainer is built, after the model loads."""
    monitor = callbacks.get("learning_rate_monitor")
    if isinstance(monitor, DictConfig) and monitor.get("logging_interval") not in (None, *LOGGING_INTERVALS):
        raise UserError(f"callbacks.learning_rate_monitor.logging_interval={monitor.get('logging_interval')} is not one of "
                        f"{', '.join(LOGGING_INTERVALS)} (null = as the scheduler steps)")


def _check_training(cfg: DictConfig) -> None:
    from npft_lightning.training.lr_schedule import LR_DECAYS

    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and (not is_number(lr) or lr <= 0):
        raise UserError(f"optimizer.lr={lr} must be a positive finite number, e.g. 5e-5")
    decay = (cfg.get("schedule") or {}).get("lr_decay")
    if decay is not None and decay not in LR_DECAYS:
        raise UserError(f"schedule.lr_decay={decay} is not one of {', '.join(LR_DECAYS)}")
    warmup = (cfg.get("schedule") or {}).get("warmup_steps")
    if warmup is not None and (not is_int(warmup) or warmup < 0):
        raise UserError(f"schedule.warmup_steps={warmup} must be an integer >= 0")
    limit = cfg.get("max_nonfinite_steps")
    if limit is not None and (not is_int(limit) or limit < 0):
        raise UserError(f"max_nonfinite_steps={limit} must be an integer >= 0 (0 = never stop on NaN losses)")
    curvature = cfg.get("curvature")
    if isinstance(curvature, DictConfig):
        positive_int("curvature.windows", curvature.get("windows"), "the windows the curvature probe averages over")
        check_length("curvature.length", curvature.get("length"))
        positive_int("curvature.draws", curvature.get("draws"), "noise draws per window of the curvature probe")


def _check_trainer(trainer: DictConfig) -> None:
    steps = trainer.get("max_steps")
    if steps is not None and (not is_int(steps) or steps < -1):
        raise UserError(f"trainer.max_steps={steps} must be -1 (no limit, use trainer.max_epochs) or a number of steps >= 0")
    epochs = trainer.get("max_epochs")
    if epochs is not None and (not is_int(epochs) or epochs < -1):
        raise UserError(f"trainer.max_epochs={epochs} must be -1 (no limit) or a number of epochs >= 0")
    if "accumulate_grad_batches" in trainer:
        positive_int("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches"), "1 = no accumulation")

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise UserError(f"trainer.accelerator={accelerator} is not one of {', '.join(ACCELERATORS)}")
    strategy = str(trainer.get("strategy", "auto"))
    gpus = visible_gpus()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        fix = ("use trainer=ddp_cpu to try DDP with CPU processes, or trainer=cpu" if "ddp" in strategy
               else "use trainer=cpu (the default)")
        raise UserError(f"trainer.accelerator={accelerator} (strategy {strategy}) needs a CUDA GPU, but none is visible "
                        f"(torch.cuda.is_available() is False); {fix}")
    devices = trainer.get("devices")
    if not (devices in (None, "auto") or (is_int(devices) and (devices >= 1 or devices == -1))
            or (isinstance(devices, ListConfig) and all(is_int(d) and d >= 0 for d in devices))):
        raise UserError(f"trainer.devices={devices} must be a number of devices >= 1, -1 (all), auto, or a list of device "
                        f"indices like [0,1]")
    if accelerator in ("gpu", "cuda") and is_int(devices) and devices > gpus:
        raise UserError(f"trainer.devices={devices} but only {gpus} GPU(s) are visible; use trainer.devices={gpus} or -1 (all)")

    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        raise UserError(f"trainer.precision={precision} is not one of {', '.join(PRECISIONS[:6])}")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and gpus == 0)
    if on_cpu and str(precision) in ("16-mixed", "16", "16-true"):
        raise UserError(f"trainer.precision={precision} (float16) is for CUDA GPUs; on the CPU use "
                        "trainer.precision=32-true (the default) or bf16-mixed")


def _check_ckpt(ckpt: Any) -> None:
    """``ckpt_path`` must be an intact Lightning checkpoint: checked here in a second instead of after the model loads."""
    if not ckpt or str(ckpt) in CKPT_KEYWORDS:
        return
    check_checkpoint("ckpt_path", ckpt, "resume from another one (the step_*.ckpt beside it, with "
                                        "callbacks.model_checkpoint.save_top_k=-1) or start afresh")










# ------------------------------------------------------------------------------------------ entry
def _written(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` as written (interpolations not resolved), or ``_ABSENT``."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def check_interpolations(cfg: DictConfig, node: DictConfig | ListConfig | None = None, path: str = "") -> None:
    """Every value of the config is given (no ``???`` left) and every ``${...}`` resolves; a bad one is named here by
    its key, not in a traceback where it is first read."""
    node = cfg if node is None else node
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        name = f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(node, key):
            raise UserError(f"{name} has no value (??? in the config): give it on the command line, {name}=...")
        try:
            value = node[key]
        except InterpolationResolutionError as err:
            raw = OmegaConf.to_container(node, resolve=False)[key]
            # data.seed=${seed} fails because seed does: name the key whose own value does not resolve
            seen = {name}
            while (ref := re.fullmatch(r"\$\{([\w.-]+)\}", str(raw))) and ref.group(1) not in seen \
                    and _written(cfg, ref.group(1)) is not _ABSENT:
                name, raw = ref.group(1), _written(cfg, ref.group(1))
                seen.add(name)
            raise UserError(f"{name}={raw} does not resolve ({str(err).splitlines()[0]}); an interpolation must name an "
                            f"existing config key (or oc.env a set environment variable): fix it or give the value itself") from None
        if isinstance(value, (DictConfig, ListConfig)):
            check_interpolations(cfg, value, name)


def validate_config(cfg: DictConfig, task: str = "train") -> None:
    """Every check that needs only the config (and the file system): before the model is loaded.

    The groups every entry point shares are checked here; ``eval`` and ``analyze`` add their own
    options (:mod:`npft_lightning.tasks.checks_eval`).
    """
    check_interpolations(cfg)
    check_targets(cfg)
    _check_numbers(cfg)
    for name, q in (cfg.get("quant") or {}).items():
        if not isinstance(q, DictConfig) or "_target_" not in q:
            raise UserError(f"quant.{name} is not a quantizer config (no _target_); pick one from conf/quant/")
        _check_quant(name, q)
    seed = cfg.get("seed")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise UserError(f"seed={seed} must be an integer >= 0")
    _check_noise_and_outliers(cfg)
    if task == "train":
        _check_imatrix(cfg)  # eval.py's imatrix is its own option (checks_eval)
    if cfg.get("data") is not None:
        _check_data(cfg.data)
    if cfg.get("calibration") is not None:
        _check_calibration(cfg.calibration)
    if cfg.get("model") is not None:
        _check_model(cfg.model)
    if cfg.get("peft") is not None:
        _check_peft(cfg.peft)
    _check_training(cfg)
    if cfg.get("trainer") is not None:
        _check_trainer(cfg.trainer)
    if isinstance(cfg.get("callbacks"), DictConfig):
        _check_callbacks(cfg.callbacks)
    _check_ckpt(cfg.get("ckpt_path"))
    paths = cfg.get("paths") or {}
    if paths.get("output_dir"):
        check_writable_dir("paths.output_dir", paths.output_dir, "point hydra.run.dir (or paths.output_dir) to a writable folder")
    if paths.get("cache_dir"):
        check_writable_dir("paths.cache_dir", paths.cache_dir, "set NPFT_CACHE (or paths.cache_dir) to a writable folder")
    if task in ("eval", "analyze"):
        from npft_lightning.tasks.checks_eval import validate_scoring_config

        validate_scoring_config(cfg, task)


def window_lengths(quantizers, outliers: bool = False) -> tuple[str, ...]:
    """The window lengths a scoring run feeds the model: evaluation, and calibration where a quantizer or the outliers need it."""
    from npft_lightning.quant.calibration import needs_fisher, needs_windows

    calibrated = any(needs_windows(q) or needs_fisher(q) for q in quantizers)
    return ("data.eval_seq_len",) + (("calibration.length",) if calibrated else ()) + (
        ("outliers.calibration_length",) if outliers else ())


def validate_against_model(cfg: DictConfig, model, lengths: tuple[str, ...] = ("data.seq_len", "data.eval_seq_len")) -> None:
    """Checks that need the model's shapes (seconds after loading, before any training or evaluation).

    ``lengths``: the dotted keys of the window lengths this run feeds the model, none longer than its context.
    """
    from omegaconf import OmegaConf

    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.lm.models import max_context

    context = max_context(model)
    for key in lengths:
        length = OmegaConf.select(cfg, key)
        if length is not None and context and length > context:
            raise UserError(f"{key}={length} is longer than the model's context of {context} tokens; use {key}<={context}")
    linears = decoder_linears(model)
    groups = []  # (key, group size): quantizers' (also a nested base or weight part) and weight perturbations'
    for qname, q in (cfg.get("quant") or {}).items():
        for part in (q, q.get("base") or {}, q.get("weight") or {}):
            groups.append((f"quant.{qname}.group_size", part.get("group_size")))
    for pname, p in (cfg.get("perturb") or {}).items():
        groups.append((f"perturb.{pname}.group_size", p.get("group_size")))
    for key, group in ((k, g) for k, g in groups if g):
        for lname, linear in linears.items():
            if linear.in_features % group:
                raise UserError(
                    f"{key}={group} does not divide the {linear.in_features} input features of "
                    f"{lname}; pick a divisor of {linear.in_features} (e.g. 32 or 64) or null for per-channel"
                )
    peft = cfg.get("peft") or {}
    targets = peft.get("target_modules")
    if targets:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
        missing = [t for t in targets if t not in leaf_names]
        if missing:
            raise UserError(f"peft.target_modules {missing} match no linear layer of this model; its decoder linears are {leaf_names}")
