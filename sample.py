"""Sample from a trained DDMI run, or check its VAE on your own data.

    python sample.py --ckpt runs/image/ckpt.pt                         # 16 samples at the training resolution
    python sample.py --ckpt runs/image/ckpt.pt --resolution 32,64,128  # the same samples at three resolutions
    python sample.py --ckpt runs/image/ckpt.pt --label 2 --guidance 3  # classifier-free guidance
    python sample.py --ckpt runs/faces/ckpt.pt --reconstruct ./test_faces --resolution 128
    python sample.py --ckpt runs/nerf/ckpt.pt --resolution 48,96 --frames 24    # NeRF: turntables (PNG + GIF)
    python sample.py --ckpt runs/lego/ckpt.pt --reconstruct lego_100px_train.npz  # NeRF: render its poses

Sampling: latent DDIM/DDPM (file 04) -> the VAE's decoder -> basis fields -> the read-out
MLP at the pixel centres of any grid. Reconstruction: encode each image at the training
resolution, render the INR at --resolution, and compare with the image resized to it.
`--reconstruct synthetic` uses the built-in synthetic images, whose exact ground truth
exists at every resolution.
"""
import argparse
import importlib
import os
import sys
import time

import torch

inr = importlib.import_module("01_inr")
LDM = importlib.import_module("04_latent_diffusion")
M = importlib.import_module("05_modalities")
T = importlib.import_module("train")


def positive_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 64 or 32,64,128")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 64 or 32,64,128")
    return values


def parse_args(argv):
    p = T.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a run")
    p.add_argument("--n", type=int, default=16, help="number of samples (--reconstruct synthetic: of items)")
    p.add_argument("--resolution", type=positive_ints, default=None, help="R or R1,R2,...: render sizes")
    p.add_argument("--frames", type=int, default=None, help="videos: frames to render, any number (default: the training T); NeRF: turntable views")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default: the run's sample_steps")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None, help="class to sample (labelled data only)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w")
    p.add_argument("--reconstruct", default=None, help="data to reconstruct, in any format --data takes, or 'synthetic'")
    p.add_argument("--out", default=None, help="output PNG; default: next to the checkpoint")
    p.add_argument("--device", default="", help="cpu or cuda; default: cuda when available")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n {a.n}: expected a positive number")
    if a.frames is not None and a.frames < 1:
        p.error(f"--frames {a.frames}: expected a positive number")
    if a.steps is not None and not 1 <= a.steps <= 1000:
        p.error(f"--steps {a.steps}: expected 1..1000")
    return a


def load_run(path, device):
    """The VAE (and, when stage 2 exists, the EMA diffusion model) of a checkpoint."""
    ck = T.load_checkpoint(path)
    cfg = ck["config"]
    if cfg["modality"] not in M.MODALITIES:
        raise SystemExit(f"{path}: modality {cfg['modality']!r} is not known to this version of 05_modalities.py")
    mod = M.MODALITIES[cfg["modality"]]
    if "vae" not in ck["stage1"]:
        raise SystemExit(f"{path}: stage 1 has not saved any weights yet")
    vae = mod.build_vae(cfg)
    try:
        vae.load_state_dict(ck["stage1"]["vae"])
    except RuntimeError as e:
        raise SystemExit(f"{path}: weights do not fit the model of its config ({str(e).splitlines()[0][:120]})")
    ldm = None
    if "ema" in ck["stage2"]:
        ldm = T.build_ldm(cfg, mod, ck["num_classes"])
        ldm.load_state_dict(ck["stage2"]["ema"])
        ldm = ldm.to(device).eval()
    return ck, cfg, mod, vae.to(device).eval(), ldm


@torch.no_grad()
def reconstruct(a, ck, cfg, mod, vae, device, resolutions):
    rows, names = mod.reconstruct(vae, cfg, a.reconstruct, resolutions, a.n, device)  # prints the scores
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "reconstruct.png")
    mod.write_sheet(rows, out, names, f"reconstructions ({a.reconstruct})")
    print(f"wrote {out}")


@torch.no_grad()
def sample(a, ck, cfg, mod, vae, ldm, device, resolutions, write=True):
    if ldm is None:
        raise SystemExit(f"{a.ckpt}: has no stage-2 (diffusion) weights; train with --stage ldm, or use --reconstruct")
    K = ck["num_classes"]
    if a.label is not None and not 0 <= a.label < K:
        raise SystemExit(f"--label {a.label}: this model has {K} classes" + (" (it is unconditional)" if K == 0 else ""))
    y = None
    if K:  # a given class, or the classes in turn
        y = torch.full((a.n,), a.label) if a.label is not None else torch.arange(a.n) % K
    g = torch.Generator().manual_seed(a.seed)
    a.sampler, a.steps = a.sampler or cfg.get("sampler", "ddim"), a.steps or cfg.get("sample_steps", 50)
    t0 = time.time()
    z = ldm.sample((a.n, *mod.latent_shape(cfg)), steps=a.steps, sampler=a.sampler, eta=a.eta, y=y,
                   guidance=a.guidance, generator=g)
    fields = vae.decode(mod.unstack_planes(z / ck["stage2"]["scale_factor"]))  # undo the latent scale factor
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "sample.png")
    # the same INRs at every resolution (shapes: also one mesh per sample, written next to out)
    rows, names = mod.sample_outputs(vae, fields, cfg, resolutions, out if write else None)
    if not write:
        return rows
    print(f"sampled {a.n} latents ({a.sampler}, {a.steps} steps) and rendered at {resolutions} in {time.time() - t0:.1f} s")
    mod.write_sheet(rows, out, names,
                    f"{a.n} samples, {a.sampler} {a.steps} steps, seed {a.seed}"
                    + (f", label {a.label}, guidance {a.guidance}" if a.label is not None else ""))
    print(f"wrote {out}")
    return rows


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck, cfg, mod, vae, ldm = load_run(a.ckpt, device)
    resolutions = a.resolution or [mod.default_resolution(cfg)]
    # videos: render a.frames frames (t is continuous); the encoder still sees the training frames
    cfg = {**cfg, "train_frames": cfg.get("frames"), "frames": a.frames or cfg.get("frames")}
    if a.out and os.path.dirname(a.out) and not os.path.isdir(os.path.dirname(a.out)):
        raise SystemExit(f"--out {a.out}: folder {os.path.dirname(a.out)} does not exist")
    if a.reconstruct is not None:
        return reconstruct(a, ck, cfg, mod, vae, device, resolutions)
    return sample(a, ck, cfg, mod, vae, ldm, device, resolutions)


if __name__ == "__main__":
    main()
