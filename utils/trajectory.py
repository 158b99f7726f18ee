"""MTT trajectory matching: a functional student and the trajectory loss with its gradients.

The student is any nn.Module run with a flat parameter vector (torch.func.functional_call over views of
that vector), like the original ReparamModule. Starting from an expert snapshot θ_0 = θ_start, the student
takes syn_steps SGD steps on minibatches of the synthetic images X with the learnable learning rate syn_lr:

    θ_{i+1} = θ_i - syn_lr * ∇_θ CE(f(aug(X[b_i]); θ_i), y[b_i])
    loss    = ||θ_N - θ_target||² / ||θ_start - θ_target||²

`trajectory_loss_and_grads` returns the loss and its gradients with respect to X and syn_lr, computed in
one of three modes ('unrolled', 'exact', 'tesla', see there). The caller then pushes them into X's
producers (pixels, or low-rank factors A and B of X = A@B) and syn_lr with `backward_from`.

Augmentation contract: `augment(x) -> x` is differentiable in x and may draw its randomness from the
global torch RNG (CPU, and CUDA when x is on a CUDA device), e.g. non-Siamese DSA. The modes that
recompute a step ('exact', 'tesla') snapshot the RNG state before each step of the forward pass and
restore it for the recomputation, so the recomputed step sees the same augmentation draws (and the same
dropout masks, if the student has dropout). After the call the RNG is where the forward pass left it, so
all three modes consume the global RNG identically.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from utils import Diverged, UserError

MODES = ('unrolled', 'exact', 'tesla')


def flatten_params(net):
    """All parameters of `net` (shared ones once), in parameter order, as one detached 1-D tensor."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def flatten_snapshot(snapshot):
    """An expert snapshot (list of per-parameter tensors in parameter order) as one 1-D tensor."""
    return torch.cat([t.detach().reshape(-1) for t in snapshot])


class FlatModel:
    """Runs `net` with its parameters taken from a flat vector; buffers (BN running stats) stay the module's."""

    def __init__(self, net):
        self.net = net
        named = list(net.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.num_params = sum(self.sizes)

    def params(self, flat):
        """Dict name -> view of `flat` (num_params,) with that parameter's shape."""
        return {n: v.view(s) for n, v, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def __call__(self, x, flat):
        return functional_call(self.net, self.params(flat), (x,))


def _rng_state(device):
    state = [torch.get_rng_state()]
    if device.type == 'cuda':
        state.append(torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state[1], device)


def _step_grad(fmodel, x, y, theta, augment, create_graph):
    """∇_θ CE(f(augment(x); θ), y) as a flat vector (num_params,)."""
    out = fmodel(augment(x) if augment is not None else x, theta)
    return torch.autograd.grad(F.cross_entropy(out, y), theta, create_graph=create_graph)[0]


def trajectory_loss_and_grads(model, X, y, syn_lr, theta_start, theta_target, batches, augment=None,
                              mode='unrolled'):
    """MTT loss of a syn_steps = len(batches) student unroll, and its gradients w.r.t. X and syn_lr.

    model: the student nn.Module (structure and buffers only; its parameter values are not used).
    X: (N, C, H, W) synthetic images; it need not be a leaf (e.g. A@B); it is not differentiated here.
    y: (N,) class labels. syn_lr: scalar tensor. theta_start, theta_target: (num_params,) flat expert
    snapshots (moved to X's device and dtype). batches: one LongTensor of indices into X per student step.
    augment: None or a callable x -> x following the augmentation contract of this module's docstring.
    mode:
      'unrolled' keeps the whole unroll in the autograd graph (create_graph=True) and differentiates once,
          as the original MTT. Memory grows linearly with syn_steps.
      'exact'    same gradients up to float rounding with one step's graph alive at a time: a forward pass
          without graph stores θ_0..θ_N, then a reverse sweep recomputes each step with a graph and carries
          the adjoint g = dL/dθ_{i+1} back: dL/dsyn_lr -= <g, ∇_i>, dL/dX -= syn_lr ∂<∇_i, g>/∂X,
          g -= syn_lr H_i g (one autograd.grad of <∇_i, g> w.r.t. θ_i and the minibatch gives both products).
      'tesla'    an APPROXIMATION (first-order, TESLA, Cui et al. 2023): like 'exact' but treats H_i as zero
          when carrying the adjoint, so g = dL/dθ_N at every step and no Hessian-vector product is needed.
          Equal to 'exact' only when syn_steps == 1.
    Returns (loss: float, grad_X: tensor like X, grad_lr: tensor like syn_lr). Apply them with
    `backward_from(X, grad_X, syn_lr, grad_lr)`.
    """
    if mode not in MODES:
        raise UserError(f"unknown trajectory matching mode '{mode}': use one of {', '.join(MODES)}.")
    fmodel = FlatModel(model)
    if theta_start.numel() != fmodel.num_params:
        raise UserError(f"the expert snapshots have {theta_start.numel()} parameters but the student "
                        f"{fmodel.num_params}: use the same --model (and dataset) as the buffers.")
    theta_start = theta_start.detach().to(device=X.device, dtype=X.dtype)
    theta_target = theta_target.detach().to(device=X.device, dtype=X.dtype)
    X, lr = X.detach(), syn_lr.detach()
    if mode == 'unrolled':
        loss, grad_X, grad_lr = _unrolled(fmodel, X, y, lr, theta_start, theta_target, batches, augment)
    else:
        loss, grad_X, grad_lr = _adjoint(fmodel, X, y, lr, theta_start, theta_target, batches, augment,
                                         hessian=(mode == 'exact'))
    return loss, grad_X, grad_lr.reshape(syn_lr.shape)


def _unrolled(fmodel, X, y, lr, theta_start, theta_target, batches, augment):
    X = X.requires_grad_()
    lr = lr.requires_grad_()
    theta = theta_start.clone().requires_grad_()
    for b in batches:
        theta = theta - lr * _step_grad(fmodel, X[b], y[b], theta, augment, create_graph=True)
    loss = (theta - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()
    grad_X, grad_lr = torch.autograd.grad(loss, (X, lr))
    return loss.item(), grad_X, grad_lr


def _adjoint(fmodel, X, y, lr, theta_start, theta_target, batches, augment, hessian):
    """'exact' (hessian=True) or 'tesla' (hessian=False): forward without graph, then a reverse sweep."""
    thetas, rng = [theta_start], []
    for b in batches:
        rng.append(_rng_state(X.device))
        theta = thetas[-1].requires_grad_()
        grad = _step_grad(fmodel, X[b], y[b], theta, augment, create_graph=False)
        thetas.append((theta - lr * grad).detach())
        theta.requires_grad_(False)
    denom = (theta_start - theta_target).pow(2).sum()
    loss = (thetas[-1] - theta_target).pow(2).sum() / denom

    after_forward = _rng_state(X.device)
    g = 2 * (thetas[-1] - theta_target) / denom  # adjoint dL/dθ_{i+1}
    grad_X, grad_lr = torch.zeros_like(X), torch.zeros_like(lr)
    for i in reversed(range(len(batches))):
        _set_rng_state(X.device, rng[i])
        theta = thetas[i].requires_grad_()
        xb = X[batches[i]].requires_grad_()
        grad = _step_grad(fmodel, xb, y[batches[i]], theta, augment, create_graph=True)
        dot = (grad * g).sum()
        grad_lr -= dot.detach()
        if hessian:
            hvp, vjp_x = torch.autograd.grad(dot, (theta, xb))
            g = g - lr * hvp
        else:
            vjp_x, = torch.autograd.grad(dot, xb)
        grad_X.index_add_(0, batches[i], -lr * vjp_x)
        theta.requires_grad_(False)
    _set_rng_state(X.device, after_forward)
    return loss.item(), grad_X, grad_lr


def backward_from(X, grad_X, syn_lr, grad_lr):
    """Accumulate the returned gradients into .grad of X's producers (X itself if a leaf, or e.g. A and B
    of X = A@B) and of syn_lr, as loss.backward() would have done."""
    torch.autograd.backward([X, syn_lr], [grad_X, grad_lr])


def check_step(loss, grads, syn_lr):
    """Diverged unless the loss (a float) and the gradients are finite and syn_lr is positive."""
    lr = float(syn_lr.detach())
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        loss = float('nan')  # non-finite gradients count as a non-finite loss
    if not (math.isfinite(loss) and lr > 0):
        raise Diverged(f'loss {loss}, syn_lr {lr}')
