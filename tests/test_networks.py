import pytest
import torch
import torch.nn as nn

from networks import NETWORK_NAMES, AvgPool2d, get_network
from utils import UserError

SHAPES = [(1, 28), (3, 32), (3, 64)]  # (channel, side)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize('channel,side', SHAPES)
@pytest.mark.parametrize('name', NETWORK_NAMES)
def test_every_network_runs(name, channel, side):
    torch.manual_seed(0)
    net = get_network(name, channel, 7, (side, side)).eval()
    x = torch.randn(2, channel, side, side)
    with torch.no_grad():
        feat, out = net.embed(x), net(x)
    assert out.shape == (2, 7)
    assert feat.shape == (2, net.classifier.in_features)
    torch.testing.assert_close(out, net.classifier(feat))


def test_convnet_parameter_count_by_hand():
    rest = 2 * (128 * 128 * 9 + 128) + 3 * 2 * 128 + 2048 * 10 + 10  # convs 2-3, GroupNorm affine, Linear
    assert n_params(get_network('ConvNet', 3, 10, (32, 32))) == 3 * 128 * 9 + 128 + rest
    assert n_params(get_network('ConvNet', 1, 10, (28, 28))) == 1 * 128 * 9 + 128 + rest


@pytest.mark.parametrize('name,channel,side,size', [
    ('ConvNet', 3, 32, 128 * 4 * 4), ('ConvNet', 1, 28, 128 * 4 * 4), ('ConvNet', 3, 64, 128 * 8 * 8),
    ('ConvNetD4', 3, 64, 128 * 4 * 4), ('ConvNetD1', 1, 28, 128 * 16 * 16), ('ConvNetNP', 1, 28, 128 * 32 * 32),
    ('ConvNetW32', 3, 32, 32 * 4 * 4),
])
def test_convnet_embed_size(name, channel, side, size):
    net = get_network(name, channel, 10, (side, side))
    assert net.classifier.in_features == size
    assert net.embed(torch.zeros(1, channel, side, side)).shape == (1, size)


def test_convnet_first_conv_padding():
    convs = [m for m in get_network('ConvNet', 1, 10, (28, 28)).modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3), (1, 1), (1, 1)]
    first = next(m for m in get_network('ConvNet', 3, 10).modules() if isinstance(m, nn.Conv2d))
    assert first.padding == (1, 1)


def test_convnet_norm_layers():
    def layers(name, kind):
        return [m for m in get_network(name, 3, 10).modules() if isinstance(m, kind)]

    for name in ('ConvNet', 'ConvNetIN'):  # instancenorm = GroupNorm(C, C) with affine parameters
        assert [(g.num_groups, g.num_channels, g.affine) for g in layers(name, nn.GroupNorm)] == [(128, 128, True)] * 3
    assert [g.num_groups for g in layers('ConvNetGN', nn.GroupNorm)] == [4] * 3
    for name in ('ConvNetBN', 'ConvNetASwishBN'):
        assert len(layers(name, nn.BatchNorm2d)) == 3 and not layers(name, nn.GroupNorm)
    assert [ln.normalized_shape for ln in layers('ConvNetLN', nn.LayerNorm)] == [
        (128, 32, 32), (128, 16, 16), (128, 8, 8)]  # over (C, H, W), before pooling
    assert not layers('ConvNetNN', nn.GroupNorm) and not layers('ConvNetNN', nn.BatchNorm2d)
    assert len(layers('ConvNetMP', nn.MaxPool2d)) == 3 and not layers('ConvNetMP', nn.AvgPool2d)
    assert not layers('ConvNetNP', nn.MaxPool2d) and not layers('ConvNetNP', nn.AvgPool2d)


def test_swish_is_x_sigmoid_x():
    net = get_network('ConvNetASwish', 3, 10)
    act = net.features[2]
    x = torch.randn(5)
    torch.testing.assert_close(act(x), x * torch.sigmoid(x))


@pytest.mark.parametrize('name,channel,side,linear_index,size', [
    # classifier inputs hard-coded in the original, and what they become at 64x64
    ('MLP', 1, 28, 0, 784), ('MLP', 3, 32, 0, 3072), ('MLP', 3, 64, 0, 3 * 64 * 64),
    ('LeNet', 1, 28, 0, 400), ('LeNet', 3, 32, 0, 400), ('LeNet', 3, 64, 0, 16 * 13 * 13),
    ('AlexNet', 1, 28, -1, 192 * 4 * 4), ('AlexNet', 3, 32, -1, 192 * 4 * 4), ('AlexNet', 3, 64, -1, 192 * 8 * 8),
    ('VGG11', 1, 28, -1, 512), ('VGG11', 3, 32, -1, 512), ('VGG11', 3, 64, -1, 512 * 2 * 2),
    ('ResNet18', 1, 28, -1, 512), ('ResNet18', 3, 32, -1, 512), ('ResNet18', 3, 64, -1, 512 * 2 * 2),
    ('ResNet18BN_AP', 1, 28, -1, 512 * 3 * 3), ('ResNet18BN_AP', 3, 32, -1, 512 * 4 * 4),
    ('ResNet18BN_AP', 3, 64, -1, 512 * 8 * 8),
])
def test_linear_input_sizes(name, channel, side, linear_index, size):
    linears = [m for m in get_network(name, channel, 10, (side, side)).modules() if isinstance(m, nn.Linear)]
    assert linears[linear_index].in_features == size


@pytest.mark.parametrize('kernel,shape,tiled', [(2, (3, 5, 8, 8), True), (4, (2, 3, 4, 4), True),
                                               ((2, 3), (2, 2, 6, 9), True), (2, (2, 3, 7, 7), False)])
def test_avg_pool_equals_torch_with_first_and_second_derivatives(kernel, shape, tiled, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    expected = nn.AvgPool2d(kernel)(x)
    if tiled:  # the matrix-product form, not avg_pool2d
        monkeypatch.setattr(torch.nn.functional, 'avg_pool2d', None)
    pool = AvgPool2d(kernel)
    torch.testing.assert_close(pool(x), expected)
    # DC and MTT differentiate through gradients: check both orders against finite differences
    assert torch.autograd.gradcheck(lambda t: pool(t.sin()), x)
    assert torch.autograd.gradgradcheck(lambda t: pool(t.sin()), x)


def test_channels_last_gives_same_output():
    net = get_network('ConvNet', 1, 10, (28, 28))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_no_hidden_reseeding():
    torch.manual_seed(0)
    a = get_network('ConvNet', 3, 10)
    torch.manual_seed(0)
    b = get_network('ConvNet', 3, 10)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = get_network('ConvNet', 3, 10)  # the RNG moves on: a third net differs
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_name_raises_user_error():
    with pytest.raises(UserError, match=r"unknown model 'Foo'.*ConvNet, ConvNetD1.*ResNet18BN_AP"):
        get_network('Foo', 3, 10)
