"""Shared machinery of the condensation scripts: data, augmentation, synthetic sets, evaluation, runs."""
import hashlib
import importlib
import math

import torch


class UserError(Exception):
    """Bad input from the user. The main scripts print the message and exit with status 2, no traceback."""


class Diverged(UserError):
    """A non-finite loss (or a non-positive learned rate): the caller saves what was learned and stops."""


def finite(loss, what='loss'):
    """float(loss), or Diverged if it is NaN or infinite (one read of a device scalar per call)."""
    value = float(loss.detach() if torch.is_tensor(loss) else loss)
    if not math.isfinite(value):
        raise Diverged(f'the {what} is {value}')
    return value


def seed_for(*keys):
    """A 63-bit seed determined by `keys` (e.g. the run's --seed, 'eval', experiment, iteration, network):
    every experiment, evaluation network and expert gets its own random stream, so the results do not
    depend on how the work is ordered or split over processes."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


def to_device(t, device):
    """Copy a CPU tensor to `device` without waiting for the device (pinned memory on CUDA)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


ORIGINAL_API = ('get_dataset', 'TensorDataset', 'get_network', 'get_eval_pool', 'evaluate_synset', 'epoch',
                'DiffAugment', 'ParamDiffAug', 'match_loss', 'get_loops', 'get_daparam', 'augment', 'get_time')


def __getattr__(name):
    """The original repositories' utils API (get_dataset, evaluate_synset, DiffAugment, ...), from
    utils/compat.py, imported on first use."""
    if name not in ORIGINAL_API:
        raise AttributeError(f"module 'utils' has no attribute {name!r}")
    return getattr(importlib.import_module('utils.compat'), name)
