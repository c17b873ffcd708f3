"""A run stopped part-way through an epoch and resumed writes the log.jsonl of an uninterrupted
run, record for record: the step records and the epoch summaries, whose means (the loss and its
terms) span the steps before the stop too. Timings aside, every value must be equal.

The stop is the one a signal causes (a checkpoint at the position, then the process returns),
made to happen at a chosen step by --stop-at-step."""
import importlib

import pytest
import torch

import common.run
from common.checkpoint import export_backbone
from common.model import resnet_backbone
from common.run import Run
from tests.helpers import assert_same_tensors, read_log

TIMINGS = {"epoch_time", "img_per_s", "peak_gpu_mem_gib"}
STEPS_PER_EPOCH = 4  # 64 synthetic images, batch 16
STOP_AT = STEPS_PER_EPOCH + 2  # the 6th step: epoch 2, after its batch 2
TINY = ["--data", "synthetic", "--img-size", "16", "--synthetic-size", "64", "--batch-size", "16",
        "--workers", "0", "--log-every", "1", "--epochs", "2"]
METHOD = ["--arch", "resnet18", "--knn-every", "0"]
OWN = {"simclr": METHOD, "moco": [*METHOD, "--queue-size", "32"],
       "byol": [*METHOD, "--hidden-dim", "256", "--proj-dim", "64"], "simsiam": METHOD,
       "swav": [*METHOD, "--num-prototypes", "20"], "barlow": METHOD, "vicreg": METHOD,
       "mocov3": [*METHOD, "--hidden-dim", "64", "--proj-dim", "32"],
       "dino": [*METHOD, "--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32"],
       "mae": ["--arch", "vit_tiny", "--knn-every", "0", "--decoder-dim", "32", "--decoder-depth",
               "1", "--decoder-heads", "4"],
       "linear_eval": []}  # its backbone: resnet18, made below
METHODS = tuple(OWN)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_log(run_dir)]


@pytest.mark.parametrize("method", [m if m in ("simclr", "moco") else
                                    pytest.param(m, marks=pytest.mark.full) for m in METHODS])
def test_a_run_resumed_mid_epoch_logs_what_an_uninterrupted_one_does(method, tmp_path,
                                                                     monkeypatch):
    script = importlib.import_module(method)
    flags = [*TINY, *OWN[method]]
    if method == "linear_eval":  # a random backbone to evaluate
        torch.manual_seed(0)
        export_backbone(resnet_backbone("resnet18", cifar_stem=True), tmp_path / "backbone.pt")
        flags += ["--ckpt", str(tmp_path / "backbone.pt")]
    sums, real = [], Run.step_done  # the running sums after each step, kept to look at
    monkeypatch.setattr(Run, "step_done", lambda run, *a, **values: real(run, *a, **values)
                        or sums.append(list(run.sums.values())))
    script.main([*flags, "--run-dir", str(tmp_path / "straight")])
    # plain numbers: a sum that kept each step's autograd graph would hold on to every step's
    # tensors in it until the epoch ends
    assert len(sums) == 2 * STEPS_PER_EPOCH and not any(t.requires_grad for s in sums for t in s)
    monkeypatch.undo()

    script.main([*flags, "--run-dir", str(tmp_path / "split"), "--stop-at-step", str(STOP_AT)])
    stopped = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, STOP_AT - STEPS_PER_EPOCH)
    script.main([*flags, "--run-dir", str(tmp_path / "split")])

    straight, split = records(tmp_path / "straight"), records(tmp_path / "split")
    summaries = [r for r in straight if "step" not in r and "loss" in r]
    assert [r["epoch"] for r in summaries] == [1, 2]
    assert split == straight
    final = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"]
             for run in ("straight", "split")]
    assert_same_tensors(*final)


class Crash(Exception):
    """A process killed between two checkpoints (no stop signal, nothing saved)."""


def test_checkpoint_every_n_epochs_and_a_crash_between_checkpoints(tmp_path, monkeypatch):
    import simclr
    flags = [*TINY, *METHOD, "--epochs", "5", "--checkpoint-every", "2"]
    saved, real_save = [], common.run.save_checkpoint
    monkeypatch.setattr(common.run, "save_checkpoint",
                        lambda *a, **kw: saved.append(a[6:8]) or real_save(*a, **kw))
    simclr.main([*flags, "--run-dir", str(tmp_path / "straight")])
    assert saved == [(2, 0), (4, 0), (5, 0)]  # every 2nd epoch and the last
    saved.clear()
    simclr.main([*flags, "--save-every", "3", "--run-dir", str(tmp_path / "kept")])
    assert saved == [(2, 0), (3, 0), (4, 0), (5, 0)]  # and --save-every's epochs
    kept = torch.load(tmp_path / "kept" / "checkpoint_epoch3.pt", weights_only=False)
    assert kept["epoch"] == 3

    # killed after epoch 3's summary was logged: the resume starts from epoch 2's checkpoint,
    # drops the records logged since and trains epoch 3 again, as if nothing had happened
    real_end_epoch = Run.end_epoch

    def end_epoch_then_crash(run, **values):
        stopped = real_end_epoch(run, **values)
        if run.current_epoch + 1 == 3:
            raise Crash
        return stopped
    monkeypatch.setattr(Run, "end_epoch", end_epoch_then_crash)
    with pytest.raises(Crash):
        simclr.main([*flags, "--run-dir", str(tmp_path / "crashed")])
    assert [r["epoch"] for r in read_log(tmp_path / "crashed") if "step" not in r][-1] == 3
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    monkeypatch.undo()
    simclr.main([*flags, "--run-dir", str(tmp_path / "crashed")])
    assert records(tmp_path / "crashed") == records(tmp_path / "straight")
    final = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"]
             for run in ("straight", "crashed")]
    assert_same_tensors(*final)
