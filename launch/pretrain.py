"""Pretrain a ViT: `torchrun --nproc_per_node=N launch/pretrain.py --config C.yaml [key.sub=value ...]`.

Also runs as one process without torchrun. The config and the shard list are checked against
this world size before any process group starts, so a bad key fails every rank the same way.
"""

import argparse
import logging
import os
import sys

from vitdist.config import ConfigError, load_config
from vitdist.train import preflight, pretrain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pretrain/vit_b16.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, values read as YAML")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
