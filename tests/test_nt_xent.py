"""NT-Xent (simclr.nt_xent_loss) against a naive loop and a value computed by hand."""
import math

import torch

from simclr import nt_xent_loss


def naive_nt_xent(z1, z2, temperature):
    """Straight from the paper's definition, one anchor at a time: 2N views, the positive is the
    other view of the same image, the denominator runs over every view but the anchor. Returns
    the sum of the two directions' means (the official code's scale)."""
    views = [v / v.norm() for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(torch.exp(views[i] @ views[k] / temperature) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(views[i] @ views[positive] / temperature) / denominator)
    return 2 * total / (2 * n)


def test_matches_naive_loop_value_and_gradient():
    torch.manual_seed(0)
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for temperature in (0.1, 0.5, 1.0):
        fast = nt_xent_loss(z1, z2, temperature)
        slow = naive_nt_xent(z1, z2, temperature)
        assert torch.allclose(fast, slow, rtol=1e-10), (temperature, fast, slow)
        g_fast = torch.autograd.grad(fast, (z1, z2))
        g_slow = torch.autograd.grad(slow, (z1, z2))
        for a, b in zip(g_fast, g_slow):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_hand_computed_value():
    # Two images, orthogonal directions, identical views, T = 1. Each of the 4 anchors has its
    # positive at similarity 1 and two negatives at similarity 0:
    #   l = -log(e / (e + 1 + 1)) = log(1 + 2/e);  loss = 2 * mean(l) = 2 log(1 + 2/e) = 1.10289...
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms differ: the loss normalises
    loss = nt_xent_loss(z, z.clone() * 2, temperature=1.0)
    assert math.isclose(loss.item(), 2 * math.log(1 + 2 / math.e), rel_tol=1e-6)


def test_invariant_to_batch_order_and_scale():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    perm = torch.randperm(8)
    base = nt_xent_loss(z1, z2, 0.2)
    assert torch.allclose(base, nt_xent_loss(z1[perm], z2[perm], 0.2), atol=1e-6)
    assert torch.allclose(base, nt_xent_loss(3 * z1, 0.5 * z2, 0.2), atol=1e-6)
    # swapping the two views changes nothing either (the loss is symmetric)
    assert torch.allclose(base, nt_xent_loss(z2, z1, 0.2), atol=1e-6)


def test_uniform_embeddings_give_log_of_negatives():
    # All views identical: every logit equal, so each anchor's loss is log(2N - 1).
    z = torch.ones(5, 3)
    assert math.isclose(nt_xent_loss(z, z, 0.5).item(), 2 * math.log(2 * 5 - 1), rel_tol=1e-6)
