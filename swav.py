"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, NeurIPS 2020, arXiv 2006.09882.
Official code (PyTorch): github.com/facebookresearch/swav

Several crops of each image (multi-crop: 2 large + 6 small) go through a ResNet, an MLP projector
and an L2 normalisation; their scores against K = 3000 learnable unit prototypes are turned into
soft cluster assignments ("codes") by a few Sinkhorn-Knopp iterations that spread the global batch
evenly over the prototypes. Each of the two large crops' codes is predicted from every other crop
(swapped prediction). Defaults are the official 800-epoch recipe (ResNet-50, batch 4096, LARS, lr
0.3 x batch/256 = 4.8, 2 x 224 + 6 x 96 crops: 75.3% linear top-1 in the official README; 200
epochs at batch 256 with a queue: 72.7%). Images of 64 px or less (CIFAR) switch to solo-learn's
CIFAR settings (the paper has none: ResNet-18 with a 3x3 stem, batch 256, lr 0.6, two 32 px crops,
a queue of 3840 from epoch 50, 1000 epochs: 89.2% linear top-1 reported by solo-learn, online
classifier).

    python swav.py --data synthetic --arch resnet18 --epochs 1        # CPU smoke run, 1-2 minutes
    python swav.py --data cifar10                                     # CIFAR-10 settings
    torchrun --nproc_per_node=8 swav.py --data /imagenet              # ImageNet recipe, one node
    sbatch slurm/train.sbatch swav.py --data /imagenet                # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/swav.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, check_positive,
                         describe_lr, recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, multi_crop
from common.model import (autocast, build_backbone, features_by_resolution, is_vit,
                          unwrap)
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import (all_gather_tensor, all_reduce_with_grad, get_rank, get_world_size,
                         launch_env)
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The official 800-epoch recipe (scripts/swav_800ep_pretrain.sh: base lr 4.8 = 0.3 x 4096/256,
# warmup from 0.3, prototypes frozen for 313 iterations = about one epoch, no queue) and, for images
# <= 64 px, solo-learn's CIFAR hyperparameters, since the paper gives no CIFAR recipe: two 32 px
# crops only (a 32 px image leaves too little to take smaller crops from; solo-learn also uses 2
# crops), queue 3840 from epoch 50, prototypes frozen 2 epochs. Not solo-learn's: its views (crop
# scale 0.08, blur p 0.5: we keep SwAV's 0.14 and drop the blur as every small-image recipe here),
# its LARS (eta 0.02, clipped) and its warmup from 3e-5 to a cosine to 0; docs/swav.md lists them.
# Any flag given wins.
IMAGENET = dict(arch="resnet50", epochs=800, batch_size=4096, optimizer="lars", lr=0.3,
                weight_decay=1e-6, warmup_epochs=10, warmup_start_lr=0.3, blur_prob=0.5,
                num_crops=(2, 6), crop_scales=(0.14, 1.0, 0.05, 0.14), queue_start_epoch=15,
                freeze_prototypes_epochs=1)
SMALL_IMAGES = dict(arch="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.6,
                    weight_decay=1e-6, warmup_epochs=10, warmup_start_lr=0.0, blur_prob=0.0,
                    num_crops=(2,), crop_scales=(0.14, 1.0), queue_start_epoch=50,
                    freeze_prototypes_epochs=2)
# --arch vit_*: SwAV on a ViT as far as the MoCo v3 paper describes it (arXiv 2104.02057:
# AdamW, batch 4096, 40 warmup epochs, the random patch projection frozen, section 5; two 224
# px crops, no multi-crop, Table 4; no BN in the heads, appendix A), 300 epochs. It gives no
# rate ("the largest stable lr"): ours is MoCo v3's own, lr 1.5e-4 x batch/256 with weight
# decay 0.1 (moco-v3 CONFIG.md). Images <= 64 px: that optimizer with the CIFAR recipe.
VIT = dict(recipe="ViT (the MoCo v3 paper's for SwAV, MoCo v3's rate)", optimizer="adamw",
           epochs=300, lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, warmup_start_lr=0.0,
           num_crops=(2,), crop_scales=(0.14, 1.0))
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: MoCo v3's optimizer, "
                        "CIFAR length)", optimizer="adamw", lr=1.5e-4, weight_decay=0.1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SwAV pre-training (Caron et al. 2020). Recipe "
                                "values in brackets; a flag given on the command line wins. The "
                                "official batch-256 recipe (72.7% at 200 epochs) is --batch-size "
                                "256 --lr 0.6 --warmup-epochs 0 --epochs 200 (queue 3840 from "
                                "epoch 15, lr to 0.0006, "
                                "prototypes frozen for the first epoch = 5005 iterations).")
    add_common_args(p, "swav", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("SwAV")
    g.add_argument("--num-crops", type=int, nargs="+", help="crops per group; the first group "
                   "holds the 2 crops whose codes are predicted " + both("num_crops"))
    g.add_argument("--crop-sizes", type=int, nargs="+", help="crop size of each group in px "
                   "(ImageNet: 224 96, i.e. --img-size and 96/224 of it; small images: --img-size)")
    g.add_argument("--crop-scales", type=float, nargs="+", metavar="S", help="area fraction "
                   "of the crops, a MIN MAX pair per group " + both("crop_scales"))
    g.add_argument("--blur-prob", type=float, help="Gaussian blur probability of every crop "
                   + both("blur_prob"))
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature (0.1)")
    g.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn entropy weight (0.05; "
                   "smaller values give sharper codes, but exp(score / epsilon) must stay finite)")
    g.add_argument("--sinkhorn-iters", type=int, default=3, help="Sinkhorn iterations (3)")
    g.add_argument("--num-prototypes", type=int, default=3000, help="prototypes K (3000)")
    g.add_argument("--proj-hidden-dim", type=int, default=2048, help="projector width (2048)")
    g.add_argument("--proj-dim", type=int, default=128, help="embedding dim (128)")
    g.add_argument("--queue-length", type=int, default=None, help="embeddings kept from earlier "
                   "batches per assigned crop, rounded down to a multiple of the global batch "
                   "(default: 3840 when the global batch is <= 256, as the official batch-256 "
                   "recipe, else 0 = no queue, as the batch-4096 recipe)")
    g.add_argument("--queue-start-epoch", type=int, help="first epoch (from 0) that fills the "
                   "queue " + both("queue_start_epoch"))
    g.add_argument("--freeze-prototypes-epochs", type=float, help="epochs during which the "
                   "prototypes get no update (official: 313 iterations at batch 4096, 5005 at "
                   "batch 256, about one epoch each) " + both("freeze_prototypes_epochs"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    g.add_argument("--warmup-start-lr", type=float, help="absolute lr at step 0 of the warmup "
                   "(official: 0.3 before a peak of 4.8) " + both("warmup_start_lr"))
    g.add_argument("--final-lr-ratio", type=float, default=0.001, help="final lr of the cosine "
                   "as a fraction of the peak (official: 0.0048 / 4.8 and 0.0006 / 0.6 = 0.001)")
    args = p.parse_args(argv)
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "swav", (VIT, VIT_SMALL_IMAGES))
    check_positive(args, "temperature", "epsilon")
    check_fractions(args, "blur_prob", "final_lr_ratio")
    check_at_least(args, sinkhorn_iters=1, num_prototypes=1, proj_hidden_dim=1, proj_dim=1,
                   queue_length=0, queue_start_epoch=0, freeze_prototypes_epochs=0,
                   warmup_start_lr=0)
    if args.crop_sizes is None:  # small images: one group of --img-size crops
        args.crop_sizes = ([args.img_size] if args.small_images else
                           [args.img_size, round(args.img_size * 96 / 224)][:len(args.num_crops)])
    if args.queue_length is None:
        args.queue_length = 3840 if args.batch_size <= 256 else 0
    if args.queue_length % args.batch_size:  # as the official code: whole batches only
        rounded = args.queue_length - args.queue_length % args.batch_size
        if launch_env()[0] == 0:  # rank 0 says so
            print(f"--queue-length {args.queue_length} rounded down to {rounded}, a multiple of "
                  f"the global batch {args.batch_size}", flush=True)
        args.queue_length = rounded
    groups = len(args.num_crops)
    if len(args.crop_sizes) != groups or len(args.crop_scales) != 2 * groups:
        raise UserError(f"--num-crops has {groups} group(s): give as many --crop-sizes "
                        f"({len(args.crop_sizes)} given) and a MIN MAX pair of --crop-scales per "
                        f"group ({len(args.crop_scales)} values given)")
    if args.num_crops[0] < 2 or min(args.num_crops) < 1:
        raise UserError(f"--num-crops {args.num_crops}: the first group needs at least 2 crops "
                        f"(crops 0 and 1 give the codes) and every group at least 1")
    scales = args.crop_scales
    if not all(0 < lo <= hi <= 1 for lo, hi in zip(scales[::2], scales[1::2])):
        raise UserError(f"--crop-scales {scales}: each pair needs 0 < MIN <= MAX <= 1")
    return args


# ------------------------------------------------------------------------------- augmentations

def swav_crops(args):
    """Multi-crop: num_crops[i] crops of crop_sizes[i] px covering crop_scales[i] of the image,
    each with flip + colour jitter (0.8, 0.8, 0.8, 0.2) at p 0.8 + grayscale p 0.2 + blur
    (ImageNet: p 0.5 on every crop, as the official code; small images: none)."""
    scales = list(zip(args.crop_scales[::2], args.crop_scales[1::2]))
    return multi_crop(args.num_crops, args.crop_sizes, scales, jitter=(0.8, 0.8, 0.8, 0.2),
                      jitter_p=0.8, gray_p=0.2, blur_p=args.blur_prob)


# ------------------------------------------------------------------------------- model

class SwAV(nn.Module):
    """Backbone f, projector g = Linear(bias)-BN-ReLU-Linear (as the official head) and the
    prototypes C, a bias-free Linear whose K rows are kept unit-norm: embeddings
    z = g(f(x)) / ||g(f(x))|| and scores z C^T, the cosines of z with every prototype."""

    def __init__(self, arch, small_images, hidden_dim=2048, out_dim=128, num_prototypes=3000):
        super().__init__()
        # The official ResNet-50 has a zero_init_residual option that main_swav.py leaves off.
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, zero_init_residual=False, vit_init="mocov3")
        # With a ViT, SwAV's heads do best without BN (MoCo v3 paper, appendix A)
        bn = nn.Identity() if is_vit(arch) else nn.BatchNorm1d(hidden_dim)
        self.projector = nn.Sequential(nn.Linear(self.backbone.feature_dim, hidden_dim), bn,
                                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self):
        """C <- C / ||C|| row by row; called at the start of every iteration, before the forward."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops):
        """crops: list of [n, 3, h, w]. Crops of one size share a backbone pass (BN statistics
        per resolution group, as the official code), the projector sees all crops at once.
        Returns embeddings [C*n, D] and scores [C*n, K], crop-major."""
        features = features_by_resolution(self.backbone, crops)         # [C*n, F]
        z = F.normalize(self.projector(features), dim=1)                 # [C*n, D]
        return z, self.prototypes(z)                                     # [C*n, K]


@torch.no_grad()
def push_queue(queue, embeddings, n):
    """Shift this rank's queue [2, L, D] by n rows (dropping the oldest) and write the newest
    embeddings of crops 0 and 1 (the first 2n rows of `embeddings`) on top, as the official code."""
    queue[:, n:] = queue[:, :-n].clone()
    queue[:, :n] = embeddings[:2 * n].view(2, n, -1)


def gather_queue(queue):
    """The queues of all ranks side by side: [2, world * L, D], in rank order (for checkpoints)."""
    return all_gather_tensor(queue.transpose(0, 1)).transpose(0, 1)


# ------------------------------------------------------------------------------- loss

def sinkhorn(scores, epsilon, iters):
    """Soft codes Q of this rank's samples by Sinkhorn-Knopp over the GLOBAL batch (B samples of
    all ranks, K prototypes). scores: [b, K] on this rank. Starting from Q = exp(scores / eps)^T
    [K, b] scaled to a total mass of 1, each iteration makes every prototype's mass 1/K (row sums,
    all-reduced: they span all ranks), then every sample's mass 1/B (column sums, local). The
    codes are B Q^T [b, K]: each sample's codes sum to 1, each prototype gets about B/K of them.
    Scores are cosines (|s| <= 1), so exp(s / eps) stays finite in fp32 for the usual eps; as
    the official code, no maximum is subtracted.
    """
    Q = torch.exp(scores / epsilon).T                           # [K, b]
    K, B = Q.shape[0], Q.shape[1] * get_world_size()            # equal b on every rank
    Q = Q / all_reduce_with_grad(Q.sum())                       # total mass 1
    for _ in range(iters):
        Q = Q / all_reduce_with_grad(Q.sum(dim=1, keepdim=True)) / K  # [K, 1] prototype masses
        Q = Q / Q.sum(dim=0, keepdim=True) / B                  # [1, b] sample masses (local)
    return (Q * B).T                                            # [b, K]


def swav_loss(scores, batch_size, temperature, epsilon, sinkhorn_iters, queue_scores=None):
    """Swapped prediction. scores: [C*n, K] of this rank's C crops of n images (crop-major);
    queue_scores: None or [2, L, K], the queued embeddings of crops 0 and 1 scored against the
    current prototypes. For each assigned crop a in {0, 1}, codes q_a = Sinkhorn(scores_a) (the
    queue's scores prepended: more samples to spread over K, only the batch's codes kept), then
        l_a = 1/(C-1) sum_{v != a} mean_batch( -sum_k q_a,k log softmax(scores_v / T)_k )
    and L = (l_0 + l_1) / 2. The codes carry no gradient. Sinkhorn's sums span all ranks; the rest
    is per sample, so DDP's gradient average gives the gradient of the global mean.
    """
    n, crops = batch_size, scores.shape[0] // batch_size
    loss = 0.0
    for a in (0, 1):
        with torch.no_grad():
            s = scores[a * n:(a + 1) * n]                                     # [n, K]
            if queue_scores is not None:
                s = torch.cat([queue_scores[a], s])                           # [L + n, K]
            q = sinkhorn(s, epsilon, sinkhorn_iters)[-n:]                     # [n, K]
        for v in range(crops):
            if v != a:
                log_p = F.log_softmax(scores[v * n:(v + 1) * n] / temperature, dim=1)  # [n, K]
                loss = loss - (q * log_p).sum(dim=1).mean() / (crops - 1)
    return loss / 2


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "swav")  # processes, device, run directory (one run per folder), log, seed

    # data: multi-crop views of each image
    views = ViewPipeline(swav_crops(args), args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule. The official code wraps plain SGD in LARC, whose weight decay
    # and trust ratio apply to every parameter; like the other scripts here, our LARS excludes
    # biases and BN parameters (every 1-D parameter) from both. The prototypes are a weight.
    model = run.distribute(SwAV(args.arch, args.small_images, args.proj_hidden_dim,
                                args.proj_dim, args.num_prototypes))
    swav = unwrap(model)
    optimizer = build_optimizer(param_groups(model, args.weight_decay), args)
    final_lr = args.peak_lr * args.final_lr_ratio
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch
    freeze_steps = round(args.freeze_prototypes_epochs * run.steps_per_epoch)
    # Each rank queues its own embeddings (queue_length / world rows per assigned crop): a plain
    # tensor, not a buffer of the model, which DDP would overwrite with rank 0's at every forward.
    queue = (torch.zeros(2, args.queue_length // get_world_size(), args.proj_dim,
                         device=run.device) if args.queue_length else None)

    # resume from the run directory's checkpoint (the queue saved with it, gathered from all
    # ranks at each save), or start
    start_epoch, start_batch = run.restore(model, optimizer, swav.backbone, lambda: {
        "queue": None if queue is None else gather_queue(queue).cpu()})  # [2, length, D]
    if run.ckpt:
        saved_length = 0 if run.ckpt.get("queue") is None else run.ckpt["queue"].shape[1]
        if saved_length != args.queue_length:
            raise UserError(f"{run.ckpt_path} holds a queue of {saved_length} rows, "
                            f"--queue-length is {args.queue_length}")
        if queue is not None:  # this rank's rows (with another world size the rows are re-split)
            rows = queue.shape[1]
            queue.copy_(run.ckpt["queue"][:, get_rank() * rows:(get_rank() + 1) * rows])
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs from {args.warmup_start_lr:g}, cosine to {final_lr:g}); crops "
              f"{' + '.join(f'{c} x {s}' for c, s in zip(args.num_crops, args.crop_sizes))} px; "
              f"queue {args.queue_length} from epoch {args.queue_start_epoch}; prototypes frozen "
              f"for {freeze_steps} steps; {run.steps_per_epoch} steps per epoch")

    def queue_in_use(step):
        """The queue fills from --queue-start-epoch on and joins Sinkhorn once full (the official
        test "last row non-zero", here from the step count: no host sync)."""
        queued = step - args.queue_start_epoch * run.steps_per_epoch  # steps that pushed before
        return queue is not None and queued >= 0 and queued * run.batch_per_rank >= queue.shape[1]

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, (crops, labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            # warmup from --warmup-start-lr (official: 0.3), not from 0
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr, final=final_lr,
                               start=args.warmup_start_lr)
            set_lr(optimizer, lr)
            swav.normalize_prototypes()                                # unit prototypes first
            crops = views.to_device(crops, run.device, step)           # C x [n, 3, h, w]
            with autocast(args.precision, run.device):
                z, scores = model(crops)
            z, scores = z.float(), scores.float()                      # loss math in fp32
            queue_scores = None
            if queue is not None and epoch >= args.queue_start_epoch:
                with torch.no_grad():
                    if queue_in_use(step):  # scored with the current prototypes, before the push
                        queue_scores = queue @ swav.prototypes.weight.T        # [2, L, K]
                    push_queue(queue, z.detach(), run.batch_per_rank)
            loss = swav_loss(scores, run.batch_per_rank, args.temperature, args.epsilon,
                             args.sinkhorn_iters, queue_scores)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            if step < freeze_steps:  # frozen prototypes: no gradient, so LARS skips them
                swav.prototypes.weight.grad = None  # (no update, no decay, no momentum)
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, labels, z, loss=loss, lr=lr, queue=queue_in_use(step),
                          prototypes_frozen=step < freeze_steps)  # see common/run.py
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
