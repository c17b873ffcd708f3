"""common/: LARS, schedules, kNN, architecture inference, atomic checkpoints, seeded samples."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from common.errors import UserError
from common.data import make_loader
from common.model import build_backbone, resnet_backbone
from common.weights import infer_arch
from common.optim import LARS, param_groups, warmup_cosine
from common.run import embedding_std
from common.dist import gather_with_grad
from common.knn import knn_predict
from common.checkpoint import atomic_save, load_checkpoint, rng_state, save_checkpoint
from common.augment import FastView, ssl_view
from common.named_data import SyntheticImages


def test_lars_step_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight | bias, BN weight, BN bias
    opt = LARS(groups, lr=0.5, momentum=0.9, eta=0.001)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model(torch.randn(5, 4)).pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for _ in range(2):  # the second step exercises the momentum buffer
        opt.step()

    w, g = before["0.weight"], grads["0.weight"]
    d = g + 0.1 * w
    d = d * 0.001 * w.norm() / d.norm()
    # after two steps with the same gradient: m1 = d1, m2 = 0.9 m1 + d2 (d2 uses updated w)
    w1 = w - 0.5 * d
    d2 = g + 0.1 * w1
    d2 = d2 * 0.001 * w1.norm() / d2.norm()
    w2 = w1 - 0.5 * (0.9 * d + d2)
    assert torch.allclose(model[0].weight, w2, atol=1e-7)
    # 1-D parameters: plain momentum SGD, no decay, no trust ratio
    b, gb = before["0.bias"], grads["0.bias"]
    assert torch.allclose(model[0].bias, b - 0.5 * gb - 0.5 * (0.9 * gb + gb), atol=1e-7)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 100, 10, 2.0) == 0.0
    assert warmup_cosine(5, 100, 10, 2.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(55, 100, 10, 2.0, final=0.2) == pytest.approx(1.1)  # cosine midpoint
    assert warmup_cosine(100, 100, 10, 2.0, final=0.2) == pytest.approx(0.2)
    # EMA-style use without warmup: tau from 0.996 to 1 (BYOL's schedule)
    assert warmup_cosine(0, 50, 0, 0.996, final=1.0) == pytest.approx(0.996)
    assert warmup_cosine(25, 50, 0, 0.996, final=1.0) == pytest.approx(0.998)
    assert warmup_cosine(50, 50, 0, 0.996, final=1.0) == pytest.approx(1.0)
    # SwAV's warmup from a non-zero rate: 0.3 -> 4.8 over 10 steps
    assert warmup_cosine(0, 100, 10, 4.8, start=0.3) == pytest.approx(0.3)
    assert warmup_cosine(5, 100, 10, 4.8, start=0.3) == pytest.approx(2.55)
    assert warmup_cosine(10, 100, 10, 4.8, start=0.3) == pytest.approx(4.8)


def test_knn_against_naive_vote():
    torch.manual_seed(0)
    train_f = nn.functional.normalize(torch.randn(60, 8), dim=1)
    train_y = torch.randint(0, 4, (60,))
    test_f = nn.functional.normalize(torch.randn(7, 8), dim=1)
    k, T = 5, 0.07
    fast = knn_predict(train_f, train_y, test_f, num_classes=4, k=k, temperature=T, chunk=3)
    for i in range(7):
        sims = [(float(test_f[i] @ train_f[j]), int(train_y[j])) for j in range(60)]
        votes = [0.0] * 4
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / T)
        assert torch.allclose(fast[i], torch.tensor(votes), rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
@pytest.mark.parametrize("cifar_stem", [False, True])
def test_infer_arch_from_weights(arch, cifar_stem):
    sd = resnet_backbone(arch, cifar_stem).state_dict()
    assert infer_arch(sd) == (arch, cifar_stem)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="not supported"):
        build_backbone("vgg16", small_images=True)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = type("Args", (), {})()
    save_checkpoint(path, "test", args, model, opt, scaler, 1, 0, [rng_state()])
    good = load_checkpoint(path)

    real_save = torch.save

    def dying_save(obj, f):  # writes part of the file, then the process "dies"
        real_save(obj, f)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "test", args, model, opt, scaler, 2, 0, [rng_state()])
    monkeypatch.undo()
    after = load_checkpoint(path)
    assert after["epoch"] == 1 and torch.equal(after["model"]["weight"], good["model"]["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    atomic_save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="not a cleanssl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_augmentations_depend_on_seed_epoch_index_not_workers():
    view = FastView(ssl_view(16, blur_p=0.5, solarize_p=0.2))
    data = SyntheticImages(24, 16, transform=view)

    def epoch_batches(workers, epoch, skip=0):
        loader = make_loader(data, 6, workers, seed=3, seeded=True)
        loader.sampler.set_epoch(epoch, skip_batches=skip)
        return [x for x, _ in loader]

    a, b = epoch_batches(0, epoch=1), epoch_batches(2, epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 4
    assert all(torch.equal(x, y) for x, y in zip(a[2:], epoch_batches(2, epoch=1, skip=2)))
    assert not torch.equal(a[0], epoch_batches(0, epoch=2)[0])  # a new epoch: new order and views


def test_backbone_is_a_torchvision_resnet():
    net = resnet_backbone("resnet18")
    ref = torchvision.models.resnet18()
    missing, unexpected = ref.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_knn_memory_cap_reads_stl10_labels():
    """torchvision's STL-10 keeps its classes in `labels`, not `targets`: the kNN monitor's cap
    on a split larger than its memory still works, each kept image with its own label."""
    from common.knn import capped

    class LabelsOnly(torch.utils.data.Dataset):  # as torchvision.datasets.STL10
        labels = np.arange(50) % 10

        def __len__(self):
            return 50

        def __getitem__(self, i):
            return torch.zeros(1), int(self.labels[i])

    subset = capped(LabelsOnly(), 20)
    assert len(subset) == 20 == len(set(subset.indices))
    assert subset.targets == [subset[j][1] for j in range(20)]


def test_feature_pass_progress_in_a_log_file_and_on_a_terminal(monkeypatch, capsys):
    """linear_eval.py's feature passes print a line every tenth of the way in a log file; the
    training monitors' (leave=False) print none there, and on a terminal show a bar that is
    cleared when done (tqdm's leave), so each epoch's kNN does not fill a Slurm log."""
    import io
    import sys
    from common.knn import extract_features

    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.arange(40) % 4)
    args = (nn.Identity(), data, 2, 0, torch.device("cpu"))
    extract_features(*args, progress="features")
    assert capsys.readouterr().out.count("features ") == 10
    extract_features(*args, progress="kNN monitor", leave=False)
    assert capsys.readouterr().out == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    f, _ = extract_features(*args, progress="kNN monitor", leave=False)
    assert "kNN monitor" in terminal.getvalue() and capsys.readouterr().out == ""
    assert terminal.getvalue().endswith("\r")  # the bar overwritten by blanks (leave=True ends "\n")
    assert torch.allclose(f, torch.nn.functional.normalize(data.tensors[0], dim=1))


def test_embedding_std_collapsed_and_spread():
    """The collapse monitor (SimSiam paper, section 4.1): 0 for one output, whatever its scale;
    about 1/sqrt(d) for outputs spread over the sphere; per dimension, over the batch."""
    row = torch.randn(1, 64)
    assert embedding_std(row.repeat(100, 1)).item() < 1e-7                   # collapsed: 0
    assert embedding_std(row.repeat(100, 1) * torch.rand(100, 1)).item() < 1e-6  # same direction
    torch.manual_seed(2)
    for d in (16, 256):  # Gaussian outputs: each coordinate of z/||z|| has std ~ 1/sqrt(d)
        std = embedding_std(torch.randn(8192, d)).item()
        assert abs(std * math.sqrt(d) - 1) < 0.03, (d, std)
    # per dimension over the batch, not per sample over dimensions: a constant column is 0
    z = torch.zeros(4, 2)
    z[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    z[:, 1] = 1.0
    u0 = 1 / math.sqrt(2)  # both columns are +-1/sqrt(2) after normalising; column 1 is constant
    expected = (torch.tensor([u0, -u0, u0, -u0]).std().item() + 0.0) / 2
    assert math.isclose(embedding_std(z).item(), expected, rel_tol=1e-6)


def test_a_loader_epoch_leaves_the_global_generator_alone():
    """A DataLoader draws its workers' base seed at every epoch, from the global generator
    unless given its own: then a run resumed mid-epoch (fewer batches, another epoch count
    since the start) would draw other stochastic-depth or dropout masks afterwards."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = make_loader(SyntheticImages(8, 8, torchvision.transforms.ToTensor()), 4, 0, seed=1,
                         seeded=True)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        assert len(list(loader)) == 2
    assert torch.equal(torch.rand(3), expected)
