"""Tests for 03_hdbf_cfc.py: the multi-scale decoder, the coarse-to-fine read-out and the three ablation variants."""
import importlib

import pytest
import torch
import torch.nn.functional as F

I = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
H = importlib.import_module("03_hdbf_cfc")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_hdbf_decoder_field_shapes(h, w):
    torch.manual_seed(0)
    B, Z, C = 2, 4, 6
    dec = H.HDBFDecoder(Z, C, ch=8, ch_mult=(1, 2, 2))
    assert not hasattr(dec, "to_field") and len(dec.taps) == 3
    fields = dec(torch.randn(B, Z, h, w))
    assert [tuple(f.shape) for f in fields] == [(B, C, h, w), (B, C, 2 * h, 2 * w), (B, C, 4 * h, 4 * w)]
    # each field is the 1x1 tap of its decoder level, coarse to fine
    z = torch.randn(B, Z, h, w)
    levels, fields = dec.levels(z), dec(z)
    for tap, lvl, f in zip(dec.taps, levels, fields):
        torch.testing.assert_close(f, tap(lvl))
    # fewer scales: the finest ones
    dec2 = H.HDBFDecoder(Z, C, ch=8, ch_mult=(1, 2, 2), num_scales=2)
    assert [tuple(f.shape) for f in dec2(z)] == [(B, C, 2 * h, 2 * w), (B, C, 4 * h, 4 * w)]


def cfc_inputs(g, B=2, N=5, dims=(3, 4, 5)):
    return [torch.randn(B, N, d, generator=g) for d in dims]


def test_cfc_layer_widths():
    ro = H.CFCReadout([3, 4, 5], hidden=16, out_ch=2, num_layers=5)
    assert [(l.in_features, l.out_features) for l in ro.layers] == [(3, 16), (16 + 4, 16), (16 + 5, 16), (16, 16), (16, 2)]
    with pytest.raises(AssertionError):
        H.CFCReadout([3, 4, 5], hidden=16, out_ch=2, num_layers=3)  # needs one layer per scale + output


def test_cfc_coarse_to_fine_wiring():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ro = H.CFCReadout([3, 4, 5], hidden=16, out_ch=2, num_layers=4)
    acts = {}
    ro.layers[0].register_forward_hook(lambda m, i, o: acts.__setitem__("h1", o.detach().clone()))
    ro.layers[1].register_forward_hook(lambda m, i, o: acts.__setitem__("h2", o.detach().clone()))

    def run(p):
        out = ro(p).detach()
        return acts["h1"], acts["h2"], out

    p = cfc_inputs(g)
    h1, h2, out = run(p)
    assert out.shape == (2, 5, 2)
    for s, name in enumerate(("coarse", "mid", "fine")):
        q = [t.clone() for t in p]
        q[s] = q[s] + torch.randn(q[s].shape, generator=g)
        h1_q, h2_q, out_q = run(q)
        # the first layer sees the coarse embedding only; the second adds the mid one
        assert torch.equal(h1_q, h1) == (s > 0), name
        assert torch.equal(h2_q, h2) == (s > 1), name
        # the output depends on every scale
        assert (out_q - out).abs().max() > 1e-4, name


def test_cfc_equals_the_formula():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    ro = H.CFCReadout([3, 4, 5], hidden=8, out_ch=2, num_layers=4)
    p1, p2, p3 = cfc_inputs(g)
    L = ro.layers
    h = F.relu(L[0](p1))
    h = F.relu(L[1](torch.cat([h, p2], -1)))
    h = F.relu(L[2](torch.cat([h, p3], -1)))
    torch.testing.assert_close(ro([p1, p2, p3]), L[3](h))
    with pytest.raises(AssertionError):
        ro([p1, p2])  # one embedding per scale


@pytest.mark.parametrize("variant", H.VARIANTS)
def test_build_decoder_readout_variants_work(variant):
    torch.manual_seed(0)
    Z = 4
    decoder, readout = H.build_decoder_readout(variant, Z, field_ch=6, out_ch=3, ch=8, hidden=16)
    vae = V.D2CVAE(V.ConvEncoder(3, Z, ch=8), decoder, readout)
    x = torch.randn(2, 3, 16, 12)
    q = vae.encode(x)
    assert q.mean.shape == (2, Z, 4, 3)
    fields = vae.decode(q.sample())
    expected = [(2, 6, 16, 12)] if variant == "single" else [(2, 6, 4, 3), (2, 6, 8, 6), (2, 6, 16, 12)]
    assert [tuple(f.shape) for f in fields] == expected
    coords = torch.rand(2, 50, 2) * 2 - 1
    out = vae.query(fields, coords)
    assert out.shape == (2, 50, 3) and torch.isfinite(out).all()
    # the output depends on the input image
    out2 = vae.query(vae.decode(vae.encode(x.flip(-1)).mean), coords)
    assert (out2 - vae.query(vae.decode(q.mean), coords)).abs().max() > 1e-5
    # the read-out is the one the variant names
    assert isinstance(readout, H.CFCReadout) == (variant == "hdbf_cfc")
    assert isinstance(decoder, H.HDBFDecoder) == (variant != "single")


def test_build_decoder_readout_rejects_unknown_variant():
    with pytest.raises(ValueError, match="hdbf_bogus"):
        H.build_decoder_readout("hdbf_bogus", 4, 16, 3)


def test_variant_parameter_counts():
    # defaults of the demo: Z = 4, 16-channel fields, trunk ch = 32, hidden 64, 4 layers
    counts = {}
    for v in H.VARIANTS:
        decoder, readout = H.build_decoder_readout(v, 4, field_ch=16, out_ch=3)
        counts[v] = (n_params(decoder), n_params(readout))
    total = {v: sum(c) for v, c in counts.items()}
    assert total == {"single": 216115, "hdbf_concat": 220243, "hdbf_cfc": 220243}, total
    # concat and CFC have exactly the same size: with 4 layers and 3 scales of C channels,
    # 3C H + 2 H^2 weights (concat) = C H + 2 (H + C) H (CFC), and the same biases
    assert counts["hdbf_concat"] == counts["hdbf_cfc"]
    # the three variants are within 2% of each other (the comparison is about the idea, not the size)
    assert max(total.values()) / min(total.values()) < 1.02
    for hidden, field_ch in ((32, 8), (128, 24)):
        a = n_params(H.build_decoder_readout("hdbf_concat", 4, field_ch, 3, ch=8, hidden=hidden)[1])
        b = n_params(H.build_decoder_readout("hdbf_cfc", 4, field_ch, 3, ch=8, hidden=hidden)[1])
        assert a == b, (hidden, field_ch)
