"""Rank-0 output: printed lines, `log.jsonl`, progress bars, and the records sent on to
TensorBoard and Weights & Biases when they are on (common/track.py, imported only then)."""
import atexit
import json
import os
import sys
import time

from tqdm import tqdm

from common.dist import get_rank
from common.errors import UserError, installed


class Logger:
    """Prints and appends JSON lines to `run_dir/log.jsonl` on rank 0; silent elsewhere. After
    `start_tracking`, every record also goes to TensorBoard and W&B where they are on, at the
    global step `place` gives it (common/track.py `Sinks`: under which names)."""

    def __init__(self, run_dir):
        self.is_main = get_rank() == 0
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "log.jsonl")
        self.steps_per_epoch = None
        self.sinks = None  # TensorBoard and W&B, when on (common/track.py)

    def print(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    def summary(self, record):
        """Print `record` as one line and log it (end of an epoch); flush the sinks, so that a
        crash loses no epoch that its checkpoint, written after this, holds."""
        self.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in record.items()))
        self.log(record)
        if self.sinks:
            self.sinks.flush()

    def log(self, record):
        if not self.is_main:
            return
        # 7 significant digits: short lines, and small learning rates keep their precision
        record = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, a run directory gone read-only: one line
            raise UserError(f"could not write {self.path}: {e.strerror or e}") from None
        if self.sinks:
            self.sinks.track(*self.place(record), record)

    def place(self, record):
        """(kind, global step) of a record: ("train", its step) or ("epoch", epoch x steps)."""
        if "step" in record:
            return "train", record["step"]
        return "epoch", record.get("epoch", 0) * self.steps_per_epoch

    def start_tracking(self, args, steps_per_epoch, resume=None):
        """Call once, before the run's first record: `resume` is (epoch, batch_in_epoch) of the
        checkpoint resumed, None for a new run. log.jsonl loses (atomically) the records past that
        position, which the run logs again; then TensorBoard and W&B start where they are on
        (common/track.py). Rank 0 only; tracking flags absent from `args` are off."""
        # flags checked on every rank, so that all of them stop together
        wandb_flags = [f"--{k.replace('_', '-')}" for k in ("wandb_entity", "wandb_name",
                       "wandb_group", "wandb_tags", "wandb_mode") if getattr(args, k, None)]
        if wandb_flags and not getattr(args, "wandb", None):
            raise UserError(f"{' '.join(wandb_flags)}: give the W&B project too (--wandb PROJECT)")
        asked = getattr(args, "tensorboard", None)  # None: when installed
        tensorboard = asked is not False and installed("tensorboard", asked and "--tensorboard")
        if not self.is_main:
            return
        self.steps_per_epoch = steps_per_epoch
        position = resume[0] * steps_per_epoch + resume[1] if resume else -1
        kept, held = self.keep_until(position)
        if tensorboard or getattr(args, "wandb", None):
            from common.track import Sinks
            self.sinks = Sinks(args, self.run_dir, position, held, self, tensorboard)
            for record in kept:  # only what a newly started sink lacks
                self.sinks.track(*self.place(record), record, again=True)
            atexit.register(self.sinks.flush)  # an exception or sys.exit: events reach the disk

    def keep_until(self, position):
        """Drop from log.jsonl the records placed after global step `position` (-1: all).
        Returns the records kept and, per kind, the last step log.jsonl held."""
        held = {"train": -1, "epoch": -1}
        if not os.path.exists(self.path):
            return [], held
        with open(self.path) as f:
            lines = f.readlines()
        kept, text = [], []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            kind, step = self.place(rec)
            held[kind] = max(held[kind], step)
            if step <= position:
                kept.append(rec)
                text.append(line.rstrip("\n") + "\n")
        if text != lines:
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return kept, held

    def close(self):
        if self.sinks:
            self.sinks.close()
            self.sinks = None


class Progress:
    """Iterate a loader with a tqdm bar on a terminal (rank 0), or a plain line per `update`
    when stderr is a file (Slurm logs). `update(record)` shows a log record's metrics.
    `leave=False` (the monitors' feature passes): a bar that goes when done, no lines in a file."""

    def __init__(self, iterable, total, desc, leave=True):
        is_main, terminal = get_rank() == 0, sys.stderr.isatty()
        self.plain = is_main and not terminal and leave
        self.bar = None
        if is_main and terminal:
            self.bar = iterable = tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=leave)
        self.iterable, self.total, self.desc = iterable, total, desc
        self.start, self.step = time.time(), 0

    def __iter__(self):
        for item in self.iterable:
            self.step += 1  # counted when handed out: an `update` during a step includes it
            yield item

    def update(self, metrics):
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items() if k not in ("epoch", "step"))
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.plain:
            elapsed = time.time() - self.start
            eta = elapsed / max(self.step, 1) * (self.total - self.step)
            print(f"{self.desc} {self.step}/{self.total} {text} eta {eta / 60:.1f}min", flush=True)
