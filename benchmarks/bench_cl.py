"""Seconds of the continual-learning steps (main_CL.py), MNIST- and CIFAR-shaped, ours against the original's
loops (benchmarks/original.py), in one process, alternating:

- a DM / LoDM memory iteration on one step's 2 new classes of 10 (ipc 10, batch_real 256, DSA); the note
  gives the same iteration on all 10 classes, so the share of a step (about 2/10) can be read off. A step
  of the paper's protocol is 20000 such iterations.
- the retraining at a step: 3 ConvNets on the memory of all 10 classes (ipc 10), 1 epoch (the protocol:
  1001 epochs), the original one network at a time.

    python benchmarks/bench_cl.py [--device cuda] [--repeats 3]
"""

import torch

import common
import original
from bench_dm import setup
from bench_train import evaluation
from utils.augmentation import FULL_STRATEGY, ParamDiffAug
from utils.distribution import class_blocks, dm_iteration
from utils.synset import SyntheticSet

STEP = [2, 8]  # the first step of class order 0


def memory_paths(shape, rank, device):
    """(ours on the step's classes, the original's loop on them, ours on all classes)."""
    data, sampler, args, _ = setup(shape, 10, rank, device)
    indices = [row[row >= 0].tolist() for row in sampler.index]

    def iteration(classes):
        synset = SyntheticSet(10, 10, data.channel, data.im_size, rank, classes).to(device)
        optimizer = torch.optim.SGD(synset.parameters(), lr=1.0, momentum=0.5)
        blocks = class_blocks(args, synset.classes, device)
        return synset, lambda: dm_iteration(args, data, synset, optimizer, sampler, ParamDiffAug(), blocks)

    step_set, ours = iteration(STEP)
    _, every_class = iteration(list(range(10)))
    optimizer = torch.optim.SGD(step_set.parameters(), lr=1.0, momentum=0.5)

    def theirs():  # the original's per-class DM loop over the step's classes
        net = original.network('ConvNet', data.channel, 10, data.im_size, device).train().requires_grad_(False)
        original.dm_step(net, step_set.images, optimizer, sampler.images, [indices[c] for c in STEP], step_set.n,
                         256, FULL_STRATEGY)

    return ours, theirs, every_class


def rows(device, repeats):
    rate = common.matmul_rate(device)
    out = []
    for shape in ('MNIST', 'CIFAR10'):
        for rank in (None, 2):
            ours, theirs, every_class = memory_paths(shape, rank, device)
            t = common.alternate({'ours': ours, 'original': theirs, 'all': every_class}, repeats, device)
            out.append(common.row(f'CL {"LoDM r=2" if rank else "DM"} memory iteration, {shape}, 2 of 10 classes',
                                  t['ours'], t['original'], common.flops(ours) / rate,
                                  f'all 10 classes: {t["all"][0]:.3f} s ({t["ours"][0] / t["all"][0]:.2f} of it)'))
        ours, theirs = evaluation(shape, 10, 1, device, 3)
        t = common.alternate({'ours': ours, 'original': theirs}, repeats, device)
        out.append(common.row(f'CL retraining, {shape}: 3 ConvNets on 10 classes x 10 images, 1 epoch',
                              t['ours'], t['original'], 3 * common.flops(evaluation(shape, 10, 1, device, 1)[0]) / rate))
    return out


if __name__ == '__main__':
    common.main(__doc__, rows, repeats=3)
