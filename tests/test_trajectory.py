import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import Diverged, UserError
from utils.trajectory import (FlatModel, backward_from, check_step, flatten_params, flatten_snapshot,
                              trajectory_loss_and_grads)

DT = torch.float64


def tiny_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(DT)


def rand_aug(x):
    """Random per-image flip, contrast and brightness drawn from the global RNG (not replayable by itself)."""
    n = x.shape[0]
    flip = torch.rand(n, 1, 1, 1, dtype=x.dtype) < 0.5
    x = torch.where(flip, x.flip(3), x)
    return x * (0.5 + torch.rand(n, 1, 1, 1, dtype=x.dtype)) + (torch.rand(n, 1, 1, 1, dtype=x.dtype) - 0.5)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = tiny_net()
    X = torch.randn(6, 1, 8, 8, dtype=DT)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    theta_start = flatten_params(net)
    theta_target = theta_start + 0.1 * torch.randn_like(theta_start)
    batches = list(torch.randperm(6).split(3)) + list(torch.randperm(6).split(3))  # syn_steps 4, batch 3
    return net, X, y, theta_start, theta_target, batches


def run(setup, mode, lr=0.3, augment=None, X=None, steps=None, seed=1):
    net, X0, y, ts, tt, batches = setup
    syn_lr = torch.tensor(lr, dtype=DT, requires_grad=True)
    torch.manual_seed(seed)  # same augmentation draws in every mode
    return trajectory_loss_and_grads(net, X0 if X is None else X, y, syn_lr, ts, tt,
                                     batches[:steps], augment, mode)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_flat_forward_round_trip_and_order():
    torch.manual_seed(0)
    net, x = tiny_net(), torch.randn(5, 1, 8, 8, dtype=DT)
    flat = flatten_params(net)
    fm = FlatModel(net)
    assert flat.shape == (fm.num_params,) == (sum(p.numel() for p in net.parameters()),)
    assert torch.allclose(fm(x, flat), net(x), atol=1e-12)
    assert torch.equal(flatten_snapshot([p.detach().clone() for p in net.parameters()]), flat)
    flat2 = flat + torch.randn_like(flat)  # a different vector gives the output of a net holding it
    nn.utils.vector_to_parameters(flat2, net.parameters())
    assert torch.allclose(fm(x, flat2), net(x), atol=1e-12)


def test_first_step_loss_by_hand(setup):
    net, X, y, ts, tt, batches = setup
    b, lr = batches[0], 0.3
    ce = F.cross_entropy(net(X[b]), y[b])
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ce, list(net.parameters()))])
    theta1 = ts - lr * g
    expected = ((theta1 - tt).pow(2).sum() / (ts - tt).pow(2).sum()).item()
    for mode in ('unrolled', 'exact', 'tesla'):
        loss, _, _ = run(setup, mode, lr=lr, steps=1)
        assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('augment', [None, rand_aug])
def test_exact_equals_unrolled(setup, augment):
    lu, gXu, glru = run(setup, 'unrolled', augment=augment)
    rng_u = torch.rand(3)
    le, gXe, glre = run(setup, 'exact', augment=augment)
    rng_e = torch.rand(3)
    assert le == pytest.approx(lu, rel=1e-12)
    assert rel(gXe, gXu) < 1e-10
    assert rel(glre, glru) < 1e-10
    assert glre.shape == glru.shape == ()
    assert torch.equal(rng_u, rng_e)  # both modes leave the global RNG in the same state


def test_augmentation_changes_gradient(setup):
    _, gX, _ = run(setup, 'exact', augment=None)
    _, gXa, _ = run(setup, 'exact', augment=rand_aug)
    assert rel(gXa, gX) > 1e-3


def test_gradient_flows_into_low_rank_factors(setup):
    grads = {}
    for mode in ('unrolled', 'exact'):
        torch.manual_seed(5)
        A = torch.randn(6, 1, 8, 2, dtype=DT, requires_grad=True)
        B = torch.randn(6, 1, 2, 8, dtype=DT, requires_grad=True)
        syn_lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
        net, _, y, ts, tt, batches = setup
        X = A @ B
        torch.manual_seed(1)
        loss, gX, glr = trajectory_loss_and_grads(net, X, y, syn_lr, ts, tt, batches, rand_aug, mode)
        backward_from(X, gX, syn_lr, glr)
        assert torch.equal(syn_lr.grad, glr)
        grads[mode] = (A.grad, B.grad, syn_lr.grad)
    for u, e in zip(grads['unrolled'], grads['exact']):
        assert u.abs().sum() > 0
        assert rel(e, u) < 1e-10


def test_backward_from_leaf_pixels(setup):
    net, X0, y, ts, tt, batches = setup
    X = X0.clone().requires_grad_()
    syn_lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    _, gX, glr = trajectory_loss_and_grads(net, X, y, syn_lr, ts, tt, batches, None, 'exact')
    backward_from(X, gX, syn_lr, glr)
    assert torch.equal(X.grad, gX) and torch.equal(syn_lr.grad, glr)


def test_unrolled_lr_gradient_matches_finite_difference(setup):
    lr, h = 0.3, 1e-5
    _, _, glr = run(setup, 'unrolled', lr=lr, augment=rand_aug)
    lp = run(setup, 'unrolled', lr=lr + h, augment=rand_aug)[0]
    lm = run(setup, 'unrolled', lr=lr - h, augment=rand_aug)[0]
    assert glr.item() == pytest.approx((lp - lm) / (2 * h), rel=1e-6)


def test_exact_image_gradient_matches_finite_difference(setup):
    _, X, _, _, _, _ = setup
    _, gX, _ = run(setup, 'exact', augment=rand_aug)
    V = torch.randn(X.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    h = 1e-5
    lp = run(setup, 'exact', augment=rand_aug, X=X + h * V)[0]
    lm = run(setup, 'exact', augment=rand_aug, X=X - h * V)[0]
    assert (gX * V).sum().item() == pytest.approx((lp - lm) / (2 * h), rel=1e-6)


def test_tesla_is_first_order_approximation(setup):
    _, gX1, glr1 = run(setup, 'exact', augment=rand_aug, steps=1)
    _, tX1, tlr1 = run(setup, 'tesla', augment=rand_aug, steps=1)
    assert rel(tX1, gX1) < 1e-12 and rel(tlr1, glr1) < 1e-12
    le, gX, glr = run(setup, 'exact', augment=rand_aug)
    lt, tX, tlr = run(setup, 'tesla', augment=rand_aug)
    assert lt == pytest.approx(le, rel=1e-12)  # same forward pass, only the gradient is approximated
    assert torch.isfinite(tX).all() and torch.isfinite(tlr)
    assert rel(tX, gX) > 1e-6 and rel(tlr, glr) > 1e-6
    assert F.cosine_similarity(tX.flatten(), gX.flatten(), dim=0) > 0.5


def test_bad_inputs(setup):
    net, X, y, ts, tt, batches = setup
    lr = torch.tensor(0.1, dtype=DT)
    with pytest.raises(UserError, match='mode'):
        trajectory_loss_and_grads(net, X, y, lr, ts, tt, batches, None, 'fancy')
    with pytest.raises(UserError, match='parameters'):
        trajectory_loss_and_grads(net, X, y, lr, ts[:-1], tt[:-1], batches, None, 'exact')


def test_check_step():
    check_step(0.8, (torch.ones(3),), torch.tensor(0.01))
    for loss, grad, lr in [(float('nan'), 1.0, 0.01), (float('inf'), 1.0, 0.01), (0.5, 1.0, -0.001),
                           (0.5, 1.0, 0.0), (0.5, float('nan'), 0.01)]:
        with pytest.raises(Diverged, match=r'loss .*, syn_lr'):
            check_step(loss, (torch.tensor([0.0, grad]),), torch.tensor(lr))
