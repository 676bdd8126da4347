"""slurm/*.sbatch on a real two-node SLURM cluster on this machine (tests/slurm_cluster.py), all
through sbatch: a 2-node run equal to a 2-process torchrun, preemption -> checkpoint -> requeue
-> resume, of one array task alone, a warning during the last steps that does not requeue, the
pretrain -> fine-tune chain, a bad config that fails fast, an error that recurs once training
started, not retried, and a requeue SLURM refuses, which fails the job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from conftest import DIGITS, REPO, TINY, loss_curve, run_pretrain, shard_overrides
from slurm_cluster import Cluster, missing_binaries
from vitdist.config_yaml import load_config
from vitdist.model import build_model

pytestmark = [pytest.mark.slow, pytest.mark.slurm,
              pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM is not installed (missing: "
                                 f"{', '.join(missing_binaries())}); launch/test.sh installs it where it may")]

# The bitwise-reproducible runs of the other tests, one micro-batch per rank, checkpointed only
# at the end (or when preempted).
EXACT = [*conftest.EXACT, "data.micro_batch_size=32", "ckpt.every_steps=0"]
# One CPU rank per node; sbatch options override the scripts' GPU-sized #SBATCH lines.
CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster():
    """The cluster in VITDIST_SLURM_DIR (default /tmp/vitdist-slurm-<uid>): reused if running, else
    started here and stopped after these tests."""
    if os.getuid() != 0:
        pytest.skip("the test cluster runs munged, slurmctld and slurmd as root (SlurmUser=root)")
    try:
        cluster = Cluster().start()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the SLURM test cluster did not start here (CI fails on this): {e}")
    yield cluster
    if cluster.started:
        cluster.stop()


SUBMITTED: list[str] = []  # the jobs of the test running


@pytest.fixture(autouse=True)
def cancel_what_the_test_left(cluster):
    """A test that fails while its jobs run must not leave them training beside the next tests, on
    this machine's 2 cores (the cluster may be shared with other test runs: only this test's jobs)."""
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], env=cluster.env, capture_output=True)
        SUBMITTED.clear()


def sbatch(cluster: Cluster, log_dir: Path, script: str, *args: str, options: list[str] = (),
           env: dict[str, str] | None = None) -> int:
    env = {**cluster.env, "VITDIST_NPROC": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run(["sbatch", "--parsable", *CPU_NODES, f"--output={log_dir}/%x-%j.log", *options,
                          str(REPO / "slurm" / script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    job = int(out.stdout.strip().split(";")[0])
    SUBMITTED.append(str(job))
    return job


def job_field(cluster: Cluster, job_id: int | str, field: str) -> str | None:
    """A field of `scontrol show job` (job_id: a job id, or <array job id>_<task id> for one task)."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id), "-o"], env=cluster.env, capture_output=True,
                         text=True)
    match = re.search(rf"\b{field}=(\S+)", out.stdout)
    return match.group(1) if match else None


def job_state(cluster: Cluster, job_id: int | str) -> str:
    return job_field(cluster, job_id, "JobState") or "GONE"


def wait_for_line(cluster: Cluster, job_id: int | str, log_path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not (log_path.exists() and text in log_path.read_text()):
        assert time.time() < deadline and job_state(cluster, job_id) in ("PENDING", "RUNNING"), f"no {text!r}"
        time.sleep(0.2)


def wait_done(cluster: Cluster, job_id: int | str, timeout_s: float = 240) -> str:
    deadline = time.time() + timeout_s
    while (state := job_state(cluster, job_id)) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
        assert time.time() < deadline, f"job {job_id} still {state} after {timeout_s} s"
        time.sleep(1)
    return state


def job_log(log_dir: Path, name: str, job_id: int) -> str:
    return (log_dir / f"{name}-{job_id}.log").read_text()


def test_two_node_job_equals_two_process_torchrun(cluster, demo_shards, tmp_path):
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=6"]
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "FATAL").write_text("an earlier job's error\n")  # does not stop this one
    (tmp_path / "slurm" / "slurm_failures").write_text("1\n")  # an earlier job's: this one has its own
    # As sites that ask for --export: only the variables named (and SLURM's own) reach the job, and
    # its steps must still get the environment the batch script sets up (the venv, PYTHONPATH).
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *common, f"run.dir={tmp_path / 'slurm'}",
                 options=["--export=VITDIST_NPROC,OMP_NUM_THREADS"])
    reference = run_pretrain(2, [*common, f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert wait_done(cluster, job) == "COMPLETED"
    log = job_log(tmp_path, "vitdist-pretrain", job)
    assert "on 2 node(s) [node[1-2]] x 1 process(es)" in log and "restart 0" in log
    assert re.search(r"^0: \[rank [01]\] .*on node1", log, re.M) and re.search(r"^1: \[rank [01]\] .*on node2", log, re.M)
    assert "ddp over 2 rank(s)" in log
    assert (tmp_path / "slurm" / "checkpoints" / "step_6" / ".metadata").is_file()
    assert not (tmp_path / "slurm" / "FATAL").exists() and not (tmp_path / "slurm" / "slurm_failures").exists()
    assert list((tmp_path / "slurm" / "tb").glob("events.out.tfevents.*"))
    got = loss_curve(tmp_path / "slurm")
    assert [step for step, _ in got] == list(range(1, 7)) and got == loss_curve(tmp_path / "ref")


def test_bad_config_fails_fast_without_requeue(cluster, demo_shards, tmp_path):
    start = time.time()
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), "optim.lrr=1e-3",
                 f"run.dir={tmp_path / 'run'}")
    assert wait_done(cluster, job) == "FAILED"
    assert time.time() - start < 60
    log = job_log(tmp_path, "vitdist-pretrain", job)
    assert "config error:" in log and "lrr" in log
    assert "the config was refused (exit 2): not requeueing" in log
    assert "Restarts=0" in subprocess.run(["scontrol", "show", "job", str(job)], env=cluster.env, capture_output=True,
                                          text=True).stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_array_whose_tasks_would_share_a_run_dir_is_refused(cluster, demo_shards, tmp_path):
    """Tasks that shared run.dir would resume from, and overwrite, each other's checkpoints."""
    array = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards),
                   f"run.dir={tmp_path / 'sweep-%A'}", options=["--array=0-1", "--nodes=1"])
    for task in (0, 1):
        assert wait_done(cluster, f"{array}_{task}") == "FAILED"
        assert job_field(cluster, f"{array}_{task}", "Restarts") == "0"
    logs = [log.read_text() for log in tmp_path.glob("vitdist-pretrain-*.log")]  # one per task
    refusal = f"config error: run.dir={tmp_path / 'sweep-%A'} is shared by every task of array job {array}"
    assert len(logs) == 2 and all(refusal in log for log in logs), logs
    assert not list(tmp_path.glob("sweep-*"))
    # %j is each task's own job id, which a requeue keeps, as the default run.dir's: not refused.
    array = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), "train.steps=1",
                   "data.val_shards=null", f"run.dir={tmp_path / 'own-%j'}", options=["--array=0-1", "--nodes=1"])
    assert [wait_done(cluster, f"{array}_{task}") for task in (0, 1)] == ["COMPLETED"] * 2
    assert len([run for run in tmp_path.glob("own-*") if (run / "FINISHED").is_file()]) == 2


def test_an_error_that_recurs_is_neither_restarted_nor_requeued(cluster, demo_shards, tmp_path):
    """A fine-tune whose config and checkpoint pass the config check, then diverges (optim.lr=1e30):
    its NaN steps stop it, torchrun's 3 restarts exit at once and the job is not requeued. (A file
    that is not a checkpoint no longer reaches training: the check refuses it.)"""
    torch.save(build_model(load_config(TINY).model).state_dict(), tmp_path / "init.pt")
    run_dir = tmp_path / "run"
    start = time.time()
    job = sbatch(cluster, tmp_path, "finetune.sbatch", str(TINY), *shard_overrides(demo_shards),
                 f"finetune.init={tmp_path / 'init.pt'}", f"run.dir={run_dir}", "optim.lr=1e30", "optim.min_lr=1e30",
                 "optim.warmup_steps=1", "train.max_bad_steps=1", "log.every_steps=1", "train.global_batch_size=32",
                 "data.micro_batch_size=16")
    assert wait_done(cluster, job) == "FAILED"
    assert time.time() - start < 90
    log = job_log(tmp_path, "vitdist-finetune", job)
    error = (run_dir / "FATAL").read_text().removesuffix("\n")
    assert re.match(r"1 steps in a row up to step \d+ had a NaN/Inf loss or gradient norm \(train.max_bad_steps=1\)",
                    error), error
    assert log.count(f"error: {error} (recurs: not retried, see {run_dir / 'FATAL'})") == 3, log[-3000:]
    assert f"on an error that a retry meets again: {error}" in log and "not requeueing" in log
    assert "Restarts=0" in subprocess.run(["scontrol", "show", "job", str(job)], env=cluster.env, capture_output=True,
                                          text=True).stdout
    assert not (run_dir / "slurm_failures").exists()


def test_a_second_job_in_a_run_dir_in_use_is_refused(cluster, demo_shards, tmp_path):
    """Resubmitted while the first job still trains there, a job would resume from the first one's
    checkpoint and train beside it: both writing the same checkpoints, every step logged twice."""
    run_dir = tmp_path / "run"
    first = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                   "train.steps=5000", "ckpt.every_steps=2", f"run.dir={run_dir}")
    wait_for_line(cluster, first, tmp_path / f"vitdist-pretrain-{first}.log", "step 3/5000")
    second = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                    "train.steps=5000", f"run.dir={run_dir}")
    assert wait_done(cluster, second, timeout_s=120) == "FAILED"
    log = job_log(tmp_path, "vitdist-pretrain", second)
    assert f"config error: run.dir={run_dir} is in use by job {first} (RUNNING" in log
    assert "resumed from" not in log and "step 1/" not in log
    assert job_state(cluster, first) == "RUNNING" and (run_dir / "slurm_job").read_text().strip() == str(first)


def test_a_cancelled_job_checkpoints_and_stays_cancelled(cluster, demo_shards, tmp_path):
    """scancel sends SIGTERM, as a preemption does: the ranks checkpoint, but the job the user
    cancelled must not requeue itself and train again."""
    run_dir = tmp_path / "run"
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                 "train.steps=5000", f"run.dir={run_dir}")
    log_path = tmp_path / f"vitdist-pretrain-{job}.log"
    wait_for_line(cluster, job, log_path, "step 3/5000")
    subprocess.run(["scancel", str(job)], env=cluster.env, check=True)
    deadline = time.time() + 60
    while "requeueing" not in log_path.read_text():  # the batch shell's last word, either way
        assert time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)
    assert job_state(cluster, job) == "CANCELLED" and job_field(cluster, job, "Restarts") == "0"
    log = log_path.read_text()
    assert "ended by SLURM (scancel, or scontrol requeue, which requeues it itself): not requeueing (preempted: SIGTERM" in log
    assert f"resubmitted with run.dir={run_dir}" in log and "preempted at step" in log


def test_usr1_checkpoints_requeues_and_the_same_job_resumes(cluster, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    # Steps of 256 images: steps of 64 took the run from step 3 to its last step before the signal
    # reached the ranks, the test sharing the 2 cores with another (the run then finishes, rightly).
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                 "train.global_batch_size=256", "train.steps=12", f"run.dir={run_dir}")
    log_path = tmp_path / f"vitdist-pretrain-{job}.log"
    wait_for_line(cluster, job, log_path, "step 3/12")
    # What SLURM does before a time limit with --signal=B:USR1@N: a signal to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env, check=True)
    assert wait_done(cluster, job, timeout_s=300) == "COMPLETED"
    log = log_path.read_text()
    step, newest = map(int, re.search(r"preempted at step (\d+): exiting with 75; the newest complete checkpoint is "
                                      r".*step_(\d+)", log).groups())
    assert newest == step  # written at the step the signal stopped
    assert 3 <= step < 12
    assert f"requeueing job {job} (preempted: SIGUSR1" in log and "restart 1:" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step}'} at step {step}" in log
    assert f"steps {step} -> 12" in log and "finished: run dir" in log
    assert [step for step, _ in loss_curve(run_dir)] == list(range(1, 13))  # no step lost or repeated


def test_a_warning_before_sruns_step_began_reaches_the_ranks_once_it_runs(cluster, demo_shards, tmp_path):
    """scancel signals only the steps running: a warning between the config check and the start of
    srun's step reached no rank, and the run trained on, to be killed at the time limit, neither
    checkpointed nor requeued. It is sent again once the step runs. Here srun starts 4 s late (a
    wrapper first on PATH, which marks when it began), and the warning comes meanwhile."""
    shim, run_dir = tmp_path / "shim", tmp_path / "run"
    shim.mkdir()
    (shim / "srun").write_text(f"#!/bin/sh\ntouch {shim}/began\nsleep 4\nexec {shutil.which('srun')} \"$@\"\n")
    (shim / "srun").chmod(0o755)
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                 "train.global_batch_size=256", "train.steps=4", f"run.dir={run_dir}", options=["--nodes=1"],
                 env={"PATH": f"{shim}:{os.environ['PATH']}"})
    log_path = tmp_path / f"vitdist-pretrain-{job}.log"
    conftest.wait_for(lambda: (shim / "began").exists(), timeout_s=120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env, check=True)
    assert wait_done(cluster, job, timeout_s=300) == "COMPLETED"
    log = log_path.read_text()
    assert "SIGUSR1 came before srun's step began: sending it to the step now" in log, log[-3000:]
    assert f"requeueing job {job} (preempted: SIGUSR1" in log and "restart 1:" in log
    assert "finished: run dir" in log
    assert [step for step, _ in loss_curve(run_dir)] == list(range(1, 5))  # no step lost or repeated


def test_a_requeue_that_slurm_refuses_fails_the_job(cluster, tmp_path):
    """Exit 0 after a refused requeue would mark the preempted job COMPLETED, and start a fine-tune
    waiting on it (afterok) from an unfinished run: the job fails, saying how to resume."""
    job = subprocess.run(["sbatch", "--parsable", "--no-requeue", f"--output={tmp_path}/sleep.log", "--wrap",
                          "sleep 120"], env=cluster.env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        script = f'source {REPO}/slurm/common.sh; VITDIST_JOB={job} run_dir=runs/x; vitdist_requeue "preempted"'
        out = subprocess.run(["bash", "-c", script], env=cluster.env, capture_output=True, text=True)
    finally:
        subprocess.run(["scancel", job], env=cluster.env, check=True)
    assert out.returncode == 75, out.stdout + out.stderr
    assert f"requeueing job {job} (preempted)" in out.stdout
    assert ("SLURM refused the requeue: the job fails unfinished; resubmit it with run.dir=runs/x to resume from "
            "its newest checkpoint") in out.stdout


def test_usr1_to_one_array_task_requeues_that_task_only(cluster, demo_shards, tmp_path):
    """One task of an array has the array's job id, which scancel and scontrol take for every task:
    the warning to that task checkpoints and requeues it alone, and the other trains through.
    run.dir's %a gives each task its own run directory."""
    # Steps of 256 images: the two tasks share this machine's 2 cores with the test and SLURM's daemons,
    # and the signal must come while both train.
    array = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                   "train.global_batch_size=256", "train.steps=10", f"run.dir={tmp_path / 'run-%a'}",
                   options=["--array=0-1", "--nodes=1"])
    jobs = {}  # task id -> the task's own job id, once it runs (a pending array is one record)
    deadline = time.time() + 60
    while len(jobs) < 2:
        assert time.time() < deadline, f"the tasks of array {array} did not both start"
        jobs = {task: int(job_field(cluster, f"{array}_{task}", "JobId")) for task in (0, 1)
                if job_state(cluster, f"{array}_{task}") == "RUNNING"}
        time.sleep(0.2)
    [signalled] = [task for task, job in jobs.items() if job == array]
    other = 1 - signalled
    logs = {task: tmp_path / f"vitdist-pretrain-{job}.log" for task, job in jobs.items()}
    wait_for_line(cluster, f"{array}_{signalled}", logs[signalled], "step 2/10")
    assert job_state(cluster, f"{array}_{other}") == "RUNNING"
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_{signalled}"], env=cluster.env, check=True)
    for task in (0, 1):
        assert wait_done(cluster, f"{array}_{task}", timeout_s=300) == "COMPLETED"
    log = logs[other].read_text()
    assert "SIGUSR1" not in log and "SIGTERM" not in log and "preempted" not in log and "requeueing" not in log
    assert "restart 1:" not in log and f"run dir {tmp_path / f'run-{other}'}" in log
    assert job_field(cluster, f"{array}_{other}", "Restarts") == "0"
    log = logs[signalled].read_text()
    assert f"requeueing job {array}_{signalled} (preempted: SIGUSR1" in log and "restart 1:" in log
    assert re.search(r"resumed from .*step_\d+ at step \d+", log) and "finished: run dir" in log
    assert job_field(cluster, f"{array}_{signalled}", "Restarts") == "1"
    for task in (0, 1):  # no step lost or repeated
        assert [step for step, _ in loss_curve(tmp_path / f"run-{task}")] == list(range(1, 11))


def test_a_run_that_finishes_after_the_warning_is_done_not_requeued(cluster, demo_shards, tmp_path):
    """The time-limit warning during the last steps comes too late to stop the run (vitdist.train
    trains to the end): the job completes, rather than being queued again to find nothing to train,
    although torchrun, given SIGTERM too, exits 1."""
    run_dir = tmp_path / "run"
    # Steps of 512 images (about 0.6 s each here), so that the last two outlast the signal's way.
    job = sbatch(cluster, tmp_path, "pretrain.sbatch", str(TINY), *shard_overrides(demo_shards), *EXACT,
                 "train.global_batch_size=512", "train.steps=5", f"run.dir={run_dir}", options=["--nodes=1"])
    log_path = tmp_path / f"vitdist-pretrain-{job}.log"
    # The ranks agree on a signal one step after they get it: from here on, too late to preempt.
    wait_for_line(cluster, job, log_path, "step 3/5")
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env, check=True)
    assert wait_done(cluster, job) == "COMPLETED"
    log = log_path.read_text()
    assert job_field(cluster, job, "Restarts") == "0"
    assert "preempted" not in log and "requeueing job" not in log and "restart 1:" not in log
    assert "finished: run dir" in log and "(SIGUSR1 came during the last steps: not requeueing)" in log, log[-3000:]
    assert [step for step, _ in loss_curve(run_dir)] == list(range(1, 6))
    assert (run_dir / "FINISHED").read_text() == f"{run_dir / 'checkpoints' / 'step_5'}\n"


def test_pipeline_finetunes_from_the_final_pretraining_checkpoint(cluster, demo_shards, tmp_path):
    """The pretraining run.dir under ~ (home: tmp_path), which the shell leaves as it is after
    `run.dir=`: the fine-tune starts from it. The scripts took it for a folder named ~ in the
    repository: the fine-tune's finetune.init did not exist there."""
    from vitdist.demo_data import write_digits_dataset

    digits = write_digits_dataset(tmp_path / "digits", streams=4)
    # Another home: the jobs' python is the tests' own, which a pyenv shim would no longer find.
    env = {**cluster.env, "VITDIST_NPROC": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "VITDIST_VENV": sys.prefix, "VITDIST_SBATCH_ARGS": f"{' '.join(CPU_NODES)} --output={tmp_path}/%x-%j.log"}
    out = subprocess.run([str(REPO / "slurm" / "submit_pipeline.sh"), str(TINY), str(DIGITS),
                          *shard_overrides(demo_shards), *EXACT, "train.steps=4", "run.dir=~/pre-%j", "--",
                          *shard_overrides(digits), "data.streams=4", "train.steps=3", "train.global_batch_size=64",
                          "data.micro_batch_size=32", "train.eval_every_steps=0", f"run.dir={tmp_path}/%x-ft"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    pre_job = int(re.search(r"pretrain job: (\d+)", out).group(1))
    ft_job = int(re.search(r"finetune job: (\d+)", out).group(1))
    SUBMITTED.extend([str(pre_job), str(ft_job)])
    pre_dir, ft_dir = tmp_path / f"pre-{pre_job}", tmp_path / "vitdist-finetune-ft"  # run.dir's %j and %x
    assert f"tensorboard --logdir_spec pretrain:{pre_dir}/tb,finetune:{ft_dir}/tb" in out
    assert job_state(cluster, ft_job) == "PENDING"  # waits for the pretraining job
    assert wait_done(cluster, pre_job) == "COMPLETED"
    assert wait_done(cluster, ft_job) == "COMPLETED"
    log = job_log(tmp_path, "vitdist-finetune", ft_job)
    assert f"initialised from {pre_dir / 'checkpoints' / 'step_4'} (vitdist checkpoint)" in log  # the final one
    assert "steps 0 -> 3" in log and (ft_dir / "checkpoints" / "step_3").is_dir()
    assert not (REPO / "~").exists()
