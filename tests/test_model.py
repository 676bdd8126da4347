import pytest
import timm
import torch

from conftest import TINY
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.model import build_model, check_model, is_classifier, timm_kwargs, train_flops_per_image
from vitdist.optim import build_optimizer


def tiny_model(*overrides):
    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def test_state_dict_loads_in_timm_by_arch_name():
    model, cfg = tiny_model()
    reference = timm.create_model(cfg.model.arch, pretrained=False, **timm_kwargs(cfg.model))
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), reference.eval()
    torch.testing.assert_close(reference(x), model(x), rtol=0, atol=0)
    assert type(reference) is type(model)


def test_architecture_follows_the_config():
    model, _ = tiny_model("model.depth=3", "model.embed_dim=64", "model.num_heads=2", "model.num_classes=5")
    assert len(model.blocks) == 3 and model.embed_dim == 64 and model.head.out_features == 5
    assert model.patch_embed.patch_size == (8, 8) and model.pos_embed.shape == (1, 1 + 16, 64)
    assert model.cls_token is not None


def test_grad_checkpointing_recomputes_blocks_and_changes_nothing():
    """model.grad_checkpointing=true, as the config turns it on: the same weights (same seed), the
    same results, the blocks run again in backward."""
    model, _ = tiny_model()
    checkpointed, _ = tiny_model("model.grad_checkpointing=true")
    calls = {"plain": 0, "ckpt": 0}
    # Pre-hooks: the recomputation stops early, once it has what backward needs, so post-hooks miss it.
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    checkpointed.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x = torch.randn(4, 3, 32, 32)
    for m in (model, checkpointed):
        m(x).square().mean().backward()
    assert calls == {"plain": 1, "ckpt": 2}  # the block ran again in backward: activations were not kept
    torch.testing.assert_close(checkpointed(x), model(x), rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_weight_decay_groups():
    model, cfg = tiny_model()
    optimizer = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "head.bias",
            "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"} <= decay
    assert decay | no_decay == set(names.values()) and not decay & no_decay


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=vit_nonexistent"], "model.arch 'vit_nonexistent' is not a timm model"),
    # A typo is answered with the names it is nearest to, not the first names in timm's list.
    (["model.arch=vit_base_patch16_2244"], "not a timm model; did you mean vit_base_patch16_224, "),
    (["model.arch=deit_smal_patch16_224"], "did you mean deit_small_patch16_224, "),
    (["model.arch=beit_base_patch16_224"], "builds a Beit, not a VisionTransformer"),
    (["model.arch=resnet18"], "timm cannot build model.arch 'resnet18'"),
    (["model.num_heads=3"], "dim should be divisible by num_heads"),
    # A bare assert in timm, which has no message: the refusal quotes it (SwiGLU's packed width, 64 x 5.33, is odd).
    (["model.arch=vit_giant_patch14_dinov2", "model.embed_dim=64"], r"AssertionError in mlp.py, line \d+: assert hidden_features % 2 == 0"),
    (["model.img_size=36"], "model.img_size=36 is not a multiple of the patch size 8"),
    # The arch's own patch size (16) when model.patch_size is null: timm would train on 32 px.
    (["model.patch_size=null", "model.img_size=40"], "model.img_size=40 is not a multiple of the patch size 16"),
])
def test_impossible_models_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_model(load_config(TINY, overrides).model)


@pytest.mark.parametrize("overrides", [
    [], ["model.img_size=64", "model.depth=2", "model.num_classes=100"],
    ["model.arch=vit_so150m_patch16_reg4_map_256"],  # attention pooling over the patches, not the registers
    ["model.arch=deit_tiny_distilled_patch16_224"],  # two heads
])
def test_train_flops_match_torch_flop_counter(overrides):
    """perf/mfu's FLOP count against torch's own count of a real forward + backward (whose input
    gradient of the patch projection is not computed: the image needs none), for ViTs of other
    heads too. The math attention backend, because the counter does not see inside the CPU's fused
    attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, cfg = tiny_model(*overrides)
    x = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x).sum().backward()
    patch_input_grad = 2 * model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches * len(x)
    assert train_flops_per_image(model) * len(x) == pytest.approx(counter.get_total_flops() + patch_input_grad, rel=1e-6)

    for name, param in model.named_parameters():  # finetune.freeze=backbone: a linear probe
        param.requires_grad_(is_classifier(model, name))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x).sum().backward()
    assert train_flops_per_image(model) * len(x) == pytest.approx(counter.get_total_flops(), rel=1e-6)
