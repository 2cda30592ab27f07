"""train.py and sample.py end to end on a tiny run: files, reloading, determinism, refusals.

These double as usage examples: each call below is what a user types, as a list of flags.
"""
import copy
import importlib
import json
import os
import re

import matplotlib.image
import numpy as np
import pytest
import torch

import config
import engine
from conftest import TINY, settings, train_once

inr = importlib.import_module("01_inr")
M = importlib.import_module("05_modalities")
readers = importlib.import_module("readers")
train = importlib.import_module("train")
sample = importlib.import_module("sample")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One complete tiny run (both stages), shared by the tests that only read it."""
    return train_once(tmp_path_factory, TINY)


def test_train_writes_its_files(run):
    for name in ("ckpt.pt", "losses.png", "recon.png", "samples.png", "metrics.json"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["stage1"]["steps"] == 4 and m["stage2"]["steps"] == 4
    assert 0 < m["stage1"]["val_psnr"] < 60 and m["stage2"]["loss"] > 0
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")], "a temporary file was left behind"


def test_checkpoint_reloads_and_reproduces_validation_psnr(run):
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)  # plain tensors and containers only
    assert ck["config"]["modality"] == "image" and ck["stage1"]["done"] and ck["stage2"]["done"]
    _, cfg, mod, vae, ldm = sample.load_run(os.path.join(run, "ckpt.pt"), torch.device("cpu"))
    assert ldm is not None
    _, val, _ = mod.load(None)
    scores, _, _ = train.evaluate_vae(mod, vae, val, torch.device("cpu"))
    assert scores["psnr"] == pytest.approx(ck["stage1"]["val_psnr"], abs=1e-4)


def test_same_seed_same_samples(run, tmp_path):
    args = ["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "3", "--sample-steps", "3", "--resolution", "8,16,24"]
    a = sample.main(args + ["--seed", "5", "--out", str(tmp_path / "a.png")])
    b = sample.main(args + ["--seed", "5", "--out", str(tmp_path / "b.png")])
    c = sample.main(args + ["--seed", "6", "--out", str(tmp_path / "c.png")])
    assert [r.shape for r in a] == [(3, 3, 8, 8), (3, 3, 16, 16), (3, 3, 24, 24)]
    for ra, rb in zip(a, b):
        assert torch.equal(ra, rb)
    assert not torch.equal(a[1], c[1])
    assert os.path.getsize(tmp_path / "a.png") > 0


def test_guided_sampling_of_one_class(run, tmp_path):
    rows = sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--label", "1",
                        "--guidance", "3", "--sampler", "ddpm", "--out", str(tmp_path / "g.png")])
    assert rows[0].shape == (2, 3, 16, 16) and torch.isfinite(rows[0]).all()
    with pytest.raises(SystemExit, match="--label 7"):
        sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--label", "7"])


def test_samples_take_the_runs_guidance_unless_told(run, tmp_path):
    # the tiny image preset guides its class-conditional samples (scale 1.5, docs/quality.md): the
    # training sheet and sample.py use the run's scale unless --guidance says otherwise
    assert torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["config"]["guidance"] == 1.5
    args = ["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "3", "--sample-steps", "2"]
    default = sample.main(args + ["--out", str(tmp_path / "a.png")])
    same = sample.main(args + ["--guidance", "1.5", "--out", str(tmp_path / "b.png")])
    none = sample.main(args + ["--guidance", "1", "--out", str(tmp_path / "c.png")])
    assert torch.equal(default[0], same[0]) and not torch.equal(default[0], none[0])


def _write_images(folder, n=6):
    """A folder with RGB, greyscale and RGBA PNGs of different sizes, in a sub-folder too."""
    os.makedirs(os.path.join(folder, "sub"))
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = [(20, 30, 3), (24, 24), (18, 22, 4)][i % 3]
        where = folder if i % 2 else os.path.join(folder, "sub")
        matplotlib.image.imsave(os.path.join(where, f"im{i}.png"), rng.random(shape), cmap="gray")


def test_reconstruct_a_folder_prints_psnr(run, tmp_path, capsys):
    folder = str(tmp_path / "imgs")
    _write_images(folder)
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--reconstruct", folder, "--resolution", "16,32",
                 "--out", str(tmp_path / "rec.png")])
    out = capsys.readouterr().out
    assert "16x16: mean PSNR" in out and "32x32: mean PSNR" in out and "over 6 items" in out
    assert os.path.getsize(tmp_path / "rec.png") > 0


def test_read_image_handles_grey_rgba_and_crops(tmp_path):
    grey = np.tile(np.linspace(0, 1, 40), (20, 1))  # (20, 40): a horizontal ramp
    matplotlib.image.imsave(tmp_path / "g.png", grey, cmap="gray", vmin=0, vmax=1)
    x = readers.read_image(str(tmp_path / "g.png"), 10)
    assert x.shape == (3, 10, 10) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey -> equal channels
    # centre crop keeps the middle half of the ramp: columns 10..29 of 40, values ~0.25..0.75
    assert 50 < x[0, 5, 0] < 80 and 175 < x[0, 5, -1] < 205


def test_vae_then_ldm_in_two_calls(tmp_path):
    out = str(tmp_path / "r")
    train.main(TINY + ["--out", out, "--stage", "vae"])
    assert "ema" not in torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["stage2"]
    with pytest.raises(SystemExit, match="no stage-2"):  # a stage-1 checkpoint cannot sample...
        sample.main(["--ckpt", os.path.join(out, "ckpt.pt")])
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--reconstruct", "synthetic", "--n", "4",
                 "--out", str(tmp_path / "rec.png")])  # ...but it can reconstruct
    train.main(["--out", out, "--stage", "ldm"])
    assert os.path.exists(os.path.join(out, "samples.png"))


def test_v_prediction_run_samples_with_v(tmp_path):
    out = str(tmp_path / "v")
    train.main(TINY + ["--out", out, "--prediction", "v"])
    ck = engine.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["config"]["prediction"] == "v"
    ldm = train.build_ldm(ck["config"], M.modality(ck["config"]), ck["num_classes"])
    assert ldm.prediction == "v"  # what sample.py rebuilds from the checkpoint
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--n", "2", "--out", str(tmp_path / "s.png")])
    assert os.path.getsize(tmp_path / "s.png") > 0
    with pytest.raises(SystemExit, match="--prediction x: expected eps or v"):
        train.main(TINY + ["--prediction", "x", "--out", str(tmp_path / "x")])


def test_refusals_are_one_line_errors(run, tmp_path):
    with pytest.raises(SystemExit, match="exists and is not empty"):  # never overwrite a run
        train.main(TINY + ["--out", run])
    with pytest.raises(SystemExit, match="preset 'tiny'"):  # another preset's checkpoint
        train.main(["--out", run, "--resume", "--preset", "paper"])
    with pytest.raises(SystemExit, match="--resolution 0"):
        train.main(["--resolution", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a folder"):
        train.main(TINY + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a DDMI checkpoint"):
        sample.main(["--ckpt", str(bad)])


def test_time_budget_alone_plans_from_measured_speed(monkeypatch):
    # --max-minutes without --steps: the stage runs as many steps as fit, planned after a probe
    clock = [0.0]
    monkeypatch.setattr(engine.time, "time", lambda: clock[0])
    budget = engine.Budget(engine.stage_steps({"steps": 0, "max_minutes": 1.0, "vae_steps": 5}, "vae_steps"), 1.0)
    step = 0
    while not budget.done(step):
        step += 1
        clock[0] += 0.5  # 2 steps per second -> 120 steps in a minute
    assert budget.plan == 120 and step == 120
    # with --steps, the smaller bound wins; with neither, the preset's count
    assert engine.Budget(engine.stage_steps({"steps": 50, "max_minutes": 1.0}, "vae_steps"), 1.0).steps == 50
    assert engine.stage_steps({"steps": 0, "max_minutes": 0, "vae_steps": 5}, "vae_steps") == 5


def test_prefetcher_thread_gives_the_batches_and_states_of_a_plain_loop():
    # On a GPU run a background thread draws ahead; on a CPU run the batch is drawn when asked.
    # Both must give the same batches, and the state to checkpoint must be the generator's state
    # after the batches consumed so far (not after those drawn ahead).
    def draw(gen):
        return torch.randint(100, (4,), generator=gen), torch.randn(4, 3, generator=gen), None

    cpu = torch.device("cpu")
    runs = {}
    for background in (False, True):
        gen = torch.Generator().manual_seed(0)
        loader = engine.Prefetcher(draw, gen, cpu, background=background)
        assert (loader.thread is not None) == background
        runs[background] = [(loader.next(), loader.resume_state.clone()) for _ in range(5)]
        loader.close()
    reference = torch.Generator().manual_seed(0)
    for ((a, sa), (b, sb)) in zip(runs[False], runs[True]):
        plain = draw(reference)  # the loop without any loader
        for x, y, z in zip(a, b, plain):
            assert (x is None and y is None and z is None) or (torch.equal(x, z) and torch.equal(y, z))
        assert torch.equal(sa, reference.get_state()) and torch.equal(sb, reference.get_state())

    def failing(gen):
        raise ValueError("bad item 7")
    loader = engine.Prefetcher(failing, torch.Generator(), cpu, background=True)
    with pytest.raises(ValueError, match="bad item 7"):  # raised in the training loop, not lost in the thread
        loader.next()
    loader.close()


def test_a_checkpoint_saved_before_plane_res_still_loads(run, tmp_path):
    # configs saved before --plane-res: shapes and NeRF kept their planes' side in `resolution`, NeRF its
    # pictures in `view_size`; older ones had no decoder, bases or prediction (and predicted eps)
    ck = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    for key in ("plane_res", "decoder", "bases", "prediction"):
        del ck["config"][key]
    torch.save(ck, tmp_path / "old.pt")
    rows = sample.main(["--ckpt", str(tmp_path / "old.pt"), "--n", "2", "--sample-steps", "2", "--seed", "3",
                        "--out", str(tmp_path / "a.png")])
    same = sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--seed", "3",
                        "--out", str(tmp_path / "b.png")])
    assert torch.equal(rows[0], same[0])
    nerf = config.upgrade({"modality": "nerf", "resolution": 32, "view_size": 100})
    shape = config.upgrade({"modality": "shape", "resolution": 32})
    assert (nerf["plane_res"], nerf["resolution"], "view_size" in nerf) == (32, 100, False)
    assert (shape["plane_res"], shape["resolution"], shape["prediction"]) == (32, 64, "eps")


def test_samples_do_not_depend_on_the_batch_and_beyond_the_sheet_are_stored(run, tmp_path, capsys):
    ckpt = os.path.join(run, "ckpt.pt")
    args = ["--ckpt", ckpt, "--n", "70", "--sample-steps", "2", "--resolution", "8"]
    whole = sample.main(args + ["--out", str(tmp_path / "a.png")])  # one batch of 64, then 6
    split = sample.main(args + ["--batch", "7", "--out", str(tmp_path / "b.png")])
    # the same samples, up to the float rounding of other batch sizes; the sheet shows 64 at most
    assert whole[0].shape == (64, 3, 8, 8) and torch.allclose(whole[0], split[0], atol=1e-4)
    stored = np.load(tmp_path / "a_8.npy")
    assert stored.shape == (70, 3, 8, 8) and stored.dtype == np.uint8
    assert np.abs(stored.astype(int) - np.load(tmp_path / "b_8.npy")).max() <= 1
    assert np.array_equal(stored[:64], ((whole[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    assert "[sample] 70/70" in capsys.readouterr().out  # progress, batch by batch


def test_flags_that_would_do_nothing_are_refused(run, tmp_path):
    ckpt = os.path.join(run, "ckpt.pt")
    for flags, says in ((["--eta", "0.5", "--sampler", "ddpm"], "--eta 0.5: only DDIM has eta; the sampler is ddpm"),
                        (["--frames", "8"], "--frames 8: this image model has no frames"),
                        (["--reconstruct", "synthetic", "--seed", "3"], "--seed: a sampling flag; it does nothing"),
                        (["--reconstruct", "synthetic", "--guidance", "2"], "--guidance: a sampling flag")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "x.png")] + flags)
    folder = str(tmp_path / "imgs")
    _write_images(folder)
    out = str(tmp_path / "uncond")
    train.main(TINY + ["--data", folder, "--out", out])  # folders have no classes
    with pytest.raises(SystemExit, match=r"--guidance 3.0: this model is unconditional"):
        sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--guidance", "3"])


def test_out_that_is_not_a_png_is_refused_before_anything_is_written(run, tmp_path):
    # the sheet is a PNG and the meshes, arrays and GIF take its stem: "--out sheet" used to write
    # them and then fail inside matplotlib ("Format 'tmp' is not supported")
    out = str(tmp_path / "sheet")
    with pytest.raises(SystemExit, match=re.escape(f"--out {out}: expected a path ending in .png")):
        sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--n", "2", "--out", out])
    assert os.listdir(tmp_path) == []


def test_reconstruct_reads_each_file_once_and_honours_n(run, tmp_path, capsys, monkeypatch):
    folder = str(tmp_path / "imgs")
    _write_images(folder)
    reads, real_read = [], readers.read_picture
    monkeypatch.setattr(readers, "read_picture", lambda path, flag: reads.append(path) or real_read(path, flag))
    sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--reconstruct", folder, "--resolution", "16,32,64",
                 "--n", "4", "--out", str(tmp_path / "rec.png")])
    assert len(reads) == 4 and len(set(reads)) == 4  # 4 files, each decoded once for the three sizes
    assert "over 4 items" in capsys.readouterr().out


@pytest.mark.parametrize("speeds", [(1.0, 0.1), (0.1, 1.0), (0.5, 0.5)])
def test_a_time_bound_is_used_whatever_the_speed_does(monkeypatch, speeds):
    # --max-minutes 1: 30 s at one speed (a busy machine at the start, say), then another speed
    clock = [0.0]
    monkeypatch.setattr(engine.time, "time", lambda: clock[0])
    budget = engine.Budget(0, 1.0)
    step = 0
    while not budget.done(step):
        step += 1
        clock[0] += speeds[0] if clock[0] < 30 else speeds[1]  # seconds per step
    assert 0.95 * 60 <= clock[0] <= 60 + max(speeds), (clock[0], step)
    assert budget.plan in (step, step + 1)  # the plan (that the KL annealing follows) was the length run


def test_the_gpu_paths_run_on_a_cpu(tmp_path, monkeypatch):
    # bf16 autocast through both stages' steps and sampling, channels-last weights and batches drawn
    # ahead by a thread: what a CUDA run does, forced on here so that a dtype or layout slip shows
    seen = {"elbo": set(), "vae layout": set(), "unet": set(), "layout": set(), "thread": set()}
    real_elbo, real_unet, real_prefetcher = train.V.elbo_loss, train.LDM.UNet.forward, engine.Prefetcher.__init__

    def elbo(vae, *args, **kwargs):
        seen["elbo"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        seen["vae layout"].add(vae.encoder.net[0].weight.is_contiguous(memory_format=torch.channels_last))
        return real_elbo(vae, *args, **kwargs)

    def unet(self, z_t, t, y=None):
        out = real_unet(self, z_t, t, y)
        seen["unet"].add(out.dtype)
        seen["layout"].add(self.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        return out

    def prefetcher(self, *args, **kwargs):
        real_prefetcher(self, *args, **kwargs)
        seen["thread"].add(self.thread is not None)
    monkeypatch.setattr(train.V, "elbo_loss", elbo)
    monkeypatch.setattr(train.LDM.UNet, "forward", unet)
    monkeypatch.setattr(engine.Prefetcher, "__init__", prefetcher)
    out = str(tmp_path / "r")
    train.main(TINY + ["--gpu-paths", "on", "--out", out])
    rows = sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--gpu-paths", "on", "--n", "2", "--sample-steps", "2",
                        "--out", str(tmp_path / "s.png")])
    # (channels-last weights: the VAE's everywhere, the UNet's on CUDA only; on a CPU it ran slower so)
    assert seen == {"elbo": {torch.bfloat16}, "vae layout": {True}, "unet": {torch.bfloat16}, "layout": {False},
                    "thread": {True}}, seen
    assert rows[0].dtype == torch.float32 and torch.isfinite(rows[0]).all()
    assert engine.load_checkpoint(os.path.join(out, "ckpt.pt"))["stage2"]["step"] == 4


def test_channels_last_models_compute_what_contiguous_ones_do():
    # the fast paths hold every convolution weight in NHWC / NDHWC layout (engine.channels_last): the same
    # sums, forward and backward, for the UNet's 2D convolutions and a video encoder's 3D ones
    torch.manual_seed(0)
    unet = train.LDM.UNet(6, ch=16, ch_mult=(1, 2), num_classes=3)
    video = M.modality(settings("video", frames=4, resolution=8, enc_ch=8)).build_vae()
    z, t, y = torch.randn(4, 6, 8, 8), torch.randint(1000, (4,)), torch.tensor([0, 1, 2, 3])
    clips = torch.randn(2, 3, 4, 8, 8)
    for model, run in ((unet, lambda m: m(z, t, y)), (video, lambda m: m.encoder(clips))):
        for p in model.parameters():  # (the UNet's output conv starts at zero: give every weight a value)
            p.data.normal_(0, 0.05)
        fast = copy.deepcopy(model)
        engine.channels_last(fast)
        convs = [p for p in fast.parameters() if p.dim() in (4, 5)]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last if p.dim() == 4 else
                                                 torch.channels_last_3d) for p in convs)
        out, ref = run(fast), run(model)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        out.square().sum().backward()
        ref.square().sum().backward()
        for a, b in zip(fast.parameters(), model.parameters()):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_auto_takes_the_fast_paths_where_bf16_is_done_in_hardware(monkeypatch):
    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert engine.fast_paths("auto", cpu) is expected
        assert engine.fast_paths("on", cpu) and not engine.fast_paths("off", cpu)
    assert engine.fast_paths("auto", torch.device("cuda")) and not engine.fast_paths("off", torch.device("cuda"))
