"""slurm/common.sh's decisions (what it signals, requeues or reports) with the SLURM commands,
srun and python replaced by stubs that record their arguments: no cluster needed, unlike
tests/test_slurm.py, which runs the scripts on a real one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

# srun's stand-in: the batch shell gets `signal` (as SLURM sends it before a time limit) while
# the step runs, then the step exits with `rc`.
SRUN = """#!/bin/bash
echo "srun $*" >> "$CALLS"
[ -n "$STEP_SIGNAL" ] && kill -"$STEP_SIGNAL" "$PPID"
sleep 0.5
exit "$STEP_RC"
"""
RECORD = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
[ "$1 $2" = "show hostnames" ] && echo node1
exit 0
"""


def run_main(tmp_path: Path, step_rc: int, step_signal: str = "", **slurm_env: str) -> tuple[str, list[str]]:
    """`vitdist_slurm_main pretrain` as a batch job would run it; its log and the commands it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", SRUN), ("scancel", RECORD), ("scontrol", RECORD), ("python", RECORD)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STEP_RC": str(step_rc),
           "STEP_SIGNAL": step_signal, "VITDIST_REPO": str(REPO), "VITDIST_VENV": str(tmp_path / "no-venv"),
           "SLURM_JOB_ID": "100", "SLURM_JOB_NAME": "vitdist-pretrain", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "node1", **slurm_env}
    script = 'source slurm/common.sh && vitdist_slurm_main pretrain config.yaml "run.dir=$RUN_DIR"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env={**env, "RUN_DIR": str(tmp_path / "run")},
                         capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr, calls.read_text().splitlines()


def test_an_array_task_signals_and_requeues_only_itself(tmp_path):
    """The array's first task has the array's job id: scancel and scontrol given that id act on
    every task of the array, so each task is named by <array job id>_<task id>."""
    log, calls = run_main(tmp_path, 1, "USR1", SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="3")
    assert "scancel --signal=TERM 100_3" in calls, log
    assert "scontrol requeue 100_3" in calls, log
    assert "requeueing job 100_3 (preempted: SIGUSR1" in log


def test_a_run_that_finished_after_the_warning_is_not_requeued(tmp_path):
    """The time-limit warning came during the last steps, which end the run anyway (vitdist.train):
    the step exits 0 and the job is done, rather than queued again to find nothing to train."""
    log, calls = run_main(tmp_path, 0, "USR1")
    assert "scancel --signal=TERM 100" in calls
    assert not [call for call in calls if call.startswith("scontrol requeue")], log
    assert "finished: run dir" in log


def test_steps_get_the_environment_the_script_set_up_under_export_none(tmp_path):
    """`sbatch --export=NONE` (what many sites advise) leaves SLURM_EXPORT_ENV=NONE in the job,
    which srun takes as its own --export (man sbatch): torchrun would start without the venv's
    PATH, PYTHONPATH, OMP_NUM_THREADS, TORCH_ELASTIC_SHUTDOWN_TIMEOUT or NCCL_SOCKET_IFNAME."""
    log, calls = run_main(tmp_path, 0, SLURM_EXPORT_ENV="NONE")
    [srun] = [call for call in calls if call.startswith("srun ")]
    assert " --export=ALL " in srun, log
