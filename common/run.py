"""A training run around the method's own step: the processes, the run directory (one run per
folder), the log, the checkpoint, and stopping (a signal, a diverged loss). main() calls
`Run(args, method)`, `train_loader`, `distribute`, `restore`, then per epoch `epoch`, per step
`step_done` and `stop_agreed` (`stop`), then `end_epoch`, and at last `finish`; a collective
(every rank must make it at the same point) says so.

A stop signal (SIGUSR1, SIGTERM) is acted on where all ranks meet: inside an epoch, every 10 steps
with several processes (one small collective) or every step alone (`stop_agreed`); after every
epoch but the last, once its summary is logged (`end_epoch`). So an epoch of any length ends a
stopped run at the latest when it ends.
"""
import os
import signal
import time

import torch
import torch.nn.functional as F

from common.args import check_batch, format_args, make_run_dir, save_args
from common.checkpoint import (export_backbone, keep_epoch_copy, open_run, restore, rng_state,
                               save_checkpoint, seed_everything)
from common.data import build_dataset, count_bad_images, make_loader
from common.dist import (all_gather_tensor, broadcast_flag, broadcast_object, cleanup_distributed,
                         gather_objects, get_rank, get_world_size, setup_distributed)
from common.errors import UserError
from common.knn import knn_monitor
from common.log import Logger, Progress
from common.model import distribute, grad_scaler, resolve_precision


# A healthy embedding spreads its unit vectors over the sphere: each dimension's std over a batch
# is about 1/sqrt(d); a collapsed one gives every image the same vector, std 0 (SimSiam paper,
# section 4.1, Fig. 2). Under this fraction of 1/sqrt(d) a run warns that it is collapsing. A
# random network starts bunched: measured on MoCo (d 128, docs/moco.md), a healthy run dipped to
# 0.0093 (0.105 of 1/sqrt(d)) at step 50 and recovered, the collapsing one sat at 0.0010 (0.012)
COLLAPSE_FRACTION = 0.05


def embedding_std(z):
    """The collapse monitor of the SimSiam paper: the std over the batch of each dimension of
    z / ||z||, averaged over the dimensions. z: [n, d]; no gradient, no host sync."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class Run:
    """Joins the processes, picks the device and precision, opens args.run_dir before any data
    is read (`open_run`), and seeds this process (--seed + rank)."""

    def __init__(self, args, method):
        self.args, self.method = args, method
        self.device = setup_distributed()
        self.batch_per_rank = check_batch(args)  # --batch-size is the global batch
        args.precision = resolve_precision(args.precision, self.device)
        args.run_dir = broadcast_object(args.run_dir)  # one folder for all (rank 0's timestamp)
        make_run_dir(args.run_dir)
        self.log = Logger(args.run_dir)
        self.ckpt = open_run(args, method, self.log)  # None: a new run
        seed_everything(args.seed + get_rank())
        self.scaler = grad_scaler(args.precision, self.device)  # active for fp16 only
        self.stop_signal = StopSignal(getattr(args, "stop_at_step", None))
        self.ckpt_path = os.path.join(args.run_dir, "checkpoint.pt")
        self.bad_log = os.path.join(args.run_dir, "bad_images.txt")
        self.steps_per_epoch = self.probe = self.knn = None
        self.values, self.sums = {}, {}  # the last step's values; the epoch's sums of tensors
        self.bounds, self.collapsing = {}, set()  # collapse monitors: healthy range, state

    def print(self, *lines):
        self.log.print(*lines)

    def train_loader(self, views):
        """This process's share of each global batch of the training images as `views` makes
        them, seeded by (seed, epoch, image), resumable mid-epoch (common/data.py)."""
        args = self.args
        dataset = build_dataset(args.data, "ssl", views, args.data_dir, args.synthetic_size,
                                args.img_size)
        dataset.bad_log = self.bad_log
        loader = make_loader(dataset, self.batch_per_rank, args.workers, seed=args.seed,
                             seeded=True)
        if len(loader) == 0:
            raise UserError(f"{len(dataset)} training images < one batch of {args.batch_size}: "
                            f"lower --batch-size")
        self.steps_per_epoch = len(loader)
        return loader

    def distribute(self, model):
        """The model on the device, with SyncBN, DDP, channels_last, --compile (common/model.py)."""
        return distribute(model, self.device, get_world_size(), self.args.compile,
                          self.args.sync_bn, self.args.channels_last)

    def restore(self, model, optimizer, backbone=None, extra_state=None):
        """Resume the checkpoint or start a new run (args.json; the random `backbone`'s kNN top-1
        as epoch 0); returns (epochs done, batches done of the next). `backbone`: what kNN,
        --probe and backbone.pt read (None: none). `extra_state()`: the method's state beyond
        the model, for each checkpoint; called on every rank at each save (may be a collective)."""
        args, ckpt = self.args, self.ckpt
        self.model, self.optimizer, self.backbone = model, optimizer, backbone
        self.extra_state = extra_state
        self.start_epoch, self.start_batch = restore(ckpt, model, optimizer, self.scaler)
        if ckpt and self.start_batch and "epoch_sums" in ckpt:
            self.sums = {k: v.to(self.device) for k, v in ckpt["epoch_sums"].items()}
        self.log.start_tracking(args, self.steps_per_epoch,
                                resume=ckpt and (self.start_epoch, self.start_batch))
        if backbone is not None and getattr(args, "knn_every", 0):
            self.knn = knn_monitor(args, self.device)
        if backbone is not None and getattr(args, "probe", False):
            from common.probe import online_probe  # only with --probe
            self.probe = online_probe(args, backbone, self.device, ckpt)
        self.guard = DivergenceGuard(args, model, self.steps_per_epoch, self.device, ckpt)
        if not ckpt:
            self.print(f"{self.method}, {get_world_size()} process(es) on {self.device}\n"
                       f"{format_args(args)}")
            if get_rank() == 0:
                save_args(args, os.path.join(args.run_dir, "args.json"), self.method)
            if self.knn:  # epoch-0 reference: the randomly initialised network
                self.print("kNN monitor: the randomly initialised network's top-1 first, the run's "
                           "reference (--knn-every 0: no monitor)")
                self.log.summary({"epoch": 0, "knn_top1": self.knn(backbone)})
        return self.start_epoch, self.start_batch

    def epoch(self, epoch, loader):
        """(i, batch) for the batches of `epoch`, i counted from the batch a resumed run stopped
        at; sets the loader's epoch (order, augmentations) and shows the progress."""
        first = self.start_batch if epoch == self.start_epoch else 0
        loader.sampler.set_epoch(epoch, skip_batches=first)
        self.current_epoch, self.first_batch, self.epoch_start = epoch, first, time.time()
        if not first:
            self.sums = {}
        self.progress = Progress(loader, len(loader), f"epoch {epoch + 1}/{self.args.epochs}")
        return enumerate(self.progress, start=first)

    def step_done(self, step, labels=None, embedding=None, **values):
        """After the optimizer step of global step `step` (0-based): --probe trains on `labels`,
        `embedding` [n, d] feeds the collapse monitor. Tensors in `values` are summed for the
        epoch's means with no host sync. Every --log-every steps: a log record (a host sync),
        the divergence check (a collective), a collapse warning."""
        self.guard.watch(values["loss"], step)
        if self.probe:
            self.probe.step(labels)
        if embedding is not None:
            values["embedding_std"] = embedding_std(embedding)
            if "embedding_std" not in self.bounds:  # about 1/sqrt(d) when healthy
                dim = embedding.shape[1]
                self.watch_collapse("embedding_std", low=COLLAPSE_FRACTION * dim ** -0.5,
                                    why=f"{COLLAPSE_FRACTION} x 1/sqrt({dim}), its healthy value")
        for key, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.values[key] = value
        i = step - self.current_epoch * self.steps_per_epoch
        if (i + 1) % self.args.log_every == 0:
            record = {"epoch": self.current_epoch, "step": step + 1, **self.reported(self.values),
                      "img_per_s": (i + 1 - self.first_batch) * self.args.batch_size
                      / (time.time() - self.epoch_start)}
            self.progress.update(record)
            self.log.log(record)
            self.guard.check()
            self.warn_if_collapsing(record)
        self.stop_signal.step_done(step)

    def stop_agreed(self, i):
        """True on every rank at the same step `i` (0-based, in the epoch) once a stop signal
        reached any rank: every 10 steps with several processes (a collective), every step
        alone; never at an epoch's last step, where `end_epoch` takes over."""
        if i + 1 == self.steps_per_epoch or (get_world_size() > 1 and (i + 1) % 10):
            return False
        return broadcast_flag(self.stop_signal.requested, self.device)

    def stop(self, epoch, batch_in_epoch):
        """Save the position (a collective), requeue the Slurm job, leave the process group."""
        self.save(epoch, batch_in_epoch)
        self.print(f"stop signal: saved {self.ckpt_path} at epoch {epoch}, batch {batch_in_epoch}")
        self.log.close()  # TensorBoard events and W&B, when on
        if get_rank() == 0 and os.environ.get("SLURM_JOB_ID") and self.stop_signal.requeue:
            from common.slurm import requeue_job  # only under Slurm
            self.print(requeue_job())
        cleanup_distributed()

    def end_epoch(self, **values):
        """After an epoch (collectives): the summary logged (with `values`), then `save` every
        --checkpoint-every epochs and after the last. True when a stop signal ends the run here."""
        args, epoch, elapsed = self.args, self.current_epoch + 1, time.time() - self.epoch_start
        means = {k: v / self.steps_per_epoch for k, v in self.mean_over_ranks(self.sums).items()}
        record = {"epoch": epoch, **self.reported({**self.values, **means}), **values,
                  "epoch_time": elapsed, "img_per_s": (self.steps_per_epoch - self.first_batch)
                  * args.batch_size / elapsed}
        if bad_images := count_bad_images(self.bad_log):
            record["bad_images"] = bad_images
        if self.knn and (epoch % args.knn_every == 0 or epoch == args.epochs):
            record["knn_top1"] = self.knn(self.backbone)
        if self.probe:  # --probe's val top-1, every epoch (common/probe.py)
            record["probe_top1"] = self.probe.top1(self.backbone)
        if torch.cuda.is_available():  # since the start (or the resume) of this process
            record["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.log.summary(record)
        self.warn_if_collapsing(record)
        if epoch < args.epochs and broadcast_flag(self.stop_signal.requested, self.device):
            self.stop(epoch, 0)
            return True
        every, keep = getattr(args, "checkpoint_every", 1), getattr(args, "save_every", 0)
        if epoch % every == 0 or (keep and epoch % keep == 0) or epoch == args.epochs:
            self.save(epoch, 0)
        return False

    def finish(self, message=None):
        """The end of the run: a last line, the log's sinks closed, the process group left."""
        self.print(message or f"done: {self.args.run_dir}/checkpoint.pt and backbone.pt")
        self.log.close()
        cleanup_distributed()

    def watch_collapse(self, key, low=None, high=None, why=""):
        """Warn in one line when the logged `key` (e.g. DINO's teacher entropy) leaves [low, high],
        a healthy run's range; again after it came back and left again. `why`: what the bound is."""
        self.bounds[key] = (low, high, why)

    def warn_if_collapsing(self, record):
        for key, (low, high, why) in self.bounds.items():
            value = record.get(key)
            if value is None:
                continue
            under, over = low is not None and value < low, high is not None and value > high
            if (under or over) and key not in self.collapsing:
                where = f"step {record['step']}" if "step" in record else f"epoch {record['epoch']}"
                bound = f"under {low:.3g}" if under else f"over {high:.3g}"
                self.print(f"warning: the embedding is collapsing at {where}: {key} {value:.4g}, "
                           f"{bound} ({why}); what to try: docs/training.md, \"Collapse\"")
            self.collapsing = self.collapsing | {key} if under or over else self.collapsing - {key}

    def save(self, epoch, batch_in_epoch):
        """checkpoint.pt at this position and, at an epoch's end, backbone.pt and --save-every's
        copies; refused if the run diverged. A collective."""
        self.guard.check(epoch, batch_in_epoch)  # never save a diverged run over its last state
        extra = self.extra_state() if self.extra_state else {}
        rng = gather_objects(rng_state())  # each rank continues its own random numbers
        sums = {k: v.cpu() for k, v in self.mean_over_ranks(self.sums).items()}
        if get_rank() == 0:
            save_checkpoint(self.ckpt_path, self.method, self.args, self.model, self.optimizer,
                            self.scaler, epoch, batch_in_epoch, rng, epoch_sums=sums,
                            probe=self.probe and self.probe.state_dict(), **extra)
            if self.backbone is not None and batch_in_epoch == 0:
                export_backbone(self.backbone, os.path.join(self.args.run_dir, "backbone.pt"))
                if getattr(self.args, "save_every", 0) and epoch % self.args.save_every == 0:
                    keep_epoch_copy(self.args.run_dir, epoch)

    @staticmethod
    def mean_over_ranks(sums):  # a collective
        if not sums:
            return sums
        return dict(zip(sums, all_gather_tensor(torch.stack(list(sums.values()))[None]).mean(0)))

    @staticmethod
    def reported(values):
        """The values as plain numbers for a log record: one host sync for all tensors."""
        tensors = [k for k, v in values.items() if torch.is_tensor(v)]
        numbers = torch.stack([values[k] for k in tensors]).tolist() if tensors else []
        return {**values, **dict(zip(tensors, numbers))}


class DivergenceGuard:
    """Stops a run whose loss turned non-finite before it saves over its last good checkpoint,
    as DINO's and MAE's loops do. `watch` every step (no host sync); `check()` at the log
    interval and `check(epoch, batch)` in every save (the weights too): a collective, so that
    all ranks stop together, with exit code 3 (no requeue) and diverged.json (common/failures.py).

    fp16: GradScaler skips the update of a step whose gradients overflow (the loss is finite:
    normal, ignored here) or whose loss is non-finite (a forward overflow; the weights stay as
    they were). Only FP16_PATIENCE such steps in a row stop the run."""
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
        finite = [torch.isfinite(t).all().double() for t in state.values() if t.is_floating_point()]
        mine = torch.stack([self.first_step.double(), self.first_loss.double(), *finite])
        ranks = all_gather_tensor(mine[None]).cpu()  # [world, 2 + float tensors]: one host sync
        bad = ranks[ranks[:, 0] >= 0, :2]
        if len(bad) == 0 and bool(ranks[:, 2:].all()):
            if epoch is not None:
                self.saved = (epoch, batch_in_epoch)
            return
        from common.failures import diverged  # only then: the line, diverged.json
        raise diverged(self, bad, state, epoch, batch_in_epoch)


class StopSignal:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, a launcher's
    stop) set `requested` and `requeue` (a Slurm job goes back in the queue). Ctrl-C (SIGINT,
    unless ignored, as in a shell's background job) and --stop-at-step (`at_step`, once that many
    steps are done) set `requested` only: the user stops the run. Ctrl-C does so once a step is
    done (before, and in linear_eval.py --knn, there is nothing to save: it quits at once); a
    second Ctrl-C quits at once, unsaved, but not one within a second of the first: torchrun
    passes the terminal's Ctrl-C on to its workers, which had it already. Not a method of Run: a
    handler bound to the Run would keep its loader's workers alive until the interpreter's exit,
    which then waits on them forever."""

    def __init__(self, at_step=None):
        self.requested = self.requeue = False
        self.at_step, self.interrupted = at_step, None  # the first Ctrl-C's time
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = self.requeue = True

    def _interrupt(self, signum, frame):
        if self.interrupted is None:
            self.requested, self.interrupted = True, time.monotonic()
            if os.environ.get("RANK", "0") == "0":  # not print: it could re-enter one it stopped
                os.write(2, b"Ctrl-C: the run saves after this step and exits (Ctrl-C again: "
                            b"quit now, unsaved)\n")
        elif time.monotonic() > self.interrupted + 1:
            raise KeyboardInterrupt

    def step_done(self, step):
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # the first step
            signal.signal(signal.SIGINT, self._interrupt)
        if step + 1 == self.at_step:
            self.requested = True
