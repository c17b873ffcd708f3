"""Vision Transformers and ResNeXts built from torchvision's own classes: published sizes, the
same features as torchvision's forward, DINO's position-embedding interpolation, state dicts
that load into the plain torchvision classes, the architecture read back from the shapes, the
official DINO and MoCo v3 layouts converted exactly, and MoCo v3's initialisation."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from common.checkpoint import FORMAT, export_backbone
from common.errors import UserError
from common.evaluation import DinoLinearFeatures
from common.model import ARCHS, RESNETS, VITS, build_backbone, is_vit
from common.vit import VisionTransformerBackbone, mocov3_vit_init, sincos_position_embedding
from common.weights import infer_arch, load_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models gain nothing from a second thread, and on a busy machine competing thread
    pools make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model, seed=0):
    """Every parameter and buffer redrawn, LayerNorms included, so that a weight loaded into the
    wrong place changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):  # BN variances stay positive
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


def plain_vit(image_size, patch_size, heads, width, layers=12):
    """torchvision's class as it comes, classifier removed: the reference forward."""
    vit = VisionTransformer(image_size, patch_size, layers, heads, width, 4 * width)
    vit.heads = nn.Identity()
    return vit


# ------------------------------------------------------------------------------- sizes

def vit_parameters(width, patch=16, grid=14, depth=12):
    """A ViT's parameter count without classifier, term by term: per block the q/k/v and output
    projections (4 D^2 + 4 D), the MLP (8 D^2 + 5 D) and two LayerNorms (4 D)."""
    block = 4 * width * width + 4 * width + 8 * width * width + 5 * width + 4 * width
    patch_embedding = 3 * patch * patch * width + width
    return depth * block + patch_embedding + width + (grid * grid + 1) * width + 2 * width


# Published: ViT-S/16 22M and ViT-B/16 86M (MoCo v3 paper, Table 1; DeiT paper, Table 1, DeiT-S
# and DeiT-B). timm lists 22.05M and 86.57M, which include the 1000-class head (D*1000 + 1000).
@pytest.mark.parametrize("arch, exact, published", [("vit_small", 21_665_664, 22),
                                                    ("vit_base", 85_798_656, 86),
                                                    ("vit_tiny", 5_524_416, 6)])
def test_vit_parameter_count_is_the_published_one(arch, exact, published):
    with torch.device("meta"):
        backbone = build_backbone(arch)
    count = sum(p.numel() for p in backbone.parameters())
    width = VITS[arch][0]
    assert count == exact == vit_parameters(width)
    assert round(count / 1e6) == published
    assert backbone.feature_dim == width
    if arch != "vit_tiny":
        assert round((count + 1000 * width + 1000) / 1e4) / 100 == {"vit_small": 22.05,
                                                                      "vit_base": 86.57}[arch]


def test_small_image_vit_has_patch_4_at_32_px():
    with torch.device("meta"):
        vit = build_backbone("vit_small", small_images=True)
    assert (vit.patch_size, vit.image_size) == (4, 32)
    assert vit.encoder.pos_embedding.shape == (1, 1 + 8 * 8, 384)
    assert sum(p.numel() for p in vit.parameters()) == vit_parameters(384, patch=4, grid=8)


# ------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("arch, small, size", [("vit_tiny", True, 32), ("vit_small", False, 224)])
def test_features_equal_torchvision_forward_without_head(arch, small, size):
    ours = randomised(build_backbone(arch, small_images=small))
    width, heads = VITS[arch]
    reference = plain_vit(size, ours.patch_size, heads, width)
    reference.load_state_dict(ours.state_dict())  # strict: the same tensors, nothing more
    reference.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = ours(x)
        assert features.shape == (2, width)
        assert torch.equal(features, reference(x))


def cubic(distance, a=-0.75):
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    d = abs(distance)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def resize_axis(rows, out_len, scale):
    """Bicubic resampling of a list of tensors (one per position along an axis): output i reads
    the input at (i + 0.5) / scale - 0.5, four neighbours, the edge repeated beyond the border."""
    out = []
    for i in range(out_len):
        source = (i + 0.5) / scale - 0.5
        left = math.floor(source)
        out.append(sum(cubic(source - j) * rows[min(max(j, 0), len(rows) - 1)]
                       for j in range(left - 1, left + 3)))
    return out


def dino_resized_embedding(pos_embedding, rows, cols):
    """DINO's interpolate_pos_encoding written out: the patch grid resized by the factor
    (new + 0.1) / old per axis (vision_transformer.py:186-191), the class token's entry kept."""
    old = math.isqrt(pos_embedding.shape[1] - 1)
    grid = pos_embedding[0, 1:].reshape(old, old, -1)  # [row, col, D]
    by_row = resize_axis(list(grid), rows, (rows + 0.1) / old)  # rows x [old cols, D]
    resized = [resize_axis(list(r), cols, (cols + 0.1) / old) for r in by_row]
    patches = torch.stack([torch.stack(r) for r in resized]).reshape(rows * cols, -1)
    return torch.cat([pos_embedding[0, :1], patches])[None]


def test_position_embeddings_are_interpolated_as_dino_does():
    vit = randomised(VisionTransformerBackbone(16, 4, 1, 2, 8))  # a 4x4 grid
    native = vit.encoder.pos_embedding
    assert vit.position_embedding(4, 4) is native
    for rows, cols in [(6, 6), (2, 3), (3, 7)]:
        expected = dino_resized_embedding(native.detach(), rows, cols)
        assert torch.allclose(vit.position_embedding(rows, cols), expected, atol=1e-6)


def test_forward_at_another_size_is_torchvision_at_that_size():
    """96 px crops through a 224 px model, scaled down: a 16 px model fed 24 px images equals
    torchvision's class built for 24 px holding the interpolated embeddings."""
    vit = randomised(VisionTransformerBackbone(16, 4, 2, 2, 16))
    reference = plain_vit(24, 4, 2, 16, layers=2)
    weights = dict(vit.state_dict())
    native = weights["encoder.pos_embedding"]
    weights["encoder.pos_embedding"] = dino_resized_embedding(native, 6, 6)
    reference.load_state_dict(weights, strict=False)
    reference.eval()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(vit(x), reference(x), atol=1e-5)
    with pytest.raises(UserError, match="18x24 px images do not divide into the ViT's 4x4"):
        vit(torch.randn(1, 3, 18, 24))


# ------------------------------------------------------------------------------- state dicts

def test_vit_backbone_pt_loads_into_plain_torchvision_vit(tmp_path):
    vit = randomised(build_backbone("vit_tiny", small_images=True))
    export_backbone(vit, tmp_path / "backbone.pt")
    sd = torch.load(tmp_path / "backbone.pt")
    assert not any(k.startswith("heads") for k in sd)
    plain = VisionTransformer(32, 4, 12, 3, 192, 768)
    result = plain.load_state_dict(sd, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["heads.head.weight",
                                                              "heads.head.bias"], [])
    backbone, info = load_backbone(tmp_path / "backbone.pt")
    assert (info["arch"], info["small_images"], info["layout"]) == ("vit_tiny", True,
                                                                     "torchvision ViT")
    assert info["description"] == "torchvision ViT: vit_tiny (patch 4 at 32 px, 3 heads)"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), vit(x))


def test_resnext_is_torchvision_resnext_without_fc(tmp_path):
    net = build_backbone("resnext50_32x4d", small_images=True, zero_init_residual=True)
    assert net.feature_dim == 2048 and isinstance(net.maxpool, nn.Identity)
    assert net.conv1.weight.shape == (64, 3, 3, 3) and net.layer1[0].conv2.groups == 32
    assert all(block.bn3.weight.abs().sum() == 0 for layer in (net.layer1, net.layer4)
               for block in layer)
    net = randomised(build_backbone("resnext50_32x4d"))
    export_backbone(net, tmp_path / "backbone.pt")
    plain = torchvision.models.resnext50_32x4d()
    result = plain.load_state_dict(torch.load(tmp_path / "backbone.pt"), strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["fc.weight", "fc.bias"], [])
    plain.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), plain.eval()(x))
    assert load_backbone(tmp_path / "backbone.pt")[1]["arch"] == "resnext50_32x4d"


def test_archs_list_everything():
    assert set(ARCHS) == set(RESNETS) | set(VITS)
    assert {"resnext50_32x4d", "resnext101_32x8d", "vit_small"} <= set(ARCHS)
    assert [a for a in ARCHS if is_vit(a)] == ["vit_tiny", "vit_small", "vit_base"]
    with pytest.raises(UserError, match="--arch vit_huge: not supported .*vit_base"):
        build_backbone("vit_huge")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("small_images", [False, True])
def test_infer_arch_round_trip(arch, small_images):
    with torch.device("meta"):  # shapes only: the 100M-parameter ones too, at once
        sd = build_backbone(arch, small_images).state_dict()
    assert infer_arch(sd) == (arch, small_images)


def test_unrecognised_layouts_are_one_line_errors():
    with torch.device("meta"):
        shallow = VisionTransformerBackbone(224, 16, 4, 6, 384).state_dict()
        resnet = build_backbone("resnet50").state_dict()
    cases = [(shallow, r"unrecognised ViT layout \(384 wide, 4 blocks, MLP 1536, patch 16 at "
                       r"224 px\)"),
             ({k: v for k, v in resnet.items() if not k.startswith("layer3.5.")},
              r"unrecognised ResNet layout \(blocks \(3, 4, 5, 3\)"),
             ({"fc.weight": torch.zeros(2, 2)}, "neither a ResNet .* nor a ViT")]
    for sd, message in cases:
        with pytest.raises(UserError, match=message) as error:
            infer_arch(sd)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------- official layouts

def timm_keys(vit):
    """The timm-style state dict (DINO, MoCo v3) of a torchvision ViT, read off its modules."""
    out = {"cls_token": vit.class_token, "pos_embed": vit.encoder.pos_embedding,
           "patch_embed.proj.weight": vit.conv_proj.weight,
           "patch_embed.proj.bias": vit.conv_proj.bias,
           "norm.weight": vit.encoder.ln.weight, "norm.bias": vit.encoder.ln.bias}
    for i, block in enumerate(vit.encoder.layers):
        parts = {"norm1": block.ln_1, "norm2": block.ln_2, "mlp.fc1": block.mlp[0],
                 "mlp.fc2": block.mlp[3], "attn.proj": block.self_attention.out_proj}
        for name, module in parts.items():
            out[f"blocks.{i}.{name}.weight"] = module.weight
            out[f"blocks.{i}.{name}.bias"] = module.bias
        out[f"blocks.{i}.attn.qkv.weight"] = block.self_attention.in_proj_weight
        out[f"blocks.{i}.attn.qkv.bias"] = block.self_attention.in_proj_bias
    return {k: v.detach().clone() for k, v in out.items()}


def timm_forward(sd, x, heads, n_last_blocks=None, avgpool=False):
    """A timm / DINO ViT forward written from their code, on a timm-keyed state dict: the class
    token after the final norm (dino vision_transformer.py:68-131, 196-214); given
    `n_last_blocks`, the features DINO's linear evaluation reads instead (its
    get_intermediate_layers, vision_transformer.py:225-233, and eval_linear.py:160-170)."""
    def norm(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1) + sd["pos_embed"]
    b, n, c = t.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    intermediate_output = []
    for i in range(depth):
        qkv = linear(norm(t, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
        t = t + linear((attention @ v).transpose(1, 2).reshape(b, n, c), f"blocks.{i}.attn.proj")
        hidden = F.gelu(linear(norm(t, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
        t = t + linear(hidden, f"blocks.{i}.mlp.fc2")
        if n_last_blocks and depth - i <= n_last_blocks:
            intermediate_output.append(norm(t, "norm"))
    if not n_last_blocks:
        return norm(t, "norm")[:, 0]
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    if avgpool:
        output = torch.cat((output.unsqueeze(-1),
                            torch.mean(intermediate_output[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
        output = output.reshape(output.shape[0], -1)
    return output


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_dino_release_and_full_checkpoint(tmp_path, images):
    teacher = timm_keys(randomised(plain_vit(224, 16, 6, 384), seed=1))
    student = {k: v + 1 for k, v in teacher.items()}  # another network, same shapes
    head = {"mlp.0.weight": torch.randn(2048, 384), "last_layer.weight_g": torch.ones(65536, 1)}
    torch.save(teacher, tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save({"student": {**prefixed("module.backbone.", student),
                            **prefixed("module.head.", head)},
                "teacher": {**prefixed("backbone.", teacher), **prefixed("head.", head)},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
                "dino_loss": {"center": torch.zeros(1, 65536)}}, tmp_path / "checkpoint.pth")
    with torch.no_grad():
        expected = timm_forward(teacher, images, heads=6)
        for name, layout, dropped in [
                ("dino_deitsmall16_pretrain.pth", "DINO / timm ViT", []),
                ("checkpoint.pth", "DINO full checkpoint (teacher)", ["head"])]:
            backbone, info = load_backbone(tmp_path / name)
            assert (info["arch"], info["small_images"], info["layout"], info["dropped"]) == \
                ("vit_small", False, layout, dropped)
            assert info["description"].startswith(
                f"{layout}: vit_small (patch 16 at 224 px, 6 heads)")
            assert torch.allclose(backbone.eval()(images), expected, atol=1e-5)


def test_mocov3_vit_checkpoint_is_its_base_encoder_with_12_heads(tmp_path, images):
    base = timm_keys(randomised(plain_vit(224, 16, 12, 384), seed=3))
    for k in base:  # sharper attention, so that the way it is split into heads shows
        if k.endswith("attn.qkv.weight"):
            base[k] *= 5
    momentum = {k: -v for k, v in base.items()}
    projector = {"head.0.weight": torch.randn(4096, 384), "head.1.running_mean": torch.zeros(4096),
                 "head.6.weight": torch.randn(256, 4096)}
    state = {**prefixed("module.base_encoder.", {**base, **projector}),
             **prefixed("module.momentum_encoder.", {**momentum, **projector}),
             "module.predictor.0.weight": torch.randn(4096, 256)}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 65536.0}},
               tmp_path / "vit-s-300ep.pth.tar")
    backbone, info = load_backbone(tmp_path / "vit-s-300ep.pth.tar")
    assert info["dropped"] == ["module.base_encoder.head", "module.momentum_encoder",
                               "module.predictor"]
    assert info["description"].startswith("MoCo v3: vit_small (patch 16 at 224 px, 12 heads)")
    assert backbone.encoder.layers[0].num_heads == 12
    with torch.no_grad():
        features = backbone.eval()(images)
        assert torch.allclose(features, timm_forward(base, images, heads=12), atol=1e-5)
        # the heads matter: the same weights split 6 ways are another network
        assert not torch.allclose(features, timm_forward(base, images, heads=6), atol=1e-2)

    # fine-tuned and saved again by linear_eval.py (export_backbone), it loads back with 12 heads
    export_backbone(backbone, tmp_path / "backbone.pt")
    again, info = load_backbone(tmp_path / "backbone.pt")
    assert info["description"].startswith("torchvision ViT: vit_small (patch 16 at 224 px, "
                                          "12 heads)"), info["description"]
    plain = VisionTransformer(224, 16, 12, 12, 384, 1536)  # and into torchvision's own class
    plain.load_state_dict({**torch.load(tmp_path / "backbone.pt"), **{
        k: v for k, v in plain.state_dict().items() if k.startswith("heads.")}})
    with torch.no_grad():
        assert torch.equal(again.eval()(images), features)


@pytest.mark.parametrize("width, heads, n_last_blocks, avgpool", [(384, 6, 4, False),
                                                                  (768, 12, 1, True)])
def test_dino_linear_features_are_what_its_eval_linear_reads(width, heads, n_last_blocks, avgpool):
    # DINO's choice by size: ViT-S the class tokens of 4 blocks, ViT-B 1 and the mean patch token
    vit = randomised(VisionTransformerBackbone(32, 8, 5, heads, width), seed=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        final_token = vit(x)
        dino = DinoLinearFeatures(vit)
        features = dino(x)
        expected = timm_forward(timm_keys(vit), x, heads, n_last_blocks, avgpool)
    assert features.shape == (2, dino.feature_dim) == (2, width * (n_last_blocks + avgpool))
    assert torch.allclose(features, expected, atol=1e-5)
    # the final class token is among them: last (concatenated) or every other (interleaved)
    assert torch.allclose(features[:, 0::2] if avgpool else features[:, -width:], final_token,
                          atol=1e-6)
    with pytest.raises(UserError, match="not a ViT"):
        DinoLinearFeatures(build_backbone("resnet18", small_images=True))


def test_dino_patch_8_and_foreign_timm_keys(tmp_path):
    sd = timm_keys(randomised(plain_vit(32, 8, 3, 192), seed=5))
    torch.save(sd, tmp_path / "vit_tiny8.pth")
    backbone, info = load_backbone(tmp_path / "vit_tiny8.pth")
    assert info["arch"] == "vit_tiny/8" and info["small_images"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x), timm_forward(sd, x, heads=3), atol=1e-5)
    torch.save({**sd, "dist_token": torch.zeros(1, 1, 192)}, tmp_path / "deit_distilled.pth")
    with pytest.raises(UserError, match="no place for: dist_token"):
        load_backbone(tmp_path / "deit_distilled.pth")


def test_our_vit_checkpoint_reads_the_online_backbone(tmp_path):
    vit = randomised(build_backbone("vit_tiny", small_images=True))
    target = randomised(build_backbone("vit_tiny", small_images=True), seed=7)
    torch.save({"format": FORMAT, "method": "byol", "args": {"img_size": 32},
                "model": {**prefixed("backbone.", vit.state_dict()),
                          **prefixed("target_backbone.", target.state_dict()),
                          "projector.0.weight": torch.zeros(8, 192)}}, tmp_path / "checkpoint.pt")
    backbone, info = load_backbone(tmp_path / "checkpoint.pt")
    assert (info["arch"], info["dropped"]) == ("vit_tiny", ["projector", "target_backbone"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), vit(x))


# ------------------------------------------------------------------------------- MoCo v3 init

def test_sincos_embedding_by_hand():
    """Grid 2x2, width 8: frequencies 1 and 1/100; per token [sin, cos] of row * w, then of
    column * w; the class token's entry zero."""
    s1, s01, c1, c01 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    at0, at1 = [0, 0, 1, 1], [s1, s01, c1, c01]
    expected = torch.tensor([[0.0] * 8,
                             at0 + at0,  # row 0, column 0
                             at0 + at1,  # row 0, column 1
                             at1 + at0,  # row 1, column 0
                             at1 + at1])  # row 1, column 1
    assert torch.allclose(sincos_position_embedding(2, 8)[0], expected, atol=1e-7)


def test_mocov3_init_freezes_patch_projection_and_position_embedding():
    torch.manual_seed(0)
    width, patch = 64, 4
    vit = mocov3_vit_init(VisionTransformerBackbone(8, patch, 2, 4, width))
    assert torch.equal(vit.encoder.pos_embedding, sincos_position_embedding(2, width))
    attention = vit.encoder.layers[0].self_attention
    # q, k and v each a [D, D] xavier matrix: bound sqrt(6 / 2D), not sqrt(6 / 4D) of [3D, D]
    qkv_bound = math.sqrt(6 / (2 * width))
    assert math.sqrt(6 / (4 * width)) < attention.in_proj_weight.abs().max() <= qkv_bound
    patch_bound = math.sqrt(6 / (3 * patch * patch + width))
    assert 0.9 * patch_bound < vit.conv_proj.weight.abs().max() <= patch_bound
    for linear in (attention.out_proj, vit.encoder.layers[1].mlp[0]):
        bound = math.sqrt(6 / sum(linear.weight.shape))
        assert 0.9 * bound < linear.weight.abs().max() <= bound
        assert not linear.bias.any()
    assert not attention.in_proj_bias.any() and not vit.conv_proj.bias.any()
    assert 0 < vit.class_token.abs().max() < 1e-5

    frozen = {"conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}
    assert {n for n, p in vit.named_parameters() if not p.requires_grad} == frozen
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    optimizer = torch.optim.AdamW(vit.parameters(), lr=0.1, weight_decay=0.1)
    vit(torch.randn(4, 3, 16, 16)).square().sum().backward()  # an interpolated size as well
    optimizer.step()
    changed = {n for n, p in vit.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before) - frozen
    trainable = mocov3_vit_init(VisionTransformerBackbone(8, patch, 1, 4, width),
                                freeze_patch_projection=False)
    assert trainable.conv_proj.weight.requires_grad
    assert not trainable.encoder.pos_embedding.requires_grad
