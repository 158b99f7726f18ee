"""utils/ensemble.py: K networks trained together equal the same K trained one at a time; evaluate_pool's
accuracies do not depend on how many networks are trained together; dc_augment with a generator."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import buffer
import networks
from networks import NETWORK_NAMES, get_network
from utils.data import Data
from utils.augmentation import ParamDiffAug, dc_augment, get_daparam
from utils.ensemble import (Networks, dc_augmentation, dsa_augment, init_network, network_groups, train,
                            unsupported, widen)
from utils.evaluate import evaluate_pool

SIZE = (12, 12)  # small images keep the ConvNets cheap (ConvNet pads 1-channel input to 16 x 16)


def toy_set(n, seed, channel=1, classes=4):
    """Images that are a class template plus noise, so that training reaches a non-trivial accuracy."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, channel, *SIZE, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % classes
    return templates[labels] + 0.8 * torch.randn(n, channel, *SIZE, generator=g), labels


def trained(model, seeds, augment, standardize):
    """(parameters of every network, test accuracies) after 3 epochs on the toy set, lr decay after epoch 1."""
    x, y = toy_set(24, 0)
    tx, ty = toy_set(40, 1)
    nets = Networks(model, 1, 4, SIZE, seeds, 'cpu')
    train(nets, x, y, 3, 0.01, 8, 0.9, 5e-4, decay_epoch=1, augment=augment, standardize=standardize)
    return [nets.parameters_of(k) for k in range(nets.k)], nets.test(tx, ty, 16, standardize)[1].tolist()


@pytest.mark.parametrize('model, augment, standardize', [
    ('ConvNet', dsa_augment('color_crop_cutout_flip_scale_rotate', ParamDiffAug()), False),
    ('MLP', dc_augmentation(get_daparam('MNIST', 'MLP')), False),   # crop_scale_rotate
    ('ConvNetBN', dsa_augment('color_crop_cutout_flip_scale_rotate', ParamDiffAug()), True),
    ('ConvNetLN', None, False),
])
def test_networks_trained_together_equal_those_trained_one_at_a_time(model, augment, standardize):
    seeds = [11, 12, 13]
    together, accs = trained(model, seeds, augment, standardize)
    for k, seed in enumerate(seeds):
        [alone], [acc] = trained(model, [seed], augment, standardize)
        assert accs[k] == acc
        for a, b in zip(together[k], alone):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(together[0][0], together[1][0])  # each network its own initialization


def test_network_k_starts_from_its_seed_and_the_global_rng_is_left_alone():
    before = torch.get_rng_state()
    nets = Networks('ConvNet', 1, 4, SIZE, [5, 6], 'cpu')
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)
    assert all(torch.equal(a, b) for a, b in zip(nets.parameters_of(1), get_network('ConvNet', 1, 4, SIZE).parameters()))


@pytest.mark.parametrize('model', NETWORK_NAMES)
def test_every_architecture_has_a_wide_form_computing_each_network(model):
    assert unsupported(get_network(model, 3, 10)) is None
    nets = [init_network(model, 3, 10, (32, 32), s) for s in (1, 2)]
    wide = widen(nets)
    x = torch.randn(2, 3, 3, 32, 32)  # (K, B, C, H, W)
    with torch.no_grad():
        for mode in (True, False):  # batch norm: batch statistics, then the running ones
            for module in (wide, *nets):
                module.train(mode)
            out = wide(x.transpose(0, 1).reshape(3, 6, 32, 32)).view(3, 2, 10)
            for k, net in enumerate(nets):
                torch.testing.assert_close(out[:, k], net(x[k]), rtol=1e-4, atol=1e-5)


def odd(channel, num_classes, im_size):
    """A model with layers that have no K-wide form (a convolution over the flattened features)."""
    features = channel * im_size[0] * im_size[1]
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, features)), nn.Conv1d(1, 2, 3, padding=1),
                         nn.Flatten(), nn.Linear(2 * features, num_classes))


def test_a_layer_without_wide_form_falls_back_to_one_at_a_time_and_says_so(monkeypatch):
    monkeypatch.setitem(networks.MODELS, 'Odd', odd)
    messages = []
    groups = network_groups('Odd', 1, 4, SIZE, [1, 2], 'cpu', messages.append)
    assert [g.k for g in groups] == [1, 1] and len(messages) == 1
    assert "layer '1' (Unflatten)" in messages[0] and 'one at a time' in messages[0]
    x, y = toy_set(8, 0)
    train(groups[0], x, y, 1, 0.01, 4, 0.9, 0.0)
    with pytest.raises(ValueError):
        Networks('Odd', 1, 4, SIZE, [1, 2], 'cpu')
    assert network_groups('ConvNet', 1, 4, SIZE, [1, 2], 'cpu', messages.append)[0].k == 2


def pool_args(**kw):
    return SimpleNamespace(**{'eval_mode': 'SS', 'model': 'ConvNetW32', 'num_eval': 3, 'seed': 0, 'dsa': True,
                              'dsa_strategy': 'color_crop_cutout_scale_rotate', 'dataset': 'MNIST',
                              'epoch_eval_train': 4, 'batch_train': 8, 'device': 'cpu', **kw})


def test_evaluate_pool_does_not_depend_on_the_networks_trained_together():
    x, y = toy_set(12, 0)
    tx, ty = toy_set(60, 1)
    data = SimpleNamespace(channel=1, num_classes=4, im_size=SIZE, images_test=tx, labels_test=ty)
    before = torch.get_rng_state()
    accs = {k: evaluate_pool(pool_args(train_together=k), data, x, y, 0.01, key=(0, 5)) for k in (1, 2, 3)}
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left as it was
    assert list(accs[1]) == ['ConvNetW32'] and len(accs[1]['ConvNetW32']) == 3
    assert accs[1] == accs[2] == accs[3]
    other = evaluate_pool(pool_args(train_together=3), data, x, y, 0.01, key=(0, 6))
    assert other != accs[3]  # another evaluation point, other networks


def test_dc_augment_with_a_generator_repeats_and_leaves_the_global_rng_alone():
    x = torch.randn(16, 1, 28, 28)
    param = get_daparam('MNIST', 'ConvNet')  # crop_scale_rotate
    before = torch.get_rng_state()
    a = dc_augment(x, param, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, dc_augment(x, param, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, dc_augment(x, param, torch.Generator().manual_seed(4)))
    torch.manual_seed(3)
    assert torch.equal(a, dc_augment(x, param))  # generator None: the global RNG, same draws in order


def test_buffer_experts_do_not_depend_on_how_many_are_trained_together(tmp_path, monkeypatch):
    x, y = toy_set(48, 0)
    tx, ty = toy_set(20, 1)
    data = Data('MNIST', 1, SIZE, 4, list('abcd'), [0.0], [1.0], x, y, tx, ty)
    monkeypatch.setattr(buffer, 'load_dataset', lambda name, path: data)
    common = ['--dataset', 'MNIST', '--model', 'MLP', '--num_experts', '3', '--train_epochs', '2',
              '--batch_train', '16', '--decay', '--mom', '0.5']
    runs = {}
    for k in (1, 2):
        buffer.main([*common, '--train_together', str(k), '--buffer_path', str(tmp_path / str(k))])
        folder = tmp_path / str(k) / 'MNIST_NO_ZCA' / 'MLP'
        runs[k] = (torch.load(folder / 'replay_buffer_0.pt'), (folder / 'log.txt').read_text())
    (one, log_one), (two, log_two) = runs[1], runs[2]
    assert len(one) == len(two) == 3 and all(len(t) == 3 for t in two)
    for a, b in zip(one, two):
        for snap_a, snap_b in zip(a, b):
            for p, q in zip(snap_a, snap_b):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    strip = lambda log: [line.split(' ', 1)[1] for line in log.splitlines() if 'acc' in line or 'expert ' in line]
    assert strip(log_one) == strip(log_two)  # the same lines, expert by expert
