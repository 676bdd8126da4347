# Sourced by slurm/pretrain.sbatch and slurm/finetune.sbatch: one torchrun per node under srun,
# the config checked first, and requeue on preemption (or, a limited number of times, on a failure
# that may not recur: never after one the ranks marked in <run.dir>/FATAL, see vitdist/entry.py).
#
# Environment (all optional):
#   VITDIST_REPO            the repository (default: the directory sbatch was run from)
#   VITDIST_VENV            a virtual environment to activate (default: <repo>/.venv if present,
#                           else the python on PATH)
#   VITDIST_NPROC           processes per node (default: the GPUs allocated on the node, else 1)
#   VITDIST_IFNAME          network interface for NCCL and gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
#   VITDIST_MAX_FAILURES    requeues after a failure (not a preemption) before giving up (default 1)
#   VITDIST_SHUTDOWN_S      seconds torchrun gives the ranks to checkpoint after a signal (default 240:
#                           the scripts' 300 s warning less a minute for the requeue; keep it below
#                           your --signal lead; torch releases from before TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#                           give them 30)
#   VITDIST_MAX_RESTARTS    times torchrun restarts a node's ranks in place after one fails (default 3)

vitdist_log() { echo "vitdist-slurm [$(date +%H:%M:%S)] $*"; }

# The job to signal and requeue. One task of an array (the last, on Slurm 22.05) has the array's
# job id, which scancel and scontrol take for every task: a task is named <array job id>_<task id>.
VITDIST_JOB=${SLURM_ARRAY_TASK_ID:+${SLURM_ARRAY_JOB_ID:-}_$SLURM_ARRAY_TASK_ID}
VITDIST_JOB=${VITDIST_JOB:-${SLURM_JOB_ID:-}}

# vitdist_job_patterns TEXT JOB_ID JOB_NAME [ARRAY_JOB_ID ARRAY_TASK_ID]: TEXT with sbatch's
# --output patterns replaced as sbatch does: %j the job id, %x the job name, %A the array's job id
# (the job id outside an array), %a the task id (4294967294 outside an array); and a leading ~ or
# ~user is the home directory, as the ranks read run.dir (the shell leaves it as it is after `run.dir=`).
vitdist_job_patterns() {
  local text=$1 user home
  if [[ $text == "~"* ]]; then
    user=${text%%/*} user=${user#"~"} home=$HOME
    if [ -n "$user" ]; then
      home=$(getent passwd "$user" | cut -d: -f6) || home=""  # under set -e, an unknown user is no exit
    fi
    [ -n "$home" ] && text=$home${text#"~$user"}  # an unknown user's ~name stays as it is, as Python leaves it
  fi
  text=${text//"%j"/$2}
  text=${text//"%A"/${4:-$2}}
  text=${text//"%a"/${5:-4294967294}}
  # The job name quoted: unquoted, bash 5.2 puts the "%x" matched in place of each & in it.
  echo "${text//"%x"/"$3"}"
}

# vitdist_quoted TEXT: TEXT as a shell word, in single quotes only where it needs them (as Python's
# shlex.quote, which vitdist's own printed commands use): a path with a space pastes as printed.
vitdist_quoted() {
  case $1 in
    "" | *[!A-Za-z0-9_@%+=:,./-]*) echo "'${1//\'/\'\\\'\'}'" ;;
    *) echo "$1" ;;
  esac
}

# Make the repository's code importable: the venv if any, and the repository on PYTHONPATH.
vitdist_python_env() {
  local venv=${VITDIST_VENV:-$VITDIST_REPO/.venv}
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
  export PYTHONPATH="$VITDIST_REPO${PYTHONPATH:+:$PYTHONPATH}"
}

# The address other nodes reach the first node at: its NodeAddr in SLURM (the hostname on most
# clusters; several nodes on one host in the tests).
vitdist_head_addr() {
  local head addr
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$head" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$head}"
}

# Forward a warning signal to every rank of every node (SIGTERM to the job's steps: torchrun
# passes it on to its ranks, each finishes its step and the next, checkpoints and exits 75).
# scancel signals only the steps running: one that came before srun's step began reached nothing
# (and scancel says nothing of it), so it is marked to be sent again once the step runs.
vitdist_on_signal() {
  vitdist_log "received SIG$1: the ranks checkpoint, then the job requeues"
  VITDIST_SIGNALLED=$1
  VITDIST_TRAPS=$(( VITDIST_TRAPS + 1 ))
  vitdist_step_running || VITDIST_UNDELIVERED=1
  scancel --signal=TERM "$VITDIST_JOB"
}

# Whether srun's step runs (one of the job's steps other than the batch shell's and the extern one).
vitdist_step_running() {
  squeue --steps --noheader --jobs="$VITDIST_JOB" --format=%i 2>/dev/null | grep -qv -e '\.batch$' -e '\.extern$'
}

# A signal that reached no step (see vitdist_on_signal) goes to srun's step once it runs; while
# srun starts it, or until srun ends without one.
vitdist_deliver_undelivered() {
  while [ -n "$VITDIST_UNDELIVERED" ] && kill -0 "$1" 2>/dev/null; do
    if vitdist_step_running; then
      vitdist_log "SIG$VITDIST_SIGNALLED came before srun's step began: sending it to the step now"
      scancel --signal=TERM "$VITDIST_JOB"
      VITDIST_UNDELIVERED=""
    else
      sleep 1
    fi
  done
}

# Whether the job was cancelled (scancel): SLURM then sends SIGTERM as for a preemption, and requeueing
# would bring back the job the user just cancelled. A cancelled job shows CANCELLED (COMPLETING while
# its processes end) at once, with no reason, as does one that `scontrol requeue` ends (SLURM requeues
# that one itself); one at its time limit has Reason=TimeLimit, a preempted one a PreemptTime; one
# warned by --signal is still RUNNING.
vitdist_cancelled() {
  local info
  info=$(scontrol show job "$VITDIST_JOB" -o 2>/dev/null) || return 1
  [[ $info =~ JobState=(CANCELLED|COMPLETING)\  && $info == *" Reason=None "* && ! $info =~ PreemptTime=[0-9] ]]
}

# Exits 0 once SLURM has the job back in its queue. A requeue it refuses (a job submitted with
# --no-requeue, the controller unreachable) fails the job: exit 0 would mark it COMPLETED, and a
# job waiting on it (--dependency=afterok, as the fine-tune of slurm/submit_pipeline.sh) would start.
# Called from vitdist_slurm_main, whose run_dir it names.
vitdist_requeue() {
  trap - USR1 TERM
  if vitdist_cancelled; then
    vitdist_log "ended by SLURM (scancel, or scontrol requeue, which requeues it itself): not requeueing" \
                "($1); a cancelled job resumes from its newest checkpoint when resubmitted with $(vitdist_quoted "run.dir=$run_dir")"
    exit 75
  fi
  vitdist_log "requeueing job $VITDIST_JOB ($1)"
  if ! scontrol requeue "$VITDIST_JOB"; then
    vitdist_log "SLURM refused the requeue: the job fails unfinished; resubmit it with $(vitdist_quoted "run.dir=$run_dir")" \
                "to resume from its newest checkpoint"
    exit 75
  fi
  exit 0
}

# vitdist_claim_run_dir RUN_DIR: one job at a time in a run directory. A second job there (resubmitted
# while the first still runs, or queued) would resume from the first one's checkpoint and train beside
# it: both writing the same checkpoints (failing on each other's partial ones) and every step logged
# twice in TensorBoard. The job that holds it is in <run dir>/slurm_job, and holds it while squeue
# lists it (pending, requeued or running); a requeue of the same job holds it still.
vitdist_claim_run_dir() {
  vitdist_refuse_if_held "$1"
  mkdir -p "$1" && echo "$VITDIST_JOB" > "$1/slurm_job"
}

# vitdist_refuse_if_held RUN_DIR: exit 2, naming the job, if another job holds it (see above).
vitdist_refuse_if_held() {
  local holder_file=$1/slurm_job holder state
  holder=$(cat "$holder_file" 2>/dev/null)
  if [ -n "$holder" ] && [ "$holder" != "$VITDIST_JOB" ]; then
    state=$(squeue --noheader --jobs="$holder" --format=%T 2>/dev/null | head -n 1)
    if [ -n "$state" ]; then
      echo "config error: run.dir=$1 is in use by job $holder ($state, named in $holder_file): two jobs" \
           "there would train the same steps and overwrite each other's checkpoints; wait for it to end," \
           "or give this job another run.dir" >&2
      exit 2
    fi
  fi
}

# vitdist_slurm_main pretrain|finetune CONFIG.yaml [key=value ...]
vitdist_slurm_main() {
  local launcher=$1
  if [ $# -lt 2 ]; then
    echo "usage: sbatch slurm/$launcher.sbatch CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
  fi
  local config=$2
  shift 2
  local overrides=() run_dir="" arg
  for arg in "$@"; do
    case $arg in
      run.dir=*)  # each task of an array its own: run.dir=runs/sweep-%A_%a
        if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [[ $arg != *%a* && $arg != *%j* ]]; then
          echo "config error: run.dir=${arg#run.dir=} is shared by every task of array job $SLURM_ARRAY_JOB_ID: they would" \
               "resume from and overwrite each other's checkpoints; give each its own with %a or %j" \
               "(run.dir=runs/sweep-%A_%a)" >&2
          exit 2
        fi
        run_dir=$(vitdist_job_patterns "${arg#run.dir=}" "$SLURM_JOB_ID" "$SLURM_JOB_NAME" \
                                       "${SLURM_ARRAY_JOB_ID:-}" "${SLURM_ARRAY_TASK_ID:-}")
        arg=run.dir=$run_dir ;;
    esac
    overrides+=("$arg")
  done
  if [ -z "$run_dir" ]; then  # named after the job, the same across requeues: resume finds it
    run_dir=runs/$SLURM_JOB_NAME-$SLURM_JOB_ID
    overrides+=("run.dir=$run_dir")
  fi

  cd "$VITDIST_REPO" || exit 2
  vitdist_python_env
  local nproc=${VITDIST_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
  # Read by torchrun itself: its --shutdown_timeout flag is refused by releases that predate it.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${VITDIST_SHUTDOWN_S:-240}
  if [ -n "${VITDIST_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME=$VITDIST_IFNAME GLOO_SOCKET_IFNAME=$VITDIST_IFNAME
  fi
  local addr port
  addr=$(vitdist_head_addr)
  # Per job, so that two jobs sharing a node do not collide; below Linux's ephemeral ports
  # (32768-60999), which any process may hold, and above the test cluster's (tests/slurm_cluster.py).
  port=$(( 20000 + SLURM_JOB_ID % 12000 ))
  vitdist_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}: $launcher $config" \
              "on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST] x $nproc process(es), rendezvous $addr:$port," \
              "OMP_NUM_THREADS=$OMP_NUM_THREADS, run dir $run_dir, python $(command -v python)"

  # The batch shell runs its traps only while it waits on a background child (or between
  # commands): srun runs in the background and the shell waits, again after each trap.
  VITDIST_SIGNALLED="" VITDIST_TRAPS=0 VITDIST_UNDELIVERED=""
  trap 'vitdist_on_signal USR1' USR1
  trap 'vitdist_on_signal TERM' TERM

  # Before the check, which would refuse a run.dir a run holds without naming its job.
  vitdist_refuse_if_held "$run_dir"
  # The check and the ranks' rank 0 take the run.dir lock as a run by hand does, passing over one an
  # earlier attempt of this job left on a node that crashed (vitdist/run_lock.py): a run by hand
  # there is refused by the check, before anything here is written or deleted.
  export VITDIST_SLURM_JOB=$VITDIST_JOB
  # A bad config fails here, once, with exit 2 and its reason, and is never requeued. The check
  # failing otherwise (killed by the OOM killer, a storage error) is a failure as training's are.
  WORLD_SIZE=$(( SLURM_NNODES * nproc )) python "launch/$launcher.py" --config "$config" --check "${overrides[@]}"
  local rc=$?
  if [ $rc -eq 2 ]; then
    vitdist_log "the config was refused (exit $rc): not requeueing"
    exit $rc
  fi

  if [ -n "$VITDIST_SIGNALLED" ]; then  # warned before training started: nothing to save
    vitdist_requeue "SIG$VITDIST_SIGNALLED before training started"
  fi
  vitdist_claim_run_dir "$run_dir"
  # Written by the ranks once they have trained to the end, and on an error that recurs: an
  # earlier job's would end this one as finished, or fail it without a requeue on its old error.
  rm -f "$run_dir/FINISHED" "$run_dir/FATAL"
  if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then  # a new job, not a requeue: its own VITDIST_MAX_FAILURES
    rm -f "$run_dir/slurm_failures"
  fi
  if [ $rc -ne 0 ]; then
    vitdist_log "the config check failed with exit $rc, not on the config: no training, counted as a failure"
  else
    # Since Slurm 22.05 a step does not inherit the job's --cpus-per-task: without it, torchrun and
    # all its ranks' loader workers would share one core. --export=ALL: the step gets the environment
    # set up here even when the job was submitted with --export=NONE, which steps inherit otherwise.
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --label --export=ALL \
      ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"} \
      python -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc" \
        --rdzv_backend=c10d --rdzv_endpoint="$addr:$port" --rdzv_id="$SLURM_JOB_ID" \
        --max-restarts="${VITDIST_MAX_RESTARTS:-3}" \
        "launch/$launcher.py" --config "$config" "${overrides[@]}" &
    local srun_pid=$!
    while true; do
      vitdist_deliver_undelivered "$srun_pid"
      local traps_before=$VITDIST_TRAPS
      wait "$srun_pid"
      rc=$?
      if [ $rc -gt 128 ] && [ "$VITDIST_TRAPS" -ne "$traps_before" ]; then
        continue  # wait was interrupted by the trap: the ranks are still checkpointing
      fi
      break
    done
  fi

  # First: a warning during the last steps comes too late to stop the run, which then finishes.
  # torchrun, given SIGTERM itself, exits 1 even so: the ranks' FINISHED tells.
  if [ $rc -eq 0 ] || [ -f "$run_dir/FINISHED" ]; then
    local note=""
    [ -n "$VITDIST_SIGNALLED" ] && note=" (SIG$VITDIST_SIGNALLED came during the last steps: not requeueing)"
    [ $rc -ne 0 ] && note="$note (srun exit $rc after every rank had trained to the end)"
    vitdist_log "finished: run dir $run_dir$note"
    exit 0
  fi
  if [ -n "$VITDIST_SIGNALLED" ]; then
    vitdist_requeue "preempted: SIG$VITDIST_SIGNALLED, srun exit $rc"
  fi
  if [ -f "$run_dir/FATAL" ]; then
    vitdist_log "failed with exit $rc on an error that a retry meets again: $(cat "$run_dir/FATAL")" \
                "(in $run_dir/FATAL): not requeueing"
    exit $rc
  fi
  local failures_file=$run_dir/slurm_failures failures=0
  [ -f "$failures_file" ] && failures=$(cat "$failures_file")
  if [ "$failures" -lt "${VITDIST_MAX_FAILURES:-1}" ]; then
    mkdir -p "$run_dir" && echo $(( failures + 1 )) > "$failures_file"
    vitdist_requeue "failed with exit $rc: failure $(( failures + 1 )) of ${VITDIST_MAX_FAILURES:-1} allowed"
  fi
  vitdist_log "failed with exit $rc after $failures requeue(s) for failures: giving up"
  exit $rc
}
