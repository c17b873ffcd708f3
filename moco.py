"""MoCo v2: Improved Baselines with Momentum Contrastive Learning.

Chen, Fan, Girshick, He 2020, arXiv 2003.04297 (MoCo v1: He et al., CVPR 2020, arXiv 1911.05722).
Official code (PyTorch): github.com/facebookresearch/moco

A query encoder (ResNet + MLP head) is trained to pick the key of the other view of its image among
a queue of 65536 keys of earlier batches; the key encoder is a momentum copy of the query encoder
and receives no gradient. Defaults are the paper's ImageNet recipe (ResNet-50, batch 256, SGD lr
0.03, temperature 0.2, cosine, 200 epochs: 67.5% linear top-1; 800 epochs: 71.1%). Images of 64 px
or less (CIFAR) switch to the official CIFAR-10 demo's settings (ResNet-18 with a 3x3 stem, batch
512, lr 0.06, queue 4096, momentum 0.99, temperature 0.1, 200 epochs), for which the demo reports
82.6% kNN top-1 (85.3% with the symmetric loss) after 200 epochs.

    python moco.py --data synthetic --arch resnet18 --epochs 1        # CPU smoke run, 1-2 minutes
    python moco.py --data cifar10                                     # CIFAR-10 recipe
    torchrun --nproc_per_node=8 moco.py --data /imagenet              # ImageNet recipe, one node
    sbatch slurm/train.sbatch moco.py --data /imagenet                # Slurm

The method, its equations, every implementation detail with its source (deviations from the
official code included), both recipes and measured results: docs/moco.md. Shared flags:
docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.args import (add_common_args, check_at_least, check_fractions, check_positive,
                         describe_lr, recipe_values, resolve_recipe)
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import autocast, build_backbone, is_vit, unwrap
from common.optim import build_optimizer, describe_optimizer, set_lr, warmup_cosine
from common.dist import all_gather_tensor, get_rank, get_world_size, launch_env
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# The paper's ImageNet recipe (MoCo v2 = the official main_moco.py with --mlp --moco-t 0.2
# --aug-plus --cos) and, for images <= 64 px, the official CIFAR-10 demo notebook of the same
# repository (the paper has no CIFAR recipe): batch 512, lr 0.06 (= 0.03 x 512/256 here),
# weight decay 5e-4, queue 4096, momentum 0.99, temperature 0.1, 200 epochs, no blur, 8 BN
# splits. We keep MoCo v2's MLP head and (0.2, 1) crop there; the demo uses a linear head and
# torchvision's default (0.08, 1) crop (1.4-1.7 kNN points lower after one epoch at batch 128,
# docs/moco.md). Deviation: the inputs are normalised with the ImageNet statistics, as in every
# script here and in linear_eval.py (a checkpoint carries no statistics of its own), where the
# demo uses CIFAR-10's.
IMAGENET = dict(arch="resnet50", epochs=200, batch_size=256, optimizer="sgd", lr=0.03,
                weight_decay=1e-4, warmup_epochs=0, temperature=0.2, queue_size=65536,
                moco_momentum=0.999, blur_prob=0.5)
SMALL_IMAGES = dict(arch="resnet18", epochs=200, batch_size=512, optimizer="sgd", lr=0.03,
                    weight_decay=5e-4, warmup_epochs=0, temperature=0.1, queue_size=4096,
                    moco_momentum=0.99, blur_prob=0.0)
# --arch vit_*: MoCo's authors published no MoCo v2 ViT (MoCo v3 is another method: no queue,
# a predictor, BN heads). The DINO authors trained MoCo v2 on ViT-S/16 (DINO paper, Table 2:
# 72.7% linear top-1) with DINO's optimizer, as they describe it in facebookresearch/dino issue
# #34: AdamW, lr 5e-4 x batch/256 and 10 warmup epochs (main_dino.py defaults; batch 1024 as
# 64 x 16 GPUs), weight decay 0.05, temperature 0.1, queue 65536, key momentum 0.996; 300
# epochs (DINO's Table 7). Deviation: their momentum rose to 1 on a cosine; ours stays
# constant. Images <= 64 px: ours, that optimizer with the CIFAR recipe's length and batch.
VIT = dict(recipe="ViT (the DINO authors' MoCo v2 run, not MoCo's)", optimizer="adamw",
           epochs=300, batch_size=1024, lr=5e-4, weight_decay=0.05, warmup_epochs=10,
           temperature=0.1, queue_size=65536, moco_momentum=0.996)
VIT_SMALL_IMAGES = dict(SMALL_IMAGES, recipe="ViT at <= 64 px (ours: DINO's MoCo v2 optimizer, "
                        "CIFAR length)", optimizer="adamw", lr=5e-4, weight_decay=0.05,
                        warmup_epochs=10)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v2 pre-training (Chen et al. 2020). Recipe "
                                "values in brackets; a flag given on the command line wins.")
    add_common_args(p, "moco", IMAGENET, SMALL_IMAGES, sync_bn="off")
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("MoCo")
    g.add_argument("--temperature", type=float, help="InfoNCE temperature T " + both("temperature"))
    g.add_argument("--queue-size", type=int, help="number of negative keys K, a multiple of "
                   "the global batch (of twice it with --symmetric) " + both("queue_size"))
    g.add_argument("--moco-momentum", type=float,
                   help="key encoder momentum m, constant " + both("moco_momentum"))
    g.add_argument("--blur-prob", type=float, help="Gaussian blur probability " + both("blur_prob"))
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup (ViT recipe: 10) "
                   + both("warmup_epochs"))
    g.add_argument("--bn-splits", type=int, default=None,
                   help="BatchNorm groups per process (default: 8 with one process, emulating "
                        "the paper's 8 GPUs; 1 with several, whose shuffle BN spans processes; "
                        "1 for a ViT, which has no BatchNorm)")
    g.add_argument("--symmetric", action="store_true",
                   help="also contrast (view 2 query, view 1 key) and enqueue both keys "
                        "(the 'MoCo v2+' variant; paper: off). The two losses are summed, as "
                        "the demo's: a step is about twice a one-direction step at the same rate. "
                        "Keep the recipe's rate per image, 0.03 x batch/256 (the demo's 0.06 at "
                        "batch 512): 0.06 at batch 128 collapses (docs/moco.md, Results)")
    g.add_argument("--proj-hidden-dim", type=int, default=None,
                   help="MLP head hidden width (default: the backbone's, 2048 for ResNet-50)")
    g.add_argument("--proj-dim", type=int, default=128, help="key/query dim (paper: 128)")
    args = p.parse_args(argv)
    if (args.bn_splits or 1) > 1 and args.sync_bn != "off":  # SyncBN would replace the split BN
        raise UserError(f"--bn-splits {args.bn_splits} with --sync-bn {args.sync_bn}: "
                        f"SyncBatchNorm would replace the split BN layers; keep MoCo's --sync-bn "
                        f"off (shuffle BN) or use --bn-splits 1")
    if (args.bn_splits or 1) > 1 and args.arch and is_vit(args.arch):
        raise UserError(f"--bn-splits {args.bn_splits} with --arch {args.arch}: a ViT with MoCo "
                        f"v2's head has no BatchNorm to split (nor to shuffle: keys are encoded "
                        f"unshuffled)")
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "moco", (VIT, VIT_SMALL_IMAGES))
    check_positive(args, "temperature")
    check_fractions(args, "moco_momentum", "blur_prob")
    check_at_least(args, queue_size=1, bn_splits=1, proj_hidden_dim=1, proj_dim=1)
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    if args.queue_size % keys_per_step:
        why = "global batch x 2, --symmetric" if args.symmetric else "the global batch"
        raise UserError(f"--queue-size {args.queue_size} is not a multiple of the {keys_per_step} "
                        f"keys enqueued per step ({why})")
    world = launch_env()[1]  # the processes the launcher starts
    if args.bn_splits is None:
        args.bn_splits = 8 if world == 1 and not is_vit(args.arch) else 1
    if (args.batch_size // world) % args.bn_splits:
        raise UserError(f"the batch per process {args.batch_size // world} is not divisible by "
                        f"--bn-splits {args.bn_splits}")
    return args


# ------------------------------------------------------------------------------- augmentations

def moco_view(args):
    """MoCo v2 'aug+': crop (0.2, 1) + flip + colour jitter (0.4, 0.4, 0.4, 0.1) at p 0.8 +
    grayscale p 0.2 + blur p 0.5 (ImageNet only): the same distribution for both views. Small
    images keep the (0.2, 1) crop, as SimSiam's CIFAR recipe does."""
    return ssl_view(args.img_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                    gray_p=0.2, blur_p=args.blur_prob)


# ------------------------------------------------------------------------------- model

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed separately over `splits` groups of the
    batch (samples i with the same i mod splits), as if the batch were spread over `splits`
    GPUs without SyncBN; the running statistics are the mean over the groups. Eval: plain BN."""

    def __init__(self, num_features, splits):
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.splits
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)  # [g * c]
        y = F.batch_norm(x.reshape(n // g, g * c, h, w), mean, var, self.weight.repeat(g),
                         self.bias.repeat(g), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked += 1
        return y.reshape(n, c, h, w)


def split_batchnorm(net, splits):
    """Replace every BatchNorm2d of `net` by a SplitBatchNorm (same parameters and buffers)."""
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = SplitBatchNorm(child.num_features, splits)
            bn.load_state_dict(child.state_dict())
            setattr(net, name, bn)
        else:
            split_batchnorm(child, splits)
    return net


class MoCo(nn.Module):
    """Query encoder f_q = projector(backbone(x)) with the --mlp head of MoCo v2 (Linear with bias,
    ReLU, Linear; no BN), its momentum copy f_k (key_backbone, key_projector), and the queue of
    the last K unit-norm keys [K, D] with its write pointer, all in the state dict."""

    def __init__(self, arch, small_images, hidden_dim=None, out_dim=128, queue_size=65536,
                 bn_splits=1):
        super().__init__()
        # The official code uses torchvision's ResNet with its default init (no zero-init).
        # a ViT: MoCo v3's init (frozen random patch projection, sin-cos positions)
        self.backbone = build_backbone(arch, small_images, vit_init="mocov3")
        # Shuffle BN hides a key's BN statistics from its query; a ViT with this BN-free head has
        # no BatchNorm at all (LayerNorm works per image): nothing to shuffle
        self.shuffle = not is_vit(arch)
        # The paper computes BN per GPU (8 GPUs, no SyncBN) and shuffles the keys across GPUs.
        # One process has no GPUs to shuffle across: as the official CIFAR-10 demo, BN runs in
        # `bn_splits` groups in both encoders and the key batch is shuffled (see keys), so a
        # key's BN group holds other images than its query's, as with 8 GPUs.
        if bn_splits > 1:
            split_batchnorm(self.backbone, bn_splits)
        hidden_dim = hidden_dim or self.backbone.feature_dim
        self.projector = nn.Sequential(nn.Linear(self.backbone.feature_dim, hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # Random unit vectors as the first negatives, as the official code.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, *views):
        """Query projections (not normalised) of each view: a list of [n, D]."""
        return [self.projector(self.backbone(x)) for x in views]

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (the official code leaves
        the key encoder's BN running statistics to its own forward passes)."""
        query = [*self.backbone.parameters(), *self.projector.parameters()]
        key = [*self.key_backbone.parameters(), *self.key_projector.parameters()]
        torch._foreach_mul_(key, m)  # pk.mul_(m).add_(pq, alpha=1 - m) over all pairs at once
        torch._foreach_add_(key, query, alpha=1 - m)

    @torch.no_grad()
    def keys(self, x, seed):
        """Unit keys [n, D] of this rank's key views x [n, C, H, W], with shuffle BN (paper
        section 3.3): the key views of all ranks are gathered and permuted by one random
        permutation drawn on rank 0 and broadcast, each rank encodes its slice, and the keys are
        gathered back and un-shuffled. BN then normalises a key with a random set of images,
        not with the images of its query, so BN cannot leak which key is the positive. With one
        process the batch is shuffled in place and SplitBatchNorm gives the per-GPU groups.
        `seed` (from the step) makes the permutations the same after a resume."""
        if not self.shuffle:  # a ViT: no BatchNorm to hide anything from
            return F.normalize(self.key_projector(self.key_backbone(x)).float(), dim=1)
        n, rank = x.shape[0], get_rank()
        x_all = all_gather_tensor(x)                                   # [N, C, H, W]
        g = torch.Generator(device=x.device).manual_seed(seed)  # on the device: no host sync
        perm = torch.randperm(len(x_all), generator=g, device=x.device)
        if get_world_size() > 1:
            dist.broadcast(perm, src=0)
        mine = x_all[perm[rank * n:(rank + 1) * n]]                    # [n, C, H, W] shuffled
        if x.is_contiguous(memory_format=torch.channels_last):  # indexing returns NCHW
            mine = mine.contiguous(memory_format=torch.channels_last)
        k = F.normalize(self.key_projector(self.key_backbone(mine)).float(), dim=1)
        k_all = all_gather_tensor(k)                                   # [N, D] shuffled order
        return k_all[perm.argsort()][rank * n:(rank + 1) * n]          # [n, D] this rank's

    @torch.no_grad()
    def enqueue(self, k):
        """Write the keys of ALL ranks (rank order) at the pointer: the queue stays identical on
        every rank. K is a multiple of the global batch, so a batch never wraps around."""
        k = all_gather_tensor(k)                                       # [N, D]
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)
        self.queue[idx] = k                                            # no host sync
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))


# ------------------------------------------------------------------------------- loss

def moco_loss(q, k, queue, temperature):
    """InfoNCE of MoCo, one direction. q: [n, D] query projections (normalised here), k: [n, D]
    unit keys of the same images, queue: [K, D] unit keys of earlier batches. With q_i unit,
        l_i = -log( exp(q_i . k_i / T) / (exp(q_i . k_i / T) + sum_j exp(q_i . queue_j / T)) ),
    i.e. cross-entropy of the logits [l_pos, l_neg] / T with label 0, averaged over the batch.
    Keys and queue receive no gradient (stop-gradient). Needs no torch.distributed.
    """
    q = F.normalize(q, dim=1)                                          # [n, D]
    k, queue = k.detach(), queue.detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)                           # [n, 1]
    l_neg = q @ queue.T                                                # [n, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature            # [n, 1 + K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)    # the positive is column 0
    return F.cross_entropy(logits, labels)


# ------------------------------------------------------------------------------- training

@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "moco")  # processes, device, run directory (one run per folder), log, seed

    # data: two views per image
    views = ViewPipeline([moco_view(args)] * 2, args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule. MoCo v2 uses no SyncBN (shuffle BN instead). DDP all-reduces
    # the query encoder's gradients; the key encoder has no trainable parameters and runs outside
    # the DDP forward. As in the official code, DDP also broadcasts rank 0's buffers (BN
    # statistics, queue) at each forward: the queue is the same on every rank anyway.
    model = run.distribute(MoCo(args.arch, args.small_images, args.proj_hidden_dim,
                                args.proj_dim, args.queue_size, args.bn_splits))
    moco = unwrap(model)
    # SGD with weight decay on every parameter, biases and BN included, as the official code
    # (build_optimizer keeps 1-D parameters out of it for LARS and the ViT recipe's AdamW).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "weight_decay": args.weight_decay}], args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch

    # resume from the run directory's checkpoint (key encoder and queue included), or start
    start_epoch, start_batch = run.restore(model, optimizer, moco.backbone)
    bn = ("no BatchNorm: keys not shuffled" if is_vit(args.arch)
          else f"BN groups {args.bn_splits} x {get_world_size()}, keys shuffled")
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}; {args.warmup_epochs} warmup "
              f"epochs, cosine to 0); queue {args.queue_size}, key momentum "
              f"{args.moco_momentum}, T {args.temperature}; {bn}; {run.steps_per_epoch} steps "
              f"per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((x1, x2), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            # Cosine per iteration, with no warmup but the ViT recipe's (the official code steps
            # the cosine per epoch).
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)
            set_lr(optimizer, lr)
            x1, x2 = views.to_device([x1, x2], run.device, step)
            moco.momentum_update(args.moco_momentum)  # m constant; BEFORE the keys, as official
            shuffle_seed = (args.seed * 1_000_003 + step) * 2
            with autocast(args.precision, run.device):
                q = model(x1, x2) if args.symmetric else model(x1)     # queries, with gradient
                k2 = moco.keys(x2, shuffle_seed)                       # [n, D] no gradient
                k1 = moco.keys(x1, shuffle_seed + 1) if args.symmetric else None
            q = [t.float() for t in q]                                 # loss math in fp32
            loss = moco_loss(q[0], k2, moco.queue, args.temperature)
            if args.symmetric:  # summed, as the official CIFAR-10 demo: each direction keeps
                # the gradient scale of the one-direction loss
                loss = loss + moco_loss(q[1], k1, moco.queue, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            # Enqueue after the loss (here after the step, which leaves the keys unchanged): the
            # newest keys replace the oldest and become negatives from the next step on.
            moco.enqueue(torch.cat([k1, k2]) if args.symmetric else k2)
            pos_sim = (F.normalize(q[0].detach(), dim=1) * k2).sum(1).mean()  # mean cos(q, k+)
            run.step_done(step, labels, torch.cat(q), loss=loss, lr=lr,
                          momentum=args.moco_momentum, pos_sim=pos_sim)  # see common/run.py
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
