"""Seconds per DC / LoDC matching step and inner-loop epoch (ConvNet, 10 classes, batch_real 256, no DSA),
MNIST- and CIFAR-shaped, ours against the original's loops (benchmarks/original.py), in one process,
alternating.

    python benchmarks/bench_dc.py [--device cuda] [--repeats 3] [--ipcs 1 10]

An outer iteration is outer_loop matching steps and (outer_loop - 1) * inner_loop epochs, (outer, inner) =
get_loops(ipc): (1, 1) at ipc 1 (one step), (10, 50) at ipc 10 (about 10 steps and 450 epochs: minutes on
a CPU), so the table times one step and one epoch.
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import common
import original
from networks import get_network
from utils.augmentation import ParamDiffAug
from utils.data import ClassSampler
from utils.matching import freeze_batch_norm, matching_step, train_on_synset
from utils.synset import SyntheticSet

SHAPES = {'MNIST': (1, (28, 28)), 'CIFAR10': (3, (32, 32))}
PER_CLASS = 600


def paths(shape, ipc, rank, device):
    """{name: (ours, the original's)} callables: a matching step and an inner epoch."""
    channel, im_size = SHAPES[shape]
    labels = torch.arange(10, device=device).repeat_interleave(PER_CLASS)
    sampler = ClassSampler(torch.randn(len(labels), channel, *im_size, device=device), labels, 10)
    indices = [row[row >= 0].tolist() for row in sampler.index]  # the original's indices_class
    args = argparse.Namespace(model='ConvNet', batch_real=256, batch_train=256, lr_net=0.01, dsa=False,
                              dsa_strategy='none', dis_metric='ours')
    synset = SyntheticSet(10, ipc, channel, im_size, rank).to(device)
    optimizer = torch.optim.SGD(synset.parameters(), lr=0.1, momentum=0.5)
    net = get_network('ConvNet', channel, 10, im_size, device)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    their_net = original.network('ConvNet', channel, 10, im_size, device)
    their_optimizer = torch.optim.SGD(their_net.parameters(), lr=0.01)
    param = ParamDiffAug()

    def step():
        freeze_batch_norm(net, sampler, synset.classes)
        matching_step(net, synset, optimizer, sampler, args, param)

    def their_step():
        original.dc_matching_step(their_net, synset.images, optimizer, sampler.images, indices, synset.n, 256, 'none')

    def their_epoch():
        loader = DataLoader(TensorDataset(synset.images().detach(), synset.labels), batch_size=256, shuffle=True)
        original.epoch('train', loader, their_net, their_optimizer, 'none', device)

    return {'matching step': (step, their_step),
            'inner epoch': (lambda: train_on_synset(net, net_optimizer, synset, args, param, 1), their_epoch)}


def rows(device, repeats, ipcs=(1, 10)):
    rate = common.matmul_rate(device)
    out = []
    for shape in SHAPES:
        for rank in (None, 2):
            for ipc in ipcs:
                for what, (ours, theirs) in paths(shape, ipc, rank, device).items():
                    t = common.alternate({'ours': ours, 'original': theirs}, repeats, device)
                    name = f'{"LoDC r=2" if rank else "DC"} {what}, {shape}, ipc {ipc}'
                    out.append(common.row(name, t['ours'], t['original'], common.flops(ours) / rate))
    return out


if __name__ == '__main__':
    common.main(__doc__, rows, repeats=3, ipcs=True)
