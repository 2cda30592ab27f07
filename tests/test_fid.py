"""bench/fid.py: the Frechet distance and the TF-style resize, against closed forms; bench/quality.py's
table row that applies the distance per class, and its real sets drawn with the samples' classes."""
import importlib.util
import os

import numpy as np
import pytest
import torch

spec = importlib.util.spec_from_file_location("fid", os.path.join(os.path.dirname(__file__), "..", "bench", "fid.py"))
fid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fid)
spec_q = importlib.util.spec_from_file_location("quality", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                        "quality.py"))
quality = importlib.util.module_from_spec(spec_q)
spec_q.loader.exec_module(quality)


def test_frechet_distance_of_two_gaussians():
    # Diagonal covariances commute, so FID = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 exactly.
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.0, 2.0])
    f1 = mu1 + rng.standard_normal((n, d)) * np.sqrt(a)
    f2 = mu2 + rng.standard_normal((n, d)) * np.sqrt(b)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert abs(fid.frechet_distance(f1, f2) - expected) < 0.05
    assert abs(fid.frechet_distance(f1, f1)) < 1e-6


def test_frechet_distance_with_full_covariances_matches_scipy_free_formula():
    # Rotated covariances do not commute; check against Tr sqrt via the eigen-decomposition of S1 S2.
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    f1, f2 = rng.standard_normal((50_000, 3)) @ A, rng.standard_normal((50_000, 3)) @ B + 0.5
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # S1 S2 is similar to a PSD matrix: its eigenvalues are real and >= 0
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert abs(fid.frechet_distance(f1, f2) - expected) < 1e-6 * max(1.0, expected)


def test_tf_resize_reads_input_position_j_times_in_over_out():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()  # columns 0, 1, 2, 3
    y = fid.tf_resize(x, size=8)
    # out column j reads position j * 4 / 8 = j / 2 (no half-pixel shift), clamped at the border
    assert torch.allclose(y[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.0]))
    assert torch.equal(fid.tf_resize(x, size=4), x)


def test_the_quality_table_says_which_class_is_off():
    # bench/quality.py's row: the FD per class compares each class's items with the real ones of
    # that class, so a shift of one class shows in its own entry and not in the others'.
    rng = np.random.default_rng(2)
    labels = torch.arange(3000) % 3
    centres = 2.0 * labels.numpy()[:, None]  # each class of features at its own place, real and fake
    real = rng.standard_normal((3000, 4)) + centres
    fake = rng.standard_normal((3000, 4)) + centres
    fake[(labels == 2).numpy()] += 3.0  # the third class drawn off to one side
    line = quality.row("samples", labels, labels, fake, labels, real, ("discs", "squares", "rings"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    each = dict(item.split() for item in cells[3].split(", "))
    assert cells[1].startswith("100.0%")  # every prediction its label
    assert float(each["discs"]) < 0.05 and float(each["squares"]) < 0.05
    assert abs(float(each["rings"]) - 4 * 9.0) < 1.0  # ||mu1 - mu2||^2 over 4 dimensions shifted by 3


def test_real_sets_are_drawn_with_the_samples_classes():
    # bench/quality.py's with_classes: real items of exactly the samples' classes, item for item, so
    # the FD does not charge the samples for a real set's random class counts; a rare class makes
    # it draw a larger pool instead of coming back short.
    pools = []

    def real(n, seed):  # items whose value is their class; class 2 one time in ten
        g = torch.Generator().manual_seed(seed)
        y = torch.multinomial(torch.tensor([0.45, 0.45, 0.10]), n, replacement=True, generator=g)
        pools.append(n)
        return y.float()[:, None] + 0.01 * torch.rand(n, 1, generator=g), y

    labels = torch.arange(300) % 3
    x, y = quality.with_classes(real, labels, seed=11)
    assert torch.equal(y, labels) and torch.equal(x[:, 0].round().long(), labels)
    assert len(x.unique()) == 300  # distinct items, none picked twice
    assert pools[0] == 600 and pools[-1] > 600  # 60 of class 2 expected in the first pool of 600: not enough
    x2, _ = quality.with_classes(real, labels, seed=12)
    assert not torch.equal(x, x2)  # another seed, other items
    with pytest.raises(SystemExit, match="fewer than 300 items of some class"):  # a class never drawn: no endless loop
        quality.with_classes(lambda n, seed: (torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)), labels, seed=0)
