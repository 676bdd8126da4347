"""Data pipeline throughput, decode on the CPU (loader workers) against decode on the GPU.

1. Writes (once, into --cache) WebDataset shards of photo-like 500x375 JPEGs of about 80 KB.
2. The loader alone: samples/s of vitdist's TrainLoader plus `to_device` (uint8 crops on the
   device), for data.decode=cpu and gpu at each --workers count; then the device's own share of
   data.decode=gpu (decoding and resizing batches read beforehand; the resize batched and one
   crop at a time).
3. End to end: `launch/pretrain.py --config C` on those shards for each decode, reading
   perf/images_per_sec and perf/data_wait_frac back from TensorBoard, the first log window
   (compilation, loader start) left out.

    python bench/data_pipeline.py --cache /tmp/bench-jpegs --out data_pipeline.json      # GPU machine
    python bench/data_pipeline.py --quick --cache /tmp/bench-quick --out /tmp/quick.json  # CPU, tiny scale
"""

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.io import ImageReadMode, decode_jpeg

from vitdist.config_yaml import load_config
from vitdist.data import TrainLoader
from vitdist.demo_data import draw_photo
from vitdist.files import write_json, written_whole
from vitdist.gpu_decode import encoded_jpegs, resize_crops, to_device

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 1000
IMAGE_SIZE = (500, 375)
WARMUP_BATCHES = 3


def write_shard(task: tuple[str, int, int]) -> None:
    path, first, count = task
    rng = np.random.default_rng(first)
    with written_whole(path) as partial, wds.TarWriter(str(partial)) as sink:
        for index in range(first, first + count):
            jpeg = io.BytesIO()
            draw_photo(*IMAGE_SIZE, rng).save(jpeg, format="JPEG", quality=90)
            sink.write({"__key__": f"{index:08d}", "jpg": jpeg.getvalue(), "cls": index % NUM_CLASSES})


def ensure_shards(cache: Path, samples: int, per_shard: int) -> tuple[str, dict]:
    """The shards' brace pattern and a summary; written with one process per core unless cached."""
    num_shards = math.ceil(samples / per_shard)
    pattern = str(cache / f"bench-{{000000..{num_shards - 1:06d}}}.tar")
    paths = [cache / f"bench-{i:06d}.tar" for i in range(num_shards)]
    marker = cache / "shards.json"
    wanted = {"samples": samples, "per_shard": per_shard, "image_size": list(IMAGE_SIZE)}  # as JSON reads it back
    if not (marker.is_file() and json.loads(marker.read_text())["spec"] == wanted and all(p.is_file() for p in paths)):
        cache.mkdir(parents=True, exist_ok=True)
        tasks = [(str(p), i * per_shard, min(per_shard, samples - i * per_shard)) for i, p in enumerate(paths)]
        start = time.perf_counter()
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(write_shard, tasks)
        total = sum(p.stat().st_size for p in paths)
        marker.write_text(json.dumps({"spec": wanted, "bytes": total, "write_s": time.perf_counter() - start}))
    summary = json.loads(marker.read_text())
    return pattern, {**summary["spec"], "shards": num_shards, "kb_per_image": summary["bytes"] / samples / 1e3}


def measure_loader(pattern: str, decode: str, workers: int, streams: int, batch: int, batches: int, img_size: int,
                   device: torch.device, rand_augment: str | None = None) -> float:
    """Samples/s of TrainLoader + to_device, after the workers' start."""
    cfg = load_config(None, [f"data.train_shards={pattern}", f"data.decode={decode}", f"data.num_workers={workers}",
                             f"data.streams={streams}", f"train.global_batch_size={batch}",
                             f"data.rand_augment={rand_augment}" if rand_augment else "data.rand_augment=null"]).data
    loader = TrainLoader(cfg, img_size, NUM_CLASSES, batch, 0, 1, pin_memory=device.type == "cuda")
    batches_in = iter(loader)
    for _ in range(WARMUP_BATCHES):
        to_device(next(batches_in), device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        to_device(next(batches_in), device)
    synchronize(device)
    return batches * batch / (time.perf_counter() - start)


def measure_device_work(pattern: str, streams: int, batch: int, batches: int, img_size: int,
                        device: torch.device) -> dict:
    """Samples/s of the device's share of data.decode=gpu, on batches read beforehand: decoding
    plus resizing (`to_device`), and resizing alone, batched (`resize_crops`) against one crop at
    a time (F.interpolate per crop, antialiased bicubic: the code before the batched resize)."""
    cfg = load_config(None, [f"data.train_shards={pattern}", "data.decode=gpu", "data.num_workers=0",
                             f"data.streams={streams}", f"train.global_batch_size={batch}"]).data
    loader = iter(TrainLoader(cfg, img_size, NUM_CLASSES, batch, 0, 1, pin_memory=device.type == "cuda"))
    held = [next(loader) for _ in range(batches)]
    first = held[0]
    images = decode_jpeg(encoded_jpegs(first), mode=ImageReadMode.RGB, device=device)
    boxes, flips = first["jpeg_box"].tolist(), first["jpeg_flip"].tolist()

    def one_by_one():
        for image, (left, top, right, bottom) in zip(images, boxes):
            crop = image[None, :, top:bottom, left:right].float()
            F.interpolate(crop, size=(img_size, img_size), mode="bicubic", antialias=True).round_().clamp_(0, 255).byte()

    def rate(work, repeats, samples):
        work()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        synchronize(device)
        return repeats * samples / (time.perf_counter() - start)

    return {"decode_and_resize": rate(lambda: [to_device(b, device) for b in held], 3, batches * batch),
            "resize_batched": rate(lambda: resize_crops(images, boxes, flips, img_size, device), 5, len(images)),
            "resize_one_by_one": rate(one_by_one, 5, len(images))}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(args, pattern: str, decode: str, streams: int, micro_batch: int) -> dict:
    """perf/ figures of a real pretraining run, averaged over the log windows after the first."""
    run_dir = args.cache / "runs" / decode
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.train_shards={pattern}", "data.val_shards=null", f"model.num_classes={NUM_CLASSES}",
                 f"data.decode={decode}", f"data.num_workers={args.train_workers}", f"data.streams={streams}",
                 f"data.micro_batch_size={micro_batch}", f"train.global_batch_size={args.batch}",
                 f"train.steps={args.train_steps}", f"log.every_steps={args.log_every}", "train.resume=none",
                 "train.eval_every_steps=0", "ckpt.every_steps=0", "ckpt.keep=1", f"run.dir={run_dir}",
                 "model.drop_path_rate=0.0"]  # the model bench/train_step.py times on synthetic input
    command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(args.config), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    figures = {}
    try:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.train_timeout)
        if run.returncode != 0:
            raise RuntimeError(f"training with data.decode={decode} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    except subprocess.TimeoutExpired:
        # Killed: a guard against a run that stalls (a hung read, a GPU fault), not an expected
        # end; the windows it logged before the kill still count.
        figures["killed_after_s"] = args.train_timeout
    logged = {}
    if (run_dir / "tb").is_dir():
        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        logged = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("perf/images_per_sec", "perf/data_wait_frac"):
        windows = logged.get(tag, [])[1:]
        if not windows:
            raise RuntimeError(f"{run_dir / 'tb'}: no {tag} after the first log window ("
                               + (f"killed after {args.train_timeout} s)" if figures else "raise --train-steps)"))
        figures[tag.split("/")[1]] = {"mean": float(np.mean(windows)), "windows": windows}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="shard folder, reused when it holds the same spec")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of all figures")
    parser.add_argument("--quick", action="store_true", help="tiny scale, for a CPU: 128 samples, tiny.yaml, 4 steps")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", default="4,8,16", help="loader worker counts measured (comma-separated)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch, of the loader and of training")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches timed per loader measurement")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "pretrain" / "vit_b16.yaml")
    parser.add_argument("--rand-augment", default=None,
                        help="also time the loader (cpu decode) with this data.rand_augment, e.g. rand-m9-mstd0.5-inc1")
    parser.add_argument("--train-workers", type=int, default=8, help="data.num_workers of the training runs")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--train-timeout", type=float, default=600, help="seconds before a training run is killed")
    parser.add_argument("--micro-batch", type=int, default=None, help="data.micro_batch_size of the training runs (default: --batch)")
    parser.add_argument("--skip-training", action="store_true", help="measure the loader alone")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.per_shard, args.workers, args.batch, args.loader_batches = 128, 8, "0,2", 32, 3
        args.config, args.train_workers, args.train_steps, args.log_every = REPO / "configs/pretrain/tiny.yaml", 2, 4, 2
    workers = [int(w) for w in args.workers.split(",")]
    # One stream layout for every measurement: each worker count must own whole streams.
    streams = math.lcm(*(max(1, w) for w in [*workers, args.train_workers]))
    pattern, shards = ensure_shards(args.cache, args.samples, args.per_shard)
    if shards["shards"] < streams or args.batch % streams:
        raise SystemExit(f"{streams} data streams (the lcm of the worker counts) need at least {streams} shards "
                         f"(have {shards['shards']}) and a --batch divisible by {streams} (have {args.batch})")
    model_cfg = load_config(args.config, ["data.train_shards=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
               "cpu_cores": os.cpu_count(), "shards": shards, "batch": args.batch, "streams": streams,
               "loader": [], "training": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    # The figures go to args.out after every measurement: a run stopped at its time limit keeps what it measured.
    rows = []
    for decode, rand_augment in [("cpu", None), ("gpu", None), *([("cpu", args.rand_augment)] if args.rand_augment else [])]:
        for w in workers:
            rate = measure_loader(pattern, decode, w, streams, args.batch, args.loader_batches,
                                  model_cfg.model.img_size, device, rand_augment)
            results["loader"].append({"decode": decode, "rand_augment": rand_augment, "workers": w,
                                      "samples_per_sec": rate})
            write_json(args.out, results)
            label = f"{decode} + RandAugment {rand_augment}" if rand_augment else decode
            rows.append(("loader alone", label, w, f"{rate:,.0f}", ""))
            print(f"loader decode={label} workers={w}: {rate:,.0f} samples/s", flush=True)
    device_work = measure_device_work(pattern, streams, args.batch, 2, model_cfg.model.img_size, device)
    results["device_work"] = device_work
    write_json(args.out, results)
    for name, value in device_work.items():
        rows.append((f"device work alone: {name.replace('_', ' ')}", "gpu", "-", f"{value:,.0f}", ""))
        print(f"device work {name}: {value:,.0f} samples/s", flush=True)
    failed = 0
    if not args.skip_training:
        micro_batch = args.micro_batch or args.batch
        for decode in ("cpu", "gpu"):  # a failed run costs only its own row
            run = {"decode": decode, "workers": args.train_workers, "config": str(args.config), "steps": args.train_steps}
            try:
                run.update(measure_training(args, pattern, decode, streams, micro_batch))
                figures = f"{run['images_per_sec']['mean']:,.0f}", f"{run['data_wait_frac']['mean']:.3f}"
            except RuntimeError as error:
                print(error, file=sys.stderr, flush=True)
                run["error"], figures, failed = str(error)[-1000:], ("failed", ""), failed + 1
            results["training"].append(run)
            write_json(args.out, results)
            rows.append((f"training {args.config.name}", decode, args.train_workers, *figures))
            print(f"training decode={decode}: {figures[0]} img/s", flush=True)
    print(f"\n{results['device']}, {os.cpu_count()} CPU cores; {shards['samples']} JPEGs of {IMAGE_SIZE[0]}x"
          f"{IMAGE_SIZE[1]}, {shards['kb_per_image']:.0f} KB each; global batch {args.batch}\n")
    print("| measurement | decode | workers | samples/s | data_wait_frac |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(f"\nfigures: {args.out}")
    if failed:
        raise SystemExit(f"{failed} training run(s) failed: see above")


if __name__ == "__main__":
    main()
