"""Atomic checkpoints, resume (and what a resume may change), backbone export and RNG state."""
import argparse
import copy
import json
import os
import pickle
import random
import re
import shutil
from collections import OrderedDict

import numpy as np
import torch

from common.dist import get_rank, get_world_size
from common.errors import DIVERGED, UserError
from common.model import unwrap

FORMAT = "cleanssl-checkpoint-v1"


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then os.replace: a crash or a kill at any moment
    leaves either the previous file or the new one, never a truncated one. A failed write (a full
    disk, a read-only run directory) is a UserError in one line; the previous file stays."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write of its file as a RuntimeError ("unexpected pos")
        # raised while handling the OSError: look for that cause
        cause = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
        if cause is not None:
            from common.failures import write_failure  # only then
            raise UserError(write_failure(path, cause, obj)) from None
        raise


def save_checkpoint(path, method, args, model, optimizer, scaler, epoch, batch_in_epoch,
                    rng_states, **method_state):
    """Everything needed to continue exactly: the unwrapped model, optimizer, GradScaler, the
    position (`epoch` epochs done plus `batch_in_epoch` batches of the next), the arguments and
    the number of processes, every process's RNG states (`rng_states`, in rank order: a
    resumed process continues its own), and the method's own state (queue, ...) as keywords."""
    atomic_save({"format": FORMAT, "method": method, "args": vars(args),
                 "world_size": get_world_size(), "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rng_states,
                 **method_state}, path)


# ------------------------------------------------------------------------------- resuming

# Settings that do not change what a run learns: a resume may give them other values.
FREE_ON_RESUME = {"workers", "log_every", "knn_every", "save_every", "checkpoint_every", "run_dir",
                  "data_dir", "stop_at_step", "compile", "channels_last", "probe", "probe_lr",
                  "allow_changes", "eval_every", "out", "tensorboard", "wandb", "wandb_entity",
                  "wandb_name", "wandb_group", "wandb_tags", "wandb_mode"}
# Values that follow from settings compared themselves (peak_lr: --lr and --batch-size).
DERIVED = {"small_images", "preset", "peak_lr", "peak_lr_given", "recipe"}


def flag(key):
    return "--" + key.replace("_", "-")


def changed_settings(saved, args, free=FREE_ON_RESUME):
    """[(key, saved value, value now)] for the settings of `args` that differ from the `saved`
    arguments, leaving out the `free` ones and derived values."""
    def same(key, old, new):
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            return list(old) == list(new)
        if key == "data" and old != new and os.path.exists(old) and os.path.exists(new):
            return os.path.samefile(old, new)  # ./imagenet and /abs/path/imagenet
        return old == new
    return [(key, saved[key], value) for key, value in sorted(vars(args).items())
            if key in saved and key not in free | DERIVED and not same(key, saved[key], value)]


def open_run(args, method, log, free=FREE_ON_RESUME):
    """The checkpoint.pt of args.run_dir (loaded on the CPU), or None for a new run.

    A run directory holds one run. Refused in one line: a checkpoint (or, before the first one,
    an args.json) of another method; settings that change the training (every flag but `free`)
    unless --allow-changes names each changed flag; the same command again after the run
    diverged (it would diverge again). Accepted changes are printed and recorded in args.json,
    and take effect from the resumed step. The same settings without a checkpoint start again.
    """
    path = os.path.join(args.run_dir, "checkpoint.pt")
    diverged_path = os.path.join(args.run_dir, DIVERGED)
    diverged = read_json(diverged_path)
    ckpt = load_checkpoint(path) if os.path.exists(path) else None
    saved = ({**ckpt["args"], "method": ckpt["method"]} if ckpt
             else read_json(os.path.join(args.run_dir, "args.json")))
    if saved and saved.get("method", method) != method:
        raise UserError(f"{args.run_dir} holds a {saved['method']} run, which {method} cannot "
                        f"resume: give another --run-dir")
    where = f"epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']}" if ckpt else "its start"
    changes = changed_settings(saved, args, free) if saved else []
    allowed = {name.lstrip("-").replace("-", "_") for name in args.allow_changes}
    if refused := [(k, old, new) for k, old, new in changes if k not in allowed]:
        raise UserError(
            f"{args.run_dir} holds a run with other settings ("
            + "; ".join(f"{flag(k)} {old} there, {new} now" for k, old, new in refused)
            + "): train them in a new --run-dir, or continue this run with them from "
            f"{where} by adding --allow-changes {' '.join(flag(k)[2:] for k, _, _ in refused)}")
    if not ckpt:
        if diverged:
            raise UserError(f"{args.run_dir} holds a run that diverged before its first "
                            f"checkpoint ({diverged['reason']}): start again in a new --run-dir")
        return None
    if diverged and not changed_settings(diverged["args"], args, free):
        raise UserError(
            f"{args.run_dir}: the run diverged with these settings ({diverged['reason']}); "
            f"resuming its checkpoint ({where}) with them would repeat it: change what caused it "
            f"and name the change, e.g. a lower --lr with --allow-changes lr, or another --seed "
            f"with --allow-changes seed (or delete {diverged_path} to retry as it is)")
    done = ckpt["epoch"] + (ckpt["batch_in_epoch"] > 0)
    if args.epochs < done:
        raise UserError(f"--epochs {args.epochs}: {args.run_dir} has already trained {done} "
                        f"epochs")
    log.print(f"resumed from {path} at {where}")
    world_size = get_world_size()
    if ckpt.get("world_size", world_size) != world_size:
        log.print(f"note: {world_size} processes now, {ckpt['world_size']} before: the global "
                  f"batch and the recipe are unchanged, each process takes "
                  f"{args.batch_size // world_size} images per step")
    if changes:  # accepted by --allow-changes: printed, applied, recorded (only then loaded)
        from common.allow_changes import accept_changes
        accept_changes(args, ckpt, changes, where, diverged, diverged_path, log)
    return ckpt


def read_json(path):
    """The JSON in `path`, or None where there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore(ckpt, model, optimizer, scaler):
    """Load a checkpoint of `open_run` into the model, optimizer, GradScaler and RNGs, and return
    where to continue: (epochs done, batches done of the next); (0, 0) for a new run. The
    optimizer keeps this command's hyperparameters (those of the checkpoint unless changed)."""
    if ckpt is None:
        return 0, 0
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = (str(e).strip().splitlines()[1:2] or [str(e)])[0].strip()
        raise UserError(f"the checkpoint's model does not fit these settings ({detail[:160]}"
                        f"...): a model's shape cannot change on resume") from None
    if "optimizer" not in {key for key, _, _ in ckpt.get("changes", [])}:
        settings = [{k: v for k, v in group.items() if k != "params"}
                    for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
    scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank
    if len(states) == get_world_size():
        set_rng_state(states[get_rank()])
    else:  # another number of processes: a state of its own for each, fixed by the position
        step = ckpt["epoch"] * 1_000_003 + ckpt["batch_in_epoch"]
        seed_everything((ckpt["args"]["seed"] * 1_000_003 + step) * 10_007 + get_rank())
    return ckpt["epoch"], ckpt["batch_in_epoch"]


# What our checkpoints hold besides tensors and plain Python values: numpy's RNG state (an
# array). torch.load(weights_only=True) rebuilds only tensors, containers and the globals
# allowed here, so opening a checkpoint never runs code that came with the file.
_numpy_core = getattr(np, "_core", None) or np.core
# Also argparse.Namespace, the arguments some codebases pickle beside their weights
# (simclr-pytorch's {"state_dict", "hparams"}, models/ssl.py; DINO's full checkpoints' "args",
# main_dino.py:278-286): a class whose rebuilding only sets attributes.
SAFE_GLOBALS = [_numpy_core.multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32)), argparse.Namespace]


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
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only fc.

    A ViT's number of heads shows in no weight's shape: it goes into the state dict's
    `_metadata` (where PyTorch keeps each module's version, ignored by load_state_dict), so that
    a MoCo v3 ViT-S (12 heads, not DeiT's 6) fine-tuned and saved again loads back as itself."""
    state = backbone.state_dict()
    sd = OrderedDict((k, v.detach().cpu()) for k, v in state.items() if not k.startswith("fc."))
    sd._metadata = copy.deepcopy(state._metadata)
    if hasattr(backbone, "encoder") and hasattr(backbone, "class_token"):  # a ViT
        sd._metadata[""]["num_heads"] = backbone.encoder.layers[0].num_heads
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
