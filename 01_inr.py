"""01 - Implicit neural representations and positional embeddings.

The concept
-----------
An implicit neural representation (INR) stores a signal as a function of coordinates:
an image is not a grid of pixels but a function omega: [-1, 1]^2 -> RGB, and we can ask
it for the colour at any point c = (x, y), on any grid we like. The function is a small
MLP f_theta, but an MLP fed raw coordinates is a poor INR: it is biased towards smooth
functions and cannot fit fine detail (the "spectral bias"). So we first map each
coordinate to a positional embedding (PE) p = gamma(c) and let the MLP read p:

    omega(c) ~= f_theta(gamma(c))

Two families of gamma:
  * fixed PE: Fourier features (Tancik et al. 2020),
        gamma(c) = [sin(2 pi B c), cos(2 pi B c)],  B ~ N(0, sigma^2), B fixed.
    The same embedding is used for every signal; all signal-specific information must
    live in the MLP weights.
  * adaptive PE (the idea DDMI builds on, Park et al. ICLR 2024, Sec. 3.1): a learned
    feature plane Xi of shape (C, H, W) over [-1, 1]^2, read by bilinear interpolation,
        p = bilinear(Xi, c).
    The embedding itself carries the signal; the MLP that reads it can be small and
    shared by all signals. DDMI generates such planes (its "basis fields") with a VAE
    decoder and a diffusion model (files 02-04), instead of generating MLP weights.

For 3D signals (shapes, radiance fields, videos) one plane is not enough and a full
3D grid is too expensive, so we use three axis-aligned planes (a tri-plane): the point
(x, y, z) is projected onto the xy, xz and yz planes, each plane is looked up
bilinearly, and the three features are summed or concatenated.

This file builds every piece from scratch: coordinate grids, Fourier features, the
coordinate MLP, the bilinear lookup (the model's actual lookup, pinned by a test to
F.grid_sample), the tri-plane lookup, and a signal known exactly at every coordinate (the
synthetic images, the project's test data). The demo fits one image three ways with the
same budget and prints the three PSNRs: raw coordinates < Fourier features < learned plane.

Conventions (used in every file of this project)
------------------------------------------------
  * Coordinates live in [-1, 1], x first, then y (then z or t).
  * Pixel i of N has its centre at -1 + (2 i + 1) / N (so no coordinate sits on the border).
  * A plane of shape (C, H, W) spans [-1, 1]^2 with W along its first axis and H along its
    second; this is exactly F.grid_sample(..., align_corners=False, padding_mode="border").
  * Tri-plane order is (xy, xz, yz); for videos (x, y, t) the same axes give (xy, xt, yt).

Shape letters: B batch, N query coordinates, C channels, H height, W width,
D coordinate dimension (2 or 3), P planes, F Fourier frequencies.

Left out on purpose: SIREN-style sine activations (another cure for spectral bias; DDMI
uses ReLU MLPs on top of learned embeddings) and hash-grid encodings (Instant-NGP), which
are a different adaptive PE not used by the paper.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The three planes of a tri-plane, as pairs of coordinate axes (first axis = plane width).
# (0, 1) = xy, (0, 2) = xz, (1, 2) = yz; for videos (x, y, t): xy, xt, yt. One constant, used everywhere.
TRIPLANE_AXES = ((0, 1), (0, 2), (1, 2))


# ----------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------
def pixel_centers(n, device=None):
    """Centres of n pixels tiling [-1, 1]: c_i = -1 + (2 i + 1) / n, shape (n,)."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    # c_i = -1 + (2 i + 1) / n
    return -1.0 + (2.0 * i + 1.0) / n


def coord_grid(height, width, device=None):
    """Pixel-centre coordinates of an image, shape (H, W, 2), last axis (x, y).

    Row r, column k of the image gets (x, y) = (centre of column k, centre of row r):
    x runs along the width, y along the height, as in F.grid_sample.
    """
    y = pixel_centers(height, device)  # (H,)
    x = pixel_centers(width, device)  # (W,)
    # indexing="ij": the first output varies along the first dimension (rows, i.e. y).
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (H, W) each
    return torch.stack([xx, yy], dim=-1)  # (H, W, 2), x first


# ----------------------------------------------------------------------------------------
# Fixed positional embedding: random Fourier features
# ----------------------------------------------------------------------------------------
class FourierFeatures(nn.Module):
    """gamma(c) = [sin(2 pi B c), cos(2 pi B c)] with a fixed Gaussian matrix B (D, F)."""

    def __init__(self, dim_in, num_freq=128, sigma=10.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # B ~ N(0, sigma^2): sigma sets the highest frequencies the MLP can express.
        # A buffer, not a parameter: the embedding is the same for every signal.
        self.register_buffer("B", torch.randn(dim_in, num_freq, generator=g) * sigma)  # (D, F)
        self.dim_out = 2 * num_freq

    def forward(self, c):  # c (..., D)
        # 2 pi B c, one phase per frequency
        phase = 2 * math.pi * c @ self.B  # (..., F)
        # gamma(c) = [sin, cos]
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)  # (..., 2F)


# ----------------------------------------------------------------------------------------
# The coordinate MLP f_theta
# ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear -> ReLU -> ... -> Linear. `num_layers` counts the linear layers."""

    def __init__(self, dim_in, dim_hidden, dim_out, num_layers=3):
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (num_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        # He initialisation (variance 2 / fan_in) keeps the signal's scale constant through
        # the ReLUs; PyTorch's default shrinks it by about 3x per layer, which makes a
        # deep read-out MLP pass almost no gradient back to the features it reads.
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, h):  # h (..., dim_in)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            # ReLU between layers, none after the last (the output is a signal value).
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h  # (..., dim_out)


# ----------------------------------------------------------------------------------------
# Adaptive positional embedding: bilinear lookup of a feature plane, from scratch
# ----------------------------------------------------------------------------------------
def bilinear_lookup(plane, coords):
    """p = bilinear(Xi, c): read a feature plane at continuous coordinates.

    plane:  (B, C, H, W)  the feature plane Xi over [-1, 1]^2
    coords: (B, N, 2)     query points c = (x, y) in [-1, 1]
    returns (B, N, C)     one embedding per query

    Same numbers as F.grid_sample(plane, coords[:, :, None], mode="bilinear",
    align_corners=False, padding_mode="border"), written out so you can see it.
    """
    B, C, H, W = plane.shape
    assert coords.shape[0] == B and coords.shape[-1] == 2, coords.shape
    x, y = coords[..., 0], coords[..., 1]  # (B, N) each
    # 1. Coordinate -> continuous pixel index. With align_corners=False pixel i has its
    #    centre at -1 + (2 i + 1) / W, so inverting: i = ((x + 1) W - 1) / 2.
    ix = ((x + 1) * W - 1) / 2  # (B, N), in pixel units along the width
    iy = ((y + 1) * H - 1) / 2  # (B, N), along the height
    # 2. "border" padding: a point outside the outermost pixel centres reads the border
    #    pixel. Clamping the index does exactly that (and gives zero gradient outside).
    ix = ix.clamp(0, W - 1)
    iy = iy.clamp(0, H - 1)
    # 3. The four neighbours: (x0, y0) top-left, x1 = x0 + 1, y1 = y0 + 1 (clamped at the edge).
    x0 = ix.floor().long().clamp(max=W - 1)  # (B, N)
    y0 = iy.floor().long().clamp(max=H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    y1 = (y0 + 1).clamp(max=H - 1)
    # 4. Fractional position inside the cell, and the four interpolation weights:
    #    p = (1-wx)(1-wy) v00 + wx(1-wy) v01 + (1-wx)wy v10 + wx wy v11   (they sum to 1)
    wx, wy = ix - x0, iy - y0  # (B, N) each; wx weighs the right neighbour, wy the bottom one
    w = torch.stack([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy], dim=-1)  # (B, N, 4)
    # 5. The plane as a table of feature rows, one row per pixel of every item: row b*HW + y*W + x.
    table = plane.permute(0, 2, 3, 1).reshape(B * H * W, C)  # (BHW, C)
    first_row = (torch.arange(B, device=plane.device) * (H * W))[:, None, None]  # (B, 1, 1)
    rows = torch.stack([y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1], dim=-1) + first_row  # (B, N, 4)
    # 6. p = sum_k w_k table[rows_k]: a weighted sum of 4 rows per query. F.embedding_bag with
    #    per-sample weights computes exactly that in one pass, without ever holding the four
    #    neighbours of every query in memory at once (what makes a plain gather slow).
    #    (One dtype for both: under bf16 autocast the plane is bf16; the sum is done in float32.)
    dtype = torch.promote_types(table.dtype, w.dtype)
    p = F.embedding_bag(rows.reshape(-1, 4), table.to(dtype), per_sample_weights=w.reshape(-1, 4).to(dtype),
                        mode="sum")  # (BN, C)
    return p.reshape(B, -1, C)  # (B, N, C)


def triplane_lookup(planes, coords, combine="sum"):
    """Tri-plane embedding of 3D points: project onto xy, xz, yz, look up, combine.

    planes: a list of three (B, C, H_k, W_k) tensors in TRIPLANE_AXES order (sizes may
            differ, as for videos), or one tensor (B, 3, C, H, W).
    coords: (B, N, 3) points (x, y, z) (or (x, y, t)) in [-1, 1].
    combine: "sum" -> (B, N, C);  "concat" -> (B, N, 3C).
    """
    assert coords.shape[-1] == 3, coords.shape
    if torch.is_tensor(planes):
        B, P, C, H, W = planes.shape
        assert P == 3, planes.shape
        # Equal sizes: fold the three planes into the batch and do one lookup for all.
        folded = planes.reshape(B * 3, C, H, W)  # (3B, C, H, W)
        # Project: keep the two coordinates that span each plane.
        uv = torch.stack([coords[..., list(a)] for a in TRIPLANE_AXES], dim=1)  # (B, 3, N, 2)
        feats = bilinear_lookup(folded, uv.reshape(B * 3, -1, 2))  # (3B, N, C)
        feats = list(feats.reshape(B, 3, -1, C).unbind(1))  # 3 x (B, N, C)
    else:
        assert len(planes) == 3, len(planes)
        # Unequal sizes: one lookup per plane.
        feats = [bilinear_lookup(pl, coords[..., list(a)]) for pl, a in zip(planes, TRIPLANE_AXES)]
    if combine == "sum":
        return feats[0] + feats[1] + feats[2]  # (B, N, C)
    if combine == "concat":
        return torch.cat(feats, dim=-1)  # (B, N, 3C)
    raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")


# ----------------------------------------------------------------------------------------
# A signal known exactly at every coordinate: the synthetic images
# ----------------------------------------------------------------------------------------
# Because an INR is a function, the fairest test data is a function too. Each synthetic
# image is a formula of (x, y): a background with a linear colour ramp and a few overlapping
# primitives (discs, rotated squares or rings, its class label) with slightly soft edges.
# It can be rendered on the pixel grid of any size, so a model trained at 32x32 can be
# measured at 128x128 against the exact answer. It is the project's built-in image dataset
# (file 05), the test data, and, given a velocity per primitive, the built-in videos (file 06).
SYNTHETIC_CLASSES = ("discs", "squares", "rings")
EDGE = 0.015  # softness of the primitives' edges, in coordinate units (a 32 px pixel is 0.0625)


def synthetic_params(n, seed=0, num_shapes=4, sizes=(0.15, 0.45)):
    """Random parameters of n synthetic images (a dict of tensors), reproducible from seed; each image
    has num_shapes primitives whose radius (or half-side) is uniform in `sizes`."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # uniform in [0, 1)
    return {
        "label": torch.randint(len(SYNTHETIC_CLASSES), (n,), generator=g),  # (n,) which primitive
        "bg": u(n, 2, 3) * 2 - 1,  # (n, 2, 3) background colours at the two ends of the ramp
        "bg_dir": u(n) * 2 * torch.pi,  # (n,) direction of the ramp
        "centre": u(n, num_shapes, 2) * 1.3 - 0.65,  # (n, S, 2)
        "size": u(n, num_shapes) * (sizes[1] - sizes[0]) + sizes[0],  # (n, S) radius / half-side
        "angle": u(n, num_shapes) * torch.pi / 2,  # (n, S) rotation of squares
        "colour": u(n, num_shapes, 3) * 2 - 1,  # (n, S, 3)
    }


def synthetic_render(params, coords):
    """Exact colours of the synthetic images at coordinates: (n, N, 2) -> (n, N, 3) in [-1, 1].

    Coordinates (x, y, t) (n, N, 3) render videos: each primitive then sits at
    centre + velocity * t (params["velocity"], file 06); the background stays.
    """
    label = params["label"][:, None]  # (n, 1)
    xy = coords[..., :2]  # (n, N, 2)
    # Background: colour ramp bg0 -> bg1 along direction d, t = (<c, d> + 1) / 2 clipped to [0, 1].
    d = torch.stack([torch.cos(params["bg_dir"]), torch.sin(params["bg_dir"])], -1)  # (n, 2)
    t = (((xy * d[:, None]).sum(-1) + 1) / 2).clamp(0, 1)[..., None]  # (n, N, 1)
    img = params["bg"][:, None, 0] * (1 - t) + params["bg"][:, None, 1] * t  # (n, N, 3)
    # Primitives painted back to front; each one is a signed distance function (< 0 inside).
    for s in range(params["centre"].shape[1]):
        rel = xy - params["centre"][:, None, s]  # (n, N, 2) position relative to the centre
        if coords.shape[-1] == 3:  # a video: the centre moves, centre(t) = centre + velocity t
            rel = rel - params["velocity"][:, None, s] * coords[..., 2:]
        r = params["size"][:, None, s]  # (n, 1)
        dist = rel.norm(dim=-1)  # (n, N)
        # rotate into the square's frame: (u, v) = R(-angle) rel
        ca, sa = torch.cos(params["angle"][:, None, s]), torch.sin(params["angle"][:, None, s])
        u_, v_ = ca * rel[..., 0] + sa * rel[..., 1], -sa * rel[..., 0] + ca * rel[..., 1]
        sdf_disc = dist - r
        sdf_square = torch.maximum(u_.abs(), v_.abs()) - 0.85 * r
        sdf_ring = (dist - r).abs() - 0.3 * r
        sdf = torch.where(label == 0, sdf_disc, torch.where(label == 1, sdf_square, sdf_ring))
        # coverage alpha = sigmoid(-sdf / EDGE): 1 inside, 0 outside, a soft edge between
        alpha = torch.sigmoid(-sdf / EDGE)[..., None]  # (n, N, 1)
        img = img * (1 - alpha) + params["colour"][:, None, s] * alpha
    return img


def synthetic_images(params, height, width):
    """Render synthetic images on the pixel-centre grid of any size: (n, 3, H, W)."""
    n = params["label"].shape[0]
    c = coord_grid(height, width).reshape(1, -1, 2).expand(n, -1, -1)  # (n, HW, 2)
    return synthetic_render(params, c).reshape(n, height, width, 3).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------
# Peak signal-to-noise ratio, the number every demo prints
# ----------------------------------------------------------------------------------------
def psnr(pred, target):
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE).

    Equal to the usual PSNR of the same images mapped to [0, 1]. Averaged over the batch
    (first axis): each item's PSNR, then the mean.
    """
    mse = (pred.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean().item()


# ----------------------------------------------------------------------------------------
# Demo: one image, three embeddings, same budget
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import os
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    t_start = time.time()
    R = 64
    # The test picture is a synthetic image (above) with 32 overlapping primitives: enough
    # detail that a plain MLP cannot memorise it easily.
    image = synthetic_images(synthetic_params(1, seed=3, num_shapes=32), R, R)  # (1, 3, R, R) in [-1, 1]
    target = image[0].permute(1, 2, 0).reshape(-1, 3)  # (R*R, 3) colours
    c = coord_grid(R, R).reshape(-1, 2)  # (R*R, 2) coordinates, same order as target

    def fit(embed, mlp, params, steps=300, lr=2e-3):
        """Full-batch Adam on all pixels; returns PSNR, the fitted image, #parameters, seconds."""
        params, t0 = list(params), time.time()
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            loss = (mlp(embed(c)) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = mlp(embed(c)).reshape(1, R, R, 3).permute(0, 3, 1, 2)  # (1, 3, R, R)
        return psnr(out, image), out, sum(p.numel() for p in params), time.time() - t0

    results = {}
    # (a) raw coordinates: gamma(c) = c.
    mlp = MLP(2, 128, 3, num_layers=4)
    results["raw coordinates"] = fit(lambda c: c, mlp, mlp.parameters())
    # (b) fixed PE: Fourier features, sigma chosen for a 64 px image.
    ff = FourierFeatures(2, num_freq=64, sigma=4.0)
    mlp = MLP(ff.dim_out, 128, 3, num_layers=4)
    results["Fourier features"] = fit(ff, mlp, mlp.parameters())
    # (c) adaptive PE: a learned 16-channel plane at half the image resolution, read
    #     bilinearly, and a smaller MLP. The plane is what DDMI's decoder will generate.
    #     (A plane at the full image resolution would simply store the pixels.)
    Xi = nn.Parameter(torch.randn(1, 16, R // 2, R // 2) * 0.1)  # (1, C, H, W)
    mlp = MLP(16, 64, 3, num_layers=3)
    # A plane entry only moves when a query lands near it, so it takes a larger step size.
    results["learned plane"] = fit(lambda c: bilinear_lookup(Xi, c[None])[0], mlp, [Xi, *mlp.parameters()], lr=3e-2)

    os.makedirs("out", exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.9))
    show = lambda ax, im, title: (ax.imshow((im[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2), ax.set_title(title), ax.axis("off"))
    show(axes[0], image, "ground truth")
    for ax, (name, (value, out, n_params, secs)) in zip(axes[1:], results.items()):
        show(ax, out, f"{name}\n{value:.1f} dB")
        print(f"{name:>17s}: PSNR {value:5.2f} dB  ({n_params} parameters, {secs:.0f} s for 300 steps)")
    fig.tight_layout()
    fig.savefig("out/01_inr.png", dpi=100)
    print(f"wrote out/01_inr.png in {time.time() - t_start:.0f} s")
