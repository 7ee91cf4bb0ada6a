"""The bad-input catalogue: each entry through an entry point -> exit code 2, one line, no traceback.

``CASES`` drive ``train.py``; ``ENTRY_CASES`` drive ``eval.py``, ``analyze.py``, ``python -m npft_lightning report``
and ``python -m npft_lightning export``. The tables of docs/troubleshooting.md list the same entries. Every
error here fires before training or scoring starts: most before the model loads, the rest right after a tiny
model loads. Each case runs the entry's steps in this process (helpers.run_in_process, a fraction of a second);
the cases of ``THROUGH_THE_ENTRY`` also run the real entry point in a fresh interpreter, and the slow suite runs
every case that way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _pytest.mark.structures import ParameterSet
from helpers import (
    ROOT,
    TINY_EVAL,
    TINY_TRAIN,
    compose,
    make_tiny_llama,
    run_entry,
    run_in_process,
    tiny_adapter,
)

TINY = [*TINY_EVAL, "data.max_eval_windows=1"]
# Errors that fire only once the data is read: keep everything else small.
SMALL = [*TINY_TRAIN, "data.max_eval_windows=1", "curvature=null"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the message is the one for a machine without a GPU")
LLAMACPP = pytest.mark.skipif(not __import__("npft_lightning.quant.llamacpp", fromlist=["x"]).llama_cpp_installed(),
                              reason="the llamacpp extra is not installed (make llamacpp): the check comes after that one")

# name: (overrides, the text the one line must contain). "{x}" fields are the files of the `assets` fixture.
CASES = {
    # --- command line (before Hydra runs the job)
    "unknown model": (["model=opt-13b"], "unknown model 'opt-13b'; choose one of:"),
    "config group set to null": (["noise=null"], "noise=null: noise is a config group, not a value; choose one of: gaussian, none"),
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
                                        "quant.requant_rtn4.outlier_ratio=100 is outside [0, 100)"),
    "requant steps not dividing the budget": ([*TINY, "quant=requant_rtn4", "quant.requant_rtn4.significant_step=0.03"],
                                              "quant.requant_rtn4.significant_step=0.03 does not divide significant_ratio=0.05"),
    "requant base that is no weight quantizer": ([*TINY, "quant=requant_rtn4", "quant.requant_rtn4.base=rtn4"],
                                                 "quant.requant_rtn4.base='rtn4' is not a weight quantizer"),
    "negative noise scale": ([*TINY, "noise.scale=-1"], "noise.scale=-1 must be a finite number >= 0"),
    "non-finite noise scale": ([*TINY, "noise.scale=nan"], "noise.scale=nan must be a finite number >= 0"),
    "bad noise schedule": ([*TINY, "noise.schedule=hourly"], "noise.schedule=hourly is not one of per_step, per_epoch"),
    "bad noise ramp": ([*TINY, "noise.ramp=steep"], "noise.ramp=steep is not one of constant, linear, cosine"),
    "ratio zero": ([*TINY, "outliers.ratio=0"], "outliers.ratio=0 must be a percentage in (0, 100]"),
    "ratio above 100": ([*TINY, "outliers.ratio=150"], "outliers.ratio=150 must be a percentage in (0, 100]"),
    "unknown outlier budget": ([*TINY, "outliers.budget=half"], "outliers.budget='half' is not one of per_matrix, global, adaptive"),
    "unknown outlier method": ([*TINY, "outliers.method=hessian"], "outliers.method='hessian' is not one of"),
    "no calibration windows": ([*TINY, "outliers.calibration_windows=0"], "outliers.calibration_windows=0 must be an integer >= 1"),
    "no quantizer calibration windows": ([*TINY, "calibration.windows=0"], "calibration.windows=0 must be an integer >= 1"),
    "quantizer calibration window longer than context": ([*TINY, "quant=gptq4", "calibration.length=4096"],
                                                         "calibration.length=4096 is longer than the model's context of 512"),
    "batch size zero": ([*TINY, "data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    "lora rank zero": ([*TINY, "peft.r=0"], "peft.r=0 must be an integer >= 1"),
    "learning rate zero": ([*TINY, "optimizer.lr=0"], "optimizer.lr=0 must be a positive finite number"),
    "unknown lr decay": ([*TINY, "schedule.lr_decay=step"], "schedule.lr_decay=step is not one of linear, cosine, constant"),
    # ("{{" is one brace: the texts are format strings)
    "interpolation that does not resolve": ([*TINY, "optimizer.lr=${{nope}}"],
                                            "optimizer.lr=${{nope}} does not resolve (Interpolation key 'nope' not found)"),
    "unset environment variable": ([*TINY, "noise.scale=${{oc.env:NPFT_TEST_UNSET}}"],
                                   "noise.scale=${{oc.env:NPFT_TEST_UNSET}} does not resolve (KeyError raised while resolving"),
    "negative max_steps": ([*TINY, "trainer.max_steps=-5"], "trainer.max_steps=-5 must be -1 (no limit"),
    "unknown precision": ([*TINY, "trainer.precision=fp16"], "trainer.precision=fp16 is not one of 32-true, bf16-mixed"),
    "unknown model dtype": ([*TINY, "model.dtype=fp8"], "model.dtype=fp8 is not one of float32"),
    "missing model folder": (["model=local", "model.path=/nonexistent/model"], "model.path=/nonexistent/model does not exist"),
    "model folder not given": (["model=local"], "model.path has no value (??? in the config): give it on the command line, model.path=..."),
    "folder without config.json": (["model=local", "model.path={notamodel}"], "model.path={notamodel} has no config.json"),
    "model weights truncated": (["model=local", "model.path={brokenmodel}"],
                                "model.path={brokenmodel} cannot be loaded (SafetensorError: Error while deserializing header"),
    "model config not JSON": (["model=local", "model.path={badconfig}"], "model.path={badconfig} cannot be loaded (OSError: "),
    "unreadable text file": ([*TINY, "data=text_files", "data.corpus.train=[/nonexistent/corpus.txt]"],
                             "data.corpus.train: /nonexistent/corpus.txt matches no readable file"),
    "empty corpus": ([*TINY, "data=text_files", "data.corpus.train=[{empty}]"], "data.corpus.train: {empty} is empty (0 bytes)"),
    "checkpoint missing": ([*TINY, "ckpt_path={tmp}/run/checkpoints/last.ckpt"], "ckpt_path={tmp}/run/checkpoints/last.ckpt does not exist"),
    "checkpoint corrupt": ([*TINY, "ckpt_path={garbage}"], "ckpt_path={garbage} is not a usable checkpoint: it is truncated"),
    "checkpoint not from Lightning": ([*TINY, "ckpt_path={plain}"], "ckpt_path={plain} is not a usable checkpoint: it holds no state_dict and no "
                                                                    "pytorch-lightning_version, so it is not a Lightning training checkpoint"),
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
    "one-token training windows": ([*TINY, "data.seq_len=1"], "data.seq_len=1 must be an integer >= 2; a window of one token has no next token"),
    "no curvature windows": ([*TINY, "curvature.windows=0"], "curvature.windows=0 must be an integer >= 1"),
    "quant-noise probability above 1": ([*TINY, "noise=quant_error", "noise.distribution.probability=2"],
                                        "noise.distribution.probability=2 must be in (0, 1]"),
    "no step sees the noise": ([*TINY, "noise.step_probability=0"], "noise.step_probability=0 must be in (0, 1]"),
    "mixed objective with per-epoch noise": ([*TINY, "noise.step_probability=0.5", "noise.schedule=per_epoch"],
                                             "noise.step_probability=0.5 needs noise.schedule=per_step"),
    "unknown placement of the perturbed steps": ([*TINY, "noise.placement=first"], "noise.placement=first is not one of random, last"),
    "no last part of the run": ([*TINY, "noise.placement=last", "noise.last_fraction=0"], "noise.last_fraction=0 must be in (0, 1]"),
    "unknown distillation teacher": ([*TINY, "noise.distill.teacher=oracle"],
                                     "noise.distill.teacher=oracle is not one of self, frozen, null (null = no distillation)"),
    "distillation weight above 1": ([*TINY, "noise.distill.teacher=self", "noise.distill.weight=2"],
                                    "noise.distill.weight=2 must be in (0, 1]"),
    "distillation without perturbed steps": ([*TINY, "noise=none", "noise.distill.teacher=self"],
                                             "noise.distill.teacher=self distils on the perturbed steps, but this noise perturbs none"),
    "one grid and several": ([*TINY, "noise=quant_error", "noise.distribution.quantizers=[{{quantizer:${{quant.rtn4}},weight:1}}]"],
                             "quant_error noise needs one target: noise.distribution.quantizer, or a list of "
                             "noise.distribution.quantizers with quantizer=null"),
    "exact error towards a calibrated quantizer": ([*TINY, "noise=quant_error", "noise.distribution.quantizer._target_=npft_lightning.quant.GPTQ"],
                                                   "quant_error noise needs a weight-local quantizer; gptq4 needs calibration data (GPTQ): "
                                                   "target its grid instead, noise.distribution.quantizer='${{quant.rtn4}}'"),
    "exact error towards GPTQ on a ggml grid": ([*TINY, "noise=quant_error", "quant=[gptq_q4_0]", "noise.distribution.quantizer=${{quant.gptq_q4_0}}"],
                                                "target its grid instead, noise.distribution.quantizer='${{quant.q4_0}}' with q4_0 in quant"),
    "damage towards a grid without a step": ([*TINY, "outliers=damage", "~outliers.target", "+outliers.target={{_target_:npft_lightning.quant.NF4}}"],
                                             "outliers.method='damage' needs a target quantizer with a step size"),
    "binary corpus file": ([*TINY, "data=text_files", "data.corpus.train=[{binary}]"],
                           "data.corpus.train: {binary} is binary, not text (NUL bytes in its first 64 KiB)"),
    "corpus file not UTF-8": ([*TINY, "data=text_files", "data.corpus.train=[{latin1}]"],
                              "data.corpus.train: {latin1} is not UTF-8 text (byte 0xe9 at offset 3)"),
    "corpus as a .json file": ([*TINY, "data=text_files", "data.corpus.train=[{array}]"], "data.corpus.train: {array} is a .json file"),
    "jsonl with a truncated line": ([*TINY, "data=text_files", "data.corpus.train=[{cut}]"], "data.corpus.train: {cut}:2 is not JSON"),
    "misspelt _target_": ([*TINY, "noise=quant_error", "noise.distribution.quantizer._target_=npft_lightning.quant.RTM"],
                          "noise.distribution.quantizer._target_=npft_lightning.quant.RTM cannot be imported (npft_lightning.quant has no RTM)"),
    "unknown LoRA bias": ([*TINY, "peft.bias=some"], "peft.bias=some is not one of none, all, lora_only"),
    "unknown tiny architecture": ([*TINY, "model.tiny.arch=gpt2"], "model.tiny.arch=gpt2 is not one of llama, opt, gemma3"),
    "checkpoint of another run": ([*SMALL, "ckpt_path={ckpt}"],
                                  "ckpt_path={ckpt} does not fit this run's model and LoRA config: 28 adapter tensors missing"),
    "imatrix not a choice": ([*TINY, "imatrix=true"], "imatrix=true is not one of calibration, null or the path of an imatrix file"),
    "imatrix file missing": ([*TINY, "imatrix=/nonexistent/m.imatrix.gguf"], "imatrix=/nonexistent/m.imatrix.gguf does not exist"),
    "imatrix file of another format": ([*TINY, "imatrix={garbage}"], "imatrix file {garbage} is neither a GGUF nor a legacy .dat imatrix"),
    "imatrix file that is a model": ([*TINY, "imatrix={modelgguf}"], "imatrix file {modelgguf} is a GGUF file without importance entries"),
    "imatrix towards a target that takes none": ([*TINY, "imatrix=calibration"],
                                                 "imatrix=calibration weights the noise target, but noise.distribution.quantizer"),
    "imatrix without calibration windows": ([*TINY, "experiment=mixed_q4_k", "imatrix=calibration", "~calibration"],
                                            "imatrix=calibration is computed on calibration windows of the train split, but the "
                                            "calibration group was removed"),
    "imatrix window longer than context": ([*TINY, "experiment=mixed_q4_k_imatrix", "calibration.length=4096"],
                                           "calibration.length=4096 is longer than the model's context of 512"),
    "imatrix of another model": ([*TINY, "experiment=mixed_q4_k", "imatrix={otherimatrix}"],
                                 "imatrix={otherimatrix}: its entry blk.0.attn_q.weight has 32 values, but the model's "
                                 "blk.0.attn_q.weight has 64 input features; the imatrix was computed for another model"),
    "imatrix of a model that is not llama": (["model=tiny-opt", *TINY[1:], "quant=[q4_0]", "noise=quant_error",
                                              "noise.distribution.quantizer=${{quant.q4_0}}", "imatrix=calibration"],
                                             "imatrix=calibration: an importance matrix names llama.cpp's tensors of a llama "
                                             "model, but model=tiny-opt"),
    "corpus shorter than one window": ([*SMALL, "data=text_files", "data.corpus.train=[{short}]", "data.corpus.validation=[{short}]",
                                        "data.corpus.test=[{short}]"],
                                       "the train split of text_files has 40 tokens, fewer than one window of seq_len=64"),
}


# The other entry points: (entry, arguments, the text the one line must contain). Checks of config values run
# with UNLOADABLE, a model folder that fails to load: their line coming first shows they fire before the model
# loads. Checks against the model run with the tiny one.
UNLOADABLE = ["model=local", "model.path={unloadable}", "data.eval_seq_len=128", "data.max_eval_windows=1"]
SCORE_TINY = [*TINY, "calibration.windows=2", "calibration.length=64"]
ENTRY_CASES = {
    # --- eval.py, its own options (before the model loads)
    "eval: unknown split": ("eval.py", [*UNLOADABLE, "splits=[valid]"], "splits=['valid']: 'valid' is not a split; choose from train, validation, test"),
    "eval: no split": ("eval.py", [*UNLOADABLE, "splits=[]"], "splits=[] selects no split to score"),
    "eval: one-token windows": ("eval.py", [*UNLOADABLE, "data.eval_seq_len=1"], "data.eval_seq_len=1 must be an integer >= 2"),
    "eval: interpolation that does not resolve": ("eval.py", [*UNLOADABLE, "data.eval_seq_len=${{data.nope}}"],
                                                  "data.eval_seq_len=${{data.nope}} does not resolve (Interpolation key 'data.nope' not found)"),
    "eval: adapter missing": ("eval.py", [*UNLOADABLE, "adapter={tmp}/nothing"], "adapter={tmp}/nothing does not exist; give the adapter/ folder"),
    "eval: checkpoint given as adapter": ("eval.py", [*UNLOADABLE, "adapter={ckpt}"],
                                          "adapter={ckpt} is a file, not an adapter folder; export it first: python -m npft_lightning export {ckpt}"),
    "eval: adapter without weights": ("eval.py", [*UNLOADABLE, "adapter={noweights}"],
                                      "adapter={noweights} has no adapter weights (adapter_model.safetensors or adapter_model.bin)"),
    "eval: adapter config not JSON": ("eval.py", [*UNLOADABLE, "adapter={badjson}"], "adapter={badjson}: adapter_config.json cannot be read (JSONDecodeError)"),
    "eval: adapter weights truncated": ("eval.py", [*UNLOADABLE, "adapter={truncated}"],
                                        "adapter={truncated}: adapter_model.safetensors cannot be read"),
    "eval: export under a file": ("eval.py", [*UNLOADABLE, "quant=rtn4", "export_dir={afile}/exports"],
                                  "export_dir={afile}/exports cannot be created or written ({afile} is a file, not a folder)"),
    "eval: export over another folder": ("eval.py", [*UNLOADABLE, "quant=rtn4", "export_dir={exports}"],
                                         "export_dir={exports}/rtn4 already exists and is not a quantized artefact (no quant_config.json)"),
    "eval: export of an activation quantizer": ("eval.py", [*UNLOADABLE, "quant=w4a8", "export_dir={tmp}/exports"],
                                                "export_dir cannot hold w4a8: activation quantization happens at run time"),
    "eval: export without a quantizer": ("eval.py", [*UNLOADABLE, "quant=none", "export_dir={tmp}/exports"],
                                         "export_dir={tmp}/exports has nothing to hold: quant selects no quantizer"),
    "eval: gguf_out with a non-ggml quantizer": ("eval.py", [*UNLOADABLE, "quant=rtn4", "gguf_out={tmp}/m.gguf"],
                                                 "gguf_out={tmp}/m.gguf: quant.rtn4 (RTN) has no ggml type"),
    "eval: gguf_out with a K-quant whose blocks do not fill the rows": (
        "eval.py", [*SCORE_TINY, "quant=q4_k", "gguf_out={tmp}/m.gguf"],
        "gguf_out={tmp}/m.gguf: quant.q4_k (q4_k) stores blocks of 256 weights of a row, which do not divide the 64 input "
        "features of this model's decoder linears; llama.cpp writes such tensors in a fallback type: use quant=llamacpp_q4_k_m"),
    "eval: gguf_out of an unsupported architecture": ("eval.py", ["model=tiny-opt", *SCORE_TINY[1:], "quant=q4_0", "gguf_out={tmp}/m.gguf"],
                                                      "gguf_out={tmp}/m.gguf: model tiny-opt has architecture 'opt'; the GGUF export supports llama"),
    "eval: gguf_out without a tokenizer to copy": ("eval.py", [*UNLOADABLE, "quant=q4_0", "gguf_out={tmp}/m.gguf"],
                                                   "gguf_out: llama.cpp needs the tokenizer in the file, and model 'local' has no GGUF"),
    "eval: gguf_out under a file": ("eval.py", [*SCORE_TINY, "quant=q4_0", "gguf_out={afile}/m.gguf"],
                                    "gguf_out={afile}/m.gguf: the folder {afile} cannot be created or written ({afile} is a file, not a folder)"),
    "eval: gguf_vocab not a GGUF file": ("eval.py", [*UNLOADABLE, "gguf_vocab={afile}"], "gguf_vocab={afile} is not a GGUF file"),
    "eval: gguf_vocab truncated": ("eval.py", [*UNLOADABLE, "gguf_vocab={cutgguf}"],
                                   "gguf_vocab={cutgguf} cannot be read as GGUF"),
    "eval: unknown llama.cpp float type": ("eval.py", [*UNLOADABLE, "llamacpp_float=f8"], "llamacpp_float=f8 is not one of f32, f16"),
    "eval: no llama.cpp threads": ("eval.py", [*UNLOADABLE, "llamacpp_threads=0"], "llamacpp_threads=0 must be an integer >= 1 or null"),
    "eval: unknown llama.cpp file type": ("eval.py", [*UNLOADABLE, "llamacpp_types=[Q4_K_M,Q4_K_X]", "gguf_out={tmp}/m.gguf"],
                                          "llamacpp_types: 'Q4_K_X' is not a llama.cpp file type this quantizer writes; choose from "
                                          "Q4_0, Q4_1, Q5_0"),
    "eval: llama.cpp files without gguf_out": ("eval.py", [*UNLOADABLE, "llamacpp_types=[Q4_K_M]"],
                                               "llamacpp_types=['Q4_K_M'] writes GGUF files: set gguf_out=<file>.gguf"),
    "eval: imatrix without llama.cpp types": ("eval.py", [*UNLOADABLE, "imatrix=true"],
                                              "imatrix=true weights llama.cpp's quantizer, but llamacpp_types is empty"),
    "eval: imatrix not a choice": ("eval.py", [*UNLOADABLE, "llamacpp_types=[Q4_0]", "imatrix=always"],
                                   "imatrix=always is not one of true, false, both"),
    "eval: imatrix without calibration data": ("eval.py", [*UNLOADABLE, "llamacpp_types=[Q4_0]", "imatrix=both",
                                                           "gguf_out={tmp}/m.gguf", "~calibration"],
                                               "imatrix=both is computed on calibration windows of the train split, but "
                                               "calibration.windows / calibration.length are not set"),
    "eval: imatrix file of another format": ("eval.py", [*UNLOADABLE, "llamacpp_types=[Q4_0]", "imatrix={garbage}",
                                                         "gguf_out={tmp}/m.gguf"],
                                             "imatrix file {garbage} is neither a GGUF nor a legacy .dat imatrix"),
    "eval: imatrix file of another model": pytest.param(
        "eval.py", [*SCORE_TINY, "llamacpp_types=[Q4_K_M]", "imatrix={otherimatrix}", "gguf_out={tmp}/m.gguf"],
        "imatrix={otherimatrix}: its entry blk.0.attn_q.weight has 32 values", marks=LLAMACPP),
    "eval: llama.cpp type of a non-llama model": ("eval.py", ["model=tiny-opt", *SCORE_TINY[1:], "llamacpp_types=[Q4_K_M]",
                                                              "gguf_out={tmp}/m.gguf"],
                                                  "llamacpp_types: model tiny-opt has architecture 'opt'; the GGUF export supports llama"),
    "eval: llama.cpp type whose blocks do not divide the rows": ("eval.py", [*SCORE_TINY, "model.tiny.hidden_size=48",
                                                                             "llamacpp_types=[Q4_K_M]", "gguf_out={tmp}/m.gguf"],
                                                                 "llamacpp_types: Q4_K_M cannot quantize the decoder linears with 48 "
                                                                 "input features: Q4_K's 256-wide blocks (and any fallback) do not "
                                                                 "divide 48, so llama.cpp would store them as F16"),
    "eval: llama.cpp files under a file": ("eval.py", [*SCORE_TINY, "llamacpp_types=[Q4_K_M]", "gguf_out={afile}/m.gguf"],
                                           "gguf_out={afile}/m-F32.gguf: the folder {afile} cannot be created or written"),
    "eval: unknown device": ("eval.py", [*UNLOADABLE, "device=tpu"], "device=tpu is not one of cpu, cuda, cuda:<index>, mps"),
    "eval: GPU device without a GPU": pytest.param("eval.py", [*UNLOADABLE, "device=cuda"], "device=cuda needs a CUDA GPU, but none is visible",
                                                   marks=NO_GPU),
    "eval: no calibration windows": ("eval.py", [*UNLOADABLE, "calibration.windows=0"], "calibration.windows=0 must be an integer >= 1"),
    "eval: calibration removed for a quantizer that needs it": ("eval.py", ["model=tiny-llama", "data.eval_seq_len=128", "data.max_eval_windows=1", "quant=gptq4", "~calibration"],
                                                                 "quant=gptq4 needs calibration windows of the train split, but the "
                                                                 "calibration group was removed"),
    "eval: one-token calibration windows": ("eval.py", [*UNLOADABLE, "calibration.length=1"], "calibration.length=1 must be an integer >= 2"),
    # --- eval.py, against the model (right after it loads, before any scoring)
    "eval: adapter of another architecture": ("eval.py", ["model=tiny-opt", *SCORE_TINY[1:], "adapter={adapter}"],
                                              "adapter={adapter} was trained for LlamaForCausalLM, but model=tiny-opt loads OPTForCausalLM"),
    "eval: adapter of other shapes": ("eval.py", [*SCORE_TINY, "model.tiny.hidden_size=32", "adapter={adapter}"],
                                      "adapter={adapter} does not fit model=tiny-llama: its LoRA weights for model.layers.0.mlp.down_proj "
                                      "map 128 -> 64 features, the model's layer 128 -> 32"),
    "eval: adapter of layers the model lacks": ("eval.py", [*SCORE_TINY, "model.tiny.num_layers=1", "adapter={adapter}"],
                                                "adapter={adapter} adapts model.layers.1.mlp.down_proj, which model=tiny-llama does not have"),
    "eval: window longer than context": ("eval.py", [*SCORE_TINY, "data.eval_seq_len=100000"],
                                         "data.eval_seq_len=100000 is longer than the model's context of 512"),
    "eval: calibration window longer than context": ("eval.py", [*SCORE_TINY, "quant=gptq4", "calibration.length=4096"],
                                                     "calibration.length=4096 is longer than the model's context of 512"),
    "eval: imatrix on a train split shorter than a window": pytest.param(
        "eval.py", [*SCORE_TINY, "data=text_files", "data.corpus.train=[{short}]", "data.corpus.validation=[{short}]",
                    "data.eval_seq_len=16", "llamacpp_types=[Q8_0]", "imatrix=true", "gguf_out={tmp}/m.gguf"],
        "the train split of text_files has 40 tokens, fewer than one calibration window of 64", marks=LLAMACPP),
    "eval: group size not dividing": ("eval.py", [*SCORE_TINY, "quant=rtn4_g32", "quant.rtn4_g32.group_size=48"],
                                      "quant.rtn4_g32.group_size=48 does not divide the 64 input features of model.layers.0"),
    # --- analyze.py
    "analyze: unknown split": ("analyze.py", [*UNLOADABLE, "split=valid"], "split=valid: 'valid' is not a split"),
    "analyze: adapters as a list": ("analyze.py", [*UNLOADABLE, "adapters=[a,b]"], "adapters=['a', 'b'] must map names to adapter folders"),
    "analyze: a variant's adapter missing": ("analyze.py", [*UNLOADABLE, "adapters={{base:null,x:{tmp}/nothing}}"],
                                             "adapters.x={tmp}/nothing does not exist"),
    "analyze: magnitudes not a list": ("analyze.py", [*UNLOADABLE, "perturb=w_uniform_range", "perturb.w_uniform_range.magnitudes=0.1"],
                                       "perturb.w_uniform_range.magnitudes=0.1 must be a list, e.g. perturb.w_uniform_range.magnitudes=[0.1]"),
    "analyze: no magnitudes": ("analyze.py", [*UNLOADABLE, "perturb=w_uniform_range", "perturb.w_uniform_range.magnitudes=[]"],
                               "perturb.w_uniform_range.magnitudes=[] must be a non-empty list"),
    "analyze: unknown outliers_on": ("analyze.py", [*UNLOADABLE, "outliers_on=mine"], "outliers_on=mine is not one of pretrained, self"),
    "analyze: nothing to analyze": ("analyze.py", [*UNLOADABLE, "perturb=none"], "nothing to analyze"),
    "analyze: perturbation group size not dividing": ("analyze.py", [*SCORE_TINY, "perturb=w_uniform_range", "perturb.w_uniform_range.group_size=48"],
                                                      "perturb.w_uniform_range.group_size=48 does not divide the 64 input features"),
    "analyze: a later variant's adapter does not fit": ("analyze.py", [*SCORE_TINY, "model.tiny.num_layers=1", "adapters={{base:null,lora:{adapter}}}"],
                                                        "adapters.lora={adapter} adapts model.layers.1.mlp.down_proj, which model=tiny-llama does not have"),
    # --- python -m npft_lightning report
    "report: no arguments": ("report", [], "the following arguments are required: sweep_dir; see python -m npft_lightning report --help"),
    "report: sweep folder missing": ("report", ["{tmp}/nosweep"], "sweep_dir={tmp}/nosweep does not exist"),
    "report: folder without jobs": ("report", ["{notamodel}"], "sweep_dir={notamodel} holds no Hydra job (no .hydra/overrides.yaml below it)"),
    "report: unreadable metrics.json": ("report", ["{sweep}"], "{sweep}/1/metrics.json cannot be read as JSON (JSONDecodeError)"),
    "report: --out under a file": ("report", ["{sweep}", "--out", "{afile}/report"], "--out={afile}/report cannot be created or written ({afile} is a file"),
    # --- python -m npft_lightning export
    "export: checkpoint missing": ("export", ["{tmp}/nothing.ckpt"], "checkpoint={tmp}/nothing.ckpt does not exist"),
    "export: checkpoint corrupt": ("export", ["{garbage}"], "checkpoint={garbage} is not a usable checkpoint: it is truncated"),
    "export: no run config beside it": ("export", ["{lonely}"], "no run config at {tmp}/.hydra/config.yaml; pass --config"),
    "export: --config missing": ("export", ["{ckpt}", "--config", "{tmp}/nothing.yaml"], "--config={tmp}/nothing.yaml does not exist"),
    "export: --config not a run config": ("export", ["{ckpt}", "--config", "{other}"],
                                          "--config={other} is not the config of a train.py run (it has no model, peft, optimizer, schedule)"),
    "export: --out under a file": ("export", ["{ckpt}", "--out", "{afile}/adapter"], "--out={afile}/adapter cannot be created or written"),
    "export: --out over another folder": ("export", ["{ckpt}", "--out", "{exports}"],
                                          "--out={exports} already exists and is not an adapter folder (no adapter_config.json)"),
    "export: checkpoint of another run": ("export", ["{ckpt}"], "does not match the model and LoRA config of the run"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """Bad inputs on disk: a file where a folder should be, garbage and empty files, a model folder of an unknown
    architecture, broken adapter folders, a fake checkpoint beside a run config, a sweep with a corrupt job."""
    import shutil

    from omegaconf import OmegaConf
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from npft_lightning.lm.models import ByteTokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("forty bytes of text, one window needs 64")
    (root / "binary.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))  # a gzip header: NUL bytes
    (root / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (root / "array.json").write_text('[{"text": "a record"}]\n')
    (root / "cut.jsonl").write_text('{"text": "a record"}\n{"text": "a record cut sh')
    (root / "cutgguf.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(9))  # the header of a GGUF, cut short
    (root / "notamodel").mkdir()
    config = GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=512)
    GPTNeoXForCausalLM(config).save_pretrained(root / "neox")
    ByteTokenizer().save_pretrained(root / "neox")
    (root / "hf").mkdir()  # an empty Hugging Face home: no hub model is cached
    (root / "unloadable").mkdir()
    (root / "unloadable" / "config.json").write_text("{}")  # passes the config checks, fails to load
    for name in ("brokenmodel", "badconfig"):  # a llama folder with its weights cut in half / its config not JSON
        make_tiny_llama().save_pretrained(root / name)
        ByteTokenizer().save_pretrained(root / name)
    weights = root / "brokenmodel" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "badconfig" / "config.json").write_text("{not json")
    adapter = tiny_adapter(root / "adapter")
    for name in ("noweights", "badjson", "truncated"):
        (root / name).mkdir()
        shutil.copy(adapter / "adapter_config.json", root / name)
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    shutil.copy(adapter / "adapter_model.safetensors", root / "badjson")
    (root / "truncated" / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:40])
    (root / "exports" / "rtn4").mkdir(parents=True)
    (root / "exports" / "rtn4" / "notes.txt").write_text("not a quantized artefact\n")
    # A checkpoint (holding no adapter tensors) beside the config of a tiny-llama run, and one beside no config.
    # A Lightning checkpoint (holding no adapter tensors) beside the config of a tiny-llama run, one beside no
    # config, and a torch.save file that is not a Lightning checkpoint.
    checkpoint = {"state_dict": {}, "pytorch-lightning_version": "2.5.0"}
    (root / "trained" / "checkpoints").mkdir(parents=True)
    (root / "trained" / ".hydra").mkdir()
    torch.save(checkpoint, root / "trained" / "checkpoints" / "last.ckpt")
    OmegaConf.save(compose("train", "model=tiny-llama"), root / "trained" / ".hydra" / "config.yaml")
    (root / "lonely").mkdir()
    torch.save(checkpoint, root / "lonely" / "last.ckpt")
    torch.save({"weights": {}}, root / "plain.pt")
    (root / "other.yaml").write_text("a: 1\n")
    for job in ("0", "1"):  # a sweep whose second job has a corrupt metrics.json
        (root / "sweep" / job / ".hydra").mkdir(parents=True)
        (root / "sweep" / job / ".hydra" / "overrides.yaml").write_text(f"- noise.scale={job}\n")
    (root / "sweep" / "1" / "metrics.json").write_text("{truncated")
    from gguf import GGUFWriter

    from npft_lightning.quant.imatrix import ImportanceMatrix, write_imatrix

    write_imatrix(ImportanceMatrix({"blk.0.attn_q.weight": torch.ones(32, dtype=torch.float64)}, {"blk.0.attn_q.weight": 4}, 64, 1),
                  root / "other.imatrix.gguf")  # an imatrix of a model 32 wide
    writer = GGUFWriter(root / "model.gguf", "llama")  # a GGUF that holds a model's tensor, no imatrix
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = ("afile", "garbage.ckpt", "empty.txt", "short.txt", "binary.gz", "latin1.txt", "array.json", "cut.jsonl", "cutgguf.gguf",
             "notamodel", "neox", "hf", "unloadable", "brokenmodel", "badconfig",
             "adapter", "noweights",
             "badjson", "truncated", "exports", "lonely/last.ckpt", "other.yaml", "sweep", "plain.pt")
    return {name.split("/")[0]: str(root / name) for name in names} | {
        "tmp": str(root), "ckpt": str(root / "trained" / "checkpoints" / "last.ckpt"),
        "otherimatrix": str(root / "other.imatrix.gguf"), "modelgguf": str(root / "model.gguf")}


def _fill(text: str, assets: dict[str, str]) -> str:
    return text.format(**{k.split(".")[0]: v for k, v in assets.items()})


# The cases that also run through the real entry point in the fast suite: the command-line checks before Hydra runs,
# a config check, a check against the loaded model, each of the other entry points, and the one a fresh interpreter
# must stand for (huggingface_hub reads HF_HOME once, when it is imported).
THROUGH_THE_ENTRY = {"unknown model", "negative noise scale", "group size not dividing", "hub model not cached",
                     "eval: unknown split", "analyze: unknown split", "report: no arguments", "export: checkpoint corrupt"}
IN_A_FRESH_INTERPRETER_ONLY = {"hub model not cached"}


def _cases(fresh_interpreter: bool) -> list[ParameterSet]:
    """Every case of both tables as (entry, arguments, expected line); through a fresh interpreter, all but the cases of
    ``THROUGH_THE_ENTRY`` are slow."""
    cases = []
    train = {name: pytest.param("train.py", *c.values, marks=c.marks) if isinstance(c, ParameterSet) else ("train.py", *c)
             for name, c in CASES.items()}
    for name, case in (train | ENTRY_CASES).items():
        values, marks = (case.values, list(case.marks)) if isinstance(case, ParameterSet) else (case, [])
        if fresh_interpreter and name not in THROUGH_THE_ENTRY:
            marks.append(pytest.mark.slow)
        if fresh_interpreter or name not in IN_A_FRESH_INTERPRETER_ONLY:
            cases.append(pytest.param(*values, marks=marks, id=name))
    return cases


def assert_one_clear_line(proc, run_dir: Path, expected: str) -> None:
    """Exit code 2 and one ``error:`` line holding ``expected``, no traceback; nothing was scored or trained first (no
    results written, and no progress bar but the model's weights loading and analyze.py's overall bar before its
    first point: scoring a long window first took minutes)."""
    # Progress bars of work that finished before the error (loading a model's weights) are not error output.
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not any(run_dir.glob("*.csv")) and not (run_dir / "metrics.json").exists()
    bars = [line.strip() for line in proc.stderr.splitlines() if PROGRESS_BAR.search(line)]
    assert all(line.startswith("Loading") or re.match(r"analysis: +0%\|.*\| 0/", line) for line in bars), bars


@pytest.mark.parametrize("entry,args,expected", _cases(fresh_interpreter=False))
def test_bad_input_gives_one_clear_line(tmp_path, assets, entry, args, expected):
    proc = run_in_process(entry, tmp_path, *[_fill(a, assets) for a in args])
    assert_one_clear_line(proc, tmp_path, _fill(expected, assets))


@pytest.mark.parametrize("entry,args,expected", _cases(fresh_interpreter=True))
def test_bad_input_through_the_entry_point_gives_one_clear_line(tmp_path, assets, entry, args, expected):
    proc = run_entry(entry, tmp_path, *[_fill(a, assets) for a in args], HF_HOME=assets["hf"])
    assert_one_clear_line(proc, tmp_path, _fill(expected, assets))


def _table_rows(page: str, heading: str) -> list[str]:
    table = page.split(heading, 1)[1].split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_catalogue_is_large_and_in_the_docs():
    """At least 25 train.py entries and 20 of the other entry points, and the tables of docs/troubleshooting.md
    have at least as many rows."""
    assert len(CASES) >= 25 and len(ENTRY_CASES) >= 20
    entries = {(case.values if isinstance(case, ParameterSet) else case)[0] for case in ENTRY_CASES.values()}
    assert entries == {"eval.py", "analyze.py", "report", "export"}
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert len(_table_rows(page, "\n| input |")) >= 25
    assert len(_table_rows(page, "\n| entry point | input |")) >= 20


def test_full_traceback_on_request(tmp_path):
    """HYDRA_FULL_ERROR=1 keeps the traceback of a user error for debugging."""
    proc = run_entry("train.py", tmp_path, *TINY, "noise.scale=-1", HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "noise.scale=-1" in proc.stderr


def test_no_surprises_offline_and_no_remote_code(monkeypatch):
    """The entry points make every Hugging Face library offline (a value the user exported stands), and no
    model config runs code from a model repository."""
    from omegaconf import OmegaConf

    from npft_lightning.core.env import set_offline_defaults
    from npft_lightning.lm.models import CausalLMSpec

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
