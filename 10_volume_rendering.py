"""10 - Volume rendering: pictures of a tri-plane radiance field (NeRF, paper Sec. 4.2).

The concept
-----------
A neural radiance field (Mildenhall et al. 2020) is an INR of a 3D scene that is seen
only through photographs: at every point p it gives a density sigma(p) >= 0 (how much
light is stopped per unit length) and a colour c(p, d) (what is emitted towards the
direction d). A pixel is the light arriving along the ray r(t) = o + t d through it:

    C(r) = int_near^far T(t) sigma(r(t)) c(r(t), d) dt + T(far) * background,
    T(t) = exp(-int_near^t sigma(r(s)) ds)   (the transmittance: the share that gets through)

DDMI generates such fields exactly as it generates shapes (file 09): a tri-plane latent,
HDBF basis fields per plane (file 03) and a read-out MLP. The cameras and rays are file 08's
(pinhole, OpenGL convention); what is new here is written out step by step:

  1. where to sample: each ray clipped to the cube [-1, 1]^3 where the field lives;
  2. the integral above, by quadrature: stratified samples, alpha compositing, a background;
  3. the radiance head (density, then colour from the view direction) and the radiance field
     VAE, whose query(fields, rays) returns pixel colours instead of field values.

It also holds the synthetic scenes of the NeRF modality (coloured spheres and boxes whose
pictures are known exactly from any pose, by ray intersection). File 11 turns all of this
into a modality for train.py and sample.py.

Conventions: world and field coordinates agree ([-1, 1]^3, datasets are scaled into it
when they are read); a camera-to-world matrix c2w has columns right, up, backwards (the
camera looks down -z) and the camera centre; colours are in [-1, 1] like every signal of
the project (white background = +1).

Shape letters: B batch (scenes), N rays, S samples per ray, P primitives per scene, F the
colour features of the read-out, V views, H W image height and width.

Left out on purpose: hierarchical (coarse + fine) sampling and the proposal networks of
later NeRFs (the samples here are stratified only, which is what the field needs when it
is clipped to a cube), and scenes that extend beyond the cube (NeRF's NDC and
scene-contraction tricks for unbounded scenes).
"""
import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
RM = importlib.import_module("08_ray_marching")


# ========================================================================================
# 1. Where to sample
# ========================================================================================
# Where to sample. The field exists only inside [-1, 1]^3 (outside it the density is zero), so
# each ray is clipped to the cube (file 08's slab test) and, when a dataset gives its own near
# and far planes, to those too. A ray that misses the cube keeps an empty interval: it sees
# only the background.
def clip_rays(origins, dirs, near=0.0, far=math.inf):
    """-> t_near (...), t_far (...) of the part of each ray inside the cube and [near, far]
    (near, far: numbers, or tensors that broadcast to origins.shape[:-1])."""
    shape = origins.shape[:-1]
    t0, t1, _ = RM.ray_box(origins.reshape(-1, 3), dirs.reshape(-1, 3))
    lo = torch.maximum(t0.reshape(shape), torch.as_tensor(near, dtype=t0.dtype))
    hi = torch.minimum(t1.reshape(shape), torch.as_tensor(far, dtype=t1.dtype))
    return lo, torch.maximum(hi, lo)  # empty interval: t_far = t_near


# ========================================================================================
# 2. The rendering integral by quadrature
# ========================================================================================
# Stratified samples: [t_near, t_far] is cut into S equal bins of width delta = (t_far - t_near) / S
# and one depth is drawn uniformly inside each bin, t_i = t_near + delta (i + u_i), u_i ~ U[0, 1).
# Random u makes the training loss an unbiased estimate of the continuous integral (a fixed
# grid of depths would let the field cheat between the grid points); rendering uses the bin
# centres, u = 1/2. Each sample stands for its own bin, of length delta.
def stratified_depths(t_near, t_far, u):
    """t_near, t_far (...), u (..., S) in [0, 1) -> depths t (..., S) and bin width delta (...)."""
    S = u.shape[-1]
    delta = (t_far - t_near) / S
    t = t_near[..., None] + delta[..., None] * (torch.arange(S, device=u.device, dtype=u.dtype) + u)
    return t, delta


# Alpha compositing. Over a bin of length delta_i with constant density sigma_i the light is
# attenuated by exp(-sigma_i delta_i), so the bin stops the share alpha_i = 1 - exp(-sigma_i delta_i).
# The light that reaches bin i is the product over the bins before it:
#
#     T_i = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta_j),
#
# and the bin's contribution has weight w_i = T_i alpha_i. The pixel is
#
#     C = sum_i w_i c_i + (1 - sum_i w_i) * background,
#
# since 1 - sum_i w_i = T_{S+1} is what gets through the whole ray. For a medium of constant
# density this is exact whatever S is: T_{S+1} = exp(-sigma (t_far - t_near)) (tests/test_nerf.py).
def composite(sigma, colour, delta, background):
    """sigma (..., S), colour (..., S, 3), delta (...) -> pixel colours (..., 3) and weights (..., S)."""
    tau = sigma * delta[..., None]  # optical depth of each bin, sigma_i delta_i
    alpha = 1.0 - torch.exp(-tau)
    # T_i = exp(-(tau_1 + ... + tau_{i-1})): the cumulative sum, without the bin itself
    trans = torch.exp(-(torch.cumsum(tau, -1) - tau))
    w = trans * alpha
    rgb = (w[..., None] * colour).sum(-2) + (1.0 - w.sum(-1, keepdim=True)) * background
    return rgb, w


# A ray record packs what the quadrature needs into one tensor of 11 + S numbers per ray, so
# that rays travel through train.py like the coordinates of any other modality:
# (origin 3, direction 3, t_near, t_far, background colour 3, u_1 .. u_S). The jitter u is
# part of the record so that a training batch is drawn entirely from the run's generator
# (and is the same on any number of processes); make_rays(..., generator=None) gives the bin
# centres, for rendering.
#
# Why each ray carries its background: on a fixed white background, white fog and empty space
# give the same picture, so nothing stops the field from leaving white floaters around the
# object (where no view sees anything behind them). When the data knows which pixels are
# background (an alpha channel, or the synthetic scenes), training puts every ray on its own
# random background colour, the target too (a c + (1 - a) background): transparency is then
# the only right answer where the scene is empty. Pictures are rendered on white.
def make_rays(origins, dirs, samples, near=0.0, far=math.inf, background=1.0, generator=None):
    """-> ray records (..., 11 + samples); background: a number or colours (..., 3) in [-1, 1]."""
    lo, hi = clip_rays(origins, dirs, near, far)
    shape = (*origins.shape[:-1], samples)
    u = torch.full(shape, 0.5) if generator is None else torch.rand(shape, generator=generator)
    bg = torch.as_tensor(background, dtype=origins.dtype).expand_as(origins)
    return torch.cat([origins, dirs, lo[..., None], hi[..., None], bg, u.to(origins.device)], -1)


# ========================================================================================
# 3. The radiance field VAE
# ========================================================================================
# The tri-plane INR (HDBF fields, the three planes' embeddings concatenated, CFC read-out)
# gives 1 + F numbers per point instead of one occupancy logit. The first becomes
# the density, the other F describe the material; as in NeRF, the view direction enters only
# after the density (a point is as opaque from every side) through a small colour MLP:
#
#     sigma = DENSITY_SCALE * softplus(h_0 - DENSITY_SHIFT)      (>= 0)
#     c     = tanh(W_2 ReLU(W_1 [h_1..F, gamma(d)]))                  (in [-1, 1])
#
# gamma(d) = [d, sin(2^k pi d), cos(2^k pi d)], k < 4, lets the colour vary smoothly with
# the direction (highlights). The scale puts sigma in units of the cube: a read-out of ~1
# stops most light within one sample; the shift starts training from a faint fog rather
# than an opaque block. The read-out MLP itself is nonlinear (ReLUs between all layers):
# the original release's NeRF MLP had no activations, so it could only ever be a linear
# function of the embedding (docs/results.md measures what that costs).
DENSITY_SCALE, DENSITY_SHIFT = 10.0, 2.0
DIR_FREQS = 4


def direction_encoding(d):
    """gamma(d): (..., 3) -> (..., 3 + 6 DIR_FREQS)."""
    phase = d[..., None] * (math.pi * 2.0 ** torch.arange(DIR_FREQS, device=d.device))  # (..., 3, K)
    return torch.cat([d, torch.sin(phase).flatten(-2), torch.cos(phase).flatten(-2)], -1)


class RadianceHead(nn.Module):
    """Read-out features (..., 1 + F) and view directions (..., 3) -> sigma (...), colour (..., 3)."""

    def __init__(self, features, hidden=32):
        super().__init__()
        self.colour = nn.Sequential(nn.Linear(features + 3 + 6 * DIR_FREQS, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, h, d):
        sigma = DENSITY_SCALE * F.softplus(h[..., 0] - DENSITY_SHIFT)
        colour = torch.tanh(self.colour(torch.cat([h[..., 1:], direction_encoding(d)], -1)))
        return sigma, colour


class RadianceFieldVAE(V.D2CVAE):
    """The D2C-VAE of file 02 whose query renders rays: query(fields, rays (B, N, 11 + S)) -> (B, N, 3).

    Everything else (encode, decode, the ELBO of file 02, the diffusion of file 04) is
    unchanged: to them a pixel colour is just the signal at a "coordinate", the ray.
    """

    def __init__(self, encoder, decoder, readout, lookup, head):
        super().__init__(encoder, decoder, readout, lookup)
        self.head = head

    def radiance(self, fields, points, dirs):
        """sigma (B, M) and colour (B, M, 3) at points (B, M, 3) seen along dirs (B, M, 3)."""
        return self.head(super().query(fields, points), dirs)

    def query(self, fields, rays):
        o, d, lo, hi, bg, u = rays[..., :3], rays[..., 3:6], rays[..., 6], rays[..., 7], rays[..., 8:11], rays[..., 11:]
        B, N, S = u.shape
        t, delta = stratified_depths(lo, hi, u)  # (B, N, S), (B, N)
        points = o[..., None, :] + t[..., None] * d[..., None, :]  # r(t_i) = o + t_i d, (B, N, S, 3)
        dirs = d[..., None, :].expand(B, N, S, 3)
        sigma, colour = self.radiance(fields, points.reshape(B, N * S, 3), dirs.reshape(B, N * S, 3))
        rgb, _ = composite(sigma.reshape(B, N, S), colour.reshape(B, N, S, 3).float(), delta, bg)
        return rgb

    def render(self, fields, c2w, intrinsics, height, width, samples, near=0.0, far=math.inf, chunk=65536):
        """Whole pictures: one camera per item, c2w (B, 4, 4), intrinsics (B, 3) -> (B, 3, H, W);
        about `chunk` rays (over all items) at a time."""
        B = c2w.shape[0]
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        rows, cols = rows.reshape(1, -1).expand(B, -1), cols.reshape(1, -1).expand(B, -1)  # (B, HW)
        o, d = RM.pixel_rays(c2w[:, None], intrinsics[:, None], rows.to(c2w), cols.to(c2w))
        rays = make_rays(o, d, samples, near, far)  # bin centres
        out = V.query_chunked(self, fields, rays, chunk)  # (B, HW, 3)
        return out.reshape(B, height, width, 3).permute(0, 3, 1, 2).clamp(-1, 1)


# ========================================================================================
# 4. Synthetic scenes with exact pictures
# ========================================================================================
# Each scene holds P = 3 primitives (spheres or axis-aligned boxes) with random centres,
# sizes and colours inside the cube, lit by one distant light (Lambert shading plus an
# ambient term, so the colour of a surface point does not depend on the viewer). The first
# surface a ray meets is found in closed form:
#   sphere (centre m, radius a):  |o + t d - m|^2 = a^2  ->  t = -b - sqrt(b^2 - q),
#                                 b = d.(o - m), q = |o - m|^2 - a^2 (the nearer root);
#   box (centre m, half sizes s): the slab test of file 08 on the box instead of the cube.
# The pixel is that point's colour, or the background when the ray meets nothing: an exact
# picture from any camera, which is what a NeRF is trained and measured on. A NeRF of it is
# a volume, so its picture is only as sharp as its density is steep (edges are slightly soft).
LIGHT = (0.4, 0.8, 0.45)  # direction towards the light, normalised below
AMBIENT, DIFFUSE = 0.35, 0.65
SCENE_RADIUS, SCENE_FOV = 3.0, 40.0  # the synthetic cameras: distance from the centre, field of view (deg)


def synthetic_scene_params(n, seed=0, num_prims=3):
    """n random scenes: dict of kind (n, P) (0 sphere, 1 box), centre (n, P, 3), size (n, P, 3), albedo (n, P, 3)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)
    kind = (u(n, num_prims) < 0.5).long()
    centre = (u(n, num_prims, 3) * 2 - 1) * 0.45
    # spheres: radius 0.2-0.45 (repeated on the three axes); boxes: half sizes 0.12-0.4 per axis
    size = torch.where(kind[..., None] == 0, (0.2 + 0.25 * u(n, num_prims, 1)).expand(-1, -1, 3),
                       0.12 + 0.28 * u(n, num_prims, 3))
    # colours: a random hue, saturated and bright (HSV -> RGB), not three independent channels:
    # those average out to greys, and a model that learns the mean colour first renders grey
    # scenes for a long time (docs/quality.md, NeRF)
    hsv = u(n, num_prims, 3)
    h, s, v = hsv[..., :1], 0.6 + 0.4 * hsv[..., 1:2], 0.6 + 0.4 * hsv[..., 2:]
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h) % 6  # HSV -> RGB, channel by channel
    albedo = v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)
    return {"kind": kind, "centre": centre, "size": size, "albedo": albedo}


def scene_hit(params, o, d):
    """First surface hit of rays o, d (n, N, 3) in scenes params (n scenes) -> depth t (n, N)
    (inf when nothing is hit), unit normal (n, N, 3) and the primitive's index (n, N)."""
    m, s = params["centre"][:, None], params["size"][:, None]  # (n, 1, P, 3)
    o, d = o[:, :, None], d[:, :, None]  # (n, N, 1, 3)
    inf = torch.tensor(math.inf)
    # spheres: the nearer root in front of the origin
    b = (d * (o - m)).sum(-1)
    q = ((o - m) ** 2).sum(-1) - s[..., 0] ** 2
    disc = b * b - q
    t_sph = -b - disc.clamp(min=0).sqrt()
    t_sph = torch.where((disc > 0) & (t_sph > 1e-6), t_sph, inf)  # (n, N, P)
    # boxes: latest entry into the three slabs, earliest exit
    safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (m - s - o) / safe, (m + s - o) / safe
    entry = torch.minimum(t1, t2)
    t_in, t_out = entry.amax(-1), torch.maximum(t1, t2).amin(-1)
    t_box = torch.where((t_out > t_in) & (t_in > 1e-6), t_in, inf)
    is_box = params["kind"][:, None] == 1  # (n, 1, P)
    t_all = torch.where(is_box, t_box, t_sph)
    t, k = t_all.min(-1)  # (n, N): the nearest primitive
    p = o + t.clamp(max=1e3)[..., None, None] * d  # the hit point, (n, N, 1, 3)
    # normals of every primitive at p: radial for a sphere; for a box, the axis of the slab
    # entered last, facing the ray; then the nearest primitive's
    n_sph = (p - m) / s[..., :1]
    n_box = -torch.sign(d) * F.one_hot(entry.argmax(-1), 3).to(d.dtype)
    normal = torch.where(is_box[..., None], n_box, n_sph)  # (n, N, P, 3)
    normal = normal.gather(2, k[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    return t, normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-12), k


def shade(params, normal, k):
    """Lambert + ambient colour in [-1, 1] of the surface points with normals (n, N, 3) on primitives k."""
    light = torch.tensor(LIGHT) / torch.tensor(LIGHT).norm()
    albedo = params["albedo"].gather(1, k[..., None].expand(-1, -1, 3))  # (n, N, 3)
    lit = albedo * (AMBIENT + DIFFUSE * (normal @ light).clamp(min=0))[..., None]
    return lit * 2 - 1


def scene_render(params, o, d, background=1.0):
    """Exact pixel colours (n, N, 3) in [-1, 1] of rays o, d (n, N, 3); background: a number or (n, N, 3)."""
    t, normal, k = scene_hit(params, o, d)
    bg = torch.as_tensor(background, dtype=o.dtype).expand_as(o)
    return torch.where(torch.isinf(t)[..., None], bg, shade(params, normal, k))


def random_cameras(shape, generator, radius=SCENE_RADIUS, fov=SCENE_FOV, size=64):
    """Cameras of the synthetic scenes anywhere on the sphere: c2w (*shape, 4, 4), intrinsics (*shape, 3)."""
    z = torch.rand(shape, generator=generator) * 2 - 1  # uniform on the sphere: z and the angle uniform
    phi = torch.rand(shape, generator=generator) * 2 * math.pi
    r = (1 - z * z).sqrt()
    eyes = radius * torch.stack([r * torch.cos(phi), z, r * torch.sin(phi)], -1)
    intr = torch.tensor([RM.focal_from_fov(size, fov), size / 2, size / 2]).expand(*shape, 3)
    return RM.look_at(eyes), intr  # (file 08's look_at takes many cameras at once)


def scene_points(params, num_points, generator):
    """Coloured points on the visible surfaces of each scene, (n, num_points, 6) = (x, y, z, r, g, b):
    the input of the PointNet encoder. Rays from random cameras towards random points of the
    scene; the first hit of each is one point (rays that miss are drawn again)."""
    n = params["kind"].shape[0]
    got = [[] for _ in range(n)]
    while min(sum(len(g) for g in gs) for gs in got) < num_points:
        eyes, _ = random_cameras((n, 1), generator)
        eyes = eyes[:, :, :3, 3].expand(-1, num_points, -1)  # (n, num_points, 3)
        aim = (torch.rand(n, num_points, 3, generator=generator) * 2 - 1) * 0.9
        d = F.normalize(aim - eyes, dim=-1)
        t, normal, k = scene_hit(params, eyes, d)
        colour = shade(params, normal, k)
        for i in range(n):
            hit = ~torch.isinf(t[i])
            got[i].append(torch.cat([eyes[i] + t[i, :, None] * d[i], colour[i]], -1)[hit])
    return torch.stack([torch.cat(gs)[:num_points] for gs in got])


# ----------------------------------------------------------------------------------------
# Demo: render a synthetic scene exactly, and fit a radiance field to it from 24 pictures
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import functools
    import time

    import figures

    Hd = importlib.import_module("03_hdbf_cfc")
    torch.manual_seed(0)
    params = synthetic_scene_params(1, seed=3)
    size, S = 48, 32
    g = torch.Generator().manual_seed(0)
    # a tri-plane of learnable fields (no encoder: one scene), the CFC read-out and the head
    _, readout = Hd.build_decoder_readout("hdbf_cfc", 8, 16, 1 + 8, hidden=64, num_layers=4, embed_mult=3)
    fields = [nn.Parameter(torch.randn(1, 3, 16, r, r) * 0.1) for r in (16, 32, 64)]
    vae = RadianceFieldVAE(None, None, readout, functools.partial(inr.triplane_lookup, combine="concat"),
                           RadianceHead(8))
    opt = torch.optim.Adam([*fields, *vae.parameters()], lr=5e-3)
    t0 = time.time()
    for step in range(300):
        c2w, intr = random_cameras((1, 1024), g, size=size)
        rows, cols = torch.randint(size, (2, 1, 1024), generator=g)
        o, d = RM.pixel_rays(c2w, intr, rows, cols)
        bg = torch.rand(o.shape, generator=g) * 2 - 1  # a random background per ray (see make_rays)
        pred = vae.query(fields, make_rays(o, d, S, background=bg, generator=g))
        loss = (pred - scene_render(params, o, d, bg)).pow(2).mean()  # squared error (file 11's recon says why)
        opt.zero_grad()
        loss.backward()
        opt.step()
    views = torch.stack([RM.orbit_c2w(60.0 * k, 25.0, SCENE_RADIUS) for k in range(6)])  # a turntable of 6
    intr = torch.tensor([RM.focal_from_fov(size, SCENE_FOV), size / 2, size / 2]).expand(6, 3)
    with torch.no_grad():
        pred = vae.render([f.expand(6, -1, -1, -1, -1) for f in fields], views, intr, size, size, 64)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        o, d = RM.pixel_rays(views[:, None], intr[:, None], rows.reshape(1, -1), cols.reshape(1, -1))
        exact = scene_render({k: v.expand(6, *v.shape[1:]) for k, v in params.items()}, o, d)
        exact = exact.reshape(6, size, size, 3).permute(0, 3, 1, 2)
    print(f"300 steps of 1024 rays in {time.time() - t0:.0f} s: PSNR of 6 new views {inr.psnr(pred, exact):.2f} dB")
    figures.write_sheet([exact, pred], "out/10_volume_rendering.png", ["exact", "radiance field"],
                        "a synthetic scene from six new viewpoints")
    print("wrote out/10_volume_rendering.png")
