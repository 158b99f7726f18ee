"""Coreset selection: `ipc` real training images per class, the baselines of the paper's Table 1.

random      a uniform draw per class: the same draw as --init real (ClassSampler.sample).
herding     iCaRL's running-mean rule on extractor features: pick i makes the mean of the i picked
            features closest to the class mean (the first pick is the image nearest the mean).
kcenter     k-center greedy on extractor features: the first centre is the image nearest the class mean,
            each next one the image farthest from its nearest centre.
forgetting  Toneva et al. (ICLR 2019): a forgetting event is a presentation at which an example is
            misclassified after being classified correctly at its previous presentation (the prediction
            before the update). Never-learned examples count one event per presentation, the most. Per
            class the most forgotten examples; equal counts in a seeded random order.
Herding and k-center break ties towards the first index and use squared Euclidean distances (same order).

The extractor is a network trained on real images (the whole training set, or some classes) with the
recipe RECIPE (reference Q1); the same pass records the forgetting statistics (Q2). It is cached as a .pt
file holding the settings it was made with, named after a digest of them, and a file is only ever used
for equal settings.
"""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from networks import get_network
from utils import UserError
from utils.data import ClassSampler
from utils.run import save_torch

# Reference Q1: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, 200 epochs with the learning
# rate x0.1 halfway (epoch 100), no augmentation.
RECIPE = dict(epochs=200, lr=0.01, momentum=0.9, weight_decay=5e-4, batch=256)
CHUNK = 4096  # images per forward pass when embedding or testing (bounds memory; no effect on results)


# ---------------------------------------------------------------- the greedy rules on one class

def squared_distances(features: Tensor, point: Tensor) -> Tensor:
    """(n,) squared Euclidean distances from the rows of features (n, d) to point (d,)."""
    return ((features - point) ** 2).sum(1)


def herding(features: Tensor, k: int) -> Tensor:
    """Indices (k,) of the rows of features (n, d) that herding picks, in order.

    Pick i minimizes ||i·μ - Σ_{j picked} f_j - f||, i.e. the mean of the picked features after pick i
    is as close to the class mean μ as one more image can bring it. Ties: the first index.
    """
    f = features.double()
    _check_k(len(f), k)
    mean, total = f.mean(0), torch.zeros_like(f[0])
    taken = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    picks = torch.empty(k, dtype=torch.long, device=f.device)  # on the device: read once, at the end
    for i in range(1, k + 1):
        d = squared_distances(f, i * mean - total).masked_fill(taken, float('inf'))
        j = d.argmin()  # the first of equal values
        picks[i - 1] = j
        taken[j] = True
        total += f[j]
    return picks.cpu()


def kcenter(features: Tensor, k: int) -> Tensor:
    """Indices (k,) of the rows of features (n, d) that k-center greedy picks, in order: first the row
    nearest the mean (herding's first pick), then each time the row farthest from its nearest pick.
    Ties: the first index."""
    f = features.double()
    _check_k(len(f), k)
    picks = torch.empty(k, dtype=torch.long, device=f.device)  # on the device: read once, at the end
    picks[0] = squared_distances(f, f.mean(0)).argmin()
    nearest = squared_distances(f, f[picks[0]])  # squared distance to the nearest centre
    taken = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    taken[picks[0]] = True
    for i in range(1, k):
        j = nearest.masked_fill(taken, -1.0).argmax()  # the first of equal values
        picks[i] = j
        taken[j] = True
        nearest = torch.minimum(nearest, squared_distances(f, f[j]))
    return picks.cpu()


def _check_k(n, k):
    if not 1 <= k <= n:
        raise ValueError(f'cannot pick {k} of {n} rows')


# ---------------------------------------------------------------- forgetting statistics

class ForgettingCounter:
    """Forgetting statistics of n examples, updated at every presentation; all state on one device."""

    def __init__(self, n: int, device='cpu'):
        self.last = torch.zeros(n, dtype=torch.bool, device=device)  # correct at the previous presentation
        self.learned = torch.zeros(n, dtype=torch.bool, device=device)  # correct at some presentation
        self.events = torch.zeros(n, dtype=torch.long, device=device)
        self.presentations = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, index: Tensor, correct: Tensor):
        """index: (b,) distinct example indices; correct: (b,) bool, their predictions before the update."""
        self.events[index] += (self.last[index] & ~correct).long()
        self.last[index] = correct
        self.learned[index] |= correct
        self.presentations[index] += 1

    def counts(self) -> Tensor:
        """(n,) forgetting events; a never-learned example counts its presentations (Toneva's rule)."""
        return torch.where(self.learned, self.events, self.presentations)


def forgetting_counts(correct: Tensor) -> Tensor:
    """Forgetting counts (n,) from a record correct (presentations, n) of bool: row p is the p-th
    presentation of every example."""
    counter = ForgettingCounter(correct.shape[1], correct.device)
    every = torch.arange(correct.shape[1], device=correct.device)
    for row in correct:
        counter.update(every, row)
    return counter.counts()


# ---------------------------------------------------------------- per-class selection

def per_class(labels: Tensor, num_classes: int, ipc: int, classes, pick) -> Tensor:
    """Indices (len(classes)·ipc,) into labels, class-major: for each class c of classes (None: all), its
    members (indices, in dataset order) at the positions pick(members) returns. A UserError if a class has
    fewer than ipc."""
    out = []
    for c in range(num_classes) if classes is None else classes:
        members = class_members(labels, c, ipc)
        out.append(members[pick(members).to(members.device)])
    return torch.cat(out)


def class_members(labels: Tensor, c: int, ipc: int) -> Tensor:
    """Indices of class c in labels; a UserError if there are fewer than ipc."""
    members = (labels == c).nonzero().squeeze(1)
    if len(members) < ipc:
        raise UserError(f'class {c} has only {len(members)} training images, fewer than --ipc {ipc}: '
                        f'use a smaller --ipc (or more --train_images).')
    return members


def select_random(labels: Tensor, num_classes: int, ipc: int, classes=None) -> Tensor:
    """ipc uniformly drawn indices per class, class-major: the same draw (global torch RNG) as
    ClassSampler(images, labels, num_classes).sample(ipc, classes), i.e. --init real."""
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    for c in classes:
        class_members(labels, c, ipc)
    positions = torch.arange(len(labels), device=labels.device)
    return ClassSampler(positions, labels, num_classes).sample(ipc, classes)[0]


@torch.no_grad()
def embed(net, images: Tensor) -> Tensor:
    """Features net.embed (N, D) of images, in eval mode, CHUNK images per pass."""
    net.eval()
    return torch.cat([net.embed(x) for x in images.split(CHUNK)])


def select_herding(net, images: Tensor, labels: Tensor, num_classes: int, ipc: int, classes=None) -> Tensor:
    """Herding on net's features, per class; indices class-major."""
    return per_class(labels, num_classes, ipc, classes, lambda members: herding(embed(net, images[members]), ipc))


def select_kcenter(net, images: Tensor, labels: Tensor, num_classes: int, ipc: int, classes=None) -> Tensor:
    """K-center greedy on net's features, per class; indices class-major."""
    return per_class(labels, num_classes, ipc, classes, lambda members: kcenter(embed(net, images[members]), ipc))


def select_forgetting(counts: Tensor, labels: Tensor, num_classes: int, ipc: int, seed: int,
                      classes=None) -> Tensor:
    """The ipc examples of each class with the most forgetting events; equal counts in the order of a
    random permutation drawn from `seed`. Indices class-major."""
    gen = torch.Generator().manual_seed(seed)
    counts = counts.cpu()

    def most_forgotten(members):
        order = torch.randperm(len(members), generator=gen)
        ranked = order[torch.argsort(-counts[members.cpu()][order], stable=True)]
        return ranked[:ipc]
    return per_class(labels, num_classes, ipc, classes, most_forgotten)


# ---------------------------------------------------------------- the extractor

def extractor_settings(dataset: str, model: str, seed: int, train_images: int, epochs: int = RECIPE['epochs'],
                       classes=None) -> dict:
    """Everything an extractor depends on (its cache key): the data (dataset, number of training images,
    classes or None for all), the model, the recipe and the seed."""
    return {'dataset': dataset, 'train_images': train_images,
            'classes': None if classes is None else [int(c) for c in classes],
            'model': model, **RECIPE, 'epochs': epochs, 'seed': seed}


@dataclass
class Extractor:
    net: torch.nn.Module
    forgetting: Tensor  # (N,) forgetting counts of the training images, in their order
    settings: dict
    seconds: float  # training time
    test_acc: float | None  # on the test images given when it was trained
    test_images: int | None
    path: Path | None = None
    reused: bool = False


def train_extractor(images: Tensor, labels: Tensor, num_classes: int, settings: dict, test=None,
                    log=None) -> Extractor:
    """Train settings['model'] from scratch on (images, labels), tensors on the run's device, with the
    recipe in settings, recording every example's correctness at each presentation (forgetting) in the
    same pass. test: (images, labels) for its test accuracy. The global RNG is left as it was (the network
    draws from settings['seed']), so a cached extractor and a fresh one leave a run the same."""
    if len(images) != settings['train_images']:
        raise ValueError(f"settings are for {settings['train_images']} images, got {len(images)}")
    device = images.device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(settings['seed'])
        net = _network(settings, images, num_classes)
        optimizer = torch.optim.SGD(net.parameters(), lr=settings['lr'], momentum=settings['momentum'],
                                    weight_decay=settings['weight_decay'])
        counter = ForgettingCounter(len(images), device)
        epochs = settings['epochs']
        for epoch in range(epochs):
            if epoch == epochs // 2 > 0:
                for group in optimizer.param_groups:
                    group['lr'] = settings['lr'] * 0.1
            t = time.perf_counter()
            loss, acc = train_epoch(net, images, labels, settings['batch'], optimizer, counter)
            t = time.perf_counter() - t
            if log:
                log(f'extractor epoch {epoch + 1}/{epochs}: loss {loss:.4f}, train acc {100 * acc:.2f}, '
                    f'{t:.0f} s ({len(images) / t:.0f} images/s)')
    seconds = time.perf_counter() - start
    test_acc = accuracy(net, *test) if test else None
    return Extractor(net, counter.counts(), settings, seconds, test_acc, len(test[0]) if test else None)


def train_epoch(net, images, labels, batch, optimizer, counter):
    """One shuffled pass; every batch's predictions before its update go to counter. Returns (mean loss,
    accuracy) with one read from the device for the whole epoch."""
    net.train()
    loss_sum = torch.zeros((), device=images.device)
    correct_sum = torch.zeros((), dtype=torch.long, device=images.device)
    for index in torch.randperm(len(images), device=images.device).split(batch):
        y = labels[index]
        out = net(images[index])
        loss = F.cross_entropy(out, y)
        correct = out.argmax(1) == y
        counter.update(index, correct)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(index)
        correct_sum += correct.sum()
    return float(loss_sum) / len(images), int(correct_sum) / len(images)


@torch.no_grad()
def accuracy(net, images, labels) -> float:
    net.eval()
    correct = sum((net(x).argmax(1) == y).sum() for x, y in zip(images.split(CHUNK), labels.split(CHUNK)))
    return int(correct) / len(images)


def _network(settings, images, num_classes):
    return get_network(settings['model'], images.shape[1], num_classes, tuple(images.shape[2:])).to(images.device)


def cache_file(folder, settings: dict) -> Path:
    """<folder>/extractor_<dataset>_<model>_<epochs>ep_seed<seed>_<digest of every setting>.pt"""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    s = settings
    return Path(folder) / f"extractor_{s['dataset']}_{s['model']}_{s['epochs']}ep_seed{s['seed']}_{digest}.pt"


def get_extractor(path, images: Tensor, labels: Tensor, num_classes: int, settings: dict, test=None,
                  log=None) -> Extractor:
    """The extractor stored at `path` if it exists (a UserError unless it was made with exactly
    `settings`), else a freshly trained one, saved there."""
    path = Path(path)
    if path.exists():
        return load_extractor(path, images, num_classes, settings)
    ext = train_extractor(images, labels, num_classes, settings, test, log)
    ext.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, {'settings': settings, 'state_dict': ext.net.state_dict(), 'forgetting': ext.forgetting.cpu(),
                      'seconds': ext.seconds, 'test_acc': ext.test_acc, 'test_images': ext.test_images})
    return ext


def load_extractor(path, images: Tensor, num_classes: int, settings: dict) -> Extractor:
    """The extractor in `path`, checked against `settings`; on the device of images."""
    try:
        saved = torch.load(path, map_location=images.device, weights_only=True)
        made_with = saved['settings']
    except Exception as e:
        raise UserError(f'{path} is not a readable extractor file ({e}); delete it to train a new one.') from None
    differ = sorted(k for k in settings.keys() | made_with.keys() if settings.get(k) != made_with.get(k))
    if differ:
        shown = ', '.join(f'{k} {made_with.get(k)} (not {settings.get(k)})' for k in differ)
        raise UserError(f'{path} was made with other settings: {shown}; give the flags it was made with, or '
                        f'leave it out to train a new extractor.')
    with torch.random.fork_rng(devices=[images.device] if images.device.type == 'cuda' else []):
        net = _network(settings, images, num_classes)  # its initialization is overwritten
    net.load_state_dict(saved['state_dict'])
    return Extractor(net, saved['forgetting'].to(images.device), settings, saved['seconds'], saved['test_acc'],
                     saved['test_images'], Path(path), reused=True)
