"""05 - Modalities: the contract between a kind of signal and the drivers, with images as its example.

The concept (DDMI, Park et al. ICLR 2024, Sec. 3: "domain-agnostic")
--------------------------------------------------------------------
The VAE of file 02, the basis fields and read-out of 03 and the diffusion model of 04 never
look at what a signal means. What does change from images to videos, shapes or radiance
fields is small, and always the same list:

  * what a data item is, and which encoder reads it;
  * how many latent planes there are (one plane, or a tri-plane) and how a coordinate reads
    them (file 01's bilinear or tri-plane lookup);
  * the likelihood of the re-weighted ELBO (L1 for pixels, Bernoulli for occupancy, ...) and
    D_x, the number of values per item that scales it (file 02);
  * how query coordinates and their true values are drawn from a batch;
  * how a decoded INR is rendered at any resolution, scored, and written to disk.

The class `Modality` below is that list as code: every member train.py and sample.py call,
each documented, with defaults where modalities agree (the train/validation split, rendering
in chunks, tri-planes stacked on channels for file 04, picture sheets). A modality is built
once per run from the run's settings and holds nothing else but what `load` learns about the
data. The image modality is the worked example; every other one is its own numbered file,
placed after the ideas it needs: 06_video.py, 09_shapes.py (after meshes in 07 and ray
marching in 08), 11_nerf.py (after volume rendering in 10). The registry at the end finds a
modality by name. Adding a modality means one new file and one registry line.

The image modality
------------------
An image is a function [-1, 1]^2 -> RGB in [-1, 1]. Its latent z is one plane (Z, R/4, R/4);
the decoder produces basis fields at R/4, R/2 and R (HDBF), and the CFC read-out maps their
bilinear embeddings to RGB (file 03). The likelihood is Laplace (L1, file 02). Training draws
K random pixel centres per image (their exact colours are the targets); rendering evaluates
the INR on the pixel-centre grid of any resolution. The built-in dataset is file 01's
synthetic images (three classes, exact at every resolution), one large light primitive per
image on a dark ramp, squares upright: a first run learns to draw them in minutes. A user's folder of pictures is
decoded once by prepare.py into a uint8 array on disk and read from it by index (its train/ and
val/ folders are the split; with --labels folders its class folders are the labels: a
class-conditional model, file 04's guidance); an .npz image array is read into memory.
--hflip mirrors a random half of each batch, the release's only augmentation of photos.

Shape letters: B batch, N coordinates, K coordinates per item in training, D coordinate
dimension, C channels, H W height width, R resolution, T frames, Z latent channels.

Left out on purpose: LPIPS in the image likelihood (the paper adds it; it needs downloaded VGG
weights).
"""
import functools
import importlib
import os

import numpy as np
import torch
import torch.nn.functional as F

import figures
import prepare
import readers

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
H = importlib.import_module("03_hdbf_cfc")


# ----------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------
class Modality:
    """A kind of signal, as train.py and sample.py see it.

    Built from the run's settings (a dict with the fields of train.py's Config, checkpoints keep
    it). The defaults below suit signals on a regular grid (pixels, voxels of a clip); a
    modality whose items are something else (point clouds, posed pictures) overrides them.
    Data items are dicts of tensors sharing their first dimension: "x" (what the encoder reads,
    as stored), "label" (n,) class indices or None, and whatever else the modality needs.

    train.py calls: load (then keeps data_settings), build_vae, latent_shape, encoder_input,
    stack_planes, training_batch, values_per_item, recon, evaluate, describe, preview,
    unstack_planes, write_sheet. sample.py calls: build_vae, latent_shape, unstack_planes,
    sample_arrays, sheet, write_samples, reconstruct, write_sheet. A new modality must fill in
    load and build_encoder (or build_vae), and grid and held_out (or the outputs that use them).
    """

    name = ""  # the --modality value
    classes = ()  # class names of the built-in synthetic data (empty: unlabelled)
    planes = 1  # latent planes: 1, or 3 for a tri-plane
    out_ch = 3  # values the read-out gives per coordinate
    synthetic_train, synthetic_val = 0, 0  # sizes of the built-in dataset
    embed_mult = 1  # field_ch-wide embeddings the lookup returns per scale (3 for concatenated tri-planes)
    eval_batch, recon_batch, sheet_items = 64, 32, 8  # items per batch in evaluate / reconstruct; per sheet row
    batch_values = 64 * 3 * 128 * 128  # at most this many values in such a batch (64 pictures of 128x128)
    upsample = "bicubic"  # the plain interpolation that --reconstruct compares the INR with
    has_time = False  # whether sample.py's --frames means something (videos' frames, NeRF's turntable views)

    def __init__(self, cfg):
        self.resolution = cfg["resolution"]  # side of the data: pixels, or voxels for shapes
        self.plane_res = cfg["plane_res"]  # side of the finest basis field (= resolution for grid signals)
        self.seed, self.val_fraction = cfg["seed"], cfg["val_fraction"]
        # the data: classes from folders (images), random left-right flips, where prepared datasets live
        self.labels, self.hflip, self.cache = cfg["labels"], cfg["hflip"], None if cfg["no_cache"] else cfg["cache"]
        self.augment = cfg["augment"]  # random changes of each stage-1 item (videos, shapes: augment_batch)
        # the VAE's sizes and kind (files 02, 03, 12)
        self.z_ch, self.enc_ch, self.enc_mult = cfg["z_ch"], cfg["enc_ch"], tuple(cfg["enc_mult"])
        self.field_ch, self.mlp_hidden, self.mlp_layers = cfg["field_ch"], cfg["mlp_hidden"], cfg["mlp_layers"]
        self.variant, self.decoder, self.bases = cfg["variant"], cfg["decoder"], cfg["bases"]
        # what `load` learns about the data that the model must know again (kept in the checkpoint's config),
        # and what train.py's data line says of it
        self.data_settings, self.data_note = {}, ""

    # -- data ------------------------------------------------------------------------------
    def load(self, data):
        """-> (train items, validation items, number of classes); data None: the built-in synthetic set."""
        raise NotImplementedError

    def split(self, items, data, what):
        """A fixed random share (val_fraction) of the items held out, the same for every run with this seed."""
        n = len(items["x"])
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 1:
            raise SystemExit(f"--data {data}: {n} {what}(s) found; need at least 2 (training + validation)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        pick = lambda ids: {k: v[ids] if torch.is_tensor(v) else v.subset(ids) if hasattr(v, "subset")
                            else [v[i] for i in ids] if isinstance(v, list) else v for k, v in items.items()}
        return pick(perm[n_val:]), pick(perm[:n_val])

    def encoder_input(self, x):
        """Stored items -> what the encoder reads; here uint8 -> float in [-1, 1] (floats pass as they are)."""
        return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x

    # -- model -----------------------------------------------------------------------------
    def build_encoder(self):
        """data -> posterior parameters (B, 2Z, h, w), or (B, 3, 2Z, h, w) for a tri-plane."""
        raise NotImplementedError

    def lookup(self, field, coords):
        """p = the embedding of coords in one basis field (file 01); one plane: bilinear."""
        return inr.bilinear_lookup(field, coords)

    def decoder_readout(self):
        """File 03's decoder (HDBF fields at three scales) and read-out, sized for this modality."""
        return H.build_decoder_readout(self.variant, self.z_ch, self.field_ch, self.out_ch, self.enc_ch,
                                       self.enc_mult, self.mlp_hidden, self.mlp_layers, self.embed_mult)

    def build_vae(self):
        """The D2C-VAE (file 02): the modality's encoder, file 03's decoder and read-out, its lookup.

        --decoder mnif or hyper swap the decoder for one that generates SIREN weights (file 12).
        """
        if self.decoder != "ddmi":
            W = importlib.import_module(DECODERS[self.decoder])
            return W.build_vae(self.decoder, self.build_encoder(), self.latent_shape, self.out_ch, self.mlp_hidden,
                               self.mlp_layers, self.bases)
        decoder, readout = self.decoder_readout()
        return V.D2CVAE(self.build_encoder(), decoder, readout, self.lookup)

    @property
    def latent_shape(self):
        """(C, h, w) of the latent as the diffusion model sees it: planes stacked on channels, C = planes * Z."""
        h = self.plane_res // 2 ** (len(self.enc_mult) - 1)
        return (self.planes * self.z_ch, h, h)

    def stack_planes(self, z):
        """(B, 3, Z, h, w) -> (B, 3Z, h, w): a tri-plane as one tensor for the UNet (one plane: unchanged)."""
        return z.flatten(1, -3)

    def unstack_planes(self, z):
        """(B, 3Z, h, w) -> (B, 3, Z, h, w): the stacked planes back as three, for the VAE's decoder."""
        return z if self.planes == 1 else z.unflatten(1, (self.planes, -1))

    # -- the ELBO's pieces -----------------------------------------------------------------
    def grid(self, size, device=None):
        """Coordinates of every value of a signal of spatial `size`, (*size, D), in the order of its values."""
        raise NotImplementedError

    def training_batch(self, data, idx, K, generator):
        """Items idx -> (encoder input, K random grid points per item (B, K, D), the signal there (B, K, C)).

        K = 0: every grid point. Every draw comes from `generator`, the run's (augment_batch's too).
        """
        x = self.augment_batch(self.encoder_input(data["x"][idx]), generator)
        grid = self.grid(x.shape[2:], x.device).reshape(-1, len(x.shape[2:]))  # (N, D)
        if K <= 0:
            return x, grid.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)
        return (x, *V.random_samples(x, grid, K, generator))

    def augment_batch(self, x, generator):
        """Random changes of the batch's items before they are encoded and queried: here --hflip, a random
        half mirrored left to right (x -> -x). A change the data could hold is free data: the VAE then
        has to encode what it sees rather than remember which training item it is."""
        if self.hflip:
            flip = (torch.rand(len(x), generator=generator) < 0.5).view(-1, *[1] * (x.dim() - 1))
            x = torch.where(flip, x.flip(-1), x)
        return x

    def batch_items(self, items):
        """Items per evaluation batch: `items`, fewer when they are large (batch_values at most): the
        encoder's and decoder's activations grow with the items' size (~0.9 GB for 64 at 256x256)."""
        return max(1, min(items, self.batch_values // self.values_per_item))

    @property
    def values_per_item(self):
        """D_x of the ELBO's scaling (file 02): values in one item at the training size."""
        return self.out_ch * self.resolution ** 2

    def recon(self, pred, target):
        """-log p(x(c) | z) per item (B,), up to scale: Laplace likelihood, the L1 error (file 02)."""
        return V.l1_recon(pred, target)

    # -- outputs ---------------------------------------------------------------------------
    def size(self, resolution, frames=None):
        """The spatial size of a rendering at `resolution` (frames: for signals in time)."""
        return (resolution, resolution)

    def size_name(self, size):
        """A size as a sheet and the printed lines name it: 64x64."""
        return "x".join(map(str, size))

    def query_grid(self, vae, fields, size):
        """The decoded INRs on the grid of `size`, in chunks (file 02): (B, *size, out)."""
        B = fields[0].shape[0]
        c = self.grid(size, fields[0].device).reshape(1, -1, len(size)).expand(B, -1, -1)  # (B, N, D)
        return V.query_chunked(vae, fields, c).reshape(B, *size, -1)

    def render(self, vae, fields, size):
        """The decoded INRs as signals (B, out, *size) in [-1, 1]."""
        return self.query_grid(vae, fields, size).movedim(-1, 1).clamp(-1, 1)

    def preview(self, vae, fields):
        """What a sheet shows of decoded INRs: here, the signal at the training size."""
        return self.render(vae, fields, self.size(self.resolution))

    def evaluate(self, vae, val, device):
        """Validation PSNR at the training size, from the posterior mean -> (scores, sheet rows, row names)."""
        scores, rec, k, B = [], [], self.sheet_items, self.batch_items(self.eval_batch)
        for i in range(0, len(val["x"]), B):
            x = self.encoder_input(val["x"][i:i + B].to(device))
            r = self.preview(vae, vae.decode(vae.encode(x).mean))
            scores.append(inr.psnr(r, x) * len(x))
            if i < k:  # the sheet's reconstructions only: memory stays that of one batch
                rec.append(r.cpu())
        return ({"psnr": sum(scores) / len(val["x"])}, [self.encoder_input(val["x"][:k]), torch.cat(rec)[:k]],
                ["held out", "reconstructed"])

    def describe(self, scores):
        """One line of the validation scores."""
        return f"validation PSNR {scores['psnr']:.2f} dB"

    def sample_arrays(self, vae, fields, resolutions, frames=None):
        """sample.py: the sampled INRs' outputs at every resolution, {str(R): (B, ...) in [-1, 1]}: what the
        sheet shows and, for more samples than it holds, what is stored for every sample."""
        return {str(R): self.render(vae, fields, self.size(R, frames)).cpu() for R in resolutions}

    def sheet(self, arrays, frames=None):
        """(rows, row names) of a sample sheet from sample_arrays (here one row per resolution)."""
        return list(arrays.values()), [self.size_name(self.size(int(k), frames)) if k.isdigit() else k for k in arrays]

    def write_samples(self, vae, fields, resolutions, stem, first):
        """Files of their own for the samples first, first + 1, ... (none here; shapes write meshes)."""

    def held_out(self, source, resolutions, n, frames=None):
        """--reconstruct's data, the first n items (None: 16 synthetic ones, or all of a dataset):
        (encoder input at the training size, {resolution: the truth at that size})."""
        raise NotImplementedError

    def reconstruct(self, vae, source, resolutions, n, device, frames=None):
        """sample.py --reconstruct: encode the items of `source` at the training size, render each INR at
        every resolution (None: the training one) and print its PSNR against the truth there, beside
        the PSNR of plain interpolation (self.upsample) of the training-size reconstruction -> (sheet
        rows, row names).
        """
        resolutions = resolutions or [self.resolution]
        x_in, truth = self.held_out(source, resolutions, n, frames)
        size0 = self.size(self.resolution)
        rows, names = [], []
        for R in resolutions:
            size, recs, plain, B = self.size(R, frames), [], [], self.batch_items(self.recon_batch)
            for i in range(0, len(x_in), B):
                fields = vae.decode(vae.encode(self.encoder_input(x_in[i:i + B].to(device))).mean)
                recs.append(self.render(vae, fields, size).cpu())
                if size != size0:
                    plain.append(F.interpolate(self.render(vae, fields, size0), size=size, mode=self.upsample,
                                               align_corners=False).clamp(-1, 1).cpu())
            rec, name = torch.cat(recs), self.size_name(size)
            line = f"{name}: mean PSNR {inr.psnr(rec, truth[R]):.2f} dB over {len(rec)} items"
            if size != size0:
                line += (f" ({self.upsample} interpolation of the {self.size_name(size0)} reconstruction: "
                         f"{inr.psnr(torch.cat(plain), truth[R]):.2f} dB)")
            print(line)
            rows += [truth[R][:self.sheet_items], rec[:self.sheet_items]]
            names += [f"data {name}", f"INR {name}"]
        return rows, names

    def write_sheet(self, rows, path, row_names=None, title=None):
        """Rows of outputs as a picture file at `path`; here a PNG sheet of images."""
        figures.write_sheet(rows, path, row_names, title)


# ----------------------------------------------------------------------------------------
# The image modality: the worked example
# ----------------------------------------------------------------------------------------
class ImageModality(Modality):
    """Images (3, R, R), stored as uint8 (users' files) or float in [-1, 1] (synthetic)."""

    name = "image"
    classes = inr.SYNTHETIC_CLASSES
    synthetic_train, synthetic_val = 5000, 256

    def load(self, data):
        R = self.resolution
        if self.labels == "folders" and (data is None or not os.path.isdir(data)):
            raise SystemExit(f"--labels folders: takes the classes from the folders of --data; {data or 'no --data'} "
                             f"is not a folder (the built-in images have their labels already)")
        if data is None:  # file 01's synthetic images with their class labels; the held-out ones keep their parameters
            tr, va = self.synthetic_params(self.synthetic_train, self.seed), self.held_out_params()
            self.data_settings["classes"] = list(self.classes)
            return ({"x": inr.synthetic_images(tr, R, R), "label": tr["label"]},
                    {"x": inr.synthetic_images(va, R, R), "label": va["label"], "params": va}, len(self.classes))
        if data.lower().endswith(".npz") and os.path.isfile(data):  # an image array: in memory
            return (*self.split({"x": readers.read_images(data, R), "label": None}, data, "image"), 0)
        # a folder: decoded once into the cache (prepare.py), then read by index
        found = readers.image_listing(data, "--data", self.labels == "folders")
        x = prepare.prepare(data, found["files"], functools.partial(readers.decode_image, size=R), (3, R, R), {"R": R},
                            self.cache, "--data", "images")
        items = {"x": x, "label": None if found["label"] is None else found["label"][torch.from_numpy(x.index)]}
        self.data_settings["classes"] = found["classes"]
        size = found["size"] or (0, 0)
        notes = [f"{'x'.join(map(str, size))} (the first) -> {R}x{R}", found["layout"], ", ".join(found["classes"])]
        if min(size) >= 4 * R:  # e.g. CelebA-HQ's 1024x1024 at the tiny preset's 32x32
            notes.append(f"the pictures are much larger than {R}x{R}: --resolution or --preset paper trains nearer their size")
        self.data_note = "; ".join(n for n in notes if n)
        if found["held_out"] is None:
            return (*self.split(items, data, "image"), len(found["classes"]))
        held = torch.from_numpy(found["held_out"][x.index])  # the train/ and val/ folders are the split
        pick = lambda m: {"x": x.subset(np.flatnonzero(m)), "label": None if items["label"] is None else items["label"][m]}
        return pick(~held), pick(held), len(found["classes"])

    @staticmethod
    def synthetic_params(n, seed):
        """Parameters of n built-in images (file 01), reproducible from seed: one primitive each, large
        (radius 0.25-0.55), light (colours in [0, 1]) on a dark ramp (colours in [-1, 0]), squares
        upright. A first run learns these shapes in minutes (squares at every angle came out as
        stars: docs/quality.md); files 01-03 demo their ideas on file 01's busier default. The
        built-in clips (file 06) are these pictures set in motion."""
        p = inr.synthetic_params(n, seed=seed, num_shapes=1, sizes=(0.25, 0.55))
        p["bg"], p["colour"] = p["bg"] * 0.5 - 0.5, p["colour"] * 0.5 + 0.5
        p["angle"] = torch.zeros_like(p["angle"])
        return p

    def synthetic(self, n, seed):
        """n built-in images at the training size and their classes: ((n, 3, R, R) in [-1, 1], (n,))."""
        p = self.synthetic_params(n, seed)
        return inr.synthetic_images(p, self.resolution, self.resolution), p["label"]

    def held_out_params(self):
        """Parameters of train.py's held-out synthetic images (a seed of their own)."""
        return self.synthetic_params(self.synthetic_val, self.seed + 1_000_003)

    def build_encoder(self):
        return V.ConvEncoder(3, self.z_ch, self.enc_ch, self.enc_mult)

    def grid(self, size, device=None):
        return inr.coord_grid(*size, device)  # (H, W, 2), pixel centres

    def held_out(self, source, resolutions, n, frames=None):
        """"synthetic": held-out synthetic images, exact at every resolution; else a folder or .npz, read once."""
        R0 = self.resolution
        if source == "synthetic":
            params = {k: v[:n or 16] for k, v in self.held_out_params().items()}
            return inr.synthetic_images(params, R0, R0), {R: inr.synthetic_images(params, R, R) for R in resolutions}
        x = readers.read_images_at(source, {R0, *resolutions}, "--reconstruct", n)
        return x[R0], {R: self.encoder_input(x[R]) for R in resolutions}


def demo_settings(**changes):
    """The settings of a small model, as a run hands them to its modality (train.py: from its config)."""
    return dict(resolution=32, plane_res=32, seed=0, val_fraction=0.1, z_ch=4, enc_ch=32, enc_mult=(1, 2, 2),
                field_ch=16, mlp_hidden=64, mlp_layers=4, variant="hdbf_cfc", decoder="ddmi", bases=16,
                labels="none", hflip=False, augment=False, cache="", no_cache=True, clip_stride=0) | changes


def fit(mod, vae, train, steps, batch, K, lr=1e-3, lambda_z=1e-3, seed=1):
    """Stage 1 through the contract alone, in its simplest form (the demos' loop; train.py adds the run
    engine): Adam on the re-weighted ELBO of file 02, every draw from one generator. -> vae, in eval mode."""
    opt, gen = torch.optim.Adam(vae.parameters(), lr=lr), torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, coords, target = mod.training_batch(train, torch.randint(len(train["x"]), (batch,), generator=gen), K, gen)
        terms = V.elbo_loss(vae, x, coords, target, V.kl_weight(step, steps, lambda_z), mod.values_per_item, mod.recon)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    return vae.eval()


# ----------------------------------------------------------------------------------------
# The registry: modalities and weight-generating decoders by name, and the files that hold them
# ----------------------------------------------------------------------------------------
MODALITIES = {"image": ("05_modalities", "ImageModality"), "video": ("06_video", "VideoModality"),
              "shape": ("09_shapes", "ShapeModality"), "nerf": ("11_nerf", "NerfModality")}
DECODERS = {"mnif": "12_weight_generation", "hyper": "12_weight_generation"}  # besides "ddmi" (file 03)


def modality(cfg):
    """The modality named by cfg["modality"], built with the run's settings cfg."""
    file, cls = MODALITIES[cfg["modality"]]
    return getattr(importlib.import_module(file), cls)(cfg)


# ----------------------------------------------------------------------------------------
# Demo: stage 1 through the contract only, then the INR at four resolutions against exact images
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    t0 = time.time()
    mod = ImageModality(demo_settings())  # a small image model (a run's settings come from train.py's config)
    mod.synthetic_train = 2000  # fewer items than a real run: the demo is about the contract, not the data
    train, val, num_classes = mod.load(None)
    steps = 400
    vae = fit(mod, mod.build_vae(), train, steps, batch=16, K=256)  # what train.py's stage 1 does
    with torch.no_grad():
        scores, _, _ = mod.evaluate(vae, val, "cpu")
        print(f"{steps} steps ({time.time() - t0:.0f} s): {mod.describe(scores)} on {len(val['x'])} held-out images")
        # the same INRs at 32, 64, 128 and 256 against the exact synthetic images (sample.py --reconstruct)
        rows, names = mod.reconstruct(vae, "synthetic", [32, 64, 128, 256], 16, "cpu")
    os.makedirs("out", exist_ok=True)
    mod.write_sheet(rows[::2][-1:] + rows[1::2], "out/05_modalities.png", names[::2][-1:] + names[1::2],
                    "exact 256x256 images (top) and one INR per image rendered at 32, 64, 128, 256")
    print("wrote out/05_modalities.png")
