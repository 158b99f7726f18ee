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
import torch

from networks import get_network
from utils import UserError
from utils.augment import ParamDiffAug
from utils.matching import METRICS, freeze_batch_norm, get_loops, matching_step, train_on_synset
from utils.run import Run, load_data, make_parser, parse_args, run_main
from utils.synset import make_synset

# The original's defaults (VICO main.py).
DEFAULTS = dict(dataset='CIFAR10', ipc=1, eval_mode='S', eval_every=500, Iteration=1000, lr_img=0.1)
NO_DSA = ('', 'none', 'None')


def make_dc_parser(low_rank):
    p = make_parser('DC/DSA: dataset condensation with gradient matching' + (' on a low-rank set' if low_rank else ''),
                    DEFAULTS, low_rank)
    p.add_argument('--method', choices=['DC', 'DSA'], default='DC',
                   help='DC: no augmentation; DSA: Siamese augmentation with --dsa_strategy')
    p.add_argument('--dis_metric', choices=METRICS, default='ours',
                   help="gradient distance: 'ours' (per output unit 1 - cos, 1-D parameters ignored), 'mse', 'cos'")
    return p


def resolve_method(args):
    """--method DC means no DSA; --method DSA needs DSA operations (default: the recommended ones)."""
    given = args.dsa_strategy
    if args.method == 'DC':
        if given not in (None, *NO_DSA):
            raise UserError(f'--method DC uses no augmentation but --dsa_strategy {given} was given: '
                            f'use --method DSA or drop --dsa_strategy.')
        args.dsa_strategy = 'none'
    elif given in NO_DSA:
        raise UserError(f"--method DSA needs DSA operations but --dsa_strategy is '{given}': drop it for the "
                        f'recommended strategy, or use --method DC.')


def fresh_network(args, data, device):
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    net.train()
    return net


def dc_iteration(args, data, synset, optimizer, sampler, param, loops):
    """One outer iteration on a fresh network; returns the mean matching loss per class and step."""
    outer_loop, inner_loop = loops
    net = fresh_network(args, data, sampler.images.device)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=args.lr_net)  # no momentum, as the original
    total = 0.0
    for ol in range(outer_loop):
        freeze_batch_norm(net, sampler)
        total += matching_step(net, synset, optimizer, sampler, args, param)
        if ol == outer_loop - 1:  # the net is not trained after the last matching step
            break
        train_on_synset(net, net_optimizer, synset, args, param, inner_loop)
    return total / (data.num_classes * outer_loop)


def main(argv=None, low_rank=False):
    args = parse_args(make_dc_parser(low_rank), argv, prepare=resolve_method)
    method = ('Lo' if low_rank else '') + args.method
    data, sampler = load_data(args)
    loops = get_loops(args.ipc)  # the budget ipc for low rank, as the plugin
    run = Run(args, method)
    run.log(f'outer_loop {loops[0]}, inner_loop {loops[1]}')
    param = ParamDiffAug()
    for exp in run.experiments():
        synset = make_synset(args, data, sampler)
        run.start(data, synset)
        optimizer = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
        for it in run.iterations(exp, synset, {'synset': synset, 'optimizer': optimizer}):
            run.log_loss(it, dc_iteration(args, data, synset, optimizer, sampler, param, loops))
    run.finish()


if __name__ == '__main__':
    run_main(main)
