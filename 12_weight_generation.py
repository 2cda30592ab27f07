"""12 - The road not taken: generating the INR's weights instead of its positional embeddings.

The concept (DDMI, Park et al. ICLR 2024, Sec. 1 and Fig. 3; the baselines it argues against)
--------------------------------------------------------------------------------------------
Files 02-03 make z decide WHERE the read-out MLP looks: z is decoded into basis fields Xi,
a coordinate c gets the adaptive positional embedding p = bilinear(Xi, c), and ONE shared
MLP f_theta turns p into a value. Before DDMI, generative models of INRs did the opposite:
the coordinate's embedding is fixed (here the raw c, read by a SIREN) and z decides the
network's WEIGHTS. This file builds two such decoders so that the paper's claim (adaptive
positional embeddings beat generated weights) can be checked on equal footing: the same
encoder, latent, ELBO and diffusion model, only the decoder D(z) differs.

A SIREN (Sitzmann et al. 2020) is the INR both baselines generate:

    h_1 = sin(w0 (c W_1 + b_1)),  h_l = sin(w0 (h_{l-1} W_l + b_l)),  omega(c) = h_{L-1} W_L + b_L

with W_l of shape (in_l, out_l) and w0 = 10 here (W0 below says why not the usual 30).
Sines let a small MLP on raw coordinates fit fine detail
(the other cure for spectral bias besides file 01's Fourier features). Its initialisation
keeps every pre-activation spread over a few periods: W_1 ~ U(-1/in, 1/in) (times w0
gives the first layer its frequencies), W_l ~ U(-sqrt(6/in)/w0, sqrt(6/in)/w0) after that.

mNIF (You et al., NeurIPS 2023): z picks a point in the span of K basis networks.

    alpha = A vec(z) + a,            alpha of shape (K, L), a initialised to 1/K
    W_l = sum_k alpha[k, l] W_l^(k),  b_l = sum_k alpha[k, l] b_l^(k)

The K basis SIRENs have the same shape; the mixture is ONE small SIREN per item, so a query
costs what one SIREN costs however large K is. No normalisation of alpha (the paper's).
A linear mix of K networks is a linear family in weight space: what it can express is
bounded by K.

Hyper-transformer (Peis et al., LDMI; after Trans-INR, Chen and Wang 2022): z is cut into
2x2 patches, each a latent token. Learned weight tokens, g per INR layer, attend to each
other (self-attention) and to the latent tokens (cross-attention). Each output token k of
layer l gives one vector w_o[:, k] of length in_l, and it modulates every g-th column of a
learned base weight:

    W_l[:, j] = (1 + w_o[:, j mod g]) * W_l^base[:, j],     b_l = b_l^base

So z rescales the base SIREN's input weights per column group. The output heads start at
zero, so every item starts as the base SIREN (SIREN-initialised) and z moves it from there.

Why DDMI differs. Both baselines generate a function by moving its weights, and every
coordinate then sees the same network: detail must come from the weights alone. DDMI keeps
the network fixed and generates the input p(c): a detail at one place is a change in the
basis field near that place, local by construction, with far more numbers (the fields)
than any generated weight set. The cost differs too (the `query_cost` below counts it):
    DDMI   per item: the conv decoder to the fields; per query: S bilinear lookups + a ReLU MLP
    mNIF   per item: K-way mix of all SIREN weights;  per query: one SIREN
    hyper  per item: a small transformer;            per query: one SIREN

Both plug into file 02's D2CVAE: `decode(z)` returns the item's weights as a list
[W_1, b_1, ..., W_L, b_L] (the "fields" of the other decoders) and `query` evaluates the
SIREN with them, so elbo_loss, render, train.py and sample.py work unchanged.

Shape letters: B batch, N query coordinates, Z latent channels, h w latent size, K mNIF
bases, L SIREN layers, T latent tokens, G weight tokens (g per layer), d token width.

Left out on purpose: mNIF's own training (auto-decoding / meta-learning the latents; here
they come from the shared encoder so only the decoder differs), Trans-INR's column
normalisation (the rule above is LDMI's), and positional encodings of the coordinates
before the SIREN (the sines are the encoding).
"""
import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

inr = importlib.import_module("01_inr")
vae_lib = importlib.import_module("02_d2c_vae")

DECODERS = ("ddmi", "mnif", "hyper")
# SIREN's w0, for both baselines. Sitzmann et al. use 30 for one signal; across a dataset the
# higher frequencies of w0 = 30 left mNIF at the mean image, w0 = 10 learns (docs/claims.md).
W0 = 10.0
ALPHA_INIT_STD = 0.1  # std of A' in mNIF's alpha = (A' vec(z) / sqrt(D) + 1) / K
# The hyper-transformer's start. With the usual small init (positions and weight tokens
# ~N(0, 0.02^2), default query projection) the cross-attention starts uniform: every weight
# token reads the same average of the latent tokens, so z can only rescale the rows of each
# base W (the same w_o for every column group) and the decoder sits at the mean image.
# Unit-scale positions and tokens, and a query projection TOKEN_ATTN_GAIN times the default,
# make the attention differ per token from step 0 (docs/claims.md measures the gain).
TOKEN_ATTN_GAIN = 5.0


# ----------------------------------------------------------------------------------------
# The SIREN both baselines generate, evaluated with per-item weights
# ----------------------------------------------------------------------------------------
def siren_dims(in_dim, hidden, out_dim, num_layers):
    """(in_l, out_l) of each of the L linear layers."""
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    return list(zip(dims[:-1], dims[1:]))


def siren_init_(W, b, first, w0):
    """SIREN initialisation of one layer's W (..., in, out) and b (..., out), in place."""
    fan_in = W.shape[-2]
    # first layer: U(-1/in, 1/in); later layers: U(-sqrt(6/in)/w0, sqrt(6/in)/w0)
    bound = 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / w0
    with torch.no_grad():
        W.uniform_(-bound, bound)
        b.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


def siren(params, coords, w0=W0):
    """omega(c) for a batch of SIRENs: params [W_1 (B, in, out), b_1 (B, out), ...], coords (B, N, D) -> (B, N, out)."""
    h = coords
    L = len(params) // 2
    for l in range(L):
        W, b = params[2 * l], params[2 * l + 1]
        assert W.shape[0] == h.shape[0] and W.shape[1] == h.shape[-1], (W.shape, h.shape)
        # h W + b, one weight set per item (a batched matmul)
        h = torch.baddbmm(b[:, None, :], h, W)  # (B, N, out_l)
        # sin(w0 (h W + b)) between layers, linear at the end
        if l < L - 1:
            h = torch.sin(w0 * h)
    return h


# ----------------------------------------------------------------------------------------
# mNIF: a latent-dependent mixture of K basis SIRENs
# ----------------------------------------------------------------------------------------
class MNIFGenerator(nn.Module):
    """z (B, Z, h, w) -> the mixed SIREN's [W_1, b_1, ..., W_L, b_L], each with a batch axis."""

    def __init__(self, latent_shape, out_ch, hidden=64, num_layers=4, num_bases=16, w0=W0, in_dim=2):
        super().__init__()
        self.K, self.dims, self.w0 = num_bases, siren_dims(in_dim, hidden, out_ch, num_layers), w0
        L, D = len(self.dims), math.prod(latent_shape)
        # K basis SIRENs of the same shape: W^(k)_l (K, in_l, out_l), b^(k)_l (K, out_l)
        self.W = nn.ParameterList(nn.Parameter(torch.empty(num_bases, i, o)) for i, o in self.dims)
        self.b = nn.ParameterList(nn.Parameter(torch.empty(num_bases, o)) for i, o in self.dims)
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            siren_init_(W, b, first=l == 0, w0=w0)
            # At alpha = 1/K the mix is the mean of K independent inits, whose spread is
            # 1/sqrt(K) of one SIREN's; scaling the bases by sqrt(K) gives the starting mix
            # the SIREN's own spread (our choice: without it the mix starts too smooth).
            with torch.no_grad():
                W.mul_(math.sqrt(num_bases))
                b.mul_(math.sqrt(num_bases))
        # alpha = A vec(z) + a, written as alpha = (A' vec(z) / sqrt(D) + a') / K with a' = 1,
        # so a starts at 1/K. The fixed factors are for Adam, which moves every parameter by
        # about lr per step whatever its scale: with A itself a parameter, one step would move
        # alpha by ~lr * sum |z| (0.2 at lr 1e-3, three times its size 1/K) and the mix would
        # jump between unrelated networks. A' starts small (ALPHA_INIT_STD), so each item's
        # mix starts near the mean network.
        self.to_alpha = nn.Linear(D, num_bases * L)
        nn.init.normal_(self.to_alpha.weight, std=ALPHA_INIT_STD)
        nn.init.ones_(self.to_alpha.bias)
        self.D = D

    def coefficients(self, z):
        """alpha (B, K, L) from z (B, Z, h, w)."""
        alpha = self.to_alpha(z.flatten(1) / math.sqrt(self.D)) / self.K  # (B, K * L)
        return alpha.unflatten(1, (self.K, len(self.dims)))

    def forward(self, z):
        alpha = self.coefficients(z)  # (B, K, L)
        params = []
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            # W_l = sum_k alpha[k, l] W_l^(k);  b_l = sum_k alpha[k, l] b_l^(k)
            params.append(torch.einsum("bk,kio->bio", alpha[:, :, l], W))  # (B, in_l, out_l)
            params.append(alpha[:, :, l] @ b)  # (B, out_l)
        return params


# ----------------------------------------------------------------------------------------
# The hyper-transformer: weight tokens attend to latent tokens
# ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention of queries x (B, Nq, d) over keys/values y (B, Nk, d)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, y):
        B, Nq, d = x.shape
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, Nq, d / heads)
        k, v = self.kv(y).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 2 x (B, heads, Nk, d / heads)
        # softmax(q k^T / sqrt(d_head)) v
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, d / heads)
        return self.out(h.transpose(1, 2).reshape(B, Nq, d))


class TokenBlock(nn.Module):
    """Pre-norm block: self-attention among weight tokens, cross-attention to latent tokens, MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.n1, self.n2, self.n3, self.n_lat = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.cross_attn = Attention(d, heads), Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, lat):  # x (B, G, d) weight tokens, lat (B, T, d) latent tokens
        h = self.n1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.n2(x), self.n_lat(lat))
        return x + self.mlp(self.n3(x))


class HyperTransformerGenerator(nn.Module):
    """z (B, Z, h, w) -> the modulated SIREN's [W_1, b_1, ..., W_L, b_L], each with a batch axis."""

    def __init__(self, latent_shape, out_ch, hidden=64, num_layers=4, d=64, depth=2, heads=4, groups=8, w0=W0,
                 in_dim=2):
        super().__init__()
        Z, h, w = latent_shape
        if h % 2 or w % 2:
            raise ValueError(f"the hyper-transformer cuts the latent into 2x2 patches; latent {h}x{w} is not even")
        self.dims, self.w0 = siren_dims(in_dim, hidden, out_ch, num_layers), w0
        # g weight tokens per layer (fewer when a layer has fewer columns than g)
        self.groups = [min(groups, o) for i, o in self.dims]
        T = (h // 2) * (w // 2)
        # latent tokens: each 2x2 patch of z (4Z numbers) -> d, plus a learned position
        self.patch = nn.Linear(4 * Z, d)
        self.lat_pos = nn.Parameter(torch.randn(T, d))  # (T, d), unit scale: see TOKEN_ATTN_GAIN
        self.tokens = nn.Parameter(torch.randn(sum(self.groups), d))  # (G, d) learned weight tokens
        self.blocks = nn.ModuleList(TokenBlock(d, heads) for _ in range(depth))
        with torch.no_grad():  # sharper attention at the start (see TOKEN_ATTN_GAIN)
            for block in self.blocks:
                for attn in (block.self_attn, block.cross_attn):
                    attn.q.weight.mul_(TOKEN_ATTN_GAIN)
        self.norm = nn.LayerNorm(d)
        # one head per layer: token -> w_o[:, k] of length in_l; zero, so each item starts as the base
        self.heads = nn.ModuleList(nn.Linear(d, i) for i, o in self.dims)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        # the learned, SIREN-initialised base: W_l^base (in_l, out_l), b_l^base (out_l)
        self.W = nn.ParameterList(nn.Parameter(torch.empty(i, o)) for i, o in self.dims)
        self.b = nn.ParameterList(nn.Parameter(torch.empty(o)) for i, o in self.dims)
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            siren_init_(W, b, first=l == 0, w0=w0)

    def latent_tokens(self, z):
        """z (B, Z, h, w) -> (B, T, d): one token per 2x2 patch, in row-major patch order."""
        B, Z, h, w = z.shape
        patches = z.reshape(B, Z, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * Z)  # (B, T, 4Z)
        return self.patch(patches) + self.lat_pos

    @staticmethod
    def modulate(W_base, w_o):
        """W[:, j] = (1 + w_o[:, j mod g]) * W_base[:, j];  W_base (in, out), w_o (B, in, g) -> (B, in, out)."""
        g, out = w_o.shape[-1], W_base.shape[-1]
        cols = torch.arange(out, device=W_base.device) % g  # which token modulates column j
        return (1 + w_o[:, :, cols]) * W_base

    def forward(self, z):
        lat = self.latent_tokens(z)  # (B, T, d)
        x = self.tokens.expand(z.shape[0], -1, -1)  # (B, G, d)
        for block in self.blocks:
            x = block(x, lat)
        x = self.norm(x)
        params, start = [], 0
        for l, g in enumerate(self.groups):
            w_o = self.heads[l](x[:, start:start + g]).transpose(1, 2)  # (B, in_l, g)
            start += g
            params.append(self.modulate(self.W[l], w_o))  # (B, in_l, out_l)
            params.append(self.b[l].expand(z.shape[0], -1))  # (B, out_l): the base bias
        return params


# ----------------------------------------------------------------------------------------
# The weight-generating VAE: file 02's D2CVAE with a SIREN query
# ----------------------------------------------------------------------------------------
class WeightGenVAE(vae_lib.D2CVAE):
    """encode as file 02; decode(z) -> the item's SIREN weights; query runs that SIREN."""

    def __init__(self, encoder, generator):
        super().__init__(encoder, generator, readout=None, lookup=None)

    def query(self, fields, coords):
        return siren(fields, coords, self.decoder.w0)  # (B, N, out)


def build_vae(decoder, encoder, latent_shape, out_ch, hidden=64, num_layers=4, num_bases=16):
    """A WeightGenVAE with the mNIF or hyper-transformer decoder (ddmi is built by file 03)."""
    if decoder == "mnif":
        return WeightGenVAE(encoder, MNIFGenerator(latent_shape, out_ch, hidden, num_layers, num_bases))
    if decoder == "hyper":
        return WeightGenVAE(encoder, HyperTransformerGenerator(latent_shape, out_ch, hidden, num_layers))
    raise ValueError(f"unknown weight-generating decoder {decoder!r}; expected mnif or hyper")


def query_cost(vae, latent_shape, coord_dim=2, n=1024):
    """(generator parameters, per-query parameters, FLOPs per item, FLOPs per query) of a VAE's decoder.

    FLOPs are PyTorch's count of the matmuls, convolutions and attention (torch.utils.flop_counter):
    what decode(z) costs once per item, and what query costs per coordinate. Bilinear interpolation
    and the sines are not counted (a few FLOPs per channel; small next to the matmuls).
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(vae.parameters())
    z = torch.randn(1, *latent_shape, device=p.device)
    c = torch.rand(1, n, coord_dim, device=p.device) * 2 - 1
    # (with gradients on: the counter's module hooks fail under no_grad)
    with FlopCounterMode(display=False) as fc:
        fields = vae.decode(z)
    per_item = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.query(fields, c)
    per_query = fc.get_total_flops() / n
    gen = sum(q.numel() for q in vae.decoder.parameters())
    if isinstance(vae, WeightGenVAE):
        inr_params = sum(t[0].numel() for t in fields)  # the one SIREN a query runs
    else:
        inr_params = sum(q.numel() for q in vae.readout.parameters())  # the shared read-out MLP
        gen += inr_params
    return gen, inr_params, per_item, per_query


# ----------------------------------------------------------------------------------------
# Demo: the three decoders on the same encoder and budget, synthetic 32x32 images
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    import figures

    Hd = importlib.import_module("03_hdbf_cfc")
    R, K, Z, steps = 32, 256, 4, 300
    train = inr.synthetic_images(inr.synthetic_params(2000, seed=0), R, R)  # (2000, 3, R, R), file 01
    val = inr.synthetic_images(inr.synthetic_params(64, seed=1), R, R)  # unseen images
    gt64 = inr.synthetic_images(inr.synthetic_params(64, seed=1), 2 * R, 2 * R)  # exact at 64x64
    rows = [val[:6]]
    for name in DECODERS:
        torch.manual_seed(0)  # the same encoder initialisation, batches and coordinates for each
        encoder = vae_lib.ConvEncoder(3, Z)
        latent = (Z, R // encoder.downsample, R // encoder.downsample)
        if name == "ddmi":
            vae = vae_lib.D2CVAE(encoder, *Hd.build_decoder_readout("hdbf_cfc", Z, 16, 3))
        else:
            vae = build_vae(name, encoder, latent, 3)
        t0 = time.time()
        vae_lib.fit(vae, train, steps, K)  # file 02's loop: Adam on the ELBO
        with torch.no_grad():
            fields = vae.decode(vae.encode(val).mean)
            rec, rec64 = vae_lib.render(vae, fields, R, R), vae_lib.render(vae, fields, 2 * R, 2 * R)
        rows.append(rec[:6])
        gen, per_inr, f_item, f_query = query_cost(vae, latent)
        print(f"{name:6s} val PSNR {inr.psnr(rec, val):5.2f} dB at 32x32, {inr.psnr(rec64, gt64):5.2f} dB at 64x64 "
              f"vs exact; decoder {gen / 1e3:.0f}k params, per-query net {per_inr / 1e3:.1f}k, "
              f"{f_item / 1e6:.1f} MFLOP per item + {f_query / 1e3:.1f} kFLOP per query ({time.time() - t0:.0f} s)")
    figures.write_sheet(rows, "out/12_weight_generation.png", ("data", *DECODERS),
                        f"unseen images and reconstructions after {steps} steps, three decoders")
    print("wrote out/12_weight_generation.png")
