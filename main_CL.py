"""Continual learning with condensed memory: GDumb-style class-incremental learning (the paper's application;
the protocol of VICO CL_DM.py and the plugin's CL_CIFAR10.py / CL_CIFAR100.py, reference cl_and_coresets.md
section 2).

For each class order s (np.random.seed(s); np.random.permutation(classes), so the orders equal the
originals') the classes arrive in --steps steps. At step t the memory of the step's new classes is built
from their real images only (random, herding, or a condensation method of this repository restricted to
those classes), then --num_eval fresh networks with one output per class of the dataset are trained from
scratch on all memories so far (the original evaluation protocol, DSA) and tested on the test images of
the classes seen so far. Low-rank memory stores as many floats per class as --ipc full images.

    python main_CL.py --dataset CIFAR10 --steps 5 --method LoDM --ipc 10 --rank 2
    python main_CL.py --dataset CIFAR100 --steps 10 --method DM --ipc 20
    python main_CL.py --dataset MNIST --steps 5 --method LoDM --ipc 1 --data_path ../shared/data
    python main_CL.py --method DM --memory_path CL_data      # evaluate memory files made elsewhere
    python main_CL.py --plot RUN_DIR [RUN_DIR ...] --out curves.png

Outputs in <save_path>/<dataset>/CL_<method>_ipc<ipc>[_r<rank>]_<steps>steps/<run>/: the memory of each order
(cl_<method>_<dataset>_<model>_<n>ipc_<steps>steps_seed<s>.pt, the originals' format: {'data': [[images,
labels] per step]}, global labels; low rank adds the factors), results.json, table.md, curves.png, log.txt.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import numpy as np
import torch
from tqdm import tqdm

import main_DC
import main_DM
from utils import Diverged, UserError, distributed, seed_for
from utils.augmentation import FULL_STRATEGY, ParamDiffAug
from utils.coreset import RECIPE, cache_file, extractor_settings, get_extractor, select_herding
from utils.distribution import class_blocks, dm_iteration
from utils.evaluate import evaluate_networks, network_blocks
from utils.matching import dc_iteration, get_loops
from utils.run import (RunFolder, add_set_args, base_parser, load_data, mean_std, parse_args, run_main,
                       save_json, save_text, save_torch)
from utils.synset import SyntheticSet, images_per_class, make_synset

# How each method builds a step's memory: the main scripts' defaults (their originals'), with the
# initializations of the CL protocol (reference Q5: DM and DSA from real images, the low-rank sets from
# noise); DSA with flip in every method's matching and evaluation, as CL_DM.py.
CONDENSE = {
    'DM': {**main_DM.DEFAULTS, 'init': 'real'},
    'LoDM': {**main_DM.DEFAULTS, 'init': 'noise'},
    'DC': {**main_DC.DEFAULTS, 'init': 'noise', 'dsa_strategy': 'none'},
    'DSA': {**main_DC.DEFAULTS, 'init': 'real'},
    'LoDC': {**main_DC.DEFAULTS, 'init': 'noise', 'dsa_strategy': 'none'},
    'LoDSA': {**main_DC.DEFAULTS, 'init': 'noise'},
}
METHODS = ('random', 'herding', *CONDENSE)


def get_args(argv=None):
    p = base_parser('Continual learning (GDumb) with condensed memory')
    add_set_args(p, low_rank=True)
    p.add_argument('--method', choices=METHODS, default='LoDM', help='how the memory of each step is built')
    p.add_argument('--steps', type=int, default=5, help='steps the classes arrive in')
    p.add_argument('--orders', type=int, default=5, help='class orders (seeds 0 .. orders-1)')
    p.add_argument('--memory_path', help='evaluate the memory files in this folder instead of building them')
    p.add_argument('--extractor_epochs', type=int, default=RECIPE['epochs'],
                   help="herding: epochs of the step's feature network (reference Q1 recipe otherwise)")
    p.set_defaults(dataset='CIFAR10', ipc=10, num_eval=3, epoch_eval_train=1000, dsa_strategy=FULL_STRATEGY,
                   init=None, dis_metric='ours', compile=False, eval_mode='S')
    return parse_args(p, argv, prepare=prepare)


def prepare(args):
    """The method's condensation settings where not given (random and herding learn nothing: no
    iterations); a rank only for the low-rank methods."""
    defaults = CONDENSE.get(args.method, {'Iteration': 0, 'lr_img': 1.0, 'init': 'real'})
    for name in ('init', 'Iteration', 'lr_img'):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if not args.method.startswith('Lo'):
        args.rank = None
    for name in ('steps', 'orders', 'extractor_epochs'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be at least 1 (got {getattr(args, name)}).')


def condensation_args(args):
    """args as the method's condensation sees them: its own DSA strategy (evaluation always uses DSA)."""
    strategy = CONDENSE[args.method].get('dsa_strategy', FULL_STRATEGY)
    return argparse.Namespace(**{**vars(args), 'dsa_strategy': strategy, 'dsa': strategy != 'none'})


# ------------------------------------------------------------------------------------------- classes

def class_order(seed, num_classes):
    """The original's order: np.random.seed(seed); np.random.permutation(num_classes)."""
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def step_classes(order, steps):
    """The classes of each step: consecutive slices of the order."""
    per = len(order) // steps
    return [order[t * per:(t + 1) * per] for t in range(steps)]


def seen_test(data, classes):
    """data with only the test images of `classes`."""
    keep = torch.isin(data.labels_test, torch.tensor(classes, device=data.labels_test.device))
    return dataclasses.replace(data, images_test=data.images_test[keep], labels_test=data.labels_test[keep])


# ------------------------------------------------------------------------------------------- memory

def random_memory(data, ipc, order, steps, seed):
    """CL_DM's random memory, index for index: after the class order, the same numpy stream draws
    permutation(indices of c)[:ipc] for every class in the order."""
    rs = np.random.RandomState(seed)
    rs.permutation(len(order))
    labels = data.labels_train.cpu().numpy()
    picks = {c: rs.permutation(np.flatnonzero(labels == c))[:ipc] for c in order}
    return [np.concatenate([picks[c] for c in classes]) for classes in step_classes(order, steps)]


def herding_memory(args, data, classes, folder, seed, log):
    """Herding with the features of a network trained only on the step's real images (no future classes),
    cached in `folder`."""
    keep = torch.isin(data.labels_train, torch.tensor(classes))
    images, labels = data.images_train[keep].to(args.device), data.labels_train[keep].to(args.device)
    settings = extractor_settings(args.dataset, args.model, seed, len(images), args.extractor_epochs, classes)
    net = get_extractor(cache_file(folder, settings), images, labels, data.num_classes, settings, log=log).net
    return images[select_herding(net, images, labels, data.num_classes, args.ipc, classes)]


def condensed_memory(args, data, sampler, classes, log):
    """The method's condensation restricted to `classes`: the synthetic set after --Iteration iterations."""
    cond = condensation_args(args)
    synset = make_synset(cond, data, sampler, classes)
    optimizer = torch.optim.SGD(synset.parameters(), lr=cond.lr_img, momentum=0.5)
    param = ParamDiffAug()
    if args.method.endswith('DM'):
        blocks = class_blocks(cond, synset.classes, args.device)
        step = lambda: dm_iteration(cond, data, synset, optimizer, sampler, param, blocks)  # noqa: E731
    else:
        loops = get_loops(cond.ipc)
        step = lambda: dc_iteration(cond, data, synset, optimizer, sampler, param, loops)  # noqa: E731
    for it in tqdm(range(cond.Iteration), desc=f'{args.method} memory of classes {classes}', leave=False):
        try:
            loss = step()
        except Diverged as err:
            raise UserError(f'the {args.method} memory of classes {classes} diverged at iteration {it} ({err}): '
                            f'lower --lr_img.') from None
        if it % 100 == 0:
            log(f'  iter {it:6d}  loss {loss:.4f}')
    return synset


class Memory:
    """The memory of one class order: per step, images (CPU) and global labels, and (low rank) factors.
    Saved after every step, in the originals' format {'data': [[images, labels], ...]}."""

    def __init__(self, path):
        self.path = path
        self.data, self.factors = [], []
        if path.exists():
            saved = torch.load(path, map_location='cpu', weights_only=False)
            self.data, self.factors = saved['data'], saved.get('factors', [])

    def add(self, images, labels, factors=None):
        self.data.append([images.detach().cpu(), labels.cpu()])
        if factors is not None:
            self.factors.append([factors['a'], factors['b'], labels.cpu()])
        save_torch(self.path, {'data': self.data, **({'factors': self.factors} if self.factors else {})})

    def union(self, steps):
        """Images and labels of the first `steps` steps."""
        return (torch.cat([x for x, _ in self.data[:steps]]), torch.cat([y for _, y in self.data[:steps]]))


def check_memory(memory, classes_per_step, n, data):
    """A UserError unless the memory file holds one entry per step with n images of each of its classes."""
    path, steps = memory.path, len(classes_per_step)
    if len(memory.data) != steps:
        raise UserError(f'{path} holds {len(memory.data)} steps but --steps is {steps}: give the memory of '
                        f'the same number of steps.')
    for t, ((images, labels), classes) in enumerate(zip(memory.data, classes_per_step)):
        if sorted(set(labels.tolist())) != sorted(classes) or len(labels) != n * len(classes):
            raise UserError(f'{path}: step {t} holds classes {sorted(set(labels.tolist()))} ({len(labels)} images) '
                            f'but this class order has {sorted(classes)} with {n} images each: check --dataset, '
                            f'--steps, --ipc and --rank.')
        if tuple(images.shape[1:]) != (data.channel, *data.im_size):
            raise UserError(f'{path}: step {t} images are {tuple(images.shape[1:])}, not '
                            f'{(data.channel, *data.im_size)} as {data.name}.')


def find_memory(folder, n, steps, order, method):
    """The memory file of `order` in a folder of originals'-style files (cl_..._<n>ipc_<steps>steps_seed<s>.pt);
    where several match, the one naming the method."""
    found = sorted(Path(folder).glob(f'*_{n}ipc_{steps}steps_seed{order}.pt'))
    if len(found) > 1:
        found = [f for f in found if f'_{method}_' in f.name]
    if len(found) != 1:
        raise UserError(f'{"no" if not found else "several"} memory files *_{n}ipc_{steps}steps_seed{order}.pt '
                        f'{"" if not found else "naming " + method + " "}in {folder}: give the folder of the memory '
                        f'files (names as cl_{method}_<dataset>_<model>_{n}ipc_{steps}steps_seed<order>.pt).')
    return found[0]


# ------------------------------------------------------------------------------------------- results

def summarize(accs, steps, per_step_classes):
    """Per step: mean ± std pooled over orders × networks (as the original), and per-order means."""
    rows = []
    for t in range(steps):
        pooled = [a for order_accs in accs.values() if t < len(order_accs) for a in order_accs[t]]
        if pooled:
            mean, std = mean_std(pooled)
            rows.append({'step': t, 'seen_classes': per_step_classes * (t + 1), 'mean': mean, 'std': std,
                         'networks': len(pooled)})
    per_order = {s: [sum(a) / len(a) for a in order_accs] for s, order_accs in accs.items()}
    return rows, per_order


def write_table(folder, rows, title):
    lines = [f'# {title}', '', '| seen classes | ' + ' | '.join(str(r['seen_classes']) for r in rows) + ' |',
             '|---|' + '---|' * len(rows),
             '| test acc % | ' + ' | '.join(f'{100 * r["mean"]:.2f} ± {100 * r["std"]:.2f}' for r in rows) + ' |',
             '', 'LaTeX row (as the original printed it):', '',
             ' & '.join(f'{100 * r["mean"]:.2f}$\\pm${100 * r["std"]:.2f}' for r in rows)]
    save_text(folder / 'table.md', '\n'.join(lines) + '\n')


def plot(runs, out):
    """Accuracy against seen classes, one line (± std band) per run folder."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for run in runs:
        path = Path(run) / 'results.json'
        if not path.is_file():
            raise UserError(f'{path} does not exist: give the folders of main_CL.py runs.')
        r = json.loads(path.read_text())
        x = [row['seen_classes'] for row in r['per_step']]
        mean = np.array([100 * row['mean'] for row in r['per_step']])
        std = np.array([100 * row['std'] for row in r['per_step']])
        label = f'GDumb + {r["method"]}' + (f' (r={r["rank"]})' if r.get('rank') else '')
        ax.plot(x, mean, marker='o', label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel('number of classes seen')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '--plot':
        if '--out' not in argv:
            raise UserError('--plot RUN_DIR [RUN_DIR ...] needs --out FILE.png.')
        i = argv.index('--out')
        plot(argv[1:i], argv[i + 1])
        return
    args = get_args(argv)
    if distributed.launched():
        raise UserError('main_CL.py runs in one process: start it with python, not torchrun (reproduce.py and '
                        'the condensation scripts split work over processes).')
    data, sampler = load_data(args)
    if data.num_classes % args.steps:
        raise UserError(f'--steps {args.steps} does not divide the {data.num_classes} classes of {args.dataset}: '
                        f'choose a divisor.')
    n = images_per_class(args.ipc, args.rank, data.im_size)
    if args.method in ('random', 'herding') and min(sampler.sizes(args.ipc)) < args.ipc:
        raise UserError(f'--ipc {args.ipc} asks for more real images than the smallest class of {args.dataset} '
                        f'has ({min(sampler.sizes(args.ipc))}): lower --ipc.')
    tag = f'CL_{args.method}_ipc{args.ipc}' + (f'_r{args.rank}' if args.rank else '') + f'_{args.steps}steps'
    run = RunFolder(args, tag)
    done = run.ckpt['accs'] if run.ckpt else {}
    save_torch(run.ckpt_path, {'accs': done})  # resumable from the start: memories are saved as they are made
    per_step = data.num_classes // args.steps
    one_class = SyntheticSet(1, args.ipc, data.channel, data.im_size, args.rank)  # the memory of a class
    summary = {'method': args.method, 'dataset': args.dataset, 'model': args.model, 'ipc': args.ipc,
               'rank': args.rank, 'images_per_class': n, 'steps': args.steps,
               'floats_per_class': one_class.stored_floats(), 'budget_floats_per_class': one_class.budget_floats()}
    run.log(f'memory: {n} images per class, {summary["floats_per_class"]} stored floats per class '
            f'(budget {summary["budget_floats_per_class"]})')
    orders = {s: class_order(s, data.num_classes) for s in range(args.orders)}
    for s, order in orders.items():
        classes_per_step = step_classes(order, args.steps)
        run.log(f'order {s}: {classes_per_step}')
        name = f'cl_{args.method}_{args.dataset}_{args.model}_{n}ipc_{args.steps}steps_seed{s}.pt'
        if args.memory_path:
            memory = Memory(find_memory(args.memory_path, n, args.steps, s, args.method))
            check_memory(memory, classes_per_step, n, data)
        else:
            memory = Memory(run.dir / name)
        picks = random_memory(data, args.ipc, order, args.steps, s) if args.method == 'random' else None
        accs = done.setdefault(s, [])
        for t, classes in enumerate(classes_per_step):
            if len(memory.data) <= t:
                torch.manual_seed(seed_for(args.seed, 'memory', s, t))
                if picks is not None:
                    memory.add(data.images_train[picks[t]], data.labels_train[picks[t]])
                elif args.method == 'herding':
                    images = herding_memory(args, data, classes, run.dir, seed_for(args.seed, 'extractor', s, t),
                                            run.log)
                    memory.add(images, torch.tensor(classes).repeat_interleave(args.ipc))
                else:
                    synset = condensed_memory(args, data, sampler, classes, run.log)
                    memory.add(synset.images(), synset.labels, synset.factors() if args.rank else None)
            if len(accs) > t:
                continue
            images, labels = memory.union(t + 1)
            seen = sorted(set(labels.tolist()))
            test = seen_test(data, seen)
            step_accs = []
            for block in network_blocks(args):
                seeds = [seed_for(args.seed, 'cl', s, t, k) for k in block]
                step_accs += evaluate_networks(args, test, images.to(args.device), labels.to(args.device),
                                               args.lr_net, args.model, seeds, log=run.log)
            accs.append(step_accs)
            run.log(f'order {s} step {t}: {len(seen)} classes seen, {len(images)} memory images, test acc '
                    f'{100 * sum(step_accs) / len(step_accs):.2f} over {len(step_accs)} networks')
            save_torch(run.ckpt_path, {'accs': done})
            rows, per_order = summarize(done, args.steps, per_step)
            save_json(run.dir / 'results.json', {
                **summary, 'class_orders': [orders[o] for o in sorted(done)], 'accs': done, 'per_step': rows,
                'per_order_means': per_order, 'complete': len(done) == args.orders and all(
                    len(a) == args.steps for a in done.values())})
    rows, _ = summarize(done, args.steps, per_step)
    write_table(run.dir, rows, f'GDumb + {args.method} on {args.dataset}, {args.steps} steps, ipc {args.ipc}')
    plot([run.dir], run.dir / 'curves.png')
    for r in rows:
        run.log(f'{r["seen_classes"]:4d} classes: {100 * r["mean"]:.2f} ± {100 * r["std"]:.2f} '
                f'({r["networks"]} networks)')
    run.log(f'Outputs in {run.dir}')


if __name__ == '__main__':
    run_main(main)
