"""swav.py: Sinkhorn and the swapped-prediction loss against naive loops and hand values, the
queue, frozen prototypes, multi-crop grouping, two processes against one (tests/swav_ddp_check.py),
and the script end to end (synthetic and real JPEGs, linear_eval.py on its checkpoint, exact
resume with the queue in use and the prototypes frozen during the first epoch)."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import UserError
from common.data import build_dataset
from common.augment import ViewPipeline
from common.optim import LARS, param_groups, set_lr
from swav import SwAV, get_args, push_queue, sinkhorn, swav_crops, swav_loss
from tests import swav_ddp_check as ddp
from tests.helpers import (TINY, assert_same_tensors, cifar10_subset, ok, read_log, run,
                           run_until_stopped)


# ---------------------------------------------------------------- Sinkhorn and the loss

def naive_sinkhorn(scores, epsilon, iters):
    """Sinkhorn-Knopp on nested lists, one entry at a time. scores: B lists of K floats."""
    B, K = len(scores), len(scores[0])
    Q = [[math.exp(scores[b][k] / epsilon) for b in range(B)] for k in range(K)]  # K rows
    total = sum(Q[k][b] for k in range(K) for b in range(B))
    Q = [[Q[k][b] / total for b in range(B)] for k in range(K)]
    for _ in range(iters):
        for k in range(K):  # every prototype (row) gets mass 1/K
            row = sum(Q[k])
            Q[k] = [Q[k][b] / row / K for b in range(B)]
        for b in range(B):  # every sample (column) gets mass 1/B
            col = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / col / B
    return [[Q[k][b] * B for k in range(K)] for b in range(B)]


def test_sinkhorn_matches_naive_loop_and_marginals():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)  # cosines
    codes = sinkhorn(scores, 0.05, 3)
    assert codes.shape == (7, 4)
    assert torch.allclose(codes, torch.tensor(naive_sinkhorn(scores.tolist(), 0.05, 3),
                                              dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(codes.sum(dim=1), torch.ones(7, dtype=torch.float64))  # each sample: 1
    # each prototype's mass tends to B/K = 7/4: approximately after 3 iterations, exactly at
    # convergence, and the gap shrinks with the iterations
    gaps = [(sinkhorn(scores, 0.05, it).sum(dim=0) - 7 / 4).abs().max().item()
            for it in (1, 3, 300)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-9, gaps
    # the order of the samples does not matter (what lets each process keep its own queue)
    perm = torch.randperm(7, generator=g)
    assert torch.allclose(sinkhorn(scores[perm], 0.05, 3), codes[perm], rtol=1e-10)
    # by hand: equal scores give uniform codes; a single sample always gets 1/K
    assert torch.allclose(sinkhorn(torch.full((5, 4), 0.3), 0.05, 3), torch.full((5, 4), 0.25))
    assert torch.allclose(sinkhorn(scores[:1], 0.05, 3),
                          torch.full((1, 4), 0.25, dtype=torch.float64))
    # equipartition: both samples prefer prototype 0 (a softmax of scores / eps would give both
    # ~1 there); Sinkhorn sends the weaker one to prototype 1
    both_prefer_0 = sinkhorn(torch.tensor([[1.0, 0.0], [0.5, 0.0]]), 0.05, 3)
    assert both_prefer_0[0, 0] > 0.85 and both_prefer_0[1, 1] > 0.99


def naive_swav_loss(scores, n, temperature, epsilon, iters, queue_scores=None):
    """Crop by crop and sample by sample: codes from the naive Sinkhorn of the assigned crop
    (queue first), cross-entropy with the softmax of every other crop, averaged."""
    crops = scores.shape[0] // n
    total = 0.0
    for a in (0, 1):
        rows = scores[a * n:(a + 1) * n].tolist()
        if queue_scores is not None:
            rows = queue_scores[a].tolist() + rows
        q = naive_sinkhorn(rows, epsilon, iters)[-n:]
        for v in range(crops):
            if v == a:
                continue
            for i in range(n):
                x = scores[v * n + i] / temperature
                log_softmax = x - torch.log(torch.exp(x).sum())
                ce = -sum(q[i][k] * log_softmax[k] for k in range(len(q[i])))
                total = total + ce / n / (crops - 1)
    return total / 2


@pytest.mark.parametrize("with_queue", [False, True])
def test_loss_matches_naive_loop_value_and_gradient(with_queue):
    g = torch.Generator().manual_seed(1)
    n, crops, K = 3, 4, 5
    scores = F.normalize(torch.randn(crops * n, K, generator=g, dtype=torch.float64), dim=1)
    scores.requires_grad_()
    queue_scores = (F.normalize(torch.randn(2, 6, K, generator=g, dtype=torch.float64), dim=2)
                    if with_queue else None)
    fast = swav_loss(scores, n, 0.1, 0.05, 3, queue_scores)
    slow = naive_swav_loss(scores, n, 0.1, 0.05, 3, queue_scores)
    assert torch.allclose(fast, slow, rtol=1e-10), (fast, slow)
    g_fast, = torch.autograd.grad(fast, scores)
    g_slow, = torch.autograd.grad(slow, scores)
    assert torch.allclose(g_fast, g_slow, rtol=1e-9, atol=1e-12)
    if with_queue:  # the queue changes the codes, hence the loss
        assert not torch.allclose(fast, swav_loss(scores, n, 0.1, 0.05, 3), rtol=1e-4)


def test_loss_by_hand():
    # Batch of one: Sinkhorn gives codes 1/K whatever the scores, so with two crops
    #   L = (CE(u, s1 / T) + CE(u, s0 / T)) / 2,  CE(u, x) = logsumexp(x) - mean(x).
    s0, s1 = [0.2, -0.4, 0.6], [0.5, 0.1, -0.3]
    ce = lambda x: math.log(sum(math.exp(v / 0.1) for v in x)) - sum(v / 0.1 for v in x) / 3
    loss = swav_loss(torch.tensor([s0, s1], dtype=torch.float64), 1, 0.1, 0.05, 3)
    assert loss.item() == pytest.approx((ce(s1) + ce(s0)) / 2, rel=1e-12)
    # the codes carry no gradient: only the predicting crop's softmax is differentiated, so
    # dL/ds1 = (softmax(s1 / T) - 1/K) / T / 2
    scores = torch.tensor([s0, s1], dtype=torch.float64, requires_grad=True)
    swav_loss(scores, 1, 0.1, 0.05, 3).backward()
    expect = (torch.softmax(torch.tensor(s1, dtype=torch.float64) / 0.1, 0) - 1 / 3) / 0.1 / 2
    assert torch.allclose(scores.grad[1], expect, rtol=1e-10)


def test_push_queue_newest_first():
    queue = torch.arange(12.0).view(2, 3, 2)                     # [2 crops, 3 rows, D = 2]
    z = torch.tensor([[10.0, 10], [11, 11], [20, 20], [21, 21], [30, 30], [31, 31]])  # 3 crops, n 2
    push_queue(queue, z, 1 * 2)
    # crop 0 rows: the batch's two crop-0 embeddings, then the newest old row (the oldest two go)
    assert queue[0].tolist() == [[10, 10], [11, 11], [0, 1]]
    assert queue[1].tolist() == [[20, 20], [21, 21], [6, 7]]     # crop 2 is never queued


# ---------------------------------------------------------------- frozen prototypes

def test_prototypes_get_gradients_but_stay_frozen_then_move():
    """The order of swav.py's loop (replicated here; the loop is not factored out): normalise,
    forward, loss, backward, drop the prototypes' gradient while step < freeze_steps, LARS step."""
    model = ddp.make_model().float().train()  # SwAV with a small conv backbone, 10 prototypes
    optimizer = LARS(param_groups(model, 1e-6), lr=0.0, momentum=0.9)
    set_lr(optimizer, 0.5)
    weight = model.prototypes.weight
    assert not torch.allclose(weight.norm(dim=1), torch.ones(10))  # not unit before normalising
    crops = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)]
    freeze_steps = 2
    for step in range(3):
        model.normalize_prototypes()
        assert torch.allclose(weight.norm(dim=1), torch.ones(10), atol=1e-6)
        before, conv_before = weight.detach().clone(), model.backbone[0].weight.detach().clone()
        z, scores = model(crops)
        loss = swav_loss(scores, 8, 0.1, 0.05, 3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0  # a normal gradient
        if step < freeze_steps:
            weight.grad = None
        optimizer.step()
        if step < freeze_steps:  # no update, no weight decay, no momentum
            assert torch.equal(weight, before) and weight not in optimizer.state
        else:
            assert not torch.allclose(weight, before) and weight in optimizer.state
        assert not torch.equal(model.backbone[0].weight, conv_before)  # the rest trains


# ---------------------------------------------------------------- multi-crop

def test_multi_crop_views_recipes_and_flag_errors():
    args = get_args(["--data", "synthetic", "--img-size", "32", "--num-crops", "2", "3",
                     "--crop-sizes", "32", "12", "--crop-scales", "0.3", "1", "0.05", "0.2"])
    transform = ViewPipeline(swav_crops(args))
    views = transform(Image.new("RGB", (40, 30), (120, 60, 200)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 3
    assert [r.scale for r in swav_crops(args)] == [(0.3, 1.0)] * 2 + [(0.05, 0.2)] * 3
    # the default collate gives one batched tensor per crop position
    data = build_dataset("synthetic", "ssl", transform, synthetic_size=4, img_size=32)
    crops, _ = next(iter(DataLoader(data, batch_size=2)))
    assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 32)] * 2 + [(2, 3, 12, 12)] * 3

    a = get_args(["--data", "/imagenet"])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.weight_decay) == ("resnet50", 800, 4096, 0.3,
                                                                      1e-6)
    assert (a.warmup_epochs, a.warmup_start_lr, a.final_lr_ratio) == (10, 0.3, 0.001)
    assert (list(a.num_crops), a.crop_sizes, list(a.crop_scales)) == ([2, 6], [224, 96],
                                                                      [0.14, 1.0, 0.05, 0.14])
    assert (a.temperature, a.epsilon, a.sinkhorn_iters, a.num_prototypes) == (0.1, 0.05, 3, 3000)
    assert (a.proj_hidden_dim, a.proj_dim, a.queue_length, a.queue_start_epoch,
            a.freeze_prototypes_epochs) == (2048, 128, 0, 15, 1)
    big = swav_crops(a)
    assert [r.size for r in big] == [224] * 2 + [96] * 6
    assert all(r.blur_p == 0.5 for r in big)
    assert big[0].jitter_p == 0.8 and big[0].jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert get_args(["--data", "/imagenet", "--batch-size", "256"]).queue_length == 3840
    assert get_args(["--data", "/imagenet", "--img-size", "160"]).crop_sizes == [160, 69]
    s = get_args(["--data", "cifar10"])
    assert (s.arch, s.epochs, s.batch_size, s.lr, s.warmup_start_lr) == ("resnet18", 1000, 256,
                                                                         0.6, 0.0)
    assert (list(s.num_crops), s.crop_sizes, list(s.crop_scales)) == ([2], [32], [0.14, 1.0])
    assert (s.queue_length, s.queue_start_epoch, s.freeze_prototypes_epochs) == (3840, 50, 2)
    assert all(r.blur_p == 0.0 for r in swav_crops(s))
    assert get_args(["--data", "cifar10", "--queue-length", "0"]).queue_length == 0
    for bad in (["--num-crops", "2", "6", "--crop-sizes", "224"],          # lengths differ
                ["--num-crops", "2", "6", "--crop-scales", "0.14", "1"],    # one pair for 2 groups
                ["--num-crops", "1", "6"],                                  # crop 1 missing
                ["--crop-scales", "0.5", "0.2", "0.05", "0.14"]):          # MIN > MAX
        with pytest.raises(UserError):
            get_args(["--data", "/imagenet", *bad])


def test_forward_one_backbone_pass_per_resolution_group():
    torch.manual_seed(0)
    model = SwAV("resnet18", small_images=True, hidden_dim=32, out_dim=8, num_prototypes=12).train()
    # a small backbone with BatchNorm, so that the grouping changes the result
    model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 512))
    plain = copy.deepcopy(model)
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    sizes = (16, 16, 8, 8, 8, 16)  # three groups of consecutive equal sizes
    crops = [torch.randn(4, 3, s, s) for s in sizes]
    z, scores = model(crops)
    assert calls == [(8, 3, 16, 16), (12, 3, 8, 8), (4, 3, 16, 16)]
    assert z.shape == (24, 8) and scores.shape == (24, 12)
    assert torch.allclose(z.norm(dim=1), torch.ones(24), atol=1e-6)
    # by hand: each group through the backbone on its own, then projector, norm, prototypes
    groups = [torch.cat(crops[0:2]), torch.cat(crops[2:5]), crops[5]]
    features = torch.cat([plain.backbone(x) for x in groups])
    z_hand = F.normalize(plain.projector(features), dim=1)
    assert torch.allclose(z, z_hand, atol=1e-5)
    assert torch.allclose(scores, z_hand @ plain.prototypes.weight.T, atol=1e-5)
    # control: one pass per crop (BN statistics per crop) gives other embeddings
    per_crop = F.normalize(plain.projector(torch.cat([plain.backbone(c) for c in crops])), dim=1)
    assert not torch.allclose(z, per_crop, atol=1e-3)


# ---------------------------------------------------------------- two processes

@pytest.mark.full
@pytest.mark.parametrize("arch", ["toy", "vit"])
def test_two_processes_equal_one_process(tmp_path, arch):
    out = tmp_path / "swav_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/swav_ddp_check.py", out, arch], timeout=240))
    res = torch.load(out)
    assert res["world"] == 2
    # One process on the whole batch; its queue is the two ranks' halves side by side (Sinkhorn
    # does not care about the order of the samples), each half pushed with its rank's images.
    model = ddp.make_model(arch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ddp.LR)
    N, n, rows = ddp.GLOBAL_BATCH, ddp.GLOBAL_BATCH // 2, ddp.QUEUE // 2
    halves = [ddp.make_queue()[:, r * rows:(r + 1) * rows] for r in range(2)]
    for step, record in enumerate(res["steps"]):
        model.normalize_prototypes()
        z, scores = model(ddp.make_crops(step))
        with torch.no_grad():
            queue_scores = torch.cat(halves, dim=1) @ model.prototypes.weight.T
        loss = swav_loss(scores, N, ddp.TEMPERATURE, ddp.EPSILON, ddp.ITERS, queue_scores)
        optimizer.zero_grad()
        loss.backward()
        assert torch.allclose(record["losses"].mean(), loss, rtol=1e-10)
        assert not torch.allclose(record["losses"][0], record["losses"][1])
        grads = {k: p for k, p in model.named_parameters() if p.requires_grad}
        assert record["grads"].keys() == grads.keys()
        for k, g in record["grads"].items():
            assert torch.allclose(g, grads[k].grad, rtol=1e-5, atol=1e-12), (step, k)
            assert grads[k].grad.abs().sum() > 0, k
        if step == 0:  # CONTROL: Sinkhorn over each rank's own samples gives other gradients
            assert not torch.allclose(res["control"]["losses"].mean(), loss, rtol=1e-4)
            first = ("backbone.encoder.layers.encoder_layer_0.mlp.0.weight" if arch == "vit"
                     else "backbone.0.weight")
            for k in ("prototypes.weight", "projector.0.weight", first):
                assert not torch.allclose(res["control"]["grads"][k], grads[k].grad, rtol=1e-3), k
        halves = [torch.stack([torch.cat([z[a * N + r * n:a * N + (r + 1) * n].detach(),
                                          halves[r][a][:-n]]) for a in (0, 1)]) for r in range(2)]
        optimizer.step()
    assert torch.allclose(res["queues"][0], halves[0], rtol=1e-10)
    assert torch.allclose(res["queues"][1], halves[1], rtol=1e-10)
    assert torch.equal(res["full_queue"], torch.cat(list(res["queues"]), dim=1))  # rank order


# ---------------------------------------------------------------- end to end

MULTI_CROP = ["--num-crops", "2", "2", "--crop-sizes", "16", "8", "--crop-scales", "0.14", "1",
              "0.05", "0.14", "--num-prototypes", "30", "--proj-hidden-dim", "64", "--proj-dim",
              "16", "--queue-start-epoch", "0"]


def initial_prototypes():
    torch.manual_seed(0)  # swav.py seeds 0 + rank before it builds the model
    model = SwAV("resnet18", small_images=True, hidden_dim=64, out_dim=16, num_prototypes=30)
    return F.normalize(model.prototypes.weight.detach(), dim=1)


def test_synthetic_run_with_queue_and_frozen_prototypes_then_linear_eval(tmp_path):
    """Two steps of 32 images: the queue (40 rows rounded down to one batch, 32) fills at step 1
    and joins Sinkhorn at step 2; the lr rises linearly from --warmup-start-lr over the epoch;
    the prototypes stay frozen (the saved ones are the initial ones, normalised)."""
    run_dir = tmp_path / "run"
    proc = ok(run(["swav.py", "--data", "synthetic", *TINY, *MULTI_CROP, "--queue-length", "40",
                   "--warmup-epochs", "1", "--warmup-start-lr", "0.01",
                   "--freeze-prototypes-epochs", "1", "--run-dir", run_dir]))
    assert "--queue-length 40 rounded down to 32" in proc.stdout
    log = read_log(run_dir)
    steps = [r for r in log if "step" in r]
    assert [(r["step"], r["queue"], r["prototypes_frozen"]) for r in steps] == [(1, False, True),
                                                                               (2, True, True)]
    peak = 0.6 * 32 / 256
    assert [r["lr"] for r in steps] == pytest.approx([0.01, 0.01 + (peak - 0.01) / 2], abs=1e-6)
    assert all(0 < r["loss"] < math.log(30) + 20 for r in steps)
    assert log[0]["epoch"] == 0 and "knn_top1" in log[0] and log[-1]["queue"] is True

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (1, 0, "swav")
    assert ckpt["queue"].shape == (2, 32, 16)
    assert torch.allclose(ckpt["queue"].norm(dim=2), torch.ones(2, 32), atol=1e-5)  # all filled
    assert torch.allclose(ckpt["model"]["prototypes.weight"], initial_prototypes(), atol=1e-6)
    proto = ckpt["optimizer"]["param_groups"][0]["params"][-1]  # the last weight: no momentum
    assert proto not in ckpt["optimizer"]["state"] and len(ckpt["optimizer"]["state"]) > 10

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", "synthetic",
            "--synthetic-size", "64", "--workers", "0", "--img-size", "16", "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100
    backbone = torch.load(run_dir / "backbone.pt")
    assert all(torch.equal(backbone[k], ckpt["model"]["backbone." + k]) for k in backbone)


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 4, 2)
    run_dir = tmp_path / "run"
    ok(run(["swav.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "20", "--epochs", "1", "--workers", "0", "--log-every", "1",
            "--num-prototypes", "30", "--proj-hidden-dim", "64", "--run-dir", run_dir]))
    args = json.loads((run_dir / "args.json").read_text())
    assert args["small_images"] and args["num_crops"] == [2] and args["crop_sizes"] == [32]
    assert args["blur_prob"] == 0.0 and args["queue_length"] == 3840 and args["lr"] == 0.6
    log = read_log(run_dir)
    assert [r["step"] for r in log if "step" in r] == [1, 2] and log[-1]["epoch"] == 1
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "2", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly_with_the_queue(tmp_path):
    """2 epochs of 3 steps straight == the same run stopped in epoch 2 (--stop-at-step, as by a stop
    signal) and resumed: weights, optimizer state and the queue (in use from step 3) are bit-
    identical; the prototypes are frozen in epoch 1 only."""
    flags = ["swav.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
             "--synthetic-size", "48", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
             "--knn-every", "0", "--queue-length", "32", "--freeze-prototypes-epochs", "1",
             "--workers", "0",
             *MULTI_CROP]
    straight = tmp_path / "straight"
    ok(run([*flags, "--run-dir", straight]))

    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*flags, "--run-dir", resumed], resumed,
                                after_step=4)  # in epoch 2
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1
    assert stopped["queue"].abs().sum() > 0

    proc = ok(run([*flags, "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert_same_tensors(a["model"], b["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]), i
    assert a["queue"].shape == (2, 32, 16) and torch.equal(a["queue"], b["queue"])
    assert torch.allclose(a["queue"].norm(dim=2), torch.ones(2, 32), atol=1e-5)  # non-zero, full
    # unfrozen in epoch 2: the prototypes (the last weight of LARS's first group) have momentum
    proto = a["optimizer"]["param_groups"][0]["params"][-1]
    assert state_a[proto]["momentum_buffer"].shape == (30, 16)
    assert state_a[proto]["momentum_buffer"].abs().sum() > 0
    for run_dir in (straight, resumed):
        records = [r for r in read_log(run_dir) if "step" in r]
        assert [r["step"] for r in records] == list(range(1, 7))
        assert [r["prototypes_frozen"] for r in records] == [True] * 3 + [False] * 3
        assert [r["queue"] for r in records] == [False] * 2 + [True] * 4
