"""ResNet-50 with EVERY layer w times wider (--arch resnet50w2, resnet50w4, resnet50w5), as SimCLR
and SwAV use it; loaded only for them. google-research/simclr tf2/resnet.py (`width_multiplier`)
and facebookresearch/swav src/resnet50.py (`widen`, since the commit "fix bug with wider models";
the first commit widened the inner width by w twice): a stem of 64*w filters, block groups of
64/128/256/512*w filters at each bottleneck's 1x1 and 3x3, 4x that at its last 1x1 and projection
shortcut; 2048*w-d features. torchvision's wide_resnet50_2 widens only the inner 1x1/3x3 (2048-d)."""
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet


def widened_resnet50(w, zero_init_residual=False):
    """torchvision's ResNet-50 (same module names) with every width times `w`."""
    block = type(f"Bottleneck{w}x", (Bottleneck,), {"expansion": 4 * w})  # outputs 256w..2048w
    net = ResNet(block, [3, 4, 6, 3], width_per_group=64 * w,  # inner widths 64w..512w
                 zero_init_residual=zero_init_residual)
    # torchvision's stem has 64 channels at any width: widen it and what reads it
    net.conv1 = nn.Conv2d(3, 64 * w, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * w)
    first = net.layer1[0]
    first.conv1 = nn.Conv2d(64 * w, 64 * w, kernel_size=1, bias=False)
    first.downsample[0] = nn.Conv2d(64 * w, 256 * w, kernel_size=1, bias=False)
    for conv in (net.conv1, first.conv1, first.downsample[0]):  # torchvision's initialisation
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return net
