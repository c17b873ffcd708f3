"""simclr.py and linear_eval.py end to end, by subprocess, as a user runs them."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from common.model import resnet_backbone
from tests.helpers import (REPO, SUBPROCESS_ENV, TINY, assert_same_tensors, cifar10_subset,
                           make_image_folder, ok, read_log, run, run_until_stopped,
                           signal_when_logged)

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_synthetic_run_then_linear_eval(tmp_path):
    run_dir = tmp_path / "run"
    ok(run(["simclr.py", "--data", "synthetic", *TINY, "--run-dir", run_dir]))
    log = read_log(run_dir)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1, 2]  # 64 images / batch 32
    # At initialisation the loss is near its value for uninformative embeddings, 2 log(2N - 1)
    # (without the self-mask it would exceed it; a collapsed or mis-labelled loss falls far below).
    chance = 2 * math.log(2 * 32 - 1)
    assert 0.8 * chance < steps[0]["loss"] < chance + 0.1
    assert log[0]["epoch"] == 0 and "knn_top1" in log[0]
    final = log[-1]
    assert final["epoch"] == 1 and 0 <= final["knn_top1"] <= 100

    args = json.loads((run_dir / "args.json").read_text())
    assert (args["temperature"], args["color_strength"], args["blur_prob"]) == (0.5, 0.5, 0.0)
    assert args["batch_size"] == 32 and args["world_size"] == 1 and args["small_images"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (1, 0, "simclr")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    backbone = resnet_backbone("resnet18", cifar_stem=True)
    backbone.load_state_dict(torch.load(run_dir / "backbone.pt"))  # strict: every key matches

    # kNN in linear_eval.py reproduces the monitor's number for the same backbone and data (and
    # the same batch of 32, so that the features are computed exactly as the monitor's were)
    common = ["--data", "synthetic", "--synthetic-size", "64", "--workers", "0", "--img-size", "16"]
    ok(run(["linear_eval.py", "--ckpt", run_dir / "backbone.pt", *common, "--knn",
            "--batch-size", "32", "--run-dir", tmp_path / "knn"]))
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert knn["knn_top1"] == pytest.approx(final["knn_top1"], abs=1e-6)

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", *common, "--cached-features",
            "--epochs", "30", "--batch-size", "16", "--lr", "1.0", "--out", out,
            "--run-dir", tmp_path / "cached"]))
    cached = json.loads(out.read_text())
    assert cached == json.loads((tmp_path / "cached" / "result.json").read_text())
    assert "after the final epoch" in cached["reported"] and cached["top5"] >= cached["top1"]
    assert cached["top1"] > 20  # 10 classes: a trained head must beat chance on synthetic data

    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", *common, "--epochs", "1",
            "--batch-size", "16", "--run-dir", tmp_path / "linear"]))
    assert json.loads((tmp_path / "linear" / "result.json").read_text())["protocol"] == "linear"


@pytest.mark.full
def test_imagefolder_with_truncated_jpeg_and_torchvision_backbone(tmp_path):
    root = make_image_folder(tmp_path / "images", size=80)
    bad = root / "train" / "class1" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    run_dir = tmp_path / "run"
    proc = ok(run(["simclr.py", "--data", root, "--img-size", "64", "--arch", "resnet18",
                   "--batch-size", "8", "--epochs", "1", "--workers", "0", "--run-dir", run_dir]))
    assert f"unreadable image {bad}" in proc.stderr
    assert (run_dir / "bad_images.txt").read_text().split() == [str(bad)]
    assert read_log(run_dir)[-1]["bad_images"] == 1

    # 64 px selects the small-image stem; a 72 px run uses the ImageNet stem, whose backbone.pt
    # loads into a stock torchvision ResNet with only fc.* missing.
    run_dir = tmp_path / "run72"
    ok(run(["simclr.py", "--data", root, "--img-size", "72", "--arch", "resnet18",
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--knn-every", "0",
            "--run-dir", run_dir]))
    assert json.loads((run_dir / "args.json").read_text())["blur_prob"] == 0.5  # ImageNet recipe
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load(run_dir / "backbone.pt"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    # A small class-balanced subset of the real JPEG tree, linked (not copied).
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 20, 10)
    run_dir = tmp_path / "run"
    ok(run(["simclr.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "50", "--epochs", "1", "--workers", "0", "--run-dir", run_dir]))
    log = read_log(run_dir)
    assert len([r for r in log if "step" in r]) == 0 and log[-1]["epoch"] == 1  # 4 steps < log-every
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "5", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


# 2 processes, 160 images, global batch 32: 5 steps per epoch
TWO_PROCESSES = [*TORCHRUN, "simclr.py", "--data", "synthetic", *TINY, "--synthetic-size", "160",
                 "--epochs", "2"]


@pytest.fixture(scope="module")
def torchrun_run(module_tmp):
    run_dir = module_tmp("torchrun") / "run"
    return run_dir, ok(run([*TWO_PROCESSES, "--run-dir", run_dir], timeout=300))


@pytest.mark.full
def test_torchrun_two_processes(torchrun_run):
    run_dir, proc = torchrun_run
    assert proc.stdout.count("simclr, 2 process(es)") == 1  # rank 0 alone prints
    args = json.loads((run_dir / "args.json").read_text())
    assert args["world_size"] == 2
    # the global batch of 32 is split in two: 160 images still take 5 steps per epoch
    assert [r["step"] for r in read_log(run_dir) if "step" in r] == list(range(1, 11))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_interrupted_run_resumes_exactly(tmp_path):
    """2 epochs straight == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal)
    and resumed (and the interrupted run uses 2 loader workers, the straight one none: augmentations
    match anyway)."""
    flags = ["simclr.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
             "--synthetic-size", "64", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
             "--knn-every", "0"]
    straight = tmp_path / "straight"
    ok(run([*flags, "--workers", "0", "--run-dir", straight]))

    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*flags, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=5)  # in epoch 2
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1

    proc = ok(run([*flags, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert_same_tensors(a["model"], b["model"])
    # the log keeps the lines written before the stop, and the steps are continuous
    steps = [r["step"] for r in read_log(resumed) if "step" in r]
    assert steps == list(range(1, 9))
    # the same command once more: it says the run is complete, and changes nothing
    assert "complete" not in proc.stdout
    again = ok(run([*flags, "--workers", "0", "--run-dir", straight]))
    assert "resumed from" in again.stdout and "the run is complete, nothing to train" in again.stdout
    assert_same_tensors(a["model"], torch.load(straight / "checkpoint.pt", weights_only=False)["model"])
    assert [r["step"] for r in read_log(straight) if "step" in r] == list(range(1, 9))


def test_a_stop_signal_to_every_process_of_a_run_saves(tmp_path):
    """Slurm signals every process of a job step, loader workers included: SIGUSR1 to the whole
    process group of a run with 2 loader workers stops it cleanly, saved where its log ends. The
    run is long (200 steps) and the signal is sent once step 1 is logged, so that it arrives
    long before the run's end however busy the machine is."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "simclr.py", "--data", "synthetic", *TINY,
                             "--epochs", "50", "--workers", "2", "--knn-every", "0",
                             "--checkpoint-every", "50", "--run-dir", str(run_dir)],
                            cwd=REPO, env={**os.environ, **SUBPROCESS_ENV}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, as a job step
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(r.get("step") for r in (
                read_log(run_dir) if (run_dir / "log.jsonl").exists() else [])):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGUSR1)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "stop signal: saved" in output, output
    assert "Traceback" not in output, output  # no worker died of the signal
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    position = ckpt["epoch"] * 2 + ckpt["batch_in_epoch"]  # 2 steps per epoch
    assert 1 <= position < 100
    assert [r["step"] for r in read_log(run_dir) if "step" in r] == list(range(1, position + 1))


@pytest.mark.slow
def test_learns_on_real_cifar10(tmp_path, cifar10_dir):
    """Opt-in (`pytest -m slow`, ~25 min on 2 cores): 3 epochs on 5,000 real CIFAR-10 training
    images raise kNN top-1 on the full val split above the random-initialisation value
    (measured: 27.5% -> 33.4%)."""
    root = tmp_path / "cifar10"
    for cls in sorted(os.listdir(cifar10_dir / "train")):
        (root / "train" / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar10_dir / "train" / cls))[:500]:
            os.symlink(cifar10_dir / "train" / cls / name, root / "train" / cls / name)
    os.symlink(cifar10_dir / "val", root / "val")
    run_dir = tmp_path / "run"
    ok(run(["simclr.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "256", "--epochs", "3", "--warmup-epochs", "1", "--workers", "2",
            "--knn-every", "3", "--run-dir", run_dir], timeout=3600))
    log = read_log(run_dir)
    start, end = log[0]["knn_top1"], log[-1]["knn_top1"]
    assert end > start + 2, (start, end)


def test_stop_signal_in_one_step_epochs(tmp_path, monkeypatch):
    """Epochs of a single step: the check inside an epoch skips its last step (so that a stop
    there is taken after the epoch's summary and checkpoint, never as a checkpoint at the very
    end of an epoch that a resumed run would replay as an empty epoch with loss 0), so the stop is
    taken once the epoch is saved. In-process, with the signal sent by the loader's iterator while
    it hands out epoch 2's batch; then the run resumes and ends exactly as an uninterrupted one."""
    import simclr
    from common.log import Progress

    epochs_started = []

    class SignalInEpochTwo(Progress):
        def __iter__(self):
            epochs_started.append(True)
            for item in super().__iter__():
                if len(epochs_started) == 2:
                    os.kill(os.getpid(), signal.SIGUSR1)
                yield item

    flags = ["--data", "synthetic", *TINY, "--synthetic-size", "32", "--epochs", "3",
             "--knn-every", "0"]  # 32 images, batch 32: one step per epoch
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        simclr.main([*flags, "--run-dir", str(tmp_path / "straight")])
        run_dir = tmp_path / "resumed"
        monkeypatch.setattr("common.run.Progress", SignalInEpochTwo)
        simclr.main([*flags, "--run-dir", str(run_dir)])
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
        assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0)
        assert [r["epoch"] for r in read_log(run_dir) if "step" not in r] == [1, 2]

        monkeypatch.setattr("common.run.Progress", Progress)
        simclr.main([*flags, "--run-dir", str(run_dir)])  # resumes at epoch 3
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    summaries = [r for r in read_log(run_dir) if "step" not in r]
    assert [r["epoch"] for r in summaries] == [1, 2, 3]
    assert [r["step"] for r in read_log(run_dir) if "step" in r] == [1, 2, 3]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert_same_tensors(a["model"], b["model"])
    assert [r["loss"] for r in summaries] == [r["loss"] for r in read_log(tmp_path / "straight")
                                               if "step" not in r]


@pytest.mark.full
def test_stop_signal_in_five_step_epochs_two_processes(torchrun_run, tmp_path):
    """2 processes agree on a stop every 10 steps: in epochs of 5 steps they never would inside
    an epoch. SIGTERM to torchrun is taken after the epoch; the resumed run ends exactly as the
    uninterrupted one above."""
    straight, run_dir = torchrun_run[0], tmp_path / "resumed"
    # sent once the random network's kNN and step 1 are logged: in epoch 1
    _, output = signal_when_logged([*TWO_PROCESSES, "--run-dir", run_dir], run_dir,
                                   lambda log: len(log) >= 2)
    assert "stop signal: saved" in output and "done:" not in output, output
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 0), output
    assert [r["step"] for r in read_log(run_dir) if "step" in r] == [1, 2, 3, 4, 5]

    ok(run([*TWO_PROCESSES, "--run-dir", run_dir], timeout=300))
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (b["epoch"], b["batch_in_epoch"]) == (2, 0)
    assert_same_tensors(a["model"], b["model"])
    # the same log record for record (per-step losses, epoch means, kNN), but for the timings
    untimed = lambda d: [{k: v for k, v in r.items() if k not in ("img_per_s", "epoch_time")}
                         for r in read_log(d)]
    assert untimed(run_dir) == untimed(straight)


def test_multi_crop_step_one_loss(tmp_path, monkeypatch):
    """--num-crops 2 2 --crop-sizes 16 8, in-process: the step-1 loss in log.jsonl equals the
    loss recomputed here from the same initial weights and the same crops, each resolution through
    the backbone as one batch, the projector over all crops, and the naive loop of VISSL's loss."""
    import simclr
    from tests.test_simclr_multicrop import naive_multi_crop

    seen = {}

    class Recording(simclr.SimCLR):
        def forward(self, crops):
            if not seen:  # step 1: the weights and BN statistics before the forward
                seen["state"] = {k: v.clone() for k, v in self.state_dict().items()}
                seen["crops"] = [x.clone() for x in crops]
            return super().forward(crops)

    monkeypatch.setattr(simclr, "SimCLR", Recording)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        simclr.main(["--data", "synthetic", *TINY, "--synthetic-size", "32", "--knn-every", "0",
                     "--num-crops", "2", "2", "--crop-sizes", "16", "8",
                     "--crop-scales", "0.14", "1", "0.05", "0.14", "--run-dir", str(tmp_path)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    logged = [r for r in read_log(tmp_path) if "step" in r][0]["loss"]

    crops = seen["crops"]
    assert [tuple(x.shape) for x in crops] == [(32, 3, 16, 16)] * 2 + [(32, 3, 8, 8)] * 2
    model = simclr.SimCLR("resnet18", small_images=True)  # the args' defaults: 2 layers, 128
    model.load_state_dict(seen["state"])
    model.train()
    with torch.no_grad():
        features = [model.backbone(torch.cat(crops[:2])), model.backbone(torch.cat(crops[2:]))]
        z = model.projector(torch.cat(features)).double()
    expected = naive_multi_crop(z, 4, temperature=0.5).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    # Uninformative embeddings give each (anchor, positive) pair 1 positive + 4 x 31 negatives in
    # its denominator: 2 log(125) = 9.66; a random network is near it (measured: 9.65).
    chance = 2 * math.log(4 * 31 + 1)
    assert 0.8 * chance < logged < chance + 0.1
