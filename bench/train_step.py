r"""Training-step throughput: timm's ViT step against vitdist's, side by side on one GPU.

    python bench/train_step.py --config configs/pretrain/vit_b16.yaml --batch 256 \
        --variants timm,vitdist:dist.strategy=fsdp [--ckpt] [--out results.json]

A variant is `timm` (timm's model, fp32 weights, bf16 autocast, fused AdamW, torch.compile of the
whole model: the step the issue's anchors time), `timm-eager`, or `vitdist:<key=value;...>`:
vitdist's own step (`vitdist.distributed.prepare_model` + `vitdist.train.train_step`) on the config with those
overrides (with `train.ema_decay`, the loop's update of the average of the weights after each
step, too). Settings `inductor.<option>=<value>` (or `dynamo.`) patch torch._inductor.config (or
torch._dynamo.config) for one variant, of either kind, e.g. `timm:inductor.max_autotune=true` or
`vitdist:dist.strategy=ddp;inductor.max_autotune_gemm_backends=TRITON`. Every variant starts from
the same initial weights and is timed with CUDA events on fresh random batches (median of
repeats, after warm-up and compilation). "mem GiB" is the timed steps' peak of what the variant
allocated, plus one input batch (the script holds 8 for all variants; the loop holds one).
"saved MiB/img" is what autograd keeps for backward (activations, not weights), counted on any
device. "x timm" is the ratio to the `timm` row compiled with the same inductor.*/dynamo.*
settings. Numerics: each vitdist variant trains `--check-steps` steps on a fixed set of batches,
and its losses are compared with vitdist's eager bf16-autocast step
(`vitdist:train.compile=false;dist.strategy=ddp`) from the same initial weights. MFU counts model
FLOPs (`vitdist.model.train_flops_per_image`, no recomputation) against the bf16 matmul peak
measured in the same run. Each variant's JSON row is written as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time

import timm
import torch
import torch._dynamo.config
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F
import yaml

from vitdist import distributed
from vitdist.config_yaml import load_config
from vitdist.files import write_json
from vitdist.metrics import matmul_peak_flops
from vitdist.model import build_model, timm_kwargs, train_flops_per_image
from vitdist.objective import Classification
from vitdist.optim import build_optimizer
from vitdist.distributed import compute_precision, prepare_model
from vitdist.ema import WeightAverage
from vitdist.train import train_step

REFERENCE = "vitdist:train.compile=false;dist.strategy=ddp"
COMPILER_CONFIGS = {"inductor.": torch._inductor.config, "dynamo.": torch._dynamo.config}


def bench_overrides(args) -> list[str]:
    """The same architecture and batch as timm's step: no drop path, no label smoothing, no clipping
    (the norm is still computed, as in every vitdist step)."""
    return [f"model.num_classes={args.classes}", "model.drop_path_rate=0.0", f"model.grad_checkpointing={str(args.ckpt).lower()}",
            f"data.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", "train.label_smoothing=0.0",
            "optim.clip_grad_norm=0.0", "train.precision=bf16", "train.compile=true", "data.streams=1", "data.num_workers=0"]


def timm_step(args, init: dict, compile_: bool):
    model = timm.create_model(args.arch, **args.timm_kwargs).to(args.device)
    model.load_state_dict(init)
    model.set_grad_checkpointing(args.ckpt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)  # as vitdist's, on any device
    forward = torch.compile(model) if compile_ else model

    def step(x, y):
        with torch.autocast(args.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return model, step


def vitdist_step(args, init: dict, overrides: list[str], ctx):
    cfg = load_config(args.config, [*bench_overrides(args), f"optim.lr={args.lr}", *args.set, *overrides])
    model = build_model(cfg.model)
    model.load_state_dict(init)
    dp_model = prepare_model(model, cfg, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    objective = Classification(cfg.train, cfg.model.num_classes)
    compute = compute_precision(cfg, ctx.device)
    # The loop's update of the average of the weights, where the variant keeps one (train.ema_decay).
    average = WeightAverage(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
    steps = 0

    def step(x, y):
        nonlocal steps
        loss = train_step(dp_model, model, optimizer, objective, x, y, cfg, compute)[0]
        steps += 1
        if average is not None:
            average.update(steps)
        return loss
    return model, step


def time_steps(step, batches, warmup: int, steps: int, repeats: int, device) -> tuple[list[float], float]:
    """Seconds per step of each repeat (CUDA events; the host clock on a CPU, where this script is
    only tried out), and the warm-up's wall time (compilation)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda _: None)
    start = time.perf_counter()
    for i in range(warmup):
        step(*batches[i % len(batches)])
    sync(device)
    warmup_s = time.perf_counter() - start
    per_step = []
    for r in range(repeats):
        begin, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
        host_start = time.perf_counter()
        if cuda:
            begin.record()
        for i in range(steps):
            step(*batches[(r * steps + i) % len(batches)])
        if cuda:
            end.record()
        sync(device)
        seconds = begin.elapsed_time(end) / 1000 if cuda else time.perf_counter() - host_start
        per_step.append(seconds / steps)
    return per_step, warmup_s


def counted_step(step, batch) -> tuple[torch.Tensor, float]:
    """One step; returns its loss and the bytes autograd kept for backward per image, the model's
    own weights left out: the activations that checkpointing and the memory budget trade for
    recomputation, counted the same way on any device, the CPU included."""
    saved = []

    def pack(tensor):  # parameters, FSDP's gathered ones included, are weights, not activations
        if not isinstance(tensor, torch.nn.Parameter):
            saved.append(tensor.nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step(*batch)
    return loss, sum(saved) / len(batch[0])


def profile(step, batches, device, steps: int = 3) -> None:
    """GPU time per kernel over a few steps, in families: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
        torch.cuda.synchronize(device)
    kernels = [(e.key, e.device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
               if e.device_time_total > 0]
    families = {"gemm": ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas"), "attention": ("flash", "fmha", "attention", "cudnn"),
                "optimizer": ("adam", "multi_tensor", "foreach"), "triton (fused pointwise/norm)": ("triton",)}
    totals = dict.fromkeys([*families, "other"], 0.0)
    for name, ms, _ in kernels:
        family = next((f for f, keys in families.items() if any(k in name.lower() for k in keys)), "other")
        totals[family] += ms
    print("  per step, ms: " + ", ".join(f"{f} {ms:.1f}" for f, ms in totals.items()) + f"; total {sum(totals.values()):.1f}")
    for name, ms, count in sorted(kernels, key=lambda k: -k[1])[:25]:
        print(f"  {ms:7.2f} ms x{count:<4d} {name[:110]}")


def split_variant(name: str) -> tuple[str, list[str], list[str]]:
    """`name`: `timm`, `timm-eager` or `vitdist`, then optionally `:` and `;`-separated settings:
    `inductor.<option>=<value>` and `dynamo.<option>=<value>` patch torch._inductor.config and
    torch._dynamo.config for this variant (any kind), the others are vitdist config overrides.
    Returns the kind, the compiler settings and the overrides."""
    kind, _, settings = name.partition(":")
    settings = [s for s in settings.split(";") if s]
    compiler = sorted(s for s in settings if s.startswith(tuple(COMPILER_CONFIGS)))
    return kind, compiler, [s for s in settings if s not in compiler]


def run_variant(name: str, args, init: dict, ctx, check_batches) -> dict:
    kind, compiler, overrides = split_variant(name)
    patches = {prefix: {k.removeprefix(prefix): yaml.safe_load(v) for k, v in
                        (s.split("=", 1) for s in compiler if s.startswith(prefix))} for prefix in COMPILER_CONFIGS}
    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = 1.0  # timm's default; vitdist's variants set their own
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        for prefix, config in COMPILER_CONFIGS.items():
            stack.enter_context(config.patch(patches[prefix]))
        return _run_variant(name, kind, overrides, args, init, ctx, check_batches)


def _run_variant(name: str, kind: str, overrides: list[str], args, init: dict, ctx, check_batches) -> dict:
    began = time.perf_counter()
    batches = [random_batch(args) for _ in range(4)]  # fresh inputs, rotated: no timing of one cached batch
    cuda = args.device.type == "cuda"
    inputs = torch.cuda.memory_allocated(args.device) if cuda else 0  # the 8 batches (and earlier variants' leftovers)
    if kind in ("timm", "timm-eager"):
        if overrides:
            raise ValueError(f"{name}: timm variants take only inductor.* and dynamo.* settings, got {overrides}")
        model, step = timm_step(args, init, compile_=kind == "timm")
        saved, losses = counted_step(step, batches[0])[1], None
    else:
        model, step = vitdist_step(args, init, overrides, ctx)
        # Numerics first, from the initial weights.
        loss, saved = counted_step(step, check_batches[0] if check_batches else batches[0])
        losses = [loss.item(), *(step(x, y).item() for x, y in check_batches[1:])] if check_batches else None
    flops = train_flops_per_image(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    per_step, warmup_s = time_steps(step, batches, args.warmup, args.steps, args.repeats, args.device)
    if args.profile:
        profile(step, batches, args.device)
    seconds = statistics.median(per_step)
    one_batch = sum(t.nbytes for t in batches[0])
    peak = torch.cuda.max_memory_allocated(args.device) - inputs + one_batch if cuda else 0
    result = {"variant": name, "img_s": args.batch / seconds, "step_ms": seconds * 1e3,
              "spread": (max(per_step) - min(per_step)) / seconds, "warmup_s": warmup_s,
              "peak_mem_gib": peak / 2**30, "saved_mib_per_img": saved / 2**20, "flops_per_img": flops,
              "losses": losses, "variant_s": time.perf_counter() - began}
    del model, step, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def compare(results: list[dict], peak: float) -> None:
    """Each row's MFU, ratio to timm's compiled step with the same compiler settings (`timm:<settings>`
    for `vitdist:...;<settings>`) and loss after N steps relative to the reference's, from the rows so far."""
    timm_img_s = {tuple(split_variant(r["variant"])[1]): r["img_s"] for r in results
                  if split_variant(r["variant"])[0] == "timm" and "img_s" in r}
    reference = next((r["losses"] for r in results if r["variant"] == REFERENCE and r.get("losses")), None)
    for r in results:
        if "error" in r:
            continue
        r["mfu"] = r["img_s"] * r["flops_per_img"] / peak
        timm_rate = timm_img_s.get(tuple(split_variant(r["variant"])[1]))
        r["x_timm"] = r["img_s"] / timm_rate if timm_rate else None
        if r["losses"] and reference:
            r["loss_rel_diff"] = abs(r["losses"][-1] - reference[-1]) / abs(reference[-1])


def random_batch(args):
    return (torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device),
            torch.randint(0, args.classes, (args.batch,), device=args.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/vit_b16.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant, e.g. model.arch=vit_gigantic_patch14_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing in every variant")
    parser.add_argument("--variants", default=f"timm,{REFERENCE},vitdist:dist.strategy=ddp,vitdist:dist.strategy=fsdp")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-steps", type=int, default=20, help="0: no numerics check (memory probes)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--profile", action="store_true", help="print each variant's GPU time per kernel")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    args = parser.parse_args()

    cfg = load_config(args.config, [f"model.num_classes={args.classes}", *args.set])
    args.arch, args.img_size = cfg.model.arch, cfg.model.img_size
    args.timm_kwargs = timm_kwargs(cfg.model)
    ctx = distributed.init(cfg.dist)
    args.device = ctx.device
    peak = matmul_peak_flops(args.device, torch.bfloat16)
    torch.manual_seed(0)
    init = timm.create_model(args.arch, **args.timm_kwargs).state_dict()
    generator = torch.Generator(device=args.device).manual_seed(1)
    fixed = [(torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device, generator=generator),
              torch.randint(0, args.classes, (args.batch,), device=args.device, generator=generator)) for _ in range(4)]
    check_batches = [fixed[i % len(fixed)] for i in range(args.check_steps)]

    names = args.variants.split(",")
    if args.check_steps and any(n.startswith("vitdist:") for n in names) and REFERENCE not in names:
        names.insert(0, REFERENCE)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    results = []
    for name in names:
        try:
            results.append(run_variant(name, args, init, ctx, check_batches))
        except Exception as e:  # one failing variant must not cost the others' figures
            results.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        compare(results, peak)
        if args.out:  # after every variant: a run stopped at its time limit keeps what it measured
            write_json(args.out, {"device": device_name, "torch": torch.__version__, "timm": timm.__version__,
                                  "matmul_peak_flops": peak, "args": {k: str(v) for k, v in vars(args).items()},
                                  "results": results})
        print(json.dumps(results[-1]), flush=True)

    print(f"\n{device_name} | torch {torch.__version__} | timm {timm.__version__} | "
          f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s | {args.arch} batch {args.batch} ckpt {args.ckpt}")
    print(f"{'variant':58s} {'img/s':>7s} {'MFU':>6s} {'mem GiB':>8s} {'saved MiB/img':>13s} {'x timm':>7s} "
          f"{'loss@N rel':>10s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:58s} {r['error']}")
            continue
        ratio = f"{r['x_timm']:.3f}" if r["x_timm"] else "-"
        rel = f"{r['loss_rel_diff']:.2e}" if "loss_rel_diff" in r else "-"
        print(f"{r['variant']:58s} {r['img_s']:7.0f} {r['mfu']:6.1%} {r['peak_mem_gib']:8.1f} "
              f"{r['saved_mib_per_img']:13.2f} {ratio:>7s} {rel:>10s}")
    reference = next((r["losses"] for r in results if r["variant"] == REFERENCE and r.get("losses")), None)
    if reference:
        print(f"reference loss: step 1 {reference[0]:.4f} -> step {len(reference)} {reference[-1]:.4f}")
    distributed.close()


if __name__ == "__main__":
    main()
