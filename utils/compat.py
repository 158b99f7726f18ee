"""The original repositories' utils API (VICO DatasetCondensation utils.py, which MTT, IDC, HaBa, DATM and
the plugin build on), as thin adapters over this repository's code:

    from utils import get_dataset, get_network, get_eval_pool, evaluate_synset, DiffAugment, ParamDiffAug

A script written against the original runs unchanged and gets our fixes: no reseeding from the clock in
get_network, DSA that runs on current PyTorch, Siamese draws from the given seed only. Differences that
remain: get_network builds on the GPU when there is one but does not wrap several GPUs in DataParallel;
evaluate_synset draws from the global RNG (seed it with torch.manual_seed for repeatable results).
"""
import time

import torch
from torch.utils.data import DataLoader, Dataset

import networks
from utils import ORIGINAL_API
from utils.augmentation import ParamDiffAug, dc_augment, diff_augment, get_daparam as _get_daparam, siamese_augment
from utils.data import load_dataset, zca_whiten
from utils.evaluate import EVAL_POOLS, evaluate_synset as _evaluate_synset, get_eval_pool as _get_eval_pool, run_epoch
from utils.matching import get_loops, match_loss as _match_loss  # noqa: F401 (get_loops: re-exported)

__all__ = list(ORIGINAL_API)


def _device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


class TensorDataset(Dataset):
    """Images (detached, float) and labels (detached); indexing gives (image, label)."""

    def __init__(self, images, labels):
        self.images = images.detach().float()
        self.labels = labels.detach()

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self):
        return self.images.shape[0]


def get_dataset(dataset, data_path, batch_size=None, subset=None, args=None):
    """The DC form get_dataset(dataset, data_path) returns the original's 9 values (channel, im_size,
    num_classes, class_names, mean, std, dst_train, dst_test, testloader): normalized TensorDatasets and a
    test loader of batch 256. The MTT form get_dataset(dataset, data_path, batch_size, subset, args=args)
    returns MTT's 12: the 9 (test batch 128; ZCA-whitened when args.zca, the fitted inverse in
    args.zca_trans as a function) plus loader_train_dict (None), class_map and class_map_inv (identities).
    ImageNet subsets are not supported (`subset` is ignored)."""
    data = load_dataset(dataset, data_path)
    mtt = batch_size is not None or args is not None
    if mtt and getattr(args, 'zca', False):
        args.zca_trans = zca_whiten(data, _device())
    dst_train = TensorDataset(data.images_train, data.labels_train)
    dst_test = TensorDataset(data.images_test, data.labels_test)
    testloader = DataLoader(dst_test, batch_size=128 if mtt else 256, shuffle=False, num_workers=0)
    values = (data.channel, data.im_size, data.num_classes, data.class_names, data.mean, data.std, dst_train,
              dst_test, testloader)
    if not mtt:
        return values
    identity = {c: c for c in range(data.num_classes)}
    return (*values, None, identity, dict(identity))


def get_network(model, channel, num_classes, im_size=(32, 32)):
    """A fresh network on the GPU if there is one (the original reseeded the RNG from the clock here)."""
    return networks.get_network(model, channel, num_classes, im_size, _device())


def get_eval_pool(eval_mode, model, model_eval):
    """The evaluation architectures of eval_mode; any other mode gives [model_eval], as the original."""
    if eval_mode in ('S', 'SS', *EVAL_POOLS):
        return _get_eval_pool(eval_mode, model)
    return [model_eval]


def DiffAugment(x, strategy='', seed=-1, param=None):  # noqa: N802 (the original's name)
    """DSA: seed -1 draws per sample from the global RNG; any other seed transforms the whole batch alike,
    from that seed alone (Siamese)."""
    param = param or ParamDiffAug()
    if seed == -1:
        return diff_augment(x, strategy, param)
    return siamese_augment(x, strategy, param, [seed], [len(x)])


def match_loss(gw_syn, gw_real, args):
    return _match_loss(gw_syn, gw_real, args.dis_metric)


def get_daparam(dataset, model, model_eval, ipc):
    """The classic augmentation parameters (model and ipc are unused, as in the original)."""
    return _get_daparam(dataset, model_eval)


def augment(images, dc_aug_param, device):
    """The classic DC augmentation, in place as the original (device is unused: the images' own is used)."""
    if dc_aug_param is None or dc_aug_param.get('strategy', 'none') == 'none':
        return images
    with torch.no_grad():
        images.copy_(dc_augment(images, dc_aug_param))
    return images


def _training_augmentation(args):
    """What the original's epoch() applies with aug=True: DSA if args.dsa, else args.dc_aug_param."""
    if args.dsa:
        return lambda x: diff_augment(x, args.dsa_strategy, getattr(args, 'dsa_param', None) or ParamDiffAug())
    param = getattr(args, 'dc_aug_param', None)
    if param is None or param['strategy'] == 'none':
        return None
    return lambda x: dc_augment(x, param)


def _tensors(dataloader, device):
    images, labels = zip(*dataloader)
    return torch.cat(images).float().to(device), torch.cat(labels).to(device)


def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    """One pass over the loader's data ('train' shuffles and updates); returns (mean loss, accuracy).
    The loss is cross-entropy (criterion is the original's CrossEntropyLoss)."""
    images, labels = _tensors(dataloader, args.device)
    train = mode == 'train'
    loss, acc = run_epoch(net, images, labels, dataloader.batch_size, optimizer if train else None,
                          _training_augmentation(args) if aug else None)
    return loss.item(), acc.item()


def evaluate_synset(it_eval, net, images_train, labels_train, testloader, args):
    """Train net on the set with the original protocol (args.lr_net, args.epoch_eval_train, args.batch_train,
    augmentation as epoch()), test once; returns (net, train accuracy, test accuracy)."""
    start = time.time()
    test_x, test_y = _tensors(testloader, args.device)
    acc_train, acc_test = _evaluate_synset(net, images_train.to(args.device), labels_train.to(args.device),
                                           test_x, test_y, args.lr_net, args.epoch_eval_train, args.batch_train,
                                           _training_augmentation(args))
    print(f'{get_time()} Evaluate_{it_eval:02d}: epoch = {args.epoch_eval_train:04d} train time = '
          f'{time.time() - start:.0f} s train acc = {acc_train:.4f}, test acc = {acc_test:.4f}')
    return net, acc_train, acc_test


def get_time():
    return str(time.strftime('[%Y-%m-%d %H:%M:%S]', time.localtime()))
