"""Rank-0 output: printed lines, `log.jsonl`, progress bars, clean exits on bad input, and the
records sent on to TensorBoard and Weights & Biases when they are on (common/track.py)."""
import atexit
import functools
import json
import os
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): reported in one line, exit code 2."""


def exit_on_user_error(main):
    """Decorator for a script's main(): a UserError prints `error: ...` and exits with 2 (or the
    error's own `exit_code`). Under torchrun, other exceptions are also recorded (`record`) in
    the error file torchrun gives each worker, so that its failure summary shows the failing
    rank's traceback, not only its exit code."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(getattr(e, "exit_code", 2))
    return record(wrapper) if "TORCHELASTIC_ERROR_FILE" in os.environ else wrapper


# ------------------------------------------------------------------------------- logger

class Logger:
    """Prints and appends JSON lines to `run_dir/log.jsonl` on rank 0; silent elsewhere.

    After `start_tracking`, every record also goes to TensorBoard and W&B where they are on.
    A record with a "step" (logged every --log-every steps) is placed at that global step under
    train/<key>; an epoch summary (no "step"; epoch 0 holds the random-init kNN) at the step that
    ends the epoch, epoch x steps_per_epoch, under epoch/<key>. Every number but the step itself
    is a scalar, the "epoch" included (an x axis in W&B)."""

    def __init__(self, run_dir, is_main):
        self.is_main = is_main
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "log.jsonl") if run_dir else None
        self.steps_per_epoch = None
        self.events = self.wandb = None
        self.wandb_from = {}  # per kind: the first step W&B does not hold yet

    def print(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    def summary(self, record):
        """Print `record` as one line and log it (end of an epoch); flush the events, so that a
        crash loses no epoch that its checkpoint, written after this, holds."""
        self.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in record.items()))
        self.log(record)
        if self.events:
            self.events.flush()

    def log(self, record):
        if not self.is_main:
            return
        # 7 significant digits: short lines, and small learning rates keep their precision
        record = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in record.items()}
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk, a run directory gone read-only: one line
                raise UserError(f"could not write {self.path}: {e.strerror or e}") from None
        if self.events or self.wandb:
            self.track(record)

    def place(self, record):
        """(kind, global step) of a record: ("train", its step) or ("epoch", epoch x steps)."""
        if "step" in record:
            return "train", record["step"]
        return "epoch", record.get("epoch", 0) * self.steps_per_epoch

    def track(self, record, events=True):
        kind, step = self.place(record)
        values = {f"{kind}/{k}": v for k, v in record.items() if k != "step"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.events and events:
            self.events.scalars(step, values)
        if self.wandb and step >= self.wandb_from[kind]:
            # A summary shares its step with the epoch's last train record: logged after it, it
            # joins that row and commits it (train records commit when a later step arrives).
            self.wandb.log(values, step=step, commit=kind == "epoch")

    def start_tracking(self, args, steps_per_epoch, resume=None):
        """Call once, when the run's position is known and before its first record: `resume`
        is (epoch, batch_in_epoch) of the checkpoint resumed, None for a new run.

        log.jsonl is rewritten (atomically) without the records past that position, which a
        crash or a stop after the checkpoint left and which the run now logs again; then it,
        the TensorBoard events and W&B hold each step once:
        - TensorBoard: a new event file whose purge_step (the first step after the position)
          makes TensorBoard drop the older files' later events (the step-based preemption of
          TensorBoard's fast loader drops them too, as the new values arrive);
        - W&B keeps a step's first values, so steps it already holds are not sent again: those
          before the server's step when it resumed the run online, otherwise those that
          log.jsonl held before the rewrite (sent by the earlier processes).
        A sink turned on later in a run (first --wandb, or TensorBoard newly installed) first
        gets the records log.jsonl keeps. Rank 0 only; tracking flags absent from `args` are off.
        """
        # imported here: common.track needs this module's UserError
        from common.track import EventFile, config_values, installed, start_wandb
        # flags checked on every rank, so that all of them stop together
        wandb_flags = [f"--{k.replace('_', '-')}" for k in ("wandb_entity", "wandb_name",
                       "wandb_group", "wandb_tags", "wandb_mode") if getattr(args, k, None)]
        if wandb_flags and not getattr(args, "wandb", None):
            raise UserError(f"{' '.join(wandb_flags)}: give the W&B project too (--wandb PROJECT)")
        asked = getattr(args, "tensorboard", None)  # None: when installed
        tensorboard = asked is not False and installed("tensorboard", asked and "--tensorboard")
        if not (self.is_main and self.path):
            return
        self.steps_per_epoch = steps_per_epoch
        position = resume[0] * steps_per_epoch + resume[1] if resume else -1
        kept, held = self.keep_until(position)
        had_events = any(f.startswith("events.out.tfevents.") for f in os.listdir(self.run_dir))
        if tensorboard:
            try:
                self.events = EventFile(self.run_dir, position + 1, config_values(args))
                self.print(f"TensorBoard: events in {self.run_dir}")
            except ImportError as e:  # installed but broken: an error only if asked for
                if asked:
                    raise UserError(f"--tensorboard: {e}") from None
                self.print(f"TensorBoard off: {e}")
        if getattr(args, "wandb", None):
            self.wandb, self.wandb_from = start_wandb(args, self.run_dir, held)
        if self.events or self.wandb:
            for rec in kept:  # only what a newly started sink lacks (see track)
                self.track(rec, events=not had_events)
        atexit.register(self.flush)  # an exception or sys.exit: the events reach the disk

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
            if not isinstance(rec, dict):
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

    def flush(self):
        if self.events:
            self.events.flush()

    def close(self):
        """At the end of a run: close the event file and finish the W&B run."""
        if self.events:
            self.events.close()
            self.events = None
        if self.wandb:
            self.wandb.finish()
            self.wandb = None


class Progress:
    """Iterate a loader with a tqdm bar on a terminal (rank 0), or a plain line per `update`
    when stderr is a file (Slurm logs). `update(record)` shows a log record's metrics."""

    def __init__(self, iterable, total, desc, is_main):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.bar = None
        self.plain = is_main and not sys.stderr.isatty()
        if is_main and not self.plain:
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
        self.start, self.step = time.time(), 0

    def __iter__(self):
        for item in self.iterable:
            self.step += 1  # counted when handed out: an `update` during a step includes it
            yield item
            if self.bar is not None:
                self.bar.update(1)
        if self.bar is not None:
            self.bar.close()

    def update(self, metrics):
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items() if k not in ("epoch", "step"))
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.plain:
            elapsed = time.time() - self.start
            eta = elapsed / max(self.step, 1) * (self.total - self.step)
            print(f"{self.desc} {self.step}/{self.total} {text} eta {eta / 60:.1f}min", flush=True)
