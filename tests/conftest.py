import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting make small ops 45-80x slower when the 2 cores are shared with
# other jobs; sleeping costs little when they are not. Set before torch is imported (subprocesses inherit it).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('CONDENSE_DATA', REPO.parent / 'shared' / 'data'))
sys.path.insert(0, str(REPO))


@pytest.fixture
def mnist_path():
    if not (DATA / 'MNIST' / 'raw').exists():
        pytest.skip(f'real MNIST not found in {DATA} (set CONDENSE_DATA)')
    return str(DATA)


def run_script(script, *args, check=True):
    """Run a main script in a fresh interpreter; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc


def wait_until(condition, proc, timeout, what):
    """Return once condition() holds, waiting on the running process `proc` in between (no sleeping); an
    AssertionError if it ends first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, f'no {what} after {timeout} s'
            continue
        out, err = proc.communicate()
        raise AssertionError(f'the process ended before {what}:\n{(out or "")[-2000:]}{(err or "")[-2000:]}')
