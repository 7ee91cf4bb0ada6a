"""Perplexity computed by llama.cpp's own forward pass (the optional ``llamacpp`` extra: llama-cpp-python).

    make llamacpp                                            # builds llama-cpp-python from its sdist into .venv
    python eval.py quant=q4_0 gguf_out=smollm2-q4_0.gguf llamacpp_ppl=true

Each of our evaluation windows (the GPTQ protocol's non-overlapping windows of ``data.eval_seq_len``
tokens) is fed to llama.cpp as is, in a context of exactly that length with every position's logits
kept; two numbers come out:

* ``ppl``: every next-token prediction of each window, as our fake-quant PPL counts them (the GPTQ
  protocol), so the two are directly comparable;
* ``ppl_second_half``: only the predictions in the second half of each window, the convention of
  llama.cpp's ``perplexity`` tool (each token then sees at least half a window of context).
"""

from __future__ import annotations

import math
import os
import time
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from npft_lightning.core.errors import UserError
from npft_lightning.core.interrupt import check as stop_if_interrupted

DISTRIBUTION = "llama-cpp-python"
INSTALL_HINT = "make llamacpp (pip install -e '.[llamacpp]': builds llama.cpp from source, about 10 minutes)"


def llama_cpp_installed() -> bool:
    """Whether the extra's distribution is installed (whether or not it imports)."""
    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True


def require_llama_cpp(needed_by: str = "llamacpp_ppl=true"):
    """The ``llama_cpp`` module; a one-line UserError (naming the option ``needed_by``) when the extra is missing
    or its build does not load."""
    if not llama_cpp_installed():
        raise UserError(f"{needed_by} needs the llamacpp extra: {INSTALL_HINT}")
    try:
        import llama_cpp
    except Exception as err:  # noqa: BLE001 - a broken build fails in many ways (OSError from the shared library, ...)
        raise UserError(f"{DISTRIBUTION} is installed but does not load ({err.__class__.__name__}: {err}); "
                        f"rebuild it: {INSTALL_HINT}") from err
    return llama_cpp


def window_nll(logits: Tensor, tokens: Tensor, first: int) -> tuple[float, int, float, int]:
    """Summed next-token NLL of one window from its logits [L, vocab]: over all L - 1 predictions, and over the
    predictions from position ``first`` on (tokens ``first + 1`` .. ``L - 1``)."""
    nll = F.cross_entropy(logits[:-1].float(), tokens[1:].long(), reduction="none").double()
    return float(nll.sum()), nll.numel(), float(nll[first:].sum()), nll[first:].numel()


def llamacpp_perplexity(path: str | os.PathLike, windows: Tensor, n_threads: int | None = None) -> dict[str, Any]:
    """llama.cpp's PPL of the GGUF ``path`` on ``windows`` [n, L] (token ids), both conventions (module docstring)."""
    llama_cpp = require_llama_cpp()
    n, length = windows.shape
    threads = int(n_threads or torch.get_num_threads())
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=min(length, 512), n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=False,
    )
    try:
        if llm.n_vocab() < int(windows.max()) + 1:
            raise UserError(f"{path} has a {llm.n_vocab()}-token vocabulary, but the windows hold token {int(windows.max())}")
        total = half = 0.0
        count = half_count = 0
        seconds = 0.0
        first = length // 2
        for window in windows:
            stop_if_interrupted()
            llm.reset()
            start = time.perf_counter()
            llm.eval(window.tolist())
            seconds += time.perf_counter() - start
            logits = torch.from_numpy(llm.scores[:length])
            a, b, c, d = window_nll(logits, window, first)
            total, count, half, half_count = total + a, count + b, half + c, half_count + d
    finally:
        llm.close() if hasattr(llm, "close") else None
    return {
        "ppl": math.exp(total / count),
        "ppl_second_half": math.exp(half / half_count),
        "tokens": count,
        "tokens_second_half": half_count,
        "windows": n,
        "seconds": seconds,
        "tokens_per_s": n * length / seconds if seconds > 0 else float("nan"),
        "threads": threads,
    }
