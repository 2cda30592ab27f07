"""05 - Modalities: what changes from one kind of signal to another (here: images).

The concept
-----------
DDMI is domain-agnostic (Park et al. ICLR 2024, Sec. 3): the VAE of 02, the basis
fields and read-out of 03 and the diffusion model of 04 never look at what the signal
means. What does change per modality is small, and this file holds all of it, one
record per modality:

  * how a data item is encoded (which encoder, what input it sees),
  * how many latent planes there are and how basis fields are looked up
    (one plane: bilinear; three planes: tri-plane, file 01),
  * the likelihood of the re-weighted ELBO (L1 for images),
  * how query coordinates and their targets are drawn from a batch,
  * how a decoded signal is rendered at any resolution and written to disk,
  * which data it reads (a built-in synthetic generator, or the user's files).

The drivers (train.py, sample.py) only talk to a record from MODALITIES.

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
import os

import torch

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
    """Exact colours of the synthetic images at coordinates: (n, N, 2) -> (n, N, 3) in [-1, 1]."""
    label = params["label"][:, None]  # (n, 1)
    # Background: colour ramp bg0 -> bg1 along direction d, t = (<c, d> + 1) / 2 clipped to [0, 1].
    d = torch.stack([torch.cos(params["bg_dir"]), torch.sin(params["bg_dir"])], -1)  # (n, 2)
    t = (((coords * d[:, None]).sum(-1) + 1) / 2).clamp(0, 1)[..., None]  # (n, N, 1)
    img = params["bg"][:, None, 0] * (1 - t) + params["bg"][:, None, 1] * t  # (n, N, 3)
    # Primitives painted back to front; each one is a signed distance function (< 0 inside).
    for s in range(params["centre"].shape[1]):
        rel = coords - params["centre"][:, None, s]  # (n, N, 2) position relative to the centre
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
                     ema_decay=0.999, sampler="ddpm", sample_steps=100),
        "paper": dict(resolution=256, batch_size=16, coords_per_item=0, z_ch=64, enc_ch=64, enc_mult=(1, 2, 4),
                      field_ch=64, mlp_hidden=256, mlp_layers=5, lambda_z=0.5, vae_steps=500_000, vae_lr=1e-4,
                      ldm_ch=128, ldm_mult=(1, 2, 2, 4), ldm_attn=(2, 3), ldm_steps=500_000, ldm_batch=64,
                      ldm_lr=1e-4, ema_decay=0.9999, sampler="ddim", sample_steps=50),
    }
    synthetic_train, synthetic_val = 5000, 256  # sizes of the built-in dataset

    # -- data ------------------------------------------------------------------------------
    def load(self, data, resolution, val_fraction=0.1, seed=0):
        """-> (train, val, num_classes); train/val are dicts {"x": (n, 3, R, R), "label": (n,) or None}."""
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
        return V.D2CVAE(encoder, decoder, readout, inr.bilinear_lookup)

    def latent_shape(self, cfg):
        """(C, H, W) of the latent the diffusion model sees."""
        r = cfg["resolution"] // 2 ** (len(cfg["enc_mult"]) - 1)
        return (cfg["z_ch"], r, r)

    # -- the ELBO's pieces -----------------------------------------------------------------
    def queries(self, x, K, generator=None):
        """K random pixel centres per image and their colours (K = 0: every pixel)."""
        V = importlib.import_module("02_d2c_vae")
        if K <= 0:
            B, C, H, W = x.shape
            coords = inr.coord_grid(H, W, x.device).reshape(1, H * W, 2).expand(B, -1, -1)
            return coords, x.flatten(2).transpose(1, 2)  # (B, HW, 2), (B, HW, 3)
        return V.random_pixels(x, K, generator)

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
    def write_sheet(rows, path, row_names=None, title=None):
        """Save rows of images (each a (n, 3, R_row, R_row) tensor in [-1, 1]) as one PNG.

        Rows of lower resolution are enlarged with nearest-neighbour copies so that every
        pixel stays visible as it was produced.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = max(r.shape[-1] for r in rows)
        n = max(r.shape[0] for r in rows)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 0.6, 1.3 * len(rows) + 0.4), squeeze=False)
        for i, row in enumerate(rows):
            big = torch.nn.functional.interpolate(row.float().cpu(), size=(size, size), mode="nearest")
            for k in range(n):
                ax = axes[i, k]
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(False)
                if k < len(big):
                    ax.imshow(((big[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            if row_names:
                axes[i, 0].set_ylabel(row_names[i], fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


# One record per modality; the drivers look modalities up here by name.
MODALITIES = {"image": ImageModality()}


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
