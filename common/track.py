"""The optional monitoring sinks beside log.jsonl: TensorBoard event files and a Weights & Biases
run, their flags, and what imports them (only when asked, so that neither package is needed)."""
import argparse
import importlib.util
import json
import os
import re
import secrets
import time

from common.log import UserError

def installed(package, flag):
    """Whether `package` can be imported, without importing it. Asked for by a flag and missing:
    a UserError with the install command."""
    if importlib.util.find_spec(package) is not None:
        return True
    if flag:
        raise UserError(f"{flag} needs the {package} package: pip install {package} "
                        f"(or pip install -r requirements-extras.txt)")
    return False


def add_tracking_args(parser):
    """TensorBoard and Weights & Biases flags, in their own group.

    TensorBoard is on whenever the `tensorboard` package is installed (--no-tensorboard turns it
    off; --tensorboard makes a missing package an error): a researcher who has it expects
    `tensorboard --logdir runs/` to show every run, including the three-day one started without
    thinking of a flag; an event costs tens of microseconds and ~110 bytes per log record.
    Without the package nothing changes. W&B sends data to a server, so it is on only when asked
    (--wandb PROJECT)."""
    g = parser.add_argument_group(
        "tracking", "optional extras (pip install -r requirements-extras.txt), rank 0 only, with "
        "the same records, names and steps as log.jsonl; a resume continues them")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard event files in the run directory: train/<key> at every log "
                        "step, epoch/<key> at each epoch's last step, the arguments as text; "
                        "view with `tensorboard --logdir runs`. Default: on when the tensorboard "
                        "package is installed")
    g.add_argument("--wandb", metavar="PROJECT", type=wandb_project,
                   help="also log to this Weights & Biases project. The run id is kept in the "
                        "run directory (wandb_run_id), so a resumed or requeued run continues "
                        "the same W&B run. Nodes without internet: --wandb-mode offline (or "
                        "WANDB_MODE=offline), then `wandb sync RUN_DIR/wandb/offline-run-*`")
    g.add_argument("--wandb-entity", metavar="ENTITY",
                   help="W&B team or user (default: WANDB_ENTITY, or your default entity)")
    g.add_argument("--wandb-name", metavar="NAME",
                   help="W&B run name (default: the run directory's last two parts, e.g. "
                        "simclr/20250101-120000)")
    g.add_argument("--wandb-group", metavar="GROUP",
                   help="W&B group, e.g. a sweep or the pre-training and linear evaluation of "
                        "one backbone")
    g.add_argument("--wandb-tags", nargs="+", metavar="TAG", help="W&B tags")
    g.add_argument("--wandb-mode", choices=["online", "offline", "disabled"],
                   help="online sends as it trains; offline writes RUN_DIR/wandb/ for a later "
                        "`wandb sync` (default: WANDB_MODE, else online)")
    return parser


def wandb_project(name):
    """--wandb's value, checked at parsing: a missing package fails before any work starts."""
    installed("wandb", "--wandb")
    return name


def config_values(args):
    """The arguments as plain JSON values (paths and other objects as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


class EventFile:
    """A TensorBoard event file in `run_dir`, written with tensorboard's own writer: one event
    per record (all its scalars), the arguments as a text table at `purge_step`."""

    def __init__(self, run_dir, purge_step, config):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.Event, self.Summary = Event, Summary
        # Readers take a run's files in name order, and a name starts with its creation second:
        # a resumed run's file must come after the earlier ones for its purge to apply to them.
        stamps = [int(m[1]) for f in os.listdir(run_dir)
                  if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f))]
        wait = max(stamps) + 1 - time.time() if stamps else 0
        if 0 < wait <= 2:  # more: another node's clock is ahead; nothing to wait for
            time.sleep(wait)
        self.writer = EventFileWriter(run_dir, max_queue_size=100, flush_secs=30)
        self.writer.add_event(Event(wall_time=time.time(), step=purge_step,
                                    session_log=SessionLog(status=SessionLog.START)))
        table = "\n".join(f"| {k} | {json.dumps(v).replace('|', '&#124;')} |"
                          for k, v in config.items())
        self.writer.add_event(Event(wall_time=time.time(), step=purge_step, summary=text_pb(
            "args", f"| argument | value |\n|---|---|\n{table}")))

    def scalars(self, step, values):
        summary = self.Summary(value=[self.Summary.Value(tag=tag, simple_value=v)
                                      for tag, v in values.items()])
        self.writer.add_event(self.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def start_wandb(args, run_dir, held):
    """wandb.init for the run in `run_dir`, resuming the W&B run whose id the folder keeps.
    Returns the run and, per kind, the first step to send (see Logger.start_tracking)."""
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
