"""Every config file is valid for its script and carries the paper's accuracy."""
import json
from pathlib import Path

import pytest

import main_coreset
import main_DC
import main_DM
import main_MTT
from utils import UserError
from utils.run import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / 'configs').glob('*/*.json'))


def get_args(path):
    method = path.stem.split('_')[0]
    argv, low_rank = ['--config', str(path)], method.startswith('Lo')
    if method in main_coreset.METHODS.values():
        args = main_coreset.get_args(argv)
        assert main_coreset.METHODS[args.method] == method
        return args
    if method in ('DM', 'LoDM'):
        return main_DM.get_args(argv, low_rank)
    if method in ('MTT', 'LoMTT'):
        return main_MTT.get_args(argv, low_rank)
    args = parse_args(main_DC.make_dc_parser(low_rank), argv, prepare=main_DC.resolve_method)
    assert args.method == method.removeprefix('Lo')
    return args


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_config_parses_for_its_script(path):
    args = get_args(path)
    cfg = json.loads(path.read_text())
    assert args.dataset == path.parent.name and args.ipc == cfg['ipc']
    assert '_paper_accuracy' in cfg


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'dataset': 'MNIST', 'lr_imgg': 1.0}))
    with pytest.raises(UserError, match='unknown setting.*lr_imgg'):
        main_DM.get_args(['--config', str(bad)])


def test_flags_override_the_config(tmp_path):
    cfg = tmp_path / 'c.json'
    cfg.write_text(json.dumps({'dataset': 'MNIST', 'ipc': 10, 'lr_img': 5.0}))
    args = main_DM.get_args(['--config', str(cfg), '--ipc', '3'])
    assert (args.dataset, args.ipc, args.lr_img) == ('MNIST', 3, 5.0)
