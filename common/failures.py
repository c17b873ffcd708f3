"""The one line a failed run ends with, and what it leaves: a write that failed (which file, the
space it needs) and a loss that diverged (diverged.json). Loaded only when one happens."""
import errno
import json
import os
import shutil

import torch

from common.dist import get_rank
from common.errors import DIVERGED, Diverged


def tensor_bytes(obj):
    """Bytes of the tensors in a nested structure: about what its torch.save needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (dict, list, tuple)):
        return sum(map(tensor_bytes, obj.values() if isinstance(obj, dict) else obj))
    return 0


def write_failure(path, error, obj=None):
    """One line for an OSError writing `obj` to `path`: what failed and, for a full disk, how
    much space the file needs and how much is free."""
    line = f"could not write {path}: {error.strerror or error}"
    needed = tensor_bytes(obj)
    if error.errno == errno.ENOSPC and needed:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        line += f" (it needs about {needed / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free there)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        line += " (the run directory is not writable: give another --run-dir)"
    if os.path.exists(path):
        line += f"; the previous {os.path.basename(path)} is intact"
    return line


def diverged(guard, bad, state, epoch=None, batch_in_epoch=None):
    """The Diverged error of a DivergenceGuard's check: `bad` [ranks, (first non-finite step, its
    loss)], or none and non-finite tensors in `state` at the save of (`epoch`, `batch_in_epoch`).
    Rank 0 writes diverged.json with the settings that diverged, which `open_run` refuses."""
    if len(bad):
        step, loss = bad[bad[:, 0].argmin()].tolist()
        step = int(step)
        what = (f"loss {loss:g} at step {step + 1} (epoch {step // guard.steps_per_epoch + 1}"
                f", batch {step % guard.steps_per_epoch + 1})"
                + (f" and the {guard.patience - 1} steps after it" if guard.patience > 1 else ""))
    else:
        name = next((k for k, t in state.items() if t.is_floating_point()
                     and not torch.isfinite(t).all()), "on another rank")
        what = (f"non-finite weights or BatchNorm statistics ({name}) after epoch {epoch}, "
                f"batch {batch_in_epoch}, though the losses so far were finite")
    kept = (f"{guard.args.run_dir}/checkpoint.pt keeps epoch {guard.saved[0]}, batch "
            f"{guard.saved[1]}, the last finite state" if guard.saved
            else "no checkpoint had been saved yet")
    if get_rank() == 0:
        with open(os.path.join(guard.args.run_dir, DIVERGED), "w") as f:
            json.dump({"reason": what, "checkpoint": guard.saved, "args": vars(guard.args)}, f,
                      indent=2)
    return Diverged(f"{what}: the run diverged and stopped without saving; {kept} (what to "
                    f"do: docs/training.md, \"A diverged run\")")
