"""06 - Geometry: looking at and measuring generated 3D shapes.

The concept
-----------
File 05's shape modality makes occupancy functions: a tri-plane INR that gives a logit
(> 0 inside) at any point of [-1, 1]^3. Three tools turn such a function into something a
person or a paper can use, all written from scratch here:

  1. a mesh (naive surface nets on a grid of logits) written as a Wavefront .obj, and
     uniform points sampled on its surface;
  2. a shaded picture by ray marching the function itself (no mesh needed), used by the
     sample sheets of train.py and sample.py;
  3. the metrics of 3D generative models (Achlioptas et al. 2018; PointFlow): Chamfer
     distance between point clouds, and MMD / COV / 1-NNA between a generated set and a
     reference set.

Each section opens with its own derivation. Conventions are the project's: coordinates
in [-1, 1]^3, x first; grid value[i, j, k] sits at the voxel centre
(-1 + (2i+1)/R, -1 + (2j+1)/R, -1 + (2k+1)/R); a value above the level means inside.

Shape letters: B batch, N M points, R grid resolution (or rays, in the ray marcher),
V vertices, F faces, H W image height and width, n m numbers of clouds in a set.

Left out on purpose: marching cubes (its 256-case table; surface nets needs none),
mesh smoothing and decimation, and the EMD-based variants of MMD/COV (EMD needs an
approximate optimal-transport solver; the Chamfer versions are the ones DDMI reports).
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
# Conventions: coordinates in [-1, 1]^3, x first; grid value[i, j, k] sits at the voxel centre
# (-1 + (2i+1)/R, -1 + (2j+1)/R, -1 + (2k+1)/R); value > level means inside.
# Shape letters: R grid resolution, V vertices, F faces, N sampled points, K crossing grid edges.
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
    with open(tmp, "w") as fh:
        np.savetxt(fh, v, fmt="v %.9g %.9g %.9g")
        # OBJ indices start at 1.
        np.savetxt(fh, f + 1, fmt="f %d %d %d")
    os.replace(tmp, path)


# ========================================================================================
# Ray-marched previews of occupancy fields
# ========================================================================================
# A generated 3D shape is an occupancy field: a function f(p) of a point p in [-1, 1]^3 whose
# value is a logit, > 0 inside the shape and < 0 outside. To look at it we do not need a mesh:
# for every pixel we shoot a ray from a pinhole camera and walk along it until f turns positive.
#
#   1. Camera. `look_at` builds the camera-to-world matrix of a camera at `eye` looking at
#      `target`; `camera_rays` turns every pixel into a ray (origin, unit direction). OpenGL
#      convention: in camera space the camera looks down its -z axis, +x is right and +y is
#      up in the image (so image row 0, the top row, has the largest y).
#   2. Where to march. A ray o + t d can only meet the shape inside the cube [-1, 1]^3; the
#      slab method gives the interval [t_near, t_far] where it is inside the cube.
#   3. March. `steps` evenly spaced samples from t_near to t_far (both included); the first
#      sample with f > 0 is a hit. Between the last outside sample (f <= 0) and the first
#      inside one (f > 0) the surface f = 0 is bracketed; `refine` bisection steps shrink the
#      bracket by 2^refine, and a final linear interpolation of the two bracketing logits
#      (the secant, or "regula falsi", step) places the crossing inside the small bracket.
#   4. Normal. The logit grows inwards, so the outward surface normal is
#         n = -grad f / |grad f|,
#      with grad f from central finite differences, eps = 1/64 (half a voxel of a 64^3 grid).
#   5. Shading (Lambert): colour = albedo * (ambient + diffuse * max(0, n . l)) with a fixed
#      world light direction l; rays that miss the shape are white background. The image is
#      returned in the project's range [-1, 1] (value = 2 * colour - 1).
#
# World "up" is +y: `render_occupancy` orbits the camera around the y axis (azimuth, measured
# from +z towards +x) and raises it by the elevation angle towards +y. A caller whose shapes
# have +z as up can permute the axes of the points inside its field callable.
#
# The field is a neural network in practice, so all its calls happen under torch.no_grad()
# and on at most `chunk` points at a time; everything else is vectorised over rays and over
# the batch (Python loops only over ray blocks, march steps, bisection steps and chunks).
#
# Shape letters: B batch (one field per item), R rays (pixels, H * W), N points, S march
# steps, H W image height and width.
# Default camera: a 3/4 view from above. From there the 8 corners of the cube [-1, 1]^3
# project to x in [-0.52, 0.52], y in [-0.64, 0.40] (camera-plane units, tan of the angle; the
# near bottom corner is closest to the camera, hence the asymmetry). A fov of 68 deg
# (tan(34 deg) = 0.67) shows the whole cube: it spans 78% of the width and 77% of the height,
# its lowest corner 6% of the half-height above the bottom edge.
AZIMUTH_DEG = 45.0
ELEVATION_DEG = 30.0
DISTANCE = 3.2
FOV_DEG = 68.0

# Shading constants (colours in [0, 1] before mapping to [-1, 1]).
ALBEDO = 0.8  # light grey
AMBIENT = 0.3
DIFFUSE = 0.7
# Fixed world-space light direction (unit vector towards the light): above (+y), a bit
# right (+x) and front (+z) of the shape, so the three faces of a cube seen from the default
# view get three different shades.
LIGHT_DIR = (0.4, 1.0, 0.7)
BACKGROUND = 1.0  # white

# Half a voxel of a 64^3 grid (a voxel is 2 / 64 wide): the finite-difference step.
NORMAL_EPS = 1.0 / 64


# ----------------------------------------------------------------------------------------
# Camera
# ----------------------------------------------------------------------------------------
def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
    """Camera-to-world matrix (4, 4) of a camera at `eye` looking at `target` (OpenGL).

    eye, target, up: 3-vectors (tuples or tensors), or tensors (..., 3) for many cameras at
    once (they broadcast; the result is then (..., 4, 4)). Columns of the result: camera x
    (right), camera y (up in the image), camera z (pointing backwards: the camera looks down -z)
    and the eye position; last row (0, 0, 0, 1). If `up` is parallel to the viewing direction a
    different up vector is used (looking straight down or up).
    """
    device = eye.device if torch.is_tensor(eye) else None
    eye = torch.as_tensor(eye, dtype=torch.float32, device=device)  # (..., 3)
    target = torch.as_tensor(target, dtype=torch.float32, device=eye.device)
    up = torch.as_tensor(up, dtype=torch.float32, device=eye.device)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    # forward = (target - eye) / |target - eye|: where the camera looks (its -z axis).
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True)
    # right = forward x up / |forward x up| (camera +x); where up is parallel to forward, another
    # up vector: -z, or +x if that is parallel too.
    right = torch.linalg.cross(forward, up)
    for alt in ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0)):
        other = torch.linalg.cross(forward, torch.tensor(alt, device=eye.device).expand_as(forward))
        right = torch.where(right.norm(dim=-1, keepdim=True) < 1e-6, other, right)
    right = right / right.norm(dim=-1, keepdim=True)
    # true_up = right x forward (camera +y), orthogonal to both by construction.
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, device=eye.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = true_up
    # The camera looks down -z, so its +z axis is -forward.
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_eye(azimuth_deg, elevation_deg, distance):
    """Camera position (3,) on a sphere of radius `distance` around the origin, world +y up.

    azimuth: angle around the y axis, 0 = on the +z axis, 90 = on the +x axis;
    elevation: angle above the xz plane (towards +y).
    """
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    # eye = distance * (cos(el) sin(az), sin(el), cos(el) cos(az))
    return torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)]) * distance


def focal_from_fov(width, fov_deg):
    """Focal length in pixels of a pinhole camera whose horizontal field of view is fov_deg."""
    # Half the image width sees half the fov: (W / 2) / focal = tan(fov / 2).
    return 0.5 * width / math.tan(math.radians(fov_deg) / 2)


def camera_rays(height, width, c2w, focal):
    """World-space rays through every pixel centre of a pinhole camera (OpenGL convention).

    height, width: image size; c2w: (4, 4) camera-to-world; focal: focal length in pixels
    (same for x and y, principal point at the image centre).
    Returns origins (H*W, 3) and unit directions (H*W, 3), pixels in row-major order
    (index = row * W + column); row 0 is the top of the image.
    """
    device = c2w.device
    # Pixel centres: column u + 0.5, row v + 0.5.
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                          torch.arange(width, device=device, dtype=torch.float32) + 0.5,
                          indexing="ij")  # (H, W) each
    # Camera-space direction: x = (u - W/2) / f (right), y = -(v - H/2) / f (rows go down,
    # camera y goes up), z = -1 (the camera looks down -z).
    x = (u - width / 2) / focal
    y = -(v - height / 2) / focal
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], -1).reshape(-1, 3)  # (H*W, 3)
    # World direction d = R_c2w d_cam (rotation part only), then normalised.
    dirs = dirs_cam @ c2w[:3, :3].T  # (H*W, 3)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    # Every ray starts at the camera centre.
    origins = c2w[:3, 3].expand_as(dirs).clone()  # (H*W, 3)
    return origins, dirs


def ray_box(origins, dirs):
    """Slab-method intersection of rays with the cube [-1, 1]^3.

    origins, dirs: (R, 3). Returns t_near (R,), t_far (R,) (t_near clipped at 0, so a camera
    inside the cube starts at itself) and hit (R,) bool: the ray crosses the cube in front of
    the origin.
    """
    # Avoid 0 / 0: a direction component of (almost) 0 becomes 1e-12 (the slab is then [-inf, inf]
    # or empty, as it should be; min/max below do not care about the sign).
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)  # (R, 3)
    # Per axis, the ray is between the two planes x = -1 and x = +1 for t in [t1, t2]:
    # t = (plane - o) / d.
    t1 = (-1.0 - origins) / safe  # (R, 3)
    t2 = (1.0 - origins) / safe  # (R, 3)
    # Inside the cube = inside all three slabs: the latest entry and the earliest exit.
    t_near = torch.minimum(t1, t2).amax(-1).clamp(min=0.0)  # (R,)
    t_far = torch.maximum(t1, t2).amin(-1)  # (R,)
    return t_near, t_far, t_far > t_near


# ----------------------------------------------------------------------------------------
# Querying the field
# ----------------------------------------------------------------------------------------
def query_field(field, points, chunk):
    """Logits of `field` at points (B, N, 3) -> (B, N), at most max(B, chunk) points per call.

    The field is called on slices (B, n, 3) of the points with n = max(1, chunk // B), so
    each call sees B * n <= chunk points (if chunk < B, one point per item: B points).
    Points are clamped to [-1, 1] (samples on the cube's faces may be off by rounding).
    """
    B, N = points.shape[:2]
    per_call = max(1, chunk // B)
    points = points.clamp(-1.0, 1.0)
    with torch.no_grad():
        out = [field(points[:, s:s + per_call]).reshape(B, -1).float()
               for s in range(0, N, per_call)]  # each (B, n)
    return torch.cat(out, 1)  # (B, N)


def field_normals(field, points, chunk, eps=NORMAL_EPS):
    """Outward unit normals (B, N, 3) of the logit field at points (B, N, 3).

    n = -grad f / |grad f| with central differences
        df/dx_i ~= (f(p + eps e_i) - f(p - eps e_i)) / (2 eps).
    The stencil centre is moved inside [-1 + eps, 1 - eps]^3 so all 6 probes stay in the cube.
    """
    B, N = points.shape[:2]
    centre = points.clamp(-1.0 + eps, 1.0 - eps)  # (B, N, 3)
    # Offsets +eps e_x, -eps e_x, +eps e_y, -eps e_y, +eps e_z, -eps e_z.
    eye3 = torch.eye(3, device=points.device)  # (3, 3)
    offsets = torch.stack([eye3, -eye3], 1).reshape(6, 3) * eps  # (6, 3)
    probes = (centre[:, :, None, :] + offsets).reshape(B, N * 6, 3)  # (B, N*6, 3)
    f = query_field(field, probes, chunk).reshape(B, N, 3, 2)  # (B, N, 3 axes, +/-)
    # grad_i = (f(p + eps e_i) - f(p - eps e_i)) / (2 eps)
    grad = (f[..., 0] - f[..., 1]) / (2 * eps)  # (B, N, 3)
    # n = -grad / |grad| (logits increase inwards, the normal points out).
    return -grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _field_device(field):
    """Device of a field's parameters if it is an nn.Module with parameters, else CPU."""
    try:
        return next(field.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------------------
# Ray marching
# ----------------------------------------------------------------------------------------
def march_rays(field, batch, origins, dirs, steps=128, refine=6, chunk=65536):
    """First surface crossing (f goes from <= 0 to > 0) of every ray, for every batch item.

    field: callable (B, N, 3) -> logits (B, N); batch: B; origins, dirs: (R, 3) rays shared
    by the B items (unit directions). Returns a dict:
      "hit" (B, R) bool, "t" (B, R) ray parameter of the surface (t_far where no hit),
      "points" (B, R, 3) surface points o + t d, "normals" (B, R, 3) outward unit normals
      (zeros where no hit).
    Rays are processed in blocks of max(1, chunk // B) rays so each field call sees at most
    `chunk` points; within a block, loops run over the `steps` samples and `refine` bisections.
    """
    R = origins.shape[0]
    device = origins.device
    hit = torch.zeros(batch, R, dtype=torch.bool, device=device)  # (B, R)
    t_hit = torch.zeros(batch, R, device=device)  # (B, R)
    normals = torch.zeros(batch, R, 3, device=device)  # (B, R, 3)

    t_near, t_far, in_box = ray_box(origins, dirs)  # (R,), (R,), (R,)
    t_hit[:] = t_far
    # Only rays that cross the cube can hit anything; the camera is shared, so this set is the
    # same for every batch item.
    box_idx = in_box.nonzero().squeeze(1)  # (R_box,)
    block = max(1, chunk // batch)
    for s in range(0, box_idx.numel(), block):
        idx = box_idx[s:s + block]  # (n,) rays of this block
        o, d = origins[idx], dirs[idx]  # (n, 3)
        tn, tf = t_near[idx], t_far[idx]  # (n,)
        n = idx.numel()

        # --- March: t_k = t_near + k / (S - 1) * (t_far - t_near), k = 0 .. S - 1. ---
        found = torch.zeros(batch, n, dtype=torch.bool, device=device)  # (B, n)
        # Bracket [t_lo, t_hi] of the crossing and its logits (f_lo <= 0 < f_hi).
        t_lo = tf.expand(batch, n).clone()  # (B, n)
        t_hi = t_lo.clone()  # (B, n)
        f_lo = torch.zeros(batch, n, device=device)  # (B, n)
        f_hi = torch.zeros(batch, n, device=device)  # (B, n)
        t_prev = f_prev = None
        for k in range(steps):
            t_k = tn + (tf - tn) * (k / max(steps - 1, 1))  # (n,)
            pts = (o + t_k[:, None] * d).expand(batch, n, 3)  # (B, n, 3)
            f_k = query_field(field, pts, chunk)  # (B, n)
            new = (~found) & (f_k > 0)  # (B, n) first inside sample of the ray
            t_kb = t_k.expand(batch, n)  # (B, n)
            t_hi = torch.where(new, t_kb, t_hi)
            f_hi = torch.where(new, f_k, f_hi)
            if k == 0:
                # Inside already at the cube's entry: the crossing is at t_near itself
                # (an empty bracket lo = hi; the bisection below leaves it there).
                t_lo = torch.where(new, t_kb, t_lo)
                f_lo = torch.where(new, f_k, f_lo)
            else:
                t_lo = torch.where(new, t_prev, t_lo)
                f_lo = torch.where(new, f_prev, f_lo)
            found = found | new
            t_prev, f_prev = t_kb, f_k
            if bool(found.all()):  # every ray of the block has hit: no need to go further
                break

        # --- Bisection: keep the half of [t_lo, t_hi] where the sign changes. ---
        for _ in range(refine):
            t_mid = (t_lo + t_hi) / 2  # (B, n)
            pts = o + t_mid[..., None] * d  # (B, n, 3)
            f_mid = query_field(field, pts, chunk)  # (B, n)
            inside = f_mid > 0  # (B, n)
            t_hi = torch.where(inside, t_mid, t_hi)
            f_hi = torch.where(inside, f_mid, f_hi)
            t_lo = torch.where(inside, t_lo, t_mid)
            f_lo = torch.where(inside, f_lo, f_mid)

        # --- Secant step inside the final bracket: f is ~linear there, so f = 0 at
        # t = t_lo + (t_hi - t_lo) * f_lo / (f_lo - f_hi). An empty bracket (hit at the
        # entry, f_lo = f_hi > 0) keeps t_lo.
        denom = f_lo - f_hi  # (B, n), < 0 for a real bracket
        w = torch.where(denom < 0, f_lo / denom.clamp(max=-1e-12), torch.zeros_like(denom))
        t_surf = t_lo + (t_hi - t_lo) * w.clamp(0.0, 1.0)  # (B, n)

        # --- Normals at the surface points. ---
        p_surf = o + t_surf[..., None] * d  # (B, n, 3)
        nrm = field_normals(field, p_surf, chunk)  # (B, n, 3)

        hit[:, idx] = found
        t_hit[:, idx] = torch.where(found, t_surf, tf.expand(batch, n))
        normals[:, idx] = torch.where(found[..., None], nrm, torch.zeros_like(nrm))

    points = origins + t_hit[..., None] * dirs  # (B, R, 3)
    return {"hit": hit, "t": t_hit, "points": points, "normals": normals}


def shade(normals, hit, light_dir=LIGHT_DIR, albedo=ALBEDO, ambient=AMBIENT, diffuse=DIFFUSE,
          background=BACKGROUND):
    """Lambert shading: normals (..., 3), hit (...) -> grey values (...) in [0, 1].

    colour = albedo * (ambient + diffuse * max(0, n . l)) on the shape, `background` elsewhere;
    l is the unit light direction (world space, pointing towards the light).
    """
    light = torch.as_tensor(light_dir, dtype=normals.dtype, device=normals.device)
    light = light / light.norm()  # (3,)
    # colour = albedo * (ambient + diffuse * max(0, n . l))
    lit = albedo * (ambient + diffuse * (normals @ light).clamp(min=0.0))  # (...)
    return torch.where(hit, lit, torch.full_like(lit, background))


def render_occupancy(field, batch, height, width, azimuth=AZIMUTH_DEG, elevation=ELEVATION_DEG,
                     distance=DISTANCE, fov_deg=FOV_DEG, steps=128, refine=6, chunk=65536,
                     light_dir=LIGHT_DIR, device=None, return_buffers=False):
    """Shaded grey preview images of B occupancy fields, (B, 3, H, W) in [-1, 1].

    field: callable, points (B, N, 3) in [-1, 1]^3 -> logits (B, N), > 0 inside (item b of
    the points is evaluated by field b). batch: B. height, width: image size.
    Camera: pinhole, horizontal field of view fov_deg, at `distance` from the origin at the
    given azimuth/elevation in degrees (world +y is up; azimuth 0 = on +z, 90 = on +x; see
    `orbit_eye`), looking at the origin. steps: samples per ray inside the cube; refine:
    bisection steps; chunk: at most this many points per field call (all calls are made under
    torch.no_grad()). light_dir: world direction towards the light. device: where rays live
    (default: the device of the field's parameters, else CPU).
    Shading: albedo * (ambient + diffuse * max(0, n . l)) on the shape, white background;
    returned as 2 * colour - 1. With return_buffers=True also returns a dict with "mask"
    (B, H, W) bool, "depth" (B, H, W) distance along the ray, "normals" (B, 3, H, W).
    """
    device = torch.device(device) if device is not None else _field_device(field)
    eye = orbit_eye(azimuth, elevation, distance).to(device)  # (3,)
    c2w = look_at(eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # (4, 4)
    origins, dirs = camera_rays(height, width, c2w, focal_from_fov(width, fov_deg))  # (H*W, 3) each
    with torch.no_grad():
        out = march_rays(field, batch, origins, dirs, steps=steps, refine=refine, chunk=chunk)
    grey = shade(out["normals"], out["hit"], light_dir=light_dir)  # (B, H*W) in [0, 1]
    # [0, 1] -> [-1, 1], three equal channels.
    img = (2 * grey - 1).reshape(batch, 1, height, width).expand(batch, 3, height, width).contiguous()
    if not return_buffers:
        return img  # (B, 3, H, W)
    buffers = {
        "mask": out["hit"].reshape(batch, height, width),  # (B, H, W)
        "depth": out["t"].reshape(batch, height, width),  # (B, H, W)
        "normals": out["normals"].reshape(batch, height, width, 3).permute(0, 3, 1, 2),  # (B, 3, H, W)
    }
    return img, buffers


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
# Demo: a torus three ways (mesh, picture, point cloud), each checked against its formula
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
    write_obj("out/06_torus.obj", verts, faces)
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
    image = render_occupancy(torus_logits, 1, 160, 160, fov_deg=40)[0]  # (3, H, W) in [-1, 1]
    plt.imsave("out/06_geometry.png", ((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
    print("wrote out/06_torus.obj and out/06_geometry.png (ray marched from the function, no mesh)")
