#!/usr/bin/env bash
# Pretrain, then fine-tune from the pretraining run's final checkpoint, as two SLURM jobs:
#   slurm/submit_pipeline.sh PRETRAIN.yaml FINETUNE.yaml [pretrain key=value ...] [-- finetune key=value ...]
# The fine-tune job waits for the pretraining job to succeed (--dependency=afterok) and starts from
# <pretraining run dir>/checkpoints, whose newest complete checkpoint is the final one.
# Extra sbatch options for both jobs: VITDIST_SBATCH_ARGS="--partition=p --account=a".
# Prints both job ids and the TensorBoard command that shows both runs.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
pretrain_config=$1 finetune_config=$2
shift 2
pretrain_args=() finetune_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pretrain_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
finetune_args=("$@")
read -r -a sbatch_args <<< "${VITDIST_SBATCH_ARGS:-}"

pretrain_job=$(sbatch --parsable "${sbatch_args[@]}" slurm/pretrain.sbatch "$pretrain_config" "${pretrain_args[@]}")
pretrain_job=${pretrain_job%%;*}
# The pretraining run's directory: as given, else the one slurm/common.sh names after the job.
pretrain_dir=""
for arg in "${pretrain_args[@]}"; do
  case $arg in run.dir=*) pretrain_dir=${arg#run.dir=} ;; esac
done
if [ -z "$pretrain_dir" ]; then
  job_name=$(scontrol show job "$pretrain_job" -o | sed -n 's/.*JobName=\([^ ]*\).*/\1/p')
  pretrain_dir=runs/$job_name-$pretrain_job
fi
case $pretrain_dir in /*) ;; *) pretrain_dir=$PWD/$pretrain_dir ;; esac

finetune_job=$(sbatch --parsable "${sbatch_args[@]}" --dependency="afterok:$pretrain_job" --kill-on-invalid-dep=yes \
  slurm/finetune.sbatch "$finetune_config" "finetune.init=$pretrain_dir/checkpoints" "${finetune_args[@]}")
finetune_job=${finetune_job%%;*}
finetune_dir=""
for arg in "${finetune_args[@]}"; do
  case $arg in run.dir=*) finetune_dir=${arg#run.dir=} ;; esac
done
if [ -z "$finetune_dir" ]; then
  job_name=$(scontrol show job "$finetune_job" -o | sed -n 's/.*JobName=\([^ ]*\).*/\1/p')
  finetune_dir=runs/$job_name-$finetune_job
fi
case $finetune_dir in /*) ;; *) finetune_dir=$PWD/$finetune_dir ;; esac

echo "pretrain job: $pretrain_job (run dir $pretrain_dir)"
echo "finetune job: $finetune_job (run dir $finetune_dir, after $pretrain_job succeeds, from $pretrain_dir/checkpoints)"
echo "tensorboard: tensorboard --logdir_spec pretrain:$pretrain_dir/tb,finetune:$finetune_dir/tb"
