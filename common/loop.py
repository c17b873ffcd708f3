"""The steps every training loop shares: agreeing on a stop, stopping, ending an epoch.

A stop signal (`StopSignal`) is acted on at the first of two kinds of points that all ranks
reach together: inside an epoch, every 10 steps with several processes (one small collective)
or every step alone (`stop_agreed`); and after every epoch but the last, once its summary and
checkpoint are written (`save_or_stop`). So an epoch of any length, even of a single step, ends a
stopped run at the latest when it ends.
"""
import os

import torch

from common.checkpoint import export_backbone, keep_epoch_copy, requeue_slurm_job
from common.data import count_bad_images
from common.dist import broadcast_flag, cleanup_distributed


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
    if rank == 0 and (message := requeue_slurm_job()):
        log.print(message)
    cleanup_distributed()


def save_or_stop(save, ckpt_path, epoch, epochs, stop, rank, log, device):
    """After `epoch` epochs: checkpoint; if a stop signal reached any rank and epochs remain,
    also requeue and leave the group, and return True (the caller returns)."""
    if epoch < epochs and broadcast_flag(stop.requested, device):
        stop_and_requeue(save, ckpt_path, epoch, 0, rank, log)
        return True
    save(epoch, 0)
    return False


def end_epoch(record, args, log, save, backbone, knn_top1, bad_log, rank, stop, device,
              probe=None):
    """After epoch `record["epoch"]`: add the unreadable-image count, the peak GPU memory and,
    when due, the kNN monitor (and every epoch the --probe's val top-1) to the summary `record`, log it, export the backbone, checkpoint
    (`save_or_stop`) and, every --save-every epochs, keep a copy of both.
    Returns True when a stop signal ends the run here."""
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
    if rank == 0:
        export_backbone(backbone, os.path.join(args.run_dir, "backbone.pt"))

    def save_and_keep(epoch, batch_in_epoch):  # the rolling checkpoint, then --save-every's copy
        save(epoch, batch_in_epoch)
        if rank == 0 and args.save_every and epoch % args.save_every == 0:
            keep_epoch_copy(args.run_dir, epoch)
    return save_or_stop(save_and_keep, os.path.join(args.run_dir, "checkpoint.pt"), epoch,
                        args.epochs, stop, rank, log, device)
