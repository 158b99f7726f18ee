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

from utils import UserError

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


def default_dsa_strategy(dataset: str) -> str:
    """The authors' recommended strategy: no flip for digits (MNIST, SVHN)."""
    if dataset in ('MNIST', 'SVHN'):
        return 'color_crop_cutout_scale_rotate'
    return 'color_crop_cutout_flip_scale_rotate'


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


def _per_sample(draws, index, x):
    """Move a dict of (num,) draws to x's device (floats in x's dtype) and gather them per sample."""
    out = {}
    for name, v in draws.items():
        v = v.to(device=x.device, dtype=x.dtype if v.is_floating_point() else v.dtype)
        out[name] = v if index is None else v[index]
    return out


def diff_augment(x, strategy, param, seed=None, groups=None):
    """Differentiable augmentation of x (N, C, H, W); returns a new tensor of the same shape.

    seed None: non-Siamese. In aug_mode 'S' one op is chosen for the whole call; every sample gets its own
      parameters, drawn from the global torch RNG.
    seed int: Siamese. All draws come from a CPU torch.Generator seeded with `seed` (the global RNG is left
      alone). `groups` is None (one group) or a long tensor (N,) of group ids 0..G-1 with G = max + 1; each
      group chooses its own op ('S') and parameters, shared by its samples. The draws depend only on
      (seed, G, strategy, image size, param), not on N, so calls on a real and a synthetic batch with the
      same seed and the same G (e.g. groups = class labels) transform each group identically.
    """
    if strategy in _IDENTITY:
        return x
    check_strategy(strategy)
    if param.aug_mode not in ('S', 'M'):
        raise UserError(f"unknown DSA aug_mode {param.aug_mode!r}; use 'S' (one op per call) or 'M' (all ops).")
    ops = strategy.split('_')
    n, _, h, w = x.shape
    if seed is None:
        gen, num, index = None, n, None
    else:
        gen = torch.Generator().manual_seed(int(seed))
        if groups is None:
            num, index = 1, torch.zeros(n, dtype=torch.long, device=x.device)
        else:
            index = groups.to(device=x.device, dtype=torch.long)
            num = int(index.max()) + 1 if n else 1
    # Fixed draw order (the op choice, then every op's parameters) keeps Siamese calls in lockstep.
    choice = torch.randint(len(ops), (1 if seed is None else num,), generator=gen) if param.aug_mode == 'S' else None
    params = [_per_sample(_draw(op, num, h, w, param, gen), index, x) for op in ops]

    if param.aug_mode == 'M':
        for op, p in zip(ops, params):
            x = _DSA_FNS[op](x, p, param)
        return x.contiguous()
    if choice.numel() == 1:
        k = int(choice)
        return _DSA_FNS[ops[k]](x, params[k], param).contiguous()
    # Siamese with several groups: apply each op only to the samples whose group chose it.
    sample_choice = choice.to(x.device)[index]
    out = x
    for k, op in enumerate(ops):
        sel = (sample_choice == k).nonzero().squeeze(1)
        if sel.numel() == n:
            return _DSA_FNS[op](x, params[k], param).contiguous()
        if sel.numel() == 0:
            continue
        p = {name: v.index_select(0, sel) for name, v in params[k].items()}
        out = out.index_copy(0, sel, _DSA_FNS[op](x.index_select(0, sel), p, param))
    return out.contiguous()


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


def _dc_crop(images, mean, crop):
    """Pad by `crop` with the channel means, then take a window at random offsets 0..2*crop-1 per image."""
    n, c, h, w = images.shape
    padded = mean.view(1, c, 1, 1).expand(n, c, h + 2 * crop, w + 2 * crop).clone()
    padded[:, :, crop:crop + h, crop:crop + w] = images
    top = torch.randint(0, 2 * crop, (n,)).to(images.device)
    left = torch.randint(0, 2 * crop, (n,)).to(images.device)
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = left[:, None] + torch.arange(w, device=images.device)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * crop))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _dc_scale(image, scale):
    """Resize (nearest) to random h, w in [1 - scale, 1 + scale] * H, then zero-pad / centre-crop back."""
    c, h0, w0 = image.shape
    h, w = (int(float(torch.empty(()).uniform_(1 - scale, 1 + scale)) * h0) for _ in range(2))
    tmp = F.interpolate(image[None], [h, w])[0]
    side = max(h, w, h0, w0)
    canvas = image.new_zeros(c, side, side)
    r, q = (side - h) // 2, (side - w) // 2
    canvas[:, r:r + h, q:q + w] = tmp
    r, q = (side - h0) // 2, (side - w0) // 2
    return canvas[:, r:r + h0, q:q + w0]


def _dc_rotate(image, rotate, cval):
    """scipy rotation by a random integer angle in [-rotate, rotate - 1], reshape, then centre crop."""
    _, h0, w0 = image.shape
    angle = int(torch.randint(-rotate, rotate, ()))
    im = scipy_rotate(image.detach().cpu().numpy(), angle=angle, axes=(-2, -1), cval=cval)
    r, q = (im.shape[-2] - h0) // 2, (im.shape[-1] - w0) // 2
    return torch.as_tensor(im[:, r:r + h0, q:q + w0].copy(), dtype=image.dtype, device=image.device)


def dc_augment(images, param):
    """Classic DC augmentation of images (N, C, H, W); returns a new tensor (the input is not modified).

    Per image one op is chosen uniformly from param['strategy'] ('none' returns the input itself). All random
    choices use the global torch RNG.
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
    choice = torch.randint(len(ops), (images.shape[0],))
    out = images.clone()
    for k, op in enumerate(ops):
        sel = (choice == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        sub = images[sel.to(images.device)]
        if op == 'crop':
            out[sel] = _dc_crop(sub, mean, param['crop'])
        elif op == 'noise':
            out[sel] = sub + param['noise'] * torch.randn(sub.shape).to(sub)
        elif op == 'scale':
            out[sel] = torch.stack([_dc_scale(im, param['scale']) for im in sub])
        else:
            cval = float(mean.mean())
            out[sel] = torch.stack([_dc_rotate(im, param['rotate'], cval) for im in sub])
    return out
