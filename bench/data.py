"""Real datasets at their real size: preparing a folder of large JPEGs once, then training from it.

    python bench/data.py --n 5000 --work /tmp/databench        # ~10 minutes on 2 cores
    python bench/data.py --n 10000 --out bench/data.md          # also write the table as markdown

Writes --n JPEGs of --size x --size (smooth random pictures with grain, about the bytes of a
CelebA-HQ file) into --work/celeba_like/{train,val}/{female,male}/, the first time only, then
measures, each figure in this run:

  1. decoding: one process decoding with readers.decode_image (Pillow's draft mode) at
     --resolution, items/s; and prepare.py on every core, items/s, as a share of (that rate x
     cores): the target is >= 70%;
  2. peak resident memory (RSS) of the process that prepares, and of its busiest worker;
  3. reopening the prepared cache (the listing, and the manifest's check of every file's size and
     time): seconds for these images, and for a folder of 30,000 (CelebA-HQ's count; hard links to
     small JPEGs, prepared at 16x16 first); the target is < 1 s;
  4. training 100 stage-1 steps and 100 stage-2 steps from the cache, with 1,000 of the images
     (every n/1000-th) and with all --n: peak RSS of each run, their ratio (target: within 10%), and the
     same two runs with --no-cache (the dataset decoded into memory) as the reference.

Every run is a fresh process (its peak RSS from os.wait4), with its own empty cache folder.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import readers  # noqa: E402

# a small model at 256x256: the figures are about the data, not the network (self-attention only at
# the UNet's 8x8 level: at 32x32 its 1024-token attention maps alone would take ~2 GB a step)
TRAIN_FLAGS = ["--modality", "image", "--batch-size", "4", "--z-ch", "2", "--enc-ch", "8", "--field-ch", "4",
               "--mlp-hidden", "16", "--ldm-ch", "16", "--ldm-mult", "1,2,2,2", "--ldm-attn", "3", "--ldm-batch",
               "8", "--steps", "100", "--coords-per-item",
               "256", "--log-every", "50", "--ckpt-every", "1000", "--sample-steps", "2", "--labels", "folders"]


def write_picture(job):
    """One smooth random picture with grain, as a JPEG (quality 90) -> its size in bytes."""
    from PIL import Image

    path, size, seed = job
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    a = np.asarray(small).astype(np.int16) + rng.normal(0, 4, (size, size, 1)).astype(np.int16)
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def write_dataset(root, n, size):
    """n JPEGs in root/{train,val}/{female,male}/ (a tenth in val), unless they are there already."""
    done = os.path.join(root, f".written-{n}-{size}")
    if os.path.exists(done):
        return
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(n):
        folder = os.path.join(root, "val" if i % 10 == 9 else "train", ("female", "male")[i % 2])
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{i}.jpg"), size, i))
    t0 = time.time()
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = pool.map(write_picture, jobs, chunksize=16)
    print(f"wrote {n} JPEGs of {size}x{size} ({np.mean(sizes) / 1e3:.0f} kB each) in {time.time() - t0:.0f} s")
    open(done, "w").close()


def write_links(root, n):
    """n files in root/{train,val}/{female,male}/, hard links to four small JPEGs: a folder of CelebA-HQ's
    count to list and check (its files' sizes and times), not to decode."""
    if os.path.exists(os.path.join(root, f".written-{n}")):
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for k in range(4):
        write_picture((os.path.join(root, f"source{k}.jpg"), 32, k))
    for i in range(n):
        folder = os.path.join(root, "val" if i % 10 == 9 else "train", ("female", "male")[i % 2])
        os.makedirs(folder, exist_ok=True)
        os.link(os.path.join(root, f"source{i % 4}.jpg"), os.path.join(folder, f"{i}.jpg"))
    for k in range(4):
        os.remove(os.path.join(root, f"source{k}.jpg"))
    open(os.path.join(root, f".written-{n}"), "w").close()


def run(args, cwd=ROOT, env=None):
    """A fresh process -> (wall seconds, peak RSS in MB, its stdout)."""
    t0 = time.time()
    p = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(args[:4])}...: exit {p.returncode}\n{out[-2000:]}")
    return time.time() - t0, usage.ru_maxrss / 1024, out


PREPARE = """
import functools, json, resource, sys, time
sys.path.insert(0, {root!r})
import prepare, readers
t0 = time.time()
found = readers.image_listing({data!r}, labels=True)
t_list = time.time() - t0
x = prepare.prepare({data!r}, found["files"], functools.partial(readers.decode_image, size={R}), (3, {R}, {R}),
                    {{"R": {R}}}, {cache!r}, "--data", "images")
print(json.dumps({{"seconds": time.time() - t0, "list_seconds": t_list, "items": len(x),
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def prepare_once(data, R, cache):
    """prepare.py in a fresh process -> (its figures, peak RSS of the process in MB)."""
    _, rss, out = run([sys.executable, "-c", PREPARE.format(root=ROOT, data=data, R=R, cache=cache)])
    return json.loads(out.strip().splitlines()[-1]), rss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="JPEGs to write (at least 1000)")
    p.add_argument("--size", type=int, default=1024, help="their side in pixels")
    p.add_argument("--resolution", type=int, default=256, help="the side they are prepared at")
    p.add_argument("--work", default="/tmp/ddmi_databench", help="folder for the pictures, caches and runs")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    a = p.parse_args(argv)
    if a.n < 1000:
        p.error("--n: at least 1000 (the memory comparison trains on 1000 of them and on all)")
    data = os.path.join(a.work, "celeba_like")
    write_dataset(data, a.n, a.size)
    files = readers.image_listing(data)["files"]
    rows, cores = [], os.cpu_count()

    # 1. one process, then prepare.py on every core
    import torch

    torch.set_num_threads(1)
    sample = files[:: max(1, len(files) // 300)][:300]
    t0 = time.time()
    for f in sample:
        readers.decode_image(f, a.resolution)
    one = len(sample) / (time.time() - t0)
    rows.append(("1. decode, one process (Pillow draft mode + resize)", f"{one:.0f} images/s",
                 f"x {cores} cores = {one * cores:.0f} images/s"))
    cache = os.path.join(a.work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    first, rss = prepare_once(data, a.resolution, cache)
    rate = first["items"] / first["seconds"]
    rows.append((f"1. prepare {first['items']} images at {a.resolution}x{a.resolution}, {cores} workers",
                 f"{rate:.0f} images/s ({first['seconds']:.1f} s, listing {first['list_seconds']:.1f} s)",
                 f"{rate / (one * cores):.0%} of one process x cores (target >= 70%)"))
    rows.append(("2. peak RSS while preparing", f"{rss:.0f} MB (main process)",
                 f"{first['worker_rss_mb']:.0f} MB (busiest worker)"))

    # 3. reopening a prepared cache: of these images, and of 30,000 (CelebA-HQ's count) small ones
    again, _ = prepare_once(data, a.resolution, cache)
    rows.append((f"3. reopen the prepared cache ({again['items']} images)", f"{again['seconds']:.2f} s",
                 f"~{again['seconds'] / again['items'] * 30000:.2f} s for 30,000 by the per-file cost"))
    many = os.path.join(a.work, "celeba_like_30000")
    write_links(many, 30000)
    prepare_once(many, 16, cache)  # (small pictures: preparing them is quick, and the listing is what is timed)
    again, _ = prepare_once(many, 16, cache)
    rows.append((f"3. reopen a prepared cache of {again['items']} images", f"{again['seconds']:.2f} s "
                 f"(listing {again['list_seconds']:.2f} s)", "target < 1 s"))

    # 4. training from the cache, 1000 images and all of them; the same in memory as the reference
    subset = os.path.join(a.work, "some_1000")
    if not os.path.isdir(subset):
        for f in files[::len(files) // 1000][:1000]:  # spread over the splits and classes
            link = os.path.join(subset, os.path.relpath(f, data))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(f, link)
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(a.work, "train_cache")}
    shutil.rmtree(env["XDG_CACHE_HOME"], ignore_errors=True)
    peaks = {}
    for name, folder in (("1000", subset), (str(len(files)), data)):
        for how, extra in (("cache", []), ("in memory", ["--no-cache"])):
            out = os.path.join(a.work, "runs", f"{name}-{how.replace(' ', '_')}")
            shutil.rmtree(out, ignore_errors=True), shutil.rmtree(out + "-prep", ignore_errors=True)
            cmd = [sys.executable, "train.py", *TRAIN_FLAGS, "--data", folder, "--resolution", str(a.resolution),
                   "--out", out, *extra]
            if how == "cache":  # prepared by a first run; the measured one opens it
                run(cmd[:cmd.index("--steps") + 1] + ["1"] + cmd[cmd.index("--steps") + 2:] + ["--out", out + "-prep"],
                    env=env)
            seconds, peak, _ = run(cmd, env=env)
            peaks[(name, how)] = peak
            rows.append((f"4. train 100 + 100 steps on {name} images ({how})", f"{seconds:.0f} s", f"peak RSS {peak:.0f} MB"))
    n = str(len(files))
    rows.append((f"4. peak RSS, {n} / 1000 images", f"cache: {peaks[(n, 'cache')] / peaks[('1000', 'cache')]:.2f}x "
                 f"(target within 1.10x)", f"in memory: {peaks[(n, 'in memory')] / peaks[('1000', 'in memory')]:.2f}x"))

    table = ["| what | measured | against |", "|---|---|---|"] + [f"| {w} | {m} | {r} |" for w, m, r in rows]
    head = (f"Measured with `python bench/data.py --n {a.n}` ({a.size}x{a.size} JPEGs, {cores} cores, "
            f"torch {torch.__version__}).\n")
    print("\n" + head + "\n" + "\n".join(table))
    if a.out:
        with open(a.out, "w") as f:
            f.write(head + "\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
