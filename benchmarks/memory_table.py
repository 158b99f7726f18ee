"""The estimated peak device memory of every config in configs/*/*.json against an 80 GB GPU, as a
markdown table (utils/memory.py; DM's blocks as on CUDA). MTT rows also give the estimate of each
--matching mode. No GPU needed: the memory per image is measured on the CPU.

    python benchmarks/memory_table.py
    python benchmarks/memory_table.py --gib 40      # against another device size
"""
import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import main_coreset  # noqa: E402
import main_DC  # noqa: E402
import main_DM  # noqa: E402
import main_MTT  # noqa: E402
from utils.memory import DATASET_SHAPES, FAMILIES, GiB, estimate_peak, fitting_flag  # noqa: E402
from utils.run import parse_args  # noqa: E402
from utils.synset import images_per_class  # noqa: E402

GPU_80GB = 79.2 * GiB  # what torch reports as total_memory for an 80 GB A100 or H100


def config_args(path):
    """(method, args) of a config file, parsed by its script's parser, with DM's blocks as on CUDA."""
    method = path.stem.split('_')[0]
    argv, low_rank = ['--config', str(path), '--device', 'cpu', '--save_path', tempfile.gettempdir()], \
        method.startswith('Lo')
    if FAMILIES[method] == 'DM':
        args = main_DM.get_args(argv, low_rank)
    elif FAMILIES[method] == 'MTT':
        args = main_MTT.get_args(argv, low_rank)
    elif FAMILIES[method] == 'coreset':
        args = main_coreset.get_args(argv)
    else:
        args = parse_args(main_DC.make_dc_parser(low_rank), argv, prepare=main_DC.resolve_method)
    args.device = 'cuda'
    return method, args


def modes(method, args, shapes, n):
    """'unrolled / exact' estimates in GiB for MTT, '-' otherwise."""
    if FAMILIES[method] != 'MTT':
        return '-'
    gib = [estimate_peak(method, argparse.Namespace(**{**vars(args), 'matching': m}), shapes, n).total / GiB
           for m in ('unrolled', 'exact')]
    return f'{gib[0]:.1f} / {gib[1]:.1f}'


def row(path, budget):
    method, args = config_args(path)
    shapes = DATASET_SHAPES[args.dataset]
    n = images_per_class(args.ipc, getattr(args, 'rank', None), shapes.im_size)
    estimate = estimate_peak(method, args, shapes, n)
    fits = estimate.total <= budget
    flag = '-' if fits else (fitting_flag(method, args, shapes, n, budget) or 'none (smaller --ipc)')
    part, size = estimate.largest()
    matching = f' ({args.matching})' if FAMILIES[method] == 'MTT' else ''
    return (f'| {path.parent.name}/{path.name} | {method}{matching} | {n} | {estimate.total / GiB:.1f} | '
            f'{"yes" if fits else "NO"} | {part} {size / GiB:.1f} | {modes(method, args, shapes, n)} | {flag} |')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--gib', type=float, default=GPU_80GB / GiB, help='device memory in GiB (default: 80 GB GPU)')
    budget = p.parse_args().gib * GiB
    print(f'Estimated peak device memory against {budget / GiB:.1f} GiB (utils/memory.py: counted parts x margin '
          f'+ overhead; DM blocks as on CUDA)\n')
    print('| config | method | images per class | estimate GiB | fits? | largest part GiB | '
          'MTT unrolled / exact GiB | flag that fits |')
    print('|---|---|---|---|---|---|---|---|')
    for path in sorted((REPO / 'configs').glob('*/*.json')):
        print(row(path, budget), flush=True)


if __name__ == '__main__':
    main()
