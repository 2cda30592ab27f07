"""What the fast paths buy on this machine: training steps per second with and without them.

    python bench/fast_paths.py                     # every modality's tiny preset, both stages
    python bench/fast_paths.py --modality video -- --resolution 64 --augment   # flags after -- go to train.py

`--gpu-paths auto` (train.py's default) trains under bf16 autocast (the INR decoder stays float32)
with the VAE's convolution weights in channels-last layout wherever bf16 is done in hardware: a
CUDA GPU, or a CPU with AMX or AVX512-BF16. Elsewhere a CPU runs float32, as `--gpu-paths off`
does everywhere. For each modality this runs train.py twice on its built-in data, `off` then
`auto`, for --steps steps of each stage (same seed, same batches), and prints the rate train.py
itself reports at the end of each stage (steps per second over the stage, its first step
included), their ratio, and stage 1's validation score of each run (a coarse check that bf16 did
not cost the fit). On a CPU without bf16 hardware `auto` is `off`, so the second run is `on`
instead: what forcing the paths there costs.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402  (the repository root is on sys.path from here on)


def rates(modality, paths, steps, more, work):
    """train.py's last reported steps/s of each stage: {"vae": r, "ldm": r}."""
    out = os.path.join(work, f"{modality}-{paths}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--modality", modality, "--out", out, "--overwrite",
           "--steps", str(steps), "--log-every", str(steps), "--ckpt-every", str(steps), "--gpu-paths", paths, *more]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"train.py failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    found = dict(re.findall(r"^\[(vae|ldm)\] step +\d+/\d+ .* ([\d.]+) it/s", r.stdout, re.M))
    scores = re.search(r"^\[vae\] done after \d+ steps: (.*) \(\d+ held-out items\)", r.stdout, re.M)
    return {stage: float(rate) for stage, rate in found.items()}, scores.group(1).replace("validation ", "") if scores else "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", default="image,video,shape,nerf", help="comma-separated")
    p.add_argument("--steps", type=int, default=100, help="steps of each stage, per run")
    a, more = p.parse_known_args(argv)
    more = [m for m in more if m != "--"]
    cpu = torch.device("cpu")
    print(f"CPU: bf16 in hardware {engine.bf16_in_hardware(cpu)} (AMX {torch.cpu._is_amx_tile_supported()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}); {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; {a.steps} steps per stage; train.py flags: {' '.join(more) or 'none'}\n")
    fast = "auto" if engine.bf16_in_hardware(cpu) else "on"
    print(f"| modality | stage | float32 (`--gpu-paths off`) | fast paths (`{fast}`) | speed-up | stage-1 "
          f"validation, float32 / fast |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for modality in a.modality.split(","):
            (off, val_off), (on, val_on) = (rates(modality, paths, a.steps, more, work) for paths in ("off", fast))
            for stage in ("vae", "ldm"):
                if stage in off and stage in on:
                    val = f"{val_off} / {val_on}" if stage == "vae" else ""
                    print(f"| {modality} | {stage} | {off[stage]:.2f} steps/s | {on[stage]:.2f} steps/s | "
                          f"{on[stage] / off[stage]:.2f}x | {val} |", flush=True)


if __name__ == "__main__":
    main()
