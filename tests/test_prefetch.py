"""DeviceBatches ends where its source ends, and keeps raising the error the source raised."""

import threading
from collections import Counter

import torch

from vitdist.prefetch import DeviceBatches

CPU = torch.device("cpu")


def batch(label: int) -> dict:
    return {"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "label": torch.tensor([label]), "skipped": Counter()}


def outcomes(batches: DeviceBatches, calls: int) -> list:
    """What `calls` calls of next() give (a label, or the exception raised), from a thread that
    is given up on after 10 s: a next() that waits forever then fails the test, not the suite."""
    got = []

    def call():
        for _ in range(calls):
            try:
                got.append(next(batches)["label"].item())
            except Exception as error:
                got.append(error)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"next() still waiting after {got}"
    return got


def test_a_finite_source_ends_the_batches():
    with DeviceBatches((b for b in [batch(0), batch(1)]), CPU) as batches:
        got = outcomes(batches, 4)
    assert got[:2] == [0, 1] and all(isinstance(end, StopIteration) for end in got[2:])


def test_an_error_of_the_source_is_raised_at_every_later_call():
    def failing():
        yield batch(0)
        raise OSError("shard gone")

    with DeviceBatches(failing(), CPU) as batches:
        first, *errors = outcomes(batches, 3)
    assert first == 0 and [str(e) for e in errors] == ["shard gone"] * 2
    assert all(type(e) is OSError for e in errors)
