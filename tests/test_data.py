"""Datasets as users keep them: folder layouts, the prepared cache, class folders, flips, bad files.

Hand-made folders stand for the real ones (CelebA-HQ's train/val/female/male, AFHQ's class
folders, a macOS copy with its ._ files, a symlinked sub-folder). Each test states one promise
of readers.py / prepare.py and what a user would see if it broke.
"""
import importlib
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
import readers
from conftest import TINY, settings
from test_reliability import assert_same_run, one_line_error

M = importlib.import_module("05_modalities")
train = importlib.import_module("train")
sample = importlib.import_module("sample")


def picture(path, seed, size=(20, 16)):
    """A random RGB picture of (width, height) `size`, in the format its extension names."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def folder_of(root, names):
    for i, name in enumerate(names):
        picture(os.path.join(root, name), i)
    return root


def listed(root, **kw):
    return [os.path.relpath(f, root) for f in readers.image_listing(str(root), **kw)["files"]]


def test_natural_order_every_format_and_no_hidden_files(tmp_path):
    folder_of(tmp_path, ["10.png", "2.png", "1.png", "b/x.webp", "a/y.bmp", "a/z.tif", "c.JPG", ".hidden.png"])
    (tmp_path / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")  # a macOS copy's companion
    (tmp_path / "notes.txt").write_text("not an image")
    assert listed(tmp_path) == ["1.png", "2.png", "10.png", "c.JPG", "a/y.bmp", "a/z.tif", "b/x.webp"]


def test_symlinked_folders_are_followed_once_and_a_link_loop_ends(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    folder_of(data, ["0.png"])
    folder_of(elsewhere, ["1.png", "2.png"])
    os.symlink(elsewhere, data / "linked")
    os.symlink(data, data / "linked_back")  # a loop: data/linked_back/linked_back/...
    assert listed(data) == ["0.png", "linked/1.png", "linked/2.png"]


def test_train_and_val_folders_are_the_split_and_class_folders_the_labels(tmp_path):
    names = [f"{split}/{cls}/{i}.png" for split, n in (("train", 6), ("val", 2)) for cls in ("male", "female")
             for i in range(n)]
    folder_of(tmp_path, names)
    found = readers.image_listing(str(tmp_path), labels=True)
    assert found["classes"] == ["female", "male"]
    assert found["held_out"].sum() == 4 and "train/ and val/" in found["layout"]
    for f, label, held in zip(found["files"], found["label"].tolist(), found["held_out"]):
        assert found["classes"][label] in f.split(os.sep) and ("/val/" in f) == held
    mod = M.modality({**settings_image(), "labels": "folders"})
    tr, va, K = mod.load(str(tmp_path))
    assert (len(tr["x"]), len(va["x"]), K) == (12, 4, 2) and mod.data_settings["classes"] == ["female", "male"]
    assert tr["label"].bincount().tolist() == [6, 6] and va["label"].bincount().tolist() == [2, 2]
    assert "train/ and val/ folders" in mod.data_note and "female, male" in mod.data_note


def test_labels_folders_needs_every_image_in_a_class_folder(tmp_path):
    folder_of(tmp_path, ["cat/0.png", "cat/1.png", "dog/0.png", "stray.png"])
    with pytest.raises(SystemExit, match="--labels folders: .*every image must sit in a class folder.*1 image"):
        readers.image_listing(str(tmp_path), labels=True)


def settings_image(**changes):
    return settings("image", **{"resolution": 8, **changes})


def test_the_cache_gives_the_items_decoded_directly_and_a_changed_file_makes_it_stale(tmp_path, capsys):
    data = folder_of(tmp_path / "data", [f"{i}.{'jpg' if i % 2 else 'png'}" for i in range(12)])
    files = readers.find_images(str(data))
    decode = lambda f: readers.decode_image(f, 8)
    cache = str(tmp_path / "cache")
    first = prepare.prepare(str(data), files, decode, (3, 8, 8), {"R": 8}, cache, "--data", "images")
    direct = np.stack([decode(f) for f in files])
    assert torch.equal(first[torch.arange(12)], torch.from_numpy(direct))
    assert torch.equal(first[2:5], torch.from_numpy(direct[2:5]))
    assert "preparing 12 images once" in capsys.readouterr().out
    # the same data again: opened, not decoded
    again = prepare.prepare(str(data), files, decode, (3, 8, 8), {"R": 8}, cache, "--data", "images")
    assert "prepared images from" in capsys.readouterr().out and torch.equal(again[:], first[:])
    # one file replaced: the cache is stale, prepared again, with the new picture
    picture(files[3], seed=99)
    os.utime(files[3], ns=(1, 1))  # (a new mtime even on file systems of coarse time)
    third = prepare.prepare(str(data), files, decode, (3, 8, 8), {"R": 8}, cache, "--data", "images")
    assert "preparing 12 images once" in capsys.readouterr().out
    assert torch.equal(third[3], torch.from_numpy(decode(files[3]))) and not torch.equal(third[3], first[3])
    # another size is another cache; the default one is under $XDG_CACHE_HOME, never in the data
    prepare.prepare(str(data), files, lambda f: readers.decode_image(f, 4), (3, 4, 4), {"R": 4}, "", "--data", "images")
    assert sorted(os.listdir(data)) == sorted(os.path.basename(f) for f in files)
    assert os.listdir(prepare.cache_root(""))


def test_a_big_jpeg_is_decoded_small_by_the_decoder_and_matches_the_full_decode(tmp_path):
    path = picture(str(tmp_path / "big.jpg"), 0, size=(512, 384))
    fast, full = readers.decode_image(path, 32).astype(float), readers.read_image(path, 32).numpy().astype(float)
    assert fast.shape == full.shape == (3, 32, 32)
    assert np.abs(fast - full).mean() < 3  # grey levels out of 255: the same picture, resampled otherwise


def test_unreadable_files_are_left_out_when_few_and_an_error_when_many(tmp_path, capsys):
    many = folder_of(tmp_path / "many", [f"{i}.png" for i in range(120)])
    (many / "55.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    mod = M.modality(settings_image())
    tr, va, _ = mod.load(str(many))
    assert len(tr["x"]) + len(va["x"]) == 119
    assert re.search(r"left out 1 of 120 images .*55.png", capsys.readouterr().out)
    few = folder_of(tmp_path / "few", [f"{i}.png" for i in range(10)])
    (few / "3.png").write_bytes(b"not an image")
    message = one_line_error(lambda: M.modality(settings_image()).load(str(few)))
    assert re.search(r"--data .*few: 1 of 10 images cannot be read \(more than 1%\); the first: .*3.png", message)


def test_hflip_mirrors_a_random_half_drawn_from_the_runs_generator():
    mod = M.modality(settings_image(hflip=True))
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    enc, _, _ = mod.training_batch({"x": x}, torch.arange(64), 0, torch.Generator().manual_seed(0))
    flipped = [torch.equal(e, xi.flip(-1)) for e, xi in zip(enc, x)]
    kept = [torch.equal(e, xi) for e, xi in zip(enc, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 20 < sum(flipped) < 44
    again, _, _ = mod.training_batch({"x": x}, torch.arange(64), 0, torch.Generator().manual_seed(0))
    assert torch.equal(enc, again)


@pytest.fixture(scope="module")
def afhq_like(tmp_path_factory):
    """Two classes of pictures any model tells apart: dark ones and bright ones."""
    root = tmp_path_factory.mktemp("afhq")
    for cls, level in (("dark", 30), ("bright", 220)):
        for i in range(12):
            a = np.full((20, 20, 3), level, np.uint8) + np.random.default_rng(i).integers(0, 20, (20, 20, 3), np.uint8)
            os.makedirs(root / cls, exist_ok=True)
            Image.fromarray(a).save(root / cls / f"{i}.jpg")
    return str(root)


def test_resume_with_the_cache_and_hflip_equals_one_run(afhq_like, tmp_path, monkeypatch):
    from test_reliability import ctrl_c, once_at_call
    flags = TINY + ["--data", afhq_like, "--hflip", "--labels", "folders", "--steps", "6"]
    train.main(flags + ["--out", str(tmp_path / "one")])
    monkeypatch.setattr(train.V, "kl_weight", once_at_call(3, ctrl_c)(train.V.kl_weight))
    with pytest.raises(SystemExit):
        train.main(flags + ["--out", str(tmp_path / "two")])
    monkeypatch.undo()
    train.main(["--out", str(tmp_path / "two"), "--resume"])
    assert_same_run(str(tmp_path / "one" / "ckpt.pt"), str(tmp_path / "two" / "ckpt.pt"))
    # the class names travel with the checkpoint: sample.py takes one by name
    ckpt = str(tmp_path / "one" / "ckpt.pt")
    rows = sample.main(["--ckpt", ckpt, "--n", "2", "--sample-steps", "2", "--label", "dark",
                        "--out", str(tmp_path / "s.png")])
    assert rows[0].shape == (2, 3, 16, 16)
    with pytest.raises(SystemExit, match="--label cat: expected one of bright, dark or 0..1"):
        sample.main(["--ckpt", ckpt, "--label", "cat"])


def test_labels_and_flips_are_refused_where_they_do_nothing(tmp_path):
    message = one_line_error(lambda: train.main(TINY + ["--modality", "video", "--labels", "folders",
                                                        "--out", str(tmp_path / "v")]))
    assert "--labels" in message and not os.path.exists(tmp_path / "v")
    message = one_line_error(lambda: train.main(TINY + ["--labels", "folders", "--out", str(tmp_path / "i")]))
    assert "--labels folders: takes the classes from the folders of --data" in message
    assert not os.path.exists(tmp_path / "i")


def test_frames_load_in_natural_order(tmp_path):
    """ffmpeg's %d names: 1.png ... 12.png must not load as 1, 10, 11, 12, 2, ..."""
    for k in range(1, 13):
        os.makedirs(tmp_path / "clip", exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * k, np.uint8)).save(tmp_path / "clip" / f"{k}.png")
    clip = readers.read_clips(str(tmp_path), 12, 8)  # (1, 3, T, R, R)
    assert clip[0, 0, :, 0, 0].tolist() == [20 * k for k in range(1, 13)]


def write_video(path, frames, size=(40, 40)):
    """An .mp4 whose frame k is lit from the left up to 2k pixels: brighter and brighter."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(frames):
            a = np.zeros((size[1], size[0], 3), np.uint8)
            a[:, :2 * k] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_files_are_cut_into_windows_with_a_stride(tmp_path, capsys):
    write_video(tmp_path / "a.mp4", 20)
    write_video(tmp_path / "b.mp4", 5)  # shorter than a clip: skipped, and said
    clips = readers.clip_listing(str(tmp_path), 8, 4)
    assert clips == [(str(tmp_path / "a.mp4"), s) for s in (0, 4, 8, 12)]
    assert "skipped 1 clip(s) shorter than 8 frames" in capsys.readouterr().out
    mod = M.modality(settings("video", frames=8, clip_stride=4, resolution=16))
    tr, va, _ = mod.load(str(tmp_path))
    x = torch.cat([tr["x"][:], va["x"][:]])  # (4, 3, T, R, R), split at random
    assert (x.float().mean((1, 3, 4)).diff(dim=1) > 0).all()  # time runs forwards in every clip
    direct = {readers.decode_clip(c, 8, 16).tobytes() for c in clips}  # the cache holds exactly these
    assert {clip.numpy().tobytes() for clip in x} == direct


def test_video_files_without_pyav_are_one_line_saying_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setitem(importlib.sys.modules, "av", None)  # as if PyAV were not installed
    readers.video_frames.cache_clear()
    message = one_line_error(lambda: readers.clip_listing(str(tmp_path), 8, 8))
    assert "a.mp4: video files need PyAV: pip install av" in message


def convonet_folder(root, n, scale=1.0):
    """n small shapes in the ConvONet layout, class folder 'cls', all listed in train.lst."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "cls" / f"s{i}"
        d.mkdir(parents=True)
        pts = (rng.random((64, 3)) * 1.1 - 0.55) * scale
        np.savez(d / "points.npz", points=pts.astype(np.float16), occupancies=np.packbits(rng.random(64) < 0.5))
        np.savez(d / "pointcloud.npz", points=((rng.random((64, 3)) - 0.5) * scale).astype(np.float32))
    (root / "cls" / "train.lst").write_text("\n".join(f"s{i}" for i in range(n)) + "\n")
    (root / "cls" / "val.lst").write_text("s0\ns1\n")
    return root


def test_missing_convonet_shapes_are_named_and_counted(tmp_path, capsys):
    root = convonet_folder(tmp_path / "ok", 250)
    os.remove(root / "cls" / "s7" / "points.npz")  # a shape half copied
    with open(root / "cls" / "train.lst", "a") as f:
        f.write("not_there\n")  # an id the list names but the folder lacks
    from test_shapes import shapes
    tr, va, _ = shapes().load(str(root))
    assert (len(tr["x"]), len(va["x"])) == (249, 2)
    out = capsys.readouterr().out
    assert re.search(r"left out 2 of 251 shapes that cannot be read, the first: .*s7: no points.npz", out)
    # x, points and occupancy of one shape stay together through the split and the cache
    direct = readers.read_convonet(str(root), 512, 512, "val")
    assert torch.equal(va["points"][:], direct["points"]) and torch.equal(va["occ"][:], direct["occ"])
    EXACT = "donot_use_mm_for_euclid_dist"  # (the matmul form of cdist is off by ~1e-4)
    # and they are the file's own points on [-1, 1]^3 (divided by the padded half-side 0.55), each with its label
    with np.load(root / "cls" / "s0" / "points.npz") as f:
        pts, occ = torch.from_numpy(f["points"].astype(np.float32)) / 0.55, np.unpackbits(f["occupancies"])[:64]
    with np.load(root / "cls" / "s0" / "pointcloud.npz") as f:
        cloud = torch.from_numpy(f["points"]) / 0.55
    assert torch.cdist(va["x"][0], cloud, compute_mode=EXACT).min(1).values.max() < 1e-6
    nearest = torch.cdist(va["points"][0], pts, compute_mode=EXACT).min(1)
    assert nearest.values.max() < 1e-6 and torch.equal(va["occ"][0], torch.from_numpy(occ[nearest.indices.numpy()] > 0))


def test_convonet_points_in_millimetres_are_one_line(tmp_path):
    from test_shapes import shapes
    root = convonet_folder(tmp_path / "mm", 3, scale=1000.0)
    message = one_line_error(lambda: shapes().load(str(root)))
    assert re.search(r"s0/points.npz: points reach [0-9.]+; expected the padded unit cube", message)


from test_nerf import posed  # noqa: E402,F401  (the fixture: one scene's exact views, SRN layout among others)


def test_srn_scenes_prepared_give_the_batches_of_the_scenes_in_memory(posed, tmp_path):
    import shutil
    for k in range(3):  # a folder of SRN scenes, as cars_train/
        shutil.copytree(posed["root"] / "srn" / "car1", tmp_path / "cars" / f"car{k}")
    data = str(tmp_path / "cars")
    flags = dict(resolution=16, plane_res=16, samples_per_ray=4)
    cached, direct = M.modality(settings("nerf", **flags)), M.modality(settings("nerf", no_cache=True, **flags))
    (tr_c, va_c, _), (tr_d, va_d, _) = cached.load(data), direct.load(data)
    assert isinstance(tr_c["images"], prepare.Part) and torch.is_tensor(tr_d["images"])
    for c, d in ((tr_c, tr_d), (va_c, va_d)):
        assert torch.equal(c["images"][torch.arange(3)], d["images"]) and torch.equal(c["poses"], d["poses"])
    assert cached.data_settings == direct.data_settings
    idx = torch.tensor([2, 0])
    a = cached.training_batch(tr_c, idx, 32, torch.Generator().manual_seed(0))
    b = direct.training_batch(tr_d, idx, 32, torch.Generator().manual_seed(0))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_evaluation_batches_shrink_for_large_items_and_the_scores_stay():
    # 64 pictures of 256x256 in one evaluation batch took ~0.9 GB of activations for a tiny model;
    # the batch now holds at most batch_values values, which must not move the validation PSNR
    mod = M.modality(settings_image())
    assert mod.batch_items(64) == 64 and mod.batch_items(1) == 1  # 32x32 pictures: as before
    assert M.modality(settings_image(resolution=256)).batch_items(64) == 16
    torch.manual_seed(0)
    vae = mod.build_vae().eval()
    val = {"x": torch.rand(10, 3, mod.resolution, mod.resolution) * 2 - 1}
    with torch.no_grad():
        whole, rows, _ = mod.evaluate(vae, val, "cpu")
        mod.batch_values = 3 * mod.values_per_item  # batches of 3, 3, 3, 1
        assert mod.batch_items(mod.eval_batch) == 3
        small, rows3, _ = mod.evaluate(vae, val, "cpu")
    assert small["psnr"] == pytest.approx(whole["psnr"], abs=1e-4)
    torch.testing.assert_close(rows3[1], rows[1], atol=1e-5, rtol=0)  # the sheet's reconstructions


def test_built_in_images_hold_one_light_primitive_on_a_dark_ramp():
    # the default run's data: one primitive per image, its colour in [0, 1] and the background in
    # [-1, 0], so every shape stands out; at its centre (on its band, for rings) the image is its colour
    mod = M.modality(settings())
    p = mod.synthetic_params(64, seed=3)
    assert p["centre"].shape == (64, 1, 2) and (p["colour"] >= 0).all() and (p["bg"] <= 0).all()
    x, y = mod.synthetic(64, seed=3)
    assert x.shape == (64, 3, 32, 32) and torch.equal(y, p["label"])
    on_shape = p["centre"][:, 0] + torch.where(p["label"] == 2, p["size"][:, 0], 0.0)[:, None] * torch.tensor([1.0, 0.0])
    inr = importlib.import_module("01_inr")
    # (within 1%: a thin ring's soft edges let a little of the background through at its band's middle)
    torch.testing.assert_close(inr.synthetic_render(p, on_shape[:, None])[:, 0], p["colour"][:, 0], atol=0.01, rtol=0)
    assert (p["angle"] == 0).all()  # squares stand upright: at every angle they came out as stars
