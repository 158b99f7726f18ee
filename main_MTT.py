"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022); with
--rank, LoMTT (the low-rank plugin).

Every iteration takes a segment of an expert trajectory (buffer.py): θ_start = the snapshot after a random
epoch below --max_start_epoch, θ_target = the snapshot --expert_epochs later. A functional student starts at
θ_start and takes --syn_steps SGD steps on minibatches (--batch_syn, random permutation chunks) of the
non-Siamese DSA-augmented synthetic images with a learnable learning rate syn_lr (initial --lr_teacher);
the loss ||θ_N - θ_target||² / ||θ_start - θ_target||² updates the images (SGD, --lr_img, momentum 0.5) and
syn_lr (SGD, --lr_lr, momentum 0.5). The low-rank set computes A·B once per iteration, before the unroll.
Evaluation trains fresh networks with lr = the learned syn_lr.

--matching chooses how the gradient is computed (utils/trajectory.py): 'unrolled' (the original) keeps the
whole unroll in the autograd graph, so memory grows with syn_steps; 'exact' gives the same gradient with
one step's graph at a time (it stores only the syn_steps+1 parameter vectors and recomputes each step
backwards, carrying the adjoint with a Hessian-vector product; about 1.3x the compute of 'unrolled');
'tesla' is TESLA's first-order APPROXIMATION (drops the dependence of later steps on earlier ones, so no
Hessian-vector product in θ; not the same gradient; constant memory too, and only slightly cheaper than
'exact'). See benchmarks/bench_mtt.py.

results.json reports the final accuracy (after --Iteration updates) and, labelled as selected on the test
set, the best mean over the evaluation points (the number the original reports).

    python buffer.py --dataset CIFAR10 --train_epochs 50 --num_experts 100 --zca
    python main_MTT.py --config configs/CIFAR10/MTT_ipc1.json
    python main_LoMTT.py --config configs/CIFAR10/LoMTT_ipc1.json
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads: idle OpenMP threads sleep, not spin

import torch
from torch import nn

from buffer import buffer_files, expert_dir, load_trajectories
from networks import get_network
from utils import UserError, to_device
from utils.augmentation import FULL_STRATEGY, ParamDiffAug, diff_augment
from utils.data import zca_whiten
from utils.memory import check_memory
from utils.run import (Run, add_original_mtt_flags, apply_original_mtt_flags, check_rates, make_parser, parse_args,
                       place_data, read_data, run_main, save_torch, str_to_bool)
from utils.synset import make_synset
from utils.trajectory import (MODES, backward_from, check_step, flatten_snapshot,
                              trajectory_loss_and_grads)

# The original MTT distill.py defaults (section 4.7), and the plugin's main_LoMTT where it differs.
DEFAULTS = dict(dataset='CIFAR10', ipc=1, init='real', eval_mode='S', eval_every=100, num_eval=5, num_exp=1,
                Iteration=5000, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01, syn_steps=20, expert_epochs=3,
                max_start_epoch=25, buffer_path='buffers', matching='unrolled', dsa_strategy=FULL_STRATEGY,
                epoch_eval_train=1000)
LOW_RANK_DEFAULTS = dict(init='noise', lr_lr=1e-7, syn_steps=50, expert_epochs=2, max_start_epoch=5)


def make_mtt_parser(method, low_rank):
    p = make_parser(f'{method}: matching training trajectories', {}, low_rank)
    g = p.add_argument_group('trajectory matching')
    g.add_argument('--pix_init', dest='init', choices=['noise', 'real'], help='the original MTT name of --init')
    g.add_argument('--syn_steps', type=int, help='student SGD steps per iteration')
    g.add_argument('--expert_epochs', type=int, help='expert epochs between θ_start and θ_target')
    g.add_argument('--max_start_epoch', type=int, help='θ_start is the snapshot after a random epoch below this')
    g.add_argument('--lr_lr', type=float, help='learning rate of the learnable syn_lr (SGD, momentum 0.5)')
    g.add_argument('--lr_teacher', type=float, help='initial value of the learnable syn_lr')
    g.add_argument('--batch_syn', type=int, default=None, help='student minibatch (default: the whole set)')
    g.add_argument('--buffer_path', help='folder of the expert buffers (buffer.py)')
    g.add_argument('--load_all', action='store_true',
                   help='load every expert file at once (else one file at a time, in a random order)')
    g.add_argument('--max_files', type=int, default=None, help='use only this many expert files')
    g.add_argument('--max_experts', type=int, default=None, help='use only this many experts of each file')
    g.add_argument('--zca', action='store_true', help='ZCA-whitened data (experts made with buffer.py --zca)')
    g.add_argument('--matching', choices=MODES,
                   help="gradient of the trajectory loss: 'unrolled' (the original; memory grows with "
                        "syn_steps), 'exact' (the same gradient in constant memory, ~1.3x compute), 'tesla' "
                        "(TESLA's first-order approximation: constant memory, not the same gradient)")
    g.add_argument('--standardize_eval', action='store_true',
                   help="evaluate as the plugin's LoMTT code: every batch standardized to zero mean and unit "
                        "std (train and test, test batches of 128); off by default")
    g.add_argument('--no_aug', type=str_to_bool, default=False,
                   help='no DSA in the student unroll (evaluation keeps it); the original MTT flag')
    add_original_mtt_flags(p)
    p.set_defaults(**{**DEFAULTS, **(LOW_RANK_DEFAULTS if low_rank else {})})
    return p


def get_args(argv=None, low_rank=False):
    return parse_args(make_mtt_parser('LoMTT' if low_rank else 'MTT', low_rank), argv, prepare=check_mtt_args)


def check_mtt_args(args):
    for name in ('syn_steps', 'expert_epochs', 'max_start_epoch', 'batch_syn', 'max_files', 'max_experts'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be at least 1 (got {value}).')
    check_rates(args, 'lr_teacher', 'lr_lr')
    apply_original_mtt_flags(args)


class LearnedRate(nn.Module):
    """The student's learnable learning rate syn_lr (a module, so it checkpoints like everything else)."""

    def __init__(self, lr):
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(float(lr)))


class Experts:
    """Expert trajectories of one buffer folder, each kept as a (max_start_epoch + expert_epochs, P) tensor
    of flat snapshots (the later ones are never used).

    --load_all: every file in memory, a random trajectory each time. Otherwise one file at a time: files
    in a random order, the experts of a file in a random order, a new file when one runs out, a new file
    order after a pass. The order comes from the torch RNG and the position is in state_dict, so a resumed
    run continues exactly. --max_files / --max_experts keep the first files of that order (with --load_all:
    of the files sorted by number) / the first experts of each file.
    """

    def __init__(self, args, num_params):
        self.args, self.num_params = args, num_params
        self.folder = expert_dir(args.buffer_path, args.dataset, args.model, args.zca)
        self.keep = args.max_start_epoch + args.expert_epochs
        names = [f.name for f in buffer_files(self.folder)]
        if not names:
            zca = 'with --zca' if args.zca else 'without --zca'
            raise UserError(f'no expert files (replay_buffer_*.pt) in {self.folder}, where the {args.model} '
                            f'experts on {args.dataset} made {zca} belong: run buffer.py --dataset '
                            f'{args.dataset} --model {args.model}{" --zca" if args.zca else ""} --buffer_path '
                            f'{args.buffer_path} first, or give the --buffer_path it used.')
        self.names = names
        if args.load_all:
            self.all = [t for name in names[:args.max_files] for t in self.read(name)]
        else:
            self.all = None
            self.read(names[0])  # wrong experts: stop now, not at the first iteration
        self.current_name = None

    def read(self, name):
        """The trajectories of one file as (keep, P) tensors; a UserError if they do not fit the student."""
        a, out = self.args, []
        for t in load_trajectories(self.folder / name)[:a.max_experts]:
            size = sum(s.numel() for s in t[0])
            if size != self.num_params:
                raise UserError(f'the experts in {self.folder / name} have {size} parameters but {a.model} on '
                                f'{a.dataset} has {self.num_params}: they were made for another model or '
                                f'dataset; run buffer.py --dataset {a.dataset} --model {a.model}.')
            if len(t) < self.keep:
                raise UserError(f'the experts in {self.folder / name} have {len(t) - 1} epochs but '
                                f'--max_start_epoch {a.max_start_epoch} and --expert_epochs {a.expert_epochs} '
                                f'need {self.keep - 1}: lower them, or make experts with buffer.py '
                                f'--train_epochs {self.keep - 1} or more.')
            out.append(torch.stack([flatten_snapshot(s) for s in t[:self.keep]]))
        return out

    def restart(self):
        """A fresh random file order (file by file); call at the start of each experiment."""
        if self.all is None:
            self.files = [self.names[i] for i in torch.randperm(len(self.names))[:self.args.max_files].tolist()]
            self.file_pos = 0
            self._open(None)

    def _open(self, order):
        name = self.files[self.file_pos]
        if name != self.current_name:
            self.current, self.current_name = self.read(name), name
        self.order = torch.randperm(len(self.current)).tolist() if order is None else order
        self.pos = 0

    def next(self):
        if self.all is not None:
            return self.all[int(torch.randint(len(self.all), ()))]
        if self.pos == len(self.order):
            self.file_pos += 1
            if self.file_pos == len(self.files):
                self.file_pos = 0
                self.files = [self.files[i] for i in torch.randperm(len(self.files)).tolist()]
            self._open(None)
        self.pos += 1
        return self.current[self.order[self.pos - 1]]

    def segment(self, device):
        """(θ_start, θ_target) flat on `device`: a random start epoch below max_start_epoch."""
        trajectory = self.next()
        start = int(torch.randint(self.args.max_start_epoch, ()))
        return to_device(trajectory[start], device), to_device(trajectory[start + self.args.expert_epochs], device)

    def state_dict(self):
        if self.all is not None:
            return {}
        return {'files': self.files, 'file_pos': self.file_pos, 'order': self.order, 'pos': self.pos}

    def load_state_dict(self, state):
        if self.all is None:
            self.files, self.file_pos = state['files'], state['file_pos']
            self._open(state['order'])
            self.pos = state['pos']


def student_batches(n, batch_syn, steps, device):
    """One index tensor per student step: chunks of batch_syn of random permutations of range(n), taken
    from the end (the original's pop()), a new permutation when they run out. Drawn on the host and
    copied to the device in one copy."""
    chunks, out = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n).split(batch_syn))
        out.append(chunks.pop())
    return list(to_device(torch.cat(out), device).split([len(b) for b in out]))


def main(argv=None, low_rank=False):
    method = 'LoMTT' if low_rank else 'MTT'
    args = get_args(argv, low_rank)
    device = torch.device(args.device)
    data = read_data(args)
    estimate = check_memory(method, args, data)
    unwhiten = zca_whiten(data, device) if args.zca else None  # before anything uses the images
    student = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device).train()
    experts = Experts(args, sum(p.numel() for p in student.parameters()))
    sampler = place_data(args, data, 'cpu')  # real training images: only for --init real
    run = Run(args, method, show=unwhiten, report_best=True, hint='lower --lr_lr or --lr_img')
    run.log(f'estimated peak memory: {estimate.total / 2**30:.1f} GiB')
    run.log(f'experts: {len(experts.names)} files in {experts.folder}')
    param = ParamDiffAug()
    augment = (lambda x: diff_augment(x, args.dsa_strategy, param)) if args.dsa and not args.no_aug else None
    for exp in run.experiments():
        synset = make_synset(args, data, sampler).to(device)
        run.start(data, synset)
        rate = LearnedRate(args.lr_teacher).to(device)
        opt_img = torch.optim.SGD(synset.parameters(), lr=args.lr_img, momentum=0.5)
        opt_lr = torch.optim.SGD(rate.parameters(), lr=args.lr_lr, momentum=0.5)
        experts.restart()
        state = {'synset': synset, 'opt_img': opt_img, 'opt_lr': opt_lr, 'syn_lr': rate, 'experts': experts}
        batch_syn = args.batch_syn or len(synset.labels)

        def eval_lr():  # evaluation trains with the learned rate; results.json records it per experiment
            run.results.setdefault('syn_lr', {})[str(exp)] = rate.lr.item()
            return rate.lr.item()

        for it in run.iterations(exp, synset, state, eval_lr):
            theta_start, theta_target = experts.segment(device)
            batches = student_batches(len(synset.labels), batch_syn, args.syn_steps, device)
            X = synset.images()  # low rank: A·B once, before the unroll
            loss, grad_X, grad_lr = trajectory_loss_and_grads(student, X, synset.labels, rate.lr, theta_start,
                                                              theta_target, batches, augment, args.matching)
            with run.guard(exp, it, synset, extra=lambda: {'syn_lr': rate.lr.item()}):
                check_step(loss, (grad_X, grad_lr), rate.lr)
                opt_img.zero_grad()
                opt_lr.zero_grad()
                backward_from(X, grad_X, rate.lr, grad_lr)
                opt_img.step()
                opt_lr.step()
                check_step(loss, (), rate.lr)  # the step may have made syn_lr non-positive
            if it % 10 == 0:
                run.log(f'iter {it:6d}  loss {loss:.4f}  syn_lr {rate.lr.item():.6f}')
    run.finish()
    if unwhiten is not None and run.rank == 0:  # res_*.pt holds whitened images (for evaluation); these show pixels
        save_torch(run.file('unwhitened', synset.n),
                   {'data': [[unwhiten(s['images'].to(device)).cpu(), s['labels']] for s in run.saved]})


if __name__ == '__main__':
    run_main(main)
