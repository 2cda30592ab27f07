"""02 - The D2C-VAE: from discrete data to a latent, from the latent to a continuous function.

The concept (DDMI, Park et al. ICLR 2024, Sec. 3.2)
---------------------------------------------------
Our data are discrete (an image is a grid of pixels) but we want to generate continuous
functions (an INR we can query anywhere). The Discrete-to-Continuous VAE bridges the two:

    encoder   q_phi(z | x):  pixels x  ->  a diagonal Gaussian over a latent plane z
    decoder   D_psi(z):      z  ->  a basis field Xi (a feature plane, file 01)
    read-out  f_theta(p):    p = bilinear(Xi, c)  ->  the signal value at coordinate c

so that x is explained as a function omega(c) = f_theta(bilinear(D_psi(z), c)) and the
decoder is asked for values at any coordinates, not only at the pixels we were given.

Training maximises a re-weighted evidence lower bound (ELBO):

    L(x) = E_{z ~ q(z|x)} E_{c} [ log p(omega(c) | z) ]  -  lambda_z KL(q(z|x) || N(0, I))

  * The first term is estimated with K random coordinates c per item (never all of them
    unless the signal is small): a Monte Carlo estimate of the average over the domain.
    For images the likelihood is Laplace, so -log p is an L1 error.
  * The KL of a diagonal Gaussian N(mu, sigma^2) from N(0, 1) has a closed form,
        KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2).
  * lambda_z trades reconstruction against a smooth, Gaussian-like latent space that the
    diffusion model of file 04 can learn. It is annealed linearly from a small value so
    that the decoder first learns to reconstruct.
  * z is sampled with the reparameterisation trick, z = mu + sigma * eps, eps ~ N(0, I),
    so gradients flow through mu and sigma.

Scaling of the loss: the paper sums the reconstruction over all values and the KL over all
latent entries. We divide both by D_x, the number of values in one data item, so the
reconstruction is a mean (K sampled coordinates estimate it) and lambda_z keeps the
paper's meaning:  loss = mean_recon + lambda_z * KL_sum / D_x.

This file is generic over modalities: the encoder, decoder, lookup and read-out are
handed to the D2CVAE class. Here we build the simplest complete version: a conv encoder,
a decoder to ONE basis field, and an MLP read-out. File 03 replaces the decoder and the
read-out with the multi-scale (HDBF) and coarse-to-fine (CFC) versions the paper uses.

Shape letters: B batch, C channels, H W spatial size, N or K query coordinates,
Z latent channels, P planes (1 for images, 3 for tri-planes).

Left out on purpose: the paper's LPIPS/adversarial terms (they need pretrained networks),
and a learned likelihood scale (the L1 loss has a fixed scale; lambda_z absorbs it).
"""
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

inr = importlib.import_module("01_inr")


# ----------------------------------------------------------------------------------------
# The posterior q(z | x): a diagonal Gaussian
# ----------------------------------------------------------------------------------------
class DiagonalGaussian:
    """N(mu, diag(sigma^2)) over a latent tensor; the encoder outputs [mu, log sigma^2]."""

    def __init__(self, params, dim=1):
        # params (B, 2Z, h, w): mean and log-variance stacked on the channel axis `dim`
        # (dim=2 for tri-planes stacked as (B, P, 2Z, h, w)).
        self.mean, logvar = params.chunk(2, dim=dim)  # (B, Z, h, w) each
        # Clamped so that exp() can neither overflow nor give sigma = 0.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, eps=None):
        # Reparameterisation: z = mu + sigma * eps, eps ~ N(0, I) (drawn here unless given)
        return self.mean + self.std * (torch.randn_like(self.mean) if eps is None else eps)

    def kl(self):
        """KL(q || N(0, I)) per item, summed over latent entries: shape (B,)."""
        # KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------
# Conv building blocks (shared by the encoder and the decoders of 03)
# ----------------------------------------------------------------------------------------
def norm(ch):
    """GroupNorm with up to 8 groups; it does not depend on the batch, unlike BatchNorm."""
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1x1 skip when channels change."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.body = nn.Sequential(
            norm(ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1),
            norm(ch_out), nn.SiLU(), nn.Conv2d(ch_out, ch_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        return self.skip(x) + self.body(x)


class ConvEncoder(nn.Module):
    """x (B, C_x, H, W) -> posterior parameters (B, 2Z, H / 2^(L-1), W / 2^(L-1)).

    L = len(ch_mult) levels; level i works at resolution H / 2^i with ch * ch_mult[i]
    channels. Level 0 (full resolution) is a single conv: convolutions at full resolution
    dominate the cost of a step, and one is enough to lift pixels into features. Every
    coarser level is a stride-2 conv followed by a ResBlock. The last conv outputs
    2Z channels: the mean and the log-variance of q(z | x).
    """

    def __init__(self, in_ch, z_ch, ch=32, ch_mult=(1, 2, 2)):
        super().__init__()
        chs = [ch * m for m in ch_mult]
        layers = [nn.Conv2d(in_ch, chs[0], 3, padding=1), nn.SiLU()]
        for i in range(1, len(chs)):  # halve the resolution, then a ResBlock
            layers += [nn.Conv2d(chs[i - 1], chs[i], 3, stride=2, padding=1), ResBlock(chs[i], chs[i])]
        layers += [norm(chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], 2 * z_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.downsample = 2 ** (len(chs) - 1)

    def forward(self, x):
        return self.net(x)


class BasisFieldDecoder(nn.Module):
    """z (B, Z, h, w) -> [Xi]: one basis field (B, C_field, h * 2^(L-1), w * 2^(L-1)).

    The mirror of the encoder, coarse to fine: a conv and a ResBlock at the latent's
    resolution, then per level a nearest-neighbour 2x upsampling and a conv (followed
    by a ResBlock, except at the finest level, which again is kept to a single conv).
    `levels(z)` returns the feature map of every level, coarse to fine, so that file 03
    can tap all of them; here only the finest is turned into a field, by a 1x1 conv.
    """

    def __init__(self, z_ch, field_ch, ch=32, ch_mult=(1, 2, 2)):
        super().__init__()
        chs = [ch * m for m in reversed(ch_mult)]  # coarse (many channels) to fine (few)
        self.conv_in = nn.Conv2d(z_ch, chs[0], 3, padding=1)
        self.ups = nn.ModuleList(nn.Conv2d(chs[i - 1], chs[i], 3, padding=1) for i in range(1, len(chs)))
        # a ResBlock on every level but the finest
        self.blocks = nn.ModuleList(ResBlock(c, c) for c in chs[:-1])
        self.level_channels = chs
        self.to_field = nn.Conv2d(chs[-1], field_ch, 1)

    def levels(self, z):
        """Feature maps after each level, coarse to fine: [(B, chs[0], h, w), (B, chs[1], 2h, 2w), ...]."""
        h = self.blocks[0](self.conv_in(z))  # (B, chs[0], h, w)
        feats = [h]
        for i, up in enumerate(self.ups, start=1):
            # double the resolution: nearest-neighbour copy, then a conv to smooth it
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.blocks[i](h) if i < len(self.blocks) else F.silu(h)
            feats.append(h)  # (B, chs[i], h * 2^i, w * 2^i)
        return feats

    def forward(self, z):
        return [self.to_field(self.levels(z)[-1])]  # a list of fields (here: one)


class ConcatReadout(nn.Module):
    """f_theta: embeddings [p_1, ..., p_S] (each (B, N, C_s)) -> values (B, N, out_ch).

    The embeddings are concatenated and read by the MLP of file 01.
    """

    def __init__(self, dims_in, hidden, out_ch, num_layers=4):
        super().__init__()
        self.mlp = inr.MLP(sum(dims_in), hidden, out_ch, num_layers)

    def forward(self, p):
        return self.mlp(torch.cat(p, dim=-1))


# ----------------------------------------------------------------------------------------
# The VAE itself, generic over modalities
# ----------------------------------------------------------------------------------------
class D2CVAE(nn.Module):
    """encode(x) -> q(z|x);  decode(z) -> basis fields;  query(fields, c) -> omega(c).

    encoder: data -> (B, 2Z, h, w) for one plane or (B, P, 2Z, h, w) for P planes.
    decoder: (B', Z, h, w) -> list of fields (B', C_s, H_s, W_s), one per scale.
    lookup:  (field, coords) -> (B, N, C_s); bilinear_lookup or a tri-plane lookup.
    readout: list of embeddings -> values (B, N, out_ch).
    """

    def __init__(self, encoder, decoder, readout, lookup=inr.bilinear_lookup):
        super().__init__()
        self.encoder, self.decoder, self.readout = encoder, decoder, readout
        self.lookup = lookup

    def encode(self, x):
        params = self.encoder(x)
        # (B, 2Z, h, w), or (B, P, 2Z, h, w) for P planes: the channel axis is third from last.
        return DiagonalGaussian(params, dim=params.dim() - 3)

    # decode and query run in float32 even inside a bf16 autocast (train.py's fast paths): with bf16
    # basis fields and read-out, stage 1 on the built-in images ended 0.8 dB lower after 3,000 steps.
    # The encoder, where most of the time goes, keeps bf16.
    def decode(self, z):
        """z (B, Z, h, w) or (B, P, Z, h, w) -> list over scales of (B, C, H, W) or (B, P, C, H, W)."""
        with torch.autocast(z.device.type, enabled=False):
            if z.dim() == 4:
                return self.decoder(z.float())
            # Planes share the decoder weights: fold P into the batch, decode once, unfold.
            B, P = z.shape[:2]
            fields = self.decoder(z.flatten(0, 1).float())  # list of (B*P, C, H, W)
            return [Xi.unflatten(0, (B, P)) for Xi in fields]

    def query(self, fields, coords):
        """omega(c) = f_theta([lookup(Xi_s, c) for each scale s]); coords (B, N, D) -> (B, N, out)."""
        with torch.autocast(coords.device.type, enabled=False):
            p = [self.lookup(Xi.float(), coords) for Xi in fields]  # S x (B, N, C_s)
            return self.readout(p)


# ----------------------------------------------------------------------------------------
# The re-weighted ELBO
# ----------------------------------------------------------------------------------------
def kl_weight(step, total_steps, lambda_z, lambda_start=1e-4, frac=0.9):
    """lambda_z annealed linearly from lambda_start to lambda_z over the first frac of training."""
    ramp = min(1.0, step / max(1.0, frac * total_steps))
    return lambda_start + (lambda_z - lambda_start) * ramp


def l1_recon(pred, target):
    """-log p under a Laplace likelihood, up to scale and constant: mean |omega(c) - x(c)| per item, (B,)."""
    return (pred - target).abs().flatten(1).mean(1)


def elbo_loss(vae, x, coords, target, lambda_z, num_values, recon_fn=l1_recon, eps=None):
    """Negative re-weighted ELBO on a batch, as a dict of scalars: loss, recon, kl.

    x: the encoder's input; coords (B, K, D): K query coordinates per item;
    target (B, K, out): the signal at those coordinates; num_values: D_x, values per item;
    eps: the reparameterisation noise, drawn here unless given (train.py draws it itself so
    that a batch split over several processes uses the noise one process would).
    """
    q = vae.encode(x)
    # z ~ q(z|x) by reparameterisation
    z = q.sample(eps)
    fields = vae.decode(z)
    pred = vae.query(fields, coords)  # (B, K, out)
    assert pred.shape == target.shape, (pred.shape, target.shape)
    # E_c[-log p(omega(c) | z)], estimated with the K sampled coordinates
    recon = recon_fn(pred, target).mean()
    # KL per item, divided by D_x (see the docstring), averaged over the batch
    kl = q.kl().mean() / num_values
    # loss = mean_recon + lambda_z * KL_sum / D_x
    return {"loss": recon + lambda_z * kl, "recon": recon, "kl": kl}


def random_samples(signal, grid, K, generator=None):
    """K random grid points per item and the signal's values there: coords (B, K, D), target (B, K, C).

    signal (B, C, *S) holds its values on a regular grid of spatial shape S (pixels, frames of
    voxels); grid (prod S, D) is the coordinate of each value, in the same (flattened) order.
    Sampling grid points (not arbitrary points) makes the targets exact data values.
    """
    B, C = signal.shape[:2]
    idx = torch.randint(len(grid), (B, K), generator=generator).to(signal.device)  # (B, K) flat index
    coords = grid.to(signal.device)[idx]  # (B, K, D)
    target = signal.flatten(2).gather(2, idx[:, None].expand(B, C, K)).transpose(1, 2)  # (B, K, C)
    return coords, target


def random_pixels(images, K, generator=None):
    """K random pixel centres per image and their colours: coords (B, K, 2), target (B, K, C)."""
    B, C, H, W = images.shape
    return random_samples(images, inr.coord_grid(H, W, images.device).reshape(H * W, 2), K, generator)


def query_chunked(vae, fields, coords, chunk=2 ** 18):
    """omega at many coordinates, about `chunk` queries (over all items) at a time: coords (B, N, D) -> (B, N, out).

    A 1024x1024 picture or a 128^3 grid is a million queries per item, and an evaluation batch
    holds dozens of items; in chunks, the read-out's activations of only one chunk exist at a
    time, whatever the batch.
    """
    step = max(1, chunk // coords.shape[0])  # coordinates per item in a chunk
    return torch.cat([vae.query(fields, coords[:, i:i + step]) for i in range(0, coords.shape[1], step)], 1)


def render(vae, fields, height, width, chunk=2 ** 18):
    """Evaluate the INR on the pixel-centre grid of any size: (B, out, H, W)."""
    B = fields[0].shape[0]
    c = inr.coord_grid(height, width, fields[0].device).reshape(1, -1, 2).expand(B, -1, -1)  # (B, HW, 2)
    return query_chunked(vae, fields, c, chunk).reshape(B, height, width, -1).permute(0, 3, 1, 2)


def fit(vae, images, steps, K=256, batch=16, lr=1e-3, lambda_z=1e-3, log_every=0):
    """Stage 1 in its plainest form (the demos' loop): Adam on the ELBO, random images and pixels."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,))]  # (batch, C, H, W)
        coords, target = random_pixels(x, K)
        terms = elbo_loss(vae, x, coords, target, kl_weight(step, steps, lambda_z), num_values=x[0].numel())
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  recon {terms['recon']:.4f}  kl/D_x {terms['kl']:.4f}")
    return vae


# ----------------------------------------------------------------------------------------
# Demo: a D2C-VAE with one basis field on synthetic 32x32 images
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    import figures

    torch.manual_seed(0)
    R, K, Z, steps = 32, 256, 4, 400
    train = inr.synthetic_images(inr.synthetic_params(2000, seed=0), R, R)  # (2000, 3, R, R), file 01
    val = inr.synthetic_images(inr.synthetic_params(64, seed=1), R, R)  # unseen images
    vae = D2CVAE(ConvEncoder(3, Z), BasisFieldDecoder(Z, field_ch=16), ConcatReadout([16], 64, 3))
    t0 = time.time()
    fit(vae, train, steps, K, log_every=100)
    with torch.no_grad():
        rec = render(vae, vae.decode(vae.encode(val).mean), R, R)  # posterior mean, full grid
    print(f"validation PSNR after {steps} steps ({time.time() - t0:.0f} s): {inr.psnr(rec, val):.2f} dB")
    figures.write_sheet([val[:8], rec[:8].clamp(-1, 1)], "out/02_d2c_vae.png", ["unseen", "reconstructed"],
                        "unseen images and their D2C-VAE reconstructions (one basis field)")
    print("wrote out/02_d2c_vae.png")
