"""What the tests share: a tiny image model's flags, and built-in datasets small enough to make in no time."""
import contextlib
import dataclasses
import importlib

import pytest
import torch

M = importlib.import_module("05_modalities")
VideoModality = importlib.import_module("06_video").VideoModality
ShapeModality = importlib.import_module("09_shapes").ShapeModality
NerfModality = importlib.import_module("11_nerf").NerfModality

# A model small enough to train in seconds: 16x16 images, a 2x4x4 latent. Each call below is what
# a user types, as a list of flags.
TINY = ["--modality", "image", "--resolution", "16", "--batch-size", "4", "--z-ch", "2", "--enc-ch", "8",
        "--field-ch", "4", "--mlp-hidden", "16", "--ldm-ch", "16", "--ldm-batch", "8", "--steps", "4",
        "--sample-steps", "2", "--sampler", "ddim", "--log-every", "2", "--ckpt-every", "2"]

# The built-in datasets' sizes are class constants of the modalities; the tests shrink them.
SMALL = {M.ImageModality: dict(synthetic_train=32, synthetic_val=8),
         VideoModality: dict(synthetic_train=8, synthetic_val=2),
         ShapeModality: dict(synthetic_train=8, synthetic_val=2, num_surface=512, num_queries=512, encoder_points=256),
         NerfModality: dict(synthetic_train=6, synthetic_val=2, num_points=256, encoder_points=128)}


@contextlib.contextmanager
def small_data():
    """The built-in datasets shrunk (for fixtures that outlive one test, where monkeypatch cannot go)."""
    mp = pytest.MonkeyPatch()
    for cls, sizes in SMALL.items():
        for name, value in sizes.items():
            mp.setattr(cls, name, value)
    try:
        yield
    finally:
        mp.undo()


def train_once(tmp_path_factory, flags):
    """A complete tiny run of train.py with these flags in a fresh folder (for module-scoped fixtures)."""
    out = str(tmp_path_factory.mktemp("run") / "r")
    with small_data():
        importlib.import_module("train").main(flags + ["--out", out])
    return out


@pytest.fixture(autouse=True)
def small():
    torch.set_num_threads(1)  # the same float results on every machine, whatever its cores
    with small_data():
        yield


def settings(modality="image", **changes):
    """The settings a run hands its modality (train.py's config): the tiny preset, with changes."""
    config = importlib.import_module("config")
    cfg = {**dataclasses.asdict(config.Config()), **config.preset(modality, "tiny"), "modality": modality, **changes}
    if "resolution" in changes and modality in ("image", "video"):
        cfg["plane_res"] = cfg["resolution"]  # (as config.parse: these planes have the data's side)
    return cfg


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Prepared datasets go to a folder of the tests', never to the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
