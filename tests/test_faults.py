"""A rank dies or hangs: torchrun restarts the group and the run resumes exactly; a rank left
waiting on a dead or silent peer exits within `dist.timeout_s`, naming the peer."""

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import (EXACT, background_pretrain, children, descendants, gone, killing, loss_curve, outliving, run_pretrain,
                      running, shard_overrides, still_running, wait_for, worker_pid)
from vitdist.shard_list import expand_urls
from vitdist.distributed import _free_port

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # dist.timeout_s in these tests
# The failure's report window (distributed.lost_contact) and the exit itself, on a loaded 2-core machine.
MARGIN_S = 15


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_resumes_bitwise(demo_shards, tmp_path):
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=12", "data.micro_batch_size=32",
              f"dist.timeout_s={TIMEOUT_S}"]
    reference = run_pretrain(2, [*common, f"run.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir, log_path = tmp_path / "killed", tmp_path / "killed.log"
    with background_pretrain(2, [*common, f"run.dir={run_dir}"], log_path,
                             torchrun=("--standalone", "--max-restarts=1")) as process:
        wait_for(lambda: (run_dir / "checkpoints" / "step_4").is_dir(), process)
        survivor = worker_pid(process.pid, 0)
        os.kill(worker_pid(process.pid, 1), signal.SIGKILL)  # one rank, mid-step; torchrun stays
        killed_at = time.time()
        wait_for(lambda: gone(survivor), process, timeout_s=TIMEOUT_S + MARGIN_S)
        survivor_exit_s = time.time() - killed_at
        wait_for(lambda: "at step" in log_path.read_text(), process)
        restart_s = time.time() - killed_at
        assert process.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    print(f"survivor exited {survivor_exit_s:.1f} s after the kill, resumed {restart_s:.1f} s after")

    log = log_path.read_text()
    assert "rank 0 lost contact with the process group" in log
    assert "rank(s) 1 did not report within 5 s, dead or hung" in log
    assert "Unable to shutdown process" not in log  # the survivor left by itself, not by torchrun's SIGKILL
    assert "torchrun restart 1" in log
    resumed_at = int(re.search(rf"resumed from {run_dir / 'checkpoints'}/step_(\d+) at step \1", log).group(1))
    assert resumed_at >= 4
    got = loss_curve(run_dir)
    assert [s for s, _ in got] == list(range(1, 13))  # no step twice, none missing, in TensorBoard's view
    assert got == loss_curve(tmp_path / "ref")  # bitwise
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step_8", "step_12"}  # no step_N.tmp left


def test_two_nodes_under_c10d_rendezvous_restart_together_after_a_rank_is_killed(demo_shards, tmp_path):
    """Two torchruns as two nodes meeting by c10d rendezvous (as the SLURM scripts launch them), with
    restarts. Node 1's rank is SIGKILLed: its torchrun restarts it (its restart count 1), and node
    0's restarts its own for the change of membership (its count stays 0). The ranks meet in one
    key space of torchrun's store all the same, and the run resumes from its checkpoint; they had
    met in two (a 300 s hang, or a restart lost to gloo connecting to the dead rank's port)."""
    port = _free_port()
    run_dir = tmp_path / "run"
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=12", "data.micro_batch_size=32",
              f"dist.timeout_s={TIMEOUT_S}", f"run.dir={run_dir}"]
    rendezvous = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                  "--max-restarts=1")
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(background_pretrain(1, common, tmp_path / f"node{i}.log", torchrun=rendezvous))
                 for i in (0, 1)]
        wait_for(lambda: (run_dir / "checkpoints" / "step_4").is_dir(), nodes[0])
        host = next(node for node in nodes if _has_rank(node.pid, 1))  # c10d gives the ranks out in any order
        os.kill(worker_pid(host.pid, 1), signal.SIGKILL)
        for i, node in enumerate(nodes):
            assert node.wait(timeout=180) == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in (0, 1))
    assert re.search(rf"resumed from {run_dir / 'checkpoints'}/step_(\d+) at step \1", logs), logs[-3000:]
    assert [s for s, _ in loss_curve(run_dir)] == list(range(1, 13))  # no step twice, none missing
    assert "connectFullMesh" not in logs, logs[-3000:]  # no start lost to the last round's keys


def _has_rank(torchrun_pid: int, rank: int) -> bool:
    try:
        worker_pid(torchrun_pid, rank)
    except LookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_a_rank_waiting_on_a_lost_node_exits_within_the_timeout_naming_it(demo_shards, tmp_path, signum):
    """Two torchruns as two nodes, without restarts. The second node is SIGKILLed (torchrun and,
    with it, its rank), or its rank is stopped: no socket closes, and only the timeout can fire."""
    port = _free_port()
    common = [*shard_overrides(demo_shards), *EXACT, "train.steps=1000", "data.micro_batch_size=32",
              f"dist.timeout_s={TIMEOUT_S}", f"run.dir={tmp_path / 'run'}"]
    ranks = []
    try:
        with contextlib.ExitStack() as stack:
            nodes = [stack.enter_context(background_pretrain(1, common, tmp_path / f"node{i}.log", torchrun=(
                "--nnodes=2", f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}"))) for i in (0, 1)]
            wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_4").is_dir(), nodes[0])
            ranks = [worker_pid(node.pid, rank) for rank, node in enumerate(nodes)]
            if signum == signal.SIGKILL:
                os.killpg(nodes[1].pid, signal.SIGKILL)  # the node's torchrun; its rank dies with it
            else:
                os.kill(ranks[1], signal.SIGSTOP)
            lost_at = time.time()
            assert nodes[0].wait(timeout=TIMEOUT_S + MARGIN_S + 30) != 0
            survivor_exit_s = time.time() - lost_at
            print(f"{signal.Signals(signum).name}: node 0 exited {survivor_exit_s:.1f} s after")
            assert survivor_exit_s < TIMEOUT_S + MARGIN_S and gone(ranks[0])
            log = (tmp_path / "node0.log").read_text()
            message = re.search(r"rank 0 lost contact with the process group: rank\(s\) 1 did not report "
                                r"within 5 s, dead or hung \(see their logs\): (.*)", log)
            assert message, log[-3000:]
            cause = "Timed out" if signum == signal.SIGSTOP else r"127\.0\.0\.1\]:\d+"  # gloo's words, and the peer's address
            assert re.search(cause, message.group(1)), message.group(1)
        # Only the torchruns are SIGKILLed on the way out of the block: their ranks, in sessions of
        # their own, must die with them, the stopped one too.
        assert outliving(ranks, wait_s=10) == [], "a rank outlived its torchrun"
    finally:
        for pid in outliving(ranks, wait_s=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ranks_die_with_their_torchrun_also_before_the_process_group_starts(demo_shards, tmp_path):
    """torchrun SIGKILLed while its ranks check the config: rank 0 reads the first shard (a `pipe:`
    command that stalls), rank 1 waits for its verdict in torchrun's store. Both end with it; they
    had waited for the dead store 300 s, then for torch's retries, 0.7 GB each."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:cat {fifo} {url}" for url in expand_urls(demo_shards["train"])]
    ranks = []
    try:
        with background_pretrain(2, [f"data.train_shards={stalled}".replace("'", '"'), "data.val_shards=null",
                                     f"run.dir={tmp_path / 'run'}"], tmp_path / "run.log") as process, \
                killing(f"cat {fifo} "):
            def reading() -> bool:  # rank 0's check has started the shard's command
                with contextlib.suppress(OSError):
                    return any(Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"cat\0")
                               for pid in descendants(process.pid))
                return False
            wait_for(reading, process)
            ranks = [worker_pid(process.pid, rank) for rank in (0, 1)]
            process.kill()  # torchrun alone: its ranks are in sessions of their own
            assert outliving(ranks, wait_s=10) == [], "a rank outlived its torchrun"
    finally:
        for pid in outliving(ranks, wait_s=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_loader_worker_stops_the_run_within_seconds_for_a_retry(demo_shards, tmp_path):
    """A loader worker SIGKILLed mid-run, as the kernel's OOM killer kills, after an evaluation
    (whose loader, iterated in the main thread, installs torch's SIGCHLD handler there): the step
    raises the error naming it, the run exits 1 within seconds, and nothing is marked in FATAL,
    so torchrun's restarts and SLURM's requeue retry it."""
    log_path = tmp_path / "run.log"
    with background_pretrain(0, [*shard_overrides(demo_shards), "data.num_workers=2", "train.eval_every_steps=2",
                                 "ckpt.every_steps=2", f"dist.timeout_s={TIMEOUT_S * 10}", f"run.dir={tmp_path}"],
                             log_path) as process:
        wait_for(lambda: (tmp_path / "checkpoints" / "step_2").is_dir(), process)  # evaluated at step 2
        workers = [pid for pid in children(process.pid) if os.getsid(pid) == pid]  # in sessions of their own
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.time()
        assert process.wait(timeout=MARGIN_S + 30) == 1
        exited_s = time.time() - killed_at
        print(f"the run exited {exited_s:.1f} s after the kill")
        assert exited_s < MARGIN_S
        log = log_path.read_text()
        assert re.search(rf"WorkerDied: training loader worker [01] \(pid {workers[0]}\) was killed by SIGKILL ", log), log[-3000:]
        assert not (tmp_path / "FATAL").exists()


def test_a_hung_shard_read_stops_the_run_within_the_timeout(demo_shards, tmp_path):
    """A `pipe:` shard whose command never delivers (a stalled network read: a FIFO nobody writes):
    the loader's wait times out after dist.timeout_s and the run exits, its worker and the
    stalled command (in the worker's process group) with it."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    stalled = [f"pipe:cat {fifo} {url}" for url in expand_urls(demo_shards["train"])]
    log_path = tmp_path / "run.log"
    with background_pretrain(0, [f"data.train_shards={stalled}".replace("'", '"'), "data.val_shards=null",
                                 "data.num_workers=1", f"dist.timeout_s={TIMEOUT_S}", f"run.dir={tmp_path}"],
                             log_path) as process, killing(f"cat {fifo} "):
        wait_for(lambda: "steps 0 -> " in log_path.read_text(), process)
        started = time.time()
        assert process.wait(timeout=TIMEOUT_S + MARGIN_S + 30) != 0
        waited_s = time.time() - started
        print(f"the run exited {waited_s:.1f} s after its first batch was asked for")
        assert TIMEOUT_S - 1 < waited_s < TIMEOUT_S + MARGIN_S
        assert re.search(rf"WorkerStalled: training loader worker 0 \(pid \d+\) delivered nothing for {TIMEOUT_S} s ",
                         log_path.read_text())
        assert still_running(f"cat {fifo} ") == []


def test_a_stalled_validation_read_stops_every_rank_within_the_timeout(demo_shards, tmp_path):
    """Rank 1's validation shard is a `pipe:` command that never delivers, rank 0's is read: rank 1's
    validation loader stops after dist.timeout_s, the stalled command ends with it, and rank 0,
    waiting for rank 1 in the evaluation's collectives, exits naming it. Without workers, as here,
    rank 1 reads in its main thread and the command is its own child (with a worker, the same stop
    is test_workers.py's test_a_stalled_validation_read_stops_at_the_timeout_naming_its_worker)."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    first, second = expand_urls(demo_shards["val"])  # rank 0's and rank 1's
    stalled = f"cat {fifo} {second} "  # the command's line; the run's own lines hold it without the space
    log_path = tmp_path / "run.log"
    with background_pretrain(2, [f"data.train_shards={demo_shards['train']}",
                                 f'data.val_shards=["{first}", "pipe:cat {fifo} {second}"]', "data.num_workers=0",
                                 "train.steps=2", "data.micro_batch_size=32", f"dist.timeout_s={TIMEOUT_S}",
                                 f"run.dir={tmp_path}"], log_path) as process, killing(stalled):
        wait_for(lambda: running(stalled), process)  # the evaluation at the last step has begun
        ranks = [worker_pid(process.pid, rank) for rank in (0, 1)]
        started = time.time()
        assert process.wait(timeout=TIMEOUT_S + MARGIN_S + 30) != 0
        waited_s = time.time() - started
        print(f"the run exited {waited_s:.1f} s after the stalled read began")
        assert TIMEOUT_S - 1 < waited_s < TIMEOUT_S + MARGIN_S and all(gone(pid) for pid in ranks)
        log = log_path.read_text()
        assert re.search(r"ReadStalled: validation loader, read in the training process \(data.num_workers=0\), "
                         rf"delivered nothing for {TIMEOUT_S} s ", log), log[-3000:]
        assert "rank 0 lost contact with the process group: rank(s) 1 did not report within 5 s" in log, log[-3000:]
        assert still_running(stalled) == []
