"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023); with --rank, LoDM.

Every iteration draws a fresh random network, freezes it, and moves the mean embedding of each class's
synthetic images towards the mean embedding of a batch of that class's real images. Both batches of a
class go through the same (Siamese) DSA transformation. See utils/distribution.py.

    python main_DM.py --dataset MNIST --ipc 10 --data_path ../shared/data
    python main_LoDM.py --dataset CIFAR10 --ipc 10 --rank 2
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch

from utils.augmentation import FULL_STRATEGY, ParamDiffAug
from utils.distributed import split
from utils.distribution import class_blocks, dm_iteration
from utils.memory import check_memory
from utils.run import Run, load_data, make_parser, parse_args, run_main
from utils.synset import make_synset

# The original's defaults (VICO main_DM.py, with the plugin's dataset, ipc and init): DSA with flip on every
# dataset, and 1000 epochs per evaluation network whether DSA is on or not.
DEFAULTS = dict(dataset='MNIST', ipc=10, eval_mode='SS', eval_every=2000, Iteration=20000, lr_img=1.0,
                dsa_strategy=FULL_STRATEGY, epoch_eval_train=1000)


def get_args(argv=None, low_rank=False):
    parser = make_parser(f'{"LoDM" if low_rank else "DM"}: distribution matching', DEFAULTS, low_rank)
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the embedding: about 30%% faster on CPU after a 30-60 s warm-up')
    return parse_args(parser, argv)


def main(argv=None, low_rank=False):
    method = 'LoDM' if low_rank else 'DM'
    args = get_args(argv, low_rank)
    data, sampler = load_data(args)
    estimate = check_memory(method, args, data)
    blocks = class_blocks(args, list(range(data.num_classes)), args.device)
    run = Run(args, method, split=(len(blocks), 'block(s) of classes'))
    run.log(f'estimated peak memory: {estimate.total / 2**30:.1f} GiB')
    team, param = run.team, ParamDiffAug()
    mine = split(blocks, team.member, team.size)  # under torchrun, the team condenses its classes apart
    own = [c for block in mine for c in block] if team.size > 1 else None
    for exp in run.experiments():
        synset = make_synset(args, data, sampler)
        run.start(data, synset)
        optimizer = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
        for it in run.iterations(exp, synset, {'synset': synset, 'optimizer': optimizer}, own_classes=own):
            with run.guard(exp, it, synset):
                loss = dm_iteration(args, data, synset, optimizer, sampler, param, mine, team.total)
            run.log_loss(it, loss / data.num_classes)
    run.finish()


if __name__ == '__main__':
    run_main(main)
