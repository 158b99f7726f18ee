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

Re-running continues after the existing files: expert k is seeded from (--seed, k), so the experts up to
--num_experts are the same whether made in one run or several, and raising --num_experts adds more.

    python buffer.py --dataset CIFAR10 --model ConvNet --train_epochs 50 --num_experts 100 --zca
"""
import argparse
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from networks import NETWORK_NAMES, get_network
from utils import UserError
from utils.augment import ParamDiffAug, check_strategy, dc_augment, default_dsa_strategy, diff_augment, get_daparam
from utils.data import DATASETS, load_dataset, zca_whiten
from utils.evaluate import run_epoch
from utils.run import resolve_device, run_main, save_json, save_torch

# Settings a continued run must share with the existing experts (the others do not change an expert).
SETTINGS = ('dataset', 'model', 'lr_teacher', 'batch_train', 'dsa_strategy', 'train_epochs', 'zca', 'decay',
            'mom', 'l2', 'seed')
FILE = re.compile(r'replay_buffer_(\d+)\.pt')


def make_parser():
    p = argparse.ArgumentParser(description='MTT expert trajectories')
    p.add_argument('--dataset', default='CIFAR10', help=f'one of {", ".join(DATASETS)}')
    p.add_argument('--model', default='ConvNet', help='expert network (see networks.py); distill with the same')
    p.add_argument('--num_experts', type=int, default=100, help='experts wanted in the folder in total')
    p.add_argument('--lr_teacher', type=float, default=0.01, help='SGD learning rate of the experts')
    p.add_argument('--batch_train', type=int, default=256, help='training batch size')
    p.add_argument('--dsa_strategy', default=None,
                   help="DSA ops joined by '_' or 'none' (then classic crop_scale_rotate augmentation); "
                        'default: the recommended one for the dataset')
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
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    return p


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}'; choose one of: {', '.join(DATASETS)}.")
    if args.model not in NETWORK_NAMES:
        raise UserError(f"unknown model '{args.model}'; choose one of: {', '.join(NETWORK_NAMES)}.")
    for name in ('num_experts', 'batch_train', 'train_epochs', 'save_interval'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be at least 1 (got {getattr(args, name)}).')
    if args.lr_teacher <= 0:
        raise UserError(f'--lr_teacher must be positive (got {args.lr_teacher}).')
    if args.dsa_strategy is None:
        args.dsa_strategy = default_dsa_strategy(args.dataset)
    check_strategy(args.dsa_strategy)
    args.device = resolve_device(args.device)
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


def snapshot(net):
    return [p.detach().cpu().clone() for p in net.parameters()]


def augmenter(args):
    """Per-batch training augmentation: non-Siamese DSA, or classic crop_scale_rotate without DSA."""
    if args.dsa_strategy in ('', 'none', 'None'):
        daparam = {**get_daparam(args.dataset, args.model), 'strategy': 'crop_scale_rotate'}  # as the original
        return lambda x: dc_augment(x, daparam)
    param = ParamDiffAug()
    return lambda x: diff_augment(x, args.dsa_strategy, param)


def train_expert(args, data, train, test, aug, log, bar):
    """One trajectory: the initial parameters and those after each of args.train_epochs epochs."""
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(args.device)
    lr = args.lr_teacher
    make_opt = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=args.mom, weight_decay=args.l2)
    optimizer = make_opt(lr)
    trajectory = [snapshot(net)]
    for e in range(args.train_epochs):
        _, acc_train = run_epoch(net, *train, args.batch_train, optimizer, aug)
        _, acc_test = run_epoch(net, *test, 256)
        trajectory.append(snapshot(net))
        log(f'epoch {e}: train acc {100 * acc_train:.2f}, test acc {100 * acc_test:.2f}')
        bar.set_postfix(train=f'{100 * acc_train:.1f}', test=f'{100 * acc_test:.1f}')
        bar.update()
        if args.decay and e == args.train_epochs // 2 + 1:
            lr *= 0.1
            optimizer = make_opt(lr)
    return trajectory


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


def main(argv=None):
    args = parse_args(argv)
    folder = expert_dir(args.buffer_path, args.dataset, args.model, args.zca)
    folder.mkdir(parents=True, exist_ok=True)
    check_settings(folder, args)
    files = buffer_files(folder)
    done = sum(len(load_trajectories(f)) for f in files)
    log_file = open(folder / 'log.txt', 'a')

    def log(msg):
        tqdm.write(msg)
        log_file.write(f'{time.strftime("%H:%M:%S")} {msg}\n')
        log_file.flush()

    log(f'{folder}: {done} experts in {len(files)} files; {max(args.num_experts - done, 0)} to train '
        f'on {args.device}. Arguments: {json.dumps(vars(args), sort_keys=True)}')
    if done >= args.num_experts:
        log(f'nothing to do: raise --num_experts above {done} for more experts.')
        return
    data = load_dataset(args.dataset, args.data_path)
    if args.zca:
        zca_whiten(data, args.device)
    train = (data.images_train.to(args.device), data.labels_train.to(args.device))
    test = (data.images_test.to(args.device), data.labels_test.to(args.device))
    aug = augmenter(args)
    next_file = int(FILE.fullmatch(files[-1].name).group(1)) + 1 if files else 0
    pending = []
    bar = tqdm(total=(args.num_experts - done) * args.train_epochs, desc='expert epochs', dynamic_ncols=True)
    for k in range(done, args.num_experts):
        torch.manual_seed(expert_seed(args.seed, k))
        log(f'expert {k}')
        pending.append(train_expert(args, data, train, test, aug, log, bar))
        if len(pending) == args.save_interval or k == args.num_experts - 1:
            path = folder / f'replay_buffer_{next_file}.pt'
            save_torch(path, pending)
            log(f'saved {len(pending)} experts to {path}')
            pending, next_file = [], next_file + 1
    bar.close()
    log_file.close()


if __name__ == '__main__':
    run_main(main)
