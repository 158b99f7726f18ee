"""DC / DSA / LoDC: the gradient distances by hand, the loop schedule, one matching step, batch-norm
freezing, the method flags, end to end runs on real MNIST and the quality of a short DC run."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main_DC
from conftest import run_script
from networks import get_network
from utils import UserError
from utils.augmentation import ParamDiffAug, default_dsa_strategy
from utils.data import ClassSampler, load_dataset
from utils.evaluate import EVAL_POOLS, evaluate_synset
import utils.matching as matching
from utils.matching import (batch_norm_modules, freeze_batch_norm, get_loops, match_loss, matching_loss,
                            matching_step)
from utils.run import parse_args
from utils.synset import SyntheticSet

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

# ------------------------------------------------------------------------------------------ distances

# One linear weight (2, 3), one bias (2,), one conv weight (2, 1, 1, 2), one layer-norm weight (2, 2, 1).
# Each has two output units, so a distance over the flattened tensor would give other values.
REAL = [torch.tensor([[1., 0, 0], [0, 3, 4]]), torch.tensor([1., 2]),
        torch.tensor([[[[1., 1]]], [[[1, 0]]]]), torch.tensor([[[3.], [4]], [[1], [0]]])]
SYN = [torch.tensor([[0., 2, 0], [0, -6, -8]]), torch.tensor([-5., 7]),
       torch.tensor([[[[2., 2]]], [[[1, 1]]]]), torch.tensor([[[4.], [3]], [[0], [1]]])]


def test_ours_sums_one_minus_cos_per_output_unit_and_ignores_1d():
    # linear rows: cos 0 -> 1 and cos -1 -> 2; bias: 0; conv rows: cos 1 -> 0 and 1/sqrt(2);
    # layer-norm rows (3, 4) vs (4, 3): cos 24/25, and (1, 0) vs (0, 1): cos 0 -> 1.
    by_hand = 1 + 2 + 0 + (1 - 1 / math.sqrt(2)) + (1 - 24 / 25) + 1
    assert match_loss(SYN, REAL, 'ours').item() == pytest.approx(by_hand, abs=1e-5)
    other_bias = [SYN[0], torch.tensor([100., -3]), SYN[2], SYN[3]]
    assert match_loss(other_bias, REAL, 'ours').item() == pytest.approx(by_hand, abs=1e-5)


def test_mse_and_cos_include_every_parameter():
    # squared differences: linear 1 + 4 + 81 + 144, bias 36 + 25, conv 1 + 1 + 0 + 1, layer norm 1 + 1 + 1 + 1
    assert match_loss(SYN, REAL, 'mse').item() == pytest.approx(298.0)
    # flattened: <real, syn> = -50 + 9 + 5 + 24 = -12, |real|² = 26 + 5 + 3 + 26, |syn|² = 104 + 74 + 10 + 26
    assert match_loss(SYN, REAL, 'cos').item() == pytest.approx(1 + 12 / math.sqrt(60 * 214), abs=1e-6)


def test_unknown_metric_is_a_user_error():
    with pytest.raises(UserError, match='dis_metric'):
        match_loss(SYN, REAL, 'l1')


# ------------------------------------------------------------------------------------------ loops

def test_get_loops_keeps_the_original_table_and_derives_the_rest():
    assert [get_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20),
                                                                (40, 15), (50, 10)]
    assert [get_loops(i) for i in (2, 5, 7, 100, 1000)] == [(2, 250), (5, 100), (7, 71), (50, 10), (50, 10)]


def test_an_iteration_matches_outer_times_and_trains_in_between(monkeypatch):
    calls = []
    monkeypatch.setattr(matching, 'matching_step', lambda *a: calls.append('match') or 0.0)
    monkeypatch.setattr(matching, 'train_on_synset', lambda *a: calls.append(a[-1]))
    data, sampler = toy_data()
    synset = SyntheticSet(3, 1, 1, (12, 12))
    optimizer = torch.optim.SGD(synset.parameters(), lr=0.1)
    matching.dc_iteration(toy_args(), data, synset, optimizer, sampler, ParamDiffAug(), (3, 5))
    assert calls == ['match', 5, 'match', 5, 'match']


# ------------------------------------------------------------------------------------------ matching step

def toy_args(**kw):
    return argparse.Namespace(**{'model': 'ConvNet', 'batch_real': 8, 'batch_train': 256, 'lr_net': 0.01,
                                 'dsa': False, 'dsa_strategy': 'none', 'dis_metric': 'ours', **kw})


def toy_data(num_classes=3, per_class=20, size=12):
    """Random 1-channel images whose mean depends on the class."""
    torch.manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 1, size, size) + labels.view(-1, 1, 1, 1).float()
    data = argparse.Namespace(channel=1, num_classes=num_classes, im_size=(size, size))
    return data, ClassSampler(images, labels, num_classes)


@pytest.mark.parametrize('classes', [None, [2, 0]])
def test_matching_loss_sums_the_distances_of_the_sets_classes(classes):
    """Per class c of the set: the distance between the gradients of the cross-entropy (label c) on a real
    batch of c and on c's synthetic images. A set of some classes (continual learning) keeps global labels."""
    _, sampler = toy_data()
    torch.manual_seed(1)
    net = get_network('ConvNet', 1, 3, (12, 12))
    synset = SyntheticSet(3, 2, 1, (12, 12), classes=classes)
    torch.manual_seed(3)
    loss = matching_loss(net, synset, sampler, toy_args(), ParamDiffAug())
    torch.manual_seed(3)
    real = sampler.sample(8, synset.classes)[0]
    params, expected = list(net.parameters()), 0
    for c, x_real, x_syn in zip(synset.classes, real.split(8), synset.images().split(2)):
        gw_real = torch.autograd.grad(F.cross_entropy(net(x_real), torch.full((8,), c)), params)
        gw_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), torch.full((2,), c)), params)
        expected = expected + match_loss(gw_syn, gw_real, 'ours')
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('rank, dsa', [(None, False), (2, False), (None, True)])
def test_one_matching_step_lowers_the_matching_loss(rank, dsa):
    data, sampler = toy_data()
    args = toy_args(dsa=dsa, dsa_strategy='color_crop_cutout_scale_rotate' if dsa else 'none')
    torch.manual_seed(1)
    net = get_network('ConvNet', 1, 3, (12, 12))
    synset = SyntheticSet(3, 1, 1, (12, 12), rank=rank)
    optimizer = torch.optim.SGD(synset.parameters(), lr=0.01)

    def loss():  # the same real batch and DSA seed every time
        torch.manual_seed(2)
        return matching_loss(net, synset, sampler, args, ParamDiffAug())

    before = loss().item()
    torch.manual_seed(2)
    assert matching_step(net, synset, optimizer, sampler, args, ParamDiffAug()) == pytest.approx(before)
    after = loss().item()
    assert after < before - 1e-3
    assert all(p.grad is None for p in net.parameters())  # the network itself is not updated


def test_batch_norm_is_set_from_16_real_images_per_class_then_frozen():
    data, sampler = toy_data()
    torch.manual_seed(1)
    net = get_network('ConvNetBN', 1, 3, (12, 12))
    bn = batch_norm_modules(net)
    assert len(bn) == 3
    torch.manual_seed(5)
    first_batch = sampler.sample(16)[0]
    with torch.no_grad():
        conv_mean = net.features[0](first_batch).mean(dim=(0, 2, 3))
    torch.manual_seed(5)
    freeze_batch_norm(net, sampler, [0, 1, 2])
    # one momentum-0.1 update from the initial statistics (mean 0), from 3 x 16 images
    torch.testing.assert_close(bn[0].running_mean, 0.1 * conv_mean)
    assert all(not m.training for m in bn) and net.training
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bn]
    synset = SyntheticSet(3, 2, 1, (12, 12))
    matching_loss(net, synset, sampler, toy_args(model='ConvNetBN'), ParamDiffAug()).backward()
    for m, (mean, var, count) in zip(bn, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)


# ------------------------------------------------------------------------------------------ flags

def dc_args(*flags, low_rank=False):
    return parse_args(main_DC.make_dc_parser(low_rank), ['--dataset', 'MNIST', *flags],
                      prepare=main_DC.resolve_method)


def test_method_decides_dsa():
    dc = dc_args()
    assert dc.method == 'DC' and not dc.dsa and dc.dsa_strategy == 'none'
    dsa = dc_args('--method', 'DSA')
    assert dsa.dsa and dsa.dsa_strategy == default_dsa_strategy('MNIST')  # not the original's silent 'None'
    assert dc_args('--method', 'DSA', '--dsa_strategy', 'crop').dsa_strategy == 'crop'
    assert (dc.Iteration, dc.lr_img, dc.eval_mode, dc.eval_every, dc.init) == (1000, 0.1, 'S', 500, 'noise')
    assert dc_args('--rank', '4', low_rank=True).rank == 4


@pytest.mark.parametrize('flags, message', [
    (['--dsa_strategy', 'crop'], '--method DC uses no DSA'),
    (['--method', 'DSA', '--dsa_strategy', 'none'], '--method DSA needs DSA operations'),
])
def test_contradicting_method_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=message):
        dc_args(*flags)


def test_every_config_parses_with_its_method():
    paths = [p for p in CONFIGS.glob('*/*.json') if p.name.split('_')[0] in ('DC', 'DSA', 'LoDC', 'LoDSA')]
    assert len(paths) >= 40
    for path in paths:
        method = path.name.split('_')[0]
        args = parse_args(main_DC.make_dc_parser(method.startswith('Lo')), ['--config', str(path)],
                          prepare=main_DC.resolve_method)
        assert args.method == method.removeprefix('Lo') and args.dsa == (args.method == 'DSA'), path
        assert args.epoch_eval_train is None, path  # the original's evaluation rule (section 3.3)


# ------------------------------------------------------------------------------------------ end to end

TINY = ['--device', 'cpu', '--dataset', 'MNIST', '--ipc', '1', '--Iteration', '2', '--num_exp', '1', '--num_eval', '1',
        '--epoch_eval_train', '1', '--batch_real', '16', '--test_images', '200']


@pytest.mark.parametrize('script, method, n, flags', [
    ('main_DC.py', 'DC', 1, []),
    ('main_DC.py', 'DSA', 1, ['--method', 'DSA', '--eval_mode', 'M']),
    ('main_LoDC.py', 'LoDC', 7, []),
])
def test_end_to_end_writes_every_output(tmp_path, mnist_path, script, method, n, flags):
    run_script(script, *TINY, *flags, '--data_path', mnist_path, '--save_path', tmp_path, '--run_name', 't')
    found = list((tmp_path / 'MNIST').glob(f'{method}_ipc1*/t'))
    assert len(found) == 1, found
    d = found[0]
    res = f'res_{method}_MNIST_ConvNet_{n}ipc.pt'
    evals = [2] if '--eval_mode' in flags else [0, 2]
    expected = {'args.json', 'log.txt', 'results.json', 'checkpoint.pt', res, *(f'grid_exp0_it{i}.png' for i in evals)}
    assert expected <= {p.name for p in d.iterdir()}
    images, labels = torch.load(d / res)['data'][0]
    assert images.shape == (10 * n, 1, 28, 28) and labels.tolist() == sorted(labels.tolist())
    results = json.loads((d / 'results.json').read_text())
    assert results['method'] == method and results['complete'] and results['images_per_class'] == n
    pool = EVAL_POOLS['M'] if '--eval_mode' in flags else ['ConvNet']
    assert sorted(results['final']) == sorted(pool)
    assert sorted({(e['iteration'], e['model']) for e in results['evaluations']}) == sorted(
        (i, m) for i in evals for m in pool)
    log = (d / 'log.txt').read_text()
    assert 'outer_loop 1, inner_loop 1' in log
    table = log.split('Final test accuracy')[1]
    assert all(f'  {m} ' in table for m in pool)
    args = json.loads((d / 'args.json').read_text())
    assert args['dsa'] == (method == 'DSA')
    if method == 'LoDC':
        a, b, _ = torch.load(d / 'factors_LoDC_MNIST_ConvNet_7ipc.pt')['data'][0]
        torch.testing.assert_close(a @ b, images)


# ------------------------------------------------------------------------------------------ quality

QUALITY_MODEL = 'ConvNetW32'  # a width-32 ConvNet keeps condensation and evaluation within a CPU test budget


def test_short_dc_beats_random_real_images(mnist_path):
    """DC at 1 image per class from noise, 15 iterations (lr_img 1.0 for the short budget, 64 real images
    per class), against 1 random real image per class (3 draws), both evaluated by training fresh networks
    (300 epochs, no augmentation) and testing on 1000 MNIST test images. Measured with seeds 0-3: DC 0.66
    to 0.71 (3 networks), random 0.46 to 0.53, margins 0.14 to 0.22 (seed 0: 0.70 vs 0.53); we assert 0.07."""
    data = load_dataset('MNIST', mnist_path)
    sampler = ClassSampler(data.images_train, data.labels_train, data.num_classes)
    test_x, test_y = data.images_test[:1000], data.labels_test[:1000]

    def accuracy(images, labels, nets):
        accs = [evaluate_synset(get_network(QUALITY_MODEL, 1, 10, (28, 28)), images, labels, test_x, test_y,
                                0.01, 300, 256, None)[1] for _ in range(nets)]
        return sum(accs) / nets

    torch.manual_seed(0)
    random_real = sum(accuracy(*sampler.sample(1), nets=1) for _ in range(3)) / 3
    args = toy_args(model=QUALITY_MODEL, batch_real=64)
    synset = SyntheticSet(10, 1, 1, (28, 28))
    optimizer = torch.optim.SGD(synset.parameters(), lr=1.0, momentum=0.5)
    for _ in range(15):
        matching.dc_iteration(args, data, synset, optimizer, sampler, ParamDiffAug(), get_loops(1))
    dc = accuracy(synset.images().detach(), synset.labels, nets=3)
    assert dc > random_real + 0.07, (dc, random_real)
