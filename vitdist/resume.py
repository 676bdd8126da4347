"""What a resumed run may change from the run that wrote its checkpoint.

A checkpoint's stream positions index the shard list as `data.seed` and `data.shuffle_block` deal
and shuffle it, its tensors fit one architecture, and its step lies within `train.steps`: a resume
that changes these is refused (ConfigError, before any process group starts), as it would read
other samples than the uninterrupted run, or load the weights into another model. World size,
strategy, loader workers and micro-batch size resume exactly, and are not reported. Any other
change (the learning rate, `train.steps`, the global batch) is the user's to make: it is logged as
a warning, key by key, since the run then differs from the one it resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import MODEL_META, TRAIN_STATE, check_files
from .config import Config, ConfigError, to_dict
from .model import timm_kwargs
from .schedule import lr_at

# How the run is carried out, not what it computes (beyond the order of float sums, as with
# another world size); data.train_shards and the model are compared as what they resolve to.
_UNREPORTED_SECTIONS = {"model", "dist", "ckpt", "log", "run"}
_UNREPORTED = {"data.train_shards", "data.micro_batch_size", "data.num_workers", "data.prefetch_steps",
               "data.decode", "data.max_skip_frac", "train.resume", "train.compile",
               "train.activation_memory_budget", "train.eval_every_steps", "train.max_bad_steps", "finetune.init"}


def data_order(cfg: Config, urls: list[str]) -> dict:
    """What the meaning of the stream positions depends on, for train_state.json. Shards are
    compared by file name, in order: the same shards moved to another directory resume."""
    names = "\n".join(url.rstrip("/").rsplit("/", 1)[-1] for url in urls)
    return {"seed": cfg.data.seed, "shuffle_block": cfg.data.shuffle_block, "shards": len(urls),
            "shard_names_sha256": hashlib.sha256(names.encode()).hexdigest()}


def check(cfg: Config, path: Path, urls: list[str] | None) -> None:
    """Refuse (ConfigError) a resume from `path` that cannot continue the run it comes from.
    `urls`: the training shards, None for an ImageFolder (whose conversion refuses a changed folder)."""
    try:
        check_files(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    state = json.loads((path / TRAIN_STATE).read_text())
    meta = json.loads((path / MODEL_META).read_text())
    where = f"checkpoint '{path}'"
    start_new = f"resume with the value it was trained with, or start a new run.dir with finetune.init={path}"

    want, had = {"arch": cfg.model.arch, **timm_kwargs(cfg.model)}, {"arch": meta["arch"], **meta["timm_kwargs"]}
    for key in sorted(want.keys() | had.keys()):
        if want.get(key) != had.get(key):
            raise ConfigError(f"model.{key}={want.get(key)}, but {where} holds a model with model.{key}="
                              f"{had.get(key)}: its weights do not fit this one; {start_new}")
    if state["step"] > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps}, but {where} is at step {state['step']} already: give "
                          f"train.steps >= {state['step']}")
    if len(state["data_positions"]) != cfg.data.streams:
        raise ConfigError(f"data.streams={cfg.data.streams}, but {where} holds the positions of "
                          f"{len(state['data_positions'])} data streams; {start_new}")
    order = state.get("data_order")  # not in checkpoints written before it was recorded
    if order is None:
        return
    changed = "its data stream positions would index another sample order: samples repeated or never seen"
    for key in ("seed", "shuffle_block"):
        if order[key] != getattr(cfg.data, key):
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)}, but {where} was trained with data.{key}="
                              f"{order[key]}: {changed}; {start_new}")
    if urls is not None and data_order(cfg, urls)["shard_names_sha256"] != order["shard_names_sha256"]:
        what = (f"{len(urls)} shards, {where} was trained on {order['shards']}" if len(urls) != order["shards"] else
                f"other shards, or the same in another order, than the {order['shards']} {where} was trained on")
        raise ConfigError(f"data.train_shards names {what}: {changed}; resume with the same list (moved to another "
                          f"directory is fine: only file names are compared), or start a new run.dir with "
                          f"finetune.init={path}")


def changes(cfg: Config, state: dict) -> list[str]:
    """The keys changed since the checkpoint's run, 'key: old -> new', and what the learning rate
    at the resumed step became if the schedule changed (as `train.steps` does to extend a run)."""
    if "config" not in state:  # a checkpoint written before the config was recorded
        return []
    old, new = _flat(state["config"]), _flat(to_dict(cfg))
    changed = [key for key in new if old.get(key) != new[key] and key not in _UNREPORTED
               and key.split(".")[0] not in _UNREPORTED_SECTIONS]
    lines = [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed]
    step = state["step"]
    then, now = (lr_at(step, lr=c["optim.lr"], min_lr=c["optim.min_lr"], warmup_steps=c["optim.warmup_steps"],
                       total_steps=c["train.steps"]) for c in (old, new))
    if now != then:
        lines.append(f"the learning rate of step {step + 1} is {now:.3g}, where the checkpoint's schedule has "
                     f"{then:.3g} (the cosine decay now ends at train.steps={new['train.steps']})")
    return lines


def _flat(tree: dict) -> dict:
    return {f"{section}.{name}": value for section, values in tree.items() for name, value in values.items()}
