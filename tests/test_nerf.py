"""The NeRF modality (11_nerf.py): rays (08, 10), compositing against its closed form, the synthetic scenes against
their analytic renders, the three posed-picture readers, one scene overfit, and train.py /
sample.py end to end on synthetic scenes and on posed pictures."""
import colorsys
import importlib
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

import config
import engine
import readers
from conftest import settings, train_once

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
RM = importlib.import_module("08_ray_marching")
R = importlib.import_module("10_volume_rendering")
Nf = importlib.import_module("11_nerf")
train = importlib.import_module("train")
sample = importlib.import_module("sample")

# planes of 16, pictures of 12, 64 rays of 8 samples per scene and step
TINY = ["--modality", "nerf", "--plane-res", "16", "--resolution", "12", "--batch-size", "2", "--coords-per-item", "64",
        "--samples-per-ray", "8", "--z-ch", "2", "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16",
        "--ldm-ch", "16", "--ldm-batch", "4", "--steps", "3", "--sample-steps", "2", "--sampler", "ddim",
        "--log-every", "1", "--ckpt-every", "2"]


# ----------------------------------------------------------------------------------------
# Rays
# ----------------------------------------------------------------------------------------
def test_rays_of_a_known_camera():
    # camera at (0, 0, 4) looking at the origin, 5x5 pixels, f = 2.5: the centre pixel looks down -z,
    # the top-left one towards (-2 / 2.5, +2 / 2.5, -1) (rows go down, camera y up)
    c2w = RM.look_at((0.0, 0.0, 4.0))
    intr = torch.tensor([2.5, 2.5, 2.5])
    o, d = RM.pixel_rays(c2w, intr, torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(o, torch.tensor([[0.0, 0.0, 4.0]] * 2))
    torch.testing.assert_close(d[0], torch.tensor([0.0, 0.0, -1.0]))
    corner = torch.tensor([-0.8, 0.8, -1.0])
    torch.testing.assert_close(d[1], corner / corner.norm())
    # every pixel of a turned camera: the same rays as the one-camera version
    c2w = RM.orbit_c2w(40.0, 20.0, 3.0, up=(0.0, 0.0, 1.0))
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    o, d = RM.pixel_rays(c2w, torch.tensor([7.0, 4.0, 3.0]), rows.reshape(-1), cols.reshape(-1))
    o6, d6 = RM.camera_rays(6, 8, c2w, 7.0)
    torch.testing.assert_close(o, o6)
    torch.testing.assert_close(d, d6)
    # the orbit camera sits at its radius and elevation above the z-up horizon, looking at the origin
    eye = c2w[:3, 3]
    assert abs(eye.norm() - 3.0) < 1e-5 and abs(math.degrees(math.asin(eye[2] / 3.0)) - 20.0) < 1e-4
    torch.testing.assert_close(-c2w[:3, 2], -eye / eye.norm())


def test_rays_are_clipped_to_the_cube_and_to_near_far():
    o = torch.tensor([[0.0, 0.0, 4.0], [0.0, 3.0, 4.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    lo, hi = R.clip_rays(o, d)
    torch.testing.assert_close(lo[0], torch.tensor(3.0))
    torch.testing.assert_close(hi[0], torch.tensor(5.0))
    assert lo[1] == hi[1]  # misses the cube: an empty interval
    lo, hi = R.clip_rays(o, d, near=3.5, far=torch.tensor([4.5, 4.5]))
    torch.testing.assert_close(lo[0], torch.tensor(3.5))
    torch.testing.assert_close(hi[0], torch.tensor(4.5))


# ----------------------------------------------------------------------------------------
# Compositing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [1, 7, 64])
def test_constant_density_compositing_equals_its_closed_form(S):
    # sigma constant over [t_n, t_f]: transmittance exp(-sigma L) exactly, whatever the number of samples,
    # pixel = (1 - exp(-sigma L)) c + exp(-sigma L) background
    sigma = torch.tensor([0.0, 0.3, 1.7, 40.0])[:, None].expand(-1, S)
    L = torch.tensor([2.0, 1.5, 0.8, 2.0])
    c, bg = torch.tensor([0.2, -0.4, 0.9]), 1.0
    rgb, w = R.composite(sigma, c.expand(4, S, 3), L / S, bg)  # S bins of width L / S
    T = torch.exp(-sigma[:, 0] * L)
    torch.testing.assert_close(1 - w.sum(-1), T)
    torch.testing.assert_close(rgb, (1 - T)[:, None] * c + T[:, None] * bg)
    # the weights are T_i alpha_i: bin i gets exp(-sigma delta i) (1 - exp(-sigma delta))
    delta = L / S
    i = torch.arange(S)
    torch.testing.assert_close(w, torch.exp(-sigma * delta[:, None] * i) * (1 - torch.exp(-sigma * delta[:, None])))


def test_stratified_depths_stay_in_their_bins():
    u = torch.rand(3, 5)
    t, delta = R.stratified_depths(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.5, 0.5]), u)
    torch.testing.assert_close(delta, torch.tensor([0.4, 0.1, 0.0]))
    k = ((t - torch.tensor([1.0, 2.0, 0.5])[:, None]) / delta.clamp(min=1e-9)[:, None]).floor()
    assert (k[:2] == torch.arange(5.0)).all()


# ----------------------------------------------------------------------------------------
# Synthetic scenes
# ----------------------------------------------------------------------------------------
def one_primitive(kind, centre, size, albedo=(0.5, 0.6, 0.7)):
    return {"kind": torch.tensor([[kind]]), "centre": torch.tensor([[centre]]), "size": torch.tensor([[size]]),
            "albedo": torch.tensor([[albedo]])}


def lambert(albedo, normal):
    light = torch.tensor(R.LIGHT) / torch.tensor(R.LIGHT).norm()
    return torch.tensor(albedo) * (R.AMBIENT + R.DIFFUSE * max(0.0, float(torch.tensor(normal) @ light))) * 2 - 1


def test_synthetic_scene_renders_match_the_analytic_intersections():
    sphere = one_primitive(0, [0.1, 0.0, 0.0], [0.5] * 3)
    o = torch.tensor([[[0.1, 0.0, 3.0], [0.1, 0.3, 3.0], [0.1, 0.9, 3.0]]])
    d = torch.tensor([[[0.0, 0.0, -1.0]] * 3])
    t, normal, k = R.scene_hit(sphere, o, d)
    # straight on: t = 3 - 0.5; 0.3 off axis: t = 3 - sqrt(0.25 - 0.09); 0.9 off: a miss
    torch.testing.assert_close(t[0, :2], torch.tensor([2.5, 3 - math.sqrt(0.16)]))
    assert math.isinf(t[0, 2])
    torch.testing.assert_close(normal[0, 1], torch.tensor([0.0, 0.6, 0.8]))
    rgb = R.scene_render(sphere, o, d)
    torch.testing.assert_close(rgb[0, 0], lambert((0.5, 0.6, 0.7), (0.0, 0.0, 1.0)))
    torch.testing.assert_close(rgb[0, 2], torch.ones(3))  # white background
    # a box seen from +x: its +x face at x = 0.2 + 0.3, normal +x
    box = one_primitive(1, [0.2, 0.0, 0.0], [0.3, 0.2, 0.4], (0.9, 0.1, 0.3))
    o, d = torch.tensor([[[3.0, 0.1, 0.1]]]), torch.tensor([[[-1.0, 0.0, 0.0]]])
    t, normal, _ = R.scene_hit(box, o, d)
    torch.testing.assert_close(t, torch.tensor([[2.5]]))
    torch.testing.assert_close(normal, torch.tensor([[[1.0, 0.0, 0.0]]]))
    torch.testing.assert_close(R.scene_render(box, o, d)[0, 0], lambert((0.9, 0.1, 0.3), (1.0, 0.0, 0.0)))
    # the nearer of two primitives wins
    both = {k: torch.cat([sphere[k], box[k]], 1) for k in sphere}
    t, _, k = R.scene_hit(both, torch.tensor([[[0.1, 0.0, 3.0]]]), torch.tensor([[[0.0, 0.0, -1.0]]]))
    assert k.item() == 0 and abs(t.item() - 2.5) < 1e-5


def test_scene_points_lie_on_the_surfaces_with_their_colours():
    params = one_primitive(0, [0.0, 0.1, -0.1], [0.4] * 3)
    pts = R.scene_points(params, 300, torch.Generator().manual_seed(0))  # (1, 300, 6)
    assert pts.shape == (1, 300, 6)
    torch.testing.assert_close((pts[0, :, :3] - torch.tensor([0.0, 0.1, -0.1])).norm(dim=-1), torch.full((300,), 0.4))
    normal = (pts[0, 0, :3] - torch.tensor([0.0, 0.1, -0.1])) / 0.4
    torch.testing.assert_close(pts[0, 0, 3:], lambert((0.5, 0.6, 0.7), normal.tolist()))


def test_synthetic_colours_are_saturated_hues():
    # HSV -> RGB done right (checked with the standard library's inverse): value and saturation
    # in [0.6, 1], hues spread evenly round the circle
    albedo = R.synthetic_scene_params(400, seed=3)["albedo"].reshape(-1, 3)
    hsv = torch.tensor([colorsys.rgb_to_hsv(*c) for c in albedo.tolist()])
    assert hsv[:, 1:].min() >= 0.6 - 1e-5 and hsv[:, 1:].max() <= 1 + 1e-5
    share = torch.histc(hsv[:, 0], 6, 0, 1) / len(hsv)  # six 60-degree sectors of 1200 colours
    assert share.min() > 0.12 and share.max() < 0.22, share


def synthetic_views(params, V_, size, seed=0):
    """Exact pictures of one synthetic scene from V_ random cameras: uint8 (V, size, size, 3), c2w, focal."""
    c2w, intr = R.random_cameras((V_,), torch.Generator().manual_seed(seed), size=size)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    o, d = RM.pixel_rays(c2w[:, None], intr[:, None], rows.reshape(1, -1).float(), cols.reshape(1, -1).float())
    p = {k: v.expand(V_, *v.shape[1:]) for k, v in params.items()}
    rgb = R.scene_render(p, o, d).reshape(V_, size, size, 3)
    return ((rgb + 1) * 127.5).round().to(torch.uint8), c2w, intr[0, 0].item()


# ----------------------------------------------------------------------------------------
# Readers of posed pictures
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    """One synthetic scene's 10 exact views (positions x 1.5, as NeRF-synthetic's) written as an .npz,
    a NeRF-synthetic folder and an SRN folder (OpenCV poses)."""
    root = tmp_path_factory.mktemp("posed")
    params = R.synthetic_scene_params(1, seed=5)
    imgs, c2w, f = synthetic_views(params, 10, 16)
    world = c2w.clone()
    world[:, :3, 3] *= 1.5
    rgba = np.concatenate([imgs.numpy(), np.full((10, 16, 16, 1), 255, np.uint8)], -1)
    np.savez(root / "scene.npz", images_rgba=rgba, poses=world.numpy(), focal=f, near=2.0, far=6.0)
    ns = root / "ns"
    os.makedirs(ns / "train")
    frames = []
    for i in range(10):
        matplotlib.image.imsave(ns / "train" / f"r_{i}.png", rgba[i])
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": world[i].tolist()})
    json.dump({"camera_angle_x": 2 * math.atan(8 / f), "frames": frames}, open(ns / "transforms_train.json", "w"))
    srn = root / "srn" / "car1"
    os.makedirs(srn / "rgb")
    os.makedirs(srn / "pose")
    cv = c2w.clone()
    cv[:, :3, 1:3] *= -1  # OpenGL -> OpenCV, as SRN stores them
    for i in range(10):
        matplotlib.image.imsave(srn / "rgb" / f"{i:06d}.png", imgs[i].numpy())
        np.savetxt(srn / "pose" / f"{i:06d}.txt", cv[i].reshape(1, 16).numpy())
    open(srn / "intrinsics.txt", "w").write(f"{2 * f} 16.0 16.0 0.\n0. 0. 0.\n1.\n32 32\n")  # given at 2x the size
    return {"root": root, "params": params, "imgs": imgs, "c2w": c2w}


def test_the_three_readers_give_the_same_pictures_and_rays(posed):
    r = posed["root"]
    scenes = {"npz": readers.read_posed_scenes(str(r / "scene.npz"), 0),
              "nerf-synthetic": readers.read_posed_scenes(str(r / "ns"), 0),
              "srn": readers.read_posed_scenes(str(r / "srn"), 0)}
    held_out = torch.arange(10) % 10 == 5
    for name, (tr, va) in scenes.items():
        assert len(tr) == 1 and len(tr[0]["poses"]) == 9 and len(va[0]["poses"]) == 1, name
        assert tr[0]["images"].shape == (9, 16, 16, 4) and (tr[0]["images"][..., 3] == 255).all(), name
        assert (tr[0]["images"][..., :3].int() - posed["imgs"][~held_out].int()).abs().max() <= 1, name
        rows, cols = torch.tensor([0.0, 7.0, 15.0]), torch.tensor([3.0, 8.0, 15.0])
        o, d = RM.pixel_rays(tr[0]["poses"][:, None], tr[0]["intr"][:, None], rows, cols)
        # the cameras the pictures were rendered with (positions in the cube's units)
        intr = torch.tensor([RM.focal_from_fov(16, R.SCENE_FOV), 8.0, 8.0])
        o0, d0 = RM.pixel_rays(posed["c2w"][~held_out][:, None], intr, rows, cols)
        torch.testing.assert_close(o, o0, atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(d, d0, atol=1e-4, rtol=0, msg=name)
    assert scenes["srn"][0][0]["near"] == 0.8
    assert abs(scenes["npz"][0][0]["near"] - 2 / 1.5) < 1e-6


@pytest.mark.parametrize("make, says", [
    (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)), "expected arrays images_rgba (or images), poses and focal"),
    (lambda p: np.savez(p, images=np.zeros((2, 8, 6, 3), np.uint8), poses=np.zeros((2, 4, 4)), focal=5.0), "square pictures"),
    (lambda p: open(p, "w").write("not an npz"), "cannot read this .npz"),
])
def test_bad_npz_scenes_are_one_line_errors(tmp_path, make, says):
    p = str(tmp_path / "bad.npz")
    make(p)
    with pytest.raises(SystemExit) as e:
        readers.read_posed_scenes(p, 0)
    assert says in str(e.value) and p in str(e.value) and "\n" not in str(e.value)


def test_a_folder_without_scenes_and_a_broken_transforms_file_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="no scene found"):
        readers.read_posed_scenes(str(tmp_path), 0)
    (tmp_path / "transforms_train.json").write_text('{"frames": []}')
    with pytest.raises(SystemExit) as e:
        readers.read_posed_scenes(str(tmp_path), 0)
    assert "transforms_train.json: expected camera_angle_x" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Fitting and the drivers
# ----------------------------------------------------------------------------------------
def test_one_scene_overfits_through_the_auto_decoded_vae(posed):
    torch.manual_seed(0)
    mod = Nf.NerfModality(config.parse(["--modality", "nerf", "--plane-res", "32", "--resolution", "16",
                                        "--samples-per-ray", "24", "--z-ch", "4", "--field-ch", "8", "--mlp-hidden",
                                        "32"], "")[0])
    data, val, _ = mod.load(str(posed["root"] / "scene.npz"))
    vae = mod.build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)  # (5e-3 makes the density blow up)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        x, rays, target = mod.training_batch(data, torch.zeros(1, dtype=torch.long), 512, g)
        loss = V.elbo_loss(vae, x, rays, target, 1e-6, mod.values_per_item, mod.recon)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_psnr = mod.compare(vae, data, "cpu")[0]
        scores, rows, _ = mod.evaluate(vae, val, "cpu")
    # 24.6 dB on its 9 views and 18.1 dB on the held-out one when this was written (16x16 pictures)
    assert train_psnr > 21 and scores["psnr"] > 15, (train_psnr, scores)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_once(tmp_path_factory, TINY)


def test_train_and_sample_synthetic_scenes_write_turntables(run, tmp_path, capsys):
    for name in ("ckpt.pt", "recon.png", "samples.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    out = str(tmp_path / "s.png")
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--resolution", "8,12",
                 "--frames", "4", "--out", out])
    from PIL import Image

    assert Image.open(tmp_path / "s.gif").n_frames == 4 and os.path.getsize(out) > 0
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--reconstruct", "synthetic", "--n", "2",
                 "--out", str(tmp_path / "r.png")])
    assert "2 scene(s), 6 views at 12x12: mean PSNR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="encodes point clouds"):
        sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--reconstruct", str(tmp_path)])


def test_posed_pictures_train_and_reconstruct_from_a_stage_1_checkpoint(posed, tmp_path, capsys):
    out = str(tmp_path / "r")
    data = str(posed["root"] / "scene.npz")
    train.main(TINY + ["--data", data, "--batch-size", "1", "--stage", "vae", "--resolution", "16", "--out", out])
    ck = engine.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["config"]["num_scenes"] == 1 and ck["config"]["resolution"] == 16 and "ema" not in ck["stage2"]
    capsys.readouterr()
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--reconstruct", data, "--out", str(tmp_path / "rec.png")])
    text = capsys.readouterr().out
    assert "1 scene(s), 10 views at 16x16: mean PSNR" in text and os.path.getsize(tmp_path / "rec.png") > 0
    with pytest.raises(SystemExit, match="auto-decoded"):
        sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--reconstruct", "synthetic"])


def test_look_at_takes_many_cameras_at_once():
    # look_at on a batch of eyes equals it camera by camera, straight above included
    eyes = torch.tensor([[1.0, 2.0, 3.0], [0.0, 3.0, 0.0], [-2.0, -0.5, 1.0]])
    many = RM.look_at(eyes)
    for e, m in zip(eyes, many):
        torch.testing.assert_close(m, RM.look_at(e))
    assert many.shape == (3, 4, 4)


def test_rays_with_alpha_carry_their_random_background_and_targets_use_it(posed, tmp_path):
    # half of each picture transparent: there, the target is the ray's own background colour
    imgs = posed["imgs"].numpy()
    rgba = np.concatenate([imgs, np.full((10, 16, 16, 1), 255, np.uint8)], -1)
    rgba[:, :, :8, 3] = 0
    world = posed["c2w"].clone()
    world[:, :3, 3] *= 1.5
    p = str(tmp_path / "half.npz")
    np.savez(p, images_rgba=rgba, poses=world.numpy(), focal=RM.focal_from_fov(16, R.SCENE_FOV))
    tr, _ = readers.read_posed_scenes(p, 0)
    data = readers.stack_scenes(tr, "--data", p)
    assert bool(data["alpha"])
    mod = Nf.NerfModality(settings("nerf", samples_per_ray=4, resolution=16))
    _, rays, target = mod.training_batch(data, torch.zeros(1, dtype=torch.long), 4000, torch.Generator().manual_seed(0))
    bg = rays[..., 8:11]
    assert bg.std() > 0.3  # random colours, not white
    # which rays went through a transparent pixel: those whose target is their background exactly
    on_bg = (target - bg).abs().amax(-1) < 1e-6
    assert 0.4 < on_bg.float().mean() < 0.6
    # and an empty field renders exactly those targets: nothing but each ray's own background
    assert rays.shape[-1] == 11 + 4
    empty, _ = R.composite(torch.zeros(1, 4000, 4), torch.zeros(1, 4000, 4, 3), rays[..., 7] - rays[..., 6], bg)
    torch.testing.assert_close(empty[on_bg], target[on_bg])
