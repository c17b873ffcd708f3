"""The flags every method script shares, recipe resolution, and the run directory."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torchvision

from common.data import default_img_size
from common.dist import get_world_size
from common.errors import UserError, installed
from common.model import ARCHS, is_vit


def recipe_values(key, imagenet, small):
    """Help text giving a flag's value in both recipes, e.g. '(ImageNet: 0.1, small images: 0.5)'."""
    return f"(ImageNet: {imagenet[key]}, small images: {small[key]})"


def default_workers():
    """Loader workers per training process: the CPUs it may use (Slurm's --cpus-per-task, or the
    node's CPUs shared among torchrun's local processes) minus one for the training loop."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cpus = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        cpus //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus - 1)


def add_common_args(parser, method, imagenet, small, sync_bn="global"):
    """Add the shared flags. Those whose value depends on the recipe default to None, for
    `resolve_recipe` to fill. `sync_bn`: the method's official choice, the default of --sync-bn."""
    # No silent abbreviations: `--warmup 0` must fail, not quietly become --warmup-epochs 0 in one
    # script and an error in another that has no such flag.
    parser.allow_abbrev = False
    both = lambda key: recipe_values(key, imagenet, small)
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="ImageFolder root with train/ and val/ (ImageNet layout), or cifar10, cifar100, "
                        "stl10 (downloaded into --data-dir when online), or synthetic (random images)")
    g.add_argument("--data-dir", default="data", help="where cifar10/cifar100/stl10 live (default: data)")
    g.add_argument("--img-size", type=int, help="crop size (default: 224 for an ImageFolder, 32 for "
                   "CIFAR and synthetic, 96 for STL-10); <= 64 selects the small-image recipe, with "
                   "a 3x3 stride-1 stem and no max-pool")
    workers = default_workers()
    g.add_argument("--workers", type=int, default=workers, help="data-loading processes per rank "
                   f"(default: this process's share of the node's CPUs, minus one: {workers} here)")
    aug = g.add_mutually_exclusive_group()
    aug.add_argument("--gpu-aug", dest="aug", action="store_const", const="gpu", default="fast",
                     help="workers only decode, crop, resize and flip; colour jitter, grayscale, blur, "
                          "solarize and normalisation run batched on the GPU (default: all on the CPU)")
    aug.add_argument("--torchvision-aug", dest="aug", action="store_const", const="torchvision",
                     help="the standard torchvision transforms (slower; for comparison)")
    aug.add_argument("--data-on-device", dest="aug", action="store_const", const="device",
                     help="small datasets (CIFAR, STL-10, an ImageFolder of equal-size images) held on "
                          "the device as uint8, the views made there, no loader workers")
    g.add_argument("--synthetic-size", type=int, default=512,
                   help="training images of --data synthetic, val: a quarter (default: 512)")
    g = parser.add_argument_group("training")
    g.add_argument("--arch", help="the backbone, a torchvision class: resnet18, resnet34, resnet50, "
                   "resnet101, resnet152, wide_resnet50_2, wide_resnet101_2 (only the bottleneck "
                   "widened, 2048-d), resnet50w2/w4/w5 (every layer widened, as SimCLR and SwAV: "
                   "4096/8192/10240-d), resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, or "
                   "vit_tiny, vit_small, vit_base (patch 16 at 224 px, 4 at <= 64 px), which select "
                   "the method's ViT recipe " + both("arch"))
    g.add_argument("--epochs", type=int, help="training epochs " + both("epochs"))
    g.add_argument("--batch-size", type=int,
                   help="GLOBAL batch size, split evenly over all processes " + both("batch_size"))
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=float, help="BASE learning rate, scaled x batch/256 as printed at "
                      "start, as the papers' recipes give it " + both("lr"))
    rate.add_argument("--peak-lr", type=float, help="the optimizer's rate as given (instead of --lr), "
                      "e.g. BYOL-HPC's --lr_init 2.0 at batch 512 (= --lr 1.0), not scaled by the batch")
    g.add_argument("--weight-decay", type=float, help="weight decay " + both("weight_decay"))
    g.add_argument("--optimizer", choices=["lars", "sgd", "adamw"],
                   help="the official code's by default " + both("optimizer") + ", AdamW for the "
                        "ViT recipes. lars: as the official SimCLR/BYOL/Barlow Twins/VICReg code, "
                        "1-D parameters neither decayed nor adapted; sgd: with momentum; adamw: with "
                        "a ResNet recipe, choose --lr (its rates are SGD/LARS rates)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="optimizer momentum; AdamW's beta1 (default: 0.9, every official recipe)")
    g.add_argument("--lars-eta", type=float, help="LARS trust coefficient (default: 0.001, the "
                   "official code's; solo-learn's CIFAR recipes: 0.02 with --lars-clip)")
    g.add_argument("--lars-clip", action="store_true", help="LARC's clipping mode: each weight's "
                   "adapted rate is at most --lr's (apex LARC clip=True; solo-learn's CIFAR setting)")
    g.add_argument("--probe", action="store_true", help="an online linear probe (official BYOL "
                   "code, solo-learn): a classifier with its own SGD on the detached features of "
                   "the labelled training batches, its val top-1 logged every epoch as probe_top1")
    g.add_argument("--probe-lr", type=float, default=0.1,
                   help="the probe's learning rate (default: 0.1, solo-learn's CIFAR setting)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentations (0)")
    g = parser.add_argument_group("system")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto (default): bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--sync-bn", default=sync_bn, metavar="{global,node,off,N}",
                   help=f"which processes' batch statistics each BatchNorm shares on GPUs (default: "
                        f"{sync_bn}{', its shuffled BN' if sync_bn == 'off' else ''}). global: all; "
                        "node: one node's, as SwAV's groups of 8 (about twice as fast in swav issue "
                        "#22); N: groups of N consecutive ranks; off: none. On CPUs, always off")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last (NHWC) weights and batches on CUDA, the layout tensor-core "
                        "convolutions run fastest in (default: on)")
    g.add_argument("--run-dir", help=f"output folder (default: runs/{method}/<Slurm job id or "
                   "timestamp>); running again with the same folder resumes from its checkpoint.pt")
    g.add_argument("--allow-changes", nargs="+", default=[], metavar="FLAG",
                   help="resuming: accept these flags differing from the checkpoint's run (e.g. "
                        "epochs, to train longer), from the resumed step on; else refused")
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="write checkpoint.pt and backbone.pt every N epochs and after the last (a "
                        "stop signal writes checkpoint.pt where it stops): a crash loses at most N "
                        "epochs (default: 1)")
    g.add_argument("--save-every", type=int, default=0, help="also keep every Nth epoch's checkpoint "
                   "as checkpoint_epochN.pt and backbone_epochN.pt (default: 0, none)")
    g.add_argument("--stop-at-step", type=int, metavar="N", help="once N steps of the run are done, "
                   "save and exit as a stop signal would: to end a job at a known point, or test a resume")
    g.add_argument("--knn-every", type=int, default=1,
                   help="weighted kNN top-1 on the val split every N epochs, 0: never (default: 1)")
    g.add_argument("--log-every", type=int, default=50, help="a log line every N steps (default: 50)")
    add_tracking_args(parser)  # TensorBoard, W&B


def add_tracking_args(parser):
    """TensorBoard and Weights & Biases flags (why TensorBoard is on by default and W&B only when
    asked: common/track.py)."""
    g = parser.add_argument_group(
        "tracking", "optional extras (pip install -r requirements-extras.txt), rank 0 only, with "
        "the same records, names and steps as log.jsonl; a resume continues them")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="event files in the run directory: train/<key> every log step, epoch/<key> "
                        "at each epoch's last, the arguments as text; view with `tensorboard "
                        "--logdir runs` (default: on when installed)")
    g.add_argument("--wandb", metavar="PROJECT", type=wandb_project,
                   help="also log to this W&B project; a resumed run continues its W&B run "
                        "(RUN_DIR/wandb_run_id). Offline: --wandb-mode offline, then wandb sync")
    g.add_argument("--wandb-entity", metavar="ENTITY", help="W&B team or user (default: WANDB_ENTITY)")
    g.add_argument("--wandb-name", metavar="NAME",
                   help="W&B run name (default: the run directory's last two parts, e.g. simclr/20250101)")
    g.add_argument("--wandb-group", metavar="GROUP",
                   help="W&B group, e.g. a sweep, or one backbone's pre-training and evaluation")
    g.add_argument("--wandb-tags", nargs="+", metavar="TAG", help="W&B tags")
    g.add_argument("--wandb-mode", choices=["online", "offline", "disabled"],
                   help="offline: RUN_DIR/wandb/ for a later `wandb sync` (default: WANDB_MODE, else online)")
    return parser


def wandb_project(name):
    """--wandb's value, checked at parsing: a missing package fails before any work starts."""
    installed("wandb", "--wandb")
    return name


def default_run_dir(method):
    """runs/<method>/<Slurm job id, or the time>: a requeued Slurm job finds its own folder."""
    return os.path.join("runs", method, os.environ.get("SLURM_JOB_ID")
                        or time.strftime("%Y%m%d-%H%M%S"))


def resolve_recipe(args, imagenet, small, method, vit=None):
    """Fill every None flag from `small` (img_size <= 64) or `imagenet` or, when --arch names a
    ViT, from `vit` = (ViT recipe at 224 px, at <= 64 px), whose `recipe` entry names it; derive
    the run directory, and check what can be checked before any work starts."""
    if args.img_size is None:
        args.img_size = default_img_size(args.data)
    args.small_images = args.img_size <= 64
    recipe = small if args.small_images else imagenet
    args.recipe = "small-image" if args.small_images else "ImageNet"
    if vit and is_vit(args.arch):
        recipe = {**recipe, **vit[args.small_images]}
        args.recipe = recipe.pop("recipe")
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.run_dir = args.run_dir or default_run_dir(method)
    check_at_least(args, batch_size=1, epochs=1, img_size=1, workers=0, seed=0, log_every=1,
                   knn_every=0, checkpoint_every=1, save_every=0, stop_at_step=1, warmup_epochs=0)
    if args.arch not in ARCHS:  # before any data is scanned
        raise UserError(f"--arch {args.arch}: not supported (choose from {', '.join(ARCHS)})")
    args.peak_lr_given = args.peak_lr is not None
    if args.peak_lr_given:  # the given rate as is; --lr is the base rate it scales from
        args.lr = args.peak_lr * 256 / args.batch_size
    args.peak_lr = args.lr * args.batch_size / 256
    check_rates(args)
    if args.optimizer != "lars" and (args.lars_eta is not None or args.lars_clip):
        raise UserError(f"--lars-eta and --lars-clip apply to --optimizer lars, not {args.optimizer}")
    args.lars_eta = 0.001 if args.lars_eta is None else args.lars_eta
    if not (args.sync_bn in ("global", "node", "off") or args.sync_bn.isdigit() and int(args.sync_bn) > 0):
        raise UserError(f"--sync-bn {args.sync_bn}: global, node, off or a group size")
    return args


def check_at_least(args, **least):
    """A flag below its least value is one line, e.g. '--workers -1: must be 0 or more' (of a
    list, its smallest); flags left at None, or that a script lacks, are not checked."""
    for flag, minimum in least.items():
        value = getattr(args, flag, None)
        value = min(value) if isinstance(value, list) else value
        if value is not None and value < minimum:
            raise UserError(f"--{flag.replace('_', '-')} {value:g}: must be {minimum} or more")


def check_rates(args):
    """A learning rate positive, a weight decay (and linear_eval.py's --lr-backbone, 0 for a
    frozen backbone) 0 or more, one line naming the flag; flags left at None are not checked."""
    check_positive(args, "peak_lr" if getattr(args, "peak_lr_given", False) else "lr")
    check_at_least(args, weight_decay=0, lr_backbone=0)


def check_positive(args, *flags):
    """Temperatures and the like: each flag (None: not checked) above 0, or one line naming it
    (at 0 a loss divides by zero; below, it is turned upside down and still trains)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {value:g}: must be positive")


def check_fractions(args, *flags):
    """Momenta and probabilities: each value of each flag (None: not checked) in [0, 1], or one
    line naming it (a momentum of 1.5 or a blur probability of 2 ran without a word)."""
    for flag in flags:
        values = getattr(args, flag)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and not 0 <= value <= 1:
                raise UserError(f"--{flag.replace('_', '-')} {value:g}: must be in [0, 1]")


def describe_lr(args):
    """The recipe and learning rate printed at start, e.g. 'recipe: ImageNet; lr = 0.3 x
    4096/256 = 4.8'; with --peak-lr, 'lr = 2 (--peak-lr, as given; = 1 x 512/256)'."""
    if args.peak_lr_given:
        return (f"recipe: {args.recipe}; lr = {args.peak_lr:g} (--peak-lr, as given; = {args.lr:g} x "
                f"{args.batch_size}/256)")
    return f"recipe: {args.recipe}; lr = {args.lr:g} x {args.batch_size}/256 = {args.peak_lr:g}"


def make_run_dir(path):
    """Create the run directory and check that it is writable, before any data is read: a path
    that cannot be created or a read-only folder is one line, not a traceback at the first save."""
    probe = os.path.join(path, f".write-test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--run-dir {path}: cannot write there ({e.strerror or e})") from None


def check_batch(args):
    """The batch of each process: --batch-size is the global batch, split evenly."""
    world_size = get_world_size()
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} (global) is not divisible by the "
                        f"{world_size} processes")
    return args.batch_size // world_size


def git_revision(short=False):
    """The commit of the code being run (`+uncommitted` when tracked files differ from it), or
    None outside a git checkout."""
    try:  # --exclude '*': the commit, never a tag's name
        rev = subprocess.run(["git", "describe", "--always", "--exclude", "*", "--dirty=+uncommitted",
                              *([] if short else ["--abbrev=40"])], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


def versions():
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def save_args(args, path, method):
    """args.json: the resolved arguments, the method, and what is needed to reproduce the run."""
    record = {**vars(args), "method": method, "argv": sys.argv,
              "world_size": get_world_size(), "git": git_revision(), **versions()}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def format_args(args):
    """The resolved arguments, one per line, for the start of a run; then a note for STL-10 (the
    ImageNet recipe) and one if the warmup lasts the whole run (e.g. a 1-epoch smoke run of a
    10-warmup-epoch recipe), and one for fp16 on a CPU."""
    lines = [f"  {k:<18} {v}" for k, v in sorted(vars(args).items())]
    if args.data == "stl10" and not args.small_images:
        from common.named_data import stl10_recipe_note  # only for STL-10
        lines.append(stl10_recipe_note(args))
    warmup = getattr(args, "warmup_epochs", 0) or 0
    if warmup >= args.epochs:
        lines.append(f"note: --warmup-epochs {warmup:g} >= --epochs {args.epochs}: the learning "
                     f"rate never leaves its linear warmup, so the recipe's peak rate and cosine "
                     f"are never reached (give --warmup-epochs a fraction of the run)")
    if args.precision == "fp16" and not torch.cuda.is_available():  # 20x fp32's time, 2 cores
        lines.append("note: --precision fp16 on a CPU: PyTorch's CPU fp16 kernels are many times "
                     "slower than fp32's (the CPU default; bf16 is also fast)")
    return "\n".join(lines)
