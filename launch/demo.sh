#!/usr/bin/env bash
# The demo: set up .venv, write the demo datasets as WebDataset shards, pretrain the tiny ViT on
# the built-in shapes with torchrun (one process per GPU, or 2 gloo processes on CPU), then
# fine-tune it on real handwritten digits, and print where everything went.
# Extra arguments are pretraining config overrides, e.g.: bash launch/demo.sh train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv demo

data_dir=${VITDIST_DEMO_DATA:-demo}
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
for arg in "$@"; do  # the user's run.dir, if given, is the one fine-tuning starts from
  case $arg in run.dir=*) run_dir=${arg#run.dir=} ;; esac
done
run_dir=${run_dir%/}  # runs/mine/ would fine-tune into runs/mine/-digits
if [ ! -f "$data_dir/digits/shards/classes.json" ]; then
  echo "writing the demo datasets to $data_dir/"
  vitdist demo-data "$data_dir"
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one per process: the ranks and loader workers share the cores
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then
  nproc=1
  while [ $((nproc * 2)) -le "$gpus" ] && [ $((nproc * 2)) -le 16 ]; do nproc=$((nproc * 2)); done
else
  nproc=2
fi
# A micro-batch of 128/nproc keeps the global batch of 128 (and its 16 streams) for any power of 2 up to 16.
layout=(data.micro_batch_size=$((128 / nproc)))

echo "== pretraining on shapes"
torchrun --standalone --nproc_per_node="$nproc" launch/pretrain.py --config configs/pretrain/tiny.yaml \
  "data.train_shards=$data_dir/shapes/shards/train-{000000..000015}.tar" \
  "data.val_shards=$data_dir/shapes/shards/val-{000000..000002}.tar" "${layout[@]}" "run.dir=$run_dir" "$@"

echo "== fine-tuning on handwritten digits (scikit-learn's scans)"
torchrun --standalone --nproc_per_node="$nproc" launch/finetune.py --config configs/finetune/tiny_digits.yaml \
  "data.train_shards=$data_dir/digits/shards/train-{000000..000015}.tar" \
  "data.val_shards=$data_dir/digits/shards/val-{000000..000015}.tar" "${layout[@]}" \
  "finetune.init=$run_dir/checkpoints" "run.dir=$run_dir-digits"  # a run's checkpoints: its newest

# Whole, as the config reads it (a leading ~ the home directory): this script runs in the checkout, the user may not.
shown=$(python -c 'import os, sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))' "$run_dir")
echo "demo done: pretraining in $shown, fine-tuning in $shown-digits (best weights: $shown-digits/best.safetensors)"
echo "watch both: tensorboard --logdir_spec 'pretrain:$shown/tb,finetune:$shown-digits/tb'"
