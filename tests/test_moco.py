"""moco.py: the loss, the momentum update, shuffle/split BN, the queue (one process and 2 gloo
processes), bad queue sizes, end to end with linear_eval.py, real JPEGs, and exact resume."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moco
from common.data import build_dataset, make_loader
from common.augment import ViewPipeline
from common.model import resnet_backbone
from tests import moco_ddp_check as ddp
from tests.helpers import (TINY, assert_same_tensors, cifar10_subset, ok, read_log, run,
                           run_until_stopped)


def naive_moco_loss(q, k, queue, temperature):
    """The same InfoNCE written with explicit sums, one sample at a time."""
    total = 0.0
    for i in range(len(q)):
        qi = [v / math.sqrt(sum(x * x for x in q[i].tolist())) for v in q[i].tolist()]
        pos = sum(a * b for a, b in zip(qi, k[i].tolist())) / temperature
        negs = [sum(a * b for a, b in zip(qi, row.tolist())) / temperature for row in queue]
        total += -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    return total / len(q)


def test_loss_naive_hand_value_and_stop_gradient():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    loss = moco.moco_loss(q, k, queue, 0.2)
    assert loss.item() == pytest.approx(naive_moco_loss(q, k, queue, 0.2), rel=1e-5)
    # invariances: the order of the queue and the order of the (query, key) pairs
    perm = torch.randperm(5, generator=g)
    assert torch.allclose(moco.moco_loss(q[perm], k[perm], queue.flip(0), 0.2), loss)

    # By hand, T = 0.5, queue rows (0, 1) and (-1, 0):
    #   q = (3, 0) -> unit (1, 0), key (1, 0): logits (2, 0, -2), loss log(1 + e^-2 + e^-4)
    #   q = (0, 2) -> unit (0, 1), key (0, 1): logits (2, 2, 0),  loss log(2 + e^-2)
    q = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    hand = (math.log(1 + math.exp(-2) + math.exp(-4)) + math.log(2 + math.exp(-2))) / 2
    assert moco.moco_loss(q, k, queue, 0.5).item() == pytest.approx(hand, rel=1e-6)

    # the keys and the queue are constants of the loss: no gradient reaches them
    q, k, queue = q.requires_grad_(), k.requires_grad_(), queue.requires_grad_()
    moco.moco_loss(q, k, queue, 0.5).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


class Tiny(nn.Module):
    """The four parts momentum_update reads, as single linear layers."""

    def __init__(self):
        super().__init__()
        self.backbone, self.projector = nn.Linear(3, 2), nn.Linear(2, 1)
        self.key_backbone, self.key_projector = nn.Linear(3, 2), nn.Linear(2, 1)


def test_momentum_update_by_hand():
    tiny = Tiny()
    with torch.no_grad():
        for p in [*tiny.backbone.parameters(), *tiny.projector.parameters()]:
            p.fill_(1.0)
        for p in [*tiny.key_backbone.parameters(), *tiny.key_projector.parameters()]:
            p.fill_(3.0)
    moco.MoCo.momentum_update(tiny, 0.75)
    for p in [*tiny.key_backbone.parameters(), *tiny.key_projector.parameters()]:
        assert torch.equal(p, torch.full_like(p, 2.5))  # 0.75 * 3 + 0.25 * 1
    for p in [*tiny.backbone.parameters(), *tiny.projector.parameters()]:
        assert torch.equal(p, torch.ones_like(p))  # the query encoder is unchanged

    # random values, element by element, twice: theta_k <- m theta_k + (1 - m) theta_q
    torch.manual_seed(0)
    tiny = Tiny()
    pairs = [(tiny.key_backbone.weight, tiny.backbone.weight),
             (tiny.key_backbone.bias, tiny.backbone.bias),
             (tiny.key_projector.weight, tiny.projector.weight),
             (tiny.key_projector.bias, tiny.projector.bias)]
    expected = [pk.detach().clone() for pk, _ in pairs]
    for _ in range(2):
        for e, (_, pq) in zip(expected, pairs):
            for j in range(e.numel()):
                e.view(-1)[j] = 0.9 * e.view(-1)[j] + 0.1 * pq.view(-1)[j]
        moco.MoCo.momentum_update(tiny, 0.9)
    for e, (pk, _) in zip(expected, pairs):
        assert torch.allclose(pk, e, atol=1e-7)


def test_split_batchnorm_equals_bn_per_group():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 3) * 2 + 1
    split = moco.SplitBatchNorm(5, splits=3)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2)
        split.bias.uniform_(-1, 1)
    y = split(x)
    for s in range(3):  # group s: samples s, s + 3, s + 6, s + 9
        ref = F.batch_norm(x[s::3], None, None, split.weight, split.bias, True, 0.0, split.eps)
        assert torch.allclose(y[s::3], ref, atol=1e-5)
    # running statistics: the average over the groups of the momentum-0.1 update from (0, 1)
    means = torch.stack([x[s::3].mean((0, 2, 3)) for s in range(3)])
    variances = torch.stack([x[s::3].var((0, 2, 3), unbiased=True) for s in range(3)])
    assert torch.allclose(split.running_mean, 0.1 * means.mean(0), atol=1e-6)
    assert torch.allclose(split.running_var, 0.9 + 0.1 * variances.mean(0), atol=1e-5)
    split.eval()  # eval: plain BN with the running statistics
    mean, var = split.running_mean[:, None, None], split.running_var[:, None, None]
    expect = (x - mean) / (var + split.eps).sqrt() * split.weight[:, None, None]
    assert torch.allclose(split(x), expect + split.bias[:, None, None], atol=1e-5)


def naive_keys(plain, x, seed, groups):
    """Keys of x with shuffle BN written out: permute, encode each BN group separately with
    plain BN, normalise, and put each key back at its image's place with a loop."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    shuffled = x[perm]
    k_shuffled = torch.empty(len(x), plain.projector[-1].out_features)
    with torch.no_grad():
        for s in range(groups):
            k_shuffled[s::groups] = plain.key_projector(plain.key_backbone(shuffled[s::groups]))
    keys = torch.empty_like(k_shuffled)
    for j in range(len(x)):
        keys[perm[j]] = F.normalize(k_shuffled[j], dim=0)
    return keys


def test_keys_shuffle_bn_and_no_gradient_to_key_encoder():
    torch.manual_seed(0)
    model = moco.MoCo("resnet18", small_images=True, out_dim=16, queue_size=16, bn_splits=4).train()
    plain = moco.MoCo("resnet18", small_images=True, out_dim=16, queue_size=16, bn_splits=1).train()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    with torch.no_grad():  # make the key encoder differ from the query encoder
        for p in [*model.key_backbone.parameters(), *model.key_projector.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    plain.load_state_dict(model.state_dict())
    k = model.keys(x2, seed=7)
    assert torch.allclose(k, naive_keys(plain, x2, 7, 4), atol=1e-5)
    assert not torch.allclose(k, naive_keys(plain, x2, 8, 4), atol=1e-3)  # the shuffle matters

    key_before = {n: p.clone() for n, p in model.named_parameters() if n.startswith("key_")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = moco.moco_loss(model(x1)[0], k, model.queue, 0.2)
    loss.backward()
    optimizer.step()
    assert not k.requires_grad
    for n, p in model.named_parameters():
        if n.startswith("key_"):
            assert not p.requires_grad and p.grad is None, n
            assert torch.equal(p, key_before[n]), n
        else:
            assert p.grad is not None, n
    assert not torch.equal(model.backbone.conv1.weight, key_before["key_backbone.conv1.weight"])


def test_queue_holds_the_last_keys_in_order():
    model = moco.MoCo("resnet18", small_images=True, out_dim=4, queue_size=12)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(5)]
    for keys in batches:
        model.enqueue(keys)
    expected, ptr = model.queue.clone().zero_(), 0
    for key in torch.cat(batches):  # a ring buffer, one key at a time
        expected[ptr] = key
        ptr = (ptr + 1) % 12
    assert int(model.queue_ptr) == ptr == 8
    assert torch.equal(model.queue, expected)
    # read from the pointer on, the queue is the last 12 keys, oldest first
    assert torch.equal(model.queue.roll(-ptr, dims=0), torch.cat(batches)[-12:])


class DemoMoCo:
    """The training step of the official CIFAR-10 demo (facebookresearch/moco, branch
    colab-notebook, colab/moco_cifar10_demo.ipynb: ModelMoCo's forward, contrastive_loss,
    _momentum_update_key_encoder, _batch_shuffle_single_gpu, _dequeue_and_enqueue; its train loop:
    SGD, zero_grad, backward, step), written from it around given encoders, with its own queue of
    columns [D, K]. Its shuffles are torch.randperm from the global generator: here the
    permutations are handed in, so that both sides shuffle alike."""

    def __init__(self, encoder_q, encoder_k, queue_rows, m, T, symmetric):
        self.encoder_q, self.encoder_k, self.m, self.T = encoder_q, encoder_k, m, T
        self.symmetric, self.queue, self.ptr = symmetric, queue_rows.T.clone(), 0

    def contrastive_loss(self, im_q, im_k, idx_shuffle):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = nn.functional.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels), q, k

    def forward(self, im1, im2, perms):
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1. - self.m)
        if self.symmetric:
            loss_12, q1, k2 = self.contrastive_loss(im1, im2, perms[0])
            loss_21, q2, k1 = self.contrastive_loss(im2, im1, perms[1])
            loss, k = loss_12 + loss_21, torch.cat([k1, k2], dim=0)
        else:
            loss, q, k = self.contrastive_loss(im1, im2, perms[0])
        self.queue[:, self.ptr:self.ptr + k.shape[0]] = k.t()
        self.ptr = (self.ptr + k.shape[0]) % self.queue.shape[1]
        return loss


@pytest.mark.parametrize("symmetric", [False, True])
def test_steps_equal_the_official_cifar10_demo(symmetric):
    """Three SGD steps of moco.py's loop (the demo's recipe: lr 0.06, momentum 0.9, wd 5e-4,
    m 0.99, T 0.1; split BN) and of the demo's ModelMoCo on the same batches, each step from
    the same state: the same losses, query gradients, key encoder, queue and pointer after every
    step, with one loss direction or both (summed, as the demo's --symmetric). (Each step starts
    the demo from moco.py's state: with 4 images per BN group, float rounding of 1e-7 in the
    weights grows to percents in some gradients within 3 steps, in either implementation.)"""
    torch.manual_seed(0)
    ours = moco.MoCo("resnet18", small_images=True, out_dim=16, queue_size=32, bn_splits=2).train()
    encoders = copy.deepcopy(ours)
    demo = DemoMoCo(nn.Sequential(encoders.backbone, encoders.projector),
                    nn.Sequential(encoders.key_backbone, encoders.key_projector),
                    ours.queue, m=0.99, T=0.1, symmetric=symmetric)
    sgd = dict(lr=0.06, momentum=0.9, weight_decay=5e-4)
    ours_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], **sgd)
    demo_opt = torch.optim.SGD(demo.encoder_q.parameters(), **sgd)
    for step in range(3):
        encoders.load_state_dict(ours.state_dict())  # the same state: weights, BN statistics
        demo.queue.copy_(ours.queue.T)
        demo_opt.load_state_dict(ours_opt.state_dict())  # momentum buffers, in the same order
        x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        seed = 100 + 2 * step  # moco.py's keys(x2, seed), keys(x1, seed + 1)
        perms = [torch.randperm(8, generator=torch.Generator().manual_seed(s))
                 for s in (seed, seed + 1)]
        ours.momentum_update(0.99)  # moco.py's loop, in its order
        q = ours(x1, x2) if symmetric else ours(x1)
        k2 = ours.keys(x2, seed)
        k1 = ours.keys(x1, seed + 1) if symmetric else None
        loss = moco.moco_loss(q[0], k2, ours.queue, 0.1)
        if symmetric:
            loss = loss + moco.moco_loss(q[1], k1, ours.queue, 0.1)
        ours_opt.zero_grad()
        loss.backward()
        demo_loss = demo.forward(x1, x2, perms)
        demo_opt.zero_grad()
        demo_loss.backward()
        assert loss.item() == pytest.approx(demo_loss.item(), abs=1e-5), step
        for (name, a), b in zip([(n, p) for n, p in ours.named_parameters() if p.requires_grad],
                                demo.encoder_q.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5), (step, name)
        ours_opt.step()
        demo_opt.step()
        ours.enqueue(torch.cat([k1, k2]) if symmetric else k2)
        assert torch.allclose(ours.queue, demo.queue.T, atol=1e-5), step
        assert int(ours.queue_ptr) == demo.ptr
        keys = [*ours.key_backbone.parameters(), *ours.key_projector.parameters()]
        for a, b in zip(keys, demo.encoder_k.parameters()):
            assert torch.allclose(a, b, atol=1e-5), step


@pytest.mark.full
def test_queue_with_two_processes(tmp_path):
    out = tmp_path / "moco_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/moco_ddp_check.py", out], timeout=240))
    res = torch.load(out)
    assert res["world"] == 2
    queues, ptrs = res["queues"], res["ptrs"]
    assert torch.equal(queues[0], queues[1]) and ptrs.tolist() == [8, 8]  # same on every rank

    # Recompute every step's global keys in one process: the global batch of 8 is permuted,
    # rank r encodes the slice perm[4r:4r+4] with its own BN, keys are put back in image order.
    plain = ddp.make_model().train()
    ring, control = [], []
    for step, (snapshot, x2) in enumerate(zip(res["snapshots"], res["views"])):
        plain.load_state_dict(snapshot, strict=False)
        ring.append(keys_two_ranks(plain, x2, ddp.shuffle_seed(step)))
        with torch.no_grad():  # control: no shuffle, each rank normalises its own images
            control.append(torch.cat([F.normalize(plain.key_projector(plain.key_backbone(
                x2[r * 4:(r + 1) * 4])), dim=1) for r in range(2)]))
    keys = torch.cat(ring)  # [24, D]: 3 steps of 8 global keys, rank 0's first in each
    expected = torch.cat([keys[16:24], keys[8:16]])  # K = 16: step 3 overwrote step 1's rows
    assert torch.allclose(queues[0], expected, atol=1e-5)
    assert torch.allclose(queues[0].roll(-8, dims=0), keys[-16:], atol=1e-5)  # oldest first
    assert not torch.allclose(queues[0][8:], torch.cat(control)[8:16], atol=1e-3)


def keys_two_ranks(plain, x, seed, world=2):
    """Shuffle BN over `world` ranks written out: permute the global batch, encode each rank's
    slice with its own BN statistics, normalise, put each key back at its image's place."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = len(x) // world
    keys = torch.empty(len(x), plain.projector[-1].out_features)
    with torch.no_grad():
        for r in range(world):
            k = plain.key_projector(plain.key_backbone(x[perm[r * n:(r + 1) * n]]))
            k = F.normalize(k, dim=1)
            for j in range(n):
                keys[perm[r * n + j]] = k[j]
    return keys


def one_error_line(proc, fragment):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_queue_size_not_a_multiple_of_the_global_batch(tmp_path):
    proc = run(["moco.py", "--data", "synthetic", *TINY, "--queue-size", "48",
                "--run-dir", tmp_path / "run"], timeout=120)
    one_error_line(proc, "--queue-size 48 is not a multiple of the 32 keys")
    assert not (tmp_path / "run").exists()  # checked before anything starts


def test_symmetric_needs_a_multiple_of_twice_the_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # in-process: main() exits like the script
        moco.main(["--data", "synthetic", *TINY, "--queue-size", "32", "--symmetric",
                   "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --queue-size 32 is not a multiple of the 64 keys"), err


# One 2-epoch run on synthetic data serves the end-to-end checks and is the uninterrupted
# reference of the resume test: 24 images, batch 8 in 2 BN groups, 3 steps per epoch, K = 24.
FLAGS = ["moco.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
         "--synthetic-size", "24", "--batch-size", "8", "--bn-splits", "2", "--queue-size", "24",
         "--epochs", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def straight_run(module_tmp):
    run_dir = module_tmp("moco") / "straight"
    ok(run([*FLAGS, "--workers", "0", "--run-dir", run_dir]))
    return run_dir


def test_synthetic_run_then_linear_eval(straight_run, tmp_path):
    log = read_log(straight_run)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert log[0]["epoch"] == 0 and "knn_top1" in log[0]
    assert log[-1]["epoch"] == 2 and 0 <= log[-1]["knn_top1"] <= 100 and "pos_sim" in log[-1]
    # Step 1 contrasts with random unit vectors, easy negatives: the loss is near 0 (a wrong
    # label would make it large). The keys of an untrained network are alike, so once real keys
    # fill the queue the loss is of the order of chance, log(1 + K).
    assert steps[0]["loss"] < 0.5 and max(r["loss"] for r in steps[1:]) > 1.0

    args = json.loads((straight_run / "args.json").read_text())
    assert (args["temperature"], args["queue_size"], args["moco_momentum"]) == (0.1, 24, 0.99)
    assert (args["blur_prob"], args["bn_splits"], args["symmetric"]) == (0.0, 2, False)
    ckpt = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (2, 0, "moco")
    state = ckpt["model"]
    assert state["queue"].shape == (24, 128) and int(state["queue_ptr"]) == 0  # 6 x 8 keys
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(24), atol=1e-5)
    assert not torch.equal(state["backbone.conv1.weight"], state["key_backbone.conv1.weight"])
    backbone = resnet_backbone("resnet18", cifar_stem=True)
    backbone.load_state_dict(torch.load(straight_run / "backbone.pt"))  # strict: every key

    # The last step (6, epoch 2) wrote rows 16..23: recompute its keys outside the script, from
    # the same seeded views, the saved key encoder (the last momentum update precedes those
    # keys), plain BN per group of 4 and the permutation of step index 5, seed (0 + 5) * 2.
    margs = moco.get_args(FLAGS[1:])
    two_views = ViewPipeline([moco.moco_view(margs)] * 2)
    views = build_dataset("synthetic", "ssl", two_views, synthetic_size=24, img_size=16)
    loader = make_loader(views, 8, 0, seed=0, seeded=True)
    loader.sampler.set_epoch(1)
    (_, x2), _ = list(loader)[-1]
    (x2,) = two_views.to_device([x2], torch.device("cpu"))
    plain = moco.MoCo("resnet18", small_images=True, queue_size=24).train()
    plain.load_state_dict(state)
    assert torch.allclose(state["queue"][16:], naive_keys(plain, x2, 10, groups=2), atol=1e-5)

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", straight_run / "checkpoint.pt", "--data", "synthetic",
            "--synthetic-size", "64", "--img-size", "16", "--workers", "0", "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 8, 4)
    run_dir = tmp_path / "run"
    ok(run(["moco.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "40", "--queue-size", "80", "--epochs", "1", "--workers", "0",
            "--log-every", "1", "--knn-every", "0", "--run-dir", run_dir]))
    log = read_log(run_dir)
    assert [r["step"] for r in log if "step" in r] == [1, 2]  # 80 images / 40
    assert json.loads((run_dir / "args.json").read_text())["bn_splits"] == 8  # one process
    assert int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]["queue_ptr"]) == 0
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "2", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly(straight_run, tmp_path):
    """The straight run == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal) and
    resumed: query and key encoders, queue and pointer bit for bit. The interrupted run uses 2
    loader workers, the straight one none: this changes the draws from the global RNG, which the key
    shuffle must not depend on."""
    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*FLAGS, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=4)  # in epoch 2
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] in (1, 2)  # mid-epoch

    proc = ok(run([*FLAGS, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    method_state = {"queue", "queue_ptr", "key_backbone.conv1.weight", "key_projector.2.bias"}
    assert method_state <= set(a["model"])
    assert_same_tensors(a["model"], b["model"])
    # 6 steps x 8 keys into K = 24: the pointer is at 48 mod 24 = 0, and the queue moved on
    # after the stop (the comparison is not between two copies of the stopped state)
    assert int(a["model"]["queue_ptr"]) == 0 and int(stopped["model"]["queue_ptr"]) != 0
    assert not torch.equal(a["model"]["queue"], stopped["model"]["queue"])
    records = [r for r in read_log(resumed) if "step" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    # m is constant: the same value at k = 0, K/2 and K
    assert [records[i]["momentum"] for i in (0, 2, 5)] == [0.99] * 3
