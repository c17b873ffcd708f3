"""MAE: Masked Autoencoders Are Scalable Vision Learners.

He, Chen, Xie, Li, Dollár, Girshick, CVPR 2022, arXiv 2111.06377.
Official code (PyTorch): github.com/facebookresearch/mae

A Vision Transformer sees a quarter of an image's patches, a different random quarter for every
image at every step; a small Transformer decoder, given its tokens and a learned mask token in
place of each hidden patch, predicts the pixels of the hidden patches, each patch normalised by
its own mean and variance. The loss is on the hidden patches only. The encoder never sees a mask
token, so it costs a quarter of a full pass. No augmentation beyond crop and flip, no negatives,
no target network. The encoder is what is kept; the paper judges it by fine-tuning (finetune.py):
ViT-B/16 after 1600 epochs reaches 83.6% top-1 fine-tuned, 68.0% with a linear probe
(finetune.py --protocol linear). Defaults are the official ImageNet recipe (PRETRAIN.md: ViT-B/16,
batch 4096, AdamW, 800 epochs); images of 64 px or less switch to solo-learn's CIFAR recipe
(ViT-S, patch 4, 1000 epochs; no published accuracy).

    python mae.py --data synthetic --arch vit_tiny --epochs 1 --decoder-dim 128 --decoder-depth 2
    torchrun --nproc_per_node=8 mae.py --data /imagenet --batch-size 1024   # one node
    sbatch --nodes=4 slurm/train.sbatch mae.py --data /imagenet             # batch 4096

The method, its equations, every implementation detail with its source (deviations from the
official code included), the recipes, published results and what its reconstructions look like:
docs/mae.md. Shared flags: docs/training.md; clusters and preemption: docs/clusters.md.
"""
import argparse

import torch
import torch.nn as nn
from torchvision.models.vision_transformer import EncoderBlock

from common.args import add_common_args, check_fractions, describe_lr, recipe_values, resolve_recipe
from common.errors import UserError, exit_on_user_error
from common.augment import ViewPipeline, ssl_view
from common.model import VIT_MLP_RATIO, VIT_PATCH, VITS, autocast, build_backbone, is_vit, unwrap
from common.optim import build_optimizer, describe_optimizer, param_groups, set_lr, warmup_cosine
from common.dist import get_rank
from common.run import Run

# ------------------------------------------------------------------------------- arguments

# Sources, facebookresearch/mae at efb2a80. ImageNet: PRETRAIN.md:5-17 (batch 64 x 64 GPUs =
# 4096, --norm_pix_loss, mask 0.75, 800 epochs, 40 warmup epochs, blr 1.5e-4, weight decay 0.05;
# lr = blr x batch/256, :19); main_pretrain.py:124 (crop (0.2, 1) bicubic, flip, nothing else),
# :180 (AdamW betas (0.9, 0.95)); lr_sched.py:9-15 (linear warmup, half-cycle cosine to
# --min_lr 0, main_pretrain.py:68). PRETRAIN.md's example is ViT-L (:10); we default to ViT-B/16
# (:24), the model behind the paper's 83.6% and 68.0% and the largest of our ViTs. Images <= 64
# px: solo-learn's CIFAR MAE (vturrisi/solo-learn 9187ea3 scripts/pretrain/cifar/mae.yaml:16-51:
# vit_small, patch 4 at 32 px, decoder 512 x 8 blocks x 16 heads, mask 0.75, norm_pix_loss,
# AdamW (0.9, 0.95), lr 2e-4 x batch/256 (solo/args/pretrain.py:151-154), batch 256, weight
# decay 0.05, 1000 epochs; base.py:291-293: 10 warmup epochs; augmentations/reconstruction.yaml:
# crop (0.08, 1) and flip only). Deviation: solo-learn decays every parameter (base.py:280-281:
# exclude_bias_n_norm_wd false) and warms up from 3e-5; we keep MAE's rule (weights only) from 0.
IMAGENET = dict(arch="vit_base", epochs=800, batch_size=4096, optimizer="adamw", lr=1.5e-4,
                weight_decay=0.05, warmup_epochs=40, crop_min=0.2)
SMALL_IMAGES = dict(arch="vit_small", epochs=1000, batch_size=256, optimizer="adamw", lr=2e-4,
                    weight_decay=0.05, warmup_epochs=10, crop_min=0.08)
PIXEL_VAR_EPS = 1e-6  # added to each patch's variance before the square root (models_mae.py:208)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MAE pre-training (He et al. 2022) of a Vision "
                                "Transformer. Recipe values in brackets; a flag given on the "
                                "command line wins.")
    add_common_args(p, "mae", IMAGENET, SMALL_IMAGES)
    both = lambda key: recipe_values(key, IMAGENET, SMALL_IMAGES)
    g = p.add_argument_group("MAE")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of each image's "
                   "patches hidden from the encoder (paper and PRETRAIN.md: 0.75)")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="regress each hidden patch's pixels normalised by that patch's mean and "
                        "variance (PRETRAIN.md and the released models: on; "
                        "--no-norm-pix-loss: raw pixels, whose reconstructions look natural)")
    g.add_argument("--decoder-dim", type=int, default=512, help="decoder width (paper: 512)")
    g.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks (paper: 8)")
    g.add_argument("--decoder-heads", type=int, default=16, help="decoder attention heads "
                   "(official: 16)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW's beta2 (official: 0.95; "
                   "beta1 is --momentum, 0.9)")
    g.add_argument("--warmup-epochs", type=float, help="linear lr warmup " + both("warmup_epochs"))
    g.add_argument("--crop-min", type=float, help="smallest crop, as a fraction of the image area "
                   + both("crop_min"))
    args = p.parse_args(argv)
    args = resolve_recipe(args, IMAGENET, SMALL_IMAGES, "mae")
    args.preset = ("solo-learn's CIFAR MAE, scripts/pretrain/cifar/mae.yaml"
                   if args.recipe == "small-image" else "facebookresearch/mae PRETRAIN.md")
    check(args)
    return args


def check(args):
    """One line for a setting MAE cannot run with."""
    if not is_vit(args.arch):
        raise UserError(f"--arch {args.arch}: MAE hides patches of a Vision Transformer; choose "
                        f"{', '.join(VITS)}")
    patch = VIT_PATCH[args.small_images][0]
    if args.img_size % patch:
        raise UserError(f"--img-size {args.img_size}: not a multiple of the {patch} px patches")
    if int((args.img_size // patch) ** 2 * (1 - args.mask_ratio)) < 1 or args.mask_ratio <= 0:
        raise UserError(f"--mask-ratio {args.mask_ratio}: must hide some patches and keep one")
    if args.decoder_dim % 4 or args.decoder_dim % args.decoder_heads or args.decoder_depth < 1:
        raise UserError(f"--decoder-dim {args.decoder_dim}: a multiple of 4 (its sin-cos "
                        f"positions) and of --decoder-heads {args.decoder_heads}; "
                        f"--decoder-depth >= 1")
    check_fractions(args, "beta2")
    if not 0 < args.crop_min <= 1:
        raise UserError(f"--crop-min {args.crop_min}: a fraction of the image area, in (0, 1]")
    if args.probe:  # the online probe catches the backbone's output on whole training images
        raise UserError("--probe: MAE's encoder never sees a whole training image, only a "
                        "quarter of its patches; evaluate its backbone.pt with finetune.py")


# ------------------------------------------------------------------------------- augmentations

def mae_view(args):
    """The one view: random resized crop over (--crop-min, 1) of the area, resized bicubically,
    and a horizontal flip; no colour augmentation (main_pretrain.py:123-127)."""
    return ssl_view(args.img_size, scale=(args.crop_min, 1.0), jitter_p=0.0, gray_p=0.0,
                    interpolation="bicubic")


# ------------------------------------------------------------------------------- model

def mae_position_embedding(grid_size, width):
    """MAE's fixed 2-D sin-cos position embedding [1, 1 + grid_size**2, width]
    (util/pos_embed.py:20-67): zeros for the class token; for the patch in row r, column c
    (tokens in row-major order) [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = 10000**(-k/q),
    k < q = width/4. The column comes first: the official meshgrid takes w first (:28) and its
    first half is built from that grid (:42). MoCo v3's (common/vit.py) puts the row first."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [q]
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    col, row = (t.flatten()[:, None] * omega for t in (cols, rows))  # [G*G, q], float64 as numpy
    patches = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()[None]


def random_masking(tokens, mask_ratio, noise):
    """Per-sample random masking (models_mae.py:123-148): each sample keeps the
    int(L (1 - mask_ratio)) tokens of lowest `noise` [N, L], in increasing order of noise.
    Returns the kept tokens [N, K, D], the mask [N, L] (1: hidden, 0: kept; in the original
    order) and, per sample, each token's rank in the noise order [N, L] (which puts a sequence in
    noise order back in the original one)."""
    n, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    order = noise.argsort(dim=1)                                       # [N, L]: kept ones first
    ranks = order.argsort(dim=1)                                       # [N, L]
    kept = tokens.gather(1, order[:, :keep, None].expand(-1, -1, dim))  # [N, K, D]
    mask = (ranks >= keep).to(tokens.dtype)                            # [N, L]
    return kept, mask, ranks


def mask_noise(seed, step, global_batch, length, rank, batch_per_rank):
    """U(0, 1) noise [batch_per_rank, length] that orders this process's patches: the rows of its
    images in one draw for the global batch, from a generator seeded by (--seed, step). A resumed
    run draws the masks an uninterrupted one draws, each process masks its own images, and the
    masks of the global batch are the same on 1 process or 8 (the official code draws from each
    process's global RNG, models_mae.py:132)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    noise = torch.rand(global_batch, length, generator=generator)
    return noise[rank * batch_per_rank:(rank + 1) * batch_per_rank]


def mae_init(mae):
    """models_mae.py:65-93: every Linear (q, k and v as one [3D, D] matrix, timm's `qkv`)
    xavier-uniform with zero bias; the patch projection xavier-uniform as a linear map of the
    flattened patch (bias: PyTorch's Conv2d default, untouched there); class and mask tokens
    N(0, 0.02); LayerNorms 1 and 0; both position embeddings fixed sin-cos."""
    for module in mae.modules():
        if isinstance(module, nn.Linear):  # attention output, MLPs, decoder embed and predictor
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    projection = mae.backbone.conv_proj
    projection.reset_parameters()
    nn.init.xavier_uniform_(projection.weight.view(projection.out_channels, -1))
    nn.init.normal_(mae.backbone.class_token, std=0.02)
    nn.init.normal_(mae.mask_token, std=0.02)


class MAE(nn.Module):
    """Encoder (`backbone`: our ViT, torchvision's class, what backbone.pt holds) and decoder
    (models_mae.py:22-63): `decoder_embed` maps the encoder's tokens to the decoder's width,
    `mask_token` stands for every hidden patch, `decoder_blocks` (torchvision's EncoderBlock,
    MLP 4x, LayerNorm eps 1e-6 as timm's Block there), `decoder_norm`, `decoder_pred` (a
    patch's p*p*3 values). Fixed sin-cos positions in both, frozen (:37, :51): the encoder's in
    its `encoder.pos_embedding` (laid out for 32 or 224 px, interpolated for other sizes as
    every ViT here), the decoder's for `img_size` as a buffer."""

    def __init__(self, arch, small_images, img_size, decoder_dim=512, decoder_depth=8,
                 decoder_heads=16):
        super().__init__()
        self.backbone = build_backbone(arch, small_images)
        vit, self.patch_size = self.backbone, self.backbone.patch_size
        self.decoder_embed = nn.Linear(vit.hidden_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[
            EncoderBlock(decoder_heads, decoder_dim, VIT_MLP_RATIO * decoder_dim, 0.0, 0.0)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        mae_init(self)
        with torch.no_grad():
            vit.encoder.pos_embedding.copy_(mae_position_embedding(vit.image_size // vit.patch_size,
                                                                   vit.hidden_dim))
        vit.encoder.pos_embedding.requires_grad_(False)
        self.register_buffer("decoder_pos_embedding",
                             mae_position_embedding(img_size // self.patch_size, decoder_dim))

    def forward(self, images, noise, mask_ratio):
        """Images [N, 3, H, W] -> predicted patches [N, L, p*p*3], mask [N, L] (1: hidden) and
        the encoder's class token [N, D]. `noise` [N, L] picks the hidden patches
        (`random_masking`). Encoder: models_mae.py:150-170; decoder: :172-196."""
        vit, n, p = self.backbone, images.shape[0], self.patch_size
        position = vit.position_embedding(images.shape[2] // p, images.shape[3] // p)  # [1, 1+L, D]
        patches = vit.conv_proj(images).flatten(2).transpose(1, 2) + position[:, 1:]  # [N, L, D]
        kept, mask, ranks = random_masking(patches, mask_ratio, noise)  # [N, K, D]
        cls = (vit.class_token + position[:, :1]).expand(n, -1, -1)      # [N, 1, D]
        encoded = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(torch.cat([cls, kept], 1))))
        x = self.decoder_embed(encoded)                                  # [N, 1+K, E]
        hidden = self.mask_token.expand(n, patches.shape[1] - kept.shape[1], -1)
        x_patches = torch.cat([x[:, 1:], hidden], dim=1)                 # [N, L, E], noise order
        x_patches = x_patches.gather(1, ranks[..., None].expand(-1, -1, x.shape[2]))  # image order
        x = torch.cat([x[:, :1], x_patches], dim=1) + self.decoder_pos_embedding
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))  # [N, 1+L, p*p*3]
        return pred[:, 1:], mask, encoded[:, 0]


# ------------------------------------------------------------------------------- loss

def patchify(images, patch_size):
    """[N, C, H, W] -> [N, L, p*p*C]: patches in row-major order, each flattened as (row in the
    patch, column, channel), the official layout (models_mae.py:95-107, einsum nchpwq->nhwpqc)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # [N, h, w, p, p, C]
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def mae_loss(images, pred, mask, patch_size, norm_pix_loss=True):
    """MAE's reconstruction loss (models_mae.py:198-214). images: [N, 3, H, W] as the encoder
    saw them (normalised); pred: [N, L, P] the decoder's patches, P = p*p*3; mask: [N, L], 1 for
    the hidden patches.

    With x_l the pixels of patch l and, with --norm-pix-loss, t_l = (x_l - mean(x_l)) /
    sqrt(var(x_l) + 1e-6) (unbiased variance over the patch's P values; else t_l = x_l):
        loss = sum_{n,l} m_nl (1/P) ||pred_nl - t_nl||^2  /  sum_{n,l} m_nl
    the mean squared error over the hidden patches only. Every image hides the same number of
    patches, so DDP's average of the processes' losses is the global batch's mean.
    """
    target = patchify(images, patch_size)                                     # [N, L, P]
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                              + PIXEL_VAR_EPS).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)                               # [N, L]
    return (per_patch * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------- training

def mae_optimizer(model, args):
    """AdamW with betas (--momentum, --beta2) = (0.9, 0.95) (main_pretrain.py:180) over timm's
    add_weight_decay groups (:179): weight decay on every parameter of 2 or more dimensions, the
    class and mask tokens included, none on biases and LayerNorms; the frozen position
    embedding is not optimised. Another --optimizer: common/optim.py's, on the same groups."""
    groups = param_groups(model, args.weight_decay)
    if args.optimizer != "adamw":
        return build_optimizer(groups, args)
    return torch.optim.AdamW(groups, lr=0.0, betas=(args.momentum, args.beta2))


@exit_on_user_error
def main(argv=None):
    args = get_args(argv)
    run = Run(args, "mae")  # processes, device, run directory (one run per folder), log, seed

    # data: one view per image, crop and flip only
    views = ViewPipeline([mae_view(args)], args.aug, args.seed, args.channels_last)
    loader = run.train_loader(views)

    # model, optimizer, schedule
    model = run.distribute(MAE(args.arch, args.small_images, args.img_size, args.decoder_dim,
                               args.decoder_depth, args.decoder_heads))
    mae = unwrap(model)
    optimizer = mae_optimizer(model, args)
    total_steps = args.epochs * run.steps_per_epoch
    warmup_steps = args.warmup_epochs * run.steps_per_epoch
    patches = (args.img_size // mae.patch_size) ** 2

    # resume from the run directory's checkpoint; the kNN monitor and backbone.pt: the encoder
    start_epoch, start_batch = run.restore(model, optimizer, mae.backbone)
    run.print(f"recipe source: {args.preset}")
    run.print(f"{describe_lr(args)} ({describe_optimizer(args)}, beta2 {args.beta2}, weight decay "
              f"{args.weight_decay:g} on weights only; {args.warmup_epochs} warmup epochs, cosine "
              f"to 0); {args.mask_ratio:.0%} of {patches} patches hidden; targets: "
              f"{'per-patch normalised' if args.norm_pix_loss else 'raw'} pixels; "
              f"{run.steps_per_epoch} steps per epoch")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        for i, ((images,), labels) in run.epoch(epoch, loader):
            step = epoch * run.steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, args.peak_lr)  # per iteration
            set_lr(optimizer, lr)
            (images,) = views.to_device([images], run.device, step)
            noise = mask_noise(args.seed, step, args.batch_size, patches, get_rank(),
                               len(images)).to(run.device, non_blocking=True)
            with autocast(args.precision, run.device):
                pred, mask, cls_token = model(images, noise, args.mask_ratio)
            loss = mae_loss(images.float(), pred.float(), mask.float(), mae.patch_size,
                            args.norm_pix_loss)                       # loss math in fp32
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.step_done(step, labels, cls_token, loss=loss, lr=lr)
            if run.stop_agreed(i):  # a stop signal reached a rank: save, requeue, exit
                return run.stop(epoch, i + 1)
        if run.end_epoch():  # log, kNN on the encoder, checkpoint and backbone.pt; True: stopped
            return
    run.finish()


if __name__ == "__main__":
    main()
