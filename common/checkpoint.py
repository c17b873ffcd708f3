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
    """Everything needed to continue exactly, at `epoch` epochs plus `batch_in_epoch` batches
    done: `rng_states` holds every process's, in rank order, so that each continues its own."""
    atomic_save({"format": FORMAT, "method": method, "args": vars(args),
                 "world_size": get_world_size(), "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rng_states,
                 **method_state}, path)


# Settings that do not change what a run learns: a resume may give them other values.
FREE_ON_RESUME = {"workers", "log_every", "knn_every", "save_every", "checkpoint_every", "run_dir",
                  "data_dir", "stop_at_step", "compile", "channels_last", "probe", "probe_lr",
                  "allow_changes", "eval_every", "out", "tensorboard", "wandb", "wandb_entity",
                  "wandb_name", "wandb_group", "wandb_tags", "wandb_mode"}
# Values that follow from settings compared themselves (peak_lr: --lr and --batch-size).
DERIVED = {"small_images", "preset", "peak_lr", "peak_lr_given", "recipe"}


def flag(key):
    return "--" + key.replace("_", "-")


def changed_settings(saved, args):
    """[(key, saved value, value now)] for the settings that differ from the `saved` ones."""
    def same(key, old, new):
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            return list(old) == list(new)
        if key == "data" and old != new and os.path.exists(old) and os.path.exists(new):
            return os.path.samefile(old, new)  # ./imagenet and /abs/path/imagenet
        return old == new
    compared = {key: value for key, value in vars(args).items() if key in saved
                and key not in FREE_ON_RESUME | DERIVED}
    return [(key, saved[key], value) for key, value in sorted(compared.items())
            if not same(key, saved[key], value)]


def open_run(args, method, log):
    """The checkpoint.pt of args.run_dir (loaded on the CPU), or None for a new run. A run
    directory holds one run. Refused in one line: a checkpoint (or, before the first one, an
    args.json) of another method; settings that change the training unless --allow-changes
    names each changed flag; the same command again after the run diverged (it would diverge
    again). The same settings without a checkpoint start again.
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
    changes = changed_settings(saved, args) if saved else []
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
    if diverged and not changed_settings(diverged["args"], args):
        raise UserError(
            f"{args.run_dir}: the run diverged with these settings ({diverged['reason']}); "
            f"resuming its checkpoint ({where}) with them would repeat it: change what caused it "
            f"and name the change, e.g. a lower --lr with --allow-changes lr, or another --seed "
            f"with --allow-changes seed (or delete {diverged_path} to retry as it is)")
    done = ckpt["epoch"] + (ckpt["batch_in_epoch"] > 0)
    if args.epochs < done:
        raise UserError(f"--epochs {args.epochs}: {args.run_dir} has already trained {done} "
                        f"epochs")
    finished = done == args.epochs and not ckpt["batch_in_epoch"]
    log.print(f"resumed from {path} at {where}"
              + (": the run is complete, nothing to train" if finished else ""))
    world_size = get_world_size()
    if ckpt.get("world_size", world_size) != world_size:
        log.print(f"note: {world_size} processes now, {ckpt['world_size']} before: the global "
                  f"batch and the recipe are unchanged, each process takes "
                  f"{args.batch_size // world_size} images per step")
    if changes:  # accepted by --allow-changes: printed, applied, recorded (only then loaded)
        from common.allow_changes import accept_changes
        accept_changes(args, ckpt, changes, where, diverged, log)
    return ckpt


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore(ckpt, model, optimizer, scaler):
    """Load `open_run`'s checkpoint and return (epochs done, batches done of the next); (0, 0)
    for a new run. The optimizer keeps this command's hyperparameters (the checkpoint's unless
    changed)."""
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
        state = states[get_rank()]
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
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
    """torch.load on the CPU without arbitrary unpickling (weights_only=True, plus the globals
    above). A missing file, not a PyTorch checkpoint, or one needing code is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = isinstance(e, pickle.UnpicklingError) and re.search(r"GLOBAL (\S+)", str(e))
        if found:  # a function or class to import and call
            raise UserError(f"{path}: refused, loading it would run code (it contains "
                            f"`{found.group(1)}`); only tensors, containers and plain values "
                            f"are read") from None
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None


def load_checkpoint(path):
    """`safe_load` of one of our checkpoints; anything else is a UserError."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a cleanssl checkpoint.pt (no '{FORMAT}' marker)")
    return ckpt


def export_backbone(backbone, path):
    """The backbone as a plain torchvision state dict (no `fc.*`): with the ImageNet stem,
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only fc. A ViT's
    number of heads shows in no weight's shape: it goes into the state dict's `_metadata`
    (ignored by load_state_dict), so that a MoCo v3 ViT-S (12 heads, not DeiT's 6) fine-tuned
    and saved again loads back as itself."""
    state = backbone.state_dict()
    sd = OrderedDict((k, v.detach().cpu()) for k, v in state.items() if not k.startswith("fc."))
    sd._metadata = copy.deepcopy(state._metadata)
    if hasattr(backbone, "encoder") and hasattr(backbone, "class_token"):  # a ViT
        sd._metadata[""]["num_heads"] = backbone.encoder.layers[0].num_heads
    atomic_save(sd, path)


def keep_epoch_copy(run_dir, epoch):
    """--save-every: checkpoint.pt and backbone.pt kept as checkpoint_epoch{epoch}.pt and
    backbone_epoch{epoch}.pt. A hard link costs no disk and stays valid, since the rolling files
    are replaced (atomic_save), never rewritten in place; without links, an atomic copy."""
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
