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
# Arrays that may be empty expand as ${a[@]+"${a[@]}"}: bash <= 4.3 calls "${a[@]}" unbound under set -u.

# shellcheck source=common.sh
source slurm/common.sh

# A job's run directory, absolute: run.dir=... if given (its %j, %x as the job gets them), else the
# one slurm/common.sh names after the job.
run_dir_of() {
  local job=$1 dir="" arg name
  shift
  name=$(squeue -h -j "$job" -o %j)  # whole, spaces too
  for arg in "$@"; do
    case $arg in run.dir=*) dir=$(vitdist_job_patterns "${arg#run.dir=}" "$job" "$name") ;; esac
  done
  if [ -z "$dir" ]; then
    dir=runs/$name-$job
  fi
  case $dir in /*) echo "$dir" ;; *) echo "$PWD/$dir" ;; esac
}

pretrain_job=$(sbatch --parsable ${sbatch_args[@]+"${sbatch_args[@]}"} slurm/pretrain.sbatch "$pretrain_config" ${pretrain_args[@]+"${pretrain_args[@]}"})
pretrain_job=${pretrain_job%%;*}
pretrain_dir=$(run_dir_of "$pretrain_job" ${pretrain_args[@]+"${pretrain_args[@]}"})

finetune_job=$(sbatch --parsable ${sbatch_args[@]+"${sbatch_args[@]}"} --dependency="afterok:$pretrain_job" --kill-on-invalid-dep=yes \
  slurm/finetune.sbatch "$finetune_config" "finetune.init=$pretrain_dir/checkpoints" ${finetune_args[@]+"${finetune_args[@]}"})
finetune_job=${finetune_job%%;*}
finetune_dir=$(run_dir_of "$finetune_job" ${finetune_args[@]+"${finetune_args[@]}"})

echo "pretrain job: $pretrain_job (run dir $pretrain_dir)"
echo "finetune job: $finetune_job (run dir $finetune_dir, after $pretrain_job succeeds, from $pretrain_dir/checkpoints)"
echo "tensorboard: tensorboard --logdir_spec $(vitdist_quoted "pretrain:$pretrain_dir/tb,finetune:$finetune_dir/tb")"
