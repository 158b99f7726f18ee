"""utils/data.py: dataset loading (real MNIST/FashionMNIST, tiny files in the real formats of the others)
and ClassSampler."""
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.datasets.utils import calculate_md5

from utils import UserError
from utils.data import DATASETS, NORMALIZATION, ClassSampler, denormalize, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _expected(value, name, channel):
    """What ToTensor() + Normalize() gives for one uint8 pixel value."""
    mean, std = NORMALIZATION[name]
    return (torch.tensor(float(value), dtype=torch.float32) / 255 - mean[channel]) / std[channel]


# ---------------------------------------------------------------- real MNIST / FashionMNIST

@pytest.mark.parametrize('name', ['MNIST', 'FashionMNIST'])
def test_real_mnist_like(name):
    if not (SHARED_DATA / name / 'raw').is_dir():
        pytest.skip(f'{SHARED_DATA / name / "raw"} is absent (real data only on the project machine)')
    data = load_dataset(name, str(SHARED_DATA))
    assert data.images_train.shape == (60000, 1, 28, 28) and data.images_test.shape == (10000, 1, 28, 28)
    assert data.images_train.dtype == torch.float32 and data.labels_train.dtype == torch.int64
    assert (data.channel, data.im_size, data.num_classes, len(data.class_names)) == (1, (28, 28), 10, 10)
    for labels in (data.labels_train, data.labels_test):
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).min() > 0
    # The constants were measured on these files: normalized train set has mean ~0 and std ~1.
    assert abs(data.images_train.mean().item()) < 0.01
    assert abs(data.images_train.std().item() - 1) < 0.01
    mean, std = NORMALIZATION[name]
    reference = getattr(datasets, name)(str(SHARED_DATA), train=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean, std)]))
    for i in (0, 1234):
        image, label = reference[i]
        assert torch.equal(data.images_test[i], image) and data.labels_test[i] == label


# ---------------------------------------------------------------- CIFAR10 / CIFAR100 in the pickle format

def _write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar(root, monkeypatch, cls, n_per_file, num_classes, label_key, meta_key):
    """Tiny cifar-*-python folder: pickles with 'data' uint8 (n, 3072) rows (R, G, B planes of 32x32) and
    labels; the torchvision md5 lists are patched to the md5 of these files. Returns {file: (data, labels)}."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    content, md5 = {}, {}
    for i, (name, _) in enumerate(cls.train_list + cls.test_list):
        data = gen.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = [(i + j) % num_classes for j in range(n_per_file)]
        _write_pickle(folder / name, {'data': data, label_key: labels})
        content[name] = (data, labels)
    _write_pickle(folder / cls.meta['filename'], {meta_key: [f'class{c}' for c in range(num_classes)]})
    for name in list(content) + [cls.meta['filename']]:
        md5[name] = calculate_md5(folder / name)
    monkeypatch.setattr(cls, 'train_list', [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, 'test_list', [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, 'meta', {**cls.meta, 'md5': md5[cls.meta['filename']]})
    return content


@pytest.mark.parametrize('name,cls,num_classes,label_key,meta_key', [
    ('CIFAR10', datasets.CIFAR10, 10, 'labels', 'label_names'),
    ('CIFAR100', datasets.CIFAR100, 100, 'fine_labels', 'fine_label_names'),
])
def test_cifar(tmp_path, monkeypatch, name, cls, num_classes, label_key, meta_key):
    content = _fake_cifar(tmp_path, monkeypatch, cls, 4, num_classes, label_key, meta_key)
    data = load_dataset(name, str(tmp_path))
    n_train = 4 * len(cls.train_list)
    assert data.images_train.shape == (n_train, 3, 32, 32) and data.images_test.shape == (4, 3, 32, 32)
    assert (data.channel, data.im_size, data.num_classes) == (3, (32, 32), num_classes)
    assert data.class_names == [f'class{c}' for c in range(num_classes)]
    train_labels = [y for n, _ in cls.train_list for y in content[n][1]]
    assert data.labels_train.tolist() == train_labels
    assert data.labels_test.tolist() == content[cls.test_list[0][0]][1]
    # Image n_train - 3 is row 1 of the last train file; pixel (channel c, row y, column x) is at
    # c*1024 + y*32 + x of that row.
    raw = content[cls.train_list[-1][0]][0][1]
    for c, y, x in [(0, 0, 0), (2, 7, 30), (1, 31, 31)]:
        assert data.images_train[n_train - 3, c, y, x] == _expected(raw[c * 1024 + y * 32 + x], name, c)
    # The whole tensor equals torchvision's per-image ToTensor + Normalize.
    mean, std = NORMALIZATION[name]
    reference = cls(str(tmp_path), train=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean, std)]))
    assert torch.equal(data.images_test, torch.stack([reference[i][0] for i in range(len(reference))]))
    assert torch.allclose(denormalize(data.images_test, mean, std)[0, :, 0, 0] * 255,
                          torch.tensor(content[cls.test_list[0][0]][0][0, [0, 1024, 2048]], dtype=torch.float32),
                          atol=1e-3)


def test_cifar_corrupt_file_is_named(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, monkeypatch, datasets.CIFAR10, 2, 10, 'labels', 'label_names')
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'garbage')
    with pytest.raises(UserError, match='data_batch_3.*corrupt'):
        load_dataset('CIFAR10', str(tmp_path))


# ---------------------------------------------------------------- SVHN in the .mat format

def test_svhn(tmp_path, monkeypatch):
    gen = np.random.default_rng(1)
    sizes = {'train': 6, 'test': 3}
    content = {}
    for split, n in sizes.items():
        x = gen.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the official files
        y = np.array([[10], [1], [2], [10], [9], [3]][:n], dtype=np.uint8)  # 10 means digit 0
        scipy.io.savemat(tmp_path / f'{split}_32x32.mat', {'X': x, 'y': y})
        content[split] = (x, y)
    split_list = {s: [url, f, calculate_md5(tmp_path / f) if s in sizes else md5]
                  for s, (url, f, md5) in datasets.SVHN.split_list.items()}
    monkeypatch.setattr(datasets.SVHN, 'split_list', split_list)
    data = load_dataset('SVHN', str(tmp_path))
    assert data.images_train.shape == (6, 3, 32, 32) and data.images_test.shape == (3, 3, 32, 32)
    assert (data.channel, data.im_size, data.num_classes) == (3, (32, 32), 10)
    assert data.labels_train.tolist() == [0, 1, 2, 0, 9, 3] and data.labels_test.tolist() == [0, 1, 2]
    x = content['train'][0]
    for c, h, w in [(0, 0, 0), (2, 5, 17), (1, 31, 3)]:  # image 4, channel c, row h, column w
        assert data.images_train[4, c, h, w] == _expected(x[h, w, c, 4], 'SVHN', c)


# ---------------------------------------------------------------- TinyImageNet

def test_tiny_pt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images_train = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=gen)
    images_val = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=gen)
    torch.save({'classes': ['n01', 'n02', 'n03'], 'images_train': images_train,
                'labels_train': torch.tensor([0, 0, 1, 1, 2, 2]), 'images_val': images_val,
                'labels_val': torch.tensor([2, 0, 1])}, tmp_path / 'tinyimagenet.pt')
    data = load_dataset('TinyImageNet', str(tmp_path))
    assert data.images_train.shape == (6, 3, 64, 64) and data.images_test.shape == (3, 3, 64, 64)
    assert (data.channel, data.im_size, data.num_classes) == (3, (64, 64), 3)
    assert data.class_names == ['n01', 'n02', 'n03']
    assert data.labels_train.tolist() == [0, 0, 1, 1, 2, 2] and data.labels_test.tolist() == [2, 0, 1]
    assert data.images_test[1, 2, 40, 9] == _expected(images_val[1, 2, 40, 9], 'TinyImageNet', 2)


def test_tiny_pt_corrupt(tmp_path):
    (tmp_path / 'tinyimagenet.pt').write_bytes(b'not a torch file')
    with pytest.raises(UserError, match='tinyimagenet.pt.*corrupt'):
        load_dataset('TinyImageNet', str(tmp_path))


def test_tiny_folder_official_layout(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    wnids = ['n02', 'n01']  # created unsorted: classes must come out sorted by wnid
    colours = {'n01': (10, 20, 30), 'n02': (200, 100, 0)}
    for w in wnids:
        (root / 'train' / w / 'images').mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (64, 64), colours[w]).save(root / 'train' / w / 'images' / f'{w}_{i}.JPEG',
                                                        format='PNG')  # lossless, so pixels are exact
    (root / 'val' / 'images').mkdir(parents=True)
    rows = [('val_0.JPEG', 'n02'), ('val_1.JPEG', 'n01'), ('val_2.JPEG', 'n02')]
    for f, w in rows:
        Image.new('L', (64, 64), 77).save(root / 'val' / 'images' / f, format='PNG')  # grayscale -> RGB
    (root / 'val' / 'val_annotations.txt').write_text(''.join(f'{f}\t{w}\t0\t0\t63\t63\n' for f, w in rows))
    data = load_dataset('TinyImageNet', str(tmp_path))
    assert data.class_names == ['n01', 'n02'] and data.num_classes == 2
    assert data.images_train.shape == (4, 3, 64, 64) and data.images_test.shape == (3, 3, 64, 64)
    assert data.labels_train.tolist() == [0, 0, 1, 1] and data.labels_test.tolist() == [1, 0, 1]
    for c in range(3):
        assert torch.all(data.images_train[2, c] == _expected(colours['n02'][c], 'TinyImageNet', c))
        assert torch.all(data.images_test[0, c] == _expected(77, 'TinyImageNet', c))


def test_tiny_folder_class_subfolders(tmp_path):
    # train/<wnid>/*.JPEG without images/, and val/<wnid>/*.JPEG instead of val_annotations.txt.
    root = tmp_path / 'tiny-imagenet-200'
    for split, n in (('train', 3), ('val', 1)):
        for c, w in enumerate(['n05', 'n04']):
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (64, 64), (c, i, 0)).save(root / split / w / f'{i}.JPEG', format='PNG')
    data = load_dataset('TinyImageNet', str(tmp_path))
    assert data.class_names == ['n04', 'n05']
    assert data.labels_train.tolist() == [0, 0, 0, 1, 1, 1] and data.labels_test.tolist() == [0, 1]
    assert data.images_train[4, 1, 0, 0] == _expected(1, 'TinyImageNet', 1)  # n05 (value c=0), image 1
    assert data.images_train[4, 0, 0, 0] == _expected(0, 'TinyImageNet', 0)
    assert data.images_test[0, 0, 5, 5] == _expected(1, 'TinyImageNet', 0)  # n04 was created with c=1


# ---------------------------------------------------------------- errors

def test_missing_dataset_fails_fast(tmp_path, monkeypatch):
    def no_internet(self):
        raise OSError('no internet')  # what urlopen raises offline; keeps the test off the network

    monkeypatch.setattr(datasets.CIFAR10, 'download', no_internet)
    start = time.monotonic()
    with pytest.raises(UserError, match=r'CIFAR10 not found.*cifar-10-batches-py/.*cifar-10-python\.tar\.gz'):
        load_dataset('CIFAR10', str(tmp_path))
    assert time.monotonic() - start < 30  # generous bound: only a hang would break it


def test_missing_tiny_names_both_layouts(tmp_path):
    with pytest.raises(UserError, match=r'tinyimagenet\.pt.*tiny-imagenet-200/'):
        load_dataset('TinyImageNet', str(tmp_path))


def test_unknown_name_lists_datasets(tmp_path):
    with pytest.raises(UserError) as info:
        load_dataset('CIFAR11', str(tmp_path))
    assert all(name in str(info.value) for name in DATASETS)


# ---------------------------------------------------------------- ClassSampler

def _sampler():
    """Image i is a 1x1x1 image of value i, so sampled images reveal their indices. Class sizes 5, 2, 7, 0."""
    labels = torch.tensor([2, 0, 1, 2, 0, 2, 0, 2, 1, 2, 0, 2, 0, 2])
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)
    return ClassSampler(images, labels, 4), labels


def test_sampler_counts_and_class_order():
    sampler, labels = _sampler()
    assert sampler.counts.tolist() == [5, 2, 7, 0]
    images, out_labels = sampler.sample(3)
    # min(3, size) per class, in class order: 3 of class 0, 2 of class 1 (all it has), 3 of class 2.
    assert out_labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    index = images.view(-1).long()
    assert torch.equal(labels[index], out_labels)
    for c in (0, 1, 2):
        assert len(set(index[out_labels == c].tolist())) == int((out_labels == c).sum())  # distinct


def test_sampler_large_n_returns_whole_classes():
    sampler, labels = _sampler()
    images, out_labels = sampler.sample(100, classes=[2, 1])
    assert out_labels.tolist() == [2] * 7 + [1] * 2
    assert sorted(images.view(-1).long().tolist()) == sorted(torch.nonzero(labels >= 1).view(-1).tolist())
    whole = sampler.class_images(0, 10)
    assert sorted(whole.view(-1).long().tolist()) == torch.nonzero(labels == 0).view(-1).tolist()
    assert sampler.class_images(2, 4).shape == (4, 1, 1, 1)


def test_sampler_repeats_after_seed_and_varies_between_calls():
    sampler, _ = _sampler()
    torch.manual_seed(0)
    first = [sampler.sample(4)[0] for _ in range(10)]
    torch.manual_seed(0)
    again = [sampler.sample(4)[0] for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(x.view(-1).tolist()) for x in first}) > 1


def test_sampler_is_uniform_over_class_members():
    # Every member of a class is drawn equally often, and the draw order is a random permutation.
    labels = torch.tensor([0] * 6 + [1] * 3)
    sampler = ClassSampler(torch.arange(9, dtype=torch.float32).view(-1, 1, 1, 1), labels, 2)
    torch.manual_seed(1)
    firsts = torch.stack([sampler.sample(2)[0].view(-1) for _ in range(6000)])  # (draws, 4)
    freq = torch.bincount(firsts[:, 0].long(), minlength=6).float() / len(firsts)
    assert torch.allclose(freq, torch.full((6,), 1 / 6), atol=0.03)
    freq = torch.bincount(firsts[:, 2].long() - 6, minlength=3).float() / len(firsts)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)
