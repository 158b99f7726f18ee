"""Speed of the coreset extractor: images per second of one training epoch (utils/coreset.py train_epoch,
with the forgetting counter) of a network on MNIST- and CIFAR-shaped data on this device, against the
epoch's floating-point operations; and the time of the per-class selection (embedding + herding/k-center).

    python benchmarks/bench_coreset.py [--device cuda] [--images 2048] [--model ConvNet]

Random data of the real shapes (the timing does not depend on the pixel values). An epoch over the whole
training set takes (training images) / (images per second); 200 epochs (the recommended recipe) that times
200. The FLOPs are counted by torch.utils.flop_counter on one batch (forward and backward).
"""
import argparse

import torch
import torch.nn.functional as F

import common
from common import timed
from networks import get_network
from utils.coreset import RECIPE, ForgettingCounter, embed, herding, kcenter, train_epoch
from utils.run import keep_freed_memory, resolve_device

SHAPES = {'MNIST': (1, (28, 28), 60000), 'CIFAR10': (3, (32, 32), 50000)}


def train_flops(net, x, y):
    """FLOPs of one training step (forward + backward) on the batch x."""
    flops = common.flops(lambda: F.cross_entropy(net(x), y).backward())
    net.zero_grad(set_to_none=True)
    return flops


def epoch_speed(model, name, n, device, channels_last):
    channel, im_size, _ = SHAPES[name]
    images = torch.randn(n, channel, *im_size, device=device)
    labels = torch.randint(10, (n,), device=device)
    net = get_network(model, channel, 10, im_size).to(device)
    if channels_last:
        net, images = net.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=RECIPE['lr'], momentum=RECIPE['momentum'],
                                weight_decay=RECIPE['weight_decay'])
    batch = RECIPE['batch']
    flops = train_flops(net, images[:batch], labels[:batch]) / batch * n
    train_epoch(net, images[:2 * batch], labels[:2 * batch], batch, optimizer, ForgettingCounter(2 * batch, device))
    seconds = timed(lambda: train_epoch(net, images, labels, batch, optimizer, ForgettingCounter(n, device)), device)
    return n / seconds, flops / seconds / 1e9


def selection_time(model, name, per_class, ipc, device):
    channel, im_size, _ = SHAPES[name]
    net = get_network(model, channel, 10, im_size).to(device)
    images = torch.randn(per_class, channel, *im_size, device=device)
    t_embed = timed(lambda: embed(net, images), device)
    features = embed(net, images)
    return t_embed, *(timed(lambda: rule(features, ipc), device) for rule in (herding, kcenter))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='auto')
    p.add_argument('--model', default='ConvNet')
    p.add_argument('--images', type=int, default=2048, help='images in the timed epoch')
    args = p.parse_args()
    keep_freed_memory()
    device = torch.device(resolve_device(args.device))
    torch.manual_seed(0)
    print(f'{args.model} on {device} ({torch.get_num_threads()} threads); float32 matmul: '
          f'{common.matmul_rate(device) / 1e9:.0f} GFLOP/s')
    for name, (_, _, train_size) in SHAPES.items():
        for channels_last in (False, True):
            speed, gflops = epoch_speed(args.model, name, args.images, device, channels_last)
            layout = 'channels_last' if channels_last else 'NCHW'
            print(f'{name:8s} {layout:13s} training: {speed:7.0f} images/s, {gflops:6.1f} GFLOP/s; '
                  f'an epoch of the {train_size} training images: {train_size / speed:6.0f} s')
        t_embed, t_herd, t_kc = selection_time(args.model, name, 6000, 10, device)
        print(f'{name:8s} selection of 10 of 6000 images: embedding {t_embed:.1f} s, herding {t_herd:.2f} s, '
              f'k-center {t_kc:.2f} s')


if __name__ == '__main__':
    main()
