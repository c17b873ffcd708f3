"""--probe: the backbone trains bit-identically with and without it; the probe learns; a
resumed run with it ends exactly as an uninterrupted one."""
import shutil
from types import SimpleNamespace

import torch
import torch.nn as nn

from common.probe import OnlineProbe
from tests.helpers import TINY, assert_same_tensors, make_image_folder, read_log

FLAGS = ["--data", "synthetic", *TINY, "--synthetic-size", "32", "--knn-every", "0",
         "--epochs", "2", "--warmup-epochs", "1"]  # one step per epoch


def test_backbone_unchanged_and_resume_exact(tmp_path):
    import simclr
    simclr.main([*FLAGS, "--run-dir", str(tmp_path / "plain")])
    simclr.main([*FLAGS, "--probe", "--save-every", "1", "--run-dir", str(tmp_path / "probe")])
    plain = torch.load(tmp_path / "plain/checkpoint.pt", weights_only=False)
    probe = torch.load(tmp_path / "probe/checkpoint.pt", weights_only=False)
    assert_same_tensors(plain["model"], probe["model"])  # weights and BN statistics
    assert plain["probe"] is None and probe["probe"]["head"]["weight"].shape == (10, 512)
    log = read_log(tmp_path / "probe")
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(tmp_path / "plain")]
    assert [r["epoch"] for r in log if "probe_top1" in r] == [1, 2]

    resumed = tmp_path / "resumed"  # from the checkpoint kept after epoch 1
    resumed.mkdir()
    shutil.copy(tmp_path / "probe/checkpoint_epoch1.pt", resumed / "checkpoint.pt")
    simclr.main([*FLAGS, "--probe", "--run-dir", str(resumed)])
    again = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert_same_tensors(probe["model"], again["model"])
    assert_same_tensors(probe["probe"]["head"], again["probe"]["head"])
    assert read_log(resumed)[-1]["probe_top1"] == log[-1]["probe_top1"]
    assert not torch.equal(probe["probe"]["head"]["weight"],  # control: the probe did move
                           torch.load(tmp_path / "probe/checkpoint_epoch1.pt",
                                      weights_only=False)["probe"]["head"]["weight"])


class MeanColour(nn.Module):
    """A fixed 'backbone' whose 3 features are the image's mean colour."""
    feature_dim = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_the_probe_learns(tmp_path):
    """Classes differ by brightness (make_image_folder): from the caught training features the
    probe goes from chance to almost every val image right."""
    from common.data import build_dataset, eval_transform
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=10)
    args = SimpleNamespace(data=str(root), data_dir="data", synthetic_size=0, img_size=16,
                           batch_size=16, workers=0, precision="fp32", seed=0, probe_lr=0.5)
    backbone = MeanColour()
    probe = OnlineProbe(backbone, args, torch.device("cpu"))
    before = probe.top1(backbone)
    train = build_dataset(str(root), "train", eval_transform(16))
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    backbone.train()
    for _ in range(60):
        for x, y in loader:
            backbone(x)          # the hook catches the features of this "training step"
            probe.step(y)
    after = probe.top1(backbone)
    assert before < 60 and after >= 90, (before, after)
    backbone.eval()
    backbone(x)  # not caught in eval mode (the kNN monitor's and evaluation's calls)
    assert probe.features is None
