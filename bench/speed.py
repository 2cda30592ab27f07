"""Where we stand on speed and memory: one table, every figure measured in this run.

    python bench/speed.py                      # CPU (and the GPU too, when one is present)
    python bench/speed.py --device cpu --quick # a smaller, faster version of every row
    python bench/speed.py --out bench/speed.md # also write the table as markdown

Rows (each a time, a rate or a ratio against a reference timed in the same run):
  1. the from-scratch bilinear and tri-plane lookups of 01 against F.grid_sample,
     forward + backward, 1M queries of 64 channels;
  2. a stage-1 step at 256x256 with K sampled coordinates per image against decoding
     the full grid (the re-weighted ELBO of 02 is what makes the first cheap);
  3. training throughput (items/s) and peak memory of stage 1 and stage 2 (tiny preset on a
     CPU, paper preset on a GPU);
  4. sampling: 64 latents with 50 DDIM steps, then rendering them at 256x256 and 1024x1024;
  5. model FLOPs utilisation of a stage-2 training step: its FLOPs counted by
     torch.utils.flop_counter, divided by its time, as a share of the device's peak measured
     here with a large matmul (bf16 on a GPU, float32 on a CPU).
Peak memory is torch.cuda.max_memory_allocated on a GPU; on a CPU it is the peak resident
size of a fresh process that runs only that row (so rows do not inherit each other's peaks),
printed next to the same figure for a process that only builds the model and the data.
"""
import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402  (the repository root is on sys.path from here on)

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
M = importlib.import_module("05_modalities")
T = importlib.import_module("train")


def seconds(fn, device, repeat=5, warmup=2):
    """Median wall time of fn() over `repeat` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def fwd_bwd(lookup, *inputs):
    def run():
        out = lookup(*inputs)
        out.square().mean().backward()
    return run


def grid_sample_2d(plane, coords):  # the reference: (B, C, H, W), (B, N, 2) -> (B, N, C)
    return F.grid_sample(plane, coords[:, :, None], mode="bilinear", align_corners=False,
                         padding_mode="border")[..., 0].transpose(1, 2)


def lookup_rows(device, quick):
    B, C, R = 16, 64, 64
    N = (1 << 20) // B // (8 if quick else 1)  # 1M queries in all (128k with --quick)
    g = torch.Generator(device="cpu").manual_seed(0)
    plane = torch.randn(B, C, R, R, generator=g).to(device).requires_grad_()
    planes = torch.randn(B, 3, C, R, R, generator=g).to(device).requires_grad_()
    c2 = (torch.rand(B, N, 2, generator=g) * 2 - 1).to(device)
    c3 = (torch.rand(B, N, 3, generator=g) * 2 - 1).to(device)

    def triplane_reference(planes, coords):
        return sum(grid_sample_2d(planes[:, k], coords[..., list(a)]) for k, a in enumerate(inr.TRIPLANE_AXES))

    rows = []
    for name, ours, ref, args in (("bilinear lookup", inr.bilinear_lookup, grid_sample_2d, (plane, c2)),
                                  ("tri-plane lookup (sum)", inr.triplane_lookup, triplane_reference, (planes, c3))):
        t_ours, t_ref = seconds(fwd_bwd(ours, *args), device), seconds(fwd_bwd(ref, *args), device)
        rows.append((f"1. {name}, fwd+bwd, {B * N / 1e6:.2g}M queries x {C} ch",
                     f"{t_ours * 1e3:.0f} ms vs grid_sample {t_ref * 1e3:.0f} ms", f"{t_ours / t_ref:.2f}x"))
    return rows


def run_config(resolution=None, preset="tiny"):
    """(the image run's settings, its modality) at this preset and resolution."""
    flags = ["--preset", preset, "--out", os.devnull] + (["--resolution", str(resolution)] if resolution else [])
    cfg = config.parse(flags, "")[0]
    return cfg, M.modality(cfg)


def stage1_step(cfg, mod, vae, opt, x, K, device):
    _, coords, target = mod.training_batch({"x": x}, torch.arange(len(x)), K, None)  # K = 0: every pixel
    terms = V.elbo_loss(vae, x, coords, target, 1e-4, x[0].numel(), mod.recon)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()


def coords_rows(device, quick):
    R, B = 256, (2 if quick else 8)
    cfg, mod = run_config(R)
    vae = mod.build_vae().to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    x = inr.synthetic_images(inr.synthetic_params(B, seed=0), R, R).to(device)
    K = 2048
    t_k = seconds(lambda: stage1_step(cfg, mod, vae, opt, x, K, device), device, repeat=3)
    t_full = seconds(lambda: stage1_step(cfg, mod, vae, opt, x, 0, device), device, repeat=3)
    return [(f"2. stage-1 step, {B} images at {R}x{R}, K = {K} coordinates vs full grid ({R * R})",
             f"{t_k * 1e3:.0f} ms vs {t_full * 1e3:.0f} ms", f"{t_full / t_k:.1f}x faster")]


def worker(part, device_name, quick):
    """One row of section 3 or 4, meant to run in a fresh process; returns a dict."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    preset = "paper" if device.type == "cuda" else "tiny"
    cfg, mod = run_config(preset=preset)
    R = cfg["resolution"]
    vae = mod.build_vae().to(device)
    ldm = T.build_ldm(cfg, mod, num_classes=0).to(device)
    x = inr.synthetic_images(inr.synthetic_params(cfg["batch_size"], seed=0), R, R).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"preset": preset}
    if part == "stage1":
        opt = torch.optim.Adam(vae.parameters(), lr=1e-4)

        def step():
            with amp:
                stage1_step(cfg, mod, vae, opt, x, cfg["coords_per_item"], device)
        out["items_per_s"] = cfg["batch_size"] / seconds(step, device, repeat=3 if quick else 10)
    elif part == "stage2":
        opt = torch.optim.Adam(ldm.parameters(), lr=1e-4)
        z0 = torch.randn(cfg["ldm_batch"], *mod.latent_shape, device=device)

        def step():
            with amp:
                loss = ldm.loss(z0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out["step_s"] = seconds(step, device, repeat=3 if quick else 10)
        out["items_per_s"] = cfg["ldm_batch"] / out["step_s"]
        with FlopCounterMode(display=False) as counter:  # matmuls and convolutions, forward + backward
            step()
        out["flops"] = counter.get_total_flops()
    elif part == "matmul":  # in its own process: its large matrices stay out of the memory rows
        out["peak_flops"] = matmul_peak(device)
    elif part == "sampling":
        n = 16 if quick else 64
        g = torch.Generator().manual_seed(0)
        with torch.no_grad(), amp:
            t = time.perf_counter()
            z = ldm.sample((n, *mod.latent_shape), steps=50, sampler="ddim", generator=g)
            out["sample_s"] = time.perf_counter() - t
            fields = vae.decode(z)
            for size in (256, 1024):
                t = time.perf_counter()
                mod.render(vae, fields, (size, size))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out[f"render_{size}_s"] = time.perf_counter() - t
        out["n"] = n
    out["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mb()
    return out


def matmul_peak(device):
    """FLOP/s of the largest dense matmul we can time: the practical peak of this device."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / seconds(lambda: a @ b, device, repeat=10)


def peak_rss_mb():
    """This process's peak resident size. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so a worker would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB (bytes on macOS)


def run_worker(part, device, quick):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, "--device", device.type]
    r = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"bench worker {part} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def worker_rows(device, quick):
    base, s1, s2, smp, mm = (run_worker(p, device, quick) for p in ("idle", "stage1", "stage2", "sampling", "matmul"))
    achieved = s2["flops"] / s2["step_s"]
    mem = "allocated" if device.type == "cuda" else "peak RSS"
    return [
        (f"3. process with model and data only ({base['preset']} preset)", f"{mem} {base['peak_mb']:.0f} MB", ""),
        ("3. stage-1 training", f"{s1['items_per_s']:.1f} images/s", f"{mem} {s1['peak_mb']:.0f} MB"),
        ("3. stage-2 training", f"{s2['items_per_s']:.1f} latents/s", f"{mem} {s2['peak_mb']:.0f} MB"),
        (f"4. {smp['n']} samples, 50 DDIM steps", f"{smp['sample_s']:.2f} s", ""),
        (f"4. render the {smp['n']} at 256x256 / 1024x1024",
         f"{smp['render_256_s']:.2f} s / {smp['render_1024_s']:.2f} s", f"{mem} {smp['peak_mb']:.0f} MB (with sampling)"),
        (f"5. stage-2 step: {s2['flops'] / 1e9:.2f} GFLOP in {s2['step_s'] * 1e3:.1f} ms",
         f"{achieved / 1e9:.1f} GFLOP/s vs matmul peak {mm['peak_flops'] / 1e9:.1f} GFLOP/s",
         f"MFU {100 * achieved / mm['peak_flops']:.1f}%"),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="all: CPU, and CUDA if present")
    p.add_argument("--quick", action="store_true", help="fewer queries, images and samples per row")
    p.add_argument("--out", help="also write the table as markdown to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.device, a.quick)))
        return
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        raise SystemExit("--device cuda: no CUDA device is available")
    lines = ["| device | what | measured | ratio / memory |", "|---|---|---|---|"]
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name() if name == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        for row in lookup_rows(device, a.quick) + coords_rows(device, a.quick) + worker_rows(device, a.quick):
            lines.append(f"| {label} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    header = f"torch {torch.__version__}{', --quick' if a.quick else ''}"
    print(header)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"Measured with `python bench/speed.py{' --quick' if a.quick else ''}` ({header}).\n\n")
            f.write("\n".join(lines) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
