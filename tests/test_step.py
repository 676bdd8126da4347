"""The pieces of one training step: gradient sync, precision, objective."""

import copy
import json
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel

from conftest import TINY
from vitdist import distributed
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.model import build_model
from vitdist.objective import Classification
from vitdist.optim import BadSteps, NonFiniteTraining, build_optimizer
from vitdist.distributed import compute_precision, prepare_model
from vitdist.train import seed_step, train_step


def tiny(*overrides):
    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


@pytest.mark.parametrize("compile", [False, True])
def test_accumulation_micro_steps_do_not_all_reduce(process_group, compile):
    """Also through torch.compile's wrapper, which is not a DDP module itself. (prepare_model
    applies DDP only to more than one rank; this process group has one.)"""
    model, _ = tiny("model.depth=1")
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    dp_model = torch.compile(ddp) if compile else ddp
    reduced = []

    def count(state, bucket):
        reduced.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count)
    objective = Classification(load_config(TINY).train, 8)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8,))
    for i, (xs, ys) in enumerate(zip(x.split(2), y.split(2))):
        with distributed.grad_sync(dp_model, enabled=i == 3):
            objective(dp_model, xs, ys).backward()
        assert (len(reduced) > 0) == (i == 3), f"micro-step {i}"
    assert sorted(set(reduced)) == sorted(reduced)  # each bucket once, on the last micro-step


def test_one_process_trains_the_model_itself_without_ddp(process_group):
    model, cfg = tiny("dist.strategy=ddp", "train.compile=false")
    assert prepare_model(model, cfg, distributed.DistContext(0, 1, torch.device("cpu"))) is model


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_autocast_keeps_fp32_weights_grads_and_optimizer_state(process_group, strategy):
    """train.precision=bf16 as a run sets it up (prepare_model, compute_precision): the forward runs
    in bf16 (autocast under DDP, bf16 parameter gathers under FSDP), the weights, their gradients
    and Adam's moments stay fp32."""
    model, cfg = tiny("train.precision=bf16", f"dist.strategy={strategy}")
    model = prepare_model(model, cfg, distributed.DistContext(0, 1, torch.device("cpu")))
    optimizer = build_optimizer(model, cfg.optim)
    objective = Classification(cfg.train, cfg.model.num_classes)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))
    with compute_precision(cfg, torch.device("cpu")):
        assert model(x).dtype == torch.bfloat16  # the matmuls ran in bf16
        loss = objective(model, x, y)
    assert loss.dtype == torch.float32
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_objective_label_smoothing_and_mixup():
    """Smoothing is PyTorch's; mixup/cutmix are timm's targets, drawn from NumPy's global generator."""
    model, cfg = tiny()
    model.eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8,))
    for smoothing in (0.0, 0.1):
        loss = Classification(load_config(TINY, [f"train.label_smoothing={smoothing}"]).train, 8)(model, x, y)
        torch.testing.assert_close(loss, F.cross_entropy(model(x), y, label_smoothing=smoothing))
    for mixup, cutmix in ((0.8, 1.0), (0.8, 0.0), (0.0, 1.0)):  # either alone mixes too
        mixed = Classification(load_config(TINY, ["train.label_smoothing=0.1", f"train.mixup_alpha={mixup}",
                                                  f"train.cutmix_alpha={cutmix}"]).train, 8)
        np.random.seed(0)
        loss = mixed(model, x.clone(), y)  # timm's Mixup mixes the images in place
        np.random.seed(0)
        images, targets = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=8)(x.clone(), y)
        assert not torch.equal(images, x) and (targets.max(-1).values < 0.9).any()  # mixed, labels too
        torch.testing.assert_close(loss, -(targets * F.log_softmax(model(images), dim=-1)).sum(-1).mean())


@pytest.mark.parametrize("max_norm", [0.01, 0.0])
def test_clipping_scales_the_gradients_to_the_norm_and_zero_leaves_them(max_norm):
    model, cfg = tiny()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4,))
    Classification(cfg.train, cfg.model.num_classes)(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = distributed.clip_grad_norm(model, max_norm)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert norm > 0.1  # so that 0.01 clips
    if max_norm:
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        torch.testing.assert_close(after, torch.tensor(max_norm), rtol=1e-4, atol=0)
    else:
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_step_changes_nothing_and_the_next_one_trains(process_group, strategy):
    """A batch that makes the loss NaN: no parameter, moment or step count moves; then a good
    batch updates as usual. Under FSDP too, where parameters and moments are DTensor shards."""
    model, cfg = tiny("data.micro_batch_size=4", "optim.clip_grad_norm=1.0", f"dist.strategy={strategy}")
    model = prepare_model(model, cfg, distributed.DistContext(0, 1, torch.device("cpu")))
    optimizer = build_optimizer(model, cfg.optim)
    objective = Classification(cfg.train, cfg.model.num_classes)
    compute = compute_precision(cfg, torch.device("cpu"))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8,))
    assert train_step(model, model, optimizer, objective, x, y, cfg, compute)[2].item() == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg_sq"].clone() for s in optimizer.state.values()]
    poisoned = x.clone()
    poisoned[5, 0, 3, 3] = float("nan")  # one pixel of one sample of the second micro-batch
    loss, grad_norm, bad = train_step(model, model, optimizer, objective, poisoned, y, cfg, compute)
    assert bad.item() == 1.0 and not loss.isfinite() and not grad_norm.isfinite()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg_sq"]) for m, s in zip(moments, optimizer.state.values()))
    assert all(s["step"].item() == 1 for s in optimizer.state.values())
    assert train_step(model, model, optimizer, objective, x, y, cfg, compute)[2].item() == 0.0
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])
    assert all(s["step"].item() == 2 for s in optimizer.state.values())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_activation_memory_budget_recomputes_instead_of_saving(process_group, strategy):
    """Compiled (the whole DDP model, or each FSDP2 block): with a budget of 0 compile's partitioner
    saves a fraction of the activations it saves by default, and the step's loss and gradients stay
    the same."""
    ctx = distributed.DistContext(0, 1, torch.device("cpu"))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 8, (16,))
    runs = {}
    for budget in (0.0, 1.0):  # 1.0 last: the setting is process-wide
        torch._dynamo.reset()  # dynamo would reuse the first graph for the second, identical, model
        model, cfg = tiny("train.compile=true", f"train.activation_memory_budget={budget}", f"dist.strategy={strategy}",
                          "model.depth=2")
        dp_model = prepare_model(model, cfg, ctx)
        saved = []

        def pack(tensor):  # the weights (gathered by FSDP, or DDP's own) are not activations
            if not isinstance(tensor, torch.nn.Parameter):
                saved.append(tensor.nbytes)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = Classification(cfg.train, cfg.model.num_classes)(dp_model, x, y)
        loss.backward()
        runs[budget] = sum(saved), loss.detach(), [p.grad for p in model.parameters()]
    (low_saved, low_loss, low_grads), (saved, loss, grads) = runs[0.0], runs[1.0]
    assert saved > 0 and low_saved < 0.5 * saved, (low_saved, saved)
    torch.testing.assert_close(low_loss, loss, rtol=1e-5, atol=1e-6)
    for low, full in zip(low_grads, grads):
        torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-6)


def test_a_training_step_applies_the_clipped_gradients(process_group):
    """Adam's first moment after one step is (1 - beta1) x the gradients it was given: clipped to
    optim.clip_grad_norm, while the step reports the norm from before clipping."""
    model, cfg = tiny("optim.clip_grad_norm=0.01", "data.micro_batch_size=4")
    optimizer = build_optimizer(model, cfg.optim)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8,))
    _, grad_norm, bad = train_step(model, model, optimizer, Classification(cfg.train, cfg.model.num_classes), x, y,
                                   cfg, compute_precision(cfg, torch.device("cpu")))
    assert bad.item() == 0.0 and grad_norm > 0.1  # so that 0.01 clips
    moment = torch.linalg.vector_norm(torch.stack([s["exp_avg"].norm() for s in optimizer.state.values()]))
    torch.testing.assert_close(moment, torch.tensor((1 - cfg.optim.betas[0]) * 0.01), rtol=1e-4, atol=0)


def test_bad_steps_stop_the_run_only_in_a_row():
    """Scattered NaN/Inf steps never add up to train.max_bad_steps, and once a step trains again
    the latest weights may be checkpointed. The loop checks at log steps only: a run of them between
    two checks stops the run, though a good step came after it."""
    bad_steps = BadSteps(torch.device("cpu"))
    for flag in (1, 1, 0, 1, 0):
        bad_steps.record(torch.tensor(float(flag)))
    assert bad_steps.ongoing() == 0
    bad_steps.check(limit=3, step=5)
    for _ in range(3):
        bad_steps.record(torch.tensor(1.0))
    assert bad_steps.ongoing() == 3
    with pytest.raises(NonFiniteTraining, match="^3 steps in a row up to step 8 had a NaN/Inf loss"):
        bad_steps.check(limit=3, step=8)
    between = BadSteps(torch.device("cpu"))
    for flag in (0, 1, 1, 1, 0):
        between.record(torch.tensor(float(flag)))
    assert between.ongoing() == 0
    with pytest.raises(NonFiniteTraining, match="^3 steps in a row up to step 5 had a NaN/Inf loss"):
        between.check(limit=3, step=5)


def test_device_random_draws_depend_on_seed_rank_and_step():
    """Drop path and mixup draw from torch's and NumPy's generators: a run resumed at a step draws
    what the uninterrupted run drew there, and steps and ranks draw differently."""
    def draws(seed, rank, step):
        seed_step(seed, rank, step)
        return torch.rand(8), np.random.rand(8)

    want = draws(0, 0, 5)
    got = draws(0, 0, 5)
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    for other in (draws(1, 0, 5), draws(0, 1, 5), draws(0, 0, 6)):
        assert not torch.equal(other[0], want[0]) and not np.array_equal(other[1], want[1])


def test_every_train_seed_the_config_accepts_seeds_the_steps():
    """NumPy's generator takes 32-bit seeds: a larger train.seed passed the config and the process
    group's start, then failed at the first step. It is refused beforehand, naming the key."""
    largest = load_config(TINY, [f"train.seed={2**32 - 1}"]).train.seed
    seed_step(largest, rank=7, step=10**6)
    with pytest.raises(ConfigError, match=r"config key 'train.seed' must be >= 0 and < 4294967296, got 4294967296"):
        load_config(TINY, [f"train.seed={2**32}"])


def _two_ranks(rank, out_dir):
    # A file store: no port to pick beforehand, which another process could take meanwhile.
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2)
    try:
        ctx = distributed.DistContext(rank, 2, torch.device("cpu"), control=dist.new_group(backend="gloo"))
        found = {"any_rank": distributed.any_rank([rank == 1, False, rank == 0], ctx),
                 "on_device": [distributed.any_rank_on_device(torch.tensor(rank == 1)).item(),
                               distributed.any_rank_on_device(torch.tensor(False)).item()]}
        model, cfg = tiny("dist.strategy=fsdp", "model.depth=2")
        whole = copy.deepcopy(model)
        x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(4)
        objective = Classification(cfg.train, cfg.model.num_classes)
        sharded = prepare_model(model, cfg, ctx)
        objective(sharded, x, y).backward()  # the same batch on both ranks: the mean gradient is the whole model's
        objective(whole, x, y).backward()
        found["norm"] = [distributed.clip_grad_norm(model, 0.0).item(), distributed.clip_grad_norm(whole, 0.0).item()]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_flags_and_the_global_gradient_norm(tmp_path):
    """A flag raised on one rank is raised on every rank (a NaN/Inf step is skipped on all;
    evaluation runs until every rank's share is done), and under FSDP the gradient norm is that
    of the whole model's gradients, not of this rank's shard. Two real gloo processes."""
    mp.spawn(_two_ranks, args=(tmp_path,), nprocs=2)
    for rank in range(2):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["any_rank"] == [True, False, True] and found["on_device"] == [1.0, 0.0], rank
        sharded, whole = found["norm"]
        assert sharded == pytest.approx(whole, rel=1e-5), rank


def _rank_zero_writes(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        group, found = dist.new_group(backend="gloo"), {}
        found["written"] = repr(distributed.on_rank_zero(lambda: (out_dir / "best").write_text("x"), group, (OSError,)))
        found["full disk"] = repr(distributed.on_rank_zero(lambda: (out_dir / "no" / "best").write_text("x"), group,
                                                           (OSError,)))
        try:
            distributed.on_rank_zero(lambda: 1 / 0, group, (OSError,))  # a bug, not a failed write
        except Exception as e:
            found["bug"] = repr(e)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_a_write_on_rank_zero_fails_or_raises_on_every_rank_together(tmp_path):
    """What rank 0 writes alone (a checkpoint's completion, the best weights): every rank learns of
    its failed write, and an error of another kind is raised on every rank at once, where the other
    ranks had waited in their next collective until dist.timeout_s. Two real gloo processes."""
    start = time.monotonic()
    mp.spawn(_rank_zero_writes, args=(tmp_path,), nprocs=2)
    assert time.monotonic() - start < 50  # not the process group's timeout
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [f["written"] for f in found] == ["None", "None"] and (tmp_path / "best").read_text() == "x"
    assert all(f["full disk"].startswith("FileNotFoundError(2, 'No such file or directory')") for f in found)
    assert found[0]["bug"] == "ZeroDivisionError('division by zero')"
    assert found[1]["bug"] == "RuntimeError(\"rank 0 failed: ZeroDivisionError('division by zero')\")"
