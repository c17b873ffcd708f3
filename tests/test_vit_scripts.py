"""Vision Transformers in the scripts: every method trains a tiny ViT and resumes exactly, each
--arch vit_* selects the method's ViT recipe (and a flag given still wins), MoCo v2 on a ViT has
no BatchNorm to split or shuffle, and linear_eval.py evaluates a ViT backbone.pt and an official
(DINO-layout) ViT checkpoint. Two processes against one for a ViT: tests/test_swav.py."""
import importlib
from pathlib import Path

import pytest
import torch

import linear_eval
import moco
from common.errors import UserError
from tests.helpers import assert_same_tensors

METHODS = ("simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg", "mocov3", "dino")
# vit_tiny with patch 4 on 16 px synthetic images (a 4 x 4 grid): 2 steps per epoch
TINY_VIT = ["--data", "synthetic", "--arch", "vit_tiny", "--img-size", "16", "--synthetic-size",
            "32", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--knn-every", "0",
            "--warmup-epochs", "1"]
OWN = {"moco": ["--queue-size", "32"], "swav": ["--num-prototypes", "20"],
       "mocov3": ["--hidden-dim", "64", "--proj-dim", "32"],
       "dino": ["--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32"]}


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize("method", [m if m == "simclr" else pytest.param(m, marks=pytest.mark.full)
                                    for m in METHODS])  # one in the default tier, all in the full
def test_every_script_trains_a_vit_and_resumes_exactly(method, tmp_path):
    main = importlib.import_module(method).main
    flags = [*TINY_VIT, *OWN.get(method, []), "--epochs", "2"]
    main([*flags, "--run-dir", str(tmp_path / "straight")])
    # the same run stopped after epoch 1 (its --save-every copy) and resumed
    split = tmp_path / "split"
    main([*flags, "--run-dir", str(split), "--save-every", "1"])
    (split / "checkpoint_epoch1.pt").replace(split / "checkpoint.pt")
    epoch1 = weights(split)
    main([*flags, "--run-dir", str(split)])
    final = weights(tmp_path / "straight")
    assert_same_tensors(final, weights(split))
    # epoch 2 trained the ViT, but not MoCo v3's frozen random patch projection (DINO's ViT, its
    # teacher under `backbone.`, has none; its EMA moves a weight near 1 by less than its ulp)
    trained = ("backbone.encoder.layers.encoder_layer_0.mlp.0.weight" if method == "dino"
               else "backbone.encoder.ln.weight")
    assert not torch.equal(epoch1[trained], final[trained])
    frozen = () if method == "dino" else ("backbone.conv_proj.weight", "backbone.encoder.pos_embedding")
    for name in frozen:
        assert torch.equal(epoch1[name], final[name]), name
    backbone = torch.load(tmp_path / "straight" / "backbone.pt")
    assert "class_token" in backbone and not any(k.startswith("heads") for k in backbone)


@pytest.mark.parametrize("method", METHODS)
def test_vit_recipes(method):
    script = importlib.import_module(method)
    args = script.get_args(["--data", "/imagenet", "--arch", "vit_small"])
    assert args.optimizer == "adamw" and args.recipe == script.VIT["recipe"]
    for key, value in script.VIT.items():
        if key != "recipe":
            plain = lambda v: list(v) if isinstance(v, (tuple, list)) else v
            assert plain(getattr(args, key)) == plain(value), key
    small = script.get_args(["--data", "cifar10", "--arch", "vit_small"])
    assert small.recipe == script.VIT_SMALL_IMAGES["recipe"] and small.img_size == 32
    assert small.epochs == script.VIT_SMALL_IMAGES.get("epochs", script.SMALL_IMAGES["epochs"])
    # a flag given on the command line still wins; a ResNet keeps the paper's recipe
    assert script.get_args(["--data", "/imagenet", "--arch", "vit_small", "--lr", "0.001",
                            "--optimizer", "lars"]).lr == 0.001
    if method == "dino":  # its default is a ViT; a ResNet takes the README's ResNet-50 command
        resnet = script.get_args(["--data", "/imagenet", "--arch", "resnet50"])
        assert resnet.recipe == script.RESNET_RECIPE and resnet.optimizer == "sgd"
        return
    resnet = script.get_args(["--data", "/imagenet"])
    assert resnet.recipe == "ImageNet" and resnet.optimizer == script.IMAGENET["optimizer"]


def test_vit_recipe_values_from_their_sources():
    # the numbers the sources give (see each script's comment): the MoCo v3 paper for SimCLR
    # and BYOL on ViT-B/16, the DINO authors' MoCo v2 run
    import byol
    import simclr
    assert (simclr.VIT["lr"], simclr.VIT["weight_decay"], simclr.VIT["warmup_epochs"]) == (
        2e-4, 0.1, 40)
    assert (byol.VIT["lr"], byol.VIT["weight_decay"]) == (1e-4, 0.03)
    assert (moco.VIT["lr"], moco.VIT["weight_decay"], moco.VIT["temperature"]) == (5e-4, 0.05,
                                                                                   0.1)
    args = byol.get_args(["--data", "/imagenet", "--arch", "vit_base"])
    assert args.preset is None and args.lr == 1e-4  # no ResNet preset over the ViT recipe


def test_moco_v2_with_a_vit_has_no_batchnorm_to_shuffle():
    torch.manual_seed(0)
    net = moco.MoCo("vit_tiny", small_images=True, queue_size=8).eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(4, 3, 16, 16)
    direct = torch.nn.functional.normalize(net.key_projector(net.key_backbone(x)), dim=1)
    assert torch.allclose(net.keys(x, seed=3), direct)  # encoded in order, nothing shuffled
    with pytest.raises(UserError, match="no BatchNorm to split"):
        moco.get_args(["--data", "synthetic", "--arch", "vit_tiny", "--bn-splits", "4"])


def resnet_backbone_pt(tmp_path):
    from common.checkpoint import export_backbone
    from common.model import resnet_backbone
    export_backbone(resnet_backbone("resnet18", cifar_stem=True), tmp_path / "resnet18.pt")
    return tmp_path / "resnet18.pt"


def test_linear_eval_on_a_vit_backbone(tmp_path, capsys):
    import simclr
    simclr.main([*TINY_VIT, "--epochs", "1", "--run-dir", str(tmp_path / "run")])
    capsys.readouterr()
    flags = ["--ckpt", str(tmp_path / "run" / "backbone.pt"), "--data", "synthetic",
             "--synthetic-size", "32", "--workers", "0", "--batch-size", "16", "--epochs", "2"]
    result = linear_eval.main([*flags, "--cached-features", "--run-dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "vit_tiny (patch 4 at 32 px" in out and "ViT: lr 3" in out
    assert 0 <= result["top1"] <= 100
    # DINO's linear features: a ViT-Ti reads the class tokens of its last 4 blocks
    dino = linear_eval.main([*flags, "--cached-features", "--vit-features", "dino", "--run-dir",
                             str(tmp_path / "dino")])
    assert "DINO's ViT features: lr 0.001" in capsys.readouterr().out
    assert torch.load(tmp_path / "dino" / "linear_head.pt")["weight"].shape == (10, 4 * 192)
    assert 0 <= dino["top1"] <= 100
    again = linear_eval.main([*flags, "--eval-only", str(tmp_path / "dino" / "linear_head.pt"),
                              "--run-dir", str(tmp_path / "again")])  # reads the head's features
    assert (again["top1"], again["top5"]) == (dino["top1"], dino["top5"])
    with pytest.raises(SystemExit) as stop:  # a ResNet has no tokens
        linear_eval.main(["--ckpt", str(resnet_backbone_pt(tmp_path)), *flags[2:],
                          "--vit-features", "dino", "--run-dir", str(tmp_path / "r")])
    assert stop.value.code == 2 and "not a ViT" in capsys.readouterr().err
    args = linear_eval.get_args(flags)  # the ViT's head rate: MoCo v3's
    args.img_size, args.arch, args.finetune = 16, "vit_tiny", False
    linear_eval.resolve_protocol(args, 100.0)
    assert args.lr == 3.0
    with pytest.raises(SystemExit) as stop:
        linear_eval.main([*flags, "--img-size", "18", "--run-dir", str(tmp_path / "x")])
    assert stop.value.code == 2 and "not a multiple of 4 px" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was made


def test_linear_eval_on_an_official_vit_layout(tmp_path, capsys):
    # a DINO release: a timm-keyed ViT state dict (here a random ViT-Ti/16 re-keyed as DINO's)
    from common.model import build_backbone
    from common.weights import TIMM_TO_TORCHVISION, BLOCK_KEYS
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny")
    to_timm = {v: k for k, v in TIMM_TO_TORCHVISION.items()}
    state = {}
    for key, value in vit.state_dict().items():
        if key in to_timm:
            state[to_timm[key]] = value
            continue
        block, rest = key.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
        name = next(t for t, tv in BLOCK_KEYS.items() if rest.startswith(tv))
        state[f"blocks.{block}.{name}{rest[len(BLOCK_KEYS[name]):]}"] = value
    torch.save(state, tmp_path / "dino_deittiny16_pretrain.pth")
    result = linear_eval.main(["--ckpt", str(tmp_path / "dino_deittiny16_pretrain.pth"),
                               "--data", "synthetic", "--synthetic-size", "32", "--img-size",
                               "32", "--workers", "0", "--batch-size", "16", "--knn",
                               "--run-dir", str(tmp_path / "e")])
    assert "DINO / timm ViT: vit_tiny (patch 16 at 224 px" in capsys.readouterr().out
    assert 0 <= result["knn_top1"] <= 100
