"""Helpers for the tests: run the real scripts by subprocess on tiny settings, make image folders."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"

# A few seconds per epoch on 2 CPU cores: ResNet-18 with the small-image stem on 16 px images.
TINY = ["--arch", "resnet18", "--img-size", "16", "--synthetic-size", "64", "--batch-size", "32",
        "--workers", "0", "--epochs", "1", "--log-every", "1"]


# One intra-op thread per script run: tiny models gain nothing from more, and on a busy machine
# competing thread pools make runs many times slower (torchrun sets the same for its workers).
SUBPROCESS_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run(args, timeout=300, env=None, **kw):
    """Run `python <args>` in the repository; return the CompletedProcess (text output)."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kw)


def ok(proc):
    """Assert a CompletedProcess succeeded, showing its output if not."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_same_tensors(a, b):
    """Two state dicts (weights, buffers, queues) hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def read_log(run_dir):
    with open(Path(run_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def make_image_folder(root, classes=3, train_per_class=8, val_per_class=3, size=40, seed=0):
    """An ImageFolder tree root/{train,val}/<class>/*.jpg of random JPEGs with a class colour."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3)) // 2 + 40 * c
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{i}.jpg", quality=90)
    return Path(root)


def run_until_stopped(args, run_dir, after_step, timeout=240):
    """Run `python <args> --stop-at-step after_step` (which must write to `run_dir`): the run
    saves and stops after that step as on a stop signal, at the same point however busy the
    machine is (a signal sent from here once the step is logged could arrive steps later, or
    after the run's end). Returns the checkpoint it saved."""
    proc = run([*args, "--stop-at-step", after_step], timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stop signal: saved" in proc.stdout, proc.stdout
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)


def cifar10_subset(cifar10_dir, root, train_per_class, val_per_class):
    """A class-balanced subset of the real CIFAR-10 JPEG tree under `root`, linked, not copied."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted(os.listdir(Path(cifar10_dir) / split)):
            (Path(root) / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(Path(cifar10_dir) / split / cls))[:per_class]:
                os.symlink(Path(cifar10_dir) / split / cls / name, Path(root) / split / cls / name)
    return Path(root)


def signal_when_logged(argv, run_dir, logged, sig=signal.SIGTERM, timeout=120):
    """Start `python <argv>` (e.g. a torchrun launch) writing to `run_dir`, send it `sig` as soon
    as `logged(records)` holds for the records of its log.jsonl, and return its exit code and
    output (stdout and stderr together) once it ends."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO,
                            env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if (Path(run_dir) / "log.jsonl").exists() and logged(read_log(run_dir)):
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            proc.kill()
