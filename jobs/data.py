"""Training text every machine has offline: the Python standard library's own .py sources.

Tokens are bytes (0-255) plus two special tokens. Files are split into training and held-out by a
hash of their path relative to the stdlib root, so the split is the same on every machine and every
run. The training files are joined into one token stream, cut into windows of `context_length + 1`
tokens, and visited in a seeded order that is reshuffled every epoch.

The data position is one global number, the samples the whole job has consumed. At each step every
rank takes its own `batch_size` consecutive samples from the next `world_size * batch_size`, so the
ranks never overlap, and a run resumed from a checkpoint, with the same or a different number of
workers, continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

END_OF_TEXT = 256  # between files, and a natural stop token for generation
PADDING = 257  # fills short prompts in a batch; never a training target
VOCAB_SIZE = 258

# Installed packages differ from machine to machine; bytecode caches are not source.
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Text of the byte tokens; special tokens are dropped and broken UTF-8 is replaced."""
    return bytes(token for token in tokens if token < 256).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str, heldout_fraction: float) -> bool:
    """Whether a file is held out: a stable hash of its path, not Python's salted hash()."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted; installed third-party packages excluded."""
    root = root or stdlib_root()
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in _NOT_STDLIB]
        relative = Path(directory).relative_to(root)
        paths.extend((relative / name).as_posix() for name in files if name.endswith(".py"))
    return sorted(paths)


@dataclass(frozen=True)
class Split:
    """The files of one side of the split and their tokens, each file followed by END_OF_TEXT."""

    files: tuple[str, ...]
    tokens: np.ndarray  # uint16

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@functools.cache
def load_split(heldout: bool, heldout_fraction: float, root: Path | None = None) -> Split:
    """Training (`heldout=False`) or held-out files as one token stream; cached per process."""
    root = root or stdlib_root()
    files = tuple(p for p in stdlib_files(root) if is_heldout(p, heldout_fraction) == heldout)
    if not files:
        side = "held-out" if heldout else "training"
        raise ValueError(f"data.heldout_fraction={heldout_fraction} leaves no {side} files under {root}")
    separator = np.array([END_OF_TEXT], dtype=np.uint16)
    pieces = []
    for relative in files:
        pieces.append(np.frombuffer((root / relative).read_bytes(), dtype=np.uint8).astype(np.uint16))
        pieces.append(separator)
    return Split(files, np.concatenate(pieces))


def split_tokens(heldout_fraction: float, root: Path | None = None) -> dict[bool, int]:
    """The length of `load_split`'s token stream, by held-out or not, from the files' sizes (a token a byte, an
    END_OF_TEXT a file) without reading them."""
    root = root or stdlib_root()
    tokens = {False: 0, True: 0}
    for path in stdlib_files(root):
        tokens[is_heldout(path, heldout_fraction)] += (root / path).stat().st_size + 1
    return tokens


def data_problems(heldout_fraction: float, context_length: int, root: Path | None = None) -> list[str]:
    """Why this machine's stdlib is too little text for these settings, one line a split naming the fields
    and the fix; empty when both splits hold enough. Training needs a window past the largest shuffle
    offset (`SampleOrder`), held-out text one window (`heldout_batches`)."""
    problems = []
    tokens = split_tokens(heldout_fraction, root)
    for heldout, needed, fix in (
        (False, 2 * context_length + 1, "lower data.heldout_fraction or model.context_length"),
        (True, context_length + 1, "raise data.heldout_fraction or lower model.context_length"),
    ):
        if tokens[heldout] < needed:
            side = "held-out" if heldout else "training"
            problems.append(
                f"data.heldout_fraction {heldout_fraction} leaves {tokens[heldout]:,} {side} tokens on this machine, "
                f"and model.context_length {context_length} needs at least {needed:,}; {fix}"
            )
    return problems


class SampleOrder:
    """Maps a global sample index to a window of `context_length + 1` tokens of one split.

    Epoch `e` visits every window once, in an order and at an offset drawn from (seed, e), so the
    same index gives the same window on every rank, every machine and every restart.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, seed: int):
        self.tokens = tokens
        self.context_length = context_length
        self.seed = seed
        # Windows start at offset + i * context_length with offset < context_length, so leave room
        # for the largest offset and the extra target token.
        self.windows_per_epoch = (len(tokens) - context_length - 1) // context_length
        if self.windows_per_epoch < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for context_length {context_length}")
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _shuffle_for(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.windows_per_epoch)
            self._offset = int(rng.integers(self.context_length))
            self._epoch = epoch

    def window(self, index: int) -> np.ndarray:
        epoch, within = divmod(index, self.windows_per_epoch)
        self._shuffle_for(epoch)
        start = self._offset + int(self._order[within]) * self.context_length
        return self.tokens[start : start + self.context_length + 1]


def to_inputs_and_targets(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(np.stack(windows).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class TrainingBatches:
    """The training stream for one rank, resumable from `position` (samples the job consumed)."""

    def __init__(
        self,
        context_length: int,
        batch_size: int,
        seed: int,
        heldout_fraction: float,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.order = SampleOrder(load_split(False, heldout_fraction).tokens, context_length, seed)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.position = position

    def sample_indices(self) -> range:
        """Global indices of the samples this rank takes next."""
        first = self.position + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each [batch_size, context_length]; advances the job-wide position."""
        windows = [self.order.window(index) for index in self.sample_indices()]
        self.position += self.world_size * self.batch_size
        return to_inputs_and_targets(windows)

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.order.seed,
            "context_length": self.order.context_length,
            "windows_per_epoch": self.order.windows_per_epoch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "context_length", "windows_per_epoch"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"checkpoint data {key} is {state[key]} but this run has {mine[key]}; resume with "
                    "the job (and the Python version, whose stdlib is the data) that wrote the checkpoint"
                )
        self.position = state["position"]


def heldout_batches(
    context_length: int,
    batch_size: int,
    num_batches: int,
    heldout_fraction: float,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: windows spread evenly over the held-out files, dealt out across ranks.

    Every measurement uses the same windows, so held-out loss is comparable across steps and runs.
    """
    tokens = load_split(True, heldout_fraction).tokens
    available = (len(tokens) - 1) // context_length
    wanted = num_batches * batch_size
    if available < 1:
        raise ValueError(f"held-out text ({len(tokens)} tokens) is shorter than context_length {context_length}")
    starts = np.linspace(0, (available - 1) * context_length, num=min(wanted, available)).astype(np.int64)
    mine = starts[rank::world_size]
    windows = [tokens[start : start + context_length + 1] for start in mine]
    return [to_inputs_and_targets(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
