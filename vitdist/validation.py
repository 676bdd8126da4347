"""Validation during training: loss, top-1 and top-5 over the validation set, and the best
weights by val/top1 (of equal ones, by the lower val/loss) kept beside the checkpoints: the
run's weights or, where it keeps one, their average, whichever scores better."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from . import distributed
from .checkpoint import free_bytes, gib, save_failed
from .config import Config
from .data import Normalize
from .ema import WeightAverage
from .export import header, recorded_best, write_safetensors
from .files import write_json
from .transforms import stack_images

log = logging.getLogger(__name__)


def better(scores: dict, best: dict | None) -> bool:
    """A higher val_top1, or the same with a lower val_loss: top-1 moves in steps of one sample,
    and on a small validation set many evaluations tie (all at 100%, at worst). Any scores beat
    none (None), and a val_loss beats none recorded (weights kept before vitdist recorded it)."""
    if best is None:
        return True
    return (scores["val_top1"], -scores["val_loss"]) > (best["val_top1"], -best.get("val_loss", math.inf))


def best_to_beat(best_file: Path, checkpoint_best: dict | None, resume_from: Path | None,
                 ctx: distributed.DistContext) -> dict | None:
    """The scores ({val_top1, val_loss}) that new best weights must beat (None: any). A run that
    resumes a checkpoint of its run.dir's own: those of the best weights there, where a killed run
    may have written better ones after the checkpoint resumed from, which a resume that is not
    bitwise (another world size, a changed config) may not reach again; the checkpoint's own
    figures serve for a file that records none. A run that starts afresh (killed before its first
    checkpoint, its checkpoints moved away, or a warm start from another run's) competes with
    none, as TensorBoard hides the earlier run's curves: rank 0 moves that run's best weights aside,
    which a worse run would never replace, leaving them under its name."""
    this_run = resume_from is not None and resume_from.parent.resolve() == (best_file.parent / "checkpoints").resolve()
    if not this_run:
        if ctx.is_main and best_file.is_file():
            _set_aside(best_file)
        return None
    if (recorded := recorded_best(best_file)) is not None:
        return recorded
    return checkpoint_best if best_file.is_file() else None


def _set_aside(best_file: Path) -> None:
    """best.safetensors and its JSON renamed best.earlier-<n>.*, n the first not taken: kept, as an
    earlier run's checkpoints and curves are."""
    n = 1
    while (aside := best_file.with_name(f"{best_file.stem}.earlier-{n}{best_file.suffix}")).exists():
        n += 1
    recorded = header(best_file)
    log.warning("'%s' holds the best weights of an earlier run (step %s, val/top1 %s), and this run starts afresh: "
                "they are not the ones to beat, and are moved to '%s'", best_file, recorded.get("step", "?"),
                recorded.get("val_top1", "?"), aside)
    if best_file.with_suffix(".json").is_file():
        best_file.with_suffix(".json").replace(aside.with_suffix(".json"))
    best_file.replace(aside)


def evaluate_and_keep_best(model: torch.nn.Module, val_loader, cfg: Config, ctx: distributed.DistContext, compute,
                           step: int, best: dict | None, best_file: Path, meta: dict,
                           average: WeightAverage | None = None,
                           stop: Callable[[], bool] = lambda: False) -> tuple[dict | None, dict | None]:
    """Validate the weights, and the average of them where the run keeps one (val_ema/); the
    better of the two, if `better` than `best`, goes to `best_file` (its JSON says which: "ema").
    Returns the scalars and the scores that later weights must beat; the scalars are None where
    `stop` interrupted it (see `evaluate`), and nothing was kept."""
    scalars = evaluate(model, val_loader, cfg, ctx, compute, stop)
    if scalars is None:
        return None, best
    scores, from_average = _scores(scalars), False
    if average is not None:
        with average.swapped_in():
            averaged = evaluate(model, val_loader, cfg, ctx, compute, stop)
        if averaged is None:
            return None, best
        scalars.update({key.replace("val/", "val_ema/"): value for key, value in averaged.items() if key != "val/skipped"})
        if not math.isnan(averaged["val/top1"]) and (math.isnan(scores["val_top1"]) or better(_scores(averaged), scores)):
            scores, from_average = _scores(averaged), True
    if math.isnan(scores["val_top1"]):  # no sample to judge these weights by: they compete with none
        if ctx.is_main:
            log.warning("step %d: none of the validation samples could be used (%d skipped; see the warnings that name "
                        "them): val/loss, val/top1 and val/top5 are NaN, and these weights are not kept as the best",
                        step, scalars["val/skipped"])
    elif better(scores, best):
        with average.swapped_in() if from_average else contextlib.nullcontext():
            kept = save_weights(model, {**meta, "step": step, **scores, "ema": from_average}, best_file, ctx,
                                cfg.ckpt.on_error)
        best = scores if kept else best
    return scalars, best


def _scores(scalars: dict) -> dict:
    return {"val_top1": scalars["val/top1"], "val_loss": scalars["val/loss"]}


# In the TensorBoard directory, whose val/ events it vouches for: the checkpoint and step whose
# owed validation a resumed run has logged. A run that resumes there again (the first resumed run
# killed before its next checkpoint) logs none again, which TensorBoard would show twice.
OWED_DONE = "owed_validation.json"


def owed_validation_logged(tb_dir: Path, checkpoint: Path, step: int, ctx: distributed.DistContext) -> bool:
    """Whether a run resumed from `checkpoint` has validated its `step` and logged it (rank 0 reads
    the record, every rank takes its answer)."""
    answer = [False]
    if ctx.is_main:
        with contextlib.suppress(OSError, ValueError):
            answer = [json.loads((tb_dir / OWED_DONE).read_text()) == _owed(checkpoint, step)]
    dist.broadcast_object_list(answer, src=0, group=ctx.control)
    return answer[0]


def record_owed_validation(tb_dir: Path, checkpoint: Path, step: int, ctx: distributed.DistContext) -> None:
    if ctx.is_main:  # once its events are flushed (MetricLogger.log); whole, or a resume would log that step again
        write_json(tb_dir / OWED_DONE, _owed(checkpoint, step))


def _owed(checkpoint: Path, step: int) -> dict:
    return {"checkpoint": str(checkpoint.resolve()), "step": step}


def save_weights(model: torch.nn.Module, meta: dict, out: Path, ctx: distributed.DistContext,
                 on_error: str = "stop") -> bool:
    """The whole model (gathered from the shards under FSDP) as one timm-loadable file, by rank 0.
    A write that fails (a full disk) stops every rank together (SaveFailed), as a checkpoint's
    does, or under ckpt.on_error=continue is logged and returns False: `out` keeps what it held.
    It had raised on rank 0 alone, and the other ranks failed on the lost process group."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # safetensors' own error for a failed write is not an OSError
    error = distributed.on_rank_zero(lambda: write_safetensors(weights, meta, out), ctx.control,
                                     expected=(OSError, SafetensorError))
    if error is None:
        return True
    message = (f"the best weights so far (step {meta['step']}) could not be written to '{out}' "
               f"({gib(free_bytes(out))} free there): {error}; '{out}' keeps what it held")
    save_failed(message, on_error)
    return False


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: Config, ctx: distributed.DistContext, compute,
             stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Loss, top-1 and top-5 over the whole validation set, every sample counted once over all ranks
    (NaN where no sample could be used); None once `stop()` (a preemption signal) is true on any
    rank, every rank leaving at the same batch: a long validation would outlast the grace period
    before the job is killed.
    Ranks run the same number of forward passes (under FSDP each one gathers parameters from
    all ranks): a rank whose share has run out runs an empty batch. A rank whose read fails (a dead
    or stalled loader worker) raises; the others, waiting for it in a collective, time out after
    dist.timeout_s and exit naming it, as for a failed training read."""
    model.eval()
    normalize = Normalize(cfg.data, ctx.device)
    totals = torch.zeros(5, device=ctx.device)  # loss sum, top-1 correct, top-5 correct, count, skipped
    k = min(5, cfg.model.num_classes)
    empty = {"image": stack_images([], cfg.model.img_size),
             "label": torch.zeros(0, dtype=torch.long), "skipped": 0}
    with contextlib.closing(iter(loader)) as batches:
        while True:
            batch = next(batches, None)
            more, stopped = distributed.any_rank([batch is not None, stop()], ctx)
            if stopped or not more:
                break
            batch = batch or empty
            images = normalize(batch["image"].to(ctx.device, non_blocking=True))
            labels = batch["label"].to(ctx.device, non_blocking=True)
            with compute:
                logits = model(images).float()
            top = logits.topk(k, dim=-1).indices == labels[:, None]
            totals[:3] += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), top[:, 0].sum().float(),
                                       top.any(-1).sum().float()])
            totals[3] += len(labels)  # numbers added on the device: no copy from the host, no wait
            totals[4] += batch["skipped"]
    model.train()
    if stopped:
        return None
    totals = distributed.all_reduce_sum(totals)
    # No usable sample (the shards gone since the start, all bad): no figure, rather than a loss of 0.
    count = totals[3].item() or math.nan
    return {"val/loss": totals[0].item() / count, "val/top1": totals[1].item() / count,
            "val/top5": totals[2].item() / count, "val/skipped": totals[4].item()}
