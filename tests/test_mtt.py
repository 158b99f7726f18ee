"""buffer.py, MTT and LoMTT on a subset of real MNIST (2000 train and 500 test images of the files in
../shared/data, written in the raw MNIST format): expert files, ZCA, outputs, the constant-memory mode
end to end, --resume, the guards and the expert errors. The trajectory maths is in test_trajectory.py."""
import json
import re
import shutil
import struct
from argparse import Namespace

import pytest
import torch
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

import buffer
import main_MTT
from buffer import expert_seed
from conftest import DATA, REPO, run_script
from networks import get_network
from utils import UserError
from utils.data import Data, load_dataset, zca_whiten
from utils.run import run_main

RAW = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
MLP_SHAPES = [(128, 784), (128,), (128, 128), (128,), (10, 128), (10,)]
BUFFER = ['--device', 'cpu', '--dataset', 'MNIST', '--model', 'MLP', '--num_experts', '2', '--train_epochs', '2',
          '--save_interval', '1', '--batch_train', '128']
TINY = ['--device', 'cpu', '--dataset', 'MNIST', '--model', 'MLP', '--ipc', '1', '--Iteration', '3', '--eval_every', '2',
        '--num_eval', '1', '--epoch_eval_train', '2', '--syn_steps', '3', '--expert_epochs', '1',
        '--max_start_epoch', '2', '--lr_img', '100']


@pytest.fixture(scope='module')
def small_mnist(tmp_path_factory):
    """A data_path holding the first 2000 train and 500 test images of the real MNIST files."""
    src = DATA / 'MNIST' / 'raw'
    if not src.exists():
        pytest.skip(f'real MNIST not found in {DATA} (set CONDENSE_DATA)')
    root = tmp_path_factory.mktemp('data')
    (root / 'MNIST' / 'raw').mkdir(parents=True)
    for name in RAW:
        t = read_sn3_pascalvincent_tensor(str(src / name))[:2000 if name.startswith('train') else 500]
        with open(root / 'MNIST' / 'raw' / name, 'wb') as f:
            f.write(struct.pack('>I', 0x0800 + t.dim()) + b''.join(struct.pack('>I', d) for d in t.shape))
            f.write(t.numpy().tobytes())
    return root


@pytest.fixture(scope='module')
def buffers(small_mnist, tmp_path_factory):
    """Expert buffers of 2 MLP experts x 2 epochs, without and with ZCA (one file per expert)."""
    path = tmp_path_factory.mktemp('buffers')
    run_script('buffer.py', *BUFFER, '--data_path', small_mnist, '--buffer_path', path)
    buffer.main([*BUFFER, '--zca', '--data_path', str(small_mnist), '--buffer_path', str(path)])
    return path


def mtt_dir(save, method, run_name='t'):
    found = list((save / 'MNIST').glob(f'{method}_ipc1*/{run_name}'))
    assert len(found) == 1, found
    return found[0]


def test_buffer_writes_the_documented_structure(buffers):
    folder = buffers / 'MNIST_NO_ZCA' / 'MLP'
    assert sorted(p.name for p in folder.glob('replay_buffer_*.pt')) == ['replay_buffer_0.pt', 'replay_buffer_1.pt']
    experts = [t for n in (0, 1) for t in torch.load(folder / f'replay_buffer_{n}.pt')]
    assert len(experts) == 2
    for k, trajectory in enumerate(experts):
        assert isinstance(trajectory, list) and len(trajectory) == 3  # train_epochs + 1 snapshots
        for snap in trajectory:
            assert isinstance(snap, list) and [tuple(t.shape) for t in snap] == MLP_SHAPES
            assert all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in snap)
        # the first snapshot is the network drawn with expert k's seed, and training moves it every epoch
        torch.manual_seed(expert_seed(0, k))
        fresh = get_network('MLP', 1, 10, (28, 28))
        assert all(torch.equal(a, b) for a, b in zip(trajectory[0], fresh.parameters()))
        for before, after in zip(trajectory, trajectory[1:]):
            assert not torch.equal(before[0], after[0])
    assert not torch.equal(experts[0][0][0], experts[1][0][0])
    log = (folder / 'log.txt').read_text()
    assert log.count('train acc') == 4 and log.count('test acc') == 4
    assert (buffers / 'MNIST' / 'MLP' / 'replay_buffer_1.pt').exists()  # --zca drops the _NO_ZCA suffix


def test_buffer_rerun_continues_after_existing_files(buffers, small_mnist, tmp_path, capsys):
    shutil.copytree(buffers / 'MNIST_NO_ZCA', tmp_path / 'MNIST_NO_ZCA')
    folder = tmp_path / 'MNIST_NO_ZCA' / 'MLP'
    before = {n: (folder / f'replay_buffer_{n}.pt').read_bytes() for n in (0, 1)}
    common = [*BUFFER, '--data_path', str(small_mnist), '--buffer_path', str(tmp_path)]
    buffer.main([*common, '--num_experts', '3'])
    assert '2 experts in 2 files; files to make [2]' in capsys.readouterr().out
    assert {n: (folder / f'replay_buffer_{n}.pt').read_bytes() for n in (0, 1)} == before
    third = torch.load(folder / 'replay_buffer_2.pt')
    assert len(third) == 1 and len(third[0]) == 3
    torch.manual_seed(expert_seed(0, 2))  # expert 2 is what a single run of 3 experts would have made
    assert all(torch.equal(a, b) for a, b in zip(third[0][0], get_network('MLP', 1, 10, (28, 28)).parameters()))
    buffer.main([*common, '--num_experts', '3'])
    assert 'nothing to do' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_main(buffer.main, [*common, '--num_experts', '4', '--lr_teacher', '0.1'])
    assert e.value.code == 2 and '--lr_teacher 0.01 (not 0.1)' in capsys.readouterr().err


def test_file_n_holds_experts_from_n_times_save_interval():
    assert buffer.file_plan(5, 2) == {0: [0, 1], 1: [2, 3], 2: [4]}
    assert buffer.file_plan(6, 2)[2] == [4, 5]  # a short last file is redone when --num_experts grows


def test_zca_whitening_then_its_inverse_returns_the_input():
    torch.manual_seed(0)
    mean, std = [0.5, 0.4], [0.2, 0.25]
    mix = torch.randn(2 * 4 * 4, 2 * 4 * 4) / 8  # correlated pixels
    raw = lambda n: (0.5 + torch.randn(n, 2 * 4 * 4) @ mix).clamp(0, 1).view(n, 2, 4, 4)
    train, test = raw(600), raw(50)
    norm = lambda x: (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    data = Data('toy', 2, (4, 4), 2, ['a', 'b'], mean, std, norm(train), torch.zeros(600, dtype=torch.long),
                norm(test), torch.zeros(50, dtype=torch.long))
    unwhiten = zca_whiten(data)
    assert data.images_train.shape == train.shape and data.images_test.shape == test.shape
    torch.testing.assert_close(unwhiten(data.images_train), train, atol=1e-4, rtol=0)
    torch.testing.assert_close(unwhiten(data.images_test), test, atol=1e-4, rtol=0)
    flat = data.images_train.flatten(1)
    assert flat.mean(0).abs().max() < 1e-4
    eig = torch.linalg.eigvalsh(torch.cov(flat.T.double()))
    assert eig.max() < 1 and eig.max() > 0.5  # eps 0.1: variance s / (s + 0.1) along each eigenvector


def test_mtt_end_to_end_writes_every_output(buffers, small_mnist, tmp_path):
    run_script('main_MTT.py', *TINY, '--data_path', small_mnist, '--buffer_path', buffers,
               '--save_path', tmp_path, '--run_name', 't')
    d = mtt_dir(tmp_path, 'MTT')
    names = {p.name for p in d.iterdir()}
    assert {'args.json', 'log.txt', 'results.json', 'checkpoint.pt', 'res_MTT_MNIST_MLP_1ipc.pt',
            'grid_exp0_it0.png', 'grid_exp0_it2.png', 'grid_exp0_it3.png'} <= names
    images, labels = torch.load(d / 'res_MTT_MNIST_MLP_1ipc.pt')['data'][0]
    assert images.shape == (10, 1, 28, 28) and torch.equal(labels, torch.arange(10))
    results = json.loads((d / 'results.json').read_text())
    assert results['complete'] and [e['iteration'] for e in results['evaluations']] == [0, 2, 3]
    best = results['best_over_evaluations']['MLP']
    assert 'test set' in best['selected_on']
    assert best['mean'] == max(e['mean'] for e in results['evaluations'])
    assert results['final']['MLP']['mean'] == results['evaluations'][-1]['mean']
    assert results['syn_lr']['0'] > 0 and results['syn_lr']['0'] != 0.01  # learned, used for evaluation
    log = (d / 'log.txt').read_text()
    assert 'Best mean test accuracy' in log and 'selected on the test set' in log


def test_lomtt_zca_end_to_end_writes_every_output(buffers, small_mnist, tmp_path):
    run_script('main_LoMTT.py', *TINY, '--zca', '--matching', 'exact', '--standardize_eval', '--load_all',
               '--data_path', small_mnist, '--buffer_path', buffers, '--save_path', tmp_path, '--run_name', 't')
    d = mtt_dir(tmp_path, 'LoMTT')
    names = {p.name for p in d.iterdir()}
    assert {'args.json', 'log.txt', 'results.json', 'checkpoint.pt', 'res_LoMTT_MNIST_MLP_7ipc.pt',
            'factors_LoMTT_MNIST_MLP_7ipc.pt', 'unwhitened_LoMTT_MNIST_MLP_7ipc.pt',
            'grid_exp0_it0.png', 'grid_exp0_it2.png', 'grid_exp0_it3.png'} <= names
    images, labels = torch.load(d / 'res_LoMTT_MNIST_MLP_7ipc.pt')['data'][0]
    a, b, _ = torch.load(d / 'factors_LoMTT_MNIST_MLP_7ipc.pt')['data'][0]
    assert a.shape == (70, 1, 28, 2) and b.shape == (70, 1, 2, 28)
    torch.testing.assert_close(a @ b, images)
    # the saved images stay whitened (evaluation uses the whitened test set); the extra file un-whitens them
    unwhiten = zca_whiten(load_dataset('MNIST', str(small_mnist)))
    shown, shown_labels = torch.load(d / 'unwhitened_LoMTT_MNIST_MLP_7ipc.pt')['data'][0]
    torch.testing.assert_close(shown, unwhiten(images), atol=1e-4, rtol=1e-4)
    assert torch.equal(shown_labels, labels)
    args = json.loads((d / 'args.json').read_text())
    assert args['standardize_eval'] and args['init'] == 'noise' and args['lr_lr'] == 1e-7  # LoMTT defaults


def test_exact_mode_learns_the_same_set_as_unrolled(buffers, small_mnist, tmp_path):
    common = [*TINY, '--Iteration', '2', '--data_path', str(small_mnist), '--buffer_path', str(buffers),
              '--save_path', str(tmp_path), '--lr_lr', '1e-3']
    sets = {}
    for mode in ('unrolled', 'exact', 'tesla'):
        main_MTT.main([*common, '--matching', mode, '--run_name', mode])
        d = mtt_dir(tmp_path, 'MTT', mode)
        sets[mode] = (torch.load(d / 'res_MTT_MNIST_MLP_1ipc.pt')['data'][0][0],
                      json.loads((d / 'results.json').read_text())['syn_lr']['0'])
    x_unrolled, lr_unrolled = sets['unrolled']
    torch.testing.assert_close(sets['exact'][0], x_unrolled, atol=1e-4, rtol=1e-4)
    assert sets['exact'][1] == pytest.approx(lr_unrolled, rel=1e-5)
    assert (sets['tesla'][0] - x_unrolled).abs().max() > 1e-3  # the approximation is not the same gradient


def test_resume_ends_with_the_same_synthetic_set(buffers, small_mnist, tmp_path, monkeypatch):
    args = [*TINY, '--Iteration', '5', '--checkpoint_every', '2', '--rank', '2', '--max_start_epoch', '1',
            '--data_path', str(small_mnist), '--buffer_path', str(buffers), '--save_path', str(tmp_path)]
    main_MTT.main([*args, '--run_name', 'whole'], low_rank=True)
    whole = mtt_dir(tmp_path, 'LoMTT', 'whole')

    calls, real = [0], main_MTT.trajectory_loss_and_grads

    def dying(*a, **k):  # killed at iteration 3, after the checkpoint at 2 (the experts switch files at 2)
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(main_MTT, 'trajectory_loss_and_grads', dying)
    with pytest.raises(KeyboardInterrupt):
        main_MTT.main([*args, '--run_name', 'killed'], low_rank=True)
    monkeypatch.setattr(main_MTT, 'trajectory_loss_and_grads', real)
    d = mtt_dir(tmp_path, 'LoMTT', 'killed')
    assert torch.load(d / 'checkpoint.pt', weights_only=False)['it'] == 2
    main_MTT.main(['--resume', str(d), '--data_path', str(small_mnist)], low_rank=True)
    for name in ('res_LoMTT_MNIST_MLP_7ipc.pt', 'factors_LoMTT_MNIST_MLP_7ipc.pt'):
        for x, y in zip(torch.load(whole / name)['data'][0], torch.load(d / name)['data'][0]):
            assert torch.equal(x, y)
    r1, r2 = (json.loads((p / 'results.json').read_text()) for p in (whole, d))
    assert r1['syn_lr'] == r2['syn_lr'] and r1['final'] == r2['final']


@pytest.mark.parametrize('fault, message', [
    ('lr', r'diverged at iteration 0 \(loss [0-9.]+, syn_lr -'),
    ('nan', r'diverged at iteration 0 \(loss nan'),
])
def test_guard_stops_and_saves_the_set(buffers, small_mnist, tmp_path, monkeypatch, capsys, fault, message):
    real = main_MTT.trajectory_loss_and_grads

    def faulty(*a, **k):
        loss, grad_x, grad_lr = real(*a, **k)
        if fault == 'lr':  # a gradient that drives the learned rate below zero in one step
            return loss, grad_x, torch.full_like(grad_lr, 1e6)
        return float('nan'), grad_x, grad_lr

    monkeypatch.setattr(main_MTT, 'trajectory_loss_and_grads', faulty)
    with pytest.raises(SystemExit) as e:
        run_main(main_MTT.main, [*TINY, '--data_path', str(small_mnist), '--buffer_path', str(buffers),
                                 '--save_path', str(tmp_path), '--run_name', 't'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    err = err.splitlines()[-1]  # (the lines before are progress bars)
    assert err.startswith('error: ') and 'lower --lr_lr or --lr_img' in err
    assert re.search(message, err)
    d = mtt_dir(tmp_path, 'MTT')
    saved = torch.load(d / 'stopped_exp0_it0.pt')
    assert saved['iteration'] == 0 and saved['images'].shape == (10, 1, 28, 28)
    assert torch.isfinite(saved['images']).all() and (saved['syn_lr'] < 0) == (fault == 'lr')
    assert (d / 'grid_exp0_stopped_it0.png').exists() and 'stopped' in (d / 'log.txt').read_text()


def test_missing_or_mismatched_experts_name_the_folder(buffers, small_mnist, tmp_path, capsys):
    def error(*flags):
        with pytest.raises(SystemExit) as e:
            run_main(main_MTT.main, [*TINY, '--data_path', str(small_mnist), '--save_path', str(tmp_path / 'out'),
                                     *flags])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert f'in {tmp_path / "MNIST_NO_ZCA" / "MLP"}' in error('--buffer_path', str(tmp_path))
    shutil.copytree(buffers / 'MNIST_NO_ZCA' / 'MLP', tmp_path / 'MNIST_NO_ZCA' / 'ConvNetD1')
    err = error('--buffer_path', str(tmp_path), '--model', 'ConvNetD1')
    assert 'MNIST_NO_ZCA/ConvNetD1' in err and 'another model or dataset' in err
    err = error('--buffer_path', str(buffers), '--max_start_epoch', '2', '--expert_epochs', '2')
    assert 'have 2 epochs' in err and 'need 3' in err
    assert not (tmp_path / 'out').exists()  # stopped before making a run folder


def fake_buffer(folder, files=3, per_file=2, epochs=2):
    """Trajectories whose every value is a unique expert id (file * 10 + expert), one parameter of size 3."""
    folder.mkdir(parents=True)
    for f in range(files):
        torch.save([[[torch.full((3,), float(f * 10 + k))] for _ in range(epochs + 1)] for k in range(per_file)],
                   folder / f'replay_buffer_{f}.pt')


def expert_args(tmp_path, **kw):
    return Namespace(**{'buffer_path': str(tmp_path), 'dataset': 'MNIST', 'model': 'M', 'zca': False,
                        'max_start_epoch': 1, 'expert_epochs': 1, 'load_all': False, 'max_files': None,
                        'max_experts': None, **kw})


def test_experts_file_by_file_order_and_resume(tmp_path):
    fake_buffer(tmp_path / 'MNIST_NO_ZCA' / 'M')
    torch.manual_seed(0)
    experts = main_MTT.Experts(expert_args(tmp_path), 3)
    experts.restart()
    ids = [int(experts.next()[0, 0]) for _ in range(6)]
    assert sorted(ids) == [0, 1, 10, 11, 20, 21]  # one pass visits every expert once
    assert [i // 10 for i in ids[::2]] == [i // 10 for i in ids[1::2]]  # ... a file at a time
    assert experts.next().shape == (2, 3)  # only the max_start_epoch + expert_epochs snapshots used
    state, rng = experts.state_dict(), torch.get_rng_state()
    after = [int(experts.next()[0, 0]) for _ in range(7)]
    again = main_MTT.Experts(expert_args(tmp_path), 3)
    again.restart()
    again.load_state_dict(state)
    torch.set_rng_state(rng)
    assert [int(again.next()[0, 0]) for _ in range(7)] == after

    few = main_MTT.Experts(expert_args(tmp_path, max_files=2, max_experts=1), 3)
    few.restart()
    assert len({int(few.next()[0, 0]) for _ in range(12)}) == 2
    every = main_MTT.Experts(expert_args(tmp_path, load_all=True), 3)
    assert {int(every.next()[0, 0]) for _ in range(200)} == {0, 1, 10, 11, 20, 21}
    with pytest.raises(UserError, match='parameters'):
        main_MTT.Experts(expert_args(tmp_path), 4)


def test_student_batches_are_permutation_chunks_taken_from_the_end():
    torch.manual_seed(0)
    perms = [torch.randperm(10) for _ in range(2)]
    torch.manual_seed(0)
    batches = main_MTT.student_batches(10, 4, 5, 'cpu')
    assert [len(b) for b in batches] == [2, 4, 4, 2, 4]
    assert torch.equal(torch.cat(batches[:3]), torch.cat([perms[0][8:], perms[0][4:8], perms[0][:4]]))
    assert torch.equal(torch.cat(batches[3:]), torch.cat([perms[1][8:], perms[1][4:8]]))


def test_every_mtt_config_parses_to_its_values():
    paths = sorted(REPO.glob('configs/*/*MTT_ipc*.json'))
    assert len(paths) >= 11
    for path in paths:
        low_rank = path.name.startswith('LoMTT')
        args = main_MTT.get_args(['--config', str(path)], low_rank)
        for key, value in json.loads(path.read_text()).items():
            assert key.startswith('_') or getattr(args, key) == value, (path, key)
        assert args.max_start_epoch + args.expert_epochs <= 50  # the experts of the buffer command suffice
