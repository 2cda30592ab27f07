"""Tests for 01_inr.py: the bilinear and tri-plane lookups (pinned to F.grid_sample), coordinates, PSNR, Fourier features."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

I = importlib.import_module("01_inr")


def grid_sample_lookup(plane, coords):
    """Reference: F.grid_sample with the project's conventions, reshaped to (B, N, C)."""
    out = F.grid_sample(plane, coords[:, :, None], mode="bilinear", align_corners=False, padding_mode="border")
    return out[..., 0].transpose(1, 2)  # (B, C, N, 1) -> (B, N, C)


def centres(n, dtype=torch.float64):
    return -1.0 + (2.0 * torch.arange(n, dtype=dtype) + 1.0) / n


def hard_coords(B, H, W, g):
    """(B, N, 2) float64 coordinates that hit every special case: random points inside and
    outside [-1, 1], exactly -1 and 1, exactly the pixel centres, the outermost centres."""
    special_x = torch.cat([torch.tensor([-1.0, 1.0, -3.0, 2.5, 0.0]), centres(W)])
    special_y = torch.cat([torch.tensor([-1.0, 1.0, -3.0, 2.5, 0.0]), centres(H)])
    # all pairs of the special values, plus random points in [-1.5, 1.5]^2
    sx, sy = torch.meshgrid(special_x, special_y, indexing="ij")
    special = torch.stack([sx.flatten(), sy.flatten()], -1)  # (S, 2)
    rand = torch.rand(B, 300, 2, generator=g, dtype=torch.float64) * 3 - 1.5
    return torch.cat([special.expand(B, -1, -1), rand], dim=1)


@pytest.mark.parametrize("H,W", [(8, 8), (5, 9), (7, 3), (1, 4)])
def test_bilinear_lookup_equals_grid_sample(H, W):
    g = torch.Generator().manual_seed(H * 100 + W)
    B, C = 2, 5
    plane = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    coords = hard_coords(B, H, W, g)
    out = I.bilinear_lookup(plane, coords)
    assert out.shape == (B, coords.shape[1], C) and out.dtype == torch.float64
    torch.testing.assert_close(out, grid_sample_lookup(plane, coords), rtol=0, atol=1e-12)


def test_bilinear_lookup_orientation_and_border_by_hand():
    # a 2 x 3 plane (H = 2 rows, W = 3 columns) whose value is 10 * row + col
    plane = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]], dtype=torch.float64)[None, None]
    cx, cy = centres(3), centres(2)
    pts = torch.tensor([
        [cx[2], cy[0]],  # row 0, col 2 -> 2 (x runs along the width)
        [cx[0], cy[1]],  # row 1, col 0 -> 10
        [(cx[0] + cx[1]) / 2, cy[1]],  # halfway between cols 0 and 1 on row 1 -> 10.5
        [cx[1], (cy[0] + cy[1]) / 2],  # halfway between the rows at col 1 -> 6
        [-5.0, 5.0],  # outside: the border pixel (row 1, col 0) -> 10
        [1.0, -1.0],  # the corner of the domain: border pixel (row 0, col 2) -> 2
    ], dtype=torch.float64)[None]
    out = I.bilinear_lookup(plane, pts)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([2.0, 10.0, 10.5, 6.0, 10.0, 2.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def interior_coords(B, N, H, W, g):
    """Coordinates whose continuous pixel index is strictly inside a cell, away from the
    texel lines (where bilinear interpolation has a kink) and from the clamp edges."""
    def one(n):
        i = torch.randint(0, n - 1, (B, N), generator=g).double()
        f = torch.rand(B, N, generator=g, dtype=torch.float64) * 0.8 + 0.1
        return (2 * (i + f) + 1) / n - 1  # inverse of i = ((x + 1) n - 1) / 2
    return torch.stack([one(W), one(H)], -1)


def test_bilinear_lookup_gradcheck():
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 3, 4, 5
    plane = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    # w.r.t. the plane: linear in the plane, so any coordinates (also outside and on the edges) work
    coords_any = hard_coords(B, H, W, g)[:, ::7].contiguous()
    assert torch.autograd.gradcheck(lambda p: I.bilinear_lookup(p, coords_any), (plane,))
    # w.r.t. the coordinates: only where the function is smooth
    coords = interior_coords(B, 6, H, W, g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: I.bilinear_lookup(plane.detach(), c), (coords,))
    assert torch.autograd.gradcheck(I.bilinear_lookup, (plane, coords))


def test_bilinear_lookup_gradients_match_grid_sample():
    g = torch.Generator().manual_seed(1)
    B, C, H, W = 2, 4, 6, 7
    plane = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    # plane gradients: all the special coordinates; several queries share texels, so the scatter-add matters
    coords = hard_coords(B, H, W, g)
    up = torch.randn(B, coords.shape[1], C, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((I.bilinear_lookup(plane, coords) * up).sum(), plane)
    (g_ref,) = torch.autograd.grad((grid_sample_lookup(plane, coords) * up).sum(), plane)
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)
    # coordinate gradients at generic points, inside and outside the outermost pixel centres
    # (outside them the border padding reads a constant, so both give 0 there)
    c = (torch.rand(B, 200, 2, generator=g, dtype=torch.float64) * 3 - 1.5).requires_grad_(True)
    up = torch.randn(B, 200, C, generator=g, dtype=torch.float64)
    (gc_ours,) = torch.autograd.grad((I.bilinear_lookup(plane, c) * up).sum(), c)
    (gc_ref,) = torch.autograd.grad((grid_sample_lookup(plane, c) * up).sum(), c)
    # (per component: d/dx is 0 where x is outside, whatever y is)
    outside = c.detach().abs() > torch.tensor([1 - 1 / W, 1 - 1 / H], dtype=torch.float64)  # (B, N, 2)
    assert outside.any() and (~outside).any()
    assert gc_ref[~outside].abs().min() > 0 and gc_ref[outside].abs().max() == 0
    torch.testing.assert_close(gc_ours, gc_ref, rtol=1e-10, atol=1e-12)


def reference_triplane(planes, coords, combine):
    feats = [grid_sample_lookup(pl, coords[..., [a, b]]) for pl, (a, b) in zip(planes, ((0, 1), (0, 2), (1, 2)))]
    return sum(feats) if combine == "sum" else torch.cat(feats, -1)


def test_triplane_axes_constant():
    assert tuple(map(tuple, I.TRIPLANE_AXES)) == ((0, 1), (0, 2), (1, 2))


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_triplane_lookup_stacked_and_list(combine):
    g = torch.Generator().manual_seed(2)
    B, C, N = 2, 3, 50
    coords = torch.rand(B, N, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2
    # stacked equal-size planes (B, 3, C, H, W), H != W
    stacked = torch.randn(B, 3, C, 5, 8, generator=g, dtype=torch.float64)
    out = I.triplane_lookup(stacked, coords, combine=combine)
    assert out.shape == (B, N, C if combine == "sum" else 3 * C)
    torch.testing.assert_close(out, reference_triplane(stacked.unbind(1), coords, combine), rtol=0, atol=1e-12)
    # the stacked path and the list path agree on the same planes
    torch.testing.assert_close(out, I.triplane_lookup(list(stacked.unbind(1)), coords, combine=combine),
                               rtol=0, atol=1e-12)
    # a list of three planes of different sizes (as for videos)
    planes = [torch.randn(B, C, h, w, generator=g, dtype=torch.float64) for h, w in ((4, 6), (3, 9), (7, 2))]
    out = I.triplane_lookup(planes, coords, combine=combine)
    assert out.shape == (B, N, C if combine == "sum" else 3 * C)
    torch.testing.assert_close(out, reference_triplane(planes, coords, combine), rtol=0, atol=1e-12)


def test_triplane_lookup_projection_by_hand():
    # each plane is 0 except a ramp along its width (first axis): xy -> x, xz -> 10 x, yz -> 100 y
    W = 4
    ramp = centres(W).expand(W, W)  # value = x coordinate of the pixel centre, (H, W)
    planes = torch.stack([ramp, 10 * ramp, 100 * ramp])[None, :, None]  # (1, 3, 1, H, W)
    cx = centres(W)
    pts = torch.tensor([[cx[0], cx[1], cx[2]], [cx[3], cx[0], cx[1]]], dtype=torch.float64)[None]
    out = I.triplane_lookup(planes, pts, combine="concat")[0]  # (2, 3)
    expected = torch.stack([pts[0, :, 0], 10 * pts[0, :, 0], 100 * pts[0, :, 1]], -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_triplane_lookup_rejects_unknown_combine():
    planes = torch.zeros(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="mean"):
        I.triplane_lookup(planes, torch.zeros(1, 5, 3), combine="mean")


def test_coord_grid_convention():
    H, W = 3, 5
    grid = I.coord_grid(H, W)
    assert grid.shape == (H, W, 2)
    for r in range(H):
        for k in range(W):
            assert grid[r, k, 0].item() == pytest.approx(-1 + (2 * k + 1) / W, abs=1e-7)  # x first
            assert grid[r, k, 1].item() == pytest.approx(-1 + (2 * r + 1) / H, abs=1e-7)
    torch.testing.assert_close(I.pixel_centers(W), centres(W).float())


@pytest.mark.parametrize("H,W", [(32, 32), (16, 8), (4, 64)])
def test_lookup_at_coord_grid_returns_the_image_exactly(H, W):
    # power-of-two sizes: the float32 pixel centres are exact, so the lookup is exact
    img = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(H + W))
    c = I.coord_grid(H, W).reshape(1, -1, 2).expand(2, -1, -1)
    out = I.bilinear_lookup(img, c).reshape(2, H, W, 3).permute(0, 3, 1, 2)
    assert torch.equal(out, img)


@pytest.mark.parametrize("H,W", [(3, 5), (13, 11), (64, 48)])
def test_lookup_at_coord_grid_returns_the_image_other_sizes(H, W):
    # other sizes: coord_grid is float32, so the centres carry float32 rounding (~1e-7 of a pixel)
    img = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(H + W), dtype=torch.float64)
    c = I.coord_grid(H, W).reshape(1, -1, 2)
    out = I.bilinear_lookup(img, c).reshape(1, H, W, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, img, rtol=0, atol=1e-5)


def test_psnr_by_hand():
    target = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    # constant error 0.1 -> MSE 0.01 -> 10 log10(4 / 0.01)
    assert I.psnr(target + 0.1, target) == pytest.approx(10 * math.log10(400.0), abs=1e-4)
    # per-item PSNR, then the mean over the batch (not the PSNR of the mean MSE)
    pred = target.clone()
    pred[0] += 0.1
    pred[1] -= 0.2
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert I.psnr(pred, target) == pytest.approx(expected, abs=1e-4)
    # the prediction is clamped to [-1, 1]: an overshoot beyond the range costs nothing
    ones = torch.ones(1, 3, 2, 2)
    assert I.psnr(3 * ones, ones) == pytest.approx(10 * math.log10(4 / 1e-10), abs=1e-3)
    assert I.psnr(-ones, ones) == pytest.approx(10 * math.log10(4 / 4), abs=1e-6)


def test_fourier_features():
    ff = I.FourierFeatures(3, num_freq=16, sigma=2.0, seed=5)
    assert ff.dim_out == 32
    assert "B" in dict(ff.named_buffers()) and len(list(ff.parameters())) == 0  # fixed, not learned
    assert ff.B.shape == (3, 16)
    c = torch.rand(2, 7, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = ff(c)
    assert out.shape == (2, 7, 32)
    phase = 2 * math.pi * torch.einsum("bnd,df->bnf", c.double(), ff.B.double())
    torch.testing.assert_close(out.double(), torch.cat([phase.sin(), phase.cos()], -1), rtol=0, atol=1e-4)
    # the seed fixes B; sigma scales it
    torch.testing.assert_close(I.FourierFeatures(3, 16, sigma=2.0, seed=5).B, ff.B, rtol=0, atol=0)
    assert not torch.equal(I.FourierFeatures(3, 16, sigma=2.0, seed=6).B, ff.B)
    torch.testing.assert_close(I.FourierFeatures(3, 16, sigma=4.0, seed=5).B, 2 * ff.B)
    big = I.FourierFeatures(2, num_freq=20000, sigma=3.0, seed=0).B
    assert abs(big.std().item() - 3.0) < 0.05 and abs(big.mean().item()) < 0.05
