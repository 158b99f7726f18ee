"""Real datasets as whole normalized tensors, and per-class random sampling of real images.

Every dataset is returned as one float32 tensor per split, equal to torchvision's ToTensor() followed by
Normalize(mean, std) applied to each image, but computed on the whole uint8 array at once.
"""
import contextlib
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
from torchvision.datasets.utils import check_integrity

from utils import UserError, to_device

DATASETS = ('MNIST', 'FashionMNIST', 'SVHN', 'CIFAR10', 'CIFAR100', 'TinyImageNet')

# name: (per-channel mean, per-channel std), as in the original get_dataset (FashionMNIST mean 0.2861).
NORMALIZATION = {
    'MNIST': ([0.1307], [0.3081]),
    'FashionMNIST': ([0.2861], [0.3530]),
    'SVHN': ([0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
    'CIFAR10': ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    'CIFAR100': ([0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762]),
    'TinyImageNet': ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}

DOWNLOAD_TIMEOUT_S = 20  # per socket operation, so that a blocked network fails instead of hanging
TINY_PT = 'tinyimagenet.pt'
TINY_DIR = 'tiny-imagenet-200'
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


@dataclass
class Data:
    """A whole dataset in memory. Images are float32 (N, C, H, W), normalized with mean/std, on the CPU."""
    name: str
    channel: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    images_train: Tensor
    labels_train: Tensor  # int64 (N,)
    images_test: Tensor
    labels_test: Tensor


def load_dataset(name: str, data_path: str) -> Data:
    """Load the train and test splits of `name` from `data_path` (torchvision sets are downloaded if missing)."""
    if name not in DATASETS:
        raise UserError(f"Unknown dataset {name!r}: choose one of {', '.join(DATASETS)}.")
    root = Path(data_path)
    if name == 'TinyImageNet':
        class_names, (x_train, y_train), (x_test, y_test) = _load_tiny(root)
    else:
        class_names, (x_train, y_train), (x_test, y_test) = _load_torchvision(name, root)
    mean, std = NORMALIZATION[name]
    return Data(name=name, channel=x_train.shape[1], im_size=tuple(x_train.shape[2:]),
                num_classes=len(class_names), class_names=class_names, mean=list(mean), std=list(std),
                images_train=_normalize(x_train, mean, std), labels_train=y_train,
                images_test=_normalize(x_test, mean, std), labels_test=y_test)


def denormalize(images: Tensor, mean, std) -> Tensor:
    """Undo Normalize(mean, std) on images (..., C, H, W); returns a new tensor on the images' device."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images * std + mean


def _normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, H, W): the same arithmetic as ToTensor() then Normalize()."""
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return images.contiguous().float().div_(255).sub_(mean).div_(std)


# ---------------------------------------------------------------- torchvision datasets

def _torchvision_spec(name: str, root: Path):
    """(dataset class, kwargs of the train and test splits, [(file, md5 or None)], reader of one file, hint)."""
    if name in ('MNIST', 'FashionMNIST'):
        cls = getattr(datasets, name)
        raw = root / name / 'raw'
        names = [Path(url).stem for url, _ in cls.resources]  # 'train-images-idx3-ubyte.gz' -> unzipped name
        hint = f"{name}/raw/ holding {', '.join(names)} (unzipped)"
        return cls, ({'train': True}, {'train': False}), [(raw / n, None) for n in names], \
            read_sn3_pascalvincent_tensor, hint
    if name == 'SVHN':
        cls = datasets.SVHN
        files = [(root / cls.split_list[s][1], cls.split_list[s][2]) for s in ('train', 'test')]
        return cls, ({'split': 'train'}, {'split': 'test'}), files, scipy.io.loadmat, \
            'train_32x32.mat and test_32x32.mat (from ufldl.stanford.edu/housenumbers)'
    cls = datasets.CIFAR10 if name == 'CIFAR10' else datasets.CIFAR100
    listed = cls.train_list + cls.test_list + [(cls.meta['filename'], cls.meta['md5'])]
    files = [(root / cls.base_folder / f, md5) for f, md5 in listed]
    return cls, ({'train': True}, {'train': False}), files, _read_pickle, \
        f"{cls.base_folder}/ (from {cls.filename})"


def _read_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='latin1')


def _load_torchvision(name: str, root: Path):
    """Class names and (uint8 images (N, C, H, W), int64 labels) of the train and test splits."""
    cls, splits, files, read, hint = _torchvision_spec(name, root)
    missing = not all(path.is_file() for path, _ in files)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if missing else contextlib.nullcontext():
            train, test = (cls(str(root), download=missing, **kw) for kw in splits)
    except Exception as err:
        if not all(path.is_file() for path, _ in files):
            raise UserError(f"{name} not found under '{root}' and it could not be downloaded: place {hint} "
                            f"in '{root}', or run once with internet access.") from err
        bad = _first_bad_file(files, read)
        what = f"file '{bad}' is" if bad else f"data under '{root}' is"
        raise UserError(f"{name} {what} corrupt or unreadable ({err}): replace it with a fresh copy; {name} "
                        f"needs {hint} in '{root}'.") from err
    class_names = [str(c) for c in range(10)] if name in ('MNIST', 'SVHN') else list(train.classes)
    return class_names, _arrays(train), _arrays(test)


def _arrays(ds):
    """uint8 (N, C, H, W) images and int64 labels of a torchvision MNIST, SVHN or CIFAR dataset object."""
    if isinstance(ds, datasets.MNIST):  # FashionMNIST is a subclass; .data is a uint8 tensor (N, H, W)
        return ds.data.unsqueeze(1), ds.targets.long()
    if isinstance(ds, datasets.SVHN):  # .data is numpy (N, C, H, W); label 10 is already mapped to 0
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets, dtype=torch.long)  # CIFAR: HWC


def _first_bad_file(files, read):
    """The first file that fails its md5 check or cannot be read, or None."""
    for path, md5 in files:
        try:
            if not check_integrity(path, md5):
                return path
            read(path)
        except Exception:
            return path
    return None


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Bound every socket operation (torchvision's urlopen sets no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# ---------------------------------------------------------------- TinyImageNet

def _load_tiny(root: Path):
    """From root/tinyimagenet.pt (the original's format) or else the root/tiny-imagenet-200/ folder tree."""
    if (root / TINY_PT).is_file():
        return _load_tiny_pt(root / TINY_PT)
    if (root / TINY_DIR).is_dir():
        return _load_tiny_folder(root / TINY_DIR)
    raise UserError(f"TinyImageNet not found under '{root}': place {TINY_PT} (a dict with classes, images_train, "
                    f"labels_train, images_val, labels_val) or the {TINY_DIR}/ folder (from tiny-imagenet-200.zip, "
                    f"with train/ and val/) in '{root}'.")


def _load_tiny_pt(path: Path):
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
        splits = [(torch.as_tensor(data[f'images_{s}'], dtype=torch.uint8),
                   torch.as_tensor(data[f'labels_{s}'], dtype=torch.long)) for s in ('train', 'val')]
        class_names = [str(c) for c in data['classes']]
    except Exception as err:
        raise UserError(f"TinyImageNet file '{path}' is corrupt or unreadable ({err!r}): replace it with a dict "
                        f"with keys classes, images_train, labels_train, images_val, labels_val.") from err
    return class_names, splits[0], splits[1]


def _load_tiny_folder(folder: Path):
    """The official layout: train/<wnid>/images/*.JPEG (or train/<wnid>/*.JPEG); val/ with class sub-folders
    or val/images/ + val/val_annotations.txt. Classes are the train wnids, sorted."""
    train_dir, val_dir = folder / 'train', folder / 'val'
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"TinyImageNet folder '{folder}' lacks train/ or val/: unpack tiny-imagenet-200.zip "
                        f"there so that it holds train/<wnid>/images/*.JPEG and val/.")
    wnids = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    index = {w: c for c, w in enumerate(wnids)}
    train = [(f, index[w]) for w in wnids for f in _image_files(train_dir / w)]
    annotations = val_dir / 'val_annotations.txt'
    if annotations.is_file():
        rows = [line.split('\t')[:2] for line in annotations.read_text().splitlines() if line.strip()]
        val = [(val_dir / 'images' / f, w) for f, w in sorted(rows)]
    else:
        val = [(f, d.name) for d in sorted(val_dir.iterdir()) if d.is_dir() for f in _image_files(d)]
    unknown = sorted({w for _, w in val} - set(wnids))
    if unknown:
        raise UserError(f"TinyImageNet val classes {unknown[:5]} have no folder in '{train_dir}': "
                        f"use train/ and val/ from the same tiny-imagenet-200.zip.")
    if not train or not val:
        raise UserError(f"TinyImageNet folder '{folder}' has no train or val images: it must hold "
                        f"train/<wnid>/images/*.JPEG and val/images/ with val/val_annotations.txt.")
    return wnids, _read_images(train), _read_images([(f, index[w]) for f, w in val])


def _image_files(class_dir: Path):
    """Sorted image files of class_dir/images/ or else class_dir/."""
    images = class_dir / 'images'
    d = images if images.is_dir() else class_dir
    return sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(items):
    """[(file, label)] -> uint8 (N, 3, 64, 64), int64 (N,), read with PIL as RGB."""
    out = np.empty((len(items), 64, 64, 3), dtype=np.uint8)
    for i, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                pixels = np.asarray(im.convert('RGB'))
        except Exception as err:
            raise UserError(f"TinyImageNet image '{f}' is missing or unreadable ({err}): replace it with "
                            f"the file from tiny-imagenet-200.zip.") from err
        if pixels.shape != (64, 64, 3):
            raise UserError(f"TinyImageNet image '{f}' is {pixels.shape[1]}x{pixels.shape[0]}, not 64x64: "
                            f"use the images of tiny-imagenet-200.zip unchanged.")
        out[i] = pixels
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return torch.from_numpy(out).permute(0, 3, 1, 2), labels


# ---------------------------------------------------------------- per-class sampling

class ClassSampler:
    """Real training images grouped by class, kept on one device; draws random per-class batches.

    index: (num_classes, max_count) long on the device, row c lists the indices of class c, padded with -1.
    counts: (num_classes,) long on the CPU, images per class (host integers: no device reads when sampling).
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int):
        self.images = images
        device = images.device
        labels = labels.to(device=device, dtype=torch.long)
        counts = torch.bincount(labels, minlength=num_classes)
        order = torch.argsort(labels, stable=True)  # indices grouped by class, ascending within a class
        starts = torch.cumsum(counts, 0) - counts
        sorted_labels = labels[order]
        position = torch.arange(len(labels), device=device) - starts[sorted_labels]
        self.counts = counts.cpu()
        self.index = torch.full((num_classes, int(self.counts.max())), -1, dtype=torch.long, device=device)
        self.index[sorted_labels, position] = order

    def sizes(self, n: int, classes=None) -> list[int]:
        """Images that sample(n, classes) returns for each class: min(n, class size)."""
        classes = range(len(self.counts)) if classes is None else classes
        return [min(n, int(self.counts[c])) for c in classes]

    def draw(self, n: int) -> Tensor:
        """(num_classes, min(n, largest class)) indices into images: min(n, class size) distinct random images
        of every class, then -1 padding. One call draws for every class, so processes that take different
        classes from the same draw stay in step."""
        k = min(n, self.index.shape[1])
        # Random keys give a fresh uniform permutation per row; padding gets the top key so it sorts last.
        top = 2 ** 62
        keys = torch.randint(top, self.index.shape, device=self.index.device).masked_fill_(self.index < 0, top)
        return self.index.gather(1, keys.topk(k, dim=1, largest=False).indices)

    def take(self, picked: Tensor, classes=None) -> tuple[Tensor, Tensor]:
        """The images of `classes` (a list; default all, in order) in a draw, concatenated in class order,
        and their labels."""
        device, k = picked.device, picked.shape[1]
        if classes is None:
            classes, rows = list(range(len(self.counts))), torch.arange(len(self.counts), device=device)
        else:
            rows = to_device(torch.tensor([int(c) for c in classes]), device)
        picked, labels = picked[rows], rows[:, None].expand(-1, k)
        sizes = self.sizes(k, classes)
        if min(sizes) == k:
            return self.images[picked.flatten()], labels.flatten()
        keep = torch.arange(k, device=device) < to_device(torch.tensor(sizes), device)[:, None]
        return self.images[picked[keep]], labels[keep]

    def sample(self, n: int, classes=None) -> tuple[Tensor, Tensor]:
        """For each class in `classes` (a list; default all, in order), min(n, class size) distinct random
        images. Returns images (sum of those sizes, C, H, W) and their labels, concatenated in class order."""
        return self.take(self.draw(n), classes)

    def class_images(self, c: int, n: int) -> Tensor:
        """min(n, size of class c) distinct random images of class c (the original get_images(c, n))."""
        return self.sample(n, [c])[0]


# ---------------------------------------------------------------- ZCA whitening (MTT's --zca)

def zca_whiten(data: Data, device='cpu', eps: float = 0.1):
    """Replace data.images_train and data.images_test (on the CPU) by their ZCA whitening, fitted on the
    train images, as MTT's --zca: kornia ZCAWhitening(eps=0.1, compute_inv=True) on ToTensor() pixels in
    [0, 1] (the per-channel normalization is undone first; the original applies no Normalize with ZCA).

    The whitening matrix (D×D, D = C·H·W) is fitted and applied on `device`. Returns `unwhiten`, the
    inverse map: whitened images (N, C, H, W) on any device -> [0, 1] pixels there (for viewing).
    data.mean and data.std keep describing the raw pixels, not the whitened images.
    """
    import kornia  # only needed with --zca (and absent on some GPU machines)

    zca = kornia.enhance.ZCAWhitening(eps=eps, compute_inv=True)
    train = denormalize(data.images_train.to(device), data.mean, data.std)
    zca.fit(train)
    data.images_train = zca(train).cpu()
    del train
    data.images_test = zca(denormalize(data.images_test.to(device), data.mean, data.std)).cpu()

    def unwhiten(images: Tensor) -> Tensor:
        return zca.to(images.device).inverse_transform(images.detach())

    return unwhiten
