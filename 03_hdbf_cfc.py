"""03 - Hierarchically decomposed basis fields (HDBF) and coarse-to-fine conditioning (CFC).

The concept (DDMI, Park et al. ICLR 2024, Sec. 3.3, ablation in Table 8)
------------------------------------------------------------------------
File 02 decodes the latent z into ONE basis field Xi at the output resolution and reads it
with an MLP. A signal has structure at many scales (the shape of a face, then the eyes,
then the hair), and one fine field has to carry all of it in every texel. DDMI instead
decomposes the positional embedding over scales:

HDBF: the decoder already computes feature maps at several resolutions on its way from
z up to full size (R/4, R/2, R here). A 1x1 conv "tap" on each of the last S levels turns
it into a field, so one forward pass gives S basis fields

    Xi_1 (C, R/4, R/4),  Xi_2 (C, R/2, R/2),  Xi_3 (C, R, R)     (coarse to fine)

and a coordinate c gets S embeddings p_s = bilinear(Xi_s, c). The coarse field is smooth
(its texels are 4 pixels apart, bilinear interpolation spreads them), the fine one can
hold detail.

CFC: how should the read-out MLP combine p_1, p_2, p_3? Concatenating them at the input
("hdbf_concat") lets every layer mix every scale. Coarse-to-fine conditioning feeds them
in order of scale: the first layer sees only the coarse embedding, and each finer one is
concatenated to the hidden state of a later layer:

    h_1 = ReLU(W_1 p_1)
    h_2 = ReLU(W_2 [h_1, p_2])
    h_3 = ReLU(W_3 [h_2, p_3])
    ...
    omega(c) = W_L h_{L-1}

so the network first forms a coarse estimate and the finer embeddings refine it.

The three variants of the paper's ablation (Table 8: first-stage PSNR 32.72 / 33.17 / 33.56
on CelebA-HQ 64) are selectable by name:

    single       one basis field at full resolution, MLP on it        (file 02)
    hdbf_concat  three fields (R/4, R/2, R), embeddings concatenated, MLP
    hdbf_cfc     three fields, coarse-to-fine conditioning             (DDMI)

All three share the same encoder and decoder trunk; only the taps and the read-out
differ, so the comparison is about the idea, not about model size (the demo prints
the parameter counts).

Shape letters: B batch, N coordinates, C field channels, S scales, Z latent channels,
h w latent size, R resolution.

Left out on purpose: more than three scales (the paper uses three), and a separate
decoder trunk per scale (taps on one trunk are what makes HDBF cheap).
"""
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

inr = importlib.import_module("01_inr")
vae_lib = importlib.import_module("02_d2c_vae")

VARIANTS = ("single", "hdbf_concat", "hdbf_cfc")


# ----------------------------------------------------------------------------------------
# HDBF: taps on the decoder's levels
# ----------------------------------------------------------------------------------------
class HDBFDecoder(vae_lib.BasisFieldDecoder):
    """z (B, Z, h, w) -> [Xi_1, ..., Xi_S], coarse to fine; Xi_s (B, C, h * 2^(L-S+s-1), ...).

    The trunk is file 02's decoder; a 1x1 conv on each of its last S levels gives one
    field per scale. With ch_mult of length 3 and S = 3: fields at h, 2h and 4h.
    """

    def __init__(self, z_ch, field_ch, ch=32, ch_mult=(1, 2, 2), num_scales=3):
        super().__init__(z_ch, field_ch, ch, ch_mult)
        assert num_scales <= len(self.level_channels), "more scales than decoder levels"
        del self.to_field  # the single-field head of file 02 is replaced by the taps
        self.num_scales = num_scales
        # Xi_s = Conv1x1(level feature map): one tap per scale
        self.taps = nn.ModuleList(nn.Conv2d(c, field_ch, 1) for c in self.level_channels[-num_scales:])

    def forward(self, z):
        feats = self.levels(z)[-self.num_scales:]  # S feature maps, coarse to fine
        return [tap(h) for tap, h in zip(self.taps, feats)]  # S x (B, C, H_s, W_s)


# ----------------------------------------------------------------------------------------
# CFC: the read-out MLP that takes the scales one layer at a time
# ----------------------------------------------------------------------------------------
class CFCReadout(nn.Module):
    """f_theta([p_1, ..., p_S]) with p_s (B, N, C_s) -> (B, N, out_ch), coarse first.

    Layer s (s = 1..S) takes [h_{s-1}, p_s] (layer 1 takes p_1 alone); the remaining
    num_layers - S layers are ordinary hidden layers, the last one linear.
    """

    def __init__(self, dims_in, hidden, out_ch, num_layers=4):
        super().__init__()
        S = len(dims_in)
        assert num_layers > S, "CFC needs one layer per scale plus an output layer"
        # input width of each linear layer: p_1; then [h, p_s]; then h
        widths_in = [dims_in[0]] + [hidden + d for d in dims_in[1:]] + [hidden] * (num_layers - S)
        widths_out = [hidden] * (num_layers - 1) + [out_ch]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths_in, widths_out))
        for layer in self.layers:  # He initialisation, as in file 01's MLP
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.num_scales = S

    def forward(self, p):
        assert len(p) == self.num_scales, (len(p), self.num_scales)
        # h_1 = ReLU(W_1 p_1): the first layer sees the coarsest embedding only
        h = F.relu(self.layers[0](p[0]))  # (B, N, hidden)
        for s in range(1, len(self.layers)):
            if s < self.num_scales:
                # h_s = ReLU(W_s [h_{s-1}, p_s]): the next finer scale joins here
                h = torch.cat([h, p[s]], dim=-1)  # (B, N, hidden + C_s)
            h = self.layers[s](h)
            if s < len(self.layers) - 1:
                h = F.relu(h)
        return h  # (B, N, out_ch)


# ----------------------------------------------------------------------------------------
# The three variants of the ablation
# ----------------------------------------------------------------------------------------
def build_decoder_readout(variant, z_ch, field_ch, out_ch, ch=32, ch_mult=(1, 2, 2), hidden=64, num_layers=4,
                          embed_mult=1):
    """(decoder, read-out) for one of VARIANTS; the trunk and MLP depth are the same for all.

    embed_mult: how many field_ch-wide embeddings the lookup returns per scale (3 for a
    tri-plane whose planes are concatenated, as for videos; 1 otherwise).
    """
    d = embed_mult * field_ch  # width of one scale's embedding p_s
    if variant == "single":
        return (vae_lib.BasisFieldDecoder(z_ch, field_ch, ch, ch_mult), vae_lib.ConcatReadout([d], hidden, out_ch, num_layers))
    if variant == "hdbf_concat":
        return HDBFDecoder(z_ch, field_ch, ch, ch_mult), vae_lib.ConcatReadout([d] * 3, hidden, out_ch, num_layers)
    if variant == "hdbf_cfc":
        return HDBFDecoder(z_ch, field_ch, ch, ch_mult), CFCReadout([d] * 3, hidden, out_ch, num_layers)
    raise ValueError(f"unknown decoder variant {variant!r}; expected one of {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------------------
# Demo: the Table 8 ablation in miniature, on synthetic 32x32 images
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import sys
    import time

    import figures

    R, K, Z, steps = 32, 256, 4, 300
    # `python 03_hdbf_cfc.py 0,1,2,3` averages over several seeds. At this budget one seed can
    # mislead: the single fine field sometimes sits on a plateau (a blurred average) for
    # hundreds of steps, while the coarse taps of HDBF give the read-out an easy signal from
    # the first step (docs/results.md has the table over seeds).
    seeds = tuple(int(v) for v in sys.argv[1].split(",")) if len(sys.argv) > 1 else (0,)
    train = inr.synthetic_images(inr.synthetic_params(2000, seed=0), R, R)  # (2000, 3, R, R), file 01
    val = inr.synthetic_images(inr.synthetic_params(64, seed=1), R, R)  # unseen images
    gt64 = inr.synthetic_images(inr.synthetic_params(64, seed=1), 2 * R, 2 * R)  # the same, exact at 64x64
    rows = [val[:6]]
    for variant in VARIANTS:
        psnrs, psnrs64, t0 = [], [], time.time()
        for seed in seeds:
            torch.manual_seed(seed)  # per seed: same initial encoder, batches and coordinates for every variant
            decoder, readout = build_decoder_readout(variant, Z, field_ch=16, out_ch=3)
            vae = vae_lib.fit(vae_lib.D2CVAE(vae_lib.ConvEncoder(3, Z), decoder, readout), train, steps, K)
            with torch.no_grad():
                fields = vae.decode(vae.encode(val).mean)
                rec, rec64 = vae_lib.render(vae, fields, R, R), vae_lib.render(vae, fields, 2 * R, 2 * R)
            psnrs.append(inr.psnr(rec, val))
            psnrs64.append(inr.psnr(rec64, gt64))
            if seed == seeds[0]:
                rows.append(rec[:6])
        n_params = sum(p.numel() for p in vae.parameters())
        print(f"{variant:12s} val PSNR {sum(psnrs) / len(psnrs):5.2f} dB at 32x32 "
              f"(seeds: {', '.join(f'{v:.2f}' for v in psnrs)}), {sum(psnrs64) / len(psnrs64):5.2f} dB at "
              f"64x64 vs exact  ({n_params} params, {time.time() - t0:.0f} s)")
    figures.write_sheet(rows, "out/03_hdbf_cfc.png", ("data", *VARIANTS),
                        f"unseen images and reconstructions after {steps} steps (seed {seeds[0]})")
    print("wrote out/03_hdbf_cfc.png")
