"""Long runs that cannot silently go wrong: a diverged run stops without saving over its last good
checkpoint; a run directory belongs to one run (another method or changed settings are refused,
--allow-changes accepts them); a failed save (full disk, read-only folder) is one line and keeps
the previous checkpoint; and the smaller guards (--peak-lr, MoCo's split BN with SyncBN, --arch
checked before the data, checkpoints that pickle an argparse.Namespace).

The scripts run in-process (their main(argv)), on tiny settings, to keep this file fast."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import byol
import common.checkpoint as checkpoint
import linear_eval
import moco
import simclr
from common.errors import Diverged, UserError
from common.run import DivergenceGuard, Run, StopSignal
from tests.helpers import REPO, SUBPROCESS_ENV, TINY, assert_same_tensors, ok, read_log, run

# SimCLR with plain SGD and no warmup: 2 steps per epoch on 32 synthetic images
SGD = ["--data", "synthetic", *TINY, "--synthetic-size", "32", "--batch-size", "16",
       "--optimizer", "sgd", "--warmup-epochs", "0", "--knn-every", "0"]


def main_exit(main, argv, capsys):
    """Run a script's main in-process; return (exit code, the stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return stop.value.code, err


def one_line(err, *fragments):
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def files(run_dir):
    return {name: (Path(run_dir) / name).read_bytes() for name in ("checkpoint.pt", "backbone.pt")}


# ---------------------------------------------------------------- the divergence guard

def guard_for(precision="fp32", steps_per_epoch=10, model=None, run_dir="."):
    args = Namespace(precision=precision, run_dir=str(run_dir))
    return DivergenceGuard(args, model or nn.Linear(2, 2), steps_per_epoch, torch.device("cpu"))


def test_guard_names_the_first_non_finite_step_and_its_loss(tmp_path):
    guard = guard_for(run_dir=tmp_path)
    for step, loss in enumerate([2.0, 1.5, float("nan"), float("inf"), 1.0]):
        guard.watch(torch.tensor(loss), step)
    with pytest.raises(Diverged) as e:
        guard.check()
    # step 2 (0-based) is the log's step 3: epoch 1, its third batch
    assert "loss nan at step 3 (epoch 1, batch 3)" in str(e.value)
    assert "no checkpoint had been saved yet" in str(e.value) and e.value.exit_code == 3
    marker = json.loads((tmp_path / "diverged.json").read_text())
    assert marker["checkpoint"] is None and marker["args"]["precision"] == "fp32"


def test_guard_quiet_on_finite_losses_and_fp16_isolated_skips(tmp_path):
    guard = guard_for(run_dir=tmp_path)
    for step in range(30):
        guard.watch(torch.tensor(1.0 / (step + 1)), step)
    guard.check()
    guard.check(epoch=3, batch_in_epoch=0)  # a finite model may be saved
    assert guard.saved == (3, 0)
    # fp16: GradScaler skips a step with a non-finite loss; 19 in a row are tolerated ...
    guard = guard_for("fp16", run_dir=tmp_path)
    losses = [1.0] * 5 + [float("inf")] * 19 + [1.0] + [float("nan")] * 19 + [1.0]
    for step, loss in enumerate(losses):
        guard.watch(torch.tensor(loss), step)
    guard.check()
    # ... 20 are not, and the line names the first of them
    for step in range(len(losses), len(losses) + 20):
        guard.watch(torch.tensor(float("nan")), step)
    with pytest.raises(Diverged, match=f"loss nan at step {len(losses) + 1} .* the 19 steps"):
        guard.check()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_guard_before_a_save_checks_weights_and_buffers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    guard = guard_for(model=model, run_dir=tmp_path)
    guard.watch(torch.tensor(0.5), 0)
    guard.check()  # the log interval looks at the losses only
    model[1].running_var[1] = float("nan")
    guard.check()
    with pytest.raises(Diverged, match=r"\(1.running_var\) after epoch 1, batch 0"):
        guard.check(epoch=1, batch_in_epoch=0)


def test_fp16_grad_scaler_skipped_steps_do_not_trigger(tmp_path):
    # a scale so large that every scaled gradient overflows: GradScaler skips each update
    # (the weights stay) while the loss itself is finite, as in fp16's first steps
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=10**6)
    guard = guard_for("fp16", model=model, run_dir=tmp_path)
    for step in range(8):
        loss = model(1e6 * torch.randn(8, 4)).pow(2).mean()  # gradients ~1e12 x 2^127: inf
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        guard.watch(loss, step)
    assert scaler.get_scale() == 2.0 ** (127 - 8)  # it skipped every step, backing off
    guard.check(epoch=1, batch_in_epoch=0)
    assert_same_tensors(model.state_dict(), before)


def test_diverged_run_keeps_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    simclr.main([*SGD, "--lr", "0.1", "--run-dir", str(run_dir)])  # epoch 1: finite
    good = files(run_dir)
    capsys.readouterr()
    # the same run, continued with a rate that blows it up
    diverge = [*SGD, "--lr", "1e12", "--epochs", "3", "--run-dir", str(run_dir),
               "--allow-changes", "lr", "epochs"]
    code, err = main_exit(simclr.main, diverge, capsys)
    assert code == 3
    one_line(err, "the run diverged and stopped without saving",
             f"{run_dir}/checkpoint.pt keeps epoch 1, batch 0")
    assert files(run_dir) == good  # bit-identical: nothing saved over it
    # the same command again would diverge again: refused
    code, err = main_exit(simclr.main, diverge, capsys)
    assert code == 2
    one_line(err, "diverged with these settings", "--allow-changes lr")
    assert files(run_dir) == good
    # a lower rate, named, resumes from the last good state and finishes
    simclr.main([*SGD, "--lr", "0.05", "--epochs", "2", "--run-dir", str(run_dir),
                 "--allow-changes", "lr", "epochs"])
    assert not (run_dir / "diverged.json").exists()
    history = json.loads((run_dir / "args.json").read_text())["changes"]
    assert history[-1]["settings"] == {"epochs": [1, 2], "lr": [0.1, 0.05]}
    assert history[-1]["after_divergence"]["args"]["lr"] == 1e12
    assert [r["epoch"] for r in read_log(run_dir) if "step" not in r] == [1, 2]


def test_the_guard_does_not_change_a_sane_run(tmp_path, monkeypatch):
    # control: with a sane rate the guard never triggers and changes nothing (no RNG draw, no
    # state): the same run with its checks disabled gives bit-identical weights
    simclr.main([*SGD, "--lr", "0.1", "--epochs", "2", "--run-dir", str(tmp_path / "guarded")])
    monkeypatch.setattr(DivergenceGuard, "watch", lambda self, loss, step: None)
    monkeypatch.setattr(DivergenceGuard, "check", lambda self, *a: None)
    simclr.main([*SGD, "--lr", "0.1", "--epochs", "2", "--run-dir", str(tmp_path / "bare")])
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
    assert_same_tensors(load("guarded"), load("bare"))


# ---------------------------------------------------------------- one run per directory

BYOL = ["--data", "synthetic", *TINY, "--synthetic-size", "48", "--batch-size", "16",
        "--knn-every", "0", "--warmup-epochs", "0"]


def test_resume_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    byol.main([*BYOL, "--run-dir", run_dir])
    before = files(run_dir)
    capsys.readouterr()
    code, err = main_exit(byol.main, [*BYOL, "--run-dir", run_dir, "--batch-size", "32",
                                      "--lr", "5", "--epochs", "2"], capsys)
    line = one_line(err, "--batch-size 16 there, 32 now", "--epochs 1 there, 2 now",
                    "--lr 1.0 there, 5.0 now", "a new --run-dir",
                    "--allow-changes batch-size epochs lr")
    assert code == 2 and "tau" not in line  # only what differs is listed
    # another method's script: one line, nothing loaded
    code, err = main_exit(simclr.main, [*SGD, "--run-dir", run_dir], capsys)
    assert code == 2
    one_line(err, "holds a byol run, which simclr cannot resume")
    assert files(run_dir) == before


def test_settings_that_do_not_change_the_result_may_differ(tmp_path):
    # 2 epochs straight, or 1 epoch then a resume with other workers, log interval, kNN
    # frequency and --save-every: the same weights
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    byol.main([*BYOL, "--epochs", "2", "--run-dir", straight])
    byol.main([*BYOL, "--epochs", "2", "--run-dir", split, "--save-every", "1"])
    (Path(split) / "checkpoint.pt").unlink()
    shutil.copy(Path(split) / "checkpoint_epoch1.pt", Path(split) / "checkpoint.pt")
    byol.main([*BYOL, "--epochs", "2", "--run-dir", split, "--log-every", "3", "--workers", "1",
               "--knn-every", "1"])
    load = lambda d: torch.load(Path(d) / "checkpoint.pt", weights_only=False)["model"]
    assert_same_tensors(load(straight), load(split))


def test_growing_epochs_of_a_finished_run(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    simclr.main([*SGD, "--lr", "0.1", "--run-dir", run_dir])
    capsys.readouterr()
    code, err = main_exit(simclr.main, [*SGD, "--lr", "0.1", "--epochs", "3", "--run-dir",
                                        run_dir], capsys)
    one_line(err, "--epochs 1 there, 3 now", "--allow-changes epochs")
    simclr.main([*SGD, "--lr", "0.1", "--epochs", "3", "--run-dir", run_dir,
                 "--allow-changes", "epochs"])
    out = capsys.readouterr().out
    # the cosine restarts from where a 3-epoch schedule stands after 1 epoch (no warmup):
    # 0.5 (1 + cos(pi / 3)) = 75% of the way from 0 to the peak, 0% in the 1-epoch run
    assert "--epochs 1 -> 3" in out and "cosine stands at 75%" in out and "(0% before)" in out
    assert [r["epoch"] for r in read_log(run_dir) if "step" not in r] == [1, 2, 3]
    assert json.loads(Path(run_dir, "args.json").read_text())["epochs"] == 3
    # fewer epochs than done: refused even when allowed
    code, err = main_exit(simclr.main, [*SGD, "--lr", "0.1", "--epochs", "2", "--run-dir",
                                        run_dir, "--allow-changes", "epochs"], capsys)
    one_line(err, "has already trained 3 epochs")


def test_an_allowed_model_change_that_cannot_load_is_one_line(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    simclr.main([*SGD, "--run-dir", run_dir])
    capsys.readouterr()
    code, err = main_exit(simclr.main, [*SGD, "--run-dir", run_dir, "--arch", "resnet34",
                                        "--allow-changes", "arch"], capsys)
    assert code == 2
    one_line(err, "the checkpoint's model does not fit these settings")


def test_linear_eval_resume_rules(tmp_path, capsys):
    backbone = tmp_path / "run" / "backbone.pt"
    simclr.main([*SGD, "--run-dir", str(backbone.parent)])
    flags = ["--ckpt", str(backbone), "--data", "synthetic", "--synthetic-size", "32",
             "--workers", "0", "--batch-size", "16", "--epochs", "1", "--cached-features",
             "--run-dir", str(tmp_path / "eval")]
    linear_eval.main(flags)
    capsys.readouterr()
    code, err = main_exit(linear_eval.main, [*flags, "--lr", "0.5"], capsys)
    one_line(err, "--lr 0.1 there, 0.5 now")


# ---------------------------------------------------------------- failed saves

class FullDisk(io.FileIO):
    """A file whose writes fail with ENOSPC after `room` bytes, as on a full file system."""
    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def full_disk(path, mode="r", *args, **kwargs):
    """`open` for common/checkpoint.py: its binary writes go to a FullDisk."""
    return FullDisk(path, mode) if mode == "wb" else open(path, mode, *args, **kwargs)


def test_full_disk_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)
    with pytest.raises(UserError) as e:
        checkpoint.atomic_save({"w": torch.zeros(2**20)}, path)  # 4 MiB of tensors
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"could not write {path}: No space left")
    assert "it needs about 4 MiB" in line and "the previous checkpoint.pt is intact" in line
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt"]  # no temporary file left behind


def test_full_disk_during_a_run_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    simclr.main([*SGD, "--run-dir", str(run_dir)])
    good = files(run_dir)
    capsys.readouterr()
    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)
    code, err = main_exit(simclr.main, [*SGD, "--run-dir", str(run_dir), "--epochs", "2",
                                        "--allow-changes", "epochs"], capsys)
    assert code == 2
    one_line(err, "could not write", "No space left on device", "MiB are free",
             "the previous checkpoint.pt is intact")
    assert files(run_dir) == good
    monkeypatch.undo()  # space again: the run resumes from epoch 1
    simclr.main([*SGD, "--run-dir", str(run_dir), "--epochs", "2", "--allow-changes", "epochs"])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_run_directory_that_cannot_be_created_or_written(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    code, err = main_exit(simclr.main, [*SGD, "--run-dir", str(tmp_path / "a_file" / "run")],
                          capsys)
    assert code == 2
    one_line(err, f"--run-dir {tmp_path / 'a_file' / 'run'}: cannot write there")

    def read_only(path, mode="r", *a, **kw):  # as a read-only file system answers (root
        raise OSError(errno.EROFS, "Read-only file system", path)  # ignores chmod)
    monkeypatch.setattr("builtins.open", read_only)
    code, err = main_exit(simclr.main, [*SGD, "--run-dir", str(tmp_path / "ro")], capsys)
    monkeypatch.undo()
    one_line(err, "cannot write there (Read-only file system)")
    with pytest.raises(UserError, match="not writable: give another --run-dir"):
        monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
        checkpoint.atomic_save({"w": torch.ones(1)}, tmp_path / "x.pt")


# ---------------------------------------------------------------- smaller guards

def test_peak_lr_is_taken_as_given():
    args = simclr.get_args(["--data", "synthetic", "--batch-size", "512", "--peak-lr", "2.0"])
    assert (args.lr, args.peak_lr) == (1.0, 2.0)
    from common.args import describe_lr
    assert describe_lr(args) == ("recipe: small-image; lr = 2 (--peak-lr, as given; = 1 x "
                                 "512/256)")
    args = simclr.get_args(["--data", "synthetic", "--batch-size", "512", "--lr", "2.0"])
    assert (args.lr, args.peak_lr) == (2.0, 4.0)
    assert describe_lr(args) == "recipe: small-image; lr = 2 x 512/256 = 4"
    # BYOL's ImageNet preset sets --lr by the epoch budget, but not over a given peak rate
    args = byol.get_args(["--data", "/imagenet", "--epochs", "300", "--peak-lr", "4.8"])
    assert args.peak_lr == 4.8 and args.lr == pytest.approx(4.8 * 256 / 4096)
    args = byol.get_args(["--data", "/imagenet", "--epochs", "300"])
    assert args.lr == 0.3 and args.peak_lr == pytest.approx(0.3 * 4096 / 256)


def test_lr_and_peak_lr_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        simclr.get_args(["--data", "synthetic", "--lr", "1", "--peak-lr", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_moco_split_bn_with_sync_bn_is_refused():
    with pytest.raises(UserError, match="SyncBatchNorm would replace the split BN"):
        moco.get_args(["--data", "synthetic", "--bn-splits", "4", "--sync-bn", "global"])
    assert moco.get_args(["--data", "synthetic", "--bn-splits", "4"]).sync_bn == "off"


def test_arch_is_checked_before_the_data(tmp_path, capsys):
    # a typo fails at once, before a (possibly huge) dataset is scanned: here the data path
    # does not even exist, and the error is the arch's
    code, err = main_exit(simclr.main, ["--data", str(tmp_path / "imagenet"), "--arch",
                                        "resnet5", "--run-dir", str(tmp_path / "r")], capsys)
    one_line(err, "--arch resnet5: not supported")


def test_checkpoint_pickling_an_argparse_namespace(tmp_path, capsys):
    # simclr-pytorch (AndrewAtanov) saves {"state_dict", "hparams": argparse.Namespace,
    # "opt_state_dict", "iter"} with its ResNet under "convnet." (models/ssl.py get_ckpt,
    # train.py save_checkpoint)
    import torchvision
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # its CIFAR head
    state = {f"convnet.{k}": v for k, v in net.state_dict().items()}
    state["projection.fc1.weight"] = torch.randn(512, 512)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": state, "hparams": Namespace(arch="resnet18", data="cifar", lr=0.5),
                "opt_state_dict": {"state": {}, "param_groups": []}, "iter": 100}, path)
    result = linear_eval.main(["--ckpt", str(path), "--data", "synthetic", "--synthetic-size",
                               "32", "--workers", "0", "--knn", "--batch-size", "16",
                               "--run-dir", str(tmp_path / "eval")])
    assert 0 <= result["knn_top1"] <= 100
    out = capsys.readouterr().out
    assert "resnet18" in out and "convnet." in out
    # still no code: a pickled function is refused
    torch.save({"state_dict": state, "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="loading it would run code"):
        checkpoint.safe_load(tmp_path / "evil.pt")


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    from common.log import Logger
    log = Logger(str(tmp_path))
    log.log({"epoch": 0, "step": 1, "loss": 1.0})

    real_open = open

    def full(path, mode="r", *args, **kwargs):  # appends fail as on a full file system
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(UserError, match=r"^could not write .*log.jsonl: No space left on device$"):
        log.log({"epoch": 0, "step": 2, "loss": 1.0})
    monkeypatch.undo()
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1  # the first record kept


@pytest.mark.full
def test_each_rank_resumes_its_own_random_state(tmp_path):
    """Every process of a run starts from its own seed (--seed + rank): a resumed run must give
    each its own random state back, not rank 0's to all (which would make rank 1 repeat rank 0's
    draws, e.g. its dropout or stochastic-depth masks, from the resume on)."""
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/rng_resume_check.py", tmp_path], timeout=180))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank in ranks:
        assert torch.equal(rank["resumed"], rank["continued"])
    assert not torch.equal(ranks[0]["continued"], ranks[1]["continued"])


def test_the_embedding_monitor_warns_at_a_collapse_not_at_a_healthy_dip(tmp_path, capsys):
    """What a run logs after `step_done(embedding=...)`: MoCo's 128-d queries bunched as its
    healthy run's were at step 50 (embedding_std about 0.1/sqrt(d), docs/moco.md) say nothing;
    bunched as its collapsing run's (about 0.01/sqrt(d)) warn once, with the step and the bound."""
    from common.data import make_loader
    from common.run import embedding_std
    from tests.rng_resume_check import run_args
    run = Run(run_args(str(tmp_path / "run")), "collapse_check")
    model = nn.Linear(2, 2)
    loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(6, 1)), 2, 0)
    run.steps_per_epoch = len(loader)
    run.restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(128, generator=g)

    def bunched(fraction):  # 64 vectors around one direction, embedding_std about fraction/sqrt(d)
        spread = torch.randn(64, 128, generator=g)
        z = centre / centre.norm() + fraction * spread / spread.norm(dim=1, keepdim=True)
        assert 0.8 < embedding_std(z).item() * 128 ** 0.5 / fraction < 1.2
        return z
    embeddings = [bunched(0.1), bunched(0.01), bunched(0.1)]
    capsys.readouterr()
    for i, _ in run.epoch(0, loader):
        run.step_done(i, embedding=embeddings[i], loss=torch.tensor(1.0))
    lines = [line for line in capsys.readouterr().out.splitlines() if "collapsing" in line]
    assert len(lines) == 1 and "collapsing at step 2: embedding_std" in lines[0], lines
    assert "1/sqrt(128)" in lines[0]
    run.finish()


def test_a_collapse_is_said_once_per_episode(tmp_path, capsys):
    """The collapse monitor warns in one line when a watched value leaves its healthy range,
    not again while it stays out, and again after it came back and left again; values inside
    the range, and records without the value, say nothing."""
    from tests.rng_resume_check import run_args
    run = Run(run_args(str(tmp_path / "run")), "collapse_check")
    run.watch_collapse("embedding_std", low=0.02, why="0.2 x 1/sqrt(128)")
    run.watch_collapse("entropy", low=1.0, high=9.0, why="away from 0 and ln K")
    capsys.readouterr()
    records = [{"step": 1, "embedding_std": 0.08}, {"step": 2, "embedding_std": 0.01},
               {"step": 3, "embedding_std": 0.005}, {"epoch": 1, "loss": 1.0},
               {"step": 4, "embedding_std": 0.05}, {"step": 5, "embedding_std": 0.001},
               {"step": 6, "entropy": 9.5}, {"step": 7, "entropy": 5.0}]
    for record in records:
        run.warn_if_collapsing(record)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1] for line in lines] == [
        " the embedding is collapsing at step 2", " the embedding is collapsing at step 5",
        " the embedding is collapsing at step 6"], lines
    assert "embedding_std 0.01, under 0.02 (0.2 x 1/sqrt(128))" in lines[0]
    assert "entropy 9.5, over 9 (away from 0 and ln K)" in lines[2]
    run.finish()


FAIL_AT_STEP_2 = """\
import simclr

steps, loss = [], simclr.nt_xent_loss


def failing_loss(*args, **kwargs):
    steps.append(1)
    if len(steps) == 2:
        raise RuntimeError("injected failure")
    return loss(*args, **kwargs)


simclr.nt_xent_loss = failing_loss
simclr.main()
"""


def test_a_crash_with_loader_workers_running_exits(tmp_path):
    """An exception mid-epoch (an out-of-memory error, a bug) ends the process with its
    traceback and exit code 1. It hung: the traceback held the loader, whose workers ignore
    SIGTERM (for Slurm's stop signals), and the interpreter's exit sent them SIGTERM and waited
    for them, forever; a Slurm job would sit idle until its time limit."""
    entry = tmp_path / "fail.py"
    entry.write_text(FAIL_AT_STEP_2)
    proc = run([entry, "--data", "synthetic", *TINY, "--workers", "2", "--knn-every", "0",
                "--run-dir", tmp_path / "run"], timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.rstrip().endswith("RuntimeError: injected failure"), proc.stderr


def stopped_run(tmp_path, stop, launcher=()):
    """A SimCLR run of 200 steps (2 loader workers) stopped by `stop` at step 3 or soon after,
    under a fake Slurm job whose scontrol records a requeue: (exit code, output, saved position,
    requeued)."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\n")
    fake.chmod(0o755)
    env = {**os.environ, **SUBPROCESS_ENV, "SLURM_JOB_ID": "42",
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    argv = [sys.executable, *launcher, "simclr.py", *SGD, "--synthetic-size", "64", "--epochs",
            "50", "--workers", "2", "--run-dir", run_dir]
    argv += ["--stop-at-step", "3"] if stop == "stop-at-step" else []
    proc = subprocess.Popen([str(a) for a in argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,  # its own process group, as a terminal's job
                            # and Ctrl-C's default action, as a terminal gives it (a suite run in a
                            # shell's background, as CI may be, ignores SIGINT, which would pass on)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if stop != "stop-at-step":  # 200 steps in all: the stop lands long before the end
            while not ((run_dir / "log.jsonl").exists() and any(
                    r.get("step", 0) >= 3 for r in read_log(run_dir))):
                assert proc.poll() is None, proc.communicate()[0]
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
        output = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return (proc.returncode, output, (saved["epoch"], saved["batch_in_epoch"]),
            (tmp_path / "requeued").exists())


@pytest.mark.full
@pytest.mark.parametrize("stop, requeued", [("ctrl-c", False), ("stop-at-step", False),
                                            ("sigterm", True)])
def test_a_user_stop_saves_and_only_a_stop_signal_requeues(stop, requeued, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group, loader workers included) stops a
    run as a stop signal does: saved at a step boundary, exit 0, no traceback (it was a
    KeyboardInterrupt traceback that lost the steps since the last epoch's checkpoint). A user's
    stop (Ctrl-C, --stop-at-step) leaves a Slurm job ended; SIGTERM, a preemption, requeues it
    (--stop-at-step requeued too, against docs/training.md)."""
    code, output, saved, was_requeued = stopped_run(tmp_path, stop)
    assert code == 0 and "Traceback" not in output, output
    assert "stop signal: saved" in output
    assert ("Ctrl-C: the run saves after this step" in output) == (stop == "ctrl-c")
    assert saved[0] < 50 and saved != (0, 0)
    assert was_requeued == requeued, output


@pytest.mark.full
def test_ctrl_c_to_a_torchrun_launch_saves(tmp_path):
    """Under torchrun each process has the terminal's Ctrl-C and torchrun's copy of it, within a
    second: one stop, saved mid-epoch by both at an agreed step (torchrun then ends with its own
    SignalException)."""
    _, output, saved, was_requeued = stopped_run(
        tmp_path, "ctrl-c", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert "stop signal: saved" in output and "KeyboardInterrupt" not in output, output
    assert output.count("Ctrl-C: the run saves") == 1  # rank 0's line only
    assert saved[0] < 50 and saved != (0, 0) and not was_requeued


def test_a_second_ctrl_c_quits_at_once_and_an_ignored_one_stays_ignored():
    """Ctrl-C before the first step quits at once. After it, the first Ctrl-C asks for a stop
    at the next step; the second raises KeyboardInterrupt (a user who will not wait), unless it
    comes within a second (torchrun's copy). A run started with SIGINT ignored (a shell's
    background job, nohup) keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (conftest restores)
    stop = StopSignal()
    with pytest.raises(KeyboardInterrupt):  # before the first step: nothing to save
        os.kill(os.getpid(), signal.SIGINT)
    stop.step_done(0)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and not stop.requeue
    os.kill(os.getpid(), signal.SIGINT)  # as torchrun's copy of it: the same Ctrl-C
    stop.interrupted -= 1.5  # a second later
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    background = StopSignal()
    background.step_done(0)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGINT)
    assert not background.requested
    os.kill(os.getpid(), signal.SIGTERM)  # a stop signal still stops it
    assert background.requested and background.requeue
