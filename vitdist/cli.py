"""The `vitdist` command: dataset and config utilities (training itself runs under torchrun)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

from .config import MAX_TIMEOUT_S


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _timeout(text: str) -> int:
    value = _positive(text)
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S} (a year), got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_bytes(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN: either wrote one image per shard
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitdist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("make-shards", help="turn an ImageFolder (one sub-folder per class) into WebDataset shards")
    shards.add_argument("src", help="folder with one sub-folder of images per class")
    shards.add_argument("out", help="output folder for <prefix>-NNNNNN.tar and classes.json")
    shards.add_argument("--prefix", default="train", help="shard file prefix (default: train)")
    shards.add_argument("--samples-per-shard", type=_positive, default=1000, help="at most this many per shard (default: 1000)")
    shards.add_argument("--max-shard-bytes", type=_positive_bytes, default=1e9,
                        help="at most this many bytes of images per shard (default: 1e9)")
    shards.add_argument("--streams", type=_positive, default=1,
                        help="write a multiple of this many shards: give data.streams, so that every stream holds as "
                             "many samples (default: 1)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle before writing (default: 0)")
    shards.add_argument("--classes", help="a classes.json whose class indices label the images (the training shards', "
                                          "for a split written to another folder): default, the classes.json in the "
                                          "output folder if any, else the sorted sub-folders")

    demo = commands.add_parser("demo-data", help="write the demo datasets as shards: shapes (built in), digits (scikit-learn)")
    demo.add_argument("out", help="output folder: <out>/shapes, <out>/digits")

    export = commands.add_parser("export", help="write a checkpoint as one timm-loadable safetensors file (+ .json)")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, e.g. runs/b16/checkpoints/step_1000, or a run's checkpoints/ (its newest)")
    export.add_argument("--out", required=True, help="output file, e.g. b16.safetensors")
    export.add_argument("--ema", action="store_true",
                        help="write the average of the weights that the run kept (train.ema_decay), not the weights")

    evaluate = commands.add_parser("evaluate", help="top-1, top-5 and loss of a checkpoint on labelled shards")
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint directory, an export, a timm hub folder (config.json and weights), a timm "
                               "or torchvision state dict")
    evaluate.add_argument("--data", required=True, help="labelled shards (a brace pattern or a .txt list), or an ImageFolder directory")
    evaluate.add_argument("--ema", action="store_true",
                          help="evaluate the average of the weights that a vitdist checkpoint's run kept (train.ema_decay)")
    evaluate.add_argument("--config", help="for a state dict that does not say its architecture: a config with its model section")
    evaluate.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default: 64)")
    evaluate.add_argument("--workers", type=_non_negative, default=2,
                          help="loader worker processes; 0 reads in this process (default: 2)")
    evaluate.add_argument("--timeout-s", type=_timeout, default=600,
                          help="stop, naming the loader worker, when a read delivers nothing for this many seconds (a "
                               "stalled pipe: command or filesystem; default: 600)")

    commands.add_parser("config-reference", help="print the config reference (markdown)")

    args = parser.parse_args(argv)
    if args.command == "make-shards":
        from .make_shards import make_shards, read_classes
        try:
            pattern = make_shards(args.src, args.out, args.prefix, args.samples_per_shard, args.max_shard_bytes,
                                  args.seed, classes=read_classes(args.classes) if args.classes else None, streams=args.streams)
        except (OSError, ValueError) as e:  # OSError names the file: missing, unreadable, a disk full
            print(f"vitdist make-shards: {e}", file=sys.stderr)
            return 2
        print(f"shards: {pattern}")
    elif args.command == "demo-data":
        from .demo_data import write_demo_dataset, write_digits_dataset
        if importlib.util.find_spec("sklearn") is None:  # the digits: found missing after a minute of shapes
            print("vitdist demo-data: the digits come from scikit-learn, which is not installed: pip install "
                  "scikit-learn (or, in vitdist's checkout, pip install -e '.[demo]')", file=sys.stderr)
            return 2
        for name, write in (("shapes", write_demo_dataset), ("digits", write_digits_dataset)):
            for split, pattern in write(f"{args.out}/{name}").items():
                print(f"{name} {split}: {pattern}")
    elif args.command == "export":
        from .export import export
        try:
            out = export(args.checkpoint, args.out, args.ema)
        except (FileNotFoundError, ValueError) as e:
            print(f"vitdist export: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out} and {out.with_suffix('.json')}")
    elif args.command == "evaluate":
        from .config import ConfigError
        from .evaluate import evaluate_checkpoint
        from .handoff import HandoffError
        from .workers import WorkerDied, WorkerStalled
        try:
            result = evaluate_checkpoint(args.checkpoint, args.data, args.config, args.batch_size, args.workers,
                                         args.timeout_s, args.ema)
        except (ConfigError, HandoffError) as e:
            print(f"vitdist evaluate: {e}", file=sys.stderr)
            return 2
        except (WorkerDied, WorkerStalled) as e:  # may not recur: a retry may be read in full
            print(f"vitdist evaluate: {e}", file=sys.stderr)
            return 1
        if math.isnan(result["val/top1"]):  # no sample scored
            print(f"vitdist evaluate: no sample of --data could be scored: {result['val/skipped']:.0f} bad samples "
                  "skipped (the log names the first of each kind, with why)", file=sys.stderr)
            return 2
        print(f"top-1 {result['val/top1']:.2%} | top-5 {result['val/top5']:.2%} | loss {result['val/loss']:.4f} | "
              f"skipped {result['val/skipped']:.0f} bad samples")
    else:
        from .config import reference_markdown
        print(reference_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
