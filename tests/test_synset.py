"""The low-rank plugin: budget formula, reconstruction, gradients, storage and the SVD initialization."""
import pytest
import torch

from utils import UserError
from utils.synset import SyntheticSet, images_per_class

# Section 5.2 of the reference, the paper's formula floor(ipc·H·W / (r·(H+W))), for ipc 1 / 10 / 50.
TABLE = [
    (32, 1, (16, 160, 800)), (32, 2, (8, 80, 400)), (32, 4, (4, 40, 200)), (32, 8, (2, 20, 100)),
    (28, 2, (7, 70, 350)), (28, 4, (3, 35, 175)), (28, 8, (1, 17, 87)),
    (64, 2, (16, 160, 800)), (64, 4, (8, 80, 400)), (64, 8, (4, 40, 200)),
]


@pytest.mark.parametrize('size, rank, expected', TABLE)
def test_images_per_class_matches_hand_table(size, rank, expected):
    assert tuple(images_per_class(ipc, rank, (size, size)) for ipc in (1, 10, 50)) == expected


def test_pixels_keep_ipc():
    assert images_per_class(10, None, (32, 32)) == 10


@pytest.mark.parametrize('ipc, rank, match', [(0, None, '--ipc'), (0, 2, '--ipc'), (1, 15, 'no image per class'),
                                              (1, 29, 'between 1 and 28'), (1, 0, 'between 1 and 28')])
def test_impossible_ipc_or_rank_is_a_clear_error(ipc, rank, match):
    with pytest.raises(UserError, match=match):
        images_per_class(ipc, rank, (28, 28))


def test_low_rank_shapes_and_reconstruction():
    torch.manual_seed(0)
    s = SyntheticSet(num_classes=3, ipc=1, channel=3, im_size=(32, 32), rank=2)
    assert s.n == 8
    assert s.a.shape == (24, 3, 32, 2) and s.b.shape == (24, 3, 2, 32)
    assert s.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    x = s.images()
    i, c = 13, 2  # one image channel, by hand: x[h, w] = sum_k a[h, k] b[k, w]
    by_hand = torch.stack([torch.stack([sum(s.a[i, c, h, k] * s.b[i, c, k, w] for k in range(2))
                                        for w in range(32)]) for h in range(32)])
    torch.testing.assert_close(x[i, c], by_hand)
    torch.testing.assert_close(s.images(classes=[1]), x[8:16])
    torch.testing.assert_close(s.images(classes=[2, 0]), torch.cat([x[16:], x[:8]]))


def test_gradients_reach_both_factors():
    torch.manual_seed(0)
    s = SyntheticSet(num_classes=2, ipc=1, channel=1, im_size=(28, 28), rank=2)
    w = torch.randn(s.num_classes * s.n, 1, 28, 28)
    (s.images() * w).sum().backward()
    # d/dA sum(W ∘ AB) = W Bᵀ and d/dB = Aᵀ W
    torch.testing.assert_close(s.a.grad, w @ s.b.detach().transpose(-1, -2))
    torch.testing.assert_close(s.b.grad, s.a.detach().transpose(-1, -2) @ w)


def test_stored_floats_never_exceed_the_pixel_budget():
    for size in (28, 32, 64):
        for rank in (1, 2, 3, 4, 8, 13):
            for ipc in (1, 7, 10, 50):
                if ipc * size * size < rank * 2 * size:
                    continue  # not even one image fits: a UserError, tested above
                s = SyntheticSet(num_classes=2, ipc=ipc, channel=3, im_size=(size, size), rank=rank)
                assert s.stored_floats() <= s.budget_floats()
                # and the budget is used: one more image per class would not fit
                assert s.stored_floats() + 2 * 3 * rank * 2 * size > s.budget_floats()


def test_svd_init_has_the_truncation_error_eckart_young_predicts():
    torch.manual_seed(0)
    s = SyntheticSet(num_classes=2, ipc=1, channel=3, im_size=(32, 32), rank=2)
    real = torch.randn(2 * s.n, 3, 32, 32)
    s.init_real(real)
    sv = torch.linalg.svdvals(real)  # (N, C, 32)
    predicted = sv[..., 2:].pow(2).sum(-1).sqrt()  # Frobenius error of the best rank-2 approximation
    error = (s.images() - real).flatten(2).norm(dim=-1)
    torch.testing.assert_close(error, predicted, rtol=1e-4, atol=1e-4)
    # both factors carry the same scale: ||A[:, :, :, k]|| = ||B[:, :, k, :]|| = sqrt(sigma_k)
    torch.testing.assert_close(s.a.detach().norm(dim=-2), s.b.detach().norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_pixel_init_real_copies_images():
    s = SyntheticSet(num_classes=2, ipc=3, channel=1, im_size=(28, 28))
    real = torch.randn(6, 1, 28, 28)
    s.init_real(real)
    assert torch.equal(s.images(), real)
    assert [name for name, _ in s.named_parameters()] == ['pixels']
    assert set(s.factors()) == {'pixels'}
