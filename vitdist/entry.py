"""The command line shared by launch/pretrain.py and launch/finetune.py."""

import argparse
import logging
import os
import sys

from .checkpoint import SaveFailed, UnsafeCheckpoint
from .config import ConfigError, load_config
from .distributed import refuse_together
from .handoff import HandoffError
from .optim import NonFiniteTraining
from .samples import TooManyBadSamples
from .train import preflight, train


def main(description: str, finetune: bool) -> int:
    """Parse `--config C.yaml [key.sub=value ...]`, refuse a bad config on every rank before any
    process group starts (exit 2), then train."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config under configs/")
    parser.add_argument("--check", action="store_true",
                        help="check the config against WORLD_SIZE and exit (0: fine, 2: refused), as SLURM jobs do first")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, values read as YAML")
    args = parser.parse_args()
    refusal = None
    try:
        cfg = load_config(args.config, args.overrides)
        if finetune and not cfg.finetune.init:
            raise ConfigError("finetune.init is not set: give the checkpoint to start from, finetune.init=<path>")
        preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        refusal = str(e)
    if refuse_together(refusal, lambda message: print(f"config error: {message}", file=sys.stderr, flush=True)):
        return 2
    if args.check:
        return 0
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    try:
        train(cfg)
    except (ConfigError, HandoffError, UnsafeCheckpoint, TooManyBadSamples) as e:  # met by every rank alike
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SaveFailed, NonFiniteTraining) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
