"""Atomic checkpoints, automatic resume, backbone export, RNG state and stop signals."""
import os
import random
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


def resume(path, model, optimizer, scaler):
    """If `path` exists, load model, optimizer, scaler and RNG states from it and return the
    checkpoint (for the position and the method's own state); otherwise return None."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt


def load_checkpoint(path):
    """Load one of our checkpoints on the CPU; anything else is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a cleanssl checkpoint.pt (no '{FORMAT}' marker)")
    return ckpt


def export_backbone(backbone, path):
    """Save the backbone as a plain torchvision state dict (no `fc.*`): with the ImageNet stem,
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only fc."""
    sd = {k: v.detach().cpu() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    atomic_save(sd, path)


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
