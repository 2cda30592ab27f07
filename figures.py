"""Figures: sheets of pictures, animated clips and loss curves, written atomically.

Plumbing, not a concept: every numbered file and both drivers write their pictures through
these three functions. Pictures are tensors in [-1, 1], channels first, like every signal of
the project. A file is written under a temporary name and renamed (engine.write_atomically), so
a reader never sees a half-written PNG or GIF, and a full disk is one line, not a traceback.
"""
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import engine  # noqa: E402


def _save(fig, path, **kwargs):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write = lambda tmp: fig.savefig(tmp, **kwargs)  # noqa: E731
    engine.write_atomically(path, write, tmp=path + ".tmp" + os.path.splitext(path)[1])


def sheet_axes(n_rows, n_cols, row_names=None, title=None):
    """A figure with a grid of bare picture cells (no ticks, no frame), rows named."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.6, 1.3 * n_rows + 0.4), squeeze=False)
    plt.close(fig)  # pyplot forgets it (no figures pile up); the caller still draws into it and saves it
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


def write_sheet(rows, path, row_names=None, title=None):
    """Rows of pictures (each (n, 3, R_row, R_row) in [-1, 1]) as one PNG.

    Rows of lower resolution are enlarged with nearest-neighbour copies, so that every pixel
    stays visible as it was produced.
    """
    size = max(r.shape[-1] for r in rows)
    fig, axes = sheet_axes(len(rows), max(r.shape[0] for r in rows), row_names, title)
    for i, row in enumerate(rows):
        big = F.interpolate(row.float().cpu(), size=(size, size), mode="nearest")
        for k in range(len(big)):
            axes[i, k].imshow(((big[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
    fig.tight_layout()
    _save(fig, path, dpi=100)


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
    fig, axes = sheet_axes(len(rows), max(len(b) for b in big), row_names, title)
    ims = [[axes[i, k].imshow(b[k, 0], interpolation="nearest") for k in range(len(b))] for i, b in enumerate(big)]
    fig.tight_layout()

    def show(k):  # step k of the GIF: every row at its frame floor(k T_row / T)
        for b, row in zip(big, ims):
            for j, im in enumerate(row):
                im.set_data(b[j, k * b.shape[1] // T])
        return [im for row in ims for im in row]

    gif = os.path.splitext(path)[0] + ".gif"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    animation = FuncAnimation(fig, show, frames=T, interval=1000 / fps)
    write = lambda tmp: animation.save(tmp, writer=PillowWriter(fps=fps), dpi=80)  # noqa: E731
    engine.write_atomically(gif, write, tmp=gif + ".tmp.gif")
    # the strip: strip_frames frames of the first clip of each row, evenly spaced in time
    strips = [r[0][:, torch.arange(strip_frames) * r.shape[2] // strip_frames].transpose(0, 1) for r in rows]
    write_sheet(strips, path, row_names, title)


def plot_losses(history, path):
    """Loss curves of the two stages ({"stage1": [(step, value), ...], "stage2": ...}) as one PNG."""
    stages = [(k, v) for k, v in history.items() if v]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], stages):
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"stage1": "stage 1: reconstruction term", "stage2": "stage 2: diffusion loss"}.get(name, name))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=100)
    plt.close(fig)


class ArrayFile:
    """Samples in [-1, 1] stored as one uint8 .npy of a known shape (n, ...), written a batch at a time,
    so memory holds one batch and not all of them; renamed into place by close()."""

    def __init__(self, path, shape):
        self.path, self.tmp = path, path + ".tmp"
        self._do(lambda: setattr(self, "f", open(self.tmp, "wb")))
        header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
        self._do(lambda: np.lib.format.write_array_header_1_0(self.f, header))

    def _do(self, write):
        try:
            write()
        except OSError as e:  # a full disk: no partial file left behind
            if hasattr(self, "f"):
                self.f.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
            raise engine.write_failed(self.path, e) from None

    def write(self, x):  # x (b, ...) in [-1, 1]
        data = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
        self._do(lambda: self.f.write(data))

    def close(self):
        self.f.close()
        self._do(lambda: os.replace(self.tmp, self.path))
