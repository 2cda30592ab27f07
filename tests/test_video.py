"""The video modality (06_video.py): (x, y, t) planes, synthetic clips, clip readers, GIFs,
a clip overfit and rendered between its frames, and train.py / sample.py end to end on videos."""
import importlib
import os

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import figures
import readers
from conftest import train_once

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
Vi = importlib.import_module("06_video")
train = importlib.import_module("train")
sample = importlib.import_module("sample")

TINY = ["--modality", "video", "--resolution", "16", "--frames", "4", "--batch-size", "2", "--coords-per-item", "256",
        "--z-ch", "2", "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16", "--ldm-ch", "16", "--ldm-batch", "4",
        "--steps", "3", "--sample-steps", "2", "--sampler", "ddim", "--log-every", "1", "--ckpt-every", "2"]


def test_video_grid_is_x_y_t_at_voxel_centres():
    g = Vi.video_grid(4, 2, 3)  # (T, H, W, 3)
    assert g.shape == (4, 2, 3, 3)
    torch.testing.assert_close(g[2, 1, 0], torch.tensor([-2 / 3, 0.5, 0.25]))  # x of column 0 of 3, y of row 1 of 2, t of frame 2 of 4


def test_xy_xt_yt_lookup_equals_grid_sample_per_plane():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 5, 6, 6, generator=g, dtype=torch.float64)  # (B, 3, C, h, w): xy, xt, yt
    c = torch.rand(2, 40, 3, generator=g, dtype=torch.float64) * 2 - 1  # (x, y, t)
    out = inr.triplane_lookup(planes, c, combine="concat")  # (B, N, 3C)
    ref = [F.grid_sample(planes[:, k], c[:, :, None, list(ax)], mode="bilinear", align_corners=False,
                         padding_mode="border")[..., 0].transpose(1, 2) for k, ax in enumerate(((0, 1), (0, 2), (1, 2)))]
    torch.testing.assert_close(out, torch.cat(ref, -1), rtol=0, atol=1e-12)


def test_collapse_volume_puts_each_axis_where_the_lookup_reads_it():
    T, H, W = 4, 4, 4
    t, y, x = torch.meshgrid(torch.arange(T).float(), torch.arange(H).float(), torch.arange(W).float(),
                             indexing="ij")
    vol = torch.stack([x, y, t])[None]  # (1, 3 channels, T, H, W): channel 0 = x index, 1 = y, 2 = t
    xy, xt, yt = Vi.collapse_volume(vol)[0]  # each (3, 4, 4): (channel, height, width)
    cols, rows = torch.arange(4.0).expand(4, 4), torch.arange(4.0)[:, None].expand(4, 4)
    # xy: x along the width, y along the height; xt: x along the width, t along the height; yt: y along the width
    assert torch.equal(xy[0], cols) and torch.equal(xy[1], rows)
    assert torch.equal(xt[0], cols) and torch.equal(xt[2], rows)
    assert torch.equal(yt[1], cols) and torch.equal(yt[2], rows)


def test_synthetic_clips_move_and_frame_zero_matches_the_analytic_render():
    p = Vi.synthetic_video_params(3, seed=1)
    clips = Vi.synthetic_clips(p, 8, 16, 16)  # (3, 3, 8, 16, 16)
    assert clips.shape == (3, 3, 8, 16, 16) and clips.abs().max() <= 1
    assert (clips[:, :, 0] - clips[:, :, -1]).abs().mean() > 0.01  # things move
    # frame k is the analytic render at t_k = -1 + (2k + 1) / T
    c = torch.cat([inr.coord_grid(16, 16).reshape(1, -1, 2), torch.full((1, 256, 1), -1 + 1 / 8)], -1).expand(3, -1, -1)
    torch.testing.assert_close(clips[:, :, 0], inr.synthetic_render(p, c).reshape(3, 16, 16, 3).permute(0, 3, 1, 2))
    # with velocity 0 every frame is the still image
    p["velocity"].zero_()
    still = Vi.synthetic_clips(p, 4, 16, 16)
    assert torch.equal(still[:, :, 0], still[:, :, 3])


def test_random_voxels_read_the_clip_at_their_coordinates():
    clips = torch.randn(2, 3, 4, 5, 6)
    coords, target = V.random_samples(clips, Vi.video_grid(4, 5, 6).reshape(-1, 3), 30, torch.Generator().manual_seed(0))
    k = ((coords[..., 2] + 1) * 4 - 1) / 2  # frame index from t
    i = ((coords[..., 1] + 1) * 5 - 1) / 2
    j = ((coords[..., 0] + 1) * 6 - 1) / 2
    k, i, j = k.round().long(), i.round().long(), j.round().long()
    for b in range(2):
        torch.testing.assert_close(target[b], clips[b][:, k[b], i[b], j[b]].T)


def write_clip_folder(root, clips):
    """Clips (n, T, H, W, 3) uint8 -> root/clip_<i>/frame_<k>.png."""
    for i, clip in enumerate(clips):
        d = root / f"clip_{i}"
        d.mkdir(parents=True)
        for k, frame in enumerate(clip):
            matplotlib.image.imsave(str(d / f"frame_{k:03d}.png"), frame)


def test_clip_folder_and_clip_array_read_the_same(tmp_path):
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 5, 12, 16, 3), dtype=np.uint8)  # not square: centre-cropped
    write_clip_folder(tmp_path / "folder", clips)
    (tmp_path / "folder" / "short").mkdir()  # a clip too short is skipped
    matplotlib.image.imsave(str(tmp_path / "folder" / "short" / "f0.png"), clips[0, 0])
    np.savez(tmp_path / "c.npz", clips=clips)
    np.save(tmp_path / "c.npy", clips)
    a = readers.read_clips(str(tmp_path / "folder"), 4, 8)
    assert a.shape == (3, 3, 4, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, readers.read_clips(str(tmp_path / "c.npz"), 4, 8))
    assert torch.equal(a, readers.read_clips(str(tmp_path / "c.npy"), 4, 8))
    # no resizing at the cropped size: exactly the pixels, channels first, frames in order
    exact = readers.read_clips(str(tmp_path / "c.npz"), 5, 12)
    assert torch.equal(exact, torch.from_numpy(clips[:, :, :, 2:14]).permute(0, 4, 1, 2, 3))


@pytest.mark.parametrize("make, says", [
    (lambda p: np.savez(p, clips=np.zeros((2, 3, 8, 8, 3), np.uint8)), "with T >= 4 frames"),
    (lambda p: np.savez(p, clips=np.zeros((2, 8, 8, 8, 2), np.uint8)), "expected clips (n, T, H, W, 3)"),
    (lambda p: np.savez(p, clips=np.full((2, 8, 8, 8, 3), 2.0)), "uint8 or float in [0, 1]"),
    (lambda p: np.savez(p, a=np.zeros(3), b=np.zeros(3)), "expected an array named 'clips'"),
    (lambda p: open(p, "w").write("not an npz"), "cannot read this .npz"),
])
def test_bad_clip_arrays_are_one_line_errors(tmp_path, make, says):
    path = str(tmp_path / "bad.npz")
    make(path)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data", path, "--out", str(tmp_path / "out")])
    msg = str(e.value)
    assert msg.startswith(f"--data {path}: ") and says in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "out")


def test_clip_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: no clip with 4 frames or more \(found 0 clip folder"):
        readers.read_clips(str(tmp_path / "empty"), 4, 8)
    with pytest.raises(SystemExit, match="not a folder or an .npz/.npy file"):
        readers.read_clips(str(tmp_path / "missing"), 4, 8)


def test_write_clips_gif_plays_every_frame_and_strip_is_written(tmp_path):
    from PIL import Image  # (installed with matplotlib; used here to read the GIF back)

    T = 6
    # each frame one flat colour, different per frame, so no two GIF frames are merged
    clip = torch.linspace(-1, 1, T)[None, None, :, None, None].expand(2, 3, T, 8, 8).contiguous()
    half = clip[:, :, ::2]  # a row with half the frames plays along
    figures.write_clips([clip, half], str(tmp_path / "v.png"), ["full", "half"], "title")
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == T
    assert os.path.getsize(tmp_path / "v.png") > 0 and not any(p.name.endswith(".tmp.gif") for p in tmp_path.iterdir())


def test_one_clip_overfits_and_renders_between_its_frames():
    torch.manual_seed(0)
    mod = Vi.VideoModality(config.parse(TINY + ["--resolution", "16", "--frames", "8", "--field-ch", "8",
                                                "--mlp-hidden", "32", "--z-ch", "4", "--enc-ch", "16"], "")[0])
    vae = mod.build_vae()
    p = Vi.synthetic_video_params(1, seed=3)
    clip = Vi.synthetic_clips(p, 8, 16, 16)  # (1, 3, 8, 16, 16)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(250):
        coords, target = V.random_samples(clip, Vi.video_grid(8, 16, 16).reshape(-1, 3), 1024, g)
        loss = V.elbo_loss(vae, clip, coords, target, 1e-6, clip.numel(), mod.recon)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fields = vae.decode(vae.encode(clip).mean)
        at_frames = mod.render(vae, fields, (8, 16, 16))
        between = mod.render(vae, fields, (16, 16, 16))  # 2x the frame rate: 8 of the 16 times are new
    truth16 = Vi.synthetic_clips(p, 16, 16, 16)
    fit = inr.psnr(at_frames, clip)
    assert fit > 24
    # at 2x the frame rate, against the analytic clip at those times: as good as at the training frames
    # (t is continuous: the new times are not guessed from a frame grid but read off the same function)
    assert inr.psnr(between, truth16) > fit - 1.0
    # and the new frames are new: not copies of their training neighbours
    assert (between[:, :, 1::2] - between[:, :, 0::2]).abs().mean() > 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_once(tmp_path_factory, TINY)


def test_train_and_sample_videos_write_gifs(run, tmp_path, capsys):
    for name in ("ckpt.pt", "recon.png", "recon.gif", "samples.png", "samples.gif"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    out = str(tmp_path / "s.png")
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--resolution", "8,16",
                 "--frames", "7", "--out", out])
    from PIL import Image

    assert Image.open(tmp_path / "s.gif").n_frames >= 2 and os.path.getsize(out) > 0
    # the built-in clips' classes travel with the run by name, as the images' do (the sheet's row names)
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "1", "--sample-steps", "2", "--label", "squares",
                 "--out", str(tmp_path / "sq.png")])
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--reconstruct", "synthetic", "--n", "2", "--frames", "8",
                 "--out", str(tmp_path / "r.png")])
    text = capsys.readouterr().out
    assert "16x16, 8 frames: mean PSNR" in text and "trilinear interpolation of the 16x16, 4 frames reconstruction" in text


def test_a_primitive_moves_by_velocity_times_t():
    p = Vi.synthetic_video_params(1, seed=0)
    p["label"][:] = 0  # a disc
    p["centre"][0, 0], p["size"][0, 0] = torch.tensor([-0.3, 0.1]), 0.2
    p["velocity"][0, 0] = torch.tensor([0.25, -0.1])
    for t in (-1.0, 0.0, 0.8):
        centre = torch.tensor([-0.3, 0.1]) + torch.tensor([0.25, -0.1]) * t  # centre(t) = centre + velocity t
        inside = torch.tensor([[[*centre, t]]])
        outside = torch.tensor([[[*(centre - torch.tensor([0.3, 0.0])), t]]])  # 0.3 left of it: beyond the radius
        torch.testing.assert_close(inr.synthetic_render(p, inside)[0, 0], p["colour"][0, 0], atol=1e-4, rtol=0)
        assert (inr.synthetic_render(p, outside)[0, 0] - p["colour"][0, 0]).abs().max() > 0.05


def test_augmented_clips_are_crops_mirrors_and_reversals_of_the_clip():
    # --augment reads each clip through a square of side a at offset o, mirrored (s = -1) or not, played
    # either way. On clips that are linear ramps in x, y and t, bilinear reading is exact, so every
    # augmented pixel must be the ramp at its mapped coordinate (up to the clamp at the outermost
    # half pixel: at most 0.5 * (1 - a) / 16); the identity (augment off) returns the batch untouched
    from conftest import settings

    mod = Vi.VideoModality(settings("video", resolution=16, frames=4, augment=True))
    g = Vi.video_grid(4, 16, 16)  # (T, H, W, 3): (x, y, t) of every voxel
    k = torch.tensor([[0.5, -0.3, 0.2], [-0.2, 0.4, -0.3], [0.3, 0.3, 0.4]])  # (C, 3): each channel's ramp
    x = torch.einsum("thwd,cd->cthw", g, k)[None].repeat(32, 1, 1, 1, 1)  # (32, 3, 4, 16, 16)
    out = mod.augment_batch(x, torch.Generator().manual_seed(0))
    u = torch.rand(32, 5, generator=torch.Generator().manual_seed(0))  # the draws, in augment_batch's order
    a, s = 0.75 + 0.25 * u[:, 0], torch.where(u[:, 1] < 0.5, -1.0, 1.0)
    o = (1 - a)[:, None] * (u[:, 2:4] * 2 - 1)
    assert (s < 0).any() and (s > 0).any() and (u[:, 4] < 0.5).any() and (u[:, 4] >= 0.5).any()
    for i in range(32):
        t = -g[..., 2:] if u[i, 4] < 0.5 else g[..., 2:]  # played backwards: frame t shows time -t
        where = torch.cat([g[..., :2] * torch.stack([a[i] * s[i], a[i]]) + o[i], t], -1)
        torch.testing.assert_close(out[i], torch.einsum("thwd,cd->cthw", where, k), atol=0.01, rtol=0)
    mod.augment = False
    assert torch.equal(mod.augment_batch(x, torch.Generator().manual_seed(0)), x)
