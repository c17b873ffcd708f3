"""finetune.py: the layer-decay groups against a reference written from the official
`param_groups_lrd`, the features (global pooling through a new LayerNorm, or the class token), MAE's
linear-probe head, mixup / cutmix targets with label smoothing against timm's construction, the
augmentations and the recipes; a tiny ViT fine-tuned for a few steps resumes exactly, the probe
leaves the backbone untouched, two gloo processes equal one, bad input is one line."""
import json
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import finetune
from common.checkpoint import export_backbone
from common.model import build_backbone, resnet_backbone
from tests.helpers import assert_same_tensors, ok, read_log, run

DATA = ["--data", "synthetic", "--synthetic-size", "64", "--img-size", "16", "--workers", "0"]
TRAIN = [*DATA, "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--log-every", "1"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_file(module_tmp):
    """A randomly initialised vit_tiny (patch 4, laid out for 32 px) as backbone.pt."""
    path = module_tmp("finetune") / "backbone.pt"
    torch.manual_seed(0)
    export_backbone(build_backbone("vit_tiny", small_images=True), path)
    return path


def tune(*argv):
    """finetune.py's main() in this process, the signal handlers it installs restored after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return finetune.main([str(a) for a in argv])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


# ---------------------------------------------------------------- layer-wise lr decay

TIMM_PREFIXES = {"backbone.class_token": "cls_token", "backbone.encoder.pos_embedding": "pos_embed",
                 "backbone.conv_proj.": "patch_embed.proj.", "backbone.encoder.ln.": "norm."}


def timm_name(name):
    """Our parameter's name in the official (timm) ViT: blocks.i.*, patch_embed.*, ..."""
    for ours, theirs in TIMM_PREFIXES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    if name.startswith("backbone.encoder.layers.encoder_layer_"):
        block, rest = name.removeprefix("backbone.encoder.layers.encoder_layer_").split(".", 1)
        return f"blocks.{block}.{rest}"
    return name  # fc_norm.*, head.*


def official_param_groups_lrd(named, depth, weight_decay, layer_decay):
    """util/lr_decay.py:15-76 on (timm name, parameter) pairs with the no-weight-decay list of
    timm's ViT ({pos_embed, cls_token, dist_token}): {parameter id: (lr_scale, weight decay)}."""
    num_layers = depth + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    out = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim == 1 or name in ("pos_embed", "cls_token", "dist_token") else weight_decay
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks"):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        out[id(p)] = (scales[layer], decay)
    return out


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_layer_decay_groups_equal_the_official_param_groups_lrd(pool):
    model = finetune.ViTClassifier(build_backbone("vit_tiny", True), 10, pool, probe=False)
    groups = finetune.layer_decay_groups(model, 0.05, 0.65)
    ours = {id(p): (round(g["lr_scale"], 12), g["weight_decay"]) for g in groups
            for p in g["params"]}
    named = [(timm_name(n), p) for n, p in model.named_parameters()]
    rounded = lambda table: {k: (round(scale, 12), decay) for k, (scale, decay) in table.items()}
    assert ours == rounded(official_param_groups_lrd(named, 12, 0.05, 0.65))
    assert len(groups) == 2 * 14 and len(ours) == len(list(model.parameters()))
    # embeddings at 0.65^13, block 11 at 0.65, the head and its norm at 1
    by_name = {n: ours[id(p)] for n, p in model.named_parameters()}
    assert by_name["backbone.conv_proj.weight"] == (round(0.65 ** 13, 12), 0.05)
    assert by_name["backbone.class_token"] == (round(0.65 ** 13, 12), 0.0)
    assert by_name["backbone.encoder.layers.encoder_layer_11.mlp.0.weight"] == (0.65, 0.05)
    assert by_name["head.weight"] == (1.0, 0.05) and by_name["head.bias"] == (1.0, 0.0)
    # CONTROL: a decay counted from the blocks alone (num_layers = depth) is another table
    assert ours != rounded(official_param_groups_lrd(named, 11, 0.05, 0.65))


# ---------------------------------------------------------------- model, targets, views

def test_features_pooled_or_class_token_and_the_probe_head():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    backbone = build_backbone("vit_tiny", True)
    cls_model = finetune.ViTClassifier(backbone, 5, "cls", probe=False).eval()
    with torch.no_grad():  # the class token after the final norm: the backbone's own output
        assert torch.allclose(cls_model(x), cls_model.head(backbone(x)), atol=1e-6)
    avg = finetune.ViTClassifier(build_backbone("vit_tiny", True), 5, "avg", probe=False).eval()
    assert isinstance(avg.backbone.encoder.ln, nn.Identity)  # models_vit.py:32, norm removed
    with torch.no_grad():
        tokens = avg.backbone.encoder.layers(avg.backbone.embed(x))
        expected = avg.head(F.layer_norm(tokens[:, 1:].mean(1), (192,), eps=1e-6))
        assert torch.allclose(avg(x), expected, atol=1e-6)
    assert 0 < avg.head.weight.std() < 1e-4 and avg.head.bias.abs().max() == 0  # std 2e-5
    probe = finetune.ViTClassifier(build_backbone("vit_tiny", True), 5, "cls", probe=True)
    norm, linear = probe.head
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert 0.005 < linear.weight.std() < 0.02  # std 0.01, main_linprobe.py:218
    probe.train()
    assert probe.head.training and not probe.backbone.training
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    pooled = finetune.ViTClassifier(build_backbone("vit_tiny", True), 5, "avg", probe=True)
    assert {n for n, p in pooled.named_parameters() if p.requires_grad} == {"head.1.weight",
                                                                             "head.1.bias"}


def test_mixup_and_cutmix_targets_are_timms_with_label_smoothing():
    class Args:
        mixup, cutmix, smoothing = 0.8, 0.0, 0.1
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    mixed, targets = finetune.batch_mixing(Args, 4)(images, labels)
    # lambda from the images (mixed = lam x + (1 - lam) x rolled), the targets timm's:
    # lam y_i + (1 - lam) y_partner, y one-hot with on 1 - eps + eps/C and off eps/C
    partner = images.roll(1, 0)
    lam = ((mixed - partner) / (images - partner)).median().item()
    smooth = lambda y: F.one_hot(y, 4).float() * (1 - 0.1) + 0.1 / 4
    assert torch.allclose(mixed, lam * images + (1 - lam) * partner, atol=1e-5)
    assert torch.allclose(targets, lam * smooth(labels) + (1 - lam) * smooth(labels.roll(1)),
                          atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    Args.mixup, Args.cutmix = 0.0, 1.0  # cutmix: lambda is the area kept
    mixed, targets = finetune.batch_mixing(Args, 4)(images, labels)
    kept = (mixed == images).all(1).float().mean().item()  # per pixel, over the batch
    assert torch.allclose(targets, kept * smooth(labels) + (1 - kept) * smooth(labels.roll(1)),
                          atol=1e-5)
    Args.cutmix = 0.0  # no mixing: label smoothing alone, the usual smoothed cross-entropy
    _, targets = finetune.batch_mixing(Args, 4)(images, labels)
    logits = torch.randn(6, 4)
    assert torch.allclose(finetune.soft_target_cross_entropy(logits, targets),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_augmentations_are_the_recipes():
    args = finetune.get_args(["--ckpt", "x", "--data", "synthetic", "--img-size", "32"])
    finetune.resolve_recipe(args, True)
    ops = finetune.train_transform(args).transforms
    crop, flip, randaug, *_, erase, _ = ops
    assert (crop.scale, crop.interpolation) == ((0.08, 1.0), v2.InterpolationMode.BICUBIC)
    assert isinstance(flip, v2.RandomHorizontalFlip)
    assert (randaug.num_ops, randaug.magnitude, randaug.interpolation) == (
        2, 9, v2.InterpolationMode.BICUBIC)
    # timm's m9 is 9/10 of each range (27 of rotate's 30 degrees): torchvision's 9 of 11 bins
    rotate = randaug._AUGMENTATION_SPACE["Rotate"][0](randaug.num_magnitude_bins, 32, 32)
    assert rotate[randaug.magnitude].item() == pytest.approx(27.0)
    assert randaug.fill == [124, 116, 104]  # timm's fill: the mean colour (img_mean)
    assert (erase.p, erase.value, erase.scale) == (0.25, None, (0.02, 1 / 3))  # per-pixel normal
    from PIL import Image
    out = finetune.train_transform(args)(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
    linear = finetune.get_args(["--ckpt", "x", "--data", "synthetic", "--protocol", "linear",
                                "--img-size", "224"])
    finetune.resolve_recipe(linear, False)
    assert [type(t) for t in finetune.train_transform(linear).transforms[:3]] == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.PILToTensor]


def test_recipes_from_finetune_md_and_main_linprobe():
    get = lambda *flags: finetune.get_args(["--ckpt", "x", "--data", "/imagenet", *flags])
    a = get()
    finetune.resolve_recipe(a, False)  # FINETUNE.md:113-124, main_finetune.py's defaults
    assert (a.epochs, a.batch_size, a.lr, a.min_lr, a.warmup_epochs, a.weight_decay,
            a.layer_decay, a.drop_path, a.smoothing, a.mixup, a.cutmix, a.reprob, a.randaug_ops,
            a.randaug_magnitude, a.pool) == (100, 1024, 5e-4, 1e-6, 5, 0.05, 0.65, 0.1, 0.1, 0.8,
                                             1.0, 0.25, 2, 9, "avg")
    assert a.peak_lr == pytest.approx(2e-3)
    p = get("--protocol", "linear")
    finetune.resolve_recipe(p, False)  # FINETUNE.md:137-155, main_linprobe.py
    assert (p.epochs, p.batch_size, p.lr, p.min_lr, p.warmup_epochs, p.weight_decay, p.pool) == (
        90, 16384, 0.1, 0.0, 10, 0.0, "cls")
    s = get("--epochs", "7")
    finetune.resolve_recipe(s, True)
    assert (s.epochs, s.batch_size) == (7, 256)
    bad = get("--protocol", "linear", "--mixup", "0.8")
    with pytest.raises(finetune.UserError, match="--protocol linear trains a head"):
        finetune.resolve_recipe(bad, False)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def straight(backbone_file, module_tmp):
    run_dir = module_tmp("finetune_runs") / "straight"
    tune("--ckpt", backbone_file, *TRAIN, "--run-dir", run_dir)
    return run_dir


def test_a_tiny_fine_tuning_run(straight, backbone_file):
    log = read_log(straight)
    assert [r["step"] for r in log if "step" in r] == list(range(1, 9))
    lrs = [r["lr"] for r in log if "step" in r]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(5e-4 * 16 / 256)  # warmup, then cosine
    result = json.loads((straight / "result.json").read_text())
    assert result["protocol"] == "finetune" and 0 <= result["top1"] <= 100
    state = checkpoint(straight)["model"]
    assert "fc_norm.weight" in state and "backbone.encoder.ln.weight" not in state
    source = torch.load(backbone_file)
    assert not torch.equal(state["backbone.conv_proj.weight"], source["conv_proj.weight"])
    # stochastic depth in the blocks (0 in the first, 0.1 in the last), not in the weights
    groups = checkpoint(straight)["optimizer"]["param_groups"]
    assert sorted({round(g["lr_scale"], 6) for g in groups})[-1] == 1.0 and len(groups) == 28


def test_interrupted_fine_tuning_resumes_exactly(straight, backbone_file, tmp_path):
    """Stopped after step 3 (epoch 1, batch 3) and resumed: every weight, AdamW's moments and
    the steps' losses (mixup, cutmix and stochastic depth draw from the resumed RNG) as the
    uninterrupted run's."""
    run_dir = tmp_path / "resumed"
    tune("--ckpt", backbone_file, *TRAIN, "--run-dir", run_dir, "--stop-at-step", "3")
    stopped = checkpoint(run_dir)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (0, 3)
    assert not (run_dir / "result.json").exists()
    tune("--ckpt", backbone_file, *TRAIN, "--run-dir", run_dir)
    a, b = checkpoint(straight), checkpoint(run_dir)
    assert_same_tensors(a["model"], b["model"])
    for k in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    losses = lambda d: [r["loss"] for r in read_log(d) if "step" in r]
    assert losses(run_dir) == losses(straight)
    assert json.loads((run_dir / "result.json").read_text())["top1"] == \
        json.loads((straight / "result.json").read_text())["top1"]


def test_the_linear_probe_trains_the_head_only(backbone_file, tmp_path, capsys):
    run_dir = tmp_path / "probe"
    result = tune("--ckpt", backbone_file, *TRAIN, "--protocol", "linear", "--run-dir", run_dir)
    assert "MAE main_linprobe.py" in capsys.readouterr().out and result["pool"] == "cls"
    state, source = checkpoint(run_dir)["model"], torch.load(backbone_file)
    assert_same_tensors({k: state["backbone." + k] for k in source}, source)  # frozen
    assert {"head.0.running_mean", "head.1.weight"} <= state.keys()
    assert not torch.equal(state["head.0.running_mean"], torch.zeros(192))  # batch statistics
    momentum = checkpoint(run_dir)["optimizer"]["state"]  # LARS's, not AdamW's moments
    assert momentum and all(set(s) == {"momentum_buffer"} for s in momentum.values())


def test_bad_input_is_one_line(tmp_path):
    torch.manual_seed(0)
    export_backbone(resnet_backbone("resnet18", cifar_stem=True), tmp_path / "resnet.pt")
    proc = run(["finetune.py", "--ckpt", tmp_path / "resnet.pt", *TRAIN, "--run-dir",
                tmp_path / "run"], timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "finetune.py fine-tunes ViTs" in lines[0]


@pytest.mark.full
def test_two_processes_fine_tune_as_one(backbone_file, tmp_path):
    """Without the draws that differ between processes (mixup / cutmix, stochastic depth: each
    process its own RNG), 2 gloo processes train the weights 1 process trains: the per-image
    augmentations are seeded by image, DDP averages the gradients, the ViT has no BatchNorm."""
    flags = ["--ckpt", backbone_file, *TRAIN, "--mixup", "0", "--cutmix", "0", "--drop-path", "0"]
    tune(*flags, "--run-dir", tmp_path / "one")
    ok(run([*TORCHRUN, "finetune.py", *flags, "--run-dir", tmp_path / "two"], timeout=300))
    one, two = checkpoint(tmp_path / "one")["model"], checkpoint(tmp_path / "two")["model"]
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), k
    assert json.loads((tmp_path / "two" / "args.json").read_text())["world_size"] == 2
