"""Worker for tests/test_run_safety.py, launched by torchrun with 2 processes (gloo, CPU): a Run
saves mid-epoch, each rank draws from its random generators, then a second Run resumes the
checkpoint and each rank draws again. Rank r writes both draws to OUT/rank{r}.pt."""
import argparse
import sys

import torch
import torch.nn as nn

from common.dist import get_rank
from common.run import Run


def run_args(run_dir):
    return argparse.Namespace(batch_size=2, precision="fp32", run_dir=run_dir, seed=0, epochs=1,
                              allow_changes=[], log_every=1, data="synthetic", small_images=True,
                              tensorboard=False)


def draws():
    return torch.cat([torch.rand(4), torch.randn(4)])


def main():
    out = sys.argv[1]
    run = Run(run_args(f"{out}/run"), "rng_check")  # seeds --seed + rank
    model = nn.Linear(2, 2)
    run.steps_per_epoch = 4
    run.restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.rand(3 + get_rank())  # the ranks' generators move on differently, as in training
    run.save(0, 1)  # a stop after step 1: every rank's random state goes into the checkpoint
    continued = draws()

    resumed = Run(run_args(f"{out}/run"), "rng_check")
    resumed.steps_per_epoch = 4
    resumed.restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.save({"continued": continued, "resumed": draws()}, f"{out}/rank{get_rank()}.pt")
    resumed.finish()


if __name__ == "__main__":
    main()
