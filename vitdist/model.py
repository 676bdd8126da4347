"""The ViT: timm's VisionTransformer, so that a saved state dict loads in timm by name + kwargs."""

import difflib
import traceback
from pathlib import Path

import timm
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from .config import ConfigError, DataConfig, ModelConfig


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Arguments to `timm.create_model(cfg.arch, **kwargs)` that rebuild this architecture."""
    kwargs = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    return kwargs


def build_model(cfg: ModelConfig) -> VisionTransformer:
    if not timm.is_model(cfg.arch):
        vits = timm.list_models(module=["vision_transformer", "deit"])  # the VisionTransformers vitdist trains
        nearest = difflib.get_close_matches(cfg.arch, vits, n=5, cutoff=0.5) or timm.list_models("vit_*_patch16_224")[:5]
        raise ConfigError(f"model.arch '{cfg.arch}' is not a timm model; did you mean {', '.join(nearest)}?")
    model = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate, **timm_kwargs(cfg))
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"model.arch '{cfg.arch}' builds a {type(model).__name__}, not a VisionTransformer")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def check_model(cfg: ModelConfig) -> VisionTransformer:
    """Build the model on the meta device (no memory, no compute) so that an impossible
    architecture is a ConfigError before any process group starts. Returns it, for checks of
    what its weights' shapes must be."""
    with torch.device("meta"):
        try:
            model = build_model(cfg)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"timm cannot build model.arch '{cfg.arch}' with {timm_kwargs(cfg)}: {_reason(e)}") from None
    patch = model.patch_embed.patch_size[0]  # the arch's own when model.patch_size is null
    if cfg.img_size % patch:  # timm would drop the remainder pixels without a word
        raise ConfigError(f"model.img_size={cfg.img_size} is not a multiple of the patch size {patch}")
    return model


def architecture(model: VisionTransformer) -> dict:
    """The values that timm_kwargs' keys take in `model` (the arch's own where a key was null):
    two models of one arch with the same values have the same weights and compute alike. None
    where the blocks do not say (parallel blocks hold their attentions and MLPs otherwise)."""
    block = model.blocks[0] if len(model.blocks) else None
    attention, mlp = getattr(block, "attn", block), getattr(block, "mlp", None)
    return {"img_size": model.patch_embed.img_size[0], "num_classes": model.num_classes,
            "patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim, "depth": len(model.blocks),
            "num_heads": getattr(attention, "num_heads", None),
            "mlp_ratio": mlp.fc2.in_features / model.embed_dim if hasattr(mlp, "fc2") else None}


def recorded_architecture(arch: str, kwargs: dict) -> dict:
    """architecture() of the model that a checkpoint's arch and timm kwargs build (on the meta
    device); ConfigError where this timm cannot build it."""
    with torch.device("meta"):
        try:
            return architecture(timm.create_model(arch, pretrained=False, **kwargs))
        except Exception as e:
            raise ConfigError(f"timm {timm.__version__} cannot build the checkpoint's model '{arch}' with {kwargs}: "
                              f"{_reason(e)}") from None


def _reason(error: Exception) -> str:
    """Why timm failed: its message, or for a bare assert, which says nothing, the failing line."""
    if str(error):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} in {Path(frame.filename).name}, line {frame.lineno}: {frame.line}"


def is_classifier(model: VisionTransformer, name: str) -> bool:
    """Whether parameter `name` belongs to the classifier: what a new model.num_classes replaces and
    a linear probe trains. timm's pretrained_cfg names its modules: 'head', and 'head_dist' too in
    DeiT's distilled ViTs."""
    classifier = model.pretrained_cfg.get("classifier", "head")
    return name.split(".")[0] in ((classifier,) if isinstance(classifier, str) else classifier)


def train_flops_per_image(model: VisionTransformer) -> float:
    """Model FLOPs of one image's forward + backward (3x the forward's matrix products: every
    linear layer per token, the patch projection per patch, attention's QK^T and AV, the attention
    pool's, every classifier head's). Norms and pointwise ops are left out, and recomputation under
    checkpointing is not counted, as in MFU. With the backbone frozen, backward runs through the
    head alone."""
    patches = model.patch_embed.num_patches
    tokens = patches + model.num_prefix_tokens
    block_macs = _linear_macs(model.blocks)
    attention_macs = 2 * tokens * tokens * model.embed_dim * len(model.blocks)
    head_macs = sum(_linear_macs(m) for name, m in model.named_children() if is_classifier(model, name))
    macs = (block_macs * tokens + model.patch_embed.proj.weight.numel() * patches + attention_macs
            + _attention_pool_macs(model, tokens, patches) + head_macs)
    if not any(p.requires_grad for name, p in model.named_parameters() if not is_classifier(model, name)):
        return 2 * (macs + head_macs)  # a linear probe: backward computes only the head's weight gradient
    return 3 * 2 * macs


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates of `module`'s linear layers for one token."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _attention_pool_macs(model: VisionTransformer, tokens: int, patches: int) -> int:
    """SigLIP's attention pooling (global_pool='map'): its latent queries attend over the tokens,
    so only keys and values are computed per token; the rest of the pool runs on the latents."""
    pool = model.attn_pool
    if pool is None:
        return 0
    # timm before pool_include_prefix pooled every token, the prefix tokens too
    seen = tokens if getattr(model, "pool_include_prefix", True) else patches
    kv_macs = pool.kv.in_features * pool.kv.out_features
    per_latent = _linear_macs(pool) - kv_macs + 2 * seen * model.embed_dim  # + QK^T and AV
    return kv_macs * seen + pool.latent_len * per_latent


def model_meta(model_cfg: ModelConfig, data_cfg: DataConfig) -> dict:
    """What rebuilds the model in timm and feeds it (normalisation and the validation crop):
    written into every checkpoint."""
    return {"arch": model_cfg.arch, "timm_kwargs": timm_kwargs(model_cfg), "mean": data_cfg.mean, "std": data_cfg.std,
            "val_crop_frac": data_cfg.val_crop_frac}
