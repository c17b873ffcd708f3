"""The steps every training loop shares: agreeing on a stop, stopping, ending an epoch, and
stopping a run whose loss diverged.

A stop signal (`StopSignal`) is acted on at the first of two kinds of points that all ranks
reach together: inside an epoch, every 10 steps with several processes (one small collective)
or every step alone (`stop_agreed`); and after every epoch but the last, once its summary and
checkpoint are written (`save_or_stop`). So an epoch of any length, even of a single step, ends a
stopped run at the latest when it ends.
"""
import json
import os

import torch

from common.checkpoint import DIVERGED, export_backbone, keep_epoch_copy, requeue_slurm_job
from common.data import count_bad_images
from common.dist import all_gather_tensor, broadcast_flag, cleanup_distributed, get_rank
from common.log import UserError


def epoch_sums(ckpt, batch_in_epoch, size, device):
    """The running sums of an epoch's per-step values (the loss, its terms) as the epoch starts:
    zeros, or, in the epoch a run resumes part-way through, what the stopped run had summed
    (saved as `epoch_sums` with its checkpoint), so that the epoch's means in log.jsonl are
    those of an uninterrupted run."""
    if batch_in_epoch and ckpt and "epoch_sums" in ckpt:
        return ckpt["epoch_sums"].to(device, copy=True)
    return torch.zeros(size, device=device)


def stop_agreed(stop, i, steps_per_epoch, world, device):
    """True on every rank at the same step `i` (0-based, in the epoch) once a stop signal reached
    any rank: every 10 steps with several processes, at every step alone; never at an epoch's
    last step, where `save_or_stop` takes over after the epoch's summary and checkpoint."""
    if i + 1 == steps_per_epoch or (world > 1 and (i + 1) % 10):
        return False
    return broadcast_flag(stop.requested, device)


def stop_and_requeue(save, ckpt_path, epoch, batch_in_epoch, rank, log):
    """Save the position inside the epoch, requeue the Slurm job (rank 0), leave the group."""
    save(epoch, batch_in_epoch)
    log.print(f"stop signal: saved {ckpt_path} at epoch {epoch}, batch {batch_in_epoch}")
    log.close()  # TensorBoard events and W&B, when on
    if rank == 0 and (message := requeue_slurm_job()):
        log.print(message)
    cleanup_distributed()


def save_or_stop(save, ckpt_path, epoch, epochs, stop, rank, log, device, due=True):
    """After `epoch` epochs: checkpoint if `due` (always after the last); if a stop signal
    reached any rank and epochs remain, checkpoint, requeue and leave the group, and return True
    (the caller returns)."""
    if epoch < epochs and broadcast_flag(stop.requested, device):
        stop_and_requeue(save, ckpt_path, epoch, 0, rank, log)
        return True
    if due or epoch == epochs:
        save(epoch, 0)
    return False


def end_epoch(record, args, log, save, backbone, knn_top1, bad_log, rank, stop, device,
              probe=None):
    """After epoch `record["epoch"]`: add the unreadable-image count, the peak GPU memory and,
    when due, the kNN monitor (and every epoch the --probe's val top-1) to the summary `record`,
    log it, checkpoint (`save_or_stop`; `save` refuses a diverged run) and export the backbone
    every --checkpoint-every epochs and, every --save-every epochs, keep a copy of both. Returns
    True when a stop signal ends the run here."""
    epoch = record["epoch"]
    bad_images = count_bad_images(bad_log)
    if bad_images:
        record["bad_images"] = bad_images
    if args.knn_every and (epoch % args.knn_every == 0 or epoch == args.epochs):
        record["knn_top1"] = knn_top1(backbone)
    if probe:  # --probe's val top-1, every epoch (common/probe.py)
        record["probe_top1"] = probe.top1(backbone)
    if torch.cuda.is_available():  # since the start (or the resume) of this process
        record["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.summary(record)

    def save_and_export(epoch, batch_in_epoch):  # checkpoint, backbone.pt, --save-every's copy
        save(epoch, batch_in_epoch)
        if rank == 0:
            export_backbone(backbone, os.path.join(args.run_dir, "backbone.pt"))
            if args.save_every and epoch % args.save_every == 0:
                keep_epoch_copy(args.run_dir, epoch)
    due = epoch % args.checkpoint_every == 0 or bool(args.save_every and
                                                      epoch % args.save_every == 0)
    return save_or_stop(save_and_export, os.path.join(args.run_dir, "checkpoint.pt"), epoch,
                        args.epochs, stop, rank, log, device, due)


class Diverged(UserError):
    """The loss (or the model) turned non-finite: exit code 3, which Slurm does not requeue."""
    exit_code = 3


class DivergenceGuard:
    """Stops a run whose loss turned non-finite (NaN or inf) before it saves anything over its
    last good checkpoint, as DINO's and MAE's training loops stop on a non-finite loss.

    `watch(loss, step)` every step: a few device operations, no host sync. `check()` at the log
    interval (which syncs anyway) and `check(epoch, batch)` in every save (which then also needs
    finite weights and buffers): a collective, so that all ranks stop together. A diverged run
    ends with one line naming the first non-finite step, its loss and the checkpoint kept, exit
    code 3, no requeue, and diverged.json in the run directory, which `open_run` reads so that
    the same command does not resume into the same divergence.

    fp16: GradScaler skips the update of a step whose gradients overflow (the loss is finite:
    normal, ignored here) or whose loss is non-finite (a forward overflow; the weights stay as
    they were). Only FP16_PATIENCE such steps in a row stop the run.
    """
    FP16_PATIENCE = 20

    def __init__(self, args, model, steps_per_epoch, device, ckpt=None):
        self.patience = self.FP16_PATIENCE if args.precision == "fp16" else 1
        self.args, self.model, self.steps_per_epoch = args, model, steps_per_epoch
        self.saved = ckpt and (ckpt["epoch"], ckpt["batch_in_epoch"])  # the last good checkpoint
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # non-finite in a row
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), device=device)

    def watch(self, loss, step):
        """After the loss of global step `step` (0-based) is computed: no host sync."""
        loss = loss.detach().float()
        self.streak = (self.streak + 1) * ~torch.isfinite(loss)
        now = (self.streak == self.patience) & (self.first_step < 0)
        self.first_step = torch.where(now, step + 1 - self.patience, self.first_step)
        self.first_loss = torch.where(now, loss, self.first_loss)

    def check(self, epoch=None, batch_in_epoch=None):
        """Raise Diverged on every rank if any rank diverged. Given the position of a save
        (`epoch` epochs and `batch_in_epoch` batches done), the model must be finite too."""
        state = self.model.state_dict() if epoch is not None else {}
        finite = [torch.isfinite(t).all() for t in state.values() if t.is_floating_point()]
        finite_model = torch.stack(finite).all().float() if finite else torch.ones(
            (), device=self.first_loss.device)
        mine = torch.stack([self.first_step.double(), self.first_loss.double(),
                            finite_model.double()])
        ranks = all_gather_tensor(mine[None]).cpu()  # [world, 3]: one host sync
        bad = ranks[ranks[:, 0] >= 0]
        if len(bad) == 0 and bool(ranks[:, 2].all()):
            if epoch is not None:
                self.saved = (epoch, batch_in_epoch)
            return
        if len(bad):
            step, loss, _ = bad[bad[:, 0].argmin()].tolist()
            step = int(step)
            what = (f"loss {loss:g} at step {step + 1} (epoch {step // self.steps_per_epoch + 1}"
                    f", batch {step % self.steps_per_epoch + 1})"
                    + (f" and the {self.patience - 1} steps after it" if self.patience > 1 else ""))
        else:
            name = next((k for k, t in state.items() if t.is_floating_point()
                         and not torch.isfinite(t).all()), "on another rank")
            what = (f"non-finite weights or BatchNorm statistics ({name}) after epoch {epoch}, "
                    f"batch {batch_in_epoch}, though the losses so far were finite")
        kept = (f"{self.args.run_dir}/checkpoint.pt keeps epoch {self.saved[0]}, batch "
                f"{self.saved[1]}, the last finite state" if self.saved
                else "no checkpoint had been saved yet")
        if get_rank() == 0:  # with the settings that diverged, which open_run will refuse
            with open(os.path.join(self.args.run_dir, DIVERGED), "w") as f:
                json.dump({"reason": what, "checkpoint": self.saved, "args": vars(self.args)}, f,
                          indent=2)
        raise Diverged(f"{what}: the run diverged and stopped without saving; {kept} (what to "
                       f"do: docs/training.md, \"A diverged run\")")
