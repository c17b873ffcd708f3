"""mocov3.py: the loss against a reference written from the official `contrastive_loss` and a
naive loop (values and gradients), the keys of every process with labels offset by rank (two
ranks emulated in one process, and 2 gloo processes against one), the heads and the 12-head ViT
of the official builder, the momentum update and its cosine, weight decay on every parameter with
AdamW, the recipes, the step order of main(), a tiny ViT and a ResNet-18 run on the CPU read back
by linear_eval.py with MoCo v3's protocol, and an exact resume."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linear_eval
import mocov3
from common.errors import UserError
from common.optim import LARS, build_optimizer, set_lr, warmup_cosine
from common.weights import load_backbone
from tests import mocov3_ddp_check as ddp
from tests.helpers import assert_same_tensors, ok, read_log, run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- loss

def official_contrastive_loss(q, k, temperature, rank=0, all_keys=None):
    """moco-v3 moco/builder.py:63-73, one direction, as the official code computes it: both
    normalised, the keys of all ranks concatenated (concat_all_gather; here `all_keys`, already
    gathered in rank order), logits by einsum over T, labels arange(N) + N x rank, cross-entropy
    times 2T."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k if all_keys is None else all_keys, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / temperature
    n = logits.shape[0]
    labels = torch.arange(n, dtype=torch.long) + n * rank
    return nn.CrossEntropyLoss()(logits, labels) * (2 * temperature)


def naive_loss(q1, q2, k1, k2, temperature):
    """The symmetric loss with explicit sums, one query at a time, in Python floats."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def one_way(q, k):
        keys = [unit(row) for row in k.tolist()]
        total = 0.0
        for i, row in enumerate(q.tolist()):
            qi = unit(row)
            logits = [sum(a * b for a, b in zip(qi, key)) / temperature for key in keys]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
        return 2 * temperature * total / len(q)
    return one_way(q1, k2) + one_way(q2, k1)


def tensors(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(4)]


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_loss_equals_the_official_contrastive_loss_values_and_gradients(temperature):
    q1, q2, k1, k2 = tensors()
    ours = mocov3.mocov3_loss(q1, q2, k1, k2, temperature)
    official = (official_contrastive_loss(q1, k2.detach(), temperature)
                + official_contrastive_loss(q2, k1.detach(), temperature))  # builder.py:96
    assert torch.allclose(ours, official, rtol=1e-12)
    assert ours.item() == pytest.approx(naive_loss(q1, q2, k1, k2, temperature), rel=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (q1, q2)), torch.autograd.grad(official, (q1, q2))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # the factor 2T is there: without it the value differs
    plain = F.cross_entropy(F.normalize(q1, dim=1) @ F.normalize(k2, dim=1).T / temperature,
                            torch.arange(6))
    assert not torch.allclose(official_contrastive_loss(q1, k2, temperature), plain)


def test_loss_by_hand_and_keys_get_no_gradient():
    # q_i = k_i, orthonormal: each query's logits are 1/T for its key, 0 for the other, so each
    # direction is 2T log(1 + exp(-1/T)); both directions summed
    eye = torch.eye(2, requires_grad=True)
    keys = torch.eye(2, requires_grad=True)
    loss = mocov3.mocov3_loss(eye, eye, keys, keys, 0.5)
    assert loss.item() == pytest.approx(2 * (2 * 0.5 * math.log(1 + math.exp(-2))), rel=1e-6)
    loss.backward()
    assert keys.grad is None and eye.grad.abs().sum() > 0


def test_two_ranks_emulated_equal_one_batch(monkeypatch):
    """Each rank contrasts its queries with the keys of BOTH ranks (gathered, rank order), its
    positives at rows n x rank + i: the mean of the two ranks' losses (what DDP's gradient average
    follows) is the loss of one process on the whole batch, gradients too."""
    q1, q2, k1, k2 = tensors(n=8, seed=1)
    whole = mocov3.mocov3_loss(q1, q2, k1, k2, 0.2)
    expected = torch.autograd.grad(whole, (q1, q2))

    def loss_of(rank, offset=True):
        half = slice(4 * rank, 4 * rank + 4)
        keys = iter([k2.detach(), k1.detach()])  # both ranks' keys, in the order asked for

        def gather(k):  # this rank's 4 keys in, the 8 of both ranks out (rank order)
            assert k.shape == (4, 5)
            return next(keys)
        monkeypatch.setattr(mocov3, "get_rank", lambda: rank if offset else 0)
        monkeypatch.setattr(mocov3, "all_gather_tensor", gather)
        return mocov3.mocov3_loss(q1[half], q2[half], k1[half], k2[half], 0.2)

    mean = (loss_of(0) + loss_of(1)) / 2
    assert torch.allclose(mean, whole, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(mean, (q1, q2)), expected):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    # the official form for rank 1 agrees (labels arange(n) + n)
    official = (official_contrastive_loss(q1[4:], None, 0.2, 1, k2.detach())
                + official_contrastive_loss(q2[4:], None, 0.2, 1, k1.detach()))
    assert torch.allclose(loss_of(1), official, rtol=1e-12)
    # CONTROL: labels not offset by rank, rank 1 takes rank 0's keys as its positives
    assert not torch.allclose((loss_of(0) + loss_of(1, offset=False)) / 2, whole, rtol=1e-3)


@pytest.mark.full
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "mocov3_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/mocov3_ddp_check.py", out], timeout=300))
    res = torch.load(out)
    assert res["world"] == 2
    model = ddp.make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ddp.LR,
                                momentum=0.9)
    for step, record in enumerate(res["steps"]):
        x1, x2 = ddp.make_batch(step)
        q1, q2 = model(x1, x2)
        model.momentum_update(ddp.MOMENTA[step])
        k1, k2 = model.keys(x1, x2)
        loss = mocov3.mocov3_loss(q1, q2, k1, k2, ddp.TEMPERATURE)
        optimizer.zero_grad()
        loss.backward()
        assert torch.allclose(record["losses"].mean(), loss, rtol=1e-10), step
        assert not torch.allclose(record["losses"][0], record["losses"][1])
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        assert record["grads"].keys() == grads.keys()
        for k, g in record["grads"].items():
            assert torch.allclose(g, grads[k], rtol=1e-7, atol=1e-12), (step, k)
        if step == 0:  # CONTROL: labels not offset by rank give other gradients
            assert not torch.allclose(res["control"]["losses"].mean(), loss, rtol=1e-4)
            for k in ("predictor.0.weight", "projector.0.weight"):
                assert not torch.allclose(res["control"]["grads"][k], grads[k], rtol=1e-3), k
        optimizer.step()
    state = model.state_dict()
    for k, v in res["state"].items():  # base AND momentum encoder, after the last update
        assert torch.allclose(v, state[k], rtol=1e-7, atol=1e-10), k
    assert not torch.equal(state["momentum_projector.0.weight"], state["projector.0.weight"])


# ---------------------------------------------------------------- model

def test_heads_and_backbones_follow_the_official_builder():
    vit = mocov3.MoCoV3("vit_tiny", small_images=True, hidden_dim=32, out_dim=8)
    res = mocov3.MoCoV3("resnet18", small_images=True, hidden_dim=32, out_dim=8)
    kinds = lambda net: [type(m).__name__ for m in net]
    # ViT: projector 3 layers, predictor 2, both ending in a BN without affine (builder.py:112-122)
    assert kinds(vit.projector) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert kinds(vit.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    # ResNet: projector 2 layers with the last BN, predictor without it (builder.py:99-109)
    assert kinds(res.projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert kinds(res.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    for head in (vit.projector, vit.predictor, res.projector, res.predictor):
        assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
        assert all(m.affine == (i < len(head) - 1) for i, m in enumerate(head)
                   if isinstance(m, nn.BatchNorm1d))
    assert [vit.projector[0].in_features, vit.projector[-2].out_features] == [192, 8]
    assert res.projector[0].in_features == 512 and vit.predictor[0].out_features == 32
    # MoCo v3's ViT: 12 heads, the random patch projection frozen, its sin-cos positions
    assert vit.backbone.encoder.layers[0].num_heads == 12
    frozen = {n for n, p in vit.named_parameters() if not p.requires_grad}
    assert {"backbone.conv_proj.weight", "backbone.encoder.pos_embedding"} <= frozen
    trainable = mocov3.MoCoV3("vit_tiny", True, 32, 8, heads=3, stop_grad_conv1=False)
    assert trainable.backbone.conv_proj.weight.requires_grad
    assert trainable.backbone.encoder.layers[0].num_heads == 3
    # ResNet: the last BN of each block zero-initialised (main_moco.py:186)
    assert all(block.bn2.weight.abs().sum() == 0 for block in res.backbone.layer1)
    # the momentum encoder starts as a copy and gets no gradient (builder.py:32-34)
    for online, momentum in (("backbone", "momentum_backbone"),
                             ("projector", "momentum_projector")):
        a, b = getattr(res, online).state_dict(), getattr(res, momentum).state_dict()
        assert_same_tensors(a, b)
        assert not any(p.requires_grad for p in getattr(res, momentum).parameters())


def test_momentum_update_by_hand_and_its_cosine():
    torch.manual_seed(0)
    net = mocov3.MoCoV3("resnet18", small_images=True, hidden_dim=16, out_dim=8)
    with torch.no_grad():
        for p in [*net.backbone.parameters(), *net.projector.parameters()]:
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("momentum_")}
    net.momentum_update(0.9)
    for name, p in net.backbone.named_parameters():
        expected = 0.9 * old[f"momentum_backbone.{name}"] + 0.1 * p
        assert torch.allclose(net.momentum_backbone.get_parameter(name), expected, atol=1e-6)
    assert torch.allclose(net.momentum_projector[0].weight,
                          0.9 * old["momentum_projector.0.weight"] + 0.1 * net.projector[0].weight)
    # BN statistics stay the momentum encoder's own (builder.py:57-61 updates parameters only)
    assert torch.equal(net.momentum_backbone.bn1.running_mean,
                       old["momentum_backbone.bn1.running_mean"])

    def official(t, epochs, base):  # main_moco.py:431-434, t in epochs
        return 1. - 0.5 * (1. + math.cos(math.pi * t / epochs)) * (1. - base)
    steps_per_epoch, epochs = 7, 3
    for step in (0, 5, 10, 20):
        ours = warmup_cosine(step, epochs * steps_per_epoch, 0, 0.99, final=1.0)  # as in main
        assert ours == pytest.approx(official(step / steps_per_epoch, epochs, 0.99), abs=1e-12)


def test_adamw_decays_every_parameter_lars_only_the_weights():
    net = mocov3.MoCoV3("vit_tiny", small_images=True, hidden_dim=16, out_dim=8)
    args = mocov3.get_args(["--data", "synthetic", "--arch", "vit_tiny"])
    assert args.optimizer == "adamw" and args.weight_decay == 0.1
    optimizer = build_optimizer(mocov3.weight_decay_groups(net, "adamw", 0.1), args)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 1
    owned = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert owned == {id(p) for p in net.parameters() if p.requires_grad}
    # a LayerNorm bias with a zero gradient: only the decay moves it (lr x wd x value)
    bias = net.backbone.encoder.ln.bias
    with torch.no_grad():
        bias.fill_(1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    set_lr(optimizer, 0.01)
    optimizer.step()
    assert torch.allclose(bias, torch.full_like(bias, 1 - 0.01 * 0.1))
    lars = build_optimizer(mocov3.weight_decay_groups(net, "lars", 1e-6),
                           mocov3.get_args(["--data", "synthetic"]))
    assert isinstance(lars, LARS)
    assert [g["weight_decay"] for g in lars.param_groups] == [1e-6, 0.0]
    assert all(p.ndim <= 1 for p in lars.param_groups[1]["params"])


# ---------------------------------------------------------------- recipes

def test_recipes_from_config_md_and_solo_learn():
    get = lambda *flags: mocov3.get_args(["--data", "/imagenet", *flags])
    for arch in ("vit_small", "vit_base"):  # CONFIG.md:108-117, :155-164
        a = get("--arch", arch)
        assert (a.optimizer, a.lr, a.weight_decay, a.epochs, a.warmup_epochs, a.temperature,
                a.moco_momentum, a.crop_min, a.batch_size, a.vit_heads, a.stop_grad_conv1) == \
            ("adamw", 1.5e-4, 0.1, 300, 40, 0.2, 0.99, 0.08, 4096, 12, True)
        assert a.recipe == mocov3.VIT["recipe"] and a.peak_lr == pytest.approx(2.4e-3)
    a = get()  # ResNet-50, 100 epochs: main_moco.py's defaults + CONFIG.md:13-19
    assert (a.arch, a.optimizer, a.lr, a.weight_decay, a.moco_momentum, a.temperature,
            a.crop_min, a.batch_size, a.warmup_epochs, a.epochs) == \
        ("resnet50", "lars", 0.6, 1e-6, 0.99, 1.0, 0.2, 4096, 10, 100)
    assert a.preset.startswith("moco-v3 CONFIG.md's ResNet-50 command for 100 epochs")
    assert (get("--epochs", "300").lr, get("--epochs", "300").weight_decay) == (0.3, 1e-6)
    a = get("--epochs", "1000")
    assert (a.lr, a.weight_decay, a.moco_momentum) == (0.3, 1.5e-6, 0.996)
    a = get("--epochs", "1000", "--moco-momentum", "0.99", "--lr", "0.5")  # given flags win
    assert (a.lr, a.weight_decay, a.moco_momentum) == (0.5, 1.5e-6, 0.99)
    small = mocov3.get_args(["--data", "cifar10"])  # solo-learn cifar/mocov3.yaml
    assert (small.arch, small.optimizer, small.lr, small.batch_size, small.weight_decay,
            small.temperature, small.moco_momentum, small.epochs, small.crop_min,
            small.blur_probs) == ("resnet18", "lars", 0.3, 256, 1e-6, 0.2, 0.99, 1000, 0.08,
                                  (0.0, 0.0))
    assert "solo-learn" in small.preset
    views = mocov3.mocov3_views(get())
    assert [(v.blur_p, v.solarize_p, v.scale, v.jitter) for v in views] == [
        (1.0, 0.0, (0.2, 1.0), (0.4, 0.4, 0.2, 0.1)), (0.1, 0.2, (0.2, 1.0), (0.4, 0.4, 0.2, 0.1))]
    with pytest.raises(UserError, match="--vit-heads 5: must divide vit_small's width 384"):
        get("--arch", "vit_small", "--vit-heads", "5")
    with pytest.raises(UserError, match="--crop-min 0.0"):
        get("--crop-min", "0")


def test_bad_input_is_one_line(tmp_path):
    proc = run(["mocov3.py", "--data", "synthetic", "--arch", "vit_base", "--vit-heads", "7",
                "--run-dir", tmp_path / "run"], timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: --vit-heads 7: must divide vit_base's width 768")


# ---------------------------------------------------------------- end to end

TINY_VIT = ["--data", "synthetic", "--arch", "vit_tiny", "--img-size", "16", "--synthetic-size",
            "32", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--epochs", "2",
            "--warmup-epochs", "1", "--hidden-dim", "64", "--proj-dim", "32"]


def test_main_updates_the_momentum_encoder_after_the_queries_before_the_keys(tmp_path,
                                                                             monkeypatch):
    calls = []
    for name in ("forward", "momentum_update", "keys"):
        real = getattr(mocov3.MoCoV3, name)
        monkeypatch.setattr(mocov3.MoCoV3, name, lambda self, *a, _n=name, _f=real:
                            calls.append(_n) or _f(self, *a))
    mocov3.main([*TINY_VIT, "--epochs", "1", "--knn-every", "0", "--run-dir", str(tmp_path)])
    assert calls == ["forward", "momentum_update", "keys"] * 2  # 2 steps
    momenta = [r["momentum"] for r in read_log(tmp_path) if "step" in r]
    assert momenta == [0.99, pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 2)) / 2)]


@pytest.fixture(scope="module")
def vit_run(module_tmp):
    run_dir = module_tmp("mocov3") / "vit"
    mocov3.main([*TINY_VIT, "--run-dir", str(run_dir)])
    return run_dir


def test_tiny_vit_run_then_linear_eval_with_mocov3_protocol(vit_run, tmp_path, capsys):
    log = read_log(vit_run)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and log[0]["epoch"] == 0
    assert all(0.0 < r["loss"] < 2 * 2 * 0.2 * math.log(16) + 1 for r in steps)
    assert 0 < log[-1]["embedding_std"] and 0 <= log[-1]["knn_top1"] <= 100
    ckpt = torch.load(vit_run / "checkpoint.pt", weights_only=False)
    assert ckpt["method"] == "mocov3" and ckpt["args"]["vit_heads"] == 12
    state = ckpt["model"]
    assert {"momentum_backbone.class_token", "momentum_projector.0.weight",
            "predictor.3.weight"} <= state.keys()
    net = mocov3.MoCoV3("vit_tiny", True, 64, 32)
    net.load_state_dict(state)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = net.backbone.eval()(x)
    # checkpoint.pt and backbone.pt both read back as a 12-head ViT with the same features
    for name in ("checkpoint.pt", "backbone.pt"):
        backbone, info = load_backbone(vit_run / name)
        assert "vit_tiny (patch 4 at 32 px, 12 heads)" in info["description"], info
        with torch.no_grad():
            assert torch.allclose(backbone.eval()(x), expected, atol=1e-5), name
    capsys.readouterr()
    result = linear_eval.main(["--ckpt", str(vit_run / "checkpoint.pt"), "--data", "synthetic",
                               "--synthetic-size", "32", "--workers", "0", "--batch-size", "16",
                               "--epochs", "1", "--cached-features",
                               "--run-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "cleanssl mocov3 checkpoint: vit_tiny (patch 4 at 32 px, 12 heads)" in out
    assert "ViT: lr 3" in out  # MoCo v3's main_lincls.py rate for ViTs (CONFIG.md:141-149)
    saved = json.loads((tmp_path / "eval" / "args.json").read_text())
    assert (saved["lr"], saved["vit_features"], saved["img_size"]) == (3.0, "cls", 16)
    assert 0 <= result["top1"] <= 100


def test_interrupted_run_resumes_exactly(vit_run, tmp_path):
    """Stopped after step 3 (epoch 2, batch 1, as by a stop signal) and resumed: base and
    momentum encoders, predictor and optimizer state bit for bit, the log's steps once each."""
    resumed = tmp_path / "resumed"
    mocov3.main([*TINY_VIT, "--run-dir", str(resumed), "--stop-at-step", "3"])
    stopped = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 1)
    mocov3.main([*TINY_VIT, "--run-dir", str(resumed)])
    a = torch.load(vit_run / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert_same_tensors(a["model"], b["model"])
    assert not torch.equal(a["model"]["momentum_projector.0.weight"],
                           stopped["model"]["momentum_projector.0.weight"])
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(s, t)
    assert [r["step"] for r in read_log(resumed) if "step" in r] == [1, 2, 3, 4]


def test_resnet18_run_then_linear_eval(tmp_path, capsys):
    flags = ["--data", "synthetic", "--arch", "resnet18", "--img-size", "16", "--synthetic-size",
             "32", "--batch-size", "16", "--workers", "0", "--epochs", "1", "--log-every", "1",
             "--hidden-dim", "64", "--proj-dim", "32", "--knn-every", "0"]
    mocov3.main([*flags, "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "recipe source: solo-learn's CIFAR MoCo v3" in out and "LARS" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert "predictor.3.weight" in state and "predictor.4.running_mean" not in state
    result = linear_eval.main(["--ckpt", str(tmp_path / "run" / "backbone.pt"), "--data",
                               "synthetic", "--synthetic-size", "32", "--workers", "0",
                               "--batch-size", "16", "--epochs", "1", "--cached-features",
                               "--run-dir", str(tmp_path / "eval")])
    assert "resnet18" in capsys.readouterr().out and 0 <= result["top1"] <= 100
