#!/usr/bin/env bash
# The demo: set up .venv, write the built-in shapes dataset as WebDataset shards, pretrain the
# tiny ViT with torchrun (one process per GPU, or 2 gloo processes on CPU), print where it went.
# Extra arguments are config overrides, e.g.: bash launch/demo.sh train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
ensure_venv

data_dir=${VITDIST_DEMO_DATA:-demo}
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
if [ ! -f "$data_dir/shards/classes.json" ]; then
  echo "writing the demo dataset to $data_dir/"
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
torchrun --standalone --nproc_per_node="$nproc" launch/pretrain.py --config configs/pretrain/tiny.yaml \
  "data.train_shards=$data_dir/shards/train-{000000..000015}.tar" \
  "data.val_shards=$data_dir/shards/val-{000000..000002}.tar" \
  data.micro_batch_size=$((128 / nproc)) "run.dir=$run_dir" "$@"
echo "demo done: run directory $run_dir (config.yaml, checkpoints/, tb/)"
echo "watch it: tensorboard --logdir $run_dir/tb"
