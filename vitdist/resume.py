"""What a resumed run may change from the run that wrote its checkpoint.

A checkpoint's stream positions index the shard list as `data.seed` and `data.shuffle_block` deal
and shuffle it, its tensors fit one architecture, and its step lies within `train.steps`: a resume
that changes these is refused (ConfigError, before any process group starts), as it would read
other samples than the uninterrupted run, or load the weights into another model. World size,
strategy, loader workers and micro-batch size resume the data order exactly, and are not reported
(the random draws on the device, seeded by rank and step, are drawn anew on another world size or
micro-batch size: vitdist.train.seed_step). Any other
change (the learning rate, `train.steps`, the global batch) is the user's to make: it is logged as
a warning, key by key, since the run then differs from the one it resumes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from . import imagefolder
from .checkpoint import MODEL_META, TRAIN_STATE, read_json
from .checkpoint_read import UnsafeCheckpoint, check_files
from .config import Config, ConfigError, to_dict
from .data import decodes_on_device
from .imagefolder import ImageFolder
from .model import architecture, recorded_architecture, timm_kwargs
from .schedule import lr_at

# How the run is carried out, not what it computes (beyond the order of float sums, as with
# another world size); data.train_shards and the architecture are compared as what they resolve
# to (check), data.decode too (changes). model.drop_path_rate is reported: it changes what the
# run learns.
_UNREPORTED_SECTIONS = {"dist", "ckpt", "log", "run"}
_UNREPORTED = {"model.grad_checkpointing", "data.train_shards", "data.micro_batch_size", "data.num_workers",
               "data.prefetch_steps", "data.decode", "data.max_skip_frac", "train.resume", "train.compile",
               "train.activation_memory_budget", "train.eval_every_steps", "train.max_bad_steps", "finetune.init",
               "finetune.init_ema"}


def data_order(cfg: Config, urls: list[str], converted: dict | None = None) -> dict:
    """What the meaning of the stream positions depends on, for train_state.json: the shards by
    shard_ids, in order, and as a set (which tells a reordered list from another one); for shards
    converted from an ImageFolder, the recipe of their conversion too (`converted`): converted
    again from other images, they keep their names."""
    ids = shard_ids(urls)
    order = {"seed": cfg.data.seed, "shuffle_block": cfg.data.shuffle_block, "shards": len(urls),
             "shard_ids_sha256": _sha256(ids), "shard_set_sha256": _sha256(sorted(ids))}
    return {**order, "image_folder": converted} if converted else order


def decoded_on(cfg: Config) -> str:
    """data.decode resolved, for train_state.json: 'auto' is 'gpu' on a machine with CUDA, else 'cpu'."""
    return "gpu" if decodes_on_device(cfg.data) else "cpu"


def shard_ids(urls: list[str]) -> list[str]:
    """What sets each shard's URL apart from the others': the URL less what all of them begin
    with up to its last '/' (the directory, bucket or pipe: command), and, between shards that
    differ, less the words all of them end with (from a space on: the ' -' of `aws s3 cp ... -`).
    The same shards moved to another directory or bucket, or copied from S3 to a local disk, keep
    their ids; a file name inside a pipe: command, a query string or a sub-directory that differs
    between shards stays in them (by its file name alone, every `aws s3 cp` shard was '-')."""
    start = os.path.commonprefix(urls).rfind("/") + 1
    rests = [url[start:] for url in urls]
    if len(set(rests)) == 1:  # nothing sets them apart: no common ending to drop
        return rests
    ending = os.path.commonprefix([rest[::-1] for rest in rests])[::-1]
    words = len(m.group()) if (m := re.search(r"\s.*", ending, re.S)) else 0
    return [rest[: len(rest) - words] for rest in rests]


def _sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# Why a resume onto other samples is refused, in every such refusal.
_CHANGED = "its data stream positions would index another sample order: samples repeated or never seen"


def _where(path: Path) -> str:
    return f"checkpoint '{path}'"


def _start_new(path: Path) -> str:
    return f"start a new run.dir with finetune.init={path}"


def check(cfg: Config, path: Path, train: list[str] | ImageFolder, model: VisionTransformer) -> list[str]:
    """Refuse (ConfigError) a resume from `path` that cannot continue the run it comes from.
    `train`: the training shards' URLs, or the ImageFolder that the run converts into shards.
    `model`: the config's, as check_model built it. Returns what it could not check."""
    try:
        check_files(path)
    except (FileNotFoundError, UnsafeCheckpoint) as e:
        raise ConfigError(str(e)) from None
    state, meta = read_json(path, TRAIN_STATE), read_json(path, MODEL_META)
    where, start_new = _where(path), f"resume with the value it was trained with, or {_start_new(path)}"

    if cfg.model.arch != meta["arch"]:
        raise ConfigError(f"model.arch={cfg.model.arch}, but {where} holds a model with model.arch={meta['arch']}: its "
                          f"weights do not fit this one; {start_new}")
    # Compared as built, not as written: a key given its arch's own value is the same model as null.
    # Where the blocks do not say (None: parallel blocks), as written.
    written = {"ours": timm_kwargs(cfg.model), "its": meta["timm_kwargs"]}
    built = {"ours": architecture(model), "its": recorded_architecture(meta["arch"], meta["timm_kwargs"])}
    compared = {whose: {key: written[whose].get(key) if value is None else value for key, value in values.items()}
                for whose, values in built.items()}

    def shown(whose: str, key: str) -> str:
        if key in written[whose]:
            return str(written[whose][key])
        return "null" if compared[whose][key] is None else f"null ({compared[whose][key]}, the arch's own)"

    for key in compared["ours"]:
        if compared["ours"][key] != compared["its"][key]:
            raise ConfigError(f"model.{key}={shown('ours', key)}, but {where} holds a model with model.{key}="
                              f"{shown('its', key)}: its weights do not fit this one; {start_new}")
    if cfg.finetune.freeze == "none" and state.get("config", {}).get("finetune", {}).get("freeze") == "backbone":
        raise ConfigError(f"finetune.freeze=none, but {where} trained the head alone (finetune.freeze=backbone): its "
                          f"optimizer holds no state for the backbone; to fine-tune all of a linear probe, "
                          f"{_start_new(path)}")
    if state["step"] > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps}, but {where} is at step {state['step']} already: give "
                          f"train.steps >= {state['step']}")
    if len(state["data_positions"]) != cfg.data.streams:
        raise ConfigError(f"data.streams={cfg.data.streams}, but {where} holds the positions of "
                          f"{len(state['data_positions'])} data streams; {start_new}")
    order = state.get("data_order")
    if order is None:  # written before it was recorded (2026-11-23)
        if isinstance(train, ImageFolder):
            _check_images({}, train, cfg, path)  # through the run's conversion, which its seed made
            unchecked = "data.shuffle_block cannot be checked against it; if it is"
        else:
            unchecked = "data.train_shards, data.seed and data.shuffle_block cannot be checked against it; if any is"
        return [f"{where} does not record the data order it was trained in (written by an earlier vitdist): "
                f"{unchecked} not what it was trained with, {_CHANGED}"]
    for key in ("seed", "shuffle_block"):
        if order[key] != getattr(cfg.data, key):
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)}, but {where} was trained with data.{key}="
                              f"{order[key]}: {_CHANGED}; {start_new}")
    if isinstance(train, ImageFolder):
        _check_images(order, train, cfg, path)
    else:
        _check_shards(order, train, cfg.data.train_shards, state["config"]["data"]["train_shards"], path)
    return []


def _check_images(order: dict, folder: ImageFolder, cfg: Config, path: Path) -> None:
    """Refuse (ConfigError) an ImageFolder that is not made of the images checkpoint `path` was
    trained on: its conversion, made again after the old one was deleted, would put other samples
    under the same shard names. A checkpoint that does not record them (written before vitdist
    did, or trained on shards) is compared through the run's conversion, if there is one."""
    where, start_new, changed = _where(path), _start_new(path), _CHANGED
    converted = imagefolder.conversion_dir(cfg.run.dir) / "train"
    recorded = order.get("image_folder") or imagefolder.converted_recipe(converted)
    if recorded is None:
        raise ConfigError(f"data.train_shards is the ImageFolder '{folder.root}', but {where} does not record the "
                          f"images it was trained on (trained on shards, or by an earlier vitdist), and '{converted}' "
                          f"holds no conversion of them: converted now, they may be other images, and {changed}; "
                          f"resume with the shards it was trained on, or {start_new}")
    if what := imagefolder.other_images(recorded, imagefolder.recipe(folder, cfg.data.streams, cfg.data.seed)):
        raise ConfigError(f"data.train_shards: '{folder.root}' is not the ImageFolder {where} was trained on ({what}): "
                          f"converted again, {changed}; restore the images it was trained on, or {start_new}")


def _check_shards(order: dict, urls: list[str], given, trained_with, path: Path) -> None:
    """Refuse (ConfigError) a shard list that is not the one the data_order of checkpoint `path`
    records. `given`, `trained_with`: data.train_shards now and in the checkpoint's config."""
    where, start_new, changed = _where(path), _start_new(path), _CHANGED
    ids = shard_ids(urls)
    if len(urls) != order["shards"]:
        what = f"names {len(urls)} shards, {where} was trained on {order['shards']}"
    elif "shard_ids_sha256" in order:
        if _sha256(ids) == order["shard_ids_sha256"]:
            return
        what = (f"names the {len(urls)} shards {where} was trained on, in another order"
                if _sha256(sorted(ids)) == order["shard_set_sha256"] else
                f"names other shards than the {len(urls)} {where} was trained on")
    else:  # recorded by file name, before shard_ids: that tells apart only shards of distinct file names
        names = [url.rstrip("/").rsplit("/", 1)[-1] for url in urls]
        if _sha256(names) != order["shard_names_sha256"]:
            what = f"names other shards, or the same in another order, than the {len(urls)} {where} was trained on"
        elif len(set(names)) == len(names) or given == trained_with:
            return
        else:
            alike = next(name for name in names if names.count(name) > 1)
            raise ConfigError(
                f"data.train_shards={given!r}, but {where} was trained with data.train_shards={trained_with!r}; it "
                f"records its shards by file name only, '{alike}' for more than one of them, so whether these are "
                f"its shards in its order cannot be told, and if not, {changed}: resume with the value it was trained "
                f"with, or {start_new}")
    raise ConfigError(f"data.train_shards {what}: {changed}; resume with the list it was trained on (moved to "
                      f"another directory or bucket is fine: each shard is compared by what sets its URL apart from "
                      f"the others', here '{ids[0]}' for '{urls[0]}'), or {start_new}")


def added_keys(cfg: Config, state: dict) -> list[str]:
    """The keys the checkpoint's vitdist did not have, 'key=value' as now: no change the user made,
    but where the value is not what that vitdist did (data.jpeg_reduce), the run trains otherwise."""
    old = _flat(state.get("config", {}))
    return [f"{key}={value!r}" for key, value in _flat(to_dict(cfg)).items() if old and key not in old and _reported(key)]


def changes(cfg: Config, state: dict) -> list[str]:
    """The keys changed since the checkpoint's run, 'key: old -> new' (data.decode as resolved on
    each machine), and what the learning rate at the resumed step became if the schedule changed
    (as `train.steps` does to extend a run)."""
    if "config" not in state:  # a checkpoint written before the config was recorded
        return []
    old, new = _flat(state["config"]), _flat(to_dict(cfg))
    changed = [key for key in new if key in old and old[key] != new[key] and _reported(key)]
    lines = [f"{key}: {old[key]!r} -> {new[key]!r}" for key in changed]
    if (before := state.get("decoded_on")) and before != decoded_on(cfg):  # earlier checkpoints do not record it
        lines.append(f"data.decode: {before!r} -> {decoded_on(cfg)!r} (as resolved on each machine): a "
                     "JPEG broken past its header is skipped with cpu, its stream's next sample taken in its place, "
                     "and replaced by a copy of another sample of its batch with gpu, so from the first such JPEG "
                     "on, steps hold other samples than the uninterrupted run's")
    step = state["step"]
    then, now = (lr_at(step, lr=c["optim.lr"], min_lr=c["optim.min_lr"], warmup_steps=c["optim.warmup_steps"],
                       total_steps=c["train.steps"]) for c in (old, new))
    if now != then:
        ends = f" (the cosine decay now ends at train.steps={new['train.steps']})" if "train.steps" in changed else ""
        lines.append(f"the learning rate of step {step + 1} is {now:.3g}, where the checkpoint's schedule has "
                     f"{then:.3g}{ends}")
    return lines


def _reported(key: str) -> bool:
    return key not in _UNREPORTED and key.split(".")[0] not in _UNREPORTED_SECTIONS


def _flat(tree: dict) -> dict:
    return {f"{section}.{name}": value for section, values in tree.items() for name, value in values.items()}
