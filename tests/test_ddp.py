"""DDP equivalence: 2 gloo processes x B/2 give the loss and gradients of 1 process x B."""
import pytest
import torch

from tests.helpers import ok, run
from tests.ddp_check import grads_and_loss, make_batch, make_model

# fp32 sums in a different order: agreement to ~1e-7 relative; we allow 1e-5.
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.full
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/ddp_check.py", out], timeout=180))
    ddp = torch.load(out)
    assert ddp["world"] == 2

    x1, x2 = make_batch()
    loss, grads = grads_and_loss(make_model(), x1, x2)
    assert torch.allclose(ddp["loss"], loss, rtol=RTOL, atol=ATOL), (ddp["loss"], loss)
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, rtol=RTOL, atol=ATOL), name
    # The control (a gather without gradient) must give different gradients: the comparison
    # above is sensitive to exactly the bug it guards against.
    assert any(not torch.allclose(ddp["broken"][k], g, rtol=1e-3, atol=1e-5) for k, g in grads.items())
