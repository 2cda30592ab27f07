"""11 - NeRF: radiance fields of 3D scenes, learnt from photographs (paper Sec. 4.2).

The concept
-----------
A scene is a tri-plane radiance field over [-1, 1]^3 (planes xy, xz, yz; the three embeddings
concatenated, as in the paper's NeRF), decoded by HDBF + CFC (file 03) into 1 + F numbers per
point: a density and F colour features, which file 10's radiance head and volume rendering turn
into pixels. The signal the ELBO sees is a pixel colour and the "coordinate" is its ray:

    omega(ray) = sum_i T_i alpha_i c_i + T_{S+1} background        (file 10)

Training draws K random rays per scene and step, never whole pictures, and the likelihood is
Gaussian: the squared error of the rendered colour (`recon` says why not the L1 of images).

How a scene gets its latent depends on what the data holds; each dataset uses one way:

  * synthetic scenes (the built-in default): a coloured point cloud (x, y, z, r, g, b) of the
    visible surfaces goes through file 09's PointNet with local pooling (as in the paper), so
    q(z|x) is a real encoder and held-out scenes can be encoded;
  * posed pictures (NeRF-synthetic folders, SRN folders, .npz files; readers.py): there are no
    point clouds, so auto-decoding (Park et al., DeepSDF 2019): each training scene owns the
    parameters of its posterior q(z | scene) = N(mu_i, sigma_i^2), rows of a learnable table
    trained with everything else. The ELBO is unchanged, KL term included, so the latents stay
    close to N(0, I) and stage 2 models them as it would encoded ones. Validation renders
    held-out views of the training scenes (a new scene would need its latent fitted first).

Units and colours: a dataset's positions are divided by its scale (1.5 for NeRF-synthetic,
whose scenes fill [-1.5, 1.5]^3; 1 for SRN) so the scene fills the cube; near and far too.
Where the data knows which pixels are background (an alpha channel, or the synthetic scenes),
training puts every ray on its own random background colour, target too (file 10, make_rays);
pictures are rendered, and compared, on white. --resolution is the pictures' side (posed
pictures are resized to it), --plane-res the tri-plane's.

Shape letters: B batch (scenes), K rays per scene and step, S samples per ray, V views, H W
picture height and width, F colour features, Z latent channels, h latent side.

Left out on purpose: hierarchical (coarse + fine) sampling and unbounded scenes (file 10), and
fitting the latent of a new scene from its pictures (test-time optimisation).
"""
import functools
import importlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import figures
import prepare
import readers

inr = importlib.import_module("01_inr")
M = importlib.import_module("05_modalities")
RM = importlib.import_module("08_ray_marching")
S = importlib.import_module("09_shapes")
R = importlib.import_module("10_volume_rendering")


class AutoDecoder(nn.Module):
    """The 'encoder' of posed pictures: scene indices (B,) -> posterior parameters (B, 3, 2Z, h, h).

    Means start near 0 and log-variances at -6 (sigma = 0.05), so early training sees little noise.
    """

    def __init__(self, num_scenes, z_ch, h):
        super().__init__()
        init = torch.cat([0.1 * torch.randn(num_scenes, 3, z_ch, h, h), torch.full((num_scenes, 3, z_ch, h, h), -6.0)], 2)
        self.table = nn.Parameter(init)

    def forward(self, idx):
        return self.table[idx]


class NerfModality(M.Modality):
    """Radiance fields as items.

    Synthetic: "x" coloured surface points (n, P, 6) and "params" (file 10's scene parameters, for
    exact pictures from any camera). Posed pictures: "x" the scene index (n,), "images" uint8 RGBA
    (n, V, H, H, 4), "alpha" (whether any pixel is transparent), "poses" (n, V, 4, 4), "intr"
    (n, V, 3) = (f, cx, cy), "near", "far" (n,), "names".
    """

    name = "nerf"
    planes, embed_mult = 3, 3  # a tri-plane whose three embeddings are concatenated
    features = 8  # F: colour features of the read-out beside the density
    out_ch = 1 + features
    # 250 built-in scenes, each seen ~50 times in the default run's 3000 steps: with 1000 (12 times
    # each) stage 1 had the shapes but not yet the colours at the end (docs/quality.md, NeRF)
    synthetic_train, synthetic_val = 250, 16
    num_points, encoder_points = 2048, 1024  # coloured points kept per synthetic scene; points the encoder sees
    has_time = True  # sample.py's --frames: the views of a turntable
    # what `load` learns about the data (the cameras of previews and turntables; scenes to auto-decode)
    DATA_KEYS = ("num_scenes", "up", "cam_radius", "cam_elevation", "fov", "near", "far", "scene_names")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.samples_per_ray = cfg["samples_per_ray"]
        # a checkpoint's config holds what load learnt; a new run learns it in load
        self.data_settings = {k: cfg[k] for k in self.DATA_KEYS if k in cfg}

    # -- data ------------------------------------------------------------------------------
    def load(self, data):
        """Synthetic scenes, or posed pictures resized to --resolution: val = held-out views of the same scenes."""
        if data is None:  # synthetic: cameras at radius 3 anywhere, y up
            self.data_settings = {"num_scenes": 0, "up": [0.0, 1.0, 0.0], "cam_radius": R.SCENE_RADIUS,
                                  "cam_elevation": 25.0, "fov": R.SCENE_FOV, "near": 0.0, "far": 1e9}
            return self.synthetic(self.synthetic_train, self.seed), self.held_out_synthetic(), 0
        if folders := (readers.srn_scene_folders(data) if self.cache is not None else []):
            train, val = self.prepared_srn(data, folders)  # SRN's many scenes: pictures prepared once, read by index
        else:
            tr, va = readers.read_posed_scenes(data, self.resolution)
            train, val = readers.stack_scenes(tr, "--data", data), readers.stack_scenes(va, "--data", data)
        poses = train["poses"].flatten(0, 1)  # (n V, 4, 4)
        up = F.normalize(poses[:, :3, 1].mean(0), dim=0)  # the cameras' mean up axis is the world's
        eyes = poses[:, :3, 3]
        radius = eyes.norm(dim=-1)
        elevation = torch.rad2deg(torch.asin((eyes @ up / radius).clamp(-1, 1)))
        fov = math.degrees(2 * math.atan(0.5 * train["images"].shape[2] / train["intr"][..., 0].median().item()))
        self.data_settings = {"num_scenes": len(train["x"]), "up": up.tolist(), "cam_radius": radius.median().item(),
                              "cam_elevation": elevation.median().item(), "fov": fov, "near": train["near"].min().item(),
                              "far": train["far"].max().item(), "scene_names": train["names"]}
        return train, val, 0

    def prepared_srn(self, data, folders):
        """A folder of SRN scenes (cars: 2458 scenes of 50 views): the cameras read now, the pictures
        decoded once into the cache (prepare.py); every tenth view of each scene held out, as for one scene."""
        scenes = [readers.read_srn(f, self.resolution, "--data", pictures=False) for f in folders]
        V, S = min(len(s["poses"]) for s in scenes), self.resolution
        files = [os.path.join(f, "rgb", n + ".png") for f in folders for n in readers.srn_views(f)]
        pictures = prepare.prepare(data, folders, functools.partial(readers.decode_srn_views, size=S, views=V),
                                   (V, S, S, 4), {"R": S, "V": V}, self.cache, "--data", "scenes", files=files)
        held = readers.held_out_views(V)
        scenes = [{k: (v[:V] if torch.is_tensor(v) and v.dim() else v) for k, v in scenes[i].items()}
                  for i in pictures.index]  # (scenes that cannot be read are left out, see prepare.py)
        split = [readers.every_tenth(s) for s in scenes]
        views = lambda m: prepare.Part(pictures, lambda t: t[:, m])
        alpha = bool((pictures[0][..., 3] < 255).any())  # transparent pictures (the first scene's say for all)
        return (readers.stack_scenes([s[0] for s in split], "--data", data, views(~held), alpha),
                readers.stack_scenes([s[1] for s in split], "--data", data, views(held), alpha))

    def synthetic(self, n, seed):
        params = R.synthetic_scene_params(n, seed=seed)
        points = R.scene_points(params, self.num_points, torch.Generator().manual_seed(seed))
        return {"x": points, "params": params, "label": None}

    def held_out_synthetic(self):
        return self.synthetic(self.synthetic_val, self.seed + 1_000_003)

    def encoder_input(self, x):
        """Stored data -> the encoder's input: the first encoder_points coloured points, or the scene indices."""
        return x if x.dim() == 1 else x[:, :self.encoder_points].float()

    # -- model -----------------------------------------------------------------------------
    def lookup(self, field, coords):
        return inr.triplane_lookup(field, coords, combine="concat")

    def build_vae(self):
        """Point cloud (PointNet) or scene index (auto-decoding) -> tri-plane -> HDBF fields -> concatenated
        embeddings -> CFC read-out -> (density, colour features) -> file 10's head and volume rendering."""
        decoder, readout = self.decoder_readout()
        if self.data_settings["num_scenes"]:
            encoder = AutoDecoder(self.data_settings["num_scenes"], self.z_ch, self.latent_shape[-1])
        else:
            encoder = S.ShapeEncoder(self.z_ch, self.enc_ch, self.enc_mult, self.plane_res, point_dim=6)
        return R.RadianceFieldVAE(encoder, decoder, readout, self.lookup, R.RadianceHead(self.features))

    # -- the ELBO's pieces -----------------------------------------------------------------
    def training_batch(self, data, idx, K, generator):
        """-> (encoder input, rays (B, K, 11 + S), true colours (B, K, 3)); every draw from `generator`."""
        Sp, size, B = self.samples_per_ray, self.resolution, len(idx)
        if "images" in data:  # K random pixels of random views of each scene
            Vn, H = data["images"].shape[1], data["images"].shape[2]
            v, r, c = (torch.randint(m, (B, K), generator=generator) for m in (Vn, H, H))
            scene = idx[:, None].expand(-1, K)
            views = data["images"][idx]  # (B, V, H, H, 4): the batch's scenes (read from disk when prepared)
            rgba = views[torch.arange(B)[:, None], v, r, c].float() / 255  # (B, K, 4)
            bg = torch.rand(B, K, 3, generator=generator) * 2 - 1 if data["alpha"] else torch.ones(B, K, 3)
            target = rgba[..., 3:] * (rgba[..., :3] * 2 - 1) + (1 - rgba[..., 3:]) * bg  # a c + (1 - a) background
            o, d = RM.pixel_rays(data["poses"][scene, v], data["intr"][scene, v], r.float(), c.float())
            rays = R.make_rays(o, d, Sp, data["near"][scene], data["far"][scene], bg, generator)
            x = idx
        else:  # K random pixels of random cameras around each synthetic scene: exact colours
            c2w, intr = R.random_cameras((B, K), generator, size=size)
            r, c = (torch.randint(size, (B, K), generator=generator).float() for _ in range(2))
            o, d = RM.pixel_rays(c2w, intr, r, c)
            params = {k: v[idx] for k, v in data["params"].items()}
            bg = torch.rand(B, K, 3, generator=generator) * 2 - 1  # random backgrounds (file 10, make_rays)
            target = R.scene_render(params, o, d, bg)
            rays = R.make_rays(o, d, Sp, background=bg, generator=generator)
            sub = torch.rand(B, data["x"].shape[1], generator=generator).argsort(1)[:, :self.encoder_points]
            x = data["x"][idx].gather(1, sub[..., None].expand(-1, -1, 6))
        return x, rays, target

    @property
    def values_per_item(self):
        """D_x: colour values of one picture of a scene."""
        return 3 * self.resolution ** 2

    def recon(self, pred, target):
        """Gaussian likelihood: -log p is the squared error of the rendered colours (mean per item), up to scale.

        Not the L1 of images (and of the original release): the gradient of L1 is the sign of the
        error, the same for a background pixel that is almost right as for an object pixel that is
        all wrong. Pictures that are mostly background (lego's are 70% white) then say "less
        density" at every step more often than "more", until the density is below zero everywhere,
        where softplus is flat and passes no gradient back: such a run learns nothing. With squared
        errors the pixels that are far off weigh most (docs/results.md, NeRF).
        """
        return (pred - target).pow(2).flatten(1).mean(1)

    # -- outputs ---------------------------------------------------------------------------
    def cameras(self, azimuths, size):
        """Cameras around the scenes' up axis at the data's radius and median elevation -> c2w (T, 4, 4), intr (T, 3)."""
        s = self.data_settings
        c2w = torch.stack([RM.orbit_c2w(a, s["cam_elevation"], s["cam_radius"], s["up"]) for a in azimuths])
        f = 0.5 * size / math.tan(math.radians(s["fov"]) / 2)
        return c2w, torch.tensor([f, size / 2, size / 2]).expand(len(azimuths), 3)

    def render_views(self, vae, fields, c2w, intr, size):
        """Every item from every camera: fields of B scenes, T cameras -> (B, 3, T, size, size)."""
        dev, near, far = fields[0].device, self.data_settings["near"], self.data_settings["far"]
        B, T = fields[0].shape[0], len(c2w)
        return torch.stack([vae.render(fields, c2w[t:t + 1].expand(B, -1, -1).to(dev), intr[t:t + 1].expand(B, -1).to(dev),
                                       size, size, self.samples_per_ray, near, far) for t in range(T)], 2)

    def preview(self, vae, fields):
        """One picture per scene, from 30 degrees around the up axis: (B, 3, R, R)."""
        c2w, intr = self.cameras([30.0], self.resolution)
        return self.render_views(vae, fields, c2w, intr, self.resolution)[:, :, 0]

    def truth_views(self, items, i):
        """Scene i's pictures to compare with (on white) and their cameras: (V, 3, H, H), c2w (V, 4, 4), intr (V, 3)."""
        if "images" in items:
            rgba = items["images"][i].permute(0, 3, 1, 2).float() / 255
            return rgba[:, 3:] * (rgba[:, :3] * 2 - 1) + (1 - rgba[:, 3:]), items["poses"][i], items["intr"][i]
        size = self.resolution
        c2w, intr = self.cameras([30.0, 150.0, 270.0], size)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        o, d = RM.pixel_rays(c2w[:, None], intr[:, None], rows.reshape(1, -1).float(), cols.reshape(1, -1).float())
        params = {k: v[i:i + 1].expand(len(c2w), *v.shape[1:]) for k, v in items["params"].items()}
        return R.scene_render(params, o, d).reshape(-1, size, size, 3).permute(0, 3, 1, 2), c2w, intr

    def compare(self, vae, items, device, n=None, keep=8):
        """Render every item's truth views from its posterior mean -> (mean PSNR, per-item PSNRs, the truths
        and renders of the first `keep` items, and the number of views compared)."""
        n = len(items["x"]) if n is None else min(n, len(items["x"]))
        psnrs, truths, recs, views = [], [], [], 0
        for i in range(n):
            truth, c2w, intr = self.truth_views(items, i)
            fields = vae.decode(vae.encode(self.encoder_input(items["x"][i:i + 1]).to(device)).mean)
            H = truth.shape[-1]
            rec = torch.stack([vae.render(fields, c2w[v:v + 1].to(device), intr[v:v + 1].to(device), H, H,
                                          self.samples_per_ray, self.data_settings["near"], self.data_settings["far"])[0].cpu()
                               for v in range(len(c2w))])
            psnrs.append(float(inr.psnr(rec, truth)))
            views += len(rec)
            if i < keep:  # (a sheet's worth: memory does not grow with the number of scenes)
                truths.append(truth)
                recs.append(rec)
        return sum(psnrs) / n, psnrs, truths, recs, views

    def evaluate(self, vae, val, device):
        """Validation PSNR of held-out views (posed pictures) or of three views of held-out scenes (synthetic)."""
        score, _, truths, recs, _ = self.compare(vae, val, device)
        return {"psnr": score}, [torch.cat(truths)[:8], torch.cat(recs)[:8]], ["held out", "rendered"]

    def sample_arrays(self, vae, fields, resolutions, frames=None):
        """sample.py: a turntable of `frames` views (12 by default) per sample at every resolution, (B, 3, T, R, R)."""
        T = frames or 12
        arrays = {}
        for size in resolutions:
            c2w, intr = self.cameras([360.0 * t / T for t in range(T)], size)
            arrays[str(size)] = self.render_views(vae, fields, c2w, intr, size).cpu()
        return arrays

    def sheet(self, arrays, frames=None):
        """A row per sample (8 at most) and resolution, its turntable along the row."""
        n = min(8, len(next(iter(arrays.values()))))
        return [a[k:k + 1] for k in range(n) for a in arrays.values()], [f"#{k} {R}x{R}" for k in range(n) for R in arrays]

    def reconstruct(self, vae, source, resolutions, n, device, frames=None):
        """sample.py --reconstruct: render the cameras of `source` and print the mean PSNR against its pictures.

        `source`: "synthetic" (n held-out synthetic scenes, encoded from their point clouds), or
        posed pictures in any format of --data, whose scenes are matched to the model's by name.
        """
        num_scenes = self.data_settings["num_scenes"]
        if resolutions:
            raise SystemExit("--resolution: scenes are rendered at their pictures' size (the run's --resolution); "
                             "leave it out")
        if source == "synthetic":
            if num_scenes:
                raise SystemExit("--reconstruct synthetic: this model was auto-decoded from posed pictures; "
                                 "give it pictures of its own scenes")
            items = self.held_out_synthetic()
        else:
            if not num_scenes:
                raise SystemExit(f"--reconstruct {source}: this model encodes point clouds (synthetic scenes); "
                                 f"posed pictures have none, use --reconstruct synthetic")
            tr, va = readers.read_posed_scenes(source, self.resolution, "--reconstruct")
            scenes = [{k: (torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) and a[k].dim() else a[k]) for k in a}
                      for a, b in zip(tr, va)]  # every view of each scene
            known = self.data_settings["scene_names"]
            for s in scenes:
                if len(known) > 1 and s["name"] not in known:
                    raise SystemExit(f"--reconstruct {source}: scene {s['name']!r} is not one the model was fit to "
                                     f"({', '.join(known[:5])}{', ...' if len(known) > 5 else ''})")
            items = readers.stack_scenes(scenes, "--reconstruct", source)
            items["x"] = torch.tensor([known.index(s["name"]) if len(known) > 1 else 0 for s in scenes])
        score, each, truths, recs, views = self.compare(vae, items, device, n=n or (16 if source == "synthetic" else None))
        H = truths[0].shape[-1]
        print(f"{len(each)} scene(s), {views} views at {H}x{H}: mean PSNR {score:.2f} dB"
              + ("" if len(each) == 1 else " (" + ", ".join(f"{p:.2f}" for p in each) + ")"))
        rows, names = [], []
        for t, r in zip(truths[:4], recs[:4]):
            rows += [t[:8], r[:8]]
            names += ["data", "rendered"]
        return rows, names

    def write_sheet(self, rows, path, row_names=None, title=None):
        """Rows of pictures (n, 3, R, R) -> a PNG; rows of turntables (n, 3, T, R, R) -> a PNG strip and a GIF."""
        if rows[0].dim() == 5:
            figures.write_clips(rows, path, row_names, title, strip_frames=min(8, rows[0].shape[2]))
        else:
            figures.write_sheet(rows, path, row_names, title)


# ----------------------------------------------------------------------------------------
# Demo: synthetic scenes encoded from their coloured point clouds; held-out scenes rendered
# ----------------------------------------------------------------------------------------
if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    t0 = time.time()
    mod = NerfModality(M.demo_settings(samples_per_ray=24, z_ch=8, enc_ch=16))  # pictures of 32x32
    mod.synthetic_train, mod.synthetic_val = 16, 4
    train, val, _ = mod.load(None)
    vae = M.fit(mod, mod.build_vae(), train, steps := 300, batch=4, K=256, lr=2e-3)  # stage 1 (file 05)
    with torch.no_grad():
        train_psnr = mod.compare(vae, train, "cpu", n=4)[0]
        scores, rows, names = mod.evaluate(vae, val, "cpu")
    print(f"{steps} steps in {time.time() - t0:.0f} s: PSNR of 3 views of 4 training scenes {train_psnr:.2f} dB, "
          f"of 4 held-out scenes {scores['psnr']:.2f} dB")
    mod.write_sheet(rows, "out/11_nerf.png", names, "held-out synthetic scenes (3 views each) and their fields")
    print("wrote out/11_nerf.png")
