"""The shape modality (09_shapes.py): synthetic shapes, loaders, PointNet pooling, the plane
exchange, overfitting one shape, and train.py / sample.py end to end on shapes."""
import importlib
import json
import os

import numpy as np
import pytest
import torch

import config
from conftest import train_once

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
RM = importlib.import_module("08_ray_marching")
S = importlib.import_module("09_shapes")
train = importlib.import_module("train")
sample = importlib.import_module("sample")

# A shape model small enough to train in seconds: planes of 16, a 3 x 2 x 4 x 4 latent.
TINY = ["--modality", "shape", "--plane-res", "16", "--batch-size", "2", "--coords-per-item", "256", "--z-ch", "2",
        "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16", "--ldm-ch", "16", "--ldm-batch", "4",
        "--steps", "3", "--sample-steps", "2", "--sampler", "ddim", "--log-every", "1", "--ckpt-every", "2"]


def shapes(flags=(), **sizes):
    """The shape modality of a run with these flags (and its class sizes changed)."""
    mod = S.ShapeModality(config.parse(TINY + list(flags), "")[0])
    for k, v in sizes.items():
        setattr(mod, k, v)
    return mod


# ----------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------
def test_synthetic_surface_lies_on_the_union_and_occupancy_agrees():
    p = S.synthetic_shape_params(24, seed=3)
    surf = S.synthetic_surface(p, 2000, torch.Generator().manual_seed(0))  # (24, 2000, 3)
    union = torch.stack([S.part_sdf(p, s, surf) for s in range(3)]).amin(0)
    assert union.abs().max() < 1e-5  # on the surface of the union, never inside another part
    # a small random step off the surface lands inside about as often as outside
    jittered = S.synthetic_occupancy(p, surf + 1e-3 * torch.randn(24, 2000, 3))
    assert 0.2 < jittered.float().mean() < 0.8
    assert surf.abs().max() < 0.96  # every part stays inside the cube


def test_synthetic_surface_is_area_uniform():
    # one box with half-sides (0.1, 0.2, 0.4): faces normal to x have area 4*0.2*0.4 = 0.32 each,
    # normal to y 0.16, to z 0.08, so a uniform sample puts 0.32/0.56 of its points on the x faces
    p = {"label": torch.tensor([1]), "dims": torch.tensor([[[0.1, 0.2, 0.4]] * 3]),
         "present": torch.tensor([[True, False, False]]), "centre": torch.zeros(1, 3, 3), "axis": torch.zeros(1, 3).long()}
    surf = S.synthetic_surface(p, 40000, torch.Generator().manual_seed(0))[0]
    on_x = (surf[:, 0].abs() - 0.1).abs() < 1e-6
    assert on_x.float().mean().item() == pytest.approx(0.32 / 0.56, abs=0.01)
    # a torus: the outer half (R + r cos v > R) has more area than the inner one, (pi R + 2 r) / (2 pi R)
    R, r = 0.3, 0.1
    p = {"label": torch.tensor([2]), "dims": torch.tensor([[[R, r, 0.0]] * 3]),
         "present": torch.tensor([[True, False, False]]), "centre": torch.zeros(1, 3, 3), "axis": torch.full((1, 3), 2)}
    surf = S.synthetic_surface(p, 40000, torch.Generator().manual_seed(0))[0]
    outer = (surf[:, :2].norm(dim=-1) > R).float().mean().item()
    assert outer == pytest.approx((torch.pi * R + 2 * r) / (2 * torch.pi * R), abs=0.01)
    # its tube: every point at distance r from the circle of radius R in the xy plane
    assert ((surf[:, :2].norm(dim=-1) - R) ** 2 + surf[:, 2] ** 2).sqrt().sub(r).abs().max() < 1e-5


def test_torus_axis_and_sphere_volume():
    # volume by counting voxel centres: sphere 4/3 pi r^3, torus about z 2 pi^2 R r^2, one inside the other's axis
    p = {"label": torch.tensor([0, 2, 2]), "dims": torch.tensor([[[0.5, 0, 0]] * 3, [[0.5, 0.2, 0]] * 3, [[0.5, 0.2, 0]] * 3]),
         "present": torch.tensor([[True, False, False]] * 3), "centre": torch.zeros(3, 3, 3),
         "axis": torch.tensor([[0] * 3, [2] * 3, [0] * 3])}
    c = S.voxel_grid(64).reshape(1, -1, 3).expand(3, -1, -1)
    occ = S.synthetic_occupancy(p, c)
    vol = occ.float().mean(1) * 8
    assert vol[0].item() == pytest.approx(4 / 3 * torch.pi * 0.5 ** 3, rel=0.02)
    assert vol[1].item() == pytest.approx(2 * torch.pi ** 2 * 0.5 * 0.2 ** 2, rel=0.03)
    # axis z: the point (0.5, 0, 0) is in the tube, (0, 0, 0.5) is not; axis x: the other way round
    q = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]]]).expand(3, -1, -1)
    assert S.synthetic_occupancy(p, q)[1:].tolist() == [[True, False], [False, True]]


def test_query_points_half_uniform_half_near_surface():
    p = S.synthetic_shape_params(4, seed=0)
    items = S.synthetic_shapes(p, 1024, 4000, grid_res=16, seed=0)
    assert items["points"].shape == (4, 4000, 3) and items["occ"].dtype == torch.bool
    near = items["points"][:, 2000:]
    d = torch.stack([S.part_sdf(p, s, near) for s in range(3)]).amin(0).abs()
    assert d.median() < 2 * S.NEAR_SURFACE_STD  # close to the surface
    assert torch.equal(items["occ"], S.synthetic_occupancy(p, items["points"]))  # exact labels
    assert torch.equal(items["grid"].reshape(4, -1), S.synthetic_occupancy(p, S.voxel_grid(16).reshape(1, -1, 3).expand(4, -1, -1)))


def test_grid_occupancy_reads_the_voxel_of_each_point():
    grid = torch.rand(2, 8, 8, 8) < 0.5
    centres = S.voxel_grid(8).reshape(1, -1, 3).expand(2, -1, -1)
    assert torch.equal(S.grid_occupancy(grid, centres), grid.reshape(2, -1))
    # a point a third of a voxel off its centre still reads its own voxel
    assert torch.equal(S.grid_occupancy(grid, centres + 0.3 * 2 / 8), grid.reshape(2, -1))
    # the smooth preview field of the grid is positive at inside voxel centres, negative outside
    assert torch.equal(RM.voxel_field(grid)(centres) > 0, grid.reshape(2, -1))


# ----------------------------------------------------------------------------------------
# The encoder's pieces
# ----------------------------------------------------------------------------------------
def test_plane_cells_match_the_lookup_convention():
    # a point inside cell (column a, row b) of a plane reads that texel exactly at the texel's centre
    res = 8
    p = torch.rand(1, 50, 3) * 2 - 1
    cells = S.plane_cells(p, res)  # (1, 3, 50)
    plane = torch.arange(res * res, dtype=torch.float32).reshape(1, 1, res, res)  # texel value = its flat index
    for k, (a, b) in enumerate(inr.TRIPLANE_AXES):
        centre = (((p[..., [a, b]] + 1) / 2 * res).floor() + 0.5) / res * 2 - 1  # the cell's centre, (1, 50, 2)
        read = inr.bilinear_lookup(plane, centre)[0, :, 0]
        assert torch.equal(read.long(), cells[0, k])


def test_scatter_mean_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 40, 5, generator=g)
    cell = torch.randint(6, (3, 40), generator=g)
    out = S.scatter_mean(feats, cell, 6)
    for b in range(3):
        for c in range(6):
            members = feats[b][cell[b] == c]
            expected = members.mean(0) if len(members) else torch.zeros(5)
            assert torch.allclose(out[b, c], expected, atol=1e-6)
    # gradient of a cell mean flows back as 1/count to each member point
    feats.requires_grad_(True)
    S.scatter_mean(feats, cell, 6)[0, cell[0, 0]].sum().backward()
    count = (cell[0] == cell[0, 0]).sum()
    assert torch.allclose(feats.grad[0, 0], torch.full((5,), 1.0 / count.item()))


def test_pointnet_planes_pool_points_into_their_cells():
    net = S.PointNetPlanes(out_ch=4, hidden=8, res=4)
    p = torch.tensor([[[-0.9, -0.9, -0.9], [0.9, 0.9, 0.9]]])  # two points in opposite corner cells
    planes = net(p)  # (1, 3, 4, 4, 4)
    assert planes.shape == (1, 3, 4, 4, 4)
    filled = planes.abs().sum(2) > 0  # (1, 3, 4, 4): which cells hold features
    for k in range(3):
        assert filled[0, k].sum() == 2 and filled[0, k, 0, 0] and filled[0, k, 3, 3]


def test_exchange_planes_spreads_along_the_shared_axis():
    r = 6
    c = inr.pixel_centers(r)
    # xy, xz, yz planes whose one channel is a known function: height index first, width second
    f = lambda w, h: torch.outer(torch.ones(r), w) + 10 * torch.outer(h, torch.ones(r))  # w(width) + 10 h(height)
    xy = f(c, c)  # value x + 10 y  (width x, height y)
    xz = f(c, c ** 2)  # x + 10 z^2
    yz = f(c ** 3, c)  # y^3 + 10 z
    out = S.exchange_planes(torch.stack([xy, xz, yz])[None, :, None])  # (1, 3, 3, r, r)
    X, Y = torch.meshgrid(c, c, indexing="xy")  # X varies along the width, Y along the height
    mz2, mz = (c ** 2).mean(), c.mean()
    # xy gets xz averaged over z (x + 10 mean z^2, along x) and yz averaged over z (y^3 + 10 mean z, along y)
    assert torch.allclose(out[0, 0, 1], X + 10 * mz2, atol=1e-6) and torch.allclose(out[0, 0, 2], Y ** 3 + 10 * mz, atol=1e-6)
    # xz (width x, height z) gets xy averaged over y (along x) and yz averaged over y (a function of z, along the height)
    assert torch.allclose(out[0, 1, 1], X + 10 * mz, atol=1e-6) and torch.allclose(out[0, 1, 2], (c ** 3).mean() + 10 * Y, atol=1e-6)
    # yz (width y, height z) gets xy averaged over x (a function of y, along its width) and xz averaged over x (of z)
    assert torch.allclose(out[0, 2, 1], c.mean() + 10 * X, atol=1e-6) and torch.allclose(out[0, 2, 2], c.mean() + 10 * Y ** 2, atol=1e-6)
    assert torch.equal(out[:, :, 0], torch.stack([xy, xz, yz])[None])  # each plane keeps its own features


def test_stacked_latent_round_trip_and_decoder_shares_weights():
    mod = shapes()
    vae = mod.build_vae()
    x = mod.encoder_input(S.synthetic_shapes(S.synthetic_shape_params(2), 512, 64)["x"])
    q = vae.encode(x)
    assert q.mean.shape == (2, 3, 2, 4, 4) and mod.latent_shape == (6, 4, 4)
    z = q.mean
    assert torch.equal(mod.unstack_planes(mod.stack_planes(z)), z) and mod.stack_planes(z).shape == (2, 6, 4, 4)
    fields = vae.decode(z)
    # the xz plane decoded alone with the shared decoder gives the same fields
    alone = vae.decoder(z[:, 1])
    assert all(torch.allclose(f[:, 1], a, atol=1e-6) for f, a in zip(fields, alone))


# ----------------------------------------------------------------------------------------
# Learning: one shape overfit, then the drivers
# ----------------------------------------------------------------------------------------
def test_one_shape_overfits_to_high_iou():
    torch.manual_seed(0)
    mod = shapes(["--plane-res", "32", "--field-ch", "8", "--mlp-hidden", "32", "--z-ch", "4"])
    vae = mod.build_vae()
    p = {"label": torch.tensor([1]), "dims": torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.1, 0.1]]]),
         "present": torch.tensor([[True, True, False]]), "centre": torch.tensor([[[0.2, 0.0, 0.0], [-0.4, 0.1, 0.0], [0, 0, 0]]]),
         "axis": torch.zeros(1, 3).long()}
    items = S.synthetic_shapes(p, 1024, 8192, grid_res=32)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        x, coords, target = mod.training_batch(items, torch.zeros(1, dtype=torch.long), 2048, g)
        loss = V.elbo_loss(vae, x, coords, target, 1e-6, 32 ** 3, mod.recon)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores, _, _ = mod.evaluate(vae.eval(), items, torch.device("cpu"))
    assert scores["iou"] > 0.85, scores


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_once(tmp_path_factory, TINY)


def test_train_and_sample_shapes_write_meshes_and_previews(run, tmp_path):
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert 0 <= m["stage1"]["val_iou"] <= 1 and m["stage2"]["steps"] == 3
    for name in ("ckpt.pt", "recon.png", "samples.png", "losses.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    out = str(tmp_path / "s.png")
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--resolution", "16,24", "--out", out])
    assert os.path.getsize(out) > 0
    for k in range(2):
        for R in (16, 24):
            lines = open(str(tmp_path / f"s_{k}_{R}.obj")).read().split("\n")
            assert all(l[:2] in ("v ", "f ", "") for l in lines)


def test_reconstruct_an_npz_with_a_stage1_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main(TINY + ["--out", out, "--stage", "vae"])
    data = write_meshes_npz(tmp_path / "m.npz", 3)
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--reconstruct", data, "--out", str(tmp_path / "rec.png")])
    text = capsys.readouterr().out
    assert "3 shapes: mean IoU" in text and "Chamfer distance" in text
    assert os.path.getsize(tmp_path / "rec.png") > 0


def write_meshes_npz(path, n, R=16):
    """An .npz in the format of ../shared/data/meshes21_occ64_pts8k.npz: spheres in [-0.5, 0.5]^3."""
    c = (torch.arange(R) + 0.5) / R - 0.5
    X, Y, Z = torch.meshgrid(c, c, c, indexing="ij")
    radii = 0.2 + 0.1 * torch.arange(n) / max(n - 1, 1)
    occ = np.stack([((X ** 2 + Y ** 2 + Z ** 2).sqrt() < r).numpy() for r in radii])
    g = torch.randn(n, 600, 3)
    surface = (g / g.norm(dim=-1, keepdim=True) * radii[:, None, None]).numpy()
    np.savez(path, occ_packed=np.packbits(occ.reshape(n, -1), axis=1), res=np.int32(R), surface_points=surface)
    return str(path)


def test_shape_npz_loader_scales_to_the_cube_and_labels_from_the_grid(tmp_path):
    items = shapes(num_surface=400, num_queries=1000).from_npz(write_meshes_npz(tmp_path / "m.npz", 3), "--data")
    r = items["x"].norm(dim=-1)  # surface points of spheres of radius 0.2..0.3, scaled by 2
    assert torch.allclose(r.amax(1), torch.tensor([0.4, 0.5, 0.6]), atol=1e-5) and items["grid"].shape == (3, 16, 16, 16)
    inside = items["points"].norm(dim=-1) < torch.tensor([0.4, 0.5, 0.6])[:, None] - 0.13  # a voxel (0.125) from the surface
    outside = items["points"].norm(dim=-1) > torch.tensor([0.4, 0.5, 0.6])[:, None] + 0.13
    assert items["occ"][inside].all() and not items["occ"][outside].any()
    train_set, val_set, k = shapes(["--val-fraction", "0.34"]).load(str(tmp_path / "m.npz"))
    assert len(train_set["x"]) == 2 and len(val_set["x"]) == 1 and "grid" in val_set and k == 0


def test_convonet_layout_is_read_with_its_splits(tmp_path):
    for cls in ("02691156", "03001627"):
        for i in range(3):
            d = tmp_path / cls / f"s{i}"
            d.mkdir(parents=True)
            pts = (np.random.rand(800, 3) * 1.1 - 0.55).astype(np.float16)
            occ = np.linalg.norm(pts.astype(np.float32), axis=1) < 0.3
            np.savez(d / "points.npz", points=pts, occupancies=np.packbits(occ))
            np.savez(d / "pointcloud.npz", points=(np.random.rand(900, 3) - 0.5).astype(np.float32), normals=np.zeros((900, 3)))
        (tmp_path / cls / "train.lst").write_text("s0\ns1\n")
        (tmp_path / cls / "val.lst").write_text("s2\n")
    train_set, val_set, _ = shapes().load(str(tmp_path))
    assert len(train_set["x"]) == 4 and len(val_set["x"]) == 2
    # the labels travel with their points: inside exactly where |p| < 0.3 (in [-1, 1] units: 0.3 / 0.55)
    points, occ = train_set["points"][:], train_set["occ"][:]  # (prepared once, read from the cache)
    assert torch.equal(occ, points.norm(dim=-1) < 0.3 / 0.55)
    assert points.abs().max() <= 1.0 + 1e-3 and train_set["x"][:].abs().max() <= 0.5 / 0.55 + 1e-6
    # without the lists: every shape, split at random by --val-fraction
    for cls in ("02691156", "03001627"):
        os.remove(tmp_path / cls / "train.lst")
        os.remove(tmp_path / cls / "val.lst")
    train_set, val_set, _ = shapes(["--val-fraction", "0.5"]).load(str(tmp_path))
    assert len(train_set["x"]) == 3 and len(val_set["x"]) == 3
    (tmp_path / "empty" / "cls" / "id").mkdir(parents=True)  # a folder with no shapes in it
    with pytest.raises(SystemExit, match=r"^--data .*empty: no <class>/<id>/points.npz"):
        shapes().load(str(tmp_path / "empty"))


@pytest.mark.parametrize("arrays, says", [
    (dict(points=np.zeros((2, 10, 3))), "expected 'surface_points' shaped (n, P, 3)"),
    (dict(surface_points=np.zeros((2, 10, 2))), "expected 'surface_points' shaped (n, P, 3)"),
    (dict(surface_points=np.zeros((2, 10, 3))), "expected an occupancy grid"),
    (dict(surface_points=np.zeros((2, 10, 3)), occ_packed=np.zeros((2, 7), np.uint8), res=np.int32(8)), "'occ_packed' is uint8 (2, 7)"),
    (dict(surface_points=np.zeros((2, 10, 3)), occupancy=np.zeros((2, 8, 8, 4), bool)), "occupancy grid is (2, 8, 8, 4)"),
])
def test_bad_shape_npz_is_a_one_line_error(tmp_path, arrays, says):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data", path, "--out", str(tmp_path / "out")])
    msg = str(e.value)
    assert msg.startswith(f"--data {path}: ") and says in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "out")  # no run folder left behind


def test_augmented_shapes_move_their_points_and_queries_together():
    # --augment: the batch of a plain run, each shape mapped by one linear map L: a turn about y, a
    # mirror, stretches, shrunk into the cube; the query points move by the same L and keep their labels
    plain, aug = shapes(), shapes(["--augment"])
    data = S.synthetic_shapes(S.synthetic_shape_params(6, seed=1), 1024, 1024, seed=2)
    idx = torch.arange(6)
    x0, c0, t0 = plain.training_batch(data, idx, 256, torch.Generator().manual_seed(5))
    x1, c1, t1 = aug.training_batch(data, idx, 256, torch.Generator().manual_seed(5))
    assert torch.equal(t0, t1) and x1.abs().max() < 0.97
    for i in range(6):
        L = torch.linalg.lstsq(c0[i].double(), c1[i].double()).solution  # (3, 3): c1 = c0 L
        torch.testing.assert_close(c0[i].double() @ L, c1[i].double(), atol=1e-5, rtol=0)
        assert L[1, 0].abs() < 1e-5 and L[1, 2].abs() < 1e-5 and L[0, 1].abs() < 1e-5 and L[2, 1].abs() < 1e-5
        assert (x1[i].double() - x0[i].double() @ L).abs().max() < 0.03  # the same map, plus jitter
    assert not torch.equal(c0, c1)
