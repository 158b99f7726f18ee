"""The original code's hot loops, written out from the reference (../shared/reference/original_code.md) for
the benchmarks to run beside ours on the same machine: DSA as the original draws it (the global RNG
reseeded before every draw in Siamese mode, sample 0's parameters broadcast, affine matrices built by a
Python loop over samples), the original's per-class DM and DC loops, its MTT unroll and its evaluation
(a DataLoader, one network at a time, one loss.item() per batch), and its network (network()). Only the
benchmarks import this.
"""
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import networks
from utils.matching import match_loss


def network(model, channel, num_classes, im_size, device):
    """The original's network: ours (the same layers and initialization) with nn.AvgPool2d where ours has
    networks.AvgPool2d (the same averages, computed faster on the CPU), built on the CPU and moved."""
    net = networks.get_network(model, channel, num_classes, im_size)
    for name, m in list(net.named_modules()):
        if isinstance(m, networks.AvgPool2d):
            parent, _, child = name.rpartition('.')
            setattr(net.get_submodule(parent), child, nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    return net.to(device)


# ------------------------------------------------------------------------------------------- DSA (3.9)

class OriginalParam:
    def __init__(self):
        self.aug_mode, self.prob_flip, self.ratio_scale, self.ratio_rotate = 'S', 0.5, 1.2, 15.0
        self.ratio_crop_pad, self.ratio_cutout, self.brightness, self.saturation, self.contrast = 0.125, 0.5, 1.0, 2.0, 0.5
        self.latestseed, self.siamese = -1, False


def _reseed(param):
    if param.latestseed != -1:
        torch.random.manual_seed(param.latestseed)
        param.latestseed += 1


def _scale(x, param):
    ratio = param.ratio_scale
    _reseed(param)
    sx = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio
    _reseed(param)
    sy = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = torch.tensor([[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])], dtype=torch.float)
    if param.siamese:
        theta[:] = theta[0].clone()
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _rotate(x, param):
    _reseed(param)
    t = (torch.rand(x.shape[0]) - 0.5) * 2 * param.ratio_rotate / 180 * math.pi
    theta = torch.tensor([[[math.cos(t[i]), math.sin(-t[i]), 0], [math.sin(t[i]), math.cos(t[i]), 0]]
                          for i in range(x.shape[0])], dtype=torch.float)
    if param.siamese:
        theta[:] = theta[0].clone()
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _rand(x, param, *shape, **kw):
    _reseed(param)
    r = torch.rand(x.size(0), *shape, device=x.device, **kw)
    if param.siamese:
        r[:] = r[0].clone()
    return r


def _flip(x, param):
    return torch.where(_rand(x, param, 1, 1, 1) < param.prob_flip, x.flip(3), x)


def _brightness(x, param):
    return x + (_rand(x, param, 1, 1, 1, dtype=x.dtype) - 0.5) * param.brightness


def _saturation(x, param):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, param, 1, 1, 1, dtype=x.dtype) * param.saturation) + mean


def _contrast(x, param):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x, param, 1, 1, 1, dtype=x.dtype) + param.contrast) + mean


def _randint(x, param, low, high):
    _reseed(param)
    r = torch.randint(low, high, size=[x.size(0), 1, 1], device=x.device)
    if param.siamese:
        r[:] = r[0].clone()
    return r


def _crop(x, param):
    sx, sy = int(x.size(2) * param.ratio_crop_pad + 0.5), int(x.size(3) * param.ratio_crop_pad + 0.5)
    tx, ty = _randint(x, param, -sx, sx + 1), _randint(x, param, -sy, sy + 1)
    b, gx, gy = torch.meshgrid(torch.arange(x.size(0), device=x.device), torch.arange(x.size(2), device=x.device),
                               torch.arange(x.size(3), device=x.device), indexing='ij')
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return pad.permute(0, 2, 3, 1).contiguous()[b, gx, gy].permute(0, 3, 1, 2)


def _cutout(x, param):
    cx, cy = int(x.size(2) * param.ratio_cutout + 0.5), int(x.size(3) * param.ratio_cutout + 0.5)
    ox = _randint(x, param, 0, x.size(2) + (1 - cx % 2))
    oy = _randint(x, param, 0, x.size(3) + (1 - cy % 2))
    b, gx, gy = torch.meshgrid(torch.arange(x.size(0), device=x.device), torch.arange(cx, device=x.device),
                               torch.arange(cy, device=x.device), indexing='ij')
    gx = torch.clamp(gx + ox - cx // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cy // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[b, gx, gy] = 0
    return x * mask.unsqueeze(1)


FNS = {'color': [_brightness, _saturation, _contrast], 'crop': [_crop], 'cutout': [_cutout], 'flip': [_flip],
       'scale': [_scale], 'rotate': [_rotate]}


def diff_augment(x, strategy, seed=-1, param=None):
    """The original DiffAugment ('S' mode): seed -1 is non-Siamese; any other seed Siamese."""
    param = param or OriginalParam()
    param.siamese, param.latestseed = seed != -1, seed
    if strategy in ('', 'none', 'None'):
        return x
    ops = strategy.split('_')
    _reseed(param)
    for f in FNS[ops[torch.randint(0, len(ops), size=(1,)).item()]]:
        x = f(x, param)
    return x.contiguous()


def clock_seed():
    """The original's per-class DSA seed came from the clock (milliseconds modulo 100000); the same cost
    (a clock read), but counted, so that benchmark runs repeat."""
    time.time()
    return next(_SEEDS) % 100000


_SEEDS = itertools.count()


# ------------------------------------------------------------------------------------------- loops

def get_images(images_all, indices_class, c, n):
    """The original get_images: a fresh numpy permutation of class c's indices (a list), the first n."""
    import numpy as np
    return images_all[np.random.permutation(indices_class[c])[:n]]


def dm_step(net, images_syn, optimizer, images_all, indices_class, ipc, batch_real, strategy):
    """One DM iteration as VICO main_DM runs it (non-BN branch): a per-class loop, one clock seed per class.
    images_syn: a callable giving the whole synthetic set (LoDM: A@B, recomputed per class as the plugin)."""
    loss = 0
    for c in range(len(indices_class)):
        img_real = get_images(images_all, indices_class, c, batch_real)
        img_syn = images_syn()[c * ipc:(c + 1) * ipc]
        seed = clock_seed()
        img_real = diff_augment(img_real, strategy, seed)
        img_syn = diff_augment(img_syn, strategy, seed)
        loss = loss + ((net.embed(img_real).detach().mean(0) - net.embed(img_syn).mean(0)) ** 2).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def dc_matching_step(net, images_syn, optimizer, images_all, indices_class, ipc, batch_real, strategy):
    """One matching step as VICO main.py runs it: per class a real batch, the real gradients (detached
    copies), the synthetic gradients with create_graph, one backward into every leaf (the net's too)."""
    params = list(net.parameters())
    loss = 0
    for c in range(len(indices_class)):
        img_real = get_images(images_all, indices_class, c, batch_real)
        img_syn = images_syn()[c * ipc:(c + 1) * ipc]
        if strategy != 'none':
            seed = clock_seed()
            img_real, img_syn = diff_augment(img_real, strategy, seed), diff_augment(img_syn, strategy, seed)
        lab_real = torch.full((len(img_real),), c, device=img_real.device)
        lab_syn = torch.full((ipc,), c, device=img_real.device)
        gw_real = [g.detach().clone() for g in torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), params)]
        gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), params, create_graph=True)
        loss = loss + match_loss(gw_syn, gw_real, 'ours')
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def epoch(mode, loader, net, optimizer, strategy, device):
    """The original utils.epoch: a DataLoader pass, per-batch non-Siamese DSA, one .item() per batch."""
    loss_avg, acc_avg, num_exp = 0, 0, 0
    net.train(mode == 'train')
    for img, lab in loader:
        img, lab = img.float().to(device), lab.long().to(device)
        if mode == 'train' and strategy != 'none':
            img = diff_augment(img, strategy)
        output = net(img)
        loss = F.cross_entropy(output, lab)
        acc = (output.argmax(1) == lab).sum().item()
        loss_avg += loss.item() * lab.shape[0]
        acc_avg += acc
        num_exp += lab.shape[0]
        if mode == 'train':
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss_avg / num_exp, acc_avg / num_exp


def evaluate_synset(net, images, labels, test_images, test_labels, epochs, strategy, device, lr=0.01):
    """The original evaluate_synset: epochs+1 epochs, lr x0.1 and a new SGD after epoch epochs//2+1."""
    loader = DataLoader(TensorDataset(images, labels), batch_size=256, shuffle=True, num_workers=0)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), batch_size=256, shuffle=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        epoch('train', loader, net, optimizer, strategy, device)
        if ep == epochs // 2 + 1:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    return epoch('test', test_loader, net, optimizer, 'none', device)[1]


def mtt_iteration(student, X, y, syn_lr, theta_start, theta_target, batches, strategy, optimizers):
    """One MTT distill.py iteration: the student unrolled in one graph (create_graph at every step, the
    original's non-Siamese DSA on every minibatch), the normalized parameter distance, one step of the
    images and of syn_lr. student(x, flat) runs the student with flat parameters (ReparamModule)."""
    params = [theta_start.clone().requires_grad_(True)]
    for b in batches:
        out = student(diff_augment(X[b], strategy), params[-1])
        grad = torch.autograd.grad(F.cross_entropy(out, y[b]), params[-1], create_graph=True)[0]
        params.append(params[-1] - syn_lr * grad)
    loss = ((params[-1] - theta_target) ** 2).sum() / ((theta_start - theta_target) ** 2).sum()
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.item()
