"""The optional monitoring sinks beside log.jsonl: TensorBoard event files and a Weights & Biases
run. Imported by common/log.py only when one is on (their flags: common/args.py), and each
imports its package only then, so that neither package is needed.

TensorBoard is on whenever the `tensorboard` package is installed (--no-tensorboard turns it
off; --tensorboard makes a missing package an error): a researcher who has it expects
`tensorboard --logdir runs/` to show every run, including the three-day one started without
thinking of a flag; an event costs tens of microseconds and ~110 bytes per log record. Without
the package nothing changes. W&B sends data to a server, so it is on only when asked
(--wandb PROJECT)."""
import json
import os
import re
import secrets
import time

from common.errors import UserError, installed


class Sinks:
    """TensorBoard events and a W&B run that receive log.jsonl's records (Logger.log), rank 0
    only. A resumed run logs again the steps after its checkpoint's position; both sinks then
    hold each step once:
    - TensorBoard: a new event file whose purge_step (the first step after the position) makes
      TensorBoard drop the older files' later events (the step-based preemption of
      TensorBoard's fast loader drops them too, as the new values arrive);
    - W&B keeps a step's first values, so steps it already holds are not sent again: those
      before the server's step when it resumed the run online, otherwise those that log.jsonl
      held before the resume (`held`, sent by the earlier processes).
    A sink turned on later in a run (first --wandb, or TensorBoard newly installed) first gets
    the records log.jsonl keeps (`track(..., again=True)`).

    A record with a "step" (logged every --log-every steps) is placed at that global step under
    train/<key>; an epoch summary (no "step"; epoch 0 holds the random-init kNN) at the step that
    ends the epoch, epoch x steps_per_epoch, under epoch/<key> (Logger.place). Every number but
    the step itself is a scalar, the "epoch" included (an x axis in W&B)."""

    def __init__(self, args, run_dir, position, held, log, tensorboard):
        self.events = self.wandb = None
        self.had_events = any(f.startswith("events.out.tfevents.") for f in os.listdir(run_dir))
        if tensorboard:
            try:
                self.events = event_writer(run_dir, position + 1, config_values(args))
                log.print(f"TensorBoard: events in {run_dir}")
            except ImportError as e:  # installed but broken: an error only if asked for
                if getattr(args, "tensorboard", None):
                    raise UserError(f"--tensorboard: {e}") from None
                log.print(f"TensorBoard off: {e}")
        if getattr(args, "wandb", None):
            self.wandb, self.wandb_from = start_wandb(args, run_dir, held)

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


def config_values(args):
    """The arguments as plain JSON values (paths and other objects as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def event_writer(run_dir, purge_step, config):
    """A TensorBoard SummaryWriter in `run_dir` whose first event, at `purge_step`, makes
    TensorBoard drop the events of older files at that step and after (a resumed run logs them
    again), with the arguments as a text table at that step."""
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


def start_wandb(args, run_dir, held):
    """wandb.init for the run in `run_dir`, resuming the W&B run whose id the folder keeps.
    Returns the run and, per kind, the first step to send (see Sinks)."""
    installed("wandb", "--wandb")
    import wandb
    id_path = os.path.join(run_dir, "wandb_run_id")
    known = os.path.exists(id_path)
    if known:
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    flag = lambda key: getattr(args, f"wandb_{key}", None)
    name = flag("name") or "/".join(os.path.abspath(run_dir).split(os.sep)[-2:])
    try:
        run = wandb.init(project=args.wandb, entity=flag("entity"), name=name,
                         group=flag("group"), tags=flag("tags"), mode=flag("mode"), dir=run_dir,
                         id=run_id, resume="allow", config=config_values(args))
    except wandb.errors.Error as e:
        raise UserError(f"--wandb: {str(e).strip().splitlines()[0]} (without internet: "
                        f"--wandb-mode offline, then wandb sync)") from None
    if getattr(run, "resumed", False):  # online: the server knows what it holds
        start = getattr(run, "starting_step", 0)
        return run, {"train": start, "epoch": start}
    if known:  # offline, or not synced yet: what earlier processes logged was sent
        return run, {kind: step + 1 for kind, step in held.items()}
    return run, {"train": 0, "epoch": 0}
