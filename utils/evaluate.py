"""Evaluation: train fresh networks from scratch on a synthetic set and test them on the real test set.

The protocol is the original's (section 3.2 of the reference): SGD with momentum 0.9 and weight decay
5e-4 for epochs+1 epochs, the learning rate divided by 10 (and the optimizer rebuilt) after epoch
epochs//2 + 1, augmentation on every training batch, one test pass at the end.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from networks import get_network
from utils.augment import ParamDiffAug, dc_augment, diff_augment, get_daparam

EVAL_POOLS = {
    'M': ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18'],
    'B': ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN'],
    'W': ['ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256'],
    'D': ['ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4'],
    'A': ['ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish'],
    'P': ['ConvNetNP', 'ConvNetMP', 'ConvNetAP'],
    'N': ['ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN'],
}
EVAL_MODES = ('S', 'SS', *EVAL_POOLS)


def get_eval_pool(eval_mode, model):
    """Architectures to evaluate on (section 3.6). 'S': the model with everything from 'BN' on cut off
    (as the original: ConvNetBN -> ConvNet, ResNet18BN_AP -> ResNet18); 'SS': the model itself."""
    if eval_mode in EVAL_POOLS:
        return EVAL_POOLS[eval_mode]
    if eval_mode == 'S' and 'BN' in model:
        return [model[:model.index('BN')]]
    return [model]


def eval_recipe(args, model_eval):
    """(augmentation, epochs) for training evaluation models, the original's rules (section 3.3).

    With DSA on: non-Siamese DSA and 1000 epochs. Otherwise the classic DC augmentation of get_daparam
    (none, except crop_scale_rotate on MNIST and crop_noise for ConvNetBN) and 300 epochs when it is none,
    1000 when not. An explicit --epoch_eval_train wins (the original silently overrode it).
    """
    if args.dsa:
        param = ParamDiffAug()
        aug, epochs = (lambda x: diff_augment(x, args.dsa_strategy, param)), 1000
    else:
        daparam = get_daparam(args.dataset, model_eval)
        none = daparam['strategy'] == 'none'
        aug, epochs = (None if none else lambda x: dc_augment(x, daparam)), (300 if none else 1000)
    return aug, args.epoch_eval_train or epochs


def run_epoch(net, images, labels, batch_size, optimizer=None, aug=None, standardize=False):
    """One pass over tensors already on the net's device: shuffled training if an optimizer is given,
    else testing. Returns (mean loss, accuracy).

    standardize: scale every batch to zero mean and unit std over the whole batch tensor, before the
    augmentation (the plugin's LoMTT evaluation, utils_mtt.epoch; off in every other method)."""
    train = optimizer is not None
    net.train(train)
    order = torch.randperm(len(images), device=images.device) if train else None
    loss_sum, correct = 0.0, 0
    with torch.set_grad_enabled(train):
        for start in range(0, len(images), batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            if standardize:
                x = (x - x.mean()) / x.std()
            if aug is not None:
                x = aug(x)
            out = net(x)
            loss = F.cross_entropy(out, y)
            if train:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
    return loss_sum / len(images), correct / len(images)


def evaluate_synset(net, images_train, labels_train, images_test, labels_test, lr, epochs, batch_size, aug,
                    standardize=False):
    """Train `net` on the synthetic set with the original protocol; returns (train acc, test acc).
    standardize: see run_epoch (train and test batches alike)."""
    images_train, labels_train = images_train.detach(), labels_train.detach()
    make_opt = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    optimizer = make_opt(lr)
    for ep in range(epochs + 1):
        _, acc_train = run_epoch(net, images_train, labels_train, batch_size, optimizer, aug, standardize)
        if ep == epochs // 2 + 1:
            optimizer = make_opt(lr * 0.1)
    _, acc_test = run_epoch(net, images_test, labels_test, 256, standardize=standardize)
    return acc_train, acc_test


def evaluate_pool(args, data, images, labels, lr, desc=''):
    """Test accuracies {model: [num_eval accuracies]} of fresh networks of every model in the eval pool.
    With args.standardize_eval (LoMTT's switch; absent elsewhere) every batch is standardized (run_epoch)."""
    device = images.device
    standardize = getattr(args, 'standardize_eval', False)
    test_x, test_y = data.images_test.to(device), data.labels_test.to(device)
    accs = {}
    for model_eval in get_eval_pool(args.eval_mode, args.model):
        aug, epochs = eval_recipe(args, model_eval)
        accs[model_eval] = []
        for _ in tqdm(range(args.num_eval), desc=f'{desc} eval {model_eval}', leave=False):
            net = get_network(model_eval, data.channel, data.num_classes, data.im_size).to(device)
            _, acc = evaluate_synset(net, images, labels, test_x, test_y, lr, epochs, args.batch_train, aug,
                                     standardize)
            accs[model_eval].append(acc)
    return accs
