"""Seconds per outer iteration of DC and LoDC (gradient matching, ConvNet, 10 classes, batch_real 256) at
ipc 1 and 10, on random data of MNIST shape (1x28x28) and CIFAR shape (3x32x32), on the current device.

One outer iteration is outer_loop matching steps (each: BN handling, per-class real gradients, per-class
synthetic gradients with create_graph, one SGD step on the set) and (outer_loop - 1) * inner_loop epochs
of the network on the synthetic set, with (outer, inner) = get_loops(ipc): (1, 1) at ipc 1, (10, 50) at
ipc 10. The table gives the time of one matching step, of one inner epoch, and of the whole iteration:
measured directly where outer_loop is 1 (or with --full), else outer * step + (outer - 1) * inner * epoch
(marked ~), since a CPU iteration at ipc 10 takes minutes.

'original' is the original's matching step, written out here for comparison on the same machine: a
per-class loop that draws each class's real batch separately, rebuilds the synthetic images per class
(LoDC: the whole product A·B for every class, then slices it) and backpropagates the matching loss into
the network's parameters too. Its inner loop is ours (the same arithmetic).

    python benchmarks/bench_dc.py                  # the whole table
    python benchmarks/bench_dc.py --shapes MNIST --ipcs 1 --reps 3
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from main_DC import dc_iteration, fresh_network  # noqa: E402
from utils.augment import ParamDiffAug  # noqa: E402
from utils.data import ClassSampler  # noqa: E402
from utils.matching import freeze_batch_norm, get_loops, match_loss, matching_step, train_on_synset  # noqa: E402
from utils.run import keep_freed_memory  # noqa: E402
from utils.synset import SyntheticSet  # noqa: E402

SHAPES = {'MNIST': (1, (28, 28)), 'CIFAR10': (3, (32, 32))}
NUM_CLASSES = 10
REAL_PER_CLASS = 512


def original_matching_step(net, synset, optimizer, sampler, args):
    """The original's step (VICO main.py / plugin main_LoDC.py), for comparison."""
    params = list(net.parameters())
    loss = 0
    for c in range(NUM_CLASSES):
        img_real = sampler.class_images(c, args.batch_real)
        lab_real = torch.full((len(img_real),), c, device=img_real.device)
        img_syn = synset.images()[c * synset.n:(c + 1) * synset.n]
        lab_syn = torch.full((synset.n,), c, device=img_real.device)
        gw_real = torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), params)
        gw_real = [g.detach().clone() for g in gw_real]
        gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), params, create_graph=True)
        loss = loss + match_loss(gw_syn, gw_real, args.dis_metric)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(shape, low_rank, ipc, impl, args, device):
    """(step s, epoch s or None, iteration s, measured directly?), each the best of args.reps timings."""
    channel, im_size = SHAPES[shape]
    torch.manual_seed(0)
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(REAL_PER_CLASS)
    sampler = ClassSampler(torch.randn(len(labels), channel, *im_size, device=device), labels, NUM_CLASSES)
    data = argparse.Namespace(channel=channel, num_classes=NUM_CLASSES, im_size=im_size)
    synset = SyntheticSet(NUM_CLASSES, ipc, channel, im_size, rank=2 if low_rank else None).to(device)
    optimizer = torch.optim.SGD(synset.parameters(), lr=0.1, momentum=0.5)
    param = ParamDiffAug()
    outer, inner = get_loops(ipc)
    net = fresh_network(args, data, device)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=args.lr_net)

    def step():
        freeze_batch_norm(net, sampler)
        if impl == 'ours':
            matching_step(net, synset, optimizer, sampler, args, param)
        else:
            original_matching_step(net, synset, optimizer, sampler, args)

    def best(fn):
        fn()  # warm-up
        return min(timed(fn, device) for _ in range(args.reps))

    t_step = best(step)
    t_epoch = None if outer == 1 else best(lambda: train_on_synset(net, net_optimizer, synset, args, param, 1))
    if impl == 'ours' and (outer == 1 or args.full):
        return t_step, t_epoch, best(lambda: dc_iteration(args, data, synset, optimizer, sampler, param,
                                                          (outer, inner))), True
    return t_step, t_epoch, outer * t_step + (outer - 1) * inner * (t_epoch or 0), outer == 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--ipcs', nargs='+', type=int, default=[1, 10])
    p.add_argument('--methods', nargs='+', default=['DC', 'LoDC'], choices=['DC', 'LoDC'])
    p.add_argument('--impls', nargs='+', default=['ours', 'original'], choices=['ours', 'original'])
    p.add_argument('--reps', type=int, default=2, help='timed repetitions (the best is reported)')
    p.add_argument('--full', action='store_true', help='time whole iterations even where outer_loop > 1')
    p.add_argument('--batch_real', type=int, default=256)
    p.add_argument('--malloc', choices=['keep', 'default'], default='keep',
                   help="keep: the scripts' malloc setting (utils.run.keep_freed_memory); default: glibc's")
    bench_args = p.parse_args()
    if bench_args.malloc == 'keep':
        keep_freed_memory()
    device = torch.device(bench_args.device)
    args = argparse.Namespace(model='ConvNet', batch_real=bench_args.batch_real, batch_train=256, lr_net=0.01,
                              dsa=False, dsa_strategy='none', dis_metric='ours', reps=bench_args.reps,
                              full=bench_args.full)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")}, malloc {bench_args.malloc}, '
          f'load average {load:.1f}, '
          f'batch_real {args.batch_real}; times are the best of {args.reps}')
    print(f'{"shape":8s} {"method":6s} {"ipc":>4s} {"img/cls":>7s} {"loops":>7s} {"impl":9s} '
          f'{"step s":>8s} {"epoch s":>8s} {"s/iter":>9s}')
    for shape in bench_args.shapes:
        for method in bench_args.methods:
            for ipc in bench_args.ipcs:
                for impl in bench_args.impls:
                    t_step, t_epoch, t_iter, direct = bench(shape, method == 'LoDC', ipc, impl, args, device)
                    n = SyntheticSet(NUM_CLASSES, ipc, *SHAPES[shape], rank=2 if method == 'LoDC' else None).n
                    loops = '%d,%d' % get_loops(ipc)
                    epoch = '-' if t_epoch is None else f'{t_epoch:.3f}'
                    print(f'{shape:8s} {method:6s} {ipc:4d} {n:7d} {loops:>7s} {impl:9s} {t_step:8.2f} '
                          f'{epoch:>8s} {"" if direct else "~"}{t_iter:8.1f}', flush=True)


if __name__ == '__main__':
    main()
