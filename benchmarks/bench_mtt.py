"""Seconds per iteration and peak memory of MTT and LoMTT distillation iterations, for each --matching mode
('unrolled' = the original, 'exact' = the same gradient in constant memory, 'tesla' = TESLA's first-order
approximation) and several syn_steps, on CIFAR10-shaped random data (ConvNet, ipc 1; LoMTT: rank 2, so 8
images per class; batch_syn = the whole set, as the original) with a random expert segment.

Each setting runs in its own process so the peaks do not mix. Peak memory is, on CUDA,
torch.cuda.max_memory_allocated during the timed iterations minus what was allocated before them; on the
CPU, the growth of the process's peak resident set size (ru_maxrss) over its size before them (coarser:
it includes allocator caching). On the CPU the table also gives the process's CPU seconds per iteration
(user + system, all threads), which other processes on a busy machine disturb far less than wall time. A one-step iteration first warms up (the first call of each operator
costs seconds on the CPU) and is not timed.

    python benchmarks/bench_mtt.py                      # everything: 2 methods x 3 modes x syn_steps 10 20 40
    python benchmarks/bench_mtt.py --quick              # syn_steps 10 and 20, one timed iteration
    python benchmarks/bench_mtt.py --methods MTT --modes unrolled exact --steps 40 --device cuda

rows() (benchmarks/run_all.py) times an MTT and a LoMTT iteration (syn_steps 20, 'unrolled' and 'exact')
against the original's unroll (benchmarks/original.py), in one process, alternating.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import original  # noqa: E402
from main_MTT import LearnedRate, student_batches  # noqa: E402
from networks import get_network  # noqa: E402
from utils.augmentation import FULL_STRATEGY, ParamDiffAug, diff_augment  # noqa: E402
from utils.synset import SyntheticSet  # noqa: E402
from utils.trajectory import (MODES, FlatModel, backward_from, flatten_params,  # noqa: E402
                              trajectory_loss_and_grads)


def rss_mb():
    """Current resident set size of this process in MiB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(method, mode, steps, args):
    """Time args.iters iterations (after a one-step warm-up) of one setting in this process; returns a dict."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    synset = SyntheticSet(10, 1, 3, (32, 32), rank=2 if method == 'LoMTT' else None).to(device)
    student = get_network(args.model, 3, 10, (32, 32)).to(device).train()
    theta_start = flatten_params(student)
    theta_target = theta_start + 0.01 * torch.randn_like(theta_start)
    rate = LearnedRate(0.01).to(device)
    opt_img = torch.optim.SGD(synset.parameters(), lr=1000, momentum=0.5)
    opt_lr = torch.optim.SGD(rate.parameters(), lr=1e-5, momentum=0.5)
    param, strategy = ParamDiffAug(), FULL_STRATEGY
    augment = lambda x: diff_augment(x, strategy, param)
    n = len(synset.labels)
    batch_syn = args.batch_syn or n

    def iteration(steps):
        X = synset.images()
        batches = student_batches(n, batch_syn, steps, device)
        _, grad_x, grad_lr = trajectory_loss_and_grads(student, X, synset.labels, rate.lr, theta_start,
                                                       theta_target, batches, augment, mode)
        opt_img.zero_grad()
        opt_lr.zero_grad()
        backward_from(X, grad_x, rate.lr, grad_lr)
        opt_img.step()
        opt_lr.step()

    iteration(1)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = rss_mb()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(args.iters):
        iteration(steps)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {'method': method, 'mode': mode, 'syn_steps': steps, 'images': n, 'batch_syn': batch_syn,
            'device': str(device), 'sec_per_it': (time.perf_counter() - start) / args.iters,
            'cpu_sec_per_it': (cpu_seconds() - cpu_start) / args.iters, 'peak_mb': peak}


def rows(device, repeats, steps=20):
    """MTT / LoMTT iterations (CIFAR shapes, ConvNet, ipc 1, the whole set per step): ours ('unrolled' and
    'exact') against the original's unroll."""
    rate = common.matmul_rate(device)
    out = []
    for method in ('MTT', 'LoMTT'):
        torch.manual_seed(0)
        synset = SyntheticSet(10, 1, 3, (32, 32), rank=2 if method == 'LoMTT' else None).to(device)
        student = get_network('ConvNet', 3, 10, (32, 32), device).train()
        theta_start = flatten_params(student)
        theta_target = theta_start + 0.01 * torch.randn_like(theta_start)
        lr = LearnedRate(0.01).to(device)
        optimizers = [torch.optim.SGD(synset.parameters(), lr=1000, momentum=0.5),
                      torch.optim.SGD(lr.parameters(), lr=1e-5, momentum=0.5)]
        param, n = ParamDiffAug(), len(synset.labels)
        flat = FlatModel(original.network('ConvNet', 3, 10, (32, 32), device).train())

        def ours(mode):
            batches = student_batches(n, n, steps, device)
            X = synset.images()
            _, grad_x, grad_lr = trajectory_loss_and_grads(student, X, synset.labels, lr.lr, theta_start,
                                                           theta_target, batches,
                                                           lambda x: diff_augment(x, FULL_STRATEGY, param), mode)
            for opt in optimizers:
                opt.zero_grad()
            backward_from(X, grad_x, lr.lr, grad_lr)
            for opt in optimizers:
                opt.step()

        def theirs():
            original.mtt_iteration(flat, synset.images(), synset.labels, lr.lr, theta_start, theta_target,
                                   student_batches(n, n, steps, device), FULL_STRATEGY, optimizers)

        t = common.alternate({'unrolled': lambda: ours('unrolled'), 'exact': lambda: ours('exact'),
                              'original': theirs}, repeats, device)
        for mode in ('unrolled', 'exact'):
            note = '' if mode == 'unrolled' else 'memory mode: recomputes each step, one step of graph alive'
            out.append(common.row(f'{method} iteration ({mode}), CIFAR10, ipc 1, syn_steps {steps}', t[mode],
                                  t['original'], common.flops(lambda: ours(mode)) / rate, note))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', nargs='+', default=['MTT', 'LoMTT'], choices=['MTT', 'LoMTT'])
    p.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    p.add_argument('--steps', nargs='+', type=int, default=[10, 20, 40], help='syn_steps values')
    p.add_argument('--iters', type=int, default=2, help='timed iterations per setting')
    p.add_argument('--model', default='ConvNet', help='student network (ConvNetW32 is ~16x cheaper)')
    p.add_argument('--batch_syn', type=int, default=None, help='student minibatch (default: the whole set)')
    p.add_argument('--device', default='auto')
    p.add_argument('--quick', action='store_true', help='syn_steps 10 and 20 only, one timed iteration')
    p.add_argument('--one', nargs=3, metavar=('METHOD', 'MODE', 'STEPS'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.one:
        method, mode, steps = args.one
        print(json.dumps(one(method, mode, int(steps), args)))
        return
    if args.quick:
        args.steps, args.iters = [s for s in args.steps if s <= 20], 1
    print(f'{"method":6s} {"images":>6s} {"batch":>5s} {"mode":8s} {"syn_steps":>9s} {"s/iter":>8s} '
          f'{"cpu s/iter":>10s} {"peak MiB":>9s}  ({args.device}, {args.model}, torch threads '
          f'{torch.get_num_threads()})', flush=True)
    for method in args.methods:
        for mode in args.modes:
            for steps in args.steps:
                cmd = [sys.executable, __file__, '--one', method, mode, str(steps), '--iters', str(args.iters),
                       '--device', args.device, '--model', args.model,
                       *(['--batch_syn', str(args.batch_syn)] if args.batch_syn else [])]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f'{method:6s} {mode:8s} {steps:9d} failed: {out.stderr.strip().splitlines()[-1]}')
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f'{method:6s} {r["images"]:6d} {r["batch_syn"]:5d} {mode:8s} {steps:9d} '
                      f'{r["sec_per_it"]:8.2f} {r["cpu_sec_per_it"]:10.2f} {r["peak_mb"]:9.1f}', flush=True)


if __name__ == '__main__':
    main()
