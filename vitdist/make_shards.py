"""ImageFolder (one sub-folder per class) -> WebDataset shards with a `.cls` label per image."""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .files import write_json, written_whole

log = logging.getLogger(__name__)

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names, or `classes` when given, e.g. the training set's, of
    which the sub-folders must be a subset) and (image path, class index) pairs. Hidden files and
    folders (.ipynb_checkpoints, macOS's ._<name>.jpg metadata) are neither classes nor images,
    nor is a folder named like an image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        # A folder of shards, given where shards are (data.train_shards=/data/in21k): say how to name them
        shards = sorted(p.name for p in root.iterdir() if ".tar" in p.suffixes)
        held = (f": a directory is read as an ImageFolder, and this one holds {len(shards)} shard(s) ('{shards[0]}', "
                f"...): name them with a brace pattern, '{root}/train-{{000000..000099}}.tar', or a .txt file of one "
                "path per line" if shards else "")
        raise ValueError(f"'{root}' has no class sub-folders (expected <root>/<class>/<image>){held}")
    given, classes = classes, names if classes is None else list(classes)
    if unknown := sorted(set(names) - set(classes)):
        raise ValueError(f"class folder(s) {unknown[:5]} of '{root}' are not among the {len(classes)} classes {classes[:5]}...")
    index = {name: i for i, name in enumerate(classes)}
    others = Counter()
    items = [(path, index[name]) for name in names for path in _images_under(root / name, others)]
    if others:
        log.warning("left out %d file(s) under '%s' that are not .jpg/.jpeg/.png/.webp images: %s", others.total(),
                    root, ", ".join(f"{suffix or '(no suffix)'} {n}" for suffix, n in others.most_common(8)))
    if not items:
        raise ValueError(f"no .jpg/.jpeg/.png/.webp images under '{root}'")
    # A training split's folders are its classes: an empty one (torchvision's ImageFolder refuses it)
    # takes an index, which shifts the labels after it and adds an output the model never learns.
    # A split labelled by given classes (validation's) may well lack some.
    if given is None and (empty := sorted(set(names) - {classes[i] for _, i in items})):
        log.warning("class folder(s) %s of '%s' hold no image: each is a class all the same (index %s), with no "
                    "sample to learn it from; remove them unless the classes must match another split's",
                    empty, root, ", ".join(str(index[name]) for name in empty))
    return classes, items


def _images_under(folder: Path, others: Counter) -> list[Path]:
    """The images in `folder` and its sub-folders, sorted, hidden ones left out. Symlinked
    sub-folders are followed, as torchvision's ImageFolder follows them (pathlib's rglob does not:
    a class assembled from links to other folders would lose their images), but not into a folder
    of their own chain of parents, where a link to a parent would loop for ever. Files of other
    types are counted in `others` by suffix (lowercased): .bmp, .tif, .gif are not read; so are
    links to nothing."""
    found, parents = [], {str(folder): {os.path.realpath(folder)}}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        chain = parents.pop(dirpath)
        kept = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in chain:
                kept.append(name)
                parents[os.path.join(dirpath, name)] = chain | {real}
        dirnames[:] = kept
        for name in sorted(filenames):  # the warning counts ties in a fixed order
            path = Path(dirpath, name)
            if name.startswith(".") or not path.is_file():
                if not name.startswith(".") and path.is_symlink():  # a link whose image was moved or deleted
                    others["(broken link)"] += 1
                continue
            if path.suffix.lower() in EXTENSIONS:
                found.append(path)
            else:
                others[path.suffix.lower()] += 1
    return sorted(found)


def read_classes(path: str | Path) -> list[str]:
    """The class names of a classes.json (as make_shards writes it), or ValueError naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read '{path}': {e}") from None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"'{path}' is not a JSON list of class names, as vitdist make-shards writes beside its shards")
    return names


def shard_bounds(image_bytes: list[int], samples_per_shard: int, max_shard_bytes: float, streams: int = 1) -> list[int]:
    """Where the samples (of these sizes, in writing order) split into shards: the fewest shards, a
    multiple of `streams`, of sizes that differ by at most one sample, none over `samples_per_shard`
    samples or `max_shard_bytes` bytes of images (an image over that counts as nothing: its shard is
    larger by its size); but no shard empty: at most the largest multiple of `streams` within the
    samples, or one per sample where they are fewer than the streams (a validation split's may be).
    A run with data.streams=`streams` then deals every stream as many shards, and so as many
    samples up to one per shard: the streams turn to their next epoch together, give or take that
    many samples."""
    count = len(image_bytes)
    most = count - count % streams or count
    # One image over the limit would otherwise split every shard down to one image.
    ends = list(itertools.accumulate((size if size <= max_shard_bytes else 0 for size in image_bytes), initial=0))
    num_shards = streams * math.ceil(max(count / samples_per_shard, ends[-1] / max_shard_bytes) / streams)
    while True:
        num_shards = min(num_shards, most)
        bounds = [i * (count // num_shards) + min(i, count % num_shards) for i in range(num_shards + 1)]
        if num_shards == most or max(ends[b] - ends[a] for a, b in itertools.pairwise(bounds)) <= max_shard_bytes:
            return bounds
        num_shards += streams


def literal(path: str | Path) -> str:
    """`path` as a shard spec that names it alone: its braces and backslashes escaped, which
    braceexpand would expand (a run.dir runs/{a,b}) or drop."""
    return re.sub(r"[\\{}]", r"\\\g<0>", str(path))


def make_shards(src: str | Path, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                max_shard_bytes: float = 1e9, seed: int = 0, progress: bool = True,
                classes: list[str] | None = None, streams: int = 1) -> str:
    """Write shards `<out_dir>/<prefix>-NNNNNN.tar` (laid out by shard_bounds) and
    `<out_dir>/classes.json`; return the brace pattern of the shards. Samples are shuffled first:
    ImageFolder order is sorted by class, and a stream's shuffle block could not undo that.
    `classes`: see scan_image_folder. A folder that holds `<prefix>-*.tar` shards already is refused
    (FileExistsError): a run may be training on them, and a resume finds shards by name.
    Interrupted, it deletes the shards it wrote.

    A `classes.json` already in `out_dir` (another split's, written there first) labels these
    shards too, and is never replaced: numbered by their own sorted folders, a validation split
    that lacks some of the training classes would take other classes' indices."""
    out_dir = Path(out_dir)
    if Path(src).resolve() in out_dir.resolve().parents:
        raise ValueError(f"'{out_dir}' is inside the image folder '{src}', whose scans would take it for a class "
                         "folder, or its shards for files of a class, from then on: write the shards to another folder")
    if held := sorted(out_dir.glob(f"{glob.escape(prefix)}-*.tar")):
        raise FileExistsError(f"'{out_dir}' holds {len(held)} shard(s) {prefix}-*.tar already: written again, they "
                              "would be replaced under the same names (a run trained on them would resume onto other "
                              "samples) or, fewer, leave old ones beside them; write to another folder or --prefix, or "
                              "delete them first")
    beside = out_dir / "classes.json"
    written = read_classes(beside) if beside.is_file() else None
    if classes is not None and written is not None and list(classes) != written:
        raise ValueError(f"'{beside}' lists other classes than those given ({len(written)}: {written[:5]}...; given "
                         f"{len(classes)}: {list(classes)[:5]}...), and labels the shards beside it: write to another folder")
    try:
        classes, items = scan_image_folder(src, written if classes is None else classes)
    except ValueError as e:
        if written is None:
            raise
        raise ValueError(f"{e} (those of '{beside}', which labels the shards beside it: write the split with every "
                         "class first, or to another folder)") from None
    random.Random(seed).shuffle(items)
    bounds = shard_bounds([path.stat().st_size for path, _ in items], samples_per_shard, max_shard_bytes, streams)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each shard is written whole or not at all, and an interrupted call (Ctrl-C, a read error)
    # deletes those it wrote: its last shard, closed on the way out with an end-of-archive block,
    # would read as a complete one of fewer samples, under the name of one.
    written_shards = []
    try:
        with tqdm(total=len(items), desc=f"{prefix} shards", unit="img", disable=not progress) as bar:
            for shard, (start, end) in enumerate(itertools.pairwise(bounds)):
                name = out_dir / f"{prefix}-{shard:06d}.tar"
                with written_whole(name) as partial, wds.TarWriter(str(partial)) as sink:
                    for i, (path, label) in enumerate(items[start:end], start=start):
                        # Dots would split a webdataset key; the index keeps keys unique after cleaning.
                        stem = re.sub(r"[^A-Za-z0-9_-]", "_", f"{path.parent.name}_{path.stem}")
                        sink.write({"__key__": f"{i:08d}_{stem}", EXTENSIONS[path.suffix.lower()]: path.read_bytes(),
                                    "cls": label})
                        bar.update()
                written_shards.append(name)
    except BaseException:
        for path in written_shards:
            path.unlink()
        raise
    if written is None:
        write_json(beside, classes)
    return literal(out_dir / prefix) + f"-{{000000..{len(bounds) - 2:06d}}}.tar"
