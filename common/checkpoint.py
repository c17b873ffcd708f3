"""Atomic checkpoints, automatic resume, backbone export, RNG state and stop signals."""
import os
import pickle
import random
import re
import shutil
import signal
import subprocess

import numpy as np
import torch

from common.log import UserError
from common.model import unwrap

FORMAT = "cleanssl-checkpoint-v1"


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then os.replace: a crash or a kill at any moment
    leaves either the previous file or the new one, never a truncated one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, method, args, model, optimizer, scaler, epoch, batch_in_epoch,
                    **method_state):
    """Everything needed to continue exactly: the unwrapped model, optimizer, GradScaler, the
    position (`epoch` epochs done plus `batch_in_epoch` batches of the next), the arguments,
    the RNG states, and the method's own state (target network, queue, ...) as keywords."""
    atomic_save({"format": FORMAT, "method": method, "args": vars(args),
                 "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "rng": rng_state(), **method_state}, path)


def resume(path, model, optimizer, scaler, check=None):
    """If `path` exists, load model, optimizer, scaler and RNG states from it and return the
    checkpoint (for the position and the method's own state); otherwise return None. `check`,
    if given, sees the checkpoint first (e.g. to refuse one of another run)."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    if check:
        check(ckpt)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt


# What our checkpoints hold besides tensors and plain Python values: numpy's RNG state (an
# array). torch.load(weights_only=True) rebuilds only tensors, containers and the globals
# allowed here, so opening a checkpoint never runs code that came with the file.
_numpy_core = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [_numpy_core.multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32))]


def safe_load(path):
    """torch.load on the CPU without arbitrary unpickling (weights_only=True, plus the numpy
    arrays above). A missing file, a file that is not a PyTorch checkpoint, or one that would
    need code to be unpickled (a class, a function call) is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # a function or class to import and call
        if found:
            raise UserError(f"{path}: refused, loading it would run code (it contains "
                            f"`{found.group(1)}`); only tensors, containers and plain values "
                            f"are read") from None
        raise UserError(f"{path}: not a PyTorch checkpoint (UnpicklingError)") from None
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None


def load_checkpoint(path):
    """Load one of our checkpoints on the CPU (see `safe_load`); anything else is a UserError."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a cleanssl checkpoint.pt (no '{FORMAT}' marker)")
    return ckpt


def export_backbone(backbone, path):
    """Save the backbone as a plain torchvision state dict (no `fc.*`): with the ImageNet stem,
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only fc."""
    sd = {k: v.detach().cpu() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    atomic_save(sd, path)


def keep_epoch_copy(run_dir, epoch):
    """--save-every: checkpoint.pt and backbone.pt as they are after `epoch`, kept as
    checkpoint_epoch{epoch}.pt and backbone_epoch{epoch}.pt. A hard link costs no disk and stays
    valid, since the rolling files are replaced (atomic_save), never rewritten in place; where
    the file system has no links, an atomic copy."""
    for name in ("checkpoint", "backbone"):
        src, dst = (os.path.join(run_dir, f"{name}{tag}.pt") for tag in ("", f"_epoch{epoch}"))
        tmp = f"{dst}.tmp.{os.getpid()}"
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


HEAD_FORMAT = "cleanssl-linear-head-v1"


def save_head(head, path, classes, **info):
    """linear_head.pt: a trained linear classifier's weights, its class names, and `info` (the
    architecture, image size and protocol it was trained with)."""
    atomic_save({"format": HEAD_FORMAT, "weight": head.weight.detach().cpu(),
                 "bias": head.bias.detach().cpu(), "classes": list(classes), **info}, path)


def read_head(path):
    """The contents of a linear_head.pt (see `save_head`)."""
    saved = safe_load(path)
    if not isinstance(saved, dict) or saved.get("format") != HEAD_FORMAT:
        raise UserError(f"{path}: not a linear_head.pt written by linear_eval.py")
    return saved


def head_layer(saved, path, feature_dim, classes):
    """The nn.Linear of a read linear_head.pt, checked against the features and class names."""
    if saved["classes"] != list(classes):
        raise UserError(f"{path}: trained on {len(saved['classes'])} classes "
                        f"({', '.join(saved['classes'][:3])}, ...), not those of --data "
                        f"({len(classes)}: {', '.join(classes[:3])}, ...)")
    if saved["weight"].shape[1] != feature_dim:
        raise UserError(f"{path}: a head for {saved['weight'].shape[1]}-d features, the "
                        f"backbone gives {feature_dim}-d")
    head = torch.nn.Linear(feature_dim, len(classes))
    head.load_state_dict({"weight": saved["weight"], "bias": saved["bias"]})
    return head


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignal:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, Ctrl-C from a
    launcher) set `requested`; the training loop checks it between steps, saves and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def requeue_slurm_job():
    """Put this Slurm job back in the queue: the requeued job keeps its id, hence its run
    directory, and resumes from the checkpoint. Slurm then ends the job's processes (the output
    shows "CANCELLED ... DUE TO JOB REQUEUE"). Returns a line for the log, None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=120)
        error = done.stderr.strip() if done.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        error = str(e)
    if error:  # e.g. a job submitted with --no-requeue
        return (f"could not requeue Slurm job {job} ({error}): submit it again with the same "
                f"--run-dir to resume")
    return f"requeued Slurm job {job}"
