"""Readers: the users' files -> tensors, with a one-line error for every bad input.

Plumbing, not a concept: each modality (files 05, 06, 09, 11) calls the reader of its formats
from its `load`. A reader names the flag and the file when something is wrong, and what it
expected, and never runs code from a file (`np.load(..., allow_pickle=False)`).

  pictures  a folder of pictures (searched recursively) or an .npz image array  -> uint8 (n, 3, R, R)
  clips     a folder of clip folders of frames or of video files (PyAV), or an .npz/.npy clip array
                                                                                -> uint8 (n, 3, T, R, R)
  shapes    an .npz of occupancy grids + surface points, or the ConvONet layout
  scenes    posed pictures: NeRF-synthetic folders, SRN folders, or an .npz
"""
import functools
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import prepare

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mov", ".mkv")
HELD_OUT = ("val", "valid", "validation", "test")  # beside train/, the folder of held-out items


def numeric(a, finite=True):
    """Whether an array holds numbers (bool, integer or float), all finite when asked."""
    a = np.asarray(a)
    return a.dtype.kind in "biuf" and (not finite or a.dtype.kind != "f" or bool(np.isfinite(a).all()))


def number(value, what, flag, path, positive=False):
    """A single finite number read from a file (an array of one element, or text), or a one-line error."""
    a = np.asarray(value)
    try:
        x = float(a.reshape(())) if a.dtype.kind in "iuf" else float(str(a.reshape(())))
    except (ValueError, TypeError):
        x = math.nan
    if not math.isfinite(x) or (positive and x <= 0):
        raise SystemExit(f"{flag} {path}: '{what}' is {a.dtype} {a.shape}; expected one finite"
                         f"{' positive' if positive else ''} number")
    return x


# ----------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------
def to_unit_rgba(a):
    """numpy (..., H, W, C), C = 1 (grey), 2 (grey + alpha), 3 or 4, uint8 or float in [0, 1]
    -> float32 (..., H, W, 4) RGBA in [0, 1], alpha 1 where there is none."""
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    C = a.shape[-1]
    rgb = a[..., :3] if C >= 3 else np.repeat(a[..., :1], 3, axis=-1)
    alpha = a[..., C - 1:] if C in (2, 4) else np.ones_like(a[..., :1])
    return np.concatenate([rgb, alpha], -1)


def to_unit_rgb(a):
    """numpy (..., H, W, C) as for to_unit_rgba -> float32 (..., 3, H, W), alpha dropped."""
    return np.ascontiguousarray(np.moveaxis(to_unit_rgba(a)[..., :3], -1, -3))


def read_picture(path, flag="--data"):
    """One picture file -> float32 numpy (H, W, 4) RGBA in [0, 1]; 8- and 16-bit files both work."""
    import matplotlib.image

    try:
        a = matplotlib.image.imread(path)  # (H, W), (H, W, C); float in [0, 1] (PNG) or uint8 (JPEG)
    except Exception as e:  # a truncated or non-image file: name it
        raise SystemExit(f"{flag} {path}: cannot read this image ({type(e).__name__}: {e})")
    return to_unit_rgba(a[..., None] if a.ndim == 2 else a)


def square_uint8(x, resolution):
    """(B, 3, H, W) float in [0, 1] -> (B, 3, R, R) uint8: centre crop to the largest square, resize."""
    H, W = x.shape[-2:]
    s = min(H, W)
    x = x[..., (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    # antialias=True: a proper low-pass when shrinking, so no aliasing in the training data
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


_DIGITS = re.compile(r"(\d+)")


def natural(name):
    """Sort key of natural order: digits compare as numbers, so frame 2 comes before frame 10."""
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(name)]


def walk(folder, extensions):
    """Every file with one of `extensions` under `folder`, in natural order: symlinked folders are
    followed (each real folder once, so a link loop ends), hidden and AppleDouble (._x) files skipped."""
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=natural)
        found += [os.path.join(root, f) for f in sorted(files, key=natural)
                  if not f.startswith(".") and f.lower().endswith(extensions)]
    return found


def find_images(folder, flag="--data"):
    """Every image file under `folder` (searched recursively, see walk), in natural order."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{flag} {folder}: not a folder or an .npz file (expected images or an image array)")
    paths = walk(folder, IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"{flag} {folder}: no images ({' '.join(IMAGE_EXTENSIONS)}) found, sub-folders searched too")
    return paths


def image_listing(root, flag="--data", labels=False):
    """The images of a folder, its split and its classes: {"files", "held_out" (bool per file, or None
    when the folder has no train/ and val/ (or test/) sub-folders), "label" and "classes" (the first
    sub-folder level below root or below the split folders, with labels=True), "layout"}."""
    subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))} if os.path.isdir(root) else {}
    val = next((subdirs[d] for d in HELD_OUT if d in subdirs), None)
    parts = [(os.path.join(root, subdirs["train"]), False), (os.path.join(root, val), True)] \
        if "train" in subdirs and val else [(root, None)]
    files, held_out, names = [], [], []
    for folder, held in parts:
        found = find_images(folder, flag)
        start = len(os.path.join(folder, ""))  # (walk's paths all begin with folder/: no relpath, which is slow)
        files += found
        held_out += [held] * len(found)
        names += [f[start:].split(os.sep, 1)[0] if os.sep in f[start:] else None for f in found]
    classes = sorted({c for c in names if c is not None}, key=natural) if labels else []
    if labels and (len(classes) < 2 or None in names):
        where = "train/ and val/" if parts[0][1] is not None else "it"
        raise SystemExit(f"--labels folders: {root}: every image must sit in a class folder (two or more) below {where}; "
                         f"found {len(classes)} class folder(s) and {names.count(None)} image(s) outside them")
    layout = f"{os.path.basename(parts[0][0])}/ and {val}/ folders" if val and parts[0][1] is not None else ""
    from PIL import Image  # (installed with matplotlib; it reads only the header here)

    size = None  # (width, height) of the first image that opens; a broken one is named later, when decoded
    for f in files[:8]:
        try:
            with Image.open(f) as first:
                size = first.size
            break
        except Exception:
            continue
    return {"files": files, "held_out": None if parts[0][1] is None else np.array(held_out), "classes": classes,
            "label": torch.tensor([classes.index(c) for c in names]) if labels else None, "layout": layout, "size": size}


def decode_image(path, size, flag="--data"):
    """One image file -> uint8 numpy (3, size, size), as read_image; a JPEG much larger than `size` is
    decoded at 1/2, 1/4 or 1/8 of its size by the decoder itself (Pillow's draft mode), which is faster."""
    if not path.lower().endswith((".jpg", ".jpeg")):
        return read_image(path, size, flag).numpy()
    from PIL import Image  # (installed with matplotlib)

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # the smallest scale that keeps both sides >= size
            a = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this image ({type(e).__name__}: {e})")
    return square_uint8(torch.from_numpy(to_unit_rgb(a))[None], size)[0].numpy()


def read_image(path, resolution, flag="--data"):
    """One image file -> uint8 (3, R, R): centre-cropped, resized; grey repeated to RGB, alpha dropped."""
    return read_image_at(path, [resolution], flag)[resolution]


def read_image_at(path, sizes, flag="--data"):
    """One image file, decoded once -> {R: uint8 (3, R, R)} for every size R."""
    rgb = torch.from_numpy(np.ascontiguousarray(np.moveaxis(read_picture(path, flag)[..., :3], -1, -3)))[None]
    return {R: square_uint8(rgb, R)[0] for R in sizes}


class Progress:
    """A line every 10 s for long reads: items done, items per second, time left."""

    def __init__(self, total, what):
        self.total, self.what, self.t0, self.last = total, what, time.time(), time.time()

    def __call__(self, done):
        now = time.time()
        if now - self.last >= 10 and done < self.total:
            rate = done / (now - self.t0)
            print(f"{self.what}: {done}/{self.total} ({rate:.0f}/s, {(self.total - done) / rate:.0f} s left)", flush=True)
            self.last = now


def read_npz_array(path, names, flag):
    """The array of an .npz named one of `names`, or its only array -> (numpy array, its name)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            key = next((k for k in names if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise SystemExit(f"{flag} {path}: expected an array named '{names[0]}' (or a single array); "
                                 f"found {', '.join(keys) or 'none'}")
            return f[key], key
    except SystemExit:
        raise
    except Exception as e:  # not an .npz, truncated, or pickled objects inside
        raise SystemExit(f"{flag} {path}: cannot read this .npz ({type(e).__name__}: {str(e)[:120]})")


def read_npz_images(path, sizes, flag="--data", n=None):
    """An .npz holding one image array (key 'images', or its only array), its first n images
    -> {R: uint8 (n, 3, R, R)} for every size R.

    The array is (n, H, W) greyscale or (n, H, W, C) with C = 1, 3 or 4; uint8, or float in [0, 1].
    """
    a, key = read_npz_array(path, ("images",), flag)
    a = a[:n]
    shape_ok = a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3, 4))
    kind_ok = a.dtype == np.uint8 or (a.dtype.kind == "f" and a.size and 0 <= a.min() and a.max() <= 1)
    if not (shape_ok and kind_ok and len(a) > 0):
        raise SystemExit(f"{flag} {path}: array '{key}' is {a.dtype} {a.shape}; expected (n, H, W) or "
                         f"(n, H, W, C) with C = 1, 3 or 4, uint8 or float in [0, 1]")
    a = a[..., None] if a.ndim == 3 else a  # (n, H, W, C)
    out = {R: [] for R in sizes}
    for i in range(0, len(a), 256):  # in chunks, so a large uint8 array is never converted to float all at once
        x = torch.from_numpy(to_unit_rgb(a[i:i + 256]))
        for R in sizes:
            out[R].append(square_uint8(x, R))
    return {R: torch.cat(v) for R, v in out.items()}


def read_images(path, resolution, flag="--data"):
    """A folder of image files, or an .npz holding an image array -> uint8 (n, 3, R, R)."""
    return read_images_at(path, [resolution], flag)[resolution]


def read_images_at(path, sizes, flag="--data", n=None):
    """The first n images (None: all) of a folder or an .npz, each decoded once -> {R: uint8 (n, 3, R, R)}."""
    if path.lower().endswith(".npz") and os.path.isfile(path):
        return read_npz_images(path, sizes, flag, n)
    paths = find_images(path, flag)[:n]
    progress, images = Progress(len(paths), f"{flag} {path}: reading images"), []
    for i, p in enumerate(paths):
        images.append(read_image_at(p, sizes, flag))
        progress(i + 1)
    return {R: torch.stack([im[R] for im in images]) for R in sizes}


# ----------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------
def read_clips(path, frames, resolution, flag="--data"):
    """A clip folder or a clip array -> uint8 (n, 3, T, R, R) (see read_clips_at)."""
    return read_clips_at(path, frames, [resolution], flag)[resolution]


def read_clips_at(path, frames, sizes, flag="--data", n=None):
    """The first n clips (None: all) of a clip folder (SkyTimelapse layout) or an .npz/.npy clip array,
    each frame decoded once -> {R: uint8 (n, 3, T, R, R)} for every size R.

    Folder: clip folders of frames, or video files (see clip_listing); a file's clips are its
    windows of T frames, one after the other.
    Array: (n, T0, H, W, 3) RGB or (n, T0, H, W) grey, uint8 or float in [0, 1], key 'clips'
    (or the only array), T0 >= T. Frames are centre-cropped and resized like images.
    """
    if os.path.isfile(path) and path.lower().endswith((".npz", ".npy")):
        if path.lower().endswith(".npy"):
            try:
                a, key = np.load(path, mmap_mode="r", allow_pickle=False), "array"
            except Exception as e:
                raise SystemExit(f"{flag} {path}: cannot read this array ({type(e).__name__}: {str(e)[:120]})")
        else:
            a, key = read_npz_array(path, ("clips",), flag)
        ok = (a.ndim == 4 or (a.ndim == 5 and a.shape[-1] in (1, 3, 4))) and len(a) and a.shape[1] >= frames
        ok = ok and (a.dtype == np.uint8 or (a.dtype.kind == "f" and 0 <= a.min() and a.max() <= 1))
        if not ok:
            raise SystemExit(f"{flag} {path}: {key} is {a.dtype} {a.shape}; expected clips (n, T, H, W, 3) or "
                             f"(n, T, H, W), uint8 or float in [0, 1], with T >= {frames} frames")
        a = a[:n, :frames]
        a = a[..., None] if a.ndim == 4 else a  # (n, T, H, W, C)
        out = {R: [] for R in sizes}
        for i in range(0, len(a), 16):  # every frame is an image: time folded into the batch, 16 clips at a time
            x = torch.from_numpy(to_unit_rgb(np.asarray(a[i:i + 16]).reshape(-1, *a.shape[2:])))
            for R in sizes:
                out[R].append(square_uint8(x, R))
        return {R: torch.cat(v).reshape(len(a), frames, 3, R, R).transpose(1, 2).contiguous() for R, v in out.items()}
    clips = clip_listing(path, frames, frames, flag)[:n]
    read = [read_clip_at(c, frames, sizes, flag) for c in clips]
    return {R: torch.from_numpy(np.stack([c[R] for c in read])) for R in sizes}  # (n, 3, T, R, R)


def clip_listing(path, frames, stride, flag="--data"):
    """The clips of a folder, in natural order -> [(source, first frame)], each T = `frames` frames long.

    A folder of clip folders (SkyTimelapse: path/<clip>/<frame>.png, groups of clip folders too):
    each folder of frames gives its first T frames, (frame files, 0). A folder of video files
    (UCF-101: .mp4/.avi/.webm/...; needs PyAV): each file gives windows of T frames every `stride`
    frames, (file, first frame). Shorter clips are skipped, and said.
    """
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: not a folder or an .npz/.npy file (expected a folder of clip "
                         f"sub-folders of frames, a folder of video files, or a clip array)")
    videos, clips, lengths = walk(path, VIDEO_EXTENSIONS), [], []
    if videos:
        for v in videos:
            lengths.append(len(video_frames(v, None, flag)))
            clips += [(v, start) for start in range(0, lengths[-1] - frames + 1, stride)]
    else:
        by_folder = {}  # the frames of each folder, folders in walk's (natural) order
        for f in walk(path, IMAGE_EXTENSIONS):
            if os.path.dirname(f) != os.path.normpath(path):
                by_folder.setdefault(os.path.dirname(f), []).append(f)
        lengths = [len(v) for v in by_folder.values()]
        clips = [(tuple(v[:frames]), 0) for v in by_folder.values() if len(v) >= frames]
    if not clips:
        raise SystemExit(f"{flag} {path}: no clip with {frames} frames or more (found {len(lengths)} "
                         f"{'video file' if videos else 'clip folder'}(s), longest {max(lengths, default=0)} frames); "
                         f"expected {path}/<clip>/<frame>.png or {path}/<clip>.mp4")
    if short := sum(n < frames for n in lengths):
        print(f"{flag} {path}: skipped {short} clip(s) shorter than {frames} frames")
    return clips


def read_clip_at(clip, frames, sizes, flag="--data"):
    """One clip of clip_listing -> {R: uint8 numpy (3, T, R, R)} for every size R."""
    source, start = clip
    if isinstance(source, tuple):  # frame files
        read = [read_image_at(f, sizes, flag) for f in source]
        return {R: torch.stack([f[R] for f in read], 1).numpy() for R in sizes}
    out = {R: np.ascontiguousarray(video_frames(source, R, flag)[start:start + frames].transpose(1, 0, 2, 3))
           for R in sizes}
    if any(x.shape[1] < frames for x in out.values()):  # a header that promised more frames than there are
        raise SystemExit(f"{flag} {source}: frames {start}..{start + frames - 1} cannot be decoded")
    return out


def decode_clip(clip, frames, size, flag="--data"):
    """One clip of clip_listing -> uint8 numpy (3, T, R, R) (prepare.py's decoder)."""
    return read_clip_at(clip, frames, [size], flag)[size]


@functools.lru_cache(maxsize=2)
def video_frames(path, size, flag="--data"):
    """Every frame of a video file -> uint8 numpy (N, 3, R, R) (size None: (N, 0, 0, 0), to count them).

    The frames of the last files read are kept: a file's windows are read one after the other.
    """
    try:
        import av  # PyAV: an optional extra, needed for video files only
    except ImportError:
        raise SystemExit(f"{flag} {path}: video files need PyAV: pip install av "
                         f"(or give folders of frames: <clip>/<frame>.png)") from None
    try:
        with av.open(path) as container:
            if not size and container.streams.video[0].frames:  # counted in the header
                return np.zeros((container.streams.video[0].frames, 0, 0, 0), np.uint8)
            out, batch = [], []
            for frame in container.decode(video=0):
                batch.append(frame.to_ndarray(format="rgb24") if size else None)
                if len(batch) == 16:
                    out.append(_frames_uint8(batch, size))
                    batch = []
            out.append(_frames_uint8(batch, size))
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this video ({type(e).__name__}: {str(e)[:120]})")
    return np.concatenate(out)


def _frames_uint8(batch, size):
    """Decoded RGB frames [(H, W, 3) uint8] -> uint8 (n, 3, R, R), cropped and resized like images."""
    if not size:
        return np.zeros((len(batch), 0, 0, 0), np.uint8)
    if not batch:
        return np.zeros((0, 3, size, size), np.uint8)
    return square_uint8(torch.from_numpy(to_unit_rgb(np.stack(batch))), size).numpy()


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------
def read_shape_npz(path, flag="--data"):
    """An .npz like meshes21_occ64_pts8k.npz -> surface points (n, P, 3) and grids (n, R, R, R) in [-1, 1]^3.

    Arrays: `surface_points` (n, P, 3) and either `occ_packed` (n, R^3 / 8, np.packbits of a
    bool (R, R, R) grid, with `res` = R) or `occupancy` (n, R, R, R); `names` optional. Grid axes
    x, y, z, voxel centres tiling [-0.5, 0.5]^3 (the Occupancy Networks unit cube), scaled by 2
    onto our [-1, 1]^3. Returns a dict: "surface" float (n, P, 3), "grid" bool, "names" or None.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.keys()}
    except Exception as e:
        raise SystemExit(f"{flag} {path}: cannot read this .npz ({type(e).__name__}: {e})")
    surface = arrays.get("surface_points")
    if surface is None or surface.ndim != 3 or surface.shape[-1] != 3 or not len(surface) or not numeric(surface):
        raise SystemExit(f"{flag} {path}: expected 'surface_points' shaped (n, P, 3), finite numbers; "
                         f"found {', '.join(f'{k} {v.dtype} {v.shape}' for k, v in arrays.items())}")
    if np.abs(surface).max() > 0.55:  # (a margin for points on the cube's faces)
        raise SystemExit(f"{flag} {path}: 'surface_points' reach {np.abs(surface).max():.3g}; expected the unit cube "
                         f"[-0.5, 0.5]^3 (scale the meshes to fit it)")
    n = len(surface)
    if "occupancy" in arrays:
        grid = arrays["occupancy"]
        if not numeric(grid) or not np.isin(grid, (0, 1)).all():
            raise SystemExit(f"{flag} {path}: 'occupancy' is {grid.dtype} with values other than 0 and 1; "
                             f"expected a bool grid (n, R, R, R)")
        grid = grid.astype(bool)
    elif "occ_packed" in arrays and "res" in arrays:
        R = int(number(arrays["res"], "res", flag, path, positive=True))
        if arrays["occ_packed"].dtype != np.uint8 or arrays["occ_packed"].shape != (n, R ** 3 // 8):
            raise SystemExit(f"{flag} {path}: 'occ_packed' is {arrays['occ_packed'].dtype} {arrays['occ_packed'].shape}; "
                             f"expected uint8 ({n}, {R ** 3 // 8}), np.packbits of ({n}, {R}, {R}, {R}) bools")
        grid = np.unpackbits(arrays["occ_packed"], axis=1).reshape(n, R, R, R).astype(bool)
    else:
        raise SystemExit(f"{flag} {path}: expected an occupancy grid ('occ_packed' + 'res', or 'occupancy')")
    if grid.ndim != 4 or grid.shape[0] != n or len(set(grid.shape[1:])) != 1:
        raise SystemExit(f"{flag} {path}: occupancy grid is {grid.shape}; expected ({n}, R, R, R)")
    names = [str(v) for v in arrays["names"]] if "names" in arrays and len(arrays["names"]) == n else None
    # [-0.5, 0.5]^3 -> [-1, 1]^3
    return {"surface": torch.from_numpy(surface.astype(np.float32)) * 2, "grid": torch.from_numpy(grid), "names": names}


def convonet_classes(root, flag="--data"):
    """The class folders of a ConvONet root (or [root] when it is itself one class folder)."""
    if not os.path.isdir(root):
        raise SystemExit(f"{flag} {root}: not a folder or an .npz file")
    if any(os.path.isfile(os.path.join(root, d, "points.npz")) for d in os.listdir(root)):
        return [root]
    return sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def convonet_listing(root, split=None, flag="--data"):
    """The shape folders of the Occupancy Networks / ConvONet ShapeNet layout, in natural order.

    root/<class>/<id>/points.npz and pointcloud.npz; the ids of a split are those listed in
    root/<class>/<split>.lst (split None, or no list: every id folder). root may also be a single
    class folder. Listed ids whose folder is missing stay in the list: decode_convonet names them,
    and prepare.py leaves them out with a warning when they are few.
    """
    shapes = []
    for folder in convonet_classes(root, flag):
        lst = os.path.join(folder, f"{split}.lst")
        if split and os.path.isfile(lst):
            shapes += [os.path.join(folder, i) for i in open(lst).read().split()]
        else:
            shapes += [os.path.join(folder, d) for d in sorted(os.listdir(folder), key=natural)
                       if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")]
    if not any(os.path.isfile(os.path.join(d, "points.npz")) for d in shapes):
        raise SystemExit(f"{flag} {root}: no <class>/<id>/points.npz + pointcloud.npz found"
                         + (f" for split {split!r}" if split else ""))
    return shapes


def decode_convonet(job, num_surface, num_queries, flag="--data"):
    """One ConvONet shape -> float32 (P + Q, 4): P surface points (x, y, z, 0), then Q labelled query
    points (x, y, z, occupancy), in [-1, 1]^3 (divided by the layout's padded half-side 0.55).

    job = (shape folder, seed): the random subsets of its points come from a generator of its own.
    points.npz holds `points` (N, 3) uniform in [-0.55, 0.55]^3 and `occupancies` (np.packbits of N
    bools); pointcloud.npz `points` (M, 3) on the surface.
    """
    d, seed = job
    if missing := [f for f in ("points.npz", "pointcloud.npz") if not os.path.isfile(os.path.join(d, f))]:
        raise SystemExit(f"{flag} {d}: no {' and no '.join(missing)}" + ("" if os.path.isdir(d) else " (no such folder)"))
    try:
        with np.load(os.path.join(d, "points.npz"), allow_pickle=False) as f:
            pts, packed = f["points"], f["occupancies"]
        with np.load(os.path.join(d, "pointcloud.npz"), allow_pickle=False) as f:
            cloud = f["points"]
    except Exception as e:
        raise SystemExit(f"{flag} {d}: cannot read points.npz/pointcloud.npz ({type(e).__name__}: {str(e)[:120]})")
    ok = pts.ndim == 2 and pts.shape[1] == 3 and len(pts) and numeric(pts) and packed.dtype == np.uint8
    ok = ok and packed.ndim == 1 and len(packed) * 8 >= len(pts)
    if not (ok and cloud.ndim == 2 and cloud.shape[1] == 3 and len(cloud) and numeric(cloud)):
        raise SystemExit(f"{flag} {d}: points {pts.dtype} {pts.shape}, occupancies {packed.dtype} {packed.shape}, "
                         f"pointcloud {cloud.dtype} {cloud.shape}; expected finite (N, 3) points, N packed "
                         f"uint8 occupancies, and (M, 3) surface points")
    for name, a in (("points.npz: points", pts), ("pointcloud.npz: points", cloud)):
        if np.abs(a).max() > 1.0:  # e.g. millimetres
            raise SystemExit(f"{flag} {d}/{name} reach {np.abs(a).max():.3g}; expected the padded unit cube "
                             f"[-0.55, 0.55]^3 (scale the shapes to fit it)")
    g = np.random.default_rng(seed)
    i, j = g.integers(len(pts), size=num_queries), g.integers(len(cloud), size=num_surface)
    out = np.zeros((num_surface + num_queries, 4), np.float32)
    out[:num_surface, :3] = cloud[j].astype(np.float32) / 0.55  # (ConvONet stores float16: divide in float32)
    out[num_surface:, :3] = pts[i].astype(np.float32) / 0.55
    out[num_surface:, 3] = np.unpackbits(packed)[:len(pts)][i]
    return out


def convonet_items(a, num_surface):
    """Decoded shapes (n, P + Q, 4), a tensor or a prepare.Stored -> {"x", "points", "occ"}."""
    parts = {"x": lambda t: t[:, :num_surface, :3], "points": lambda t: t[:, num_surface:, :3],
             "occ": lambda t: t[:, num_surface:, 3] > 0.5}
    if torch.is_tensor(a):
        return {k: take(a) for k, take in parts.items()} | {"label": None}
    return {k: prepare.Part(a, take) for k, take in parts.items()} | {"label": None}


def prepared_convonet(root, split, num_surface, num_queries, seed, cache, flag="--data"):
    """The shapes of a ConvONet folder's split, decoded once into the cache (prepare.py) and read by
    index: {"x", "points", "occ"} whose values read from disk. Shape k's random subsets are seeded by
    (seed, k), so they are those of read_convonet."""
    shapes = convonet_listing(root, split, flag)
    jobs = [(d, seed * 1_000_003 + k) for k, d in enumerate(shapes)]
    files = [os.path.join(d, f) for d in shapes for f in ("points.npz", "pointcloud.npz")
             if os.path.isfile(os.path.join(d, f))]
    decode = functools.partial(decode_convonet, num_surface=num_surface, num_queries=num_queries, flag=flag)
    key = {"split": split or "all", "P": num_surface, "Q": num_queries, "seed": seed}
    stored = prepare.prepare(root, jobs, decode, (num_surface + num_queries, 4), key, cache, flag, "shapes",
                             files=files, dtype=np.float32)
    return convonet_items(stored, num_surface)


def read_convonet(root, num_surface, num_queries, split=None, seed=0, flag="--data", n=None):
    """The first n shapes (None: all) of a ConvONet folder, in memory (see convonet_listing)."""
    shapes = convonet_listing(root, split, flag)[:n]
    a = np.stack([decode_convonet((d, seed * 1_000_003 + k), num_surface, num_queries, flag)
                  for k, d in enumerate(shapes)])
    return convonet_items(torch.from_numpy(a), num_surface)


# ----------------------------------------------------------------------------------------
# Posed pictures of scenes (NeRF)
# ----------------------------------------------------------------------------------------
def read_square_picture(path, flag):
    """A square picture file -> float tensor (H, H, 4) RGBA in [0, 1]."""
    a = read_picture(path, flag)
    if a.shape[0] != a.shape[1]:
        raise SystemExit(f"{flag} {path}: picture is {a.shape[1]}x{a.shape[0]}; expected a square one")
    return torch.from_numpy(a)


def resize_views(rgba, size):
    """float (V, H, H, C) in [0, 1] -> uint8 (V, size, size, C), antialiased when shrinking."""
    x = F.interpolate(rgba.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def posed_scene(rgba, c2w, focal, size, scale, near, far, name, centre=None, side=None):
    """One scene's RGBA views (V, H, H, 4) resized to `size` (0 or None: kept), positions and near/far
    divided by `scale` (so the scene fills the cube [-1, 1]^3): a dict of tensors.

    "images" uint8 (V, size, size, 4), "poses" (V, 4, 4) camera-to-world (OpenGL), "intr" (V, 3)
    = (f, cx, cy) in pixels of the resized pictures, "near", "far", "name". rgba None: the cameras
    only ("images" None), for pictures of side `side` (prepared elsewhere, see read_srn).
    """
    H = rgba.shape[1] if rgba is not None else side
    k = (size or H) / H  # intrinsics scale with the picture
    c2w = c2w.float().clone()
    c2w[:, :3, 3] /= scale
    cx, cy = (H / 2, H / 2) if centre is None else centre  # principal point, in pixels of the file
    intr = torch.tensor([[focal * k, cx * k, cy * k]])
    return {"images": None if rgba is None else resize_views(rgba, size or H), "poses": c2w,
            "intr": intr.expand(len(c2w), 3),
            "near": near / scale, "far": far / scale, "name": name}


def read_nerf_npz(path, size, flag):
    """One scene from an .npz like lego_100px_train.npz: images_rgba (V, H, W, 4) uint8 (or images (V, H, W, 3)),
    poses (V, 4, 4) camera-to-world (OpenGL), focal; near and far if present (else 2 and 6); scale 1.5."""
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
    pictures = a.dtype == np.uint8 or (a.dtype.kind == "f" and a.size and 0 <= a.min() and a.max() <= 1)
    if a.ndim != 4 or a.shape[-1] not in (3, 4) or a.shape[1] != a.shape[2] or not pictures:
        raise SystemExit(f"{flag} {path}: {key} is {a.dtype} {a.shape}; expected (V, H, H, 3 or 4) square pictures, "
                         f"uint8 or float in [0, 1]")
    if poses.shape != (len(a), 4, 4) or not numeric(poses):
        raise SystemExit(f"{flag} {path}: poses is {poses.dtype} {poses.shape}; expected ({len(a)}, 4, 4) finite "
                         f"camera-to-world matrices")
    focal = number(z["focal"], "focal", flag, path, positive=True)
    near, far = (number(z[k], k, flag, path) if k in z else d for k, d in (("near", 2.0), ("far", 6.0)))
    return posed_scene(torch.from_numpy(to_unit_rgba(a)), torch.from_numpy(poses.astype(np.float32)), focal, size, 1.5,
                       near, far, os.path.splitext(os.path.basename(path))[0])


def read_nerf_synthetic(folder, split, size, flag):
    """A NeRF-synthetic scene folder: transforms_<split>.json (camera_angle_x, frames with file_path
    and transform_matrix) + RGBA pictures; near 2, far 6, scale 1.5 (the dataset's own)."""
    meta_path = os.path.join(folder, f"transforms_{split}.json")
    try:
        meta = json.load(open(meta_path))
        frames, angle = meta["frames"], float(meta["camera_angle_x"])
        files = [os.path.join(folder, fr["file_path"]) for fr in frames]
        c2w = torch.tensor([fr["transform_matrix"] for fr in frames], dtype=torch.float32)
        if not frames or c2w.shape != (len(frames), 4, 4) or not torch.isfinite(c2w).all() or not 0 < angle < math.pi:
            raise ValueError(f"{len(frames)} frames, transform matrices {tuple(c2w.shape)}, camera_angle_x {angle}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"{flag} {meta_path}: expected camera_angle_x in (0, pi) and frames with file_path and a "
                         f"finite 4x4 transform_matrix ({type(e).__name__}: {e})")
    pics = [read_square_picture(f if os.path.splitext(f)[1] else f + ".png", flag) for f in files]
    if len({p.shape for p in pics}) > 1:
        raise SystemExit(f"{flag} {folder}: its pictures differ in size; expected one size per scene")
    rgba = torch.stack(pics)
    focal = 0.5 * rgba.shape[1] / math.tan(0.5 * angle)
    return posed_scene(rgba, c2w, focal, size, 1.5, 2.0, 6.0, os.path.basename(os.path.normpath(folder)))


def read_srn(folder, size, flag, pictures=True):
    """An SRN scene folder: rgb/*.png, pose/*.txt (4x4 camera-to-world, OpenCV: y down, z forward),
    intrinsics.txt (first line f cx cy; last line the picture size it refers to); near 0.8, far 1.8.
    pictures=False: the cameras only, for pictures of the first file's side (its header); the pictures
    are decode_srn_views's."""
    names = srn_views(folder, flag)
    try:
        lines = open(os.path.join(folder, "intrinsics.txt")).read().split("\n")
        f, cx, cy = (float(v) for v in lines[0].split()[:3])
        last = [ln for ln in lines if ln.strip()][-1].split()
        W0 = float(last[-1]) if len(last) == 2 else 2 * cx  # the size the intrinsics refer to
        c2w = torch.stack([torch.tensor([float(v) for v in open(os.path.join(folder, "pose", n + ".txt")).read().split()])
                           .reshape(4, 4) for n in names])
        if not all(math.isfinite(v) and v > 0 for v in (f, W0)) or not torch.isfinite(c2w).all():
            raise ValueError(f"f {f}, size {W0}, poses finite: {bool(torch.isfinite(c2w).all())}")
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise SystemExit(f"{flag} {folder}: expected intrinsics.txt (f cx cy) and pose/<name>.txt with 16 numbers "
                         f"per picture ({type(e).__name__}: {e})")
    c2w[:, :3, 1:3] *= -1  # OpenCV (y down, looking down +z) -> OpenGL (y up, looking down -z)
    name = os.path.basename(os.path.normpath(folder))
    if not pictures:
        from PIL import Image  # (installed with matplotlib; only the header is read)

        with Image.open(os.path.join(folder, "rgb", names[0] + ".png")) as first:
            side = first.size[0]
        return posed_scene(None, c2w, f * side / W0, size, 1.0, 0.8, 1.8, name, centre=(cx * side / W0, cy * side / W0),
                           side=side)
    pics = [read_square_picture(os.path.join(folder, "rgb", n + ".png"), flag) for n in names]
    if len({p.shape for p in pics}) > 1:
        raise SystemExit(f"{flag} {folder}/rgb: its pictures differ in size; expected one size per scene")
    rgba = torch.stack(pics)
    k = rgba.shape[1] / W0
    return posed_scene(rgba, c2w, f * k, size, 1.0, 0.8, 1.8, name, centre=(cx * k, cy * k))


def srn_views(folder, flag="--data"):
    """The view names of an SRN scene folder (its rgb/*.png), in natural order."""
    names = sorted((os.path.splitext(f)[0] for f in os.listdir(os.path.join(folder, "rgb")) if f.endswith(".png")),
                   key=natural)
    if not names:
        raise SystemExit(f"{flag} {folder}/rgb: no .png pictures")
    return names


def srn_scene_folders(path):
    """The SRN scene folders (with rgb/) inside `path`, in natural order; [] when it is not such a folder."""
    if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "rgb")):
        return []
    return [os.path.join(path, d) for d in sorted(os.listdir(path), key=natural)
            if os.path.isdir(os.path.join(path, d, "rgb"))]


def decode_srn_views(folder, size, views, flag="--data"):
    """The first `views` pictures of an SRN scene -> uint8 numpy (views, size, size, 4) (prepare.py's decoder)."""
    names = srn_views(folder, flag)
    if len(names) < views:
        raise SystemExit(f"{flag} {folder}/rgb: {len(names)} pictures; expected {views} like the other scenes")
    pics = [read_square_picture(os.path.join(folder, "rgb", n + ".png"), flag) for n in names[:views]]
    if len({p.shape for p in pics}) > 1:
        raise SystemExit(f"{flag} {folder}/rgb: its pictures differ in size; expected one size per scene")
    return resize_views(torch.stack(pics), size).numpy()


def held_out_views(V):
    """Which of a scene's V views are held out for validation: every tenth (the 6th, 16th, ...)."""
    return torch.arange(V) % 10 == 5 if V >= 2 else torch.zeros(V, dtype=torch.bool)


def every_tenth(scene):
    """A posed scene -> (its training views, its held-out views), as two posed scenes."""
    V_, val = len(scene["poses"]), held_out_views(len(scene["poses"]))
    pick = lambda m: {k: (v[m] if torch.is_tensor(v) and v.dim() and len(v) == V_ else v) for k, v in scene.items()}
    return pick(~val), pick(val)


def read_posed_scenes(path, size, flag="--data"):
    """-> (training scenes, validation scenes): lists of posed_scene dicts of the same scenes.

    .npz: one scene, every 10th view held out. A NeRF-synthetic scene folder (transforms_train.json):
    its val split held out (every 10th training view when it has none). An SRN scene folder (rgb/):
    every 10th view held out. A folder of such scene folders: every scene, each split the same way.
    """
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


def stack_scenes(scenes, flag, path, images=None, alpha=None):
    """Scenes of one picture size -> one dict of tensors with a leading scene axis (the fewest views of any).

    images: the scenes' pictures when they were prepared apart (read_srn(pictures=False)), as an
    array-like (n, V, S, S, 4), and alpha: whether they have transparent pixels.
    """
    sizes = {s["images"].shape[1] if images is None else images.shape[2] for s in scenes}
    if len(sizes) > 1:
        raise SystemExit(f"{flag} {path}: pictures of different sizes {sorted(sizes)}; pass --resolution to resize them")
    V_ = min(len(s["poses"]) for s in scenes)
    if V_ < 1:
        raise SystemExit(f"{flag} {path}: a scene has no views left to use")
    if any(len(s["poses"]) > V_ for s in scenes):
        print(f"{flag} {path}: scenes have {V_} to {max(len(s['poses']) for s in scenes)} views; using the first {V_} of each")
    # pictures with a real alpha channel train on random backgrounds (file 10, make_rays)
    alpha = alpha if images is not None else any(bool((s["images"][..., 3] < 255).any()) for s in scenes)
    return {"x": torch.arange(len(scenes)), "label": None, "names": [s["name"] for s in scenes],
            "images": torch.stack([s["images"][:V_] for s in scenes]) if images is None else images,
            "poses": torch.stack([s["poses"][:V_] for s in scenes]), "intr": torch.stack([s["intr"][:V_] for s in scenes]),
            "alpha": torch.tensor(alpha), "near": torch.tensor([s["near"] for s in scenes]),
            "far": torch.tensor([s["far"] for s in scenes])}
