"""Validation during training: the best weights are kept by val/top1, and of equal ones by val/loss."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, shard_overrides
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader
from vitdist.distributed import DistContext
from vitdist.model import build_model
from vitdist.shard_list import expand_urls
from vitdist.distributed import compute_precision
from vitdist.model import model_meta
from vitdist.validation import best_to_beat, evaluate_and_keep_best


def test_of_weights_with_equal_top1_those_with_the_lower_loss_are_kept(process_group, demo_shards, tmp_path):
    """A temperature on the head (its weights and bias times a power of two: exact in floating
    point) keeps every prediction, so val/top1 ties, and changes val/loss. Evaluated at steps 1-3
    with temperatures 1, 1/2, 2, the weights kept are those of the lowest loss, whichever step
    that is; the file records their scores, and a resume reads them back as the ones to beat."""
    cfg = load_config(TINY, [*shard_overrides(demo_shards), "data.num_workers=0"])
    ctx = DistContext(0, 1, torch.device("cpu"))
    model = build_model(cfg.model)
    head = {name: p.detach().clone() for name, p in model.head.named_parameters()}
    loader = EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, 0, 1)
    best, best_file, evaluated = None, tmp_path / "best.safetensors", {}
    for step, scale in ((1, 1.0), (2, 0.5), (3, 2.0)):
        with torch.no_grad():
            for name, p in model.head.named_parameters():
                p.copy_(head[name] * scale)
        scalars, best = evaluate_and_keep_best(model, loader, cfg, ctx, compute_precision(cfg, ctx.device), step, best,
                                               best_file, model_meta(cfg.model, cfg.data))
        evaluated[step] = (scalars["val/top1"], scalars["val/loss"])
    assert len({top1 for top1, _ in evaluated.values()}) == 1, evaluated  # the same predictions
    assert len({loss for _, loss in evaluated.values()}) == 3, evaluated
    lowest = min(evaluated, key=lambda step: evaluated[step][1])
    assert best == {"val_top1": evaluated[lowest][0], "val_loss": evaluated[lowest][1]}
    assert best_to_beat(best_file, None, tmp_path / "checkpoints" / "step_3", ctx) == pytest.approx(best)
    scale = {1: 1.0, 2: 0.5, 3: 2.0}[lowest]
    assert torch.equal(load_file(best_file)["head.weight"], head["weight"] * scale)


def test_an_evaluation_of_no_usable_sample_logs_no_figures_and_keeps_the_best(process_group, demo_shards, tmp_path):
    """Validation shards gone since the start (a purged scratch directory, an expired credential of a
    `pipe:` command) give every rank read errors only: the figures were 0, a val/loss of 0 in
    TensorBoard, and weights that had scored nothing better (val/top1 0, as a new model on many
    classes) were replaced by these, 'val_loss 0' recorded. Now there are no figures, and no best."""
    val = tmp_path / "val"
    val.mkdir()
    copies = [shutil.copy(url, val) for url in expand_urls(demo_shards["val"])]
    cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", f"data.val_shards={json.dumps(copies)}",
                             "data.num_workers=0"])
    ctx = DistContext(0, 1, torch.device("cpu"))
    loader = EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, 0, 1)
    shutil.rmtree(val)
    before, best_file = {"val_top1": 0.0, "val_loss": 9.0}, tmp_path / "best.safetensors"
    scalars, best = evaluate_and_keep_best(build_model(cfg.model), loader, cfg, ctx, compute_precision(cfg, ctx.device),
                                           1, before, best_file, model_meta(cfg.model, cfg.data))
    assert all(math.isnan(scalars[tag]) for tag in ("val/loss", "val/top1", "val/top5")), scalars
    assert scalars["val/skipped"] == len(copies)  # a read error for each shard
    assert best == before and not best_file.exists()
