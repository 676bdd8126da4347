"""Pretrain a ViT: `torchrun --nproc_per_node=N launch/pretrain.py --config C.yaml [key.sub=value ...]`.

Also runs as one process without torchrun. The config and the shard list are checked against
this world size before any process group starts, so a bad key fails every rank the same way.
"""

from vitdist.entry import run

if __name__ == "__main__":
    run(__doc__, finetune=False)
