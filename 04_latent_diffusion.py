"""04 - Latent diffusion: a DDPM that generates the latent grids z of the D2C-VAE.

Concept (DDMI Sec. 3.3, "latent diffusion"; Ho et al. 2020; Song et al. 2021; Ho & Salimans 2022)
----------------------------------------------------------------------------------------------------
Once the VAE of files 02-03 is trained and frozen, every training example x has a latent z_0 ~ q(z|x).
DDMI then fits a plain DDPM to those latents; sampling a latent and decoding it gives a new INR.
This file knows nothing about images or VAEs: it diffuses any tensor of shape (B, C, H, W).
Tri-plane latents (videos, shapes, NeRF) are stacked on the channel axis before they get here,
e.g. 3 planes x 64 ch x 16x16 -> (B, 192, 16, 16), and unstacked after sampling (file 05).

Forward process. A fixed schedule beta_0..beta_{T-1} adds a little Gaussian noise per step:
    q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I)
and, with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s, any step in closed form:
    q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)
    z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)
Schedule ("scaled linear", latent diffusion / DDMI): beta = linspace(sqrt(0.0015), sqrt(0.0195), T)^2,
T = 1000. Index t = 0 here is the paper's t = 1 (the first noising step).

Training (Ho et al. eq. 14, w(t) = 1): a UNet eps_theta predicts the noise,
    L = E_{t ~ U{0..T-1}, z_0, eps} || eps - eps_theta(z_t, t, y) ||^2 .
Classifier-free guidance: the label y is replaced by a "null" label with probability p_uncond during
training, so one network learns both eps(z_t, t, y) and eps(z_t, t, null). At sampling time
    eps_tilde = eps_uncond + w (eps_cond - eps_uncond)        (w = 1: plain conditional model)
Sampling, over a decreasing subsequence t_1 > t_2 > ... > t_S = 0 with s the next (less noisy) step
and alpha_bar_s = 1 after the last step. Both start from z ~ N(0, I) and first estimate
    z0_hat = (z_t - sqrt(1 - alpha_bar_t) eps_tilde) / sqrt(alpha_bar_t).
  DDPM (Ho et al. Alg. 2) with the respaced step beta_ts = 1 - alpha_bar_t / alpha_bar_s:
    z_s = (z_t - beta_ts / sqrt(1 - alpha_bar_t) eps_tilde) / sqrt(1 - beta_ts) + sigma n,
    sigma^2 = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta_ts           (posterior variance)
  DDIM (Song et al. eq. 12):
    z_s = sqrt(alpha_bar_s) z0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_tilde + sigma n,
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)
  (eta = 0: deterministic; eta = 1: the DDPM step above.)
Scale factor (Rombach et al. 2022): latents are multiplied by 1 / std(z) so that the data the
diffusion sees has unit variance, which the schedule above assumes.

v-prediction (Salimans & Ho 2022; an option, DDMI itself predicts eps). With a_t = sqrt(alpha_bar_t)
and b_t = sqrt(1 - alpha_bar_t), the network predicts v = a_t eps - b_t z_0 instead of eps, and
    eps_hat = a_t v_hat + b_t z_t,        z0_hat = a_t z_t - b_t v_hat.
Why it matters: at large t, a_t is about 0.012 here, and z0_hat from an eps-predictor divides the
network's error by a_t (an eps error of 0.1 is a z_0 error of 8); from a v-predictor it does not.
A briefly trained eps-predictor's first sampling steps can push z away from the data for good
(docs/results.md measures it on tri-plane latents). Samplers only ever see eps_hat.

Network: an ADM-style UNet (Dhariwal & Nichol 2021): residual blocks with GroupNorm + SiLU, the
time (+ class) embedding injected as a scale and shift of the second norm, multi-head self-attention
at low resolutions, skip connections, and a zero-initialised output conv.

Shape letters: B batch, C latent channels, H W latent height and width, T diffusion steps,
D embedding width (4 * ch), S sampling steps, K number of classes.

Left out on purpose: x0-prediction and learned variances (DDMI uses eps and fixed variances); the
text encoder of text-to-shape (the original release does not run it); mixed precision (the drivers
own it); upsampling by transposed convs (nearest + conv is what ADM uses).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# 1. Noise schedule and the closed-form forward process
# ---------------------------------------------------------------------------------------------
class NoiseSchedule(nn.Module):
    """All fixed per-step constants of the diffusion, computed in float64 and kept as buffers."""

    def __init__(self, T=1000, beta_start=0.0015, beta_end=0.0195):
        super().__init__()
        self.T = T
        # beta_t = (sqrt(beta_start) + t / (T-1) (sqrt(beta_end) - sqrt(beta_start)))^2, shape (T,)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        # alpha_t = 1 - beta_t, shape (T,)
        alphas = 1.0 - betas
        # alpha_bar_t = prod_{s<=t} alpha_s, shape (T,)
        alpha_bar = torch.cumprod(alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (no noise before the first step), shape (T,)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alpha_bar", alpha_bar)
        self.register_buffer("alpha_bar_prev", alpha_bar_prev)
        # the two coefficients of q(z_t | z_0): sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shape (T,)
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt())
        self.register_buffer("sqrt_one_minus_alpha_bar", (1.0 - alpha_bar).sqrt())
        # posterior variance of q(z_{t-1} | z_t, z_0): (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        self.register_buffer("posterior_variance", (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * betas)


def _per_sample(coef, t, like):
    """Pick coef[t] for each sample and shape it (B, 1, 1, 1) in the dtype of `like`."""
    return coef[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule, z0, t, eps):
    """Noise a clean latent z0 (B, C, H, W) to step t (B,) in one shot."""
    # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    return _per_sample(schedule.sqrt_alpha_bar, t, z0) * z0 + _per_sample(schedule.sqrt_one_minus_alpha_bar, t, z0) * eps


# ---------------------------------------------------------------------------------------------
# 2. The ADM-style UNet eps_theta(z_t, t, y)
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim), as in the Transformer and DDPM."""
    half = dim // 2
    # frequencies 10000^(-i/half), i = 0..half-1, shape (half,)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    # angles t * freq, shape (B, half)
    args = t.float()[:, None] * freqs[None, :]
    # [cos, sin], shape (B, dim) (dim is even for every width used here)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(ch):
    """GroupNorm with 32 groups when possible (ADM), fewer for narrow layers."""
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """h = x + conv(SiLU(GN(conv(SiLU(GN(x))))) (1 + scale) + shift) with (scale, shift) from the embedding."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # one linear map gives both the scale and the shift of the second norm ("use_scale_shift_norm")
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.drop = _norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # ADM zero-initialises the last conv of every block: each block starts as the identity
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)
        # a 1x1 conv on the skip path only when the width changes
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        # scale, shift: (B, out_ch, 1, 1) each
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        # GN(h) (1 + scale) + shift: the step and the label modulate every channel
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, added residually."""

    def __init__(self, ch, num_heads=4):
        super().__init__()
        assert ch % num_heads == 0, f"{ch} channels do not split into {num_heads} heads"
        self.heads = num_heads
        self.norm, self.qkv = _norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        # zero output projection: the block starts as the identity (ADM)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        # q, k, v: (B, heads, H*W, C/heads) each
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        # softmax(q k^T / sqrt(C/heads)) v, shape (B, heads, H*W, C/heads)
        o = F.scaled_dot_product_attention(q, k, v)
        # heads back onto channels: (B, C, H, W)
        o = o.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(o)


class Resample(nn.Module):
    """Halves H and W with a stride-2 conv, or doubles them: nearest-neighbour x2, then a conv."""

    def __init__(self, ch, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNet(nn.Module):
    """eps_theta(z_t, t, y): (B, C, H, W) -> (B, C, H, W); H and W divisible by 2^(len(ch_mult)-1)."""

    def __init__(self, in_ch, ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                 num_classes=0, dropout=0.0, num_heads=4):
        super().__init__()
        self.in_ch, self.ch, self.num_classes = in_ch, ch, num_classes
        self.factor = 2 ** (len(ch_mult) - 1)
        D = 4 * ch
        # time embedding: sinusoid (ch) -> Linear -> SiLU -> Linear, width D
        self.time_mlp = nn.Sequential(nn.Linear(ch, D), nn.SiLU(), nn.Linear(D, D))
        # class embedding with K + 1 rows; row K is the null label of classifier-free guidance
        self.label_emb = nn.Embedding(num_classes + 1, D) if num_classes > 0 else None
        res = lambda i, o: ResBlock(i, o, D, dropout)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # Encoder. Every entry of self.down produces one skip tensor; widths[i] is its channel count.
        self.down, widths, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = [res(cur, ch * mult)]
                cur = ch * mult
                if level in attn_levels:
                    blocks.append(AttnBlock(cur, num_heads))
                self.down.append(nn.ModuleList(blocks))
                widths.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Resample(cur, up=False)]))
                widths.append(cur)
        # Middle: ResBlock, attention, ResBlock at the lowest resolution.
        self.mid = nn.ModuleList([res(cur, cur), AttnBlock(cur, num_heads), res(cur, cur)])
        # Decoder. Mirror of the encoder; each entry first concatenates one skip tensor.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [res(cur + widths.pop(), ch * mult)]
                cur = ch * mult
                if level in attn_levels:
                    blocks.append(AttnBlock(cur, num_heads))
                if level != 0 and i == num_res_blocks:
                    blocks.append(Resample(cur, up=True))
                self.up.append(nn.ModuleList(blocks))
        assert not widths, "every skip tensor is consumed exactly once"
        self.norm_out, self.conv_out = _norm(cur), nn.Conv2d(cur, in_ch, 3, padding=1)
        # zero-initialised output conv: eps_theta = 0 at initialisation
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, z_t, t, y=None):
        B, C, H, W = z_t.shape
        assert C == self.in_ch and H % self.factor == 0 and W % self.factor == 0, f"bad latent shape {z_t.shape}"
        assert t.shape == (B,), f"t must be (B,), got {tuple(t.shape)}"
        # time embedding, shape (B, D)
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.label_emb is not None:
            # y = None means "no label": every sample gets the null label K
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=z_t.device) if y is None else y
            assert y.shape == (B,), f"y must be (B,), got {tuple(y.shape)}"
            # the class enters by addition to the time embedding, shape (B, D)
            emb = emb + self.label_emb(y)
        else:
            assert y is None, "this UNet was built with num_classes=0"
        h = self.conv_in(z_t)  # (B, ch, H, W)
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)  # (B, ch * ch_mult[-1], H / factor, W / factor)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        assert out.shape == z_t.shape
        return out


# ---------------------------------------------------------------------------------------------
# 3. The diffusion model: loss, guided noise prediction, samplers
# ---------------------------------------------------------------------------------------------
class LatentDiffusion(nn.Module):
    """A UNet plus a schedule: the epsilon loss, classifier-free guidance, DDPM and DDIM sampling."""

    def __init__(self, unet, schedule, num_classes=0, p_uncond=0.1, prediction="eps"):
        super().__init__()
        assert prediction in ("eps", "v"), f"prediction must be 'eps' or 'v', got {prediction!r}"
        self.unet, self.schedule = unet, schedule
        self.num_classes, self.p_uncond, self.prediction = num_classes, p_uncond, prediction

    def loss(self, z0, y=None, t=None, eps=None, u=None):
        """Epsilon-prediction MSE for a batch of clean (already scaled) latents z0 (B, C, H, W).

        t, eps and u (the label-dropout draw) are drawn here unless given: train.py draws them
        itself, so that a batch split over several processes sees the draws one process would.
        """
        B = z0.shape[0]
        # t ~ U{0, ..., T-1}, shape (B,)
        t = torch.randint(0, self.schedule.T, (B,), device=z0.device) if t is None else t
        # eps ~ N(0, I), shape (B, C, H, W)
        eps = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype) if eps is None else eps
        # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
        z_t = q_sample(self.schedule, z0, t, eps)
        if self.num_classes > 0 and y is not None:
            # label dropout: with probability p_uncond (u ~ U[0, 1) < p) the label becomes the null label K
            u = torch.rand(B, device=z0.device) if u is None else u
            y = torch.where(u < self.p_uncond, torch.full_like(y, self.num_classes), y)
        if self.prediction == "v":
            # L = || v - v_theta(z_t, t, y) ||^2 with v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0
            v = _per_sample(self.schedule.sqrt_alpha_bar, t, z0) * eps - _per_sample(
                self.schedule.sqrt_one_minus_alpha_bar, t, z0) * z0
            return F.mse_loss(self.unet(z_t, t, y), v)
        # L = || eps - eps_theta(z_t, t, y) ||^2, averaged over B, C, H, W  (w(t) = 1)
        return F.mse_loss(self.unet(z_t, t, y), eps)

    def forward(self, z0, y=None, t=None, eps=None, u=None):
        # forward = loss, so DistributedDataParallel can wrap the model
        return self.loss(z0, y, t, eps, u)

    def eps(self, z_t, t, y=None, guidance=1.0):
        """Guided noise prediction eps_tilde(z_t, t, y) of shape (B, C, H, W)."""
        if y is None or self.num_classes == 0 or guidance == 1.0:
            # unconditional, or w = 1 where eps_tilde = eps_cond: one forward pass
            out = self.unet(z_t, t, y)
        else:
            B = z_t.shape[0]
            null = torch.full_like(y, self.num_classes)
            # one forward pass over 2B samples: first half conditional, second half null label
            out_c, out_u = self.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, null])).split(B)
            # eps_tilde = eps_u + w (eps_c - eps_u)  (the same combination of v, which is linear in eps)
            out = out_u + guidance * (out_c - out_u)
        if self.prediction == "v":
            # eps_hat = sqrt(alpha_bar_t) v_hat + sqrt(1 - alpha_bar_t) z_t
            a, b = (_per_sample(c, t, z_t) for c in (self.schedule.sqrt_alpha_bar, self.schedule.sqrt_one_minus_alpha_bar))
            out = a * out + b * z_t
        return out

    def _timesteps(self, steps):
        """`steps` evenly spaced integers from T-1 down to 0 (all of them when steps = T)."""
        T = self.schedule.T
        assert 1 <= steps <= T, f"steps must be in [1, {T}]"
        # spacing (T-1)/(steps-1) >= 1, so rounding keeps them distinct
        return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()

    @torch.no_grad()
    def sample(self, shape, steps=50, sampler="ddim", eta=0.0, y=None, guidance=1.0, generator=None):
        """Draw latents of `shape` (B, C, H, W) by DDPM or DDIM; returns z_0 in the scaled latent space.
        generator: one for the batch, or a list of B (then a sample does not depend on its batch)."""
        assert sampler in ("ddpm", "ddim"), f"unknown sampler {sampler!r}"
        # the latents live where the network lives, in its dtype (float32 for a network without parameters)
        param = next(self.unet.parameters(), self.schedule.alpha_bar.float())
        device, dtype = param.device, param.dtype
        # noise is drawn on the CPU (optionally from `generator`) then moved, so devices agree
        gens = generator if isinstance(generator, (list, tuple)) else None
        noise = lambda: (torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in gens]) if gens
                         else torch.randn(shape, generator=generator, dtype=dtype)).to(device)
        y = y.to(device) if y is not None else None
        # float64 copy of alpha_bar on the CPU: every coefficient below is a Python float (float64)
        alpha_bar = self.schedule.alpha_bar.detach().double().cpu().tolist()
        ts = self._timesteps(steps)
        z = noise()  # z_{T-1} ~ N(0, I), shape (B, C, H, W)
        for i, t in enumerate(ts):
            # next (less noisy) step s; after the last step alpha_bar_s = 1 (clean data)
            ab_t = alpha_bar[t]
            ab_s = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            eps = self.eps(z, t_batch, y, guidance)  # (B, C, H, W)
            if sampler == "ddpm":
                # respaced beta_ts = 1 - alpha_bar_t / alpha_bar_s (= beta_t when s = t - 1)
                beta_ts = 1.0 - ab_t / ab_s
                # Alg. 2, line 4: z_s = (z_t - beta_ts / sqrt(1 - alpha_bar_t) eps) / sqrt(1 - beta_ts) + sigma n
                z = (z - beta_ts / math.sqrt(1.0 - ab_t) * eps) / math.sqrt(1.0 - beta_ts)
                # sigma^2 = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta_ts: posterior variance; 0 at the last step
                sigma = math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * beta_ts)
            else:
                # z0_hat = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
                z0_hat = (z - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)
                # eq. 16: sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)
                sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
                # eq. 12: z_s = sqrt(alpha_bar_s) z0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps (+ sigma n below)
                z = math.sqrt(ab_s) * z0_hat + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
            if sigma > 0:
                # fresh noise n ~ N(0, I) (sigma = 0 at the last step, where alpha_bar_s = 1)
                z = z + sigma * noise()
        return z


# ---------------------------------------------------------------------------------------------
# 4. Exponential moving average of the weights, and the latent scale factor
# ---------------------------------------------------------------------------------------------
class EMA:
    """A frozen copy of a model whose weights track theta_ema <- d theta_ema + (1 - d) theta.

    warmup=True uses d_n = min(decay, (1 + n) / (10 + n)) at the n-th update, so that in a
    short run the average forgets the first (zero-initialised, far from trained) weights soon
    enough: their noise predictions at large t are too small, and sampling divides them by
    sqrt(alpha_bar_t) ~ 0.006 at the first step.
    """

    def __init__(self, model, decay=0.9999, warmup=False):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        n = self.num_updates
        # d = min(decay, (1 + n) / (10 + n)) with warm-up, else the constant decay
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        self.num_updates += 1
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            # theta_ema = d theta_ema + (1 - d) theta
            p_ema.copy_(d * p_ema + (1.0 - d) * p.detach())
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            # buffers (schedule constants, norm statistics) are copied, not averaged
            b_ema.copy_(b)

    def state_dict(self):
        # the EMA weights in the layout of the model itself: loadable into a fresh model directly
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


@torch.no_grad()
def estimate_scale_factor(z):
    """Rombach et al.'s scale factor 1 / std(z) from a batch of latents: z * factor has unit variance."""
    return 1.0 / z.detach().double().std().item()


# ---------------------------------------------------------------------------------------------
# Demo: class-conditional diffusion on analytic 1x8x8 stripe "latents"
# ---------------------------------------------------------------------------------------------
def _toy_latents(n, generator):
    """n stripe patterns (n, 1, 8, 8) with labels (n,): 0 rows, 1 columns, 2 diagonals; random amplitude, phase."""
    idx = torch.arange(8, dtype=torch.float32)
    yy, xx = torch.meshgrid(idx, idx, indexing="ij")  # (8, 8) each: row index y, column index x
    # the coordinate the stripes vary along: y (class 0), x (class 1) or x + y (class 2), shape (3, 8, 8)
    u = torch.stack([yy, xx, xx + yy])
    y = torch.randint(0, 3, (n,), generator=generator)  # labels, (n,)
    amp = 0.5 + torch.rand(n, 1, 1, generator=generator)  # amplitude in [0.5, 1.5), (n, 1, 1)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)  # (n, 1, 1)
    # z = A sin(2 pi u / 4 + phase) + 0.5: period of 4 pixels, a non-zero mean to make scaling matter
    z = amp * torch.sin(2 * math.pi * u[y] / 4 + phase) + 0.5  # (n, 8, 8)
    return z[:, None], y


def _classify(z):
    """Analytic label of a stripe pattern: the direction along which it is most nearly constant."""
    z = z[:, 0]  # (n, 8, 8)
    # mean |change| along x (constant for class 0), along y (class 1), along the anti-diagonal (class 2)
    changes = (z[:, :, 1:] - z[:, :, :-1], z[:, 1:, :] - z[:, :-1, :], z[:, 1:, :-1] - z[:, :-1, 1:])
    return torch.stack([d.abs().mean((1, 2)) for d in changes], 1).argmin(1)  # (n,)


def _stripe_residual(z, y):
    """RMS of what is left of each pattern after the best fit A sin + B cos + c along its label's direction."""
    idx = torch.arange(8, dtype=torch.float64)
    yy, xx = torch.meshgrid(idx, idx, indexing="ij")  # (8, 8) each
    u = torch.stack([yy, xx, xx + yy]).flatten(1)  # (3, 64)
    # per-class basis [sin, cos, 1] of the stripe family, shape (3, 64, 3)
    basis = torch.stack([torch.sin(2 * math.pi * u / 4), torch.cos(2 * math.pi * u / 4), torch.ones_like(u)], -1)
    A, b = basis[y], z.double().flatten(1)[:, :, None]  # (n, 64, 3), (n, 64, 1)
    # least squares fit, then the RMS of the residual per pattern, averaged
    fit = A @ torch.linalg.lstsq(A, b).solution  # (n, 64, 1)
    return (b - fit).pow(2).mean((1, 2)).sqrt().mean().item()


if __name__ == "__main__":
    import time

    from matplotlib import colormaps

    import figures

    torch.manual_seed(0)
    start, gen = time.time(), torch.Generator().manual_seed(0)
    z_data, y_data = _toy_latents(4096, gen)  # (4096, 1, 8, 8), (4096,)
    # scale factor from data, as for real VAE latents: the diffusion sees unit-variance latents
    scale = estimate_scale_factor(z_data)
    K = 3
    unet = UNet(in_ch=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_classes=K)
    model = LatentDiffusion(unet, NoiseSchedule(T=1000), num_classes=K, p_uncond=0.1)
    # a short run needs a short EMA memory; 0.9999 (the paper's) suits hundreds of thousands of steps
    ema = EMA(model, decay=0.99)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    steps, batch = 1000, 32
    # cosine decay of the learning rate to 0: the last steps average out the gradient noise
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for step in range(steps):
        i = torch.randint(0, len(z_data), (batch,))
        loss = model.loss(z_data[i] * scale, y_data[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
    train_s = time.time() - start
    print(f"{steps} steps in {train_s:.0f} s, last loss {loss.item():.4f}")

    n, y_req = 150, torch.arange(150) % K  # requested labels, balanced, (n,)
    draw = lambda sampler, w: ema.model.sample((n, 1, 8, 8), steps=50, sampler=sampler, y=y_req, guidance=w,
                                               generator=torch.Generator().manual_seed(1)) / scale
    # references: held-out real patterns (residual 0) and Gaussian noise with the data's mean and std
    z_real, y_real = _toy_latents(n, torch.Generator().manual_seed(2))
    z_noise = z_data.mean() + z_data.std() * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    # the stochastic sampler (DDPM) forgives more of a briefly trained network's error than deterministic DDIM
    rows = [("data", z_real, y_real), ("DDIM w=1", draw("ddim", 1.0), y_req), ("DDIM w=3", draw("ddim", 3.0), y_req),
            ("DDPM w=1", draw("ddpm", 1.0), y_req), ("noise", z_noise, y_req)]
    for name, z, lab in rows:
        print(f"{name:>8s}: class match {(_classify(z) == lab).float().mean().item():.3f}, "
              f"stripe-fit residual RMS {_stripe_residual(z, lab):.3f}")
    # three examples of each class in class order, coloured by value (blue low, red high)
    pick = lambda z, lab: z[torch.cat([(lab == c).nonzero()[:3, 0] for c in range(K)])][:, 0]  # (9, 8, 8)
    paint = lambda z: torch.from_numpy(colormaps["coolwarm"](((z + 1.2) / 3.4).clamp(0, 1).numpy())[..., :3])
    figures.write_sheet([paint(pick(z, lab)).permute(0, 3, 1, 2).float() * 2 - 1 for _, z, lab in rows[:4]],
                        "out/04_latent_diffusion.png", [name for name, _, _ in rows[:4]],
                        "stripe latents: rows / columns / diagonals; data vs 50-step samples")
    print(f"wrote out/04_latent_diffusion.png ({time.time() - start:.0f} s in all)")
