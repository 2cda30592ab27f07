"""Sample from a trained DDMI run, or check its VAE on data it never saw, at any resolution.

    python sample.py --ckpt runs/image/ckpt.pt                         # 16 samples at the training resolution
    python sample.py --ckpt runs/image/ckpt.pt --resolution 32,64,128  # the same samples at three resolutions
    python sample.py --ckpt runs/image/ckpt.pt --label 2 --guidance 3  # classifier-free guidance
    python sample.py --ckpt runs/faces/ckpt.pt --reconstruct ./test_faces --resolution 128
    python sample.py --ckpt runs/video/ckpt.pt --frames 32             # videos: twice the training frame rate
    python sample.py --ckpt runs/nerf/ckpt.pt --resolution 48,96 --frames 24   # NeRF: turntables (PNG + GIF)

Sampling: DDPM/DDIM in latent space (file 04) -> the VAE's decoder -> basis fields -> the
read-out at the coordinates of any grid. Reconstruction: encode each item at the training
resolution, render its INR at every --resolution, and compare with the data there
(`--reconstruct synthetic`: the built-in data, exact at every resolution).
"""
import argparse
import importlib
import os
import sys
import time

import torch

import config
import engine

M = importlib.import_module("05_modalities")
T = importlib.import_module("train")


def positive_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 64 or 32,64,128")
    return values


def parse_args(argv):
    p = config.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a run")
    p.add_argument("--n", type=int, default=16, help="number of samples (--reconstruct synthetic: of held-out items)")
    p.add_argument("--resolution", type=positive_ints, default=None,
                   help="R or R1,R2,..: output sizes (pixels; shapes: the mesh grid R^3); default: the run's --resolution")
    p.add_argument("--frames", type=int, default=None,
                   help="videos: frames to render, any number (default: the run's); NeRF: turntable views (default 12)")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps; default: the run's")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 as much as DDPM")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler's noise: same seed, same samples")
    p.add_argument("--label", type=int, default=None, help="class to sample (labelled data only)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w (1: none)")
    p.add_argument("--reconstruct", default=None, help="data to reconstruct, in any format --data takes, or 'synthetic'")
    p.add_argument("--out", default=None, help="output PNG; default: sample.png or reconstruct.png beside the checkpoint")
    p.add_argument("--device", default="", help="cpu or cuda; default: cuda when available")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n {a.n}: expected a positive number")
    if a.frames is not None and a.frames < 1:
        p.error(f"--frames {a.frames}: expected a positive number")
    if a.sample_steps is not None and not 1 <= a.sample_steps <= 1000:
        p.error(f"--sample-steps {a.sample_steps}: expected 1..1000")
    return a


def load_run(path, device):
    """(checkpoint, config, modality, VAE, and the EMA diffusion model when stage 2 exists)."""
    ck = engine.load_checkpoint(path)
    cfg = ck["config"]
    if cfg["modality"] not in M.MODALITIES:
        raise SystemExit(f"{path}: modality {cfg['modality']!r} is not known to this version of 05_modalities.py")
    if "vae" not in ck["stage1"]:
        raise SystemExit(f"{path}: stage 1 has not saved any weights yet")
    mod = M.modality(cfg)
    vae = mod.build_vae()
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
def sample(a, ck, cfg, mod, vae, ldm, resolutions, write=True):
    if ldm is None:
        raise SystemExit(f"{a.ckpt}: has no stage-2 (diffusion) weights; train with --stage ldm, or use --reconstruct")
    K = ck["num_classes"]
    if a.label is not None and not 0 <= a.label < K:
        raise SystemExit(f"--label {a.label}: this model has {K} classes" + (" (it is unconditional)" if K == 0 else ""))
    y = None
    if K:  # a given class, or the classes in turn
        y = torch.full((a.n,), a.label) if a.label is not None else torch.arange(a.n) % K
    sampler, steps = a.sampler or cfg["sampler"], a.sample_steps or cfg["sample_steps"]
    t0 = time.time()
    z = ldm.sample((a.n, *mod.latent_shape), steps=steps, sampler=sampler, eta=a.eta, y=y, guidance=a.guidance,
                   generator=torch.Generator().manual_seed(a.seed))
    fields = vae.decode(mod.unstack_planes(z / ck["stage2"]["scale_factor"]))  # undo the latent scale factor
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "sample.png")
    # the same INRs at every resolution (shapes: also one mesh per sample, written next to out)
    rows, names = mod.sample_outputs(vae, fields, resolutions, out if write else None, a.frames)
    if not write:
        return rows
    print(f"sampled {a.n} latents ({sampler}, {steps} steps) and rendered at {resolutions} in {time.time() - t0:.1f} s")
    mod.write_sheet(rows, out, names, f"{a.n} samples, {sampler} {steps} steps, seed {a.seed}"
                    + (f", label {a.label}, guidance {a.guidance}" if a.label is not None else ""))
    print(f"wrote {out}")
    return rows


def main(argv=None):
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except engine.WriteFailed as e:  # a full disk or no permission: one line, no partial file left
        raise SystemExit(str(e)) from None
    except OSError as e:
        raise SystemExit(f"{e.filename}: {e.strerror}") from None


def run(a):
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.out and os.path.dirname(a.out) and not os.path.isdir(os.path.dirname(a.out)):
        raise SystemExit(f"--out {a.out}: folder {os.path.dirname(a.out)} does not exist")
    ck, cfg, mod, vae, ldm = load_run(a.ckpt, device)
    resolutions = a.resolution or [cfg["resolution"]]
    if a.reconstruct is None:
        return sample(a, ck, cfg, mod, vae, ldm, resolutions)
    with torch.no_grad():
        rows, names = mod.reconstruct(vae, a.reconstruct, resolutions, a.n, device, a.frames)  # prints the scores
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "reconstruct.png")
    mod.write_sheet(rows, out, names, f"reconstructions ({a.reconstruct})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
