"""main_eval.py: re-evaluating what LoDM wrote (res_*.pt, factors_*.pt, an image/label pair) gives the run's
accuracies; sets that do not fit the dataset stop with one sentence."""
import json

import pytest
import torch

import main_DM
import main_eval
from conftest import DATA
from utils.run import run_main

TINY = ['--dataset', 'MNIST', '--ipc', '1', '--Iteration', '2', '--eval_every', '2', '--num_exp', '2',
        '--num_eval', '1', '--epoch_eval_train', '2', '--batch_real', '16', '--test_images', '300']


@pytest.fixture(scope='module')
def lodm_run(tmp_path_factory):
    """A finished two-experiment LoDM run: (its folder, {experiment: final accuracies})."""
    if not (DATA / 'MNIST' / 'raw').exists():
        pytest.skip(f'real MNIST not found in {DATA} (set CONDENSE_DATA)')
    save = tmp_path_factory.mktemp('cond')
    main_DM.main([*TINY, '--data_path', str(DATA), '--save_path', str(save), '--run_name', 'r'], low_rank=True)
    d = save / 'MNIST' / 'LoDM_ipc1_r2' / 'r'
    final = json.loads((d / 'results.json').read_text())['final']['ConvNet']['accs']
    return d, {e: accs for e, accs in enumerate(final)}


def evaluate(tmp_path, mnist_path, name, *flags):
    main_eval.main([*map(str, flags), '--data_path', mnist_path, '--save_path', str(tmp_path / 'eval'), '--run_name', name,
                    '--test_images', '300'])
    d = next((tmp_path / 'eval' / 'MNIST').glob(f'*/{name}'))
    results = json.loads((d / 'results.json').read_text())
    return d, {e['exp']: e['accs'] for e in results['evaluations']}, results


def test_res_and_factors_files_reproduce_the_run(tmp_path, mnist_path, lodm_run):
    d, accs = lodm_run
    _, got, results = evaluate(tmp_path, mnist_path, 'res', d / 'res_LoDM_MNIST_ConvNet_7ipc.pt')
    assert got == accs and results['complete']  # the run's seed, protocol and iteration: its networks
    out, got, results = evaluate(tmp_path, mnist_path, 'factors', d / 'factors_LoDM_MNIST_ConvNet_7ipc.pt')
    assert got == accs and results['rank'] == 2 and results['images_per_class'] == 7
    assert out.parent.name == 'Eval_LoDM_ipc1_r2'  # the budget and rank of the factors
    a, b, labels = torch.load(out / 'factors_Eval_LoDM_MNIST_ConvNet_7ipc.pt')['data'][1]
    source = torch.load(d / 'factors_LoDM_MNIST_ConvNet_7ipc.pt')['data'][1]
    assert torch.equal(a, source[0]) and torch.equal(b, source[1]) and torch.equal(labels, source[2])
    out, got, _ = evaluate(tmp_path, mnist_path, 'other', d / 'res_LoDM_MNIST_ConvNet_7ipc.pt', '--exp', '1',
                           '--dsa_strategy', 'none', '--epoch_eval_train', '3')  # another protocol
    assert list(got) == [1]
    assert json.loads((out / 'args.json').read_text())['dsa_strategy'] == 'none'
    images = torch.load(out / 'res_Eval_LoDM_MNIST_ConvNet_7ipc.pt')['data'][0][0]
    assert torch.equal(images, torch.load(d / 'res_LoDM_MNIST_ConvNet_7ipc.pt')['data'][1][0])


def test_an_image_label_pair(tmp_path, mnist_path, lodm_run):
    d, accs = lodm_run
    images, labels = torch.load(d / 'res_LoDM_MNIST_ConvNet_7ipc.pt')['data'][0]
    order = torch.arange(len(labels)).view(10, 7).t().flatten()  # classes interleaved: the script sorts them
    torch.save(images[order], tmp_path / 'images_best.pt')
    torch.save(labels[order], tmp_path / 'labels_best.pt')
    torch.save(torch.tensor(0.02), tmp_path / 'lr.pt')
    run_args = json.loads((d / 'args.json').read_text())
    protocol = ['--dsa_strategy', run_args['dsa_strategy'], '--epoch_eval_train', '2', '--num_eval', '1',
                '--eval_mode', 'SS', '--Iteration', '2']
    out, got, _ = evaluate(tmp_path, mnist_path, 'pair', tmp_path / 'images_best.pt', '--labels',
                           tmp_path / 'labels_best.pt', '--dataset', 'MNIST', *protocol)
    assert got == {0: accs[0]} and out.parent.name == 'Eval_ipc7'
    out, _, _ = evaluate(tmp_path, mnist_path, 'lr', tmp_path / 'images_best.pt', '--labels',
                         tmp_path / 'labels_best.pt', '--dataset', 'MNIST', *protocol, '--syn_lr', tmp_path / 'lr.pt')
    assert 'trained at lr 0.02' in (out / 'log.txt').read_text()


def write(path, obj):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize('make, flags, message', [
    (lambda t: write(t / 'x.pt', torch.randn(10, 3, 32, 32)), ['--labels', '{labels}'],
     'holds 3x32x32 images but MNIST images are 1x28x28'),
    (lambda t: write(t / 'x.pt', torch.randn(20, 1, 28, 28)), ['--labels', '{labels100}'],
     'has labels 0 to 95 but MNIST has 10 classes'),
    (lambda t: write(t / 'x.pt', torch.randn(20, 1, 28, 28)), ['--labels', '{unbalanced}'],
     'evaluation needs the same number of images in every class'),
    (lambda t: write(t / 'x.pt', torch.randn(10, 1, 28, 28)), [], 'give their labels with --labels'),
    (lambda t: write(t / 'x.pt', {'images': torch.randn(10, 1, 28, 28)}), [], 'is in no format this script reads'),
    (lambda t: (t / 'x.pt').write_text('junk') and str(t / 'x.pt'), [], 'cannot be read as a saved set'),
    (lambda t: str(t / 'missing.pt'), [], 'does not exist'),
    (lambda t: write(t / 'res_DM_MNIST_ConvNet_1ipc.pt', {'data': [[torch.randn(10, 1, 28, 28), torch.arange(10)]]}),
     ['--exp', '1'], 'holds experiments 0 to 0: --exp 1 is not one of them'),
])
def test_a_set_that_does_not_fit_stops_with_one_sentence(tmp_path, mnist_path, capsys, make, flags, message):
    labels = {'labels': write(tmp_path / 'l10.pt', torch.arange(10)),
              'labels100': write(tmp_path / 'l100.pt', torch.arange(0, 100, 5)),
              'unbalanced': write(tmp_path / 'lu.pt', torch.tensor([0] * 11 + list(range(1, 10))))}
    file = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_main(main_eval.main, [file, '--dataset', 'MNIST', *[f.format(**labels) for f in flags],
                                  '--data_path', mnist_path, '--save_path', str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'out').exists()
