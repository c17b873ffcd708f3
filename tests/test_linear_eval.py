"""linear_eval.py: 2 gloo processes equal 1 (images, cached features, kNN) and a head outside DDP
does not; exact resume; the saved head and the result; evaluation only; fine-tuning moves the
backbone and the linear protocol does not; labelled subsets; the official checkpoint layouts;
nothing foreign is unpickled."""
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from common.checkpoint import FORMAT, export_backbone, load_checkpoint
from common.data import build_dataset, eval_transform
from common.evaluation import class_balanced_indices, labelled_subset
from common.knn import knn_predict
from common.errors import UserError
from common.log import Progress
from common.model import resnet_backbone
from common.weights import load_backbone
import linear_eval
from tests.helpers import assert_same_tensors, make_image_folder, ok, read_log, run

# 64 synthetic train images at 16 px; --train-percent 50 keeps 32 (4 steps of 8 per epoch);
# 17 val images (68 // 4), an odd count: 2 ranks pad their shards to 9 + 9, so an image counted
# twice would change every accuracy
DATA = ["--data", "synthetic", "--synthetic-size", "68", "--img-size", "16", "--workers", "0"]
TRAIN = [*DATA, "--batch-size", "8", "--epochs", "2", "--lr", "2.0", "--log-every", "1",
         "--train-percent", "50", "--eval-every", "1"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# float sums in another order (2 x 4 images instead of 8): agreement to ~1e-8 measured
RTOL, ATOL = 1e-5, 1e-6
# the control: each rank trains its own head on its half of every batch (no DDP)
NO_DDP = """\
import linear_eval
distribute = linear_eval.distribute
linear_eval.distribute = lambda model, device, world, **kw: distribute(model, device, 1, **kw)
linear_eval.main()
"""


@pytest.fixture(scope="module")
def backbone_file(module_tmp):
    """A randomly initialised ResNet-18 (small-image stem) as backbone.pt, with BN running
    statistics that are not the initial 0 and 1 (so that eval mode matters)."""
    path = module_tmp("backbone") / "backbone.pt"
    torch.manual_seed(0)
    net = resnet_backbone("resnet18", cifar_stem=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    export_backbone(net, path)
    return path


def evaluate(*argv):
    """linear_eval.py's main() in this process (no interpreter start-up), with the signal
    handlers it installs restored afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return linear_eval.main([str(a) for a in argv])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def runs(backbone_file, module_tmp):
    """The same linear evaluation as 1 process, as 2 (torchrun), and as 2 without DDP."""
    root = module_tmp("linear")
    evaluate("--ckpt", backbone_file, *TRAIN, "--run-dir", root / "one")
    ok(run([*TORCHRUN, "linear_eval.py", "--ckpt", backbone_file, *TRAIN, "--run-dir",
            root / "two"], timeout=300))
    (root / "no_ddp.py").write_text(NO_DDP)
    ok(run([*TORCHRUN, root / "no_ddp.py", "--ckpt", backbone_file, *TRAIN, "--run-dir",
            root / "no_ddp"], timeout=300))
    return root


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)["model"]


def result(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


@pytest.mark.full
def test_two_processes_train_the_head_of_one(runs):
    one, two, control = weights(runs / "one"), weights(runs / "two"), weights(runs / "no_ddp")
    for key in ("head.weight", "head.bias"):
        assert torch.allclose(one[key], two[key], rtol=RTOL, atol=ATOL), key
    assert not torch.allclose(one["head.weight"], control["head.weight"], rtol=RTOL, atol=ATOL)
    a, b = result(runs / "one"), result(runs / "two")
    assert (a["top1"], a["top5"], a["train_images"]) == (b["top1"], b["top5"], b["train_images"])
    assert a["train_images"] == 34  # 50% of 68, the same subset on both ranks (else no match)
    args = json.loads((runs / "two" / "args.json").read_text())
    assert args["world_size"] == 2 and args["batch_size"] == 8  # global: 4 per rank
    # the two per-epoch validations, logged; the best one reported beside the final one
    evaluated = [r for r in read_log(runs / "two") if "val_top1" in r]
    assert [r["epoch"] for r in evaluated] == [1, 2]
    assert b["top1"] == pytest.approx(evaluated[-1]["val_top1"], rel=1e-6)  # log: 7 digits
    assert b["best_top1"] == pytest.approx(max(r["val_top1"] for r in evaluated), rel=1e-6)
    assert "after the final epoch" in b["reported"] and "best" in b["reported"]


def test_linear_protocol_leaves_the_backbone_untouched(runs, backbone_file):
    source = torch.load(backbone_file)
    model = weights(runs / "two")
    # every weight and every BN statistic, bit for bit: frozen and in eval mode throughout
    assert_same_tensors({k: model["backbone." + k] for k in source}, source)
    assert not (runs / "two" / "backbone.pt").exists()  # only fine-tuning exports one


def test_saved_head_and_evaluation_only(runs, backbone_file, tmp_path):
    head = torch.load(runs / "one" / "linear_head.pt")
    model = weights(runs / "one")
    assert torch.equal(head["weight"], model["head.weight"])
    assert torch.equal(head["bias"], model["head.bias"])
    assert head["classes"] == [f"class_{c}" for c in range(10)] and head["protocol"] == "linear"
    evaluate("--ckpt", backbone_file, *DATA, "--eval-only", runs / "one" / "linear_head.pt",
             "--run-dir", tmp_path / "eval")
    evaluated, trained = result(tmp_path / "eval"), result(runs / "one")
    assert (evaluated["top1"], evaluated["top5"]) == (trained["top1"], trained["top5"])
    assert not (tmp_path / "eval" / "checkpoint.pt").exists()  # no training


def test_knn_and_eval_only_keep_a_folder_to_their_run(runs, backbone_file, tmp_path, capsys):
    """--knn and --eval-only write no checkpoint, but their folder holds their run as a training
    run's does: another evaluation there is refused in one line and the result.json stays; the
    same command again computes the same result."""
    knn = tmp_path / "knn"
    first = evaluate("--ckpt", backbone_file, *DATA, "--knn", "--knn-k", "5", "--run-dir", knn)
    kept = (knn / "result.json").read_text()
    capsys.readouterr()
    for other in (["--knn", "--knn-k", "7"], ["--eval-only", runs / "one" / "linear_head.pt"]):
        with pytest.raises(SystemExit) as exit:
            evaluate("--ckpt", backbone_file, *DATA, *other, "--run-dir", knn)
        assert exit.value.code == 2
        assert "holds a run with other settings" in capsys.readouterr().err
        assert (knn / "result.json").read_text() == kept
    assert evaluate("--ckpt", backbone_file, *DATA, "--knn", "--knn-k", "5",
                    "--run-dir", knn) == first
    with pytest.raises(SystemExit):  # nor may an --eval-only overwrite a trained head's result
        evaluate("--ckpt", backbone_file, *DATA, "--eval-only", runs / "one" / "linear_head.pt",
                 "--run-dir", runs / "one")
    assert json.loads((runs / "one" / "result.json").read_text())["protocol"] == "linear"


@pytest.mark.full
def test_cached_features_and_knn_two_processes_equal_one(backbone_file, tmp_path):
    cached = [*DATA, "--cached-features", "--batch-size", "8", "--epochs", "3", "--lr", "0.5"]
    evaluate("--ckpt", backbone_file, *cached, "--run-dir", tmp_path / "one")
    ok(run([*TORCHRUN, "linear_eval.py", "--ckpt", backbone_file, *cached, "--run-dir",
            tmp_path / "two"], timeout=300))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    # unnormalised features (losses ~10-30) amplify the different float32 summation order of 1
    # process and 2: 4.8e-6 apart at most for weights up to 0.24 (lr 2.0: 1.5e-5), hence atol 1e-5
    assert torch.allclose(one["head.weight"], two["head.weight"], rtol=RTOL, atol=1e-5)
    assert result(tmp_path / "one")["top1"] == result(tmp_path / "two")["top1"]

    ok(run([*TORCHRUN, "linear_eval.py", "--ckpt", backbone_file, *DATA, "--knn",
            "--batch-size", "8", "--knn-k", "5", "--run-dir", tmp_path / "knn"], timeout=300))
    # the same vote by hand, in this process, over all 68 train and all 17 val images
    backbone = resnet_backbone("resnet18", cifar_stem=True)
    backbone.load_state_dict(torch.load(backbone_file), strict=False)
    backbone.eval()
    feats = {}
    for split in ("train", "val"):
        ds = build_dataset("synthetic", split, eval_transform(16), synthetic_size=68, img_size=16)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            feats[split] = (nn.functional.normalize(backbone(x), dim=1), torch.tensor(ds.targets))
    votes = knn_predict(*feats["train"], feats["val"][0], 10, k=5, temperature=0.07)
    expected = 100.0 * (votes.argmax(1) == feats["val"][1]).sum().item() / 17
    assert result(tmp_path / "knn")["knn_top1"] == pytest.approx(expected, abs=1e-6)


def test_interrupted_and_resumed_equals_uninterrupted(runs, backbone_file, tmp_path, monkeypatch,
                                                     capsys):
    """SIGUSR1 during the second step of epoch 1 (sent by the loader's iterator as it hands out
    that batch): the run saves there and stops; the same command resumes and ends exactly as
    the uninterrupted run."""
    class SignalInStepTwo(Progress):
        def __iter__(self):
            for j, item in enumerate(super().__iter__()):
                if self.desc.startswith("epoch 1/") and j == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                yield item

    run_dir = tmp_path / "resumed"
    monkeypatch.setattr("common.run.Progress", SignalInStepTwo)
    evaluate("--ckpt", backbone_file, *TRAIN, "--run-dir", run_dir)
    stopped = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (0, 2)
    assert not (run_dir / "result.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    evaluate("--ckpt", backbone_file, *TRAIN, "--run-dir", run_dir)
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(runs / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert_same_tensors(a["model"], b["model"])
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"],
                           b["optimizer"]["state"][k]["momentum_buffer"]), k
    assert (a["epoch"], a["best"]) == (b["epoch"], b["best"])
    assert result(run_dir)["top1"] == result(runs / "one")["top1"]
    steps = [r["step"] for r in read_log(run_dir) if "step" in r]
    assert steps == list(range(1, 9))  # every step once, across the stop

    # the same run directory with another evaluation is refused, not silently mixed
    with pytest.raises(SystemExit) as exit:
        evaluate("--ckpt", backbone_file, *TRAIN, "--epochs", "3", "--run-dir", run_dir)
    assert exit.value.code == 2
    assert "holds a run with other settings (--epochs" in capsys.readouterr().err


def test_finetuning_moves_the_backbone(backbone_file, tmp_path, capsys):
    run_dir = tmp_path / "ft"
    evaluate("--ckpt", backbone_file, *DATA, "--finetune", "--train-percent", "50", "--epochs",
             "1", "--batch-size", "8", "--run-dir", run_dir)
    out = capsys.readouterr().out
    # 50% of the labels: the nearest published fraction is 10%, VICReg's values at batch 8
    assert "vicreg's 10% recipe" in out and "0.1 x 8/256" in out and "0.01 x 8/256" in out
    source, tuned = torch.load(backbone_file), torch.load(run_dir / "backbone.pt")
    assert source.keys() == tuned.keys()
    assert not torch.equal(source["conv1.weight"], tuned["conv1.weight"])  # trained
    assert not torch.equal(source["bn1.running_mean"], tuned["bn1.running_mean"])  # BN in train mode
    assert result(run_dir)["protocol"] == "fine-tuned"
    # the fine-tuned backbone and its head evaluate to the run's result
    evaluate("--ckpt", run_dir / "backbone.pt", *DATA, "--eval-only", run_dir / "linear_head.pt",
             "--run-dir", tmp_path / "eval")
    assert result(tmp_path / "eval")["top1"] == result(run_dir)["top1"]


# ---------------------------------------------------------------- labelled subsets

def test_class_balanced_subset_sizes_and_seed():
    targets = [c for c in range(7) for _ in range(40 + 5 * c)] + [7] * 2  # classes of 40..70 and 2
    idx = class_balanced_indices(targets, percent=10, seed=3)
    assert len(idx) == int(len(targets) * 0.10) == 38 and idx == sorted(set(idx))
    per_class = Counter(targets[i] for i in idx)
    # 38 images: class 7 gives its 2, the seven others 5 each, and one of them one more
    assert per_class[7] == 2 and sorted(per_class[c] for c in range(7)) == [5] * 6 + [6]
    assert class_balanced_indices(targets, 10, seed=3) == idx  # every run, every rank
    assert class_balanced_indices(targets, 10, seed=4) != idx
    # the published ImageNet lists: 1% of 1,281,167 images of 1000 classes, 12 or 13 each
    imagenet = [i % 1000 for i in range(1281167)]
    counts = Counter(Counter(imagenet[i] for i in class_balanced_indices(imagenet, 1)).values())
    assert counts == {13: 811, 12: 189}


def test_listed_subset_reads_published_file_names(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=3, train_per_class=4, val_per_class=1)
    for c in range(3):  # file names as ImageNet's: unique, prefixed by the class
        for p in (root / "train" / f"class{c}").iterdir():
            p.rename(p.with_name(f"n0{c}_{p.name}"))
    train = build_dataset(str(root), "train", None)
    listing = tmp_path / "list.txt"
    listing.write_text("n01_0.jpg\nn02_3.jpg\nclass0/n00_1.jpg\n\n")
    subset = labelled_subset(train, list_file=listing)
    assert sorted(os.path.basename(train.samples[i][0]) for i in subset.indices) == \
        ["n00_1.jpg", "n01_0.jpg", "n02_3.jpg"]
    assert subset.targets == [0, 1, 2]
    listing.write_text("n01_0.jpg\nn09_9.jpg\n")
    with pytest.raises(UserError, match="1 of its 2 names are not .* e.g. n09_9.jpg"):
        labelled_subset(train, list_file=listing)


# ---------------------------------------------------------------- official checkpoints

def randomised(model):
    """`model` with random BN statistics (eval-mode features then depend on them)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def official_layouts(source):
    """Each official training script's checkpoint, built around the ResNet-50 `source` the way
    that script's model names its parts, with other random modules beside it."""
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    other = {k: v + 1 for k, v in sd.items()}  # e.g. MoCo's key encoder: not the backbone
    mlp = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128)).state_dict()
    prefixed = lambda prefix, d: {prefix + k: v for k, v in d.items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    return {
        # main_moco.py: DDP(MoCo(...)) with encoder_q, encoder_k (fc: the MLP head), queue
        "moco": {"epoch": 800, "arch": "resnet50", "optimizer": optimizer, "state_dict": {
            **prefixed("module.encoder_q.", sd), **prefixed("module.encoder_q.fc.", mlp),
            **prefixed("module.encoder_k.", other), **prefixed("module.encoder_k.fc.", mlp),
            "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1).long()}},
        # main_simsiam.py: DDP(SimSiam(...)): encoder (fc: the projector), predictor
        "simsiam": {"epoch": 100, "arch": "resnet50", "optimizer": optimizer, "state_dict": {
            **prefixed("module.encoder.", sd), **prefixed("module.encoder.fc.", mlp),
            **prefixed("module.predictor.", mlp)}},
        # main_swav.py: DDP(ResNet with projection_head and prototypes), saved as is
        "swav": {**prefixed("module.", sd), **prefixed("module.projection_head.", mlp),
                 "module.prototypes.weight": torch.randn(3000, 128)},
        # barlowtwins main.py / vicreg main_vicreg.py: resnet50.pth = the backbone's state dict
        "resnet50.pth": dict(sd),
        # their full checkpoints: {"model": DDP(model).state_dict(), "optimizer", "epoch"}
        "full": {"epoch": 1000, "optimizer": optimizer, "model": {
            **prefixed("module.backbone.", sd), **prefixed("module.projector.", mlp)}},
        # a supervised torchvision checkpoint, fc included
        "torchvision": source.state_dict(),
        # any other codebase: one ResNet under one prefix
        "prefix": {**prefixed("net.trunk.", sd), "net.head.weight": torch.randn(10, 2048)},
    }


def test_official_checkpoint_layouts_give_the_source_features(tmp_path):
    torch.manual_seed(0)
    source = randomised(torchvision.models.resnet50())
    layouts = official_layouts(source)
    source.fc = nn.Identity()
    source.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        backbone, info = load_backbone(tmp_path / f"{name}.pth")
        assert (info["arch"], info["small_images"]) == ("resnet50", False), name
        backbone.eval()
        with torch.no_grad():
            assert torch.equal(backbone(x), expected), name
    assert load_backbone(tmp_path / "moco.pth")[1]["dropped"] == \
        ["module.encoder_k", "module.encoder_q.fc", "module.queue", "module.queue_ptr"]
    assert load_backbone(tmp_path / "swav.pth")[1]["dropped"] == \
        ["module.projection_head", "module.prototypes"]


def test_an_official_layout_end_to_end(tmp_path, capsys):
    """The command of a user with an official MoCo release (here a ResNet-18 in its layout)."""
    torch.manual_seed(0)
    source = randomised(torchvision.models.resnet18())
    sd = {"module.encoder_q." + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": sd}, path)
    evaluate("--ckpt", path, "--data", "synthetic", "--img-size", "32", "--synthetic-size", "32",
             "--workers", "0", "--knn", "--batch-size", "16", "--run-dir", tmp_path / "run")
    out = capsys.readouterr().out
    assert "MoCo v1/v2: resnet18 (ImageNet stem)" in out
    assert "dropped (not the backbone): module.encoder_q.fc" in out
    assert 0 <= result(tmp_path / "run")["knn_top1"] <= 100


def test_a_run_directory_reads_its_last_save(backbone_file, tmp_path):
    """--ckpt RUN_DIR (it was 'no such file'): its checkpoint.pt, the last save (a stop writes
    only that one), else its backbone.pt; a folder with neither is one line."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(UserError, match="run: a folder without checkpoint.pt or backbone.pt"):
        load_backbone(run_dir)
    (run_dir / "backbone.pt").write_bytes(backbone_file.read_bytes())
    backbone, info = load_backbone(run_dir)
    assert info["path"] == str(run_dir / "backbone.pt")
    assert_same_tensors(backbone.state_dict(), load_backbone(backbone_file)[0].state_dict())
    later = {"backbone." + k: v + 1 for k, v in torch.load(backbone_file).items()}
    torch.save({"format": FORMAT, "method": "simclr", "args": {}, "model": later},
               run_dir / "checkpoint.pt")
    backbone, info = load_backbone(run_dir)
    assert info["path"] == str(run_dir / "checkpoint.pt")
    assert torch.equal(backbone.conv1.weight, later["backbone.conv1.weight"])


def test_unknown_and_ambiguous_layouts_are_one_clear_line(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "unknown.pt")
    with pytest.raises(UserError, match="no ResNet or ViT found in it; known layouts: .*MoCo"):
        load_backbone(tmp_path / "unknown.pt")
    sd = resnet_backbone("resnet18").state_dict()
    torch.save({**{"a." + k: v for k, v in sd.items()}, **{"b." + k: v for k, v in sd.items()}},
               tmp_path / "two.pt")
    with pytest.raises(UserError, match="several ResNets in it \\(prefixes 'a.', 'b.'\\)"):
        load_backbone(tmp_path / "two.pt")


# ---------------------------------------------------------------- nothing foreign executes

class CreatesAFile:
    """Unpickling this object opens (creates) the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    foreign = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": CreatesAFile(str(marker))}
    ours = {"format": FORMAT, "model": {}, "args": {}, "x": CreatesAFile(str(marker))}
    torch.save(foreign, tmp_path / "foreign.pt")
    torch.save(ours, tmp_path / "ours.pt")  # claiming to be one of ours changes nothing
    proc = run(["linear_eval.py", "--ckpt", tmp_path / "foreign.pt", "--data", "synthetic"],
               timeout=120)
    assert proc.returncode == 2 and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused, loading it would run code" in lines[0], proc.stderr
    assert "`io.open`" in lines[0]  # names what it would have called
    for name in ("foreign.pt", "ours.pt"):
        with pytest.raises(UserError, match="refused"):
            load_backbone(tmp_path / name)
        with pytest.raises(UserError, match="refused"):  # resuming a run: the same rule
            load_checkpoint(tmp_path / name)
    assert not marker.exists()
    # the control: the same object unpickled without the restriction does create the file
    torch.load(tmp_path / "ours.pt", weights_only=False)
    assert marker.exists()
