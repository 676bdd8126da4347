"""Shared fixtures: small real shards of the built-in dataset, and real training processes."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
DIGITS = REPO / "configs" / "finetune" / "tiny_digits.yaml"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, str]:
    """16 train shards of 32 samples (512) and 4 val shards of 16 (64): real PNGs, real tars."""
    from vitdist.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), train_per_class=64, val_per_class=8,
                              samples_per_shard=32, seed=0)


def write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def png_bytes(color, size=(40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png_folder(root, classes=("ant", "bee", "cat"), per_class=6):
    """An ImageFolder of 16 px PNGs, <root>/<class>/<class>.<i>.png, each of its own colour."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (c * 80, i * 10, 0)).save(root / name / f"{name}.{i}.png")


def shard_overrides(shards: dict[str, str]) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}"]


def pretrain_command(nproc: int, overrides: list[str], launcher: str = "pretrain", config: Path = TINY,
                     torchrun: tuple[str, ...] = ("--standalone",)) -> list[str]:
    """`torchrun --nproc_per_node=nproc launch/<launcher>.py` on the tiny config (or `config`),
    with `torchrun`'s options; nproc=0 runs the script directly, as one process without torchrun."""
    runner = [sys.executable, "-m", "torch.distributed.run", *torchrun, f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*runner, str(REPO / "launch" / f"{launcher}.py"), "--config", str(config), *overrides]


# PYTHONFAULTHANDLER: a process that gets SIGABRT prints every thread's stack (see run_captured).
# PYTHONPATH: the launch scripts import this tree's vitdist, not whichever the environment installed
# (a second checkout's tests ran the first's code in every torchrun).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_pretrain(nproc: int, overrides: list[str], timeout_s: int = 300, launcher: str = "pretrain",
                 config: Path = TINY, preexec_fn=None) -> subprocess.CompletedProcess:
    """`preexec_fn`: run in the child before torchrun starts, e.g. to set a resource limit for all ranks."""
    return run_captured(pretrain_command(nproc, overrides, launcher, config), timeout_s, preexec_fn=preexec_fn)


def run_captured(command: list[str], timeout_s: float, **popen) -> subprocess.CompletedProcess:
    """`command`'s exit code and output. One still going after `timeout_s` fails the test with the
    stacks of all its processes (ranks and loader workers too): where it hangs, not only that it did."""
    with subprocess.Popen(command, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **popen) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stdout, stderr = _stacks_then_kill(process)
            pytest.fail(f"{command[:4]}... did not end within {timeout_s} s; its output:\n{stdout[-3000:]}\n"
                        f"its errors, with the stacks of its processes (SIGABRT):\n{stderr[-30000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """`pid`'s processes at every depth: torchrun's ranks and their loader workers, in sessions of
    their own, so that no process group holds them all."""
    with contextlib.suppress(FileNotFoundError):  # exited meanwhile
        return [p for child in children(pid) for p in (child, *descendants(child))]
    return []


def _stacks_then_kill(process: subprocess.Popen) -> tuple[str, str]:
    processes = [*descendants(process.pid), process.pid]
    for pid in processes:  # faulthandler prints each one's stacks to the stderr they share
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    time.sleep(3)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return process.communicate(timeout=30)


def vitdist_cli(*args, timeout_s: int = 120) -> subprocess.CompletedProcess:
    """`python -m vitdist.cli <args>` (make-shards, export, evaluate), its output captured."""
    return run_captured([sys.executable, "-m", "vitdist.cli", *map(str, args)], timeout_s)


@contextlib.contextmanager
def background_pretrain(nproc: int, overrides: list[str], log_path: Path,
                        torchrun: tuple[str, ...] = ("--standalone",)) -> Iterator[subprocess.Popen]:
    """A run in the background, in its own process group (so a test can signal or kill all of it),
    SIGKILLed on the way out whatever the test's outcome: a failed test leaves nothing training
    beside the next ones. torchrun's ranks, in sessions of their own, die with it (PR_SET_PDEATHSIG)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(pretrain_command(nproc, overrides, torchrun=torchrun), cwd=REPO, env=ENV,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(predicate, process: subprocess.Popen | None = None, timeout_s: float = 240) -> None:
    """Until `predicate()` holds; the test fails if `process` ends first, or after `timeout_s`."""
    deadline = time.time() + timeout_s
    while not predicate():
        assert process is None or process.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve in a TensorBoard directory, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(tb_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text of TensorBoard's text tab in a directory, by tag: (step, text) in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary")}


# Bitwise-reproducible runs: fp32, no dropout or drop path, constant lr after a 1-step warmup
# (so that runs of different lengths share a schedule), a checkpoint every 4 steps, a loss
# logged every step.
EXACT = ["data.val_shards=null", "train.precision=fp32", "model.drop_path_rate=0.0", "optim.warmup_steps=1",
         "optim.min_lr=2e-3", "optim.lr=2e-3", "train.global_batch_size=64", "log.every_steps=1",
         "ckpt.every_steps=4", "ckpt.keep=2"]


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """The train/loss curve of a run as TensorBoard shows it: (step, loss) in order, a step
    logged twice (a resume that failed to purge) appearing twice."""
    return read_scalars(run_dir / "tb")["train/loss"]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found += map(int, (task / "children").read_text().split())
    return found


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the training process with RANK=rank among torchrun's children."""
    for pid in children(torchrun_pid):
        if f"RANK={rank}".encode() in (Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
            return pid
    raise LookupError(f"no rank {rank} under torchrun {torchrun_pid}")


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.fixture(scope="session")
def process_group():
    """A real one-rank gloo group in this process (multi-rank runs are covered by test_train). Its
    store listens on a port the system gives it (0): a port picked free beforehand may be taken meanwhile."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def running(text: str) -> list[int]:
    """The live processes whose command line holds `text` (zombies run nothing)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            held = text.encode() in cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:  # gone since the listing
            continue
        if held and not gone(int(cmdline.parent.name)):
            found.append(int(cmdline.parent.name))
    return found


@contextlib.contextmanager
def killing(text: str) -> Iterator[None]:
    """On the way out, whatever the outcome, SIGKILL the processes whose command line holds `text`:
    the `cat` of a stalled `pipe:` shard, say, that a failed test would leave waiting for ever."""
    try:
        yield
    finally:
        for pid in running(text):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _left_after(find: Callable[[], list[int]], wait_s: float) -> list[int]:
    """`find()` once it is empty, or after `wait_s`: a process just signalled, or whose parent just
    died, takes a moment to exit (its memory freed first), longer on a loaded machine."""
    deadline = time.monotonic() + wait_s
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def still_running(text: str, wait_s: float = 5) -> list[int]:
    """The processes whose command line holds `text`, once none is, or after `wait_s`."""
    return _left_after(lambda: running(text), wait_s)


def outliving(pids: list[int], wait_s: float = 5) -> list[int]:
    """Those of `pids` not gone, once none is, or after `wait_s`."""
    return _left_after(lambda: [pid for pid in pids if not gone(pid)], wait_s)
