"""Checkpoints that are whole or absent: never half written.

A checkpoint is a directory `step-000000200/` holding `state.pt` (everything needed to continue:
model, optimizer, loss scaler, LR schedule, step, data position, RNG state) and `meta.json` (a
few readable facts). It is written under a temporary name in the same parent directory, every
file and the directory are fsynced, and only then is it renamed into place; rename within one
file system is atomic, so a crash at any point leaves either the new checkpoint or none, and the
previous ones untouched. Ray Train can register the same directory as a `ray.train.Checkpoint`.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cluster.store import fsync_path
from jobs.data import VOCAB_SIZE
from jobs.model import TransformerLM
from jobs.spec import ModelSize

STATE_FILE = "state.pt"
META_FILE = "meta.json"
_COMPLETE = re.compile(r"step-([0-9]{9})")  # matched with fullmatch: `$` would let "step-000000010\n" in
_IN_PROGRESS_PREFIX = ".incomplete-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if _COMPLETE.fullmatch(path.name) and (path / STATE_FILE).is_file()]
    return sorted(found, key=lambda path: path.name)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or None; half-written ones never count."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def checkpoint_step(path: Path) -> int:
    match = _COMPLETE.fullmatch(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step-000000200)")
    return int(match.group(1))


class CheckpointError(OSError):
    """A checkpoint could not be written; the ones written before are untouched."""


def save_checkpoint(
    directory: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int | None = None
) -> Path:
    """Write a checkpoint for `step` atomically; then keep only the newest `keep_last` (all if None).

    Raises CheckpointError, naming the directory and the fix, when the disk is full or not writable.
    """
    try:
        return _save_checkpoint(directory, step, state, meta, keep_last)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as a RuntimeError from its zip writer, not as ENOSPC.
        if getattr(error, "errno", None) == errno.ENOSPC or _too_little_space(directory, state):
            code, problem = errno.ENOSPC, "no space left on the device"
            fix = "Free space there or set checkpoint.directory to a larger volume"
        elif getattr(error, "errno", None) in (errno.EACCES, errno.EROFS, errno.EPERM):
            code, problem = error.errno, "the directory is not writable"
            fix = "Let the job's user write there (mount it read-write), or set checkpoint.directory to a folder it can"
        else:
            raise
        raise CheckpointError(
            code,
            f"checkpoint of step {step} not written: {problem} under {directory}; the previous checkpoints are "
            f"intact. {fix}",
        ) from error


def _too_little_space(directory: Path, state: Any) -> bool:
    try:
        return shutil.disk_usage(directory).free < _tensor_bytes(state)
    except OSError:
        return False


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _save_checkpoint(
    directory: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int | None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f"{_IN_PROGRESS_PREFIX}{final.name}-", dir=directory))
    try:
        torch.save(state, staging / STATE_FILE)
        (staging / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2, default=str))
        for file in (STATE_FILE, META_FILE):
            fsync_path(staging / file)
        fsync_path(staging)
        if final.exists():
            # Re-saving a step (a run resumed from an older checkpoint) replaces it whole.
            replaced = Path(tempfile.mkdtemp(prefix=f"{_IN_PROGRESS_PREFIX}replaced-", dir=directory))
            final.rename(replaced / final.name)
            staging.rename(final)
            shutil.rmtree(replaced)
        else:
            staging.rename(final)
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last is not None:
        remove_old_checkpoints(directory, keep_last)
    return final


def remove_old_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of crashed writes."""
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(f"{_IN_PROGRESS_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict saved by `save_checkpoint`; tensors land on `map_location`."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} holds no {STATE_FILE}; it is not a complete checkpoint")
    return torch.load(state_file, map_location=map_location, weights_only=True)


def load_meta(path: Path) -> dict[str, Any]:
    """The small facts `save_checkpoint` wrote beside the state (step, world size, data position, ...)."""
    return json.loads((path / META_FILE).read_text())


def load_model(path: Path, device: str | torch.device = "cpu") -> TransformerLM:
    """The trained model of a checkpoint, in eval mode, e.g. for serving or sampling."""
    state = load_checkpoint(path, map_location=device)
    model = TransformerLM(ModelSize.model_validate(state["job"]["model"]), VOCAB_SIZE)
    model.load_state_dict(state["model"])
    return model.to(device).eval()
