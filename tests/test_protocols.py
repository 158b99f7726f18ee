"""The evaluation protocol every method and config resolves to, against the originals' values written out
here (reference sections 3.3, 4.2, 4.7, 5.3): the DSA strategy, the evaluation augmentation and epochs,
per-batch standardization; the originals' command lines; MTT's best-point spreads."""
from pathlib import Path

import pytest

import main_DC
import main_DM
import main_MTT
from utils.data import DATASETS
from utils.run import Run, eval_protocol, parse_args

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
FULL, NOFLIP = 'DSA color_crop_cutout_flip_scale_rotate', 'DSA color_crop_cutout_scale_rotate'
NONE, CSR = 'DC none', 'DC crop_scale_rotate'  # classic augmentation: none, or MNIST's crop_scale_rotate


def resolve(method, argv):
    """(augmentation, epochs, standardized) of the ConvNet evaluation networks of a method's run."""
    low_rank = method.startswith('Lo')
    base = method.removeprefix('Lo')
    if base == 'DM':
        args = main_DM.get_args(argv, low_rank)
    elif base == 'MTT':
        args = main_MTT.get_args(argv, low_rank)
    else:
        args = parse_args(main_DC.make_dc_parser(low_rank), ['--method', base, *argv], prepare=main_DC.resolve_method)
    p = eval_protocol(args, 'ConvNet')
    return p['augmentation'], p['epochs'], p['standardize_batches']


def original_default(method, dataset):
    """The original scripts' evaluation with no flags but the dataset."""
    base = method.removeprefix('Lo')
    if base in ('DM', 'MTT'):  # DSA with flip on every dataset, 1000 epochs
        return FULL, 1000, False
    if base == 'DSA':  # the DSA README's strategy: no flip for digits
        return (NOFLIP if dataset in ('MNIST', 'SVHN') else FULL), 1000, False
    return (CSR, 1000, False) if dataset == 'MNIST' else (NONE, 300, False)  # DC: get_daparam


@pytest.mark.parametrize('dataset', DATASETS)
@pytest.mark.parametrize('method', ['DM', 'LoDM', 'DC', 'LoDC', 'DSA', 'LoDSA', 'MTT', 'LoMTT'])
def test_method_defaults_are_the_originals(method, dataset):
    assert resolve(method, ['--dataset', dataset]) == original_default(method, dataset)


@pytest.mark.parametrize('dataset', DATASETS)
def test_dm_without_dsa_still_trains_1000_epochs(dataset):
    expected = CSR if dataset == 'MNIST' else NONE  # the plugin's get_daparam fallback
    assert resolve('DM', ['--dataset', dataset, '--dsa_strategy', 'none']) == (expected, 1000, False)


# Every config that carries a paper number: (config, evaluation augmentation, epochs, standardized batches).
PAPER_CONFIGS = [
    ('CIFAR10/DC_ipc1', NONE, 300, False), ('CIFAR10/DC_ipc10', NONE, 300, False),
    ('CIFAR10/DC_ipc50', NONE, 300, False), ('CIFAR10/DM_ipc1', FULL, 1000, False),
    ('CIFAR10/DM_ipc10', FULL, 1000, False), ('CIFAR10/DM_ipc50', FULL, 1000, False),
    ('CIFAR10/DSA_ipc1', FULL, 1000, False), ('CIFAR10/DSA_ipc10', FULL, 1000, False),
    ('CIFAR10/DSA_ipc50', FULL, 1000, False), ('CIFAR10/LoDM_ipc1', FULL, 1000, False),
    ('CIFAR10/LoDM_ipc10', FULL, 1000, False), ('CIFAR10/LoDM_ipc50', FULL, 1000, False),
    ('CIFAR10/LoMTT_ipc1', FULL, 1000, True), ('CIFAR10/MTT_ipc1', FULL, 1000, False),
    ('CIFAR10/MTT_ipc10', FULL, 1000, False), ('CIFAR10/MTT_ipc50', FULL, 1000, False),
    ('CIFAR100/DC_ipc1', NONE, 300, False), ('CIFAR100/DC_ipc10', NONE, 300, False),
    ('CIFAR100/DM_ipc1', FULL, 1000, False), ('CIFAR100/DM_ipc10', FULL, 1000, False),
    ('CIFAR100/DM_ipc50', FULL, 1000, False), ('CIFAR100/DSA_ipc1', FULL, 1000, False),
    ('CIFAR100/DSA_ipc10', FULL, 1000, False), ('CIFAR100/LoDM_ipc1', FULL, 1000, False),
    ('CIFAR100/LoDM_ipc10', FULL, 1000, False), ('CIFAR100/LoMTT_ipc1', FULL, 1000, True),
    ('CIFAR100/MTT_ipc1', FULL, 1000, False), ('CIFAR100/MTT_ipc10', FULL, 1000, False),
    ('CIFAR100/MTT_ipc50', FULL, 1000, False), ('FashionMNIST/DC_ipc1', NONE, 300, False),
    ('FashionMNIST/DC_ipc10', NONE, 300, False), ('FashionMNIST/DC_ipc50', NONE, 300, False),
    ('FashionMNIST/DSA_ipc1', FULL, 1000, False), ('FashionMNIST/DSA_ipc10', FULL, 1000, False),
    ('FashionMNIST/DSA_ipc50', FULL, 1000, False), ('MNIST/DC_ipc1', CSR, 1000, False),
    ('MNIST/DC_ipc10', CSR, 1000, False), ('MNIST/DC_ipc50', CSR, 1000, False),
    ('MNIST/DM_ipc1', FULL, 1000, False), ('MNIST/DM_ipc10', FULL, 1000, False),
    ('MNIST/DM_ipc50', FULL, 1000, False), ('MNIST/DSA_ipc1', NOFLIP, 1000, False),
    ('MNIST/DSA_ipc10', NOFLIP, 1000, False), ('MNIST/DSA_ipc50', NOFLIP, 1000, False),
    ('MNIST/LoDM_ipc1', FULL, 1000, False), ('MNIST/LoDM_ipc10', CSR, 1000, False),
    ('MNIST/LoDM_ipc50', CSR, 1000, False), ('SVHN/DC_ipc1', NONE, 300, False), ('SVHN/DC_ipc10', NONE, 300, False),
    ('SVHN/DC_ipc50', NONE, 300, False), ('SVHN/DSA_ipc1', NOFLIP, 1000, False),
    ('SVHN/DSA_ipc10', NOFLIP, 1000, False), ('SVHN/DSA_ipc50', NOFLIP, 1000, False),
    ('TinyImageNet/DC_ipc1', NONE, 300, False), ('TinyImageNet/DC_ipc10', NONE, 300, False),
    ('TinyImageNet/DM_ipc1', FULL, 1000, False), ('TinyImageNet/DM_ipc10', FULL, 1000, False),
    ('TinyImageNet/DM_ipc50', FULL, 1000, False), ('TinyImageNet/DSA_ipc1', FULL, 1000, False),
    ('TinyImageNet/DSA_ipc10', FULL, 1000, False), ('TinyImageNet/LoDM_ipc1', FULL, 1000, False),
    ('TinyImageNet/LoDM_ipc10', FULL, 1000, False), ('TinyImageNet/MTT_ipc1', FULL, 1000, False),
    ('TinyImageNet/MTT_ipc10', FULL, 1000, False), ('TinyImageNet/MTT_ipc50', FULL, 1000, False),
]


@pytest.mark.parametrize('name, augmentation, epochs, standardized', PAPER_CONFIGS, ids=lambda v: str(v))
def test_paper_configs_reproduce_their_protocol(name, augmentation, epochs, standardized):
    method = Path(name).name.split('_')[0]
    assert resolve(method, ['--config', str(CONFIGS / f'{name}.json')]) == (augmentation, epochs, standardized)


def test_every_paper_config_is_in_the_table():
    import json
    listed = {name for name, *_ in PAPER_CONFIGS}
    for path in CONFIGS.glob('*/*.json'):
        cfg = json.loads(path.read_text())
        method = path.stem.split('_')[0]
        if cfg.get('_paper_accuracy', '-')[0].isdigit() and method in ('DC', 'DSA', 'DM', 'LoDM', 'MTT', 'LoMTT'):
            assert f'{path.parent.name}/{path.stem}' in listed, path


def test_original_mtt_command_lines_parse():
    """distill.py's README command and every flag of its argument table (reference 4.7)."""
    readme = ['--dataset=CIFAR10', '--ipc=1', '--syn_steps=50', '--expert_epochs=2', '--max_start_epoch=2', '--zca',
              '--lr_img=1000', '--lr_lr=1e-07', '--lr_teacher=0.01']
    args = main_MTT.get_args(readme)
    assert (args.syn_steps, args.expert_epochs, args.lr_lr, args.zca) == (50, 2, 1e-07, True)
    every = ['--dataset', 'CIFAR10', '--subset', 'imagenette', '--model', 'ConvNet', '--res', '128', '--ipc', '1',
             '--eval_mode', 'S', '--num_eval', '5', '--eval_it', '100', '--epoch_eval_train', '1000',
             '--Iteration', '5000', '--lr_img', '1000', '--lr_lr', '1e-05', '--lr_teacher', '0.01',
             '--lr_init', '0.01', '--batch_real', '256', '--batch_syn', '100', '--batch_train', '256',
             '--pix_init', 'real', '--dsa', 'True', '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate',
             '--data_path', 'data', '--buffer_path', './buffers', '--expert_epochs', '3', '--syn_steps', '20',
             '--max_start_epoch', '25', '--zca', '--load_all', '--no_aug', 'False', '--max_files', '2',
             '--max_experts', '5', '--force_save']
    args = main_MTT.get_args(every)
    assert (args.eval_every, args.init, args.dsa, args.batch_syn, args.no_aug) == (100, 'real', True, 100, False)
    assert main_MTT.get_args([*readme, '--dsa', 'False']).dsa_strategy == 'none'


def test_best_point_reports_the_spread_over_networks():
    """One experiment: the best evaluation point's std over its networks (the original's ±), not 0."""
    run = Run.__new__(Run)
    run.results = {'evaluations': [
        {'exp': 0, 'iteration': 0, 'model': 'ConvNet', 'accs': [0.5, 0.7], 'mean': 0.6},
        {'exp': 0, 'iteration': 100, 'model': 'ConvNet', 'accs': [0.8, 0.6], 'mean': 0.7}]}
    best = run.best()['ConvNet']
    assert best['per_exp']['0']['iteration'] == 100 and best['mean'] == pytest.approx(0.7)
    assert best['std_over_networks'] == pytest.approx(0.1) and best['std_over_experiments'] == 0
