"""Gradient matching (DC: Zhao, Mopuri & Bilen, ICLR 2021; with Siamese augmentation, DSA: Zhao & Bilen,
ICML 2021): the distances, the outer/inner loop schedule, batch-norm freezing and one matching step.

A matching step draws a batch of real images per class and, for every class c, compares the gradient of
the cross-entropy on c's real images with the gradient on c's synthetic images, both with respect to the
parameters of the same network. The real gradients are constants (no graph); only the synthetic ones are
built with create_graph=True, so the summed distance can be backpropagated to the synthetic set.
"""
import torch
import torch.nn.functional as F
from torch import nn

from networks import get_network
from utils import UserError, finite
from utils.augmentation import diff_augment, siamese_augment
from utils.evaluate import run_epoch

METRICS = ('ours', 'mse', 'cos')
EPS = 1e-6  # in every cosine denominator, as the original

# (outer_loop, inner_loop) of the original for the ipc values it defines (VICO utils.get_loops). The plugin
# replaced 20 -> (20, 25) by (10, 50) in a branch meant for its own images-per-class values; we keep VICO's.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
MAX_OUTER = 50     # the DSA author's advice for ipc above 50: (50, 10)
INNER_BUDGET = 500  # outer * inner of the original's table (10*50, 20*25, 50*10)
BN_IMAGES_PER_CLASS = 16


def get_loops(ipc):
    """(outer_loop, inner_loop) for `ipc` images per class (for low rank: the budget ipc, as the plugin).

    The original's values where it defines them (LOOPS); the original exits for any other ipc. Elsewhere
    we follow the table's pattern: one outer step per image per class up to 50, and about 500 inner
    epochs in all: outer = min(ipc, 50), inner = round(500 / outer). So 2 -> (2, 250), 5 -> (5, 100),
    and every ipc above 50 -> (50, 10), the DSA author's advice for large sets (issue #2).
    """
    if ipc < 1:
        raise UserError(f'--ipc must be at least 1 (got {ipc}).')
    if ipc in LOOPS:
        return LOOPS[ipc]
    outer = min(ipc, MAX_OUTER)
    return outer, round(INNER_BUDGET / outer)


def layer_distance(gr, gs):
    """'ours' for one parameter: sum over output units (rows) of 1 - cos(real row, synthetic row).

    Conv weights (out, in, kh, kw) give rows of in*kh*kw, layer-norm weights (C, H, W) rows of H*W,
    linear weights are used as they are; 1-D tensors (biases, norm scales and shifts) count 0.
    """
    if gr.dim() == 1:
        return gr.new_zeros(())
    gr, gs = gr.flatten(1), gs.flatten(1)
    return (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + EPS)).sum()


def match_loss(gw_syn, gw_real, metric):
    """Distance between two lists of per-parameter gradients (section 3.7 of the reference).

    'ours': the sum of layer_distance over parameters; 'mse': the squared L2 distance of all gradients
    flattened and concatenated (biases included); 'cos': 1 - cosine of those two concatenated vectors.
    """
    if metric == 'ours':
        return sum(layer_distance(gr, gs) for gr, gs in zip(gw_real, gw_syn))
    if metric not in ('mse', 'cos'):
        raise UserError(f"unknown --dis_metric {metric!r}; choose one of: {', '.join(METRICS)}.")
    real = torch.cat([g.flatten() for g in gw_real])
    syn = torch.cat([g.flatten() for g in gw_syn])
    if metric == 'mse':
        return ((syn - real) ** 2).sum()
    return 1 - (real * syn).sum() / (real.norm() * syn.norm() + EPS)


def batch_norm_modules(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def freeze_batch_norm(net, sampler, classes):
    """As the original before every matching step: if the net has batch norm, one train-mode forward of
    16 real images per class updates the running statistics (momentum update, not a reset), then every
    BN module is put in eval mode, so the matching forwards use those fixed statistics and each image
    is processed independently of its batch."""
    bns = batch_norm_modules(net)
    if not bns:
        return
    net.train()
    net(sampler.sample(BN_IMAGES_PER_CLASS, classes)[0])
    for m in bns:
        m.eval()


def class_loss(net, x, c):
    """Mean cross-entropy of the images x, all of class c."""
    return F.cross_entropy(net(x), torch.full((len(x),), c, dtype=torch.long, device=x.device))


def matching_loss(net, synset, sampler, args, param):
    """The summed matching distance over the set's classes for the current net (BN frozen by the caller).

    One real batch for all classes (args.batch_real per class), one reconstruction of the synthetic set,
    and, with DSA, one seed per class: class c's real and synthetic images get the same transformation
    (Siamese). The real gradients are constants.
    """
    classes = synset.classes
    real, sizes = sampler.sample(args.batch_real, classes)[0], sampler.sizes(args.batch_real, classes)
    syn = synset.images()
    if args.dsa:
        seeds = torch.randint(2**31 - 1, (len(classes),)).tolist()
        real = siamese_augment(real, args.dsa_strategy, param, seeds, sizes)
        syn = siamese_augment(syn, args.dsa_strategy, param, seeds, [synset.n] * len(classes))
    params = list(net.parameters())
    loss = 0
    for c, x_real, x_syn in zip(classes, real.split(sizes), syn.split(synset.n)):
        gw_real = torch.autograd.grad(class_loss(net, x_real, c), params)
        gw_syn = torch.autograd.grad(class_loss(net, x_syn, c), params, create_graph=True)
        loss = loss + match_loss(gw_syn, gw_real, args.dis_metric)
    return loss


def matching_step(net, synset, optimizer, sampler, args, param):
    """One SGD step of the synthetic set on matching_loss; returns the loss (summed over classes, a float;
    a non-finite loss raises Diverged before the step). The backward pass stops at the synthetic set: no
    gradient is computed for the network."""
    loss = matching_loss(net, synset, sampler, args, param)
    optimizer.zero_grad()
    loss.backward(inputs=list(synset.parameters()))
    value = finite(loss)
    optimizer.step()
    return value


def train_on_synset(net, optimizer, synset, args, param, epochs):
    """The inner loop: `epochs` epochs of the net on the detached synthetic set (batch args.batch_train),
    with non-Siamese DSA when DSA is on and no augmentation otherwise (as the original)."""
    images, labels = synset.images().detach(), synset.labels
    aug = (lambda x: diff_augment(x, args.dsa_strategy, param)) if args.dsa else None
    for _ in range(epochs):
        run_epoch(net, images, labels, args.batch_train, optimizer, aug)


def dc_iteration(args, data, synset, optimizer, sampler, param, loops):
    """One outer iteration of DC/DSA on a fresh network: outer_loop matching steps of the synthetic set,
    with inner_loop epochs of training the network on it in between. Returns the mean matching loss per
    class and step."""
    outer_loop, inner_loop = loops
    net = get_network(args.model, data.channel, data.num_classes, data.im_size, sampler.images.device)
    net.train()
    net_optimizer = torch.optim.SGD(net.parameters(), lr=args.lr_net)  # no momentum, as the original
    total = 0.0
    for ol in range(outer_loop):
        freeze_batch_norm(net, sampler, synset.classes)
        total += matching_step(net, synset, optimizer, sampler, args, param)
        if ol == outer_loop - 1:  # the net is not trained after the last matching step
            break
        train_on_synset(net, net_optimizer, synset, args, param, inner_loop)
    return total / (len(synset.classes) * outer_loop)
