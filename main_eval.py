"""Evaluate a saved set under any protocol: train fresh networks on it, test them, and write a run folder
(args.json, log.txt, results.json, res_*.pt of the sets evaluated, grids) as the other scripts do.

    python main_eval.py result/MNIST/LoDM_ipc1_r2/<run>/res_LoDM_MNIST_ConvNet_7ipc.pt --eval_mode M
    python main_eval.py result/MNIST/LoDM_ipc1_r2/<run>/factors_LoDM_MNIST_ConvNet_7ipc.pt
    python main_eval.py images_best.pt --labels labels_best.pt --dataset CIFAR10 --zca --syn_lr 0.01

It reads
- res_*.pt of this repository or of the original ones ({'data': [[images, labels], ...], ...}): every
  experiment in it, or --exp K;
- factors_*.pt of this repository ({'rank', 'ipc', 'data': [[A, B, labels], ...]}): the images A·B;
- a tensor of images (N, C, H, W) with --labels, a tensor of N class indices (MTT's images_best.pt and
  labels_best.pt), with --syn_lr for MTT's learned learning rate (a number, or a file holding it).
Images are normalized as this repository's datasets (the originals' are too), ZCA-whitened with --zca.

A file inside one of our run folders is evaluated by default as that run evaluated it: the dataset, model,
protocol (--eval_mode, --dsa_strategy, --epoch_eval_train, --num_eval, --lr_net, --batch_train, --zca,
--standardize_eval), --seed and final --Iteration come from its args.json, and MTT's learned rates from its
results.json; flags override them. Evaluation networks are seeded from (--seed, experiment, --Iteration,
network), so with the run's seed and protocol they are the networks the run trained and give its
accuracies. Other files take --dataset and --model, or else the ones in their name
(res_<method>_<dataset>_<model>_<n>ipc.pt).
"""
import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch
from torch import Tensor

from utils import UserError
from utils.augmentation import default_dsa_strategy
from utils.data import DATASETS, zca_whiten
from utils.evaluate import EVAL_MODES
from utils.run import Run, base_parser, parse_args, place_data, read_data, read_json, run_main
from utils.synset import SyntheticSet, images_per_class

# Settings a run's args.json passes on: how it evaluated its sets.
INHERITED = ('dataset', 'model', 'eval_mode', 'dsa_strategy', 'epoch_eval_train', 'num_eval', 'lr_net',
             'batch_train', 'zca', 'standardize_eval', 'seed', 'Iteration', 'test_images')
FILE_NAME = re.compile(rf'^(res|factors)_(?P<method>.+?)_(?P<dataset>{"|".join(DATASETS)})_(?P<model>.+)_\d+ipc\.pt$')


def make_eval_parser():
    p = base_parser('Evaluate a saved set (res_*.pt, factors_*.pt, or images with --labels)')
    p.add_argument('--eval_mode', choices=EVAL_MODES, default='S',
                   help='evaluation architectures (see utils/evaluate.py)')
    p.add_argument('--Iteration', type=int, default=0,
                   help="the iteration the set comes from, which seeds the evaluation networks with --seed "
                        "(default: the run's last one, else 0)")
    g = p.add_argument_group('the set')
    g.add_argument('file', nargs='?', help='res_*.pt, factors_*.pt, or a tensor of images (with --labels)')
    g.add_argument('--labels', metavar='FILE', help='a tensor of class indices, one per image of FILE')
    g.add_argument('--exp', type=int, default=None, help='evaluate only experiment K of FILE (default: all)')
    g.add_argument('--syn_lr', help="learning rate of the evaluation networks, a number or a file holding it "
                                    "(MTT's learned rate; default: the run's learned rates, else --lr_net)")
    g.add_argument('--zca', action=argparse.BooleanOptionalAction, default=False,
                   help='the set is ZCA-whitened: evaluate on the whitened test set')
    g.add_argument('--standardize_eval', action=argparse.BooleanOptionalAction, default=False,
                   help="standardize every batch, as the plugin's LoMTT evaluation")
    # Run's loop settings: one evaluation per set; ipc and num_exp are set from the file.
    p.set_defaults(num_eval=20, ipc=1, num_exp=1, eval_every=1, checkpoint_every=1)
    return p


def get_args(argv=None):
    parser = make_eval_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.file:
        parser.set_defaults(**file_defaults(pre.file))
    return parse_args(parser, argv, prepare=check_eval_args)


def file_defaults(file):
    """What the file's run folder (args.json) or, failing that, its name says about how to evaluate it."""
    path = Path(file)
    run_args = path.parent / 'args.json'
    if run_args.is_file():
        saved = read_json(run_args, 'run folder')
        return {k: saved[k] for k in INHERITED if k in saved}
    match = FILE_NAME.match(path.name)
    return {'dataset': match['dataset'], 'model': match['model']} if match else {}


def check_eval_args(args):
    if args.resume:
        raise UserError('main_eval.py runs have nothing to resume: run the evaluation again.')
    if not args.file:
        raise UserError('give the file to evaluate: res_*.pt, factors_*.pt, or images with --labels.')
    if not Path(args.file).is_file():
        raise UserError(f'{args.file} does not exist: give a res_*.pt, factors_*.pt or images file.')
    if args.dataset is None:
        raise UserError(f'give --dataset: {args.file} is not in a run folder and its name names no dataset.')
    if args.dsa_strategy is None:
        args.dsa_strategy = default_dsa_strategy(args.dataset)
    if args.syn_lr is not None:
        args.syn_lr = read_rate(args.syn_lr)


def read_rate(value):
    """--syn_lr: a number, or a file holding one (a scalar tensor or a float)."""
    try:
        rate = float(value)
    except ValueError:
        held = load(value, '--syn_lr file')
        if not (isinstance(held, float) or torch.is_tensor(held) and held.numel() == 1):
            raise UserError(f'--syn_lr {value} must hold one number (a float or a one-element tensor).') from None
        rate = float(held)
    if not (math.isfinite(rate) and rate > 0):
        raise UserError(f'--syn_lr must be a finite positive number (got {rate}).')
    return rate


def load(path, what):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{path} does not exist: give an existing {what}.') from None
    except Exception as e:
        raise UserError(f'{path} cannot be read as a {what} ({str(e)[:200]}); give a file '
                        f'saved with torch.save.') from None


@dataclass
class SavedSet:
    exp: int  # the experiment's index in the file
    images: Tensor  # (N, C, H, W); A·B for factors
    labels: Tensor
    factors: tuple | None = None  # (A, B)


def read_sets(args):
    """(the sets of args.file to evaluate, rank or None, budget ipc or None)."""
    obj, name = load(args.file, 'saved set'), args.file
    if torch.is_tensor(obj):
        if not args.labels:
            raise UserError(f'{name} holds a tensor of images: give their labels with --labels FILE '
                            f'(for MTT, labels_best.pt beside images_best.pt).')
        labels = load(args.labels, 'labels file')
        if not torch.is_tensor(labels):
            raise UserError(f'--labels {args.labels} must hold a tensor of class indices.')
        return pick([SavedSet(0, obj, labels)], args), None, None
    if not (isinstance(obj, dict) and isinstance(obj.get('data'), list) and obj['data']):
        raise UserError(f'{name} is in no format this script reads: expected a res_*.pt or factors_*.pt dict '
                        f"with a non-empty 'data' list, or a tensor of images with --labels.")
    if 'rank' in obj:
        if 'ipc' not in obj:
            raise UserError(f"{name} has 'rank' but no 'ipc': a factors_*.pt file of this repository holds both.")
        sets = [SavedSet(e, a @ b, labels, (a, b)) for e, (a, b, labels) in enumerate(_entries(obj, 3, name))]
        return pick(sets, args), int(obj['rank']), int(obj['ipc'])
    return pick([SavedSet(e, x, y) for e, (x, y) in enumerate(_entries(obj, 2, name))], args), None, None


def _entries(obj, size, name):
    what = '[A, B, labels]' if size == 3 else '[images, labels]'
    if not all(isinstance(e, (list, tuple)) and len(e) == size and all(map(torch.is_tensor, e)) for e in obj['data']):
        raise UserError(f"{name}: every entry of 'data' must be {what} tensors.")
    return obj['data']


def pick(sets, args):
    if args.exp is None:
        return sets
    if not 0 <= args.exp < len(sets):
        raise UserError(f'{args.file} holds experiments 0 to {len(sets) - 1}: --exp {args.exp} is not one of them.')
    return [sets[args.exp]]


def check_set(s, data, name):
    """A UserError, in one sentence, unless the set's images and labels fit the dataset; returns the
    class-sorted order of the images."""
    x, y, ds = s.images, s.labels, data.name
    want = (data.channel, *data.im_size)
    if not x.is_floating_point() or x.dim() != 4:
        raise UserError(f'{name}: images must be a float tensor (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}.')
    if tuple(x.shape[1:]) != want:
        shown = lambda s: 'x'.join(map(str, s))
        raise UserError(f'{name} holds {shown(x.shape[1:])} images but {ds} images are {shown(want)}: give the '
                        f'--dataset the set was made for.')
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() and not torch.equal(y, y.round()):
        raise UserError(f'{name}: the labels must be one class index per image ({len(x)}), got {y.dtype} of '
                        f'shape {tuple(y.shape)} (soft labels are not supported).')
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= data.num_classes:
        raise UserError(f'{name} has labels {int(y.min())} to {int(y.max())} but {ds} has {data.num_classes} '
                        f'classes (0 to {data.num_classes - 1}): give the --dataset the set was made for.')
    counts = torch.bincount(y, minlength=data.num_classes)
    if int(counts.min()) != int(counts.max()):
        c = int(counts.argmin())
        raise UserError(f'{name} has {int(counts.max())} images of class {int(counts.argmax())} but {int(counts[c])} '
                        f'of class {c}: evaluation needs the same number of images in every class.')
    return torch.argsort(y, stable=True)


def make_set(s, order, rank, ipc, data, name):
    """The set as a SyntheticSet (pixels, or the factors A and B themselves)."""
    n = len(s.images) // data.num_classes
    if rank is None:
        synset = SyntheticSet(data.num_classes, n, data.channel, data.im_size)
        synset.init_real(s.images[order])
        return synset
    if images_per_class(ipc, rank, data.im_size) != n:
        raise UserError(f'{name}: rank {rank} and ipc {ipc} give {images_per_class(ipc, rank, data.im_size)} '
                        f'images per class, but it holds {n}: the file is inconsistent.')
    synset = SyntheticSet(data.num_classes, ipc, data.channel, data.im_size, rank)
    with torch.no_grad():
        synset.a.copy_(s.factors[0][order])
        synset.b.copy_(s.factors[1][order])
    return synset


def learned_rates(file):
    """{experiment: learned syn_lr} of the run that made file (MTT), or {}."""
    results = Path(file).parent / 'results.json'
    return read_json(results, 'results file').get('syn_lr', {}) if results.is_file() else {}


def main(argv=None):
    args = get_args(argv)
    sets, rank, ipc = read_sets(args)
    data = read_data(args)
    unwhiten = zca_whiten(data, args.device) if args.zca else None
    place_data(args, data, 'cpu')  # the test set on the device
    orders = [check_set(s, data, args.file) for s in sets]
    synsets = [make_set(s, order, rank, ipc, data, args.file).to(args.device) for s, order in zip(sets, orders)]
    args.ipc, args.num_exp, args.rank = synsets[0].ipc, len(sets), rank  # folder Eval_<method>_ipc<ipc>[_r<rank>]
    match = FILE_NAME.match(Path(args.file).name)
    run = Run(args, f'Eval_{match["method"]}' if match else 'Eval', show=unwhiten)
    rates = learned_rates(args.file)
    for i in run.experiments():  # positions in sets (a process's share under torchrun)
        s, synset = sets[i], synsets[i]
        lr = args.syn_lr or rates.get(str(s.exp), args.lr_net)
        run.log(f'exp {s.exp}: experiment {s.exp} of {args.file}, trained at lr {lr:.6g}')
        run.start(data, synset, lr)
        run.evaluate(s.exp, args.Iteration, synset, lr)
        run.saved.append({'exp': s.exp, 'images': synset.images().detach().cpu(), 'labels': synset.labels.cpu(),
                          'factors': synset.factors()})  # as Run.iterations stores a finished set
    run.finish()  # results.json, and the sets evaluated in res_*.pt (factors_*.pt)


if __name__ == '__main__':
    run_main(main)
