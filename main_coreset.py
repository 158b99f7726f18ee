"""Coreset baselines (the paper's Table 1): --ipc real training images per class chosen by random, herding,
k-center greedy or forgetting (utils/coreset.py), or the whole training set (the upper bound of every
condensation table), evaluated by the same code, into the same run folder, as a condensed set.

    python main_coreset.py --dataset MNIST --ipc 10 --method herding --data_path ../shared/data
    python main_coreset.py --config configs/CIFAR10/Herding_ipc10.json
    python main_coreset.py --dataset CIFAR10 --method whole

--protocol dc (default) evaluates as the DC paper did, where the literature's coreset rows come from: the
classic DC augmentation (none, except crop_scale_rotate on MNIST) and 300 epochs (1000 with augmentation).
--protocol dsa evaluates as condensed sets are: DSA (--dsa_strategy, default the recommended one), 1000
epochs. --epoch_eval_train overrides the epochs of either.

A coreset always holds --ipc real images per class (the budget of stored floats). random draws new images in
every experiment, the draw --init real makes. herding, kcenter and forgetting use an extractor trained on
the training set (RECIPE in utils/coreset.py, --extractor_epochs, --extractor_model), one per experiment
with seed --seed + experiment, so their experiments differ by the extractor's seed. Extractors and their
forgetting counts are cached in <save_path>/<dataset>/extractors/ and reused by any run with the same
settings (--extractor FILE names one; it must have been made with the run's settings). The run folder also
holds indices_exp<e>.json: the chosen training images of experiment e (indices into the training set).
"""
import os
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch

from networks import NETWORK_NAMES
from utils import UserError
from utils.augmentation import dsa_choice
from utils.coreset import (RECIPE, cache_file, class_members, extractor_settings, get_extractor,
                           select_forgetting, select_herding, select_kcenter, select_random)
from utils.evaluate import EVAL_MODES
from utils.memory import check_memory
from utils.run import Run, base_parser, load_data, parse_args, run_main, save_json
from utils.synset import SyntheticSet

METHODS = {'random': 'Random', 'herding': 'Herding', 'kcenter': 'KCenter', 'forgetting': 'Forgetting',
           'whole': 'Whole'}
# Nothing is learned: Iteration 0, the set is evaluated once.
DEFAULTS = dict(dataset='MNIST', ipc=10, eval_mode='S', num_eval=20, Iteration=0, eval_every=1, checkpoint_every=1)


def make_coreset_parser():
    p = base_parser('Coreset baselines: real images chosen by random, herding, k-center or forgetting, or the '
                    'whole training set')
    p.add_argument('--ipc', type=int, help='real images per class (the budget of stored floats)')
    p.add_argument('--eval_mode', choices=EVAL_MODES, help='evaluation architectures (see utils/evaluate.py)')
    p.add_argument('--num_exp', type=int, default=5,
                   help='experiments: random draws anew, the others train their extractor with seed --seed + exp')
    g = p.add_argument_group('coreset')
    g.add_argument('--method', choices=list(METHODS), help='how the --ipc images per class are chosen; whole: '
                   'the whole training set')
    g.add_argument('--protocol', choices=['dc', 'dsa'], default='dc',
                   help="dc: DC augmentation (MNIST only), 300 epochs (1000 with augmentation), the literature's "
                        'coreset protocol; dsa: DSA, 1000 epochs, the condensed sets\' protocol')
    g.add_argument('--extractor_epochs', type=int, default=RECIPE['epochs'],
                   help='epochs of the extractor of herding, kcenter and forgetting (default: the recommended 200)')
    g.add_argument('--extractor_model', help='model of the extractor (default: --model)')
    g.add_argument('--extractor', metavar='FILE', help='a cached extractor file to use (one experiment)')
    g.add_argument('--train_images', type=int, default=None,
                   help='choose from the first N training images only (quick looks; default: all)')
    p.set_defaults(**DEFAULTS)
    return p


def check_coreset_args(args):
    """The method and protocol; --protocol sets the DSA strategy."""
    if args.method is None:
        raise UserError(f'choose a --method: {", ".join(METHODS)}.')
    other = '--protocol dsa' if args.protocol == 'dc' else '--protocol dc'
    args.dsa_strategy = dsa_choice(args.dsa_strategy, args.protocol == 'dsa', args.dataset,
                                   f'--protocol {args.protocol}', other)
    for name in ('extractor_epochs', 'train_images'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f'--{name} must be at least 1 (got {getattr(args, name)}).')
    args.extractor_model = args.extractor_model or args.model
    if args.extractor_model not in NETWORK_NAMES:
        raise UserError(f"unknown --extractor_model '{args.extractor_model}'; choose one of: "
                        f"{', '.join(NETWORK_NAMES)}.")
    if args.extractor and args.num_exp != 1:
        raise UserError('--extractor gives one network, for one experiment: add --num_exp 1, or drop --extractor '
                        '(each experiment then trains or reuses its own).')
    if args.extractor and not Path(args.extractor).is_file():
        raise UserError(f'--extractor {args.extractor} does not exist: give an extractor file (extractor_*.pt '
                        f'in <save_path>/<dataset>/extractors/) or drop --extractor.')


def get_args(argv=None):
    return parse_args(make_coreset_parser(), argv, prepare=check_coreset_args)


class CoresetRun(Run):
    """Run, except that the whole training set is neither saved again nor shown (its classes differ in size)."""

    def save_grid(self, images, per_class, path, max_per_class=20):
        if self.args.method != 'whole':
            super().save_grid(images, per_class, path, max_per_class)

    def write_outputs(self, synset):
        if self.args.method == 'whole':
            self.write_results()
        else:
            super().write_outputs(synset)


class WholeSet:
    """The whole training set as Run sees a synthetic set (nothing of it is saved: it is the dataset)."""
    rank = None

    def __init__(self, images, labels, num_classes):
        self.pixels, self.labels = images, labels
        counts = torch.bincount(labels, minlength=num_classes)
        self.n, self.fewest = int(counts.max()), int(counts.min())

    def images(self):
        return self.pixels

    def stored_floats(self):
        return self.pixels.numel()

    budget_floats = stored_floats

    def describe(self):
        return f'the whole training set: {len(self.pixels)} images, {self.fewest} to {self.n} per class'


def training_pool(args, data, sampler):
    """The training images and labels to choose from, on the run's device: all, or the first --train_images."""
    n = args.train_images or len(sampler.images)
    return sampler.images[:n], data.labels_train[:n].to(sampler.images.device)


def extractor_for(args, run, exp, data, images, labels):
    """The extractor of experiment exp: cached if made before with the same settings, else trained now."""
    settings = extractor_settings(args.dataset, args.extractor_model, args.seed + exp, len(images),
                                  args.extractor_epochs)
    path = args.extractor or cache_file(f'{args.save_path}/{args.dataset}/extractors', settings)
    ext = get_extractor(path, images, labels, data.num_classes, settings, (data.images_test, data.labels_test),
                        run.log)
    acc = 'not measured' if ext.test_acc is None else f'{100 * ext.test_acc:.2f}% on {ext.test_images} test images'
    run.log(f'exp {exp}: extractor {"reused" if ext.reused else "trained"}: {settings["model"]}, '
            f'{settings["epochs"]} epochs on {len(images)} images, seed {settings["seed"]}, trained in '
            f'{ext.seconds:.0f} s, test accuracy {acc} ({ext.path})')
    run.results.setdefault('extractors', {})[str(exp)] = {
        'file': str(ext.path), 'reused': ext.reused, 'seconds': ext.seconds, 'test_acc': ext.test_acc,
        'test_images': ext.test_images, 'settings': settings}
    return ext


def choose(args, run, exp, data, images, labels):
    """Indices (num_classes·ipc,) into the pool, class-major."""
    k, ipc = data.num_classes, args.ipc
    if args.method == 'random':
        return select_random(labels, k, ipc)
    ext = extractor_for(args, run, exp, data, images, labels)
    if args.method == 'herding':
        return select_herding(ext.net, images, labels, k, ipc)
    if args.method == 'kcenter':
        return select_kcenter(ext.net, images, labels, k, ipc)
    return select_forgetting(ext.forgetting, labels, k, ipc, ext.settings['seed'])


def run_coreset(args, run, data, images, labels):
    for exp in run.experiments():
        # Built before the draw, as make_synset does: random then takes the images --init real would.
        synset = SyntheticSet(data.num_classes, args.ipc, data.channel, data.im_size).to(images.device)
        index = choose(args, run, exp, data, images, labels)
        synset.init_real(images[index])
        save_json(run.dir / f'indices_exp{exp}.json', index.tolist())  # the chosen training images
        run.start(data, synset)
        for _ in run.iterations(exp, synset, {}):  # Iteration 0: evaluates once and saves res_*.pt
            pass


def run_whole(args, run, data, images, labels):
    whole = WholeSet(images, labels, data.num_classes)
    for exp in run.experiments():
        run.start(data, whole)
        run.evaluate(exp, 0, whole, args.lr_net)
        run.saved.append({'exp': exp})  # the experiment is complete (the set is the dataset: not saved)
        run.checkpoint(exp + 1, 0, None)


def main(argv=None):
    args = get_args(argv)
    data, sampler = load_data(args)
    images, labels = training_pool(args, data, sampler)
    if args.method == 'whole':
        args.ipc = int(torch.bincount(labels).max())  # the run folder is Whole_ipc<largest class>
    else:
        for c in range(data.num_classes):  # enough images in every class, before the run folder is made
            class_members(labels, c, args.ipc)
    estimate = check_memory(METHODS[args.method], args, data)
    run = CoresetRun(args, METHODS[args.method])
    run.log(f'estimated peak memory: {estimate.total / 2**30:.1f} GiB')
    (run_whole if args.method == 'whole' else run_coreset)(args, run, data, images, labels)
    run.finish()


if __name__ == '__main__':
    run_main(main)
