"""Every reader against broken data: for each field of each format, a wrong dtype, a wrong shape, a NaN
and a missing key. Each must end train.py with one line naming the file (an exit status of 1, no
traceback) and leave no run folder behind; the unbroken data must load.

The formats: an image folder and an image .npz; a clip folder, a clip .npz and a clip .npy; a shape
.npz and the ConvONet layout; posed pictures as an .npz, a NeRF-synthetic folder and an SRN folder.
"""
import json
import os

import matplotlib.image
import numpy as np
import pytest

import train
from conftest import TINY

VIDEO = ["--modality", "video", "--resolution", "8", "--frames", "4", "--batch-size", "2", "--z-ch", "2",
         "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16", "--steps", "1", "--stage", "vae"]
SHAPE = ["--modality", "shape", "--plane-res", "16", "--resolution", "8", "--batch-size", "2", "--coords-per-item",
         "64", "--z-ch", "2", "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16", "--steps", "1", "--stage", "vae"]
NERF = ["--modality", "nerf", "--plane-res", "16", "--resolution", "8", "--batch-size", "1", "--coords-per-item", "16",
        "--samples-per-ray", "4", "--z-ch", "2", "--enc-ch", "8", "--field-ch", "4", "--mlp-hidden", "16",
        "--steps", "1", "--stage", "vae"]
rng = np.random.default_rng(0)


def nan_like(a):
    a = np.asarray(a, dtype=np.float32).copy()
    a.flat[0] = np.nan
    return a


def mutations(arrays):
    """For every array: (name, how it is broken, the arrays broken that way)."""
    for key, a in arrays.items():
        others = {k: v for k, v in arrays.items() if k != key}
        yield key, "strings", {**others, key: np.full(np.shape(a), "x")}
        yield key, "complex", {**others, key: np.asarray(a).astype(np.complex64)}
        yield key, "shape", {**others, key: np.zeros((2,), np.float32)}
        yield key, "nan", {**others, key: nan_like(a)}
        yield key, "missing", {**others, "unrelated": np.zeros(3)} if len(others) == 0 else others


def one_line_exit(flags, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--out", str(out)])
    message = e.value.code
    assert isinstance(message, str) and message.strip() and "\n" not in message.strip(), message
    assert not out.exists(), f"a run folder was left behind ({message})"
    return message


# ----------------------------------------------------------------------------------------
# Arrays in .npz / .npy files
# ----------------------------------------------------------------------------------------
NPZ = {
    "image": (TINY + ["--steps", "1", "--stage", "vae"], {"images": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)}),
    "clip": (VIDEO, {"clips": rng.integers(0, 256, (4, 4, 8, 8, 3), dtype=np.uint8)}),
    "shape": (SHAPE, {"surface_points": (rng.random((3, 64, 3)) - 0.5).astype(np.float32) * 0.8,
                      "occ_packed": rng.integers(0, 256, (3, 64), dtype=np.uint8), "res": np.int32(8)}),
    "scene": (NERF, {"images_rgba": rng.integers(0, 256, (10, 8, 8, 4), dtype=np.uint8),
                     "poses": np.tile(np.eye(4, dtype=np.float32), (10, 1, 1)), "focal": np.float32(10.0),
                     "near": 2.0, "far": 6.0}),
}
NPZ["scene"][1]["poses"][:, 2, 3] = 4.0  # cameras 4 units out on +z (/ 1.5 in the cube), looking down -z
OPTIONAL = {"near", "far"}  # (a scene .npz without them takes 2 and 6)


@pytest.mark.parametrize("kind", list(NPZ))
def test_the_unbroken_npz_loads(kind, tmp_path):
    flags, arrays = NPZ[kind]
    np.savez(tmp_path / "ok.npz", **arrays)
    train.main(flags + ["--data", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("kind, key, how, arrays",
                         [(kind, key, how, broken) for kind, (_, arrays) in NPZ.items()
                          for key, how, broken in mutations(arrays) if not (how == "missing" and key in OPTIONAL)])
def test_a_broken_npz_is_one_line(kind, key, how, arrays, tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    message = one_line_exit(NPZ[kind][0] + ["--data", str(path)], tmp_path)
    assert str(path) in message, message


@pytest.mark.parametrize("how, a", [("strings", np.full((4, 4, 8, 8, 3), "x")), ("shape", np.zeros((4, 8), np.uint8)),
                                    ("nan", nan_like(rng.random((4, 4, 8, 8, 3)))),
                                    ("too few frames", np.zeros((4, 2, 8, 8, 3), np.uint8))])
def test_a_broken_clip_npy_is_one_line(how, a, tmp_path):
    np.save(tmp_path / "clips.npy", a)
    assert str(tmp_path / "clips.npy") in one_line_exit(VIDEO + ["--data", str(tmp_path / "clips.npy")], tmp_path)


@pytest.mark.parametrize("how", ["res as two numbers", "millimetres", "occupancy as floats"])
def test_shape_values_that_would_train_silently_wrong_are_refused(how, tmp_path):
    arrays = dict(NPZ["shape"][1])
    if how == "res as two numbers":
        arrays["res"] = np.array([8, 8])
    elif how == "millimetres":
        arrays["surface_points"] = arrays["surface_points"] * 1000
    else:
        del arrays["occ_packed"], arrays["res"]
        arrays["occupancy"] = rng.random((3, 8, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "s.npz", **arrays)
    assert str(tmp_path / "s.npz") in one_line_exit(SHAPE + ["--data", str(tmp_path / "s.npz")], tmp_path)


# ----------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------
def convonet(root, points=None, occupancies=None, cloud=None):
    for i in range(3):
        d = root / "cls" / f"s{i}"
        d.mkdir(parents=True)
        pts = (rng.random((200, 3)) * 1.1 - 0.55).astype(np.float16)
        np.savez(d / "points.npz", points=pts if points is None else points,
                 occupancies=np.packbits(rng.random(200) < 0.5) if occupancies is None else occupancies)
        np.savez(d / "pointcloud.npz", points=(rng.random((300, 3)) - 0.5).astype(np.float32) if cloud is None else cloud)


@pytest.mark.parametrize("field, value", [("points", np.full((200, 3), "x")), ("points", np.zeros((200, 2))),
                                          ("points", nan_like(rng.random((200, 3)))), ("occupancies", np.zeros(3)),
                                          ("cloud", np.zeros((300,))), ("cloud", nan_like(rng.random((300, 3))))])
def test_a_broken_convonet_shape_is_one_line(field, value, tmp_path):
    convonet(tmp_path / "data", **{field: value})
    assert "points" in one_line_exit(SHAPE + ["--data", str(tmp_path / "data")], tmp_path)


def nerf_synthetic(folder, **changes):
    os.makedirs(folder / "train")
    frames = []
    for i in range(10):  # (every tenth view is held out)
        matplotlib.image.imsave(folder / "train" / f"r_{i}.png", rng.random((8, 8, 4)))
        pose = np.eye(4)
        pose[2, 3] = 4.0
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": pose.tolist()})
    meta = {"camera_angle_x": 0.7, "frames": frames}
    for key, value in changes.items():
        if key == "transform_matrix":
            frames[1]["transform_matrix"] = value
        elif value is None:
            del meta[key]
        else:
            meta[key] = value
    json.dump(meta, open(folder / "transforms_train.json", "w"))


@pytest.mark.parametrize("changes", [{}, {"camera_angle_x": "wide"}, {"camera_angle_x": None}, {"camera_angle_x": [1, 2]},
                                     {"camera_angle_x": float("nan")}, {"frames": None}, {"frames": 3},
                                     {"transform_matrix": [[1, 0, 0, 0]] * 3}, {"transform_matrix": "eye"},
                                     {"transform_matrix": [[float("nan")] * 4] * 4}])
def test_nerf_synthetic_fields(changes, tmp_path):
    nerf_synthetic(tmp_path / "scene", **changes)
    flags = NERF + ["--data", str(tmp_path / "scene")]
    if not changes:  # the unbroken folder trains
        train.main(flags + ["--out", str(tmp_path / "run")])
    else:
        assert "transforms_train.json" in one_line_exit(flags, tmp_path)


@pytest.mark.parametrize("broken", [None, "intrinsics nan", "intrinsics missing", "pose 15 numbers", "pose nan"])
def test_srn_fields(broken, tmp_path):
    scene = tmp_path / "srn" / "car"
    os.makedirs(scene / "rgb")
    os.makedirs(scene / "pose")
    for i in range(10):  # (every tenth view is held out)
        matplotlib.image.imsave(scene / "rgb" / f"{i:06d}.png", rng.random((8, 8, 3)))
        pose = np.eye(4)
        pose[2, 3] = 1.3
        values = pose.reshape(-1).tolist()
        if i == 2 and broken == "pose 15 numbers":
            values = values[:15]
        if i == 2 and broken == "pose nan":
            values[3] = float("nan")
        open(scene / "pose" / f"{i:06d}.txt", "w").write(" ".join(map(str, values)))
    if broken != "intrinsics missing":
        f = "nan" if broken == "intrinsics nan" else "10.0"
        open(scene / "intrinsics.txt", "w").write(f"{f} 4.0 4.0 0.\n0. 0. 0.\n1.\n8 8\n")
    flags = NERF + ["--data", str(tmp_path / "srn")]
    if broken is None:
        train.main(flags + ["--out", str(tmp_path / "run")])
    else:
        assert str(scene) in one_line_exit(flags, tmp_path)
