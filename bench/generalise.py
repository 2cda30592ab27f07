"""Does stage 1 encode unseen data, or memorise its training set? Held-out scores against baselines.

    python bench/generalise.py video                     # Big Buck Bunny: train on 32 clips, score the last 5
    python bench/generalise.py shape                     # 21 meshes: train on 19, score nefertiti and wingnut
    python bench/generalise.py video --name aug -- --augment  # a variant: flags after -- go to train.py
    python bench/generalise.py video --baselines-only    # the baselines alone (seconds)

Each call trains one stage-1 run (train.py --stage vae, --minutes of it, --seed) on the shared
sample data (../shared/data, see its README) in --work/<modality>-<name>, keeps a copy of every
checkpoint it writes, and scores each copy afterwards, so the table is a curve over training
steps: a VAE that memorises shows as a held-out score that falls while the training score rises.

  video  the first 32 of bbb_clips_16x64x64.npz's 37 clips train (the run holds out 3 of them
         for its own validation: neighbours in the film of clips it trains on), the last 5 are
         never seen; PSNR at 32x32 (the training size) and at 64x64 against the original frames,
         per frame and averaged over all frames (every row, the model's too).
         Baselines, computed from the 5 held-out clips alone: every frame shrunk to 8x8 and
         upsampled bicubically; the clip's mean frame at full size; an 8x8 thumbnail of the mean
         frame, upsampled; every frame shrunk to 16x16 and upsampled.
  shape  meshes21_occ64_pts8k.npz with the run's own split (seed 0: nefertiti and wingnut held
         out); IoU on the 64^3 grid and Chamfer distance (2048 points, squared, [-1, 1]^3 units),
         of the held-out meshes at every copy and of all 21 at the last.

--out appends the variant's rows to a markdown file (one table per variant).
"""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
inr = importlib.import_module("01_inr")
S = importlib.import_module("sample")


# ----------------------------------------------------------------------------------------
# Baselines for clips, from the held-out clips alone
# ----------------------------------------------------------------------------------------
def frame_psnr(a, b):
    """PSNR of every frame, averaged over the frames of all clips: (n, 3, T, H, W) twice -> dB. (sample.py
    --reconstruct averages per clip instead; a clip with a scene cut then weighs as one bad item.)"""
    n, C, T, H, W = a.shape
    return inr.psnr(a.transpose(1, 2).reshape(n * T, C, H, W), b.transpose(1, 2).reshape(n * T, C, H, W))


def shrink(x, size):
    """(n, 3, T, H, W) -> every frame resized (antialiased) to size x size."""
    n, C, T, H, W = x.shape
    f = x.transpose(1, 2).reshape(n * T, C, H, W)
    f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False, antialias=size < H)
    return f.reshape(n, T, C, size, size).transpose(1, 2)


def bicubic_up(x, size):
    n, C, T, H, W = x.shape
    f = F.interpolate(x.transpose(1, 2).reshape(n * T, C, H, W), size=(size, size), mode="bicubic", align_corners=False)
    return f.clamp(-1, 1).reshape(n, T, C, size, size).transpose(1, 2)


def video_baselines(truth):
    """{resolution: truth clips (n, 3, T, R, R) in [-1, 1]} -> {baseline name: {R: PSNR}}."""
    out = {"every frame shrunk to 8x8, upsampled bicubically (16 x 192 numbers)": {},
           "the clip's mean frame at full size (one frame)": {},
           "an 8x8 thumbnail of the mean frame, upsampled (192 numbers)": {},
           "every frame shrunk to 16x16, upsampled (16 x 768 numbers: twice the 64x64 run's latent)": {}}
    names = list(out)
    for R, x in truth.items():
        mean = x.mean(2, keepdim=True)  # (n, 3, 1, R, R)
        out[names[0]][R] = frame_psnr(bicubic_up(shrink(x, 8), R), x)
        out[names[1]][R] = frame_psnr(mean.expand_as(x), x)
        out[names[2]][R] = frame_psnr(bicubic_up(shrink(mean, 8), R).expand_as(x), x)
        out[names[3]][R] = frame_psnr(bicubic_up(shrink(x, 16), R), x)
    return out


# ----------------------------------------------------------------------------------------
# Training with a copy of every checkpoint
# ----------------------------------------------------------------------------------------
def train_with_copies(flags, out):
    """train.py with flags into out (its output to out.log); a copy of each ckpt.pt it writes in out-copies/."""
    copies = out + "-copies"
    shutil.rmtree(out, ignore_errors=True), shutil.rmtree(copies, ignore_errors=True)
    os.makedirs(copies)
    done, ckpt, seen = threading.Event(), os.path.join(out, "ckpt.pt"), [None]

    def watch():  # train.py replaces ckpt.pt in one rename, so a copy is always a whole checkpoint
        while not done.is_set():
            try:
                stamp = os.stat(ckpt).st_mtime_ns
                if stamp != seen[0]:
                    shutil.copy(ckpt, os.path.join(copies, f"{len(os.listdir(copies)):04d}.pt"))
                    seen[0] = stamp
            except FileNotFoundError:
                pass
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    t0 = time.time()
    with open(out + ".log", "w") as log:
        code = subprocess.call([sys.executable, "train.py", *flags, "--out", out], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    done.set()
    thread.join()
    if code:
        raise SystemExit(f"train.py {' '.join(flags)}: exit {code}; see {out}.log")
    if os.stat(ckpt).st_mtime_ns != seen[0]:  # the final one, unless the watcher copied it already
        shutil.copy(ckpt, os.path.join(copies, f"{len(os.listdir(copies)):04d}.pt"))
    return sorted(os.path.join(copies, f) for f in os.listdir(copies)), time.time() - t0


def checkpoints(copies):
    """(checkpoint, modality, VAE) of each copy, one per step (the last step is saved twice: its
    checkpoint, then marked finished)."""
    steps = set()
    for path in copies:
        ck, mod, vae = load(path)
        if ck["stage1"]["step"] not in steps:
            steps.add(ck["stage1"]["step"])
            yield ck, mod, vae


def load(path):
    ck, cfg, mod, vae, _ = S.load_run(path, torch.device("cpu"))
    return ck, mod, vae


@torch.no_grad()
def clip_psnrs(mod, vae, truth, batch=8):
    """PSNR of the reconstructions of the clips truth[32] (the training size), rendered at every resolution."""
    x_in, scores = mod.encoder_input(truth[mod.resolution]), {}
    recs = {R: [] for R in truth}
    for i in range(0, len(x_in), batch):
        fields = vae.decode(vae.encode(x_in[i:i + batch]).mean)
        for R in truth:
            recs[R].append(mod.render(vae, fields, mod.size(R)))
    for R, x in truth.items():
        scores[R] = frame_psnr(torch.cat(recs[R]), x)
    return scores


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modality", choices=("video", "shape"))
    p.add_argument("--minutes", type=float, default=15, help="wall-clock minutes of stage 1 (train.py --max-minutes)")
    p.add_argument("--name", default="default", help="the variant's name (its run folder and table)")
    p.add_argument("--work", default="/tmp/ddmi_generalise", help="folder for the split data and the runs")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (its model, data order and split)")
    p.add_argument("--every", type=int, default=250, help="stage-1 steps between checkpoints (the curve's points)")
    p.add_argument("--baselines-only", action="store_true", help="video: print the baselines and stop")
    p.add_argument("--mix-synthetic", type=int, default=0, metavar="N",
                   help="video: N built-in synthetic clips (file 06) join the 32 training clips")
    p.add_argument("--out", default=None, help="append the variant's table to this markdown file")
    a = p.parse_args(argv)
    if a.mix_synthetic < 0 or (a.mix_synthetic and a.modality != "video"):
        p.error(f"--mix-synthetic {a.mix_synthetic}: expected a number of clips >= 0, for video")
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(a.work, exist_ok=True)
    opts = (f" --mix-synthetic {a.mix_synthetic}" if a.mix_synthetic else "") + (f" --seed {a.seed}" if a.seed else "")
    lines = [f"### {a.modality}: {a.name} (`python bench/generalise.py {a.modality} --minutes {a.minutes:g} --name "
             f"{a.name}{opts}{' -- ' + ' '.join(extra) if extra else ''}`)", ""]

    if a.modality == "video":
        clips = np.load(os.path.join(DATA, "bbb_clips_16x64x64.npz"))["clips"]
        mixed = f"_mix{a.mix_synthetic}" if a.mix_synthetic else ""
        train_npz, test_npz = os.path.join(a.work, f"bbb_train{mixed}.npz"), os.path.join(a.work, "bbb_test.npz")
        train = clips[:32]
        if a.mix_synthetic:  # moving primitives, as uint8 frames (n, T, H, W, 3) like the film's
            V = importlib.import_module("06_video")
            synth = V.synthetic_clips(V.synthetic_video_params(a.mix_synthetic, seed=0), 16, 64, 64)
            synth = ((synth.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            train = np.concatenate([train, synth])
        np.savez(train_npz, clips=train)
        np.savez(test_npz, clips=clips[32:])
        readers = importlib.import_module("readers")
        truth = {R: x.float() / 127.5 - 1 for R, x in readers.read_clips_at(test_npz, 16, {32, 64}, "--reconstruct").items()}
        lines += ["| baseline on the 5 held-out clips | 32x32 | 64x64 |", "|---|---|---|"]
        lines += [f"| {name} | {s[32]:.2f} dB | {s[64]:.2f} dB |" for name, s in video_baselines(truth).items()]
        if a.baselines_only:
            print("\n".join(lines))
            return
        flags = ["--modality", "video", "--data", train_npz, "--stage", "vae", "--max-minutes", str(a.minutes),
                 "--ckpt-every", str(a.every), "--seed", str(a.seed), *extra]
        copies, seconds = train_with_copies(flags, os.path.join(a.work, f"video-{a.name}"))
        lines += ["", "| stage-1 step | validation (3 neighbouring clips) | held out, 32x32 | held out, 64x64 |",
                  "|---|---|---|---|"]
        for ck, mod, vae in checkpoints(copies):
            _, val, _ = mod.load(train_npz)
            with torch.no_grad():
                val_scores, _, _ = mod.evaluate(vae, val, "cpu")
            held = clip_psnrs(mod, vae, truth)
            lines.append(f"| {ck['stage1']['step']} | {val_scores['psnr']:.2f} dB | {held[32]:.2f} dB | {held[64]:.2f} dB |")
            print(lines[-1], flush=True)
    else:
        meshes = os.path.join(DATA, "meshes21_occ64_pts8k.npz")
        flags = ["--modality", "shape", "--data", meshes, "--stage", "vae", "--max-minutes", str(a.minutes),
                 "--ckpt-every", str(a.every), "--seed", str(a.seed), *extra]
        copies, seconds = train_with_copies(flags, os.path.join(a.work, f"shape-{a.name}"))
        lines += ["| stage-1 step | held-out IoU (each) | held-out Chamfer |", "|---|---|---|"]
        for ck, mod, vae in checkpoints(copies):
            _, val, _ = mod.load(meshes)
            with torch.no_grad():
                s, _, _ = mod.evaluate(vae, val, "cpu", chamfer=True)
            each = ", ".join(f"{n} {v:.3f}" for n, v in zip(val.get("names") or [], s["iou_each"]))
            lines.append(f"| {ck['stage1']['step']} | {s['iou']:.3f} ({each}) | {sum(s['chamfer_each']) / len(s['chamfer_each']):.5f} |")
            print(lines[-1], flush=True)
        items = mod.from_npz(meshes, "--data")
        with torch.no_grad():
            s, _, _ = mod.evaluate(vae, items, "cpu")
        lines.append(f"\nAll 21 meshes at the last step (19 of them trained on): mean IoU {s['iou']:.3f}.")
    lines.append(f"\nStage 1: {seconds / 60:.1f} minutes of training (2-core CPU unless said), seed {a.seed}.\n")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
