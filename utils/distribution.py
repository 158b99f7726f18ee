"""Distribution matching (DM: Zhao & Bilen, WACV 2023): one iteration on a fresh frozen random network.

The loss is a sum over classes of ||mean embed(real_c) - mean embed(syn_c)||², where both batches of class
c go through the same (Siamese) DSA transformation. Networks without batch norm embed each image on its
own, so the classes are processed in blocks: per block, a no-grad pass of its real images, a pass of its
synthetic images and a backward of its share of the loss. The gradient is the same as one pass of
everything, the memory is bounded by a block, and a block of real images is sized for the device's
caches (REAL_CHUNK). A block's result does not depend on the other blocks, so processes that condense
different blocks of classes compute exactly what one process would. With batch norm the batch statistics
must cover every class, so real and synthetic images each go through one pass of all classes, as the
original.
"""
import torch

from networks import get_network
from utils import finite
from utils.augmentation import siamese_augment

# Real images per forward pass, by device type. CPU: measured on 2-core AVX2 VMs, where batches of 256 ran
# 1.7x faster than one pass of 2560 images (the first layer's activations stay in cache). CUDA: not
# measured here (no GPU); large passes keep a GPU busy.
REAL_CHUNK = {'cpu': 256, 'cuda': 4096}


def frozen_network(model, data, device):
    """A fresh random network in train mode (batch norm, if any, uses batch statistics), not trainable."""
    net = get_network(model, data.channel, data.num_classes, data.im_size, device)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def embed_eager(net, x):
    return net.embed(x)


# The same function compiled (--compile): fuses normalization, activation and pooling. Fresh networks
# of one architecture reuse the compiled graph, since their parameters are its inputs.
embed_compiled = torch.compile(embed_eager)


def embed(net, x, chunk=None, compiled=False):
    """net.embed(x), in passes of at most `chunk` images."""
    fn = embed_compiled if compiled else embed_eager
    if chunk is None or len(x) <= chunk:
        return fn(net, x)
    return torch.cat([fn(net, part) for part in x.split(chunk)])


def class_means(features, sizes):
    """(len(sizes), D): the mean of each consecutive run of sizes[i] rows."""
    return torch.stack([part.mean(0) for part in features.split(sizes)])


def class_blocks(args, classes, device):
    """`classes` (a list) cut into blocks of whole classes, about REAL_CHUNK real images each; one block of
    every class for batch-norm networks."""
    if 'BN' in args.model:
        return [classes]
    per_block = max(1, REAL_CHUNK[torch.device(device).type] // args.batch_real)
    return [classes[i:i + per_block] for i in range(0, len(classes), per_block)]


def dm_backward(net, synset, sampler, args, param, blocks):
    """Accumulate the gradient of the DM loss of the classes in `blocks` into the synthetic set and return
    that loss (a detached scalar on the device).

    The random draws of an iteration (real images, one DSA seed per class) cover every class of the set,
    whichever blocks are given, so the blocks can be split over processes."""
    picked = sampler.draw(args.batch_real)
    seeds = dict(zip(synset.classes, torch.randint(2**31 - 1, (len(synset.classes),)).tolist()))
    chunk = None if 'BN' in args.model else REAL_CHUNK[sampler.images.device.type]
    total = torch.zeros((), device=sampler.images.device)
    for block in blocks:
        real = sampler.take(picked, block)[0]
        real_sizes = sampler.sizes(args.batch_real, block)
        syn, syn_sizes = synset.images(block), [synset.n] * len(block)
        if args.dsa:
            block_seeds = [seeds[c] for c in block]
            real = siamese_augment(real, args.dsa_strategy, param, block_seeds, real_sizes)
            syn = siamese_augment(syn, args.dsa_strategy, param, block_seeds, syn_sizes)
        with torch.no_grad():
            mean_real = class_means(embed(net, real, chunk, args.compile), real_sizes)
        loss = ((mean_real - class_means(embed(net, syn, compiled=args.compile), syn_sizes)) ** 2).sum()
        loss.backward()
        total += loss.detach()
    return total


def dm_iteration(args, data, synset, optimizer, sampler, param, blocks, total=None):
    """One DM iteration on a fresh frozen random network: the gradient of the blocks' classes, then one SGD
    step. Returns the loss summed over those classes (a float), or total(that) when the other classes are
    condensed by other processes; a non-finite loss raises Diverged before the step, so the set stays as
    it was."""
    net = frozen_network(args.model, data, sampler.images.device)
    optimizer.zero_grad()
    loss = dm_backward(net, synset, sampler, args, param, blocks)
    loss = finite(total(float(loss)) if total else loss)
    optimizer.step()
    return loss
