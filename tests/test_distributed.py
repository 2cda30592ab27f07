"""Several processes (torchrun + DistributedDataParallel, gloo on the CPU) and gradient
accumulation: the same global batch must give the same training, however it is split.

Each run here is a real `python train.py` in fresh processes, as a user starts it.
"""
import importlib
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch.distributed as dist

import engine

train = importlib.import_module("train")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny model; global batches of 4 (stage 1) and 8 (stage 2), 3 steps each
TINY = ["--modality", "image", "--resolution", "16", "--batch-size", "4", "--z-ch", "2", "--enc-ch", "8",
        "--field-ch", "4", "--mlp-hidden", "16", "--ldm-ch", "16", "--ldm-batch", "8", "--steps", "3",
        "--sample-steps", "2", "--sampler", "ddim", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run three ways: one process, one process with 2 micro-batches, 2 processes."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo backend")
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    os.makedirs(tmp / "data")
    for i in range(12):  # a folder of small random images (no labels: the unconditional path)
        matplotlib.image.imsave(tmp / "data" / f"im{i}.png", rng.random((16, 16, 3)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    # float32: a mean of two half-batch means is the whole batch's mean up to float rounding (bf16
    # rounds far coarser); the fast paths (bf16, channels-last weights) get a 2-process run of their own
    common, f32 = TINY + ["--data", str(tmp / "data")], ["--gpu-paths", "off"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    commands = {
        "single": [sys.executable, "train.py", *common, *f32, "--out", str(tmp / "single")],
        "accum": [sys.executable, "train.py", *common, *f32, "--grad-accum", "2", "--out", str(tmp / "accum")],
        "ddp": [*torchrun, *common, *f32, "--out", str(tmp / "ddp")],
        "ddp_fast": [*torchrun, *common, "--gpu-paths", "on", "--out", str(tmp / "ddp_fast")],
    }
    out = {}
    for name, cmd in commands.items():
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        out[name] = (p.stdout, engine.load_checkpoint(str(tmp / name / "ckpt.pt")))
    return out


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ["ddp", "ddp_fast"])
def test_both_ranks_end_with_identical_weights(runs, name):
    stdout, _ = runs[name]
    # printed once, by rank 0, after each stage: the largest difference of any weight between ranks
    assert "[vae] weights identical on the 2 processes: largest difference 0" in stdout
    assert "[ldm] weights identical on the 2 processes: largest difference 0" in stdout
    assert stdout.count("[vae] step") == 3  # one voice: rank 1 prints nothing


@pytest.mark.parametrize("split", ["ddp", "accum"])
def test_split_batch_matches_one_process(runs, split):
    # 2 processes x 2 items, or 2 micro-batches of 2, take the step one process takes on all 4
    _, single = runs["single"]
    _, other = runs[split]
    for stage, key in (("stage1", "vae"), ("stage2", "ldm"), ("stage2", "ema")):
        assert other[stage]["step"] == single[stage]["step"] == 3
        # equal up to float rounding (a mean of two half-batch means), after 3 Adam steps
        assert max_difference(other[stage][key], single[stage][key]) < 1e-5, (stage, key)
    assert other["stage2"]["scale_factor"] == pytest.approx(single["stage2"]["scale_factor"], rel=1e-6)
    # and the logged losses are the global batch's
    for stage in ("stage1", "stage2"):
        for (s1, a), (s2, b) in zip(single[stage]["history"], other[stage]["history"]):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-4)


def test_batch_not_divisible_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--batch-size 4: must be divisible by processes x --grad-accum = 1 x 3"):
        train.main(TINY + ["--grad-accum", "3", "--out", str(tmp_path / "r")])
    assert not os.path.exists(tmp_path / "r")
