"""The stdlib corpus: a deterministic, disjoint split by file; disjoint rank shards; exact resume."""

from __future__ import annotations

import numpy as np

from jobs.data import (
    END_OF_TEXT,
    SampleOrder,
    TrainingBatches,
    decode,
    encode,
    heldout_batches,
    is_heldout,
    load_split,
    stdlib_files,
)

FRACTION = 0.02


def test_split_is_deterministic_disjoint_and_covers_every_file():
    files = stdlib_files()
    assert len(files) > 500 and "os.py" in files
    assert not any("site-packages" in path for path in files)
    training, heldout = load_split(False, FRACTION), load_split(True, FRACTION)
    assert set(training.files).isdisjoint(heldout.files)
    assert set(training.files) | set(heldout.files) == set(files)
    assert 0.005 < len(heldout.files) / len(files) < 0.05
    # A stable hash of the path (not Python's salted hash()): the same answer in every process.
    assert [is_heldout(p, 0.5) for p in ("os.py", "json/decoder.py", "asyncio/tasks.py", "typing.py")] == [
        False,
        True,
        True,
        False,
    ]


def test_tokens_are_bytes_with_a_separator_after_each_file():
    split = load_split(True, FRACTION)
    assert split.tokens.max() == END_OF_TEXT
    assert int((split.tokens == END_OF_TEXT).sum()) == len(split.files)
    assert decode(encode("déjà vu ✓")) == "déjà vu ✓"


def test_an_epoch_visits_every_window_once_and_epochs_differ():
    order = SampleOrder(np.arange(1000, dtype=np.uint16), context_length=10, seed=3)
    per_epoch = order.windows_per_epoch
    first = [int(order.window(i)[0]) for i in range(per_epoch)]
    second = [int(order.window(per_epoch + i)[0]) for i in range(per_epoch)]
    offset = first[0] % 10
    assert sorted(first) == [offset + 10 * k for k in range(per_epoch)]
    assert first != second
    assert all(len(order.window(i)) == 11 for i in range(2 * per_epoch))


def test_rank_shards_are_disjoint_and_together_cover_the_stream():
    world = 3
    ranks = [TrainingBatches(32, 4, seed=0, heldout_fraction=FRACTION, rank=r, world_size=world) for r in range(world)]
    taken = []
    for _ in range(5):
        step = [list(batches.sample_indices()) for batches in ranks]
        for batches in ranks:
            batches.next_batch()
        flat = [index for indices in step for index in indices]
        assert len(set(flat)) == len(flat)
        taken.extend(flat)
    assert sorted(taken) == list(range(5 * world * 4))
    inputs, targets = ranks[0].next_batch()
    assert inputs.shape == targets.shape == (4, 32)
    assert (inputs[:, 1:] == targets[:, :-1]).all()


def test_position_resumes_exactly_even_with_another_world_size():
    running = TrainingBatches(32, 4, seed=1, heldout_fraction=FRACTION)
    for _ in range(7):
        running.next_batch()
    saved = running.state_dict()
    assert saved["position"] == 28

    resumed = TrainingBatches(32, 4, seed=1, heldout_fraction=FRACTION)
    resumed.load_state_dict(saved)
    for _ in range(3):
        expected, got = running.next_batch(), resumed.next_batch()
        assert all((a == b).all() for a, b in zip(expected, got, strict=True))

    # Two workers after a shrink-and-grow: together they take the samples one worker would have.
    pair = [TrainingBatches(32, 2, seed=1, heldout_fraction=FRACTION, rank=r, world_size=2) for r in range(2)]
    for batches in pair:
        batches.load_state_dict(saved)
    assert [list(b.sample_indices()) for b in pair] == [[28, 29], [30, 31]]


def test_heldout_batches_are_fixed_and_dealt_across_ranks():
    whole = heldout_batches(64, 4, 3, FRACTION)
    assert len(whole) == 3 and whole[0][0].shape == (4, 64)
    again = heldout_batches(64, 4, 3, FRACTION)
    assert all((a[0] == b[0]).all() for a, b in zip(whole, again, strict=True))
    halves = [heldout_batches(64, 4, 3, FRACTION, rank=r, world_size=2) for r in range(2)]
    assert sum(inputs.shape[0] for half in halves for inputs, _ in half) == 12
