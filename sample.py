"""Sample from a trained DDMI run, or check its VAE on data it never saw, at any resolution.

    python sample.py --ckpt runs/image/ckpt.pt                         # 16 samples at the training resolution
    python sample.py --ckpt runs/image/ckpt.pt --resolution 32,64,128  # the same samples at three resolutions
    python sample.py --ckpt runs/image/ckpt.pt --label 2 --guidance 3  # classifier-free guidance
    python sample.py --ckpt runs/image/ckpt.pt --n 10000               # a sheet of 64, all 10000 in sample_32.npy
    python sample.py --ckpt runs/faces/ckpt.pt --reconstruct ./test_faces --resolution 128
    python sample.py --ckpt runs/video/ckpt.pt --frames 32             # videos: twice the training frame rate
    python sample.py --ckpt runs/nerf/ckpt.pt --resolution 48,96 --frames 24   # NeRF: turntables (PNG + GIF)

Sampling: DDPM/DDIM in latent space (file 04) -> the VAE's decoder -> basis fields -> the
read-out at the coordinates of any grid, --batch samples at a time. Every sample has its own
noise (seeded by --seed and its number), so the samples do not depend on the batch size. A sheet
shows at most 64 samples; beyond that every sample is also stored in one .npy per resolution
(uint8, beside the sheet), and shapes write a mesh per sample. Reconstruction: encode each item at
the training resolution, render its INR at every --resolution, and compare with the data there
(`--reconstruct synthetic`: the built-in data, exact at every resolution).
"""
import argparse
import importlib
import math
import os
import sys
import time

import torch

import config
import engine
import figures

M = importlib.import_module("05_modalities")
T = importlib.import_module("train")

SHEET = 64  # samples a sheet shows at most


def positive_ints(text):
    values = [int(v) if v.strip().isdigit() else 0 for v in text.split(",")]  # 0: not a positive integer
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 64 or 32,64,128")
    return values


def parse_args(argv):
    p = config.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a run")
    p.add_argument("--n", type=int, default=None, help="samples (16); --reconstruct: items (all, or 16 synthetic)")
    p.add_argument("--batch", type=int, default=None, help="samples made at a time (64, fewer for large outputs)")
    p.add_argument("--resolution", type=positive_ints, default=None,
                   help="R or R1,R2,..: output sizes (pixels; shapes: the mesh grid R^3); default: the run's --resolution")
    p.add_argument("--frames", type=int, default=None,
                   help="videos: frames to render, any number (default: the run's); NeRF: turntable views (default 12)")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps; default: the run's")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's sampler")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic (the default), 1 as much as DDPM")
    p.add_argument("--seed", type=int, default=None, help="seeds the samples' noise (0): same seed, same samples")
    p.add_argument("--label", default=None, help="class to sample, by name (folder labels) or number; labelled data only")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance w (1: none); default: the run's")
    p.add_argument("--reconstruct", default=None, help="data to reconstruct, in any format --data takes, or 'synthetic'")
    p.add_argument("--out", default=None, help="output PNG; default: sample.png or reconstruct.png beside the checkpoint")
    p.add_argument("--device", default="", help="cpu or cuda; default: cuda when available")
    p.add_argument("--gpu-paths", choices=("auto", "on", "off"), default="auto", help="bf16 autocast: auto (where bf16 is in hardware), on, off")
    a = p.parse_args(argv)
    for name in ("n", "batch", "frames"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: expected a positive number")
    if a.out is not None and not a.out.lower().endswith(".png"):  # (the GIF, meshes and arrays go beside it)
        p.error(f"--out {a.out}: expected a path ending in .png")
    if a.sample_steps is not None and not 1 <= a.sample_steps <= 1000:
        p.error(f"--sample-steps {a.sample_steps}: expected 1..1000")
    if a.reconstruct is not None:  # the sampler's flags do nothing when reconstructing
        if given := [f for f in ("sample_steps", "sampler", "eta", "seed", "label", "guidance", "batch")
                     if getattr(a, f) is not None]:
            p.error(f"--{given[0].replace('_', '-')}: a sampling flag; it does nothing with --reconstruct")
    return a


def load_run(path, device, gpu_paths="auto"):
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
    if engine.fast_paths(gpu_paths, device):  # the weights' layout of training
        engine.fast_layout(vae, ldm, device)
    return ck, cfg, mod, vae.to(device).eval(), ldm


@torch.no_grad()
def sample(a, ck, cfg, mod, vae, ldm, resolutions, write=True):
    """Generate a.n samples in batches; write the sheet (and, beyond it, the .npy files and meshes).
    -> the sheet's sample arrays, {str(R): (b, ...)}; with write=False all n, and nothing written."""
    if ldm is None:
        raise SystemExit(f"{a.ckpt}: has no stage-2 (diffusion) weights; train with --stage ldm, or use --reconstruct")
    K, names = ck["num_classes"], cfg.get("classes") or []
    label = class_index(a.label, K, names)
    if a.guidance is not None and K == 0:
        raise SystemExit(f"--guidance {a.guidance}: this model is unconditional (no classes to guide towards)")
    sampler, steps = a.sampler or cfg["sampler"], a.sample_steps or cfg["sample_steps"]
    guidance = (a.guidance if a.guidance is not None else cfg["guidance"]) if K else 1.0
    if a.eta is not None and sampler != "ddim":
        raise SystemExit(f"--eta {a.eta}: only DDIM has eta; the sampler is {sampler}")
    n, seed = a.n or 16, a.seed or 0
    # a given class, or the classes in turn
    labels = (torch.full((n,), label) if label is not None else torch.arange(n) % K) if K else None
    # outputs of about 4M values per sample and batch at most (a 2048x2048 picture: one at a time)
    values = math.prod(mod.size(max(resolutions), a.frames))
    batch = a.batch or max(1, min(SHEET, 2 ** 22 // values))
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "sample.png")
    stem, stores, kept, t0 = os.path.splitext(out)[0], {}, {}, time.time()
    for first in range(0, n, batch):
        b = min(batch, n - first)
        # sample i's noise from its own generator: the same samples whatever the batch size
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(first, first + b)]
        with engine.autocast(a.gpu_paths, next(vae.parameters()).device):
            z = ldm.sample((b, *mod.latent_shape), steps=steps, sampler=sampler, eta=a.eta or 0.0, generator=gens,
                           y=None if labels is None else labels[first:first + b], guidance=guidance)
            fields = vae.decode(mod.unstack_planes(z / ck["stage2"]["scale_factor"]))  # undo the latent scale factor
            arrays = {k: x.float() for k, x in mod.sample_arrays(vae, fields, resolutions, a.frames).items()}
        for name, x in arrays.items():  # kept: every sample when not writing, else the sheet's
            if not write or first < SHEET:
                kept[name] = (torch.cat([kept[name], x]) if name in kept else x)[:SHEET if write else None]
        if write:
            mod.write_samples(vae, fields, resolutions, stem, first)  # shapes: a mesh per sample
            if n > SHEET:  # every sample, in one uint8 .npy per resolution
                for name, x in arrays.items():
                    if name not in stores:
                        stores[name] = figures.ArrayFile(f"{stem}_{name}.npy", (n, *x.shape[1:]))
                    stores[name].write(x)
        if n > batch:
            rate = (first + b) / (time.time() - t0)
            print(f"[sample] {first + b}/{n}  {rate:.2f} samples/s  ETA {engine.fmt_time((n - first - b) / rate)}",
                  flush=True)
    if not write:
        return kept
    for store in stores.values():
        store.close()
    print(f"sampled {n} latents ({sampler}, {steps} steps) and rendered them at {resolutions} in {time.time() - t0:.1f} s"
          + (f"; all of them in {stem}_<R>.npy" if stores else ""))
    rows, names = mod.sheet(kept, a.frames)
    mod.write_sheet(rows, out, names, f"{min(n, SHEET)} of {n} samples, {sampler} {steps} steps, seed {seed}"
                    + (f", label {names[label] if label < len(names) else label}" if label is not None else "")
                    + (f", guidance {guidance:g}" if K else ""))
    print(f"wrote {out}")
    return rows


def class_index(label, K, names):
    """--label as a class number: a name the run's classes hold (its folders), or a number 0..K-1."""
    if label is None:
        return None
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < K:
        return int(label)
    known = f"one of {', '.join(names)} or 0..{K - 1}" if names else f"0..{K - 1}"
    raise SystemExit(f"--label {label}: " + (f"expected {known}" if K else "this model is unconditional (no classes)"))


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
    ck, cfg, mod, vae, ldm = load_run(a.ckpt, device, a.gpu_paths)
    if a.frames is not None and not mod.has_time:
        raise SystemExit(f"--frames {a.frames}: this {cfg['modality']} model has no frames (videos and NeRF do)")
    if a.reconstruct is None:
        return sample(a, ck, cfg, mod, vae, ldm, a.resolution or [cfg["resolution"]])
    with torch.no_grad():  # (prints the scores)
        rows, names = mod.reconstruct(vae, a.reconstruct, a.resolution, a.n, device, a.frames)
    out = a.out or os.path.join(os.path.dirname(a.ckpt), "reconstruct.png")
    mod.write_sheet(rows, out, names, f"reconstructions ({a.reconstruct})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
