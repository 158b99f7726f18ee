"""What every condensation script shares: the command line, configs, the run folder, logging, evaluation
points, checkpoints and --resume, results.json, the res_*.pt file and image grids.

A run lives in <save_path>/<dataset>/<method>_ipc<ipc>[_r<rank>]/<run name>/ and holds args.json, log.txt,
results.json, res_<method>_<dataset>_<model>_<n>ipc.pt (the original's format), factors_*.pt (low rank:
what is actually stored), grid_exp<e>_it<i>.png and checkpoint.pt.
"""
import argparse
import copy
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from networks import NETWORK_NAMES
from utils import UserError
from utils.augment import check_strategy, default_dsa_strategy
from utils.data import DATASETS, ClassSampler, denormalize, load_dataset
from utils.evaluate import EVAL_MODES, evaluate_pool
from utils.synset import images_per_class

# Arguments that may be given anew when a run is resumed: they do not change what the run computes.
NOT_SETTINGS = {'resume', 'device', 'data_path', 'save_path', 'config', 'run_name'}


def make_parser(description, defaults, low_rank):
    """The arguments every method shares; `defaults` holds each method's own defaults (the original's)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', help='JSON file of argument values (keys are argument names); flags override it')
    p.add_argument('--dataset', help=f'one of {", ".join(DATASETS)}')
    p.add_argument('--model', default='ConvNet', help='network used for condensation (see networks.py)')
    p.add_argument('--ipc', type=int, help='images per class; for low rank, the memory budget in full images')
    if low_rank:
        p.add_argument('--rank', type=int, default=2, help='rank r of each channel A·B (H×r times r×W)')
    p.add_argument('--init', choices=['noise', 'real'], default='noise',
                   help='noise: N(0,1); real: real images (low rank: their rank-r truncated SVD)')
    p.add_argument('--eval_mode', choices=EVAL_MODES, help='evaluation architectures (S: the model, M: six '
                   'architectures, ...; see utils/evaluate.py)')
    p.add_argument('--eval_every', type=int, help='evaluate every this many iterations (S/SS modes) and at the end')
    p.add_argument('--num_exp', type=int, default=5, help='independent experiments')
    p.add_argument('--num_eval', type=int, default=20, help='fresh networks trained per evaluation')
    p.add_argument('--epoch_eval_train', type=int, default=None,
                   help="epochs per evaluation network (default: the original's rule for the method)")
    p.add_argument('--Iteration', type=int, help='condensation iterations')
    p.add_argument('--lr_img', type=float, help='learning rate of the synthetic set (SGD, momentum 0.5)')
    p.add_argument('--lr_net', type=float, default=0.01, help='learning rate of the evaluation networks')
    p.add_argument('--batch_real', type=int, default=256, help='real images per class per iteration')
    p.add_argument('--batch_train', type=int, default=256, help='batch size when training networks')
    p.add_argument('--dsa_strategy', default=None,
                   help="DSA ops joined by '_' (color, crop, cutout, flip, scale, rotate) or 'none'; "
                        'default: the recommended one for the dataset')
    p.add_argument('--data_path', default='data', help='folder of the datasets')
    p.add_argument('--test_images', type=int, default=None,
                   help='evaluate on the first N test images only (quick looks; default: the whole test set)')
    p.add_argument('--save_path', default='result', help='folder of the runs')
    p.add_argument('--run_name', default=None, help='name of the run folder (default: date, time and seed)')
    p.add_argument('--seed', type=int, default=0, help='random seed (a CPU run repeats exactly)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    p.add_argument('--checkpoint_every', type=int, default=500, help='iterations between checkpoints')
    p.add_argument('--resume', metavar='RUN_DIR', help='continue the run saved in RUN_DIR')
    p.set_defaults(**defaults)
    return p


def parse_args(parser, argv=None, prepare=None):
    """Parse with a --config file under the flags; with --resume, take the run's saved settings.
    prepare(args), if given, checks and derives a method's own arguments before the shared ones are."""
    argv = sys.argv[1:] if argv is None else argv
    known = {a.dest for a in parser._actions}
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        config = read_json(pre.config, 'config file')
        unknown = sorted(k for k in config if k not in known and not k.startswith('_'))
        if unknown:
            raise UserError(f'{pre.config}: unknown setting(s) {", ".join(unknown)}; '
                            f'valid ones are the arguments of --help.')
        parser.set_defaults(**{k: v for k, v in config.items() if not k.startswith('_')})
    args = parser.parse_args(argv)
    if args.resume:
        args = resumed_args(parser, argv, args)
    if prepare:
        prepare(args)
    return finish_args(args)


def resumed_args(parser, argv, args):
    """The saved settings of args.resume; flags given now must agree with them."""
    saved = read_json(Path(args.resume) / 'args.json', 'run folder')
    explicit = argparse.ArgumentParser(add_help=False)  # parses only the flags actually given
    for action in parser._actions:
        if action.option_strings and action.dest != 'help':
            action = copy.copy(action)
            action.default = argparse.SUPPRESS
            explicit._add_action(action)
    given, _ = explicit.parse_known_args(argv)
    if args.config:
        given = argparse.Namespace(**{**read_json(args.config, 'config file'), **vars(given)})
    differ = [k for k, v in vars(given).items() if k not in NOT_SETTINGS and k in saved and saved[k] != v]
    if differ:
        shown = ', '.join(f'--{k} {saved[k]} (not {getattr(given, k)})' for k in differ)
        raise UserError(f'{args.resume} was run with other settings: {shown}; resume without those flags '
                        f'or start a new run.')
    where = {k: v for k, v in vars(given).items() if k in NOT_SETTINGS}  # e.g. another --data_path
    return argparse.Namespace(**{**saved, 'device': 'auto', **where, 'config': None, 'resume': args.resume})


def finish_args(args):
    """Validate the arguments and derive dsa, device and the evaluation points."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}'; choose one of: {', '.join(DATASETS)}.")
    if args.model not in NETWORK_NAMES:
        raise UserError(f"unknown model '{args.model}'; choose one of: {', '.join(NETWORK_NAMES)}.")
    if args.test_images is not None and args.test_images < 1:
        raise UserError(f'--test_images must be at least 1 (got {args.test_images}).')
    for name in ('ipc', 'num_exp', 'num_eval', 'batch_real', 'batch_train', 'eval_every', 'checkpoint_every'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be at least 1 (got {getattr(args, name)}).')
    if args.Iteration < 0:
        raise UserError(f'--Iteration must be 0 or more (got {args.Iteration}).')
    if args.dsa_strategy is None:
        args.dsa_strategy = default_dsa_strategy(args.dataset)
    check_strategy(args.dsa_strategy)
    args.dsa = args.dsa_strategy not in ('', 'none', 'None')
    args.device = resolve_device(args.device)
    return args


def resolve_device(device):
    """'auto' is CUDA when present, else the CPU; asking for CUDA without a GPU is a UserError."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {device} was asked for but no CUDA GPU is available; use --device cpu.')
    return device


def keep_freed_memory():
    """glibc malloc: serve large blocks from the heap and keep freed memory for reuse. By default every
    tensor over 32 MB is a fresh mmap, and touching its new pages costs a page fault each: on our 2-core
    VMs that made a DC iteration (MNIST, ipc 1) 1.5x slower. No effect where libc is not glibc."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-4, 0)          # M_MMAP_MAX: no mmapped blocks
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB of free memory at the heap's top


def read_data(args):
    """The dataset of args; also checks --ipc/--rank against its image size, so bad input stops before
    anything is written."""
    keep_freed_memory()
    data = load_dataset(args.dataset, args.data_path)
    images_per_class(args.ipc, getattr(args, 'rank', None), data.im_size)
    return data


def place_data(args, data, sampler_device):
    """The test split (the first --test_images) on the run's device; the real training images grouped by
    class on `sampler_device`."""
    device = torch.device(args.device)
    n = args.test_images or len(data.images_test)
    data.images_test, data.labels_test = data.images_test[:n].to(device), data.labels_test[:n].to(device)
    return ClassSampler(data.images_train.to(sampler_device), data.labels_train.to(sampler_device),
                        data.num_classes)


def load_data(args):
    """(data, sampler) with everything on the run's device."""
    data = read_data(args)
    return data, place_data(args, data, args.device)


def eval_iterations(args):
    if args.eval_mode in ('S', 'SS'):
        return sorted(set(range(0, args.Iteration + 1, args.eval_every)) | {args.Iteration})
    return [args.Iteration]


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f'{path} does not exist: give the path of an existing {what}.') from None
    except json.JSONDecodeError as e:
        raise UserError(f'{path} is not valid JSON ({e}); fix or replace it.') from None


def atomic_write(path, write):
    """Write through a temporary file and rename it, so a killed run never leaves half a file."""
    tmp = Path(f'{path}.tmp')
    write(tmp)
    os.replace(tmp, path)


def save_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def save_torch(path, obj):
    atomic_write(path, lambda p: torch.save(obj, p))


def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def mean_std(accs):
    n = len(accs)
    mean = sum(accs) / n
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / n)


class Run:
    """The run folder of one invocation; also drives the experiment and iteration loops."""

    def __init__(self, args, method, show=None, report_best=False):
        self.args, self.method = args, method
        self.show = show  # maps synthetic images to [0, 1] pixels for the grids
        self.report_best = report_best  # also report the best evaluation point (MTT's number; see best())
        self.eval_its = eval_iterations(args)
        rank = getattr(args, 'rank', None)
        tag = f'{method}_ipc{args.ipc}' + (f'_r{rank}' if rank else '')
        if args.resume:
            self.dir = Path(args.resume)
            self.ckpt = self._load_checkpoint()
        else:
            name = args.run_name or f'{time.strftime("%Y%m%d-%H%M%S")}_seed{args.seed}'
            self.dir = Path(args.save_path) / args.dataset / tag / name
            if self.dir.exists():
                raise UserError(f'{self.dir} already exists: choose another --run_name, or --resume it.')
            self.dir.mkdir(parents=True)
            save_json(self.dir / 'args.json', {k: v for k, v in vars(args).items() if k not in ('resume', 'config')})
            self.ckpt = None
        self.log_file = open(self.dir / 'log.txt', 'a')
        self.results = self.ckpt['results'] if self.ckpt else {'evaluations': [], 'final': {}}
        self.saved = self.ckpt['saved'] if self.ckpt else []
        torch.manual_seed(args.seed)
        self.log(('Resuming ' if args.resume else 'Run ') + f'{self.dir} on {args.device}')
        self.log('Arguments: ' + json.dumps(vars(args), sort_keys=True))

    def _load_checkpoint(self):
        path = self.dir / 'checkpoint.pt'
        if not path.exists():
            raise UserError(f'{path} does not exist: the run stopped before its first checkpoint; start it anew.')
        try:
            return torch.load(path, weights_only=False)
        except Exception as e:
            raise UserError(f'{path} cannot be read ({e}); delete it and start the run anew.') from None

    def log(self, msg):
        tqdm.write(msg)
        self.log_file.write(f'{time.strftime("%H:%M:%S")} {msg}\n')
        self.log_file.flush()

    def file(self, kind, n):
        a = self.args
        return self.dir / f'{kind}_{self.method}_{a.dataset}_{a.model}_{n}ipc.pt'

    def experiments(self):
        """Experiment indices still to run; restores the random state where a resumed run stopped."""
        first = self.ckpt['exp'] if self.ckpt else 0
        for exp in range(first, self.args.num_exp):
            if self.ckpt and self.ckpt['exp'] == exp:
                set_rng_state(self.ckpt['rng'])
            yield exp

    def iterations(self, exp, synset, state, eval_lr=None):
        """Yield the iterations of experiment `exp`, evaluating at the evaluation points (the last one
        gives the reported accuracy) and checkpointing `state` ({name: object with state_dict}).

        The set is evaluated after `it` updates; the final set, after Iteration updates, is what is saved.
        """
        args = self.args
        start = 0
        if self.ckpt and self.ckpt['exp'] == exp and self.ckpt.get('state'):
            for name, obj in state.items():
                obj.load_state_dict(self.ckpt['state'][name])
            set_rng_state(self.ckpt['rng'])
            start = self.ckpt['it']
        self.ckpt = None
        bar = tqdm(range(start, args.Iteration + 1), initial=start, total=args.Iteration + 1,
                   desc=f'exp {exp}', dynamic_ncols=True)
        for it in bar:
            if it in self.eval_its:
                self.evaluate(exp, it, synset, args.lr_net if eval_lr is None else eval_lr())
            if it == args.Iteration:
                break
            yield it
            if (it + 1) % args.checkpoint_every == 0:
                self.checkpoint(exp, it + 1, state)
        bar.close()
        self.saved.append({'images': synset.images().detach().cpu(), 'labels': synset.labels.cpu(),
                           'factors': synset.factors()})
        self.write_outputs(synset)
        self.checkpoint(exp + 1, 0, None)

    def log_loss(self, it, loss):
        if it % 10 == 0:
            self.log(f'iter {it:6d}  loss {loss:.4f}')

    def evaluate(self, exp, it, synset, lr):
        images = synset.images().detach()
        accs = evaluate_pool(self.args, self.data, images, synset.labels, lr, desc=f'exp {exp} it {it}')
        for model_eval, a in accs.items():
            mean, std = mean_std(a)
            self.log(f'exp {exp} iter {it}: {model_eval} test acc {100 * mean:.2f} ± {100 * std:.2f} '
                     f'over {len(a)} networks')
            self.results['evaluations'].append({'exp': exp, 'iteration': it, 'model': model_eval,
                                                'accs': a, 'mean': mean, 'std': std})
            if it == self.args.Iteration:
                self.results['final'].setdefault(model_eval, {'accs': []})['accs'].append(a)
        self.save_grid(images, synset.n, self.dir / f'grid_exp{exp}_it{it}.png')
        self.write_results()

    def save_grid(self, images, per_class, path, max_per_class=20):
        """One row per class (at most `max_per_class` images of each)."""
        shown = min(per_class, max_per_class)
        x = images.reshape(-1, per_class, *images.shape[1:])[:, :shown].flatten(0, 1)
        x = self.show(x) if self.show else denormalize(x, self.data.mean, self.data.std)
        atomic_write(path, lambda p: torchvision.utils.save_image(x.clamp(0, 1).cpu(), p, nrow=shown, format='png'))

    def write_results(self):
        final = self.results['final']
        for model_eval, entry in final.items():
            flat = [a for exp_accs in entry['accs'] for a in exp_accs]
            entry['mean'], entry['std'] = mean_std(flat)
        best = {'best_over_evaluations': self.best()} if self.report_best else {}
        save_json(self.dir / 'results.json', {'method': self.method, **self.summary, **self.results, **best,
                                             'complete': len(self.saved) == self.args.num_exp})

    def best(self):
        """{model: ...} the best mean accuracy over the evaluation points of each experiment, and mean ± std
        of those over experiments. The original MTT reports this number; it selects on the test set."""
        out = {}
        for e in self.results['evaluations']:
            per_exp = out.setdefault(e['model'], {'selected_on': 'test set (optimistic; the original MTT '
                                                                'reports this)', 'per_exp': {}})['per_exp']
            if str(e['exp']) not in per_exp or e['mean'] > per_exp[str(e['exp'])]['mean']:
                per_exp[str(e['exp'])] = {'iteration': e['iteration'], 'mean': e['mean']}
        for entry in out.values():
            entry['mean'], entry['std'] = mean_std([b['mean'] for b in entry['per_exp'].values()])
        return out

    def write_outputs(self, synset):
        """The original's res_*.pt ({'data': [[images, labels], ...], 'accs_all_exps': ...}) and, for low
        rank, the factors that are actually stored."""
        accs = {m: [a for exp_accs in e['accs'] for a in exp_accs] for m, e in self.results['final'].items()}
        data = [[s['images'], s['labels']] for s in self.saved]
        save_torch(self.file('res', synset.n), {'data': data, 'accs_all_exps': accs})
        if synset.rank is not None:
            save_torch(self.file('factors', synset.n), {
                'rank': synset.rank, 'ipc': synset.ipc, 'images_per_class': synset.n,
                'data': [[s['factors']['a'], s['factors']['b'], s['labels']] for s in self.saved]})
        self.write_results()

    def checkpoint(self, exp, it, state):
        save_torch(self.dir / 'checkpoint.pt', {
            'exp': exp, 'it': it, 'rng': rng_state(), 'results': self.results, 'saved': self.saved,
            'state': {name: obj.state_dict() for name, obj in state.items()} if state else None})

    def start(self, data, synset):
        """Remember the data and print what the synthetic set stores against the pixel budget."""
        self.data = data
        self.summary = {'dataset': self.args.dataset, 'model': self.args.model, 'ipc': self.args.ipc,
                        'rank': synset.rank, 'images_per_class': synset.n,
                        'stored_floats': synset.stored_floats(), 'budget_floats': synset.budget_floats()}
        self.log(synset.describe())

    def finish(self):
        self.write_results()
        self.log('Final test accuracy (mean ± std over experiments × evaluation networks):')
        for model_eval, entry in self.results['final'].items():
            n = sum(len(a) for a in entry['accs'])
            self.log(f'  {model_eval:12s} {100 * entry["mean"]:.2f} ± {100 * entry["std"]:.2f}  ({n} networks)')
        if self.report_best:
            self.log('Best mean test accuracy over the evaluation points (selected on the test set, as the '
                     'original MTT reports; optimistic), mean ± std over experiments:')
            for model_eval, entry in self.best().items():
                its = ', '.join(str(b['iteration']) for b in entry['per_exp'].values())
                self.log(f'  {model_eval:12s} {100 * entry["mean"]:.2f} ± {100 * entry["std"]:.2f}  '
                         f'(at iteration {its})')
        self.log(f'Outputs in {self.dir}')
        self.log_file.close()


def run_main(main, argv=None):
    """Run a script's main(argv); a UserError is printed as one line and exits with status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
