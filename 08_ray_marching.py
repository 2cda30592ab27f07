"""08 - Ray marching: cameras, rays, and pictures of an occupancy field without a mesh.

The concept
-----------
A generated shape is an occupancy field: a function f(p) of a point p in [-1, 1]^3 whose value
is a logit, > 0 inside the shape and < 0 outside (file 09). To look at it no mesh is needed:
for every pixel we shoot a ray from a pinhole camera and walk along it until f turns positive.

  1. Cameras. `look_at` builds the camera-to-world matrix c2w of a camera at `eye` looking at
     `target`; `orbit_c2w` puts one on a sphere around the origin. OpenGL convention: in camera
     space the camera looks down its -z axis, +x is right and +y is up in the picture (so
     picture row 0, the top row, has the largest y). `pixel_rays` turns pixels into rays
     (origin, unit direction), each with its own camera; `camera_rays` every pixel of one.
  2. Where to march. A ray o + t d can only meet the shape inside the cube [-1, 1]^3; the
     slab method (`ray_box`) gives the interval [t_near, t_far] where it is inside the cube.
  3. March. `steps` evenly spaced samples from t_near to t_far (both included); the first
     sample with f > 0 is a hit. Between the last outside sample (f <= 0) and the first
     inside one (f > 0) the surface f = 0 is bracketed; `refine` bisection steps shrink the
     bracket by 2^refine, and a final linear interpolation of the two bracketing logits
     (the secant, or "regula falsi", step) places the crossing inside the small bracket.
  4. Normal. The logit grows inwards, so the outward surface normal is
        n = -grad f / |grad f|,
     with grad f from central finite differences, eps = 1/64 (half a voxel of a 64^3 grid).
  5. Shading (Lambert): colour = albedo * (ambient + diffuse * max(0, n . l)) with a fixed
     world light direction l; rays that miss the shape see a white background. The picture
     is returned in the project's range [-1, 1] (value = 2 * colour - 1).

The cameras and the slab test serve file 10's volume rendering too. The field is a neural
network in practice, so all its calls happen under torch.no_grad() and on at most `chunk`
points at a time; everything else is vectorised over rays and over the batch (Python loops
only over ray blocks, march steps, bisection steps and chunks).

Shape letters: B batch (one field per item), R rays (pixels, H * W), N points, S march steps,
H W picture height and width.

Left out on purpose: sphere tracing (it needs a signed distance, and a logit is not one),
shadows and any light transport beyond one Lambert bounce.
"""
import math

import torch
import torch.nn.functional as F

# Default camera: a 3/4 view from above (azimuth 225: from the +x, +z side when y is up; see
# orbit_c2w). From there the 8 corners of the cube [-1, 1]^3 project to x in [-0.52, 0.52],
# y in [-0.64, 0.40] (camera-plane units, tan of the angle; the near bottom corner is closest to
# the camera, hence the asymmetry). A fov of 68 deg (tan(34 deg) = 0.67) shows the whole cube:
# it spans 78% of the width and 77% of the height, its lowest corner 6% of the half-height above
# the bottom edge.
AZIMUTH_DEG = 225.0
ELEVATION_DEG = 30.0
DISTANCE = 3.2
FOV_DEG = 68.0

# Shading constants (colours in [0, 1] before mapping to [-1, 1]).
ALBEDO = 0.8  # light grey
AMBIENT = 0.3
DIFFUSE = 0.7
# Fixed world-space light direction (unit vector towards the light): above (+y), a bit
# right (+x) and front (+z) of the shape, so the three faces of a cube seen from the default
# view get three different shades.
LIGHT_DIR = (0.4, 1.0, 0.7)
BACKGROUND = 1.0  # white

# Half a voxel of a 64^3 grid (a voxel is 2 / 64 wide): the finite-difference step.
NORMAL_EPS = 1.0 / 64

# ========================================================================================
# 1. Cameras and rays
# ========================================================================================
def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
    """Camera-to-world matrix (4, 4) of a camera at `eye` looking at `target` (OpenGL).

    eye, target, up: 3-vectors (tuples or tensors), or tensors (..., 3) for many cameras at
    once (they broadcast; the result is then (..., 4, 4)). Columns of the result: camera x
    (right), camera y (up in the image), camera z (pointing backwards: the camera looks down -z)
    and the eye position; last row (0, 0, 0, 1). If `up` is parallel to the viewing direction a
    different up vector is used (looking straight down or up).
    """
    device = eye.device if torch.is_tensor(eye) else None
    eye = torch.as_tensor(eye, dtype=torch.float32, device=device)  # (..., 3)
    target = torch.as_tensor(target, dtype=torch.float32, device=eye.device)
    up = torch.as_tensor(up, dtype=torch.float32, device=eye.device)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    # forward = (target - eye) / |target - eye|: where the camera looks (its -z axis).
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True)
    # right = forward x up / |forward x up| (camera +x); where up is parallel to forward, another
    # up vector: -z, or +x if that is parallel too.
    right = torch.linalg.cross(forward, up)
    for alt in ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0)):
        other = torch.linalg.cross(forward, torch.tensor(alt, device=eye.device).expand_as(forward))
        right = torch.where(right.norm(dim=-1, keepdim=True) < 1e-6, other, right)
    right = right / right.norm(dim=-1, keepdim=True)
    # true_up = right x forward (camera +y), orthogonal to both by construction.
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, device=eye.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = true_up
    # The camera looks down -z, so its +z axis is -forward.
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w



def orbit_c2w(azimuth_deg, elevation_deg, radius, up=(0.0, 1.0, 0.0)):
    """Camera on a sphere around the origin, looking at it: (4, 4) c2w.

    `up` is the world's up axis (y for our shapes and synthetic scenes, z for Blender scenes such
    as NeRF-synthetic's); the azimuth turns around it, the elevation lifts the camera towards it.
    The horizon is spanned by e1 = up x h and e2 = up x e1 (h: the x axis, or z if up is near x);
    for y up, e1 = -z and e2 = -x: azimuth 0 looks from -x, 90 from -z, 180 from +x, 270 from +z.
    """
    up = torch.as_tensor(up, dtype=torch.float32)
    up = up / up.norm()
    helper = torch.tensor([1.0, 0.0, 0.0]) if up[0].abs() < 0.9 else torch.tensor([0.0, 0.0, 1.0])
    e1 = torch.linalg.cross(up, helper)
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(up, e1)
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    # eye = r (cos(el) (cos(az) e2 + sin(az) e1) + sin(el) up)
    eye = radius * (math.cos(el) * (math.cos(az) * e2 + math.sin(az) * e1) + math.sin(el) * up)
    return look_at(eye, (0.0, 0.0, 0.0), up)


def focal_from_fov(width, fov_deg):
    """Focal length in pixels of a pinhole camera whose horizontal field of view is fov_deg."""
    # Half the image width sees half the fov: (W / 2) / focal = tan(fov / 2).
    return 0.5 * width / math.tan(math.radians(fov_deg) / 2)



# A pinhole camera with focal length f (in pixels) and principal point (cx, cy) sends the
# ray through the pixel centre (col + 0.5, row + 0.5) along the camera-space direction
#
#     d_cam = ((col + 0.5 - cx) / f,  -(row + 0.5 - cy) / f,  -1)
#
# (x to the right, y up while rows go down, and -z forwards: OpenGL, as Blender and the
# NeRF-synthetic data). In the world it starts at the camera centre o = c2w[:3, 3] and goes
# along d = R d_cam / |R d_cam|, R = c2w[:3, :3]. Every ray may carry its own camera: training
# a radiance field draws a few thousand random pixels of many cameras (file 10).
def pixel_rays(c2w, intrinsics, rows, cols):
    """Rays through pixel centres: c2w (..., 4, 4), intrinsics (..., 3) = (f, cx, cy) in pixels,
    rows, cols (...) pixel indices -> origins (..., 3), unit directions (..., 3)."""
    f, cx, cy = intrinsics.unbind(-1)
    x = (cols + 0.5 - cx) / f
    y = -(rows + 0.5 - cy) / f
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # (..., 3)
    # d = R d_cam, one rotation per ray
    d = (c2w[..., :3, :3] @ d_cam[..., None])[..., 0]
    return c2w[..., :3, 3].expand_as(d), d / d.norm(dim=-1, keepdim=True)


def camera_rays(height, width, c2w, focal):
    """Rays through every pixel centre of one camera (principal point at the picture's centre):
    c2w (4, 4), focal in pixels -> origins (H*W, 3), unit directions (H*W, 3), row-major (row 0 on top)."""
    rows, cols = torch.meshgrid(torch.arange(height, device=c2w.device, dtype=torch.float32),
                                torch.arange(width, device=c2w.device, dtype=torch.float32), indexing="ij")
    intr = torch.tensor([focal, width / 2, height / 2], device=c2w.device)
    return pixel_rays(c2w, intr, rows.reshape(-1), cols.reshape(-1))


def ray_box(origins, dirs):
    """Slab-method intersection of rays with the cube [-1, 1]^3.

    origins, dirs: (R, 3). Returns t_near (R,), t_far (R,) (t_near clipped at 0, so a camera
    inside the cube starts at itself) and hit (R,) bool: the ray crosses the cube in front of
    the origin.
    """
    # Avoid 0 / 0: a direction component of (almost) 0 becomes 1e-12 (the slab is then [-inf, inf]
    # or empty, as it should be; min/max below do not care about the sign).
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)  # (R, 3)
    # Per axis, the ray is between the two planes x = -1 and x = +1 for t in [t1, t2]:
    # t = (plane - o) / d.
    t1 = (-1.0 - origins) / safe  # (R, 3)
    t2 = (1.0 - origins) / safe  # (R, 3)
    # Inside the cube = inside all three slabs: the latest entry and the earliest exit.
    t_near = torch.minimum(t1, t2).amax(-1).clamp(min=0.0)  # (R,)
    t_far = torch.maximum(t1, t2).amin(-1)  # (R,)
    return t_near, t_far, t_far > t_near


# ========================================================================================
# 2. Querying the field
# ========================================================================================
def query_field(field, points, chunk):
    """Logits of `field` at points (B, N, 3) -> (B, N), at most max(B, chunk) points per call.

    The field is called on slices (B, n, 3) of the points with n = max(1, chunk // B), so
    each call sees B * n <= chunk points (if chunk < B, one point per item: B points).
    Points are clamped to [-1, 1] (samples on the cube's faces may be off by rounding).
    """
    B, N = points.shape[:2]
    per_call = max(1, chunk // B)
    points = points.clamp(-1.0, 1.0)
    with torch.no_grad():
        out = [field(points[:, s:s + per_call]).reshape(B, -1).float()
               for s in range(0, N, per_call)]  # each (B, n)
    return torch.cat(out, 1)  # (B, N)


def field_normals(field, points, chunk, eps=NORMAL_EPS):
    """Outward unit normals (B, N, 3) of the logit field at points (B, N, 3).

    n = -grad f / |grad f| with central differences
        df/dx_i ~= (f(p + eps e_i) - f(p - eps e_i)) / (2 eps).
    The stencil centre is moved inside [-1 + eps, 1 - eps]^3 so all 6 probes stay in the cube.
    """
    B, N = points.shape[:2]
    centre = points.clamp(-1.0 + eps, 1.0 - eps)  # (B, N, 3)
    # Offsets +eps e_x, -eps e_x, +eps e_y, -eps e_y, +eps e_z, -eps e_z.
    eye3 = torch.eye(3, device=points.device)  # (3, 3)
    offsets = torch.stack([eye3, -eye3], 1).reshape(6, 3) * eps  # (6, 3)
    probes = (centre[:, :, None, :] + offsets).reshape(B, N * 6, 3)  # (B, N*6, 3)
    f = query_field(field, probes, chunk).reshape(B, N, 3, 2)  # (B, N, 3 axes, +/-)
    # grad_i = (f(p + eps e_i) - f(p - eps e_i)) / (2 eps)
    grad = (f[..., 0] - f[..., 1]) / (2 * eps)  # (B, N, 3)
    # n = -grad / |grad| (logits increase inwards, the normal points out).
    return -grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def voxel_field(grid):
    """Voxel grids as a smooth occupancy function to ray march (file 09's data): points (n, N, 3) -> logits (n, N).

    Trilinear interpolation of the 0/1 voxels minus 1/2 (positive inside); F.grid_sample
    wants (n, 1, D, H, W) with x along W, so the (x, y, z) grid is permuted to (z, y, x).
    """
    vol = grid.float().permute(0, 3, 2, 1)[:, None]  # (n, 1, R_z, R_y, R_x)
    return lambda p: F.grid_sample(vol.to(p.device), p[:, :, None, None], mode="bilinear", padding_mode="zeros",
                                   align_corners=False)[:, 0, :, 0, 0] - 0.5


def _field_device(field):
    """Device of a field's parameters if it is an nn.Module with parameters, else CPU."""
    try:
        return next(field.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")



# ========================================================================================
# 3. Ray marching and shading
# ========================================================================================
def march_rays(field, batch, origins, dirs, steps=128, refine=6, chunk=65536):
    """First surface crossing (f goes from <= 0 to > 0) of every ray, for every batch item.

    field: callable (B, N, 3) -> logits (B, N); batch: B; origins, dirs: (R, 3) rays shared
    by the B items (unit directions). Returns a dict:
      "hit" (B, R) bool, "t" (B, R) ray parameter of the surface (t_far where no hit),
      "points" (B, R, 3) surface points o + t d, "normals" (B, R, 3) outward unit normals
      (zeros where no hit).
    Rays are processed in blocks of max(1, chunk // B) rays so each field call sees at most
    `chunk` points; within a block, loops run over the `steps` samples and `refine` bisections.
    """
    R = origins.shape[0]
    device = origins.device
    hit = torch.zeros(batch, R, dtype=torch.bool, device=device)  # (B, R)
    t_hit = torch.zeros(batch, R, device=device)  # (B, R)
    normals = torch.zeros(batch, R, 3, device=device)  # (B, R, 3)

    t_near, t_far, in_box = ray_box(origins, dirs)  # (R,), (R,), (R,)
    t_hit[:] = t_far
    # Only rays that cross the cube can hit anything; the camera is shared, so this set is the
    # same for every batch item.
    box_idx = in_box.nonzero().squeeze(1)  # (R_box,)
    block = max(1, chunk // batch)
    for s in range(0, box_idx.numel(), block):
        idx = box_idx[s:s + block]  # (n,) rays of this block
        o, d = origins[idx], dirs[idx]  # (n, 3)
        tn, tf = t_near[idx], t_far[idx]  # (n,)
        n = idx.numel()

        # --- March: t_k = t_near + k / (S - 1) * (t_far - t_near), k = 0 .. S - 1. ---
        found = torch.zeros(batch, n, dtype=torch.bool, device=device)  # (B, n)
        # Bracket [t_lo, t_hi] of the crossing and its logits (f_lo <= 0 < f_hi).
        t_lo = tf.expand(batch, n).clone()  # (B, n)
        t_hi = t_lo.clone()  # (B, n)
        f_lo = torch.zeros(batch, n, device=device)  # (B, n)
        f_hi = torch.zeros(batch, n, device=device)  # (B, n)
        t_prev = f_prev = None
        for k in range(steps):
            t_k = tn + (tf - tn) * (k / max(steps - 1, 1))  # (n,)
            pts = (o + t_k[:, None] * d).expand(batch, n, 3)  # (B, n, 3)
            f_k = query_field(field, pts, chunk)  # (B, n)
            new = (~found) & (f_k > 0)  # (B, n) first inside sample of the ray
            t_kb = t_k.expand(batch, n)  # (B, n)
            t_hi = torch.where(new, t_kb, t_hi)
            f_hi = torch.where(new, f_k, f_hi)
            if k == 0:
                # Inside already at the cube's entry: the crossing is at t_near itself
                # (an empty bracket lo = hi; the bisection below leaves it there).
                t_lo = torch.where(new, t_kb, t_lo)
                f_lo = torch.where(new, f_k, f_lo)
            else:
                t_lo = torch.where(new, t_prev, t_lo)
                f_lo = torch.where(new, f_prev, f_lo)
            found = found | new
            t_prev, f_prev = t_kb, f_k
            if bool(found.all()):  # every ray of the block has hit: no need to go further
                break

        # --- Bisection: keep the half of [t_lo, t_hi] where the sign changes. ---
        for _ in range(refine):
            t_mid = (t_lo + t_hi) / 2  # (B, n)
            pts = o + t_mid[..., None] * d  # (B, n, 3)
            f_mid = query_field(field, pts, chunk)  # (B, n)
            inside = f_mid > 0  # (B, n)
            t_hi = torch.where(inside, t_mid, t_hi)
            f_hi = torch.where(inside, f_mid, f_hi)
            t_lo = torch.where(inside, t_lo, t_mid)
            f_lo = torch.where(inside, f_lo, f_mid)

        # --- Secant step inside the final bracket: f is ~linear there, so f = 0 at
        # t = t_lo + (t_hi - t_lo) * f_lo / (f_lo - f_hi). An empty bracket (hit at the
        # entry, f_lo = f_hi > 0) keeps t_lo.
        denom = f_lo - f_hi  # (B, n), < 0 for a real bracket
        w = torch.where(denom < 0, f_lo / denom.clamp(max=-1e-12), torch.zeros_like(denom))
        t_surf = t_lo + (t_hi - t_lo) * w.clamp(0.0, 1.0)  # (B, n)

        # --- Normals at the surface points. ---
        p_surf = o + t_surf[..., None] * d  # (B, n, 3)
        nrm = field_normals(field, p_surf, chunk)  # (B, n, 3)

        hit[:, idx] = found
        t_hit[:, idx] = torch.where(found, t_surf, tf.expand(batch, n))
        normals[:, idx] = torch.where(found[..., None], nrm, torch.zeros_like(nrm))

    points = origins + t_hit[..., None] * dirs  # (B, R, 3)
    return {"hit": hit, "t": t_hit, "points": points, "normals": normals}


def shade(normals, hit, light_dir=LIGHT_DIR, albedo=ALBEDO, ambient=AMBIENT, diffuse=DIFFUSE,
          background=BACKGROUND):
    """Lambert shading: normals (..., 3), hit (...) -> grey values (...) in [0, 1].

    colour = albedo * (ambient + diffuse * max(0, n . l)) on the shape, `background` elsewhere;
    l is the unit light direction (world space, pointing towards the light).
    """
    light = torch.as_tensor(light_dir, dtype=normals.dtype, device=normals.device)
    light = light / light.norm()  # (3,)
    # colour = albedo * (ambient + diffuse * max(0, n . l))
    lit = albedo * (ambient + diffuse * (normals @ light).clamp(min=0.0))  # (...)
    return torch.where(hit, lit, torch.full_like(lit, background))


def render_occupancy(field, batch, height, width, azimuth=AZIMUTH_DEG, elevation=ELEVATION_DEG,
                     distance=DISTANCE, fov_deg=FOV_DEG, steps=128, refine=6, chunk=65536,
                     light_dir=LIGHT_DIR, device=None, return_buffers=False):
    """Shaded grey preview images of B occupancy fields, (B, 3, H, W) in [-1, 1].

    field: callable, points (B, N, 3) in [-1, 1]^3 -> logits (B, N), > 0 inside (item b of
    the points is evaluated by field b). batch: B. height, width: image size.
    Camera: pinhole, horizontal field of view fov_deg, at `distance` from the origin at the
    given azimuth/elevation in degrees (world +y is up; azimuth 270 = on +z, 180 = on +x; see
    `orbit_c2w`), looking at the origin. steps: samples per ray inside the cube; refine:
    bisection steps; chunk: at most this many points per field call (all calls are made under
    torch.no_grad()). light_dir: world direction towards the light. device: where rays live
    (default: the device of the field's parameters, else CPU).
    Shading: albedo * (ambient + diffuse * max(0, n . l)) on the shape, white background;
    returned as 2 * colour - 1. With return_buffers=True also returns a dict with "mask"
    (B, H, W) bool, "depth" (B, H, W) distance along the ray, "normals" (B, 3, H, W).
    """
    device = torch.device(device) if device is not None else _field_device(field)
    c2w = orbit_c2w(azimuth, elevation, distance).to(device)  # (4, 4), world +y up
    origins, dirs = camera_rays(height, width, c2w, focal_from_fov(width, fov_deg))  # (H*W, 3) each
    with torch.no_grad():
        out = march_rays(field, batch, origins, dirs, steps=steps, refine=refine, chunk=chunk)
    grey = shade(out["normals"], out["hit"], light_dir=light_dir)  # (B, H*W) in [0, 1]
    # [0, 1] -> [-1, 1], three equal channels.
    img = (2 * grey - 1).reshape(batch, 1, height, width).expand(batch, 3, height, width).contiguous()
    if not return_buffers:
        return img  # (B, 3, H, W)
    buffers = {
        "mask": out["hit"].reshape(batch, height, width),  # (B, H, W)
        "depth": out["t"].reshape(batch, height, width),  # (B, H, W)
        "normals": out["normals"].reshape(batch, height, width, 3).permute(0, 3, 1, 2),  # (B, 3, H, W)
    }
    return img, buffers


# ----------------------------------------------------------------------------------------
# Demo: a sphere's depth against its analytic intersection, and a shaded torus
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import os

    import figures

    size, radius, fov = 96, 0.6, 40.0
    # a ball as a logit that is NOT a distance: (radius^2 - |p|^2) * 5, positive inside
    ball = lambda p: (radius ** 2 - p.pow(2).sum(-1)) * 5
    _, buf = render_occupancy(ball, 1, size, size, fov_deg=fov, return_buffers=True)
    # the exact first hit of every pixel's ray: |o + t d|^2 = r^2  ->  t = -o.d - sqrt((o.d)^2 - |o|^2 + r^2)
    c2w = orbit_c2w(AZIMUTH_DEG, ELEVATION_DEG, DISTANCE)
    o, d = camera_rays(size, size, c2w, focal_from_fov(size, fov))
    b, q = (o * d).sum(-1), o.pow(2).sum(-1) - radius ** 2
    hit = b * b - q > 0
    t = -b - (b * b - q).clamp(min=0).sqrt()
    mask = buf["mask"][0].reshape(-1)
    err = (buf["depth"][0].reshape(-1) - t)[hit & mask].abs()
    print(f"sphere at {size}x{size}: {(mask == hit).float().mean().item() * 100:.2f}% of pixels agree on hit or "
          f"miss; depth error on hits: max {err.max().item():.1e}, mean {err.mean().item():.1e} (cube units)")
    torus = lambda p: (0.25 - torch.stack([p[..., [0, 2]].norm(dim=-1) - 0.55, p[..., 1]], -1).norm(dim=-1)) * 20
    pictures = [render_occupancy(f, 1, size, size, azimuth=a, fov_deg=fov) for f, a in
                ((ball, 225.0), (torus, 225.0), (torus, 270.0), (torus, 180.0))]
    os.makedirs("out", exist_ok=True)
    figures.write_sheet([torch.cat(pictures)], "out/08_ray_marching.png", None,
                        "ray marched: a ball; a torus from azimuths 225, 270, 180")
    print("wrote out/08_ray_marching.png")
