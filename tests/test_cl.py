"""main_CL.py: class orders, steps, the test set of each step, the memory budget and files, --memory_path,
end to end on real MNIST with --resume, bad input, and the quality of low-rank memory."""
import json

import numpy as np
import pytest
import torch

import main_CL
import utils.evaluate
from conftest import run_script
from utils import UserError
from utils.data import load_dataset
from utils.run import run_main

TINY = ['--device', 'cpu', '--dataset', 'MNIST', '--steps', '5', '--orders', '1', '--ipc', '1', '--num_eval', '1',
        '--epoch_eval_train', '2', '--batch_real', '16', '--test_images', '500', '--Iteration', '2']


def test_class_orders_are_the_originals():
    assert main_CL.class_order(0, 10) == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]  # reference 2.1
    assert main_CL.class_order(0, 100)[:6] == [26, 86, 2, 55, 75, 93]
    assert main_CL.class_order(1, 100)[:5] == [80, 84, 33, 81, 93]
    assert main_CL.step_classes(main_CL.class_order(0, 10), 5) == [[2, 8], [4, 9], [1, 6], [7, 3], [0, 5]]
    assert [len(s) for s in main_CL.step_classes(list(range(100)), 10)] == [10] * 10


def test_random_memory_draws_the_originals_indices():
    """CL_DM.py: np.random.seed(s), the class order, then get_images(c, ipc) for every class of every step."""
    labels = torch.tensor([c for c in range(10) for _ in range(7)][::-1])  # 7 images per class, not sorted
    data = type('Data', (), {'labels_train': labels})
    picks = main_CL.random_memory(data, 3, main_CL.class_order(4, 10), 5, 4)
    np.random.seed(4)
    order = np.random.permutation(10).tolist()
    indices_class = [[i for i, lab in enumerate(labels.tolist()) if lab == c] for c in range(10)]
    expected = [np.random.permutation(indices_class[c])[:3] for c in order]
    assert [p.tolist() for p in picks] == [np.concatenate(expected[2 * t:2 * t + 2]).tolist() for t in range(5)]


def test_the_test_set_of_a_step_holds_exactly_the_seen_classes(mnist_path):
    data = load_dataset('MNIST', mnist_path)
    seen = [2, 8, 4]
    test = main_CL.seen_test(data, seen)
    expected = torch.isin(data.labels_test, torch.tensor(seen))
    assert torch.equal(test.labels_test, data.labels_test[expected])
    assert torch.equal(test.images_test, data.images_test[expected]) and len(test.labels_test) == int(expected.sum())


@pytest.mark.parametrize('size, channel', [((28, 28), 1), ((32, 32), 3), ((64, 64), 3)])
@pytest.mark.parametrize('ipc', [1, 10, 20])
@pytest.mark.parametrize('rank', [1, 2, 4, 8])
def test_low_rank_memory_fits_the_budget_of_ipc_images(size, channel, ipc, rank):
    args = main_CL.get_args(['--method', 'LoDM', '--ipc', str(ipc), '--rank', str(rank), '--device', 'cpu'])
    n = main_CL.images_per_class(args.ipc, args.rank, size)
    assert n * channel * rank * sum(size) <= ipc * channel * size[0] * size[1]


def run_dir(save, method='LoDM', run_name='t'):
    found = list((save / 'MNIST').glob(f'CL_{method}_ipc1*/{run_name}'))
    assert len(found) == 1, found
    return found[0]


def test_end_to_end_outputs_and_memory_path(tmp_path, mnist_path):
    run_script('main_CL.py', *TINY, '--method', 'LoDM', '--data_path', mnist_path, '--save_path', tmp_path,
               '--run_name', 't')
    d = run_dir(tmp_path)
    assert {'args.json', 'log.txt', 'results.json', 'table.md', 'curves.png',
            'cl_LoDM_MNIST_ConvNet_7ipc_5steps_seed0.pt'} <= {p.name for p in d.iterdir()}
    memory = torch.load(d / 'cl_LoDM_MNIST_ConvNet_7ipc_5steps_seed0.pt')  # the originals' format
    order = main_CL.step_classes(main_CL.class_order(0, 10), 5)
    assert len(memory['data']) == 5
    for (images, labels), classes, (a, b, _) in zip(memory['data'], order, memory['factors']):
        assert images.shape == (14, 1, 28, 28) and labels.tolist() == [c for c in classes for _ in range(7)]
        torch.testing.assert_close(a @ b, images)
    results = json.loads((d / 'results.json').read_text())
    assert results['complete'] and [r['seen_classes'] for r in results['per_step']] == [2, 4, 6, 8, 10]
    assert results['floats_per_class'] <= results['budget_floats_per_class']
    # the memory evaluated again from its file gives the same accuracies
    run_script('main_CL.py', *TINY, '--method', 'LoDM', '--data_path', mnist_path, '--save_path', tmp_path,
               '--run_name', 'again', '--memory_path', d)
    again = json.loads((run_dir(tmp_path, run_name='again') / 'results.json').read_text())
    assert again['accs'] == results['accs']


def test_resume_ends_with_the_same_results(tmp_path, mnist_path, monkeypatch):
    args = [*TINY, '--method', 'DM', '--data_path', mnist_path, '--save_path', str(tmp_path)]
    main_CL.main([*args, '--run_name', 'whole'])
    whole = json.loads((run_dir(tmp_path, 'DM', 'whole') / 'results.json').read_text())
    calls, real = [0], utils.evaluate.evaluate_networks

    def dying(*a, **k):  # killed while training the networks of step 3
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(main_CL, 'evaluate_networks', dying)
    with pytest.raises(KeyboardInterrupt):
        main_CL.main([*args, '--run_name', 'killed'])
    monkeypatch.setattr(main_CL, 'evaluate_networks', real)
    d = run_dir(tmp_path, 'DM', 'killed')
    assert len(json.loads((d / 'results.json').read_text())['accs']['0']) == 3
    main_CL.main(['--resume', str(d)])
    resumed = json.loads((d / 'results.json').read_text())
    assert resumed['accs'] == whole['accs'] and resumed['complete']


@pytest.mark.parametrize('flags, message', [
    (['--steps', '3'], 'does not divide the 10 classes'),
    (['--method', 'random', '--ipc', '7000'], 'more real images than the smallest class'),
    (['--memory_path', '{memory}', '--steps', '2'], 'holds 5 steps but --steps is 2'),
])
def test_bad_input_stops_with_one_sentence(tmp_path, mnist_path, flags, message):
    memory = tmp_path / 'memory'
    memory.mkdir()
    torch.save({'data': [[torch.zeros(2, 1, 28, 28), torch.tensor([c, c])] for c in range(5)]},
               memory / 'cl_DM_MNIST_ConvNet_1ipc_2steps_seed0.pt')
    flags = [f.format(memory=memory) for f in flags]
    proc = run_script('main_CL.py', *TINY, '--method', 'DM', '--data_path', mnist_path, '--save_path',
                      tmp_path / 'out', *flags, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.startswith('error: ') and message in proc.stderr, proc.stderr


def test_wrong_classes_in_a_memory_file_are_refused(tmp_path, mnist_path):
    memory = main_CL.Memory(tmp_path / 'm.pt')
    for c in range(5):
        memory.add(torch.zeros(2, 1, 28, 28), torch.tensor([c, c]))
    data = load_dataset('MNIST', mnist_path)
    with pytest.raises(UserError, match='step 0 holds classes \\[0\\]'):
        main_CL.check_memory(memory, main_CL.step_classes(main_CL.class_order(0, 10), 5), 1, data)


def test_plot_needs_run_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main_CL.main, ['--plot', str(tmp_path), '--out', str(tmp_path / 'c.png')])
    assert e.value.code == 2 and 'results.json does not exist' in capsys.readouterr().err


# Quality at a small CPU budget: 5 steps on MNIST, one order, a narrow ConvNet, 40 iterations per step, 2
# networks x 100 epochs per step tested on (the seen classes of) the first 2000 test images.
QUALITY = ['--device', 'cpu', '--dataset', 'MNIST', '--steps', '5', '--orders', '1', '--ipc', '1', '--num_eval', '2',
           '--model', 'ConvNetW32', '--epoch_eval_train', '100', '--batch_real', '64', '--test_images', '2000',
           '--Iteration', '40']
MARGIN = 0.07  # measured, mean over the 5 steps, seeds 0/1/2: random 68.8/66.8/68.1, LoDM 83.3/84.5/86.4


def test_low_rank_memory_beats_random_memory_at_the_same_budget(tmp_path, mnist_path):
    def mean_over_steps(method):
        main_CL.main([*QUALITY, '--method', method, '--data_path', mnist_path, '--save_path', str(tmp_path),
                      '--run_name', method])
        rows = json.loads((run_dir(tmp_path, method, method) / 'results.json').read_text())['per_step']
        return sum(r['mean'] for r in rows) / len(rows)

    random_acc, lodm = mean_over_steps('random'), mean_over_steps('LoDM')
    assert lodm > random_acc + MARGIN, (lodm, random_acc)
