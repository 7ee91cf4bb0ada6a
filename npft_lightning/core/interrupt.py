"""Stopping promptly on Ctrl-C (SIGINT) and SIGTERM, wherever the signal arrives.

The entry points install the handlers once, before the model loads (:func:`install`). From then on:

* Outside training the handler raises :class:`Interrupted` at once: loading, tokenizing and scoring
  have nothing to save, and the weight changes of fake quantization and perturbations are undone
  by their ``finally`` blocks (:mod:`~npft_lightning.core.restore`).
* Inside a :func:`deferred` block (the training fit) the handler only records the signal: a
  training step in flight finishes (a checkpoint is exact only between optimizer steps), and the
  long loops (evaluation windows, outlier-scoring and calibration batches, quantized layers) call
  :func:`check`, which raises :class:`Interrupted` there, at a known point between two batches.
* A second signal stops at once, also inside a deferred block (``Interrupted.forced``: nothing is saved).

Exit codes follow the shell's convention for a death by signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """The run was stopped by a signal. A ``BaseException`` like ``KeyboardInterrupt``, so that the
    ``except Exception`` of a library (or of our own fallbacks) does not swallow it.

    ``forced``: a second signal, raised wherever the program was; nothing may be saved from that state.
    """

    def __init__(self, signum: int, forced: bool = False):
        self.signum = int(signum)
        self.forced = forced
        super().__init__(f"{signal_name(self.signum)}{' (twice)' if forced else ''}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM (what a shell reports for a death by signal)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return _NAMES.get(signum, signal.Signals(signum).name)


_received: int | None = None  # the first signal since install()
_deferring = 0  # depth of deferred() blocks
_installed = False
_outcome: str | None = None  # what was saved and how to go on, for the entry point's last line


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    if _received is not None:  # the second one: the user means now
        raise Interrupted(signum, forced=True)
    _received = signum
    if not _deferring:
        raise Interrupted(signum)
    # os.write, not print: a handler that prints while the interrupted code prints raises "reentrant call".
    again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
    os.write(2, f"\n{signal_name(signum)}: stopping after the current training step or evaluation batch (with a "
                f"checkpoint once training has started); send {again} again to stop at once, without saving\n".encode())


def install() -> None:
    """Handle SIGINT and SIGTERM as described in the module docstring, and forget an earlier signal.

    Only the main thread may set signal handlers; elsewhere (a thread running a job) this does nothing.
    """
    global _received, _installed, _outcome
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    _received, _installed, _outcome = None, True, None


def installed() -> bool:
    """Whether :func:`install` ran in this process (a worker spawned by ``ddp_spawn`` starts without)."""
    return _installed and signal.getsignal(signal.SIGINT) is _on_signal


def received() -> int | None:
    """The signal number of the stop request, None when none came."""
    return _received


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested: call it between the batches of a long loop."""
    if _received is not None:
        raise Interrupted(_received)


def set_outcome(line: str) -> None:
    """Record what the interrupted run saved and how to go on: the rest of the line that begins
    ``interrupted by <signal>``, e.g. ``" after step 4; checkpoint saved to ..."``."""
    global _outcome
    _outcome = line


def outcome() -> str | None:
    """The line of :func:`set_outcome`, None when nothing was recorded (then nothing was saved)."""
    return _outcome


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block a (first) signal only records the stop request; :func:`check` acts on it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
