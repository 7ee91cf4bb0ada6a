"""Test-only runner: run an entry script (``train.py``, ``eval.py``, ``analyze.py``) with a phase made slow and
observable, so that a test can send a signal while the run is inside that phase.

    python tests/interrupt_probe.py READY_FILE 'module:Attr.method' SECONDS SCRIPT [overrides ...]

Each call of ``module:Attr.method`` (a function of a module, or a method of a class) first creates READY_FILE
(the test waits for it) and sleeps SECONDS, then runs the original: a loop that calls it once per batch,
window or layer becomes long enough that only a check between its iterations stops it promptly.
"""

from __future__ import annotations

import functools
import importlib
import runpy
import sys
import time
from pathlib import Path


def slowed(function, ready: Path, seconds: float):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        ready.touch()
        time.sleep(seconds)
        return function(*args, **kwargs)

    return wrapper


def main() -> None:
    ready, target, seconds, script, *overrides = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # what `python SCRIPT` puts first: the checkout the script is in
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, slowed(getattr(owner, name), Path(ready), float(seconds)))
    sys.argv = [script, *overrides]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
