"""05 - Modalities: what changes from one kind of signal to another (images, shapes, videos, NeRF).

The concept
-----------
DDMI is domain-agnostic (Park et al. ICLR 2024, Sec. 3): the VAE of 02, the basis
fields and read-out of 03 and the diffusion model of 04 never look at what the signal
means. What does change per modality is small, and this file holds all of it, one
record per modality:

  * how a data item is encoded (which encoder, what input it sees),
  * how many latent planes there are and how basis fields are looked up
    (one plane: bilinear; three planes: tri-plane, file 01),
  * the likelihood of the re-weighted ELBO (L1 for images, Bernoulli for occupancy),
  * how query coordinates and their targets are drawn from a batch,
  * how a decoded signal is rendered at any resolution and written to disk,
  * which data it reads (a built-in synthetic generator, or the user's files).

The drivers (train.py, sample.py) only talk to a record from MODALITIES. The file has four
parts, each with its own introduction: images (one latent plane, below), shapes (a
tri-plane latent), videos (a tri-plane over x, y, t) and NeRF scenes (a tri-plane radiance
field seen through photographs). File 06 turns decoded shapes into meshes, pictures and
the numbers of 3D generative-model papers; file 07 turns radiance fields into pictures.

The image modality
------------------
An image is a function [-1, 1]^2 -> RGB in [-1, 1]. The latent z is one plane
(z_ch, R/4, R/4); the decoder produces three basis fields at R/4, R/2 and R (HDBF, file 03)
and the CFC read-out maps their bilinear embeddings to RGB. Training draws K random pixel
centres per image (their exact colours are the targets); rendering evaluates the INR on
the pixel-centre grid of any resolution.

The synthetic images
--------------------
Each synthetic image is defined analytically: a background with a linear colour ramp and
a few overlapping primitives (discs, rotated squares or rings: the class label) with
slightly soft edges. Because it is a formula of (x, y), we can render it at any resolution
and so measure how well a model trained at 32x32 does at 128x128. It is the embedded
default dataset (no download) and the test data.

Shape letters: B batch, N coordinates, K coordinates per item in training, S shapes per
synthetic image, C channels, H W height width, R resolution.

Left out on purpose: LPIPS in the image likelihood (the paper adds it; it needs downloaded
VGG weights) and data augmentation (flips), which a user can add to `ImageModality.load`.
"""
import importlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

inr = importlib.import_module("01_inr")


# ----------------------------------------------------------------------------------------
# Synthetic images, defined analytically
# ----------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("discs", "squares", "rings")
EDGE = 0.015  # softness of the primitives' edges, in coordinate units (a 32 px pixel is 0.0625)


def synthetic_params(n, seed=0, num_shapes=4):
    """Random parameters of n synthetic images (a dict of tensors), reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # uniform in [0, 1)
    return {
        "label": torch.randint(len(SYNTHETIC_CLASSES), (n,), generator=g),  # (n,) which primitive
        "bg": u(n, 2, 3) * 2 - 1,  # (n, 2, 3) background colours at the two ends of the ramp
        "bg_dir": u(n) * 2 * torch.pi,  # (n,) direction of the ramp
        "centre": u(n, num_shapes, 2) * 1.3 - 0.65,  # (n, S, 2)
        "size": u(n, num_shapes) * 0.3 + 0.15,  # (n, S) radius / half-side
        "angle": u(n, num_shapes) * torch.pi / 2,  # (n, S) rotation of squares
        "colour": u(n, num_shapes, 3) * 2 - 1,  # (n, S, 3)
    }


def synthetic_render(params, coords):
    """Exact colours of the synthetic images at coordinates: (n, N, 2) -> (n, N, 3) in [-1, 1].

    Coordinates (x, y, t) (n, N, 3) render the synthetic videos of the video modality: each
    primitive then sits at centre + velocity * t (params["velocity"]); the background stays.
    """
    label = params["label"][:, None]  # (n, 1)
    xy = coords[..., :2]  # (n, N, 2)
    # Background: colour ramp bg0 -> bg1 along direction d, t = (<c, d> + 1) / 2 clipped to [0, 1].
    d = torch.stack([torch.cos(params["bg_dir"]), torch.sin(params["bg_dir"])], -1)  # (n, 2)
    t = (((xy * d[:, None]).sum(-1) + 1) / 2).clamp(0, 1)[..., None]  # (n, N, 1)
    img = params["bg"][:, None, 0] * (1 - t) + params["bg"][:, None, 1] * t  # (n, N, 3)
    # Primitives painted back to front; each one is a signed distance function (< 0 inside).
    for s in range(params["centre"].shape[1]):
        rel = xy - params["centre"][:, None, s]  # (n, N, 2) position relative to the centre
        if coords.shape[-1] == 3:  # a video: the centre moves, centre(t) = centre + velocity t
            rel = rel - params["velocity"][:, None, s] * coords[..., 2:]
        r = params["size"][:, None, s]  # (n, 1)
        dist = rel.norm(dim=-1)  # (n, N)
        # rotate into the square's frame: (u, v) = R(-angle) rel
        ca, sa = torch.cos(params["angle"][:, None, s]), torch.sin(params["angle"][:, None, s])
        u_, v_ = ca * rel[..., 0] + sa * rel[..., 1], -sa * rel[..., 0] + ca * rel[..., 1]
        sdf_disc = dist - r
        sdf_square = torch.maximum(u_.abs(), v_.abs()) - 0.85 * r
        sdf_ring = (dist - r).abs() - 0.3 * r
        sdf = torch.where(label == 0, sdf_disc, torch.where(label == 1, sdf_square, sdf_ring))
        # coverage alpha = sigmoid(-sdf / EDGE): 1 inside, 0 outside, a soft edge between
        alpha = torch.sigmoid(-sdf / EDGE)[..., None]  # (n, N, 1)
        img = img * (1 - alpha) + params["colour"][:, None, s] * alpha
    return img


def synthetic_images(params, height, width):
    """Render synthetic images on the pixel-centre grid of any size: (n, 3, H, W)."""
    n = params["label"].shape[0]
    c = inr.coord_grid(height, width).reshape(1, -1, 2).expand(n, -1, -1)  # (n, HW, 2)
    return synthetic_render(params, c).reshape(n, height, width, 3).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------
# Reading a folder of images
# ----------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_images(folder, flag="--data"):
    """Every png/jpg file under `folder` (searched recursively), sorted, so the order is stable."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{flag} {folder}: not a folder or an .npz file (expected .png/.jpg images or an image array)")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                   for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SystemExit(f"{flag} {folder}: no .png/.jpg images found (searched sub-folders too)")
    return paths


def read_image(path, resolution):
    """One image file -> uint8 tensor (3, R, R): centre-cropped to a square, resized to R.

    Greyscale is repeated to RGB, an alpha channel is dropped, 8- and 16-bit files both work.
    """
    import matplotlib.image

    try:
        a = matplotlib.image.imread(path)  # (H, W), (H, W, 3) or (H, W, 4); float in [0, 1] or uint8
    except Exception as e:  # a truncated or non-image file: name it
        raise SystemExit(f"{path}: cannot read this image ({type(e).__name__}: {e})")
    a = a[..., None] if a.ndim == 2 else a  # greyscale: add the channel axis
    return square_uint8(torch.from_numpy(to_unit_rgb(a))[None], resolution)[0]


def to_unit_rgb(a):
    """numpy (..., H, W, C) with C = 1, 3 or 4, uint8 or float in [0, 1] -> float32 (..., 3, H, W)."""
    import numpy as np

    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    a = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=-1)  # RGB; alpha dropped
    return np.ascontiguousarray(np.moveaxis(a, -1, -3))


def square_uint8(x, resolution):
    """(B, 3, H, W) float in [0, 1] -> (B, 3, R, R) uint8: centre crop to the largest square, resize."""
    H, W = x.shape[-2:]
    s = min(H, W)
    x = x[..., (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    # antialias=True: a proper low-pass when shrinking, so no aliasing in the training data
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                        align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def read_npz_images(path, resolution, flag="--data"):
    """An .npz holding one image array (key 'images', or its only array) -> uint8 (n, 3, R, R).

    The array is (n, H, W) greyscale or (n, H, W, C) with C = 1, 3 or 4; uint8, or float in
    [0, 1]. Loaded with allow_pickle=False: an .npz cannot run code.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise SystemExit(f"{flag} {path}: expected an array named 'images' (or a single array); "
                                 f"found {', '.join(keys) or 'none'}")
            a = f[key]
    except Exception as e:  # not an .npz, truncated, or pickled objects inside
        raise SystemExit(f"{flag} {path}: cannot read this .npz ({type(e).__name__}: {e})")
    shape_ok = a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3, 4))
    kind_ok = a.dtype == np.uint8 or (a.dtype.kind == "f" and a.size and 0 <= a.min() and a.max() <= 1)
    if not (shape_ok and kind_ok and len(a) > 0):
        raise SystemExit(f"{flag} {path}: array '{key}' is {a.dtype} {a.shape}; expected (n, H, W) or "
                         f"(n, H, W, C) with C = 1, 3 or 4, uint8 or float in [0, 1]")
    a = a[..., None] if a.ndim == 3 else a  # (n, H, W, C)
    # in chunks, so a large uint8 array is never converted to float all at once
    return torch.cat([square_uint8(torch.from_numpy(to_unit_rgb(a[i:i + 256])), resolution)
                      for i in range(0, len(a), 256)])


def read_images(path, resolution, flag="--data"):
    """A folder of image files, or an .npz holding an image array -> uint8 (n, 3, R, R)."""
    if path.lower().endswith(".npz") and os.path.isfile(path):
        return read_npz_images(path, resolution, flag)
    return torch.stack([read_image(p, resolution) for p in find_images(path, flag)])


# ----------------------------------------------------------------------------------------
# The image modality record
# ----------------------------------------------------------------------------------------
class ImageModality:
    """Everything train.py and sample.py need to know about images.

    Data items are (3, R, R) tensors; they are stored as uint8 (folders) or float
    (synthetic) and `to_signal` maps a batch to float in [-1, 1].
    """

    name = "image"
    # Model and training sizes per preset (plain dicts, applied on top of train.py's Config).
    # tiny: a 2-core CPU trains the whole pipeline at 32x32 in about eight minutes. Its sheets
    # use ancestral DDPM sampling: after minutes of training the noise prediction at large t
    # is a few percent off, which deterministic DDIM (eta = 0) amplifies into blotches, while
    # the fresh noise of each DDPM step corrects it (measured on faces: README).
    # paper: the published image model (CelebA-HQ 256): latent 64 ch at R/4 and basis
    # fields of 64 channels at R/4, R/2, R (DESIGN.md section 2); lambda_z = 0.5, but on a
    # sum-scaled loss, which is exactly what our mean-recon + lambda_z * KL / D_x computes.
    presets = {
        "tiny": dict(resolution=32, batch_size=16, coords_per_item=256, z_ch=4, enc_ch=32, enc_mult=(1, 2, 2),
                     field_ch=16, mlp_hidden=64, mlp_layers=4, lambda_z=1e-3, vae_steps=3000, vae_lr=1e-3,
                     ldm_ch=48, ldm_mult=(1, 2), ldm_attn=(1,), ldm_steps=4000, ldm_batch=32, ldm_lr=2e-4,
                     ema_decay=0.999, sampler="ddpm", sample_steps=100, prediction="eps"),
        "paper": dict(resolution=256, batch_size=16, coords_per_item=0, z_ch=64, enc_ch=64, enc_mult=(1, 2, 4),
                      field_ch=64, mlp_hidden=256, mlp_layers=5, lambda_z=0.5, vae_steps=500_000, vae_lr=1e-4,
                      ldm_ch=128, ldm_mult=(1, 2, 2, 4), ldm_attn=(2, 3), ldm_steps=500_000, ldm_batch=64,
                      ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim", sample_steps=50, prediction="eps"),
    }
    synthetic_train, synthetic_val = 5000, 256  # sizes of the built-in dataset

    # -- data ------------------------------------------------------------------------------
    def load(self, data, resolution, val_fraction=0.1, seed=0, frames=None):
        """-> (train, val, num_classes); train/val are dicts {"x": (n, 3, R, R), "label": (n,) or None}.

        (frames: the clip length, used by the video modality only.)
        """
        if data is None:  # the built-in synthetic images, with their class labels
            tr = synthetic_params(self.synthetic_train, seed=seed)
            va = synthetic_params(self.synthetic_val, seed=seed + 1_000_003)
            return ({"x": synthetic_images(tr, resolution, resolution), "label": tr["label"]},
                    {"x": synthetic_images(va, resolution, resolution), "label": va["label"], "params": va},
                    len(SYNTHETIC_CLASSES))
        x = read_images(data, resolution)  # (n, 3, R, R) uint8
        n_val = max(1, round(len(x) * val_fraction))
        if len(x) - n_val < 1:
            raise SystemExit(f"--data {data}: {len(x)} image(s) found; need at least 2 (training + validation)")
        # a fixed random split, the same for every run with this seed
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return {"x": x[perm[n_val:]], "label": None}, {"x": x[perm[:n_val]], "label": None}, 0

    @staticmethod
    def to_signal(x):
        """A stored batch -> float in [-1, 1], (B, 3, R, R)."""
        return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x

    # -- model -----------------------------------------------------------------------------
    def build_vae(self, cfg):
        """The D2C-VAE for images: conv encoder -> one latent plane -> basis fields -> read-out."""
        V, H = importlib.import_module("02_d2c_vae"), importlib.import_module("03_hdbf_cfc")
        decoder, readout = H.build_decoder_readout(cfg["variant"], cfg["z_ch"], cfg["field_ch"], 3, cfg["enc_ch"],
                                                   tuple(cfg["enc_mult"]), cfg["mlp_hidden"], cfg["mlp_layers"])
        encoder = V.ConvEncoder(3, cfg["z_ch"], cfg["enc_ch"], tuple(cfg["enc_mult"]))
        if cfg.get("decoder", "ddmi") != "ddmi":  # file 08: the same encoder, a decoder that generates SIREN weights
            W = importlib.import_module("08_weight_generation")
            return W.build_vae(cfg["decoder"], encoder, self.latent_shape(cfg), 3, cfg["mlp_hidden"], cfg["mlp_layers"],
                               cfg.get("bases") or 16)
        return V.D2CVAE(encoder, decoder, readout, inr.bilinear_lookup)

    def latent_shape(self, cfg):
        """(C, H, W) of the latent the diffusion model sees."""
        r = cfg["resolution"] // 2 ** (len(cfg["enc_mult"]) - 1)
        return (cfg["z_ch"], r, r)

    def unstack_planes(self, z):
        """The latent as the diffusion model holds it -> as the VAE decodes it (one plane: the same)."""
        return z

    # -- the ELBO's pieces -----------------------------------------------------------------
    def queries(self, x, K, generator=None):
        """K random pixel centres per image and their colours (K = 0: every pixel)."""
        V = importlib.import_module("02_d2c_vae")
        if K <= 0:
            B, C, H, W = x.shape
            coords = inr.coord_grid(H, W, x.device).reshape(1, H * W, 2).expand(B, -1, -1)
            return coords, x.flatten(2).transpose(1, 2)  # (B, HW, 2), (B, HW, 3)
        return V.random_pixels(x, K, generator)

    def training_batch(self, data, idx, K, generator, device):
        """Items idx of a dataset -> (encoder input x, coords (B, K, 2), target (B, K, 3))."""
        x = self.to_signal(data["x"][idx].to(device, non_blocking=True))
        return (x, *self.queries(x, K, generator))

    @staticmethod
    def values_per_item(cfg):
        """D_x of the ELBO's scaling (file 02): colour values per image."""
        return 3 * cfg["resolution"] ** 2

    @staticmethod
    def recon(pred, target):
        """Laplace likelihood: -log p is the L1 error (mean per item)."""
        return (pred - target).abs().flatten(1).mean(1)

    # -- outputs ---------------------------------------------------------------------------
    def render(self, vae, fields, resolution):
        """The decoded INRs on a resolution x resolution pixel grid: (B, 3, R, R) in [-1, 1]."""
        V = importlib.import_module("02_d2c_vae")
        return V.render(vae, fields, resolution, resolution).clamp(-1, 1)

    @staticmethod
    def default_resolution(cfg):
        """sample.py's --resolution when none is given: the training resolution."""
        return cfg["resolution"]

    def preview(self, vae, fields, cfg):
        """What a sample sheet shows of decoded INRs: the images at the training resolution."""
        return self.render(vae, fields, cfg["resolution"])

    def evaluate(self, vae, val, cfg, device):
        """Validation PSNR at the training resolution, from the posterior mean -> (scores, sheet rows, names)."""
        scores, rec = [], []
        for i in range(0, len(val["x"]), 64):
            x = self.to_signal(val["x"][i:i + 64].to(device))
            r = self.render(vae, vae.decode(vae.encode(x).mean), cfg["resolution"])
            scores.append(inr.psnr(r, x) * len(x))
            rec.append(r.cpu())
        return ({"psnr": sum(scores) / len(val["x"])}, [self.to_signal(val["x"][:8]), torch.cat(rec)[:8]],
                ["held out", "reconstructed"])

    @staticmethod
    def describe(scores):
        return f"validation PSNR {scores['psnr']:.2f} dB"

    def sample_outputs(self, vae, fields, cfg, resolutions, out):
        """sample.py: the sampled INRs rendered at every resolution -> sheet rows and names."""
        return [self.render(vae, fields, R).cpu() for R in resolutions], [f"{R}x{R}" for R in resolutions]

    def reconstruct(self, vae, cfg, source, resolutions, n, device):
        """sample.py --reconstruct: encode the images of `source` at the training resolution,
        render the INRs at every resolution, print PSNRs -> sheet rows and names.

        `source` is a folder, an .npz, or "synthetic" (the built-in images, exact at every R).
        The baseline printed beside each PSNR: bicubic upsampling of the reconstruction at the
        training resolution.
        """
        R0 = cfg["resolution"]
        if source == "synthetic":
            _, val, _ = self.load(None, R0, seed=cfg["seed"])
            params = {k: v[:n] for k, v in val["params"].items()}
            x_in = val["x"][:n]  # the encoder sees the training resolution
            truth = {R: synthetic_images(params, R, R) for R in resolutions}  # exact, at every R
        else:
            x_in = read_images(source, R0, flag="--reconstruct")  # a folder or an .npz
            truth = {R: self.to_signal(read_images(source, R, flag="--reconstruct")) for R in resolutions}
        rows, names = [], []
        for R in resolutions:
            recs, bicubic = [], []
            for i in range(0, len(x_in), 32):
                x = self.to_signal(x_in[i:i + 32].to(device))
                fields = vae.decode(vae.encode(x).mean)
                recs.append(self.render(vae, fields, R).cpu())
                bicubic.append(torch.nn.functional.interpolate(self.render(vae, fields, R0), size=(R, R), mode="bicubic",
                                                               align_corners=False).clamp(-1, 1).cpu())
            rec, bic = torch.cat(recs), torch.cat(bicubic)
            line = f"resolution {R}: mean PSNR {inr.psnr(rec, truth[R]):.2f} dB over {len(rec)} items"
            if R != R0:
                line += f" (bicubic upsampling of the {R0}x{R0} reconstruction: {inr.psnr(bic, truth[R]):.2f} dB)"
            print(line)
            rows += [truth[R][:8], rec[:8]]
            names += [f"data {R}", f"INR {R}"]
        return rows, names

    @staticmethod
    def write_sheet(rows, path, row_names=None, title=None):
        """Save rows of images (each a (n, 3, R_row, R_row) tensor in [-1, 1]) as one PNG.

        Rows of lower resolution are enlarged with nearest-neighbour copies so that every
        pixel stays visible as it was produced.
        """
        size = max(r.shape[-1] for r in rows)
        fig, axes = sheet_axes(len(rows), max(r.shape[0] for r in rows), row_names, title)
        for i, row in enumerate(rows):
            big = torch.nn.functional.interpolate(row.float().cpu(), size=(size, size), mode="nearest")
            for k in range(len(big)):
                axes[i, k].imshow(((big[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)


def sheet_axes(n_rows, n_cols, row_names=None, title=None):
    """A matplotlib figure with a grid of bare picture cells (no ticks, no frame), rows named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.6, 1.3 * n_rows + 0.4), squeeze=False)
    plt.close(fig)  # pyplot forgets it (no figure piles up); the caller still draws into and saves it
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for i, name in enumerate(row_names or []):
        axes[i, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes


# ========================================================================================
# The shape modality: occupancy functions on [-1, 1]^3 (paper Sec. 4.2)
# ========================================================================================
# A shape is the function o: [-1, 1]^3 -> {0, 1} (1 inside). Its latent is a tri-plane:
# three planes (xy, xz, yz; file 01's TRIPLANE_AXES) of Z channels each, (B, 3, Z, h, h).
# Nothing of files 02-04 is copied for it:
#   * the encoder turns a surface point cloud into three feature planes (PointNet with
#     local pooling, below) and then runs file 02's ConvEncoder on them, the planes folded
#     into the batch so one set of conv weights serves all three;
#   * D2CVAE.decode (file 02) folds the planes the same way through file 03's HDBF decoder:
#     every plane gets basis fields at three scales;
#   * the lookup is file 01's triplane_lookup with the three planes' embeddings SUMMED,
#     and file 03's CFC read-out maps the three scales' embeddings to one logit;
#   * the likelihood is Bernoulli: -log p = BCE(logit, occupancy) at the query points;
#   * for stage 2 the three planes are stacked on channels, (B, 3Z, h, h), and file 04's
#     UNet models them like any image latent.
# Queries mix uniform points of the cube (the coarse layout) with points near the surface
# (where the occupancy changes, and where a uniform sample would spend few points).
# Mesh extraction, the ray-marched previews and the point-cloud metrics live in file 06.
SHAPE_CLASSES = ("spheres", "boxes", "tori")
SHAPE_EVAL_RES = 64  # IoU, meshes and D_x are measured on the 64^3 voxel-centre grid
NEAR_SURFACE_STD = 0.03  # std of the near-surface query points around the surface, coordinate units
PREVIEW_FOV = 40.0  # field of view of the previews, degrees: the shapes of [-0.95, 0.95]^3 fill the picture


def voxel_grid(R, device=None):
    """Voxel-centre coordinates of an R^3 grid, (R, R, R, 3); [i, j, k] is (x_i, y_j, z_k)."""
    c = inr.pixel_centers(R, device)  # (R,)
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)


# ----------------------------------------------------------------------------------------
# Synthetic shapes: unions of two or three primitives of one kind, defined analytically
# ----------------------------------------------------------------------------------------
def synthetic_shape_params(n, seed=0, num_parts=3):
    """Random parameters of n synthetic shapes (a dict of tensors), reproducible from seed.

    Each shape is a union of 2 or 3 parts of its class: spheres (radius), axis-aligned boxes
    (three half-sides) or tori (major and minor radius, axis along x, y or z).
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # uniform in [0, 1)
    label = torch.randint(len(SHAPE_CLASSES), (n,), generator=g)  # (n,)
    size = u(n, num_parts, 3)  # (n, S, 3), turned into each class's dimensions below
    lab = label[:, None, None]
    dims = torch.where(lab == 0, 0.2 + 0.25 * size,  # sphere: radius in [0.2, 0.45] (entry 0)
                       torch.where(lab == 1, 0.12 + 0.28 * size,  # box: half-sides in [0.12, 0.4]
                                   0.2 + 0.15 * size))  # torus: major radius in [0.2, 0.35] (entry 0)
    dims[..., 1] = torch.where(label[:, None] == 2, 0.07 + 0.05 * size[..., 1], dims[..., 1])  # torus minor r
    present = torch.ones(n, num_parts, dtype=torch.bool)
    present[:, 2:] = u(n, num_parts - 2) < 0.5  # the third part exists in half of the shapes
    return {"label": label, "dims": dims, "present": present,
            "centre": u(n, num_parts, 3) * 0.9 - 0.45,  # (n, S, 3): every part stays inside [-0.95, 0.95]^3
            "axis": torch.randint(3, (n, num_parts), generator=g)}  # (n, S) torus axis: x, y or z


# the coordinates of a point seen from a torus with its axis along x, y or z: (in-plane, in-plane, axis)
_TORUS_FRAME = torch.tensor([[1, 2, 0], [0, 2, 1], [0, 1, 2]])


def part_sdf(params, s, p):
    """Signed distance (< 0 inside) of part s of every shape: p (n, N, 3) -> (n, N)."""
    rel = p - params["centre"][:, None, s]  # (n, N, 3) position relative to the part's centre
    d = params["dims"][:, None, s]  # (n, 1, 3)
    # sphere: |rel| - r
    sphere = rel.norm(dim=-1) - d[..., 0]
    # box: with q = |rel| - h, the distance is |max(q, 0)| outside plus max_i q_i (< 0) inside
    q = rel.abs() - d
    box = q.clamp(min=0).norm(dim=-1) + q.max(-1).values.clamp(max=0)
    # torus: (sqrt(a^2 + b^2) - R_major, w) is the position in the tube's cross-section
    abw = rel.gather(-1, _TORUS_FRAME[params["axis"][:, s]][:, None].expand(-1, p.shape[1], -1))  # (n, N, 3)
    tube = torch.stack([abw[..., :2].norm(dim=-1) - d[..., 0], abw[..., 2]], -1)  # (n, N, 2)
    torus = tube.norm(dim=-1) - d[..., 1]
    label = params["label"][:, None]
    sdf = torch.where(label == 0, sphere, torch.where(label == 1, box, torus))
    return torch.where(params["present"][:, None, s], sdf, torch.inf)  # an absent part is nowhere


def synthetic_occupancy(params, p):
    """Exact occupancy of the union: p (n, N, 3) -> (n, N) bool (inside any part)."""
    return torch.stack([part_sdf(params, s, p) for s in range(params["centre"].shape[1])]).amin(0) < 0


def synthetic_surface(params, num_points, generator=None):
    """num_points points uniformly on the surface of each union, (n, P, 3).

    Each part gets 4P candidate points spread uniformly over its own surface; a candidate
    inside another part is not on the union's surface and is dropped (weight 0); the P
    points are drawn from the rest with probability proportional to each part's area.
    """
    n, S = params["label"].shape[0], params["centre"].shape[1]
    M = 4 * num_points  # candidates per part
    rnd = lambda *shape: torch.rand(*shape, generator=generator)
    cands, weights = [], []
    for s in range(S):
        d = params["dims"][:, s][:, None]  # (n, 1, 3)
        # sphere: r * a normalised Gaussian vector is uniform on the sphere; area 4 pi r^2
        g = torch.randn(n, M, 3, generator=generator)
        sphere, a_sphere = d[..., :1] * g / g.norm(dim=-1, keepdim=True), 4 * torch.pi * d[..., 0] ** 2
        # box: choose a face pair with probability ~ its area (4 h_b h_c), a side, a uniform point on it
        h = d.expand(n, M, 3)
        face_area = torch.stack([d[:, 0, 1] * d[:, 0, 2], d[:, 0, 0] * d[:, 0, 2], d[:, 0, 0] * d[:, 0, 1]], -1)  # (n, 3)
        axis = torch.multinomial(face_area, M, replacement=True, generator=generator)  # (n, M)
        box = (2 * rnd(n, M, 3) - 1) * h
        side = torch.where(rnd(n, M) < 0.5, -1.0, 1.0)
        box = box.scatter(-1, axis[..., None], (side * h.gather(-1, axis[..., None])[..., 0])[..., None])
        a_box = 8 * face_area.sum(-1, keepdim=True)  # (n, 1)
        # torus: angles u (around the axis) and v (around the tube) uniform; a patch at v has
        # area ~ (R + r cos v), so each candidate is weighted by (R + r cos v) / R (mean 1)
        u_, v_ = 2 * torch.pi * rnd(n, M), 2 * torch.pi * rnd(n, M)
        Rm, r = d[..., 0], d[..., 1]  # (n, 1) each
        ring = torch.stack([(Rm + r * torch.cos(v_)) * torch.cos(u_), (Rm + r * torch.cos(v_)) * torch.sin(u_),
                            r * torch.sin(v_)], -1)  # (n, M, 3) in the frame (a, b, axis)
        inverse = torch.argsort(_TORUS_FRAME[params["axis"][:, s]], dim=-1)  # back to (x, y, z)
        ring = ring.gather(-1, inverse[:, None].expand(-1, M, -1))
        a_ring = 4 * torch.pi ** 2 * Rm * r * (Rm + r * torch.cos(v_)) / Rm
        label = params["label"][:, None]
        rel = torch.where(label[..., None] == 0, sphere, torch.where(label[..., None] == 1, box, ring))
        area = torch.where(label == 0, a_sphere, torch.where(label == 1, a_box, a_ring)).expand(n, M)
        cands.append(rel + params["centre"][:, s][:, None])
        weights.append(area * params["present"][:, s][:, None])
    cands, weights = torch.cat(cands, 1), torch.cat(weights, 1)  # (n, S*M, 3), (n, S*M)
    # keep a candidate only if no OTHER part contains it (its own sdf is 0 up to rounding)
    owner = torch.arange(S).repeat_interleave(M)  # (S*M,) which part each candidate lies on
    for s in range(S):
        inside_s = part_sdf(params, s, cands) < 0  # (n, S*M)
        weights = weights * ~(inside_s & (owner != s))
    pick = torch.multinomial(weights, num_points, replacement=True, generator=generator)  # (n, P)
    return cands.gather(1, pick[..., None].expand(-1, -1, 3))


def query_points(surface, num_points, generator=None):
    """num_points query points per shape, (n, Q, 3): half uniform in the cube, half near the surface."""
    n, P, _ = surface.shape
    half = num_points // 2
    uniform = torch.rand(n, num_points - half, 3, generator=generator) * 2 - 1
    near = surface.gather(1, torch.randint(P, (n, half, 1), generator=generator).expand(-1, -1, 3))
    near = near + NEAR_SURFACE_STD * torch.randn(n, half, 3, generator=generator)
    return torch.cat([uniform, near.clamp(-1, 1)], 1)


def synthetic_shapes(params, num_surface, num_queries, grid_res=0, seed=0):
    """The data items of synthetic shapes: surface points, labelled query points, optional exact grid."""
    g = torch.Generator().manual_seed(seed)
    items = {"x": [], "points": [], "occ": [], "grid": []}
    for i in range(0, len(params["label"]), 128):  # in chunks: the candidates of 128 shapes fit in memory
        p = {k: v[i:i + 128] for k, v in params.items()}
        surface = synthetic_surface(p, num_surface, g)
        points = query_points(surface, num_queries, g)
        items["x"].append(surface)
        items["points"].append(points)
        items["occ"].append(synthetic_occupancy(p, points))
        if grid_res:
            c = voxel_grid(grid_res).reshape(1, -1, 3).expand(len(p["label"]), -1, -1)
            items["grid"].append(synthetic_occupancy(p, c).reshape(-1, grid_res, grid_res, grid_res))
    out = {k: torch.cat(v) for k, v in items.items() if v}
    out["label"] = params["label"]
    return out


# ----------------------------------------------------------------------------------------
# Reading shape data: an .npz of occupancy grids + surface points, or the ConvONet layout
# ----------------------------------------------------------------------------------------
def grid_occupancy(grid, p):
    """Occupancy of voxel grids at any points, by the voxel containing each point.

    grid (n, R, R, R) bool over [-1, 1]^3 (voxel centres as in voxel_grid); p (n, N, 3) -> (n, N).
    """
    n, R = grid.shape[0], grid.shape[-1]
    # the voxel holding coordinate c is floor((c + 1) / 2 * R)
    ijk = ((p + 1) / 2 * R).floor().long().clamp(0, R - 1)  # (n, N, 3)
    flat = (ijk[..., 0] * R + ijk[..., 1]) * R + ijk[..., 2]  # (n, N)
    return grid.reshape(n, -1).gather(1, flat)


def grid_field(grid):
    """Voxel grids as a smooth occupancy function for the previews: points (n, N, 3) -> logits (n, N).

    Trilinear interpolation of the 0/1 voxels minus 1/2 (positive inside); F.grid_sample
    wants (n, 1, D, H, W) with x along W, so the (x, y, z) grid is permuted to (z, y, x).
    """
    vol = grid.float().permute(0, 3, 2, 1)[:, None]  # (n, 1, R_z, R_y, R_x)
    return lambda p: F.grid_sample(vol.to(p.device), p[:, :, None, None], mode="bilinear", padding_mode="zeros",
                                   align_corners=False)[:, 0, :, 0, 0] - 0.5


def read_shape_npz(path, num_surface, num_queries, seed=0, flag="--data"):
    """An .npz like ../shared/data/meshes21_occ64_pts8k.npz -> shape items in [-1, 1]^3.

    Arrays: `surface_points` (n, P, 3) and either `occ_packed` (n, R^3 / 8, np.packbits of a
    bool (R, R, R) grid, with `res` = R) or `occupancy` (n, R, R, R). Grid axes x, y, z, voxel
    centres tiling the cube [-0.5, 0.5]^3 (the Occupancy Networks unit cube), which we scale
    by 2 onto our [-1, 1]^3. Query labels come from the grid (the voxel holding each point).
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.keys()}
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this .npz ({type(e).__name__}: {e})")
    surface = arrays.get("surface_points")
    if surface is None or surface.ndim != 3 or surface.shape[-1] != 3 or not len(surface):
        raise SystemExit(f"{flag} {path}: expected 'surface_points' shaped (n, P, 3); "
                         f"found {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    n = len(surface)
    if "occupancy" in arrays:
        grid = arrays["occupancy"].astype(bool)
    elif "occ_packed" in arrays and "res" in arrays:
        R = int(arrays["res"])
        if arrays["occ_packed"].shape != (n, R ** 3 // 8):
            raise SystemExit(f"{flag} {path}: 'occ_packed' is {arrays['occ_packed'].shape}; expected ({n}, {R ** 3 // 8})")
        grid = np.unpackbits(arrays["occ_packed"], axis=1).reshape(n, R, R, R).astype(bool)
    else:
        raise SystemExit(f"{flag} {path}: expected an occupancy grid ('occ_packed' + 'res', or 'occupancy')")
    if grid.ndim != 4 or grid.shape[0] != n or len(set(grid.shape[1:])) != 1:
        raise SystemExit(f"{flag} {path}: occupancy grid is {grid.shape}; expected ({n}, R, R, R)")
    g = torch.Generator().manual_seed(seed)
    surface = torch.from_numpy(surface.astype(np.float32)) * 2  # [-0.5, 0.5]^3 -> [-1, 1]^3
    surface = surface[:, torch.randperm(surface.shape[1], generator=g)[:num_surface]]  # a random subset, in random order
    grid = torch.from_numpy(grid)
    points = query_points(surface, num_queries, g)
    names = [str(v) for v in arrays["names"]] if "names" in arrays and len(arrays["names"]) == n else None
    return {"x": surface, "points": points, "occ": grid_occupancy(grid, points), "grid": grid, "label": None,
            "names": names}


def convonet_classes(root, flag="--data"):
    """The class folders of a ConvONet root (or [root] when it is itself one class folder)."""
    if not os.path.isdir(root):
        raise SystemExit(f"{flag} {root}: not a folder or an .npz file")
    if any(os.path.isfile(os.path.join(root, d, "points.npz")) for d in os.listdir(root)):
        return [root]
    return sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def read_convonet(root, num_surface, num_queries, split=None, seed=0, flag="--data"):
    """The Occupancy Networks / ConvONet ShapeNet layout -> shape items in [-1, 1]^3.

    root/<class>/<id>/points.npz (`points` (N, 3) uniform in the padded cube [-0.55, 0.55]^3,
    `occupancies` np.packbits of N bools) and pointcloud.npz (`points` on the surface); the
    ids of a split are listed in root/<class>/<split>.lst (split None, or no list: every id).
    root may also be a single class folder. Coordinates are divided by 0.55 onto [-1, 1]^3.
    Each shape keeps num_surface surface and num_queries labelled points (a random subset),
    about 12 (P + Q) bytes per shape in memory.
    """
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    surfaces, points, occs = [], [], []
    for folder in convonet_classes(root, flag):
        lst = os.path.join(folder, f"{split}.lst")
        ids = open(lst).read().split() if split and os.path.isfile(lst) else sorted(os.listdir(folder))
        for shape_id in ids:
            d = os.path.join(folder, shape_id)
            if not os.path.isfile(os.path.join(d, "points.npz")):
                continue
            try:
                with np.load(os.path.join(d, "points.npz"), allow_pickle=False) as f:
                    pts, occ = f["points"].astype(np.float32), np.unpackbits(f["occupancies"])[:len(f["points"])]
                with np.load(os.path.join(d, "pointcloud.npz"), allow_pickle=False) as f:
                    cloud = f["points"].astype(np.float32)
            except Exception as e:
                raise SystemExit(f"{flag} {d}: cannot read points.npz/pointcloud.npz ({type(e).__name__}: {e})")
            i = torch.randint(len(pts), (num_queries,), generator=g)
            j = torch.randint(len(cloud), (num_surface,), generator=g)
            points.append(torch.from_numpy(pts)[i] / 0.55)
            occs.append(torch.from_numpy(occ.astype(bool))[i])
            surfaces.append(torch.from_numpy(cloud)[j] / 0.55)
    if not surfaces:
        raise SystemExit(f"{flag} {root}: no <class>/<id>/points.npz + pointcloud.npz found"
                         + (f" for split {split!r}" if split else ""))
    return {"x": torch.stack(surfaces), "points": torch.stack(points), "occ": torch.stack(occs), "label": None}


# ----------------------------------------------------------------------------------------
# The encoder: PointNet with local pooling onto the three planes, then file 02's convs
# ----------------------------------------------------------------------------------------
def plane_cells(p, res):
    """Index of the plane cell each point falls in, per plane: p (B, N, 3) -> (B, 3, N) in [0, res^2).

    Plane (a, b) of TRIPLANE_AXES has its width along axis a and its height along b, as in
    bilinear_lookup, so the cell is row * res + column = index_b * res + index_a.
    """
    ij = ((p + 1) / 2 * res).floor().long().clamp(0, res - 1)  # (B, N, 3) cell index along each axis
    return torch.stack([ij[..., b] * res + ij[..., a] for a, b in inr.TRIPLANE_AXES], 1)


def scatter_mean(feats, cell, num_cells):
    """Average the features of the points falling in each cell: (B, N, C), (B, N) -> (B, num_cells, C).

    Written with index_add_ on the flattened (batch, cell) index; an empty cell gets 0.
    """
    B, N, C = feats.shape
    flat = (cell + torch.arange(B, device=cell.device)[:, None] * num_cells).reshape(-1)  # (B N,) global cell
    # sum_c = sum of the features of the points in cell c; count_c = how many there are
    sums = feats.new_zeros(B * num_cells, C).index_add_(0, flat, feats.reshape(B * N, C))
    count = feats.new_zeros(B * num_cells).index_add_(0, flat, feats.new_ones(B * N))
    # mean_c = sum_c / max(count_c, 1)
    return (sums / count.clamp(min=1)[:, None]).reshape(B, num_cells, C)


class ResidualFC(nn.Module):
    """h -> W_2 ReLU(W_1 ReLU(h)) + W_s h: the per-point block of the PointNet."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, dim_out), nn.Linear(dim_out, dim_out)
        self.skip = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, h):
        return self.fc2(F.relu(self.fc1(F.relu(h)))) + self.skip(h)


class PointNetPlanes(nn.Module):
    """Surface points (B, N, 3) -> three feature planes (B, 3, C, res, res).

    A PointNet applies the same small MLP to every point. Alone, it sees each point in
    isolation; local pooling (ConvONet, Peng et al. 2020) lets points talk to their
    neighbours: after each block, the features are averaged over the points that fall in
    the same cell of each plane, and every point gets back the sum of its three cells'
    averages, concatenated to its own features. At the end the features are averaged
    into the cells once more: those averages are the planes.
    """

    def __init__(self, out_ch, hidden=32, res=32, num_blocks=3, point_dim=3):
        super().__init__()
        self.res = res
        # point_dim: 3 for (x, y, z); 6 for the coloured points (x, y, z, r, g, b) of the NeRF scenes
        self.fc_in = nn.Linear(point_dim, 2 * hidden)
        self.blocks = nn.ModuleList(ResidualFC(2 * hidden, hidden) for _ in range(num_blocks))
        self.fc_out = nn.Linear(hidden, out_ch)

    def forward(self, p):
        B, N, _ = p.shape
        cells = plane_cells(p[..., :3], self.res)  # (B, 3, N), from the positions
        h = self.fc_in(p)  # (B, N, 2 hidden)
        for i, block in enumerate(self.blocks):
            h = block(h)  # (B, N, hidden)
            if i < len(self.blocks) - 1:
                # local pooling: each point reads the mean feature of its cell on every plane
                pooled = sum(scatter_mean(h, cells[:, k], self.res ** 2).gather(
                    1, cells[:, k, :, None].expand(-1, -1, h.shape[-1])) for k in range(3))  # (B, N, hidden)
                h = torch.cat([h, pooled], -1)  # (B, N, 2 hidden)
        h = self.fc_out(h)  # (B, N, C)
        planes = [scatter_mean(h, cells[:, k], self.res ** 2) for k in range(3)]  # 3 x (B, res^2, C)
        # (B, res^2, C) -> (B, C, res, res): row-major cells, height = second axis of the plane
        return torch.stack([pl.transpose(1, 2).reshape(B, -1, self.res, self.res) for pl in planes], 1)


def exchange_planes(planes):
    """Let the three planes see each other: (B, 3, C, r, r) -> (B, 3, 3C, r, r).

    Each plane gets, beside its own features, the other two planes averaged along the axis
    it does not have and spread along the one it shares. For xy (height y, width x): xz
    averaged over z is a function of x, laid along xy's width; yz averaged over z is a
    function of y, laid along its height. Likewise for xz and yz. A point's three plane
    features then all know about its whole neighbourhood in 3D, not one 2D view of it.
    """
    xy, xz, yz = planes.unbind(1)  # (B, C, r, r) each; xy: (y, x), xz: (z, x), yz: (z, y)
    to_xy = [xz.mean(-2, keepdim=True), yz.mean(-2).unsqueeze(-1)]  # f(x) along width, f(y) along height
    to_xz = [xy.mean(-2, keepdim=True), yz.mean(-1, keepdim=True)]  # f(x) along width, f(z) along height
    to_yz = [xy.mean(-1).unsqueeze(-2), xz.mean(-1, keepdim=True)]  # f(y) along width, f(z) along height
    out = [torch.cat([own, *(t.expand_as(own) for t in others)], 1)
           for own, others in ((xy, to_xy), (xz, to_xz), (yz, to_yz))]
    return torch.stack(out, 1)


class ShapeEncoder(nn.Module):
    """Surface points (B, N, 3 or 6) -> posterior parameters of a tri-plane, (B, 3, 2Z, res / 2^(L-1), ...)."""

    def __init__(self, z_ch, ch=32, ch_mult=(1, 2, 2), res=32, point_hidden=32, point_dim=3):
        super().__init__()
        V = importlib.import_module("02_d2c_vae")
        self.pointnet = PointNetPlanes(ch, point_hidden, res, point_dim=point_dim)
        self.conv = V.ConvEncoder(3 * ch, z_ch, ch, ch_mult)  # one set of weights for all three planes

    def forward(self, p):
        planes = exchange_planes(self.pointnet(p))  # (B, 3, 3C, res, res)
        B = planes.shape[0]
        return self.conv(planes.flatten(0, 1)).unflatten(0, (B, 3))  # (B, 3, 2Z, h, h)


# ----------------------------------------------------------------------------------------
# The shape modality record
# ----------------------------------------------------------------------------------------
class ShapeModality:
    """Everything train.py and sample.py need to know about shapes.

    A data item is a dict entry per shape: "x" surface points (P, 3) (the encoder's input),
    "points" (Q, 3) query points with their occupancy "occ" (Q,), and for validation data
    the occupancy grid "grid" (R, R, R) on which IoU is measured, when the data has one.
    cfg["resolution"] is the size of the PointNet planes and of the finest basis field.
    """

    name = "shape"
    # prediction="v" (file 04): with the paper's eps, samples of these 24-channel tri-plane latents
    # drift to 1.6x the latents' standard deviation at this budget and decode to fragments; with v,
    # 0.93x and recognisable shapes (README, "3D shapes"). Videos use it for the same reason.
    presets = {
        # tiny: planes of 32, latent 3 x 8 x 8 x 8, fields at 8, 16, 32
        "tiny": dict(resolution=32, batch_size=8, coords_per_item=2048, z_ch=8, enc_ch=32, enc_mult=(1, 2, 2),
                     field_ch=16, mlp_hidden=64, mlp_layers=4, lambda_z=1e-3, vae_steps=3000, vae_lr=1e-3,
                     ldm_ch=64, ldm_mult=(1, 2), ldm_attn=(1,), ldm_steps=4000, ldm_batch=32, ldm_lr=2e-4,
                     ema_decay=0.999, sampler="ddpm", sample_steps=100, prediction="v"),
        # paper: latent 3 x 64 ch x 16 x 16, basis fields of 64 ch at 16, 32, 64 (DESIGN.md section 2)
        "paper": dict(resolution=64, batch_size=32, coords_per_item=4096, z_ch=64, enc_ch=64, enc_mult=(1, 2, 2),
                      field_ch=64, mlp_hidden=256, mlp_layers=5, lambda_z=1e-3, vae_steps=300_000, vae_lr=1e-4,
                      ldm_ch=128, ldm_mult=(1, 2, 2), ldm_attn=(1, 2), ldm_steps=500_000, ldm_batch=64,
                      ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim", sample_steps=50, prediction="v"),
    }
    synthetic_train, synthetic_val = 1000, 64
    num_surface, num_queries, encoder_points = 4096, 8192, 1024  # P, Q kept per shape; points the encoder sees

    # -- data ------------------------------------------------------------------------------
    def load(self, data, resolution, val_fraction=0.1, seed=0, frames=None):
        """-> (train, val, num_classes); dicts of tensors sharing their first dimension (frames: videos only)."""
        P, Q = self.num_surface, self.num_queries
        if data is None:  # the built-in synthetic shapes, with their classes; exact grids for IoU
            tr = synthetic_shape_params(self.synthetic_train, seed=seed)
            return synthetic_shapes(tr, P, Q, seed=seed), self.held_out_synthetic(seed), len(SHAPE_CLASSES)
        if data.lower().endswith(".npz") and os.path.isfile(data):
            items = read_shape_npz(data, P, Q, seed)
        elif any(os.path.isfile(os.path.join(c, "train.lst")) for c in convonet_classes(data)):
            # the dataset's own split: train.lst for training, val.lst for validation
            return read_convonet(data, P, Q, "train", seed), read_convonet(data, P, Q, "val", seed + 1), 0
        else:  # a ConvONet folder without lists: every shape, split at random below
            items = read_convonet(data, P, Q, None, seed)
        n = len(items["x"])
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise SystemExit(f"--data {data}: {n} shape(s) found; need at least 2 (training + validation)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        split = lambda ids: {k: (v[ids] if torch.is_tensor(v) else None) for k, v in items.items()}
        return split(perm[n_val:]), split(perm[:n_val]), 0

    def held_out_synthetic(self, seed=0):
        """The held-out synthetic shapes of train.py (with their exact 64^3 grids)."""
        va = synthetic_shape_params(self.synthetic_val, seed=seed + 1_000_003)
        return synthetic_shapes(va, self.num_surface, self.num_queries, SHAPE_EVAL_RES, seed=seed + 1)

    def to_signal(self, x):
        """Stored surface points -> the encoder's input: the first encoder_points (a random subset)."""
        return x[:, :self.encoder_points].float()

    # -- model -----------------------------------------------------------------------------
    def build_vae(self, cfg):
        """PointNet + conv encoder -> tri-plane latent -> HDBF fields per plane -> CFC -> logit."""
        import functools

        V, Hd = importlib.import_module("02_d2c_vae"), importlib.import_module("03_hdbf_cfc")
        decoder, readout = Hd.build_decoder_readout(cfg["variant"], cfg["z_ch"], cfg["field_ch"], 1, cfg["enc_ch"],
                                                    tuple(cfg["enc_mult"]), cfg["mlp_hidden"], cfg["mlp_layers"])
        encoder = ShapeEncoder(cfg["z_ch"], cfg["enc_ch"], tuple(cfg["enc_mult"]), cfg["resolution"])
        # p = sum of the three planes' embeddings (the paper's choice for shapes)
        return V.D2CVAE(encoder, decoder, readout, functools.partial(inr.triplane_lookup, combine="sum"))

    def latent_shape(self, cfg):
        """(3Z, h, h): the three planes stacked on channels, as the diffusion model sees them."""
        r = cfg["resolution"] // 2 ** (len(cfg["enc_mult"]) - 1)
        return (3 * cfg["z_ch"], r, r)

    def unstack_planes(self, z):
        """(B, 3Z, h, w) -> (B, 3, Z, h, w): the stacked planes back as three, for the VAE's decoder."""
        return z.unflatten(1, (3, -1))

    # -- the ELBO's pieces -----------------------------------------------------------------
    def training_batch(self, data, idx, K, generator, device):
        """-> (surface points for the encoder (B, P_enc, 3), coords (B, K, 3), occupancy (B, K, 1))."""
        x = data["x"][idx]  # (B, P, 3)
        B, P, _ = x.shape
        # a fresh random subset of the surface points for the encoder at every step
        sub = torch.rand(B, P, generator=generator).argsort(1)[:, :self.encoder_points]  # (B, P_enc)
        x = x.gather(1, sub[..., None].expand(-1, -1, 3))
        Q = data["points"].shape[1]
        pick = torch.randint(Q, (B, K if K > 0 else Q), generator=generator)  # (B, K)
        coords = data["points"][idx].gather(1, pick[..., None].expand(-1, -1, 3))
        target = data["occ"][idx].gather(1, pick).float()[..., None]
        return x.to(device), coords.to(device), target.to(device)

    @staticmethod
    def values_per_item(cfg):
        """D_x of the ELBO's scaling (file 02): the occupancies of the 64^3 evaluation grid."""
        return SHAPE_EVAL_RES ** 3

    @staticmethod
    def recon(logits, occupancy):
        """Bernoulli likelihood: -log p(o | logit) = BCE(logit, o), mean per item."""
        return F.binary_cross_entropy_with_logits(logits, occupancy, reduction="none").flatten(1).mean(1)

    # -- outputs ---------------------------------------------------------------------------
    @staticmethod
    def field(vae, fields):
        """The decoded occupancy functions as a callable: points (B, N, 3) -> logits (B, N)."""
        return lambda p: vae.query(fields, p)[..., 0]

    def logit_grid(self, vae, fields, R=SHAPE_EVAL_RES, chunk=65536):
        """The decoded shapes' logits on the R^3 voxel-centre grid, (B, R, R, R)."""
        B = fields[0].shape[0]
        c = voxel_grid(R, fields[0].device).reshape(1, -1, 3).expand(B, -1, -1)  # (B, R^3, 3)
        out = torch.cat([vae.query(fields, c[:, i:i + chunk])[..., 0] for i in range(0, R ** 3, chunk)], 1)
        return out.reshape(B, R, R, R)

    @staticmethod
    def default_resolution(cfg):
        """sample.py's --resolution when none is given: meshes on the 64^3 grid."""
        return SHAPE_EVAL_RES

    def preview(self, vae, fields, cfg=None, size=96):
        """Shaded pictures of the decoded shapes, ray marched through the occupancy (file 06)."""
        G = importlib.import_module("06_geometry")
        return G.render_occupancy(self.field(vae, fields), fields[0].shape[0], size, size, fov_deg=PREVIEW_FOV)

    def evaluate(self, vae, val, cfg, device, n=None, chamfer=False):
        """Mean IoU of the reconstructions (posterior mean) -> (scores, sheet rows, names).

        IoU on the 64^3 grid when the data has one, else on the stored (uniform) query points.
        chamfer=True also meshes each reconstruction's 64^3 logits (the grid the IoU used) and
        adds the Chamfer distance between 2048 of its points and 2048 of the data's surface.
        """
        G = importlib.import_module("06_geometry")
        n = len(val["x"]) if n is None else n
        ious, cds, previews = [], [], []
        for i in range(0, n, 8):
            fields = vae.decode(vae.encode(self.to_signal(val["x"][i:i + 8].to(device))).mean)
            R = val["grid"].shape[-1] if "grid" in val else SHAPE_EVAL_RES
            logits = self.logit_grid(vae, fields, R) if "grid" in val or chamfer else None  # (b, R, R, R)
            if "grid" in val:
                pred, truth = logits > 0, val["grid"][i:i + 8].to(device)
            else:
                pred, truth = vae.query(fields, val["points"][i:i + 8].to(device))[..., 0] > 0, val["occ"][i:i + 8].to(device)
            # IoU = |pred and truth| / |pred or truth|, per shape
            ious.append(((pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1).clamp(min=1)).cpu())
            if chamfer:
                cds.append(G.chamfer(self.mesh_clouds(logits, 2048, seed=i), val["x"][i:i + 8, :2048]))
            if i == 0:
                previews.append(self.preview(vae, fields, cfg).cpu())
        rows, names = [previews[0]], ["reconstructed"]
        if "grid" in val:  # the data itself, ray marched through its voxels
            rows.insert(0, G.render_occupancy(grid_field(val["grid"][:8]), min(8, n), 96, 96, fov_deg=PREVIEW_FOV))
            names.insert(0, "data")
        ious = torch.cat(ious)
        scores = {"iou": ious.mean().item(), "iou_each": ious.tolist()}
        if chamfer:
            scores["chamfer_each"] = torch.cat(cds).tolist()
        return scores, rows, names

    @staticmethod
    def describe(scores):
        return f"validation IoU {scores['iou']:.3f} (64^3)"

    @staticmethod
    def mesh_clouds(logits, num_points=2048, seed=0):
        """num_points points on the surface of each shape's mesh: logit grids (B, R, R, R) -> (B, num_points, 3).

        A shape with no surface at all (everything outside) gets its points at the origin.
        """
        G = importlib.import_module("06_geometry")
        g = torch.Generator().manual_seed(seed)
        clouds = []
        for grid in logits.cpu():
            verts, faces = G.extract_mesh(grid, 0.0)
            clouds.append(G.sample_mesh_surface(verts, faces, num_points, g) if len(faces) else torch.zeros(num_points, 3))
        return torch.stack(clouds)

    def sample_outputs(self, vae, fields, cfg, resolutions, out):
        """sample.py: a mesh per sample and resolution (<out>_<k>_<R>.obj), and their previews."""
        if out is not None:
            G = importlib.import_module("06_geometry")
            stem = os.path.splitext(out)[0]
            for R in resolutions:
                for k, grid in enumerate(self.logit_grid(vae, fields, R).cpu()):
                    G.write_obj(f"{stem}_{k}_{R}.obj", *G.extract_mesh(grid, 0.0))
            print(f"wrote {len(fields[0]) * len(resolutions)} meshes {stem}_<k>_<R>.obj (surface nets at "
                  + ", ".join(f"{R}^3" for R in resolutions) + ")")
        return [self.preview(vae, fields, None).cpu()], ["samples"]

    def reconstruct(self, vae, cfg, source, resolutions, n, device):
        """sample.py --reconstruct: encode every shape of `source` (n of the synthetic ones) from its surface points,
        print the mean IoU (64^3 grid, or the stored query points) and the Chamfer distance
        between 2048 points of the mesh and 2048 of the data's surface -> previews.

        `source` is "synthetic", an .npz of grids + surface points, or a ConvONet folder
        (its test.lst, or every shape when there is none).
        """
        if source == "synthetic":
            items = self.held_out_synthetic(cfg["seed"])
        elif source.lower().endswith(".npz") and os.path.isfile(source):
            items = read_shape_npz(source, self.num_surface, self.num_queries, cfg["seed"], flag="--reconstruct")
        else:
            items = read_convonet(source, self.num_surface, self.num_queries, "test", cfg["seed"], "--reconstruct")
        m = min(n, len(items["x"])) if source == "synthetic" else len(items["x"])  # a file: every shape
        scores, rows, names = self.evaluate(vae, items, cfg, device, n=m, chamfer=True)
        shape_names = items.get("names") or [f"#{i}" for i in range(m)]
        print("per shape (IoU, Chamfer): " + ", ".join(f"{nm} {iou:.3f} {c:.4f}" for nm, iou, c in
                                                       zip(shape_names, scores["iou_each"], scores["chamfer_each"])))
        cd = sum(scores["chamfer_each"]) / m
        print(f"{m} shapes: mean IoU {scores['iou']:.3f} ({'64^3 grid' if 'grid' in items else 'query points'}), "
              f"Chamfer distance {cd:.5f} (squared, in [-1, 1]^3 units; mesh at 64^3)")
        return rows, names

    write_sheet = staticmethod(ImageModality.write_sheet)


# ========================================================================================
# The video modality: functions of (x, y, t) (paper Sec. 4.3)
# ========================================================================================
# A clip is the function v: [-1, 1]^3 -> RGB of (x, y, t); frame k of T sits at the time
# t_k = -1 + (2k + 1) / T, the same pixel-centre rule as x and y. Its latent is a
# tri-plane over (x, y, t): planes xy, xt, yt (file 01's TRIPLANE_AXES read with t as the
# third axis), looked up like a shape's but with the three embeddings CONCATENATED (the
# paper's choice for video: the time planes carry different information from the xy plane,
# a sum would blur them together), then file 03's CFC read-out maps them to RGB. Because
# t is continuous, a trained model renders frames between its training frames, at any
# frame rate and any spatial size.
#
# Encoder: we chose a 3D-conv encoder over the paper's TimeSformer-like transformer. At the
# sizes a CPU trains (16 frames of 32x32 or 64x64) a few 3D convolutions see the whole clip
# and cost little; attention's long range matters at 256x256, where a user has a GPU and can
# swap the trunk. The 3D trunk halves x and y per level (time keeps its frames), its
# feature volume (B, C, T, h, h) is resampled to an h x h x h cube and averaged along one
# axis per plane: over t gives xy, over y gives xt, over x gives yt. Then a shared 2D conv
# makes each plane's posterior.
#
# Planes of one size: the paper's time planes are smaller than its xy plane; resampling
# the time axis to h makes all three h x h, so they stack on channels (B, 3Z, h, h) for
# file 04's UNet exactly like a shape's tri-plane, with no packing scheme to explain.
# Training draws K random (x, y, t) voxel centres per clip and their colours.
def video_grid(T, H, W, device=None):
    """(x, y, t) of every voxel centre of a clip, (T, H, W, 3)."""
    t, y, x = inr.pixel_centers(T, device), inr.pixel_centers(H, device), inr.pixel_centers(W, device)
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")  # (T, H, W) each
    return torch.stack([xx, yy, tt], -1)


def synthetic_video_params(n, seed=0):
    """The synthetic images' parameters, plus a velocity per primitive (coordinate units per unit of t)."""
    p = synthetic_params(n, seed=seed, num_shapes=3)
    g = torch.Generator().manual_seed(seed + 7)
    # t spans 2 over a clip: a primitive moves at most 0.6 over the clip
    p["velocity"] = (torch.rand(n, 3, 2, generator=g) * 2 - 1) * 0.3  # (n, S, 2)
    return p


def synthetic_clips(params, T, H, W):
    """The synthetic videos rendered exactly at any size and frame count: (n, 3, T, H, W) in [-1, 1]."""
    n = params["label"].shape[0]
    c = video_grid(T, H, W).reshape(1, -1, 3).expand(n, -1, -1)  # (n, T H W, 3)
    return synthetic_render(params, c).reshape(n, T, H, W, 3).permute(0, 4, 1, 2, 3).contiguous()


def random_voxels(clips, K, generator=None):
    """K random voxel centres per clip and their colours: coords (B, K, 3) as (x, y, t), target (B, K, 3)."""
    B, C, T, H, W = clips.shape
    idx = torch.randint(T * H * W, (B, K), generator=generator).to(clips.device)  # (B, K) flat index
    grid = video_grid(T, H, W, clips.device).reshape(T * H * W, 3)
    return grid[idx], clips.flatten(2).gather(2, idx[:, None].expand(B, C, K)).transpose(1, 2)


# ----------------------------------------------------------------------------------------
# Reading clips: a folder with one sub-folder of frames per clip, or a clip array
# ----------------------------------------------------------------------------------------
def read_clips(path, frames, resolution, flag="--data"):
    """A clip folder (SkyTimelapse layout) or an .npz/.npy clip array -> uint8 (n, 3, T, R, R).

    Folder: path/<clip>/ (or path/<group>/<clip>/) holds one clip's frames as .png/.jpg,
    in name order; each clip gives its first T frames (shorter clips are skipped, and said).
    Array: (n, T0, H, W, 3) RGB or (n, T0, H, W) grey, uint8 or float in [0, 1], key 'clips'
    (or the only array), T0 >= T. Frames are centre-cropped and resized like images.
    """
    import numpy as np

    if os.path.isfile(path) and path.lower().endswith((".npz", ".npy")):
        try:
            if path.lower().endswith(".npy"):
                a, key = np.load(path, mmap_mode="r", allow_pickle=False), "array"
            else:
                with np.load(path, allow_pickle=False) as f:
                    keys = list(f.keys())
                    if "clips" not in keys and len(keys) != 1:
                        raise SystemExit(f"{flag} {path}: expected an array named 'clips' (or a single array); "
                                         f"found {', '.join(keys) or 'none'}")
                    key = "clips" if "clips" in keys else keys[0]
                    a = f[key]
        except SystemExit:
            raise
        except Exception as e:
            raise SystemExit(f"{flag} {path}: cannot read this array ({type(e).__name__}: {str(e)[:120]})")
        ok = (a.ndim == 4 or (a.ndim == 5 and a.shape[-1] in (1, 3, 4))) and len(a) and a.shape[1] >= frames
        ok = ok and (a.dtype == np.uint8 or (a.dtype.kind == "f" and 0 <= a.min() and a.max() <= 1))
        if not ok:
            raise SystemExit(f"{flag} {path}: {key} is {a.dtype} {a.shape}; expected clips (n, T, H, W, 3) or "
                             f"(n, T, H, W), uint8 or float in [0, 1], with T >= {frames} frames")
        a = a[:, :frames]
        a = a[..., None] if a.ndim == 4 else a  # (n, T, H, W, C)
        # every frame is an image: fold time into the batch, in chunks of clips
        out = [square_uint8(torch.from_numpy(to_unit_rgb(np.asarray(a[i:i + 16]).reshape(-1, *a.shape[2:]))), resolution)
               for i in range(0, len(a), 16)]
        return torch.cat(out).reshape(len(a), frames, 3, resolution, resolution).transpose(1, 2).contiguous()
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: not a folder or an .npz/.npy file (expected a folder of clip "
                         f"sub-folders of frames, or a clip array)")
    clips, lengths = [], []
    for root, _, files in sorted(os.walk(path)):  # clip folders in path order
        frame_files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        if root != path and frame_files:
            lengths.append(len(frame_files))
            if len(frame_files) >= frames:  # (name order: zero-padded frame numbers sort right)
                clips.append(torch.stack([read_image(os.path.join(root, f), resolution) for f in frame_files[:frames]], 1))
    if not clips:
        raise SystemExit(f"{flag} {path}: no clip with {frames} frames or more (found {len(lengths)} clip folder(s), "
                         f"longest {max(lengths, default=0)} frames); expected {path}/<clip>/<frame>.png")
    if len(clips) < len(lengths):
        print(f"{flag} {path}: skipped {len(lengths) - len(clips)} clip(s) shorter than {frames} frames")
    return torch.stack(clips)  # (n, 3, T, R, R)


def write_clips(rows, path, row_names=None, title=None, fps=8, strip_frames=8):
    """Rows of clips (each (n, 3, T_row, R_row, R_row) in [-1, 1]) -> a PNG strip at `path` (the
    first clip of each row, strip_frames frames side by side) and an animated GIF beside it.

    Rows of lower resolution are enlarged with nearest-neighbour copies, and a row with fewer
    frames holds each one longer, so that all rows play in step (frame floor(k T_row / T_max)).
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    size, T = max(r.shape[-1] for r in rows), max(r.shape[2] for r in rows)
    # (n, T_row, size, size, 3) in [0, 1], enlarged by nearest-neighbour copies
    big = [F.interpolate(r.float().cpu().transpose(1, 2).flatten(0, 1), size=(size, size), mode="nearest")
           .unflatten(0, (len(r), -1)).permute(0, 1, 3, 4, 2).add(1).div(2).clamp(0, 1).numpy() for r in rows]
    # the GIF: one cell per clip, every row at frame floor(k T_row / T) at step k
    fig, axes = sheet_axes(len(rows), max(len(b) for b in big), row_names, title)
    ims = [[axes[i, k].imshow(b[k, 0], interpolation="nearest") for k in range(len(b))] for i, b in enumerate(big)]
    fig.tight_layout()

    def show(k):
        for b, row in zip(big, ims):
            for j, im in enumerate(row):
                im.set_data(b[j, k * b.shape[1] // T])
        return [im for row in ims for im in row]

    gif = os.path.splitext(path)[0] + ".gif"
    FuncAnimation(fig, show, frames=T, interval=1000 / fps).save(gif + ".tmp.gif", writer=PillowWriter(fps=fps), dpi=80)
    os.replace(gif + ".tmp.gif", gif)
    # the strip: strip_frames frames of the first clip of each row, evenly spaced in time, as an image sheet
    strips = [r[0][:, torch.arange(strip_frames) * r.shape[2] // strip_frames].transpose(0, 1) for r in rows]
    ImageModality.write_sheet(strips, path, row_names, title)


# ----------------------------------------------------------------------------------------
# The encoder: 3D convolutions, then one axis collapsed per plane
# ----------------------------------------------------------------------------------------
def collapse_volume(vol):
    """A feature volume (B, C, T, h, w) with axes t, y, x -> planes xy, xt, yt (B, 3, C, w, w).

    Time is first resampled to w (and y too, if h != w): the three planes come out equal.
    """
    w = vol.shape[-1]
    vol = F.adaptive_avg_pool3d(vol, (w, w, w))  # (B, C, w, w, w)
    # xy (height y, width x): average over t; xt (height t, width x): over y; yt (height t, width y): over x
    return torch.stack([vol.mean(2), vol.mean(3), vol.mean(4)], 1)


class VideoEncoder(nn.Module):
    """Clips (B, 3, T, R, R) -> posterior parameters of a tri-plane (B, 3, 2Z, h, h), h = R / 2^(L-1)."""

    def __init__(self, z_ch, ch=32, ch_mult=(1, 2, 2)):
        super().__init__()
        chs = [ch * m for m in ch_mult]
        layers = [nn.Conv3d(3, chs[0], 3, padding=1), nn.SiLU()]
        for i in range(1, len(chs)):  # halve x and y, keep the frames
            layers += [nn.Conv3d(chs[i - 1], chs[i], 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
                       nn.Conv3d(chs[i], chs[i], 3, padding=1), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        V = importlib.import_module("02_d2c_vae")
        # per plane (shared weights): GroupNorm, SiLU, conv to the mean and log-variance
        self.head = nn.Sequential(V.norm(chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], 2 * z_ch, 3, padding=1))

    def forward(self, clips):
        planes = collapse_volume(self.trunk(clips))  # (B, 3, C, h, h)
        B = planes.shape[0]
        return self.head(planes.flatten(0, 1)).unflatten(0, (B, 3))  # (B, 3, 2Z, h, h)


# ----------------------------------------------------------------------------------------
# The video modality record
# ----------------------------------------------------------------------------------------
class VideoModality:
    """Everything train.py and sample.py need to know about videos.

    Data items are clips (3, T, R, R), stored as uint8 (files) or float (synthetic);
    cfg["frames"] is T, cfg["resolution"] is R.
    """

    name = "video"
    presets = {
        # tiny: 16 frames of 32x32, latent 3 x 8 x 8 x 8, fields at 8, 16, 32 per plane
        "tiny": dict(resolution=32, frames=16, batch_size=8, coords_per_item=1024, z_ch=8, enc_ch=32,
                     enc_mult=(1, 2, 2), field_ch=16, mlp_hidden=64, mlp_layers=4, lambda_z=1e-3, vae_steps=3000,
                     vae_lr=1e-3, ldm_ch=64, ldm_mult=(1, 2), ldm_attn=(1,), ldm_steps=4000, ldm_batch=32,
                     ldm_lr=2e-4, ema_decay=0.999, sampler="ddpm", sample_steps=100, prediction="v"),
        # paper: 16 frames of 256x256 (SkyTimelapse), xy latent 64 ch at 32x32 (DESIGN.md section 2)
        "paper": dict(resolution=256, frames=16, batch_size=8, coords_per_item=16384, z_ch=64, enc_ch=64,
                      enc_mult=(1, 2, 2, 2), field_ch=64, mlp_hidden=256, mlp_layers=5, lambda_z=1e-3,
                      vae_steps=300_000, vae_lr=1e-4, ldm_ch=128, ldm_mult=(1, 2, 2), ldm_attn=(1, 2),
                      ldm_steps=500_000, ldm_batch=32, ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim",
                      sample_steps=50, prediction="v"),
    }
    synthetic_train, synthetic_val = 1000, 64

    def load(self, data, resolution, val_fraction=0.1, seed=0, frames=16):
        """-> (train, val, num_classes); train/val are dicts {"x": (n, 3, T, R, R), "label": ...}."""
        if data is None:  # the built-in synthetic videos, with their classes
            tr = synthetic_video_params(self.synthetic_train, seed=seed)
            va = synthetic_video_params(self.synthetic_val, seed=seed + 1_000_003)
            return ({"x": synthetic_clips(tr, frames, resolution, resolution), "label": tr["label"]},
                    {"x": synthetic_clips(va, frames, resolution, resolution), "label": va["label"], "params": va},
                    len(SYNTHETIC_CLASSES))
        x = read_clips(data, frames, resolution)
        n_val = max(1, round(len(x) * val_fraction))
        if len(x) - n_val < 1:
            raise SystemExit(f"--data {data}: {len(x)} clip(s) found; need at least 2 (training + validation)")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return {"x": x[perm[n_val:]], "label": None}, {"x": x[perm[:n_val]], "label": None}, 0

    to_signal = staticmethod(ImageModality.to_signal)  # uint8 -> [-1, 1], floats as they are
    recon = staticmethod(ImageModality.recon)  # the Laplace (L1) likelihood of images, per frame pixel

    def build_vae(self, cfg):
        """3D-conv encoder -> tri-plane (xy, xt, yt) -> HDBF fields per plane -> concat lookup -> CFC -> RGB."""
        import functools

        V, Hd = importlib.import_module("02_d2c_vae"), importlib.import_module("03_hdbf_cfc")
        decoder, readout = Hd.build_decoder_readout(cfg["variant"], cfg["z_ch"], cfg["field_ch"], 3, cfg["enc_ch"],
                                                    tuple(cfg["enc_mult"]), cfg["mlp_hidden"], cfg["mlp_layers"],
                                                    embed_mult=3)
        encoder = VideoEncoder(cfg["z_ch"], cfg["enc_ch"], tuple(cfg["enc_mult"]))
        return V.D2CVAE(encoder, decoder, readout, functools.partial(inr.triplane_lookup, combine="concat"))

    latent_shape = ShapeModality.latent_shape  # three h x h planes stacked on channels: (3Z, h, h)
    unstack_planes = ShapeModality.unstack_planes

    def training_batch(self, data, idx, K, generator, device):
        """-> (clips (B, 3, T, R, R), coords (B, K, 3) as (x, y, t), colours (B, K, 3))."""
        x = self.to_signal(data["x"][idx].to(device, non_blocking=True))
        B, C, T, H, W = x.shape
        if K <= 0:
            return x, video_grid(T, H, W, x.device).reshape(1, -1, 3).expand(B, -1, -1), x.flatten(2).transpose(1, 2)
        return (x, *random_voxels(x, K, generator))

    @staticmethod
    def values_per_item(cfg):
        """D_x of the ELBO's scaling (file 02): colour values per clip."""
        return 3 * cfg["frames"] * cfg["resolution"] ** 2

    @staticmethod
    def default_resolution(cfg):
        return cfg["resolution"]

    def render(self, vae, fields, resolution, frames, chunk=65536):
        """The decoded INRs on any (frames, resolution, resolution) voxel-centre grid: (B, 3, T, R, R)."""
        B = fields[0].shape[0]
        c = video_grid(frames, resolution, resolution, fields[0].device).reshape(1, -1, 3).expand(B, -1, -1)
        out = torch.cat([vae.query(fields, c[:, i:i + chunk]) for i in range(0, c.shape[1], chunk)], 1)
        return out.reshape(B, frames, resolution, resolution, 3).permute(0, 4, 1, 2, 3).clamp(-1, 1)

    def preview(self, vae, fields, cfg):
        return self.render(vae, fields, cfg["resolution"], cfg["frames"])

    def evaluate(self, vae, val, cfg, device):
        """Validation PSNR over every frame, from the posterior mean -> (scores, rows, names)."""
        scores, rec = [], []
        for i in range(0, len(val["x"]), 16):
            x = self.to_signal(val["x"][i:i + 16].to(device))
            r = self.preview(vae, vae.decode(vae.encode(x).mean), cfg)
            scores.append(inr.psnr(r, x) * len(x))
            rec.append(r.cpu())
        return ({"psnr": sum(scores) / len(val["x"])}, [self.to_signal(val["x"][:6]), torch.cat(rec)[:6]],
                ["held out", "reconstructed"])

    describe = staticmethod(ImageModality.describe)

    @staticmethod
    def write_sheet(rows, path, row_names=None, title=None):
        """A frame strip PNG at `path` and the animated GIF beside it (.png -> .gif)."""
        write_clips(rows, path, row_names, title)

    def sample_outputs(self, vae, fields, cfg, resolutions, out):
        """sample.py: the sampled clips at every resolution, with cfg["frames"] frames -> rows, names."""
        T = cfg["frames"]
        return [self.render(vae, fields, R, T).cpu() for R in resolutions], [f"{R}x{R}, {T} frames" for R in resolutions]

    def reconstruct(self, vae, cfg, source, resolutions, n, device):
        """sample.py --reconstruct: encode clips at the training size, render them at every
        resolution with cfg["frames"] frames (any number: t is continuous), print PSNRs.

        `source` is "synthetic" (exact ground truth at any size and frame rate), a clip
        folder or a clip array (ground truth: its first cfg["frames"] frames, so only the
        training frame count can be compared). The baseline beside each PSNR: trilinear
        interpolation (in x, y and t) of the reconstruction at the training size and frames.
        """
        R0, T0, T = cfg["resolution"], cfg["train_frames"], cfg["frames"]
        if source == "synthetic":
            va = synthetic_video_params(max(n, 1), seed=cfg["seed"] + 1_000_003)  # train.py's validation clips
            x_in = synthetic_clips(va, T0, R0, R0)
            truth = {R: synthetic_clips(va, T, R, R) for R in resolutions}
        else:
            x_in = read_clips(source, T0, R0, flag="--reconstruct")
            if T != T0:
                raise SystemExit(f"--frames {T}: data clips are compared at their own {T0} frames; "
                                 f"use --reconstruct synthetic for other frame rates")
            truth = {R: self.to_signal(read_clips(source, T, R, flag="--reconstruct")) for R in resolutions}
        rows, names = [], []
        for R in resolutions:
            recs, base = [], []
            for i in range(0, len(x_in), 8):
                fields = vae.decode(vae.encode(self.to_signal(x_in[i:i + 8].to(device))).mean)
                recs.append(self.render(vae, fields, R, T).cpu())
                base.append(F.interpolate(self.render(vae, fields, R0, T0), size=(T, R, R), mode="trilinear",
                                          align_corners=False).cpu())
            rec = torch.cat(recs)
            line = f"{R}x{R}, {T} frames: mean PSNR {inr.psnr(rec, truth[R]):.2f} dB over {len(rec)} clips"
            if (R, T) != (R0, T0):
                line += (f" (trilinear interpolation of the {R0}x{R0}, {T0}-frame reconstruction: "
                         f"{inr.psnr(torch.cat(base), truth[R]):.2f} dB)")
            print(line)
            rows += [truth[R][:6], rec[:6]]
            names += [f"data {R}", f"INR {R}"]
        return rows, names


# ========================================================================================
# The NeRF modality: radiance fields of 3D scenes seen in photographs (paper Sec. 4.2)
# ========================================================================================
# A scene is a tri-plane radiance field over [-1, 1]^3 (planes xy, xz, yz; the three
# embeddings concatenated, as in the paper's NeRF), decoded by HDBF + CFC into 1 + F numbers
# per point: density and colour features. File 07 turns them into pictures (rays, stratified
# samples, alpha compositing) and holds the synthetic scenes. The signal the ELBO sees is a
# pixel colour, the "coordinate" is its ray: training draws K random rays per scene and step
# (never whole images) and a Gaussian likelihood compares rendered and true colours (the
# squared error; NerfModality.recon says why not the L1 of images).
#
# How a scene gets its latent depends on what the data holds; each dataset uses one way:
#   * synthetic scenes (the embedded default): a coloured point cloud (x, y, z, r, g, b) of
#     the visible surfaces goes through the shape modality's PointNet with local pooling
#     (as in the paper), so q(z|x) is a real encoder and held-out scenes can be encoded;
#   * NeRF-synthetic folders, SRN folders and .npz files of posed images: no point clouds,
#     so auto-decoding (Park et al., DeepSDF 2019): each training scene owns the parameters
#     of its posterior q(z | scene) = N(mu_i, sigma_i^2), rows of a learnable table trained
#     with everything else. The ELBO is unchanged, KL term included, so the latents stay
#     close to N(0, I) and stage 2 models them as it would encoded ones. Validation renders
#     held-out views of the training scenes (a new scene would need its latent fitted first).
#
# Units: positions of a dataset are divided by its scale (1.5 for NeRF-synthetic, whose
# scenes fill [-1.5, 1.5]^3; 1 for SRN) so the scene fills the cube; near and far too.
# Colours: white background (+1) throughout; RGBA pictures are put on white when read.
class AutoDecoder(nn.Module):
    """The 'encoder' of posed-image datasets: scene indices (B,) -> posterior parameters (B, 3, 2Z, h, h).

    Means start near 0 and log-variances at -6 (sigma = 0.05), so early training sees little noise.
    """

    def __init__(self, num_scenes, z_ch, h):
        super().__init__()
        init = torch.cat([0.1 * torch.randn(num_scenes, 3, z_ch, h, h), torch.full((num_scenes, 3, z_ch, h, h), -6.0)], 2)
        self.table = nn.Parameter(init)

    def forward(self, idx):
        return self.table[idx]


def to_unit_rgba(a):
    """numpy (..., H, W, C), C = 1, 3 or 4, uint8 or float in [0, 1] -> float tensor (..., H, W, 4),
    alpha 1 where there is none."""
    import numpy as np

    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    a = np.repeat(a, 3, -1) if a.shape[-1] == 1 else a
    return torch.from_numpy(np.ascontiguousarray(a if a.shape[-1] == 4 else np.concatenate([a, np.ones_like(a[..., :1])], -1)))


def read_rgba(path, flag):
    """A square picture file -> float (H, H, 4) RGBA in [0, 1]."""
    import matplotlib.image

    try:
        a = matplotlib.image.imread(path)
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this image ({type(e).__name__}: {e})")
    if a.shape[0] != a.shape[1]:
        raise SystemExit(f"{flag} {path}: picture is {a.shape[1]}x{a.shape[0]}; expected a square one")
    return to_unit_rgba(a[..., None] if a.ndim == 2 else a)  # greyscale: add the channel axis


def resize_views(rgb, size):
    """float (V, H, H, C) in [0, 1] -> uint8 (V, size, size, C), antialiased when shrinking."""
    x = F.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def posed_scene(rgb, c2w, focal, size, scale, near, far, name, centre=None):
    """One scene's RGBA views (V, H, H, 4) resized to `size` (0 or None: kept), positions and near/far
    divided by `scale`: a dict of tensors (see NerfModality)."""
    H = rgb.shape[1]
    k = (size or H) / H  # intrinsics scale with the picture
    c2w = c2w.float().clone()
    c2w[:, :3, 3] /= scale
    cx, cy = (H / 2, H / 2) if centre is None else centre  # principal point, in pixels of the file
    intr = torch.tensor([[focal * k, cx * k, cy * k]])
    return {"images": resize_views(rgb, size or H), "poses": c2w, "intr": intr.expand(len(c2w), 3),
            "near": near / scale, "far": far / scale, "name": name}


def read_nerf_npz(path, size, flag):
    """One scene from an .npz like lego_100px_train.npz: images_rgba (V, H, W, 4) uint8 (or images (V, H, W, 3)),
    poses (V, 4, 4) camera-to-world (OpenGL), focal; near and far if present (else 2 and 6)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            z = {k: f[k] for k in f.keys()}
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this .npz ({type(e).__name__}: {e})")
    key = "images_rgba" if "images_rgba" in z else "images" if "images" in z else None
    if key is None or "poses" not in z or "focal" not in z:
        raise SystemExit(f"{flag} {path}: expected arrays images_rgba (or images), poses and focal; "
                         f"found {', '.join(z) or 'none'}")
    a, poses = z[key], z["poses"]
    if a.ndim != 4 or a.shape[-1] not in (3, 4) or a.shape[1] != a.shape[2] or poses.shape != (len(a), 4, 4):
        raise SystemExit(f"{flag} {path}: {key} is {a.shape} and poses {poses.shape}; expected (V, H, H, 3 or 4) "
                         f"square pictures and (V, 4, 4) poses")
    near, far = float(z.get("near", 2.0)), float(z.get("far", 6.0))
    return posed_scene(to_unit_rgba(a), torch.from_numpy(poses), float(z["focal"]), size, 1.5, near, far,
                       os.path.splitext(os.path.basename(path))[0])


def read_nerf_synthetic(folder, split, size, flag):
    """A NeRF-synthetic scene folder: transforms_<split>.json (camera_angle_x, frames with file_path
    and transform_matrix) + RGBA pictures; near 2, far 6, scale 1.5 (the dataset's own)."""
    import json

    meta_path = os.path.join(folder, f"transforms_{split}.json")
    try:
        meta = json.load(open(meta_path))
        frames, angle = meta["frames"], float(meta["camera_angle_x"])
        files = [os.path.join(folder, fr["file_path"]) for fr in frames]
        c2w = torch.tensor([fr["transform_matrix"] for fr in frames], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{flag} {meta_path}: expected camera_angle_x and frames with file_path and "
                         f"transform_matrix ({type(e).__name__}: {e})")
    pics = [read_rgba(f if os.path.splitext(f)[1] else f + ".png", flag) for f in files]
    if len({p.shape for p in pics}) > 1:
        raise SystemExit(f"{flag} {folder}: its pictures differ in size; expected one size per scene")
    rgb = torch.stack(pics)
    focal = 0.5 * rgb.shape[1] / math.tan(0.5 * angle)
    return posed_scene(rgb, c2w, focal, size, 1.5, 2.0, 6.0, os.path.basename(os.path.normpath(folder)))


def read_srn(folder, size, flag):
    """An SRN scene folder: rgb/*.png, pose/*.txt (4x4 camera-to-world, OpenCV: y down, z forward),
    intrinsics.txt (first line f cx cy; last line the picture size it refers to); near 0.8, far 1.8."""
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(folder, "rgb")) if f.endswith(".png"))
    if not names:
        raise SystemExit(f"{flag} {folder}/rgb: no .png pictures")
    try:
        lines = open(os.path.join(folder, "intrinsics.txt")).read().split("\n")
        f, cx, cy = (float(v) for v in lines[0].split()[:3])
        last = [ln for ln in lines if ln.strip()][-1].split()
        W0 = float(last[-1]) if len(last) == 2 else 2 * cx  # the size the intrinsics refer to
        c2w = torch.stack([torch.tensor([float(v) for v in open(os.path.join(folder, "pose", n + ".txt")).read().split()])
                           .reshape(4, 4) for n in names])
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise SystemExit(f"{flag} {folder}: expected intrinsics.txt (f cx cy) and pose/<name>.txt with 16 numbers "
                         f"per picture ({type(e).__name__}: {e})")
    c2w[:, :3, 1:3] *= -1  # OpenCV (y down, looking down +z) -> OpenGL (y up, looking down -z)
    pics = [read_rgba(os.path.join(folder, "rgb", n + ".png"), flag) for n in names]
    if len({p.shape for p in pics}) > 1:
        raise SystemExit(f"{flag} {folder}/rgb: its pictures differ in size; expected one size per scene")
    rgb = torch.stack(pics)
    k = rgb.shape[1] / W0
    return posed_scene(rgb, c2w, f * k, size, 1.0, 0.8, 1.8, os.path.basename(os.path.normpath(folder)),
                       centre=(cx * k, cy * k))


def read_posed_scenes(path, size, flag="--data"):
    """-> (training scenes, validation scenes): lists of posed_scene dicts of the same scenes.

    .npz: one scene, every 10th view held out. A NeRF-synthetic scene folder (transforms_train.json):
    its val split held out (every 10th training view when it has none). An SRN scene folder (rgb/):
    every 10th view held out. A folder of such scene folders: every scene, each split the same way.
    """
    def every_tenth(scene):
        V_ = len(scene["poses"])
        val = torch.arange(V_) % 10 == 5 if V_ >= 2 else torch.zeros(V_, dtype=torch.bool)
        pick = lambda m: {k: (v[m] if torch.is_tensor(v) and v.dim() and len(v) == V_ else v) for k, v in scene.items()}
        return pick(~val), pick(val)

    def one(folder):
        if os.path.isfile(os.path.join(folder, "transforms_train.json")):
            tr = read_nerf_synthetic(folder, "train", size, flag)
            if os.path.isfile(os.path.join(folder, "transforms_val.json")):
                va = read_nerf_synthetic(folder, "val", size, flag)
                return tr, {k: (v[:10] if torch.is_tensor(v) and v.dim() else v) for k, v in va.items()}
            return every_tenth(tr)
        if os.path.isdir(os.path.join(folder, "rgb")):
            return every_tenth(read_srn(folder, size, flag))
        return None

    if path.lower().endswith(".npz") and os.path.isfile(path):
        pairs = [every_tenth(read_nerf_npz(path, size, flag))]
    elif not os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: not a folder or an .npz file (expected posed pictures: NeRF-synthetic, "
                         f"SRN or an .npz with images_rgba, poses, focal)")
    else:
        here = one(path)  # the folder is a scene, or holds scene folders
        pairs = [here] if here is not None else [
            p for p in (one(os.path.join(path, d)) for d in sorted(os.listdir(path))) if p is not None]
    if not pairs:
        raise SystemExit(f"{flag} {path}: no scene found (expected transforms_train.json or rgb/ + pose/ + "
                         f"intrinsics.txt, in the folder or in its sub-folders)")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stack_scenes(scenes, flag, path):
    """Scenes of one picture size -> one dict of tensors with a leading scene axis (the fewest views of any)."""
    sizes = {s["images"].shape[1] for s in scenes}
    if len(sizes) > 1:
        raise SystemExit(f"{flag} {path}: pictures of different sizes {sorted(sizes)}; pass --view-size to resize them")
    V_ = min(len(s["poses"]) for s in scenes)
    if V_ < 1:
        raise SystemExit(f"{flag} {path}: a scene has no views left to use")
    if any(len(s["poses"]) > V_ for s in scenes):
        print(f"{flag} {path}: scenes have {V_} to {max(len(s['poses']) for s in scenes)} views; using the first {V_} of each")
    return {"x": torch.arange(len(scenes)), "label": None, "names": [s["name"] for s in scenes],
            "images": torch.stack([s["images"][:V_] for s in scenes]), "poses": torch.stack([s["poses"][:V_] for s in scenes]),
            "intr": torch.stack([s["intr"][:V_] for s in scenes]),
            # pictures with a real alpha channel train on random backgrounds (file 07, make_rays)
            "alpha": torch.tensor(any(bool((s["images"][..., 3] < 255).any()) for s in scenes)),
            "near": torch.tensor([s["near"] for s in scenes]), "far": torch.tensor([s["far"] for s in scenes])}


class NerfModality:
    """Everything train.py and sample.py need to know about radiance fields.

    Synthetic data items: "x" coloured surface points (n, P, 6) and "params" (file 07's scene
    parameters, for exact pictures from any camera). Posed-image data items: "x" the scene
    index (n,), "images" uint8 RGBA (n, V, H, H, 4), "alpha" (whether any pixel is transparent), "poses" (n, V, 4, 4), "intr" (n, V, 3) = (f, cx, cy),
    "near", "far" (n,). cfg["resolution"] is the size of the tri-plane (and of the finest basis
    field); cfg["view_size"] the size of the pictures.
    """

    name = "nerf"
    presets = {
        # tiny: planes of 32, latent 3 x 8 x 8 x 8, fields at 8, 16, 32; 512 rays x 32 samples per scene and step
        "tiny": dict(resolution=32, batch_size=4, coords_per_item=512, samples_per_ray=32, view_size=0, frames=12,
                     z_ch=8, enc_ch=32, enc_mult=(1, 2, 2), field_ch=16, mlp_hidden=64, mlp_layers=4, lambda_z=1e-3,
                     vae_steps=3000, vae_lr=1e-3, ldm_ch=64, ldm_mult=(1, 2), ldm_attn=(1,), ldm_steps=4000,
                     ldm_batch=32, ldm_lr=2e-4, ema_decay=0.999, sampler="ddpm", sample_steps=100, prediction="v"),
        # paper: latent 3 x 64 ch x 16 x 16, 5000 rays of 256 samples (DESIGN.md section 2); HDBF fields
        # at 16, 32, 64 where the release had a single one at 64
        "paper": dict(resolution=64, batch_size=8, coords_per_item=5000, samples_per_ray=256, view_size=0, frames=36,
                      z_ch=64, enc_ch=64, enc_mult=(1, 2, 2), field_ch=32, mlp_hidden=256, mlp_layers=5, lambda_z=0.05,
                      vae_steps=300_000, vae_lr=1e-4, ldm_ch=128, ldm_mult=(1, 2, 2), ldm_attn=(1, 2),
                      ldm_steps=500_000, ldm_batch=32, ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim",
                      sample_steps=200, prediction="v"),
    }
    synthetic_train, synthetic_val = 1000, 16
    num_points, encoder_points = 2048, 1024  # coloured points kept per synthetic scene; points the encoder sees
    features = 8  # F: colour features of the read-out beside the density

    # -- data ------------------------------------------------------------------------------
    def load(self, data, resolution, val_fraction=0.1, seed=0, frames=None):
        """-> (train, val, num_classes). Posed pictures: val = held-out views of the training scenes,
        resized to cfg["view_size"] (0: their own size; see configure)."""
        if data is None:
            return self.synthetic(self.synthetic_train, seed), self.held_out_synthetic(seed), 0
        tr, va = read_posed_scenes(data, self.run.get("view_size", 0))
        return stack_scenes(tr, "--data", data), stack_scenes(va, "--data", data), 0

    def synthetic(self, n, seed):
        R = importlib.import_module("07_volume_rendering")
        params = R.synthetic_scene_params(n, seed=seed)
        points = R.scene_points(params, self.num_points, torch.Generator().manual_seed(seed))
        return {"x": points, "params": params, "label": None}

    def held_out_synthetic(self, seed=0):
        return self.synthetic(self.synthetic_val, seed + 1_000_003)

    run = {}  # the settings of the run in progress, for load and training_batch (the drivers' fixed signatures)

    def configure(self, cfg):
        """train.py calls this before load, and again with the data_config below merged into cfg."""
        self.run = dict(cfg)

    def data_config(self, train, cfg):
        """What the model and the renders need to know about the data, stored in the run's config."""
        R = importlib.import_module("07_volume_rendering")
        if "images" not in train:  # synthetic: cameras at radius 3 anywhere, y up
            return {"num_scenes": 0, "view_size": cfg.get("view_size") or 48, "up": [0.0, 1.0, 0.0],
                    "cam_radius": R.SCENE_RADIUS, "cam_elevation": 25.0, "fov": R.SCENE_FOV, "near": 0.0, "far": 1e9}
        poses = train["poses"].flatten(0, 1)  # (n V, 4, 4)
        up = F.normalize(poses[:, :3, 1].mean(0), dim=0)  # the cameras' mean up axis is the world's
        eyes = poses[:, :3, 3]
        radius = eyes.norm(dim=-1)
        elevation = torch.rad2deg(torch.asin((eyes @ up / radius).clamp(-1, 1)))
        size = train["images"].shape[2]
        fov = math.degrees(2 * math.atan(0.5 * size / train["intr"][..., 0].median().item()))
        return {"num_scenes": len(train["x"]), "view_size": size, "up": up.tolist(),
                "cam_radius": radius.median().item(), "cam_elevation": elevation.median().item(), "fov": fov,
                "near": train["near"].min().item(), "far": train["far"].max().item(), "scene_names": train["names"]}

    def to_signal(self, x):
        """Stored data -> the encoder's input: the first encoder_points coloured points, or the scene indices."""
        return x if x.dim() == 1 else x[:, :self.encoder_points].float()

    # -- model -----------------------------------------------------------------------------
    def build_vae(self, cfg):
        """Point cloud (PointNet) or scene index (auto-decoding) -> tri-plane -> HDBF fields -> concat lookup
        -> CFC read-out -> (density, colour features) -> file 07's colour head and volume rendering."""
        import functools

        R = importlib.import_module("07_volume_rendering")
        Hd = importlib.import_module("03_hdbf_cfc")
        decoder, readout = Hd.build_decoder_readout(cfg["variant"], cfg["z_ch"], cfg["field_ch"], 1 + self.features,
                                                    cfg["enc_ch"], tuple(cfg["enc_mult"]), cfg["mlp_hidden"],
                                                    cfg["mlp_layers"], embed_mult=3)
        if cfg["num_scenes"]:
            encoder = AutoDecoder(cfg["num_scenes"], cfg["z_ch"], self.latent_shape(cfg)[-1])
        else:
            encoder = ShapeEncoder(cfg["z_ch"], cfg["enc_ch"], tuple(cfg["enc_mult"]), cfg["resolution"], point_dim=6)
        return R.RadianceFieldVAE(encoder, decoder, readout, functools.partial(inr.triplane_lookup, combine="concat"),
                                  R.RadianceHead(self.features))

    latent_shape = ShapeModality.latent_shape  # three h x h planes stacked on channels: (3Z, h, h)
    unstack_planes = ShapeModality.unstack_planes

    # -- the ELBO's pieces -----------------------------------------------------------------
    def training_batch(self, data, idx, K, generator, device):
        """-> (encoder input, rays (B, K, 8 + S), true colours (B, K, 3)); every draw from `generator`."""
        R = importlib.import_module("07_volume_rendering")
        S, size = self.run["samples_per_ray"], self.run["view_size"]
        B = len(idx)
        if "images" in data:  # K random pixels of random views of each scene
            Vn, H = data["images"].shape[1], data["images"].shape[2]
            v, r, c = (torch.randint(m, (B, K), generator=generator) for m in (Vn, H, H))
            scene = idx[:, None].expand(-1, K)
            rgba = data["images"][scene, v, r, c].float() / 255  # (B, K, 4)
            bg = torch.rand(B, K, 3, generator=generator) * 2 - 1 if data["alpha"] else torch.ones(B, K, 3)
            target = rgba[..., 3:] * (rgba[..., :3] * 2 - 1) + (1 - rgba[..., 3:]) * bg  # a c + (1 - a) background
            o, d = R.pixel_rays(data["poses"][scene, v], data["intr"][scene, v], r.float(), c.float())
            rays = R.make_rays(o, d, S, data["near"][scene], data["far"][scene], bg, generator)
            x = idx
        else:  # K random pixels of random cameras around each synthetic scene: exact colours
            c2w, intr = R.random_cameras((B, K), generator, size=size)
            r, c = (torch.randint(size, (B, K), generator=generator).float() for _ in range(2))
            o, d = R.pixel_rays(c2w, intr, r, c)
            params = {k: v[idx] for k, v in data["params"].items()}
            bg = torch.rand(B, K, 3, generator=generator) * 2 - 1  # random backgrounds (file 07, make_rays)
            target = R.scene_render(params, o, d, bg)
            rays = R.make_rays(o, d, S, background=bg, generator=generator)
            sub = torch.rand(B, data["x"].shape[1], generator=generator).argsort(1)[:, :self.encoder_points]
            x = data["x"][idx].gather(1, sub[..., None].expand(-1, -1, 6))
        return x.to(device), rays.to(device), target.to(device)


    @staticmethod
    def values_per_item(cfg):
        """D_x of the ELBO's scaling (file 02): colour values of one picture of a scene."""
        return 3 * cfg["view_size"] ** 2

    @staticmethod
    def recon(pred, target):
        """Gaussian likelihood: -log p is the squared error of the rendered colours (mean per item), up to scale.

        Not the L1 of images (and of the original release): the gradient of L1 is the sign of the
        error, the same for a background pixel that is almost right as for an object pixel that is
        all wrong. Lego's pictures are 70% background, so at the start every step says "less
        density" more often than "more": in 25 steps the density was below zero everywhere, where
        softplus is flat and passes no gradient back, and the run never learnt anything (measured;
        README, "NeRF"). With squared errors the pixels that are far off weigh most and it learns.
        """
        return (pred - target).pow(2).flatten(1).mean(1)

    # -- outputs ---------------------------------------------------------------------------
    def cameras(self, cfg, azimuths, size):
        """Cameras around the scene's up axis at the data's radius and median elevation -> c2w (T, 4, 4), intr (T, 3)."""
        R = importlib.import_module("07_volume_rendering")
        c2w = torch.stack([R.orbit_c2w(a, cfg["cam_elevation"], cfg["cam_radius"], cfg["up"]) for a in azimuths])
        f = 0.5 * size / math.tan(math.radians(cfg["fov"]) / 2)
        return c2w, torch.tensor([f, size / 2, size / 2]).expand(len(azimuths), 3)

    def render_views(self, vae, fields, c2w, intr, size, cfg):
        """Every item from every camera: fields of B scenes, T cameras -> (B, 3, T, size, size)."""
        dev = fields[0].device
        B, T = fields[0].shape[0], len(c2w)
        out = torch.stack([vae.render(fields, c2w[t:t + 1].expand(B, -1, -1).to(dev), intr[t:t + 1].expand(B, -1).to(dev),
                                      size, size, cfg["samples_per_ray"], cfg["near"], cfg["far"]) for t in range(T)], 2)
        return out

    @staticmethod
    def default_resolution(cfg):
        return cfg["view_size"]

    def preview(self, vae, fields, cfg):
        """One picture per scene, from 30 degrees around the up axis: (B, 3, view_size, view_size)."""
        c2w, intr = self.cameras(cfg, [30.0], cfg["view_size"])
        return self.render_views(vae, fields, c2w, intr, cfg["view_size"], cfg)[:, :, 0]

    def truth_views(self, items, i, cfg):
        """Scene i's pictures to compare with and their cameras: (V, 3, H, H), c2w (V, 4, 4), intr (V, 3)."""
        R = importlib.import_module("07_volume_rendering")
        if "images" in items:  # on white
            rgba = items["images"][i].permute(0, 3, 1, 2).float() / 255
            return rgba[:, 3:] * (rgba[:, :3] * 2 - 1) + (1 - rgba[:, 3:]), items["poses"][i], items["intr"][i]
        size = cfg["view_size"]
        c2w, intr = self.cameras(cfg, [30.0, 150.0, 270.0], size)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        o, d = R.pixel_rays(c2w[:, None], intr[:, None], rows.reshape(1, -1).float(), cols.reshape(1, -1).float())
        params = {k: v[i:i + 1].expand(len(c2w), *v.shape[1:]) for k, v in items["params"].items()}
        return R.scene_render(params, o, d).reshape(-1, size, size, 3).permute(0, 3, 1, 2), c2w, intr

    def compare(self, vae, items, cfg, device, n=None, size=None):
        """Render every item's truth views from its posterior mean -> (mean PSNR, per-item PSNRs, truth, renders)."""
        n = len(items["x"]) if n is None else min(n, len(items["x"]))
        psnrs, truths, recs = [], [], []
        for i in range(n):
            truth, c2w, intr = self.truth_views(items, i, cfg)
            x = self.to_signal(items["x"][i:i + 1]).to(device)
            fields = vae.decode(vae.encode(x).mean)
            H = truth.shape[-1]
            rec = torch.stack([vae.render(fields, c2w[v:v + 1].to(device), intr[v:v + 1].to(device), H, H,
                                          cfg["samples_per_ray"], cfg["near"], cfg["far"])[0].cpu()
                               for v in range(len(c2w))])
            psnrs.append(float(inr.psnr(rec, truth)))
            truths.append(truth)
            recs.append(rec)
        return sum(psnrs) / n, psnrs, truths, recs

    def evaluate(self, vae, val, cfg, device):
        """Validation PSNR of held-out views (posed data) or of three views of held-out scenes (synthetic)."""
        score, _, truths, recs = self.compare(vae, val, cfg, device)
        truth, rec = torch.cat(truths)[:8], torch.cat(recs)[:8]
        return {"psnr": score}, [truth, rec], ["held out", "rendered"]

    describe = staticmethod(ImageModality.describe)

    def sample_outputs(self, vae, fields, cfg, resolutions, out):
        """sample.py: a turntable of cfg["frames"] views per sample at every resolution -> one row per sample and size."""
        T = cfg["frames"] or 12
        rows, names = [], []
        for k in range(min(8, fields[0].shape[0])):
            one = [f[k:k + 1] for f in fields]
            for R_ in resolutions:
                c2w, intr = self.cameras(cfg, [360.0 * t / T for t in range(T)], R_)
                rows.append(self.render_views(vae, one, c2w, intr, R_, cfg).cpu())
                names.append(f"#{k} {R_}x{R_}")
        return rows, names

    def reconstruct(self, vae, cfg, source, resolutions, n, device):
        """sample.py --reconstruct: render the cameras of `source` and print the mean PSNR against its pictures.

        `source`: "synthetic" (held-out synthetic scenes, encoded from their point clouds; a
        model trained on synthetic scenes), or posed pictures in any format of --data, whose
        scenes are matched to the model's by name (a model fit to one scene renders that scene).
        """
        if source == "synthetic":
            if cfg["num_scenes"]:
                raise SystemExit("--reconstruct synthetic: this model was auto-decoded from posed pictures; "
                                 "give it pictures of its own scenes")
            items = self.held_out_synthetic(cfg["seed"])
        else:
            if not cfg["num_scenes"]:
                raise SystemExit(f"--reconstruct {source}: this model encodes point clouds (synthetic scenes); "
                                 f"posed pictures have none, use --reconstruct synthetic")
            tr, va = read_posed_scenes(source, cfg["view_size"], "--reconstruct")
            scenes = [{k: (torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) and a[k].dim() else a[k]) for k in a}
                      for a, b in zip(tr, va)]  # every view of each scene
            known = cfg["scene_names"]
            for s in scenes:
                if len(known) > 1 and s["name"] not in known:
                    raise SystemExit(f"--reconstruct {source}: scene {s['name']!r} is not one the model was fit to "
                                     f"({', '.join(known[:5])}{', ...' if len(known) > 5 else ''})")
            items = stack_scenes(scenes, "--reconstruct", source)
            items["x"] = torch.tensor([known.index(s["name"]) if len(known) > 1 else 0 for s in scenes])
        score, each, truths, recs = self.compare(vae, items, cfg, device, n=n if source == "synthetic" else None)
        views = sum(len(t) for t in truths)
        print(f"{len(each)} scene(s), {views} views at {truths[0].shape[-1]}x{truths[0].shape[-1]}: "
              f"mean PSNR {score:.2f} dB" + ("" if len(each) == 1 else " (" + ", ".join(f"{p:.2f}" for p in each) + ")"))
        rows, names = [], []
        for t, r in zip(truths[:4], recs[:4]):
            rows += [t[:8], r[:8]]
            names += ["data", "rendered"]
        return rows, names

    @staticmethod
    def write_sheet(rows, path, row_names=None, title=None):
        """Rows of pictures (n, 3, R, R) -> a PNG; rows of turntables (n, 3, T, R, R) -> a PNG strip and a GIF."""
        if rows[0].dim() == 5:
            write_clips(rows, path, row_names, title, strip_frames=min(8, rows[0].shape[2]))
        else:
            ImageModality.write_sheet(rows, path, row_names, title)


# One record per modality; the drivers look modalities up here by name.
MODALITIES = {"image": ImageModality(), "shape": ShapeModality(), "video": VideoModality(),
              "nerf": NerfModality()}


# ----------------------------------------------------------------------------------------
# Demo: the synthetic images are functions, so they exist at every resolution
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    params = synthetic_params(8, seed=0)
    exact = {R: synthetic_images(params, R, R) for R in (16, 32, 64, 128)}  # (8, 3, R, R) each
    # What a pixel-grid method must do to go beyond its training size: interpolate. The
    # analytic images give the exact answer to compare with (the yardstick of sample.py).
    for R in (16, 32):
        up = torch.nn.functional.interpolate(exact[R], size=(128, 128), mode="bicubic", align_corners=False)
        print(f"bicubic {R}x{R} -> 128x128 vs the exact 128x128 images: {inr.psnr(up, exact[128]):.2f} dB")
    print("classes:", ", ".join(f"{k} = {SYNTHETIC_CLASSES[k]}" for k in params["label"].tolist()))
    os.makedirs("out", exist_ok=True)
    ImageModality.write_sheet(list(exact.values()), "out/05_modalities.png", [f"{R}x{R}" for R in exact],
                              "the same eight synthetic images rendered exactly at four resolutions")
    print("wrote out/05_modalities.png")
