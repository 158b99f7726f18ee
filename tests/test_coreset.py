"""Coreset selection (utils/coreset.py) against hand-worked examples, the extractor cache, and
main_coreset.py end to end on real MNIST (tiny budgets), with one quality check."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import main_coreset
import main_DM
from utils import UserError
from utils.coreset import (ForgettingCounter, cache_file, extractor_settings, forgetting_counts, get_extractor,
                           herding, kcenter, select_forgetting, select_herding, select_kcenter, select_random,
                           train_epoch, train_extractor)
from utils.data import ClassSampler, load_dataset
from utils.run import run_main

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / 'configs').glob('*/*.json')
                 if p.stem.split('_')[0] in main_coreset.METHODS.values())


# ---------------------------------------------------------------- the greedy rules, by hand

def test_herding_follows_the_running_mean():
    # Mean 2.25. Pick 1: nearest 2.25 is x=2. Pick 2: target 2·2.25 - 2 = 2.5, nearest x=1 (1.5 away).
    # Pick 3: target 3·2.25 - 3 = 3.75: x=6 is 2.25 away, x=0 3.75.
    assert herding(torch.tensor([[0.], [1.], [2.], [6.]]), 3).tolist() == [2, 1, 3]


def test_kcenter_takes_the_farthest_point():
    # First the point nearest the mean (x=2), then the farthest from {2} (x=6), then from {2, 6} (x=0).
    assert kcenter(torch.tensor([[0.], [1.], [2.], [6.]]), 3).tolist() == [2, 3, 0]


def test_ties_go_to_the_first_index():
    square = torch.tensor([[0., 0.], [2., 0.], [0., 2.], [2., 2.]])
    # All four are equally near the mean (1, 1): pick 0. Herding: target (2, 2) is point 3; then the target
    # is (1, 1) again, 1 and 2 tie. K-center: 3 is farthest from 0; then 1 and 2 are both 2 away.
    assert herding(square, 4).tolist() == [0, 3, 1, 2]
    assert kcenter(square, 4).tolist() == [0, 3, 1, 2]
    same = torch.full((3, 2), 5.0)  # duplicates: distance 0 everywhere, nothing is picked twice
    assert herding(same, 3).tolist() == kcenter(same, 3).tolist() == [0, 1, 2]


def test_at_ipc_1_herding_and_kcenter_pick_the_same_image():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = torch.randn(50, 16, generator=gen)
        assert herding(f, 1).tolist() == kcenter(f, 1).tolist() == [int(((f - f.mean(0)) ** 2).sum(1).argmin())]


# ---------------------------------------------------------------- forgetting

def test_forgetting_counts_of_a_scripted_record():
    record = torch.tensor([[1, 1, 0, 0, 1],   # presentation 1 of examples 0..4
                           [1, 0, 0, 1, 0],
                           [1, 1, 0, 1, 0],
                           [1, 0, 0, 0, 1]], dtype=torch.bool)
    # 0: always right. 1: right, wrong, right, wrong: 2 events. 2: never learned: its 4 presentations.
    # 3: wrong, right, right, wrong: 1. 4: right, wrong, wrong, right: 1.
    assert forgetting_counts(record).tolist() == [0, 2, 4, 1, 1]


def test_forgetting_counter_with_shuffled_batches():
    counter = ForgettingCounter(3)
    for index, correct in [([0, 1], [1, 0]), ([2, 0], [0, 0]), ([1], [0]), ([0, 2], [1, 0])]:
        counter.update(torch.tensor(index), torch.tensor(correct, dtype=torch.bool))
    # 0: right, wrong, right: 1 event. 1 and 2: never learned, 2 presentations each.
    assert counter.counts().tolist() == [1, 2, 2]
    assert counter.presentations.tolist() == [3, 2, 2]


def test_forgetting_picks_the_most_forgotten_with_a_seeded_tie_break():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    counts = torch.tensor([3, 1, 3, 0, 2, 2, 2, 5])
    picks = [select_forgetting(counts, labels, 2, 2, seed).tolist() for seed in range(10)]
    for p in picks:
        assert sorted(p[:2]) == [0, 2] and p[2] == 7 and p[3] in (4, 5, 6)
    assert len({p[3] for p in picks}) > 1  # the tie among 4, 5, 6 depends on the seed...
    assert picks[3] == select_forgetting(counts, labels, 2, 2, 3).tolist()  # ...and only on it


# ---------------------------------------------------------------- per class

class Flatten(nn.Module):
    def embed(self, x):
        return x.flatten(1)


def test_per_class_selection_is_class_major_and_in_class():
    torch.manual_seed(0)
    images, labels = torch.randn(30, 1, 4, 4), torch.arange(3).repeat(10)
    for select in (select_herding, select_kcenter):
        index = select(Flatten(), images, labels, 3, 4)
        assert labels[index].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    members = (labels == 1).nonzero().squeeze(1)
    assert select_herding(Flatten(), images, labels, 3, 4)[4:8].tolist() == \
        members[herding(images[members].flatten(1), 4)].tolist()
    with pytest.raises(UserError, match='class 0 has only 10 training images, fewer than --ipc 11'):
        select_kcenter(Flatten(), images, labels, 3, 11)


def test_random_is_the_draw_of_init_real():
    torch.manual_seed(0)
    images, labels = torch.randn(50, 1, 4, 4), torch.randint(3, (50,))
    torch.manual_seed(1)
    expected = ClassSampler(images, labels, 3).sample(4)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(images[select_random(labels, 3, 4)], expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the extractor and its cache

def tiny_data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=gen), torch.arange(4).repeat(16)


def test_extractor_is_seeded_and_leaves_the_global_rng_alone():
    images, labels = tiny_data()
    settings = extractor_settings('MNIST', 'ConvNetW32', 3, len(images), epochs=2)
    state = torch.get_rng_state()
    a = train_extractor(images, labels, 4, settings)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_extractor(images, labels, 4, settings)
    assert torch.equal(a.forgetting, b.forgetting)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert int(a.forgetting.max()) <= 2  # at most one event per presentation after the first, or 2 unlearned


def test_an_epoch_presents_every_example_once():
    images, labels = tiny_data()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    counter = ForgettingCounter(len(images))
    train_epoch(net, images, labels, 10, torch.optim.SGD(net.parameters(), lr=0.1), counter)
    assert counter.presentations.tolist() == [1] * len(images)


def test_extractor_cache_is_reused_and_refused_with_other_settings(tmp_path):
    images, labels = tiny_data()
    settings = extractor_settings('MNIST', 'ConvNetW32', 0, len(images), epochs=1)
    path = cache_file(tmp_path, settings)
    trained = get_extractor(path, images, labels, 4, settings)
    reused = get_extractor(path, images, labels, 4, settings)
    assert not trained.reused and reused.reused and torch.equal(trained.forgetting, reused.forgetting)
    assert all(torch.equal(p, q) for p, q in zip(trained.net.parameters(), reused.net.parameters()))
    other = {**settings, 'epochs': 2}
    assert cache_file(tmp_path, other) != path  # other settings never find this file...
    with pytest.raises(UserError, match=r'made with other settings: epochs 1 \(not 2\)'):
        get_extractor(path, images, labels, 4, other)  # ...and are refused when pointed at it
    path.write_bytes(b'not a torch file')
    with pytest.raises(UserError, match='not a readable extractor file'):
        get_extractor(path, images, labels, 4, settings)


# ---------------------------------------------------------------- main_coreset.py on real MNIST

TINY = ['--dataset', 'MNIST', '--ipc', '1', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1',
        '--test_images', '200', '--train_images', '1000', '--extractor_epochs', '1', '--model', 'ConvNetW32']


def run_folder(save, method, name):
    return next((save / 'MNIST').glob(f'{method}_ipc*/{name}'))


def chosen(save, method, name):
    """(indices of experiment 0, its (images, labels), results.json) of a run."""
    d = run_folder(save, method, name)
    index = json.loads((d / 'indices_exp0.json').read_text())
    return index, torch.load(next(d.glob('res_*.pt')))['data'][0], json.loads((d / 'results.json').read_text())


def test_coresets_are_real_images_and_share_the_cached_extractor(tmp_path, mnist_path):
    common = [*TINY, '--data_path', mnist_path, '--save_path', str(tmp_path)]
    for method in ('herding', 'kcenter'):
        main_coreset.main([*common, '--method', method, '--run_name', method])
    main_coreset.main([*common, '--method', 'forgetting', '--ipc', '3', '--run_name', 'forgetting'])
    caches = list((tmp_path / 'MNIST' / 'extractors').iterdir())
    assert len(caches) == 1  # trained once, reused twice
    h_index, (h_images, h_labels), h_results = chosen(tmp_path, 'Herding', 'herding')
    k_index, _, k_results = chosen(tmp_path, 'KCenter', 'kcenter')
    assert not h_results['extractors']['0']['reused'] and k_results['extractors']['0']['reused']
    assert h_index == k_index  # ipc 1: both take the image nearest the class mean
    data = load_dataset('MNIST', mnist_path)
    f_index, (f_images, f_labels), _ = chosen(tmp_path, 'Forgetting', 'forgetting')
    for index, images, labels, ipc in ((h_index, h_images, h_labels, 1), (f_index, f_images, f_labels, 3)):
        assert labels.tolist() == [c for c in range(10) for _ in range(ipc)]
        assert torch.equal(images, data.images_train[index]) and data.labels_train[index].tolist() == labels.tolist()
        assert max(index) < 1000
    counts = torch.load(caches[0])['forgetting']
    for c in range(10):  # the chosen ones are the most forgotten of their class
        in_class = counts[:1000][data.labels_train[:1000] == c]
        assert sorted(counts[f_index[3 * c:3 * c + 3]].tolist()) == sorted(in_class.tolist())[-3:]


def test_random_draws_the_images_of_init_real(tmp_path, mnist_path):
    common = ['--dataset', 'MNIST', '--ipc', '2', '--num_exp', '2', '--num_eval', '1', '--epoch_eval_train', '1',
              '--test_images', '200', '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate',
              '--data_path', mnist_path, '--save_path', str(tmp_path)]
    main_coreset.main([*common, '--method', 'random', '--protocol', 'dsa', '--run_name', 'random'])
    main_DM.main([*common, '--init', 'real', '--Iteration', '0', '--run_name', 'dm'])
    ours = torch.load(run_folder(tmp_path, 'Random', 'random') / 'res_Random_MNIST_ConvNet_2ipc.pt')
    dm = torch.load(run_folder(tmp_path, 'DM', 'dm') / 'res_DM_MNIST_ConvNet_2ipc.pt')
    for (x, y), (x_dm, y_dm) in zip(ours['data'], dm['data'], strict=True):
        assert torch.equal(x, x_dm) and torch.equal(y, y_dm)
    assert not torch.equal(ours['data'][0][0], ours['data'][1][0])  # a new draw per experiment
    assert ours['accs_all_exps']['ConvNet'] == dm['accs_all_exps']['ConvNet']  # and the same evaluation


def test_an_incompatible_extractor_file_is_refused(tmp_path, mnist_path, capsys):
    common = [*TINY, '--data_path', mnist_path, '--save_path', str(tmp_path), '--method', 'herding']
    main_coreset.main([*common, '--run_name', 'a'])
    cache = next((tmp_path / 'MNIST' / 'extractors').iterdir())
    with pytest.raises(SystemExit) as e:
        run_main(main_coreset.main, [*common, '--run_name', 'b', '--extractor', str(cache), '--extractor_epochs', '2'])
    assert e.value.code == 2
    assert 'made with other settings: epochs 1 (not 2)' in capsys.readouterr().err


def test_whole_evaluates_the_whole_training_set(tmp_path, mnist_path):
    main_coreset.main([*TINY, '--train_images', '300', '--method', 'whole', '--data_path', mnist_path,
                       '--save_path', str(tmp_path), '--run_name', 'w'])
    d = run_folder(tmp_path, 'Whole', 'w')
    results = json.loads((d / 'results.json').read_text())
    counts = torch.bincount(load_dataset('MNIST', mnist_path).labels_train[:300])
    assert results['complete'] and results['stored_floats'] == 300 * 28 * 28
    assert results['images_per_class'] == int(counts.max()) and d.parent.name == f'Whole_ipc{int(counts.max())}'
    assert not list(d.glob('res_*.pt'))  # the dataset is not saved again


@pytest.mark.parametrize('flags, message', [
    ([], 'choose a --method'),
    (['--method', 'random', '--dsa_strategy', 'crop'], '--protocol dc uses no DSA'),
    (['--method', 'random', '--protocol', 'dsa', '--dsa_strategy', 'none'], '--protocol dsa needs DSA'),
    (['--method', 'herding', '--extractor', 'missing.pt'], '--extractor missing.pt does not exist'),
    (['--method', 'herding', '--extractor_model', 'ConvNetX'], "unknown --extractor_model 'ConvNetX'"),
    (['--method', 'random', '--ipc', '200'], 'class 0 has only'),
])
def test_bad_input_stops_with_one_sentence(tmp_path, mnist_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run_main(main_coreset.main, [*TINY, '--data_path', mnist_path, '--save_path', str(tmp_path / 'out'), *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()  # nothing half-made


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_config_parses(path):
    cfg = json.loads(path.read_text())
    args = main_coreset.get_args(['--config', str(path)])
    assert main_coreset.METHODS[args.method] == path.stem.split('_')[0] and args.ipc == cfg['ipc']
    assert args.dataset == path.parent.name and '_paper_accuracy' in cfg and '_source' in cfg


# ---------------------------------------------------------------- quality on real MNIST

# A short CPU budget: a narrow ConvNet (width 32) for the extractor (1 epoch on the first 1000 training
# images) and the evaluation (2 networks, 60 epochs with DSA, 500 test images). Measured with seeds 0, 1, 2:
# random 52.9, 57.2, 46.6; herding 69.4, 75.0, 71.0 (the paper, full protocol: 64.9 and 89.2).
QUALITY = ['--dataset', 'MNIST', '--ipc', '1', '--protocol', 'dsa', '--num_exp', '1', '--num_eval', '2',
           '--epoch_eval_train', '60', '--test_images', '500', '--train_images', '1000', '--extractor_epochs', '1',
           '--model', 'ConvNetW32']
MARGIN = 0.08


def test_herding_beats_random_at_ipc_1(tmp_path, mnist_path):
    accs = {}
    for method in ('random', 'herding'):
        main_coreset.main([*QUALITY, '--method', method, '--data_path', mnist_path, '--save_path', str(tmp_path),
                           '--run_name', method])
        results = json.loads((run_folder(tmp_path, method.capitalize(), method) / 'results.json').read_text())
        accs[method] = results['final']['ConvNetW32']['mean']
    assert accs['herding'] > accs['random'] + MARGIN, accs
