"""DM and LoDM end to end on real MNIST: outputs, --resume, bad input, and the DM loss itself."""
import json

import pytest
import torch

import main_DM
from conftest import run_script
from networks import get_network
from utils.run import run_main

TINY = ['--dataset', 'MNIST', '--ipc', '1', '--Iteration', '3', '--eval_every', '2', '--num_exp', '1',
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

    calls, real_loss = [0], main_DM.dm_loss

    def dying_loss(*a, **k):  # the process is killed in experiment 1, after its checkpoint at iteration 4
        calls[0] += 1
        if calls[0] == 6 + 5:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(main_DM, 'dm_loss', dying_loss)
    with pytest.raises(KeyboardInterrupt):
        main_DM.main([*args, '--run_name', 'killed'], low_rank=True)
    monkeypatch.setattr(main_DM, 'dm_loss', real_loss)
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


def test_dm_loss_is_the_sum_of_squared_class_mean_differences():
    torch.manual_seed(0)
    net = get_network('ConvNet', 1, 3, (28, 28))
    real = torch.randn(12, 1, 28, 28)
    real_labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    syn = torch.randn(6, 1, 28, 28)
    syn_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    by_hand = sum(((net.embed(real[real_labels == c]).mean(0) - net.embed(syn[syn_labels == c]).mean(0)) ** 2).sum()
                  for c in range(3))
    f_real, f_syn = main_DM.embed(net, real, chunk=5), main_DM.embed(net, syn)
    ours = ((main_DM.class_means(f_real, real_labels, 3) - main_DM.class_means(f_syn, syn_labels, 3)) ** 2).sum()
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4)
