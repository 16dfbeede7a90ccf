"""Checkpoints that survive crashes: written atomically, read with `weights_only=True`."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a ponglab checkpoint."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous checkpoint intact.

    We write to a temporary file in the same directory, fsync it, then `os.replace` it over the old file,
    which is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with a clear error when it can't be used."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint at {path}. Give a run folder written by `ponglab train` (it holds checkpoints/latest.pt) "
            "or the path of a .pt file."
        )
    try:
        # weights_only=True: a checkpoint is data, never code. Loading an untrusted pickle could run anything.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / corrupt / foreign files
        raise CheckpointError(
            f"Could not read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "The file is corrupt or truncated (was the run killed while writing with an old version?) or is not a "
            "ponglab checkpoint. Use another checkpoint or start a new run."
        ) from e
    if not isinstance(state, dict) or "agent" not in state or "trainer" not in state:
        raise CheckpointError(f"{path} is not a ponglab checkpoint (expected keys 'agent' and 'trainer').")
    return state


def rng_state(np_rng: np.random.Generator) -> dict[str, Any]:
    """Every random-number state a run uses, in a form `weights_only` loading accepts (tensors, ints, dicts)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np_rng.bit_generator.state,
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
