"""File-system checks that run before anything heavy: a folder we can write, an output folder that is ours
to replace, a checkpoint that is intact. Each failure is one :class:`UserError` line naming the key."""

from __future__ import annotations

import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from npft_lightning.core.errors import UserError


def check_checkpoint(key: str, ckpt: Any, fix: str) -> None:
    """One line naming ``key`` unless ``ckpt`` is a readable Lightning training checkpoint (only its structure is read)."""
    import torch

    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        where = f"checkpoints in {path.parent}: {', '.join(near)}" if near else "give <run dir>/checkpoints/last.ckpt of an earlier run"
        raise UserError(f"{key}={ckpt} does not exist; {where}")
    problem = None
    if not zipfile.is_zipfile(path):
        problem = "it is truncated or not a file torch.save wrote"
    else:
        try:  # mmap: the tensors stay on disk, only the structure is read
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            missing = [k for k in ("state_dict", "pytorch-lightning_version") if not isinstance(state, dict) or k not in state]
            if missing:
                problem = f"it holds no {' and no '.join(missing)}, so it is not a Lightning training checkpoint"
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):  # foreign objects inside: let Lightning decide
                problem = f"it cannot be read ({err.__class__.__name__})"
        except Exception as err:  # noqa: BLE001 - any failure to read it means the same to the user
            problem = f"it cannot be read ({err.__class__.__name__})"
    if problem:
        raise UserError(f"{key}={ckpt} is not a usable checkpoint: {problem}; {fix}")


def check_writable_dir(key: str, path: str | Path, fix: str, create: bool = True) -> None:
    """One line naming ``key`` unless ``path`` is a folder we can write to.

    Tested by writing, since permission bits say nothing for root: with ``create`` the folder is made
    and a temporary file created in it; without, only a temporary file in its nearest existing ancestor
    (nothing is left behind).
    """
    path = Path(path).expanduser()
    reason = None
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        target = path if create else next(p for p in (path, *path.parents) if p.exists())
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
    if reason is None:
        return
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        reason = f"{blocker} is a file, not a folder"
    raise UserError(f"{key}={path} cannot be created or written ({reason}); {fix}")


def check_output_dir(key: str, path: str | Path, marker: str, what: str, fix: str) -> None:
    """A folder this tool replaces whole (an export): writable, and not some other folder that replacing it would delete.

    ``marker`` is the file that shows an existing folder is one of ours (``what``); a missing or empty folder is fine.
    """
    check_writable_dir(key, path, fix, create=False)
    path = Path(path).expanduser()
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise UserError(f"{key}={path} already exists and is not {what} (no {marker}), so writing there would replace "
                        f"what it holds; {fix}")
