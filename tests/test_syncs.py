"""No host synchronisation per batch in the hot loops: a DM iteration, a DC matching step and inner epoch, an
MTT iteration and an evaluation epoch.

The CPU has no device to wait for, so the loops run on the 'meta' device, which stands in for a GPU: tensors
have shapes but no values, and every read of a value on the host (item, tolist, bool, int, float, nonzero,
a copy to the CPU) is counted here as the synchronisation it would be on CUDA (and answered with a dummy).
Host-side random draws stay on the CPU and are not counted, as on CUDA. The count must not grow with the
number of batches (classes, student steps, training batches): at most a constant per iteration.
"""
import argparse

import pytest
import torch
from torch.overrides import TorchFunctionMode

import main_MTT
import utils.distribution as distribution
from networks import get_network
from utils.augmentation import FULL_STRATEGY, ParamDiffAug, diff_augment
from utils.data import ClassSampler
from utils.evaluate import evaluate_networks
from utils.matching import dc_iteration
from utils.synset import SyntheticSet
from utils.trajectory import check_step, flatten_params, trajectory_loss_and_grads

DEVICE = 'meta'
READS = {'item': 1.0, 'tolist': [], '__bool__': True, '__int__': 1, '__float__': 1.0, '__index__': 1,
         'nonzero': None, 'cpu': None, 'numpy': None}


class CountReads(TorchFunctionMode):
    """Counts the host reads of meta tensors."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in READS and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            self.reads.append(name)
            return READS[name]
        return func(*args, **(kwargs or {}))


def reads(fn):
    with CountReads() as mode:
        fn()
    return mode.reads


def meta_sampler(num_classes, per_class=20, size=12):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    sampler = ClassSampler(torch.randn(len(labels), 1, size, size), labels, num_classes)  # bincount needs values
    sampler.images, sampler.index = sampler.images.to(DEVICE), sampler.index.to(DEVICE)
    return sampler


@pytest.fixture(autouse=True)
def meta_chunk(monkeypatch):
    monkeypatch.setitem(distribution.REAL_CHUNK, DEVICE, 8)  # one class (8 real images) per block


def test_dm_iteration_reads_once_whatever_the_number_of_classes():
    counts = []
    for k in (2, 6):
        data = argparse.Namespace(channel=1, num_classes=k, im_size=(12, 12))
        sampler, synset = meta_sampler(k), SyntheticSet(k, 2, 1, (12, 12), rank=2).to(DEVICE)
        args = argparse.Namespace(model='ConvNet', batch_real=8, dsa=True, dsa_strategy=FULL_STRATEGY,
                                  compile=False)
        optimizer = torch.optim.SGD(synset.parameters(), lr=1.0, momentum=0.5)
        blocks = distribution.class_blocks(args, synset.classes, DEVICE)
        assert len(blocks) == k
        counts.append(reads(lambda: distribution.dm_iteration(args, data, synset, optimizer, sampler,
                                                               ParamDiffAug(), blocks)))
    assert counts[0] == counts[1] == ['__float__']  # the loss, checked once before the step


def test_dc_iteration_reads_once_per_matching_step():
    counts = []
    for k, loops in ((2, (1, 1)), (4, (1, 1)), (4, (2, 3))):
        data = argparse.Namespace(channel=1, num_classes=k, im_size=(12, 12))
        sampler, synset = meta_sampler(k), SyntheticSet(k, 2, 1, (12, 12)).to(DEVICE)
        args = argparse.Namespace(model='ConvNetBN', batch_real=8, batch_train=2, lr_net=0.01, dsa=True,
                                  dsa_strategy=FULL_STRATEGY, dis_metric='ours')
        optimizer = torch.optim.SGD(synset.parameters(), lr=0.1, momentum=0.5)
        counts.append(reads(lambda: dc_iteration(args, data, synset, optimizer, sampler, ParamDiffAug(), loops)))
    # classes and inner epochs add no reads: each matching step reads its loss once
    assert counts[0] == counts[1] == ['__float__']
    assert counts[2] == ['__float__'] * 2


@pytest.mark.parametrize('mode', ['unrolled', 'exact'])
def test_mtt_iteration_reads_a_constant_whatever_the_student_steps(mode):
    counts = []
    for steps in (2, 5):
        synset = SyntheticSet(3, 2, 1, (12, 12)).to(DEVICE)
        student = get_network('ConvNet', 1, 3, (12, 12), DEVICE)
        theta = flatten_params(student)
        rate = main_MTT.LearnedRate(0.01).to(DEVICE)
        batches = main_MTT.student_batches(6, 2, steps, DEVICE)

        def iteration():
            loss, grad_x, grad_lr = trajectory_loss_and_grads(
                student, synset.images(), synset.labels, rate.lr, theta, theta, batches,
                lambda x: diff_augment(x, FULL_STRATEGY, ParamDiffAug()), mode)
            check_step(loss, (grad_x, grad_lr), rate.lr)
        counts.append(reads(iteration))
    assert counts[0] == counts[1] and len(counts[0]) <= 4


def test_an_evaluation_reads_once_per_epoch_at_most():
    counts = []
    for per_class in (2, 8):  # 1 and 4 training batches of 5 images per epoch
        data = argparse.Namespace(channel=1, num_classes=3, im_size=(12, 12),
                                  images_test=torch.zeros(6, 1, 12, 12, device=DEVICE),
                                  labels_test=torch.zeros(6, dtype=torch.long, device=DEVICE))
        args = argparse.Namespace(dsa=True, dsa_strategy=FULL_STRATEGY, dataset='MNIST', epoch_eval_train=3,
                                  batch_train=5, standardize_eval=False)
        images = torch.zeros(3 * per_class, 1, 12, 12, device=DEVICE)
        labels = torch.arange(3, device=DEVICE).repeat_interleave(per_class)
        counts.append(reads(lambda: evaluate_networks(args, data, images, labels, 0.01, 'ConvNet', [1, 2])))
    assert counts[0] == counts[1] and len(counts[0]) <= 2  # the test accuracies, read at the end
