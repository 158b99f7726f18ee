"""DC: dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021); --method DSA adds
Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021); main_LoDC.py runs both on the low-rank set.

Every iteration draws a fresh random network. In each of outer_loop steps, the synthetic set takes one SGD
step that makes, class by class, the gradient of the loss on its synthetic images match the gradient on a
batch of real images (utils/matching.py); between steps the network trains inner_loop epochs on the
synthetic set. Batch norm, if any, is frozen during matching at statistics of 16 real images per class.

    python main_DC.py --dataset MNIST --ipc 10 --data_path ../shared/data
    python main_DC.py --method DSA --dataset CIFAR10 --ipc 10
    python main_LoDC.py --method DSA --dataset CIFAR10 --ipc 1 --rank 2

--method DC turns DSA off (no augmentation in matching, the classic evaluation recipe); --method DSA uses
--dsa_strategy, by default the recommended one for the dataset (the original's default 'None' silently
made DSA plain DC). get_loops(ipc) sets the loops, for low rank from the budget ipc, as the plugin.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch

from utils.augmentation import ParamDiffAug, dsa_choice
from utils.matching import METRICS, dc_iteration, get_loops
from utils.memory import check_memory
from utils.run import Run, load_data, make_parser, parse_args, run_main
from utils.synset import make_synset

# The original's defaults (VICO main.py).
DEFAULTS = dict(dataset='CIFAR10', ipc=1, eval_mode='S', eval_every=500, Iteration=1000, lr_img=0.1)


def make_dc_parser(low_rank):
    p = make_parser('DC/DSA: dataset condensation with gradient matching' + (' on a low-rank set' if low_rank else ''),
                    DEFAULTS, low_rank)
    p.add_argument('--method', choices=['DC', 'DSA'], default='DC',
                   help='DC: no augmentation; DSA: Siamese augmentation with --dsa_strategy')
    p.add_argument('--dis_metric', choices=METRICS, default='ours',
                   help="gradient distance: 'ours' (per output unit 1 - cos, 1-D parameters ignored), 'mse', 'cos'")
    return p


def resolve_method(args):
    """--method DC means no DSA; --method DSA needs DSA operations (default: the recommended ones for the
    dataset, no flip on MNIST and SVHN)."""
    other = '--method DSA' if args.method == 'DC' else '--method DC'
    args.dsa_strategy = dsa_choice(args.dsa_strategy, args.method == 'DSA', args.dataset, f'--method {args.method}',
                                   other)


def main(argv=None, low_rank=False):
    args = parse_args(make_dc_parser(low_rank), argv, prepare=resolve_method)
    method = ('Lo' if low_rank else '') + args.method
    data, sampler = load_data(args)
    estimate = check_memory(method, args, data)
    loops = get_loops(args.ipc)  # the budget ipc for low rank, as the plugin
    run = Run(args, method)
    run.log(f'estimated peak memory: {estimate.total / 2**30:.1f} GiB')
    run.log(f'outer_loop {loops[0]}, inner_loop {loops[1]}')
    param = ParamDiffAug()
    for exp in run.experiments():
        synset = make_synset(args, data, sampler)
        run.start(data, synset)
        optimizer = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
        for it in run.iterations(exp, synset, {'synset': synset, 'optimizer': optimizer}):
            with run.guard(exp, it, synset):
                loss = dc_iteration(args, data, synset, optimizer, sampler, param, loops)
            run.log_loss(it, loss)
    run.finish()


if __name__ == '__main__':
    run_main(main)
