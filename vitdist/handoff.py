"""Pretrained weights into a ViT whose head, resolution or patch size may differ: from a vitdist
checkpoint directory (or a run's `checkpoints/`, meaning its newest complete one) or export, a
timm state dict (.pth/.bin/.pt/.safetensors), or a torchvision `vit_*` state dict.
Loading never unpickles arbitrary objects (`weights_only=True`, safetensors).

As in MAE's fine-tuning: the head is dropped when its shape differs, position embeddings are
resampled to the new patch grid, the rest loads, and the only keys allowed to be missing are
the head's. Anything else is a HandoffError that names both architectures and lists the offending keys.
`check_fit` reaches the same verdict from the checkpoint's metadata alone (key names and shapes),
so that a config check before training refuses it without reading the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from .checkpoint import MODEL_META, newest_if_run
from .checkpoint_read import CorruptCheckpoint, NoAverage, UnsafeCheckpoint, load_model_weights, model_weight_shapes
from .export import header
from .model import is_classifier

log = logging.getLogger(__name__)
# What MAE's pretraining adds beside the encoder (its pixel decoder, the masked patches' token):
# fine-tuning uses the encoder alone, as MAE's own fine-tuning does.
MAE_PRETRAINING = ("decoder_", "mask_token")
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_CONFIG = "config.json"  # beside them: the architecture, its arguments, the data config
_TORCHVISION = [  # torchvision ViT key -> timm ViT key
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]


class HandoffError(ValueError):
    """A checkpoint that cannot initialise the model: unreadable, unsafe, or another architecture."""


def _list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def from_torchvision(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The torchvision ViT state dict read from `path` (named where a key does not convert), with timm's key names."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _TORCHVISION:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise HandoffError(f"'{path}' is a torchvision ViT state dict, and its key '{key}' has no timm equivalent")
    return converted


def locate(path: str | Path) -> Path:
    """The checkpoint that `path` stands for: itself, a run's newest complete checkpoint (for its
    `checkpoints/`), or the weights file of a Hugging Face hub folder."""
    path = Path(path)
    if not path.exists():
        raise HandoffError(f"checkpoint '{path}' does not exist")
    path = newest_if_run(path)
    if not path.is_dir() or (path / ".metadata").exists():
        return path
    hub = [path / name for name in HUB_WEIGHTS if (path / name).is_file()]
    if not hub:  # e.g. a run's checkpoints/ before its first save completed: say so, not "no model.json"
        raise HandoffError(f"'{path}' holds no checkpoint: it is no vitdist checkpoint (no .metadata), no run's "
                           "checkpoints/ with a complete one (step_N/, not step_N.tmp/), no Hugging Face hub folder "
                           f"({' or '.join(HUB_WEIGHTS)})")
    return hub[0]  # a Hugging Face hub folder, as timm's save_for_hf writes it


def read_state_dict(path: Path, meta: bool = False, average: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of the checkpoint `path` (as `locate` gives it) with timm's key names, and which
    kind of checkpoint it was. `meta`: as tensors on the meta device, from the checkpoint's metadata
    (names, shapes), its tensor data left unread. `average`: the average of the weights that a
    vitdist checkpoint's run kept (train.ema_decay), in their place."""
    if path.is_dir():
        try:
            weights = model_weight_shapes(path, average) if meta else load_model_weights(path, average)[0]
        except (FileNotFoundError, UnsafeCheckpoint, CorruptCheckpoint, NoAverage) as e:
            raise HandoffError(str(e)) from None
        return weights, "vitdist checkpoint, the average of its weights" if average else "vitdist checkpoint"
    if average:
        raise HandoffError(f"'{path}' is no vitdist checkpoint directory, the only kind that keeps an average of the "
                           "weights beside them (a `vitdist export --ema` file holds the average as its weights)")
    try:
        if path.suffix == ".safetensors":
            state, kind = (_safetensors_shapes(path) if meta else load_file(str(path))), "safetensors"
        else:
            # The training scripts of timm, DeiT and MAE store their arguments beside the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                # meta: only the pickled structure is read. Mapped, the storages are never touched (torch
                # releases before the meta-aware loader read each one before moving it to meta); a file in the
                # format of torch before 1.6, not a zip, cannot be mapped and is read through.
                where = {"map_location": "meta", "mmap": zipfile.is_zipfile(path)} if meta else {"map_location": "cpu"}
                state, kind = torch.load(path, weights_only=True, **where), "torch state dict"
    except pickle.UnpicklingError as e:
        # torch's message says to load the file again with weights_only=False: unsafe, and for a file
        # that is no pickle (a JSON, an image, safetensors under another name), vain. Only its reason is kept.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if _is_safetensors(path):
            raise HandoffError(f"'{path}' is a safetensors file under another name: rename it to end in .safetensors, "
                               "by which timm and vitdist tell one (else they read it as a pickled state dict)") from None
        if crafted := [line for line in lines if "GLOBAL" in line]:  # a pickle that names a function or class to call
            raise HandoffError(f"'{path}' holds objects other than tensors; refusing to unpickle them ({crafted[0]})") from None
        why = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise HandoffError(f"cannot read '{path}' as a checkpoint: it is no torch file of tensors ({why})") from None
    except Exception as e:
        raise HandoffError(f"cannot read '{path}' as a checkpoint (truncated or not a state dict?): {e}") from None
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HandoffError(f"'{path}' is not a state dict of tensors")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    if "conv_proj.weight" in state:
        return from_torchvision(state, path), "torchvision ViT"
    return state, kind


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors does: the header's length (8 bytes), then its JSON."""
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the meta device, from its header. Of the shape only: the fit
    does not depend on the dtype, which the header names in safetensors' own terms."""
    with safe_open(str(path), "pt") as f:
        return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}


def describe(arch: str | None, state: dict[str, torch.Tensor]) -> str:
    """The architecture name, and the depth and width the weights have: the tiny config is timm's
    vit_tiny_patch16_224 with other sizes, so the name alone does not tell two models apart."""
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    width = state["pos_embed"].shape[-1] if "pos_embed" in state else "?"
    return f"{arch or 'architecture not recorded'}, {depth} blocks of width {width}"


def recorded_arch(path: Path) -> str | None:
    """The timm architecture that a vitdist checkpoint (its model.json), a Hugging Face hub folder (its
    config.json) or a safetensors file written by vitdist (its metadata) names; None for other state dicts."""
    try:
        if path.is_dir():
            return json.loads((path / MODEL_META).read_text()).get("arch")
        if path.name in HUB_WEIGHTS and (path.parent / HUB_CONFIG).is_file():
            return json.loads((path.parent / HUB_CONFIG).read_text()).get("architecture")
        if path.suffix == ".safetensors":
            return header(path).get("arch")
    except (OSError, ValueError, AttributeError):  # unreadable: read_state_dict says why
        pass
    return None


def adapt(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "the checkpoint",
          new_head: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit `state` to `model`: new head (where its shape differs, or always with `new_head`),
    resampled position and patch embeddings; else refuse,
    naming `source` (the checkpoint and its architecture) and the model's architecture. Returns the
    fitted state and what was done to it, for the log once it is loaded. On meta tensors (and a
    model on the meta device) the same verdict, from shapes alone."""
    target = model.state_dict()
    state = dict(state)
    heads = [key for key in target if is_classifier(model, key)]
    done = []
    if new_head or any(k in state and state[k].shape != target[k].shape for k in heads):
        for key in heads:
            state.pop(key, None)
    if mae := [key for key in state if key.startswith(MAE_PRETRAINING) and key not in target]:
        for key in mae:
            del state[key]
        done.append(f"left out {len(mae)} weights of MAE's pretraining ({_list(mae, 3)}): fine-tuning takes the encoder")
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        # The class and register tokens have rows of pos_embed before the patch grid's, unless the
        # model gives them none (timm's no_embed_class, as the *_reg4_gap archs do).
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        grid = state["pos_embed"].shape[1] - prefix
        if grid > 0 and math.isqrt(grid) ** 2 == grid:  # else it has other prefix tokens: another architecture, refused below
            new_grid = list(model.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=new_grid, num_prefix_tokens=prefix)
            side = math.isqrt(grid)
            done.append(f"position embeddings resampled from a {side}x{side} to a {new_grid[0]}x{new_grid[1]} patch grid")
    key = "patch_embed.proj.weight"
    if key in state and state[key].shape[-2:] != target[key].shape[-2:]:
        old_size = tuple(state[key].shape[-2:])
        state[key] = resample_patch_embed(state[key], new_size=list(target[key].shape[-2:]))
        done.append("patch embedding resampled from {}x{} to {}x{} pixel patches".format(*old_size, *target[key].shape[-2:]))
    unexpected = set(state) - set(target)
    missing = set(target) - set(state) - set(heads)
    mismatched = {k for k in set(state) & set(target) if state[k].shape != target[k].shape}
    problems = []
    if unexpected:
        problems.append(f"keys the model does not have: {_list(unexpected)}")
    if missing:
        problems.append(f"model keys the checkpoint lacks: {_list(missing)}")
    if mismatched:
        problems.append("shapes that differ: " + _list(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                                                       for k in mismatched))
    if problems:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture")
        raise HandoffError(f"{source} does not fit the model ({describe(arch, target)}): " + "; ".join(problems))
    return state, done


def load_pretrained(model: torch.nn.Module, path: str | Path, new_head: bool = False) -> tuple[str, list[str]]:
    """Initialise `model` from the checkpoint at `path` (but for the head, with `new_head`). Returns
    the checkpoint's kind and the keys left at their fresh initialisation (the head's, when it was
    replaced)."""
    return load_located(model, locate(path), new_head)


def load_located(model: torch.nn.Module, path: Path, new_head: bool = False,
                 average: bool = False) -> tuple[str, list[str]]:
    """load_pretrained for a checkpoint that `locate` gave: for a caller that has read its metadata
    already, so that a run's newer checkpoint is not looked up in between. `average`: see read_state_dict."""
    state, kind = read_state_dict(path, average=average)
    state, done = adapt(state, model, _source(path, state), new_head)
    result = model.load_state_dict(state, strict=False)
    for line in done:
        log.info(line)
    return kind, sorted(result.missing_keys)


def check_fit(model: torch.nn.Module, path: str | Path, average: bool = False) -> None:
    """Refuse (HandoffError) what load_located(model, locate(path), average=average) would refuse,
    reading the checkpoint's metadata only: safetensors' header, DCP's `.metadata`, a torch file's
    pickle without its storages. `model` may be on the meta device."""
    path = locate(path)
    state, _ = read_state_dict(path, meta=True, average=average)
    adapt(state, model, _source(path, state))


def _source(path: Path, state: dict[str, torch.Tensor]) -> str:
    return f"the checkpoint '{path}' ({describe(recorded_arch(path), state)})"
