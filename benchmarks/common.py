"""Timing for the benchmarks: ours and the original's way in one process, alternating, several repeats,
medians and their ratio, and each path's floor (its FLOPs at the device's measured matrix-multiply rate).
The machines here are shared and noisy: only ratios measured side by side mean much."""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.run import keep_freed_memory  # noqa: E402  (the repository, on the path above)


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def cpu_seconds():
    """CPU time of this process so far (user + system, all threads): other jobs on a shared machine disturb
    it far less than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def alternate(fns, repeats, device, warm_up=True):
    """{name: (median wall seconds, median CPU seconds)} of the callables, run in turns (after one
    warm-up call each)."""
    if warm_up:
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu = cpu_seconds()
            wall = timed(fn, device)
            times[name].append((wall, cpu_seconds() - cpu))
    return {name: tuple(statistics.median(x) for x in zip(*t)) for name, t in times.items()}


def flops(fn):
    """Floating-point operations of one call (matrix multiplies and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device, n=2048, repeats=5):
    """The device's float32 matrix-multiply rate, FLOP/s (the best of a few n x n products)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best


def device_name(device):
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU, {torch.get_num_threads()} threads'


def row(path, ours, original, floor, note=''):
    """A markdown table row from (wall, CPU) seconds of ours and of the original's way: their wall times, the
    ratio of the wall times and of the CPU times, the floor (seconds) and a note."""
    return (f'| {path} | {ours[0]:.3f} | {original[0]:.3f} | {ours[0] / original[0]:.2f} | '
            f'{ours[1] / original[1]:.2f} | {floor:.3f} | {note} |')


HEADER = ('| path | ours s | original s | ours / original | CPU time ours / original | floor s | note |\n'
          '|---|---|---|---|---|---|---|')


def main(doc, rows, repeats=3, ipcs=False):
    """The command line of a benchmark script: --device, --repeats (and --ipcs when rows takes them); prints
    the table of rows(device, repeats[, ipcs])."""
    p = argparse.ArgumentParser(description=doc.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=repeats)
    if ipcs:
        p.add_argument('--ipcs', nargs='+', type=int, default=[1, 10])
    opts = p.parse_args()
    keep_freed_memory()  # as the scripts do
    device = torch.device(opts.device)
    print(f'{device_name(device)}, torch {torch.__version__}, medians of {opts.repeats}\n')
    print(HEADER)
    for r in rows(device, opts.repeats, *([opts.ipcs] if ipcs else [])):
        print(r, flush=True)
