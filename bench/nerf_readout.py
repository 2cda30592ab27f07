"""The NeRF read-out, measured: the original release's (one field, linear MLP) against ours.

    python bench/nerf_readout.py                        # lego (../shared/data) when present, 600 steps per arm
    python bench/nerf_readout.py --data scene.npz --steps 1500 --out bench/nerf_readout.md

One scene, auto-decoded (file 11's NeRF modality), trained for the same number of steps with the
same rays, samples, latent and decoder trunk in each arm; only the basis fields and the read-out
differ:
  release     a single 64^3-plane field and an MLP without nonlinearities (the original code's
              LeakyReLU(True) has slope 1), i.e. a linear function of the embedding
  single      the same single field with ReLUs in the MLP
  hdbf_cfc    three field scales read coarse to fine (file 03), the default
The held-out views (every 10th) are rendered at the bin centres and compared with the pictures.
"""
import argparse
import importlib
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import config  # noqa: E402
import figures  # noqa: E402
import readers  # noqa: E402

V = importlib.import_module("02_d2c_vae")
Nf = importlib.import_module("11_nerf")
LEGO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lego_100px_train.npz")


class LinearReadout(nn.Module):
    """The release's read-out: the MLP's linear layers one after another, nothing in between."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers

    def forward(self, p):
        h = torch.cat(p, -1)
        for layer in self.layers:
            h = layer(h)
        return h


def settings(args, size, variant="hdbf_cfc"):
    flags = ["--modality", "nerf", "--plane-res", str(args.plane_res), "--resolution", str(size), "--z-ch", "16",
             "--variant", variant]
    return config.parse(flags, "")[0]


def run_arm(arm, args, data, val, data_settings):
    torch.manual_seed(0)
    cfg = {**settings(args, data["images"].shape[2], "hdbf_cfc" if arm == "hdbf_cfc" else "single"), **data_settings}
    nerf = Nf.NerfModality(cfg)
    vae = nerf.build_vae()
    if arm == "release":
        vae.readout = LinearReadout(vae.readout.mlp)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg["vae_lr"])
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    for step in range(args.steps):
        x, rays, target = nerf.training_batch(data, torch.zeros(1, dtype=torch.long), args.rays, g)
        lam = V.kl_weight(step, args.steps, cfg["lambda_z"])
        loss = V.elbo_loss(vae, x, rays, target, lam, nerf.values_per_item, nerf.recon)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.time() - t0
    vae.eval()
    with torch.no_grad():
        held_out, _, truths, recs = nerf.compare(vae, val, "cpu")
    params = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.readout.parameters())
    return {"arm": arm, "psnr": held_out, "seconds": seconds, "params": params, "truth": truths[0][:4], "rec": recs[0][:4]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=LEGO, help="posed pictures of one scene (default: lego in ../shared/data)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per arm")
    p.add_argument("--rays", type=int, default=2048, help="rays per step")
    p.add_argument("--plane-res", type=int, default=64, help="tri-plane size (finest field)")
    p.add_argument("--out", default=None, help="also write the table here (markdown) and a PNG beside it")
    a = p.parse_args(argv)
    if not os.path.exists(a.data):
        raise SystemExit(f"--data {a.data}: not found (the default is lego_100px_train.npz in ../shared/data)")
    size = readers.read_posed_scenes(a.data, 0)[0][0]["images"].shape[1]  # the pictures' own size
    reader = Nf.NerfModality(settings(a, size))
    data, val, _ = reader.load(a.data)
    results = [run_arm(arm, a, data, val, reader.data_settings) for arm in ("release", "single", "hdbf_cfc")]
    lines = [f"{len(val['poses'][0])} held-out views of {data['names'][0]}, {a.steps} steps of {a.rays} rays, "
             f"tri-plane {a.plane_res}, {torch.get_num_threads()} CPU threads", "",
             "| read-out | decoder + read-out parameters | held-out PSNR (dB) | training time |", "|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['params']:,} | {r['psnr']:.2f} | {r['seconds']:.0f} s |" for r in results]
    print("\n".join(lines))
    if a.out:
        open(a.out, "w").write("\n".join(lines) + "\n")
        rows = [results[0]["truth"]] + [r["rec"] for r in results]
        figures.write_sheet(rows, os.path.splitext(a.out)[0] + ".png", ["held out"] + [r["arm"] for r in results],
                            f"{a.steps} steps each: " + ", ".join(f"{r['arm']} {r['psnr']:.2f} dB" for r in results))
        print(f"wrote {a.out} and its PNG")


if __name__ == "__main__":
    main()
