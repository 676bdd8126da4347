"""Fine-tune a pretrained ViT: `torchrun --nproc_per_node=N launch/finetune.py --config
configs/finetune/C.yaml finetune.init=<checkpoint> [key.sub=value ...]`.

The checkpoint is a vitdist checkpoint directory or export, or a timm or torchvision ViT state
dict; the head is replaced for model.num_classes and position embeddings are resampled to
model.img_size. The best weights by val/top1 are kept as <run.dir>/best.safetensors.
"""

import sys

from vitdist.entry import main

if __name__ == "__main__":
    sys.exit(main(__doc__, finetune=True))
