"""`vitdist evaluate` on a Hugging Face hub folder as timm's save_for_hf writes it: the architecture,
the outputs' class names, the normalisation and the crop come from its config.json."""

import json
import os
import re
import subprocess
import time

import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from conftest import TINY, killing, still_running, vitdist_cli
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.evaluate import evaluate_checkpoint
from vitdist.handoff import HandoffError
from vitdist.model import build_model
from vitdist.recorded import hub_meta
from vitdist.make_shards import make_shards

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
RING = {"red": "green", "green": "blue", "blue": "red"}
OUTPUTS = ["red", "blue", "green"]  # not the sorted order of the folders: blue, green, red
HUB_DATA = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25), "crop_pct": 0.5}


def colour_reader(outputs: list[str], *overrides: str) -> torch.nn.Module:
    """The tiny ViT set to answer the colour that covers most of the image it is given: output i
    for colour outputs[i]. The patch embedding takes each patch's mean red, green and blue into
    the first three token dimensions; the first block's [CLS] attends to every token alike and
    adds their normalised values; every other attention and MLP adds nothing; the head reads the
    colour's dimension of the [CLS] token. `overrides`: of the tiny config's model section."""
    model = build_model(load_config(TINY, [f"model.num_classes={len(outputs)}", *overrides]).model).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not re.fullmatch(r"(blocks\.\d+\.)?norm\d?\.weight", name):  # the LayerNorms keep their scale of 1
                param.zero_()
        kernel, width = model.patch_embed.proj.kernel_size[0], model.embed_dim
        for channel in range(3):
            model.patch_embed.proj.weight[channel, channel] = 1 / kernel**2
        model.blocks[0].attn.qkv.weight[2 * width:] = torch.eye(width)  # values; queries and keys 0: uniform
        model.blocks[0].attn.proj.weight.copy_(torch.eye(width))
        for output, colour in enumerate(outputs):
            model.head.weight[output, list(COLOURS).index(colour)] = 0.25  # losses well above 0 to compare
    return model


def write_hub(path, outputs: list[str] = OUTPUTS, names_in: str | None = "config", safe: bool = True,
              overrides: tuple[str, ...] = ()) -> None:
    """A hub folder of colour_reader(outputs), as save_for_hf writes it (model.safetensors, or
    pytorch_model.bin where not `safe`), with label_names at the top level of config.json
    (names_in='config', as push_to_hf_hub(model_config=...) puts them), in its pretrained_cfg (as a
    vitdist export's weights loaded through timm's pretrained path pass them on), or nowhere (None)."""
    model = colour_reader(outputs, *overrides)
    model.pretrained_cfg = {**model.pretrained_cfg, **HUB_DATA, "num_classes": len(outputs),
                            **({"label_names": outputs} if names_in == "pretrained_cfg" else {})}
    save_for_hf(model, path, model_config={"label_names": outputs} if names_in == "config" else None,
                safe_serialization=safe)


def write_ringed_images(root, folders: dict[str, list[str]]) -> None:
    """root/<folder>/<i>.png for each colour listed: 48 px, its centre half of that colour, the ring
    around it of another. The hub's crop (crop_pct 0.5) sees the centre only; vitdist's default
    (0.875) sees mostly the ring."""
    for folder, colours in folders.items():
        (root / folder).mkdir(parents=True)
        for i, colour in enumerate(colours):
            image = Image.new("RGB", (48, 48), COLOURS[RING[colour]])
            image.paste(COLOURS[colour], (12, 12, 36, 36))
            image.save(root / folder / f"{i}.png")


def timm_figures(hub, root, outputs: list[str]) -> tuple[float, float]:
    """Top-1 and loss as timm computes them: the hub folder loaded by timm itself, its images
    through timm's own transform from the model's data config, folders labelled by class name."""
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    correct, losses = [], []
    with torch.no_grad():
        for path in sorted(root.glob("*/*.png")):
            logits = model(transform(Image.open(path).convert("RGB"))[None])
            label = torch.tensor([outputs.index(path.parent.name)])
            correct.append((logits.argmax(-1) == label).item())
            losses.append(torch.nn.functional.cross_entropy(logits, label).item())
    return sum(correct) / len(correct), sum(losses) / len(losses)


def cli_evaluate(checkpoint, data, *options: str) -> subprocess.CompletedProcess:
    return vitdist_cli("evaluate", "--checkpoint", checkpoint, "--data", data, "--workers", "0", *options)


def evaluates_as_timm(hub, val, top1: float) -> None:
    """timm's own model and transform get `top1` on `val`, and `vitdist evaluate` the same figures."""
    timm_top1, loss = timm_figures(hub, val, OUTPUTS)
    assert timm_top1 == pytest.approx(top1)
    evaluation = cli_evaluate(hub, val)
    assert evaluation.returncode == 0, evaluation.stderr
    assert f"top-1 {100 * top1:.2f}% | top-5 100.00%" in evaluation.stdout
    assert float(re.search(r"loss ([\d.]+)", evaluation.stdout).group(1)) == pytest.approx(loss, abs=1e-3)


@pytest.mark.parametrize("names_in, safe", [("config", True), ("pretrained_cfg", False)])
def test_a_hub_folder_is_evaluated_as_its_config_json_says(tmp_path, names_in, safe):
    """Outputs named red, blue, green, folders sorted blue, green, red: each folder takes the output
    of its name (in sorted order, all but the green images were counted wrong, silently: 8.33% for
    91.67%), with the hub's normalisation and crop (vitdist's default crop sees the ring: 0%), and
    no --config. One image in 'blue' is red: 11 of 12 are right. A folder with some classes only
    takes the outputs of their names too (it was refused: 'does not record its class names')."""
    write_hub(tmp_path / "hub", names_in=names_in, safe=safe)
    assert (tmp_path / "hub" / "model.safetensors").exists() == safe
    write_ringed_images(tmp_path / "val", {"red": ["red"] * 4, "green": ["green"] * 4, "blue": ["blue"] * 3 + ["red"]})
    evaluates_as_timm(tmp_path / "hub", tmp_path / "val", top1=11 / 12)

    write_ringed_images(tmp_path / "some", {"green": ["green"] * 2, "red": ["red"] * 2})
    some = cli_evaluate(tmp_path / "hub", tmp_path / "some")
    assert some.returncode == 0, some.stderr
    assert "top-1 100.00%" in some.stdout


@pytest.mark.parametrize("names_key", ["labels", "label_names"])
def test_a_hub_folder_of_timm_before_0_9_is_evaluated_as_timm_reads_it(tmp_path, names_key):
    """timm before 0.9 wrote config.json as one flat dict: its pretrained_cfg (input_size, mean,
    std, crop_pct, ...) with the architecture, num_classes and the class names (`labels`, or
    `label_names`) beside them, and no model_args (the weights are the architecture's own size).
    timm still reads it; vitdist refused it as lacking pretrained_cfg.input_size."""
    size = ["model.img_size=224", "model.patch_size=null", "model.embed_dim=null", "model.depth=null",
            "model.num_heads=null"]  # vit_tiny_patch16_224 as timm builds it by name
    write_hub(tmp_path / "hub", names_in=None, overrides=tuple(size))
    config = tmp_path / "hub" / "config.json"
    hub = json.loads(config.read_text())
    flat = {**hub["pretrained_cfg"], "architecture": hub["architecture"], "num_classes": hub["num_classes"],
            "num_features": hub["num_features"], names_key: OUTPUTS}
    config.write_text(json.dumps(flat))
    write_ringed_images(tmp_path / "val", {"red": ["red"] * 2, "green": ["green"] * 2, "blue": ["blue", "red"]})
    evaluates_as_timm(tmp_path / "hub", tmp_path / "val", top1=5 / 6)
    config.write_text(json.dumps({key: value for key, value in flat.items() if key != "mean"}))
    with pytest.raises(ConfigError, match=re.escape(f"'{config}' has no mean, which evaluating its weights needs")):
        hub_meta(config)


def edit(config, change, original: str) -> None:
    """config.json as `original` has it, changed by `change`."""
    hub = json.loads(original)
    change(hub)
    config.write_text(json.dumps(hub))


def test_a_hub_folder_without_what_evaluation_needs_is_refused_naming_its_file(tmp_path, caplog):
    write_ringed_images(tmp_path / "some", {"green": ["green"], "red": ["red"]})
    write_hub(tmp_path / "hub", names_in=None)
    config = tmp_path / "hub" / "config.json"
    original = config.read_text()

    def refused(message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate_checkpoint(tmp_path / "hub", str(tmp_path / "some"), workers=0)

    refused(f"--data: '{tmp_path / 'some'}' has 2 class folders for the checkpoint's 3 classes, and '{config}' does "
            "not name them")
    # Shards labelled by other class names than the checkpoint's outputs.
    write_hub(tmp_path / "named")
    shards = make_shards(tmp_path / "some", tmp_path / "shards", progress=False)
    with pytest.raises(ConfigError, match=re.escape(
            f"--data: '{tmp_path / 'shards' / 'classes.json'}' labels its shards by other classes than "
            f"'{tmp_path / 'named' / 'config.json'}' (2 and 3 classes; class 0 is 'green' against 'red')")):
        evaluate_checkpoint(tmp_path / "named", shards, workers=0)
    edit(config, lambda hub: hub["model_args"].update(img_size=[32, 48]), original)
    refused(f"'{config}' has model_args.img_size 32x48: vitdist evaluates square images")
    edit(config, lambda hub: (hub["model_args"].pop("img_size"), hub["pretrained_cfg"].update(input_size=[3, 32, 48])),
         original)
    refused(f"'{config}' has pretrained_cfg.input_size 32x48: vitdist evaluates square images")
    edit(config, lambda hub: hub["pretrained_cfg"].pop("mean"), original)
    refused(f"'{config}' has no pretrained_cfg.mean, which evaluating its weights needs")
    edit(config, lambda hub: hub.update(architecture="vit_made_up"), original)
    refused(f"'{config}' names the architecture 'vit_made_up', which timm")
    config.unlink()
    refused(f"'{tmp_path / 'hub' / 'model.safetensors'}' does not say its architecture and has no config.json beside "
            "it: give --config")
    # A run's checkpoints/ whose first save has not completed: it was asked for --config.
    (tmp_path / "run" / "checkpoints" / "step_4.tmp").mkdir(parents=True)
    with pytest.raises(HandoffError, match=re.escape(f"'{tmp_path / 'run' / 'checkpoints'}' holds no checkpoint: ")):
        evaluate_checkpoint(tmp_path / "run" / "checkpoints", str(tmp_path / "some"), workers=0)

    # What vitdist's validation cannot do as the file asks is said, not done otherwise without a word.
    write_hub(tmp_path / "squash")
    config = tmp_path / "squash" / "config.json"
    edit(config, lambda hub: hub["pretrained_cfg"].update(crop_mode="squash", interpolation="bilinear"),
         config.read_text())
    assert hub_meta(config)["val_crop_frac"] == 0.5
    # A model made at another size than its pretrained_cfg's (timm.create_model(arch, img_size=...)),
    # exported by a timm that kept the source's input_size: timm takes model_args' img_size, the
    # weights' own; so does vitdist (it resampled the position embeddings to 224 px without a word).
    edit(config, lambda hub: hub["pretrained_cfg"].update(input_size=[3, 224, 224]), config.read_text())
    assert hub_meta(config)["timm_kwargs"]["img_size"] == 32
    assert f"'{config}' asks for a squash crop resized bilinear; vitdist center-crops" in caplog.text
    # timm's form of label_names for outputs some of which have no name.
    edit(config, lambda hub: hub.update(label_names={"0": "red", "2": "green"}), config.read_text())
    assert hub_meta(config)["classes"] == ["red", None, "green"]
    # vitdist's export of a model with more outputs than classes, through timm: the named classes, as
    # the export records them. Padded with None, they differed from the shards' classes.json in no
    # class that the refusal could name, and evaluation ended in a StopIteration traceback.
    edit(config, lambda hub: hub.update(label_names={"0": "red", "1": "green"}), config.read_text())
    assert hub_meta(config)["classes"] == ["red", "green"]


def test_a_stalled_read_stops_the_evaluation_at_its_timeout_naming_the_worker(tmp_path):
    """`--timeout-s`: a `pipe:` shard that never delivers (a FIFO nobody writes) stops `vitdist
    evaluate` after that many seconds with one line naming the loader worker (it waited 600 s, the
    loader's default, with no option to shorten it), and the stalled command ends with it."""
    from vitdist.export import write_safetensors
    from vitdist.model import model_meta

    cfg = load_config(TINY)
    write_safetensors(build_model(cfg.model).state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "w.safetensors")
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    with killing(f"cat {fifo}"):
        started = time.monotonic()
        stalled = cli_evaluate(tmp_path / "w.safetensors", f"pipe:cat {fifo}", "--workers", "1", "--timeout-s", "3")
        waited_s = time.monotonic() - started
        assert stalled.returncode == 1, stalled.stderr
        assert re.search(r"^vitdist evaluate: validation loader worker 0 \(pid \d+\) delivered nothing for 3 s ",
                         stalled.stderr, re.MULTILINE), stalled.stderr
        assert "Traceback" not in stalled.stderr
        # The look at the first samples (vitdist.shard_list.probe) gave up on the same read first, alike.
        assert "--data: the first shards gave no sample within 3 s: their samples are not checked" in stalled.stderr
        assert waited_s < 2 * 3 + 30  # the interpreter's start, timm's import and the model's build included
        assert still_running(f"cat {fifo}") == []
    refused = cli_evaluate(tmp_path / "w.safetensors", f"pipe:cat {fifo}", "--timeout-s", "0")
    assert refused.returncode == 2 and "--timeout-s: must be at least 1, got 0" in refused.stderr
    missing = cli_evaluate(tmp_path / "w.safetensors", str(tmp_path / "val-{0..1}.tar"))
    assert missing.returncode == 2 and "--data: 2 shard file(s) do not exist, first: " in missing.stderr, missing.stderr


def test_shards_of_which_no_sample_can_be_scored_are_an_error(tmp_path):
    """Shards whose every read fails (here `pipe:` commands that give no tar: a local file that is
    no tar is refused by the look at the first samples, which leaves a command's read errors to the
    loader) have every sample skipped. `vitdist evaluate` printed 'top-1 0.00% | top-5 0.00% | loss
    0.0000' (since, 'top-1 nan% | top-5 nan% | loss nan') and exited 0: a script took that for a result."""
    from vitdist.export import write_safetensors
    from vitdist.model import model_meta

    cfg = load_config(TINY)
    write_safetensors(build_model(cfg.model).state_dict(), model_meta(cfg.model, cfg.data), tmp_path / "w.safetensors")
    for i in range(2):
        (tmp_path / f"val-{i}.tar").write_bytes(os.urandom(4096))
    evaluation = cli_evaluate(tmp_path / "w.safetensors", f"pipe:cat {tmp_path}/val-{{0..1}}.tar")
    assert evaluation.returncode == 2, (evaluation.stdout, evaluation.stderr)
    assert "vitdist evaluate: no sample of --data could be scored: 2 bad samples skipped" in evaluation.stderr
    assert "loss" not in evaluation.stdout


def test_a_json_beside_a_state_dict_that_is_no_export_is_not_taken_for_one(tmp_path, demo_shards):
    """A timm state dict with a JSON of the same name beside it (its training log, notes) says
    nothing of the weights: `vitdist evaluate --config` evaluates it as the config says, and a
    fine-tune from it passes its check. Both stopped with a KeyError traceback ('arch', 'mean')."""
    import sys

    from conftest import ENV, REPO

    torch.manual_seed(0)
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "vit.pth")
    (tmp_path / "vit.json").write_text(json.dumps({"epoch": 3, "top1": 81.2}))
    evaluation = cli_evaluate(tmp_path / "vit.pth", demo_shards["val"], "--config", str(TINY))
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "top-1 " in evaluation.stdout
    check = subprocess.run([sys.executable, "launch/finetune.py", "--config", str(TINY), "--check",
                            f"finetune.init={tmp_path / 'vit.pth'}", f"data.train_shards={demo_shards['train']}",
                            "data.val_shards=null", f"run.dir={tmp_path / 'run'}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stderr[-3000:]
    assert "finetune.init's weights were trained on images normalised" not in check.stderr


def test_a_state_dict_that_is_not_the_configs_model_is_refused_naming_both_shapes(tmp_path, demo_shards):
    """`--config` of a model with other classes than the weights' head: the handoff, made for
    fine-tuning, left the head to be trained anew, and evaluation said the file had 'no weights for
    ['head.bias', 'head.weight']', though it has them, of another shape. Both shapes are named.
    Of another resolution or patch size: the handoff resampled the position and patch embeddings,
    and another model was scored without a word (13% for 20%)."""
    from conftest import DIGITS

    torch.manual_seed(0)
    state = build_model(load_config(TINY).model).state_dict()  # 8 classes; DIGITS' model has 10
    torch.save(state, tmp_path / "vit.pth")
    refused = cli_evaluate(tmp_path / "vit.pth", demo_shards["val"], "--config", str(DIGITS))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"vitdist evaluate: '{tmp_path / 'vit.pth'}' (torch state dict) does not fit the model that '{DIGITS}' "
            "describes (vit_tiny_patch16_224, 32 px, 10 classes): head.weight is (8, 128) there, (10, 128) in the "
            "model; head.bias is (8,) there, (10,) in the model; nothing to evaluate with") in refused.stderr, refused.stderr
    other_size = tmp_path / "tiny_48px.yaml"
    other_size.write_text(TINY.read_text().replace("img_size: 32", "img_size: 48").replace("patch_size: 8", "patch_size: 16"))
    refused = cli_evaluate(tmp_path / "vit.pth", demo_shards["val"], "--config", str(other_size))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("(vit_tiny_patch16_224, 48 px, 8 classes): pos_embed is (1, 17, 128) there, (1, 10, 128) in the model; "
            "patch_embed.proj.weight is (128, 3, 8, 8) there, (128, 3, 16, 16) in the model; nothing") in refused.stderr, \
        refused.stderr
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "encoder.pth")
    refused = cli_evaluate(tmp_path / "encoder.pth", demo_shards["val"], "--config", str(TINY))
    assert refused.returncode == 2 and "it has no head.weight; it has no head.bias; nothing" in refused.stderr, \
        refused.stderr


def test_every_option_of_the_commands_says_what_it_is_and_its_default():
    """`vitdist evaluate --help` listed --batch-size and --workers bare, without the meaning or the
    default that README gives them."""
    for command, documented in (("evaluate", ["--batch-size", "--workers", "--timeout-s"]),
                                ("make-shards", ["--prefix", "--samples-per-shard", "--max-shard-bytes", "--streams",
                                                 "--seed"])):
        run = vitdist_cli(command, "--help")
        assert run.returncode == 0, run.stderr
        options = " ".join(run.stdout.split("options:")[1].split())  # argparse wraps at the terminal's width
        for option in documented:
            described = re.search(rf"{option} [A-Z_]+ (.*?)(?= --|$)", options)
            assert described and "default: " in described.group(1), f"{command} {option}: {options}"
