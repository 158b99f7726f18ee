"""reproduce.py: the registry against the configs and the reference, the commands it builds, and a smoke
run of two MNIST cells that is killed, resumed and skipped."""
import json
import os
import signal
import subprocess
import sys

import pytest

import reproduce
from conftest import REPO, wait_until
from utils.run import run_main

REFERENCE = REPO.parent / 'shared' / 'reference' / 'paper_tables.md'
CORESET_SCRIPT = REPO / 'main_coreset.py'

# Shrinks the smoke budget further for the test (appended after it); a checkpoint every iteration, so that
# a run killed midway can be resumed.
TINY = '--batch_real 16 --epoch_eval_train 2 --test_images 300 --Iteration 6 --eval_every 6 --checkpoint_every 1'


@pytest.mark.parametrize('cell', reproduce.CELLS, ids=lambda c: f'table{c.table}-{c.id}')
def test_every_cell_names_a_config_of_its_setting(cell):
    if cell.method in reproduce.CORESETS and not CORESET_SCRIPT.exists():
        pytest.skip('the coreset configs come with main_coreset.py')
    assert cell.config_path.exists() and cell.script.exists()
    cfg = json.loads(cell.config_path.read_text())
    assert (cfg['dataset'], cfg['ipc'], cfg.get('rank')) == (cell.dataset, cell.ipc, cell.rank)
    assert cell.config.startswith(f'{cell.method}_ipc{cell.ipc}')
    if 'method' in cfg:  # DC/DSA (and coresets) name it; the script implies the others
        assert cfg['method'].lower() == cell.method.removeprefix('Lo').lower()


def reference_tables():
    """{(table, dataset, ipc, method): number} from the Table 1 and Table 4 sections of the reference."""
    numbers, table, header = {}, None, None
    for line in REFERENCE.read_text().splitlines():
        if line.startswith('## '):
            table = 1 if 'Table 1' in line else 4 if 'Table 4' in line else None
            header = None
        elif table and line.startswith('|') and '---' not in line:
            row = [x.strip() for x in line.strip('|').split('|')]
            if header is None:
                header = row
            elif table == 1:
                numbers.update({(1, row[0], int(row[1]), m): v for m, v in zip(header[2:], row[2:])})
            else:
                numbers.update({(4, row[0], 1, m): v for m, v in zip(header[1:], row[1:])})
    return numbers


def test_every_paper_number_is_the_references():
    if not REFERENCE.exists():
        pytest.skip(f'{REFERENCE} not found')
    numbers = reference_tables()
    wrong = [(c.id, c.paper, numbers.get((c.table, c.dataset, c.ipc, c.method))) for c in reproduce.CELLS
             if numbers.get((c.table, c.dataset, c.ipc, c.method)) != c.paper]
    assert not wrong
    assert [len([c for c in reproduce.CELLS if c.table == t]) for t in (1, 4)] == [70, 4]


def test_dry_run_of_table_4_runs_buffer_py_first(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name the scripts and configs relative to the working directory
    reproduce.main(['--table', '4', '--datasets', 'CIFAR100', '--dry_run', '--buffer_path', 'experts',
                    '--out', str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if not line.startswith('#')] == \
        ['buffer.py', 'main_MTT.py', 'buffer.py', 'main_LoMTT.py']
    assert lines[1].endswith('--zca --data_path data --buffer_path experts')
    assert '--config configs/CIFAR100/MTT_ipc1.json' in lines[2] and '--buffer_path experts' in lines[2]
    reproduce.main(['--table', '4', '--datasets', 'CIFAR10', '--methods', 'LoMTT', '--dry_run', '--budget', 'smoke',
                    '--out', str(tmp_path)])
    buffer, cell = capsys.readouterr().out.splitlines()[1:]
    assert '--train_epochs 2 --num_experts 2' in buffer and '--buffer_path buffers/smoke' in buffer
    assert '--Iteration 5 --eval_every 5' in cell and '--syn_steps 10 --expert_epochs 1 --max_start_epoch 1' in cell


@pytest.mark.parametrize('argv, message', [
    (['--table', '3'], 'there is no table 3'),
    (['--table', '1', '--datasets', 'MNIST,SVHN'], "unknown dataset 'SVHN' for table 1"),
    (['--table', '4', '--methods', 'DM'], "unknown method 'DM' for table 4"),
    (['--table', '1', '--ipcs', '5'], "unknown ipc '5'"),
    (['--table', '1', '--datasets', 'TinyImageNet', '--ipcs', '50'], 'has no cell'),
    (['--table', '1', '--datasets', 'MNIST', '--methods', 'DM', '--data_path', '{tmp}'], 'MNIST is not in'),
])
def test_bad_input_is_one_sentence_and_status_2(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        run_main(reproduce.main, [a.format(tmp=tmp_path) for a in argv] + ['--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_run_folder_is_skipped_resumed_or_started_anew(tmp_path):
    args = reproduce.get_args(['--table', '1', '--out', str(tmp_path)])
    cell = next(c for c in reproduce.CELLS if c.id == 'MNIST_LoDM_ipc1')
    folder = tmp_path / 'runs' / 'paper' / 'MNIST' / 'LoDM_ipc1_r2' / 'MNIST_LoDM_ipc1'
    assert reproduce.plan(cell, args, 'auto')[:2] == ('new', folder)
    folder.mkdir(parents=True)
    (folder / 'args.json').write_text('{}')
    assert reproduce.plan(cell, args, 'auto')[0] == 'empty'
    (folder / 'checkpoint.pt').write_bytes(b'')
    state, _, [cmd] = reproduce.plan(cell, args, 'auto')
    assert state == 'interrupted' and cmd[-2:] == ['--resume', str(folder)]
    (folder / 'results.json').write_text(json.dumps({'complete': True}))
    assert reproduce.plan(cell, args, 'auto') == ('complete', folder, [])


def test_torchrun_ranks_share_the_cells_and_children_run_alone(monkeypatch):
    args = reproduce.get_args(['--table', '4'])
    cells = [c for c in reproduce.CELLS if c.table == 4]
    ranks = [[c.id for c in share] for share in reproduce.schedule(cells, args, 2)]
    # the two CIFAR100 cells share one expert buffer, so they run on one rank, in turn
    assert ranks == [['CIFAR10_MTT_ipc1', 'CIFAR100_MTT_ipc1', 'CIFAR100_LoMTT_ipc1'], ['CIFAR10_LoMTT_ipc1']]
    # the Herding and Forgetting cells of a dataset share its cached extractor, so they run on one rank too
    mnist = [c for c in reproduce.CELLS if c.table == 1 and c.dataset == 'MNIST']
    for share in reproduce.schedule(mnist, reproduce.get_args(['--table', '1']), 3):
        extracted = [c.id for c in share if c.method in ('Herding', 'Forgetting')]
        assert len(extracted) in (0, 6), extracted
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID'):
        monkeypatch.setenv(name, '1')
    env = reproduce.child_env()
    assert not {'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID'} & set(env)
    assert env['PATH'] == os.environ['PATH']
    monkeypatch.setattr(reproduce.torch.cuda, 'is_available', lambda: True)
    assert [reproduce.cell_device(d, 3, 4) for d in ('auto', 'cuda', 'cpu')] == ['cuda:3', 'cuda:3', 'cpu']
    assert reproduce.cell_device('auto', 0, 1) == 'auto'


def smoke_args(mnist_path, out):
    return ['--table', '1', '--datasets', 'MNIST', '--methods', 'DM,LoDM', '--ipcs', '1', '--budget', 'smoke',
            '--data_path', mnist_path, '--out', str(out), '--device', 'cpu', f'--extra={TINY}']


def files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob('*')}


def test_smoke_on_mnist_resumes_a_killed_cell_and_skips_finished_ones(mnist_path, tmp_path, capsys):
    out = tmp_path / 'out'
    dm = out / 'runs' / 'smoke' / 'MNIST' / 'DM_ipc1' / 'MNIST_DM_ipc1'
    lodm = out / 'runs' / 'smoke' / 'MNIST' / 'LoDM_ipc1_r2' / 'MNIST_LoDM_ipc1'
    argv = smoke_args(mnist_path, out)
    # 1. reproduce.py is killed (with the cell it runs) once the second cell has its first checkpoint
    proc = subprocess.Popen([sys.executable, str(REPO / 'reproduce.py'), *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until((lodm / 'checkpoint.pt').exists, proc, 300, 'checkpoint of the second cell')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert reproduce.run_state(dm) == 'complete' and reproduce.run_state(lodm) == 'interrupted'
    # 2. run again (in this process; the cells still run as subprocesses): the finished cell is skipped, the
    # killed one resumed, and the table has both
    reproduce.main(argv)
    stdout = capsys.readouterr().out
    assert 'MNIST_DM_ipc1: complete, skipped' in stdout
    assert 'MNIST_LoDM_ipc1: resume' in stdout and f'--resume {lodm}' in stdout
    assert 'Resuming' in (lodm / 'log.txt').read_text() and reproduce.run_state(lodm) == 'complete'
    table = (out / 'table1_smoke.md').read_text()
    assert stdout.rstrip().endswith(table.rstrip())
    assert 'SMOKE budget' in table and '| ours (smoke) |' in table
    rows = {line.split(' | ')[2]: line for line in table.splitlines() if line.startswith('| MNIST | 1 |')}
    for method, folder in (('DM', dm), ('LoDM', lodm)):
        mean = 100 * json.loads((folder / 'results.json').read_text())['final']['ConvNet']['mean']
        assert f' {mean:.2f} ± ' in rows[method] and '| complete | cpu |' in rows[method]
        assert f'`{folder}`' in rows[method]
    assert '| not run |' in rows['DC']
    # 3. nothing left to do: both skipped, run folders untouched
    before = files(out / 'runs')
    reproduce.main(argv)
    assert capsys.readouterr().out.count('complete, skipped') == 2
    assert files(out / 'runs') == before
