"""Every benchmark path, ours against the original's loop, in one command; writes a markdown table (the one
the README's Speed section quotes) with the device, the date and the command.

    python benchmarks/run_all.py [--device cuda] [--repeats 3] [--out benchmarks/RESULTS.md] [--quick]

Paths: a DM and LoDM iteration (bench_dm.py), a DC and LoDC matching step and inner epoch (bench_dc.py), an
MTT and LoMTT iteration (bench_mtt.py), the evaluation of 20 networks and an expert epoch (bench_train.py),
and the continual-learning steps (bench_cl.py). --quick: ipc 1 only and fewer epochs.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault('TQDM_DISABLE', '1')  # no progress bars between the rows

import torch  # noqa: E402

import bench_cl  # noqa: E402
import bench_dc  # noqa: E402
import bench_dm  # noqa: E402
import bench_mtt  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
from utils.run import keep_freed_memory  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'RESULTS.md'))
    p.add_argument('--quick', action='store_true', help='ipc 1 only, fewer epochs')
    opts = p.parse_args()
    keep_freed_memory()  # as the scripts do
    device = torch.device(opts.device)
    ipcs = (1,) if opts.quick else (1, 10)
    start, load = time.time(), os.getloadavg()[0]
    lines = ['# Benchmarks: ours against the original\'s loops', '',
             f'`{" ".join(["python", *sys.argv])}`: {common.device_name(device)}, torch {torch.__version__}, '
             f'{time.strftime("%Y-%m-%d %H:%M")}, load average {load:.1f}, float32 matrix multiply '
             f'{common.matmul_rate(device) / 1e9:.0f} GFLOP/s, medians of {opts.repeats} runs in one process, '
             f'alternating. Ratios below 1: ours is faster. Floor: the path\'s FLOPs at that rate.', '',
             common.HEADER]
    sections = [lambda: bench_dm.rows(device, opts.repeats, ipcs), lambda: bench_dc.rows(device, opts.repeats, ipcs),
                lambda: bench_mtt.rows(device, opts.repeats),
                lambda: bench_train.rows(device, opts.repeats, eval_epochs=(10, 2) if opts.quick else (20, 3)),
                lambda: bench_cl.rows(device, opts.repeats)]
    for section in sections:
        for row in section():
            print(row, flush=True)
            lines.append(row)
            Path(opts.out).write_text('\n'.join(lines) + '\n')
    lines += ['', f'Total: {(time.time() - start) / 60:.0f} min.']
    Path(opts.out).write_text('\n'.join(lines) + '\n')
    print(f'written to {opts.out}')


if __name__ == '__main__':
    main()
