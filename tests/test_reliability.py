"""Reliability: resume exactly, never lose a checkpoint, a clear error for every bad input.

Each test states one guarantee of train.py / sample.py and tries to break it: a run cut
short (by Ctrl-C, or killed outright) and continued must end with the weights of a run
that never stopped; a process killed in the middle of writing a checkpoint must leave the
previous one loadable; bad input must be one line that names the flag or file, with
nothing written.
"""
import errno
import importlib
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

import engine
import figures
import readers
from conftest import TINY, settings, small_data

M = importlib.import_module("05_modalities")
train = importlib.import_module("train")
sample = importlib.import_module("sample")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensors(tree, prefix=""):
    """Every tensor in a checkpoint, by path (weights, optimiser moments, EMA, RNG states)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def assert_same_run(path_a, path_b):
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    for stage in ("stage1", "stage2"):
        assert a[stage]["step"] == b[stage]["step"]
        ta = tensors({k: a[stage][k] for k in ("vae", "opt", "ldm", "ema", "generator") if k in a[stage]})
        tb = tensors({k: b[stage][k] for k in ("vae", "opt", "ldm", "ema", "generator") if k in b[stage]})
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{stage}{k} differs"
    assert a["stage2"]["scale_factor"] == b["stage2"]["scale_factor"]


def once_at_call(n, action):
    """A wrapper factory: run `action` on the n-th call of the wrapped function, once."""
    calls = {"n": 0}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                action()
            return fn(*args, **kwargs)
        return wrapped
    return wrap


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, handled by train.py's handler


class Killed(Exception):
    """Stands for SIGKILL: the process is gone at once, nothing is saved."""


def kill():
    raise Killed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six steps of each stage in one go (one thread, like the tests: sums in another order differ)."""
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("ref") / "r")
    with small_data():
        train.main(TINY + ["--steps", "6", "--out", out])
    return os.path.join(out, "ckpt.pt")


def test_ctrl_c_then_resume_equals_one_run(reference, tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    # Ctrl-C during stage-1 step 3 and again during stage-2 step 2, each followed by --resume
    monkeypatch.setattr(train.V, "kl_weight", once_at_call(3, ctrl_c)(train.V.kl_weight))
    monkeypatch.setattr(train.LDM.LatentDiffusion, "loss", once_at_call(2, ctrl_c)(train.LDM.LatentDiffusion.loss))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "6", "--out", out])
    assert e.value.code == 130
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["stage1"]["step"] == 3
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out, "--resume"])
    assert e.value.code == 130
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["stage2"]["step"] == 2
    train.main(["--out", out, "--resume"])
    assert_same_run(reference, os.path.join(out, "ckpt.pt"))


def test_killed_run_resumes_from_its_last_checkpoint_exactly(reference, tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    flags = TINY + ["--steps", "6", "--ckpt-every", "2", "--out", out]
    # killed during stage-1 step 5 (the checkpoint of step 4 is on disk), then during stage-2 step 3
    monkeypatch.setattr(train.V, "kl_weight", once_at_call(5, kill)(train.V.kl_weight))
    with pytest.raises(Killed):
        train.main(flags)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["stage1"]["step"] == 4
    monkeypatch.setattr(train.LDM.LatentDiffusion, "loss", once_at_call(3, kill)(train.LDM.LatentDiffusion.loss))
    with pytest.raises(Killed):
        train.main(["--out", out, "--resume"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["stage2"]["step"] == 2
    train.main(["--out", out, "--resume"])
    assert_same_run(reference, os.path.join(out, "ckpt.pt"))


def test_resuming_a_finished_run_says_so_and_keeps_its_weights(reference, tmp_path, capsys):
    # --resume --steps 8 on a run that finished at 6: nothing trains, and the run says why
    out = str(tmp_path / "r")
    shutil.copytree(os.path.dirname(reference), out)
    train.main(["--out", out, "--resume", "--steps", "8"])
    said = capsys.readouterr().out
    assert "[vae] finished in an earlier run at step 6: not trained again" in said
    assert "[ldm] finished in an earlier run at step 6: not trained again" in said
    assert_same_run(reference, os.path.join(out, "ckpt.pt"))


SAVER = """
import importlib, sys, torch
sys.path.insert(0, {repo!r})
engine = importlib.import_module("engine")
state = {{"config": {{"modality": "image", "preset": "tiny"}}, "stage1": {{"step": 2}}, "big": torch.randn(8_000_000)}}
while True:
    engine.save_checkpoint(state, {path!r})
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    engine.save_checkpoint({"config": {"modality": "image", "preset": "tiny"}, "stage1": {"step": 1}}, path)
    child = subprocess.Popen([sys.executable, "-c", SAVER.format(repo=REPO, path=path)])
    try:
        deadline = time.time() + 60
        while not os.path.exists(path + ".tmp") and time.time() < deadline:  # it is writing now
            time.sleep(0.005)
        assert os.path.exists(path + ".tmp"), "the saver never started writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ck = engine.load_checkpoint(path)  # the old one, or a complete newer one: never a torn file
    assert ck["stage1"]["step"] in (1, 2)


def test_sigint_saves_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "r")
    child = subprocess.Popen([sys.executable, "-u", "train.py", *TINY, "--steps", "100000", "--out", out],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("[vae] step"):
            child.send_signal(signal.SIGINT)
            break
    try:  # a run that ignores the request would train on: fail instead of hanging
        lines += child.communicate(timeout=60)[0].splitlines(keepends=True)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail("train.py did not stop within 60 s of Ctrl-C")
    assert child.returncode == 130, "".join(lines)
    assert f"python train.py --out {out} --resume" in lines[-1]
    ck = engine.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["stage1"]["step"] >= 2 and not ck["stage1"].get("done")


def test_non_finite_loss_stops_naming_step_and_term(tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    poisoned = {"on": False}

    def recon(self, pred, target):  # the Laplace term of 05, turned to NaN from its third call on
        value = M.Modality.recon(self, pred, target)
        return value * float("nan") if poisoned["on"] else value
    monkeypatch.setattr(M.ImageModality, "recon", once_at_call(3, lambda: poisoned.update(on=True))(recon))
    with pytest.raises(SystemExit, match=r"stage 1, step 2: the reconstruction term of the loss is not finite"):
        train.main(TINY + ["--steps", "6", "--out", out])
    ck = engine.load_checkpoint(os.path.join(out, "ckpt.pt"))  # the checkpoint of step 2 is intact
    assert ck["stage1"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["stage1"]["vae"].values())
    # stage 2, on the same run once stage 1 is fixed
    poisoned["on"] = False
    train.main(["--out", out, "--resume", "--stage", "vae"])
    monkeypatch.setattr(train.LDM.LatentDiffusion, "loss", lambda self, z0, *draws: sum(p.sum() for p in self.parameters()) * float("inf"))
    with pytest.raises(SystemExit, match=r"stage 2, step 0: the diffusion loss is not finite"):
        train.main(["--out", out, "--stage", "ldm"])


class Evil:
    """Unpickling this would create a folder: the side effect a crafted checkpoint could have."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"config": Evil(marker), "stage1": {}}, tmp_path / "torch_format.pt")
    with open(tmp_path / "plain_pickle.pt", "wb") as f:
        pickle.dump({"config": Evil(marker)}, f)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": Evil(marker), "stage1": {}}, run / "ckpt.pt")
    for call in (lambda: sample.main(["--ckpt", str(tmp_path / "torch_format.pt")]),
                 lambda: sample.main(["--ckpt", str(tmp_path / "plain_pickle.pt")]),
                 lambda: train.main(["--out", str(run), "--resume"])):
        with pytest.raises(SystemExit, match="not a DDMI checkpoint"):
            call()
        assert not os.path.exists(marker), "unpickling ran code"
    assert pickle.loads(pickle.dumps(Evil(marker))) is None and os.path.isdir(marker)  # the payload is real


def one_line_error(call):
    with pytest.raises(SystemExit) as e:
        call()
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message.strip(), message  # a string exits with status 1
    return message


def write_png(path, a):
    """A PNG written by hand (so greyscale and 16-bit files really are what they claim to be)."""
    a = np.asarray(a)
    H, W = a.shape[:2]
    C = 1 if a.ndim == 2 else a.shape[2]
    depth = 16 if a.dtype == np.uint16 else 8
    rows = a.astype(">u2" if depth == 16 else "u1").reshape(H, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", W, H, depth, {1: 0, 3: 2, 4: 6}[C], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_bad_input_is_one_line_naming_the_flag_or_file_and_writes_nothing(tmp_path, reference):
    out = str(tmp_path / "out")
    run = lambda *flags: lambda: train.main(TINY + ["--out", out, *flags])  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    one_image, corrupt = tmp_path / "one", tmp_path / "corrupt"
    one_image.mkdir()
    corrupt.mkdir()
    write_png(one_image / "a.png", np.zeros((8, 8, 3), np.uint8))
    for i in range(3):
        write_png(corrupt / f"ok{i}.png", np.zeros((8, 8, 3), np.uint8))
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a png")
    bad_npz = {"flat.npz": {"images": np.zeros((10, 3), np.float32)},
               "range.npz": {"images": np.full((4, 8, 8), 2.0, np.float32)},
               "two.npz": {"a": np.zeros((4, 8, 8), np.uint8), "b": np.zeros((4, 8, 8), np.uint8)},
               "objects.npz": {"images": np.array([{"x": 1}] * 4, dtype=object)}}
    for name, arrays in bad_npz.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "two.npz").read_bytes()[:50])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    other_modality = tmp_path / "other"
    other_modality.mkdir()
    ck = torch.load(reference, weights_only=True)
    ck["config"]["modality"] = "shape"
    torch.save(ck, other_modality / "ckpt.pt")
    cases = [
        (run("--data", str(tmp_path / "missing")), "--data .*missing: not a folder"),
        (run("--data", str(empty)), "--data .*empty: no images \\(.png .jpg"),
        (run("--data", str(one_image)), "--data .*one: 1 image.* need at least 2"),
        (run("--data", str(corrupt)), "broken.png: cannot read this image"),
        (run("--data", str(tmp_path / "flat.npz")), r"flat.npz: array 'images' is float32 \(10, 3\); expected \(n, H, W\)"),
        (run("--data", str(tmp_path / "range.npz")), "range.npz: array 'images' is float32 .* float in \\[0, 1\\]"),
        (run("--data", str(tmp_path / "two.npz")), "two.npz: expected an array named 'images'.*found a, b"),
        (run("--data", str(tmp_path / "objects.npz")), "objects.npz: cannot read this .npz"),
        (run("--data", str(tmp_path / "truncated.npz")), "truncated.npz: cannot read this .npz"),
        (run("--resolution", "0"), "--resolution 0: expected a positive integer"),
        (run("--resolution", "-32"), "--resolution -32: expected a positive integer"),
        (run("--resolution", "abc"), "argument --resolution: invalid int value: 'abc'"),
        (run("--steps", "-1"), "--steps -1: expected a number >= 0"),
        (run("--val-fraction", "1"), "--val-fraction 1.0: expected a fraction"),
        (run("--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        (run("--frames", "8"), "--frames: only for video; --modality is image"),
        (run("--plane-res", "16"), "--plane-res: only for shape and nerf; --modality is image"),
        (run("--enc-mult", "1,2"), "--enc-mult 1,2: --variant hdbf_cfc reads fields at three scales"),
        (lambda: train.main(TINY + ["--out", str(blocker / "run")]), "--out .*a_file/run: cannot write there"),
        (lambda: train.main(["--out", str(other_modality), "--resume", "--modality", "image"]),
         "checkpoint of modality 'shape', but --modality image"),
        (lambda: sample.main(["--ckpt", reference, "--resolution", "0"]), "--resolution: .*expected positive integers"),
        (lambda: sample.main(["--ckpt", str(tmp_path / "nope.pt")]), "nope.pt: no such checkpoint file"),
        (lambda: sample.main(["--ckpt", reference, "--reconstruct", str(corrupt)]), "broken.png: cannot read"),
        (lambda: sample.main(["--ckpt", reference, "--reconstruct", str(empty)]), "--reconstruct .*empty: no images"),
    ]
    for call, expected in cases:
        message = one_line_error(call)
        assert re.search(expected, message), (expected, message)
        assert not os.path.exists(out), f"{expected!r}: the run folder was created anyway"
    # the user's files are as they were
    assert os.listdir(other_modality) == ["ckpt.pt"] and len(os.listdir(corrupt)) == 4
    assert (corrupt / "broken.png").read_bytes() == b"\x89PNG\r\n\x1a\nthis is not the rest of a png"


def test_bad_flag_exits_non_zero_with_one_line_on_stderr():
    r = subprocess.run([sys.executable, "train.py", "--resolution", "abc"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["train.py: argument --resolution: invalid int value: 'abc' (see --help)"]


def test_images_of_any_size_grey_rgba_and_16_bit_load(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # constant colours, so the expected 8-bit values are known exactly
    write_png(folder / "rgb8_20x30.png", np.full((20, 30, 3), (10, 200, 90), np.uint8))
    write_png(folder / "grey8_17x17.png", np.full((17, 17), 77, np.uint8))
    write_png(folder / "rgba8_12x9.png", np.full((12, 9, 4), (255, 0, 128, 40), np.uint8))  # alpha dropped
    write_png(folder / "grey16_15x40.png", np.full((15, 40), 40000, np.uint16))  # 40000/65535 -> 156/255
    write_png(folder / "rgb16_33x20.png", np.full((33, 20, 3), (65535, 0, 30000), np.uint16))
    expected = {"rgb8_20x30": (10, 200, 90), "grey8_17x17": (77, 77, 77), "rgba8_12x9": (255, 0, 128),
                "grey16_15x40": (156, 156, 156), "rgb16_33x20": (255, 0, 117)}
    for name, colour in expected.items():
        x = readers.read_image(str(folder / f"{name}.png"), 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8, name
        got = x.flatten(1).float()
        assert (got.min(1).values == got.max(1).values).all(), name  # still constant after crop and resize
        assert torch.allclose(got[:, 0], torch.tensor(colour, dtype=torch.float), atol=1), (name, got[:, 0])
    train_set, val_set, _ = M.modality(settings(resolution=16, val_fraction=0.2)).load(str(folder))
    assert train_set["x"].shape == (4, 3, 16, 16) and val_set["x"].shape == (1, 3, 16, 16)


def test_an_npz_of_images_loads_like_the_same_images_as_files(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 24, 30), dtype=np.uint8)  # (n, H, W), not square: cropped
    colour = rng.random((5, 20, 20, 3)).astype(np.float32)  # float in [0, 1]
    np.savez(tmp_path / "grey.npz", images=grey, subject=np.arange(5))  # extra arrays are ignored
    np.savez(tmp_path / "colour.npz", colour)  # a single array, whatever its name
    (tmp_path / "grey").mkdir()
    for i, im in enumerate(grey):
        write_png(tmp_path / "grey" / f"{i}.png", im)
    from_npz = readers.read_images(str(tmp_path / "grey.npz"), 16)
    assert from_npz.shape == (5, 3, 16, 16) and torch.equal(from_npz, readers.read_images(str(tmp_path / "grey"), 16))
    from_float = readers.read_images(str(tmp_path / "colour.npz"), 20)  # same size: no resampling
    assert torch.equal(from_float, torch.from_numpy(np.round(colour * 255).astype(np.uint8)).permute(0, 3, 1, 2))
    train_set, val_set, _ = M.modality(settings(resolution=16, val_fraction=0.2)).load(str(tmp_path / "grey.npz"))
    assert len(train_set["x"]) == 4 and len(val_set["x"]) == 1


# ----------------------------------------------------------------------------------------
# One run per folder, full disks, damaged checkpoints
# ----------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    out = str(tmp_path / "r")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-u", "train.py", *TINY, "--steps", "100000", "--ckpt-every", "2",
                              "--out", out], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:  # wait until it trains (and so holds the lock)
            if line.startswith("[vae] step"):
                break
        second = subprocess.run([sys.executable, "train.py", *TINY, "--seed", "1", "--out", out], cwd=REPO,
                                capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.strip().splitlines() == [
            f"--out {out}: in use by process {first.pid} on {socket.gethostname()} (its lock: {out}/.lock); "
            f"wait for it, or use another --out"]
    finally:
        first.send_signal(signal.SIGKILL)  # gone without releasing its lock
        first.wait()
    assert open(os.path.join(out, ".lock")).read().split()[0] == str(first.pid)
    third = subprocess.run([sys.executable, "train.py", *TINY, "--overwrite", "--out", out], cwd=REPO,
                           capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"process {first.pid}, which held it, is gone; taking its lock over" in third.stdout
    assert not os.path.exists(os.path.join(out, ".lock"))  # released at the end


def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "r")
    real_save = engine.torch.save
    saves = {"n": 0}

    def save(state, path):  # the second checkpoint finds the disk full half-way
        saves["n"] += 1
        if saves["n"] == 2:
            open(path, "wb").write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(state, path)
    monkeypatch.setattr(engine.torch, "save", save)
    message = one_line_error(lambda: train.main(TINY + ["--steps", "6", "--out", out]))
    assert message == (f"no space left on {out} while writing ckpt.pt; the last checkpoint {out}/ckpt.pt, "
                       f"stage 1 step 2, is intact")
    assert not [f for f in os.listdir(out) if ".tmp" in f], "the partial file was left behind"
    assert engine.load_checkpoint(os.path.join(out, "ckpt.pt"))["stage1"]["step"] == 2
    # torch.save itself only says "unexpected pos" when the disk fills: told apart by the free space left
    saves["n"] = 1
    monkeypatch.setattr(engine.torch, "save", lambda state, path: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    message = one_line_error(lambda: train.main(["--out", out, "--resume"]))
    assert message.startswith(f"no space left on {out} while writing ckpt.pt; the last checkpoint")


def test_a_sheet_that_cannot_be_written_is_one_line(tmp_path, reference, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(figures.plt.Figure, "savefig", full)
    message = one_line_error(lambda: sample.main(["--ckpt", reference, "--n", "2", "--out", str(tmp_path / "s.png")]))
    assert message.startswith(f"no space left on {tmp_path} while writing s.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, says", [
    (lambda b: b"", "empty (0 bytes), not a checkpoint"),
    (lambda b: b[: len(b) // 2], "truncated or damaged"),
    (lambda b: b"not a checkpoint at all", "not a PyTorch checkpoint"),
])
def test_damaged_checkpoints_are_named_in_one_line(tmp_path, reference, damage, says):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(damage(open(reference, "rb").read()))
    message = one_line_error(lambda: sample.main(["--ckpt", str(path)]))
    assert message.startswith(f"{path}: {says}") and "\n" not in message
