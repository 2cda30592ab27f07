"""09 - Shapes: occupancy functions on [-1, 1]^3 from surface point clouds (paper Sec. 4.2).

The concept
-----------
A shape is the function o: [-1, 1]^3 -> {0, 1} (1 inside). Its latent is a tri-plane: three
planes (xy, xz, yz; file 01's TRIPLANE_AXES) of Z channels each, (B, 3, Z, h, h). Nothing of
files 02-04 is copied for it:

  * the encoder turns a surface point cloud into three feature planes (a PointNet with local
    pooling, below) and then runs file 02's ConvEncoder on them, the planes folded into the
    batch so one set of conv weights serves all three;
  * D2CVAE.decode (file 02) folds the planes the same way through file 03's HDBF decoder:
    every plane gets basis fields at three scales;
  * the lookup is file 01's triplane_lookup with the three planes' embeddings SUMMED (the
    paper's choice for shapes), and file 03's CFC read-out maps them to one logit;
  * the likelihood is Bernoulli: -log p(o | z) = BCE(logit, o) at the query points;
  * for stage 2 the three planes are stacked on channels, (B, 3Z, h, h) (file 05), and file
    04's UNet models them like any image latent.

Queries mix uniform points of the cube (the coarse layout) with points near the surface
(where the occupancy changes). Outputs are file 07's meshes and metrics and file 08's pictures;
--resolution is the voxel grid of IoU, meshes and D_x, --plane-res the PointNet's planes. The
built-in shapes are unions of two or three spheres, boxes or tori (the class), exact at any
point; users' shapes (grids + surface points in an .npz, or ConvONet's layout) come through
readers.py.

Shape letters: B batch, N P Q points (surface, queries), K queries per item and step, S parts
of a synthetic shape, C channels, R grid resolution, Z latent channels.

Left out on purpose: text-to-shape (the original release does not run it), and normals in the
encoder's input (positions alone are what the paper's PointNet reads).
"""
import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import readers

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
M = importlib.import_module("05_modalities")
G = importlib.import_module("07_geometry")
RM = importlib.import_module("08_ray_marching")

CLASSES = ("spheres", "boxes", "tori")  # the built-in shapes' classes
NEAR_SURFACE_STD = 0.03  # std of the near-surface query points around the surface, coordinate units
PREVIEW_FOV = 40.0  # field of view of the previews, degrees: the shapes of [-0.95, 0.95]^3 fill the picture


def voxel_grid(R, device=None):
    """Voxel-centre coordinates of an R^3 grid, (R, R, R, 3); [i, j, k] is (x_i, y_j, z_k)."""
    c = inr.pixel_centers(R, device)  # (R,)
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)


# ----------------------------------------------------------------------------------------
# Synthetic shapes: unions of two or three primitives of one kind, defined analytically
# ----------------------------------------------------------------------------------------
def synthetic_shape_params(n, seed=0, num_parts=3):
    """Random parameters of n synthetic shapes (a dict of tensors), reproducible from seed.

    Each shape is a union of 2 or 3 parts of its class: spheres (radius), axis-aligned boxes
    (three half-sides) or tori (major and minor radius, axis along x, y or z).
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # uniform in [0, 1)
    label = torch.randint(len(CLASSES), (n,), generator=g)  # (n,)
    size = u(n, num_parts, 3)  # (n, S, 3), turned into each class's dimensions below
    lab = label[:, None, None]
    dims = torch.where(lab == 0, 0.2 + 0.25 * size,  # sphere: radius in [0.2, 0.45] (entry 0)
                       torch.where(lab == 1, 0.12 + 0.28 * size,  # box: half-sides in [0.12, 0.4]
                                   0.2 + 0.15 * size))  # torus: major radius in [0.2, 0.35] (entry 0)
    dims[..., 1] = torch.where(label[:, None] == 2, 0.07 + 0.05 * size[..., 1], dims[..., 1])  # torus minor r
    present = torch.ones(n, num_parts, dtype=torch.bool)
    present[:, 2:] = u(n, num_parts - 2) < 0.5  # the third part exists in half of the shapes
    return {"label": label, "dims": dims, "present": present,
            "centre": u(n, num_parts, 3) * 0.9 - 0.45,  # (n, S, 3): every part stays inside [-0.95, 0.95]^3
            "axis": torch.randint(3, (n, num_parts), generator=g)}  # (n, S) torus axis: x, y or z


# the coordinates of a point seen from a torus with its axis along x, y or z: (in-plane, in-plane, axis)
_TORUS_FRAME = torch.tensor([[1, 2, 0], [0, 2, 1], [0, 1, 2]])


def part_sdf(params, s, p):
    """Signed distance (< 0 inside) of part s of every shape: p (n, N, 3) -> (n, N)."""
    rel = p - params["centre"][:, None, s]  # (n, N, 3) position relative to the part's centre
    d = params["dims"][:, None, s]  # (n, 1, 3)
    # sphere: |rel| - r
    sphere = rel.norm(dim=-1) - d[..., 0]
    # box: with q = |rel| - h, the distance is |max(q, 0)| outside plus max_i q_i (< 0) inside
    q = rel.abs() - d
    box = q.clamp(min=0).norm(dim=-1) + q.max(-1).values.clamp(max=0)
    # torus: (sqrt(a^2 + b^2) - R_major, w) is the position in the tube's cross-section
    abw = rel.gather(-1, _TORUS_FRAME[params["axis"][:, s]][:, None].expand(-1, p.shape[1], -1))  # (n, N, 3)
    tube = torch.stack([abw[..., :2].norm(dim=-1) - d[..., 0], abw[..., 2]], -1)  # (n, N, 2)
    torus = tube.norm(dim=-1) - d[..., 1]
    label = params["label"][:, None]
    sdf = torch.where(label == 0, sphere, torch.where(label == 1, box, torus))
    return torch.where(params["present"][:, None, s], sdf, torch.inf)  # an absent part is nowhere


def synthetic_occupancy(params, p):
    """Exact occupancy of the union: p (n, N, 3) -> (n, N) bool (inside any part)."""
    return torch.stack([part_sdf(params, s, p) for s in range(params["centre"].shape[1])]).amin(0) < 0


def synthetic_surface(params, num_points, generator=None):
    """num_points points uniformly on the surface of each union, (n, P, 3).

    Each part gets 4P candidate points spread uniformly over its own surface; one inside another
    part is not on the union's surface (weight 0); the P points are drawn from the rest by area.
    """
    n, S = params["label"].shape[0], params["centre"].shape[1]
    M = 4 * num_points  # candidates per part
    rnd = lambda *shape: torch.rand(*shape, generator=generator)
    cands, weights = [], []
    for s in range(S):
        d = params["dims"][:, s][:, None]  # (n, 1, 3)
        # sphere: r * a normalised Gaussian vector is uniform on the sphere; area 4 pi r^2
        g = torch.randn(n, M, 3, generator=generator)
        sphere, a_sphere = d[..., :1] * g / g.norm(dim=-1, keepdim=True), 4 * torch.pi * d[..., 0] ** 2
        # box: choose a face pair with probability ~ its area (4 h_b h_c), a side, a uniform point on it
        h = d.expand(n, M, 3)
        face_area = torch.stack([d[:, 0, 1] * d[:, 0, 2], d[:, 0, 0] * d[:, 0, 2], d[:, 0, 0] * d[:, 0, 1]], -1)  # (n, 3)
        axis = torch.multinomial(face_area, M, replacement=True, generator=generator)  # (n, M)
        box = (2 * rnd(n, M, 3) - 1) * h
        side = torch.where(rnd(n, M) < 0.5, -1.0, 1.0)
        box = box.scatter(-1, axis[..., None], (side * h.gather(-1, axis[..., None])[..., 0])[..., None])
        a_box = 8 * face_area.sum(-1, keepdim=True)  # (n, 1)
        # torus: angles u (around the axis) and v (around the tube) uniform; a patch at v has
        # area ~ (R + r cos v), so each candidate is weighted by (R + r cos v) / R (mean 1)
        u_, v_ = 2 * torch.pi * rnd(n, M), 2 * torch.pi * rnd(n, M)
        Rm, r = d[..., 0], d[..., 1]  # (n, 1) each
        ring = torch.stack([(Rm + r * torch.cos(v_)) * torch.cos(u_), (Rm + r * torch.cos(v_)) * torch.sin(u_),
                            r * torch.sin(v_)], -1)  # (n, M, 3) in the frame (a, b, axis)
        inverse = torch.argsort(_TORUS_FRAME[params["axis"][:, s]], dim=-1)  # back to (x, y, z)
        ring = ring.gather(-1, inverse[:, None].expand(-1, M, -1))
        a_ring = 4 * torch.pi ** 2 * Rm * r * (Rm + r * torch.cos(v_)) / Rm
        label = params["label"][:, None]
        rel = torch.where(label[..., None] == 0, sphere, torch.where(label[..., None] == 1, box, ring))
        area = torch.where(label == 0, a_sphere, torch.where(label == 1, a_box, a_ring)).expand(n, M)
        cands.append(rel + params["centre"][:, s][:, None])
        weights.append(area * params["present"][:, s][:, None])
    cands, weights = torch.cat(cands, 1), torch.cat(weights, 1)  # (n, S*M, 3), (n, S*M)
    # keep a candidate only if no OTHER part contains it (its own sdf is 0 up to rounding)
    owner = torch.arange(S).repeat_interleave(M)  # (S*M,) which part each candidate lies on
    for s in range(S):
        inside_s = part_sdf(params, s, cands) < 0  # (n, S*M)
        weights = weights * ~(inside_s & (owner != s))
    pick = torch.multinomial(weights, num_points, replacement=True, generator=generator)  # (n, P)
    return cands.gather(1, pick[..., None].expand(-1, -1, 3))


def query_points(surface, num_points, generator=None):
    """num_points query points per shape, (n, Q, 3): half uniform in the cube, half near the surface."""
    n, P, _ = surface.shape
    half = num_points // 2
    uniform = torch.rand(n, num_points - half, 3, generator=generator) * 2 - 1
    near = surface.gather(1, torch.randint(P, (n, half, 1), generator=generator).expand(-1, -1, 3))
    near = near + NEAR_SURFACE_STD * torch.randn(n, half, 3, generator=generator)
    return torch.cat([uniform, near.clamp(-1, 1)], 1)


def synthetic_shapes(params, num_surface, num_queries, grid_res=0, seed=0):
    """The data items of synthetic shapes: surface points, labelled query points, optional exact grid."""
    g = torch.Generator().manual_seed(seed)
    items = {"x": [], "points": [], "occ": [], "grid": []}
    for i in range(0, len(params["label"]), 128):  # in chunks: the candidates of 128 shapes fit in memory
        p = {k: v[i:i + 128] for k, v in params.items()}
        surface = synthetic_surface(p, num_surface, g)
        points = query_points(surface, num_queries, g)
        items["x"].append(surface)
        items["points"].append(points)
        items["occ"].append(synthetic_occupancy(p, points))
        if grid_res:
            c = voxel_grid(grid_res).reshape(1, -1, 3).expand(len(p["label"]), -1, -1)
            items["grid"].append(synthetic_occupancy(p, c).reshape(-1, grid_res, grid_res, grid_res))
    out = {k: torch.cat(v) for k, v in items.items() if v}
    out["label"] = params["label"]
    return out


def random_pose(B, generator):
    """--augment: B random maps of space (B, 3, 3): a turn about the up axis y, a mirror image (x -> -x) half
    the time, a stretch of 0.8-1.2 per axis. A query point keeps its label when both move: each shape is
    seen in new poses, and the VAE must encode the points it is given, not recognise one of a few shapes."""
    u = torch.rand(B, 5, generator=generator)
    c, s = torch.cos(2 * torch.pi * u[:, 0]), torch.sin(2 * torch.pi * u[:, 0])
    one, zero = torch.ones(B), torch.zeros(B)
    turn = torch.stack([c, zero, s, zero, one, zero, -s, zero, c], -1).reshape(B, 3, 3)  # rotation about y
    mirror = torch.stack([torch.where(u[:, 1] < 0.5, -1.0, 1.0), one, one], -1)  # (B, 3)
    return turn * (mirror * (0.8 + 0.4 * u[:, 2:5]))[:, None, :]  # turn @ diag(mirror * stretch)


def grid_occupancy(grid, p):
    """Occupancy of voxel grids (n, R, R, R) over [-1, 1]^3 at any points p (n, N, 3), by the voxel holding each."""
    n, R = grid.shape[0], grid.shape[-1]
    # the voxel holding coordinate c is floor((c + 1) / 2 * R)
    ijk = ((p + 1) / 2 * R).floor().long().clamp(0, R - 1)  # (n, N, 3)
    flat = (ijk[..., 0] * R + ijk[..., 1]) * R + ijk[..., 2]  # (n, N)
    return grid.reshape(n, -1).gather(1, flat)


# ----------------------------------------------------------------------------------------
# The encoder: PointNet with local pooling onto the three planes, then file 02's convs
# ----------------------------------------------------------------------------------------
def plane_cells(p, res):
    """Index of the plane cell each point falls in, per plane: p (B, N, 3) -> (B, 3, N) in [0, res^2). Plane
    (a, b) of TRIPLANE_AXES has its width along a, its height along b (as in bilinear_lookup): index_b * res + index_a."""
    ij = ((p + 1) / 2 * res).floor().long().clamp(0, res - 1)  # (B, N, 3) cell index along each axis
    return torch.stack([ij[..., b] * res + ij[..., a] for a, b in inr.TRIPLANE_AXES], 1)


def scatter_mean(feats, cell, num_cells):
    """Average the features of the points in each cell: (B, N, C), (B, N) -> (B, num_cells, C); with
    index_add_ on the flattened (batch, cell) index; an empty cell gets 0."""
    B, N, C = feats.shape
    flat = (cell + torch.arange(B, device=cell.device)[:, None] * num_cells).reshape(-1)  # (B N,) global cell
    # sum_c = sum of the features of the points in cell c; count_c = how many there are
    sums = feats.new_zeros(B * num_cells, C).index_add_(0, flat, feats.reshape(B * N, C))
    count = feats.new_zeros(B * num_cells).index_add_(0, flat, feats.new_ones(B * N))
    # mean_c = sum_c / max(count_c, 1)
    return (sums / count.clamp(min=1)[:, None]).reshape(B, num_cells, C)


class ResidualFC(nn.Module):
    """h -> W_2 ReLU(W_1 ReLU(h)) + W_s h: the per-point block of the PointNet."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, dim_out), nn.Linear(dim_out, dim_out)
        self.skip = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, h):
        return self.fc2(F.relu(self.fc1(F.relu(h)))) + self.skip(h)


class PointNetPlanes(nn.Module):
    """Surface points (B, N, 3) -> three feature planes (B, 3, C, res, res).

    A PointNet applies the same small MLP to every point, each in isolation; local pooling (ConvONet,
    Peng et al. 2020) lets points talk to their neighbours: after each block, the features are averaged
    over the points in the same cell of each plane, and every point gets back the sum of its three
    cells' averages beside its own features. At the end the cells' averages are the planes.
    """

    def __init__(self, out_ch, hidden=32, res=32, num_blocks=3, point_dim=3):
        super().__init__()
        self.res = res
        # point_dim: 3 for (x, y, z); 6 for the coloured points (x, y, z, r, g, b) of the NeRF scenes
        self.fc_in = nn.Linear(point_dim, 2 * hidden)
        self.blocks = nn.ModuleList(ResidualFC(2 * hidden, hidden) for _ in range(num_blocks))
        self.fc_out = nn.Linear(hidden, out_ch)

    def forward(self, p):
        B, N, _ = p.shape
        cells = plane_cells(p[..., :3], self.res)  # (B, 3, N), from the positions
        h = self.fc_in(p)  # (B, N, 2 hidden)
        for i, block in enumerate(self.blocks):
            h = block(h)  # (B, N, hidden)
            if i < len(self.blocks) - 1:
                # local pooling: each point reads the mean feature of its cell on every plane
                pooled = sum(scatter_mean(h, cells[:, k], self.res ** 2).gather(
                    1, cells[:, k, :, None].expand(-1, -1, h.shape[-1])) for k in range(3))  # (B, N, hidden)
                h = torch.cat([h, pooled], -1)  # (B, N, 2 hidden)
        h = self.fc_out(h)  # (B, N, C)
        planes = [scatter_mean(h, cells[:, k], self.res ** 2) for k in range(3)]  # 3 x (B, res^2, C)
        # (B, res^2, C) -> (B, C, res, res): row-major cells, height = second axis of the plane
        return torch.stack([pl.transpose(1, 2).reshape(B, -1, self.res, self.res) for pl in planes], 1)


def exchange_planes(planes):
    """Let the three planes see each other: (B, 3, C, r, r) -> (B, 3, 3C, r, r).

    Each plane gets, beside its own features, the other two averaged along the axis it lacks and
    spread along the one it shares. For xy (height y, width x): xz averaged over z is a function
    of x, laid along xy's width; yz averaged over z, a function of y, along its height; likewise
    for xz and yz. A point's three plane features then all know its whole 3D neighbourhood.
    """
    xy, xz, yz = planes.unbind(1)  # (B, C, r, r) each; xy: (y, x), xz: (z, x), yz: (z, y)
    to_xy = [xz.mean(-2, keepdim=True), yz.mean(-2).unsqueeze(-1)]  # f(x) along width, f(y) along height
    to_xz = [xy.mean(-2, keepdim=True), yz.mean(-1, keepdim=True)]  # f(x) along width, f(z) along height
    to_yz = [xy.mean(-1).unsqueeze(-2), xz.mean(-1, keepdim=True)]  # f(y) along width, f(z) along height
    out = [torch.cat([own, *(t.expand_as(own) for t in others)], 1)
           for own, others in ((xy, to_xy), (xz, to_xz), (yz, to_yz))]
    return torch.stack(out, 1)


class ShapeEncoder(nn.Module):
    """Surface points (B, N, 3 or 6) -> posterior parameters of a tri-plane, (B, 3, 2Z, res / 2^(L-1), ...)."""

    def __init__(self, z_ch, ch=32, ch_mult=(1, 2, 2), res=32, point_hidden=32, point_dim=3):
        super().__init__()
        self.pointnet = PointNetPlanes(ch, point_hidden, res, point_dim=point_dim)
        self.conv = V.ConvEncoder(3 * ch, z_ch, ch, ch_mult)  # one set of weights for all three planes

    def forward(self, p):
        planes = exchange_planes(self.pointnet(p))  # (B, 3, 3C, res, res)
        B = planes.shape[0]
        return self.conv(planes.flatten(0, 1)).unflatten(0, (B, 3))  # (B, 3, 2Z, h, h)


# ----------------------------------------------------------------------------------------
# The shape modality
# ----------------------------------------------------------------------------------------
class ShapeModality(M.Modality):
    """Items: "x" surface points (P, 3) (the encoder's), "points" (Q, 3) with their occupancy "occ" (Q,),
    and the occupancy grid "grid" (R, R, R) of IoU when the data has one."""

    name = "shape"
    classes = CLASSES
    planes, out_ch = 3, 1  # a tri-plane, one logit per point
    synthetic_train, synthetic_val = 1000, 64
    num_surface, num_queries, encoder_points = 4096, 8192, 1024  # P, Q kept per shape; points the encoder sees

    # -- data ------------------------------------------------------------------------------
    def load(self, data):
        P, Q = self.num_surface, self.num_queries
        if data is None:  # the built-in synthetic shapes, with their classes; exact grids for IoU
            tr = synthetic_shape_params(self.synthetic_train, seed=self.seed)
            return synthetic_shapes(tr, P, Q, seed=self.seed), self.held_out_synthetic(), len(CLASSES)
        if data.lower().endswith(".npz") and os.path.isfile(data):
            return (*self.split(self.from_npz(data, "--data"), data, "shape"), 0)
        # a ConvONet folder: P surface and Q labelled points of each shape prepared once (prepare.py)
        prepared = lambda split: readers.prepared_convonet(data, split, P, Q, self.seed, self.cache)
        if any(os.path.isfile(os.path.join(c, "train.lst")) for c in readers.convonet_classes(data)):
            # the dataset's own split: train.lst for training, val.lst for validation
            return prepared("train"), prepared("val"), 0
        return (*self.split(prepared(None), data, "shape"), 0)  # no lists: every shape, a random split

    def from_npz(self, path, flag):
        """Items of an .npz of surface points + grids: a random subset of the points, queries labelled by the grid."""
        d, g = readers.read_shape_npz(path, flag), torch.Generator().manual_seed(self.seed)
        surface = d["surface"][:, torch.randperm(d["surface"].shape[1], generator=g)[:self.num_surface]]
        points = query_points(surface, self.num_queries, g)
        return {"x": surface, "points": points, "occ": grid_occupancy(d["grid"], points), "grid": d["grid"],
                "label": None, "names": d["names"]}

    def held_out_synthetic(self):  # train.py's held-out synthetic shapes, exact grids at --resolution
        va = synthetic_shape_params(self.synthetic_val, seed=self.seed + 1_000_003)
        return synthetic_shapes(va, self.num_surface, self.num_queries, self.resolution, seed=self.seed + 1)

    def encoder_input(self, x):
        """Stored surface points -> the encoder's input: the first encoder_points (a random subset)."""
        return x[:, :self.encoder_points].float()

    # -- model -----------------------------------------------------------------------------
    def build_encoder(self):
        return ShapeEncoder(self.z_ch, self.enc_ch, self.enc_mult, self.plane_res)

    def lookup(self, field, coords):
        # p = p_xy + p_xz + p_yz: the three planes' embeddings summed
        return inr.triplane_lookup(field, coords, combine="sum")

    # -- the ELBO's pieces -----------------------------------------------------------------
    def training_batch(self, data, idx, K, generator):
        """-> (surface points for the encoder (B, P_enc, 3), coords (B, K, 3), occupancy (B, K, 1))."""
        x = data["x"][idx]  # (B, P, 3)
        B, P, _ = x.shape
        # a fresh random subset of the surface points for the encoder at every step
        sub = torch.rand(B, P, generator=generator).argsort(1)[:, :self.encoder_points]  # (B, P_enc)
        x = x.gather(1, sub[..., None].expand(-1, -1, 3))
        Q = data["points"].shape[1]
        pick = torch.randint(Q, (B, K if K > 0 else Q), generator=generator)  # (B, K)
        coords = data["points"][idx].gather(1, pick[..., None].expand(-1, -1, 3))
        target = data["occ"][idx].gather(1, pick).float()[..., None]
        if self.augment:  # one random pose per shape (p -> A p), for its surface and query points alike
            A = random_pose(B, generator).transpose(1, 2)
            fit = (0.95 / (x @ A).abs().amax((1, 2))).clamp(max=1.0)[:, None, None]  # shrunk back into the cube
            x, coords = x @ A * fit + 0.005 * torch.randn(x.shape, generator=generator), coords @ A * fit  # + jitter
        return x, coords, target

    @property
    def values_per_item(self):
        """D_x: the occupancies of the grid at --resolution."""
        return self.resolution ** 3

    def recon(self, logits, occupancy):
        """Bernoulli likelihood: -log p(o | logit) = BCE(logit, o), mean per item."""
        return F.binary_cross_entropy_with_logits(logits, occupancy, reduction="none").flatten(1).mean(1)

    # -- outputs ---------------------------------------------------------------------------
    def grid(self, size, device=None):
        return voxel_grid(size[0], device)  # (R, R, R, 3)

    def size(self, resolution, frames=None):
        return (resolution,) * 3  # an R^3 grid of voxels

    def logit_grid(self, vae, fields, R):
        """The decoded shapes' logits on the R^3 voxel-centre grid, (B, R, R, R)."""
        return self.query_grid(vae, fields, self.size(R))[..., 0]

    def preview(self, vae, fields, size=96):
        """Shaded pictures of the decoded shapes, ray marched through the occupancy function (file 08)."""
        field = lambda p: vae.query(fields, p)[..., 0]  # points (B, N, 3) -> logits (B, N)
        return RM.render_occupancy(field, fields[0].shape[0], size, size, fov_deg=PREVIEW_FOV)

    def evaluate(self, vae, val, device, n=None, chamfer=False):
        """Mean IoU of the reconstructions (posterior mean) -> (scores, sheet rows, names).

        IoU on the data's grid when it has one, else on its stored (uniform) query points.
        chamfer=True also meshes each reconstruction's logits on that grid (or at --resolution)
        and adds the Chamfer distance between 2048 of its points and 2048 of the data's surface.
        """
        n = len(val["x"]) if n is None else n
        R = val["grid"].shape[-1] if "grid" in val else self.resolution
        ious, cds, previews = [], [], []
        for i in range(0, n, 8):
            fields = vae.decode(vae.encode(self.encoder_input(val["x"][i:i + 8].to(device))).mean)
            logits = self.logit_grid(vae, fields, R) if "grid" in val or chamfer else None  # (b, R, R, R)
            if "grid" in val:
                pred, truth = logits > 0, val["grid"][i:i + 8].to(device)
            else:
                pred = vae.query(fields, val["points"][i:i + 8].to(device))[..., 0] > 0
                truth = val["occ"][i:i + 8].to(device)
            # IoU = |pred and truth| / |pred or truth|, per shape
            ious.append(((pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1).clamp(min=1)).cpu())
            if chamfer:
                cds.append(G.chamfer(self.mesh_clouds(logits, 2048, seed=i), val["x"][i:i + 8, :2048]))
            if i == 0:
                previews.append(self.preview(vae, fields).cpu())
        rows, names = [previews[0]], ["reconstructed"]
        if "grid" in val:  # the data itself, ray marched through its voxels
            k = min(8, n)
            rows.insert(0, RM.render_occupancy(RM.voxel_field(val["grid"][:k]), k, 96, 96, fov_deg=PREVIEW_FOV))
            names.insert(0, "data")
        ious = torch.cat(ious)
        scores = {"iou": ious.mean().item(), "iou_each": ious.tolist()}
        if chamfer:
            scores["chamfer_each"] = torch.cat(cds).tolist()
        return scores, rows, names

    def describe(self, scores):
        return f"validation IoU {scores['iou']:.3f}"

    @staticmethod
    def mesh_clouds(logits, num_points=2048, seed=0):
        """num_points points on each shape's mesh: logit grids (B, R, R, R) -> (B, num_points, 3)
        (at the origin for a shape with no surface at all)."""
        g = torch.Generator().manual_seed(seed)
        clouds = []
        for grid in logits.cpu():
            verts, faces = G.extract_mesh(grid, 0.0)
            clouds.append(G.sample_mesh_surface(verts, faces, num_points, g) if len(faces) else torch.zeros(num_points, 3))
        return torch.stack(clouds)

    def sample_arrays(self, vae, fields, resolutions, frames=None):
        """sample.py: shaded pictures of the samples (their meshes are write_samples')."""
        return {"preview": self.preview(vae, fields).cpu()}

    def write_samples(self, vae, fields, resolutions, stem, first):
        """A mesh per sample and resolution, <stem>_<k>_<R>.obj (surface nets on the R^3 grid, file 07)."""
        for R in resolutions:
            for k, grid in enumerate(self.logit_grid(vae, fields, R).cpu(), start=first):
                G.write_obj(f"{stem}_{k}_{R}.obj", *G.extract_mesh(grid, 0.0))

    def reconstruct(self, vae, source, resolutions, n, device, frames=None):
        """sample.py --reconstruct: encode every shape of `source` ("synthetic": n held-out ones; an .npz of grids
        + surface points; a ConvONet folder, its test.lst) from its surface points, print the IoU and the
        Chamfer distance between 2048 points of the mesh and 2048 of the data's surface -> previews."""
        if resolutions:
            raise SystemExit("--resolution: shapes are compared on the data's own grid (or query points); leave it out")
        if source == "synthetic":
            items = self.held_out_synthetic()
        elif source.lower().endswith(".npz") and os.path.isfile(source):
            items = self.from_npz(source, "--reconstruct")
        else:
            items = readers.read_convonet(source, self.num_surface, self.num_queries, "test", self.seed, "--reconstruct")
        m = min(n or (16 if source == "synthetic" else len(items["x"])), len(items["x"]))  # data: every shape
        scores, rows, names = self.evaluate(vae, items, device, n=m, chamfer=True)
        print("per shape (IoU, Chamfer): " + ", ".join(f"{nm} {iou:.3f} {c:.4f}" for nm, iou, c in zip(
            items.get("names") or [f"#{i}" for i in range(m)], scores["iou_each"], scores["chamfer_each"])))
        grid = f"{items['grid'].shape[-1]}^3 grid" if "grid" in items else "query points"
        print(f"{m} shapes: mean IoU {scores['iou']:.3f} ({grid}), Chamfer distance "
              f"{sum(scores['chamfer_each']) / m:.5f} (squared, in [-1, 1]^3 units)")
        return rows, names


# ----------------------------------------------------------------------------------------
# Demo: one synthetic shape per class, encoded from its surface points by a briefly trained VAE
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    t0 = time.time()
    mod = ShapeModality(M.demo_settings(resolution=48, z_ch=8, enc_ch=16))  # IoU on the 48^3 grid
    mod.synthetic_train, mod.synthetic_val, mod.num_surface, mod.num_queries = 200, 16, 2048, 4096
    train, val, _ = mod.load(None)
    vae = M.fit(mod, mod.build_vae(), train, steps := 300, batch=8, K=1024)  # stage 1 (file 05)
    with torch.no_grad():
        scores, rows, names = mod.evaluate(vae, val, "cpu")
    print(f"{steps} steps in {time.time() - t0:.0f} s: {mod.describe(scores)} ({mod.resolution}^3) "
          f"on {len(val['x'])} held-out shapes")
    mod.write_sheet(rows, "out/09_shapes.png", names, "held-out synthetic shapes and their reconstructions")
    print("wrote out/09_shapes.png")
