"""resnet50w2/w4/w5 (SimCLR's and SwAV's ResNet-50 with every layer widened): their parameter
counts match the published ones, every tensor is torchvision ResNet-50's under the same name
with its channels times w, the features are 2048*w-d, and a bare backbone.pt of one is
recognised from its shapes and loads as linear_eval.py loads it."""
import pytest
import torch
import torchvision

from common.model import resnet_backbone
from common.weights import infer_arch
from common.weights import load_backbone

WIDTHS = {"resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}


def meta_backbone(arch, cifar_stem=False):
    with torch.device("meta"):  # shapes only: instant, no memory
        return resnet_backbone(arch, cifar_stem)


@pytest.fixture(scope="module")
def w2_cifar():
    torch.manual_seed(0)
    return resnet_backbone("resnet50w2", cifar_stem=True).eval()


# Published sizes, in millions: SimCLR (Chen et al. 2020, Table 6 "Param (M)"): ResNet-50 24,
# (2x) 94, (4x) 375; SwAV README (facebookresearch/swav, model table): RN50-w2 94M, w4 375M,
# w5 586M. They count the backbone WITHOUT the 1000-class fc: with it the counts round to 26,
# 98, 384 and 597 (torchvision's "25.6M" for ResNet-50 is the one with fc).
@pytest.mark.parametrize("arch, published", [("resnet50", 24), ("resnet50w2", 94),
                                             ("resnet50w4", 375), ("resnet50w5", 586)])
def test_parameter_count_is_the_published_one(arch, published):
    net = meta_backbone(arch)
    params = sum(p.numel() for p in net.parameters())
    fc = net.feature_dim * 1000 + 1000
    assert round(params / 1e6) == published
    assert round((params + fc) / 1e6) != published


@pytest.mark.parametrize("arch", WIDTHS)
def test_torchvision_resnet50_names_with_every_channel_times_w(arch):
    w = WIDTHS[arch]
    ours = {k: tuple(v.shape) for k, v in meta_backbone(arch).state_dict().items()}
    with torch.device("meta"):
        ref = torchvision.models.resnet50().state_dict()
    expected = {}
    for k, v in ref.items():
        if k.startswith("fc."):
            continue
        shape = list(v.shape)
        for d in range(min(2, len(shape))):  # out and in channels; conv1 still reads RGB
            shape[d] *= 1 if k == "conv1.weight" and d == 1 else w
        expected[k] = tuple(shape)
    assert list(ours) == list(expected)  # same names, same order
    assert ours == expected


def test_features_are_2048w_dimensional(w2_cifar):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert w2_cifar(x).shape == (2, 4096)
    assert w2_cifar.feature_dim == 4096
    assert w2_cifar.conv1.weight.shape == (128, 3, 3, 3)  # the 3x3 small-image stem, widened
    assert meta_backbone("resnet50w4").feature_dim == 8192
    assert meta_backbone("resnet50w5").feature_dim == 10240


@pytest.mark.parametrize("arch", [*WIDTHS, "resnet50", "wide_resnet50_2"])
@pytest.mark.parametrize("cifar_stem", [False, True])
def test_infer_arch_tells_widened_from_wide(arch, cifar_stem):
    # resnet50w2 and wide_resnet50_2 both have a 128-channel layer1.0.conv1: the stem differs
    assert infer_arch(meta_backbone(arch, cifar_stem).state_dict()) == (arch, cifar_stem)


def test_torchvision_wide_resnet50_2_is_not_taken_for_resnet50w2():
    with torch.device("meta"):
        sd = torchvision.models.wide_resnet50_2().state_dict()
    assert infer_arch(sd) == ("wide_resnet50_2", False)


def test_backbone_pt_loads_as_linear_eval_loads_it(w2_cifar, tmp_path):
    torch.save(w2_cifar.state_dict(), tmp_path / "backbone.pt")
    loaded, info = load_backbone(tmp_path / "backbone.pt")  # what linear_eval.py --ckpt calls
    assert (info["arch"], info["small_images"]) == ("resnet50w2", True)
    assert loaded.feature_dim == 4096
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), w2_cifar(x))
