"""Seconds per DM / LoDM iteration (ConvNet, 10 classes, batch_real 256, DSA on), MNIST- and CIFAR-shaped,
ours against the original's per-class loop (benchmarks/original.py), in one process, alternating.

    python benchmarks/bench_dm.py [--device cuda] [--repeats 5] [--ipcs 1 10]

Random data of the real shapes (the timing does not depend on the pixel values). Also printed: the
forward pass of the iteration's 2560 real images alone (in passes of 256, ours), the floor the
convolutions cannot beat (the iteration's FLOPs at the measured matrix-multiply rate).
"""
import argparse

import torch

import common
import original
from utils.augmentation import FULL_STRATEGY, ParamDiffAug
from utils.data import ClassSampler
from utils.distribution import REAL_CHUNK, class_blocks, dm_iteration, embed, frozen_network
from utils.synset import SyntheticSet

SHAPES = {'MNIST': (1, (28, 28)), 'CIFAR10': (3, (32, 32))}
PER_CLASS = 600


def setup(shape, ipc, rank, device):
    channel, im_size = SHAPES[shape]
    data = argparse.Namespace(channel=channel, im_size=im_size, num_classes=10)
    labels = torch.arange(10, device=device).repeat_interleave(PER_CLASS)
    sampler = ClassSampler(torch.randn(len(labels), channel, *im_size, device=device), labels, 10)
    args = argparse.Namespace(model='ConvNet', batch_real=256, dsa=True, dsa_strategy=FULL_STRATEGY,
                              compile=False)
    return data, sampler, args, SyntheticSet(10, ipc, channel, im_size, rank).to(device)


def paths(shape, ipc, rank, device):
    """(ours, the original's, the real forward pass alone) as callables."""
    data, sampler, args, synset = setup(shape, ipc, rank, device)
    optimizer = torch.optim.SGD(synset.parameters(), lr=1.0, momentum=0.5)
    blocks, param = class_blocks(args, synset.classes, device), ParamDiffAug()
    indices = [row[row >= 0].tolist() for row in sampler.index]  # the original's indices_class

    def ours():
        dm_iteration(args, data, synset, optimizer, sampler, param, blocks)

    def theirs():
        net = original.network('ConvNet', data.channel, 10, data.im_size, device).train().requires_grad_(False)
        original.dm_step(net, synset.images, optimizer, sampler.images, indices, synset.n, 256, FULL_STRATEGY)

    def forward():
        with torch.no_grad():
            embed(frozen_network('ConvNet', data, device), sampler.sample(256)[0], REAL_CHUNK[device.type])

    return ours, theirs, forward


def rows(device, repeats, ipcs=(1, 10)):
    rate = common.matmul_rate(device)
    out = []
    for shape in SHAPES:
        for rank in (None, 2):
            for ipc in ipcs:
                ours, theirs, forward = paths(shape, ipc, rank, device)
                t = common.alternate({'ours': ours, 'original': theirs, 'forward': forward}, repeats, device)
                floor = common.flops(ours) / rate
                name = f'{"LoDM r=2" if rank else "DM"} iteration, {shape}, ipc {ipc}'
                out.append(common.row(name, t['ours'], t['original'], floor,
                                      f'forward of the 2560 real images alone: {t["forward"][0]:.3f} s'))
    return out


if __name__ == '__main__':
    common.main(__doc__, rows, repeats=5, ipcs=True)
