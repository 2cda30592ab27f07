"""Configuration: train.py's flags, the presets, and a check of every value.

Plumbing, not a concept. A run's settings are one dataclass of defaults, each field with its help
text (what `--help` prints), overridden by a preset and then by the command line; unknown flags
are errors. The preset table holds the values the modalities share once, per preset, and each
modality's differences beside them. Checkpoints keep the resulting plain dict.
"""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch


def flag(default, text):
    """A Config field with its help text."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class Config:
    # -- what and where ------------------------------------------------------------------
    modality: str = flag("image", "image, video, shape or nerf (the registry of 05_modalities.py)")
    data: str = flag("", "dataset path (see the modality's file and docs/data.md); empty: built-in synthetic data")
    out: str = flag("", "run folder; empty: runs/<modality>")
    stage: str = flag("all", "vae (stage 1), ldm (stage 2 on the run's VAE) or all")
    preset: str = flag("tiny", "model and training sizes: tiny (a CPU, minutes) or paper (the published sizes)")
    seed: int = flag(0, "seeds the model, the data split and the data order")
    device: str = flag("", "cpu or cuda; empty: cuda when available")
    resume: bool = flag(False, "continue the run in --out where it stopped")
    overwrite: bool = flag(False, "start again in an --out that already holds a run")
    compile: bool = flag(False, "torch.compile the training models (the first steps wait for the compiler)")
    gpu_paths: str = flag("auto", "bf16 autocast and channels-last convolutions (and on CUDA batches drawn ahead): "
                                  "auto (where bf16 is in hardware: CUDA, a CPU with AMX or AVX512-BF16), on or off")
    # -- both stages ---------------------------------------------------------------------
    steps: int = flag(0, "optimiser steps per stage; 0: the preset's, or as many as fit in --max-minutes")
    max_minutes: float = flag(0.0, "wall-clock bound per stage (the schedules are planned to fit); 0: none")
    resolution: int = flag(0, "side of the data in pixels (images, video frames, NeRF pictures) or voxels "
                              "(shapes: the grid of IoU and meshes)")
    plane_res: int = flag(0, "shapes, NeRF: side of the tri-plane (the finest basis field)")
    frames: int = flag(0, "videos: frames per clip")
    clip_stride: int = flag(0, "videos from files: a clip every this many frames of a video (default: --frames)")
    samples_per_ray: int = flag(0, "NeRF: stratified samples per ray (file 10)")
    batch_size: int = flag(0, "stage-1 batch (global, over all processes)")
    grad_accum: int = flag(1, "micro-batches per optimiser step: the same step in less memory; both stages")
    val_fraction: float = flag(0.1, "share of a dataset held out for validation (unless it has train/ and val/ folders)")
    labels: str = flag("none", "none, or folders: each image's class is its folder (the first level below the "
                               "data, or below train/ and val/): a class-conditional model")
    hflip: bool = flag(False, "flip a random half of each stage-1 batch left to right")
    augment: bool = flag(False, "videos: random crops, flips and time reversal of each stage-1 clip; shapes: random "
                                "turns about the up axis, flips, stretches and jitter of each shape (files 06, 09)")
    cache: str = flag("", "folder of prepared datasets; default: $XDG_CACHE_HOME/ddmi or ~/.cache/ddmi")
    no_cache: bool = flag(False, "decode the data into memory at every start instead of preparing it once")
    log_every: int = flag(50, "steps between progress lines")
    ckpt_every: int = flag(500, "steps between checkpoints (one is always written at the end)")
    # -- stage 1: the D2C-VAE (files 02, 03) ----------------------------------------------
    decoder: str = flag("ddmi", "ddmi (positional embeddings, files 02-03); mnif or hyper (SIREN weights, file 12; images)")
    from_run: str = flag("", "a trained run: keep its encoder and diffusion model frozen, train only a new --decoder")
    variant: str = flag("hdbf_cfc", "decoder and read-out: single, hdbf_concat or hdbf_cfc (file 03)")
    coords_per_item: int = flag(-1, "K query coordinates per item and step; 0: all")
    z_ch: int = flag(0, "latent channels Z (per plane)")
    enc_ch: int = flag(0, "base channels of the encoder and decoder")
    enc_mult: tuple = flag((), "channel multiplier per encoder level; len - 1 = number of 2x downsamplings")
    field_ch: int = flag(0, "channels of each basis field")
    mlp_hidden: int = flag(0, "width of the read-out MLP")
    mlp_layers: int = flag(0, "linear layers of the read-out MLP (mnif, hyper: of the generated SIREN)")
    bases: int = flag(16, "mnif: basis SIRENs K (file 12)")
    lambda_z: float = flag(-1.0, "KL weight, reached after 90% of stage 1 (file 02)")
    vae_steps: int = flag(0, "stage-1 steps when neither --steps nor --max-minutes is given")
    vae_lr: float = flag(0.0, "Adam learning rate, stage 1")
    # -- stage 2: latent diffusion (file 04) ----------------------------------------------
    ldm_ch: int = flag(0, "UNet base channels")
    ldm_mult: tuple = flag((), "UNet channel multiplier per level")
    ldm_attn: tuple = flag((), "UNet levels with self-attention")
    ldm_steps: int = flag(0, "stage-2 steps when neither --steps nor --max-minutes is given")
    ldm_batch: int = flag(0, "stage-2 batch (global)")
    ldm_lr: float = flag(0.0, "Adam learning rate, stage 2")
    prediction: str = flag("", "what the UNet predicts: eps (the paper's) or v (file 04)")
    ema_decay: float = flag(0.0, "EMA decay of the UNet weights that sample")
    p_uncond: float = flag(0.1, "label dropout for classifier-free guidance (labelled data only)")
    sampler: str = flag("", "ddim or ddpm: the sample sheet's, and sample.py's default")
    sample_steps: int = flag(0, "denoising steps of that sampler")
    guidance: float = flag(1.0, "classifier-free guidance scale w of the sample sheet, and sample.py's default "
                                "(labelled data; 1: none)")


# ----------------------------------------------------------------------------------------
# Presets: the values the modalities share, and each modality's differences
# ----------------------------------------------------------------------------------------
PRESETS = {
    # tiny: a 2-core CPU trains both stages in minutes; latents 8 x 8 per plane
    "tiny": dict(resolution=32, batch_size=8, z_ch=8, enc_ch=32, enc_mult=(1, 2, 2), field_ch=16, mlp_hidden=64,
                 mlp_layers=4, lambda_z=1e-3, vae_steps=3000, vae_lr=1e-3, ldm_ch=64, ldm_mult=(1, 2), ldm_attn=(1,),
                 ldm_steps=4000, ldm_batch=32, ldm_lr=2e-4, ema_decay=0.999, sampler="ddpm", sample_steps=100,
                 prediction="v"),
    # paper: the original release's sizes (latent 64 channels, basis fields of 64 at three scales)
    "paper": dict(resolution=256, batch_size=8, z_ch=64, enc_ch=64, enc_mult=(1, 2, 2), field_ch=64, mlp_hidden=256,
                  mlp_layers=5, lambda_z=1e-3, vae_steps=300_000, vae_lr=1e-4, ldm_ch=128, ldm_mult=(1, 2, 2),
                  ldm_attn=(1, 2), ldm_steps=500_000, ldm_batch=32, ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim",
                  sample_steps=50, prediction="v"),
}
# The tiny presets sample with ancestral DDPM: after minutes of training the noise prediction at
# large t is a few percent off, which deterministic DDIM compounds and DDPM's fresh noise corrects.
# Tri-plane latents predict v (file 04): with eps, briefly trained samples drift off the data.
DIFFERENCES = {
    # every pixel of the 32x32 pictures per step (faster than drawing 256 of them); guidance 1.5; DDPM with
    # 250 steps: feature distance 7.8x the floor against 9.7x with 100, 7.5x with 500 (docs/quality.md)
    ("image", "tiny"): dict(batch_size=16, coords_per_item=0, z_ch=4, ldm_ch=48, prediction="eps", guidance=1.5,
                            sample_steps=250),
    # CelebA-HQ 256: latent 64 x R/4 x R/4, fields at R/4, R/2, R; lambda_z 0.5 on sums, as ours (file 02)
    ("image", "paper"): dict(batch_size=16, coords_per_item=0, enc_mult=(1, 2, 4), lambda_z=0.5, vae_steps=500_000,
                             ldm_mult=(1, 2, 2, 4), ldm_attn=(2, 3), ldm_batch=64, prediction="eps"),
    # guidance 2: the most samples of their class at the least feature distance (docs/quality.md)
    ("video", "tiny"): dict(frames=16, coords_per_item=1024, guidance=2.0),
    ("video", "paper"): dict(frames=16, coords_per_item=16384, enc_mult=(1, 2, 2, 2)),  # SkyTimelapse 256
    # DDPM with 250 steps: 1-NNA 58.9% against 62.1% with 100, mean of 5 noise seeds (docs/quality.md)
    ("shape", "tiny"): dict(resolution=64, plane_res=32, coords_per_item=2048, sample_steps=250),
    ("shape", "paper"): dict(resolution=64, plane_res=64, batch_size=32, coords_per_item=4096, ldm_batch=64),
    ("nerf", "tiny"): dict(resolution=48, plane_res=32, batch_size=4, coords_per_item=512, samples_per_ray=32),
    # 5000 rays of 256 samples; HDBF fields at 16, 32, 64 where the release had a single one at 64
    ("nerf", "paper"): dict(resolution=128, plane_res=64, coords_per_item=5000, samples_per_ray=256, field_ch=32,
                            lambda_z=0.05, sample_steps=200),
}
MODALITIES = ("image", "video", "shape", "nerf")  # (05_modalities.py's registry holds their files)
ONLY_FOR = {"frames": ("video",), "clip_stride": ("video",), "samples_per_ray": ("nerf",), "plane_res": ("shape", "nerf"),
            "labels": ("image",), "hflip": ("image", "video"),
            "augment": ("video", "shape")}

# The range of every numeric flag: (lowest, highest, what to say when it is outside).
_POS, _NONNEG = (1, math.inf, "a positive integer"), (0, math.inf, "a number >= 0")
NUMBER_RANGES = {
    **{k: _POS for k in ("resolution", "plane_res", "frames", "samples_per_ray", "batch_size", "grad_accum",
                         "log_every", "ckpt_every", "z_ch", "enc_ch", "field_ch", "mlp_hidden", "mlp_layers", "bases",
                         "vae_steps", "ldm_ch", "ldm_steps", "ldm_batch", "sample_steps")},
    **{k: _NONNEG for k in ("steps", "max_minutes", "coords_per_item", "lambda_z", "clip_stride")},
    "enc_mult": (1, math.inf, "positive integers like 1,2,2"), "ldm_mult": (1, math.inf, "positive integers like 1,2"),
    "ldm_attn": (0, math.inf, "level indices like 1 or 2,3"),
    "val_fraction": (1e-9, 1 - 1e-9, "a fraction between 0 and 1 (exclusive)"),
    "vae_lr": (1e-12, math.inf, "a positive learning rate"), "ldm_lr": (1e-12, math.inf, "a positive learning rate"),
    "ema_decay": (0, 1 - 1e-12, "a decay in [0, 1)"), "p_uncond": (0, 1, "a probability in [0, 1]"),
    "guidance": (0, math.inf, "a guidance scale >= 0 (1: none)"),
}
CHOICES = {"variant": ("single", "hdbf_concat", "hdbf_cfc"), "decoder": ("ddmi", "mnif", "hyper"),
           "sampler": ("ddim", "ddpm"), "prediction": ("eps", "v"), "stage": ("vae", "ldm", "all"),
           "gpu_paths": ("auto", "on", "off"), "labels": ("none", "folders")}

# Flags that may differ from the saved config when a run is continued.
RESUME_FLAGS = {"out", "resume", "stage", "steps", "max_minutes", "device", "log_every", "ckpt_every",
                "sampler", "sample_steps", "guidance", "grad_accum", "compile", "gpu_paths", "cache", "no_cache"}
# What a --from run takes from its source run: whatever shapes the encoder, the latents and the
# diffusion model (and the data split), so that only the decoder differs.
FROM_FROZEN = {"modality", "data", "preset", "seed", "resolution", "plane_res", "frames", "clip_stride",
               "samples_per_ray", "val_fraction", "labels", "z_ch", "enc_ch", "enc_mult", "ldm_ch", "ldm_mult",
               "ldm_attn", "ldm_steps", "ldm_batch", "ldm_lr", "prediction", "ema_decay", "p_uncond"}


def preset(modality, name):
    """The preset `name` of a modality: the shared values with the modality's differences on top."""
    values = {**PRESETS[name], **DIFFERENCES.get((modality, name), {})}
    values.setdefault("plane_res", values["resolution"])  # images and videos: the planes have the data's side
    return values


def int_list(text):
    """'1,2,2' -> (1, 2, 2); argparse names the flag if this fails ('invalid int_list value')."""
    return tuple(int(v) for v in text.split(","))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block): e.g. 'argument --steps: invalid int value: 'x''."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def check_decoder(cfg, where=""):
    if cfg["decoder"] != "ddmi" and cfg["modality"] != "image":
        raise SystemExit(f"--decoder {cfg['decoder']}: weight-generating decoders (file 12) are built for images only"
                         + where)


def parse(argv, description):
    """(Config from defaults <- preset <- command line, the flags given); every value checked."""
    p = OneLineParser(description=description, epilog="Flags not given take the values of --preset (config.py).")
    for f in dataclasses.fields(Config):
        name, text = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        if f.type is bool:
            p.add_argument(name, action="store_true", help=text)
        elif f.type is tuple:
            p.add_argument(name, type=int_list, metavar="A,B,..", help=text)
        else:  # (--from-run is also --from)
            names = (name, "--from") if f.name == "from_run" else (name,)
            p.add_argument(*names, dest=f.name, type=f.type, metavar=f.type.__name__.upper(), help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None and v is not False}
    cfg = dataclasses.asdict(Config())
    modality, name = given.get("modality", cfg["modality"]), given.get("preset", cfg["preset"])
    if modality not in MODALITIES:
        raise SystemExit(f"--modality {modality}: unknown; expected one of {', '.join(MODALITIES)}")
    if name not in PRESETS:
        raise SystemExit(f"--preset {name}: unknown; expected one of {', '.join(PRESETS)}")
    for key, kinds in ONLY_FOR.items():
        if key in given and modality not in kinds:
            raise SystemExit(f"--{key.replace('_', '-')}: only for {' and '.join(kinds)}; --modality is {modality}")
    cfg.update(preset(modality, name))
    cfg.update(given)
    if "resolution" in given and modality not in ONLY_FOR["plane_res"]:
        cfg["plane_res"] = cfg["resolution"]
    for key, value in given.items():  # every number has a range: name the flag and say which
        if key in NUMBER_RANGES:
            low, high, what = NUMBER_RANGES[key]
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(math.isfinite(v) and low <= v <= high for v in values):
                shown = ",".join(str(v) for v in values) if isinstance(value, tuple) else value
                raise SystemExit(f"--{key.replace('_', '-')} {shown}: expected {what}")
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise SystemExit(f"--{key} {cfg[key]}: expected {', '.join(options[:-1])} or {options[-1]}")
    check_decoder(cfg)
    if cfg["variant"] != "single" and cfg["decoder"] == "ddmi" and len(cfg["enc_mult"]) < 3:
        raise SystemExit(f"--enc-mult {','.join(map(str, cfg['enc_mult']))}: --variant {cfg['variant']} reads fields at "
                         f"three scales, one per decoder level: give at least 3 levels (like 1,2,2)")
    factor = 2 ** (len(cfg["enc_mult"]) - 1 + len(cfg["ldm_mult"]) - 1)
    if cfg["plane_res"] % factor:
        which = "plane-res" if modality in ONLY_FOR["plane_res"] else "resolution"
        raise SystemExit(f"--{which} {cfg['plane_res']}: must be divisible by {factor} (encoder and UNet downsampling)")
    cfg["out"] = cfg["out"] or os.path.join("runs", modality)
    cfg["data"] = cfg["data"] or None
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return cfg, given


def upgrade(cfg):
    """A run's saved config in today's terms: runs saved before --plane-res kept the planes' side in
    `resolution` (shapes, NeRF) and NeRF's pictures in `view_size`; older ones lacked decoder,
    bases and prediction, and predicted eps."""
    cfg = {"decoder": "ddmi", "bases": 16, "guidance": 1.0, "gpu_paths": "auto", "labels": "none", "hflip": False,
           "augment": False, "clip_stride": 0, "cache": "", "no_cache": False, **cfg,
           "prediction": cfg.get("prediction") or "eps"}
    if "plane_res" not in cfg and "resolution" in cfg:
        cfg["plane_res"] = cfg["resolution"]
        if cfg["modality"] in ONLY_FOR["plane_res"]:
            cfg["resolution"] = (cfg.pop("view_size", 0) or 48) if cfg["modality"] == "nerf" else 64
    cfg.pop("view_size", None)
    return cfg
