"""Bad input: one clear `error:` line on stderr, exit code 2, no traceback. The scripts run
in-process (their main), but for one subprocess run: the real exit code of a real process."""
import importlib
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch

from common.model import build_backbone
from tests.helpers import TINY, make_image_folder, run


@pytest.fixture
def in_process(capsys):
    """run(["script.py", *argv]) in this process: a CompletedProcess-like exit code and output."""
    def call(argv, timeout=None):
        try:
            importlib.import_module(argv[0].removesuffix(".py")).main([str(a) for a in argv[1:]])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return call


def assert_one_clear_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def simclr(tmp_path, data, *extra, launch=run):
    return launch(["simclr.py", "--data", data, *TINY, "--run-dir", tmp_path / "run", *extra],
                  timeout=120)


def test_missing_data_path(tmp_path):  # a real process: its exit code and stderr
    assert_one_clear_line(simclr(tmp_path, tmp_path / "nowhere"), "no such directory")


def test_empty_data_folder(tmp_path, in_process):
    (tmp_path / "empty").mkdir()
    assert_one_clear_line(simclr(tmp_path, tmp_path / "empty", launch=in_process),
                          "no train/ folder")


def test_class_folder_without_images(tmp_path, in_process):
    root = make_image_folder(tmp_path / "images")
    (root / "train" / "empty_class").mkdir()
    assert_one_clear_line(simclr(tmp_path, root, launch=in_process), "empty_class")


def test_unlabelled_images_say_how_to_train_on_them(tmp_path, in_process):
    """Images right under train/, or no val/: the line says what to do (one class folder,
    --knn-every 0), and with it the same images train."""
    root = make_image_folder(tmp_path / "images", classes=1, train_per_class=32)
    for image in (root / "train" / "class0").iterdir():
        image.rename(root / "train" / image.name)
    (root / "train" / "class0").rmdir()
    assert_one_clear_line(simclr(tmp_path, root, launch=in_process),
                          "Unlabelled images go in one class folder", "--knn-every 0")
    (root / "train" / "images").mkdir()
    for image in (root / "train").glob("*.jpg"):
        image.rename(root / "train" / "images" / image.name)
    shutil.rmtree(root / "val")
    assert_one_clear_line(simclr(tmp_path, root, "--batch-size", 16, launch=in_process),
                          "no val/ folder", "without them (--knn-every 0) pre-training reads train/ only")
    proc = simclr(tmp_path, root, "--batch-size", 16, "--knn-every", 0, launch=in_process)
    assert proc.returncode == 0 and "done:" in proc.stdout, proc.stderr


def test_batch_larger_than_dataset(tmp_path, in_process):
    assert_one_clear_line(simclr(tmp_path, "synthetic", "--batch-size", "128", launch=in_process),
                          "one batch of 128: lower --batch-size")


def test_unknown_arch(tmp_path, in_process):
    assert_one_clear_line(simclr(tmp_path, "synthetic", "--arch", "resnet19", launch=in_process),
                          "not supported")


@pytest.mark.parametrize("flag,value,message", [
    ("--workers", -1, "--workers -1: must be 0 or more"),
    ("--log-every", 0, "--log-every 0: must be 1 or more"),
    ("--knn-every", -1, "--knn-every -1: must be 0 or more"),
    ("--stop-at-step", 0, "--stop-at-step 0: must be 1 or more"),
    ("--seed", -1, "--seed -1: must be 0 or more"),
    ("--img-size", 0, "--img-size 0: must be 1 or more"),
    ("--checkpoint-every", 0, "--checkpoint-every 0: must be 1 or more"),
    ("--lr", -1, "--lr -1: must be positive"),
    ("--peak-lr", 0, "--peak-lr 0: must be positive"),
    ("--weight-decay", -0.1, "--weight-decay -0.1: must be 0 or more"),
])
def test_out_of_range_numbers(tmp_path, in_process, flag, value, message):
    """Each was a traceback (negative workers, a zero log interval or image size, a negative
    seed) or, worse, a run that started anyway (a negative rate trained; --knn-every -1 ran the
    monitor every epoch; --stop-at-step 0 never stopped)."""
    assert_one_clear_line(simclr(tmp_path, "synthetic", flag, value, launch=in_process), message)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.parametrize("script,flag,value,message", [
    ("simclr.py", "--temperature", 0, "--temperature 0: must be positive"),  # a nan loss
    ("mocov3.py", "--temperature", -0.2, "--temperature -0.2: must be positive"),  # trained on
    ("swav.py", "--epsilon", 0, "--epsilon 0: must be positive"),
    ("dino.py", "--student-temp", 0, "--student-temp 0: must be positive"),
    ("moco.py", "--moco-momentum", 1.5, "--moco-momentum 1.5: must be in [0, 1]"),  # trained on
    ("byol.py", "--tau-base", -1, "--tau-base -1: must be in [0, 1]"),
    ("dino.py", "--center-momentum", 2, "--center-momentum 2: must be in [0, 1]"),
    ("simclr.py", "--blur-prob", 2, "--blur-prob 2: must be in [0, 1]"),
    ("vicreg.py", "--solarize-probs", [0, 1.5], "--solarize-probs 1.5: must be in [0, 1]"),
    ("moco.py", "--queue-size", 0, "--queue-size 0: must be 1 or more"),  # a ZeroDivisionError
    ("moco.py", "--bn-splits", 0, "--bn-splits 0: must be 1 or more"),
    ("barlow.py", "--lambd", -1, "--lambd -1: must be 0 or more"),
    ("simsiam.py", "--warmup-epochs", -1, "--warmup-epochs -1: must be 0 or more"),
    ("dino.py", "--out-dim", 0, "--out-dim 0: must be 1 or more"),
])
def test_out_of_range_method_settings(tmp_path, in_process, script, flag, value, message):
    """A method's own numbers: temperatures, momenta, probabilities, sizes. Before these checks
    a negative temperature or a momentum of 1.5 trained to the end and printed `done`."""
    values = value if isinstance(value, list) else [value]
    proc = in_process([script, "--data", "synthetic", *TINY, "--run-dir", tmp_path / "run", flag,
                       *values])
    assert_one_clear_line(proc, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,flags,message", [
    ("linear_eval.py", ["--workers", -1], "--workers -1: must be 0 or more"),
    ("linear_eval.py", ["--knn", "--knn-k", 20, 0], "--knn-k 0: must be 1 or more"),
    ("linear_eval.py", ["--eval-every", -1], "--eval-every -1: must be 0 or more"),
    ("linear_eval.py", ["--img-size", -4], "--img-size -4: must be 1 or more"),
    ("linear_eval.py", ["--lr", 0], "--lr 0: must be positive"),
    ("linear_eval.py", ["--finetune", "--lr-backbone", -1], "--lr-backbone -1: must be 0 or more"),
    ("finetune.py", ["--seed", -2], "--seed -2: must be 0 or more"),
    ("finetune.py", ["--epochs", 0], "--epochs 0: must be 1 or more"),
    ("finetune.py", ["--weight-decay", -1], "--weight-decay -1: must be 0 or more"),
])
def test_out_of_range_numbers_in_evaluation(tmp_path, in_process, script, flags, message):
    """The same for linear_eval.py and finetune.py (--workers -1 and --seed -1 were tracebacks,
    --knn-k 0 a result from no neighbours)."""
    ckpt = tmp_path / "backbone.pt"
    torch.save(build_backbone("vit_tiny", small_images=True).state_dict(), ckpt)
    proc = in_process([script, "--ckpt", ckpt, "--data", "synthetic", "--synthetic-size", 16,
                       "--batch-size", 8, "--workers", 0, "--run-dir", tmp_path / "eval", *flags])
    assert_one_clear_line(proc, message)
    assert not (tmp_path / "eval").exists()


def test_evaluation_rates_are_checked_before_the_data(tmp_path, in_process):
    """A given rate is refused before the train split is scanned (a minute on ImageNet): with a
    data folder that does not exist, the rate is still what the line names."""
    ckpt = tmp_path / "backbone.pt"
    torch.save(build_backbone("resnet18", small_images=True).state_dict(), ckpt)
    proc = in_process(["linear_eval.py", "--ckpt", ckpt, "--data", tmp_path / "absent", "--lr", -2,
                       "--run-dir", tmp_path / "eval"])
    assert_one_clear_line(proc, "--lr -2: must be positive")


def _online(host="www.cs.toronto.edu"):
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_cifar10_offline_says_where_to_put_it(tmp_path, in_process):
    if _online():
        pytest.skip("online: --data cifar10 would download the dataset")
    proc = in_process(["simclr.py", "--data", "cifar10", "--data-dir", tmp_path / "data",
                       "--epochs", "1", "--run-dir", tmp_path / "run"])
    assert_one_clear_line(proc, "CIFAR-10", "cifar-10-python.tar.gz", str(tmp_path / "data"),
                          "--data synthetic")


@pytest.mark.parametrize("content,message", [
    ("text", "not a PyTorch checkpoint"),
    ("foreign", "no ResNet or ViT found in it; known layouts"),
    ("missing", "no such file"),
])
def test_linear_eval_rejects_what_is_not_a_checkpoint(tmp_path, content, message, in_process):
    path = tmp_path / "model.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    proc = in_process(["linear_eval.py", "--ckpt", path, "--data", "synthetic", "--run-dir",
                       tmp_path / "eval"])
    assert_one_clear_line(proc, message)
