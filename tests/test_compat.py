"""The originals' utils API (utils/compat.py): a script written the way DC/DSA/DM/MTT/the plugin call it
runs against this repository."""
import textwrap

from conftest import REPO, run_script

# Imports and calls as the reference describes them (VICO utils.py): load a dataset, build a network,
# (in the DC form and MTT's), DiffAugment a batch (Siamese and not), match gradients, classic augmentation, evaluate_synset a small set.
ORIGINAL_STYLE = '''
import argparse, sys
import torch
from torch.utils.data import DataLoader
from utils import (get_dataset, get_network, get_eval_pool, evaluate_synset, get_daparam, match_loss, get_time,
                   DiffAugment, ParamDiffAug, TensorDataset, augment, epoch, get_loops)

channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset('MNIST', sys.argv[1])
assert (channel, tuple(im_size), num_classes, len(dst_train), len(dst_test)) == (1, (28, 28), 10, 60000, 10000)
assert testloader.batch_size == 256 and get_eval_pool('S', 'ConvNetBN', 'ConvNetBN') == ['ConvNet']
mtt_args = argparse.Namespace(zca=False)  # MTT's form: 12 values, test batch 128
*nine, loader_train_dict, class_map, class_map_inv = get_dataset('MNIST', sys.argv[1], 256, 'imagenette', args=mtt_args)
assert len(nine) == 9 and nine[8].batch_size == 128 and loader_train_dict is None and class_map[7] == class_map_inv[7] == 7
assert get_eval_pool('odd', 'ConvNet', 'LeNet') == ['LeNet'] and get_loops(10) == (10, 50)
args = argparse.Namespace(dsa=True, dsa_strategy='color_crop_cutout_flip_scale_rotate', dsa_param=ParamDiffAug(),
                          lr_net=0.01, epoch_eval_train=3, batch_train=256, device='cpu', dis_metric='ours',
                          dc_aug_param=None)
images_all = torch.cat([torch.unsqueeze(dst_train[i][0], dim=0) for i in range(200)])
labels_all = torch.tensor([dst_train[i][1] for i in range(200)])
indices_class = [[i for i in range(200) if labels_all[i] == c] for c in range(num_classes)]
image_syn = torch.cat([images_all[indices_class[c][:2]] for c in range(num_classes)])
label_syn = torch.arange(num_classes).repeat_interleave(2)
torch.manual_seed(0)
net = get_network('ConvNet', channel, num_classes, im_size)
real = DiffAugment(images_all[indices_class[3]], args.dsa_strategy, seed=7, param=args.dsa_param)
syn = DiffAugment(image_syn[6:8], args.dsa_strategy, seed=7, param=args.dsa_param)
assert torch.allclose(real[0], DiffAugment(images_all[indices_class[3][:1]], args.dsa_strategy, seed=7, param=args.dsa_param)[0])
aug = DiffAugment(image_syn, args.dsa_strategy, seed=-1, param=args.dsa_param)
assert aug.shape == image_syn.shape and not torch.equal(aug, image_syn)
params = list(net.parameters())
gw_real = torch.autograd.grad(torch.nn.functional.cross_entropy(net(real), torch.full((len(real),), 3)), params)
gw_syn = torch.autograd.grad(torch.nn.functional.cross_entropy(net(syn), torch.full((2,), 3)), params)
assert match_loss(gw_syn, gw_real, args) > 0
assert get_daparam('MNIST', 'ConvNet', 'ConvNet', 10)['strategy'] == 'crop_scale_rotate'
before = image_syn.clone()
assert augment(image_syn, get_daparam('MNIST', 'ConvNet', 'ConvNet', 1), 'cpu') is image_syn
assert not torch.equal(image_syn, before)  # in place, as the original
small_test = DataLoader(TensorDataset(dst_test.images[:300], dst_test.labels[:300]), batch_size=256)
loss, acc = epoch('test', small_test, net, None, torch.nn.CrossEntropyLoss(), args, aug=False)
assert 0 <= acc <= 1 and loss > 0
net, acc_train, acc_test = evaluate_synset(0, net, before, label_syn, small_test, args)
assert 0 <= acc_train <= 1 and 0 <= acc_test <= 1
print(get_time(), 'original-style script OK', acc_test)
'''


def test_a_script_written_for_the_original_runs(tmp_path, mnist_path):
    script = tmp_path / 'original_style.py'
    script.write_text(f'import sys; sys.path.insert(0, {str(REPO)!r})\n' + textwrap.dedent(ORIGINAL_STYLE))
    proc = run_script(script, mnist_path)
    assert 'original-style script OK' in proc.stdout
