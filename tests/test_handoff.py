import argparse
import os
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from timm.models import save_for_hf

from conftest import REPO, TINY, vitdist_cli
from vitdist import checkpoint, checkpoint_read
from vitdist.config import CkptConfig
from vitdist.config_yaml import load_config
from vitdist.export import export, write_safetensors
from vitdist.handoff import HandoffError, load_pretrained
from vitdist.model import build_model
from vitdist.optim import build_optimizer
from vitdist.model import model_meta


def tiny(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY, list(overrides)).model).eval()


def test_torchvision_vit_b16_gives_torchvisions_logits(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.vit_b_16().eval()  # random weights: nothing is downloaded
    torch.save(reference.state_dict(), tmp_path / "vit_b_16.pth")
    model = build_model(load_config(TINY, ["model.arch=vit_base_patch16_224", "model.img_size=224",
                                           "model.patch_size=null", "model.embed_dim=null", "model.depth=null",
                                           "model.num_heads=null", "model.num_classes=1000"]).model).eval()
    kind, fresh = load_pretrained(model, tmp_path / "vit_b_16.pth")
    assert kind == "torchvision ViT" and fresh == []
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_a_torchvision_vit_with_a_representation_layer_is_refused_naming_the_file(tmp_path):
    """torchvision's representation_size adds heads.pre_logits, which timm's ViT has no place for:
    refused naming the file (`vitdist evaluate` said only which key, not of which checkpoint)."""
    source = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4,
                                                  hidden_dim=128, mlp_dim=512, num_classes=8, representation_size=64)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    with pytest.raises(HandoffError, match=re.escape(f"'{tmp_path / 'tv.pth'}' is a torchvision ViT state dict, and its "
                                                     "key 'heads.pre_logits.weight' has no timm equivalent")):
        load_pretrained(tiny(), tmp_path / "tv.pth")


@pytest.mark.parametrize("pretrain, finetune", [("pretrain/tiny", "finetune/tiny_digits"),
                                                 ("pretrain/vit_b16", "finetune/vit_b16")])
def test_each_finetune_config_takes_its_pretraining_configs_checkpoint(tmp_path, pretrain, finetune):
    """What the README pairs: a checkpoint of the pretraining config fine-tunes under the fine-tune
    config, with a new head and at its resolution. Two blocks of each, for the time: what must
    match (width, patch size, heads) is the configs' own."""
    configs = REPO / "configs"
    torch.manual_seed(0)
    source = build_model(load_config(configs / f"{pretrain}.yaml", ["model.depth=2", "model.num_classes=100"]).model)
    save_file(source.state_dict(), tmp_path / "pretrained.safetensors")
    cfg = load_config(configs / f"{finetune}.yaml", ["model.depth=2"])
    target = build_model(cfg.model)
    kind, fresh = load_pretrained(target, tmp_path / "pretrained.safetensors")
    assert fresh == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert target(torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)).shape == (1, cfg.model.num_classes)


@pytest.mark.parametrize("layout", ["timm", "mae"])
def test_new_head_and_resolution(tmp_path, layout, caplog):
    """From what the training scripts of timm (train.py) and of DeiT/MAE save: the weights beside
    the optimizer's state and the script's arguments. The resampling is logged: a run at another
    resolution says that it did it."""
    caplog.set_level("INFO", logger="vitdist.handoff")
    source = tiny()
    args = argparse.Namespace(model="vit_tiny_patch16_224", lr=5e-4, input_size=32, smoothing=0.1)
    saved = {"optimizer": build_optimizer(source, load_config(TINY).optim).state_dict(), "args": args, "epoch": 3}
    weights = {"timm": "state_dict", "mae": "model"}[layout]
    state = source.state_dict()
    if layout == "mae":  # MAE's pretraining saves its pixel decoder and mask token beside the encoder
        state.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(64, 128),
                      "decoder_pos_embed": torch.zeros(1, 17, 64), "decoder_pred.weight": torch.zeros(192, 64)})
    torch.save({**saved, weights: state}, tmp_path / "timm.pth")
    target = tiny("model.img_size=48", "model.num_classes=5", seed=1)
    kind, fresh = load_pretrained(target, tmp_path / "timm.pth")
    assert kind == "torch state dict" and fresh == ["head.bias", "head.weight"]
    assert "position embeddings resampled from a 4x4 to a 6x6 patch grid" in caplog.text
    assert ("left out 4 weights of MAE's pretraining" in caplog.text) == (layout == "mae")
    # The [CLS] position kept; the 4x4 grid of the others resampled to 6x6 as an image of 128 channels is.
    torch.testing.assert_close(target.pos_embed[:, :1], source.pos_embed[:, :1])
    grid = source.pos_embed[:, 1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    torch.testing.assert_close(target.pos_embed[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 36, 128))
    torch.testing.assert_close(target.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert target(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_a_distilled_deit_gets_both_its_heads_anew_and_a_probe_trains_both(tmp_path):
    """DeiT's distilled ViTs classify with two heads (timm's pretrained_cfg names both): a new
    model.num_classes replaces both, and a linear probe trains both."""
    from vitdist.model import is_classifier

    distilled = ["model.arch=deit_tiny_distilled_patch16_224"]
    torch.save(tiny(*distilled, "model.num_classes=1000").state_dict(), tmp_path / "deit.pth")
    target = tiny(*distilled, "model.num_classes=5", seed=1)
    kind, fresh = load_pretrained(target, tmp_path / "deit.pth")
    assert fresh == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert sorted(name for name, _ in target.named_parameters() if is_classifier(target, name)) == fresh


def test_another_patch_size_resamples_the_patch_embedding(tmp_path, caplog):
    """model.patch_size 8 -> 4 at 32 px: the patch projection is resampled to 4x4 pixels and the
    position embeddings to the 8x8 grid, each logged; the rest loads as it was."""
    caplog.set_level("INFO", logger="vitdist.handoff")
    source = tiny()
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    target = tiny("model.patch_size=4", seed=1)
    assert load_pretrained(target, tmp_path / "vit.pth") == ("torch state dict", [])
    assert target.patch_embed.proj.weight.shape == (128, 3, 4, 4) and target.pos_embed.shape == (1, 1 + 64, 128)
    assert "patch embedding resampled from 8x8 to 4x4 pixel patches" in caplog.text
    assert "position embeddings resampled from a 4x4 to a 8x8 patch grid" in caplog.text
    torch.testing.assert_close(target.blocks[3].attn.proj.weight, source.blocks[3].attn.proj.weight)
    assert target(torch.randn(1, 3, 32, 32)).shape == (1, 8)


@pytest.mark.parametrize("safe", [False, True])
def test_a_hugging_face_hub_folder_as_timm_saves_it(tmp_path, safe):
    source = tiny()
    save_for_hf(source, tmp_path / "hub", safe_serialization=safe)  # pytorch_model.bin or model.safetensors
    target = tiny("model.num_classes=5", seed=1)
    kind, fresh = load_pretrained(target, tmp_path / "hub")
    assert kind == ("safetensors" if safe else "torch state dict") and fresh == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    # Another architecture is refused naming the one its config.json records (it said "architecture not recorded").
    weights = tmp_path / "hub" / ("model.safetensors" if safe else "pytorch_model.bin")
    with pytest.raises(HandoffError, match=re.escape(f"the checkpoint '{weights}' (vit_tiny_patch16_224, 4 blocks of "
                                                     "width 128) does not fit the model")):
        load_pretrained(tiny("model.depth=6"), tmp_path / "hub")


def test_export_and_checkpoint_directory(tmp_path, process_group):
    source = tiny()
    saver = checkpoint.Checkpointer(tmp_path / "ckpts", CkptConfig(keep=0),
                                    {"arch": "vit_tiny_patch16_224", "timm_kwargs": {
                                        "img_size": 32, "num_classes": 8, "patch_size": 8, "embed_dim": 128,
                                        "depth": 4, "num_heads": 4}, "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225]})
    step_dir = saver.save(1, source, build_optimizer(source, load_config(TINY).optim), {"step": 1})
    out = export(step_dir, tmp_path / "vit.safetensors")
    x = torch.randn(2, 3, 32, 32)
    for path, kind in ((step_dir, "vitdist checkpoint"), (out, "safetensors")):
        target = tiny(seed=1)
        assert load_pretrained(target, path) == (kind, [])
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # A run's checkpoints directory stands for its newest complete checkpoint (what SLURM chains pass).
    with torch.no_grad():
        source.head.bias.add_(1.0)
    saver.save(2, source, build_optimizer(source, load_config(TINY).optim), {"step": 2})
    (tmp_path / "ckpts" / "step_3.tmp").mkdir()  # a save killed half-way is not it
    target = tiny(seed=1)
    assert load_pretrained(target, tmp_path / "ckpts") == ("vitdist checkpoint", [])
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    newest = export(tmp_path / "ckpts", tmp_path / "newest.safetensors")  # so it is for `vitdist export`
    target = tiny(seed=1)
    assert load_pretrained(target, newest) == ("safetensors", [])
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # A mistyped path is said not to exist, not to be an incomplete checkpoint.
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint '{tmp_path / 'ckpt'}' does not exist")):
        export(tmp_path / "ckpt", tmp_path / "typo.safetensors")


def test_a_run_is_resolved_once_so_a_save_during_the_read_is_not_named(tmp_path, process_group, monkeypatch):
    """A run's checkpoints/ stands for its newest checkpoint, looked up once: one that a still
    training run completes while the newest is read is not the one the refusal names."""
    import shutil

    from vitdist import handoff

    cfg = load_config(TINY)
    source = tiny()
    saver = checkpoint.Checkpointer(tmp_path / "ckpts", CkptConfig(keep=0), model_meta(cfg.model, cfg.data))
    read = saver.save(1, source, build_optimizer(source, cfg.optim), {"step": 1})

    def read_while_a_save_completes(path, average):
        weights = checkpoint_read.load_model_weights(path, average)
        shutil.copytree(path, tmp_path / "ckpts" / "step_2")
        return weights

    monkeypatch.setattr(handoff, "load_model_weights", read_while_a_save_completes)
    with pytest.raises(HandoffError, match=re.escape(f"the checkpoint '{read}' (vit_tiny_patch16_224, 4 blocks")):
        load_pretrained(tiny("model.depth=6"), tmp_path / "ckpts")


def test_wrong_architecture_lists_the_keys(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "depth4.pth")
    with pytest.raises(HandoffError, match=re.escape(
            f"the checkpoint '{tmp_path / 'depth4.pth'}' (architecture not recorded, 4 blocks of width 128) does not "
            "fit the model (vit_tiny_patch16_224, 6 blocks of width 128): model keys the checkpoint lacks: "
            "blocks.4.attn.proj.bias")):
        load_pretrained(tiny("model.depth=6"), tmp_path / "depth4.pth")
    # A vitdist export names its architecture: both are named.
    cfg = load_config(TINY)
    write_safetensors(tiny().state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "tiny.safetensors")
    small = tiny("model.arch=vit_small_patch16_224", "model.embed_dim=null", "model.depth=null", "model.num_heads=null")
    with pytest.raises(HandoffError, match=re.escape(
            f"the checkpoint '{tmp_path / 'tiny.safetensors'}' (vit_tiny_patch16_224, 4 blocks of width 128) does not "
            "fit the model (vit_small_patch16_224, 12 blocks of width 384): model keys the checkpoint lacks: ")):
        load_pretrained(small, tmp_path / "tiny.safetensors")
    with pytest.raises(HandoffError, match=r"shapes that differ: .*blocks\.0\.attn\.qkv\.weight \(384, 128\) vs \(192, 64\)"):
        load_pretrained(tiny("model.embed_dim=64"), tmp_path / "depth4.pth")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HandoffError, match="keys the model does not have: something.else"):
        load_pretrained(tiny(), tmp_path / "other.safetensors")


def test_the_fit_is_judged_from_metadata_alone_as_the_load_judges_it(tmp_path, process_group):
    """What preflight runs: check_fit, on a model built on the meta device and the checkpoint's key
    names and shapes (DCP's .metadata, safetensors' header, a torch file's pickle without its
    storages), accepts what load_pretrained loads and refuses what it refuses, in the same words."""
    from vitdist.handoff import check_fit
    from vitdist.model import check_model

    cfg = load_config(TINY)
    source = tiny()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    write_safetensors(source.state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "vit.safetensors")
    run = tmp_path / "run" / "checkpoints"
    checkpoint.Checkpointer(run, CkptConfig(keep=0), model_meta(cfg.model, cfg.data)).save(
        1, source, build_optimizer(source, cfg.optim), {"step": 1})
    targets = [[], ["model.img_size=48", "model.num_classes=5"], ["model.patch_size=4"], ["model.depth=6"],
               ["model.embed_dim=64"]]

    def verdict(judge) -> str:
        try:
            judge()
        except HandoffError as e:
            return str(e)
        return "fits"

    for path in (tmp_path / "timm.pth", tmp_path / "vit.safetensors", run):
        checked = [verdict(lambda: check_fit(check_model(load_config(TINY, t).model), path)) for t in targets]
        assert checked == [verdict(lambda: load_pretrained(tiny(*t), path)) for t in targets]
        assert checked[:3] == ["fits"] * 3 and all("does not fit the model" in v for v in checked[3:]), checked
    # A checkpoint copied in part is refused by name (the load failed with a traceback of DCP's).
    (run / "step_1" / "__0_0.distcp").unlink()
    with pytest.raises(HandoffError, match=re.escape(f"checkpoint '{run / 'step_1'}' is incomplete: its file "
                                                     "'__0_0.distcp' is missing")):
        check_fit(check_model(cfg.model), run)


def test_unreadable_and_unsafe_checkpoints(tmp_path):
    from vitdist.handoff import check_fit
    from vitdist.model import check_model

    torch.save(tiny().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(HandoffError, match="cannot read '.*cut.pth' as a checkpoint"):
        load_pretrained(tiny(), tmp_path / "cut.pth")

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"model": Exploit()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(HandoffError, match="refusing to unpickle them .*GLOBAL posix.system") as refused:
        load_pretrained(tiny(), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    assert "weights_only" not in str(refused.value)  # torch's advice to load it unsafely is left out
    # The JSON beside an export, given for its weights: no pickle at all, which was refused as an unsafe one.
    cfg = load_config(TINY)
    write_safetensors(tiny().state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "vit.safetensors")
    with pytest.raises(HandoffError, match=re.escape(f"cannot read '{tmp_path / 'vit.json'}' as a checkpoint: it is no "
                                                     "torch file of tensors (Unsupported operand 123)")):
        load_pretrained(tiny(), tmp_path / "vit.json")
    # safetensors saved under a torch name: torch's refusal said to load it with weights_only=False, unsafe and vain.
    save_file(tiny().state_dict(), str(tmp_path / "weights.pth"))
    for judge in (lambda: load_pretrained(tiny(), tmp_path / "weights.pth"),
                  lambda: check_fit(check_model(load_config(TINY).model), tmp_path / "weights.pth")):
        with pytest.raises(HandoffError, match=re.escape(f"'{tmp_path / 'weights.pth'}' is a safetensors file under "
                                                         "another name: rename it to end in .safetensors")):
            judge()
    with pytest.raises(HandoffError, match="does not exist"):
        load_pretrained(tiny(), tmp_path / "missing.pth")
    # A run's checkpoints/ before its first save completed: no checkpoint is in it, and it says so.
    (tmp_path / "run" / "checkpoints" / "step_4.tmp").mkdir(parents=True)
    with pytest.raises(HandoffError, match=re.escape(
            f"'{tmp_path / 'run' / 'checkpoints'}' holds no checkpoint: it is no vitdist checkpoint (no .metadata), "
            "no run's checkpoints/ with a complete one (step_N/, not step_N.tmp/), no Hugging Face hub folder "
            "(model.safetensors or pytorch_model.bin)")):
        load_pretrained(tiny(), tmp_path / "run" / "checkpoints")


def test_an_export_is_written_only_under_a_safetensors_name(tmp_path, process_group):
    """timm and vitdist read a file as safetensors by its name: `vitdist export --out b16.pt`
    wrote safetensors under a .pt name, which fine-tuning then refused as holding objects other
    than tensors (an unsafe pickle), and timm's pretrained path could not read either."""
    cfg = load_config(TINY)
    source = tiny()
    saver = checkpoint.Checkpointer(tmp_path / "ckpts", CkptConfig(keep=0), model_meta(cfg.model, cfg.data))
    step_dir = saver.save(1, source, build_optimizer(source, cfg.optim), {"step": 1})
    refused = vitdist_cli("export", "--checkpoint", step_dir, "--out", tmp_path / "b16.pt")
    assert refused.returncode == 2 and not (tmp_path / "b16.pt").exists() and not (tmp_path / "b16.json").exists()
    assert f"vitdist export: --out '{tmp_path / 'b16.pt'}' must end in .safetensors" in refused.stderr


def test_an_export_of_a_checkpoint_copied_in_part_names_the_lost_file(tmp_path, process_group):
    """`vitdist export` (and evaluation, fine-tuning) of a checkpoint that lost a tensor file: exit 2
    naming the file, where DCP's load failed half-way with a traceback."""
    cfg = load_config(TINY)
    source = tiny()
    saver = checkpoint.Checkpointer(tmp_path / "ckpts", CkptConfig(keep=0), model_meta(cfg.model, cfg.data))
    step_dir = saver.save(1, source, build_optimizer(source, cfg.optim), {"step": 1})
    lost = next(step_dir.glob("*.distcp"))
    lost.unlink()
    refused = vitdist_cli("export", "--checkpoint", step_dir, "--out", tmp_path / "b16.safetensors")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert re.search(rf"^vitdist export: .*'{re.escape(str(step_dir))}'.*'{lost.name}' is missing", refused.stderr,
                     re.MULTILINE), refused.stderr
    assert not (tmp_path / "b16.safetensors").exists()


def test_register_tokens_without_positions_resample_and_other_prefix_tokens_are_refused(tmp_path):
    """The *_reg4_gap archs give their register tokens no rows of pos_embed (no_embed_class): at
    another resolution only the patch grid is resampled. A checkpoint whose prefix tokens differ
    from the model's is another architecture: a HandoffError naming the keys, not a reshape error."""
    from timm.layers import resample_abs_pos_embed

    source = tiny("model.arch=vit_base_patch16_reg4_gap_256")
    torch.save(source.state_dict(), tmp_path / "reg4.pth")
    target = tiny("model.arch=vit_base_patch16_reg4_gap_256", "model.img_size=48", "model.num_classes=5", seed=1)
    assert load_pretrained(target, tmp_path / "reg4.pth") == ("torch state dict", ["head.bias", "head.weight"])
    torch.testing.assert_close(target.pos_embed, resample_abs_pos_embed(source.pos_embed, [6, 6], num_prefix_tokens=0))
    torch.testing.assert_close(target.reg_token, source.reg_token)
    with pytest.raises(HandoffError, match=r"model keys the checkpoint lacks: cls_token, norm.bias, norm.weight; "
                                           r"shapes that differ: pos_embed \(1, 16, 128\) vs \(1, 17, 128\)"):
        load_pretrained(tiny(), tmp_path / "reg4.pth")


def test_an_export_loads_through_timms_pretrained_path_with_its_head_and_normalisation(tmp_path):
    """timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=...) with the export's
    pretrained_cfg: the trained head is kept (timm would drop it for differing from the arch's 1000
    classes), and timm's data config normalises as the run did, so the logits are vitdist's."""
    import json

    import timm
    from vitdist.data import Normalize

    cfg = load_config(TINY, ["data.mean=[0.5, 0.4, 0.3]", "data.std=[0.2, 0.25, 0.3]", "data.val_crop_frac=0.9"])
    source = tiny()
    out = write_safetensors(source.state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "vit.safetensors")
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(meta["arch"], pretrained=True, **meta["timm_kwargs"],
                              pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=str(out))).eval()
    data = timm.data.resolve_model_data_config(model)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 0.9 and data["interpolation"] == "bicubic"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    timm_input = (images / 255 - torch.tensor(data["mean"]).view(3, 1, 1)) / torch.tensor(data["std"]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(timm_input), source(Normalize(cfg.data, torch.device("cpu"))(images)))


@pytest.mark.parametrize("classes, names", [
    ([f"class{i}" for i in range(1000)], [f"class{i}" for i in range(1000)]),
    ([f"class{i}" for i in range(1200)], [f"class{i}" for i in range(1000)]),  # labels past the head were skipped
    ([f"class{i}" for i in range(600)], {str(i): f"class{i}" for i in range(600)}),  # outputs never trained on
    (None, None),  # no names recorded: timm's own guess (ImageNet-1k's for 1000 outputs) stands
])
def test_an_export_names_its_outputs_for_timm_and_the_hub_as_the_run_named_its_classes(tmp_path, classes, names):
    """timm's tools and the Hugging Face hub name a model's outputs by its pretrained_cfg's
    label_names; without them a 1000-class head is taken for ImageNet-1k's: a run's 'class2' was
    named 'great white shark'."""
    import json

    import timm
    from timm.models import save_for_hf

    cfg = load_config(TINY, ["model.num_classes=1000"])
    meta = {**model_meta(cfg.model, cfg.data), **({"classes": classes} if classes else {})}
    out = write_safetensors(tiny("model.num_classes=1000").state_dict(), meta, tmp_path / "vit.safetensors")
    exported = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(exported["arch"], pretrained=True, **exported["timm_kwargs"],
                              pretrained_cfg_overlay=dict(exported["pretrained_cfg"], file=str(out)))
    assert model.pretrained_cfg.get("label_names") == names
    save_for_hf(model, tmp_path / "hub")
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["pretrained_cfg"].get("label_names") == names


def test_a_head_that_fits_is_kept_unless_a_new_one_is_asked_for(tmp_path):
    """Same number of classes: kept (the same classes, trained on); finetune.new_head: fresh (other
    classes, as many), and the rest loaded all the same."""
    source = tiny()
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    kept = tiny(seed=1)
    assert load_pretrained(kept, tmp_path / "vit.pth") == ("torch state dict", [])
    torch.testing.assert_close(kept.head.weight, source.head.weight)
    fresh_head = tiny(seed=1)
    initial = fresh_head.head.weight.detach().clone()
    assert load_pretrained(fresh_head, tmp_path / "vit.pth", new_head=True) == ("torch state dict",
                                                                                 ["head.bias", "head.weight"])
    torch.testing.assert_close(fresh_head.head.weight, initial)
    torch.testing.assert_close(fresh_head.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)
