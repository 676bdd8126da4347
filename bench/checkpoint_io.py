"""Checkpoint figures: size, sync save time, async save stall (what training waits for) and
total, load time; for one process, through vitdist's own Checkpointer.

    python bench/checkpoint_io.py --config configs/pretrain/tiny.yaml
    python bench/checkpoint_io.py --config configs/pretrain/vit_b16.yaml   # on a GPU: the model lives there
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitdist import checkpoint, checkpoint_read, distributed
from vitdist.config_yaml import load_config
from vitdist.model import build_model
from vitdist.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.train_shards=unused"])
    device = distributed.init(cfg.dist).device
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, device=device)).sum().backward()
    optimizer.step()  # optimizer state exists, as in a real checkpoint
    root = Path(args.dir or tempfile.mkdtemp(prefix="vitdist-ckpt-"))
    results = {}
    for mode in ("sync", "async"):
        cfg.ckpt.async_save, cfg.ckpt.keep = mode == "async", 1
        saver = checkpoint.Checkpointer(root / mode, cfg.ckpt, {})
        stalls, totals = [], []
        for step in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            saver.save(step, model, optimizer, {"step": step})
            stalls.append(time.perf_counter() - start)
            saver.wait()
            totals.append(time.perf_counter() - start)
        results[mode] = (statistics.median(stalls), statistics.median(totals))
    path = checkpoint.newest_checkpoint(root / "sync")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        checkpoint_read.load(path, model, optimizer)
        loads.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print("| config | device | params | size | sync save | async stall | async total | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {Path(args.config).name} | {name} | {params / 1e6:.1f}M | {size / 2**20:.1f} MiB | "
          f"{results['sync'][0]:.3f} s | {results['async'][0]:.3f} s | {results['async'][1]:.3f} s | "
          f"{statistics.median(loads):.3f} s |")
    if args.dir is None:
        shutil.rmtree(root)
    distributed.close()


if __name__ == "__main__":
    main()
