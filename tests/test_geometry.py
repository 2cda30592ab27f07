"""07_geometry.py (surface nets meshes, Chamfer / MMD / COV / 1-NNA) and 08_ray_marching.py (cameras,
ray-marched pictures of occupancy fields)."""
import importlib
import math
import os

import pytest
import torch

G = importlib.import_module("07_geometry")
mesh = metrics3d = G
raymarch = importlib.import_module("08_ray_marching")


# ----------------------------------------------------------------------------------------
# mesh
# ----------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------- helpers
def voxel_grid(R):
    """Voxel-centre coordinates, (R, R, R, 3), value[i, j, k] at -1 + (2 (i, j, k) + 1) / R."""
    c = -1.0 + (2.0 * torch.arange(R, dtype=torch.float64) + 1.0) / R  # (R,)
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)  # (R, R, R, 3)


def edge_stats(verts, faces):
    """Counts computed directly from the face list, independent of the extractor.

    Returns (E, every undirected edge in exactly 2 faces, every directed edge in exactly 1 face,
    Euler characteristic V - E + F).
    """
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])  # (3F, 2)
    undirected = directed.sort(dim=1).values  # (3F, 2)
    _, und_count = torch.unique(undirected, dim=0, return_counts=True)
    _, dir_count = torch.unique(directed, dim=0, return_counts=True)
    E = und_count.numel()
    return (E, bool((und_count == 2).all()), bool((dir_count == 1).all()),
            verts.shape[0] - E + faces.shape[0])


def sphere_values(R, r=0.6, centre=(0.0, 0.0, 0.0)):
    """Analytic signed distance of a sphere, positive inside: r - |p - centre|, (R, R, R)."""
    p = voxel_grid(R)
    return (r - (p - torch.tensor(centre, dtype=p.dtype)).norm(dim=-1)).float()


@pytest.fixture(scope="module")
def sphere64():
    return mesh.extract_mesh(sphere_values(64), level=0.0)


# ---------------------------------------------------------------------------- extraction
def test_sphere_watertight_oriented_genus0(sphere64):
    verts, faces = sphere64
    assert verts.dtype == torch.float32 and faces.dtype == torch.int64
    assert verts.shape[1] == 3 and faces.shape[1] == 3 and faces.shape[0] > 1000
    # Every vertex is used by some face, and no index is out of range.
    assert faces.min() >= 0 and faces.max() < verts.shape[0]
    assert torch.unique(faces).numel() == verts.shape[0]
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed, "some edge is not shared by exactly two faces"
    assert oriented, "some directed edge appears twice: inconsistent orientation"
    assert chi == 2


def test_sphere_area_volume_and_vertex_accuracy(sphere64):
    verts, faces = sphere64
    r, R = 0.6, 64
    area = mesh.mesh_area(verts, faces).item()
    vol = mesh.mesh_volume(verts, faces).item()
    assert abs(area / (4 * math.pi * r ** 2) - 1) < 0.02
    assert vol > 0
    assert abs(vol / (4 / 3 * math.pi * r ** 3) - 1) < 0.02
    # Every vertex within half a voxel (voxel size 2 / R) of the true sphere.
    assert ((verts.norm(dim=-1) - r).abs() < 0.5 * 2 / R).all()


def test_sphere_face_normals_point_outward(sphere64):
    verts, faces = sphere64
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    normal = torch.linalg.cross(v1 - v0, v2 - v0)  # (F, 3)
    centroid = (v0 + v1 + v2) / 3  # (F, 3)
    # For a sphere centred at the origin, the outward direction at a face is its centroid.
    assert ((normal * centroid).sum(-1) > 0).all()


def test_single_voxel_gives_small_closed_cube():
    # One inside voxel in a 3^3 occupancy grid (level 0.5). The 8 cells around it each get a
    # vertex at the mean of 3 half-way crossings: inside corner +- 1/6 cell along each axis.
    # Cell size is 2/3, so the vertices are the corners of a cube of half-side (1/6)(2/3) = 1/9
    # around the origin, joined by 6 quads = 12 triangles.
    occ = torch.zeros(3, 3, 3)
    occ[1, 1, 1] = 1.0
    verts, faces = mesh.extract_mesh(occ, level=0.5)
    assert verts.shape == (8, 3) and faces.shape == (12, 3)
    assert torch.allclose(verts.abs(), torch.full((8, 3), 1 / 9), atol=1e-6)
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed and oriented and E == 18 and chi == 2
    assert math.isclose(mesh.mesh_volume(verts, faces).item(), (2 / 9) ** 3, rel_tol=1e-5)
    assert math.isclose(mesh.mesh_area(verts, faces).item(), 6 * (2 / 9) ** 2, rel_tol=1e-5)


def test_bool_and_float_occupancy_agree():
    occ = sphere_values(16, r=0.5) > 0  # (16, 16, 16) bool
    vb, fb = mesh.extract_mesh(occ, level=0.5)
    vf, ff = mesh.extract_mesh(occ.float(), level=0.5)
    assert torch.equal(vb, vf) and torch.equal(fb, ff)


def test_full_grid_is_closed_box_thanks_to_padding():
    # All voxels inside: without padding there would be no surface at all; with it the surface
    # is the border of the grid, [-1, 1]^3 (with slightly bevelled edges and corners).
    R = 32
    verts, faces = mesh.extract_mesh(torch.ones(R, R, R), level=0.0)
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed and oriented and chi == 2
    # The mirrored padding puts the crossings half-way between the last voxel centre and the
    # padding centre: exactly on the border +-1.
    assert math.isclose(verts.min().item(), -1.0, abs_tol=1e-6)
    assert math.isclose(verts.max().item(), 1.0, abs_tol=1e-6)
    vol = mesh.mesh_volume(verts, faces).item()
    assert vol > 0 and abs(vol / 8.0 - 1) < 0.01


def test_slab_touching_border_closed_and_plane_exact():
    # Half-space x < 0.3 as a linear signed distance: it touches 5 of the 6 grid faces.
    R = 32
    p = voxel_grid(R)
    values = (0.3 - p[..., 0]).float()
    verts, faces = mesh.extract_mesh(values, level=0.0)
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed and oriented and chi == 2
    vol = mesh.mesh_volume(verts, faces).item()
    # Expected 1.3 x 2 x 2 = 5.2, minus the small bevels along the box edges (~0.4% at R = 32).
    # The mirrored padding cuts the slab exactly at the border even where the field is weak
    # (|0.3 - x| small near the cut); a constant padding value would pull it in there (-2.6%).
    assert vol > 0 and abs(vol / (1.3 * 4.0) - 1) < 0.01
    assert torch.allclose(verts.min(0).values, torch.tensor([-1.0, -1.0, -1.0]), atol=1e-6)
    assert torch.allclose(verts.max(0).values, torch.tensor([0.3, 1.0, 1.0]), atol=1e-6)
    # Scaling the field does not move its zero level set: same mesh.
    verts5, faces5 = mesh.extract_mesh(5.0 * values, level=0.0)
    assert torch.equal(faces5, faces) and torch.allclose(verts5, verts, atol=1e-6)
    # Away from the padding, linear interpolation of a linear field is exact: every vertex of
    # the cut lies on the plane x = 0.3.
    away = (verts[:, 1].abs() < 0.9) & (verts[:, 2].abs() < 0.9) & ((verts[:, 0] - 0.3).abs() < 0.5)
    assert away.sum() > 100
    assert torch.allclose(verts[away, 0], torch.full_like(verts[away, 0], 0.3), atol=1e-5)


def test_two_spheres_euler_4():
    R, r = 48, 0.3
    values = torch.maximum(sphere_values(R, r, (-0.5, 0.0, 0.0)), sphere_values(R, r, (0.5, 0.0, 0.0)))
    verts, faces = mesh.extract_mesh(values)
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed and oriented and chi == 4
    vol = mesh.mesh_volume(verts, faces).item()
    assert abs(vol / (2 * 4 / 3 * math.pi * r ** 3) - 1) < 0.03


def test_torus_euler_0_and_volume():
    R, Rm, rm = 64, 0.5, 0.2
    p = voxel_grid(R)
    # Signed distance to a torus around z: rm - |(sqrt(x^2 + y^2) - Rm, z)|.
    q = torch.stack([p[..., :2].norm(dim=-1) - Rm, p[..., 2]], -1)
    values = (rm - q.norm(dim=-1)).float()
    verts, faces = mesh.extract_mesh(values)
    E, closed, oriented, chi = edge_stats(verts, faces)
    assert closed and oriented and chi == 0
    vol = mesh.mesh_volume(verts, faces).item()
    assert vol > 0 and abs(vol / (2 * math.pi ** 2 * Rm * rm ** 2) - 1) < 0.03


def test_empty_grid():
    for values in (torch.zeros(8, 8, 8), torch.full((8, 8, 8), -3.0)):
        verts, faces = mesh.extract_mesh(values, level=0.0)
        assert verts.shape == (0, 3) and faces.shape == (0, 3)
        assert verts.dtype == torch.float32 and faces.dtype == torch.int64


def test_volume_sign_flips_with_orientation(sphere64):
    verts, faces = sphere64
    assert math.isclose(mesh.mesh_volume(verts, faces.flip(1)).item(),
                        -mesh.mesh_volume(verts, faces).item(), rel_tol=1e-6)


# ---------------------------------------------------------------------------- sampling
def test_sample_sphere_on_surface_and_uniform():
    r, R = 0.6, 32
    verts, faces = mesh.extract_mesh(sphere_values(R, r))
    g = torch.Generator().manual_seed(0)
    pts = mesh.sample_mesh_surface(verts, faces, 20000, generator=g)  # (N, 3)
    assert pts.shape == (20000, 3)
    # Triangles are chords of the sphere, within a fraction of a voxel of it.
    assert ((pts.norm(dim=-1) - r).abs() < 0.5 * 2 / R).all()
    # Uniform on a sphere: mean ~ 0 (std of the mean ~ 0.35 / sqrt(20000) = 0.0025) ...
    assert pts.mean(0).abs().max() < 0.015
    # ... and (Archimedes) each coordinate is uniform on [-r, r]: P(z > r/2) = 1/4.
    assert abs((pts[:, 2] > r / 2).float().mean().item() - 0.25) < 0.015


def test_sample_proportional_to_area():
    # Triangle A (area 1) near x = 0, triangle B (area 3) near x = 10.
    verts = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [10, 0, 0], [12, 0, 0], [10, 3, 0]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert torch.allclose(mesh.mesh_area(verts, faces), torch.tensor(4.0))
    pts = mesh.sample_mesh_surface(verts, faces, 20000, generator=torch.Generator().manual_seed(1))
    # std of the fraction: sqrt(0.75 * 0.25 / 20000) = 0.003
    assert abs((pts[:, 0] > 5).float().mean().item() - 0.75) < 0.015


def test_sample_uniform_inside_triangle():
    # Right triangle (0,0), (1,0), (0,1): uniform points have mean = centroid (1/3, 1/3) and
    # P(x + y < 1/2) = area ratio = 1/4 (without the sqrt trick it would be 1/2).
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2]])
    pts = mesh.sample_mesh_surface(verts, faces, 20000, generator=torch.Generator().manual_seed(2))
    assert (pts[:, 0] >= 0).all() and (pts[:, 1] >= 0).all() and (pts[:, :2].sum(1) <= 1 + 1e-6).all()
    assert torch.allclose(pts[:, :2].mean(0), torch.tensor([1 / 3, 1 / 3]), atol=0.01)
    assert abs((pts[:, :2].sum(1) < 0.5).float().mean().item() - 0.25) < 0.015
    # Same generator seed, same points.
    again = mesh.sample_mesh_surface(verts, faces, 20000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pts, again)


# ---------------------------------------------------------------------------- OBJ
def test_write_obj_round_trip(tmp_path, sphere64):
    verts, faces = mesh.extract_mesh(sphere_values(16, 0.5))
    path = tmp_path / "shape.obj"
    path.write_text("old content that must be replaced\n")
    mesh.write_obj(str(path), verts, faces)
    vs, fs = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "v":
            vs.append([float(x) for x in parts[1:]])
        elif parts[0] == "f":
            fs.append([int(x) - 1 for x in parts[1:]])
        else:
            raise AssertionError(f"unexpected line {line!r}")
    assert torch.equal(torch.tensor(vs, dtype=torch.float32), verts)
    assert torch.equal(torch.tensor(fs, dtype=torch.int64), faces)
    assert not os.path.exists(str(path) + ".tmp")
    assert os.listdir(tmp_path) == ["shape.obj"]


# ----------------------------------------------------------------------------------------
# raymarch
# ----------------------------------------------------------------------------------------
torch.set_num_threads(1)

H = W = 48
STEPS = 64
# The sphere tests zoom in (narrow fov) so that a radius-0.5 sphere covers hundreds of pixels.
FOV = 30.0


def sphere_field(radii, scale=4.0):
    """Field of B spheres centred at the origin: logits scale * (r_b - |p|), (B, N, 3) -> (B, N)."""
    radii = torch.as_tensor(radii, dtype=torch.float32)

    def field(p):
        return scale * (radii[:, None] - p.norm(dim=-1))

    return field


def default_rays(height=H, width=W, **kw):
    """Rays of render_occupancy's camera (same maths, recomputed here from the public pieces)."""
    c2w = raymarch.orbit_c2w(raymarch.AZIMUTH_DEG, raymarch.ELEVATION_DEG, raymarch.DISTANCE)
    f = raymarch.focal_from_fov(width, kw.get("fov_deg", raymarch.FOV_DEG))
    return raymarch.camera_rays(height, width, c2w, f)


def analytic_disc(origins, dirs, r):
    """Pixels whose ray passes within r of the origin: |o x d| < r (d unit), origin in front (o . d < 0)."""
    in_front = (origins * dirs).sum(-1) < 0  # (H*W,)
    return (torch.linalg.cross(origins, dirs).norm(dim=-1) < r) & in_front  # (H*W,)


def analytic_sphere_t(o, d, r):
    """First intersection of the ray o + t d (|d| = 1) with the sphere |p| = r: t = -o.d - sqrt((o.d)^2 - |o|^2 + r^2)."""
    b = (o * d).sum()
    return -b - torch.sqrt(b * b - (o * o).sum() + r * r)


# ----------------------------------------------------------------------------------------
# Camera
# ----------------------------------------------------------------------------------------
def test_look_at_orthonormal_eye_and_target():
    eye = torch.tensor([1.3, -0.7, 2.9])
    target = torch.tensor([0.2, 0.4, -0.3])
    c2w = raymarch.look_at(eye, target, (0.0, 1.0, 0.0))
    R = c2w[:3, :3]
    # Orthonormal, right-handed rotation.
    assert torch.allclose(R.T @ R, torch.eye(3), atol=1e-6)
    assert torch.det(R).item() == pytest.approx(1.0, abs=1e-5)
    # Column 3 is the eye; the last row is (0, 0, 0, 1).
    assert torch.allclose(c2w[:3, 3], eye)
    assert torch.allclose(c2w[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    # Camera -z points at the target.
    to_target = (target - eye) / (target - eye).norm()
    assert torch.allclose(-R[:, 2], to_target, atol=1e-6)
    # Camera x is horizontal (no world-y component) and camera y leans towards world +y.
    assert abs(R[1, 0].item()) < 1e-6
    assert R[1, 1].item() > 0
    # Looking straight down still gives an orthonormal matrix.
    c2w = raymarch.look_at(torch.tensor([0.0, 3.0, 0.0]), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    assert torch.allclose(c2w[:3, :3].T @ c2w[:3, :3], torch.eye(3), atol=1e-6)
    assert torch.allclose(-c2w[:3, 2], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6)


def test_camera_rays_centre_pixels_identity_pose():
    f = 2.0
    origins, dirs = raymarch.camera_rays(4, 4, torch.eye(4), f)
    assert origins.shape == (16, 3) and dirs.shape == (16, 3)
    assert torch.allclose(origins, torch.zeros(16, 3))
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(16), atol=1e-6)
    # Centre pixels (row, col) in {1, 2}^2: column 1 is left (-x), row 1 is up (+y, OpenGL).
    for row, col, sx, sy in [(1, 1, -1, +1), (1, 2, +1, +1), (2, 1, -1, -1), (2, 2, +1, -1)]:
        expect = torch.tensor([sx * 0.5 / f, sy * 0.5 / f, -1.0])
        expect = expect / expect.norm()
        assert torch.allclose(dirs[row * 4 + col], expect, atol=1e-6), (row, col)
    # A corner pixel: (row 0, col 3) at (+1.5 / f, +1.5 / f, -1).
    expect = torch.tensor([1.5 / f, 1.5 / f, -1.0])
    assert torch.allclose(dirs[3], expect / expect.norm(), atol=1e-6)


def test_camera_rays_follow_the_pose():
    # A rotated, translated camera: rays = R @ (identity-pose rays), origins = eye.
    c2w = raymarch.look_at(torch.tensor([2.0, 1.0, -1.5]), (0.1, 0.0, 0.2), (0.0, 1.0, 0.0))
    o0, d0 = raymarch.camera_rays(5, 7, torch.eye(4), 3.0)
    o, d = raymarch.camera_rays(5, 7, c2w, 3.0)
    assert torch.allclose(d, d0 @ c2w[:3, :3].T, atol=1e-6)
    assert torch.allclose(o, c2w[:3, 3].expand(35, 3))


def test_ray_box_slab():
    # Rays along +x from x = -3: the cube is entered at t = 2 and left at t = 4, unless |y| > 1.
    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.5, 0.9], [-3.0, 1.5, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    tn, tf, hit = raymarch.ray_box(o, d)
    assert hit.tolist() == [True, True, False, True]
    assert torch.allclose(tn[:2], torch.tensor([2.0, 2.0])) and torch.allclose(tf[:2], torch.tensor([4.0, 4.0]))
    # A ray starting inside begins at t = 0 and leaves at the face z = -1 (t = 1).
    assert tn[3].item() == 0.0 and tf[3].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------
# Rendering a sphere
# ----------------------------------------------------------------------------------------
def test_sphere_silhouette_depth_and_shading():
    r = 0.5
    img, buf = raymarch.render_occupancy(sphere_field([r]), 1, H, W, fov_deg=FOV, steps=STEPS,
                                         return_buffers=True)
    assert img.shape == (1, 3, H, W)
    assert img.min() >= -1 and img.max() <= 1
    origins, dirs = default_rays(fov_deg=FOV)
    # Silhouette = analytic disc on > 98% of the pixels, and wrong on < 2% of the disc's area.
    disc = analytic_disc(origins, dirs, r).reshape(H, W)
    mask = buf["mask"][0]
    assert disc.sum() > 400  # the sphere is a sizable disc
    assert (mask == disc).float().mean() > 0.98
    assert (mask != disc).sum() < 0.02 * disc.sum()
    # The image is background exactly where there is no hit (the three channels agree).
    assert torch.all(img[0, :, ~mask] == 1.0)
    assert torch.all(img[0, 0] == img[0, 1]) and torch.all(img[0, 0] == img[0, 2])

    # Centre pixel (row H/2, col W/2): depth vs the analytic ray-sphere intersection.
    i = (H // 2) * W + W // 2
    t_true = analytic_sphere_t(origins[i], dirs[i], r)
    assert abs(buf["depth"][0, H // 2, W // 2].item() - t_true.item()) < 1e-2
    # Shading vs Lambert with the analytic normal p / |p| at the analytic hit.
    p_true = origins[i] + t_true * dirs[i]
    n_true = p_true / p_true.norm()
    assert torch.allclose(buf["normals"][0, :, H // 2, W // 2], n_true, atol=0.02)
    light = torch.tensor(raymarch.LIGHT_DIR)
    light = light / light.norm()
    grey = raymarch.ALBEDO * (raymarch.AMBIENT + raymarch.DIFFUSE * max(0.0, (n_true @ light).item()))
    assert (img[0, 0, H // 2, W // 2].item() + 1) / 2 == pytest.approx(grey, abs=0.02)


def test_depth_all_pixels_and_unscaled_logits():
    # march_rays directly, plain logits r - |p| (scale 1): every hit is on the sphere.
    r = 0.6
    origins, dirs = default_rays(24, 24, fov_deg=FOV)
    out = raymarch.march_rays(sphere_field([r], scale=1.0), 1, origins, dirs, steps=STEPS, refine=6)
    hit = out["hit"][0]
    disc = analytic_disc(origins, dirs, r)
    assert disc.sum() > 100 and (hit != disc).sum() < 0.02 * disc.sum()
    radius = out["points"][0, hit].norm(dim=-1)
    assert (radius - r).abs().max() < 1e-3
    # Outward normals: parallel to the position on a centred sphere.
    p = out["points"][0, hit]
    assert torch.allclose(out["normals"][0, hit], p / p.norm(dim=-1, keepdim=True), atol=1e-3)
    # Only 2 bisections leave a bracket of ~0.055 / 4 = 0.014 along the ray; the final secant
    # step (linear interpolation of the two logits) still lands within 2e-3 of the sphere.
    out2 = raymarch.march_rays(sphere_field([r], scale=1.0), 1, origins, dirs, steps=STEPS, refine=2)
    assert torch.equal(out2["hit"], out["hit"])
    assert (out2["points"][0, hit].norm(dim=-1) - r).abs().max() < 2e-3


def test_image_orientation_world_y_up():
    # Camera on +z (azimuth 270 around world y, elevation 0): world +x is image right, world +y is image up.
    def field(p):
        # Two small balls: one at (+0.6, 0, 0), one at (0, +0.6, 0).
        a = 0.25 - (p - torch.tensor([0.6, 0.0, 0.0])).norm(dim=-1)
        b = 0.25 - (p - torch.tensor([0.0, 0.6, 0.0])).norm(dim=-1)
        return torch.maximum(a, b)

    _, buf = raymarch.render_occupancy(field, 1, 32, 32, azimuth=270.0, elevation=0.0, steps=STEPS,
                                       return_buffers=True)
    mask = buf["mask"][0]
    rows, cols = mask.nonzero(as_tuple=True)
    right = cols > 16 + 3  # the x ball
    up = rows < 16 - 3  # the y ball
    assert right.any() and up.any()
    # The x ball sits on the horizontal middle line, the y ball on the vertical one.
    assert (rows[right].float().mean() - 15.5).abs() < 1.0
    assert (cols[up].float().mean() - 15.5).abs() < 1.0
    # Nothing on the left or at the bottom.
    assert not mask[:, :12].any() and not mask[20:].any()


def test_default_view_frames_the_cube():
    # A cube of half-size 0.98 (logits 0.98 - max|p_i|) fills most of the default image,
    # without touching the border.
    def field(p):
        return 0.98 - p.abs().amax(-1)

    img, buf = raymarch.render_occupancy(field, 1, 40, 40, steps=32, return_buffers=True)
    mask = buf["mask"][0]
    rows, cols = mask.nonzero(as_tuple=True)
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    assert cols.max() - cols.min() + 1 > 0.7 * 40
    assert rows.max() - rows.min() + 1 > 0.7 * 40
    # Three visible faces with normals +x, +y, +z get the three Lambert shades.
    light = torch.tensor(raymarch.LIGHT_DIR)
    light = light / light.norm()
    shades = {round(raymarch.ALBEDO * (raymarch.AMBIENT + raymarch.DIFFUSE * light[a].item()), 2) for a in range(3)}
    values = ((img[0, 0][mask] + 1) / 2)
    counts = [((values - s).abs() < 0.01).sum().item() for s in shades]
    assert all(c > 20 for c in counts), counts
    assert sum(counts) > 0.9 * mask.sum().item()


# ----------------------------------------------------------------------------------------
# Empty fields, batches, chunks
# ----------------------------------------------------------------------------------------
def test_empty_field_is_background():
    def field(p):
        return -torch.ones(p.shape[:2])

    img = raymarch.render_occupancy(field, 2, 16, 16, steps=STEPS)
    assert img.shape == (2, 3, 16, 16)
    assert torch.all(img == 1.0)


def test_batch_items_are_not_mixed():
    radii = [0.5, 0.3]
    img, buf = raymarch.render_occupancy(sphere_field(radii), 2, H, W, fov_deg=FOV, steps=STEPS,
                                         return_buffers=True)
    origins, dirs = default_rays(fov_deg=FOV)
    for b, r in enumerate(radii):
        disc = analytic_disc(origins, dirs, r).reshape(H, W)
        assert (buf["mask"][b] == disc).float().mean() > 0.98
        assert (buf["mask"][b] != disc).sum() < 0.02 * disc.sum()
    # Each item equals the same field rendered alone.
    for b, r in enumerate(radii):
        alone = raymarch.render_occupancy(sphere_field([r]), 1, H, W, fov_deg=FOV, steps=STEPS)
        assert torch.allclose(img[b], alone[0], atol=1e-5)


def test_chunk_limit_no_grad_and_chunk_independence():
    sizes, grad_flags = [], []
    base = sphere_field([0.5, 0.35])

    def field(p):
        sizes.append(p.shape[0] * p.shape[1])
        grad_flags.append(torch.is_grad_enabled())
        assert p.abs().max() <= 1.0
        return base(p)

    chunk = 300
    img = raymarch.render_occupancy(field, 2, 24, 24, steps=32, chunk=chunk)
    assert len(sizes) > 0 and max(sizes) <= chunk
    assert not any(grad_flags)
    # The chunk size changes how the work is split, not the picture.
    ref = raymarch.render_occupancy(base, 2, 24, 24, steps=32, chunk=1 << 16)
    assert torch.allclose(img, ref, atol=1e-5)


def test_field_module_output_with_trailing_dim_and_grad_params():
    # A field that is an nn.Module with parameters and returns (B, N, 1): no graph is built.
    class Ball(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.r = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, p):
            return (self.r - p.norm(dim=-1))[..., None] * 3

    img = raymarch.render_occupancy(Ball(), 1, 16, 16, steps=32)
    assert not img.requires_grad
    ref = raymarch.render_occupancy(sphere_field([0.5], scale=3.0), 1, 16, 16, steps=32)
    assert torch.allclose(img, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------
# metrics3d
# ----------------------------------------------------------------------------------------
torch.set_num_threads(1)


def flat_cloud(n, seed):
    """(n, 3) random cloud lying in the plane x = 0 (y, z uniform in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    c[:, 0] = 0
    return c


def shifted_copies(shape, xs):
    """(len(xs), N, 3): the flat cloud `shape` translated by (x, 0, 0) for each x in xs.
    Because every cloud lies in a plane x = const, each squared distance between copies j and k
    is (x_j - x_k)^2 + (its yz part), so CD(copy_j, copy_k) = CD(shape, shape) + 2 (x_j - x_k)^2
    = 2 (x_j - x_k)^2 exactly."""
    out = shape[None].repeat(len(xs), 1, 1)
    out[:, :, 0] += torch.tensor(xs, dtype=shape.dtype)[:, None]
    return out


def brute_chamfer(a, b):
    """Chamfer distance of two (N, 3) / (M, 3) clouds with plain Python loops."""
    a, b = a.tolist(), b.tolist()
    sq = lambda p, q: sum((pi - qi) ** 2 for pi, qi in zip(p, q))
    a_to_b = sum(min(sq(p, q) for q in b) for p in a) / len(a)
    b_to_a = sum(min(sq(p, q) for p in a) for q in b) / len(b)
    return a_to_b + b_to_a


# ----------------------------------------------------------------------------------------
# chamfer
# ----------------------------------------------------------------------------------------
def test_chamfer_self_is_zero():
    a = torch.rand(3, 50, 3, dtype=torch.float64)
    assert torch.allclose(metrics3d.chamfer(a, a, chunk=7), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_chamfer_two_single_points():
    # one point each: both directed means equal |p - q|^2, so CD = 2 |p - q|^2
    p = torch.tensor([[[0.1, -0.2, 0.3]]], dtype=torch.float64)
    q = torch.tensor([[[0.4, 0.2, -0.9]]], dtype=torch.float64)
    expected = 2 * (0.3 ** 2 + 0.4 ** 2 + 1.2 ** 2)
    assert metrics3d.chamfer(p, q).item() == pytest.approx(expected, abs=1e-12)


def test_chamfer_point_vs_two_points():
    # a = {0}, b = {0, (1,0,0)}: a -> b mean = 0; b -> a mean = (0 + 1) / 2 = 0.5; total 0.5
    a = torch.zeros(1, 1, 3, dtype=torch.float64)
    b = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert metrics3d.chamfer(a, b).item() == pytest.approx(0.5, abs=1e-12)
    assert metrics3d.chamfer(b, a).item() == pytest.approx(0.5, abs=1e-12)


def test_chamfer_symmetric():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 37, 3, generator=g, dtype=torch.float64)
    b = torch.rand(4, 23, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(metrics3d.chamfer(a, b, chunk=5), metrics3d.chamfer(b, a, chunk=5), atol=1e-12)


def test_chamfer_translation_adds_2T2():
    # a and b lie in the plane x = 0; moving b by T along x adds T^2 to every squared
    # distance, so the nearest neighbours do not change and CD grows by exactly 2 T^2
    a = flat_cloud(30, seed=2)[None]
    b = flat_cloud(20, seed=3)[None]
    base = metrics3d.chamfer(a, b).item()
    for T in (0.5, 3.0, 10.0):
        b_shift = b.clone()
        b_shift[..., 0] += T
        assert metrics3d.chamfer(a, b_shift).item() == pytest.approx(base + 2 * T ** 2, rel=1e-10)
    # a copy of a moved by T (a "well-separated pair" of the same shape): CD = 2 T^2
    a_shift = a.clone()
    a_shift[..., 0] += 5.0
    assert metrics3d.chamfer(a, a_shift).item() == pytest.approx(2 * 25.0, rel=1e-10)


def test_chamfer_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 13, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, 9, 3, generator=g, dtype=torch.float64)
    # chunk=4 does not divide 13: exercises the running minimum and the ragged last chunk
    got = metrics3d.chamfer(a, b, chunk=4)
    ref = torch.tensor([brute_chamfer(a[i], b[i]) for i in range(3)], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_chamfer_chunking_2048_points():
    # float32, 2048 x 2048: the chunked result equals the one-block result
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 2048, 3, generator=g) * 2 - 1
    b = torch.rand(2, 2048, 3, generator=g) * 2 - 1
    one_block = metrics3d.chamfer(a, b, chunk=2048)
    chunked = metrics3d.chamfer(a, b, chunk=300)
    assert torch.allclose(one_block, chunked, rtol=1e-6)
    # and the expansion |p|^2 + |q|^2 - 2 p.q matches torch.cdist (direct differences)
    d = torch.cdist(a.double(), b.double()) ** 2
    via_cdist = d.min(2).values.mean(1) + d.min(1).values.mean(1)
    assert torch.allclose(chunked.double(), via_cdist, rtol=1e-4)


def test_chamfer_gradient():
    # the in-place construction of the distance block keeps autograd correct
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: metrics3d.chamfer(x, y, chunk=4), (a, b))


# ----------------------------------------------------------------------------------------
# pairwise_chamfer
# ----------------------------------------------------------------------------------------
def test_pairwise_matches_double_loop():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(3, 11, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(4, 8, 3, generator=g, dtype=torch.float64)
    # batch=5 does not divide 12 pairs, chunk=4 does not divide 11 points
    D = metrics3d.pairwise_chamfer(X, Y, batch=5, chunk=4)
    assert D.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            expected = metrics3d.chamfer(X[i:i + 1], Y[j:j + 1]).item()
            assert D[i, j].item() == pytest.approx(expected, rel=1e-12)
            assert D[i, j].item() == pytest.approx(brute_chamfer(X[i], Y[j]), rel=1e-10)


# ----------------------------------------------------------------------------------------
# mmd_cov_1nna
# ----------------------------------------------------------------------------------------
def test_gen_equals_ref():
    # identical sets of distinct shapes: each reference has an exact copy in gen (MMD 0), each
    # generated shape picks its own copy (COV 1), and each shape's nearest other shape is its
    # copy in the other set, so the 1-NN classifier is always wrong (1-NNA 0)
    g = torch.Generator().manual_seed(8)
    ref = torch.rand(5, 64, 3, generator=g, dtype=torch.float64) * 2 - 1
    out = metrics3d.mmd_cov_1nna(ref.clone(), ref, batch=7, chunk=16)
    assert out["mmd"] == pytest.approx(0.0, abs=1e-12)
    assert out["cov"] == 1.0
    assert out["nna"] == 0.0


def test_mode_collapse():
    # ref = the flat shape at x = 0, 1, 3; gen = 4 copies of ref[1] (x = 1).
    # CD(copy at x_j, copy at x_k) = 2 (x_j - x_k)^2, so
    #   MMD = mean(2 * 1^2, 0, 2 * 2^2) = (2 + 0 + 8) / 3 = 10/3,  COV = 1/3
    shape = flat_cloud(40, seed=9)
    ref = shifted_copies(shape, [0.0, 1.0, 3.0])
    gen = shifted_copies(shape, [1.0] * 4)
    out = metrics3d.mmd_cov_1nna(gen, ref, batch=4, chunk=16)
    assert out["mmd"] == pytest.approx(10 / 3, rel=1e-10)
    assert out["cov"] == pytest.approx(1 / 3)
    # (1-NNA is not asserted here: ref[1] and the gen copies are at CD 0 from each other, so
    # the nearest neighbours are decided by ties)


def test_far_apart_sets():
    # gen = other shapes translated by 10 along x: every cross-set CD is >= 2 * 8^2 = 128
    # (x gap of at least 8) while within-set CDs are <= 2 * 12 = 24 (box diameter^2), so
    # the 1-NN classifier is always right
    g = torch.Generator().manual_seed(10)
    ref = torch.rand(4, 32, 3, generator=g, dtype=torch.float64) * 2 - 1
    gen = torch.rand(6, 32, 3, generator=g, dtype=torch.float64) * 2 - 1
    gen[..., 0] += 10
    out = metrics3d.mmd_cov_1nna(gen, ref, batch=5, chunk=8)
    assert out["nna"] == 1.0
    assert out["mmd"] >= 128


def test_interleaved_sets():
    # gen at x = 0, 10, 20 and ref at x = 0.1, 10.1, 20.1: every shape's nearest other shape is
    # its partner 0.1 away in the other set -> 1-NNA 0; each gen picks a different ref -> COV 1;
    # MMD = 2 * 0.1^2
    shape = flat_cloud(25, seed=11)
    gen = shifted_copies(shape, [0.0, 10.0, 20.0])
    ref = shifted_copies(shape, [0.1, 10.1, 20.1])
    out = metrics3d.mmd_cov_1nna(gen, ref)
    assert out["nna"] == 0.0
    assert out["cov"] == 1.0
    assert out["mmd"] == pytest.approx(2 * 0.1 ** 2, rel=1e-8)


def test_nna_one_half():
    # positions along x: gen g1 = 0, g2 = 1; ref r1 = 2.2, r2 = -1.2 (CD = 2 * gap^2, so
    # nearest = smallest gap):
    #   g1: g2 at 1.0 vs r2 at 1.2 -> gen (right)   g2: g1 at 1.0 vs r1 at 1.2 -> gen (right)
    #   r1: g2 at 1.2 vs r2 at 3.4 -> gen (wrong)   r2: g1 at 1.2 vs r1 at 3.4 -> gen (wrong)
    # accuracy 2/4 = 0.5. COV: g1 -> r2, g2 -> r1: 1.0. MMD = mean(2*1.2^2, 2*1.2^2) = 2.88
    shape = flat_cloud(25, seed=12)
    gen = shifted_copies(shape, [0.0, 1.0])
    ref = shifted_copies(shape, [2.2, -1.2])
    out = metrics3d.mmd_cov_1nna(gen, ref)
    assert out["nna"] == 0.5
    assert out["cov"] == 1.0
    assert out["mmd"] == pytest.approx(2.88, rel=1e-8)
