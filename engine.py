"""The run engine: checkpoints, processes, batches drawn ahead, time budgets, and the one stage loop.

Plumbing, not a concept: train.py states the two stages of the paper; everything that makes a
run survive Ctrl-C, kills, several processes and a time limit, and continue exactly where it
stopped, is here, once for both stages.

Exactness is the rule throughout. Every random draw of a step comes from the run's generator
(items, query coordinates, noise), in one order, and the generator's state is saved with the
weights, so a run continued with --resume, or split over N processes, takes the steps a run
that never stopped would have taken (bit for bit on one process; to float rounding across N).
"""
import contextlib
import datetime
import errno
import gc
import json
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import config


# ----------------------------------------------------------------------------------------
# Writing files. Every file is written under a temporary name and renamed, so a reader never sees
# half of one and a crash leaves the previous version whole. A write that fails (a full disk, no
# permission) removes its partial file and ends the run in one line that names the file and the
# last checkpoint that is intact.
# ----------------------------------------------------------------------------------------
LAST_SAVED = {}  # {"path", "what"} of the last checkpoint written whole in this process


class WriteFailed(Exception):
    """A file could not be written; the message is the one line the user sees."""


def write_failed(path, error):
    """The one-line account of a failed write of `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    if not full and isinstance(error, RuntimeError):  # torch.save says only "unexpected pos" when the disk fills
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(folder).free < 2 ** 20
    reason = "no space left" if full else getattr(error, "strerror", None) or str(error).splitlines()[0]
    last = f"; the last checkpoint {LAST_SAVED['path']}, {LAST_SAVED['what']}, is intact" if LAST_SAVED else ""
    return WriteFailed(f"{reason} on {folder} while writing {os.path.basename(path)}{last}")


def write_atomically(path, write, tmp=None):
    """write(tmp) writes the file at a temporary path beside `path`, which is then renamed onto it.
    On failure the partial file is removed and WriteFailed raised."""
    tmp = tmp or path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_failed(path, e) from None


# ----------------------------------------------------------------------------------------
# Checkpoints: a dict of state_dicts + the plain config dict + steps + RNG states
# ----------------------------------------------------------------------------------------
def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken ckpt.pt."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))
    remember_checkpoint(path, state)


def remember_checkpoint(path, state):
    """Remember `path` as the last whole checkpoint (what a failed write's message points to)."""
    s1, s2 = state.get("stage1", {}), state.get("stage2", {})
    LAST_SAVED.update(path=path, what=f"stage 2 step {s2['step']}" if s2.get("step") else f"stage 1 step {s1.get('step')}")


def load_checkpoint(path, modality=None, preset=None):
    """torch.load(weights_only=True), which rebuilds tensors and plain containers and runs no code,
    with one-line errors for the usual mistakes."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise SystemExit(f"{path}: empty (0 bytes), not a checkpoint; an earlier write of it was cut short")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # PyTorch checkpoints are zip archives
        what = f"truncated or damaged ({size} bytes)" if zipped else "not a PyTorch checkpoint"
        message = " ".join(str(e).split())  # the whole message, on one line
        raise SystemExit(f"{path}: {what}, not a DDMI checkpoint ({type(e).__name__}: {message})")
    if not isinstance(ck, dict) or "config" not in ck or "stage1" not in ck:
        raise SystemExit(f"{path}: not a DDMI checkpoint (no config/stage1 entries)")
    ck["config"] = config.upgrade(ck["config"])
    cfg = ck["config"]
    if modality is not None and cfg["modality"] != modality:
        raise SystemExit(f"{path}: checkpoint of modality {cfg['modality']!r}, but --modality {modality} was given")
    if preset is not None and cfg["preset"] != preset:
        raise SystemExit(f"{path}: checkpoint of preset {cfg['preset']!r}, but --preset {preset} was given")
    return ck


def open_run(cfg, given):
    """-> (config, checkpoint state or None, --from source checkpoint or None), after every refusal.

    A new run needs an empty --out; --resume (or --stage ldm on a run with a VAE) continues the
    run there with its own config, where only the flags of config.RESUME_FLAGS may change; --from
    RUN starts a run whose config is RUN's, but for the decoder and stage-1 training.
    """
    run = cfg["out"]
    ckpt_path = os.path.join(run, "ckpt.pt")
    exists, source = os.path.exists(ckpt_path), None
    if cfg["from_run"] and not cfg["resume"]:
        cfg, source = from_source(cfg, given)
    if cfg["resume"] or (cfg["stage"] == "ldm" and exists and not cfg["overwrite"]):
        if not exists:
            raise SystemExit(f"--out {run}: no ckpt.pt to continue from (train stage 1 there first)")
        ck = load_checkpoint(ckpt_path, given.get("modality"), given.get("preset"))
        saved = ck["config"]
        clash = [k for k in given if k not in config.RESUME_FLAGS and given[k] != saved.get(k)]
        if clash:
            raise SystemExit(f"--{clash[0].replace('_', '-')}: differs from the run in {run} "
                             f"({saved.get(clash[0])!r}); start a new --out instead")
        # the run's own config wins; flags given now about how long / where to run replace it,
        # and the device is detected again (a GPU run may continue on a CPU)
        cfg = {**cfg, **saved, **{k: cfg[k] for k in config.RESUME_FLAGS if k in given or k in ("out", "device", "resume")}}
        print(f"continuing {run}: stage 1 at step {ck['stage1']['step']}, stage 2 at step {ck['stage2']['step']}")
        remember_checkpoint(ckpt_path, ck)
        return cfg, ck, source
    if cfg["stage"] == "ldm":
        raise SystemExit(f"--stage ldm: no trained VAE in {run} (run --stage vae with the same --out first)")
    if os.path.exists(run) and set(os.listdir(run)) - {LOCK} and not cfg["overwrite"]:
        raise SystemExit(f"--out {run}: folder exists and is not empty; use --resume to continue it, "
                         f"--overwrite to start again, or another --out")
    return cfg, None, source


def from_source(cfg, given):
    """--from RUN: (this run's config, RUN's checkpoint). The config is RUN's, with the flags given now
    (the decoder and stage-1 training); the flags of config.FROM_FROZEN must stay RUN's."""
    src = load_checkpoint(os.path.join(cfg["from_run"], "ckpt.pt"))
    if not src["stage1"].get("done") or "vae" not in src["stage1"]:
        raise SystemExit(f"--from {cfg['from_run']}: its stage 1 is not finished; continue it with --resume first")
    if os.path.abspath(cfg["from_run"]) == os.path.abspath(cfg["out"]):
        raise SystemExit(f"--out {cfg['out']}: that is the --from run itself; give the new decoder its own --out")
    saved = src["config"]
    clash = [k for k in given if k in config.FROM_FROZEN and given[k] != saved.get(k)]
    if clash:
        raise SystemExit(f"--{clash[0].replace('_', '-')}: a --from run keeps its source's ({saved.get(clash[0])!r}): "
                         f"the encoder, latents and diffusion model are {cfg['from_run']}'s")
    own = set(given) | {"out", "device", "stage", "resume", "overwrite", "from_run"}
    cfg = {**cfg, **saved, **{k: cfg[k] for k in own}}
    config.check_decoder(cfg, f"; {cfg['from_run']} is a {cfg['modality']} run")
    return cfg, src


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def write_metrics(run, metrics):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
    write_atomically(os.path.join(run, "metrics.json"), write)


# ----------------------------------------------------------------------------------------
# One process owns a run folder: it holds RUN/.lock (created exclusively, with its pid and host)
# for as long as it runs. Two runs on one --out would overwrite each other's checkpoints.
# ----------------------------------------------------------------------------------------
LOCK = ".lock"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


@contextlib.contextmanager
def own_folder(out):
    """Create --out if needed and hold its lock until the block ends (rank 0; the others learn the outcome)."""
    refusal = None
    if DIST["rank"] == 0:
        path, host = os.path.join(out, LOCK), socket.gethostname()
        try:
            os.makedirs(out, exist_ok=True)
            while True:
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    break
                except FileExistsError:
                    with contextlib.suppress(OSError), open(path) as f:
                        held = f.read().split()
                    pid, other = (int(held[0]), held[1]) if len(held) == 2 and held[0].isdigit() else (None, "?")
                    if pid is not None and other == host and not _alive(pid):
                        print(f"--out {out}: process {pid}, which held it, is gone; taking its lock over")
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(path)
                        continue
                    refusal = (f"--out {out}: in use by process {pid} on {other} (its lock: {path}); wait for it, "
                               f"or use another --out")
                    fd = None
                    break
        except OSError as e:
            refusal = f"--out {out}: cannot write there ({e.strerror})"
            fd = None
        if fd is not None:
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host}\n")
    (refused,) = any_rank(refusal is not None)
    if refused:
        raise SystemExit(refusal or "rank 0 could not take the run folder's lock")
    try:
        yield
    finally:
        if DIST["rank"] == 0:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, LOCK))


# ----------------------------------------------------------------------------------------
# Ctrl-C. The first one asks the stage loop to stop at the next step boundary, where weights,
# optimiser, data order and random state agree, so the checkpoint written then lets --resume
# continue exactly. A second Ctrl-C aborts at once; the last checkpoint written stays as it was.
# ----------------------------------------------------------------------------------------
STOP = {"requested": False}


def on_sigint(signum, frame):
    if STOP["requested"]:
        raise SystemExit("aborted by a second Ctrl-C; the last checkpoint written is intact")
    STOP["requested"] = True
    print("\nCtrl-C: stopping after this step and saving (press again to abort without saving)", flush=True)


@contextlib.contextmanager
def session(cfg):
    """Around a run: Ctrl-C handled as above, the process group joined and left, and no empty --out
    left behind by a run that failed before writing anything (bad data, say)."""
    fresh = not os.path.exists(cfg["out"])
    STOP["requested"] = False
    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        setup_distributed(cfg)
        yield
        if dist.is_initialized():  # leave together (rank 0 may still be writing its samples)
            dist.barrier()
    except BaseException as e:
        if DIST["rank"] == 0 and fresh and os.path.isdir(cfg["out"]) and not os.listdir(cfg["out"]):
            os.rmdir(cfg["out"])
        if isinstance(e, WriteFailed):  # a full disk or no permission: one line
            raise SystemExit(str(e)) from None
        raise
    finally:
        if previous is not None:  # (None: a handler not installed from Python; leave it)
            signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            # then free what still holds gloo's threads now, not during interpreter exit: a rank
            # leaving alone, without the barrier and this collect, aborted at exit in ~1 run in 20
            dist.destroy_process_group()
            gc.collect()


# ----------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N train.py ...` starts N copies of train.py with
# RANK / WORLD_SIZE / LOCAL_RANK set. Each holds the whole model; DistributedDataParallel averages
# the gradients during backward (NCCL between GPUs, gloo between CPU processes), so every copy
# takes the same optimiser step. The rule that keeps this exact: every process draws the same
# GLOBAL batch from the run's generator, then computes only its own slice of it; the gradient of
# the mean over the batch is the mean of the slices' gradients. Only rank 0 prints, evaluates and
# writes files; decisions that could differ (out of time, Ctrl-C, a non-finite loss) are agreed on.
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


def _reduce(values, op, dtype=torch.float64):
    t = torch.tensor(values, dtype=dtype, device=DIST["device"])
    dist.all_reduce(t, op=op)
    return t


def any_rank(*flags):
    """The flags OR-ed over all processes (a no-op with one), so that every rank takes the same branch."""
    return flags if DIST["world"] == 1 else tuple(bool(v) for v in _reduce([float(f) for f in flags], dist.ReduceOp.MAX))


def mean_over_ranks(values):
    """A list of floats averaged over the processes (for the logged losses)."""
    return values if DIST["world"] == 1 else (_reduce(values, dist.ReduceOp.SUM) / DIST["world"]).tolist()


def from_rank0(value):
    """Rank 0's number (int or float), on every process: what must be the same everywhere."""
    if DIST["world"] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=DIST["device"])
    dist.broadcast(t, 0)
    return type(value)(t.item())


def check_batches(cfg):
    """Every process gets the same number of items per micro-batch, in both stages."""
    for flag in ("batch_size", "ldm_batch"):
        parts = DIST["world"] * cfg["grad_accum"]
        if cfg[flag] % parts:
            raise SystemExit(f"--{flag.replace('_', '-')} {cfg[flag]}: must be divisible by processes x "
                             f"--grad-accum = {DIST['world']} x {cfg['grad_accum']}")


def my_slices(batch_size, accum):
    """This rank's share of a global batch, as `accum` equal micro-batch slices."""
    per_rank = batch_size // DIST["world"]
    micro = per_rank // accum
    start = DIST["rank"] * per_rank
    return [slice(start + i * micro, start + (i + 1) * micro) for i in range(accum)]


def replica_spread(model):
    """Largest difference of any weight between the processes (0: the replicas are identical)."""
    v = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])  # (reshape: channels-last ones too)
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def bf16_in_hardware(device):
    """A CUDA GPU, or a CPU whose oneDNN kernels multiply bf16 natively (AMX or AVX512-BF16); elsewhere a
    CPU emulates bf16 and runs slower than float32."""
    if device.type == "cuda":
        return True
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def fast_paths(switch, device):
    """Whether the fast paths run (--gpu-paths): bf16 autocast, channels-last convolution weights, batches
    drawn ahead (on CUDA). auto: where bf16 is done in hardware (a CPU with AMX: 2-4x faster 3D convolutions)."""
    return switch == "on" or (switch == "auto" and bf16_in_hardware(device))


def autocast(switch, device):
    """bf16 autocast where fast_paths says so (forced on a CPU without bf16 hardware: slow, but every dtype is checked)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_paths(switch, device))


def channels_last(module):
    """Every convolution weight of `module` in channels-last layout (NHWC, NDHWC), the one the fast kernels
    of tensor cores and of oneDNN read; a convolution then writes its output in the same layout. Same sums."""
    for p in module.parameters():
        if p.dim() in (4, 5):
            p.data = p.data.contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.channels_last_3d)


def fast_layout(vae, ldm, device):
    """The fast paths' layout: the VAE's convolution weights channels-last, and the UNet's (ldm: None for
    none) on CUDA only: on a CPU its bf16 step ran 1.3x slower so (88 against 66 ms, the image UNet)."""
    channels_last(vae)
    if ldm is not None and device.type == "cuda":
        channels_last(ldm)


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
# Batches. Every dataset sits in memory, so a batch is an index into it plus random draws.
# On a GPU one background thread draws the next batches while the GPU works on this one and
# pins them (page-locked memory, so the copy to the GPU runs asynchronously). The thread is the
# only user of the run's generator, one batch after another, so the batches are exactly those
# of a plain loop; the state kept for a checkpoint is the generator's after the last batch the
# model consumed, not after those drawn ahead. On a CPU the model already uses every core, so
# the batch is drawn when it is needed.
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
                if self.device.type == "cuda":  # (pinned memory needs CUDA; elsewhere the thread alone runs)
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
# Time budgets and progress
# ----------------------------------------------------------------------------------------
def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Budget:
    """Steps of a stage, bounded by --steps and --max-minutes.

    With a time bound, the planned number of steps (which the KL annealing follows) comes from the
    speed of the last `probe` steps and is estimated again every `probe` steps: a slow start
    (another process on the cores, warm-up, a first compile) or a change of speed moves the plan,
    so the stage ends close to its time bound. Without one the plan is --steps, or the plan a
    continued run was saved with.
    """

    def __init__(self, steps, max_minutes, plan=None, probe=20):
        self.steps, self.seconds, self.plan, self.probe = steps or 10**9, max_minutes * 60, plan, probe  # 0: time alone
        self.t0, self.mark = time.time(), None  # mark: (step, time) of the last estimate

    def planned(self, step):
        if self.mark is None:  # the first call: the stage, or this continuation of it, starts now
            self.t0 = time.time()
            self.mark = (step, self.t0)
        if not self.seconds:
            self.plan = self.plan or self.steps
        elif step - self.mark[0] >= self.probe:
            # steps per second over the last `probe` steps, then as many more steps as fit in the time left
            now = time.time()
            rate = (step - self.mark[0]) / max(now - self.mark[1], 1e-9)
            self.mark = (step, now)
            # with several processes: rank 0's plan (all of them reach this line at the same step)
            self.plan = from_rank0(min(self.steps, step + int(rate * (self.seconds - (now - self.t0)))))
        return self.plan if self.plan is not None else self.steps

    def done(self, step):
        out_of_time = self.seconds and time.time() - self.t0 > self.seconds
        return step >= self.planned(step) or out_of_time


def stage_steps(cfg, preset_key):
    """--steps if given; else, under --max-minutes, no step bound (0); else the preset's count."""
    return cfg["steps"] or (0 if cfg["max_minutes"] else cfg[preset_key])


def progress(tag, step, total, terms, t0, step0):
    rate = (step - step0) / max(time.time() - t0, 1e-9)
    eta = (total - step) / rate if rate > 0 else 0
    losses = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
    print(f"[{tag}] step {step:6d}/{total}  {losses}  {rate:.2f} it/s  ETA {fmt_time(eta)}", flush=True)


# ----------------------------------------------------------------------------------------
# The stage loop: one copy of stopping, resuming, logging and checkpointing for both stages
# ----------------------------------------------------------------------------------------
def run_stage(tag, s, cfg, steps, seed, draw, step_fn, log, weights, save, model):
    """Train one stage until its budget is spent, keeping its state in `s` (a part of the checkpoint).

    s: {"step", "history", and after a first save "plan", "generator", and the weights};
    draw(gen) -> a global batch on the CPU, every draw from gen, the run's generator for this
    stage (seeded with `seed`, or restored from s); step_fn(batch, step, planned_steps) -> dict
    of floats (one optimiser step); log(window of those dicts) -> (the value kept in the
    history, a dict to print); weights() -> the state_dicts to keep; save() writes the checkpoint.
    Ctrl-C keeps the finished steps in s and is raised again, for the caller to save.
    """
    budget = Budget(steps, cfg["max_minutes"], plan=s.get("plan"))
    gen = torch.Generator().manual_seed(seed)
    if "generator" in s:
        gen.set_state(s["generator"])
    step, step0, t0, window = s["step"], s["step"], time.time(), []
    background = cfg["gpu_paths"] == "on" or (DIST["device"].type == "cuda" and fast_paths(cfg["gpu_paths"], DIST["device"]))
    loader = Prefetcher(draw, gen, DIST["device"], background=background)
    keep = lambda **more: s.update(step=step, plan=budget.plan, generator=loader.resume_state, **weights(), **more)
    try:
        # (agreed by all processes: out of steps or time, Ctrl-C; checked again after each step)
        done, stop = any_rank(budget.done(step), STOP["requested"])
        while not done:
            if stop:
                raise KeyboardInterrupt
            window.append(step_fn(loader.next(), step, budget.planned(step)))
            step += 1
            done, stop = any_rank(budget.done(step), STOP["requested"])
            if step % cfg["log_every"] == 0 or done:
                value, shown = log(window)
                s["history"].append((step, value))
                progress(tag, step, budget.planned(step), shown, t0, step0)
                window = []
            if step % cfg["ckpt_every"] == 0 or done:
                keep()
                save()
    except KeyboardInterrupt:  # keep the steps finished so far, then let the caller save
        keep()
        raise
    finally:
        loader.close()
    keep(done=True)
    if DIST["world"] > 1:
        print(f"[{tag}] weights identical on the {DIST['world']} processes: largest difference {replica_spread(model):.3g}")


def mean_of(window, key):
    return sum(w[key] for w in window) / len(window)
