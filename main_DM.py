"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023); with --rank, LoDM.

Every iteration draws a fresh random network, freezes it, and moves the mean embedding of each class's
synthetic images towards the mean embedding of a batch of that class's real images. Both batches of a
class go through the same (Siamese) DSA transformation. Networks without batch norm embed each image
independently of its batch, so all classes share one forward pass; with batch norm, real and synthetic
images each go through one pass of all classes, as in the original.

    python main_DM.py --dataset MNIST --ipc 10 --data_path ../shared/data
    python main_LoDM.py --dataset CIFAR10 --ipc 10 --rank 2
"""
import torch

from networks import get_network
from utils.augment import ParamDiffAug, diff_augment
from utils.run import Run, load_data, make_parser, parse_args, run_main
from utils.synset import make_synset

# The original's defaults (VICO main_DM.py, with the plugin's dataset, ipc and init).
DEFAULTS = dict(dataset='MNIST', ipc=10, eval_mode='SS', eval_every=2000, Iteration=20000, lr_img=1.0)
REAL_CHUNK = 4096  # real images embedded per forward pass (bounds memory; no effect on the result)


def frozen_network(args, data, device):
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    net.train()  # batch norm, if any, normalizes with the statistics of the batch
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


def class_means(features, labels, num_classes):
    """(num_classes, D) mean feature of each class."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    return sums / counts.unsqueeze(1)


def embed_eager(net, x):
    return net.embed(x)


# The same function compiled (--compile): fuses normalization, activation and pooling. Fresh networks
# of one architecture reuse the compiled graph, since their parameters are its inputs.
embed_compiled = torch.compile(embed_eager)


def embed(net, x, chunk=None, compiled=False):
    fn = embed_compiled if compiled else embed_eager
    x = x.contiguous(memory_format=torch.channels_last)
    if chunk is None or len(x) <= chunk:
        return fn(net, x)
    return torch.cat([fn(net, part) for part in x.split(chunk)])


def dm_loss(net, synset, sampler, args, param):
    """Sum over classes and feature dimensions of (mean real embedding - mean synthetic embedding)²."""
    real, real_labels = sampler.sample(args.batch_real)
    syn, syn_labels = synset.images(), synset.labels
    if args.dsa:  # one seed per iteration; every class draws its own transformation from it
        seed = int(torch.randint(2**31 - 1, ()))
        real = diff_augment(real, args.dsa_strategy, param, seed=seed, groups=real_labels)
        syn = diff_augment(syn, args.dsa_strategy, param, seed=seed, groups=syn_labels)
    batch_norm = 'BN' in args.model  # batch statistics must cover all real images at once
    with torch.no_grad():
        f_real = embed(net, real, None if batch_norm else REAL_CHUNK, args.compile)
    f_syn = embed(net, syn, compiled=args.compile)
    k = synset.num_classes
    return ((class_means(f_real, real_labels, k) - class_means(f_syn, syn_labels, k)) ** 2).sum()


def get_args(argv=None, low_rank=False):
    parser = make_parser(f'{"LoDM" if low_rank else "DM"}: distribution matching', DEFAULTS, low_rank)
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the embedding: about 30%% faster on CPU after a 30-60 s warm-up')
    return parse_args(parser, argv)


def main(argv=None, low_rank=False):
    method = 'LoDM' if low_rank else 'DM'
    args = get_args(argv, low_rank)
    data, sampler = load_data(args)
    run = Run(args, method)
    param = ParamDiffAug()
    for exp in run.experiments():
        synset = make_synset(args, data, sampler)
        run.start(data, synset)
        optimizer = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
        for it in run.iterations(exp, synset, {'synset': synset, 'optimizer': optimizer}):
            net = frozen_network(args, data, sampler.images.device)
            loss = dm_loss(net, synset, sampler, args, param)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log_loss(it, loss.item() / data.num_classes)
    run.finish()


if __name__ == '__main__':
    run_main(main)
