"""ImageFolder (one sub-folder per class) -> WebDataset shards with a `.cls` label per image."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names, or `classes` when given, e.g. the training set's, of
    which the sub-folders must be a subset) and (image path, class index) pairs."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"'{root}' has no class sub-folders (expected <root>/<class>/<image>)")
    classes = names if classes is None else list(classes)
    if unknown := sorted(set(names) - set(classes)):
        raise ValueError(f"class folder(s) {unknown[:5]} of '{root}' are not among the {len(classes)} classes {classes[:5]}...")
    index = {name: i for i, name in enumerate(classes)}
    items = [(path, index[name]) for name in names
             for path in sorted((root / name).rglob("*")) if path.suffix.lower() in EXTENSIONS]
    if not items:
        raise ValueError(f"no .jpg/.jpeg/.png/.webp images under '{root}'")
    return classes, items


def make_shards(src: str | Path, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                max_shard_bytes: float = 1e9, seed: int = 0, progress: bool = True,
                classes: list[str] | None = None) -> str:
    """Write shards `<out_dir>/<prefix>-NNNNNN.tar` and `<out_dir>/classes.json`; return the brace
    pattern of the shards. Samples are shuffled first: ImageFolder order is sorted by class, and a
    stream's shuffle block could not undo that. `classes`: see scan_image_folder."""
    classes, items = scan_image_folder(src, classes)
    random.Random(seed).shuffle(items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                         maxsize=max_shard_bytes, verbose=0) as writer:
        for i, (path, label) in enumerate(tqdm(items, desc=f"{prefix} shards", unit="img", disable=not progress)):
            # Dots would split a webdataset key; the index keeps keys unique after cleaning.
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", f"{path.parent.name}_{path.stem}")
            writer.write({"__key__": f"{i:08d}_{stem}", EXTENSIONS[path.suffix.lower()]: path.read_bytes(),
                          "cls": label})
        num_shards = writer.shard
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1))
    return str(out_dir / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")
