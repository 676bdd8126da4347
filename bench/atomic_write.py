"""Files the benchmarks write whole or not at all: written beside their name, then renamed to it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A path beside `path` to write to, renamed to `path` once the block ends without an error: a
    run stopped at its time limit (bench/device_check.sh) or interrupted leaves the file before it,
    or none, never half of one that looks complete."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    yield partial
    os.replace(partial, path)


def write_json(path: str | Path, value) -> None:
    with written_whole(path) as partial:
        partial.write_text(json.dumps(value, indent=1))
