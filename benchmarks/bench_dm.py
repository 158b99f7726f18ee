"""Seconds per DM / LoDM iteration and per evaluation-network epoch, MNIST- and CIFAR-shaped, on this device.

    python benchmarks/bench_dm.py [--device cuda] [--repeats 5]

Random data of the real shapes (the timing does not depend on the pixel values). 'per-class loop' is the
original's way (one forward pass per class); 'batched' is ours (one pass for all classes).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_DM  # noqa: E402
from networks import get_network  # noqa: E402
from utils.augment import ParamDiffAug, diff_augment  # noqa: E402
from utils.data import ClassSampler, Data  # noqa: E402
from utils.evaluate import run_epoch  # noqa: E402
from utils.run import keep_freed_memory, make_parser, parse_args  # noqa: E402
from utils.synset import SyntheticSet  # noqa: E402

SHAPES = {'MNIST': (1, (28, 28)), 'CIFAR10': (3, (32, 32))}


def fake_data(name, device, per_class=600):
    channel, im_size = SHAPES[name]
    images = torch.randn(10 * per_class, channel, *im_size, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(per_class)
    return Data(name, channel, im_size, 10, [str(c) for c in range(10)], [0.0] * channel, [1.0] * channel,
                images, labels, images[:1000], labels[:1000])


def parser(low_rank):
    p = make_parser('', main_DM.DEFAULTS, low_rank)
    p.add_argument('--compile', action='store_true')
    return p


def per_class_loss(net, synset, sampler, args, param):
    """The original's DM loss: a Python loop over classes, one seed and two forward passes per class."""
    loss = 0
    for c in range(synset.num_classes):
        real = sampler.class_images(c, args.batch_real)
        syn = synset.images(classes=[c])
        seed = int(torch.randint(2**31 - 1, ()))
        real = diff_augment(real, args.dsa_strategy, param, seed=seed)
        syn = diff_augment(syn, args.dsa_strategy, param, seed=seed)
        with torch.no_grad():
            f_real = net.embed(real)
        loss = loss + ((f_real.mean(0) - net.embed(syn).mean(0)) ** 2).sum()
    return loss


def seconds(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def dm_iteration(data, sampler, args, loss_fn):
    synset = SyntheticSet(10, args.ipc, data.channel, data.im_size, getattr(args, 'rank', None)).to(args.device)
    optimizer = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
    param = ParamDiffAug()

    def step():
        net = main_DM.frozen_network(args, data, args.device)
        loss = loss_fn(net, synset, sampler, args, param)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def eval_epoch(data, args, n):
    net = get_network('ConvNet', data.channel, 10, data.im_size).to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = data.images_train[:10 * n], data.labels_train[:10 * n]
    aug = lambda b: diff_augment(b, args.dsa_strategy, ParamDiffAug())  # noqa: E731
    return lambda: run_epoch(net, x, y, 256, optimizer, aug)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--device', default='auto')
    p.add_argument('--repeats', type=int, default=5)
    opts = p.parse_args()
    keep_freed_memory()  # as the scripts do
    torch.manual_seed(0)
    rows = []
    for name in SHAPES:
        for low_rank in (False, True):
            args = parse_args(parser(low_rank), ['--dataset', name, '--ipc', '1', '--device', opts.device])
            data = fake_data(name, args.device)
            sampler = ClassSampler(data.images_train, data.labels_train, 10)
            method = 'LoDM r=2' if low_rank else 'DM'
            for label, loss_fn in (('per-class loop', per_class_loss), ('batched', main_DM.dm_loss)):
                t = seconds(dm_iteration(data, sampler, args, loss_fn), opts.repeats)
                rows.append((name, f'{method} ipc 1, {label}', t))
        args = parse_args(parser(False), ['--dataset', name, '--device', opts.device])
        data = fake_data(name, args.device)
        for n in (1, 10, 50):
            rows.append((name, f'eval epoch, ConvNet, {n} img/cls', seconds(eval_epoch(data, args, n), opts.repeats)))
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'CPU ({torch.get_num_threads()} threads)'
    print(f'\n{device}, torch {torch.__version__}, batch_real 256, DSA on\n')
    print(f'| data | what | seconds |\n|---|---|---|')
    for name, what, t in rows:
        print(f'| {name} | {what} | {t:.3f} |')


if __name__ == '__main__':
    main()
