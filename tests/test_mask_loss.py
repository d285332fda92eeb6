"""Tests of the fused MaskFormer mask losses against the plain formulas and autograd."""

import pytest
import torch
import torch.nn.functional as F

from mask_former.modeling.criterion import dice_loss, sigmoid_focal_loss
from mask_former.modeling.mask_loss import (
    bilinear_upsample_matrix,
    focal_and_dice_terms,
    upsampled_focal_and_dice_loss,
)


def reference_losses(logits, targets, num_masks):
    """The published computation: upsample, then focal and dice on all target pixels."""
    up = F.interpolate(
        logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False
    ).flatten(1)
    flat_targets = targets.flatten(1).to(up.dtype)
    return sigmoid_focal_loss(up, flat_targets, num_masks), dice_loss(up, flat_targets, num_masks)


@pytest.mark.parametrize(
    "low, high", [((7, 9), (100, 37)), ((16, 24), (64, 96)), ((20, 20), (20, 20)), ((5, 8), (4, 3))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upsample_matrix_equals_interpolate(low, high, dtype):
    x = torch.randn(3, *low, dtype=dtype)
    a_h = bilinear_upsample_matrix(low[0], high[0], dtype)
    a_w = bilinear_upsample_matrix(low[1], high[1], dtype)
    expected = F.interpolate(x[:, None], size=high, mode="bilinear", align_corners=False)[:, 0]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a_h @ x @ a_w.t(), expected, atol=tol, rtol=0)
    # Every output pixel is a convex combination of input pixels.
    torch.testing.assert_close(a_h.sum(1), torch.ones(high[0], dtype=dtype))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_and_gradient_equal_the_plain_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    # Large logits too: exp(-|x|) underflows and log(1 + u) needs its correction term.
    logits = (torch.randn(5, 12, 10, generator=g) * 6).requires_grad_()
    targets = torch.rand(5, 48, 40, generator=g) > 0.6
    weights = torch.rand(2, generator=g) + 0.5

    focal, dice = upsampled_focal_and_dice_loss(logits, targets, 3.0)
    (grad,) = torch.autograd.grad(weights[0] * focal + weights[1] * dice, logits)
    ref_focal, ref_dice = reference_losses(logits, targets, 3.0)
    (ref_grad,) = torch.autograd.grad(weights[0] * ref_focal + weights[1] * ref_dice, logits)
    assert focal.item() == pytest.approx(ref_focal.item(), rel=1e-6)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6 * ref_grad.abs().max().item(), rtol=1e-4)


def test_gradcheck_float64_and_chunking(monkeypatch):
    import mask_former.modeling.mask_loss as mask_loss

    # 3 masks of 8x6 target pixels with chunks of 2 masks: a partial last chunk.
    monkeypatch.setattr(mask_loss, "_CHUNK_ELEMENTS", 2 * 8 * 6)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    targets = torch.rand(3, 8, 6, generator=g) > 0.5
    torch.autograd.gradcheck(lambda x: upsampled_focal_and_dice_loss(x, targets, 2.0), (logits,))
    focal, dice = upsampled_focal_and_dice_loss(logits, targets, 2.0)
    ref_focal, ref_dice = reference_losses(logits, targets, 2.0)
    assert focal.item() == pytest.approx(ref_focal.item(), rel=1e-12)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-12)


def test_soft_targets_and_other_gamma():
    # The formulas hold for targets in [0, 1] and any gamma, as the published functions do.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, generator=g, dtype=torch.float64) * 4
    t = torch.rand(4, 30, generator=g, dtype=torch.float64)
    for gamma in (2.0, 1.5):
        focal_mean, inter, psum, tsum, g_focal, _ = focal_and_dice_terms(x, t, 0.3, gamma, True)
        xr = x.clone().requires_grad_()
        ref = sigmoid_focal_loss(xr, t, 1.0, 0.3, gamma)
        (ref_grad,) = torch.autograd.grad(ref, xr)
        assert focal_mean.sum().item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(g_focal / x.shape[1], ref_grad, atol=1e-14, rtol=1e-10)
        p = x.sigmoid()
        torch.testing.assert_close(inter, (p * t).sum(1))
        torch.testing.assert_close(psum, p.sum(1))
        torch.testing.assert_close(tsum, t.sum(1))


def test_no_grad_and_bad_shapes():
    logits = torch.randn(2, 4, 4)
    targets = torch.rand(2, 8, 8) > 0.5
    with torch.no_grad():
        focal, dice = upsampled_focal_and_dice_loss(logits, targets, 1.0)
    ref_focal, ref_dice = reference_losses(logits, targets, 1.0)
    assert focal.item() == pytest.approx(ref_focal.item(), rel=1e-6)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[M, h, w\] logits"):
        upsampled_focal_and_dice_loss(logits.flatten(1), targets, 1.0)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        upsampled_focal_and_dice_loss(logits, torch.zeros(3, 8, 8), 1.0)
