"""Official ViT checkpoints that linear_eval.py read wrong, one test each (issue 30): DINO's
patch-8 releases get the ViT probe recipe; a MoCo v3 ViT-S converted by its convert_to_deit.py
is read with its 12 heads, and DeiT's layout with a learned position embedding, where 6 and 12
heads look alike, is refused unless --vit-heads names the count; MoCo v3's ConvStem ViTs are
refused as what they are; DINO's features are read from bicubically resized val images; the
official linear heads (DINO's *_linearweights.pth, MoCo v3's linear-*.pth.tar) serve --eval-only
and give what the same head gives as our linear_head.pt."""
import json

import pytest
import torch
from torchvision import transforms as T

import linear_eval
from common.checkpoint import export_backbone
from common.errors import UserError
from common.evaluation import dino_eval_transform
from common.vit import VisionTransformerBackbone, mocov3_vit_init
from common.weights import load_backbone
from tests.test_vit import plain_vit, prefixed, randomised, timm_forward, timm_keys

SYNTHETIC = ["--data", "synthetic", "--synthetic-size", "64", "--workers", "0", "--batch-size",
             "16", "--epochs", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mocov3_vit(width=384, layers=2, image_size=32, patch=16, seed=3):
    """A MoCo v3 ViT (12 heads, its init: the fixed sin-cos position embedding) with sharper
    attention, so that the way it is split into heads shows."""
    torch.manual_seed(seed)
    vit = mocov3_vit_init(VisionTransformerBackbone(image_size, patch, layers, 12, width))
    with torch.no_grad():
        for block in vit.encoder.layers:
            block.self_attention.in_proj_weight.mul_(5)
    return vit.eval()


def test_dino_patch_8_release_gets_the_vit_probe_recipe(tmp_path, capsys):
    # dino_deitsmall8_pretrain.pth: a timm-keyed ViT-S/8 (here laid out for 16 px images)
    torch.save(timm_keys(randomised(plain_vit(16, 8, 6, 384), seed=2)), tmp_path / "dino8.pth")
    flags = ["--ckpt", str(tmp_path / "dino8.pth"), *SYNTHETIC, "--img-size", "16",
             "--cached-features"]
    linear_eval.main([*flags, "--vit-features", "dino", "--run-dir", str(tmp_path / "dino")])
    out = capsys.readouterr().out
    assert "vit_small/8 (patch 8 at 16 px, 6 heads)" in out
    assert "DINO's ViT features: lr 0.001" in out  # not the ResNet probe's lr 0.1
    assert json.loads((tmp_path / "dino" / "args.json").read_text())["lr"] == 0.001
    linear_eval.main([*flags, "--run-dir", str(tmp_path / "cls")])
    assert "ViT: lr 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "cls" / "args.json").read_text())["lr"] == 3.0


def test_mocov3_vit_converted_to_deit_keeps_its_12_heads(tmp_path):
    vit = mocov3_vit()
    base = timm_keys(vit)
    # convert_to_deit.py:26-39: module.base_encoder.* without the projector `head`, as {'model'}
    torch.save({"model": base}, tmp_path / "vit-s-deit.pth")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    backbone, info = load_backbone(tmp_path / "vit-s-deit.pth")
    assert "12 heads, by its position embedding, MoCo v3's fixed sin-cos one" in info["description"]
    with torch.no_grad():
        features = backbone.eval()(images)
        assert torch.allclose(features, timm_forward(base, images, heads=12), atol=1e-5)
        assert torch.allclose(features, vit(images), atol=1e-5)
        assert not torch.allclose(features, timm_forward(base, images, heads=6), atol=1e-2)
    # fine-tuned in DeiT, its position embedding is learned: DeiT's own ViT-S (6 heads) looks the
    # same, so the count must be named
    tuned = {**base, "pos_embed": base["pos_embed"] + 0.01 * torch.randn_like(base["pos_embed"]),
             "head.weight": torch.zeros(10, 384), "head.bias": torch.zeros(10)}
    torch.save({"model": tuned}, tmp_path / "tuned.pth")
    with pytest.raises(UserError, match=r"DeiT's layout .* name the count with --vit-heads 6 "
                                        r"or --vit-heads 12") as error:
        load_backbone(tmp_path / "tuned.pth")
    assert "\n" not in str(error.value)
    for heads in (12, 6):
        backbone, info = load_backbone(tmp_path / "tuned.pth", vit_heads=heads)
        assert f"{heads} heads, by --vit-heads" in info["description"]
        with torch.no_grad():
            assert torch.allclose(backbone.eval()(images), timm_forward(tuned, images, heads),
                                  atol=1e-5)
    with pytest.raises(UserError, match="cannot have 7 heads"):
        load_backbone(tmp_path / "tuned.pth", vit_heads=7)


def test_mocov3_conv_stem_is_refused_as_what_it_is(tmp_path):
    # vit_conv_small (vits.py:72-112, 129-135): patch_embed.proj is a stack of conv-BN-ReLU
    state = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384),
             "patch_embed.proj.0.weight": torch.zeros(48, 3, 3, 3),
             "patch_embed.proj.1.weight": torch.ones(48),
             "patch_embed.proj.12.weight": torch.zeros(384, 384, 1, 1),
             "blocks.0.attn.qkv.weight": torch.zeros(1152, 384),
             "norm.weight": torch.ones(384), "head.0.weight": torch.zeros(4096, 384)}
    torch.save({"epoch": 300, "arch": "vit_conv_small",
                "state_dict": {**prefixed("module.base_encoder.", state),
                               **prefixed("module.momentum_encoder.", state)}},
               tmp_path / "vit-conv-s.pth.tar")
    with pytest.raises(UserError, match=r"a ViT with a convolutional stem under "
                                        r"'module.base_encoder.' \(MoCo v3's vit_conv_small") as e:
        load_backbone(tmp_path / "vit-conv-s.pth.tar")
    assert "no ResNet or ViT found" not in str(e.value) and "\n" not in str(e.value)


def test_official_linear_heads_serve_eval_only(tmp_path, capsys, monkeypatch):
    """Each official head, given the weights of a head linear_eval.py trained, gives the top-1
    and top-5 that head gives as our linear_head.pt; DINO's is read on DINO's features of
    bicubically resized images, MoCo v3's on the class token of its 12-head ViT, which its
    linear checkpoint also holds (the same file serves as --ckpt)."""
    transforms = []
    real_build = linear_eval.build_dataset
    monkeypatch.setattr(linear_eval, "build_dataset", lambda data, split, transform, **kw:
                        transforms.append((split, transform)) or real_build(data, split,
                                                                            transform, **kw))

    def train_then_official(ckpt, official_ckpt, head_file, to_official, *flags):
        trained = linear_eval.main(["--ckpt", str(ckpt), *SYNTHETIC, "--cached-features",
                                    *flags, "--run-dir", str(tmp_path / head_file)])
        head = torch.load(tmp_path / head_file / "linear_head.pt")
        torch.save(to_official(head["weight"], head["bias"]), tmp_path / f"{head_file}.pth")
        transforms.clear()
        again = linear_eval.main(["--ckpt", str(official_ckpt), *SYNTHETIC[:-2], "--eval-only",
                                  str(tmp_path / f"{head_file}.pth"),
                                  "--run-dir", str(tmp_path / f"{head_file}-official")])
        assert (again["top1"], again["top5"]) == (trained["top1"], trained["top5"])
        return again

    # DINO: a ViT-Ti release (timm keys, learned position embedding) and its linear weights
    torch.save(timm_keys(randomised(plain_vit(32, 4, 3, 192), seed=4)), tmp_path / "dino.pth")
    dino = train_then_official(
        tmp_path / "dino.pth", tmp_path / "dino.pth", "dino_head",
        lambda w, b: {"epoch": 100, "best_acc": 50.0, "state_dict": {  # eval_linear.py:141-148
            "module.linear.weight": w, "module.linear.bias": b}}, "--vit-features", "dino")
    assert dino["protocol"] == "eval-only (DINO's eval_linear.py head)"
    out = capsys.readouterr().out
    assert "no class names; class k is --data's k-th class folder" in out
    (split, val_tf), = transforms  # --eval-only reads the val split only
    resize = val_tf.transforms[0]
    assert split == "val" and resize.interpolation == T.InterpolationMode.BICUBIC
    assert resize.size == dino_eval_transform(32).transforms[0].size == 32

    # MoCo v3: a 12-head ViT; our backbone.pt of it records the heads, its linear checkpoint
    # (main_lincls.py:319-325: the whole DDP model, backbone and `head`) shows them by its
    # fixed sin-cos position embedding
    vit = mocov3_vit(width=192, layers=2, image_size=32, patch=4)
    export_backbone(vit, tmp_path / "backbone.pt")

    def linear_checkpoint(w, b):
        return {"epoch": 90, "arch": "vit_small", "best_acc1": torch.tensor(50.0),
                "state_dict": {**prefixed("module.", timm_keys(vit)), "module.head.weight": w,
                               "module.head.bias": b}}
    moco = train_then_official(tmp_path / "backbone.pt", tmp_path / "moco_head.pth", "moco_head",
                               linear_checkpoint)
    assert moco["protocol"] == "eval-only (MoCo v3's main_lincls.py head)"
    out = capsys.readouterr().out
    assert "a ViT under 'module.': ViT 192 wide, 2 blocks, MLP 768 (patch 4 at 32 px, 12 heads" in out
    assert transforms[0][1].transforms[0].interpolation == T.InterpolationMode.BILINEAR

    # a head for other classes than --data's is refused in one line
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(1000, 768),
                               "module.linear.bias": torch.zeros(1000)}}, tmp_path / "in1k.pth")
    with pytest.raises(SystemExit):
        linear_eval.main(["--ckpt", str(tmp_path / "dino.pth"), *SYNTHETIC, "--eval-only",
                          str(tmp_path / "in1k.pth"), "--run-dir", str(tmp_path / "x")])
    assert "a head for 1000 classes, --data has 10" in capsys.readouterr().err
