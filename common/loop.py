"""The steps every training loop shares: agreeing on a stop, stopping, ending an epoch."""
import os

from common.checkpoint import export_backbone, requeue_slurm_job
from common.data import count_bad_images
from common.dist import broadcast_flag, cleanup_distributed


def stop_agreed(stop, i, steps_per_epoch, world, device):
    """True on every rank at the same step once a stop signal (`StopSignal`) reached any rank.
    With several processes they agree every 10 steps (one small collective), alone at every
    step. A signal in an epoch's last step is taken at the next epoch's first check, after that
    epoch's summary and checkpoint."""
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


def end_epoch(record, args, log, save, backbone, knn_top1, bad_log, rank):
    """After epoch `record["epoch"]`: add the unreadable-image count and, when due, the kNN
    monitor to the summary `record`, log it, checkpoint, export the backbone."""
    epoch = record["epoch"]
    bad_images = count_bad_images(bad_log)
    if bad_images:
        record["bad_images"] = bad_images
    if args.knn_every and (epoch % args.knn_every == 0 or epoch == args.epochs):
        record["knn_top1"] = knn_top1(backbone)
    log.summary(record)
    save(epoch, 0)
    if rank == 0:
        export_backbone(backbone, os.path.join(args.run_dir, "backbone.pt"))
