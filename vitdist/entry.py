"""The command line shared by launch/pretrain.py and launch/finetune.py."""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import run_lock
from .checkpoint import SaveFailed
from .checkpoint_read import CorruptCheckpoint, UnsafeCheckpoint
from .config import ConfigError
from .config_check import doubts
from .config_yaml import load_config
from .streams import ShardChanged
from .distributed import die_with_launcher, refuse_together
from .handoff import HandoffError
from .optim import NonFiniteTraining
from .samples import NoUsableSamples, TooManyBadSamples
from .preemption import SIGNALS
from .preflight import preflight
from .train import train

# Errors met by every rank alike, which a retry from the newest checkpoint meets again.
RECURRING = (ConfigError, HandoffError, UnsafeCheckpoint, CorruptCheckpoint, TooManyBadSamples, NoUsableSamples,
             ShardChanged, NonFiniteTraining)


def say(line: str) -> None:
    """A line on stderr in one write: every rank writes to the same pipe (torchrun's output, a
    SLURM log), where print's two writes, the text then the newline, let another rank's line in
    between under PYTHONUNBUFFERED=1."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def main(description: str, finetune: bool) -> int:
    """Parse `--config C.yaml [key.sub=value ...]`, refuse a bad config on every rank before any
    process group starts (exit 2), then train."""
    die_with_launcher()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append", help="YAML config under configs/")
    parser.add_argument("--check", action="store_true",
                        help="check the config against WORLD_SIZE and exit (0: fine, 2: refused), as SLURM jobs do first")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, values read as YAML")
    # Overrides may come on either side of the options: `train.steps=5 --config C.yaml run.dir=r`
    # was refused (argparse takes one run of positionals only) as "unrecognized arguments: run.dir=r".
    args = parser.parse_intermixed_args()
    if len(args.config) > 1:  # else the last alone is read, the others dropped unsaid
        parser.error(f"--config is given {len(args.config)} times ({', '.join(args.config)}): give one file, and the "
                     "keys to change as key.sub=value")
    refusal, found = None, []
    try:
        cfg = load_config(args.config[0], args.overrides)
        if finetune and not cfg.finetune.init:
            raise ConfigError("finetune.init is not set: give the checkpoint to start from, finetune.init=<path>")
        found = preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        # A SLURM job's check takes it too: refused there, a job is not requeued (its ranks' refusal
        # would be, and the batch script would have written in the run.dir first).
        locks = not args.check or "VITDIST_SLURM_JOB" in os.environ
        if os.environ.get("RANK", "0") == "0" and locks and (unlocked := run_lock.hold(Path(cfg.run.dir))):
            found.append(unlocked)  # before FATAL, FINISHED and config.yaml are written there
    except ConfigError as e:
        refusal = str(e)
    if refuse_together(refusal, lambda message: say(f"config error: {message}")):
        return 2
    if os.environ.get("RANK", "0") == "0":
        for doubt in doubts(cfg) + found:
            say(f"config warning: {doubt}")
    if args.check:
        return 0
    # A recurring error is marked in <run.dir>/FATAL: torchrun's restarts of this launch exit at
    # once, and slurm/common.sh does not requeue. A new launch (torchrun's first attempt) tries again.
    fatal, finished = Path(cfg.run.dir) / "FATAL", Path(cfg.run.dir) / "FINISHED"
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fatal.unlink(missing_ok=True)
        finished.unlink(missing_ok=True)
    elif fatal.exists():
        say(f"error: {fatal.read_text().strip()} (recurs: not retried, see {fatal})")
        return 2
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    try:
        last_checkpoint = train(cfg)
    except RECURRING as e:
        say(f"error: {e}")
        fatal.parent.mkdir(parents=True, exist_ok=True)
        fatal.write_text(f"{e}\n")  # by every rank: the batch shell reads the one on its node
        return 2
    except SaveFailed as e:  # may not recur (space freed, a storage hiccup)
        say(f"error: {e}")
        return 1
    # Trained to the end, by every rank, for slurm/common.sh: torchrun exits 1 when it got SIGTERM
    # itself (the time-limit warning, during the last steps, which finish the run all the same).
    finished.write_text(f"{last_checkpoint or 'no checkpoint'}\n")
    return 0


def run(description: str, finetune: bool) -> None:
    """`main`, then exit with its code; under torchrun, the stop signals ignored from its end on:
    torchrun sends SIGTERM to the ranks left once one has exited (a refusal's 2, a preemption's 75),
    and one that came while Python shut down (its own handlers gone by then) killed the rank, which
    torchrun reported as exitcode -15, not its own. torchrun's SIGKILL still ends one hung there."""
    try:
        code = main(description, finetune)
    finally:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
