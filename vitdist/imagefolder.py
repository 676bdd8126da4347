"""ImageFolder directories (`root/<class>/<image>`, classes in sorted name order) given directly as
`data.train_shards` / `data.val_shards`: small datasets need no shards of their own.

A run converts each such directory once into WebDataset shards under `<run.dir>/shards/<split>/`
(with `vitdist make-shards`' writer), and from there on it is an ordinary run over shards: the
same data order contract, the same exact resume. A conversion is complete once its directory has
its final name (it is written as `<split>.tmp` and renamed), and is reused only if its manifest
says it came from the same images (names, sizes, classes), seed and streams. The run's
checkpoints record which images their stream positions refer to (the recipe), so that a resume
onto a conversion of other images, made after the old one was deleted, is refused
(resume.check). There is one shard per stream, of sizes that differ by at most one sample, so
each sample is seen once per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError, DataConfig
from .shard_list import expand_urls, is_remote
from .make_shards import literal, make_shards, read_classes, scan_image_folder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# What of a recipe names the images; data.seed and data.streams are compared as config keys.
_IMAGES = ("classes", "images", "listing_sha256")


@dataclass(frozen=True)
class ImageFolder:
    key: str  # the config key that named it
    root: Path
    classes: list[str]
    items: list[tuple[Path, int]]


def is_image_folder(spec) -> bool:
    """A shard spec names files; a directory can only be an ImageFolder."""
    return isinstance(spec, str) and not spec.startswith("pipe:") and Path(spec).is_dir()


def scan(key: str, root: str, num_classes: int, classes: list[str] | None = None) -> ImageFolder:
    """The folder's classes and images, or ConfigError naming the key and the path."""
    try:
        classes, items = scan_image_folder(root, classes)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if len(classes) > num_classes:
        raise ConfigError(f"{key}: '{root}' has {len(classes)} class folders, more than model.num_classes={num_classes}")
    return ImageFolder(key, Path(root), classes, items)


def image_folders(data: DataConfig, num_classes: int) -> dict[str, ImageFolder]:
    """The data.*_shards values that are ImageFolder directories, by split ('train', 'val'),
    checked: class folders with images, no more classes than the model has (nor in the
    classes.json beside training shards), at least one training image per data stream.
    Validation class folders take the training set's class indices."""
    folders = {}
    if is_image_folder(data.train_shards):
        folders["train"] = scan("data.train_shards", data.train_shards, num_classes)
        if len(folders["train"].items) < data.streams:
            raise ConfigError(f"data.train_shards: '{data.train_shards}' has {len(folders['train'].items)} images, "
                              f"fewer than data.streams={data.streams}: every stream needs a shard")
        classes = folders["train"].classes
    else:
        classes = shard_classes(expand_urls(data.train_shards, "data.train_shards"), num_classes)
    if data.val_shards and not is_image_folder(data.val_shards):
        same_classes("data.val_shards", expand_urls(data.val_shards, "data.val_shards"), classes, "the training shards'")
    if is_image_folder(data.val_shards):
        folders["val"] = scan("data.val_shards", data.val_shards, num_classes, classes)
        if classes is None and len(folders["val"].classes) != num_classes:
            raise ConfigError(
                f"data.val_shards: '{data.val_shards}' has {len(folders['val'].classes)} class folders for "
                f"model.num_classes={num_classes}, and no classes.json beside the training shards says which class "
                "index each folder stands for: the sorted folders would take the wrong labels")
    return folders


def classes_beside(urls: list[str], key: str) -> list[str] | None:
    """The class names `vitdist make-shards` wrote beside local shards (given expanded: the first
    URL tells where), if it did; `key` names the shards in the error for a malformed file."""
    path = Path(urls[0]).parent / "classes.json"
    if is_remote(urls[0]) or not path.is_file():
        return None
    try:
        return read_classes(path)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}: fix it, or move it away") from None


def shard_classes(train_urls: list[str], num_classes: int) -> list[str] | None:
    """The training shards' class names (classes_beside): the labels a validation split must
    share. More of them than the model has are refused: labels from num_classes on would be
    skipped as bad_label, a stop after 10 steps or, under data.max_skip_frac, a run that trains on
    without those classes."""
    names = classes_beside(train_urls, "data.train_shards")
    if names is not None and len(names) > num_classes:
        raise ConfigError(f"data.train_shards: '{Path(train_urls[0]).parent / 'classes.json'}' lists {len(names)} "
                          f"classes, more than model.num_classes={num_classes}")
    return names


def same_classes(key: str, urls: list[str], classes: list[str] | None, whose: str) -> None:
    """ConfigError when the classes.json beside shards `urls` names other classes than `classes`
    (`whose`: the training shards', a checkpoint's): their labels would stand for other classes."""
    theirs = None if classes is None else classes_beside(urls, key)
    if theirs is not None and theirs != classes:
        index, (their, our) = next((i, pair) for i, pair in enumerate(itertools.zip_longest(theirs, classes))
                                   if pair[0] != pair[1])
        raise ConfigError(
            f"{key}: '{Path(urls[0]).parent / 'classes.json'}' labels its shards by other classes than {whose} "
            f"({len(theirs)} and {len(classes)} classes; class {index} is {their!r} against {our!r}): label 0 of one "
            "is not label 0 of the other. Write both splits into one folder, the one with every class first, or give "
            "make-shards --classes")


def conversion_dir(run_dir: str | Path) -> Path:
    """Where a run converts its ImageFolders, one sub-directory per split."""
    return Path(run_dir) / "shards"


def recipe(folder: ImageFolder, streams: int, seed: int) -> dict:
    """What the shards are a function of; a conversion is reused only if this matches."""
    listing = "\n".join(f"{path.relative_to(folder.root)}\t{path.stat().st_size}\t{label}" for path, label in folder.items)
    return {"classes": folder.classes, "images": len(folder.items), "streams": streams, "seed": seed,
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def converted_recipe(out: Path) -> dict | None:
    """The recipe of the conversion in `out` (a split's directory under conversion_dir), if any."""
    manifest = out / MANIFEST
    return json.loads(manifest.read_text())["recipe"] if manifest.is_file() else None


def other_images(recorded: dict, now: dict) -> str | None:
    """How the images of recipe `now` differ from those of `recorded`, in words; None if they do not."""
    if all(recorded[key] == now[key] for key in _IMAGES):
        return None
    added = [name for name in now["classes"] if name not in recorded["classes"]]
    removed = [name for name in recorded["classes"] if name not in now["classes"]]
    what = [f"class folders {names[:5]} {verb}" for names, verb in ((added, "added"), (removed, "removed")) if names]
    if now["images"] != recorded["images"]:
        what.append(f"{now['images']} images where there were {recorded['images']}")
    return "; ".join(what) or f"the same {now['images']} images by count, but other files (renamed, replaced or of " \
                              "another size)"


def conversion_in(folder: ImageFolder, out: Path, streams: int, seed: int) -> dict | None:
    """The manifest of the conversion of `folder` in `out`, None if there is none; ConfigError
    where the conversion there is of other images, or by another data.streams or data.seed. Also
    before any process group starts (preflight): found at the conversion, it failed every rank."""
    if not out.is_dir():
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except ValueError as e:  # not an OSError, which may pass (a retry)
        raise ConfigError(f"{folder.key}: the conversion in '{out}' cannot be read ({e}): delete '{out}' to convert "
                          "again") from None
    recorded, now = manifest["recipe"], recipe(folder, streams, seed)
    if recorded == now:
        return manifest
    if recorded.keys() != now.keys():
        what = "converted by an earlier vitdist"
    else:
        what = other_images(recorded, now) or "; ".join(
            f"data.{key}={now[key]} where it was {recorded[key]}" for key in ("streams", "seed") if recorded[key] != now[key])
    again = ("a resume from a checkpoint trained on other images is then refused" if folder.key == "data.train_shards"
             else "validation images are no part of what a resume continues")
    raise ConfigError(f"{folder.key}: '{folder.root}' is not what this run converted into '{out}' ({what}): use another "
                      f"run.dir, or delete '{out}' to convert again ({again})")


def convert(folder: ImageFolder, out: Path, streams: int, seed: int) -> list[str]:
    """The shards of `folder` converted into `out` (with classes.json and the manifest), one per
    stream (one per image if there are fewer), as specs (make_shards.literal): written now, or reused
    from an earlier run when the manifest matches."""
    if manifest := conversion_in(folder, out, streams, seed):
        return [literal(out / name) for name in manifest["shards"]]
    tmp = out.with_name(out.name + ".tmp")  # a conversion killed half-way is left here, never used
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting ImageFolder %s (%d images, %d classes) into shards in %s",
             folder.root, len(folder.items), len(folder.classes), out)
    make_shards(folder.root, tmp, prefix=out.name, samples_per_shard=math.ceil(len(folder.items) / streams),
                max_shard_bytes=math.inf, seed=seed, progress=False, classes=folder.classes, streams=streams)
    shards = sorted(p.name for p in tmp.glob(f"{out.name}-*.tar"))
    made_of = recipe(folder, streams, seed)
    (tmp / MANIFEST).write_text(json.dumps({"source": str(folder.root.resolve()), "recipe": made_of, "shards": shards},
                                           indent=1))
    tmp.rename(out)
    return [literal(out / name) for name in shards]


def to_shards(data: DataConfig, num_classes: int, out_dir: Path, is_main: bool, group=None) -> DataConfig:
    """`data` with each ImageFolder directory replaced by the list of its shards under `out_dir`.

    Rank 0 converts while the others wait for its answer (the shard lists, or its error, which
    every rank then raises). Not every rank converting into a temporary directory of its own with
    an atomic rename: that reads and writes the dataset once per rank, on the shared file system
    that the checkpoints need anyway. The wait is a collective on the gloo `group`, so a conversion
    must fit in dist.timeout_s: larger datasets are for `vitdist make-shards`.
    """
    if not (is_image_folder(data.train_shards) or is_image_folder(data.val_shards)):
        return data
    answer = [None]
    if is_main:
        try:
            # Validation shards too by data.streams: whole shards per rank.
            answer = [{split: convert(folder, out_dir / split, data.streams, data.seed)
                       for split, folder in image_folders(data, num_classes).items()}]
        except ValueError as e:  # ConfigError included; e.g. also an unreadable manifest
            answer = [ConfigError(f"{e}")]
        except OSError as e:  # a full disk or a file system's hiccup: a retry may succeed
            answer = [OSError(f"converting the ImageFolder(s) into '{out_dir}' failed: {e}")]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0, group=group)
    if isinstance(answer[0], Exception):
        raise answer[0]
    converted = {f"{split}_shards": urls for split, urls in answer[0].items()}
    return dataclasses.replace(data, **converted)
