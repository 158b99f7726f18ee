"""The peak device memory of a condensation run, estimated from the shapes before the run starts.

The estimate is what stays on the device for the whole run (the real images there, the synthetic set with
its gradient and momentum, the condensation network, MTT's two expert snapshots) plus the larger of two
phases: an iteration and an evaluation. Both follow the code:

- DM (utils/distribution.py): one block of classes at a time: its real images (no graph; embedded in
  passes of REAL_CHUNK images) and then its synthetic images (forward and backward). Blocks of
  REAL_CHUNK[device] // batch_real classes; one block of every class for batch-norm networks.
- DC (utils/matching.py): one real batch of every class, and every class's double-backward graph of the
  synthetic gradient, kept until the backward of the summed distance; one class's real gradient at a time.
- MTT (utils/trajectory.py): 'unrolled' keeps syn_steps student steps' double-backward graphs of batch_syn
  images; 'exact' and 'tesla' keep syn_steps + 1 parameter vectors and one step's graph.
- Coresets (utils/coreset.py): herding, kcenter and forgetting train an extractor and embed each class.
- Evaluation (utils/evaluate.py): the largest network of the evaluation pool trained on batch_train images,
  times the networks trained together (--train_together).

The memory of each pass is MEASURED once on the CPU from the network itself: the pass runs on 2 and 4
images while a dispatch mode counts the bytes of the tensor storages that are alive; the difference is the
cost per image, the rest the pass's fixed cost (e.g. parameter-sized gradients). Counting live storages
sees both what the graph keeps and the gradient buffers of the backward pass: saved-tensor hooks see only
the first, and a backward through an MTT step's graph adds about 60% of that graph. DSA adds, per
augmented image, the largest cost of its operations. The passes take 1-5 s of CPU at the first estimate
for a model and dataset (cached after that).

Left out: allocator rounding, fragmentation and caching (on CUDA, reserved exceeds allocated), cuDNN and
cuBLAS workspaces, the CUDA context, memory inside an operator, --compile, ZCA whitening before the run,
and MTT's expert files in CPU memory. MARGIN and OVERHEAD cover the device's share of them;
tests/test_memory.py compares the estimate with measured CPU peaks.
"""
import argparse
import dataclasses
import functools
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from networks import get_network
from utils import UserError
from utils.augmentation import ParamDiffAug, diff_augment
from utils.distribution import REAL_CHUNK
from utils.evaluate import get_eval_pool, train_together
from utils.matching import BN_IMAGES_PER_CLASS, batch_norm_modules, class_loss, match_loss
from utils.synset import images_per_class
from utils.trajectory import FlatModel, flatten_params

GiB = 2**30
FLOAT = 4
MARGIN = 1.15  # on what is counted: allocator rounding and fragmentation
OVERHEAD = GiB // 2  # what is not counted at all: CUDA context, cuDNN and cuBLAS workspaces
PHASES = ('iteration', 'evaluation')  # the parts that do not coexist; the other parts stay all run
FAMILIES = {'DM': 'DM', 'LoDM': 'DM', 'DC': 'DC', 'DSA': 'DC', 'LoDC': 'DC', 'LoDSA': 'DC',
            'MTT': 'MTT', 'LoMTT': 'MTT', 'Random': 'coreset', 'Herding': 'coreset', 'KCenter': 'coreset',
            'Forgetting': 'coreset', 'Whole': 'coreset'}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the estimate needs to know of a dataset."""
    channel: int
    im_size: tuple
    num_classes: int
    train_images: int
    test_images: int

    @property
    def image(self):
        """Bytes of one float32 image."""
        return FLOAT * self.channel * self.im_size[0] * self.im_size[1]


DATASET_SHAPES = {
    'MNIST': Shapes(1, (28, 28), 10, 60000, 10000),
    'FashionMNIST': Shapes(1, (28, 28), 10, 60000, 10000),
    'SVHN': Shapes(3, (32, 32), 10, 73257, 26032),
    'CIFAR10': Shapes(3, (32, 32), 10, 50000, 10000),
    'CIFAR100': Shapes(3, (32, 32), 100, 50000, 10000),
    'TinyImageNet': Shapes(3, (64, 64), 200, 100000, 10000),
}


def shapes_of(data, args):
    """The Shapes of a loaded dataset (utils.data.Data), with the test set cut to --test_images."""
    test = len(data.images_test)
    return Shapes(data.channel, tuple(data.im_size), data.num_classes, len(data.images_train),
                  min(test, args.test_images or test))


@dataclasses.dataclass(frozen=True)
class Line:
    """fixed + per_image * n bytes."""
    fixed: float
    per_image: float

    def at(self, n):
        return self.fixed + self.per_image * n


@dataclasses.dataclass
class Estimate:
    """Bytes per part, as counted; `total` adds the margin."""
    parts: dict

    @property
    def total(self):
        stays = sum(v for k, v in self.parts.items() if k not in PHASES)
        return MARGIN * (stays + max(self.parts[p] for p in PHASES)) + OVERHEAD

    def largest(self):
        return max(self.parts.items(), key=lambda kv: kv[1])


# ---------------------------------------------------------------- measuring a pass on the CPU

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that operators create while it is active and that are still
    alive (`live`), and the most alive at once (`peak`)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out

    def _add(self, storage):
        key, size = storage.data_ptr(), storage.nbytes()
        if key and key not in self.alive:
            self.alive.add(key)
            self.live += size
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        self.alive.discard(key)
        self.live -= size


def _bytes(setup, n):
    """(bytes alive when the pass calls mark(), peak bytes) of the pass setup(n)."""
    run, kept = setup(n), [0]
    with LiveBytes() as meter:
        run(lambda: kept.__setitem__(0, meter.live))
    return kept[0], meter.peak


def _fit(setup):
    """(kept, peak) Lines of a pass from its bytes on 2 and 4 images."""
    (k2, p2), (k4, p4) = _bytes(setup, 2), _bytes(setup, 4)

    def line(at2, at4):
        return Line(max(0.0, 2 * at2 - at4), (at4 - at2) / 2)
    return line(k2, k4), line(p2, p4)


def _inputs(shapes, n):
    torch.manual_seed(0)
    x = torch.randn(n, shapes.channel, *shapes.im_size)
    return x, torch.arange(n) % shapes.num_classes


def _network(model, shapes):
    return get_network(model, shapes.channel, shapes.num_classes, shapes.im_size).train()


def _forward(model, shapes, n):
    """A real chunk in DM and the batch-norm statistics in DC: an embedding without a graph."""
    net, (x, _) = _network(model, shapes), _inputs(shapes, n)

    def run(mark):
        with torch.no_grad():
            net.embed(x)
    return run


def _dm(model, shapes, n):
    """A block of DM's synthetic images: embedded by a frozen network, a mean, a backward to the images."""
    net, (x, _) = _network(model, shapes).requires_grad_(False), _inputs(shapes, n)

    def run(mark):
        loss = net.embed(x.requires_grad_()).mean(0).pow(2).sum()
        mark()
        loss.backward()
    return run


def _train(model, shapes, n):
    """Training a network on a batch (evaluation, DC's real gradient and inner loop)."""
    net, (x, y) = _network(model, shapes), _inputs(shapes, n)

    def run(mark):
        loss = F.cross_entropy(net(x), y)
        mark()
        loss.backward()
    return run


def _match(model, shapes, n):
    """One class of a DC matching step: the synthetic gradient with its graph, its distance to a real
    gradient (batch norm frozen), and the backward to the images."""
    net, (x, _) = _network(model, shapes), _inputs(shapes, n)
    for m in batch_norm_modules(net):
        m.eval()
    params = list(net.parameters())
    real = torch.autograd.grad(class_loss(net, x, 0), params)

    def run(mark):
        syn = torch.autograd.grad(class_loss(net, x.requires_grad_(), 0), params, create_graph=True)
        loss = match_loss(syn, real, 'ours')
        mark()
        loss.backward(inputs=[x])
    return run


def _step(model, shapes, n):
    """One MTT student step θ - lr ∇θ CE on a minibatch X[b], with its graph, and the backward to θ and X
    (the unrolled graph keeps what is alive at mark(); 'exact' makes this pass once per step)."""
    net, (X, y) = _network(model, shapes), _inputs(shapes, n)
    fmodel, theta = FlatModel(net), flatten_params(net).requires_grad_()
    lr, adjoint = torch.tensor(0.01, requires_grad=True), torch.randn(fmodel.num_params)

    def run(mark):
        xb = X.requires_grad_()[torch.arange(n)]
        grad = torch.autograd.grad(F.cross_entropy(fmodel(xb, theta), y), theta, create_graph=True)[0]
        new = theta - lr * grad
        mark()
        torch.autograd.grad((new * adjoint).sum(), (theta, X))
    return run


PASSES = {'forward': _forward, 'dm': _dm, 'train': _train, 'match': _match, 'step': _step}


@functools.lru_cache(maxsize=None)
def profile(kind, model, shapes):
    """(kept, peak) Lines of the pass `kind` of PASSES for `model` on images of `shapes`."""
    with torch.random.fork_rng(devices=[]):
        return _fit(functools.partial(PASSES[kind], model, shapes))


@functools.lru_cache(maxsize=None)
def augment_cost(strategy, shapes):
    """Bytes per image that one DSA call keeps in a graph (its output included): the most of its operations."""
    def setup(op, n):
        x = _inputs(shapes, n)[0].requires_grad_()

        def run(mark):
            out = diff_augment(x, op, ParamDiffAug())
            mark()
            return out
        return run
    with torch.random.fork_rng(devices=[]):
        return max(_fit(functools.partial(setup, op))[0].per_image for op in strategy.split('_'))


@functools.lru_cache(maxsize=None)
def num_params(model, shapes):
    net = get_network(model, shapes.channel, shapes.num_classes, shapes.im_size, device='meta')
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- the estimate

def estimate_peak(method, args, shapes, n):
    """Estimate of the peak device memory of `method` (a run's method name, a key of FAMILIES) with `args`
    (its parsed arguments; args.device sets DM's blocks) on a dataset of `shapes`, with n synthetic (or
    chosen) images per class."""
    family = FAMILIES[method]
    iteration = {'DM': dm_iteration, 'DC': dc_iteration, 'MTT': mtt_iteration, 'coreset': extractor}[family]
    parts = stays_on_device(family, args, shapes, n)
    parts['iteration'] = iteration(args, shapes, n)
    parts['evaluation'] = evaluation(args, shapes, n)
    return Estimate(parts)


def stays_on_device(family, args, shapes, n):
    """The parts that stay on the device for the whole run."""
    params = FLOAT * num_params(args.model, shapes)
    real_on_device = family != 'MTT' or torch.device(args.device).type == 'cpu'  # MTT keeps it on the CPU
    return {'synthetic set': synthetic_set(family, args, shapes, n),
            'real training set': shapes.train_images * shapes.image if real_on_device else 0,
            'test set': shapes.test_images * shapes.image,
            'network': params * (2 if family == 'DC' else 1),  # DC trains it: its gradient too
            'expert snapshots': 2 * params if family == 'MTT' else 0}


def synthetic_set(family, args, shapes, n):
    """The stored pixels or factors with their gradient and momentum; a coreset has neither (and the whole
    set is the training set itself)."""
    if family == 'coreset':
        return 0 if args.method == 'whole' else shapes.num_classes * n * shapes.image
    h, w = shapes.im_size
    rank = getattr(args, 'rank', None)
    floats = shapes.num_classes * n * shapes.channel * (h * w if rank is None else rank * (h + w))
    return 3 * FLOAT * floats


def _augment(args, shapes):
    """Bytes per synthetic image that DSA adds to the graph (0 without DSA); real images have no graph, and
    their augmented copy replaces them."""
    return augment_cost(args.dsa_strategy, shapes) if args.dsa else 0


def _batch_real(args, shapes):
    return min(args.batch_real, shapes.train_images // shapes.num_classes)


def _low_rank_images(args, shapes, count):
    """A·B of `count` images, built from the factors (pixels need no copy)."""
    return count * shapes.image if getattr(args, 'rank', None) else 0


def dm_iteration(args, shapes, n):
    """The largest block: its real images (augmented), held while first they are embedded in passes of
    REAL_CHUNK without a graph, then its synthetic images go forward and backward."""
    batch_norm = 'BN' in args.model
    chunk = REAL_CHUNK[torch.device(args.device).type]
    classes = shapes.num_classes if batch_norm else min(shapes.num_classes, max(1, chunk // args.batch_real))
    real, syn = classes * _batch_real(args, shapes), classes * n
    aug = _augment(args, shapes)
    held = real * shapes.image
    real_pass = profile('forward', args.model, shapes)[1].at(real if batch_norm else min(real, chunk))
    syn_pass = syn * (shapes.image + aug) + profile('dm', args.model, shapes)[1].at(syn)
    return held + max(real_pass, syn_pass)


def dc_iteration(args, shapes, n):
    """A matching step: the real batches of every class, A·B and its augmentation, and every class's
    synthetic graph with, on top, the last class's real gradient (before its graph) or the buffers of the
    final backward; or, with batch norm, the 16 real images per class that set its statistics."""
    k, aug, batch_real = shapes.num_classes, _augment(args, shapes), _batch_real(args, shapes)
    kept, peak = profile('match', args.model, shapes)
    real = k * batch_real * shapes.image
    syn = _low_rank_images(args, shapes, k * n) + k * n * aug
    last_real = profile('train', args.model, shapes)[1].at(batch_real) - kept.at(n)  # before the last graph
    step = real + syn + k * kept.at(n) + max(last_real, peak.at(n) - kept.at(n))
    if 'BN' not in args.model:
        return step
    bn = BN_IMAGES_PER_CLASS * k
    return max(step, bn * shapes.image + profile('forward', args.model, shapes)[1].at(bn))


def mtt_iteration(args, shapes, n):
    """'unrolled': syn_steps steps' graphs and one step's backward buffers; 'exact'/'tesla': syn_steps + 1
    parameter vectors and one step's graph with its backward. Plus X's gradient (and A·B)."""
    total = shapes.num_classes * n
    batch = min(args.batch_syn or total, total)
    aug = 0 if getattr(args, 'no_aug', False) else _augment(args, shapes)
    kept, peak = profile('step', args.model, shapes)
    images = total * shapes.image + _low_rank_images(args, shapes, total)
    if args.matching == 'unrolled':
        return images + args.syn_steps * (kept.at(batch) + batch * aug) + peak.at(batch) - kept.at(batch)
    thetas = (args.syn_steps + 1) * FLOAT * num_params(args.model, shapes)
    return images + thetas + peak.at(batch) + batch * aug


def extractor(args, shapes, n):
    """Coresets by herding, kcenter or forgetting: training their extractor on the training set (parameters,
    momentum, a batch), or embedding one class in passes of CHUNK images without a graph."""
    from utils.coreset import CHUNK, RECIPE
    if args.method in ('random', 'whole'):
        return 0
    model, per_class = args.extractor_model, shapes.train_images // shapes.num_classes
    train = 2 * FLOAT * num_params(model, shapes) + profile('train', model, shapes)[1].at(RECIPE['batch'])
    return max(train, per_class * shapes.image + profile('forward', model, shapes)[1].at(min(per_class, CHUNK)))


def evaluation(args, shapes, n):
    """The largest network of the evaluation pool, times the networks trained together: parameters,
    momentum and a training step on a batch's augmented copy (and the images: A·B for low rank)."""
    total = shapes.num_classes * n
    batch = min(args.batch_train, total)
    together = min(train_together(args), getattr(args, 'num_eval', 1))

    def one(model):
        return 2 * FLOAT * num_params(model, shapes) + profile('train', model, shapes)[1].at(batch)
    pool = max(one(m) for m in get_eval_pool(args.eval_mode, args.model))
    return _low_rank_images(args, shapes, total) + together * (batch * shapes.image + pool)


# ---------------------------------------------------------------- the check before a run

def device_memory(device):
    """Bytes a run may use: the GPU's total memory, or on the CPU the machine's available memory plus what
    this process already holds (the loaded data, which the estimate counts)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    page = os.sysconf('SC_PAGE_SIZE')
    try:
        info = dict(line.split(':', 1) for line in Path('/proc/meminfo').read_text().splitlines())
        available = int(info['MemAvailable'].split()[0]) * 1024
        held = int(Path('/proc/self/statm').read_text().split()[1]) * page
    except (OSError, KeyError):  # not Linux: free pages only
        available, held = os.sysconf('SC_AVPHYS_PAGES') * page, 0
    return available + held


def _with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def _halvings(value):
    while value > 1:
        value //= 2
        yield value


def fitting_flag(method, args, shapes, n, budget):
    """The flag that brings the estimate under `budget` bytes, or None: for MTT '--matching exact', else a
    smaller --batch_syn; for DM and DC a smaller --batch_real (halving the current value); failing those,
    fewer evaluation networks trained together (--train_together)."""
    def fits(**changes):
        return estimate_peak(method, _with(args, **changes), shapes, n).total <= budget

    family, flag = FAMILIES[method], None
    if family == 'MTT':
        mode = 'exact' if args.matching == 'unrolled' else args.matching
        if mode != args.matching and fits(matching=mode):
            return '--matching exact'
        prefix = '--matching exact ' if mode != args.matching else ''
        batch = min(args.batch_syn or shapes.num_classes * n, shapes.num_classes * n)
        flag = next((f'{prefix}--batch_syn {b}' for b in _halvings(batch) if fits(matching=mode, batch_syn=b)),
                    None)
    elif family != 'coreset':
        flag = next((f'--batch_real {b}' for b in _halvings(args.batch_real) if fits(batch_real=b)), None)
    together = min(train_together(args), getattr(args, 'num_eval', 1))
    return flag or next((f'--train_together {k}' for k in _halvings(together) if fits(train_together=k)), None)


def check_memory(method, args, data):
    """Before a run: a UserError when the estimated peak exceeds the memory of args.device, naming the
    flag that fits. Returns the Estimate (for the log). `data`: the loaded utils.data.Data."""
    shapes = shapes_of(data, args)
    n = images_per_class(args.ipc, getattr(args, 'rank', None), data.im_size)
    estimate, budget = estimate_peak(method, args, shapes, n), device_memory(args.device)
    if estimate.total <= budget:
        return estimate
    flag = fitting_flag(method, args, shapes, n, budget)
    part, size = estimate.largest()
    advice = (f'rerun with {flag}' if flag else
              'use a smaller --ipc (or, for low rank, a larger --rank) or a device with more memory')
    raise UserError(f'{method} needs an estimated {estimate.total / GiB:.1f} GiB on {args.device} (largest '
                    f'part: {part}, {size / GiB:.1f} GiB) but it has {budget / GiB:.1f} GiB: {advice}.')
