"""The training loop, for pretraining and fine-tuning: model, optimizer, data and objective in;
checkpoints and curves out."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from . import checkpoint, checkpoint_read, distributed, imagefolder, resume
from .augment import random_erase
from .checkpoint import Checkpointer, SaveFailed
from .config import Config, ConfigError, to_dict
from .config_check import batch_layout
from .config_yaml import config_text, save_config
from .data import EvalLoader, Normalize, TrainLoader
from .ema import WeightAverage
from .export import header, recorded_best
from .handoff import HandoffError, load_located, locate
from .metrics import MetricLogger, matmul_peak_flops
from .model import build_model, is_classifier, model_meta, train_flops_per_image
from .objective import Classification
from .optim import BadSteps, NonFiniteTraining, build_optimizer, step_unless_bad
from .prefetch import DeviceBatches
from .preemption import PREEMPTED_EXIT_CODE, Preemption
from .samples import SKIP_KINDS, TooManyBadSamples, check_skipped
from .schedule import lr_at
from .shard_list import expand_urls
from .train_state import TrainState
from .tracing import StepProfiler
from .validation import best_to_beat, evaluate_and_keep_best, owed_validation_logged, record_owed_validation

log = logging.getLogger(__name__)
# What locating a checkpoint raises: rank 0's, raised on every rank (distributed.from_rank_zero).
_LOCATING = (OSError, ConfigError, HandoffError)


@dataclass
class Window:
    """What happened since the last log line, summed on this rank."""
    loss: torch.Tensor | float = 0.0  # over the steps that were not skipped
    grad_norm: torch.Tensor | float = 0.0  # likewise
    bad_steps: torch.Tensor | float = 0.0  # skipped for a NaN/Inf loss or gradient norm
    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    skipped: Counter = field(default_factory=Counter)  # kind -> samples
    start: float = 0.0

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor, images: int) -> None:
        self.loss += torch.where(bad > 0, 0.0, loss)
        self.grad_norm += torch.where(bad > 0, 0.0, grad_norm)
        self.bad_steps += bad
        self.steps += 1
        self.images += images


def seed_step(seed: int, rank: int, step: int) -> None:
    """Random draws on the device (drop path, mixup, random erasing) depend on (seed, rank, step) only, so a run
    resumed on the same ranks and micro-batch size draws what the uninterrupted one would have (on others, each
    rank's draws fall on other samples)."""
    torch.manual_seed(hash((seed, rank, step)) % 2**63)
    np.random.seed([seed, rank, step])


def train(cfg: Config) -> Path:
    """Run (or resume) pretraining, or fine-tuning from `finetune.init`, under torchrun or as one
    process. Returns the last checkpoint; exits with PREEMPTED_EXIT_CODE after checkpointing on
    SIGTERM/SIGUSR1."""
    ctx = distributed.init(cfg.dist)
    # After the process group has started: a rank waits for its peers there in torch's C++, where
    # a Python handler does not run, and torchrun's SIGTERM (a peer died first) went unheeded until
    # its SIGKILL, 30 s later, or VITDIST_SHUTDOWN_S. Before an ImageFolder conversion, which can take long.
    preemption = Preemption()
    try:
        return _train(cfg, ctx, preemption)
    except Exception as error:
        if distributed.is_collective_failure(error):
            log.error(distributed.lost_contact(ctx, error))
        raise
    finally:
        distributed.close()


def _train(cfg: Config, ctx: distributed.DistContext, preemption: Preemption) -> Path:
    accum_steps = batch_layout(cfg, ctx.world_size)
    run_dir = Path(cfg.run.dir)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    conversions, from_folder = imagefolder.conversion_dir(run_dir), imagefolder.is_image_folder(cfg.data.train_shards)
    cfg = replace(cfg, data=imagefolder.to_shards(cfg.data, cfg.model.num_classes, conversions, ctx.is_main,
                                                  ctx.control))

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    # Rank 0's choice on every rank: the newest checkpoint of a run still saving (train.resume or
    # finetune.init naming its checkpoints/) may be another step by the time each rank looks, and
    # FSDP keeps each rank's shard of what it loaded.
    resume_from = distributed.from_rank_zero(lambda: checkpoint.resume_path(cfg.train.resume, run_dir / "checkpoints"),
                                             ctx.control, expected=_LOCATING)
    if checkpoint.passed_over(cfg.train.resume, resume_from):
        log.warning("train.resume='%s', but this run has checkpointed since: resuming from %s (move its newer "
                    "checkpoints away to go back)", cfg.train.resume, resume_from)
    for partial in checkpoint.unfinished_saves(run_dir / "checkpoints") if ctx.is_main else []:
        log.warning("not resuming from %s: a save that did not finish (the run was killed or the save failed), "
                    "deleted once a checkpoint of a later step is complete", partial)
    if resume_from is None and cfg.finetune.init:
        init = distributed.from_rank_zero(lambda: locate(cfg.finetune.init), ctx.control, expected=_LOCATING)
        kind, fresh = load_located(model, init, cfg.finetune.new_head, cfg.finetune.init_ema)
        log.info("initialised from %s (%s); freshly initialised: %s", init, kind, fresh or "nothing")
    if cfg.finetune.freeze == "backbone":
        for name, param in model.named_parameters():
            param.requires_grad_(is_classifier(model, name))
    dp_model = distributed.prepare_model(model, cfg, ctx)
    optimizer = build_optimizer(model, cfg.optim, cfg.finetune.layer_decay)
    objective = Classification(cfg.train, cfg.model.num_classes)
    meta = model_meta(cfg.model, cfg.data)
    train_urls = expand_urls(cfg.data.train_shards)  # ImageFolders are converted by now, classes.json beside
    if classes := imagefolder.shard_classes(train_urls, cfg.model.num_classes):
        meta["classes"] = classes  # what `vitdist evaluate` labels an ImageFolder's sub-folders by
    converted = imagefolder.converted_recipe(conversions / "train") if from_folder else None
    data_order = resume.data_order(cfg, train_urls, converted)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.ckpt, meta, cfg.dist.timeout_s)

    state = TrainState()
    if resume_from is not None:
        saved = checkpoint_read.load(resume_from, model, optimizer)
        state = TrainState.restored(saved, cfg.train.global_batch_size)
        log.info("resumed from %s at step %d", resume_from, state.step)
        if ctx.is_main and (changes := resume.changes(cfg, saved)):
            log.warning("resuming with a config changed since %s, so this run differs from the one it continues: %s",
                        resume_from, "; ".join(changes))
        if ctx.is_main and (added := resume.added_keys(cfg, saved)):
            log.warning("config keys that the vitdist which wrote %s did not have, at their values now (where one is not "
                        "what that vitdist did, the run trains otherwise from here): %s", resume_from, ", ".join(added))

    average = WeightAverage(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    averaged = average is None or resume_from is None or checkpoint_read.load_average(resume_from, average)
    if not averaged and ctx.is_main:
        log.warning("%s holds no average of the weights (its run had train.ema_decay=0): the average starts from the "
                    "weights resumed", resume_from)

    best_file = run_dir / "best.safetensors"
    state.best = best_to_beat(best_file, state.best, resume_from, ctx)
    pin = ctx.device.type == "cuda"
    loader = TrainLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, cfg.train.global_batch_size,
                         ctx.rank, ctx.world_size, state.data_positions, pin_memory=pin, timeout_s=cfg.dist.timeout_s)
    val_loader = (EvalLoader(cfg.data, cfg.model.img_size, cfg.model.num_classes, ctx.rank, ctx.world_size, pin,
                             cfg.dist.timeout_s) if cfg.data.val_shards else None)
    # TensorBoard drops what a killed run logged after the checkpoint resumed from (after step 0 for a
    # run killed before its first checkpoint, and started again): no step twice.
    logger = MetricLogger(run_dir / "tb", cfg.train.steps, ctx.is_main, purge_step=state.step + 1)
    nothing_to_train = resume_from is not None and state.step == cfg.train.steps
    if not nothing_to_train:
        # Beside the curves, to tell runs (and a resume's changed keys) apart there. At the first step
        # trained, which a start again from the same checkpoint purges, so that it is there once.
        logger.text(state.step + 1, "config", f"```yaml\n{config_text(cfg)}```")
    compute = distributed.compute_precision(cfg, ctx.device)
    peak = cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops else matmul_peak_flops(ctx.device, distributed.DTYPES[cfg.train.precision])
    flops_per_image = train_flops_per_image(model)
    if ctx.is_main:
        print(_banner(cfg, ctx, model, accum_steps, state.step, peak), flush=True)
        if nothing_to_train:
            log.warning("%s is at train.steps=%d already: nothing to train, the run ends there (give a larger "
                        "train.steps to train on)", resume_from, state.step)

    # Else that step would be missing from val/ and never be the best: one the preempted run owes, or
    # the end of this run, where the one that checkpointed there did not validate (a shorter train.steps).
    owed = state.eval_owed or (nothing_to_train and not state.validated)
    if owed and val_loader is not None:
        if owed_validation_logged(run_dir / "tb", resume_from, state.step, ctx):
            log.info("step %d: validated and logged by a run resumed from here before: not again", state.step)
        else:
            why = "first, as the preempted run" if state.eval_owed else "it, the end of this run, as the run"
            log.info("step %d: validating %s that checkpointed there did not", state.step, why)
            scalars, state.best = evaluate_and_keep_best(model, val_loader, cfg, ctx, compute, state.step, state.best,
                                                         best_file, meta, average, stop=preemption.signalled)
            if scalars is None:
                _exit_preempted(logger, f"while validating step {state.step}", f"{resume_from} still owes it")
            logger.log(state.step, scalars)
            record_owed_validation(run_dir / "tb", resume_from, state.step, ctx)

    bad_steps = BadSteps(ctx.device)
    normalize = Normalize(cfg.data, ctx.device)
    with (DeviceBatches(iter(loader), ctx.device) as batches,
          StepProfiler(cfg.log.profile_steps, run_dir / "profile", ctx.rank, settle=preemption.settle) as profiler):
        window = Window(start=time.perf_counter())
        while state.step < cfg.train.steps:
            profiler.step_starts(state.step + 1)
            wait_start = time.perf_counter()
            batch = next(batches)
            window.data_wait_s += time.perf_counter() - wait_start
            window.skipped.update(batch["skipped"])

            seed_step(cfg.train.seed, ctx.rank, state.step)
            lr = lr_at(state.step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps,
                       total_steps=cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            images = normalize(batch["image"])
            if cfg.data.random_erase:
                images = random_erase(images, cfg.data.random_erase)
            loss, grad_norm, bad = train_step(dp_model, model, optimizer, objective, images, batch["label"], cfg,
                                              compute)
            state.step += 1
            if average is not None:
                average.update(state.step)
            state.trained_samples += cfg.train.global_batch_size // cfg.data.aug_repeats  # samples read, not copies
            bad_steps.record(bad)
            window.add_step(loss, grad_norm, bad, cfg.train.global_batch_size)
            step = state.step

            preempted = preemption.requested(ctx) and step < cfg.train.steps  # the last step ends the run anyway
            at_ckpt_step = preempted or step == cfg.train.steps or (
                cfg.ckpt.every_steps > 0 and step % cfg.ckpt.every_steps == 0)
            eval_due = val_loader is not None and (step == cfg.train.steps or (
                cfg.train.eval_every_steps > 0 and step % cfg.train.eval_every_steps == 0))
            at_eval_step = eval_due and not preempted  # a preempted run leaves it to the resumed one (eval_owed)
            # A checkpoint holds the counts so far; a new window starts after an evaluation or a checkpoint,
            # so that their time stays out of perf/.
            # And at step 1: a run's loss at once, and its start-up (compilation, the loader's first
            # batches) in a window of its own, out of the next line's perf/ figures. Not at a resume's
            # first step, whose curves then match an uninterrupted run's, windows and all.
            at_log_step = step % cfg.log.every_steps == 0 or step == 1 or at_ckpt_step or at_eval_step
            scalars = _close_window(window, lr, state, flops_per_image / peak, ctx) if at_log_step else {}
            validated = False
            if at_eval_step:
                try:
                    val_scalars, state.best = evaluate_and_keep_best(model, val_loader, cfg, ctx, compute, step,
                                                                     state.best, best_file, meta, average,
                                                                     stop=preemption.signalled)
                except SaveFailed:  # best.safetensors could not be written: every rank stops here together
                    checkpointer.wait()
                    raise
                if val_scalars is None:  # a preemption signal came during it: this step's checkpoint owes it
                    preempted = at_ckpt_step = True
                    log.warning("step %d: validation interrupted by the preemption signal", step)
                else:
                    scalars.update(val_scalars)
                    validated = True
            if scalars:
                logger.log(step, scalars)
            if at_log_step:
                checkpointer.finish_if_written(ctx.control)
                try:
                    check_skipped(state.skipped, step, state.trained_samples, cfg.data)
                    bad_steps.check(cfg.train.max_bad_steps, step)
                except (TooManyBadSamples, NonFiniteTraining) as error:
                    checkpointer.wait()  # every rank stops here together, so they can finish the save in flight
                    raise type(error)(f"{error}. The newest complete checkpoint: {checkpointer.newest() or 'none yet'}") from None
            if at_ckpt_step:
                last = step == cfg.train.steps
                if (ongoing := bad_steps.ongoing()) and not last:  # these weights may be what made those steps fail
                    log.warning("step %d: no checkpoint, the last %d step(s) had a NaN/Inf loss or gradient norm",
                                step, ongoing)
                else:
                    if ongoing:  # fewer than train.max_bad_steps, tolerated: the run's end must have its checkpoint
                        log.warning("step %d, the last: its checkpoint holds the weights as they were after step %d, "
                                    "the last %d step(s) having had a NaN/Inf loss or gradient norm (skipped, no "
                                    "update)", step, step - ongoing, ongoing)
                    state.data_positions = distributed.merge_across_ranks(batch["positions"], ctx)
                    state.eval_owed, state.validated = eval_due and preempted, validated
                    checkpointer.save(step, model, optimizer, state.saved(data_order=data_order,
                                      decoded_on=resume.decoded_on(cfg), config=to_dict(cfg)), final=preempted or last,
                                      average=average)
            if preempted:
                checkpointer.wait(final=True)  # this step's save, or an earlier one if bad steps skipped it
                _exit_preempted(logger, f"at step {step}",
                                f"the newest complete checkpoint is {checkpointer.newest() or 'none yet'}")
            profiler.step_ends(step)
            if at_log_step:
                window = Window(start=time.perf_counter())

    logger.close()
    # Resumed at its end from another run.dir, this run's last checkpoint is the one it resumed.
    last_ckpt = checkpointer.newest() or (resume_from if nothing_to_train else None)
    if ctx.is_main:
        print(f"checkpoint: {last_ckpt}", flush=True)
        if (best := recorded_best(best_file)) is not None:  # this run's, or an earlier launch's in this run.dir
            print(f"best: {best_file} (step {header(best_file).get('step', '?')}, val/top1 {best['val_top1']:.2%})",
                  flush=True)
        print(f"tensorboard: tensorboard --logdir {shlex.quote(str(run_dir / 'tb'))}", flush=True)
    return last_ckpt


def _exit_preempted(logger: MetricLogger, when: str, resume_at: str) -> NoReturn:
    """Exit with PREEMPTED_EXIT_CODE (the SLURM scripts requeue on it), the curves written."""
    logger.close()
    log.warning("preempted %s: exiting with %d; %s", when, PREEMPTED_EXIT_CODE, resume_at)
    sys.exit(PREEMPTED_EXIT_CODE)


def _banner(cfg: Config, ctx: distributed.DistContext, model: torch.nn.Module, accum_steps: int, step: int,
            peak: float) -> str:
    """The run's first line: the model, how it is distributed, the batch layout, the steps to go."""
    params = sum(p.numel() for p in model.parameters())
    trained = "" if cfg.finetune.freeze == "none" else \
        f", {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3g}M trained"
    strategy = "no DDP" if ctx.world_size == 1 and cfg.dist.strategy == "ddp" else cfg.dist.strategy
    return (f"{cfg.model.arch}: {params / 1e6:.2f}M params ({distributed.local_numel(model) / 1e6:.2f}M on rank 0{trained}) | "
            f"{strategy} over {ctx.world_size} rank(s) on {ctx.device.type} | global batch "
            f"{cfg.train.global_batch_size} = {ctx.world_size} x {cfg.data.micro_batch_size} x {accum_steps} "
            f"accumulation step(s) | steps {step} -> {cfg.train.steps} | mfu against {peak / 1e12:.3g} TFLOP/s per "
            f"device ({'log.peak_tflops' if cfg.log.peak_tflops else 'measured'})")


def train_step(dp_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective,
               images: torch.Tensor, labels: torch.Tensor, cfg: Config,
               compute: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's batch: forward/backward per micro-batch, gradients
    synchronised once (on the last), clipped to a global norm. Skipped, on every rank, when any
    rank's loss or the gradient norm is NaN/Inf. Returns the loss, the norm before clipping and
    that 0/1 flag, as device tensors (reading them would wait for the step)."""
    micro = cfg.data.micro_batch_size
    accum_steps = -(-len(images) // micro)
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(zip(images.split(micro), labels.split(micro))):
        with distributed.grad_sync(dp_model, enabled=i == accum_steps - 1):
            with compute:
                loss = objective(dp_model, x, y) / accum_steps
            loss.backward()
        total += loss.detach()
    grad_norm = distributed.clip_grad_norm(model, cfg.optim.clip_grad_norm).detach()
    bad = distributed.any_rank_on_device(~(total.isfinite() & grad_norm.isfinite()))
    step_unless_bad(optimizer, bad)
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, bad


def _close_window(window: Window, lr: float, state: TrainState, peak_seconds_per_image: float,
                  ctx: distributed.DistContext) -> dict:
    """The window's scalars to log, summed over ranks (one all-reduce); its skipped samples and
    steps are added to `state`'s counts. `peak_seconds_per_image`: one image's training FLOPs over
    one device's peak FLOP/s."""
    # The host queues steps ahead of the GPU, so the window ends once the GPU has run them, as it
    # began (after the last log step's reads, which waited for the GPU): else perf/ reads high.
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed = time.perf_counter() - window.start
    sums = distributed.all_reduce_sum(torch.cat([
        torch.as_tensor(window.loss, dtype=torch.float32, device=ctx.device).view(1),
        torch.as_tensor(window.bad_steps, dtype=torch.float32, device=ctx.device).view(1),
        torch.tensor([window.data_wait_s / elapsed, *(float(window.skipped[kind]) for kind in SKIP_KINDS)],
                     device=ctx.device)]))
    skipped = Counter(state.skipped)
    skipped.update({kind: round(n) for kind, n in zip(SKIP_KINDS, sums[3:].tolist()) if n})
    state.skipped = dict(skipped)
    bad_steps = round(sums[1].item() / ctx.world_size)  # every rank skips the same steps
    state.bad_steps += bad_steps
    good_steps = window.steps - bad_steps
    memory = {"perf/mem_peak_gib": distributed.peak_memory_gib(ctx)} if ctx.device.type == "cuda" else {}
    return {
        "train/loss": sums[0].item() / (good_steps * ctx.world_size) if good_steps else float("nan"),
        "train/lr": lr,
        "train/grad_norm": float(window.grad_norm) / good_steps if good_steps else float("nan"),
        "train/skipped_steps": state.bad_steps,
        "perf/images_per_sec": window.images / elapsed,
        "perf/mfu": window.images / elapsed * peak_seconds_per_image / ctx.world_size,
        "perf/data_wait_frac": sums[2].item() / ctx.world_size,
        **memory,
        "data/skipped": sum(skipped.values()),
        **{f"data/skipped_{kind}": count for kind, count in sorted(skipped.items())},
    }
