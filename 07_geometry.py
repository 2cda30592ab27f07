"""07 - Geometry: turning a generated occupancy field into a mesh, and measuring sets of shapes.

The concept
-----------
A shape INR (file 09) is an occupancy function: a tri-plane INR that gives a logit (> 0 inside)
at any point of [-1, 1]^3. To use it outside the model, or to compare generated shapes with
real ones as the papers do, two tools are needed, both written from scratch here:

  1. a mesh: naive surface nets on a grid of logits, written as a Wavefront .obj, and uniform
     points sampled on its surface;
  2. the metrics of 3D generative models (Achlioptas et al. 2018; PointFlow): the Chamfer
     distance between point clouds, and MMD / COV / 1-NNA between a generated set and a
     reference set.

Each section opens with its derivation. Conventions are the project's: coordinates in
[-1, 1]^3, x first; grid value[i, j, k] sits at the voxel centre
(-1 + (2i+1)/R, -1 + (2j+1)/R, -1 + (2k+1)/R); a value above the level means inside.

Shape letters: R grid resolution, V vertices, F faces, K crossing grid edges, N M points per
cloud, B batch of cloud pairs, n m numbers of clouds in a set.

Left out on purpose: marching cubes (its 256-case table; surface nets needs none), mesh
smoothing and decimation, and the EMD-based variants of MMD/COV (EMD needs an approximate
optimal-transport solver; the Chamfer versions are the ones DDMI reports).
"""
import math
import os

import numpy as np
import torch


# ========================================================================================
# Meshes: naive surface nets, mesh area, volume, surface sampling, OBJ
# ========================================================================================
# A shape INR gives us a number per point (an occupancy probability or a logit); to look at it,
# or to compare it with other shapes by sampling points on its surface, we need a triangle mesh
# of the level set {p : value(p) = level}. We evaluate the INR on a grid of R^3 voxel centres and
# turn the grid into a mesh with NAIVE SURFACE NETS (Gibson 1998), the "dual" cousin of marching
# cubes:
#
#   * marching cubes puts vertices ON the grid edges (one per crossing edge) and needs a 256-case
#     lookup table to connect them;
#   * surface nets puts ONE vertex INSIDE each grid cell that the surface passes through, and
#     connects them with ONE quad per grid edge that the surface crosses. No lookup table: the
#     connectivity follows from the grid itself.
#
# Step by step (extract_mesh):
#   1. Pad the grid with one layer of "outside" voxels, so the surface can never run off the grid:
#      it is always closed (watertight), even for a shape that touches the border.
#   2. A cell is the cube between 8 neighbouring voxel centres. A cell whose 8 corners are not all
#      on the same side of the level is crossed by the surface and gets one vertex, placed at the
#      mean of the points where the surface crosses the cell's 12 edges (each found by linear
#      interpolation of the two end values).
#   3. A grid edge between two voxel centres with different sides is pierced by the surface. Four
#      cells share that edge (they sit around it like the 4 panes of a window around the cross of
#      its frame); all 4 are crossed, so all 4 have a vertex, and we join them with a quad (2
#      triangles) oriented so that its normal points from the inside end of the edge to the
#      outside end.
#
# Limits (left as they are on purpose): the surface is always closed, but where two inside voxels
# touch only along a diagonal (a cell face whose 4 corners alternate inside / outside), a single
# cell vertex is shared by two sheets and a mesh edge can be used by 4 faces: closed, but not a
# manifold there. Smooth shapes on a fine enough grid do not produce this. Each quad is split
# along the same diagonal, not the shorter one, and vertices are not smoothed or projected.
#
# Helpers: mesh_area, mesh_volume (divergence theorem), sample_mesh_surface (uniform points on the
# surface), write_obj (Wavefront OBJ, written atomically).
#
# The 8 corners of a cell, as offsets (dx, dy, dz) from its lowest corner. Corner number
# c = 4 dx + 2 dy + dz (binary), so corners differing by one bit share a cell edge.
CELL_CORNERS = torch.tensor(
    [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
)  # (8, 3)

# The 12 edges of a cell, as pairs of corner numbers: 4 along x (bit 4 flips), 4 along y
# (bit 2 flips), 4 along z (bit 1 flips).
CELL_EDGES = torch.tensor(
    [[0, 4], [1, 5], [2, 6], [3, 7],  # along x
     [0, 2], [1, 3], [4, 6], [5, 7],  # along y
     [0, 1], [2, 3], [4, 5], [6, 7]]  # along z
)  # (12, 2)


def _empty_mesh(device):
    """An empty mesh: verts (0, 3) float32, faces (0, 3) int64."""
    return (torch.zeros(0, 3, dtype=torch.float32, device=device),
            torch.zeros(0, 3, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------------------
# Naive surface nets
# ----------------------------------------------------------------------------------------
def extract_mesh(values, level=0.0):
    """Triangle mesh of the level set {value = level} of a voxel-centre grid, by naive surface nets.

    Inputs:
      values: (R, R, R) tensor (float, or bool/int occupancy), value[i, j, k] at the voxel
              centre (-1 + (2i+1)/R, -1 + (2j+1)/R, -1 + (2k+1)/R); value > level is inside.
      level:  the iso-level (0 for logits or signed distances, 0.5 for {0, 1} occupancy).
    Outputs:
      verts: (V, 3) float32, world coordinates in [-1, 1]^3.
      faces: (F, 3) int64 indices into verts; counter-clockwise seen from outside, i.e. the
             normal (v1 - v0) x (v2 - v0) points from inside to outside.
    An empty grid (nothing inside) gives V = F = 0. A full grid gives the box [-1, 1]^3 (the
    padding closes it).
    """
    device = values.device
    R = values.shape[0]
    assert values.shape == (R, R, R), f"expected a cubic grid (R, R, R), got {tuple(values.shape)}"
    # Work in floating point (bool / integer occupancy grids are allowed as input).
    vals = values if values.is_floating_point() else values.float()  # (R, R, R)
    if not bool((vals > level).any()):
        # Nothing inside: no surface at all.
        return _empty_mesh(device)

    # ---- Step 1: pad with one layer of "outside" ------------------------------------------
    # Why: a cell can only get a vertex, and an edge a quad, if the grid extends on both sides
    # of the surface. Without padding, a shape touching the border would have its surface cut
    # open there (the cells it would need do not exist). With a layer of outside voxels all
    # around, every inside voxel is separated from the padding by a crossed edge, so the
    # surface is a closed boundary between the inside voxels and the padding.
    # Which outside value? Each padding voxel takes the value of its nearest grid voxel a,
    # mirrored around the level when that voxel is inside:
    #   pad = min(a, 2 level - a)   (<= level, so outside)
    # An inside border voxel a then gets its crossing at t = (a - level) / (2 (a - level)) = 1/2,
    # exactly half-way to the padding centre, i.e. exactly on the grid border +-1: a shape that
    # touches the border is cut by the box [-1, 1]^3, whatever the size of its values there
    # (a single constant pad value would pull the surface inwards where a logit is only weakly
    # positive). An outside border voxel keeps its value: no crossing, nothing changes.
    P = torch.nn.functional.pad(vals[None, None], (1, 1, 1, 1, 1, 1), mode="replicate")[0, 0]  # (R+2, R+2, R+2)
    P = torch.minimum(P, 2.0 * level - P)  # (R+2, R+2, R+2), now every voxel is outside
    P[1:-1, 1:-1, 1:-1] = vals  # put the real grid back in the middle
    # Padded voxel index a has original index a - 1, so its centre is
    # x(a) = -1 + (2 (a - 1) + 1) / R = -1 + (2 a - 1) / R.
    inside = P > level  # (R+2, R+2, R+2) bool

    # ---- Step 2: one vertex per crossed cell ------------------------------------------------
    # Cell (a, b, c) is the cube with corners at padded voxels (a..a+1, b..b+1, c..c+1), so
    # there are (R+1)^3 cells. Count the inside corners of every cell with 8 shifted views.
    n_in = torch.zeros(R + 1, R + 1, R + 1, dtype=torch.uint8, device=device)  # (R+1, R+1, R+1)
    for dx, dy, dz in CELL_CORNERS.tolist():  # 8 shifts, not a loop over voxels
        n_in += inside[dx:dx + R + 1, dy:dy + R + 1, dz:dz + R + 1].to(torch.uint8)
    # A cell is crossed by the surface iff its corners are mixed: 0 < (#inside corners) < 8.
    # Why ONE vertex per cell: the surface passes through the cell as (usually) one small,
    # nearly flat patch; one point on that patch is enough to represent it, and the quads of
    # step 3 will stitch the points of neighbouring cells together.
    active = (n_in > 0) & (n_in < 8)  # (R+1, R+1, R+1) bool
    cells = active.nonzero()  # (V, 3) int64, cell indices (a, b, c), in row-major order
    V = cells.shape[0]
    # Lookup table cell -> vertex number (-1 for cells without a vertex).
    vert_id = torch.full((R + 1, R + 1, R + 1), -1, dtype=torch.int64, device=device)  # (R+1,)*3
    vert_id[active] = torch.arange(V, device=device)

    # Values at the 8 corners of every crossed cell.
    corners = CELL_CORNERS.to(device)  # (8, 3)
    idx = cells[:, None, :] + corners[None, :, :]  # (V, 8, 3) padded voxel indices
    cv = P[idx[..., 0], idx[..., 1], idx[..., 2]]  # (V, 8)
    # The two ends of each of the 12 cell edges.
    edges = CELL_EDGES.to(device)  # (12, 2)
    va, vb = cv[:, edges[:, 0]], cv[:, edges[:, 1]]  # (V, 12) each
    # An edge is crossed when its ends are on different sides of the level.
    crossed = (va > level) != (vb > level)  # (V, 12) bool
    # Linear interpolation along the edge: value(t) = va + t (vb - va) = level
    #   =>  t = (level - va) / (vb - va), in [0, 1] on a crossed edge (vb != va there).
    denom = torch.where(crossed, vb - va, torch.ones_like(va))  # (V, 12), safe where not crossed
    t = ((level - va) / denom).clamp(0.0, 1.0)  # (V, 12)
    # Crossing point in cell-local coordinates (corner offsets are 0/1 in each axis):
    #   q = c_a + t (c_b - c_a)
    ca = corners[edges[:, 0]].to(cv.dtype)  # (12, 3)
    cb = corners[edges[:, 1]].to(cv.dtype)  # (12, 3)
    q = ca[None] + t[..., None] * (cb - ca)[None]  # (V, 12, 3)
    # Vertex = mean of the crossing points of the cell's crossed edges:
    #   local = sum_e crossed_e q_e / sum_e crossed_e   (>= 2 crossed edges in a mixed cell)
    w = crossed.to(cv.dtype)  # (V, 12)
    local = (w[..., None] * q).sum(1) / w.sum(1, keepdim=True)  # (V, 3), in [0, 1]^3
    # Back to world coordinates: padded index u (possibly fractional) sits at
    #   x = -1 + (2 u - 1) / R,  with u = cell index + local offset.
    verts = (-1.0 + (2.0 * (cells.to(cv.dtype) + local) - 1.0) / R).to(torch.float32)  # (V, 3)

    # ---- Step 3: one quad per crossed grid edge ---------------------------------------------
    # Why quads per EDGE: the surface separates inside voxels from outside voxels, so it must
    # cut every grid edge whose two ends differ, exactly once. The dual of that cut is a small
    # square around the edge, made of the 4 cells that share the edge; their 4 vertices form
    # the quad. Two quads of neighbouring crossed edges share the vertices of the cells they
    # have in common, so the quads glue into one surface with no gaps.
    faces = []
    for d in range(3):  # loop over the 3 axes, not over voxels
        # The two other axes, in cyclic order, so that e_d1 x e_d2 = +e_d.
        d1, d2 = (d + 1) % 3, (d + 2) % 3
        # Grid edges along axis d: from voxel u to voxel u + e_d. A crossed one has different sides.
        lo = inside.narrow(d, 0, R + 1)  # (R+2, R+2, R+2) with R+1 along d
        hi = inside.narrow(d, 1, R + 1)
        u = (lo != hi).nonzero()  # (K, 3) padded index of the lower end of each crossed edge
        # A crossed edge never has both ends in the padding (the padding is all outside), so
        # along d1 and d2 its index lies in [1, R] and the 4 cells around it exist:
        #   c00 = u - e_d1 - e_d2, c10 = u - e_d2, c11 = u, c01 = u - e_d1
        # (cell u - e_d1 lies on the low side of the edge along d1, cell u on the high side).
        e1 = torch.zeros(3, dtype=torch.int64, device=device)
        e1[d1] = 1
        e2 = torch.zeros(3, dtype=torch.int64, device=device)
        e2[d2] = 1
        c00, c10, c11, c01 = u - e1 - e2, u - e2, u, u - e1  # (K, 3) each

        def vid(c):
            return vert_id[c[:, 0], c[:, 1], c[:, 2]]  # (K,)

        q00, q10, q11, q01 = vid(c00), vid(c10), vid(c11), vid(c01)  # (K,) each
        # In the (d1, d2) plane the loop c00 -> c10 -> c11 -> c01 visits (0,0), (1,0), (1,1),
        # (0,1): counter-clockwise, so by the right-hand rule its normal is e_d1 x e_d2 = +e_d.
        # Orientation: the normal must point from inside to outside. If the lower end u is
        # inside, outside is towards +e_d: keep the loop; otherwise reverse it (swap 10 and 01).
        lower_in = lo[u[:, 0], u[:, 1], u[:, 2]]  # (K,) bool
        qa = torch.where(lower_in, q10, q01)  # (K,)
        qb = torch.where(lower_in, q01, q10)  # (K,)
        # Split the quad (q00, qa, q11, qb) along its diagonal q00-q11 into 2 triangles that
        # keep the loop's orientation.
        faces.append(torch.stack([q00, qa, q11], 1))  # (K, 3)
        faces.append(torch.stack([q00, q11, qb], 1))  # (K, 3)
    faces = torch.cat(faces, 0)  # (F, 3) int64
    return verts, faces


# ----------------------------------------------------------------------------------------
# Measuring meshes
# ----------------------------------------------------------------------------------------
def _triangles(verts, faces):
    """Corner positions of every face: three (F, 3) tensors v0, v1, v2."""
    return verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]


def triangle_areas(verts, faces):
    """Area of each triangle, (F,): |(v1 - v0) x (v2 - v0)| / 2."""
    v0, v1, v2 = _triangles(verts, faces)  # (F, 3) each
    # area = |(v1 - v0) x (v2 - v0)| / 2
    return 0.5 * torch.linalg.cross(v1 - v0, v2 - v0).norm(dim=-1)


def mesh_area(verts, faces):
    """Total surface area of a triangle mesh. verts (V, 3), faces (F, 3) -> scalar tensor."""
    return triangle_areas(verts, faces).sum()


def mesh_volume(verts, faces):
    """Signed volume enclosed by a closed triangle mesh. verts (V, 3), faces (F, 3) -> scalar.

    Divergence theorem with the field p / 3 (divergence 1): the volume is the sum over faces of
    the signed volumes of the tetrahedra (origin, v0, v1, v2),
        vol = sum_f det[v0, v1, v2] / 6 = sum_f v0 . (v1 x v2) / 6,
    positive when the faces are oriented with outward normals (the origin need not be inside:
    the tetrahedra outside the shape cancel in pairs).
    """
    v0, v1, v2 = _triangles(verts, faces)  # (F, 3) each
    # det[v0, v1, v2] = v0 . (v1 x v2)
    det = (v0 * torch.linalg.cross(v1, v2)).sum(-1)  # (F,)
    return det.sum() / 6.0


# ----------------------------------------------------------------------------------------
# Sampling points on the surface
# ----------------------------------------------------------------------------------------
def sample_mesh_surface(verts, faces, n, generator=None):
    """n points uniformly distributed on the surface of a triangle mesh.

    Inputs: verts (V, 3), faces (F, 3) with F >= 1, n number of points, optional torch.Generator
    (on the device of verts). Output: (n, 3) points, dtype and device of verts.

    Two steps: (1) pick a face with probability area_f / total area (big triangles hold more of
    the surface); (2) pick a uniform point in that triangle with barycentric coordinates
        s = sqrt(r1), p = (1 - s) v0 + s (1 - r2) v1 + s r2 v2,   r1, r2 ~ U(0, 1).
    Why the square root: s is the distance fraction from v0 towards the opposite side, and the
    length of the slice of the triangle at fraction s grows like s, so its density must be 2 s,
    whose inverse CDF is sqrt(r1). Without it, points would bunch up near v0.
    """
    assert faces.shape[0] > 0, "cannot sample an empty mesh"
    device = verts.device
    areas = triangle_areas(verts, faces)  # (F,)
    # Face index per point, P(f) = area_f / sum(area).
    f = torch.multinomial(areas.double(), n, replacement=True, generator=generator)  # (n,)
    r1 = torch.rand(n, 1, generator=generator, device=device, dtype=verts.dtype)  # (n, 1)
    r2 = torch.rand(n, 1, generator=generator, device=device, dtype=verts.dtype)  # (n, 1)
    s = r1.sqrt()  # (n, 1)
    v0, v1, v2 = _triangles(verts, faces[f])  # (n, 3) each
    # p = (1 - s) v0 + s (1 - r2) v1 + s r2 v2
    return (1.0 - s) * v0 + s * (1.0 - r2) * v1 + s * r2 * v2


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------
def write_obj(path, verts, faces):
    """Write a triangle mesh as a Wavefront OBJ file: "v x y z" lines, then "f a b c" (1-based).

    verts (V, 3), faces (F, 3) (tensors or arrays, any device). The file is first written to
    path + ".tmp" and then renamed onto path, so a reader never sees a half-written file.
    Coordinates are written with 9 significant digits, enough to read back float32 exactly.
    """
    v = np.asarray(torch.as_tensor(verts).detach().cpu(), dtype=np.float64).reshape(-1, 3)  # (V, 3)
    f = np.asarray(torch.as_tensor(faces).detach().cpu(), dtype=np.int64).reshape(-1, 3)  # (F, 3)
    tmp = str(path) + ".tmp"
    try:
        with open(tmp, "w") as fh:
            np.savetxt(fh, v, fmt="v %.9g %.9g %.9g")
            # OBJ indices start at 1.
            np.savetxt(fh, f + 1, fmt="f %d %d %d")
        os.replace(tmp, path)
    except OSError:  # a full disk: no partial file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise



# ========================================================================================
# Point-cloud metrics: Chamfer distance, MMD, COV, 1-NNA
# ========================================================================================
# A generative model of shapes is judged by comparing a set of generated point clouds with a set
# of reference (test-set) point clouds. Achlioptas et al. (ICML 2018, "Learning representations
# and generative models for 3D point clouds") proposed MMD and COV; PointFlow (Yang et al.,
# ICCV 2019) added 1-NNA; DDMI reports the three of them. All three only need a distance between
# two clouds; here it is the Chamfer distance (CD):
#
#   * MMD-CD  (minimum matching distance, lower is better): for every reference shape, the CD to
#     the closest generated shape, averaged over the references. Measures fidelity: are the
#     references well matched by something the model made?
#   * COV-CD  (coverage, higher is better, at most 1): the fraction of reference shapes that are
#     the nearest reference of at least one generated shape. Measures diversity: a model that
#     collapses onto a few shapes covers few references.
#   * 1-NNA-CD (1-nearest-neighbour accuracy, closer to 0.5 is better): put both sets together,
#     label every shape by the set it came from, and classify each shape by the label of its
#     nearest OTHER shape (leave one out). If the two sets come from the same distribution the
#     classifier guesses (0.5); 1.0 means the sets are trivially separable. Values below 0.5
#     happen too (every shape's nearest neighbour lies in the other set, e.g. gen == ref gives 0).
#
# Papers print these in rescaled units (PointFlow/DDMI: MMD-CD x 10^3, COV and 1-NNA in %);
# the functions here return the raw numbers.
#
# No normalisation is done here: clouds are compared in the coordinates they are given, so the
# generated and reference sets must already live in one common frame (same centring and scale).
#
# Shape letters: B batch of cloud pairs, N M points per cloud, n m numbers of clouds in a set.
# ----------------------------------------------------------------------------------------
# Chamfer distance between batches of clouds
# ----------------------------------------------------------------------------------------
def chamfer(a, b, chunk=512):
    """Chamfer distance between paired clouds.

    a: (B, N, 3), b: (B, M, 3), same device and dtype. Returns (B,): CD(a[i], b[i]).

    Convention (the one of PointFlow's evaluation code): SQUARED Euclidean distances, and the
    SUM of the two directed means (not their average, no square root):
        CD(a, b) = mean_{p in a} min_{q in b} |p - q|^2 + mean_{q in b} min_{p in a} |p - q|^2

    The points of a are processed `chunk` at a time, so the largest temporary is one
    (B, chunk, M) block of squared distances: B * chunk * M * itemsize bytes
    (e.g. B=32, chunk=512, M=2048, float32 -> 128 MiB). Differentiable w.r.t. a and b.
    """
    B, N, _ = a.shape
    M = b.shape[1]
    # |q|^2 for every point of b: (B, M)
    qq = (b * b).sum(-1)
    # running min over the points of a, for every point of b (direction b -> a): (B, M)
    min_b_to_a = torch.full((B, M), float("inf"), device=a.device, dtype=a.dtype)
    # sum over the points of a of their nearest squared distance in b (direction a -> b): (B,)
    sum_a_to_b = torch.zeros(B, device=a.device, dtype=a.dtype)
    for start in range(0, N, chunk):
        p = a[:, start:start + chunk]                              # (B, n_c, 3)
        pp = (p * p).sum(-1)                                       # (B, n_c)
        # |p - q|^2 = |p|^2 + |q|^2 - 2 p.q, built in place on the bmm output so only one
        # (B, n_c, M) block exists; clamped at 0 because rounding can make it slightly negative
        d = torch.bmm(p, b.transpose(1, 2))                        # (B, n_c, M): p.q
        d = d.mul_(-2).add_(pp[:, :, None]).add_(qq[:, None, :]).clamp_(min=0)
        # a -> b: min over q of |p - q|^2, summed over this chunk's points p
        sum_a_to_b = sum_a_to_b + d.min(dim=2).values.sum(dim=1)
        # b -> a: min over p, merged with the chunks seen so far
        min_b_to_a = torch.minimum(min_b_to_a, d.min(dim=1).values)
    # CD = mean_p min_q |p-q|^2 + mean_q min_p |p-q|^2
    return sum_a_to_b / N + min_b_to_a.mean(dim=1)


@torch.no_grad()
def pairwise_chamfer(X, Y, batch=32, chunk=512):
    """All-pairs Chamfer distance between two sets of clouds.

    X: (n, N, 3), Y: (m, M, 3). Returns D: (n, m) with D[i, j] = chamfer(X[i], Y[j]).

    The n*m pairs are enumerated row-major and handled `batch` pairs at a time. Peak memory,
    beyond the inputs and D itself: the gathered clouds (2 * batch * max(N, M) * 3 values)
    plus one (batch, chunk, M) block of squared distances inside `chamfer`, i.e. about
    batch * chunk * M * itemsize bytes (defaults, M=2048, float32: 32*512*2048*4 = 128 MiB),
    independent of n and m.
    """
    n, m = X.shape[0], Y.shape[0]
    D = torch.empty(n * m, device=X.device, dtype=X.dtype)         # (n*m,), viewed as (n, m) at the end
    for start in range(0, n * m, batch):
        # flat pair index k -> (row i = k // m, column j = k % m)
        k = torch.arange(start, min(start + batch, n * m), device=X.device)  # (B,)
        D[start:start + k.numel()] = chamfer(X[k // m], Y[k % m], chunk=chunk)
    return D.view(n, m)


# ----------------------------------------------------------------------------------------
# MMD, COV and 1-NNA
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def mmd_cov_1nna(gen, ref, batch=32, chunk=512):
    """MMD-CD, COV-CD and 1-NNA-CD of a generated set against a reference set.

    gen: (n_g, N, 3) generated clouds; ref: (n_r, N, 3) reference clouds. No normalisation is
    applied: both sets are compared in the coordinates they are given, so they must share one
    frame. Returns dict of Python floats (raw values, not x10^3 or %):
      mmd: mean over reference shapes of the CD to their nearest generated shape.
           Fidelity; LOWER is better (0 when every reference has an exact copy in gen).
      cov: fraction of reference shapes that are the nearest reference of at least one
           generated shape. Diversity; HIGHER is better (1.0 at most; 1/n_r when all
           generated shapes pick the same reference).
      nna: leave-one-out accuracy of the 1-nearest-neighbour classifier on gen U ref (each
           shape labelled by its set, classified by its nearest other shape).
           CLOSER TO 0.5 is better; 1.0 = the sets are trivially separable.
    Ties in a nearest-neighbour search go to the lowest index (gen before ref in the union).
    The three CD matrices (gen-ref, gen-gen, ref-ref) are each built once.
    """
    n_g, n_r = gen.shape[0], ref.shape[0]
    d_gr = pairwise_chamfer(gen, ref, batch, chunk)                # (n_g, n_r)
    d_gg = pairwise_chamfer(gen, gen, batch, chunk)                # (n_g, n_g)
    d_rr = pairwise_chamfer(ref, ref, batch, chunk)                # (n_r, n_r)

    # MMD = mean_{r in ref} min_{g in gen} CD(g, r)
    mmd = d_gr.min(dim=0).values.mean()

    # COV = |{ argmin_{r in ref} CD(g, r) : g in gen }| / n_r
    nearest_ref = d_gr.argmin(dim=1)                               # (n_g,)
    cov = torch.unique(nearest_ref).numel() / n_r

    # 1-NNA: distance matrix of the union (gen first, then ref): (n_g + n_r, n_g + n_r)
    d_all = torch.cat([torch.cat([d_gg, d_gr], dim=1),
                       torch.cat([d_gr.t(), d_rr], dim=1)], dim=0)
    # leave one out: a shape may not be its own neighbour
    d_all.fill_diagonal_(float("inf"))
    # label 1 = generated, 0 = reference: (n_g + n_r,)
    label = torch.cat([torch.ones(n_g, device=gen.device), torch.zeros(n_r, device=gen.device)])
    # each shape gets the label of its nearest other shape
    predicted = label[d_all.argmin(dim=1)]                         # (n_g + n_r,)
    # accuracy = mean over the union of [predicted label == true label]
    nna = (predicted == label).float().mean()

    return dict(mmd=mmd.item(), cov=float(cov), nna=nna.item())



# ----------------------------------------------------------------------------------------
# Demo: a torus as a mesh (area and volume against the formulas) and as points (Chamfer)
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R_major, r_minor, R = 0.55, 0.25, 64

    def torus_logits(p):
        """A torus around the y axis as an occupancy logit: r - distance to its core circle, (B, N)."""
        ring = torch.stack([p[..., [0, 2]].norm(dim=-1) - R_major, p[..., 1]], -1)  # (B, N, 2)
        return (r_minor - ring.norm(dim=-1)) * 20

    c = -1 + (2 * torch.arange(R) + 1) / R  # voxel centres
    grid = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)  # (R, R, R, 3)
    verts, faces = extract_mesh(torus_logits(grid[None])[0])
    area, volume = mesh_area(verts, faces), mesh_volume(verts, faces)
    print(f"surface nets at {R}^3: {len(verts)} vertices, {len(faces)} faces; area {area:.4f} "
          f"(exact 4 pi^2 R r = {4 * math.pi ** 2 * R_major * r_minor:.4f}), volume {volume:.4f} "
          f"(exact 2 pi^2 R r^2 = {2 * math.pi ** 2 * R_major * r_minor ** 2:.4f})")
    os.makedirs("out", exist_ok=True)
    write_obj("out/07_torus.obj", verts, faces)
    # points on the mesh against points on the exact torus. Two independent samples of one
    # surface are not the same points, so the floor is the distance between two exact samples.
    g = torch.Generator().manual_seed(0)

    def torus_points(n):
        """n points uniform on the exact torus: (u, v) uniform, kept with probability ~ (R + r cos v)."""
        u, v = 2 * math.pi * torch.rand(2, 4 * n, generator=g)
        keep = torch.multinomial(R_major + r_minor * torch.cos(v), n, generator=g)  # area element ~ R + r cos v
        u, v = u[keep], v[keep]
        return torch.stack([(R_major + r_minor * torch.cos(v)) * torch.cos(u), r_minor * torch.sin(v),
                            (R_major + r_minor * torch.cos(v)) * torch.sin(u)], -1)[None]  # (1, n, 3)

    exact, exact2, on_mesh = torus_points(2048), torus_points(2048), sample_mesh_surface(verts, faces, 2048, g)[None]
    print(f"Chamfer distance (2048 points each): mesh vs exact torus {chamfer(on_mesh, exact).item():.2e}; "
          f"exact vs exact (the sampling floor) {chamfer(exact2, exact).item():.2e}; "
          f"exact vs the torus moved by 0.1 {chamfer(exact2 + torch.tensor([0.1, 0, 0]), exact).item():.2e}")
    fig = plt.figure(figsize=(5, 4.5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_trisurf(*verts.T.numpy(), triangles=faces.numpy(), color="0.8", edgecolor="0.3", linewidth=0.1)
    ax.set(xlim=(-1, 1), ylim=(-1, 1), zlim=(-1, 1), title=f"surface nets at {R}^3: {len(faces)} triangles")
    fig.savefig("out/07_geometry.png", dpi=100)
    print("wrote out/07_torus.obj and out/07_geometry.png")
