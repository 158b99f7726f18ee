"""Reproduce the paper's tables: one command runs every cell of a table, skips finished cells, resumes
interrupted ones and writes <out>/table<k>_<budget>.md, the paper's numbers against ours.

    python reproduce.py --table 1 --datasets MNIST,CIFAR10 --methods DM,LoDM --data_path data   # one device
    torchrun --nproc_per_node 8 reproduce.py --table 1 --data_path data                        # 8 GPUs
    python reproduce.py --table 4 --dry_run                                                    # the commands only
    python reproduce.py --table 1 --budget smoke --datasets MNIST --data_path ../shared/data    # CPU check

Tables (numbers copied from ../shared/reference/paper_tables.md, test %, mean±std):
  1  DC, DSA, DM, LoDM and the coresets Random, Herding, Forgetting (main_coreset.py) on MNIST, CIFAR10,
     CIFAR100 and TinyImageNet. Not here: DD and LD (no code in this repository) and LoDC/LoDSA (the
     reference has no number for them).
  4  MTT and LoMTT on CIFAR10 and CIFAR100, 1 image per class. The paper reports the best evaluation point,
     chosen on the test set; the table shows it beside the final accuracy, labelled as such.
The cross-architecture and rank ablations are left out: the reference has no numbers for them.

Each cell runs its config file as a subprocess of its script with --save_path <out>/runs/<budget> and
--run_name <cell id>, so its run folder is <out>/runs/<budget>/<dataset>/<method>_ipc<ipc>[_r<rank>]/<cell id>.
A cell whose results.json is complete is skipped; one with a checkpoint.pt is resumed (--resume); a folder
with neither is removed and the cell started anew. MTT cells first run the buffer.py command of their config
(the '_buffer' note; buffer.py returns at once when the experts exist). Each cell's output goes to
<out>/logs/<budget>/<cell id>.log. A failing cell is marked in the table and the next cell runs; the exit
status is 1 when a selected cell did not complete.

--budget paper runs the configs as they are. --budget smoke (see SMOKE) shrinks them so that most cells run
on a CPU in minutes (DC/DSA keep the outer and inner loops of their ipc: about an hour at ipc 50): a check of
the pipeline, whose numbers are labelled as such and never belong in configs/*/README.md. A complete run is
never redone: after changing a config (or SMOKE), delete the cell's run folder or use another --out.

Under torchrun every rank runs its share of the cells (cell i on rank i % world; cells that share an expert
buffer run on one rank, in turn), each cell as a single-process run on its own device (--device
cuda:<LOCAL_RANK> on CUDA). The ranks share nothing but the disk and one final barrier (gloo), after which
rank 0 writes the table.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from utils import UserError
from utils.run import run_main, save_json, save_text

REPO = Path(__file__).resolve().parent

# One row per cell: the config (in configs/<dataset>/) that runs it and the paper's number.
REGISTRY = """
table  dataset       ipc  method      rank  config                 paper
1      MNIST         1    Random      -     Random_ipc1.json       64.9±3.5
1      MNIST         1    Herding     -     Herding_ipc1.json      89.2±1.6
1      MNIST         1    Forgetting  -     Forgetting_ipc1.json   35.5±5.6
1      MNIST         1    DC          -     DC_ipc1.json           91.7±0.5
1      MNIST         1    DSA         -     DSA_ipc1.json          88.7±0.6
1      MNIST         1    DM          -     DM_ipc1.json           89.7±0.6
1      MNIST         1    LoDM        2     LoDM_ipc1.json         91.2±0.4
1      MNIST         10   Random      -     Random_ipc10.json      95.1±0.9
1      MNIST         10   Herding     -     Herding_ipc10.json     93.7±0.3
1      MNIST         10   Forgetting  -     Forgetting_ipc10.json  68.1±3.3
1      MNIST         10   DC          -     DC_ipc10.json          97.4±0.2
1      MNIST         10   DSA         -     DSA_ipc10.json         97.1±0.1
1      MNIST         10   DM          -     DM_ipc10.json          96.5±0.2
1      MNIST         10   LoDM        8     LoDM_ipc10.json        97.7±0.1
1      MNIST         50   Random      -     Random_ipc50.json      97.9±0.2
1      MNIST         50   Herding     -     Herding_ipc50.json     94.8±0.2
1      MNIST         50   Forgetting  -     Forgetting_ipc50.json  88.2±1.2
1      MNIST         50   DC          -     DC_ipc50.json          98.8±0.2
1      MNIST         50   DSA         -     DSA_ipc50.json         99.2±0.1
1      MNIST         50   DM          -     DM_ipc50.json          97.5±0.5
1      MNIST         50   LoDM        8     LoDM_ipc50.json        98.2±0.1
1      CIFAR10       1    Random      -     Random_ipc1.json       14.4±2.0
1      CIFAR10       1    Herding     -     Herding_ipc1.json      21.5±1.2
1      CIFAR10       1    Forgetting  -     Forgetting_ipc1.json   13.5±1.2
1      CIFAR10       1    DC          -     DC_ipc1.json           28.3±0.5
1      CIFAR10       1    DSA         -     DSA_ipc1.json          28.8±0.7
1      CIFAR10       1    DM          -     DM_ipc1.json           26.0±0.8
1      CIFAR10       1    LoDM        2     LoDM_ipc1.json         43.8±0.8
1      CIFAR10       10   Random      -     Random_ipc10.json      26.0±1.2
1      CIFAR10       10   Herding     -     Herding_ipc10.json     31.6±0.7
1      CIFAR10       10   Forgetting  -     Forgetting_ipc10.json  23.3±1.0
1      CIFAR10       10   DC          -     DC_ipc10.json          44.9±0.5
1      CIFAR10       10   DSA         -     DSA_ipc10.json         51.1±0.5
1      CIFAR10       10   DM          -     DM_ipc10.json          48.9±0.6
1      CIFAR10       10   LoDM        2     LoDM_ipc10.json        59.8±0.4
1      CIFAR10       50   Random      -     Random_ipc50.json      43.4±1.0
1      CIFAR10       50   Herding     -     Herding_ipc50.json     40.4±0.6
1      CIFAR10       50   Forgetting  -     Forgetting_ipc50.json  23.3±1.1
1      CIFAR10       50   DC          -     DC_ipc50.json          53.9±0.5
1      CIFAR10       50   DSA         -     DSA_ipc50.json         60.6±0.5
1      CIFAR10       50   DM          -     DM_ipc50.json          63.0±0.4
1      CIFAR10       50   LoDM        4     LoDM_ipc50.json        64.6±0.1
1      CIFAR100      1    Random      -     Random_ipc1.json       4.2±0.3
1      CIFAR100      1    Herding     -     Herding_ipc1.json      8.4±0.3
1      CIFAR100      1    Forgetting  -     Forgetting_ipc1.json   4.5±0.2
1      CIFAR100      1    DC          -     DC_ipc1.json           12.8±0.3
1      CIFAR100      1    DSA         -     DSA_ipc1.json          13.9±0.3
1      CIFAR100      1    DM          -     DM_ipc1.json           11.4±0.3
1      CIFAR100      1    LoDM        2     LoDM_ipc1.json         25.6±0.5
1      CIFAR100      10   Random      -     Random_ipc10.json      14.6±0.5
1      CIFAR100      10   Herding     -     Herding_ipc10.json     17.3±0.3
1      CIFAR100      10   Forgetting  -     Forgetting_ipc10.json  15.1±0.3
1      CIFAR100      10   DC          -     DC_ipc10.json          25.2±0.3
1      CIFAR100      10   DSA         -     DSA_ipc10.json         32.3±0.3
1      CIFAR100      10   DM          -     DM_ipc10.json          29.7±0.3
1      CIFAR100      10   LoDM        2     LoDM_ipc10.json        37.5±0.8
1      TinyImageNet  1    Random      -     Random_ipc1.json       1.4±0.1
1      TinyImageNet  1    Herding     -     Herding_ipc1.json      2.8±0.2
1      TinyImageNet  1    Forgetting  -     Forgetting_ipc1.json   1.6±0.1
1      TinyImageNet  1    DC          -     DC_ipc1.json           4.61±0.2
1      TinyImageNet  1    DSA         -     DSA_ipc1.json          4.79±0.2
1      TinyImageNet  1    DM          -     DM_ipc1.json           3.9±0.2
1      TinyImageNet  1    LoDM        4     LoDM_ipc1.json         10.3±0.2
1      TinyImageNet  10   Random      -     Random_ipc10.json      5.0±0.2
1      TinyImageNet  10   Herding     -     Herding_ipc10.json     6.3±0.2
1      TinyImageNet  10   Forgetting  -     Forgetting_ipc10.json  5.1±0.2
1      TinyImageNet  10   DC          -     DC_ipc10.json          11.6±0.3
1      TinyImageNet  10   DSA         -     DSA_ipc10.json         14.7±0.2
1      TinyImageNet  10   DM          -     DM_ipc10.json          12.9±0.4
1      TinyImageNet  10   LoDM        4     LoDM_ipc10.json        18.3±0.3
4      CIFAR10       1    MTT         -     MTT_ipc1.json          46.3
4      CIFAR10       1    LoMTT       2     LoMTT_ipc1.json        58.7
4      CIFAR100      1    MTT         -     MTT_ipc1.json          24.3
4      CIFAR100      1    LoMTT       2     LoMTT_ipc1.json        31.0
"""

SCRIPTS = {'DM': 'main_DM.py', 'LoDM': 'main_LoDM.py', 'DC': 'main_DC.py', 'DSA': 'main_DC.py',
           'LoDC': 'main_LoDC.py', 'LoDSA': 'main_LoDC.py', 'MTT': 'main_MTT.py', 'LoMTT': 'main_LoMTT.py',
           'Random': 'main_coreset.py', 'Herding': 'main_coreset.py', 'Forgetting': 'main_coreset.py'}
CORESETS = ('Random', 'Herding', 'Forgetting')
EXTRACTED = ('Herding', 'Forgetting')  # coresets chosen with the cached extractor of their dataset
TRAJECTORY = ('MTT', 'LoMTT')  # need experts from buffer.py; results.json also has the best evaluation point

# The smoke budget: every cell 1 experiment x 2 evaluation networks x 20 epochs, tested on the first 1000 test
# images; condensation runs 1/1000 of the config's iterations (at least 1: DM 20, DC/DSA 1, MTT 5; evaluated
# at 0 and the end), DM and DC with 64 real images per class (the configs: 256); MTT matches 10 student steps
# over 1 expert epoch from epoch 0 of 2 experts x 2 epochs (in <buffer_path>/smoke); coresets train their
# feature extractor for 1 epoch (the configs: 200).
SMOKE = dict(num_exp=1, num_eval=2, epoch_eval_train=20, test_images=1000)
SMOKE_ITERATION_FRACTION = 1000
SMOKE_CONDENSATION = dict(batch_real=64)
SMOKE_TRAJECTORY = dict(syn_steps=10, expert_epochs=1, max_start_epoch=1)
SMOKE_BUFFER = dict(num_experts=2, train_epochs=2)
SMOKE_CORESET = dict(extractor_epochs=1)

# What --data_path must hold for each dataset (any one of the names; README, 'Datasets without internet').
DATA_FILES = {'MNIST': ['MNIST/raw'], 'CIFAR10': ['cifar-10-batches-py'], 'CIFAR100': ['cifar-100-python'],
              'TinyImageNet': ['tinyimagenet.pt', 'tiny-imagenet-200']}

# Set by torchrun; a cell's script must not see them, or it would join the group as a distributed run.
TORCHRUN_VARS = {'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'GROUP_WORLD_SIZE',
                 'ROLE_RANK', 'ROLE_WORLD_SIZE', 'ROLE_NAME', 'MASTER_ADDR', 'MASTER_PORT'}


class Cell(NamedTuple):
    table: int
    dataset: str
    ipc: int
    method: str
    rank: int | None
    config: str
    paper: str

    @property
    def id(self):
        return f'{self.dataset}_{Path(self.config).stem}'

    @property
    def config_path(self):
        return REPO / 'configs' / self.dataset / self.config

    @property
    def script(self):
        return REPO / SCRIPTS[self.method]


def read_registry():
    rows = [line.split() for line in REGISTRY.strip().splitlines()[1:]]
    return [Cell(int(t), d, int(i), m, None if r == '-' else int(r), c, p) for t, d, i, m, r, c, p in rows]


CELLS = read_registry()
TABLES = sorted({c.table for c in CELLS})


# ---------------------------------------------------------------- selecting cells

def parse_list(text, valid, what, table):
    """The comma-separated items of `text` (all of `valid` when None); an unknown one is a UserError."""
    valid = [str(v) for v in valid]
    if text is None:
        return valid
    items = [x.strip() for x in text.split(',')]
    bad = [x for x in items if x not in valid]
    if bad:
        raise UserError(f"unknown {what} '{bad[0]}' for table {table}; choose from {', '.join(valid)}.")
    return items


def select_cells(args):
    if args.table not in TABLES:
        raise UserError(f"there is no table {args.table}; choose one of {', '.join(map(str, TABLES))}.")
    cells = [c for c in CELLS if c.table == args.table]
    datasets = parse_list(args.datasets, unique(c.dataset for c in cells), 'dataset', args.table)
    methods = parse_list(args.methods, unique(c.method for c in cells), 'method', args.table)
    ipcs = parse_list(args.ipcs, unique(c.ipc for c in cells), 'ipc', args.table)
    chosen = [c for c in cells if c.dataset in datasets and c.method in methods and str(c.ipc) in ipcs]
    if not chosen:
        raise UserError(f'table {args.table} has no cell for these --datasets, --methods and --ipcs; '
                        f'see the registry at the top of reproduce.py.')
    missing = unique(str(p.relative_to(REPO)) for c in chosen for p in (c.script, c.config_path) if not p.exists())
    if missing:
        more = f' (and {len(missing) - 1} more files)' if len(missing) > 1 else ''
        raise UserError(f'{missing[0]} does not exist{more}: leave its cells out with --methods, --datasets '
                        f'or --ipcs.')
    return chosen


def unique(items):
    return list(dict.fromkeys(items))


def check_data(cells, data_path):
    for dataset in unique(c.dataset for c in cells):
        if not any((Path(data_path) / name).exists() for name in DATA_FILES[dataset]):
            raise UserError(f"{dataset} is not in '{data_path}': place {' or '.join(DATA_FILES[dataset])} there "
                            f"(README, 'Datasets without internet') or give --data_path.")


# ---------------------------------------------------------------- commands

def read_config(cell):
    return json.loads(cell.config_path.read_text())


def rel(path):
    """`path` relative to the working directory, for short commands."""
    return os.path.relpath(path)


def flags(values):
    return [w for k, v in values.items() for w in (f'--{k}', str(v))]


def smoke_flags(cell, cfg):
    values = dict(SMOKE)
    if cell.method in CORESETS:
        values.update(SMOKE_CORESET)
    else:
        iterations = max(1, cfg['Iteration'] // SMOKE_ITERATION_FRACTION)
        values.update(Iteration=iterations, eval_every=iterations)
    if cell.method in TRAJECTORY:
        values.update(SMOKE_TRAJECTORY)
    elif cell.method not in CORESETS:
        values.update(SMOKE_CONDENSATION)
    return flags(values)


def buffer_path(args):
    return str(Path(args.buffer_path) / 'smoke') if args.budget == 'smoke' else args.buffer_path


def cell_command(cell, args, device):
    cmd = [sys.executable, rel(cell.script), '--config', rel(cell.config_path), '--data_path', args.data_path,
           '--save_path', save_path(args), '--run_name', cell.id]
    if cell.method in TRAJECTORY:
        cmd += ['--buffer_path', buffer_path(args)]
    if device != 'auto':
        cmd += ['--device', device]
    if args.budget == 'smoke':
        cmd += smoke_flags(cell, read_config(cell))
    return cmd + shlex.split(args.extra)


def buffer_command(cell, args, device):
    """The config's buffer.py command with our data and buffer paths (and the smoke sizes), or None."""
    note = read_config(cell).get('_buffer')
    if note is None:
        return None
    words = shlex.split(note)
    words = words[words.index('buffer.py') + 1:]
    values = {'data_path': args.data_path, 'buffer_path': buffer_path(args)}
    if device != 'auto':
        values['device'] = device
    if args.budget == 'smoke':
        values.update(SMOKE_BUFFER)
    for flag, value in values.items():  # replace the flag's value where the note has it, else append it
        if f'--{flag}' in words:
            words[words.index(f'--{flag}') + 1] = str(value)
        else:
            words += [f'--{flag}', str(value)]
    return [sys.executable, rel(REPO / 'buffer.py'), *words]


# ---------------------------------------------------------------- run folders and their state

def save_path(args):
    return str(Path(args.out) / 'runs' / args.budget)


def run_dir(cell, args):
    """The cell's run folder: <save_path>/<dataset>/<method>_ipc<ipc>[_r<rank>]/<cell id>, found by its name."""
    found = sorted(Path(save_path(args)).glob(f'{cell.dataset}/*/{cell.id}'))
    tag = f'{cell.method}_ipc{cell.ipc}' + (f'_r{cell.rank}' if cell.rank else '')
    return found[0] if found else Path(save_path(args)) / cell.dataset / tag / cell.id


def read_results(folder):
    path = folder / 'results.json'
    return json.loads(path.read_text()) if path.exists() else None


def run_state(folder):
    """'complete', 'interrupted' (has a checkpoint: resume it), 'empty' (start anew) or 'new'."""
    if not folder.exists():
        return 'new'
    results = read_results(folder)
    if results and results.get('complete'):
        return 'complete'
    return 'interrupted' if (folder / 'checkpoint.pt').exists() else 'empty'


ACTIONS = {'complete': 'complete, skipped:', 'interrupted': 'resume', 'new': 'start',
           'empty': 'start (anew: no checkpoint, so the folder is removed first):'}


def plan(cell, args, device):
    """(state, run folder, commands to run in turn) of a cell."""
    folder = run_dir(cell, args)
    state = run_state(folder)
    if state == 'complete':
        return state, folder, []
    cmd = cell_command(cell, args, device)
    if state == 'interrupted':
        cmd += ['--resume', str(folder)]
    before = buffer_command(cell, args, device)
    return state, folder, ([before] if before else []) + [cmd]


# ---------------------------------------------------------------- running cells

def log_path(cell, args, suffix):
    return Path(args.out) / 'logs' / args.budget / f'{cell.id}{suffix}'


def child_env():
    """This environment without torchrun's variables: each cell is a single-process run."""
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith('TORCHELASTIC_')}


def run_command(cmd, log):
    """Run cmd with its output appended to `log`; returns the exit status. The child dies with us."""
    with open(log, 'a') as f:
        f.write(f'$ {shlex.join(cmd)}\n')
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def last_error(log):
    """The 'error: ...' line of a failed script, else the last line of its output."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    return (errors or lines or ['no output'])[-1].strip()


def run_cell(cell, args, device, device_name, tag):
    """Run, resume or skip one cell; its outcome goes to <out>/logs/<budget>/<cell id>.json for the table."""
    state, folder, commands = plan(cell, args, device)
    if state == 'complete':
        print(f'{tag} {cell.id}: complete, skipped ({folder})', flush=True)
        return
    if state == 'empty':
        shutil.rmtree(folder)  # started, but stopped before its first checkpoint
    log, status_file = log_path(cell, args, '.log'), log_path(cell, args, '.json')
    log.parent.mkdir(parents=True, exist_ok=True)
    status = {'device': device_name, 'exit': None, 'error': None}
    save_json(status_file, status)
    print(f'{tag} {cell.id}: {"resume" if state == "interrupted" else "start"}, output in {log}', flush=True)
    for cmd in commands:
        print(f'{tag}   $ {shlex.join(cmd)}', flush=True)
        status['exit'] = run_command(cmd, log)
        if status['exit'] != 0:
            status['error'] = last_error(log)
            break
    done = run_state(run_dir(cell, args)) == 'complete'
    if status['exit'] == 0 and not done:
        status['error'] = 'the script ended without complete results'
    save_json(status_file, status)
    print(f'{tag} {cell.id}: ' + ('complete' if done else f'FAILED (exit {status["exit"]}): {status["error"]}'),
          flush=True)


def describe_device(device):
    """The device and, for a GPU, its name, as the table shows it."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if not device.startswith('cuda'):
        return device
    try:
        return f'{device} ({torch.cuda.get_device_name(torch.device(device))})'
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f'--device {device} is not usable here ({e}); use cpu, cuda or cuda:<index>.') from None


# ---------------------------------------------------------------- the table

def paper_mean(paper):
    return float(paper.split('±')[0])


def percent(mean, std):
    return f'{100 * mean:.2f} ± {100 * std:.2f}'


def evaluated(by_model, results):
    """The entry of the evaluated model (the only one of eval_mode S or SS)."""
    return by_model.get(results.get('model')) or next(iter(by_model.values()))


def table_row(cell, args, best):
    """The markdown row of a cell: paper, ours (and for MTT the best evaluation point), status, where."""
    folder = run_dir(cell, args)
    results = read_results(folder) if folder.exists() else None
    status_file = log_path(cell, args, '.json')
    status = json.loads(status_file.read_text()) if status_file.exists() else None
    ours = best_cell = diff = date = '-'
    if results and results.get('complete'):
        entry = evaluated(results['final'], results)
        ours, diff = percent(entry['mean'], entry['std']), f'{100 * entry["mean"] - paper_mean(cell.paper):+.2f}'
        if results.get('best_over_evaluations'):  # ± over the networks at the best points, as the original's
            b = evaluated(results['best_over_evaluations'], results)
            best_cell = percent(b['mean'], b['std_over_networks'])
        date = time.strftime('%Y-%m-%d', time.localtime((folder / 'results.json').stat().st_mtime))
        state = 'complete'
    elif status and status['error']:
        state = f'failed (exit {status["exit"]}): {status["error"]}'.replace('|', '/')
    else:
        state = 'incomplete' if folder.exists() else 'not run'
    device = status['device'] if status else '-'
    shown = f'`{folder}`' if folder.exists() else '-'
    cols = [cell.dataset, cell.ipc, cell.method, cell.rank or '-', cell.paper.replace('±', ' ± '), ours,
            *([best_cell] if best else []), diff, state, device, date, shown]
    return '| ' + ' | '.join(map(str, cols)) + ' |'


def write_table(args):
    cells = [c for c in CELLS if c.table == args.table]
    best = any(c.method in TRAJECTORY for c in cells)
    smoke = args.budget == 'smoke'
    lines = [f'# Table {args.table}: the paper against ours' + (' (SMOKE budget)' if smoke else ''), '',
             'Test accuracy %, mean ± std over experiments × evaluation networks, of the final synthetic set; '
             '"ours − paper" compares the means. Written by `reproduce.py`; cells not run yet show "-".', '']
    if smoke:
        lines += ['**Smoke budget**: every cell shrunk to a CPU check of the pipeline (see SMOKE in '
                  'reproduce.py): these numbers are NOT the paper\'s protocol and must not be reported or '
                  'copied into configs/*/README.md.', '']
    if best:
        lines += ['"best over evaluations" is the best evaluation point of each experiment, selected on the '
                  'test set (optimistic): what the MTT papers report; "ours − paper" uses the final accuracy.', '']
    ours = 'ours (smoke)' if smoke else 'ours'
    header = ['dataset', 'ipc', 'method', 'rank', 'paper', ours,
              *(['best over evaluations (test-set selection)'] if best else []),
              'ours − paper', 'status', 'device', 'date', 'run folder']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += [table_row(c, args, best) for c in cells]
    path = Path(args.out) / f'table{args.table}_{args.budget}.md'
    path.parent.mkdir(parents=True, exist_ok=True)
    save_text(path, '\n'.join(lines) + '\n')
    return path


# ---------------------------------------------------------------- main

def schedule(cells, args, world):
    """The cells of each rank: group g runs on rank g % world, where cells that share an expert buffer, or
    the coreset extractor of a dataset, form one group (so two ranks never make the same file) and every
    other cell is a group of its own."""
    groups = {}
    for c in cells:
        before = buffer_command(c, args, 'auto')
        shared = shlex.join(before) if before else f'extractor {c.dataset}' if c.method in EXTRACTED else c.id
        groups.setdefault(shared, []).append(c)
    groups = list(groups.values())
    return [[c for g in groups[r::world] for c in g] for r in range(world)]


def cell_device(device, local_rank, world):
    """Under torchrun on CUDA each rank's cells run on the rank's own GPU."""
    if world > 1 and device in ('auto', 'cuda') and torch.cuda.is_available():
        return f'cuda:{local_rank}'
    return device


def print_plan(shares, args, world):
    """What each rank would run (with the devices of one machine: rank r on cuda:r)."""
    for r, share in enumerate(shares):
        for cell in share:
            state, folder, commands = plan(cell, args, cell_device(args.device, r, world))
            print(f'# {cell.id}' + (f' (rank {r})' if world > 1 else '') + f': {ACTIONS[state]} {folder}')
            for cmd in commands:
                print(shlex.join(cmd))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Run the cells of one of the paper's tables and compare.")
    p.add_argument('--table', type=int, required=True, help=f'table number: {", ".join(map(str, TABLES))}')
    p.add_argument('--datasets', help='comma-separated datasets (default: all of the table)')
    p.add_argument('--methods', help='comma-separated methods (default: all of the table)')
    p.add_argument('--ipcs', help='comma-separated images per class (default: all of the table)')
    p.add_argument('--budget', choices=['paper', 'smoke'], default='paper',
                   help='paper: the configs as they are; smoke: a CPU check of the pipeline (see SMOKE)')
    p.add_argument('--data_path', default='data', help='folder of the datasets')
    p.add_argument('--buffer_path', default='buffers', help='folder of the MTT experts (smoke: its smoke/ folder)')
    p.add_argument('--out', default='reproduction', help='folder of the runs, logs and tables')
    p.add_argument('--device', default='auto', help="device of every cell (under torchrun on CUDA: each "
                                                     "rank's GPU)")
    p.add_argument('--extra', default='', help="flags appended to every cell's command, e.g. "
                   "--extra='--batch_real 16' (kept by the cell's run: resume it with the same)")
    p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    cells = select_cells(args)
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = cell_device(args.device, int(os.environ.get('LOCAL_RANK', 0)), world)
    mine = schedule(cells, args, world)
    if args.dry_run:
        if rank == 0:
            print_plan(mine, args, world)
        return
    check_data(cells, args.data_path)
    device_name = describe_device(device)
    if world > 1:  # only for the final barrier; cells may take days
        dist.init_process_group('gloo', timeout=timedelta(days=365))
    tag = f'[rank {rank}]' if world > 1 else '>'
    for cell in mine[rank]:
        run_cell(cell, args, device, device_name, tag)
        write_table(args)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        path = write_table(args)
        print(f'\n{path}:\n\n{path.read_text()}')
        failed = [c.id for c in cells if run_state(run_dir(c, args)) != 'complete']
        if failed:
            print(f'{len(failed)} cell(s) did not complete: {", ".join(failed)} (see {args.out}/logs)')
            sys.exit(1)


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # torchrun stops workers so: stop the running cell too
    run_main(main)
