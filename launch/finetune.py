"""Fine-tune a pretrained ViT: `torchrun --nproc_per_node=N launch/finetune.py --config
configs/finetune/C.yaml finetune.init=<checkpoint> [key.sub=value ...]`.

The checkpoint is a vitdist checkpoint directory or export, or a timm or torchvision ViT state
dict; a head of another shape than model.num_classes (or any, with finetune.new_head) is made
anew, and position and patch embeddings are resampled to model.img_size and patch size. The best weights by val/top1 are kept as <run.dir>/best.safetensors.
"""

from vitdist.entry import run

if __name__ == "__main__":
    run(__doc__, finetune=True)
