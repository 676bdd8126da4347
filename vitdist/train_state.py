"""The training loop's state beside the weights and the optimizer's: what a checkpoint's
train_state.json holds, so that a resumed run carries on the step, the data streams, the counts
and the best validation scores where the checkpointed run left them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    step: int = 0
    data_positions: dict = field(default_factory=dict)  # per data stream, gathered from every rank at a save
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped, by kind, over ranks
    trained_samples: int = 0  # samples over ranks: not step x the global batch, which a resume may change (data.aug_repeats too)
    bad_steps: int = 0  # skipped for a NaN/Inf loss or gradient norm
    best: dict | None = None  # the validation scores best.safetensors was kept for (None: none yet)
    eval_owed: bool = False  # preempted at an evaluation step before evaluating: the resumed run does
    validated: bool = False  # this step's weights were validated: a run resumed here to end here need not

    @classmethod
    def restored(cls, saved: dict, global_batch_size: int) -> TrainState:
        """From a checkpoint's train state, as this or an earlier version wrote it."""
        skipped = saved["skipped"]
        if isinstance(skipped, int):  # written before skips were counted by kind
            skipped = {"unknown": skipped}
        # Written before trained samples were counted: its steps at its own config's global batch.
        batch = saved["config"]["train"]["global_batch_size"] if "config" in saved else global_batch_size
        return cls(step=saved["step"], data_positions=saved["data_positions"], skipped=skipped,
                   trained_samples=saved.get("trained_samples", saved["step"] * batch),
                   bad_steps=saved.get("bad_steps", 0),
                   # Written before the val_loss was kept beside val/top1 (-1: no validation yet).
                   best=saved["best"] if "best" in saved else {"val_top1": saved.get("best_top1", -1.0)},
                   eval_owed=saved.get("eval_owed", False),
                   validated=saved.get("validated", True))  # written before: as if, not to log its val/ twice

    def saved(self, **run: object) -> dict:
        """What train_state.json holds: this state and `run`, what identifies the run (its config,
        data order, decode device) for the resume's checks."""
        return {**asdict(self), **run}
