"""Bad input: one clear `error:` line on stderr, exit code 2, no traceback."""
import socket

import pytest
import torch

from tests.helpers import TINY, make_image_folder, run


def assert_one_clear_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def simclr(tmp_path, data, *extra):
    return run(["simclr.py", "--data", data, *TINY, "--run-dir", tmp_path / "run", *extra],
               timeout=120)


def test_missing_data_path(tmp_path):
    assert_one_clear_line(simclr(tmp_path, tmp_path / "nowhere"), "no such directory")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_clear_line(simclr(tmp_path, tmp_path / "empty"), "no train/ folder")


def test_class_folder_without_images(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "train" / "empty_class").mkdir()
    assert_one_clear_line(simclr(tmp_path, root), "empty_class")


def test_batch_larger_than_dataset(tmp_path):
    assert_one_clear_line(simclr(tmp_path, "synthetic", "--batch-size", "128"), "one batch of 128")


def test_unknown_arch(tmp_path):
    assert_one_clear_line(simclr(tmp_path, "synthetic", "--arch", "resnet19"), "not supported")


def _online(host="www.cs.toronto.edu"):
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_cifar10_offline_says_where_to_put_it(tmp_path):
    if _online():
        pytest.skip("online: --data cifar10 would download the dataset")
    proc = run(["simclr.py", "--data", "cifar10", "--data-dir", tmp_path / "data", "--epochs", "1"],
               timeout=120)
    assert_one_clear_line(proc, "CIFAR-10", "cifar-10-python.tar.gz", str(tmp_path / "data"),
                          "--data synthetic")


@pytest.mark.parametrize("content,message", [
    ("text", "not a PyTorch checkpoint"),
    ("foreign", "no ResNet or ViT found in it; known layouts"),
    ("missing", "no such file"),
])
def test_linear_eval_rejects_what_is_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    proc = run(["linear_eval.py", "--ckpt", path, "--data", "synthetic"], timeout=120)
    assert_one_clear_line(proc, message)
