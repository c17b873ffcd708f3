"""The optional monitoring sinks beside log.jsonl: TensorBoard event files and a Weights & Biases
run, rank 0 only. Imported by common/log.py only when one is on, and each imports its package
only then, so that neither package is needed.

TensorBoard is on whenever its package is installed (--no-tensorboard: off; --tensorboard: a
missing package is an error): a researcher who has it expects `tensorboard --logdir runs/` to
show every run, the three-day one started without a flag included; an event costs tens of
microseconds and ~110 bytes per record. W&B sends data to a server: on only when asked."""
import json
import os
import re
import secrets
import time
from pathlib import Path

from common.errors import UserError, installed


class Sinks:
    """Receive log.jsonl's records (Logger.log): a record with a "step" at that global step as
    train/<key>, an epoch summary at the step ending the epoch as epoch/<key> (Logger.place); every
    number but the step is a scalar, "epoch" included (an x axis in W&B). A resumed run logs again
    the steps after its checkpoint's position, and both sinks still hold each step once:
    - TensorBoard: a new event file whose purge_step (the first step after the position) drops
      the older files' later events (TensorBoard's fast loader also drops them by step);
    - W&B keeps a step's first values, so steps it holds are not sent again: those before the
      server's step when it resumed the run online, else those log.jsonl held (`held`).
    A sink new to the run first gets the records log.jsonl keeps (`track(..., again=True)`)."""

    def __init__(self, args, run_dir, position, held, log, tensorboard):
        self.events = self.wandb = None
        self.had_events = any(f.startswith("events.out.tfevents.") for f in os.listdir(run_dir))
        config = json.loads(json.dumps(vars(args), default=str))  # paths and others as strings
        if tensorboard:
            try:
                self.events = event_writer(run_dir, position + 1, config)
                log.print(f"TensorBoard: events in {run_dir}")
            except ImportError as e:  # installed but broken: an error only if asked for
                if getattr(args, "tensorboard", None):
                    raise UserError(f"--tensorboard: {e}") from None
                log.print(f"TensorBoard off: {e}")
        if getattr(args, "wandb", None):
            self.wandb, self.wandb_from = start_wandb(args, run_dir, held, config)

    def track(self, kind, step, record, again=False):
        values = {f"{kind}/{k}": v for k, v in record.items() if k != "step"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.events and not (again and self.had_events):
            for tag, value in values.items():
                self.events.add_scalar(tag, value, step)
        if self.wandb and step >= self.wandb_from[kind]:
            # A summary shares its step with the epoch's last train record: logged after it, it
            # joins that row and commits it (train records commit when a later step arrives).
            self.wandb.log(values, step=step, commit=kind == "epoch")

    def flush(self):
        if self.events:
            self.events.flush()

    def close(self):
        if self.events:
            self.events.close()
        if self.wandb:
            self.wandb.finish()
        self.events = self.wandb = None


def event_writer(run_dir, purge_step, config):
    """A TensorBoard SummaryWriter in `run_dir` whose first event is at `purge_step`, with the
    arguments as a text table."""
    from torch.utils.tensorboard import SummaryWriter
    # Readers take a run's files in name order, and a name starts with its creation second:
    # a resumed run's file must come after the earlier ones for its purge to apply to them.
    stamps = [int(m[1]) for f in os.listdir(run_dir)
              if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f))]
    wait = max(stamps) + 1 - time.time() if stamps else 0
    if 0 < wait <= 2:  # more: another node's clock is ahead; nothing to wait for
        time.sleep(wait)
    writer = SummaryWriter(run_dir, purge_step=purge_step, max_queue=100, flush_secs=30)
    table = "\n".join(f"| {k} | {json.dumps(v).replace('|', '&#124;')} |"
                      for k, v in config.items())
    writer.add_text("args", f"| argument | value |\n|---|---|\n{table}", global_step=purge_step)
    return writer


def start_wandb(args, run_dir, held, config):
    """wandb.init for the run in `run_dir`, resuming the W&B run whose id the folder keeps.
    Returns the run and, per kind, the first step to send (see Sinks)."""
    installed("wandb", "--wandb")
    import wandb
    id_path = Path(run_dir, "wandb_run_id")
    known = id_path.exists()
    if known:
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
        id_path.write_text(run_id + "\n")
    flag = lambda key: getattr(args, f"wandb_{key}", None)
    name = flag("name") or "/".join(os.path.abspath(run_dir).split(os.sep)[-2:])
    try:
        run = wandb.init(project=args.wandb, entity=flag("entity"), name=name,
                         group=flag("group"), tags=flag("tags"), mode=flag("mode"), dir=run_dir,
                         id=run_id, resume="allow", config=config)
    except wandb.errors.Error as e:
        raise UserError(f"--wandb: {str(e).strip().splitlines()[0]} (without internet: "
                        f"--wandb-mode offline, then wandb sync)") from None
    if getattr(run, "resumed", False):  # online: the server knows what it holds
        start = getattr(run, "starting_step", 0)
        return run, {"train": start, "epoch": start}
    if known:  # offline, or not synced yet: what earlier processes logged was sent
        return run, {kind: step + 1 for kind, step in held.items()}
    return run, {"train": 0, "epoch": 0}
