"""K independent networks of one architecture trained at once.

The K networks become one module with K times the channels: every convolution is grouped (network k owns
the k-th block of channels of every layer), every linear layer is a batched matrix product and every
normalization works within a network (batch norm keeps per-network running statistics), so each network
computes what it would alone, up to float rounding. Inputs are (B, K*C, H, W): network k's batch in the
k-th block of channels; outputs (B, K, classes).

Each network keeps its own randomness: it is initialized from its seed (the global RNG is left as it was)
and draws its data order and augmentation from a CPU generator seeded from the same seed, so K networks
trained together equal the same K trained one at a time (K = 1 through the same code) to float
tolerance, and a network's result does not depend on which others it was trained with.

Why grouped convolutions and not torch.func (stack_module_state + functional_call + vmap, whose batching
rule makes the same grouped convolution): CPU time per network and step on the 2-core CPU, ConvNet,
median of 5 in one process, one at a time / grouped / vmap: 10 networks on 10-image batches 85 / 63 /
88 ms (CIFAR shapes), 73 / 56 / 75 ms (MNIST); 10 on 100-image batches 562 / 484 / 704 ms; 4 on
256-image batches 1598 / 1234 / 2012 ms (with avg_pool2d's NCHW kernel; networks.AvgPool2d has since
made both forms faster).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks import AvgPool2d, BasicBlock, Net, get_network
from utils import seed_for, to_device
from utils.augmentation import dc_augment, diff_augment


def init_network(model, channel, num_classes, im_size, seed):
    """A fresh `model` initialized from `seed`; the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network(model, channel, num_classes, im_size)


# ---------------------------------------------------------------------------------------------------------
# K layers side by side. Every tensor of a wide layer is the K networks' tensors concatenated along dim 0,
# so network k's parameter is wide_parameter.chunk(K)[k], in the networks' own parameter order.

def _cat(modules, name, parameter=True):
    tensors = [getattr(m, name) for m in modules]
    if tensors[0] is None:
        return None
    t = torch.cat([t.detach() for t in tensors])
    return nn.Parameter(t) if parameter else t


class WideConv2d(nn.Module):
    """K Conv2d: one convolution with K times the groups."""

    def __init__(self, convs):
        super().__init__()
        c = convs[0]
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.groups = c.groups * len(convs)
        self.weight = _cat(convs, 'weight')
        self.register_parameter('bias', _cat(convs, 'bias'))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WideLinear(nn.Module):
    """K Linear: a batched matrix product from (B, K*in) to (B, K*out)."""

    def __init__(self, linears):
        super().__init__()
        self.k = len(linears)
        self.weight = _cat(linears, 'weight')
        self.register_parameter('bias', _cat(linears, 'bias'))

    def forward(self, x):
        n = x.shape[0]
        x = x.reshape(n, self.k, -1).transpose(0, 1)                     # (K, B, in)
        w = self.weight.view(self.k, -1, x.shape[2]).transpose(1, 2)      # (K, in, out)
        out = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.view(self.k, 1, -1), x, w)
        return out.transpose(0, 1).reshape(n, -1)


class WideBatchNorm2d(nn.Module):
    """K BatchNorm2d: statistics are per channel, so per network, running statistics included."""

    def __init__(self, norms):
        super().__init__()
        self.eps, self.momentum = norms[0].eps, norms[0].momentum
        self.register_parameter('weight', _cat(norms, 'weight'))
        self.register_parameter('bias', _cat(norms, 'bias'))
        self.register_buffer('running_mean', _cat(norms, 'running_mean', parameter=False))
        self.register_buffer('running_var', _cat(norms, 'running_var', parameter=False))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class WideGroupNorm(nn.Module):
    """K GroupNorm (instance norm included): K times the groups."""

    def __init__(self, norms):
        super().__init__()
        self.groups, self.eps = norms[0].num_groups * len(norms), norms[0].eps
        self.register_parameter('weight', _cat(norms, 'weight'))
        self.register_parameter('bias', _cat(norms, 'bias'))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class WideLayerNorm(nn.Module):
    """K LayerNorm over (C, H, W): a group norm with one group per network, then the elementwise affine."""

    def __init__(self, norms):
        super().__init__()
        self.k, self.eps = len(norms), norms[0].eps
        self.register_parameter('weight', _cat(norms, 'weight'))
        self.register_parameter('bias', _cat(norms, 'bias'))

    def forward(self, x):
        x = F.group_norm(x, self.k, eps=self.eps)
        x = x if self.weight is None else x * self.weight
        return x if self.bias is None else x + self.bias


# type -> (condition of the grouped form, the wide layer built from the K networks' layers)
WIDE = {
    nn.Conv2d: (lambda m: m.padding_mode == 'zeros', WideConv2d),
    nn.Linear: (lambda m: True, WideLinear),
    nn.BatchNorm2d: (lambda m: m.track_running_stats and m.momentum is not None, WideBatchNorm2d),
    nn.GroupNorm: (lambda m: True, WideGroupNorm),
    nn.LayerNorm: (lambda m: len(m.normalized_shape) == 3, WideLayerNorm),
}
# Layers without parameters that act per sample and channel (or flatten channel-major), so they need no change.
LOCAL = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, AvgPool2d, nn.Identity,
         nn.Flatten)
# Containers whose forward only chains their children and adds or flattens (networks.py).
FORWARDS = (nn.Sequential.forward, Net.forward, BasicBlock.forward)


def unsupported(net):
    """None if the K-wide form of `net` computes K independent networks, else the first layer that
    has no such form (named, for the log)."""
    for name, m in net.named_modules():
        kind = type(m)
        if kind in WIDE:
            ok = WIDE[kind][0](m)
        elif kind in LOCAL:
            ok = kind is not nn.Flatten or (m.start_dim, m.end_dim) == (1, -1)
        else:
            ok = (kind.forward in FORWARDS and not m._parameters and not m._buffers and
                  (not isinstance(m, Net) or kind.embed is Net.embed))
        if not ok:
            return f"layer '{name or 'the model'}' ({kind.__name__})"
    return None


def widen(nets):
    """The networks `nets` (one architecture, with unsupported() None) as one K-wide module."""
    wide = copy.deepcopy(nets[0])
    for name, m in list(wide.named_modules()):
        if type(m) in WIDE:
            parent, _, child = name.rpartition('.')
            setattr(wide.get_submodule(parent), child, WIDE[type(m)][1]([n.get_submodule(name) for n in nets]))
    return wide


# ---------------------------------------------------------------------------------------------------------
# Training augmentations for K networks: augment(x, generators) on x (K*B, C, H, W), network by network.

def dsa_augment(strategy, param):
    """Non-Siamese DSA: each network its own op and per-sample parameters, drawn from its generator."""
    def augment(x, generators):
        return diff_augment(x, strategy, param, list(generators), [len(x) // len(generators)] * len(generators))
    return augment


def dc_augmentation(param):
    """The classic DC augmentation (dc_augment), each network from its generator and its own batch."""
    def augment(x, generators):
        return torch.cat([dc_augment(part, param, g) for part, g in zip(x.chunk(len(generators)), generators)])
    return augment


def _standardize(x, k):
    """Each network's batch (x is network by network) to zero mean and unit std over its whole tensor."""
    flat = x.view(k, -1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(x)


class Networks:
    """K networks of one architecture trained together (one network alone where the architecture has a
    layer without a K-wide form; see network_groups).

    Network k is initialized from seeds[k] and draws its data order and augmentation from
    `generators[k]`, a CPU generator seeded from seeds[k]. Loss and accuracy stay on the device as (K,)
    tensors, so no step waits for the device.
    """

    def __init__(self, model, channel, num_classes, im_size, seeds, device):
        nets = [init_network(model, channel, num_classes, im_size, s) for s in seeds]
        reason = unsupported(nets[0])
        if reason and len(nets) > 1:
            raise ValueError(f'{model} cannot be trained {len(nets)} at a time: {reason}')
        self.k = len(nets)
        self.module = (nets[0] if reason else widen(nets)).to(device)
        self.generators = [torch.Generator().manual_seed(seed_for(s, 'data')) for s in seeds]

    def parameters_of(self, k):
        """Network k's parameters (views), in its parameter order."""
        return [p.detach().chunk(self.k)[k] for p in self.module.parameters()]

    def optimizer(self, lr, momentum, weight_decay):
        """SGD on all networks: elementwise, so each network's update is its own."""
        return torch.optim.SGD(self.module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _outputs(self, x):
        """x (K, B, C, H, W), network k's batch in x[k] -> logits (B, K, classes)."""
        k, b = x.shape[:2]
        return self.module(x.transpose(0, 1).reshape(b, -1, *x.shape[3:])).view(b, k, -1)

    def _loss_and_hits(self, x, y):
        """Mean cross-entropy (K,) and number of correct argmaxes (K,) for logits of x, labels y (B, K)."""
        out = self._outputs(x)
        loss = F.cross_entropy(out.permute(0, 2, 1), y, reduction='none').mean(0)
        return loss, (out.argmax(2) == y).sum(0)

    def train_epoch(self, images, labels, batch_size, optimizer, augment=None, standardize=False):
        """One epoch, each network through its own shuffled order of (images, labels) in batches of
        batch_size; augment(x, generators) on every batch, after the optional standardization.
        Returns (mean loss, accuracy), (K,) tensors on the device."""
        n, k = len(images), self.k
        order = to_device(torch.stack([torch.randperm(n, generator=g) for g in self.generators]), images.device)
        self.module.train()
        loss_sum = images.new_zeros(k)
        hits = torch.zeros(k, dtype=torch.long, device=images.device)
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]  # (K, B)
            x = images[idx.flatten()]
            x = _standardize(x, k) if standardize else x
            x = augment(x, self.generators) if augment is not None else x
            loss, hit = self._loss_and_hits(x.view(k, -1, *x.shape[1:]), labels[idx].T)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.shape[1]
            hits += hit
        return loss_sum / n, hits.double() / n

    @torch.no_grad()
    def test(self, images, labels, batch_size, standardize=False):
        """(mean loss, accuracy) of every network on (images, labels), (K,) tensors on the device."""
        self.module.eval()
        loss_sum = images.new_zeros(self.k)
        hits = torch.zeros(self.k, dtype=torch.long, device=images.device)
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            x = (x - x.mean()) / x.std() if standardize else x
            loss, hit = self._loss_and_hits(x.expand(self.k, *x.shape), y[:, None].expand(-1, self.k))
            loss_sum += loss * len(y)
            hits += hit
        return loss_sum / len(images), hits.double() / len(images)


def network_groups(model, channel, num_classes, im_size, seeds, device, log):
    """The networks of `seeds` as one Networks, or, where the architecture has a layer without a K-wide
    form, one Networks per seed (said through log(message))."""
    reason = unsupported(init_network(model, channel, num_classes, im_size, seeds[0])) if len(seeds) > 1 else None
    if reason is None:
        return [Networks(model, channel, num_classes, im_size, seeds, device)]
    log(f'{model}: {reason} has no K-wide form, so its {len(seeds)} networks are trained one at a time')
    return [Networks(model, channel, num_classes, im_size, [s], device) for s in seeds]


def train(networks, images, labels, epochs, lr, batch_size, momentum, weight_decay, decay_epoch=None,
          augment=None, standardize=False, after_epoch=None):
    """SGD (lr, momentum, weight_decay) for `epochs` epochs; after epoch `decay_epoch` the learning rate
    is divided by 10 and the optimizer rebuilt (momentum lost), as the original. after_epoch(epoch, loss,
    accuracy) is called after every epoch with (K,) device tensors."""
    optimizer = networks.optimizer(lr, momentum, weight_decay)
    for epoch in range(epochs):
        loss, acc = networks.train_epoch(images, labels, batch_size, optimizer, augment, standardize)
        if after_epoch is not None:
            after_epoch(epoch, loss, acc)
        if epoch == decay_epoch:
            optimizer = networks.optimizer(lr * 0.1, momentum, weight_decay)
