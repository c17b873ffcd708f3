"""Helpers for the tests: run the real scripts by subprocess on tiny settings, make image folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"

# A few seconds per epoch on 2 CPU cores: ResNet-18 with the small-image stem on 16 px images.
TINY = ["--arch", "resnet18", "--img-size", "16", "--synthetic-size", "64", "--batch-size", "32",
        "--workers", "0", "--epochs", "1", "--log-every", "1"]


def run(args, timeout=300, env=None, **kw):
    """Run `python <args>` in the repository; return the CompletedProcess (text output)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kw)


def ok(proc):
    """Assert a CompletedProcess succeeded, showing its output if not."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


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
