"""Multi-node without Slurm: two `torchrun --nnodes=2 --nproc_per_node=1` launches on 127.0.0.1
meeting through a c10d rendezvous train together and end with exactly the weights of one
`torchrun --nproc_per_node=2` launch (gloo, CPU, the same seed)."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import simclr
from tests.helpers import (REPO, SUBPROCESS_ENV, TINY, assert_same_tensors, ok, read_log, run,
                           signal_when_logged)

pytestmark = pytest.mark.full  # several processes: the full suite

FLAGS = ["simclr.py", "--data", "synthetic", *TINY, "--knn-every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node_with_two_processes(tmp_path):
    one_node = tmp_path / "one_node"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *FLAGS,
            "--run-dir", one_node], timeout=240))

    two_nodes = tmp_path / "two_nodes"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
              "--rdzv-id=cleanssl-test", *FLAGS, "--run-dir", str(two_nodes)]
    env = {**os.environ, **SUBPROCESS_ENV}
    nodes = [subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), outputs
    assert "simclr, 2 process(es)" in "".join(outputs)

    a = torch.load(one_node / "checkpoint.pt", weights_only=False)
    b = torch.load(two_nodes / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (1, 1)
    assert_same_tensors(a["model"], b["model"])
    # the runs trained (the comparison is not between two untouched initialisations) and their
    # logs agree step by step
    torch.manual_seed(0)  # what simclr.py seeds (seed 0 + rank 0) before it builds the model
    init = simclr.SimCLR("resnet18", small_images=True).state_dict()
    assert not torch.equal(init["backbone.conv1.weight"], a["model"]["backbone.conv1.weight"])
    assert [r["loss"] for r in read_log(one_node)] == [r["loss"] for r in read_log(two_nodes)]


INJECT = """\
import os
import signal
import simclr

if os.environ["RANK"] == "1":  # rank 1 fails in its third step
    steps, loss = [], simclr.nt_xent_loss

    def failing_loss(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("injected failure on rank 1")
        return loss(*args, **kwargs)

    simclr.nt_xent_loss = failing_loss
simclr.main()
"""


def test_a_failing_rank_ends_the_job_and_torchrun_shows_its_traceback(tmp_path):
    """One rank raises: torchrun stops the other instead of leaving it waiting in a collective,
    and its failure summary names the rank with the traceback (the scripts' main() is wrapped
    in torchrun's `record`; without it the summary says only "To enable traceback see ...")."""
    entry = tmp_path / "inject.py"
    entry.write_text(INJECT)
    start = time.time()
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", entry,
                "--data", "synthetic", *TINY, "--knn-every", "0", "--epochs", "100",
                "--synthetic-size", "256", "--run-dir", tmp_path / "run"], timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert time.time() - start < 120, "the surviving rank hung"
    summary = output.split("Root Cause (first observed failure)")[1]
    assert "rank      : 1" in summary, output
    assert "RuntimeError: injected failure on rank 1" in summary, output
    assert "To enable traceback" not in summary, output


def test_sigterm_to_torchrun_saves_mid_epoch(tmp_path):
    """Outside Slurm: SIGTERM to torchrun (what `kill` and most schedulers send) is passed on to
    the workers, which save at the next step they agree on and exit before torchrun's shutdown
    timeout (30 s) would kill them."""
    run_dir = tmp_path / "run"
    _, output = signal_when_logged(["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "simclr.py", "--data", "synthetic",
                                    *TINY, "--knn-every", "0", "--synthetic-size", "960",
                                    "--run-dir", run_dir],  # 30 steps per epoch
                                   run_dir, lambda log: len(log) >= 2)
    assert "stop signal: saved" in output, output
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (0, 10), output
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, 11))
