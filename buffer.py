"""Expert trajectories for MTT (Cazenavette et al., CVPR 2022): train networks on the real data and save
their parameters after every epoch.

Each expert is a fresh network trained with plain SGD (lr --lr_teacher, momentum --mom, weight decay --l2;
with --decay the rate is divided by 10 after epoch train_epochs//2 + 1) for --train_epochs epochs, with
non-Siamese DSA on every training batch (classic crop_scale_rotate when --dsa_strategy none, as the
original). The files, in <buffer_path>/<dataset>[_NO_ZCA]/<model>/ (_NO_ZCA whenever --zca is off):

    replay_buffer_<n>.pt  a list of trajectories (--save_interval per file; the last file may hold fewer);
                          a trajectory is a list of train_epochs+1 snapshots (the initial parameters, then
                          one per epoch); a snapshot is a list of CPU tensors in parameter order
    buffer_args.json      the settings that made the experts
    log.txt               train and test accuracy of every expert epoch

File n holds experts n*save_interval onwards. Re-running makes the files that are missing or short (a
short last file is redone when --num_experts grows): expert k is seeded from (--seed, k) (its
initialization, data order and augmentation), so the experts are the same whether made in one run or
several. --train_together experts of a file are trained at once (utils/ensemble.py). Under torchrun,
process r makes files r, r + processes, ...: the same files as one process, bit for bit on the CPU.

    python buffer.py --dataset CIFAR10 --model ConvNet --train_epochs 50 --num_experts 100 --zca
    torchrun --nproc_per_node 4 buffer.py --dataset CIFAR10 --zca
"""
import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch
from tqdm import tqdm

from networks import NETWORK_NAMES
from utils import UserError
from utils.augmentation import FULL_STRATEGY, ParamDiffAug, check_strategy, get_daparam
from utils.data import DATASETS, load_dataset, zca_whiten
from utils.ensemble import dc_augmentation, dsa_augment, network_groups, train
from utils.distributed import local_device, split
from utils.run import (add_original_mtt_flags, apply_original_mtt_flags, check_rates, check_writable,
                       keep_freed_memory, resolve_device, run_main, save_json, save_torch)

# Settings a continued run must share with the existing experts (the others do not change an expert).
SETTINGS = ('dataset', 'model', 'lr_teacher', 'batch_train', 'dsa_strategy', 'train_epochs', 'zca', 'decay',
            'mom', 'l2', 'seed', 'save_interval')
FILE = re.compile(r'replay_buffer_(\d+)\.pt')
# Experts trained at once per device type (--train_together overrides it). On the 2-core CPU batches of 256
# already fill the cores: CPU time per expert step (ConvNet, MNIST, median of 5, one process) 1.19-1.26 s
# one at a time, 1.14-1.19 s two, 1.45-1.47 s four; with networks.AvgPool2d, wall seconds for 4 experts x 2
# batches with DSA (median of 3, alternating) 6.55 one at a time, 6.11 two, 6.48 four. CUDA: not measured here.
TRAIN_TOGETHER = {'cpu': 2, 'cuda': 4}


def make_parser():
    p = argparse.ArgumentParser(description='MTT expert trajectories')
    p.add_argument('--dataset', default='CIFAR10', help=f'one of {", ".join(DATASETS)}')
    p.add_argument('--model', default='ConvNet', help='expert network (see networks.py); distill with the same')
    p.add_argument('--num_experts', type=int, default=100, help='experts wanted in the folder in total')
    p.add_argument('--lr_teacher', type=float, default=0.01, help='SGD learning rate of the experts')
    p.add_argument('--batch_train', type=int, default=256, help='training batch size')
    p.add_argument('--dsa_strategy', default=FULL_STRATEGY,
                   help="DSA ops joined by '_' or 'none' (then classic crop_scale_rotate augmentation); "
                        "default: the original's, with flip, on every dataset")
    p.add_argument('--data_path', default='data', help='folder of the datasets')
    p.add_argument('--buffer_path', default='buffers', help='folder of the expert buffers')
    p.add_argument('--train_epochs', type=int, default=50, help='epochs per expert (at least max_start_epoch '
                   '+ expert_epochs of the distillation)')
    p.add_argument('--zca', action='store_true', help='ZCA-whiten the data (kornia, eps 0.1); distill with --zca too')
    p.add_argument('--decay', action='store_true', help='divide the lr by 10 after epoch train_epochs//2 + 1')
    p.add_argument('--mom', type=float, default=0.0, help='SGD momentum (the MTT authors use 0)')
    p.add_argument('--l2', type=float, default=0.0, help='SGD weight decay (the MTT authors use 0)')
    p.add_argument('--save_interval', type=int, default=10, help='experts per file')
    p.add_argument('--seed', type=int, default=0, help='random seed (expert k is seeded from seed and k)')
    p.add_argument('--train_together', type=int, default=None,
                   help=f'experts trained at once (default per device: {TRAIN_TOGETHER})')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    p.add_argument('--batch_real', type=int, help="unused (as in the original MTT buffer.py)")
    add_original_mtt_flags(p)
    return p


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}'; choose one of: {', '.join(DATASETS)}.")
    if args.model not in NETWORK_NAMES:
        raise UserError(f"unknown model '{args.model}'; choose one of: {', '.join(NETWORK_NAMES)}.")
    apply_original_mtt_flags(args)
    args.device = local_device(resolve_device(args.device))
    if args.train_together is None:
        args.train_together = TRAIN_TOGETHER.get(torch.device(args.device).type, 1)
    for name in ('num_experts', 'batch_train', 'train_epochs', 'save_interval', 'train_together'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be at least 1 (got {getattr(args, name)}).')
    check_rates(args, 'lr_teacher')
    check_strategy(args.dsa_strategy)
    check_writable(args.buffer_path, 'buffer_path')
    return args


def expert_dir(buffer_path, dataset, model, zca):
    """<buffer_path>/<dataset>[_NO_ZCA]/<model>: where buffer.py writes and MTT reads the experts."""
    return Path(buffer_path) / (dataset if zca else f'{dataset}_NO_ZCA') / model


def buffer_files(folder):
    """The replay_buffer_<n>.pt files of `folder`, by n."""
    found = [(int(m.group(1)), f) for f in Path(folder).glob('replay_buffer_*.pt') if (m := FILE.fullmatch(f.name))]
    return [f for _, f in sorted(found)]


def load_trajectories(path):
    """A buffer file as saved (list of trajectories of snapshots of tensors), memory-mapped (cheap to count)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f'{path} cannot be read ({e}): delete it and run buffer.py again.') from None


def expert_seed(seed, k):
    """Seed of expert k: one draw per expert from a generator seeded with --seed."""
    return int(torch.randint(2**62, (k + 1,), generator=torch.Generator().manual_seed(seed))[k])


def augmenter(args):
    """Per-batch training augmentation of every expert from its own generator: non-Siamese DSA, or classic
    crop_scale_rotate without DSA (as the original)."""
    if args.dsa_strategy in ('', 'none', 'None'):
        return dc_augmentation({**get_daparam(args.dataset, args.model), 'strategy': 'crop_scale_rotate'})
    return dsa_augment(args.dsa_strategy, ParamDiffAug())


def snapshot(group, k):
    """Network k's parameters as CPU tensors, in parameter order."""
    return [p.cpu().clone() for p in group.parameters_of(k)]


def train_group(args, group, train_set, test_set, aug, bar):
    """Train the experts of `group` (a Networks) together; returns their trajectories (the initial
    parameters and those after each of args.train_epochs epochs) and, per expert, its epochs' log lines."""
    trajectories = [[snapshot(group, k)] for k in range(group.k)]
    accs = []  # per epoch: (train accuracies, test accuracies) in %

    def after_epoch(epoch, loss, acc_train):
        acc_test = group.test(*test_set, 256)[1]
        for k, trajectory in enumerate(trajectories):
            trajectory.append(snapshot(group, k))
        accs.append((100 * torch.stack([acc_train, acc_test])).tolist())  # one read per epoch
        bar.set_postfix(train=f'{sum(accs[-1][0]) / group.k:.1f}', test=f'{sum(accs[-1][1]) / group.k:.1f}')
        bar.update(group.k)

    train(group, *train_set, args.train_epochs, args.lr_teacher, args.batch_train, args.mom, args.l2,
          decay_epoch=args.train_epochs // 2 + 1 if args.decay else None, augment=aug, after_epoch=after_epoch)
    lines = [[f'epoch {e}: train acc {a[0][k]:.2f}, test acc {a[1][k]:.2f}' for e, a in enumerate(accs)]
             for k in range(group.k)]
    return trajectories, lines


def train_experts(args, data, train_set, test_set, aug, indices, log, bar):
    """The trajectories of experts `indices`, trained together; their log lines are written when they are
    done, expert by expert, as when they were trained one at a time."""
    seeds = [expert_seed(args.seed, k) for k in indices]
    trajectories, lines = [], []
    for group in network_groups(args.model, data.channel, data.num_classes, data.im_size, seeds, args.device,
                                log):
        t, l = train_group(args, group, train_set, test_set, aug, bar)
        trajectories, lines = trajectories + t, lines + l
    for k, expert_lines in zip(indices, lines):
        log(f'expert {k}')
        for line in expert_lines:
            log(line)
    return trajectories


def check_settings(folder, args):
    """Write buffer_args.json in a new folder; in an existing one, the settings must be the same."""
    path = folder / 'buffer_args.json'
    ours = {k: getattr(args, k) for k in SETTINGS}
    if not path.exists():
        save_json(path, ours)
        return
    saved = json.loads(path.read_text())
    differ = [k for k in SETTINGS if k in saved and saved[k] != ours[k]]
    if differ:
        shown = ', '.join(f'--{k} {saved[k]} (not {ours[k]})' for k in differ)
        raise UserError(f'the experts in {folder} were made with {shown}: use those settings to add experts, '
                        f'or another --buffer_path.')


def file_plan(num_experts, save_interval):
    """{n: expert indices of replay_buffer_<n>.pt}: file n holds experts n*save_interval onwards."""
    starts = range(0, num_experts, save_interval)
    return {n: list(range(start, min(start + save_interval, num_experts))) for n, start in enumerate(starts)}


def main(argv=None):
    """Train the experts of every file that is missing or holds fewer experts than its share (then redone).
    Under torchrun, process r trains files r, r + processes, ... (no communication: each writes its own)."""
    args = parse_args(argv)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    plan = file_plan(args.num_experts, args.save_interval)
    if world > len(plan):
        raise UserError(f'{world} processes but only {len(plan)} expert file(s) to make: start at most '
                        f'{len(plan)} (torchrun --nproc_per_node), or raise --num_experts.')
    folder = expert_dir(args.buffer_path, args.dataset, args.model, args.zca)
    folder.mkdir(parents=True, exist_ok=True)
    check_settings(folder, args)
    have = {int(FILE.fullmatch(f.name).group(1)): len(load_trajectories(f)) for f in buffer_files(folder)}
    todo = [n for n, experts in plan.items() if have.get(n, 0) < len(experts)]
    mine = [n for n in split(list(plan), rank, world) if n in todo]  # files by number, not by what is done yet
    log_file = open(folder / 'log.txt', 'a')

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
        log_file.write(f'{time.strftime("%H:%M:%S")} {f"[rank {rank}] " if world > 1 else ""}{msg}\n')
        log_file.flush()

    log(f'{folder}: {sum(have.values())} experts in {len(have)} files; files to make {todo} ({mine} here) on '
        f'{args.device}. Arguments: {json.dumps(vars(args), sort_keys=True)}')
    if not mine:
        log(f'nothing to do here: raise --num_experts above {args.num_experts} for more experts.')
        return
    keep_freed_memory()
    data = load_dataset(args.dataset, args.data_path)
    if args.zca:
        zca_whiten(data, args.device)
    train_set = (data.images_train.to(args.device), data.labels_train.to(args.device))
    test_set = (data.images_test.to(args.device), data.labels_test.to(args.device))
    aug = augmenter(args)
    bar = tqdm(total=sum(len(plan[n]) for n in mine) * args.train_epochs, desc='expert epochs', dynamic_ncols=True,
               disable=rank != 0)
    for n in mine:
        experts = plan[n]
        trajectories = [t for start in range(0, len(experts), args.train_together)
                        for t in train_experts(args, data, train_set, test_set, aug,
                                               experts[start:start + args.train_together], log, bar)]
        path = folder / f'replay_buffer_{n}.pt'
        save_torch(path, trajectories)
        log(f'saved {len(trajectories)} experts to {path}')
    bar.close()
    log_file.close()


if __name__ == '__main__':
    run_main(main)
