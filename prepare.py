"""Preparation: a dataset decoded once, in parallel, into an array on disk that runs read by index.

Plumbing, not a concept. Decoding 30,000 JPEGs takes minutes; a run should not pay that at every
start, nor hold the decoded images in memory. The first run on a dataset decodes every item in
worker processes on all cores, resizes it to the run's size and writes it straight into a
preallocated array on disk (a .npy opened as a numpy memmap: uint8 pictures, or the float32 points
of shapes), with a progress line. A small
manifest beside it (the source, its files with their sizes and modification times, the size, this
file's VERSION) says when the array is stale; otherwise the next run, whatever its --out, opens
it at once. Training then draws batches from the array by index (`Stored`), so a run's memory does
not grow with the dataset, and the batches are exactly those of the same items decoded directly.

The cache lives in the user's cache folder ($XDG_CACHE_HOME, or ~/.cache, then ddmi/), one folder
per source and size, never inside the user's data; `--cache DIR` chooses another, `--no-cache`
decodes into memory instead. Items that cannot be read are left out with a warning when they are
at most 1% of the dataset; more is a one-line error naming the first few.
"""
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
import torch

VERSION = 2  # of the decoding: a new one makes every cache stale
MAX_BAD = 0.01  # the share of unreadable items a dataset may have before it is an error


class Stored:
    """Items of an array, in memory or in a file on disk, the first axis indexed through `index`:
    stored[i] / stored[tensor of indices] / stored[a:b] -> a torch tensor; subset(ids) -> a Stored.

    array: the items in memory, or a memmap of them (a .npy file of the cache, or `file`, an open
    file with no name, such as train.py's latents). Rows on disk are read with pread into a fresh
    array: they pass through the page cache, which the system reclaims, and never count in the
    process's memory (a memmap's pages would, up to the whole file once every item was read). A key
    with more axes (NeRF's scene, view, row and column of single pixels) is read through the memmap.
    """

    def __init__(self, array, index=None, file=None):
        self.array, self.index = array, np.arange(len(array)) if index is None else np.asarray(index)
        self.file, self.fd = file, None

    def __len__(self):
        return len(self.index)

    @property
    def shape(self):
        return (len(self), *self.array.shape[1:])

    def __getitem__(self, key):
        if isinstance(key, tuple):  # rows, then more axes
            rows = self.index[key[0].numpy() if torch.is_tensor(key[0]) else key[0]]
            return torch.from_numpy(np.require(self.array[(rows, *key[1:])], requirements=["C", "W"]))
        rows = self.index[key.numpy() if torch.is_tensor(key) else key]
        if not isinstance(self.array, np.memmap):
            return torch.from_numpy(np.require(self.array[rows], requirements=["C", "W"]))
        single, rows = np.ndim(rows) == 0, np.atleast_1d(rows)
        out = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
        if self.fd is None:  # (pread: no shared file position, safe in forked processes)
            self.fd = self.file.fileno() if self.file else os.open(self.array.filename, os.O_RDONLY)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # runs of consecutive rows: one read each
        for a, b in zip(starts, [*starts[1:], len(rows)]):
            os.preadv(self.fd, [memoryview(out[a:b]).cast("B")], self.array.offset + int(rows[a]) * out[0].nbytes)
        return torch.from_numpy(out[0] if single else out)

    def subset(self, ids):
        return Stored(self.array, self.index[np.asarray(ids)], self.file)

    def write(self, first, rows):
        """Rows (a tensor) into the file from row `first` (a Stored of unnamed_file)."""
        data = np.ascontiguousarray(rows.numpy(), dtype=self.array.dtype)
        os.pwrite(self.file.fileno(), data.tobytes(), self.array.offset + first * data[0].nbytes)

    def __del__(self):
        if getattr(self, "fd", None) is not None and self.file is None:
            os.close(self.fd)

    def __getstate__(self):  # (an open file does not travel to another process)
        return {**self.__dict__, "fd": None}


class Part:
    """A part of every item of a Stored: part[key] -> take(stored[rows of key])[the key's other axes]."""

    def __init__(self, stored, take):
        self.stored, self.take = stored, take
        self.shape = (len(stored), *take(stored[:1]).shape[1:])

    def __len__(self):
        return len(self.stored)

    def __getitem__(self, key):
        rows, more = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, int):  # one item: read as a batch of one
            return self[(slice(rows, rows + 1), *more)][0]
        return self.take(self.stored[rows])[(slice(None), *more)] if more else self.take(self.stored[rows])

    def subset(self, ids):
        return Part(self.stored.subset(ids), self.take)


def unnamed_file(folder, shape, dtype=np.float32):
    """A Stored array of `shape` in a file with no name in `folder` (gone when closed or when the process
    dies); fill it with .write(first row, rows), which go to disk, not to the process's memory."""
    file = tempfile.TemporaryFile(dir=folder)
    file.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return Stored(np.memmap(file, dtype, "r", shape=shape), file=file)


def cache_root(cache):
    """The folder prepared datasets live in: --cache, else $XDG_CACHE_HOME/ddmi or ~/.cache/ddmi."""
    return cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ddmi")


def signature(files):
    """What decides staleness: every file with its size and modification time."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def _init_worker():
    torch.set_num_threads(1)  # the processes share the cores; one thread each


def _decode_chunk(job):
    """A worker: decode items [start, start + len(items)) into the array on disk -> (count, bad ones)."""
    decode, items, start, path = job
    array, bad = np.load(path, mmap_mode="r+"), []
    for k, item in enumerate(items):
        try:
            array[start + k] = decode(item)
        except (Exception, SystemExit) as e:  # a reader's one-line error, or anything a broken file raises
            bad.append((start + k, str(e) if isinstance(e, SystemExit) else f"{item}: {type(e).__name__}: {e}"))
    array.flush()
    return len(items), bad


def prepare(source, items, decode, shape, key, cache, flag, what="items", files=None, dtype=np.uint8):
    """The items of a dataset decoded into one array of (len(items), *shape) -> Stored.

    source: the dataset's path (names the cache folder); items: what decode(item) turns into an array
    of `shape` and `dtype` (file paths, or anything else that can be pickled); key: a dict of what else the
    result depends on (the size, ...); files: those whose change makes the cache stale (default: the
    items, when they are paths). cache: a folder, "" for the default one, or None: decode into memory.
    """
    files = files or (items if all(isinstance(i, str) for i in items) else [source])
    manifest = {"version": VERSION, "source": os.path.realpath(source), "key": key, "shape": list(shape),
                "dtype": np.dtype(dtype).str, "count": len(items), "files": signature(files)}
    if cache is None:
        return _keep_good(source, *_decode_all(items, decode, shape, dtype, None, flag, what), flag, what)
    name = f"{os.path.basename(os.path.normpath(source))}-{hashlib.sha1(manifest['source'].encode()).hexdigest()[:10]}"
    folder = os.path.join(cache_root(cache), name, "-".join(f"{k}{v}" for k, v in sorted(key.items())))
    os.makedirs(folder, exist_ok=True)
    array_path, manifest_path = os.path.join(folder, "items.npy"), os.path.join(folder, "manifest.json")
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares; the others (other ranks, other runs) wait
        with contextlib.suppress(OSError, ValueError):
            saved = json.load(open(manifest_path))
            if {k: saved.get(k) for k in manifest} == manifest:
                print(f"{flag} {source}: prepared {what} from {folder}")
                return _keep_good(source, np.load(array_path, mmap_mode="r"), saved["bad"], flag, what)
        print(f"{flag} {source}: preparing {len(items)} {what} once into {folder}")
        array, bad = _decode_all(items, decode, shape, dtype, array_path + ".tmp.npy", flag, what)
        del array  # (flushed by the workers)
        os.replace(array_path + ".tmp.npy", array_path)
        tmp = manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**manifest, "bad": bad}, f)
        os.replace(tmp, manifest_path)
        return _keep_good(source, np.load(array_path, mmap_mode="r"), bad, flag, what)


def _decode_all(items, decode, shape, dtype, path, flag, what):
    """Decode every item, in worker processes when there are many -> (array, [(index, reason), ...])."""
    n, t0, done, bad = len(items), time.time(), 0, []
    if path is None:  # in memory (--no-cache): one process
        array = np.zeros((n, *shape), dtype)
        for i, item in enumerate(items):
            try:
                array[i] = decode(item)
            except (Exception, SystemExit) as e:
                bad.append((i, str(e) if isinstance(e, SystemExit) else f"{item}: {type(e).__name__}: {e}"))
        return array, bad
    size = n * int(np.prod(shape)) * np.dtype(dtype).itemsize
    if shutil.disk_usage(os.path.dirname(path)).free < size * 1.05:
        raise SystemExit(f"{flag}: {n} {what} of {'x'.join(map(str, shape))} need "
                         f"{size / 2 ** 30:.1f} GiB in {os.path.dirname(path)}; not that much is free "
                         f"(--cache DIR to prepare them elsewhere)")
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))
    chunk = 64
    jobs = [(decode, items[i:i + chunk], i, path) for i in range(0, n, chunk)]
    workers = min(os.cpu_count() or 1, len(jobs))
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker) if workers > 1 else None
    last = time.time()
    try:
        for count, failed in (pool.imap_unordered(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)):
            done, bad = done + count, bad + failed
            if time.time() - last > 5 or done == n:
                rate = done / max(time.time() - t0, 1e-9)
                print(f"{flag}: {done}/{n} {what} ({rate:.0f}/s, {(n - done) / rate:.0f} s left)", flush=True)
                last = time.time()
    finally:
        if pool:
            pool.close()
            pool.join()
    return array, sorted(bad)


def _keep_good(source, array, bad, flag, what):
    """Stored items without the unreadable ones: a warning when they are few, an error when not."""
    if len(bad) > MAX_BAD * len(array):
        raise SystemExit(f"{flag} {source}: {len(bad)} of {len(array)} {what} cannot be read (more than "
                         f"{MAX_BAD:.0%}); the first: {'; '.join(reason for _, reason in bad[:3])}")
    if bad:
        print(f"{flag} {source}: left out {len(bad)} of {len(array)} {what} that cannot be read, the first: {bad[0][1]}")
    return Stored(array, np.setdiff1d(np.arange(len(array)), [i for i, _ in bad]))
