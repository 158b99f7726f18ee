import os
import subprocess
import sys
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
