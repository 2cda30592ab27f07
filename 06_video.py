"""06 - Videos: a tri-plane over (x, y, t), so time is as continuous as space.

The concept (DDMI, Park et al. ICLR 2024, Sec. 4.3)
---------------------------------------------------
A clip is the function v: [-1, 1]^3 -> RGB of (x, y, t). Frame k of T sits at the time
t_k = -1 + (2k + 1) / T, the same pixel-centre rule as x and y (file 01), so a model trained
on 16 frames can be asked for frame 3.5, or for 32 frames at twice the frame rate.

Its latent is a tri-plane over (x, y, t): planes xy, xt and yt (file 01's TRIPLANE_AXES, read
with t as the third axis). A query (x, y, t) is projected onto the three planes, each plane's
basis fields (HDBF, file 03) are read bilinearly, and the three embeddings are CONCATENATED
(the paper's choice for video: the time planes carry other information than the xy plane,
and a sum would blur them together) before the CFC read-out maps them to RGB:

    p_s(x, y, t) = [bilinear(Xi_s^xy, (x, y)), bilinear(Xi_s^xt, (x, t)), bilinear(Xi_s^yt, (y, t))]

Everything else is the image modality's (file 05): the L1 likelihood, K random grid points
per item and step, and the same defaults of the contract; a grid point is now a voxel of the
clip, (x, y, t) of its centre.

Encoder: we chose 3D convolutions over the paper's TimeSformer-like transformer. At the sizes a
CPU trains (16 frames of 32x32 or 64x64) a few 3D convolutions see the whole clip and cost
little; attention's long range matters at 256x256, where a user has a GPU and can swap the
trunk. The trunk halves x and y per level (time keeps its frames), and its feature volume
(B, C, T, h, h) is resampled to an h x h x h cube and averaged along one axis per plane:

    xy = mean over t,   xt = mean over y,   yt = mean over x

then one shared 2D conv head makes each plane's posterior. Resampling time to h makes the three
planes equal (the paper's time planes are smaller), so they stack on channels (B, 3Z, h, h)
for file 04's UNet exactly like a shape's tri-plane, with no packing scheme to explain.

The built-in clips are file 05's built-in pictures (one large primitive) set in motion:
centre(t) = centre + velocity * t, exact at any size and frame rate. Users' clips (a folder of frame
folders, or an .npz/.npy array) are read by readers.py; outputs are a GIF and a frame strip.

Shape letters: B batch, C channels, T frames, H W height width, h latent side, K coordinates
per item, Z latent channels.

Left out on purpose: the paper's space-time transformer and its unequal time planes (above),
and clips longer than the model's frames (a sliding window over t).
"""
import functools
import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import figures
import prepare
import readers

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
M = importlib.import_module("05_modalities")


def video_grid(T, H, W, device=None):
    """(x, y, t) of every voxel centre of a clip, (T, H, W, 3)."""
    t, y, x = inr.pixel_centers(T, device), inr.pixel_centers(H, device), inr.pixel_centers(W, device)
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")  # (T, H, W) each
    return torch.stack([xx, yy, tt], -1)


def synthetic_video_params(n, seed=0):
    """The built-in pictures' parameters (file 05: one large light primitive on a dark ramp), plus a
    velocity per primitive (coordinate units per unit of t)."""
    p = M.ImageModality.synthetic_params(n, seed)
    g = torch.Generator().manual_seed(seed + 7)
    # t spans 2 over a clip: a primitive moves at most 0.6 along each axis over the clip
    p["velocity"] = (torch.rand(n, p["centre"].shape[1], 2, generator=g) * 2 - 1) * 0.3  # (n, S, 2)
    return p


def synthetic_clips(params, T, H, W):
    """The synthetic videos rendered exactly at any size and frame count: (n, 3, T, H, W) in [-1, 1]."""
    n = params["label"].shape[0]
    c = video_grid(T, H, W).reshape(1, -1, 3).expand(n, -1, -1)  # (n, T H W, 3)
    return inr.synthetic_render(params, c).reshape(n, T, H, W, 3).permute(0, 4, 1, 2, 3).contiguous()


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
        # per plane (shared weights): GroupNorm, SiLU, conv to the mean and log-variance
        self.head = nn.Sequential(V.norm(chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], 2 * z_ch, 3, padding=1))

    def forward(self, clips):
        planes = collapse_volume(self.trunk(clips))  # (B, 3, C, h, h)
        B = planes.shape[0]
        return self.head(planes.flatten(0, 1)).unflatten(0, (B, 3))  # (B, 3, 2Z, h, h)


# ----------------------------------------------------------------------------------------
# The video modality
# ----------------------------------------------------------------------------------------
class VideoModality(M.Modality):
    """Clips (3, T, R, R), stored as uint8 (users' files) or float in [-1, 1] (synthetic); T = --frames."""

    name = "video"
    classes = inr.SYNTHETIC_CLASSES
    planes, embed_mult = 3, 3  # a tri-plane whose three embeddings are concatenated
    synthetic_train, synthetic_val = 1000, 64
    eval_batch, recon_batch, sheet_items = 16, 8, 6
    upsample = "trilinear"  # in x, y and t
    has_time = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.frames = cfg["frames"]  # T of the training clips
        self.clip_stride = cfg["clip_stride"]  # video files: a clip every this many frames (0: every T)

    def load(self, data):
        R, T = self.resolution, self.frames
        if data is None:  # the built-in synthetic clips with their classes
            tr, va = synthetic_video_params(self.synthetic_train, seed=self.seed), self.held_out_params()
            self.data_settings["classes"] = list(self.classes)  # the sheet's rows are named by class
            return ({"x": synthetic_clips(tr, T, R, R), "label": tr["label"]},
                    {"x": synthetic_clips(va, T, R, R), "label": va["label"], "params": va}, len(self.classes))
        if os.path.isfile(data):  # a clip array: in memory
            return (*self.split({"x": readers.read_clips(data, T, R), "label": None}, data, "clip"), 0)
        # a folder of clip folders or video files: decoded once into the cache (prepare.py), read by index
        clips = readers.clip_listing(data, T, self.clip_stride or T)
        files = sorted({f for source, _ in clips for f in (source if isinstance(source, tuple) else [source])})
        x = prepare.prepare(data, clips, functools.partial(readers.decode_clip, frames=T, size=R), (3, T, R, R),
                            {"R": R, "T": T, "stride": self.clip_stride or T}, self.cache, "--data", "clips", files=files)
        return (*self.split({"x": x, "label": None}, data, "clip"), 0)

    def held_out_params(self):
        return synthetic_video_params(self.synthetic_val, seed=self.seed + 1_000_003)

    def augment_batch(self, x, generator):
        """--augment: each clip cropped (a random square of 3/4 to all of its side, anywhere in it) and
        resized back, mirrored left to right or not, played forwards or backwards. A few dozen clips
        become a stream of new ones. The crop is file 01's bilinear lookup at the pixel centres of the
        clip mapped into the square: c -> a * (s c) + o, s = +-1 the mirror, a the side, o the offset."""
        if not self.augment:
            return super().augment_batch(x, generator)
        B, C, T, H, W = x.shape
        u = torch.rand(B, 5, generator=generator)  # side, mirror, offset x, offset y, backwards
        a = 0.75 + 0.25 * u[:, 0]  # (B,) the square's side, as a share of the clip's
        s = torch.where(u[:, 1] < 0.5, -1.0, 1.0)  # (B,) mirrored or not
        o = (1 - a)[:, None] * (u[:, 2:4] * 2 - 1)  # (B, 2) its centre, anywhere that keeps it inside
        c = inr.coord_grid(H, W, x.device).reshape(1, H * W, 2)  # (1, HW, 2) pixel centres (x, y)
        c = c * torch.stack([a * s, a], -1)[:, None] + o[:, None]  # (B, HW, 2) where each pixel reads
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # every frame of a clip reads the same square
        x = inr.bilinear_lookup(frames, c.repeat_interleave(T, 0))  # (B T, HW, C)
        x = x.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        backwards = (u[:, 4] < 0.5).view(B, 1, 1, 1, 1)
        return torch.where(backwards, x.flip(2), x)

    def synthetic(self, n, seed):
        """n built-in clips at the training size and their classes: ((n, 3, T, R, R) in [-1, 1], (n,))."""
        p = synthetic_video_params(n, seed)
        return synthetic_clips(p, self.frames, self.resolution, self.resolution), p["label"]

    def build_encoder(self):
        return VideoEncoder(self.z_ch, self.enc_ch, self.enc_mult)

    def lookup(self, field, coords):
        # p = [p_xy, p_xt, p_yt]: the three planes' embeddings concatenated
        return inr.triplane_lookup(field, coords, combine="concat")

    def grid(self, size, device=None):
        return video_grid(*size, device)  # (T, H, W, 3), voxel centres

    @property
    def values_per_item(self):
        """D_x: colour values per clip."""
        return 3 * self.frames * self.resolution ** 2

    def size(self, resolution, frames=None):
        """(T, R, R); any number of frames, since t is continuous (default: the training T)."""
        return (frames or self.frames, resolution, resolution)

    def size_name(self, size):
        return f"{size[1]}x{size[2]}, {size[0]} frames"

    def held_out(self, source, resolutions, n, frames=None):
        """"synthetic": the first n held-out clips, exact at any size and frame count; else clips of --data's
        formats, compared at their own frames (the first T of each)."""
        R0, T0, T = self.resolution, self.frames, frames or self.frames
        if source == "synthetic":
            params = {k: v[:n or 16] for k, v in self.held_out_params().items()}
            return synthetic_clips(params, T0, R0, R0), {R: synthetic_clips(params, T, R, R) for R in resolutions}
        if T != T0:
            raise SystemExit(f"--frames {T}: data clips are compared at their own {T0} frames; "
                             f"use --reconstruct synthetic for other frame rates")
        x = readers.read_clips_at(source, T0, {R0, *resolutions}, "--reconstruct", n)
        return x[R0], {R: self.encoder_input(x[R]) for R in resolutions}

    def write_sheet(self, rows, path, row_names=None, title=None):
        """A frame strip PNG at `path` and the animated GIF beside it (.png -> .gif)."""
        figures.write_clips(rows, path, row_names, title)


# ----------------------------------------------------------------------------------------
# Demo: a video VAE fit to eight clips of 8 frames, then asked for 16 frames: the times between
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    t0 = time.time()
    mod = VideoModality(M.demo_settings(frames=8, z_ch=8, enc_ch=16))
    params = synthetic_video_params(8, seed=0)
    clips = {"x": synthetic_clips(params, 8, 32, 32), "label": params["label"]}  # (8, 3, 8, 32, 32)
    vae = M.fit(mod, mod.build_vae(), clips, steps := 400, batch=8, K=2048)  # stage 1 (file 05)
    with torch.no_grad():
        fields = vae.decode(vae.encode(clips["x"]).mean)
        at_8, at_16 = mod.render(vae, fields, (8, 32, 32)), mod.render(vae, fields, (16, 32, 32))
        exact_16 = synthetic_clips(params, 16, 32, 32)  # the truth at the times between the training frames
        plain = F.interpolate(at_8, size=(16, 32, 32), mode="trilinear", align_corners=False)
    # none of the 16 times is a training time: t = -1 + (2j + 1) / 16 against -1 + (2k + 1) / 8
    print(f"{steps} steps in {time.time() - t0:.0f} s. PSNR against the exact clips: {inr.psnr(at_8, clips['x']):.2f} dB "
          f"at the 8 training frames, {inr.psnr(at_16, exact_16):.2f} dB at 16 frames, all at new times "
          f"(trilinear interpolation of the 8 rendered frames: {inr.psnr(plain, exact_16):.2f} dB)")
    mod.write_sheet([exact_16[:4], at_16[:4]], "out/06_video.png", ["exact, 16 frames", "INR, 16 frames"],
                    "clips learnt at 8 frames, rendered at 16")
    print("wrote out/06_video.png and out/06_video.gif")
