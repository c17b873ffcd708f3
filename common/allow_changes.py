"""--allow-changes: a run resumed with settings other than its checkpoint's (a longer schedule,
a lower rate after a divergence). Loaded only when a resume accepts such a change."""
import json
import math
import os

from common.dist import get_rank
from common.errors import DIVERGED


def accept_changes(args, ckpt, changes, where, diverged, log):
    """Apply the accepted `changes` [(key, saved value, value now)] to the resumed `ckpt` (loaded
    at `where`): printed with what they do to the schedule, the optimizer and the position in
    the epoch, then recorded in args.json (rank 0), where a divergence they answer is cleared."""
    ckpt["changes"] = changes
    log.print("changed settings, in effect from here on (--allow-changes): "
              + "; ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, old, new in changes))
    for key, old, new in changes:
        if key == "epochs":
            log.print(schedule_change(args, ckpt["epoch"], old, new))
        if key == "optimizer":  # LARS, SGD and AdamW states do not convert into each other
            log.print(f"the {new} optimizer starts with a fresh state (no momentum)")
        if key == "batch_size" and ckpt["batch_in_epoch"]:
            ckpt["batch_in_epoch"] = ckpt["batch_in_epoch"] * old // new  # images done
            log.print(f"the position in epoch {ckpt['epoch']} is now batch "
                      f"{ckpt['batch_in_epoch']} of {new} images")
    if get_rank() != 0:
        return
    path = os.path.join(args.run_dir, "args.json")  # the new values, a history entry per resume
    record = {}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    history = record.get("changes", [])
    history.append({"at": where, "settings": {k: [old, new] for k, old, new in changes},
                    **({"after_divergence": diverged} if diverged else {})})
    record.update(vars(args), changes=history)
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(f"{path}.tmp", path)
    if diverged:
        os.remove(os.path.join(args.run_dir, DIVERGED))


def schedule_change(args, epoch, old_epochs, new_epochs):
    """A line saying what a longer (or shorter) run does to the cosine at the resumed epoch."""
    warmup = getattr(args, "warmup_epochs", 0) or 0

    def cosine(epochs):  # the fraction of the way from the final value to the peak
        progress = min(1.0, max(0.0, (epoch - warmup) / max(1e-9, epochs - warmup)))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (f"--epochs {old_epochs} -> {new_epochs}: every per-step schedule (learning rate, "
            f"and momentum or temperature where the method has one) now spans {new_epochs} "
            f"epochs; at epoch {epoch} the cosine stands at {100 * cosine(new_epochs):.0f}% of "
            f"the way from its final value to its peak ({100 * cosine(old_epochs):.0f}% before)")
