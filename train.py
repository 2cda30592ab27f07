"""Train DDMI: stage 1, the D2C-VAE (files 02-03); stage 2, latent diffusion on its latents (file 04).

    python train.py --modality image                      # synthetic images, ~9 min on a 2-core CPU
    python train.py --modality image --data ./celebahq --preset paper --device cuda
    python train.py --modality image --stage vae --out runs/faces --data ./faces
    python train.py --stage ldm --out runs/faces                         # stage 2 on that VAE
    python train.py --out runs/faces --resume                            # continue where it stopped
    python train.py --decoder hyper --from runs/faces --out runs/faces_hyper  # a new decoder on its frozen latents
    torchrun --standalone --nproc_per_node=4 train.py --data ./celebahq --preset paper   # 4 GPUs

Everything a run produces goes to its folder (--out): ckpt.pt, losses.png, recon.png,
samples.png and metrics.json. The folder of an existing run is never overwritten unless
--resume (continue it) or --overwrite (start again) is given. The modality (file 05 and its
registry) says what a data item is; the run engine (engine.py) makes the two stages below
survive Ctrl-C, kills, several processes and time limits, and resume exactly.
"""
import importlib
import json
import math
import os
import sys
import time

import torch

import config
import engine
import figures
import prepare
from engine import DIST

V = importlib.import_module("02_d2c_vae")
LDM = importlib.import_module("04_latent_diffusion")
M = importlib.import_module("05_modalities")


# ----------------------------------------------------------------------------------------
# Stage 1: the D2C-VAE, trained on the re-weighted ELBO (file 02)
# ----------------------------------------------------------------------------------------
class ELBO(torch.nn.Module):
    """The stage-1 loss (file 02's elbo_loss) as a module, so that DDP can wrap it."""

    def __init__(self, vae, num_values, recon_fn):
        super().__init__()
        self.vae, self.num_values, self.recon_fn = vae, num_values, recon_fn

    def forward(self, x, coords, target, lambda_z, eps):
        return V.elbo_loss(self.vae, x, coords, target, lambda_z, self.num_values, self.recon_fn, eps)


def evaluate_vae(mod, vae, val, device):
    """The modality's validation scores (e.g. {"psnr": dB}), sheet rows and row names, from q's mean."""
    vae.eval()
    with torch.no_grad():
        out = mod.evaluate(vae, val, device)
    vae.train()
    return out


def train_vae(cfg, mod, vae, opt, state, train, val, device, save):
    s1, n, K, B = state["stage1"], len(train["x"]), cfg["coords_per_item"], cfg["batch_size"]
    model = engine.for_training(ELBO(vae, mod.values_per_item, mod.recon), cfg)  # D_x scales the ELBO
    z_shape = mod.unstack_planes(torch.zeros(1, *mod.latent_shape)).shape[1:]  # the posterior's shape per item
    slices = engine.my_slices(B, cfg["grad_accum"])
    vae.train()

    def draw(gen):
        # the global batch: items, the encoder's input, K query coordinates per item and the
        # signal there, and the reparameterisation noise, all from the run's generator
        idx = torch.randint(n, (B,), generator=gen)
        return (*mod.training_batch(train, idx, K, gen), torch.randn((B, *z_shape), generator=gen))

    def step_fn(batch, step, planned):
        x, coords, target, eps = batch
        lam = V.kl_weight(step, planned, cfg["lambda_z"])  # lambda_z annealed over the planned steps

        def explain_bad(v):
            bad = [name for name, k in (("reconstruction", "recon"), ("KL", "kl")) if not math.isfinite(v[k])]
            return (f"stage 1, step {step}: the {' and '.join(bad) or 'total'} term of the loss is not finite "
                    f"(recon {v['recon']:.4g}, kl {v['kl']:.4g}); stopped, the last checkpoint in {cfg['out']} is intact")

        def loss_of(sl):  # this process's micro-batch sl of the global batch
            with engine.autocast(cfg["gpu_paths"], device):  # bf16 on CUDA
                return model(x[sl], coords[sl], target[sl], lam, eps[sl])

        return {**engine.optimiser_step(model, opt, slices, loss_of, explain_bad), "lambda_z": lam}

    def log(window):
        recon, kl = engine.mean_over_ranks([engine.mean_of(window, "recon"), window[-1]["kl"]])
        return recon, {"recon": recon, "kl/D_x": kl, "lambda_z": window[-1]["lambda_z"]}

    engine.run_stage("vae", s1, cfg, engine.stage_steps(cfg, "vae_steps"), cfg["seed"] + 1, draw, step_fn, log,
                     lambda: {"vae": vae.state_dict(), "opt": opt.state_dict()}, save, vae)
    if DIST["rank"] != 0:  # the other ranks go on to stage 2 (they wait there for rank 0)
        return None, None, None
    scores, rows, names = evaluate_vae(mod, vae, val, device)
    s1.update({f"val_{k}": v for k, v in scores.items()})
    print(f"[vae] done after {s1['step']} steps: {mod.describe(scores)} ({len(val['x'])} held-out items)")
    return rows, names, mod.describe(scores)


# ----------------------------------------------------------------------------------------
# Stage 2: latent diffusion on the frozen VAE's latents (file 04)
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(mod, vae, x, device, folder):
    """Posterior mean and std of every training item, (n, 2, C, h, w): z ~ q(z|x) is redrawn at every step.

    Data in memory: a tensor. Data on disk (a prepared folder): the latents go to a file with no
    name in the run's folder and are read back by index, since they outgrow memory long before the
    pictures do (the paper preset's are 2 MB per 256x256 image).
    """
    vae.eval()
    parts, store, batch = [], None, mod.batch_items(64)  # (fewer when the items are large)
    for i in range(0, len(x), batch):
        q = vae.encode(mod.encoder_input(x[i:i + batch].to(device)))
        # tri-planes (B, 3, Z, h, w) are stacked on channels (B, 3Z, h, w) for the UNet of file 04
        both = torch.stack([mod.stack_planes(q.mean.float().cpu()), mod.stack_planes(q.std.float().cpu())], 1)
        if torch.is_tensor(x):
            parts.append(both)
        else:
            store = store or prepare.unnamed_file(folder, (len(x), *both.shape[1:]))
            store.write(i, both)
    return torch.cat(parts) if store is None else store


def scale_factor(latents, chunk=256):
    """LDM.estimate_scale_factor of z ~ q(z|x) over every item; latents on disk a chunk at a time."""
    if torch.is_tensor(latents):
        return LDM.estimate_scale_factor(latents[:, 0] + latents[:, 1] * torch.randn_like(latents[:, 1]))
    n, total, squares = 0, 0.0, 0.0  # the sample standard deviation from running sums
    for i in range(0, len(latents), chunk):
        both = latents[i:i + chunk]
        z = (both[:, 0] + both[:, 1] * torch.randn_like(both[:, 1])).double()
        n, total, squares = n + z.numel(), total + z.sum().item(), squares + (z * z).sum().item()
    return 1.0 / math.sqrt((squares - total * total / n) / (n - 1))


def build_ldm(cfg, mod, num_classes):
    unet = LDM.UNet(mod.latent_shape[0], cfg["ldm_ch"], tuple(cfg["ldm_mult"]), attn_levels=tuple(cfg["ldm_attn"]),
                    num_classes=num_classes)
    return LDM.LatentDiffusion(unet, LDM.NoiseSchedule(), num_classes, cfg["p_uncond"], cfg["prediction"])


def train_ldm(cfg, mod, vae, ldm, ema, opt, state, train, device, save):
    s2 = state["stage2"]
    latents = encode_dataset(mod, vae, train["x"], device, cfg["out"])  # (n, 2, C, h, w): mean and std
    if "scale_factor" not in s2:
        # scale factor 1 / std(z) from latents z ~ q(z|x), so the diffusion sees unit variance
        # (with several processes: rank 0's estimate)
        s2["scale_factor"] = engine.from_rank0(scale_factor(latents))
    scale, labels, B, T = s2["scale_factor"], train["label"], cfg["ldm_batch"], ldm.schedule.T
    print(f"[ldm] {len(latents)} latents of shape {tuple(latents.shape[2:])}, scale factor {scale:.4f}")
    model = engine.for_training(ldm, cfg)
    slices = engine.my_slices(B, cfg["grad_accum"])
    ldm.train()

    def draw(gen):
        # the global batch and all its draws, from the run's generator (engine.py, "Several processes")
        idx = torch.randint(len(latents), (B,), generator=gen)
        # z_0 ~ q(z|x) = mu + sigma * eps, multiplied by the scale factor
        mu, sigma = latents[idx].unbind(1)
        z0 = (mu + sigma * torch.randn(mu.shape, generator=gen)) * scale
        t = torch.randint(T, (B,), generator=gen)  # diffusion time per item
        eps = torch.randn(z0.shape, generator=gen)  # diffusion noise
        u = torch.rand(B, generator=gen)  # label dropout draw (labelled data only)
        return z0, t, eps, u, labels[idx] if labels is not None else None

    def step_fn(batch, step, planned):
        z0, t, eps, u, y = batch

        def loss_of(sl):  # this process's micro-batch sl of the global batch
            with engine.autocast(cfg["gpu_paths"], device):  # bf16 on CUDA
                return {"loss": model(z0[sl], None if y is None else y[sl], t[sl], eps[sl], u[sl])}

        terms = engine.optimiser_step(model, opt, slices, loss_of, lambda v: (
            f"stage 2, step {step}: the diffusion loss is not finite ({v['loss']:.4g}); "
            f"stopped, the last checkpoint in {cfg['out']} is intact"))
        ema.update(ldm)  # theta_ema <- d theta_ema + (1 - d) theta
        return terms

    def log(window):
        (loss,) = engine.mean_over_ranks([engine.mean_of(window, "loss")])
        s2["recent_loss"] = loss
        return loss, {"loss": loss}

    engine.run_stage("ldm", s2, cfg, engine.stage_steps(cfg, "ldm_steps"), cfg["seed"] + 2, draw, step_fn, log,
                     lambda: {"ldm": ldm.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}, save, ldm)


@torch.no_grad()
def sample_sheet(cfg, mod, vae, ema_model, scale, num_classes, path, n=8, seed=0):
    """Decode n EMA samples per class (or 2n unconditional ones) and write them as a sheet."""
    g, device = torch.Generator().manual_seed(seed), next(vae.parameters()).device
    rows, names = [], []
    for label in (range(num_classes) if num_classes else [None, None]):
        y = torch.full((n,), label, dtype=torch.long) if label is not None else None
        with engine.autocast(cfg["gpu_paths"], device):
            z = ema_model.sample((n, *mod.latent_shape), steps=cfg["sample_steps"], sampler=cfg["sampler"], y=y,
                                 generator=g, guidance=cfg["guidance"] if num_classes else 1.0)
            rows.append(mod.preview(vae, vae.decode(mod.unstack_planes(z / scale))).float().cpu())
        classes = cfg.get("classes") or []  # their names: the folders', or the built-in ones
        names.append("" if label is None else classes[label] if label < len(classes) else f"class {label}")
    decoder = {"ddmi": "DDMI", "mnif": "mNIF", "hyper": "hyper-transformer"}[cfg["decoder"]]
    guided = f", guidance {cfg['guidance']:g}" if num_classes and cfg["guidance"] != 1 else ""
    mod.write_sheet(rows, path, names, f"{decoder} samples ({cfg['sampler']}, {cfg['sample_steps']} steps{guided}, EMA weights)")


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def main(argv=None):
    cfg, given = config.parse(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
    with engine.session(cfg), engine.own_folder(cfg["out"]):  # one process owns --out while it runs
        cfg, state, source = engine.open_run(cfg, given)
        engine.check_batches(cfg)
        run(cfg, given, state, source)


def run(cfg, given, state, source):
    out, main_rank = cfg["out"], DIST["rank"] == 0  # rank 0 is the only process that writes files
    ckpt_path = os.path.join(out, "ckpt.pt")
    print("config: " + ", ".join(f"{k}={cfg[k]}" for k in given if k in cfg))
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])

    # the data, as the modality reads it; what it learnt about the data goes into the config
    mod, t_load = M.modality(cfg), time.time()
    train, val, num_classes = mod.load(cfg["data"])
    cfg = {**cfg, **mod.data_settings}
    print(f"data: {len(train['x'])} training and {len(val['x'])} validation items ({cfg['data'] or 'built-in synthetic'}"
          f"{'; ' + mod.data_note if mod.data_note else ''}; resolution {cfg['resolution']}, preset {cfg['preset']}; "
          f"{time.time() - t_load:.0f} s)")

    vae = mod.build_vae().to(device)
    if cfg["from_run"]:  # hyper-transforming: the source's encoder stays as it is, only the decoder learns
        vae.encoder.requires_grad_(False)
    vae_opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=cfg["vae_lr"])
    ldm = build_ldm(cfg, mod, num_classes).to(device)
    if engine.fast_paths(cfg["gpu_paths"], device):
        engine.fast_layout(vae, ldm, device)
    ema = LDM.EMA(ldm, cfg["ema_decay"], warmup=True)
    ldm_opt = torch.optim.Adam(ldm.parameters(), lr=cfg["ldm_lr"])
    if state is None:
        state = {"num_classes": num_classes, "stage1": {"step": 0, "history": []}, "stage2": {"step": 0, "history": []}}
    else:
        if "vae" in state["stage1"]:
            vae.load_state_dict(state["stage1"]["vae"])
            vae_opt.load_state_dict(state["stage1"]["opt"])
        if "ldm" in state["stage2"]:
            ldm.load_state_dict(state["stage2"]["ldm"])
            ema.load_state_dict(state["stage2"]["ema"])
            ema.num_updates = state["stage2"]["step"]
            ldm_opt.load_state_dict(state["stage2"]["opt"])
        engine.set_rng_state(state["rng"])
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
    kind = cfg["variant"] if cfg["decoder"] == "ddmi" else cfg["decoder"]
    print(f"model: D2C-VAE ({kind}) {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, UNet "
          f"{sum(p.numel() for p in ldm.parameters()) / 1e6:.2f}M; latent {mod.latent_shape}; device {device}"
          + (f", {DIST['world']} processes" if DIST["world"] > 1 else ""))

    def save():
        if main_rank:
            state["rng"] = engine.rng_state()
            engine.save_checkpoint(state, ckpt_path)

    def metrics():
        if main_rank:
            s1, s2 = state["stage1"], state["stage2"]
            engine.write_metrics(out, {"stage1": {**{k: v for k, v in s1.items() if k.startswith("val_")}, "steps": s1["step"]},
                                       "stage2": {"steps": s2["step"], "loss": s2.get("recent_loss")}, "config": cfg})
            figures.plot_losses({"stage1": s1["history"], "stage2": s2["history"]}, os.path.join(out, "losses.png"))

    for tag, key in (("vae", "stage1"), ("ldm", "stage2")):  # a finished stage is kept as it is, even with --steps
        if state[key].get("done") and cfg["stage"] in (tag, "all") and main_rank:
            print(f"[{tag}] finished in an earlier run at step {state[key]['step']}: not trained again "
                  f"(to train longer, start a new run with more --steps)")
    try:
        if cfg["stage"] in ("vae", "all") and not state["stage1"].get("done"):
            t = time.time()
            rows, names, scores = train_vae(cfg, mod, vae, vae_opt, state, train, val, device, save)
            save()
            if main_rank:
                mod.write_sheet(rows, os.path.join(out, "recon.png"), names,
                                f"stage 1 after {state['stage1']['step']} steps: {scores}")
            metrics()
            print(f"[vae] {engine.fmt_time(time.time() - t)}; wrote {ckpt_path}, {out}/recon.png")
        if cfg["stage"] in ("ldm", "all"):
            if not state["stage1"].get("done"):
                raise SystemExit(f"--stage ldm: stage 1 in {out} is not finished; continue it with --resume first")
            vae.requires_grad_(False)
            if not state["stage2"].get("done"):
                t = time.time()
                train_ldm(cfg, mod, vae, ldm, ema, ldm_opt, state, train, device, save)
                save()
                print(f"[ldm] {engine.fmt_time(time.time() - t)}; wrote {ckpt_path}")
            if main_rank:
                sample_sheet(cfg, mod, vae, ema.model, state["stage2"]["scale_factor"], num_classes,
                             os.path.join(out, "samples.png"), seed=cfg["seed"])
            metrics()
            print(f"wrote {out}/samples.png")
    except KeyboardInterrupt:
        save()
        metrics()
        print(f"\ninterrupted: saved {ckpt_path}; continue with: python train.py --out {out} --resume")
        sys.exit(130)
    metrics()
    if main_rank:
        m = json.load(open(os.path.join(out, "metrics.json")))  # the numbers, without config and per-item lists
        print("metrics: " + json.dumps({s: {k: v for k, v in m[s].items() if not isinstance(v, list)}
                                        for s in ("stage1", "stage2")}))


if __name__ == "__main__":
    main()
