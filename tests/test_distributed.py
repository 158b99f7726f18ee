"""torchrun with 2 CPU processes (gloo) against one process: the same results.json, res_*.pt and expert
files, bit for bit, for DM (experiments split, classes split), DSA (evaluation networks split) and
buffer.py (expert files split); a killed 2-process run resumes; too many processes stop cleanly.

Both sides run with one thread per process (torchrun's default): convolution backward passes sum
partial results per thread, so only equal thread counts can agree to the bit."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, wait_until

TINY = ['--device', 'cpu', '--dataset', 'MNIST', '--model', 'ConvNetW32', '--ipc', '1', '--num_eval', '2',
        '--train_together', '1', '--epoch_eval_train', '2', '--test_images', '300']


def launch(script, args, processes=1):
    """python script args, or torchrun with `processes` processes; one OpenMP thread each."""
    prefix = [sys.executable] if processes == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([*prefix, str(REPO / script), *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(script, args, processes=1):
    proc = launch(script, args, processes)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_tensors(a, b):
    x, y = torch.load(a), torch.load(b)
    flat = lambda d: [t for entry in d['data'] for t in entry]  # noqa: E731
    assert len(flat(x)) == len(flat(y)) and all(torch.equal(s, t) for s, t in zip(flat(x), flat(y)))


@pytest.mark.parametrize('script, flags, folder, n', [
    ('main_DM.py', ['--num_exp', '2', '--batch_real', '16'], 'DM_ipc1', 1),                  # experiments split
    ('main_LoDM.py', ['--num_exp', '1', '--batch_real', '128'], 'LoDM_ipc1_r2', 7),         # classes split
])
def test_dm_on_two_processes_equals_one(tmp_path, mnist_path, script, flags, folder, n):
    args = [*TINY, *flags, '--Iteration', '3', '--eval_every', '2', '--data_path', mnist_path,
            '--save_path', tmp_path]
    run(script, [*args, '--run_name', 'one'])
    run(script, [*args, '--run_name', 'two'], processes=2)
    one, two = tmp_path / 'MNIST' / folder / 'one', tmp_path / 'MNIST' / folder / 'two'
    res = f'res_{folder.split("_")[0]}_MNIST_ConvNetW32_{n}ipc.pt'
    same_files(one, two, ['results.json'])
    same_tensors(one / res, two / res)
    assert (two / 'log_rank1.txt').exists() and not (two / 'results_rank1.json').exists()


def test_dsa_evaluation_split_over_two_processes_equals_one(tmp_path, mnist_path):
    args = [*TINY, '--method', 'DSA', '--num_exp', '1', '--Iteration', '2', '--batch_real', '16',
            '--data_path', mnist_path, '--save_path', tmp_path]
    run('main_DC.py', [*args, '--run_name', 'one'])
    run('main_DC.py', [*args, '--run_name', 'two'], processes=2)
    one, two = tmp_path / 'MNIST' / 'DSA_ipc1' / 'one', tmp_path / 'MNIST' / 'DSA_ipc1' / 'two'
    same_files(one, two, ['results.json'])
    same_tensors(one / 'res_DSA_MNIST_ConvNetW32_1ipc.pt', two / 'res_DSA_MNIST_ConvNetW32_1ipc.pt')


def test_buffer_experts_split_over_two_processes_equal_one(tmp_path, mnist_path):
    args = ['--device', 'cpu', '--dataset', 'MNIST', '--model', 'MLP', '--num_experts', '3', '--train_epochs', '1',
            '--save_interval', '1', '--batch_train', '1024', '--data_path', mnist_path]
    run('buffer.py', [*args, '--buffer_path', tmp_path / 'one'])
    run('buffer.py', [*args, '--buffer_path', tmp_path / 'two'], processes=2)
    same_files(tmp_path / 'one' / 'MNIST_NO_ZCA' / 'MLP', tmp_path / 'two' / 'MNIST_NO_ZCA' / 'MLP',
               [f'replay_buffer_{n}.pt' for n in range(3)])


def test_a_killed_two_process_run_resumes(tmp_path, mnist_path):
    """Killed once both processes have checkpointed; resumed, it ends as the uninterrupted run."""
    args = [*TINY, '--num_exp', '1', '--batch_real', '128', '--Iteration', '8', '--eval_every', '8',
            '--checkpoint_every', '2', '--data_path', mnist_path, '--save_path', tmp_path]
    run('main_DM.py', [*args, '--run_name', 'whole'], processes=2)
    killed = launch('main_DM.py', [*args, '--run_name', 'killed'], processes=2)
    folder = tmp_path / 'MNIST' / 'DM_ipc1' / 'killed'
    wait_until(lambda: all((folder / f).exists() for f in ('checkpoint.pt', 'checkpoint_rank1.pt')), killed, 300,
               'checkpoint of both processes')
    killed.send_signal(signal.SIGTERM)  # torchrun stops its processes
    killed.communicate()
    assert not torch.load(folder / 'checkpoint.pt', weights_only=False)['saved']  # stopped midway
    run('main_DM.py', ['--resume', folder], processes=2)
    same_files(tmp_path / 'MNIST' / 'DM_ipc1' / 'whole', folder, ['results.json'])


def test_more_processes_than_work_stop_with_one_sentence(tmp_path, mnist_path):
    proc = launch('main_DM.py', [*TINY, '--num_exp', '1', '--batch_real', '16', '--Iteration', '1',
                                 '--data_path', mnist_path, '--save_path', tmp_path], processes=2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert err.count('error: 2 processes share each experiment but it has only 1 block(s) of classes') == 1
    assert not list(tmp_path.glob('MNIST/*/*'))  # stopped before making a run folder
