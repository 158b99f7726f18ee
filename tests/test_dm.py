"""DM and LoDM end to end on real MNIST: outputs, --resume, bad input, and the DM loss itself."""
import argparse
import json

import pytest
import torch

import main_DM
import utils.distribution as distribution
from conftest import run_script
from utils.augmentation import FULL_STRATEGY, ParamDiffAug
from utils.data import ClassSampler
from utils.run import run_main
from utils.synset import SyntheticSet

TINY = ['--device', 'cpu', '--dataset', 'MNIST', '--ipc', '1', '--Iteration', '3', '--eval_every', '2', '--num_exp', '1',
        '--num_eval', '1', '--epoch_eval_train', '2', '--batch_real', '16', '--test_images', '500']


def run_dir(save, method, run_name='t'):
    found = list((save / 'MNIST').glob(f'{method}_ipc1*/{run_name}'))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize('script, method, n', [('main_DM.py', 'DM', 1), ('main_LoDM.py', 'LoDM', 7)])
def test_end_to_end_writes_every_output(tmp_path, mnist_path, script, method, n):
    run_script(script, *TINY, '--data_path', mnist_path, '--save_path', tmp_path, '--run_name', 't')
    d = run_dir(tmp_path, method)
    names = {p.name for p in d.iterdir()}
    res = f'res_{method}_MNIST_ConvNet_{n}ipc.pt'
    assert {'args.json', 'log.txt', 'results.json', 'checkpoint.pt', res,
            'grid_exp0_it0.png', 'grid_exp0_it2.png', 'grid_exp0_it3.png'} <= names
    saved = torch.load(d / res)
    images, labels = saved['data'][0]
    assert images.shape == (10 * n, 1, 28, 28) and labels.tolist() == sorted(labels.tolist())
    results = json.loads((d / 'results.json').read_text())
    assert results['complete'] and results['images_per_class'] == n
    assert [e['iteration'] for e in results['evaluations']] == [0, 2, 3]
    final = results['final']['ConvNet']
    assert len(final['accs']) == 1 and len(final['accs'][0]) == 1 and 0 <= final['mean'] <= 1
    assert saved['accs_all_exps']['ConvNet'] == final['accs'][0]
    log = (d / 'log.txt').read_text()
    assert f'{n} images per class' in log and 'Final test accuracy' in log
    if method == 'LoDM':
        factors = torch.load(d / f'factors_LoDM_MNIST_ConvNet_{n}ipc.pt')
        a, b, _ = factors['data'][0]
        assert a.shape == (70, 1, 28, 2) and b.shape == (70, 1, 2, 28) and factors['rank'] == 2
        torch.testing.assert_close(a @ b, images)
        assert a.numel() + b.numel() == 10 * 28 * 28  # exactly the budget of one image per class


def test_resume_ends_with_the_same_synthetic_set(tmp_path, mnist_path, monkeypatch):
    args = [*TINY, '--Iteration', '6', '--checkpoint_every', '2', '--num_exp', '2', '--rank', '2',
            '--data_path', mnist_path, '--save_path', str(tmp_path)]
    main_DM.main([*args, '--run_name', 'whole'], low_rank=True)
    whole = torch.load(run_dir(tmp_path, 'LoDM', 'whole') / 'res_LoDM_MNIST_ConvNet_7ipc.pt')

    calls, real_loss = [0], distribution.dm_backward

    def dying_loss(*a, **k):  # the process is killed in experiment 1, after its checkpoint at iteration 4
        calls[0] += 1
        if calls[0] == 6 + 5:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(distribution, 'dm_backward', dying_loss)
    with pytest.raises(KeyboardInterrupt):
        main_DM.main([*args, '--run_name', 'killed'], low_rank=True)
    monkeypatch.setattr(distribution, 'dm_backward', real_loss)
    d = run_dir(tmp_path, 'LoDM', 'killed')
    assert torch.load(d / 'checkpoint.pt', weights_only=False)['it'] == 4
    main_DM.main(['--resume', str(d)], low_rank=True)
    resumed = torch.load(d / 'res_LoDM_MNIST_ConvNet_7ipc.pt')
    assert len(resumed['data']) == 2
    for (x1, y1), (x2, y2) in zip(whole['data'], resumed['data']):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed['accs_all_exps'] == whole['accs_all_exps']


def test_resume_with_other_settings_is_refused(tmp_path, mnist_path, capsys):
    main_DM.main([*TINY, '--Iteration', '0', '--data_path', mnist_path, '--save_path', str(tmp_path),
                  '--run_name', 'r'])
    d = run_dir(tmp_path, 'DM', 'r')
    with pytest.raises(SystemExit) as e:
        run_main(main_DM.main, ['--resume', str(d), '--Iteration', '9'])
    assert e.value.code == 2
    assert '--Iteration 0 (not 9)' in capsys.readouterr().err


@pytest.mark.parametrize('flags, message', [
    (['--dataset', 'CIFAR11'], "unknown dataset 'CIFAR11'"),
    (['--model', 'ConvNetX'], "unknown model 'ConvNetX'"),
    (['--dsa_strategy', 'color_blur'], 'blur'),
    (['--ipc', '0'], '--ipc must be at least 1'),
    (['--rank', '15'], 'no image per class'),
    (['--dataset', 'CIFAR10', '--data_path', '{empty}'], 'CIFAR10 not found'),
    (['--resume', '{empty}'], 'args.json does not exist'),
])
def test_bad_input_stops_with_one_clear_sentence(tmp_path, mnist_path, flags, message):
    flags = [f.format(empty=tmp_path) for f in flags]
    proc = run_script('main_LoDM.py', *TINY, '--data_path', mnist_path, '--save_path', tmp_path / 'out',
                      *flags, check=False)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.startswith('error: ') and message in proc.stderr, proc.stderr
    assert not (tmp_path / 'out').exists()  # nothing half-made


def toy_dm(model='ConvNet', rank=None, dsa=True, per_class=8):
    """4 classes of `per_class` random 1x12x12 images, a synthetic set of budget ipc 2, DM arguments."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(per_class)
    images = torch.randn(len(labels), 1, 12, 12) + labels.view(-1, 1, 1, 1)
    data = argparse.Namespace(channel=1, num_classes=4, im_size=(12, 12))
    args = argparse.Namespace(model=model, batch_real=8, dsa=dsa, compile=False,
                              dsa_strategy=FULL_STRATEGY if dsa else 'none')
    synset = SyntheticSet(4, 2, 1, (12, 12), rank)
    return data, ClassSampler(images, labels, 4), synset, args


def dm_gradient(net, synset, sampler, args, blocks, seed=1):
    synset.zero_grad()
    torch.manual_seed(seed)
    loss = distribution.dm_backward(net, synset, sampler, args, ParamDiffAug(), blocks)
    return loss, [p.grad.clone() for p in synset.parameters()]


def test_dm_loss_is_the_sum_of_squared_class_mean_differences():
    data, sampler, synset, args = toy_dm(dsa=False)  # batch_real = class size: every real image counts
    net = distribution.frozen_network('ConvNet', data, 'cpu')
    loss, _ = dm_gradient(net, synset, sampler, args, [[0, 1, 2, 3]])
    real, syn = sampler.images, synset.images().detach()
    by_hand = sum(((net.embed(real[8 * c:8 * c + 8]).mean(0) - net.embed(syn[2 * c:2 * c + 2]).mean(0)) ** 2).sum()
                  for c in range(4))
    torch.testing.assert_close(loss, by_hand, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('model, rank', [('ConvNet', None), ('ConvNet', 2), ('ConvNetBN', None)])
def test_class_blocks_give_the_one_pass_loss_and_gradient(monkeypatch, model, rank):
    """Blocks of one class (a 8-image real chunk) against one block of all classes: the same loss and the
    same gradient; batch-norm networks always take one block."""
    data, sampler, synset, args = toy_dm(model, rank)
    net = distribution.frozen_network(model, data, 'cpu')
    whole = dm_gradient(net, synset, sampler, args, [[0, 1, 2, 3]])
    monkeypatch.setitem(distribution.REAL_CHUNK, 'cpu', 8)
    blocks = distribution.class_blocks(args, synset.classes, 'cpu')
    assert blocks == ([[0, 1, 2, 3]] if 'BN' in model else [[0], [1], [2], [3]])
    chunked = dm_gradient(net, synset, sampler, args, blocks)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    for g_chunked, g_whole in zip(chunked[1], whole[1]):
        torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-6)


def test_blocks_condensed_apart_add_up_exactly(monkeypatch):
    """Two processes each taking half of the blocks, with the same random state, compute bit for bit what one
    process computes for all of them: the gradient rows of their own classes, zeros elsewhere."""
    monkeypatch.setitem(distribution.REAL_CHUNK, 'cpu', 16)
    data, sampler, synset, args = toy_dm(rank=2)
    net = distribution.frozen_network('ConvNet', data, 'cpu')
    blocks = distribution.class_blocks(args, synset.classes, 'cpu')
    assert blocks == [[0, 1], [2, 3]]
    one = dm_gradient(net, synset, sampler, args, blocks)
    first, second = (dm_gradient(net, synset, sampler, args, part) for part in ([blocks[0]], [blocks[1]]))
    assert torch.equal(first[0] + second[0], one[0])
    half = 2 * synset.n  # rows of classes 0 and 1
    for g, g1, g2 in zip(one[1], first[1], second[1]):
        assert torch.equal(g[:half], g1[:half]) and torch.equal(g[half:], g2[half:])
        assert not g1[half:].any() and not g2[:half].any()
