"""What every condensation script shares: the command line, configs, the run folder, logging, evaluation
points, checkpoints and --resume, results.json, the res_*.pt file and image grids.

A run lives in <save_path>/<dataset>/<method>_ipc<ipc>[_r<rank>]/<run name>/ and holds args.json, log.txt,
results.json, res_<method>_<dataset>_<model>_<n>ipc.pt (the original's format), factors_*.pt (low rank:
what is actually stored), grid_exp<e>_it<i>.png and checkpoint.pt. Under torchrun (utils/distributed.py)
process r > 0 adds log_rank<r>.txt and checkpoint_rank<r>.pt, and process 0 alone writes the results.
"""
import argparse
import contextlib
import copy
import ctypes
import io
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from networks import NETWORK_NAMES
from utils import Diverged, UserError, distributed, seed_for
from utils.augmentation import check_strategy, get_daparam
from utils.data import DATASETS, ClassSampler, denormalize, load_dataset
from utils.evaluate import EVAL_MODES, eval_recipe, evaluate_pool, get_eval_pool, network_blocks
from utils.synset import images_per_class

# Arguments that may be given anew when a run is resumed: they do not change what the run computes.
NOT_SETTINGS = {'resume', 'device', 'data_path', 'save_path', 'config', 'run_name'}


def make_parser(description, defaults, low_rank):
    """The arguments of a condensation script; `defaults` holds the method's own defaults (the original's)."""
    p = base_parser(description)
    add_set_args(p, low_rank)
    p.add_argument('--eval_mode', choices=EVAL_MODES, help='evaluation architectures (S: the model, M: six '
                   'architectures, ...; see utils/evaluate.py)')
    p.add_argument('--eval_every', '--eval_it', type=int,
                   help='evaluate every this many iterations (S/SS modes) and at the end (--eval_it: MTT\'s name)')
    p.add_argument('--num_exp', type=int, default=5, help='independent experiments')
    p.add_argument('--checkpoint_every', type=int, default=500, help='iterations between checkpoints')
    p.set_defaults(num_eval=20, **defaults)
    return p


def base_parser(description):
    """The arguments every script shares: data, model, evaluation protocol, run folder, seed, device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', help='JSON file of argument values (keys are argument names); flags override it')
    p.add_argument('--dataset', help=f'one of {", ".join(DATASETS)}')
    p.add_argument('--model', default='ConvNet', help='network used for condensation (see networks.py)')
    p.add_argument('--num_eval', type=int, help='fresh networks trained per evaluation')
    p.add_argument('--epoch_eval_train', type=int, default=None,
                   help="epochs per evaluation network (default: the original's rule for the method)")
    p.add_argument('--lr_net', type=float, default=0.01, help='learning rate of the evaluation networks')
    p.add_argument('--batch_train', type=int, default=256, help='batch size when training networks')
    p.add_argument('--train_together', type=int, default=None,
                   help='evaluation networks trained at once (default: measured per device type)')
    p.add_argument('--dsa_strategy',
                   help="DSA ops joined by '_' (color, crop, cutout, flip, scale, rotate) or 'none'; "
                        "default: the method's original one")
    p.add_argument('--data_path', default='data', help='folder of the datasets')
    p.add_argument('--test_images', type=int, default=None,
                   help='evaluate on the first N test images only (quick looks; default: the whole test set)')
    p.add_argument('--save_path', default='result', help='folder of the runs')
    p.add_argument('--run_name', default=None, help='name of the run folder (default: date, time and seed)')
    p.add_argument('--seed', type=int, default=0, help='random seed (a CPU run repeats exactly)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    p.add_argument('--deterministic', action='store_true',
                   help="PyTorch's deterministic algorithms (CUDA runs repeat exactly; CPU runs always do)")
    p.add_argument('--resume', metavar='RUN_DIR', help='continue the run saved in RUN_DIR')
    return p


def add_set_args(p, low_rank):
    """The synthetic set and how it is learned."""
    p.add_argument('--ipc', type=int, help='images per class; for low rank, the memory budget in full images')
    if low_rank:
        p.add_argument('--rank', type=int, default=2, help='rank r of each channel A·B (H×r times r×W)')
    p.add_argument('--init', choices=['noise', 'real'], default='noise',
                   help='noise: N(0,1); real: real images (low rank: their rank-r truncated SVD)')
    p.add_argument('--Iteration', type=int, help='condensation iterations')
    p.add_argument('--lr_img', type=float, help='learning rate of the synthetic set (SGD, momentum 0.5)')
    p.add_argument('--batch_real', type=int, default=256, help='real images per class per iteration')


def str_to_bool(value):
    """True/False as the original MTT passed them ('True', 'False'; also 1/0, yes/no)."""
    v = str(value).lower()
    if v in ('true', '1', 'yes'):
        return True
    if v in ('false', '0', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def add_original_mtt_flags(p):
    """Flags of the original MTT scripts (distill.py, buffer.py) that have no setting of their own here,
    so that their command lines run unchanged."""
    g = p.add_argument_group("the original MTT's flags")
    g.add_argument('--dsa', type=str_to_bool, default=True, help="'False' turns DSA off (--dsa_strategy none)")
    g.add_argument('--subset', help='ImageNet subset (ImageNet is not supported here); ignored')
    g.add_argument('--res', type=int, help='ImageNet resolution; ignored')
    g.add_argument('--lr_init', type=float, help='unused (as in the original)')
    g.add_argument('--force_save', action='store_true', help='ignored: every set is saved')
    g.add_argument('--texture', action='store_true', help='texture distillation: not supported')
    g.add_argument('--canvas_size', type=int, help='texture distillation; ignored')
    g.add_argument('--canvas_samples', type=int, help='texture distillation; ignored')


def apply_original_mtt_flags(args):
    if args.texture:
        raise UserError('--texture (MTT texture distillation) is not supported by this repository; drop it.')
    if not args.dsa:
        args.dsa_strategy = 'none'


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
    where = {k: v for k, v in vars(given).items() if k in NOT_SETTINGS}  # e.g. another --data_path or --device
    return argparse.Namespace(**{**saved, **where, 'config': None, 'resume': args.resume})


def finish_args(args):
    """Validate the arguments and derive dsa, device and the evaluation points."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}'; choose one of: {', '.join(DATASETS)}.")
    if args.model not in NETWORK_NAMES:
        raise UserError(f"unknown model '{args.model}'; choose one of: {', '.join(NETWORK_NAMES)}.")
    if args.test_images is not None and args.test_images < 1:
        raise UserError(f'--test_images must be at least 1 (got {args.test_images}).')
    for name in ('ipc', 'num_exp', 'num_eval', 'batch_real', 'batch_train', 'train_together', 'eval_every',
                 'checkpoint_every'):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be at least 1 (got {value}).')
    if getattr(args, 'Iteration', 0) < 0:
        raise UserError(f'--Iteration must be 0 or more (got {args.Iteration}).')
    check_rates(args, *[name for name in ('lr_img', 'lr_net') if hasattr(args, name)])
    check_strategy(args.dsa_strategy)
    args.dsa = args.dsa_strategy not in ('', 'none', 'None')
    args.device = distributed.local_device(resolve_device(args.device))
    if args.deterministic:
        make_deterministic()
    if not args.resume:
        check_writable(args.save_path, 'save_path')
    distributed.init(args.device)
    return args


def check_rates(args, *names):
    """Learning rates must be finite and positive."""
    for name in names:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f'--{name} must be a finite positive number (got {value}).')


def check_writable(folder, flag):
    """A UserError, before any work, if `folder` cannot be created and written (e.g. a read-only mount,
    /proc, or a file in the way)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f'{existing} is a file')
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as e:
        raise UserError(f'--{flag} {folder} cannot be written ({e.strerror or e}): give a folder you can '
                        f'write to.') from None


def make_deterministic():
    """PyTorch's deterministic algorithms: CUDA runs repeat exactly (grid_sample backward and index_add
    are otherwise nondeterministic there), at some cost in speed."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


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
    """Write through a temporary file of this process and rename it, so a killed run never leaves half a
    file and processes writing the same file never mix their writes."""
    tmp = Path(f'{path}.{os.getpid()}.tmp')
    write(tmp)
    os.replace(tmp, path)


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=2))


def save_text(path, text):
    atomic_write(path, lambda p: p.write_text(text))


def save_torch(path, obj):
    """torch.save through memory: the file's bytes do not depend on the temporary file's name (torch.save
    names its archive after the file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))


def rng_state(device):
    """The CPU random state and that of the run's device (not of every visible GPU)."""
    state = {'torch': torch.get_rng_state()}
    if torch.device(device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if torch.device(device).type == 'cuda' and 'cuda' in state:  # a CPU run resumed on a GPU has none
        torch.cuda.set_rng_state(state['cuda'], device)


def peak_memory(device):
    """Peak memory so far, in MiB: allocated on a CUDA device, resident set size on the CPU."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_std(accs):
    n = len(accs)
    mean = sum(accs) / n
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / n)


class RunFolder:
    """A run's folder, <save_path>/<dataset>/<tag>/<run name>/ (made by process 0, with args.json), its log
    and its checkpoint; --resume reopens it and loads the checkpoint."""

    def __init__(self, args, tag):
        self.args = args
        self.rank = distributed.rank()
        self.dir = Path(args.resume) if args.resume else distributed.broadcast(self._new_folder(tag))
        suffix = f'_rank{self.rank}' if self.rank else ''
        self.ckpt_path = self.dir / f'checkpoint{suffix}.pt'
        self.ckpt = self._load_checkpoint() if args.resume else None
        self.log_file = open(self.dir / f'log{suffix}.txt', 'a')
        self.log(('Resuming ' if args.resume else 'Run ') + f'{self.dir} on {args.device}')
        self.log('Arguments: ' + json.dumps(vars(args), sort_keys=True))

    def _new_folder(self, tag):
        """Process 0 makes the folder and writes args.json; the others get None."""
        if distributed.rank() != 0:
            return None
        args = self.args
        name = args.run_name or f'{time.strftime("%Y%m%d-%H%M%S")}_seed{args.seed}'
        folder = Path(args.save_path) / args.dataset / tag / name
        if folder.exists():
            raise UserError(f'{folder} already exists: choose another --run_name, or --resume it.')
        folder.mkdir(parents=True)
        save_json(folder / 'args.json', {k: v for k, v in vars(args).items() if k not in ('resume', 'config')})
        return folder

    def _load_checkpoint(self):
        path = self.ckpt_path
        if not path.exists():
            raise UserError(f'{path} does not exist: the run stopped before its first checkpoint, or it ran on '
                            f'another number of processes; start it anew or resume with the same torchrun.')
        try:
            return torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e:
            raise UserError(f'{path} cannot be read ({e}); delete it and start the run anew.') from None

    def log(self, msg):
        if self.rank == 0:
            tqdm.write(msg)
        self.log_file.write(f'{time.strftime("%H:%M:%S")} {msg}\n')
        self.log_file.flush()


class Run(RunFolder):
    """The run folder of one condensation run; also drives the experiment and iteration loops.

    Experiment e runs from its own seed (seed_for(--seed, 'exp', e)) and evaluation network k of model m at
    iteration it from seed_for(--seed, 'eval', e, it, m, k), so no result depends on the order of the work
    or on how it is split over processes.
    """

    def __init__(self, args, method, show=None, report_best=False, hint='lower --lr_img', split=None):
        """split: (units, what) the members of a team share; by default the blocks of evaluation networks."""
        self.method = method
        self.show = show  # maps synthetic images to [0, 1] pixels for the grids
        self.report_best = report_best  # also report the best evaluation point (MTT's number; see best())
        self.hint = hint  # what to change when the loss diverges
        self.eval_its = eval_iterations(args)
        self.team = distributed.make_team(args.num_exp)
        units, what = split or (len(network_blocks(args)), 'block(s) of evaluation networks (--train_together)')
        if self.team.size > units:
            raise UserError(f'{self.team.size} processes share each experiment but it has only {units} {what} to '
                            f'split: start fewer processes (torchrun --nproc_per_node) or run more --num_exp.')
        rank = getattr(args, 'rank', None)
        super().__init__(args, f'{method}_ipc{args.ipc}' + (f'_r{rank}' if rank else ''))
        self.results = self.ckpt['results'] if self.ckpt else {'evaluations': []}
        self.saved = self.ckpt['saved'] if self.ckpt else []

    def file(self, kind, n):
        a = self.args
        return self.dir / f'{kind}_{self.method}_{a.dataset}_{a.model}_{n}ipc.pt'

    def experiments(self):
        """This team's experiment indices still to run, each starting from its own seed (a resumed one
        continues from the random state where it stopped: see iterations)."""
        first = self.ckpt['exp'] if self.ckpt else 0
        for exp in self.team.experiments(self.args.num_exp):
            if exp >= first:
                torch.manual_seed(seed_for(self.args.seed, 'exp', exp))
                yield exp

    def iterations(self, exp, synset, state, eval_lr=None, own_classes=None):
        """Yield the iterations of experiment `exp`, evaluating at the evaluation points (the last one
        gives the reported accuracy) and checkpointing `state` ({name: object with state_dict}).
        own_classes: the classes this process condenses when the team splits them (DM); the members'
        rows are merged before every evaluation and at the end.

        The set is evaluated after `it` updates; the final set, after Iteration updates, is what is saved.
        """
        args = self.args
        start = 0
        if self.ckpt and self.ckpt['exp'] == exp and self.ckpt.get('state'):
            for name, obj in state.items():
                obj.load_state_dict(self.ckpt['state'][name])
            set_rng_state(self.ckpt['rng'], args.device)
            start = self.ckpt['it']
        self.ckpt = None
        bar = tqdm(range(start, args.Iteration + 1), initial=start, total=args.Iteration + 1,
                   desc=f'exp {exp}', dynamic_ncols=True, disable=self.rank != 0)
        for it in bar:
            if it in self.eval_its:
                if own_classes is not None:
                    self.team.merge_rows(synset, own_classes)
                self.evaluate(exp, it, synset, args.lr_net if eval_lr is None else eval_lr())
            if it == args.Iteration:
                break
            yield it
            if it == start:
                self.log(f'peak memory after the first iteration: {peak_memory(args.device):.0f} MiB')
            if (it + 1) % args.checkpoint_every == 0:
                self.checkpoint(exp, it + 1, state)
        bar.close()
        if self.team.leader:
            self.saved.append({'exp': exp, 'images': synset.images().detach().cpu(),
                               'labels': synset.labels.cpu(), 'factors': synset.factors()})
            self.write_outputs(synset)
        self.checkpoint(exp + 1, 0, None)

    @contextlib.contextmanager
    def guard(self, exp, it, synset, extra=None):
        """On Diverged (a non-finite loss, ...) inside the block: save the synthetic set as it is, with
        extra() if given, to stopped_exp<e>_it<i>.pt and a grid, and stop with the iteration and a hint."""
        try:
            yield
        except Diverged as err:
            images = synset.images().detach()
            saved = {'iteration': it, 'images': images.cpu(), 'labels': synset.labels.cpu(),
                     'factors': synset.factors(), **(extra() if extra else {})}
            if self.show:
                saved['pixels'] = self.show(images).cpu()
            path = self.dir / f'stopped_exp{exp}_it{it}.pt'
            if self.team.leader:
                save_torch(path, saved)
                self.save_grid(images, synset.n, self.dir / f'grid_exp{exp}_stopped_it{it}.png')
            msg = (f'condensation diverged at iteration {it} ({err}) in experiment {exp}: {self.hint}. '
                   f'The synthetic set at that point is in {path}.')
            self.log(f'stopped: {msg}')
            raise UserError(msg) from None

    def log_loss(self, it, loss):
        if it % 10 == 0:
            self.log(f'iter {it:6d}  loss {loss:.4f}')

    def evaluate(self, exp, it, synset, lr):
        images = synset.images().detach()
        accs = evaluate_pool(self.args, self.data, images, synset.labels, lr, (exp, it), desc=f'exp {exp} it {it}',
                             log=self.log, team=self.team)
        self.log(f'peak memory after evaluation: {peak_memory(self.args.device):.0f} MiB')
        if not self.team.leader:
            return
        for model_eval, a in accs.items():
            mean, std = mean_std(a)
            self.log(f'exp {exp} iter {it}: {model_eval} test acc {100 * mean:.2f} ± {100 * std:.2f} '
                     f'over {len(a)} networks')
            self.results['evaluations'].append({'exp': exp, 'iteration': it, 'model': model_eval,
                                                'accs': a, 'mean': mean, 'std': std})
        self.save_grid(images, synset.n, self.dir / f'grid_exp{exp}_it{it}.png')
        self.write_results()

    def save_grid(self, images, per_class, path, max_per_class=20):
        """One row per class (at most `max_per_class` images of each)."""
        shown = min(per_class, max_per_class)
        x = images.reshape(-1, per_class, *images.shape[1:])[:, :shown].flatten(0, 1)
        x = self.show(x) if self.show else denormalize(x, self.data.mean, self.data.std)
        atomic_write(path, lambda p: torchvision.utils.save_image(x.clamp(0, 1).cpu(), p, nrow=shown, format='png'))

    def final(self):
        """{model: {'accs': [per experiment: the accuracies at the last iteration], 'mean', 'std'}}."""
        out = {}
        for e in self.results['evaluations']:
            if e['iteration'] == self.args.Iteration:
                out.setdefault(e['model'], {'accs': []})['accs'].append(e['accs'])
        for entry in out.values():
            entry['mean'], entry['std'] = mean_std([a for exp_accs in entry['accs'] for a in exp_accs])
        return out

    def write_results(self):
        """results.json (process 0 only; under torchrun it holds process 0's experiments until the end)."""
        if self.rank != 0:
            return
        best = {'best_over_evaluations': self.best()} if self.report_best else {}
        save_json(self.dir / 'results.json', {'method': self.method, **self.summary, **self.results,
                                             'final': self.final(), **best,
                                             'complete': len(self.saved) == self.args.num_exp})

    def best(self):
        """{model: ...} the best mean accuracy over the evaluation points of each experiment (the number the
        original MTT reports; it selects on the test set) with two spreads: the std over experiments of
        those means, and the std over the networks evaluated at the best points (the original's ±)."""
        out = {}
        for e in self.results['evaluations']:
            per_exp = out.setdefault(e['model'], {'selected_on': 'test set (optimistic; the original MTT '
                                                                'reports this)', 'per_exp': {}})['per_exp']
            if str(e['exp']) not in per_exp or e['mean'] > per_exp[str(e['exp'])]['mean']:
                per_exp[str(e['exp'])] = {'iteration': e['iteration'], 'mean': e['mean'], 'accs': e['accs']}
        for entry in out.values():
            best = entry['per_exp'].values()
            entry['mean'], entry['std_over_experiments'] = mean_std([b['mean'] for b in best])
            entry['std_over_networks'] = mean_std([a for b in best for a in b['accs']])[1]
        return out

    def write_outputs(self, synset):
        """The original's res_*.pt ({'data': [[images, labels], ...], 'accs_all_exps': ...}) and, for low
        rank, the factors that are actually stored (process 0 only)."""
        if self.rank != 0:
            return
        accs = {m: [a for exp_accs in e['accs'] for a in exp_accs] for m, e in self.final().items()}
        data = [[s['images'], s['labels']] for s in self.saved]
        save_torch(self.file('res', synset.n), {'data': data, 'accs_all_exps': accs})
        if synset.rank is not None:
            save_torch(self.file('factors', synset.n), {
                'rank': synset.rank, 'ipc': synset.ipc, 'images_per_class': synset.n,
                'data': [[s['factors']['a'], s['factors']['b'], s['labels']] for s in self.saved]})
        self.write_results()

    def checkpoint(self, exp, it, state):
        save_torch(self.ckpt_path, {
            'exp': exp, 'it': it, 'rng': rng_state(self.args.device), 'results': self.results,
            'saved': self.saved, 'state': {name: obj.state_dict() for name, obj in state.items()} if state else None})

    def start(self, data, synset, lr=None):
        """Remember the data and print what the synthetic set stores against the pixel budget; `lr`: the
        evaluation networks' learning rate when it is not the run's own (main_eval.py)."""
        self.data, self.synset = data, synset
        self.summary = {'dataset': self.args.dataset, 'model': self.args.model, 'ipc': self.args.ipc,
                        'rank': synset.rank, 'images_per_class': synset.n,
                        'stored_floats': synset.stored_floats(), 'budget_floats': synset.budget_floats(),
                        'protocol': {m: eval_protocol(self.args, m, lr)
                                     for m in get_eval_pool(self.args.eval_mode, self.args.model)}}
        self.log(synset.describe())

    def finish(self):
        """Gather every team's experiments on process 0, write the results and print the summary."""
        parts = distributed.gather_to_root((self.results, self.saved) if self.team.leader else None)
        if self.rank == 0:
            self.merge([part for part in parts if part is not None])
            self.write_outputs(self.synset)
            self.log('Final test accuracy (mean ± std over experiments × evaluation networks):')
            for model_eval, entry in self.final().items():
                n = sum(len(a) for a in entry['accs'])
                self.log(f'  {model_eval:12s} {100 * entry["mean"]:.2f} ± {100 * entry["std"]:.2f}  '
                         f'({n} networks)')
            if self.report_best:
                self.log('Best mean test accuracy over the evaluation points (selected on the test set, as the '
                         'original MTT reports; optimistic), mean ± std over the networks at those points:')
                for model_eval, entry in self.best().items():
                    its = ', '.join(str(b['iteration']) for b in entry['per_exp'].values())
                    self.log(f'  {model_eval:12s} {100 * entry["mean"]:.2f} ± '
                             f'{100 * entry["std_over_networks"]:.2f}  (at iteration {its})')
            self.log(f'Outputs in {self.dir}')
        self.log_file.close()

    def merge(self, parts):
        """Every team's results and saved sets, in experiment order (as one process would have them)."""
        pool = get_eval_pool(self.args.eval_mode, self.args.model)
        results = {'evaluations': []}
        for part_results, _ in parts:
            for key, value in part_results.items():
                if key == 'evaluations':
                    results[key] += value
                else:  # e.g. MTT's learned rates {exp: syn_lr}
                    results[key] = dict(sorted({**results.get(key, {}), **value}.items(), key=lambda kv: int(kv[0])))
        results['evaluations'].sort(key=lambda e: (e['exp'], e['iteration'], pool.index(e['model'])))
        self.results = results
        self.saved = sorted((s for _, saved in parts for s in saved), key=lambda s: s['exp'])


def eval_protocol(args, model_eval, lr=None):
    """How evaluation networks of `model_eval` are trained (at `lr` when given), for results.json."""
    if args.dsa:
        augmentation = f'DSA {args.dsa_strategy}'
    else:
        augmentation = f'DC {get_daparam(args.dataset, model_eval)["strategy"]}'
    standardize = getattr(args, 'standardize_eval', False)
    return {'augmentation': augmentation, 'epochs': eval_recipe(args, model_eval)[1],
            'lr': lr or ('learned syn_lr' if hasattr(args, 'lr_teacher') else args.lr_net), 'batch': args.batch_train,
            'standardize_batches': standardize, 'test_batch': 128 if standardize else 256}


def run_main(main, argv=None):
    """Run a script's main(argv); a UserError is printed as one line (by process 0 under torchrun) and exits
    with status 2 (on every process)."""
    try:
        main(argv)
    except UserError as e:
        if distributed.rank() == 0:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
