"""Sample quality without a download: a probe network trained on the analytic data judges the samples.

    python bench/quality.py --ckpt runs/image/ckpt.pt                  # the default image run
    python bench/quality.py --ckpt runs/video/ckpt.pt                  # the default video run (per frame + motion)
    python bench/quality.py --ckpt runs/nerf/ckpt.pt                   # the default NeRF run (colour)
    python bench/quality.py --ckpt runs/image/ckpt.pt --out docs/quality_image.md

The built-in data is analytic (file 01): fresh real items of the very distribution a run trained
on can be drawn at will. So a small classifier (the probe below) is trained on them in a minute,
and its held-out accuracy says how far to trust it. It then measures a run's samples:

  class share   class-conditional samples that the probe assigns to the class they were asked for;
  FD            the Frechet distance (bench/fid.py's formula) between probe features of the samples
                and of real items with the samples' classes, beside the same distance between two
                disjoint real sets of that make-up: the floor a perfect generator would score at this
                sample count; also per class (each class's items against the real ones of that class;
                100 items in 128 features, so a sample or two read as another class move it most);
  stage 1       the same two measures on the VAE's reconstructions of real items: what the decoder
                alone allows (samples cannot beat it).
Videos are judged per frame (the probe is trained on single frames), plus motion: the mean absolute
change between consecutive frames of samples against that of real clips. NeRF samples are judged
by colour: mean saturation and per-channel histograms of turntable renders against renders of the
training scenes. For 3D shapes see bench/shapes.py (MMD, COV, 1-NNA); for faces bench/fid.py (FID).
"""
import argparse
import hashlib
import importlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fid  # noqa: E402  (bench/fid.py: the Frechet distance)
import prepare  # noqa: E402  (where caches live)

S = importlib.import_module("sample")
RM = importlib.import_module("08_ray_marching")
R10 = importlib.import_module("10_volume_rendering")


class Probe(nn.Module):
    """A small CNN: (B, 3, R, R) in [-1, 1] -> class logits; `features` is its pooled last conv layer."""

    def __init__(self, num_classes, ch=32):
        super().__init__()
        layers, c_in = [], 3
        for c in (ch, 2 * ch, 4 * ch):  # R -> R/2 -> R/4 -> R/8
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body, self.head = nn.Sequential(*layers), nn.Linear(c_in, num_classes)

    def features(self, x):
        return self.body(x).mean((2, 3))  # (B, 4ch), global average pool

    def forward(self, x):
        return self.head(self.features(x))


def soften(x, max_sigma=1.0):
    """Each picture blurred by a Gaussian of its own width, uniform in [0, max_sigma] pixels (0: as it is)."""
    B, C, H, W = x.shape
    sigma = torch.rand(B) * max_sigma  # (B,)
    k = torch.arange(-2, 3, dtype=x.dtype)  # taps -2..2
    w = torch.exp(-k ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 5)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B C, 5), one kernel per picture and channel
    y = F.pad(x.reshape(1, B * C, H, W), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, w[:, None, None, :], groups=B * C)  # along x
    y = F.conv2d(y, w[:, None, :, None], groups=B * C)  # along y
    return y.reshape(B, C, H, W)


def cached_probe(draw, num_classes):
    """train_probe, kept in the cache folder (prepare.py's) under a hash of the real items it is trained on:
    the same data distribution at the same size finds it again, any change to the data trains a new one."""
    x, y = draw(64, 0)
    key = hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes() + repr(Probe(num_classes)).encode()).hexdigest()[:16]
    path = os.path.join(prepare.cache_root(""), "probes", f"{key}.pt")
    probe = Probe(num_classes)
    if os.path.isfile(path):
        probe.load_state_dict(torch.load(path, weights_only=True))
        return probe.eval(), path
    probe = train_probe(draw, num_classes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(probe.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return probe, path


def train_probe(draw, num_classes, steps=1500, batch=64, seed=0):
    """Fit the probe on fresh analytic items: draw(n, seed) -> (images (n, 3, R, R), labels (n,)).

    Half of each batch is softened (blurred by up to a pixel): the probe is to judge which shape a
    picture holds, where and in what colours, not how sharp its edges are (stage-1 PSNR says that).
    """
    torch.manual_seed(seed)
    probe = Probe(num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=2e-3)
    pool_x, pool_y = draw(8000, seed + 101)  # a pool of real items, re-drawn from every 1000 steps
    for step in range(steps):
        if step and step % 1000 == 0:
            pool_x, pool_y = draw(8000, seed + 101 + step)
        idx = torch.randint(len(pool_x), (batch,))
        x = pool_x[idx]
        x = torch.cat([x[:batch // 2], soften(x[batch // 2:])])
        loss = F.cross_entropy(probe(x), pool_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def judge(probe, x, batch=256):
    """-> (predicted classes (n,), features (n, d) float64 numpy)."""
    logits, feats = [], []
    for i in range(0, len(x), batch):
        f = probe.features(x[i:i + batch].float())
        feats.append(f)
        logits.append(probe.head(f))
    return torch.cat(logits).argmax(1), torch.cat(feats).double().numpy()


def frames_of(clips):
    """(n, 3, T, H, W) -> (n T, 3, H, W)."""
    return clips.transpose(1, 2).flatten(0, 1)


def motion(clips):
    """Mean absolute change between consecutive frames, in [-1, 1] units: (n, 3, T, H, W) -> float."""
    return (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean().item()


def saturation(pictures):
    """Mean HSV saturation (max - min) / max of (n, 3, H, W) pictures in [-1, 1] (0 where max is 0)."""
    rgb = ((pictures + 1) / 2).clamp(0, 1)
    hi, lo = rgb.max(1).values, rgb.min(1).values
    return torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-6), torch.zeros_like(hi)).mean().item()


def histogram_distance(a, b, bins=16):
    """Half the L1 distance between per-channel colour histograms (0: the same, 1: disjoint), averaged over RGB."""
    d = []
    for c in range(3):
        ha = torch.histc(a[:, c].float(), bins, -1, 1)
        hb = torch.histc(b[:, c].float(), bins, -1, 1)
        d.append(0.5 * (ha / ha.sum() - hb / hb.sum()).abs().sum().item())
    return sum(d) / 3


def turntable_cameras(mod, views, size):
    """The sample sheets' turntable: `views` cameras evenly round the up axis -> c2w, intr."""
    return mod.cameras([360.0 * t / views for t in range(views)], size)


@torch.no_grad()
def turntables(mod, params, views, size):
    """Exact renders (on white) of synthetic NeRF scenes from the turntable cameras:
    (n, 3, views, size, size) in [-1, 1]."""
    c2w, intr = turntable_cameras(mod, views, size)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    o, d = RM.pixel_rays(c2w[:, None], intr[:, None], rows.reshape(1, -1).float(), cols.reshape(1, -1).float())
    out = []
    for i in range(len(params["kind"])):
        one = {k: v[i:i + 1].expand(views, *v.shape[1:]) for k, v in params.items()}
        out.append(R10.scene_render(one, o, d).reshape(views, size, size, 3).permute(3, 0, 1, 2))
    return torch.stack(out)


@torch.no_grad()
def nerf_reconstructions(mod, vae, points, views, size, batch=16):
    """Stage 1 alone on NeRF: scenes encoded from their coloured point clouds (posterior mean), rendered
    from the turntable cameras: (n, 3, views, size, size)."""
    c2w, intr = turntable_cameras(mod, views, size)
    return torch.cat([mod.render_views(vae, vae.decode(vae.encode(mod.encoder_input(points[i:i + batch])).mean), c2w, intr, size)
                      for i in range(0, len(points), batch)])


def nerf_views(mod, cfg, views):
    """draw(n, seed) for the probe: n single views of fresh synthetic scenes, labelled by how many of the
    scene's primitives are boxes (0..3): a property every view shows."""
    def draw(n, seed):
        params = R10.synthetic_scene_params(max(1, n // views), seed=seed)
        return frames_of(turntables(mod, params, views, cfg["resolution"])), params["kind"].sum(1).repeat_interleave(views)
    return draw


@torch.no_grad()
def samples_of(a, ck, cfg, mod, vae, ldm, n):
    """n class-conditional samples, classes in turn (sample.py's path): (outputs at the training size, labels)."""
    flags = ["--ckpt", a.ckpt, "--n", str(n), "--seed", str(a.seed)]
    if cfg["modality"] == "nerf":  # a turntable of --views views per sample
        flags += ["--frames", str(a.views)]
    flags += (["--sampler", a.sampler] if a.sampler else []) + (["--sample-steps", str(a.sample_steps)] if a.sample_steps else [])
    flags += ["--guidance", str(a.guidance)] if a.guidance else []
    x = S.sample(S.parse_args(flags), ck, cfg, mod, vae, ldm, [cfg["resolution"]], write=False)
    K = ck["num_classes"]
    return next(iter(x.values())), (torch.arange(n) % K if K else None)


def with_classes(real, labels, seed):
    """Real items whose classes are `labels` (n,), picked in order from a pool real(m, seed) -> (items, classes).

    The probe's features sit in one cluster per class, so two real sets whose class counts differ
    (random draws of 300 images: 90/118/92 against 103/76/121) are far apart by their mixture alone:
    FD 2.36, where sets of equal counts score 0.01-0.02. The floor, and the samples (classes in turn),
    must be measured against real sets of the samples' counts, or the FD measures the luck of the draw.
    """
    slots = [torch.nonzero(labels == k)[:, 0] for k in range(int(labels.max()) + 1)]  # where each class goes
    m = 2 * len(labels)
    while True:
        x, y = real(m, seed)
        found = [torch.nonzero(y == k)[:, 0] for k in range(len(slots))]
        if all(len(f) >= len(s) for f, s in zip(found, slots)):
            idx = torch.empty(len(labels), dtype=torch.long)
            for s, f in zip(slots, found):
                idx[s] = f[:len(s)]
            return x[idx], labels.clone()
        if m >= 64 * len(labels):
            raise SystemExit(f"real data: fewer than {len(labels)} items of some class in {m} drawn")
        m *= 2  # a class too rare in this pool: a larger one


@torch.no_grad()
def reconstructions(mod, vae, x, batch=32):
    """Stage 1 alone: real items through the VAE (posterior mean), rendered at the training size."""
    out = []
    for i in range(0, len(x), batch):
        fields = vae.decode(vae.encode(mod.encoder_input(x[i:i + batch])).mean)
        out.append(mod.preview(vae, fields).float())
    return torch.cat(out)


def row(name, labels, pred, feats, ref_labels, ref_feats, classes):
    """A table row: the class share over all and per class, the FD, and the FD of each class's items
    to the real items of that class (where the distance comes from; fewer items, so a higher floor)."""
    share, each = "-", "-"
    if labels is not None:
        per = [f"{c} {(pred[labels == k] == k).float().mean().item():.0%}" for k, c in enumerate(classes)]
        share = f"{(pred == labels).float().mean().item():.1%} ({', '.join(per)})"
        each = ", ".join(f"{c} {fid.frechet_distance(feats[(labels == k).numpy()], ref_feats[(ref_labels == k).numpy()]):.3f}"
                         for k, c in enumerate(classes))
    return f"| {name} | {share} | {fid.frechet_distance(feats, ref_feats):.3f} | {each} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a run on built-in synthetic data (image, video or nerf)")
    p.add_argument("--n", type=int, default=300, help="samples, and real items per set")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples' noise")
    p.add_argument("--views", type=int, default=8, help="NeRF: turntable views per sample")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's")
    p.add_argument("--sample-steps", type=int, default=0, help="denoising steps; default: the run's")
    p.add_argument("--guidance", type=float, default=0, help="classifier-free guidance scale (labelled runs); default: the run's")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ck, cfg, mod, vae, ldm = S.load_run(a.ckpt, torch.device("cpu"))
    if cfg["data"] or cfg["modality"] not in ("image", "video", "nerf"):
        raise SystemExit(f"--ckpt {a.ckpt}: expected a run of --modality image, video or nerf on the built-in synthetic "
                         f"data (shapes: bench/shapes.py; real images: bench/fid.py)")
    if ldm is None:
        raise SystemExit(f"--ckpt {a.ckpt}: has no stage-2 weights")
    t0 = time.time()
    guided = f", guidance {a.guidance or cfg['guidance']:g}" if ck["num_classes"] else ""
    head = (f"Run {a.ckpt}: {cfg['modality']}, stage 1 {ck['stage1']['step']} steps (validation "
            f"{ck['stage1'].get('val_psnr', float('nan')):.2f} dB), stage 2 {ck['stage2']['step']} steps, "
            f"{a.sampler or cfg['sampler']} {a.sample_steps or cfg['sample_steps']} steps{guided}, {a.n} samples "
            f"(seed {a.seed}) and {a.n} real items per set.")
    lines = [head, ""]
    if cfg["modality"] in ("image", "video"):
        R, K = cfg["resolution"], max(1, ck["num_classes"])
        video = cfg["modality"] == "video"
        real = mod.synthetic  # (n, seed) -> (images or clips, classes): fresh real items at the training size
        if video:  # the probe sees single pictures: the frames of clips, each with its clip's class
            def draw(n, seed):
                clips, y = real(max(1, n // cfg["frames"]), seed)
                return frames_of(clips), y.repeat_interleave(cfg["frames"])
        else:
            draw = real
        probe, probe_path = cached_probe(draw, K)
        xa, ya = draw(1000, 7)
        acc = (judge(probe, xa)[0] == ya).float().mean().item()
        acc_soft = (judge(probe, soften(xa))[0] == ya).float().mean().item()
        lines.append(f"Probe: held-out accuracy **{acc:.1%}** on 1000 fresh real {'frames' if video else 'images'}, "
                     f"{acc_soft:.1%} on the same softened ({probe_path}, {time.time() - t0:.0f} s).")
        lines += ["", "| set | class share | FD to real set A (probe features) | FD per class |", "|---|---|---|---|"]
        fake, lab_f = samples_of(a, ck, cfg, mod, vae, ldm, a.n)
        real_a, lab_a = with_classes(real, lab_f, 11)  # real sets with the samples' classes, item for item
        real_b, lab_b = with_classes(real, lab_f, 12)
        rec = reconstructions(mod, vae, real_b)
        per_item = (lambda y, x: y.repeat_interleave(x.shape[2])) if video else (lambda y, x: y)
        flat = frames_of if video else (lambda x: x)
        fa = judge(probe, flat(real_a))[1]
        for name, x, y in (("real set B (the floor)", real_b, lab_b), ("stage 1: set B reconstructed", rec, lab_b),
                           ("samples", fake, lab_f)):
            pred, feats = judge(probe, flat(x))
            lines.append(row(name, None if y is None else per_item(y, x), pred, feats, per_item(lab_a, real_a), fa,
                             mod.classes))
        if video:
            lines += ["", f"Motion (mean |frame t+1 - frame t|): real clips {motion(real_a):.4f}, stage 1 "
                          f"{motion(rec):.4f}, samples {motion(fake):.4f} (ratio {motion(fake) / motion(real_a):.2f})."]
    else:  # NeRF: colour of turntable renders, and the probe (number of boxes) on their single views
        draw = nerf_views(mod, cfg, a.views)
        probe, probe_path = cached_probe(draw, 4)
        xa, ya = draw(1000, 7)
        acc = (judge(probe, xa)[0] == ya).float().mean().item()
        lines.append(f"Probe (how many of a scene's 3 primitives are boxes, from one view): held-out accuracy "
                     f"**{acc:.1%}** on 1000 fresh views ({probe_path}, {time.time() - t0:.0f} s).")
        real_a = turntables(mod, R10.synthetic_scene_params(a.n, seed=11), a.views, cfg["resolution"])
        set_b = mod.synthetic(a.n, 12)  # the scenes and their coloured point clouds
        real_b = turntables(mod, set_b["params"], a.views, cfg["resolution"])
        rec = nerf_reconstructions(mod, vae, set_b["x"], a.views, cfg["resolution"])
        fake, _ = samples_of(a, ck, cfg, mod, vae, ldm, a.n)
        fa = judge(probe, frames_of(real_a))[1]
        lines += ["", "| set | mean saturation | colour histogram distance to set A | FD to set A (probe features) |",
                  "|---|---|---|---|"]
        for name, x in (("real set A (renders of synthetic scenes)", real_a), ("real set B (the floor)", real_b),
                        ("stage 1: set B reconstructed", rec), ("samples", fake)):
            f = judge(probe, frames_of(x))[1]
            lines.append(f"| {name} | {saturation(frames_of(x)):.3f} | {histogram_distance(frames_of(x), frames_of(real_a)):.3f} "
                         f"| {fid.frechet_distance(f, fa):.3f} |")
    lines.append(f"\n({time.time() - t0:.0f} s in all.)")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
