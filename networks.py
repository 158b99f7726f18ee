"""Networks of dataset condensation (VICO DatasetCondensation and the low-rank plugin), built by name.

Every model is a feature extractor `features` followed by one Linear `classifier`:
`embed(x)` is the flattened output of `features` (shape (N, classifier.in_features)) and
`forward(x)` = classifier(embed(x)) has shape (N, num_classes). Inputs are (N, channel, H, W) with
(H, W) = im_size. Layer order, paddings and widths follow the original code, so parameter counts and
the order of random initialization are the same for 1x28x28 and 3x32x32 inputs; the classifier's input
size is computed from channel and im_size, so other sizes (e.g. 64x64) work too.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

ACTIVATIONS = {
    'relu': lambda: nn.ReLU(inplace=True),
    'sigmoid': nn.Sigmoid,
    'leakyrelu': lambda: nn.LeakyReLU(negative_slope=0.01),
    'swish': nn.SiLU,  # x * sigmoid(x)
}


class AvgPool2d(nn.AvgPool2d):
    """nn.AvgPool2d, the same averages. On the CPU, when the windows tile an NCHW map (stride = kernel, no
    padding, kernel dividing H and W), one matrix product computes them: every kh consecutive rows of a
    map (kh*W values) times a (kh*W, W/kw) matrix holding 1/(kh*kw) where a value falls in a window.
    avg_pool2d's NCHW kernel there is the slowest layer of a ConvNet: 256 x 128 x 32 x 32 maps, forward +
    backward 97 + 127 ms against 16 + 16 ms."""

    def forward(self, x):
        kh, kw = _pair(self.kernel_size)
        if not (x.device.type == 'cpu' and x.dim() == 4 and x.is_contiguous() and self._tiles()
                and x.shape[2] % kh == 0 and x.shape[3] % kw == 0):
            return super().forward(x)
        n, c, h, w = x.shape
        window = torch.arange(kh * w, device=x.device) % w // kw  # the output column of each input value
        weight = F.one_hot(window, w // kw).to(x.dtype) / (kh * kw)
        return (x.view(-1, kh * w) @ weight).view(n, c, h // kh, w // kw)

    def _tiles(self):
        return (_pair(self.stride or self.kernel_size) == _pair(self.kernel_size) and _pair(self.padding) == (0, 0)
                and self.divisor_override is None)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


POOLINGS = {'avgpooling': AvgPool2d, 'maxpooling': nn.MaxPool2d, 'none': None}


def norm_layer(norm, channels, size=None):
    """Normalization of (N, channels, H, W) maps; None for 'none'. size = (H, W), needed by layernorm."""
    if norm == 'instancenorm':  # per sample and channel, with affine parameters
        return nn.GroupNorm(channels, channels)
    if norm == 'batchnorm':
        return nn.BatchNorm2d(channels)
    if norm == 'layernorm':  # over (C, H, W)
        return nn.LayerNorm([channels, *size])
    if norm == 'groupnorm':
        return nn.GroupNorm(4, channels)
    if norm == 'none':
        return None
    raise ValueError(f"unknown norm {norm!r}")


class Net(nn.Module):
    """Base: subclasses set `features` (a module) and `classifier` (a Linear)."""

    def embed(self, x):
        return self.features(x).flatten(1)  # flatten, not view: works on channels_last tensors

    def forward(self, x):
        return self.classifier(self.embed(x))


class ConvNet(Net):
    """depth x [conv3x3(width), norm, act, pool 2x2]; the first conv pads 3 on 1-channel input (28 -> 32)."""

    def __init__(self, channel, num_classes, im_size=(32, 32), width=128, depth=3, act='relu',
                 norm='instancenorm', pooling='avgpooling'):
        super().__init__()
        h, w = (s + 4 if channel == 1 else s for s in im_size)  # size after the first conv
        layers, in_channels = [], channel
        for d in range(depth):
            layers.append(nn.Conv2d(in_channels, width, 3, padding=3 if channel == 1 and d == 0 else 1))
            layers.append(norm_layer(norm, width, (h, w)))
            layers.append(ACTIVATIONS[act]())
            if POOLINGS[pooling] is not None:
                layers.append(POOLINGS[pooling](kernel_size=2, stride=2))
                h, w = h // 2, w // 2
            in_channels = width
        self.features = nn.Sequential(*[layer for layer in layers if layer is not None])
        self.classifier = nn.Linear(width * h * w, num_classes)


class MLP(Net):
    """flatten, 128, ReLU, 128, ReLU, classes."""

    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(channel * im_size[0] * im_size[1], 128), nn.ReLU(inplace=True),
            nn.Linear(128, 128), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(128, num_classes)


class LeNet(Net):
    """conv5x5(6), ReLU, maxpool, conv5x5(16), ReLU, maxpool, fc 120, ReLU, fc 84, ReLU, classes."""

    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        pad = 2 if channel == 1 else 0
        h, w = (((s + 2 * pad - 4) // 2 - 4) // 2 for s in im_size)  # 5 x 5 at 28 (pad 2) and 32
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Flatten(), nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(84, num_classes)


class AlexNet(Net):
    """Five convs (128, 192, 256, 192, 192), ReLU, three max-pools; BatchNorm after every conv if bn."""

    def __init__(self, channel, num_classes, im_size=(32, 32), bn=False):
        super().__init__()
        pad = 4 if channel == 1 else 2

        def block(cin, cout, k, p):
            return [nn.Conv2d(cin, cout, k, padding=p), *([nn.BatchNorm2d(cout)] if bn else []),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(channel, 128, 5, pad), nn.MaxPool2d(2, 2),
            *block(128, 192, 5, 2), nn.MaxPool2d(2, 2),
            *block(192, 256, 3, 1), *block(256, 192, 3, 1), *block(192, 192, 3, 1), nn.MaxPool2d(2, 2))
        h, w = ((s + 2 * pad - 4) // 8 for s in im_size)  # 4 x 4 at 28 (pad 4) and 32
        self.classifier = nn.Linear(192 * h * w, num_classes)


VGG11_CFG = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')


class VGG11(Net):
    """VGG11: each number of VGG11_CFG is conv3x3 + norm + ReLU, 'M' a 2x2 max-pool.
    The first conv pads 3 on 1-channel input (28 -> 32)."""

    def __init__(self, channel, num_classes, im_size=(32, 32), norm='instancenorm'):
        super().__init__()
        layers, in_channels = [], channel
        for i, v in enumerate(VGG11_CFG):
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=3 if channel == 1 and i == 0 else 1),
                           norm_layer(norm, v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        h, w = ((s + 4 if channel == 1 else s) // 32 for s in im_size)  # five 2x2 max-pools  # 1 x 1 at 28 and 32
        self.classifier = nn.Linear(in_channels * h * w, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block. ap: a strided conv becomes a stride-1 conv followed by a 2x2 avg-pool."""

    def __init__(self, in_planes, planes, stride, norm, ap):
        super().__init__()
        conv_stride = 1 if ap else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.pool = AvgPool2d(2, 2) if ap and stride != 1 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False),
                *([AvgPool2d(2, 2)] if ap else []),
                norm_layer(norm, planes))

    def forward(self, x):
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Net):
    """ResNet18: conv3x3(64), norm, ReLU, then 4 stages of 2 BasicBlocks (widths 64/128/256/512, strides
    1/2/2/2). ap=False: strided convs, then a 4x4 avg-pool (512 x 1 x 1 features at 28 and 32).
    ap=True: stride-1 convs + 2x2 avg-pools, no final pool (512 x 3 x 3 at 28, 512 x 4 x 4 at 32)."""

    def __init__(self, channel, num_classes, im_size=(32, 32), norm='instancenorm', ap=False):
        super().__init__()
        layers = [nn.Conv2d(channel, 64, 3, padding=1, bias=False), norm_layer(norm, 64), nn.ReLU(inplace=True)]
        in_planes, (h, w) = 64, im_size
        for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            layers += [BasicBlock(in_planes, planes, stride, norm, ap), BasicBlock(planes, planes, 1, norm, ap)]
            in_planes = planes
            if stride == 2:  # a 2x2 avg-pool floors; a conv3x3 with stride 2 and padding 1 rounds up
                h, w = (h // 2, w // 2) if ap else ((h + 1) // 2, (w + 1) // 2)
        if not ap:
            layers.append(AvgPool2d(4))
            h, w = h // 4, w // 4
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * h * w, num_classes)


def _convnet_variants():
    """Name -> keyword arguments of the ConvNet variants (defaults: width 128, depth 3, relu,
    instancenorm, avgpooling)."""
    variants = {'ConvNet': {}}
    variants.update({f'ConvNetD{d}': {'depth': d} for d in (1, 2, 3, 4)})
    variants.update({f'ConvNetW{w}': {'width': w} for w in (32, 64, 128, 256)})
    variants.update({'ConvNetAS': {'act': 'sigmoid'}, 'ConvNetAR': {'act': 'relu'},
                     'ConvNetAL': {'act': 'leakyrelu'}, 'ConvNetASwish': {'act': 'swish'},
                     'ConvNetASwishBN': {'act': 'swish', 'norm': 'batchnorm'}})
    variants.update({'ConvNetNN': {'norm': 'none'}, 'ConvNetBN': {'norm': 'batchnorm'},
                     'ConvNetLN': {'norm': 'layernorm'}, 'ConvNetIN': {'norm': 'instancenorm'},
                     'ConvNetGN': {'norm': 'groupnorm'}})
    variants.update({'ConvNetNP': {'pooling': 'none'}, 'ConvNetMP': {'pooling': 'maxpooling'},
                     'ConvNetAP': {'pooling': 'avgpooling'}})
    return {name: partial(ConvNet, **kwargs) for name, kwargs in variants.items()}


# name -> constructor(channel, num_classes, im_size)
MODELS = {
    'MLP': MLP,
    **_convnet_variants(),
    'LeNet': LeNet,
    'AlexNet': AlexNet,
    'AlexNetBN': partial(AlexNet, bn=True),
    'VGG11': VGG11,
    'VGG11BN': partial(VGG11, norm='batchnorm'),
    'ResNet18': ResNet18,
    'ResNet18BN': partial(ResNet18, norm='batchnorm'),
    'ResNet18BN_AP': partial(ResNet18, norm='batchnorm', ap=True),
}
NETWORK_NAMES = list(MODELS)


def get_network(name, channel, num_classes, im_size=(32, 32), device='cpu'):
    """A freshly initialized model for (N, channel, *im_size) inputs, built on `device` (initialized from
    that device's global torch RNG)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(NETWORK_NAMES)}")
    with torch.device(device):
        return MODELS[name](channel, num_classes, tuple(im_size))
