"""Every method learns: a short run of each script's own small-image recipe on real images (a
class-balanced subset of CIFAR-10 as JPEG files) ends with a weighted-kNN top-1 on the val split
above the randomly initialised network's (the run's epoch-0 monitor), and without the collapse
monitor's warning. A recipe that collapses fails here, whatever its exit code; so does one whose
kNN does not move off its start, except four known not to rise within this budget (SLOW, below:
for them only the rise is an expected failure, the collapse checks stay strict). The rise is at
the monitor's k = 200: at k = 20 no method beats a random network in this budget
(docs/training.md), so this checks that a recipe runs without collapsing and moves off its
start, not how well it learns.

Shortened how: 16 px crops (a quarter of 32 px's cost), batch 32 (the recipe's base rate scaled
x 32/256, as every run scales it), EPOCHS epochs of TRAIN_PER_CLASS x 10 images, and each
schedule the recipe counts in epochs (warmup, SwAV's queue start and prototype freeze, DINO's
frozen last layer and temperature warmup) the same fraction of the run as in the recipe; MoCo's
queue shortened with the data, SwAV's off (see `shortened`). The rest is the recipe's. DINO's
collapse monitor is its teacher's entropy, which must also end away from 0 and from ln K.
Measured how: the kNN memory is the 3,000 training images, the score is on 2,000 val images
(a standard error of about 1 point at these accuracies, so the margin is about 2 of them).
Each method takes 1-2 minutes on 2 CPU cores; the full tier only.
"""
import importlib
import json
import math
import os
import time

import pytest

from tests.helpers import SHARED_CIFAR10, cifar10_subset, ok, read_log, run

TRAIN_PER_CLASS, VAL_PER_CLASS, EPOCHS, BATCH = 300, 200, 2, 32
MARGIN = 2.0  # kNN top-1 points above the random initialisation's
# Measured here (2 CPU cores, this subset and budget: 186 steps), the four recipes whose ResNet
# has no zero-initialised residual branches (zero_init_residual off, as in their official code)
# do not rise within it: their random network already scores about 3 points more (25.4 against 22.35 for
# zero-initialised residuals), and 186 steps at the recipe's rate scaled to batch 32 do not
# reach it again. Their rise is checked strictly when asked (CLEANSSL_LEARNING_STRICT=1), an
# expected failure (xfail) otherwise; their collapse checks are strict always:
SLOW = {
    # 25.4 -> 25.35; SGD at 0.03 x 32/256 = 0.00375 moves the network little in 186 steps (at
    # the square-root rate 0.0106: 26.1; held at its peak: 26.65; 4 epochs: 26.45); built with
    # zero-initialised residuals it would pass, 22.35 -> 25.75 (docs/training.md)
    "moco": "MoCo's SGD rate scaled to batch 32 does not lift the kNN in 186 steps",
    # 25.4 -> 22.0, the loss falling without a collapse warning; at the square-root rate (--lr
    # 2.83) 24.7; with BYOL's own short-run momenta (--tau-base 0.97: 20.9 -> 19.9; 0.99 and 620
    # steps: 23.0, +2.1) not either
    "byol": "BYOL's bootstrap does not lift the kNN in a few hundred steps of batch 32",
    # 25.4 -> 24.75: the Sinkhorn codes of 32 near-identical embeddings are near uniform, the
    # loss sits near ln K. On 1,000 training images (random: 20.9) neither a queue of 480 (20.1)
    # or 96 (17.6) nor 100 prototypes (16.5) helped; the recipe's batch 256 and queue 3840 are
    # out of reach
    "swav": "SwAV's codes are near uniform at batch 32: the kNN does not rise",
    # 25.4 -> 24.7, entropy 8.22 of ln K = 8.32; the teacher trails the student by
    # 1 / (1 - 0.9995) = 2000 steps; with --tau-base 0.99 its entropy rises to ln K (warned)
    "dino": "DINO's teacher does not lift the kNN in 186 steps (tests/test_learning.py)",
}


def shortened(method, epochs=EPOCHS):
    """The flags that shorten `method`'s small-image recipe to `epochs` epochs of the subset."""
    recipe = importlib.import_module(method).SMALL_IMAGES
    scale = epochs / recipe["epochs"]
    flags = ["--epochs", epochs, "--batch-size", BATCH]
    if "warmup_epochs" in recipe:
        flags += ["--warmup-epochs", round(recipe["warmup_epochs"] * scale, 3)]
    if method == "moco":  # 4096 keys of 50,000 images: the same 8% of the subset, whole batches
        flags += ["--queue-size", max(1, round(4096 / 50_000 * TRAIN_PER_CLASS * 10 / BATCH)) * BATCH]
    if method == "swav":
        flags += ["--queue-length", 0,  # the recipe's queue serves batches of 256 or less only
                  "--freeze-prototypes-epochs", round(recipe["freeze_prototypes_epochs"] * scale, 3)]
    if method == "dino":  # the student's last layer frozen, the teacher temperature's warmup
        flags += ["--freeze-last-layer-epochs", round(recipe["freeze_last_layer_epochs"] * scale, 3),
                  "--warmup-teacher-temp-epochs", round(recipe["warmup_teacher_temp_epochs"] * scale)]
    return [str(f) for f in flags]


@pytest.fixture(scope="module")
def subset(module_tmp):
    """The subset, linked once for the module (the tests take `cifar10_dir`: skipped without
    the JPEG copy)."""
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {SHARED_CIFAR10}")
    return cifar10_subset(SHARED_CIFAR10, module_tmp("learning") / "cifar10", TRAIN_PER_CLASS,
                          VAL_PER_CLASS)


@pytest.mark.full
@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg",
                                    "mocov3", "dino"])
def test_the_small_image_recipe_learns(method, cifar10_dir, subset, tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    proc = ok(run([f"{method}.py", "--data", subset, "--img-size", "16", "--arch", "resnet18",
                   *shortened(method), "--workers", "1", "--log-every", "10",
                   "--knn-every", EPOCHS, "--run-dir", run_dir], timeout=900))
    seconds = time.time() - start
    log = read_log(run_dir)
    before, after = log[0]["knn_top1"], log[-1]["knn_top1"]
    monitor = "teacher_entropy" if method == "dino" else "embedding_std"  # DINO's: its teacher's
    figures = json.dumps({"method": method, "knn_before": before, "knn_after": after,
                          "seconds": round(seconds), monitor: log[-1][monitor]})
    print(figures)
    if os.environ.get("CLEANSSL_LEARNING_LOG"):  # where docs/training.md's figures come from
        with open(os.environ["CLEANSSL_LEARNING_LOG"], "a") as f:
            f.write(figures + "\n")
    # no collapse, for every method (the four SLOW ones included: only their rise is excused)
    assert "collapsing" not in proc.stdout, proc.stdout
    if method == "dino":  # away from one output taking all (0) and from a uniform teacher (ln K)
        ln_k = math.log(json.loads((run_dir / "args.json").read_text())["out_dim"])
        assert 0.05 * ln_k < log[-1]["teacher_entropy"] < ln_k - 0.05, log[-1]
    if method in SLOW and after <= before + MARGIN and not os.environ.get("CLEANSSL_LEARNING_STRICT"):
        pytest.xfail(f"{SLOW[method]}: kNN top-1 {before} -> {after}")
    assert after > before + MARGIN, (before, after)
