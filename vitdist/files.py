"""Files written whole or not at all: written beside their name, then renamed to it, so that a
reader (a resume, a run on new shards, timm) never finds half of one that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A path beside `path` to write to, renamed to `path` once the block ends; deleted if it raises
    (an error, Ctrl-C, a time limit's signal)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_json(path: str | Path, value) -> None:
    with written_whole(path) as partial:
        partial.write_text(json.dumps(value, indent=1))
