"""Seconds of an evaluation of 20 networks and of an expert epoch (ConvNet, MNIST- and CIFAR-shaped), ours
(the networks trained together, utils/ensemble.py) against the original's loop (benchmarks/original.py:
one network at a time, a DataLoader with shuffle, per-batch non-Siamese DSA, loss.item() and the accuracy
per batch, the lr decay with a rebuilt SGD), in one process, alternating.

    python benchmarks/bench_train.py [--device cuda] [--repeats 3] [--shapes MNIST CIFAR10]

Short runs on random data of the real shapes (the time does not depend on the pixel values):
- evaluation: 20 networks trained on 1 and 10 images per class (DSA, batch 256) for 20 and 3 epochs
  (--eval_epochs), then tested on 20 images; the protocol is 1001 epochs and the 10000 test images, so
  the epochs dominate (one epoch would time mostly the networks' construction and test pass).
- expert epoch: 4 experts x 2 batches of 256 (--expert_batches) with DSA and without augmentation, on MNIST
  shapes, --experts_together at a time (default buffer.py's); a whole MNIST epoch is 235 batches (the
  notes give images per second and what a whole epoch of one expert takes). The experts' test pass after
  every epoch is not included.
Each path is first run once on one network (the warm-up, which also counts its FLOPs). Floor: those FLOPs
times the networks at the measured matrix-multiply rate.
The notes also give the ratio of the process's CPU time (user + system, both threads), which other jobs
on a shared machine disturb far less than the wall time.
"""
import argparse
import os

os.environ.setdefault('TQDM_DISABLE', '1')  # no progress bars between the rows

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset

import common  # noqa: E402  (puts the repository on sys.path)
import buffer  # noqa: E402
import original  # noqa: E402
from utils.augmentation import FULL_STRATEGY, ParamDiffAug  # noqa: E402
from utils.ensemble import Networks, dsa_augment, train  # noqa: E402
from utils.evaluate import evaluate_pool, train_together  # noqa: E402
from utils.run import keep_freed_memory  # noqa: E402

SHAPES = {'MNIST': (1, (28, 28)), 'CIFAR10': (3, (32, 32))}
NETWORKS, EXPERTS, TEST_IMAGES, MNIST_TRAIN = 20, 4, 20, 60000


def random_set(shape, n, device):
    channel, im_size = SHAPES[shape]
    return torch.randn(n, channel, *im_size, device=device), torch.arange(n, device=device) % 10


def evaluation(shape, ipc, epochs, device, networks):
    """(ours, the original's) evaluation of `networks` ConvNets trained for `epochs` epochs."""
    channel, im_size = SHAPES[shape]
    images, labels = random_set(shape, 10 * ipc, device)
    test_x, test_y = random_set(shape, TEST_IMAGES, device)
    data = argparse.Namespace(channel=channel, im_size=im_size, num_classes=10, images_test=test_x,
                              labels_test=test_y)
    args = argparse.Namespace(eval_mode='SS', model='ConvNet', num_eval=networks, seed=0, dsa=True,
                              dsa_strategy=FULL_STRATEGY, dataset=shape, epoch_eval_train=epochs - 1,
                              batch_train=256, device=device.type)

    def ours():
        evaluate_pool(args, data, images, labels, 0.01, key=(0, 0))

    def theirs():
        for _ in range(networks):
            net = original.network('ConvNet', channel, 10, im_size, device)
            original.evaluate_synset(net, images, labels, test_x, test_y, epochs - 1, FULL_STRATEGY, device)

    return ours, theirs


def expert_training(batches, augment, device, experts, together):
    """(ours, the original's): `experts` ConvNets, `batches` batches of 256 each (MNIST shapes, lr 0.01),
    ours `together` at a time."""
    images, labels = random_set('MNIST', 256 * batches, device)
    strategy = FULL_STRATEGY if augment else 'none'
    aug = dsa_augment(strategy, ParamDiffAug()) if augment else None

    def ours():
        for start in range(0, experts, together):
            nets = Networks('ConvNet', 1, 10, (28, 28), list(range(start, min(start + together, experts))), device)
            train(nets, images, labels, 1, 0.01, 256, 0.0, 0.0, augment=aug)

    def theirs():
        loader = DataLoader(TensorDataset(images, labels), batch_size=256, shuffle=True, num_workers=0)
        for _ in range(experts):
            net = original.network('ConvNet', 1, 10, (28, 28), device)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
            original.epoch('train', loader, net, optimizer, strategy, device)

    return ours, theirs


def timed_row(name, paths, one, count, repeats, device, rate, note):
    """The markdown row of `paths` (ours, the original's) on `count` networks; `one` are the same on one."""
    floor = common.flops(one[0]) * count / rate
    one[1]()
    t = common.alternate(dict(zip(('ours', 'original'), paths)), repeats, device, warm_up=False)
    return common.row(name, t['ours'], t['original'], floor, note(t))


def eval_rows(device, repeats, shapes, epochs, rate):
    together = train_together(argparse.Namespace(device=device.type))
    out = []
    for shape in shapes:
        for ipc, n in zip((1, 10), epochs):
            def note(t):
                per = [t[k][0] / NETWORKS / n for k in ('ours', 'original')]
                return f'{together} trained together; s per network-epoch {per[0]:.3f} vs {per[1]:.3f}'
            out.append(timed_row(f'evaluation of {NETWORKS} ConvNets, {shape}, ipc {ipc}, {n} epochs',
                                 evaluation(shape, ipc, n, device, NETWORKS),
                                 evaluation(shape, ipc, n, device, 1), NETWORKS, repeats, device, rate, note))
    return out


def expert_rows(device, repeats, batches, together, rate):
    images = EXPERTS * batches * 256
    out = []
    for augment in (True, False):
        def note(t):
            rates = [images / t[k][0] for k in ('ours', 'original')]
            return (f'{rates[0]:.0f} vs {rates[1]:.0f} images/s, a whole epoch of one expert '
                    f'{MNIST_TRAIN / rates[0] / 60:.1f} vs {MNIST_TRAIN / rates[1] / 60:.1f} min')
        name = (f'expert epoch, MNIST, {EXPERTS} experts x {batches} batches, {together} at a time, '
                f'{"DSA" if augment else "no augmentation"}')
        out.append(timed_row(name, expert_training(batches, augment, device, EXPERTS, together),
                             expert_training(batches, augment, device, 1, 1), EXPERTS, repeats, device, rate, note))
    return out


def rows(device, repeats, shapes=tuple(SHAPES), eval_epochs=(20, 3), expert_batches=2, experts_together=None):
    rate = common.matmul_rate(device)
    together = experts_together or buffer.TRAIN_TOGETHER.get(device.type, 1)
    return (eval_rows(device, repeats, shapes, eval_epochs, rate) +
            expert_rows(device, repeats, expert_batches, together, rate))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--shapes', nargs='+', choices=list(SHAPES), default=list(SHAPES))
    p.add_argument('--eval_epochs', nargs=2, type=int, default=[20, 3], help='epochs at ipc 1 and at ipc 10')
    p.add_argument('--expert_batches', type=int, default=2)
    p.add_argument('--experts_together', type=int, default=None, help="default: buffer.py's for the device")
    opts = p.parse_args()
    keep_freed_memory()  # as the scripts do
    device = torch.device(opts.device)
    print(f'{common.device_name(device)}, torch {torch.__version__}, medians of {opts.repeats}, '
          f'matrix multiply {common.matmul_rate(device) / 1e9:.0f} GFLOP/s\n')
    print(common.HEADER)
    for r in rows(device, opts.repeats, opts.shapes, opts.eval_epochs, opts.expert_batches, opts.experts_together):
        print(r, flush=True)


if __name__ == '__main__':
    main()
