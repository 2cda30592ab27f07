"""Train DDMI: stage 1 (the D2C-VAE of files 02-03), then stage 2 (latent diffusion, file 04).

    python train.py --modality image                      # synthetic images, ~8 min on a 2-core CPU
    python train.py --modality image --data ./celebahq --preset paper --device cuda
    python train.py --modality image --stage vae --out runs/faces --data ./faces
    python train.py --modality image --stage ldm --out runs/faces       # stage 2 on that VAE
    python train.py --out runs/faces --resume                            # continue where it stopped
    python train.py --decoder hyper --from runs/faces --out runs/faces_hyper  # a new decoder on its frozen latents
    torchrun --standalone --nproc_per_node=4 train.py --data ./celebahq --preset paper   # 4 GPUs

Everything a run produces goes to its folder (--out): ckpt.pt, losses.png, recon.png,
samples.png and metrics.json. The folder of an existing run is never overwritten unless
--resume (continue it) or --overwrite (start again) is given.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
H = importlib.import_module("03_hdbf_cfc")
LDM = importlib.import_module("04_latent_diffusion")
M = importlib.import_module("05_modalities")


@dataclass
class Config:
    # -- what and where ------------------------------------------------------------------
    modality: str = "image"  # a key of MODALITIES in 05_modalities.py
    data: str = ""  # dataset path; empty: the modality's built-in synthetic data
    out: str = ""  # run folder; empty: runs/<modality>
    stage: str = "all"  # vae (stage 1), ldm (stage 2 on the run's VAE) or all
    preset: str = "tiny"  # model/training sizes from the modality's presets: tiny or paper
    seed: int = 0  # seeds the model, the data split and the data order
    device: str = ""  # cpu or cuda; empty: cuda when available
    resume: bool = False  # continue the run in --out where it stopped
    overwrite: bool = False  # start again in an --out that already holds a run
    compile: bool = False  # torch.compile the training models (the first steps are slow while it compiles)
    # -- both stages ---------------------------------------------------------------------
    steps: int = 0  # optimiser steps per stage; 0: the preset's, or as many as fit in --max-minutes
    max_minutes: float = 0.0  # wall-clock bound per stage (the schedules are planned to fit); 0: none
    resolution: int = 0  # training resolution R; 0: the preset's
    frames: int = 0  # videos: frames per clip T; NeRF: turntable views; 0: the preset's
    view_size: int = 0  # NeRF: side of the pictures (posed pictures are resized to it); 0: the data's own, 48 synthetic
    samples_per_ray: int = 0  # NeRF: stratified samples per ray (file 07); 0: the preset's
    batch_size: int = 0  # stage-1 batch; 0: the preset's
    grad_accum: int = 1  # micro-batches per optimiser step (the same step in less memory); both stages
    val_fraction: float = 0.1  # share of a data folder held out for validation
    log_every: int = 50  # steps between progress lines
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    # -- stage 1: the D2C-VAE (files 02, 03) ----------------------------------------------
    decoder: str = "ddmi"  # ddmi (positional embeddings, files 02-03), mnif or hyper (SIREN weights, file 08; images)
    from_run: str = ""  # a trained run: keep its encoder and diffusion model frozen, train only a new --decoder
    variant: str = "hdbf_cfc"  # decoder/read-out: single, hdbf_concat or hdbf_cfc (file 03)
    coords_per_item: int = -1  # K query coordinates per item and step; 0: all; -1: the preset's
    z_ch: int = 0  # latent channels Z
    enc_ch: int = 0  # base channels of the encoder and decoder
    enc_mult: tuple = ()  # channel multiplier per level; len - 1 = number of 2x downsamplings
    field_ch: int = 0  # channels of each basis field
    mlp_hidden: int = 0  # width of the read-out MLP
    mlp_layers: int = 0  # linear layers of the read-out MLP (mnif, hyper: of the generated SIREN, as wide)
    bases: int = 16  # mnif: basis SIRENs K (file 08)
    lambda_z: float = -1.0  # KL weight, reached after 90% of stage 1; -1: the preset's
    vae_steps: int = 0  # (preset) default stage-1 steps
    vae_lr: float = 0.0  # Adam learning rate, stage 1
    # -- stage 2: latent diffusion (file 04) ----------------------------------------------
    ldm_ch: int = 0  # UNet base channels
    ldm_mult: tuple = ()  # UNet channel multiplier per level
    ldm_attn: tuple = ()  # UNet levels with self-attention
    ldm_steps: int = 0  # (preset) default stage-2 steps
    ldm_batch: int = 0  # stage-2 batch
    ldm_lr: float = 0.0  # Adam learning rate, stage 2
    prediction: str = ""  # what the UNet predicts: eps (the paper's) or v (file 04); empty: the preset's
    ema_decay: float = 0.0  # EMA of the UNet weights, used for sampling
    p_uncond: float = 0.1  # label dropout for classifier-free guidance (labelled data only)
    sampler: str = ""  # ddim or ddpm, for the sample sheet and sample.py's default; empty: the preset's
    sample_steps: int = 0  # denoising steps of that sampler; 0: the preset's


# The range of every numeric flag: (lowest, highest, what to say when it is outside).
_POS, _NONNEG = (1, math.inf, "a positive integer"), (0, math.inf, "a number >= 0")
NUMBER_RANGES = {
    **{k: _POS for k in ("resolution", "frames", "samples_per_ray", "batch_size", "grad_accum", "log_every",
                         "ckpt_every", "z_ch", "enc_ch", "field_ch", "mlp_hidden", "mlp_layers", "bases", "vae_steps", "ldm_ch",
                         "ldm_steps", "ldm_batch", "sample_steps")},
    **{k: _NONNEG for k in ("steps", "max_minutes", "coords_per_item", "lambda_z", "view_size")},
    "enc_mult": (1, math.inf, "positive integers like 1,2,2"), "ldm_mult": (1, math.inf, "positive integers like 1,2"),
    "ldm_attn": (0, math.inf, "level indices like 1 or 2,3"),
    "val_fraction": (1e-9, 1 - 1e-9, "a fraction between 0 and 1 (exclusive)"),
    "vae_lr": (1e-12, math.inf, "a positive learning rate"), "ldm_lr": (1e-12, math.inf, "a positive learning rate"),
    "ema_decay": (0, 1 - 1e-12, "a decay in [0, 1)"), "p_uncond": (0, 1, "a probability in [0, 1]"),
}

# Flags that may differ from the saved config when a run is continued.
RESUME_FLAGS = {"out", "resume", "stage", "steps", "max_minutes", "device", "log_every", "ckpt_every",
                "sampler", "sample_steps", "grad_accum", "compile"}


# What a --from run takes from its source run: whatever shapes the encoder, the latents and
# the diffusion model (and the data split), so that only the decoder differs.
FROM_FROZEN = {"modality", "data", "preset", "seed", "resolution", "frames", "view_size", "samples_per_ray",
               "val_fraction", "z_ch", "enc_ch", "enc_mult", "ldm_ch", "ldm_mult", "ldm_attn", "ldm_steps", "ldm_batch",
               "ldm_lr", "prediction", "ema_decay", "p_uncond"}


def int_list(text):
    """'1,2,2' -> (1, 2, 2); argparse names the flag if this fails ('invalid int_list value')."""
    return tuple(int(v) for v in text.split(","))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): e.g. 'argument --steps: invalid int value: 'x''."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def parse_config(argv):
    """Config from defaults <- preset <- command line; unknown flags are errors (argparse)."""
    p = OneLineParser(description=__doc__.split("\n")[0])
    # --help shows each field's comment from Config above (its first line)
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, "").replace("%", "%%")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=text)
        elif f.type is tuple:
            p.add_argument(flag, type=int_list, metavar="A,B,..", help=text)
        else:  # (--from-run is also --from)
            names = (flag, "--from") if f.name == "from_run" else (flag,)
            p.add_argument(*names, dest=f.name, type=f.type, metavar=f.type.__name__.upper(), help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None and v is not False}
    cfg = dataclasses.asdict(Config())
    modality = given.get("modality", cfg["modality"])
    if modality not in M.MODALITIES:
        raise SystemExit(f"--modality {modality}: unknown; expected one of {', '.join(M.MODALITIES)}")
    presets = M.MODALITIES[modality].presets
    preset = given.get("preset", cfg["preset"])
    if preset not in presets:
        raise SystemExit(f"--preset {preset}: unknown; expected one of {', '.join(presets)}")
    cfg.update(presets[preset])
    cfg.update(given)
    for name, value in given.items():  # every number has a range: name the flag and say which
        if name not in NUMBER_RANGES:
            continue
        low, high, what = NUMBER_RANGES[name]
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(math.isfinite(v) and low <= v <= high for v in values):
            shown = ",".join(str(v) for v in values) if isinstance(value, tuple) else value
            raise SystemExit(f"--{name.replace('_', '-')} {shown}: expected {what}")
    if cfg["decoder"] not in ("ddmi", "mnif", "hyper"):
        raise SystemExit(f"--decoder {cfg['decoder']}: expected ddmi, mnif or hyper")
    if cfg["decoder"] != "ddmi" and modality != "image":
        raise SystemExit(f"--decoder {cfg['decoder']}: weight-generating decoders (file 08) are built for images only")
    if cfg["variant"] not in H.VARIANTS:
        raise SystemExit(f"--variant {cfg['variant']}: expected one of {', '.join(H.VARIANTS)}")
    if cfg["sampler"] not in ("ddim", "ddpm"):
        raise SystemExit(f"--sampler {cfg['sampler']}: expected ddim or ddpm")
    if cfg["prediction"] not in ("eps", "v"):
        raise SystemExit(f"--prediction {cfg['prediction']}: expected eps or v")
    if cfg["stage"] not in ("vae", "ldm", "all"):
        raise SystemExit(f"--stage {cfg['stage']}: expected vae, ldm or all")
    if cfg["resolution"] % 2 ** (len(cfg["enc_mult"]) - 1 + len(cfg["ldm_mult"]) - 1):
        raise SystemExit(f"--resolution {cfg['resolution']}: must be divisible by "
                         f"{2 ** (len(cfg['enc_mult']) - 1 + len(cfg['ldm_mult']) - 1)} (encoder and UNet downsampling)")
    cfg["out"] = cfg["out"] or os.path.join("runs", modality)
    cfg["data"] = cfg["data"] or None
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return cfg, given


# ----------------------------------------------------------------------------------------
# Checkpoints: a dict of state_dicts + the plain config dict + steps + RNG states
# ----------------------------------------------------------------------------------------
def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken ckpt."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, modality=None, preset=None):
    """torch.load(weights_only=True) with one-line errors for the usual mistakes."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a DDMI checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or "config" not in ck or "stage1" not in ck:
        raise SystemExit(f"{path}: not a DDMI checkpoint (no config/stage1 entries)")
    cfg = ck["config"]
    if modality is not None and cfg["modality"] != modality:
        raise SystemExit(f"{path}: checkpoint of modality {cfg['modality']!r}, but --modality {modality} was given")
    if preset is not None and cfg["preset"] != preset:
        raise SystemExit(f"{path}: checkpoint of preset {cfg['preset']!r}, but --preset {preset} was given")
    return ck


def from_source(cfg, given):
    """--from RUN: (this run's config, RUN's checkpoint). The config is RUN's, with the flags given now
    (the decoder and stage-1 training); the flags of FROM_FROZEN must stay RUN's."""
    src = load_checkpoint(os.path.join(cfg["from_run"], "ckpt.pt"))
    if not src["stage1"].get("done") or "vae" not in src["stage1"]:
        raise SystemExit(f"--from {cfg['from_run']}: its stage 1 is not finished; continue it with --resume first")
    if os.path.abspath(cfg["from_run"]) == os.path.abspath(cfg["out"]):
        raise SystemExit(f"--out {cfg['out']}: that is the --from run itself; give the new decoder its own --out")
    saved = src["config"]
    clash = [k for k in given if k in FROM_FROZEN and given[k] != saved.get(k)]
    if clash:
        raise SystemExit(f"--{clash[0].replace('_', '-')}: a --from run keeps its source's ({saved.get(clash[0])!r}): "
                         f"the encoder, latents and diffusion model are {cfg['from_run']}'s")
    own = set(given) | {"out", "device", "stage", "resume", "overwrite", "from_run"}
    cfg = {**cfg, **saved, **{k: cfg[k] for k in own}}
    if cfg["decoder"] != "ddmi" and cfg["modality"] != "image":
        raise SystemExit(f"--decoder {cfg['decoder']}: weight-generating decoders (file 08) are built for images "
                         f"only; {cfg['from_run']} is a {cfg['modality']} run")
    return cfg, src


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------
# Ctrl-C. The first one asks the training loops to stop at the next step boundary, where
# weights, optimiser, data order and random state agree, so the checkpoint written then
# lets --resume continue exactly as if nothing had happened. A second Ctrl-C aborts at
# once without saving; the last checkpoint written is left as it was. The loops read STOP
# at each step boundary (all processes agree on it, see below) and raise KeyboardInterrupt.
# ----------------------------------------------------------------------------------------
STOP = {"requested": False}


def on_sigint(signum, frame):
    if STOP["requested"]:
        raise SystemExit("aborted by a second Ctrl-C; the last checkpoint written is intact")
    STOP["requested"] = True
    print("\nCtrl-C: stopping after this step and saving (press again to abort without saving)", flush=True)


# ----------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N train.py ...` starts N copies of this
# script with RANK / WORLD_SIZE / LOCAL_RANK set. Each copy holds the whole model; PyTorch's
# DistributedDataParallel averages the gradients across them during backward (NCCL between
# GPUs, gloo between CPU processes), so every copy takes the same optimiser step.
#
# The one rule that keeps this exact: every process draws the same GLOBAL batch from the
# run's generator (items, query coordinates, noise), then computes only its own slice of it.
# The gradient of the mean over the whole batch is the mean of the slices' gradients, so N
# processes take the step one process would (up to float rounding), schedules count the
# same global steps, and a run can be continued with another number of processes. Drawing
# a batch is cheap next to the model; only the model's work is split.
# Only rank 0 prints, evaluates and writes files; decisions that could differ between
# processes (out of time, Ctrl-C, a non-finite loss) are agreed on by all of them.
# ----------------------------------------------------------------------------------------
DIST = {"rank": 0, "world": 1, "device": torch.device("cpu")}


def setup_distributed(cfg):
    """Join the process group when started by torchrun; set DIST and, on CUDA, this process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{local}"
            torch.cuda.set_device(local)
        # a long timeout: the other ranks wait in the next collective while rank 0 evaluates
        dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
        if rank != 0:  # one voice: the other ranks' stdout goes nowhere (errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
    DIST.update(rank=dist.get_rank() if dist.is_initialized() else 0, world=world, device=torch.device(cfg["device"]))


def any_rank(*flags):
    """The flags OR-ed over all processes (a no-op with one), so that every rank takes the same branch."""
    if DIST["world"] == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=DIST["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean_over_ranks(values):
    """A list of floats averaged over the processes (for the logged losses)."""
    if DIST["world"] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=DIST["device"])
    dist.all_reduce(t)
    return (t / DIST["world"]).tolist()


def my_slices(batch_size, accum):
    """This rank's share of a global batch, as `accum` equal micro-batch slices."""
    per_rank = batch_size // DIST["world"]
    micro = per_rank // accum
    start = DIST["rank"] * per_rank
    return [slice(start + i * micro, start + (i + 1) * micro) for i in range(accum)]


def replica_spread(model):
    """Largest difference of any weight between the processes (0: the replicas are identical)."""
    if DIST["world"] == 1:
        return 0.0
    v = torch.nn.utils.parameters_to_vector(model.parameters()).detach().float()
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def for_training(module, cfg):
    """Wrap a loss module for this run: DDP across processes, then torch.compile if asked."""
    if DIST["world"] > 1:
        module = DistributedDataParallel(module)
    return torch.compile(module) if cfg["compile"] else module


def optimiser_step(model, opt, slices, loss_of, explain_bad):
    """One step on this rank's slices of the global batch: gradients accumulated over the
    micro-batches (DDP averages them across ranks on the last backward), then the update.

    loss_of(slice) -> dict of scalar tensors with a "loss" entry; returns the dict's values
    averaged over the micro-batches (floats). A non-finite value on any rank stops the run
    with the message explain_bad(values) before the weights are touched.
    """
    opt.zero_grad(set_to_none=True)
    totals = {}
    for i, sl in enumerate(slices):
        last = i == len(slices) - 1
        # DDP's no_sync: keep the gradient local until the last micro-batch (one all-reduce per step)
        quiet = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with quiet:
            terms = loss_of(sl)
            # each micro-batch is a mean over its items: divide so the sum is the batch mean
            (terms["loss"] / len(slices)).backward()
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / len(slices)
    (bad,) = any_rank(not all(torch.isfinite(v) for v in totals.values()))
    if bad:  # stop before the bad step touches the weights
        raise SystemExit(explain_bad({k: v.item() for k, v in totals.items()}))
    opt.step()
    return {k: v.item() for k, v in totals.items()}


# ----------------------------------------------------------------------------------------
# Loading. Every dataset sits in memory (the loaders of 05 decode it once), so a batch is
# an index into it plus random draws. On a GPU run one background thread draws the next
# batches while the GPU works on this one, pins them (page-locked memory, so the copy to
# the GPU runs asynchronously, `non_blocking`), and hands them over in order. The thread
# is the only user of the run's generator, one batch after another, so the batches are
# exactly those of a loop without it; the state saved in a checkpoint is the generator's
# state after the last batch the model consumed, not after the ones drawn ahead. On a CPU
# run there is nothing to overlap (the model already uses every core; a second thread
# made the tiny video stage 2 39% slower here), so the batch is drawn when it is needed.
# ----------------------------------------------------------------------------------------
class Prefetcher:
    """draw(gen) -> tuple of CPU tensors (or None); next() -> that tuple on `device`."""

    def __init__(self, draw, gen, device, background=None):
        self.draw, self.gen, self.device = draw, gen, device
        self.resume_state = gen.get_state()  # the generator's state after the batches consumed so far
        self.batches, self.closing, self.thread = queue.Queue(maxsize=2), threading.Event(), None
        if device.type == "cuda" if background is None else background:
            self.thread = threading.Thread(target=self._work, daemon=True)
            self.thread.start()

    def _work(self):
        try:
            while not self.closing.is_set():
                batch = self.draw(self.gen)
                if self.device.type == "cuda":
                    batch = tuple(b.pin_memory() if torch.is_tensor(b) else b for b in batch)
                item = (self.gen.get_state(), batch)
                while not self.closing.is_set():  # wait for room, but not past close()
                    try:
                        self.batches.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # a failing draw is raised in the training loop
            self.batches.put((None, e))

    def next(self):
        if self.thread is None:  # drawn here and now
            batch = self.draw(self.gen)
            self.resume_state = self.gen.get_state()
            return tuple(b.to(self.device) if torch.is_tensor(b) else b for b in batch)
        state, batch = self.batches.get()
        if state is None:
            raise batch
        self.resume_state = state
        return tuple(b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)

    def close(self):
        if self.thread is not None:
            self.closing.set()
            self.thread.join()


# ----------------------------------------------------------------------------------------
# Small helpers: progress, plots
# ----------------------------------------------------------------------------------------
def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Budget:
    """Steps of a stage, bounded by --steps and --max-minutes.

    With a time bound, the planned number of steps (which the KL annealing follows) is
    fixed after `probe` steps from the measured speed, then kept (also across --resume).
    """

    def __init__(self, steps, max_minutes, plan=None, probe=20):
        steps = steps or 10**9  # 0: bounded by time alone
        self.steps, self.seconds, self.plan, self.probe = steps, max_minutes * 60, plan, probe
        self.t0, self.start_step = time.time(), None

    def planned(self, step):
        if self.plan is None:
            if self.start_step is None:
                self.start_step, self.t0 = step, time.time()
            if not self.seconds:
                self.plan = self.steps
            elif step - self.start_step >= self.probe:
                rate = (step - self.start_step) / (time.time() - self.t0)
                # with several processes: rank 0's plan (all of them reach this line at the same step)
                self.plan = from_rank0(min(self.steps, step + int(rate * (self.seconds - (time.time() - self.t0)))))
        return self.plan if self.plan is not None else self.steps

    def done(self, step):
        out_of_time = self.seconds and time.time() - self.t0 > self.seconds
        return step >= self.planned(step) or out_of_time


def from_rank0(value):
    """Rank 0's number (int or float), on every process: what must be the same everywhere."""
    if DIST["world"] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=DIST["device"])
    dist.broadcast(t, 0)
    return type(value)(t.item())


def stage_steps(cfg, preset_key):
    """--steps if given; else, under --max-minutes, no step bound (0); else the preset's count."""
    return cfg["steps"] or (0 if cfg["max_minutes"] else cfg[preset_key])


def progress(tag, step, total, terms, t0, step0):
    rate = (step - step0) / max(time.time() - t0, 1e-9)
    eta = (total - step) / rate if rate > 0 else 0
    losses = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
    print(f"[{tag}] step {step:6d}/{total}  {losses}  {rate:.2f} it/s  ETA {fmt_time(eta)}", flush=True)


def plot_losses(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(k, v) for k, v in history.items() if v]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], stages):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"stage1": "stage 1: reconstruction term", "stage2": "stage 2: diffusion loss"}.get(name, name))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_metrics(run, metrics):
    path = os.path.join(run, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------
# Stage 1: the D2C-VAE
# ----------------------------------------------------------------------------------------
def evaluate_vae(mod, vae, val, cfg, device):
    """The modality's validation scores (e.g. {"psnr": dB}) and rows for the recon.png sheet."""
    vae.eval()
    with torch.no_grad():
        out = mod.evaluate(vae, val, cfg, device)
    vae.train()
    return out


class ELBO(torch.nn.Module):
    """The stage-1 loss (file 02's elbo_loss) as a module, so that DDP can wrap it."""

    def __init__(self, vae, num_values, recon_fn):
        super().__init__()
        self.vae, self.num_values, self.recon_fn = vae, num_values, recon_fn

    def forward(self, x, coords, target, lambda_z, eps):
        return V.elbo_loss(self.vae, x, coords, target, lambda_z, self.num_values, self.recon_fn, eps)


def train_vae(cfg, mod, vae, opt, state, train, val, device, ckpt):
    s1 = state["stage1"]
    budget = Budget(stage_steps(cfg, "vae_steps"), cfg["max_minutes"], plan=s1.get("plan"))
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # data order, query coordinates, noise
    if "generator" in s1:
        gen.set_state(s1["generator"])
    n, K, B = len(train["x"]), cfg["coords_per_item"], cfg["batch_size"]
    # D_x, the ELBO's scaling (file 02)
    model = for_training(ELBO(vae, mod.values_per_item(cfg), mod.recon), cfg)
    # the posterior's shape per item, for the reparameterisation noise
    z_shape = mod.unstack_planes(torch.zeros(1, *mod.latent_shape(cfg))).shape[1:]
    slices = my_slices(B, cfg["grad_accum"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    step, t0, step0 = s1["step"], time.time(), s1["step"]
    window = []
    vae.train()

    def explain_bad(v):
        bad = [name for name, k in (("reconstruction", "recon"), ("KL", "kl")) if not math.isfinite(v[k])]
        return (f"stage 1, step {step}: the {' and '.join(bad) or 'total'} term of the loss is not finite "
                f"(recon {v['recon']:.4g}, kl {v['kl']:.4g}); stopped, the last checkpoint in {cfg['out']} is intact")

    def draw(gen):
        # the global batch: items, the encoder's input, K query coordinates per item and
        # the signal there, and the reparameterisation noise, all from the run's generator
        idx = torch.randint(n, (B,), generator=gen)
        x, coords, target = mod.training_batch(train, idx, K, gen, torch.device("cpu"))
        return x, coords, target, torch.randn((B, *z_shape), generator=gen)

    loader = Prefetcher(draw, gen, device)
    try:
        # (agreed by all processes: out of steps or time, Ctrl-C; checked again after each step)
        done, stop = any_rank(budget.done(step), STOP["requested"])
        while not done:
            if stop:
                raise KeyboardInterrupt
            x, coords, target, eps = loader.next()
            lam = V.kl_weight(step, budget.planned(step), cfg["lambda_z"])

            def loss_of(sl):  # this process's micro-batch sl of the global batch
                with amp:
                    return model(x[sl], coords[sl], target[sl], lam, eps[sl])

            terms = optimiser_step(model, opt, slices, loss_of, explain_bad)
            step += 1
            window.append(terms["recon"])
            done, stop = any_rank(budget.done(step), STOP["requested"])
            if step % cfg["log_every"] == 0 or done:
                recon, kl = mean_over_ranks([sum(window) / len(window), terms["kl"]])
                s1["history"].append((step, recon))
                progress("vae", step, budget.planned(step), {"recon": recon, "kl/D_x": kl, "lambda_z": lam}, t0, step0)
                window = []
            if step % cfg["ckpt_every"] == 0 or done:
                s1.update(step=step, plan=budget.plan, generator=loader.resume_state, vae=vae.state_dict(),
                          opt=opt.state_dict())
                ckpt()
    except KeyboardInterrupt:  # keep the steps finished so far, then let main() save
        s1.update(step=step, plan=budget.plan, generator=loader.resume_state, vae=vae.state_dict(),
                  opt=opt.state_dict())
        raise
    finally:
        loader.close()
    s1.update(done=True, step=step, vae=vae.state_dict(), opt=opt.state_dict(), generator=loader.resume_state,
              plan=budget.plan)
    if DIST["world"] > 1:
        print(f"[vae] weights identical on the {DIST['world']} processes: largest difference {replica_spread(vae):.3g}")
    if DIST["rank"] != 0:  # the other ranks go on to stage 2 (they wait there for rank 0)
        return None, None, None
    scores, rows, names = evaluate_vae(mod, vae, val, cfg, device)
    s1.update({f"val_{k}": v for k, v in scores.items()})
    print(f"[vae] done after {step} steps: {mod.describe(scores)} ({len(val['x'])} held-out items)")
    return rows, names, mod.describe(scores)


# ----------------------------------------------------------------------------------------
# Stage 2: latent diffusion on the frozen VAE's latents
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(mod, vae, x, device, batch=64):
    """Posterior mean and std of every training item: z ~ q(z|x) is redrawn at every step."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(x), batch):
        q = vae.encode(mod.to_signal(x[i:i + batch].to(device)))
        # tri-planes (B, 3, Z, h, w) are stacked on channels (B, 3Z, h, w) for the UNet of file 04
        means.append(q.mean.float().cpu().flatten(1, -3))
        stds.append(q.std.float().cpu().flatten(1, -3))
    return torch.cat(means), torch.cat(stds)


def build_ldm(cfg, mod, num_classes):
    C, H, W = mod.latent_shape(cfg)
    unet = LDM.UNet(C, cfg["ldm_ch"], tuple(cfg["ldm_mult"]), attn_levels=tuple(cfg["ldm_attn"]),
                    num_classes=num_classes)
    # (runs saved before the --prediction flag predicted eps)
    return LDM.LatentDiffusion(unet, LDM.NoiseSchedule(), num_classes, cfg["p_uncond"], cfg.get("prediction") or "eps")


def train_ldm(cfg, mod, vae, ldm, ema, opt, state, train, device, ckpt):
    s2 = state["stage2"]
    mean, std = encode_dataset(mod, vae, train["x"], device)  # (n, Z, h, w) each
    if "scale_factor" not in s2:
        # scale factor 1 / std(z) from latents z ~ q(z|x), so the diffusion sees unit variance
        # (with several processes: rank 0's estimate)
        s2["scale_factor"] = from_rank0(LDM.estimate_scale_factor(mean + std * torch.randn_like(std)))
    scale = s2["scale_factor"]
    print(f"[ldm] {len(mean)} latents of shape {tuple(mean.shape[1:])}, scale factor {scale:.4f}")
    labels = train["label"]
    budget = Budget(stage_steps(cfg, "ldm_steps"), cfg["max_minutes"], plan=s2.get("plan"))
    gen = torch.Generator().manual_seed(cfg["seed"] + 2)
    if "generator" in s2:
        gen.set_state(s2["generator"])
    model = for_training(ldm, cfg)
    B, T = cfg["ldm_batch"], ldm.schedule.T
    slices = my_slices(B, cfg["grad_accum"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    step, t0, step0, window = s2["step"], time.time(), s2["step"], []
    ldm.train()
    def draw(gen):
        # the global batch and all its draws, from the run's generator (see "Several processes")
        idx = torch.randint(len(mean), (B,), generator=gen)
        # z_0 ~ q(z|x) = mu + sigma * eps, multiplied by the scale factor
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        t = torch.randint(T, (B,), generator=gen)  # diffusion time per item
        eps = torch.randn(z0.shape, generator=gen)  # diffusion noise
        u = torch.rand(B, generator=gen)  # label dropout draw (labelled data only)
        return z0, t, eps, u, labels[idx] if labels is not None else None

    loader = Prefetcher(draw, gen, device)
    try:
        done, stop = any_rank(budget.done(step), STOP["requested"])
        while not done:
            if stop:
                raise KeyboardInterrupt
            z0, t, eps, u, y = loader.next()

            def loss_of(sl):  # this process's micro-batch sl of the global batch
                with amp:
                    return {"loss": model(z0[sl], None if y is None else y[sl], t[sl], eps[sl], u[sl])}

            terms = optimiser_step(model, opt, slices, loss_of, lambda v: (
                f"stage 2, step {step}: the diffusion loss is not finite ({v['loss']:.4g}); "
                f"stopped, the last checkpoint in {cfg['out']} is intact"))
            ema.update(ldm)
            step += 1
            window.append(terms["loss"])
            done, stop = any_rank(budget.done(step), STOP["requested"])
            if step % cfg["log_every"] == 0 or done:
                (loss,) = mean_over_ranks([sum(window) / len(window)])
                s2["history"].append((step, loss))
                s2["recent_loss"] = loss
                progress("ldm", step, budget.planned(step), {"loss": loss}, t0, step0)
                window = []
            if step % cfg["ckpt_every"] == 0 or done:
                s2.update(step=step, plan=budget.plan, generator=loader.resume_state, ldm=ldm.state_dict(),
                          ema=ema.state_dict(), opt=opt.state_dict())
                ckpt()
    except KeyboardInterrupt:  # keep the steps finished so far, then let main() save
        s2.update(step=step, plan=budget.plan, generator=loader.resume_state, ldm=ldm.state_dict(),
                  ema=ema.state_dict(), opt=opt.state_dict())
        raise
    finally:
        loader.close()
    s2.update(done=True, step=step, plan=budget.plan, generator=loader.resume_state, ldm=ldm.state_dict(),
              ema=ema.state_dict(), opt=opt.state_dict())
    if DIST["world"] > 1:
        print(f"[ldm] weights identical on the {DIST['world']} processes: largest difference {replica_spread(ldm):.3g}")


@torch.no_grad()
def sample_sheet(cfg, mod, vae, ema_model, scale, num_classes, path, n=8, seed=0):
    """Decode n EMA samples per class (or 2n unconditional ones) and write them as a PNG sheet."""
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    rows, names = [], []
    for label in (range(num_classes) if num_classes else [None, None]):
        y = torch.full((n,), label, dtype=torch.long) if label is not None else None
        z = ema_model.sample((n, *mod.latent_shape(cfg)), steps=cfg["sample_steps"], sampler=cfg["sampler"],
                             y=y, generator=g)
        rows.append(mod.preview(vae, vae.decode(mod.unstack_planes(z / scale)), cfg).cpu())
        names.append(f"class {label}" if label is not None else "")
    decoder = {"ddmi": "DDMI", "mnif": "mNIF", "hyper": "hyper-transformer"}[cfg.get("decoder", "ddmi")]
    mod.write_sheet(rows, path, names, f"{decoder} samples ({cfg['sampler']}, {cfg['sample_steps']} steps, EMA weights)")


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def main(argv=None):
    cfg, given = parse_config(sys.argv[1:] if argv is None else argv)
    fresh = not os.path.exists(cfg["out"])
    STOP["requested"] = False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        setup_distributed(cfg)
        train_run(cfg, given)
    except BaseException:
        # a run that failed before writing anything (bad data, say) leaves no empty folder behind
        if DIST["rank"] == 0 and fresh and os.path.isdir(cfg["out"]) and not os.listdir(cfg["out"]):
            os.rmdir(cfg["out"])
        raise
    finally:
        if previous is not None:  # (None: a handler not installed from Python; leave it)
            signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def train_run(cfg, given):
    run = cfg["out"]
    ckpt_path = os.path.join(run, "ckpt.pt")
    exists = os.path.exists(ckpt_path)
    state = source = None
    if cfg["from_run"] and not cfg["resume"]:
        cfg, source = from_source(cfg, given)
    if cfg["resume"] or (cfg["stage"] == "ldm" and exists and not cfg["overwrite"]):
        if not exists:
            raise SystemExit(f"--out {run}: no ckpt.pt to continue from (train stage 1 there first)")
        ck = load_checkpoint(ckpt_path, given.get("modality"), given.get("preset"))
        saved = ck["config"]
        # the run's own config wins; only flags about how long / where to run may change
        clash = [k for k in given if k not in RESUME_FLAGS and given[k] != saved.get(k)]
        if clash:
            raise SystemExit(f"--{clash[0].replace('_', '-')}: differs from the run in {run} "
                             f"({saved.get(clash[0])!r}); start a new --out instead")
        # flags given now win; the device is re-detected (a GPU run may continue on a CPU);
        # flags newer than the run's checkpoint take their defaults
        cfg = {**cfg, **saved, **{k: cfg[k] for k in RESUME_FLAGS if k in given or k in ("out", "device", "resume")}}
        state = ck
        print(f"continuing {run}: stage 1 at step {ck['stage1']['step']}, stage 2 at step {ck['stage2']['step']}")
    elif cfg["stage"] == "ldm":
        raise SystemExit(f"--stage ldm: no trained VAE in {run} (run --stage vae with the same --out first)")
    elif os.path.exists(run) and os.listdir(run) and not cfg["overwrite"]:
        raise SystemExit(f"--out {run}: folder exists and is not empty; use --resume to continue it, "
                         f"--overwrite to start again, or another --out")
    for flag in ("batch_size", "ldm_batch"):  # every process gets the same number of items per micro-batch
        parts = DIST["world"] * cfg["grad_accum"]
        if cfg[flag] % parts:
            raise SystemExit(f"--{flag.replace('_', '-')} {cfg[flag]}: must be divisible by processes x "
                             f"--grad-accum = {DIST['world']} x {cfg['grad_accum']}")
    if DIST["world"] > 1:
        dist.barrier()  # every process has checked the folder before rank 0 writes to it
    main_rank = DIST["rank"] == 0  # the only process that writes files
    try:
        if main_rank:
            os.makedirs(run, exist_ok=True)
            probe = os.path.join(run, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {run}: cannot write there ({e.strerror})")

    print("config: " + ", ".join(f"{k}={cfg[k]}" for k in given if k in cfg))
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])
    mod = M.MODALITIES[cfg["modality"]]
    t_load = time.time()
    configure = getattr(mod, "configure", lambda c: None)  # records that need the run's settings (NeRF)
    configure(cfg)
    train, val, num_classes = mod.load(cfg["data"], cfg["resolution"], cfg["val_fraction"], cfg["seed"],
                                       frames=cfg.get("frames"))
    if hasattr(mod, "data_config"):  # what the model must know about the data (NeRF: scenes, cameras)
        cfg = {**cfg, **mod.data_config(train, cfg)}
        configure(cfg)
    size = cfg.get("view_size") or cfg["resolution"]  # NeRF: the pictures' size (its resolution is the planes')
    print(f"data: {len(train['x'])} training and {len(val['x'])} validation items "
          f"({cfg['data'] or 'built-in synthetic'}, {size}x{size}, {time.time() - t_load:.0f} s)")

    vae = mod.build_vae(cfg).to(device)
    if cfg.get("from_run"):  # hyper-transforming: the source's encoder stays as it is, only the decoder learns
        vae.encoder.requires_grad_(False)
    vae_opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=cfg["vae_lr"])
    ldm = build_ldm(cfg, mod, num_classes).to(device)
    if device.type == "cuda":  # convolutions run faster on NHWC tensors with tensor cores
        ldm = ldm.to(memory_format=torch.channels_last)
    ema = LDM.EMA(ldm, cfg["ema_decay"], warmup=True)
    ldm_opt = torch.optim.Adam(ldm.parameters(), lr=cfg["ldm_lr"])
    if state is None:
        state = {"config": cfg, "num_classes": num_classes,
                 "stage1": {"step": 0, "history": []}, "stage2": {"step": 0, "history": []}}
    else:
        if "vae" in state["stage1"]:
            vae.load_state_dict(state["stage1"]["vae"])
            vae_opt.load_state_dict(state["stage1"]["opt"])
        if "ldm" in state["stage2"]:
            ldm.load_state_dict(state["stage2"]["ldm"])
            ema.load_state_dict(state["stage2"]["ema"])
            ema.num_updates = state["stage2"]["step"]
            ldm_opt.load_state_dict(state["stage2"]["opt"])
        set_rng_state(state["rng"])
    if source is not None:  # --from: the source's encoder, and its diffusion model when it has one
        vae.encoder.load_state_dict({k[len("encoder."):]: v for k, v in source["stage1"]["vae"].items()
                                     if k.startswith("encoder.")})
        if source["stage2"].get("done"):
            state["stage2"] = source["stage2"]
            ldm.load_state_dict(state["stage2"]["ldm"])
            ema.load_state_dict(state["stage2"]["ema"])
        print(f"from {cfg['from_run']}: its encoder (frozen)" + (" and diffusion model" if source["stage2"].get("done")
                                                                 else "; no diffusion model there yet"))
    state["config"] = cfg
    n1 = sum(p.numel() for p in vae.parameters())
    n2 = sum(p.numel() for p in ldm.parameters())
    kind = cfg["variant"] if cfg.get("decoder", "ddmi") == "ddmi" else cfg["decoder"]
    print(f"model: D2C-VAE ({kind}) {n1 / 1e6:.2f}M parameters, UNet {n2 / 1e6:.2f}M; latent "
          f"{mod.latent_shape(cfg)}; device {device}" + (f", {DIST['world']} processes" if DIST["world"] > 1 else ""))

    def ckpt():
        if main_rank:
            state["rng"] = rng_state()
            save_checkpoint(state, ckpt_path)

    def metrics():
        if not main_rank:
            return
        s1 = state["stage1"]
        out = {"stage1": {**{k: v for k, v in s1.items() if k.startswith("val_")}, "steps": s1["step"]},
               "stage2": {"steps": state["stage2"]["step"], "loss": state["stage2"].get("recent_loss")},
               "config": cfg}
        write_metrics(run, out)
        plot_losses({"stage1": state["stage1"]["history"], "stage2": state["stage2"]["history"]},
                    os.path.join(run, "losses.png"))

    try:
        if cfg["stage"] in ("vae", "all") and not state["stage1"].get("done"):
            t = time.time()
            rows, names, scores = train_vae(cfg, mod, vae, vae_opt, state, train, val, device, ckpt)
            ckpt()
            if main_rank:
                mod.write_sheet(rows, os.path.join(run, "recon.png"), names,
                                f"stage 1 after {state['stage1']['step']} steps: {scores}")
            metrics()
            print(f"[vae] {fmt_time(time.time() - t)}; wrote {ckpt_path}, {run}/recon.png")
        if cfg["stage"] in ("ldm", "all"):
            if not state["stage1"].get("done"):
                raise SystemExit(f"--stage ldm: stage 1 in {run} is not finished; continue it with --resume first")
            vae.requires_grad_(False)
            if not state["stage2"].get("done"):
                t = time.time()
                train_ldm(cfg, mod, vae, ldm, ema, ldm_opt, state, train, device, ckpt)
                ckpt()
                print(f"[ldm] {fmt_time(time.time() - t)}; wrote {ckpt_path}")
            if main_rank:
                sample_sheet(cfg, mod, vae, ema.model, state["stage2"]["scale_factor"], num_classes,
                             os.path.join(run, "samples.png"), seed=cfg["seed"])
            metrics()
            print(f"wrote {run}/samples.png")
    except KeyboardInterrupt:
        ckpt()
        metrics()
        print(f"\ninterrupted: saved {ckpt_path}; continue with: python train.py --out {run} --resume")
        sys.exit(130)
    metrics()
    if not main_rank:
        return
    m = json.load(open(os.path.join(run, "metrics.json")))  # the numbers, without config and per-item lists
    print("metrics: " + json.dumps({s: {k: v for k, v in m[s].items() if not isinstance(v, list)} for s in ("stage1", "stage2")}))


if __name__ == "__main__":
    main()
