"""Evaluation: train fresh networks from scratch on a synthetic set and test them on the real test set.

The protocol is the original's (section 3.2 of the reference): SGD with momentum 0.9 and weight decay
5e-4 for epochs+1 epochs, the learning rate divided by 10 (and the optimizer rebuilt) after epoch
epochs//2 + 1, shuffled batches of --batch_train with augmentation on every training batch, one test pass
at the end (batches of 256; 128 with standardized batches). The --num_eval networks of a model are trained in fixed blocks of
consecutive indices, the networks of a block together (utils/ensemble.py); network k of model m is seeded
with seed_for(--seed, 'eval', *key, m, k), so its accuracy does not depend on the block size, the other
networks or the process that trains it, beyond float rounding.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import seed_for
from utils.augmentation import ParamDiffAug, get_daparam
from utils.distributed import Team, split
from utils.ensemble import dc_augmentation, dsa_augment, network_groups, train

# Networks trained together per device type (args.train_together overrides it). On the 2-core CPU (ConvNet,
# CIFAR shapes, CPU time per network and step, median of 5 in one process): batches of 10 images (ipc 1)
# 65, 63, 54, 53, 53 ms for 1, 2, 5, 10, 20 at a time; batches of 100 (ipc 10) 516, 496, 474, 512 ms for
# 1, 2, 5, 10. With networks.AvgPool2d, wall seconds for 20 networks x 20 epochs at ipc 1 (median of 2):
# MNIST 21.7, 16.0, 13.3, 14.2 and CIFAR 14.0, 13.3, 15.0, 12.8 for 2, 5, 10, 20; 20 x 3 epochs at MNIST ipc 10
# 18.3, 17.7, 17.4, 16.8 for 1, 2, 3, 5. Five keeps a block's memory below 4 GB at batches of 256 (ipc 50).
# CUDA: not measured here (no GPU); larger blocks fill a GPU better.
TRAIN_TOGETHER = {'cpu': 5, 'cuda': 10}

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
    1000 when not. An explicit --epoch_eval_train wins (the original silently overrode it). The
    augmentation is None or augment(x, generators) of utils/ensemble.py: each network draws from its own
    generator.
    """
    if args.dsa:
        aug, epochs = dsa_augment(args.dsa_strategy, ParamDiffAug()), 1000
    else:
        daparam = get_daparam(args.dataset, model_eval)
        none = daparam['strategy'] == 'none'
        aug, epochs = (None if none else dc_augmentation(daparam)), (300 if none else 1000)
    return aug, epochs if args.epoch_eval_train is None else args.epoch_eval_train


def run_epoch(net, images, labels, batch_size, optimizer=None, aug=None, standardize=False):
    """One pass of one network over tensors already on its device: shuffled training (global RNG) if an
    optimizer is given, else testing. Returns (mean loss, accuracy) as tensors on the device (not read).

    standardize: scale every batch to zero mean and unit std over the whole batch tensor, before the
    augmentation aug(x) (the plugin's LoMTT evaluation, utils_mtt.epoch; off in every other method)."""
    train_mode = optimizer is not None
    net.train(train_mode)
    order = torch.randperm(len(images), device=images.device) if train_mode else None
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    with torch.set_grad_enabled(train_mode):
        for start in range(0, len(images), batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            if standardize:
                x = (x - x.mean()) / x.std()
            if aug is not None:
                x = aug(x)
            out = net(x)
            loss = F.cross_entropy(out, y)
            if train_mode:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
    return loss_sum / len(images), correct / len(images)


def evaluate_synset(net, images_train, labels_train, images_test, labels_test, lr, epochs, batch_size, aug,
                    standardize=False):
    """Train one network `net` on the synthetic set with the original protocol (randomness from the global
    RNG, aug(x) a batch augmentation); returns (train acc, test acc). standardize: see run_epoch (train
    and test batches alike; test batches of 128 then, as the plugin)."""
    images_train, labels_train = images_train.detach(), labels_train.detach()
    make_opt = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    optimizer = make_opt(lr)
    for ep in range(epochs + 1):
        _, acc_train = run_epoch(net, images_train, labels_train, batch_size, optimizer, aug, standardize)
        if ep == epochs // 2 + 1:
            optimizer = make_opt(lr * 0.1)
    _, acc_test = run_epoch(net, images_test, labels_test, batch_for_testing(standardize), standardize=standardize)
    return acc_train.item(), acc_test.item()


def batch_for_testing(standardize):
    """Test batch size: 256, or 128 with standardized batches (the plugin's LoMTT protocol)."""
    return 128 if standardize else 256


def train_together(args):
    """How many evaluation networks are trained together: --train_together, else TRAIN_TOGETHER."""
    return getattr(args, 'train_together', None) or TRAIN_TOGETHER.get(torch.device(args.device).type, 1)


def network_blocks(args):
    """The fixed blocks of consecutive network indices 0..num_eval-1 trained together (any process may
    train any block: the results are the same)."""
    size = train_together(args)
    return [list(range(start, min(start + size, args.num_eval))) for start in range(0, args.num_eval, size)]


def network_seeds(args, key, model_eval, indices):
    """Seeds of the evaluation networks `indices` of model_eval at evaluation point `key` (a tuple)."""
    return [seed_for(args.seed, 'eval', *key, model_eval, k) for k in indices]


def evaluate_networks(args, data, images, labels, lr, model_eval, seeds, log=tqdm.write):
    """Test accuracies of fresh model_eval networks, one per seed, trained together (pass one block of
    network_blocks) on (images, labels) with the original protocol; log(message) says when the
    architecture must be trained one network at a time."""
    aug, epochs = eval_recipe(args, model_eval)
    standardize = getattr(args, 'standardize_eval', False)
    device = images.device
    test_x, test_y = data.images_test.to(device), data.labels_test.to(device)
    images, labels = images.detach(), labels.detach()
    accs = []
    for group in network_groups(model_eval, data.channel, data.num_classes, data.im_size, seeds, device, log):
        train(group, images, labels, epochs + 1, lr, args.batch_train, 0.9, 5e-4, decay_epoch=epochs // 2 + 1,
              augment=aug, standardize=standardize)
        accs += group.test(test_x, test_y, batch_for_testing(standardize), standardize)[1].tolist()
    return accs


def evaluate_pool(args, data, images, labels, lr, key, desc='', log=tqdm.write, team=None):
    """Test accuracies {model: [accuracy of network k for k < num_eval]} of fresh networks of every model
    in the eval pool, trained on (images, labels) at learning rate lr; key (a tuple, e.g. (exp, it)) names
    the evaluation point in the networks' seeds. The members of a torchrun team (utils/distributed.py)
    each train every team.size-th block of networks and gather the others'. With args.standardize_eval
    (LoMTT's switch; absent elsewhere) every batch is standardized."""
    team, accs = team or Team(), {}
    for model_eval in get_eval_pool(args.eval_mode, args.model):
        blocks = network_blocks(args)
        mine = [evaluate_networks(args, data, images, labels, lr, model_eval,
                                  network_seeds(args, key, model_eval, block), log)
                for block in tqdm(split(blocks, team.member, team.size), desc=f'{desc} eval {model_eval}',
                                  leave=False)]
        parts = team.gather(mine)  # member m trained blocks m, m + size, ...
        accs[model_eval] = [a for b in range(len(blocks)) for a in parts[b % team.size][b // team.size]]
    return accs
