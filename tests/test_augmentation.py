import math

import pytest
import torch

from utils import UserError
from utils.augmentation import (DSA_OPS, ParamDiffAug, check_strategy, dc_augment, default_dsa_strategy,
                           diff_augment, get_daparam, siamese_augment)

FULL = 'color_crop_cutout_flip_scale_rotate'
SIZES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


def _batch(n, shape=(3, 32, 32), seed=0):
    return torch.rand((n,) + shape, generator=torch.Generator().manual_seed(seed))


def _real_and_syn():
    """Real: 2 classes x 5 images; synthetic: 2 classes x 1 image equal to each class's first real image."""
    real = _batch(10)
    real_labels = torch.tensor([0] * 5 + [1] * 5)
    syn = real[[0, 5]].clone()
    syn_labels = torch.tensor([0, 1])
    return real, real_labels, syn, syn_labels


# ----------------------------------------------------------------------------- Siamese behaviour

@pytest.mark.parametrize('strategy', list(DSA_OPS) + [FULL])
@pytest.mark.parametrize('mode', ['S', 'M'])
def test_siamese_real_and_synthetic_match(strategy, mode):
    param = ParamDiffAug(aug_mode=mode)
    real, _, syn, _ = _real_and_syn()
    for seed in range(5):
        seeds = [seed, seed + 100]
        out_real = siamese_augment(real, strategy, param, seeds, [5, 5])
        out_syn = siamese_augment(syn, strategy, param, seeds, [1, 1])
        torch.testing.assert_close(out_syn, out_real[[0, 5]], atol=1e-6, rtol=0)
        # a class's transformation depends only on its seed: alone, or beside an empty group, it is the same
        alone = siamese_augment(syn[1:], strategy, param, seeds[1:], [1])
        torch.testing.assert_close(alone, out_syn[1:], atol=1e-6, rtol=0)
        gap = siamese_augment(syn, strategy, param, [seed, 7, seed + 100], [1, 0, 1])
        torch.testing.assert_close(gap, out_syn, atol=1e-6, rtol=0)
        # within a group every image gets the same transform
        same = siamese_augment(real[[0, 0, 5, 5]], strategy, param, seeds, [2, 2])
        torch.testing.assert_close(same[0], same[1], atol=0, rtol=0)
        torch.testing.assert_close(same[2], same[3], atol=0, rtol=0)


def test_siamese_group_transforms_whole_group_alike():
    param = ParamDiffAug(aug_mode='M')
    x = _batch(1).expand(6, -1, -1, -1)
    out = siamese_augment(x, FULL, param, [3], [6])
    assert (out - out[:1]).abs().max() == 0
    assert not torch.equal(out[0], x[0])


def test_siamese_groups_differ():
    param = ParamDiffAug(aug_mode='M')
    x = _batch(1).expand(2, -1, -1, -1)
    differ = [not torch.allclose(*siamese_augment(x, FULL, param, [s, s + 1], [1, 1])) for s in range(5)]
    assert any(differ)
    # 'S' mode: groups choose their ops independently; over many groups more than one op is used
    x = torch.ones(40, 1, 16, 16)
    out = siamese_augment(x, 'color_flip', ParamDiffAug(), range(40), [1] * 40)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 0  # flip leaves an all-ones image unchanged, color does not
    assert changed.any() and not changed.all()


def test_siamese_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    siamese_augment(_batch(4), FULL, ParamDiffAug(aug_mode='M'), [5, 6], [2, 2])
    assert torch.equal(torch.get_rng_state(), state)


def test_groups_with_their_own_generators_equal_separate_calls():
    # K networks trained together: group k draws from generator k exactly what a call on its samples alone draws
    x = _batch(9)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    together = diff_augment(x, FULL, ParamDiffAug(), gens(), [3, 3, 3])
    alone = torch.cat([diff_augment(part, FULL, ParamDiffAug(), g) for part, g in zip(x.split(3), gens())])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- shapes and gradients

@pytest.mark.parametrize('shape', SIZES)
@pytest.mark.parametrize('strategy,mode', [(op, 'S') for op in DSA_OPS] + [(FULL, 'S'), (FULL, 'M')])
@pytest.mark.parametrize('siamese', [False, True])
def test_shape_and_gradient(shape, strategy, mode, siamese):
    param = ParamDiffAug(aug_mode=mode)
    x = _batch(4, shape).requires_grad_()
    if siamese:
        out = siamese_augment(x, strategy, param, [0, 1, 2], [1, 2, 1])
    else:
        out = diff_augment(x, strategy, param)
    assert out.shape == x.shape
    weight = _batch(4, shape, seed=1)
    (out * weight).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize('strategy', ['none', 'None', ''])
def test_identity_strategies(strategy):
    x = _batch(3)
    assert diff_augment(x, strategy, ParamDiffAug()) is x
    assert siamese_augment(x, strategy, ParamDiffAug(), [1], [3]) is x


# ----------------------------------------------------------------------------- the formulas

def test_flip_forced():
    x = _batch(3)
    out = diff_augment(x, 'flip', ParamDiffAug(prob_flip=1.0))
    assert torch.equal(out, x.flip(3))
    assert torch.equal(diff_augment(x, 'flip', ParamDiffAug(prob_flip=0.0)), x)


def test_brightness_is_one_shift_per_image():
    # constant images: saturation and contrast act on deviations from means, which are zero here
    x = torch.rand(6, 1, 1, 1).expand(6, 3, 8, 8).contiguous()
    out = diff_augment(x, 'color', ParamDiffAug())
    shift = out - x
    torch.testing.assert_close(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    assert (shift.abs() <= 0.5).all()
    assert shift[:, 0, 0, 0].unique().numel() == 6


def test_contrast_keeps_the_image_mean():
    # one channel (saturation is then a no-op) and brightness 0: out = (x - mean) * c + mean, c in [0.5, 1.5]
    x = _batch(6, (1, 32, 32))
    out = diff_augment(x, 'color', ParamDiffAug(brightness=0.0))
    mean_in = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3), keepdim=True), mean_in, atol=1e-5, rtol=0)
    a, b = (x - mean_in).flatten(1), (out - mean_in).flatten(1)
    c = (a * b).sum(1) / (a * a).sum(1)
    assert ((c >= 0.5 - 1e-5) & (c <= 1.5 + 1e-5)).all() and c.unique().numel() == 6
    torch.testing.assert_close(b, a * c[:, None], atol=1e-5, rtol=0)


def test_saturation_keeps_the_channel_mean_image():
    from utils.augmentation import _color
    x = _batch(2)
    s = torch.tensor([0.3, 1.7])
    p = {'brightness': torch.zeros(2), 'saturation': s, 'contrast': torch.ones(2)}
    out = _color(x, p, ParamDiffAug())
    m = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out.mean(dim=1, keepdim=True), m, atol=1e-6, rtol=0)
    torch.testing.assert_close(out - m, (x - m) * s.view(2, 1, 1, 1), atol=1e-6, rtol=0)


def test_color_draw_ranges():
    from utils.augmentation import _draw
    d = _draw('color', 10000, 32, 32, ParamDiffAug(), torch.Generator().manual_seed(0))
    for name, lo, hi in (('brightness', -0.5, 0.5), ('saturation', 0.0, 2.0), ('contrast', 0.5, 1.5)):
        assert lo <= d[name].min() and d[name].max() <= hi
        assert d[name].min() < lo + 0.01 and d[name].max() > hi - 0.01


def test_crop_is_zero_filled_translation():
    x = torch.ones(64, 3, 32, 32)
    out = diff_augment(x, 'crop', ParamDiffAug())
    seen = set()
    for img in out:
        zero_rows = (img[0] == 0).all(dim=1)
        zero_cols = (img[0] == 0).all(dim=0)
        tx = int(zero_rows.sum()) * (1 if zero_rows[-1] else -1)  # content moves up when tx > 0
        ty = int(zero_cols.sum()) * (1 if zero_cols[-1] else -1)
        assert abs(tx) <= 4 and abs(ty) <= 4
        seen.add((tx, ty))
        expected = torch.zeros(32, 32)
        expected[max(0, -tx):32 - max(0, tx), max(0, -ty):32 - max(0, ty)] = 1
        assert torch.equal(img, expected.expand(3, -1, -1))
    assert len(seen) > 10


def test_crop_moves_content_by_the_shift():
    from utils.augmentation import _crop
    x = torch.arange(1, 2 * 2 * 6 * 5 + 1, dtype=torch.float).view(2, 2, 6, 5)
    out = _crop(x, {'tx': torch.tensor([2, -1]), 'ty': torch.tensor([-3, 1])}, ParamDiffAug())
    expected = torch.zeros_like(x)
    expected[0, :, 0:4, 3:5] = x[0, :, 2:6, 0:2]  # out[i, j] = x[i + 2, j - 3]
    expected[1, :, 1:6, 0:4] = x[1, :, 0:5, 1:5]  # out[i, j] = x[i - 1, j + 1]
    assert torch.equal(out, expected)


def test_cutout_zeroes_square():
    x = torch.ones(200, 1, 32, 32)
    out = diff_augment(x, 'cutout', ParamDiffAug())
    full = 0
    for img in out[:, 0]:
        zero_rows = (img == 0).any(dim=1).nonzero().squeeze(1)
        zero_cols = (img == 0).any(dim=0).nonzero().squeeze(1)
        h, w = zero_rows.numel(), zero_cols.numel()
        assert 8 <= h <= 16 and 8 <= w <= 16
        # a contiguous block, touching a border unless it is the full 16 px
        assert zero_rows[-1] - zero_rows[0] + 1 == h and zero_cols[-1] - zero_cols[0] + 1 == w
        assert h == 16 or zero_rows[0] == 0 or zero_rows[-1] == 31
        assert (img == 0).sum() == h * w
        full += (h == 16 and w == 16)
    assert full > 0


def test_scale_and_rotate_identity_parameters_reproduce_input():
    x = _batch(3)
    out = diff_augment(x, 'scale', ParamDiffAug(ratio_scale=1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    out = diff_augment(x, 'rotate', ParamDiffAug(ratio_rotate=0.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_rotate_by_90_degrees_and_scale_by_half():
    from utils.augmentation import _rotate, _scale
    x = _batch(2, (3, 9, 9))
    out = _rotate(x, {'theta': torch.full((2,), math.pi / 2)}, ParamDiffAug())
    # sampling grid: input (col, row) = theta @ output (col, row), so out[r, c] = x[c, W - 1 - r]
    torch.testing.assert_close(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    # sx = sy = 0.5 samples the centre half: output pixel 2k lies on input pixel k + 2 (9 px, centre 4)
    out = _scale(x, {'sx': torch.full((2,), 0.5), 'sy': torch.full((2,), 0.5)}, ParamDiffAug())
    torch.testing.assert_close(out[:, :, ::2, ::2], x[:, :, 2:7, 2:7], atol=1e-5, rtol=0)


def test_scale_factors_in_range():
    from utils.augmentation import _draw
    d = _draw('scale', 10000, 32, 32, ParamDiffAug(), torch.Generator().manual_seed(0))
    for v in (d['sx'], d['sy']):
        assert v.min() >= 1 / 1.2 - 1e-6 and v.max() <= 1.2 + 1e-6
    d = _draw('rotate', 10000, 32, 32, ParamDiffAug(), torch.Generator().manual_seed(0))
    assert d['theta'].abs().max() <= math.radians(15) + 1e-6
    d = _draw('crop', 10000, 32, 32, ParamDiffAug(), torch.Generator().manual_seed(0))
    assert set(d['tx'].tolist()) == set(range(-4, 5))
    d = _draw('crop', 10000, 64, 64, ParamDiffAug(), torch.Generator().manual_seed(0))
    assert set(d['ty'].tolist()) == set(range(-8, 9))
    d = _draw('cutout', 10000, 32, 32, ParamDiffAug(), torch.Generator().manual_seed(0))
    assert set(d['ox'].tolist()) == set(range(0, 33))


# ----------------------------------------------------------------------------- non-Siamese

def test_non_siamese_per_sample_parameters_and_reproducible():
    x = torch.zeros(5, 1, 4, 4)
    param = ParamDiffAug(aug_mode='M')
    torch.manual_seed(0)
    a = diff_augment(x, 'color', param)
    torch.manual_seed(0)
    b = diff_augment(x, 'color', param)
    assert torch.equal(a, b)
    assert a[:, 0, 0, 0].unique().numel() == 5  # each sample its own brightness offset
    # 'S' mode chooses one op for the whole call
    # (flip leaves an all-ones image unchanged, color does not), and over calls both ops occur
    x = torch.ones(30, 1, 16, 16)
    torch.manual_seed(0)
    used = set()
    for _ in range(20):
        out = diff_augment(x, 'color_flip', ParamDiffAug())
        changed = (out - x).abs().amax(dim=(1, 2, 3)) > 0
        assert changed.all() or not changed.any()
        used.add(bool(changed.all()))
    assert used == {True, False}


def test_check_strategy_and_defaults():
    with pytest.raises(UserError, match='blur'):
        check_strategy('color_blur')
    with pytest.raises(UserError, match='blur'):
        diff_augment(_batch(1), 'color_blur', ParamDiffAug())
    check_strategy(FULL)
    check_strategy('none')
    assert default_dsa_strategy('MNIST') == 'color_crop_cutout_scale_rotate'
    assert default_dsa_strategy('SVHN') == 'color_crop_cutout_scale_rotate'
    assert default_dsa_strategy('CIFAR10') == FULL
    assert default_dsa_strategy('FashionMNIST') == FULL


# ----------------------------------------------------------------------------- classic DC augmentation

def test_get_daparam():
    assert get_daparam('CIFAR10', 'ConvNet') == {'crop': 4, 'scale': 0.2, 'rotate': 45, 'noise': 0.001,
                                                  'strategy': 'none'}
    assert get_daparam('MNIST', 'ConvNet')['strategy'] == 'crop_scale_rotate'
    assert get_daparam('CIFAR10', 'ConvNetBN')['strategy'] == 'crop_noise'
    assert get_daparam('MNIST', 'ConvNetBN')['strategy'] == 'crop_noise'


def test_dc_augment_none_is_identity():
    x = _batch(4)
    assert torch.equal(dc_augment(x, get_daparam('CIFAR10', 'ConvNet')), x)


def test_dc_augment_crop_noise():
    x = _batch(64)
    before = x.clone()
    torch.manual_seed(0)
    out = dc_augment(x, get_daparam('CIFAR10', 'ConvNetBN'))
    assert out.shape == x.shape and torch.equal(x, before)
    diff = out - x
    noisy = diff.flatten(1).abs().max(dim=1).values < 0.01
    assert noisy.any() and (~noisy).any()
    assert 0.0007 < diff[noisy].std() < 0.0013
    torch.manual_seed(0)
    assert torch.equal(dc_augment(x, get_daparam('CIFAR10', 'ConvNetBN')), out)


def test_dc_crop_pads_with_channel_mean():
    from utils.augmentation import _dc_crop
    x = _batch(50)
    mean = x.mean(dim=(0, 2, 3))
    out = _dc_crop(x, mean, 4)
    # every output is a 32x32 window of the mean-padded image at offsets 0..7
    padded = mean.view(1, 3, 1, 1).expand(50, 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = x
    offsets = set()
    for i in range(50):
        match = [(r, c) for r in range(9) for c in range(9)
                 if torch.equal(out[i], padded[i, :, r:r + 32, c:c + 32])]
        assert match and all(r < 8 and c < 8 for r, c in match)
        offsets.add(match[0])
    assert len(offsets) > 10


def test_dc_augment_mnist_strategy_shapes():
    x = _batch(12, (1, 28, 28))
    before = x.clone()
    torch.manual_seed(1)
    out = dc_augment(x, get_daparam('MNIST', 'ConvNet'))
    assert out.shape == x.shape and torch.equal(x, before) and torch.isfinite(out).all()
    assert not torch.equal(out, x)
