"""File 12: mNIF and the hyper-transformer against hand-built SIRENs, overfits, and train.py --from."""
import importlib
import math
import os

import pytest
import torch
from conftest import TINY

inr = importlib.import_module("01_inr")
V = importlib.import_module("02_d2c_vae")
Hd = importlib.import_module("03_hdbf_cfc")
W = importlib.import_module("12_weight_generation")
train = importlib.import_module("train")
sample = importlib.import_module("sample")


def hand_siren(Ws, bs, c, w0):
    """One SIREN, written out: sin(w0 (c W + b)) per hidden layer, linear at the end; float64."""
    h = c
    for l, (Wl, bl) in enumerate(zip(Ws, bs)):
        h = h @ Wl + bl
        if l < len(Ws) - 1:
            h = torch.sin(w0 * h)
    return h


def test_mnif_mixture_equals_the_mixed_siren_built_by_hand():
    torch.manual_seed(0)
    K, Z = 3, 2
    gen = W.MNIFGenerator((Z, 2, 2), out_ch=3, hidden=8, num_layers=3, num_bases=K).double()
    with torch.no_grad():
        gen.to_alpha.weight.normal_()  # coefficients that differ clearly from item to item
    z = torch.randn(2, Z, 2, 2, dtype=torch.float64)
    c = torch.rand(2, 5, 2, dtype=torch.float64) * 2 - 1
    out = W.siren(gen(z), c, gen.w0)  # (2, 5, 3)
    # alpha = (A' vec(z) / sqrt(D) + a') / K, by hand
    D = Z * 2 * 2
    alpha = (z.flatten(1) @ gen.to_alpha.weight.T / math.sqrt(D) + gen.to_alpha.bias) / K  # (2, K * L)
    alpha = alpha.reshape(2, K, 3)
    for b in range(2):
        Ws = [sum(alpha[b, k, l] * gen.W[l][k] for k in range(K)) for l in range(3)]
        bs = [sum(alpha[b, k, l] * gen.b[l][k] for k in range(K)) for l in range(3)]
        torch.testing.assert_close(out[b], hand_siren(Ws, bs, c[b], gen.w0))
    # the bias of the linear map starts every coefficient at 1/K
    fresh = W.MNIFGenerator((Z, 2, 2), 3, 8, 3, num_bases=K)
    with torch.no_grad():
        fresh.to_alpha.weight.zero_()
    assert torch.allclose(fresh.coefficients(torch.randn(4, Z, 2, 2)), torch.full((4, K, 3), 1 / K))


def test_hyper_weight_rule_on_a_hand_made_example():
    W_base = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0],
                           [-1.0, -2.0, -3.0, -4.0, -5.0]])  # (in 2, out 5)
    w_o = torch.tensor([[[0.5, -1.0],
                         [2.0, 0.0]]])  # (B 1, in 2, g 2): token 0 is [0.5, 2], token 1 is [-1, 0]
    got = W.HyperTransformerGenerator.modulate(W_base, w_o)
    # W[:, j] = (1 + w_o[:, j mod 2]) * W_base[:, j]: columns 0, 2, 4 use token 0, columns 1, 3 token 1
    want = torch.tensor([[[1.5, 0.0, 4.5, 0.0, 7.5],
                          [-3.0, -2.0, -9.0, -4.0, -15.0]]])
    torch.testing.assert_close(got, want)


def test_hyper_starts_as_its_base_siren_and_cuts_2x2_patches():
    torch.manual_seed(0)
    gen = W.HyperTransformerGenerator((1, 4, 4), out_ch=3, hidden=8, num_layers=3, d=4, depth=1, heads=1, groups=2)
    z = torch.randn(2, 1, 4, 4)
    params = gen(z)
    for l in range(3):  # zero output heads: every item gets the base weights, and the bias is the base bias
        assert torch.equal(params[2 * l], gen.W[l].expand(2, -1, -1))
        assert torch.equal(params[2 * l + 1], gen.b[l].expand(2, -1))
    with torch.no_grad():  # an identity patch embedding shows which values make each token
        gen.patch.weight.copy_(torch.eye(4))
        gen.patch.bias.zero_()
        gen.lat_pos.zero_()
    tokens = gen.latent_tokens(z)  # (2, 4, 4)
    assert tokens.shape == (2, 4, 4)
    torch.testing.assert_close(tokens[1, 1], z[1, 0, 0:2, 2:4].flatten())  # patch row 0, column 1
    torch.testing.assert_close(tokens[1, 2], z[1, 0, 2:4, 0:2].flatten())  # patch row 1, column 0
    with pytest.raises(ValueError, match="2x2 patches"):
        W.HyperTransformerGenerator((1, 3, 4), 3)


def test_query_cost_counts_one_siren_per_query():
    gen = W.MNIFGenerator((2, 4, 4), out_ch=3, hidden=16, num_layers=3, num_bases=4)
    vae = W.WeightGenVAE(V.ConvEncoder(3, 2, 8), gen)
    n_gen, n_inr, f_item, f_query = W.query_cost(vae, (2, 4, 4))
    dims = W.siren_dims(2, 16, 3, 3)
    assert n_inr == sum(i * o + o for i, o in dims)  # the one mixed SIREN
    assert n_gen == 4 * n_inr + (32 * 3 * 4 + 3 * 4)  # K bases + the linear map to alpha
    assert f_query == 2 * sum(i * o for i, o in dims)  # a multiply and an add per weight
    assert f_item > 0


@pytest.mark.parametrize("decoder,threshold", [("ddmi", 30.0), ("mnif", 30.0), ("hyper", 30.0)])
def test_each_decoder_overfits_one_image(decoder, threshold):
    # Measured (300 steps, seed 0): ddmi 36.5, mnif 36.0, hyper 34.3 dB; its mean colour gives 15.2 dB.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = inr.synthetic_images(inr.synthetic_params(1, seed=3), 32, 32)  # (1, 3, 32, 32)
    encoder = V.ConvEncoder(3, 4)
    if decoder == "ddmi":
        vae = V.D2CVAE(encoder, *Hd.build_decoder_readout("hdbf_cfc", 4, 16, 3))
    else:
        vae = W.build_vae(decoder, encoder, (4, 8, 8), 3)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(300):
        coords, target = V.random_pixels(x, 256)
        loss = V.elbo_loss(vae, x, coords, target, 1e-4, x[0].numel())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rec = V.render(vae, vae.decode(vae.encode(x).mean), 32, 32)
    assert inr.psnr(rec, x) > threshold


# -- train.py --decoder X --from RUN: a new decoder on a frozen latent space ---------------
def test_hyper_transforming_keeps_encoder_and_diffusion_model(tmp_path, capsys):
    src, new = str(tmp_path / "ddmi"), str(tmp_path / "hyper")
    train.main(TINY + ["--out", src])
    train.main(["--decoder", "hyper", "--from", src, "--out", new, "--steps", "3", "--log-every", "1"])
    a = torch.load(os.path.join(src, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(new, "ckpt.pt"), weights_only=True)
    assert b["config"]["decoder"] == "hyper" and b["config"]["z_ch"] == 2 and b["stage1"]["step"] == 3
    enc = [k for k in a["stage1"]["vae"] if k.startswith("encoder.")]
    assert enc and all(torch.equal(a["stage1"]["vae"][k], b["stage1"]["vae"][k]) for k in enc)
    for key in ("ldm", "ema"):  # the diffusion model is the source's, untouched
        assert all(torch.equal(v, b["stage2"][key][k]) for k, v in a["stage2"][key].items())
    assert b["stage2"]["scale_factor"] == a["stage2"]["scale_factor"]
    assert any(k.startswith("decoder.tokens") for k in b["stage1"]["vae"])
    assert os.path.getsize(os.path.join(new, "samples.png")) > 0
    # sample.py: the old diffusion model, the new decoder
    rows = sample.main(["--ckpt", os.path.join(new, "ckpt.pt"), "--n", "2", "--sample-steps", "2", "--resolution", "16,32",
                        "--out", str(tmp_path / "s.png")])
    assert [r.shape for r in rows] == [(2, 3, 16, 16), (2, 3, 32, 32)] and all(torch.isfinite(r).all() for r in rows)


def test_from_refusals(tmp_path):
    src = str(tmp_path / "ddmi")
    with pytest.raises(SystemExit, match="no such checkpoint"):
        train.main(["--decoder", "mnif", "--from", src, "--out", str(tmp_path / "x")])
    train.main(TINY + ["--out", src, "--stage", "vae"])
    with pytest.raises(SystemExit, match="--z-ch: a --from run keeps its source's"):
        train.main(["--decoder", "mnif", "--from", src, "--out", str(tmp_path / "x"), "--z-ch", "4"])
    with pytest.raises(SystemExit, match="the --from run itself"):
        train.main(["--decoder", "mnif", "--from", src, "--out", src])
    with pytest.raises(SystemExit, match="--decoder siren: expected ddmi, mnif or hyper"):
        train.main(["--decoder", "siren", "--from", src, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--decoder mnif: weight-generating decoders .* images only"):
        train.main(["--modality", "video", "--decoder", "mnif"])
    assert not os.path.exists(tmp_path / "x")
