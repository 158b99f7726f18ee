"""Augmentation.

Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021): `diff_augment`, used in matching (Siamese,
one seed shared by the real and the synthetic batch) and when training networks (non-Siamese).
Classic DC augmentation (Zhao et al. 2021): `dc_augment`, non-differentiable, used only at evaluation.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.ndimage import rotate as scipy_rotate

from utils import UserError, to_device

DSA_OPS = ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate')
DC_OPS = ('crop', 'scale', 'rotate', 'noise')
_IDENTITY = ('', 'none', 'None')


@dataclass
class ParamDiffAug:
    """DSA hyper-parameters (the original defaults)."""
    aug_mode: str = 'S'          # 'S': one op per call (per group when Siamese); 'M': every op in order
    prob_flip: float = 0.5
    ratio_scale: float = 1.2     # scale factors uniform in [1/1.2, 1.2], x and y drawn separately
    ratio_rotate: float = 15.0   # degrees, uniform in [-15, 15]
    ratio_crop_pad: float = 0.125  # max translation, as a fraction of the side
    ratio_cutout: float = 0.5    # cutout side, as a fraction of the side
    brightness: float = 1.0      # x + (u - 0.5) * brightness
    saturation: float = 2.0      # factor u * saturation around the channel mean
    contrast: float = 0.5        # factor u + contrast around the image mean


def check_strategy(strategy: str) -> None:
    """Raise UserError unless `strategy` is an identity string or ops of DSA_OPS joined by '_'."""
    if strategy in _IDENTITY:
        return
    unknown = [op for op in strategy.split('_') if op not in DSA_OPS]
    if unknown:
        raise UserError(f"unknown DSA operation(s) {', '.join(repr(op) for op in unknown)} in strategy "
                        f"{strategy!r}; use ops from {', '.join(DSA_OPS)} joined by '_', or 'none'.")


FULL_STRATEGY = 'color_crop_cutout_flip_scale_rotate'


def default_dsa_strategy(dataset: str) -> str:
    """DC/DSA's recommended strategy: no flip for digits (MNIST, SVHN). DM and MTT (and the plugin's
    LoDM, LoMTT) use FULL_STRATEGY on every dataset."""
    if dataset in ('MNIST', 'SVHN'):
        return 'color_crop_cutout_scale_rotate'
    return FULL_STRATEGY


NO_DSA = ('', 'none', 'None')


def dsa_choice(given, dsa, dataset, setting, other):
    """The --dsa_strategy that `setting` (e.g. '--method DSA') implies: 'none' when it uses no DSA (dsa
    False), else `given` or the recommended one for the dataset. A `given` that contradicts it is a
    UserError that names `other`, the setting with the other choice."""
    if not dsa:
        if given not in (None, *NO_DSA):
            raise UserError(f'{setting} uses no DSA but --dsa_strategy {given} was given: use {other} or drop '
                            f'--dsa_strategy.')
        return 'none'
    if given in NO_DSA:
        raise UserError(f"{setting} needs DSA operations but --dsa_strategy is '{given}': drop it for the "
                        f'recommended strategy, or use {other}.')
    return given or default_dsa_strategy(dataset)


# ---------------------------------------------------------------------------------------------------------
# DSA: random draws. Each returns a dict of tensors of shape (num,) on the CPU, num = number of param groups.

def _crop_shift(size, param):
    return int(size * param.ratio_crop_pad + 0.5)


def _cutout_size(size, param):
    return int(size * param.ratio_cutout + 0.5)


def _draw(op, num, h, w, param, gen):
    def uniform():
        return torch.rand(num, generator=gen)

    def integers(low, high):  # in [low, high)
        return torch.randint(low, high, (num,), generator=gen)

    if op == 'color':
        return {'brightness': (uniform() - 0.5) * param.brightness,
                'saturation': uniform() * param.saturation,
                'contrast': uniform() + param.contrast}
    if op == 'crop':
        sh, sw = _crop_shift(h, param), _crop_shift(w, param)
        return {'tx': integers(-sh, sh + 1), 'ty': integers(-sw, sw + 1)}
    if op == 'cutout':
        ch, cw = _cutout_size(h, param), _cutout_size(w, param)
        return {'ox': integers(0, h + 1 - ch % 2), 'oy': integers(0, w + 1 - cw % 2)}
    if op == 'flip':
        return {'flip': uniform() < param.prob_flip}
    if op == 'scale':
        lo, hi = 1.0 / param.ratio_scale, param.ratio_scale
        return {'sx': uniform() * (hi - lo) + lo, 'sy': uniform() * (hi - lo) + lo}
    # rotate
    return {'theta': (uniform() - 0.5) * 2 * param.ratio_rotate / 180 * math.pi}


# DSA: the ops. x (n, C, H, W); p holds per-sample parameters of shape (n,) on x.device. All out of place.

def _col(v):
    return v.view(-1, 1, 1, 1)


def _color(x, p, param):
    """Brightness, then saturation, then contrast, each with its own draw."""
    x = x + _col(p['brightness'])
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _col(p['saturation']) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _col(p['contrast']) + mean


def _crop(x, p, param):
    """Translation with zero fill: gather from the 1-px zero-padded image at clamp(i + shift + 1, 0, H + 1)."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) + p['tx'][:, None] + 1).clamp(0, h + 1)  # (n, H)
    cols = (torch.arange(w, device=x.device) + p['ty'][:, None] + 1).clamp(0, w + 1)  # (n, W)
    padded = F.pad(x, [1, 1, 1, 1])
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _cutout(x, p, param):
    """Zero a square of side round(ratio * H) centred at the drawn offset, clipped at the borders."""
    _, _, h, w = x.shape
    ch, cw = _cutout_size(h, param), _cutout_size(w, param)
    top = (p['ox'] - ch // 2)[:, None]
    left = (p['oy'] - cw // 2)[:, None]
    i = torch.arange(h, device=x.device)
    j = torch.arange(w, device=x.device)
    in_rows = (i >= top) & (i < top + ch)    # (n, H)
    in_cols = (j >= left) & (j < left + cw)  # (n, W)
    # The offsets' range guarantees the square meets the image, so clamping indices (the original) and
    # clipping the square (here) give the same mask.
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _flip(x, p, param):
    return torch.where(_col(p['flip']), x.flip(3), x)


def _affine(x, theta):
    # align_corners=True: the behaviour the DSA authors had under torch 1.2 (their code relied on the
    # default, which became False in torch 1.3) and MTT's explicit choice. It also makes identity
    # parameters reproduce the input exactly.
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=True)


def _scale(x, p, param):
    zero = torch.zeros_like(p['sx'])
    theta = torch.stack([p['sx'], zero, zero, zero, p['sy'], zero], dim=1).view(-1, 2, 3)
    return _affine(x, theta)


def _rotate(x, p, param):
    cos, sin, zero = torch.cos(p['theta']), torch.sin(p['theta']), torch.zeros_like(p['theta'])
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(-1, 2, 3)
    return _affine(x, theta)


_DSA_FNS = {'color': _color, 'crop': _crop, 'cutout': _cutout, 'flip': _flip, 'scale': _scale,
            'rotate': _rotate}


def diff_augment(x, strategy, param, generator=None, sizes=None, siamese=False):
    """Differentiable augmentation of x (N, C, H, W); returns a new tensor of the same shape.

    The batch is cut into consecutive groups of `sizes` samples (a list of ints summing to N; default one
    group). Group by group, in order, each group draws from `generator` (a CPU torch.Generator, a list of
    one per group, or None for the global CPU RNG): in aug_mode 'S' the index of its one op, then that op's
    parameters; in 'M' the parameters of every op, in strategy order. Parameters are drawn per sample, or
    with siamese=True once per group and shared by its samples.

    Siamese matching (DC, DSA, DM) augments the real and the synthetic images of every class with
    `siamese_augment` and the same seed: a group's draws do not depend on its size, so class c gets the
    same transformation in both batches. A single network's training uses one group (one op per call,
    as the original); K networks trained together use one group and one generator per network.

    All draws happen on the host and reach x's device in one copy, so a call costs no synchronisation.
    """
    if strategy in _IDENTITY:
        return x
    check_strategy(strategy)
    if param.aug_mode not in ('S', 'M'):
        raise UserError(f"unknown DSA aug_mode {param.aug_mode!r}; use 'S' (one op per call) or 'M' (all ops).")
    ops = strategy.split('_')
    n, _, h, w = x.shape
    sizes = [n] if sizes is None else list(sizes)
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(sizes)
    plan = _plan(ops, sizes, generators, siamese, h, w, param)
    for op, (index, p) in _to_device(plan, x).items():
        if index is None:  # the op applies to every sample ('M' mode, or every group chose it)
            x = _DSA_FNS[op](x, p, param)
        else:
            x = x.index_copy(0, index, _DSA_FNS[op](x.index_select(0, index), p, param))
    return x.contiguous()


def siamese_augment(x, strategy, param, seeds, sizes):
    """diff_augment with one transformation per group (class): group g draws from a generator seeded with
    seeds[g], so its transformation depends only on its seed (not on the other groups or on its size)."""
    return diff_augment(x, strategy, param, [torch.Generator().manual_seed(int(s)) for s in seeds], sizes,
                        siamese=True)


def _plan(ops, sizes, generators, siamese, h, w, param):
    """Host-side draws: {op: (sample indices (long), {name: one value per sample})} for the ops in use."""
    per_op = {op: ([], {}) for op in ops}
    start = 0
    for size, gen in zip(sizes, generators):
        chosen = ops if param.aug_mode == 'M' else [ops[int(torch.randint(len(ops), (), generator=gen))]]
        for op in chosen:
            index, values = per_op[op]
            index.append(torch.arange(start, start + size))
            for name, v in _draw(op, 1 if siamese else size, h, w, param, gen).items():
                values.setdefault(name, []).append(v.expand(size) if siamese else v)
        start += size
    plan = {}
    for op, (index, values) in per_op.items():
        if index:
            index = torch.cat(index)
            plan[op] = (None if len(index) == start else index, {k: torch.cat(v) for k, v in values.items()})
    return plan


def _to_device(plan, x):
    """The plan's tensors on x's device (floats in x's dtype) through one copy of one packed tensor."""
    parts, dtypes = [], []
    for index, values in plan.values():
        for t in ([] if index is None else [index]) + list(values.values()):
            parts.append(t.double())
            dtypes.append(t.dtype)
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    packed = to_device(packed, x.device).split([len(t) for t in parts])
    out, k = {}, 0
    for op, (index, values) in plan.items():
        if index is not None:
            index, k = packed[k].long(), k + 1
        p = {}
        for name in values:
            dtype = x.dtype if dtypes[k].is_floating_point else dtypes[k]
            p[name], k = packed[k].to(dtype), k + 1
        out[op] = (index, p)
    return out


# ---------------------------------------------------------------------------------------------------------
# Classic DC augmentation (evaluation only, non-differentiable).

def get_daparam(dataset: str, model_eval: str) -> dict:
    """DC augmentation parameters: strategy 'none', 'crop_scale_rotate' for MNIST, 'crop_noise' for a
    ConvNetBN evaluation model (which wins)."""
    param = {'crop': 4, 'scale': 0.2, 'rotate': 45, 'noise': 0.001, 'strategy': 'none'}
    if dataset == 'MNIST':
        param['strategy'] = 'crop_scale_rotate'
    if model_eval == 'ConvNetBN':
        param['strategy'] = 'crop_noise'
    return param


def _dc_crop(images, mean, crop, generator=None):
    """Pad by `crop` with the channel means, then take a window at random offsets 0..2*crop-1 per image."""
    n, c, h, w = images.shape
    padded = mean.view(1, c, 1, 1).expand(n, c, h + 2 * crop, w + 2 * crop).clone()
    padded[:, :, crop:crop + h, crop:crop + w] = images
    top = torch.randint(0, 2 * crop, (n,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * crop, (n,), generator=generator).to(images.device)
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = left[:, None] + torch.arange(w, device=images.device)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * crop))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _dc_scale(image, scale, generator=None):
    """Resize (nearest) to random h, w in [1 - scale, 1 + scale] * H, then zero-pad / centre-crop back."""
    c, h0, w0 = image.shape
    h, w = (int(float(torch.empty(()).uniform_(1 - scale, 1 + scale, generator=generator)) * h0) for _ in range(2))
    tmp = F.interpolate(image[None], [h, w])[0]
    side = max(h, w, h0, w0)
    canvas = image.new_zeros(c, side, side)
    r, q = (side - h) // 2, (side - w) // 2
    canvas[:, r:r + h, q:q + w] = tmp
    r, q = (side - h0) // 2, (side - w0) // 2
    return canvas[:, r:r + h0, q:q + w0]


def _dc_rotate(image, rotate, cval, generator=None):
    """scipy rotation by a random integer angle in [-rotate, rotate - 1], reshape, then centre crop."""
    _, h0, w0 = image.shape
    angle = int(torch.randint(-rotate, rotate, (), generator=generator))
    im = scipy_rotate(image.detach().cpu().numpy(), angle=angle, axes=(-2, -1), cval=cval)
    r, q = (im.shape[-2] - h0) // 2, (im.shape[-1] - w0) // 2
    return torch.as_tensor(im[:, r:r + h0, q:q + w0].copy(), dtype=image.dtype, device=image.device)


def dc_augment(images, param, generator=None):
    """Classic DC augmentation of images (N, C, H, W); returns a new tensor (the input is not modified).

    Per image one op is chosen uniformly from param['strategy'] ('none' returns the input itself). All random
    choices come from `generator` (a CPU torch.Generator; None: the global torch RNG), in the same order.
    """
    strategy = param['strategy']
    if strategy in _IDENTITY:
        return images
    ops = strategy.split('_')
    unknown = [op for op in ops if op not in DC_OPS]
    if unknown:
        raise UserError(f"unknown DC augmentation {unknown[0]!r}; use ops from {', '.join(DC_OPS)} joined by '_'.")
    images = images.detach()
    mean = images.mean(dim=(0, 2, 3))  # per-channel batch mean, before any change
    choice = torch.randint(len(ops), (images.shape[0],), generator=generator)
    out = images.clone()
    for k, op in enumerate(ops):
        sel = (choice == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        sub = images[sel.to(images.device)]
        if op == 'crop':
            out[sel] = _dc_crop(sub, mean, param['crop'], generator)
        elif op == 'noise':
            out[sel] = sub + param['noise'] * torch.randn(sub.shape, generator=generator).to(sub)
        elif op == 'scale':
            out[sel] = torch.stack([_dc_scale(im, param['scale'], generator) for im in sub])
        else:
            cval = float(mean.mean())
            out[sel] = torch.stack([_dc_rotate(im, param['rotate'], cval, generator) for im in sub])
    return out
