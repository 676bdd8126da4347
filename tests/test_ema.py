"""The average of the weights (train.ema_decay): timm's law, swapped in and out whole, validated
beside the weights, kept by checkpoints, exported, and refused where there is none."""

import copy
import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from conftest import TINY, read_scalars, read_texts, run_pretrain, shard_overrides, vitdist_cli
from vitdist import distributed
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.distributed import prepare_model
from vitdist.ema import WeightAverage
from vitdist.export import export
from vitdist.metrics import _CONSOLE
from vitdist.model import build_model


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_is_timms_model_ema(warmup):
    model = _small_model()
    ours, timms = WeightAverage(model, 0.9, warmup), ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 31):
        model(torch.randn(32, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(step)
        timms.update(model, step=step if warmup else None)  # without a step, timm's decay is constant
    for name, value in timms.module.state_dict().items():
        torch.testing.assert_close(ours.average[name], value, rtol=0, atol=1e-6)
        assert not torch.allclose(ours.average[name], model.state_dict()[name])  # an average, not the weights


def test_the_average_follows_parameters_given_new_storage_before_the_first_update():
    """FSDP's lazy init, at the first forward after the average is made, gave a parameter that the
    ranks do not divide evenly new storage (torch before pytorch#163130): the average must follow
    the parameter as it is at the updates, not as it was when made."""
    model = _small_model()
    average = WeightAverage(model, 0.5, warmup=False)
    before = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data.clone() + 1  # new storage, new values
    average.update(1)
    torch.testing.assert_close(average.average["2.weight"], before + 0.5)


def test_frozen_parameters_are_their_own_average_and_not_copied():
    model = _small_model()
    model[0].requires_grad_(False)
    assert set(WeightAverage(model, 0.9, warmup=False).average) == {"1.weight", "1.bias", "2.weight", "2.bias"}


def test_the_average_is_swapped_in_and_the_weights_come_back_whole():
    model = _small_model()
    average = WeightAverage(model, 0.9, warmup=False)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2)
    own = {name: value.clone() for name, value in model.state_dict().items()}
    averaged = {name: value.clone() for name, value in average.average.items()}
    x = torch.randn(4, 8)
    with pytest.raises(KeyboardInterrupt):
        with average.swapped_in():
            assert all(torch.equal(averaged[name], value) for name, value in model.state_dict().items())
            assert not torch.equal(model(x), torch.func.functional_call(model, own, (x,)))
            raise KeyboardInterrupt  # the weights come back also when validation is interrupted
    assert all(torch.equal(own[name], value) for name, value in model.state_dict().items())
    assert all(torch.equal(averaged[name], value) for name, value in average.average.items())
    assert all(param.requires_grad for param in model.parameters())


def test_a_warmup_without_an_average_and_a_decay_of_1_are_refused():
    with pytest.raises(ConfigError, match="train.ema_warmup=true warms up an average of the weights that "
                                          "train.ema_decay=0 does not keep"):
        load_config(None, ["data.train_shards=a.tar", "train.ema_warmup=true"])
    with pytest.raises(ConfigError, match="'train.ema_decay' must be >= 0 and < 1, got 1"):
        load_config(None, ["data.train_shards=a.tar", "train.ema_decay=1"])


@pytest.mark.slow
def test_a_run_validates_its_average_keeps_the_better_as_best_and_exports_it(demo_shards, tmp_path):
    """A run without an average, resumed with one (it starts from the resumed weights, with a
    warning); val_ema/ logged beside val/; best.safetensors holds whichever scored better, and says
    which; `export --ema` and `evaluate --ema` read the average that was validated, and
    `finetune.init_ema` starts from it."""
    run_dir = tmp_path / "run"
    common = [*shard_overrides(demo_shards), f"run.dir={run_dir}", "ckpt.every_steps=4", "ckpt.keep=0", "train.eval_every_steps=2",
              "data.micro_batch_size=32", "train.global_batch_size=64", "optim.warmup_steps=2"]
    first = run_pretrain(1, [*common, "train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    refused = vitdist_cli("export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "e.safetensors"),
                          "--ema")
    assert refused.returncode == 2 and "holds no average of the weights" in refused.stderr, refused.stderr
    assert not (tmp_path / "e.safetensors").exists()

    resumed = run_pretrain(1, [*common, "train.steps=12", "train.ema_decay=0.6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "holds no average of the weights (its run had train.ema_decay=0): the average starts from" in resumed.stderr
    scalars = read_scalars(run_dir / "tb")
    assert [step for step, _ in scalars["val_ema/top1"]] == [6, 8, 10, 12]
    # The console prints what TensorBoard holds, the skips by kind aside (val_ema/top5 was left out).
    shown = {tag for tag in scalars if not tag.startswith("data/skipped_")}
    assert shown <= _CONSOLE.keys(), shown - _CONSOLE.keys()
    assert all(f"| {_CONSOLE[tag][0]} " in resumed.stdout for tag in shown)
    # Each start's config in the text tab, at its first step: the resume's changed keys there.
    configs = read_texts(run_dir / "tb")["config"]
    assert [step for step, _ in configs] == [1, 5] and all(text.startswith("```yaml\nmodel:\n") for _, text in configs)
    assert ["ema_decay: 0.6" in text and "steps: 12" in text for _, text in configs] == [False, True]
    best = json.loads((run_dir / "best.json").read_text())
    at_best = {tag: dict(scalars[tag])[best["step"]] for tag in ("val/top1", "val_ema/top1")}
    assert best["val_top1"] == pytest.approx(max(at_best.values()))
    assert best["ema"] == (at_best["val_ema/top1"] > at_best["val/top1"])

    exported = vitdist_cli("export", "--checkpoint", str(run_dir / "checkpoints"), "--out",
                           str(tmp_path / "e.safetensors"), "--ema")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "e.json").read_text())["ema"] is True
    assert vitdist_cli("export", "--checkpoint", str(run_dir / "checkpoints"), "--out",
                       str(tmp_path / "w.safetensors")).returncode == 0
    averaged, weights = load_file(tmp_path / "e.safetensors"), load_file(tmp_path / "w.safetensors")
    assert averaged.keys() == weights.keys() and not any(torch.equal(averaged[k], weights[k]) for k in averaged)
    # The export, and the checkpoint's average evaluated in place, are the average validated at the end.
    for checkpoint, flags in ((tmp_path / "e.safetensors", ()), (run_dir / "checkpoints", ("--ema",))):
        evaluation = vitdist_cli("evaluate", "--checkpoint", str(checkpoint), "--data", demo_shards["val"], *flags)
        assert evaluation.returncode == 0, evaluation.stderr
        top1 = float(re.search(r"top-1 ([\d.]+)%", evaluation.stdout).group(1)) / 100
        assert top1 == pytest.approx(dict(scalars["val_ema/top1"])[12], abs=1e-4)
    refused = vitdist_cli("evaluate", "--checkpoint", str(tmp_path / "e.safetensors"), "--data", demo_shards["val"], "--ema")
    assert refused.returncode == 2 and "is no vitdist checkpoint directory" in refused.stderr, refused.stderr

    # Fine-tuning from the average: refused before any process starts where the checkpoint has none.
    finetune = [*shard_overrides(demo_shards), "train.steps=1", "finetune.init_ema=true", "train.eval_every_steps=0"]
    refused = run_pretrain(0, [*finetune, f"finetune.init={run_dir / 'checkpoints' / 'step_4'}",
                               f"run.dir={tmp_path / 'refused'}"], launcher="finetune")
    assert refused.returncode == 2 and "holds no average of the weights" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "refused" / "tb").exists()
    tuned = run_pretrain(0, [*finetune, f"finetune.init={run_dir / 'checkpoints'}", f"run.dir={tmp_path / 'tuned'}",
                             "optim.lr=0", "optim.min_lr=0"], launcher="finetune")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "(vitdist checkpoint, the average of its weights)" in tuned.stderr
    # At lr 0 (and no weight decay step), the fine-tune's weights are the average it started from.
    tuned_weights = load_file(export(tmp_path / "tuned" / "checkpoints", tmp_path / "t.safetensors"))
    assert all(torch.equal(tuned_weights[k], averaged[k]) for k in averaged)

    # A linear probe averages its head alone: the frozen backbone is its own average.
    probe = run_pretrain(0, [*finetune, f"finetune.init={run_dir / 'checkpoints'}", f"run.dir={tmp_path / 'probe'}",
                             "finetune.init_ema=false", "finetune.freeze=backbone", "train.steps=3",
                             "train.ema_decay=0.5"], launcher="finetune")
    assert probe.returncode == 0, probe.stderr[-3000:]
    probe_average = load_file(export(tmp_path / "probe" / "checkpoints", tmp_path / "p.safetensors", average=True))
    assert all(torch.equal(probe_average[k], weights[k]) for k in weights if not k.startswith("head."))
    assert not torch.equal(probe_average["head.weight"], weights["head.weight"])


def _fsdp_swap(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2)
    try:
        ctx = distributed.DistContext(rank, 2, torch.device("cpu"), control=dist.new_group(backend="gloo"))
        cfg = load_config(TINY, ["dist.strategy=fsdp", "dist.fsdp_reshard_after_forward=false", "model.depth=2"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        averaged = copy.deepcopy(model)
        with torch.no_grad():
            for param in averaged.parameters():
                param.mul_(0.5)
        weights = copy.deepcopy(model)
        sharded = prepare_model(model, cfg, ctx)
        average = WeightAverage(model, 0.9, warmup=False)
        with torch.no_grad():
            for param in average.average.values():
                param.mul_(0.5)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            sharded.eval()
            sharded(x)  # validating the weights: FSDP keeps what it gathered for them
            with average.swapped_in():
                during = sharded(x)
            after = sharded(x)
        diff = {"during": (during - averaged.eval()(x)).abs().max().item(),
                "after": (after - weights.eval()(x)).abs().max().item()}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(diff))
    finally:
        dist.destroy_process_group()


def test_fsdp_computes_with_the_average_swapped_in_also_when_it_keeps_gathered_parameters(tmp_path):
    """dist.fsdp_reshard_after_forward=false: FSDP keeps the parameters gathered for a forward, and
    computed with the weights under swapped_in (val_ema/ was val/, exactly); resharded before the
    swap only, it would compute with the average after it (the next training step's forward, where
    no state dict was taken between). Two real gloo processes."""
    mp.spawn(_fsdp_swap, args=(tmp_path,), nprocs=2)
    for rank in range(2):
        diff = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert diff["during"] < 1e-5 and diff["after"] < 1e-5, (rank, diff)
