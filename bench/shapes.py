"""Generated shapes against held-out shapes: MMD, COV and 1-NNA with the Chamfer distance.

    python bench/shapes.py --ckpt runs/shape/ckpt.pt            # a run on the built-in synthetic shapes
    python bench/shapes.py --ckpt runs/shape/ckpt.pt --n 64 --out bench/shapes.md
    python bench/shapes.py --ckpt runs/shape/ckpt.pt --guidance 2   # classifier-free guidance (sampling only)

Every cloud has --points points (2048, as in Achlioptas et al. 2018), in the [-1, 1]^3 frame
of the data (no re-normalisation). Four sets are compared with the same reference set (held-out
synthetic shapes, exact surface samples, the validation seed of train.py):
  generated      the run's diffusion model (EMA weights, the run's sampler), decoded and meshed
                 at 64^3 by surface nets, points sampled on the mesh; classes in turn
  reconstructed  the reference shapes through the VAE (encode, decode, mesh): stage 1's ceiling
  fresh          another set of synthetic shapes, exact: what a perfect generator would score
  one shape      a single fresh shape repeated n times: what total mode collapse scores
MMD-CD is printed x 10^3 and COV / 1-NNA in % (the units of PointFlow and DDMI).
"""
import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
G = importlib.import_module("07_geometry")
Sh = importlib.import_module("09_shapes")
S = importlib.import_module("sample")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a shape run on the built-in synthetic shapes")
    p.add_argument("--n", type=int, default=48, help="shapes per set")
    p.add_argument("--points", type=int, default=2048, help="points per cloud")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples' noise")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's")
    p.add_argument("--sample-steps", type=int, default=0, help="denoising steps; default: the run's")
    p.add_argument("--guidance", type=float, default=0, help="classifier-free guidance scale; default: the run's")
    p.add_argument("--sets", default="generated,reconstructed,fresh,one shape",
                   help="the sets to score, comma-separated (each takes about 2 minutes at --n 48)")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    a = p.parse_args(argv)
    wanted = a.sets.split(",")
    if unknown := set(wanted) - {"generated", "reconstructed", "fresh", "one shape"}:
        raise SystemExit(f"--sets {a.sets}: unknown {', '.join(sorted(unknown))}; expected some of "
                         f"generated,reconstructed,fresh,one shape")
    torch.manual_seed(0)
    device = torch.device("cpu")
    ck, cfg, mod, vae, ldm = S.load_run(a.ckpt, device)
    if cfg["modality"] != "shape" or cfg["data"]:
        raise SystemExit(f"--ckpt {a.ckpt}: expected a run of --modality shape on the built-in synthetic shapes")
    if ldm is None:
        raise SystemExit(f"--ckpt {a.ckpt}: has no stage-2 weights")
    g = torch.Generator().manual_seed(1)
    ref_params = Sh.synthetic_shape_params(a.n, seed=cfg["seed"] + 1_000_003)  # train.py's validation shapes
    ref = Sh.synthetic_surface(ref_params, a.points, g)
    sets, seconds = {}, {}
    with torch.no_grad():
        t = time.time()
        K = ck["num_classes"]
        y = torch.arange(a.n) % K if K else None
        guidance = (a.guidance or cfg["guidance"]) if K else 1.0
        sampler, steps = a.sampler or cfg["sampler"], a.sample_steps or cfg["sample_steps"]
        R = cfg["resolution"]  # the run's grid of IoU and meshes
        if "generated" in wanted:
            z = ldm.sample((a.n, *mod.latent_shape), steps=steps, sampler=sampler, y=y,
                           guidance=guidance, generator=torch.Generator().manual_seed(a.seed))
            fields = vae.decode(mod.unstack_planes(z / ck["stage2"]["scale_factor"]))
            sets["generated"] = torch.cat([mod.mesh_clouds(mod.logit_grid(vae, [f[i:i + 8] for f in fields], R),
                                                           a.points, seed=i) for i in range(0, a.n, 8)])
        seconds["generated"] = time.time() - t
        t = time.time()
        if "reconstructed" in wanted:
            rec = []
            for i in range(0, a.n, 8):
                fields = vae.decode(vae.encode(mod.encoder_input(ref[i:i + 8])).mean)
                rec.append(mod.mesh_clouds(mod.logit_grid(vae, fields, R), a.points, seed=i))
            sets["reconstructed"] = torch.cat(rec)
        seconds["reconstructed"] = time.time() - t
    fresh = Sh.synthetic_shape_params(a.n, seed=12345)
    sets["fresh"] = Sh.synthetic_surface(fresh, a.points, g)
    sets["one shape"] = sets["fresh"][:1].expand(a.n, -1, -1).contiguous()
    lines = [f"Reference: {a.n} held-out synthetic shapes, {a.points} points each; run {a.ckpt} "
             f"(stage 1 {ck['stage1']['step']} steps, stage 2 {ck['stage2']['step']} steps, {sampler} "
             f"{steps} steps, guidance {guidance:g}, noise seed {a.seed}).", "",
             "| set | MMD-CD x10^3 (lower is better) | COV-CD % (higher) | 1-NNA-CD % (50 is ideal) |", "|---|---|---|---|"]
    for name, clouds in ((k, v) for k, v in sets.items() if k in wanted):
        t = time.time()
        m = G.mmd_cov_1nna(clouds, ref)
        lines.append(f"| {name} | {m['mmd'] * 1e3:.2f} | {m['cov'] * 100:.1f} | {m['nna'] * 100:.1f} |")
        print(lines[-1], f"  ({seconds.get(name, 0) + time.time() - t:.0f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
