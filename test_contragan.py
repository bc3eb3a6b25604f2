"""Tests of contragan.py and of the tools that use it (tools/sample.py, tools/plot_runs.py): CPU only,
deterministic, no downloads (the built-in shapes data and random weights). Run: python -m pytest -q"""
import copy
import errno
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import contragan as cg
from test_fid import one_line  # main(args) as the command line runs it: its status and one stderr line

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import plot_runs  # noqa: E402  tools/plot_runs.py: Figure 3 from run folders
import sample  # noqa: E402  tools/sample.py: images from a checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "contragan.py")
# A tiny model on a tiny shapes set: seconds per run on 2 CPU cores.
TINY = ["--dataset", "shapes", "--shapes-size", "256", "--g-width", "8", "--d-width", "8", "--batch-size", "8",
        "--d-steps", "2", "--acc-images", "32", "--fid-images", "0", "--eval-batch", "16", "--num-workers", "0",
        "--ema-start", "1", "--ema-decay", "0.9", "--log-every", "1"]


# ---------------------------------------------------------------- the 2C loss against the equation

# The losses written literally, one sample and one term at a time: the oracles of the parity tests
# below (float64, values and gradients), also timed by tools/bench.py. Slow on purpose.

def literal_2c(embed, proxy, labels, t=1.0, data_positives=True):
    """The 2C loss straight from the paper's equation (ContraGAN, Section 3). data_positives=False: the
    authors' pos_collected_numerator=False, the proxy alone in the numerator."""
    l = [x / x.norm() for x in embed]
    e = [x / x.norm() for x in proxy]
    m = len(l)
    losses = []
    for i in range(m):
        data_to_class = torch.exp(l[i] @ e[i] / t)
        positives = sum((torch.exp(l[i] @ l[k] / t) for k in range(m) if k != i and labels[k] == labels[i]),
                        torch.zeros((), dtype=embed.dtype))
        everyone = sum((torch.exp(l[i] @ l[k] / t) for k in range(m) if k != i), torch.zeros((), dtype=embed.dtype))
        numerator = data_to_class + positives if data_positives else data_to_class
        losses.append(-torch.log(numerator / (data_to_class + everyone)))
    return sum(losses) / m


CASES = [  # (batch m, number of classes, labels rule, temperature)
    (2, 2, "random", 1.0), (2, 1, "same", 1.0), (5, 3, "random", 0.5), (8, 8, "distinct", 1.0),
    (8, 1, "same", 0.1), (16, 4, "random", 2.0), (33, 10, "random", 0.3), (12, 12, "distinct", 0.07)]


def labels_by_rule(rule, m, K, gen):
    """m labels: random over K classes, all the same class, or all distinct."""
    if rule == "random":
        return torch.randint(0, K, (m,), generator=gen)
    return torch.zeros(m, dtype=torch.long) if rule == "same" else torch.randperm(m, generator=gen)


@pytest.mark.parametrize("data_positives", [True, False])
@pytest.mark.parametrize("m,K,rule,t", CASES)
def test_2c_equals_literal_loop_and_gradients(m, K, rule, t, data_positives):
    gen = torch.Generator().manual_seed(m * 100 + K)
    labels = labels_by_rule(rule, m, K, gen)
    embed = torch.randn(m, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    class_table = torch.randn(K if rule != "distinct" else m, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    fast = cg.conditional_contrastive_loss(embed, class_table[labels], labels, temperature=t,
                                           data_positives=data_positives)
    slow = literal_2c(embed, class_table[labels], labels, t, data_positives)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast, (embed, class_table))
    g_slow = torch.autograd.grad(slow, (embed, class_table))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_2c_independent_of_batch_order():
    gen = torch.Generator().manual_seed(0)
    embed, proxy = torch.randn(20, 16, generator=gen), torch.randn(20, 16, generator=gen)
    labels = torch.randint(0, 4, (20,), generator=gen)
    perm = torch.randperm(20, generator=gen)
    a = cg.conditional_contrastive_loss(embed, proxy, labels)
    b = cg.conditional_contrastive_loss(embed[perm], proxy[perm], labels[perm])
    torch.testing.assert_close(a, b)


def test_2c_analytic_oracle():
    # All embeddings and proxies equal: every similarity is 1/t, so loss_i = -log((1 + n_i) / m) with
    # n_i the other same-class samples. Labels [0, 0, 1, 1]: n_i = 1, m = 4 -> log 2.
    embed = torch.ones(4, 3)
    loss = cg.conditional_contrastive_loss(embed, embed.clone(), torch.tensor([0, 0, 1, 1]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    # A sample alone in its class keeps the proxy term: -log(1 / m), finite, never 0/0.
    loss = cg.conditional_contrastive_loss(embed, embed.clone(), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
    # Without data positives the proxy is the only positive: log m whatever the labels.
    loss = cg.conditional_contrastive_loss(embed, embed.clone(), torch.tensor([0, 0, 1, 1]), data_positives=False)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_2c_low_precision_does_not_overflow():
    # exp(1/t) overflows fp16 at t = 0.05; the log-sum-exp form stays finite and close to fp64.
    gen = torch.Generator().manual_seed(1)
    embed, proxy = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)
    ref = cg.conditional_contrastive_loss(embed.double(), proxy.double(), labels, temperature=0.05)
    for dtype in (torch.float16, torch.bfloat16):
        low = cg.conditional_contrastive_loss(embed.to(dtype), proxy.to(dtype), labels, temperature=0.05)
        assert torch.isfinite(low) and abs(low.item() - ref.item()) < 0.05 * abs(ref.item()) + 0.05


# ---------------------------------------------------------------- the D2D-CE loss against the authors' code

def literal_d2dce(embed, proxy, labels, t=0.5, m_p=0.98):
    """D2D-CE as the authors' code computes it (PyTorch-StudioGAN src/utils/losses.py,
    Data2DataCrossEntropyLoss.forward, commit 947b35e), one anchor i at a time: s_ij = (cos(l_i, l_j) + m_p
    - 1) / t for j != i; M_i = max_j s_ij (detached); negatives y_j != y_i, each exp(relu(s_ij) - M_i);
    a_i = relu((m_p - cos(l_i, e_i)) / t); loss_i = a_i + log(exp(-a_i) + sum of negatives)."""
    m = len(embed)
    losses = []
    for i in range(m):
        s = {j: (F.cosine_similarity(embed[i], embed[j], dim=0) + m_p - 1) / t for j in range(m) if j != i}
        M = max(s.values()).detach()
        negatives = sum((torch.exp(torch.relu(s[j]) - M) for j in s if labels[j] != labels[i]),
                        torch.zeros((), dtype=embed.dtype))
        a = torch.relu((m_p - F.cosine_similarity(embed[i], proxy[i], dim=0)) / t)
        losses.append(a + torch.log(torch.exp(-a) + negatives))
    return sum(losses) / m


D2DCE_CASES = [  # (batch m, number of classes, labels rule, temperature, margin)
    (2, 2, "distinct", 0.5, 0.98), (2, 1, "same", 0.5, 0.98), (6, 1, "same", 1.0, 0.98),
    (8, 8, "distinct", 0.25, 0.98), (9, 3, "random", 0.5, 0.98), (16, 4, "random", 0.75, 0.9),
    (33, 10, "random", 1.0, 0.5), (12, 5, "random", 0.25, 1.0)]


@pytest.mark.parametrize("m,K,rule,t,m_p", D2DCE_CASES)
def test_d2dce_equals_the_authors_code_as_a_loop(m, K, rule, t, m_p):
    gen = torch.Generator().manual_seed(m * 100 + K)
    labels = labels_by_rule(rule, m, K, gen)
    embed = torch.randn(m, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    table = torch.randn(max(K, m), 7, dtype=torch.float64, generator=gen, requires_grad=True)
    fast = cg.data_to_data_cross_entropy_loss(embed, table[labels], labels, temperature=t, margin=m_p)
    slow = literal_d2dce(embed, table[labels], labels, t, m_p)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast, (embed, table)), torch.autograd.grad(slow, (embed, table))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_d2dce_analytic_cases():
    """One class: no negatives, so loss_i = a_i - a_i = 0. All embeddings on their proxies (cos = 1 >= m_p)
    and negatives orthogonal (relu((0 + m_p - 1) / t) = 0, M_i = (m_p - 1) / t): loss = log(1 + (m-1) e^-M)."""
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    assert cg.data_to_data_cross_entropy_loss(e, torch.randn(5, 4, dtype=torch.float64, generator=gen),
                                              torch.zeros(5, dtype=torch.long)).item() == 0.0
    eye = torch.eye(4, dtype=torch.float64)
    t, m_p = 0.5, 0.98
    M = (m_p - 1) / t
    expected = torch.log(1 + 3 * torch.exp(torch.tensor(-M, dtype=torch.float64)))
    got = cg.data_to_data_cross_entropy_loss(eye, 3 * eye, torch.arange(4), temperature=t, margin=m_p)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_d2dce_small_temperature_and_bf16_stay_finite():
    gen = torch.Generator().manual_seed(1)
    embed, proxy = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    labels = torch.randint(0, 4, (64,), generator=gen)
    for t in (0.01, 0.05):
        assert torch.isfinite(cg.data_to_data_cross_entropy_loss(embed, proxy, labels, temperature=t))
    low = cg.data_to_data_cross_entropy_loss(embed.bfloat16(), proxy.bfloat16(), labels)
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_d2dce_discriminator_and_trainer_use_real_then_fake_embeddings(monkeypatch):
    """--loss d2dce: D has the 2C heads (same parameter count), the D step feeds D2D-CE the REAL rows with
    the real labels, the G step the fakes with their labels; temperature, margin and lambda as given."""
    seen = []

    def spy(embed, proxy, labels, temperature, margin):
        seen.append((embed.shape[0], labels.clone(), temperature, margin))
        return torch.zeros((), requires_grad=True) + 0.0 * embed.sum()
    monkeypatch.setattr(cg, "data_to_data_cross_entropy_loss", spy)
    D2, Dd = (cg.Discriminator(32, 8, 4, loss, 16) for loss in ("2c", "d2dce"))
    assert sum(p.numel() for p in D2.parameters()) == sum(p.numel() for p in Dd.parameters())
    cfg = cg.build_parser().parse_args(TINY + ["--loss", "d2dce", "--temperature", "0.3", "--margin", "0.9"])
    trainer = cg.Trainer(cfg, 4, torch.device("cpu"))
    real_y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    trainer.d_step(torch.zeros(8, 3, 32, 32), real_y)
    trainer.g_step()
    assert [s[0] for s in seen] == [8, 8] and torch.equal(seen[0][1], real_y)
    assert all(s[2:] == (0.3, 0.9) for s in seen)


def test_cli_d2dce_trains_and_bad_margin_is_one_line(tmp_path):
    r = run_cli(*TINY, "--loss", "d2dce", "--temperature", "0.5", "--margin", "0.98", "--cond-lambda", "0.5",
                "--steps", "2", "--eval-every", "2", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "last.pt").exists()
    for bad in ("0", "1.5", "nan"):
        r = run_cli(*TINY, "--loss", "d2dce", "--margin", bad, "--run-dir", str(tmp_path / f"bad{bad}"))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--margin" in r.stderr


# ---------------------------------------------------------------- the other losses, by hand

def test_hinge_projection_acgan_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert cg.d_hinge_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert cg.g_hinge_loss(fake).item() == pytest.approx(1 / 3)
    h = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    e = torch.tensor([[3.0, 0.5], [2.0, 4.0]])
    assert cg.projection_logit(torch.tensor([0.1, -0.2]), h, e).tolist() == pytest.approx([4.1, -4.2])
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # CE: [-log(1/2), -log(1/4)] -> mean (log 2 + log 4) / 2
    assert cg.acgan_loss(logits, torch.tensor([0, 1])).item() == pytest.approx((math.log(2) + math.log(4)) / 2)


# ---------------------------------------------------------------- consistency regularization (--cr-lambda)

def literal_shift(image, flip, dy, dx):
    """One image (C, S, S) flipped (or not), then out[i, j] = in[i + dy, j + dx] with indices reflected at the border
    without repeating the edge (-1 -> 1, S -> S - 2): the authors' CR_DiffAug written one pixel at a time."""
    S = image.shape[1]
    reflect = lambda i: -i if i < 0 else 2 * (S - 1) - i if i > S - 1 else i  # noqa: E731
    src = image.flip(2) if flip else image
    out = torch.empty_like(image)
    for i in range(S):
        for j in range(S):
            out[:, i, j] = src[:, reflect(i + dy), reflect(j + dx)]
    return out


@pytest.mark.parametrize("S", [8, 16])
def test_cr_augment_is_a_flip_and_a_reflected_shift_per_sample(S):
    torch.manual_seed(0)
    x = torch.randn(12, 3, S, S)                               # distinct pixels: one (flip, dy, dx) fits each output
    out = cg.cr_augment(x)
    s = S // 8                                                 # int(S / 8): 1 at 8x8, 2 at 16x16
    seen = []
    for b in range(len(x)):
        fits = [(f, dy, dx) for f in (False, True) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                if torch.equal(out[b], literal_shift(x[b], f, dy, dx))]
        assert len(fits) == 1, (b, fits)
        seen.append(fits[0])
    assert len({f for f, _, _ in seen}) == 2 and len({dy for _, dy, _ in seen}) > 1 and len(set(seen)) > 4
    torch.manual_seed(0)                                       # the draws: flips first, then dy, then dx
    torch.randn(12, 3, S, S)
    flips = torch.rand(12) < 0.5
    dy, dx = torch.randint(-s, s + 1, (2, 12))
    assert seen == list(zip(flips.tolist(), dy.tolist(), dx.tolist()))
    assert cg.cr_augment(x[:1].to(torch.bfloat16)).dtype == torch.bfloat16


def test_consistency_loss_equals_literal_mse():
    torch.manual_seed(0)
    a = {"adv": torch.randn(4), "embed": torch.randn(4, 6), "proxy": torch.randn(4, 6)}
    b = {"adv": torch.randn(4), "embed": torch.randn(4, 6), "proxy": torch.randn(4, 6)}
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    expected = ((a["adv"] - b["adv"]) ** 2).sum() / 4 + ((unit(a["embed"]) - unit(b["embed"])) ** 2).sum() / 24
    torch.testing.assert_close(cg.consistency_loss(a, b), expected)
    c, d = {"adv": a["adv"], "class_logits": a["embed"]}, {"adv": b["adv"], "class_logits": b["embed"]}
    expected = ((a["adv"] - b["adv"]) ** 2).mean() + ((a["embed"] - b["embed"]) ** 2).mean()
    torch.testing.assert_close(cg.consistency_loss(c, d), expected)
    torch.testing.assert_close(cg.consistency_loss({"adv": a["adv"]}, {"adv": b["adv"]}),
                               ((a["adv"] - b["adv"]) ** 2).mean())


@pytest.mark.parametrize("loss", ["2c", "d2dce", "proj", "ac"])
def test_cr_d_step_adds_lambda_times_the_consistency_of_real_and_augmented(loss, monkeypatch):
    trainer = tiny_trainer(loss=loss, cr_lambda=10)
    seen = []
    real_consistency = cg.consistency_loss
    monkeypatch.setattr(cg, "consistency_loss", lambda a, b: seen.append((a, b)) or real_consistency(a, b))
    augmented = torch.randn(8, 3, 32, 32)
    monkeypatch.setattr(cg, "cr_augment", lambda x: augmented)
    real, real_y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    D_before = copy.deepcopy(trainer.D)                        # its power iteration depends on weights alone
    logs = trainer.d_step(real, real_y)
    (real_out, aug_out), = seen
    with torch.no_grad():                                      # the reals and THEIR augmentation went through D
        expected = D_before(torch.cat([real, augmented]), torch.cat([real_y, real_y]))["adv"]
    torch.testing.assert_close(torch.cat([real_out["adv"], aug_out["adv"]]), expected, atol=1e-4, rtol=1e-4)
    cr = real_consistency(real_out, aug_out)
    torch.testing.assert_close(logs["d_loss"], logs["d_adv"] + logs["d_cond"] + 10 * cr)
    trainer.g_step()
    assert len(seen) == 1                                      # D step only


@pytest.mark.parametrize("loss", ["2c", "d2dce", "proj", "ac"])
def test_cli_cr_lambda_trains_each_loss(loss, tmp_path, capsys):
    r = run_main(capsys, *TINY, "--loss", loss, "--cr-lambda", "10", "--steps", "2", "--eval-every", "2",
                 "--acc-images", "8", "--run-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cr_lambda"] == 10


# ---------------------------------------------------------------- the models

def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_authors(monkeypatch):
    # Counting does not depend on the initial values: skip the orthogonal init (QR of every weight),
    # 40 of this test's 45 s on 2 CPU cores at 128x128.
    monkeypatch.setattr(cg, "orthogonal_init", lambda module: module)
    assert n_params(cg.Generator()) == 9_416_196
    assert n_params(cg.Discriminator(loss="2c")) == 2_517_186
    assert n_params(cg.Discriminator(loss="proj")) == 2_415_170
    assert n_params(cg.Generator(width=32)) == 1_230_852
    assert n_params(cg.Discriminator(width=32, loss="2c")) == 308_290
    assert n_params(cg.Discriminator(width=32, loss="proj")) == 270_530
    # Tiny ImageNet 64x64, the authors' ContraGAN run (width 80, z 100, 2C embedding 768, 200 classes;
    # logs/TINY_IMAGENET/contra_biggan_tiny64_hinge_no-train-2020_10_07_21_40_44.log)
    assert n_params(cg.Generator(64, 80, z_dim=100, num_classes=200)) == 17_335_204
    assert n_params(cg.Discriminator(64, 80, num_classes=200, loss="2c", embed_dim=768)) == 31_678_130
    # ImageNet 128x128, the authors' BigGAN (projection) run: width 96, z 120, 1,000 classes
    # (logs/IMAGENET/BigGAN256-train-2021_01_24_03_52_15.log, PyTorch-StudioGAN commit 4fa35bb)
    assert n_params(cg.Generator(128, 96, z_dim=120, num_classes=1000)) == 70_433_988
    assert n_params(cg.Discriminator(128, 96, num_classes=1000, loss="proj")) == 87_982_370
    # Spectral norm's u and v are buffers, not parameters.
    G = cg.Generator(width=8)
    assert any(n.endswith(".u") for n, _ in G.named_buffers())
    assert not any(n.endswith((".u", ".v")) for n, _ in G.named_parameters())


def test_mlp_embed_head_is_the_authors_nonlinear_embed(monkeypatch):
    # Section 4.3's head ablation: the authors' nonlinear_embed adds an SN linear embed_dim -> embed_dim after a ReLU
    monkeypatch.setattr(cg, "orthogonal_init", lambda module: module)
    linear, mlp = (cg.Discriminator(width=8, embed_dim=24, embed_head=head) for head in ("linear", "mlp"))
    assert n_params(mlp) == n_params(linear) + 24 ** 2 + 24
    assert n_params(cg.Discriminator(embed_head="mlp")) == 2_517_186 + 512 ** 2 + 512
    h = torch.randn(3, 16)
    mlp.eval()                                                 # no power iteration: both sides see one sigma
    expected = mlp.embed_head[2](F.relu(mlp.embed_head[0](h)))
    torch.testing.assert_close(mlp.embed_head(h), expected)
    assert mlp(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))["embed"].shape == (3, 24)
    trainer = tiny_trainer(embed_head="mlp", loss="d2dce")
    assert isinstance(trainer.D.embed_head, torch.nn.Sequential)
    assert trainer.d_step(torch.zeros(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2))["d_loss"].isfinite()


@pytest.mark.parametrize("size,z_dim", [(32, 80), (64, 100)])
def test_output_shapes(size, z_dim):
    torch.manual_seed(0)
    G = cg.Generator(img_size=size, width=8, z_dim=z_dim, num_classes=5)
    y = torch.tensor([0, 1, 4])
    x = G(torch.randn(3, z_dim), y)
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    C = 16 * 8 if size == 64 else 2 * 8
    for loss, keys in [("2c", {"adv": (3,), "embed": (3, 24), "proxy": (3, 24)}), ("proj", {"adv": (3,)}),
                       ("ac", {"adv": (3,), "class_logits": (3, 5)})]:
        out = cg.Discriminator(img_size=size, width=8, num_classes=5, loss=loss, embed_dim=24)(x, y)
        assert {k: tuple(v.shape) for k, v in out.items()} == {**keys, "h": (3, C)}


# The paper's Table 1 CIFAR-10 run: PyTorch-StudioGAN src/configs/Experiments_in_paper/Table1/
# contra_biggan_cifar32_hinge_no.json at commit 6260dd7, transcribed (proj_ and ac_ hold the same values).
TABLE1 = dict(img_size=32, g_width=96, d_width=96, z_dim=80, shared_dim=128, embed_dim=512, temperature=1.0,
              cond_lambda=1.0, data_positives=True, batch_size=64, lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999,
              d_steps=5, steps=80000, flip=False, ema_decay=0.9999, ema_start=1000, loss="2c", dataset="cifar10",
              cr_lambda=0.0)


def test_defaults_are_the_papers_table1_run_and_the_readme_setting_a_preset(capsys):
    cfg = vars(cg.build_parser().parse_args([]))
    assert {k: cfg[k] for k in TABLE1} == TABLE1
    parser = cg.build_parser()
    parser.set_defaults(**cg.PRESETS["cifar10-readme"])       # the authors' src/configs/CIFAR10/ContraGAN.json
    assert {k: v for k, v in vars(parser.parse_args([])).items() if cfg[k] != v} == {"steps": 100000, "flip": True}
    with pytest.raises(SystemExit):
        cg.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Table1/contra_biggan_cifar32_hinge_no.json at commit 6260dd7" in text and "(T1: 80,000" in text
    assert "the proxy alone (the paper's Eq. 7)" in text and "Eq. 7" in cg.conditional_contrastive_loss.__doc__


# The paper's Table 2 Tiny ImageNet run: src/configs/Experiments_in_paper/Table2/contra_biggan_tiny64_hinge_no.json at
# commit 6260dd7, transcribed (shared_dim 128, t 1.0, lambda 1.0, EMA 0.9999 as in Table 1: the defaults).
TABLE2 = dict(img_size=64, g_width=80, d_width=80, z_dim=100, shared_dim=128, embed_dim=768, temperature=1.0,
              cond_lambda=1.0, batch_size=256, accumulation_steps=4, lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.999,
              d_steps=1, steps=100000, flip=False, ema_decay=0.9999, ema_start=20000, loss="2c", dataset="folder")


def test_tiny_imagenet_preset_is_table2(monkeypatch):
    parser = cg.build_parser()
    parser.set_defaults(**cg.PRESETS["tiny-imagenet"])
    cfg = parser.parse_args(["--preset", "tiny-imagenet"])
    assert {k: getattr(cfg, k) for k in TABLE2} == TABLE2
    monkeypatch.setattr(cg, "orthogonal_init", lambda module: module)   # counting only
    G, D = cg.build_models(cfg, 200)                           # the authors' log of that run: 17,335,204 and 31,678,130
    assert (n_params(G), n_params(D)) == (17_335_204, 31_678_130)


def test_the_readme_and_docs_name_only_code_and_tests_that_exist():
    """The README's map from the paper names contragan.py's functions, classes and attributes; README and docs/ name
    tests as the proof of a guarantee. Each name must exist, so that a rename or a removed test shows here."""
    source, readme = open(SCRIPT).read(), open(os.path.join(HERE, "README.md")).read()
    table = readme[readme.index("| paper | contragan.py"):]
    table = table[:table.index("\n\n")]
    right = " ".join(line.split(" | ")[-1] for line in table.splitlines()[2:])   # the code's column
    names = {n.split(".")[-1] for n in re.findall(r"`([A-Za-z_][\w.]*)`", right) if not n.endswith(".py")}
    assert len(names) > 20, names
    for name in names:
        assert re.search(rf"(def |class |self\.){name}\b", source), name
    tests = set()
    for path in [os.path.join(HERE, "test_contragan.py"), os.path.join(HERE, "test_fid.py"),
                 *(os.path.join(HERE, "tools", f) for f in os.listdir(os.path.join(HERE, "tools")))]:
        if os.path.basename(path).startswith("test_") and path.endswith(".py"):
            tests |= set(re.findall(r"^def (test_\w+)", open(path).read(), re.M))
    pages = [os.path.join(HERE, "README.md")] + [os.path.join(HERE, "docs", f) for f in os.listdir(
        os.path.join(HERE, "docs")) if f.endswith(".md")]
    for page in pages:
        missing = set(re.findall(r"`(test_\w+)`", open(page).read())) - tests
        assert not missing, (page, missing)


def readme_block(start):
    """The fenced block of README.md whose first line starts with `start`, as lines."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme[readme.index("\n" + start) + 1:]
    return block[:block.index("```")].splitlines()


def same_but_numbers(got, quoted, tolerance=2e-3):
    """got == quoted word for word, each number to within tolerance (another CPU's arithmetic may differ in the
    last printed digit); the timings (img/s, s/step, the time left) are this machine's and not compared."""
    timing = r"[\d.]+ img/s|[\d.]+ s/step|left \S+"
    got, quoted = re.sub(timing, "T", got), re.sub(timing, "T", quoted)
    number = r"-?\d[\d,]*(?:\.\d+)?"
    if re.split(number, got) != re.split(number, quoted):
        return False
    pairs = zip(re.findall(number, got), re.findall(number, quoted))
    return all(abs(float(a.replace(",", "")) - float(b.replace(",", ""))) <= tolerance for a, b in pairs)


def test_same_but_numbers_compares_words_exactly_and_numbers_to_a_tolerance():
    line = "step 2/4 | d 2.1166 (adv 0.7103) | G 376,708 params | 73.0 img/s | 0.876 s/step | left 0m01s"
    assert same_but_numbers(line.replace("2.1166", "2.1171").replace("73.0", "9.5").replace("0m01s", "1h02m"), line)
    for wrong in (line.replace("2.1166", "2.1201"), line.replace("376,708", "376,709"), line.replace("adv", "cond"),
                  line + " | more"):
        assert not same_but_numbers(wrong, line), wrong


def test_the_readmes_quoted_run_is_what_the_code_prints(tmp_path):
    """The README quotes a 4-step run of the demo and the files it writes: the test runs the quoted command, with its
    thread count, and compares every line (same_but_numbers; the config line, quoted shortened, by its start)."""
    block = readme_block("$ OMP_NUM_THREADS=1 python contragan.py --preset cpu-demo")
    find = block.index(next(line for line in block if line.startswith("$ find")))
    command, quoted, files = block[0], block[1:find], block[find + 1:]
    args = command.split("python contragan.py ")[1].split()
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    printed = proc.stdout.splitlines()
    assert proc.returncode == 0 and proc.stderr == "" and len(printed) == len(quoted), proc.stdout + proc.stderr
    assert quoted[0].startswith("config: {") and printed[0].startswith("config: {")
    for got, line in zip(printed[1:], quoted[1:]):
        assert same_but_numbers(got, line), (got, line)
    run = tmp_path / args[args.index("--run-dir") + 1]
    assert sorted(str(p.relative_to(tmp_path)) for p in run.rglob("*") if p.is_file()) == files


def test_the_readme_gives_the_suites_size():
    line = next(x for x in open(os.path.join(HERE, "README.md")) if re.match(r"\d+ tests, ", x))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert f"\n{line.split()[0]} tests collected" in proc.stdout, proc.stdout[-300:]


def test_nothing_above_the_banner_uses_a_name_defined_only_below_it():
    """The method (losses, Config, Algorithm 1, networks) reads on its own: a name it uses is the standard library's,
    torch's, fid's or its own, never one of the run's below the banner."""
    import ast
    import builtins
    source = open(SCRIPT).read()
    banner = next(i for i, line in enumerate(source.splitlines(), 1) if line.startswith("# The method ends here"))
    tree = ast.parse(source)
    bound_above, defined_below = set(dir(builtins)), set()
    for node in ast.walk(tree):                                # every name bound: defs, classes, args, targets, imports
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names = [node.id]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(alias.asname or alias.name).split(".")[0] for alias in node.names]
        if getattr(node, "lineno", banner) < banner:
            bound_above.update(names)
        else:
            defined_below.update(names)
    used_above = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.lineno < banner}
    assert used_above & (defined_below - bound_above) == set()


def test_config_holds_the_method_and_the_parsers_defaults():
    """Config's fields are the defaults --help shows (RunConfig's too), and a Trainer runs on a Config alone."""
    import dataclasses
    parsed = vars(cg.build_parser().parse_args([]))
    assert {**dataclasses.asdict(cg.Config()), **dataclasses.asdict(cg.RunConfig())}.items() <= parsed.items()
    assert {k: getattr(cg.Config(), k) for k in TABLE1 if k != "dataset"} == {k: v for k, v in TABLE1.items()
                                                                              if k != "dataset"}
    trainer = cg.Trainer(cg.Config(g_width=8, d_width=8, batch_size=4, d_steps=1), 4, torch.device("cpu"))
    real, y = cg.make_shapes(4, 32, seed=0)
    logs = trainer.iteration(iter([(cg.to_signed(real), y)]), step=0)
    assert all(math.isfinite(v.item()) for v in logs.values())


def test_main_parses_the_command_line_once(monkeypatch, capsys):
    """One parse: the flags given, over the preset's values, over the fields' defaults; its --help shows them."""
    with pytest.raises(SystemExit):
        cg.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Adam lr of G (T1: 2e-4) (default: 0.0002)" in text and "--no-flip random flips" in text
    import argparse
    parses, started = [], []
    real_parse = argparse.ArgumentParser.parse_args

    def counting_parse(parser, *args, **kwargs):
        parses.append(args)
        return real_parse(parser, *args, **kwargs)

    def start_run(cfg, explicit):
        started.append((cfg, explicit))
        return 0
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", counting_parse)
    monkeypatch.setattr(cg, "start_run", start_run)
    assert cg.main(["--preset", "cpu-demo", "--steps", "7", "--flip"]) == 0
    cfg, explicit = started[0]
    assert len(parses) == 1 and explicit == {"preset": "cpu-demo", "steps": 7, "flip": True}
    parser = cg.build_parser()
    parser.set_defaults(**cg.PRESETS["cpu-demo"])
    assert vars(cfg) == vars(parser.parse_args(["--preset", "cpu-demo", "--steps", "7", "--flip"]))
    assert (cfg.steps, cfg.d_steps, cfg.lr_g) == (7, 2, 2e-4)  # the flag given, the preset's, Config's


def tiny_trainer(**flags):
    cfg = cg.build_parser().parse_args(TINY + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
    return cg.Trainer(cfg, 4, torch.device("cpu"))


def test_acgan_d_step_uses_real_and_fake_class_logits(monkeypatch):
    # The authors' D step adds CE on the real AND the fake class logits; the G step on the fakes.
    trainer = tiny_trainer(loss="ac", cond_lambda=0.5)
    calls, real_acgan = [], cg.acgan_loss
    monkeypatch.setattr(cg, "acgan_loss", lambda logits, y: calls.append((logits.detach(), y)) or real_acgan(logits, y))
    real_y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    d_cond = trainer.d_step(torch.zeros(8, 3, 32, 32), real_y)["d_cond"]
    (real_logits, y), (fake_logits, fake_y) = calls
    assert torch.equal(y, real_y) and real_logits.shape == fake_logits.shape == (8, 4) and len(fake_y) == 8
    torch.testing.assert_close(d_cond, 0.5 * (real_acgan(real_logits, real_y) + real_acgan(fake_logits, fake_y)))
    calls.clear()
    g_cond = trainer.g_step()["g_cond"]
    (fake_logits, fake_y), = calls
    torch.testing.assert_close(g_cond, 0.5 * real_acgan(fake_logits, fake_y))


@pytest.mark.parametrize("loss", ["2c", "ac"])
def test_accumulation_of_n_micro_batches_gives_the_gradient_of_their_mean_loss(loss):
    # --accumulation-steps 2: two micro-batches of 8, one Adam step. Its gradients must be those of the mean of
    # the two micro-batches' losses (each micro-batch's own 2C loss), computed here with the updates left out.
    accumulating, reference = tiny_trainer(loss=loss, accumulation_steps=2), tiny_trainer(loss=loss)
    cg.load_trainer_state(reference, cg.trainer_state(accumulating))
    losses = {"D": [], "G": []}
    reference.update = lambda opt, scaler, loss, micro=0: losses["D" if opt is reference.opt_D else "G"].append(loss)
    torch.manual_seed(1)
    micro_batches = [(torch.rand(8, 3, 32, 32) * 2 - 1, torch.randint(0, 4, (8,))) for _ in range(2)]
    def check_gradients(name):
        model = getattr(reference, name)
        model.zero_grad()
        torch.stack(losses[name]).mean().backward()
        for (key, p), q in zip(model.named_parameters(), getattr(accumulating, name).parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=key)
    for trainer in (accumulating, reference):
        torch.manual_seed(2)                                   # the same z, y for the fakes
        for micro, (real, real_y) in enumerate(micro_batches):
            trainer.d_step(real, real_y, micro)
    check_gradients("D")
    reference.D.load_state_dict(accumulating.D.state_dict())  # the G step sees the D the step made
    for trainer in (accumulating, reference):
        torch.manual_seed(3)
        for micro in range(2):
            trainer.g_step(micro)
    check_gradients("G")
    assert accumulating.opt_D.state[next(accumulating.D.parameters())]["step"] == 1   # one Adam step for both


def test_ema_averages_parameters_and_buffers():
    # The authors' ema averages every state_dict entry, BN running statistics and SN's u, v included.
    trainer = tiny_trainer(ema_decay=0.75, ema_start=5)
    G, G_ema = trainer.G.state_dict(), trainer.G_ema.state_dict()
    with torch.no_grad():
        for v in G.values():
            v.add_(1) if v.is_floating_point() else v.fill_(7)
    before = {k: v.clone() for k, v in G_ema.items()}
    trainer.ema_update(step=5)
    for k, v in G_ema.items():
        expected = 0.75 * before[k] + 0.25 * G[k] if v.is_floating_point() else G[k]
        torch.testing.assert_close(v, expected.to(v.dtype))
    assert any(k.endswith(".u") for k in G) and any(k.endswith("running_mean") for k in G)
    trainer.ema_update(step=4)                                 # before ema_start: a copy of G
    for k, v in G_ema.items():
        torch.testing.assert_close(v, G[k])


@pytest.mark.parametrize("flip", [True, False])
def test_random_flips_can_be_turned_off(flip):
    images, labels = cg.make_shapes(64, 32, seed=0)
    data = cg.TensorImages(images, labels, ["a", "b", "c", "d"])
    torch.manual_seed(0)
    x, _ = next(cg.Batches(data, 64, 0, 1, seed=0, device=torch.device("cpu"), flip=flip))
    order = list(torch.utils.data.DistributedSampler(data, 1, 0, shuffle=True, seed=0, drop_last=True))
    plain = images[order].float() / 127.5 - 1
    flipped = (x == plain.flip(3)).flatten(1).all(1) & ~(x == plain).flatten(1).all(1)
    assert (x == plain).flatten(1).all(1).logical_or(flipped).all()
    assert flipped.any() == flip


def test_spectral_norm_estimate_matches_linalg():
    torch.manual_seed(0)
    layer = cg.sn_linear(12, 7)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(7, 12) * 3)
    x = torch.randn(2, 12)
    for _ in range(100):                                       # power iterations, one per forward
        layer(x)
    exact = torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach(), ord=2).item()
    estimate = cg.spectral_norms(layer)[""]
    assert estimate == pytest.approx(exact, rel=1e-4)
    # the normalised weight has spectral norm 1
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, rel=1e-4)


def test_detect_collapse():
    calm = [{"step": 1, "fid": 50.0, "d_acc_gap": 0.05}, {"step": 2, "fid": 40.0, "d_acc_gap": 0.1}]
    assert cg.detect_collapse(calm, gap_threshold=0.3, patience=3) is None
    overfit = calm + [{"step": 3, "fid": 39.0, "d_acc_gap": 0.45}]
    assert "gap 0.45" in cg.detect_collapse(overfit, 0.3, 3)
    rising = calm + [{"step": s, "fid": f, "d_acc_gap": 0.1} for s, f in [(3, 41.0), (4, 42.0), (5, 45.0)]]
    assert "rose 3 evaluations" in cg.detect_collapse(rising, 0.3, 3)
    assert cg.detect_collapse(rising[:-1], 0.3, 3) is None   # only 2 rises so far


def test_shapes_data_is_deterministic_and_class_readable():
    a, ya = cg.make_shapes(200, 32, seed=3)
    b, yb = cg.make_shapes(200, 32, seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb) and a.dtype == torch.uint8
    assert torch.bincount(ya).tolist() == [50, 50, 50, 50]
    predicted = cg.shapes_class_of(a.float() / 127.5 - 1)
    assert (predicted == ya).float().mean() > 0.9           # the class-consistency probe reads real data
    assert not torch.equal(a, cg.make_shapes(200, 32, seed=4)[0])


# ---------------------------------------------------------------- the class-confusion judge

@pytest.mark.parametrize("loss", ["2c", "proj", "ac"])
def test_class_scores_are_ds_own_judgement(loss):
    # For every class y, the score is what D's conditional head says of (x, y): 2C the cosine of l(x)
    # and the proxy e(y), projection D(x, y) minus its label-free part, ACGAN the logit of y.
    torch.manual_seed(0)
    D = cg.Discriminator(width=8, num_classes=4, loss=loss, embed_dim=16).eval()
    x = torch.randn(5, 3, 32, 32)
    scores = cg.d_class_scores(D, D(x, torch.zeros(5, dtype=torch.long))["h"])
    for y in range(4):
        out = D(x, torch.full((5,), y))
        expected = {"2c": lambda: torch.cosine_similarity(out["embed"], out["proxy"]),
                    "proj": lambda: out["adv"] - D.adv_head(out["h"]).squeeze(1),
                    "ac": lambda: out["class_logits"][:, y]}[loss]()
        torch.testing.assert_close(scores[:, y], expected, rtol=1e-5, atol=1e-5)


def test_confusion_raw_and_relabelled():
    asked = torch.tensor([0, 0, 1, 1, 2, 2])
    counts, raw, relabelled = cg.confusion(asked, torch.tensor([1, 1, 2, 2, 0, 0]), 3)
    assert counts.tolist() == [[0, 2, 0, 0], [0, 0, 2, 0], [2, 0, 0, 0]]   # last column: none
    assert raw == 0 and relabelled == 1                        # consistent classes, wrong labels
    _, raw, relabelled = cg.confusion(asked, torch.zeros(6, dtype=torch.long), 3)
    assert raw == pytest.approx(1 / 3) and relabelled == pytest.approx(1 / 3)  # the label ignored
    _, raw, relabelled = cg.confusion(asked, torch.tensor([0, 1, 1, 1, 2, 0]), 3)
    assert raw == pytest.approx(4 / 6) and relabelled == pytest.approx(4 / 6)


def test_confusion_fakes_are_drawn_in_mixed_batches(monkeypatch):
    # G_ema draws with BatchNorm batch statistics: a batch of one class loses the class-dependent shift
    # that conditional BN adds, so the fakes judged for confusion come in batches of mixed labels.
    batches = []
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, gen: batches.append(y.split(batch_size))
                        or torch.zeros(len(y), 3, 32, 32))
    monkeypatch.setattr(cg, "d_real_share_and_classes", lambda D, x, y, device: (1.0, y))
    cfg = cg.build_parser().parse_args(TINY + ["--acc-images", "64"])
    rec = cg.d_diagnostics(None, None, (None, None), None, 4, cfg, torch.device("cpu"))
    assert all(len(b.unique()) > 1 for b in batches[0]) and rec["class_consistency_d"] == 1.0
    assert torch.tensor(rec["confusion_d"]).diag().tolist() == [16] * 4


PALETTE = [c for _, c in cg.SHAPES]


def painted(form, colour, n=200, img_size=32):
    """Real shapes images of one class (`form`: its index) with the shape's pixels painted in `colour`
    (no jitter): the data's own geometry in any colour. Float in [-1, 1]."""
    images, labels = cg.make_shapes(4 * n, img_size, seed=5)
    images = images[labels == form].float()
    shape = images.amax(1, keepdim=True) > 120                 # background <= 30 + 8 sigma; shapes >= 200
    images = torch.where(shape, torch.tensor(colour, dtype=torch.float)[:, None, None], images)
    return images / 127.5 - 1


@pytest.mark.parametrize("size", [32, 64])
def test_reader_reads_real_images(size):
    for seed in range(3):
        images, labels = cg.make_shapes(400, size, seed)
        assert (cg.shapes_class_of(images.float() / 127.5 - 1) == labels).float().mean() >= 0.98


def test_reader_says_none_for_a_blank_background_and_off_palette_colours():
    blank = (30 + 8 * torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))) / 127.5 - 1
    assert cg.shapes_class_of(blank).tolist() == [-1] * 8
    for form, colour in ((1, (0, 255, 0)), (0, (255, 0, 255)), (2, (255, 255, 255))):  # lime, magenta, white
        assert (cg.shapes_class_of(painted(form, colour)) == -1).all(), (form, colour)


@pytest.mark.parametrize("form", range(4))
def test_reader_checks_the_form_against_the_colour(form):
    # circle red, square green, triangle blue, cross yellow: each other pairing (a yellow disc, a red
    # square, a blue cross, ...) is none. Small discs and crosses fill their boxes alike (0.65-0.70).
    for colour in range(4):
        judged = cg.shapes_class_of(painted(form, PALETTE[colour]))
        if colour == form:
            assert (judged == form).float().mean() >= 0.98, colour
        else:
            assert (judged == -1).float().mean() >= 0.95, colour


def test_confusion_counts_none_as_a_miss():
    asked = torch.tensor([0, 0, 1, 1, 2, 2])
    counts, raw, relabelled = cg.confusion(asked, torch.tensor([1, -1, 2, 2, -1, -1]), 3)
    assert counts.tolist() == [[0, 1, 0, 1], [0, 0, 2, 0], [0, 0, 0, 2]]   # last column: none
    # best relabelling 0->1, 1->2; the all-none row gets no hit (with "none" as a fourth class it would)
    assert raw == 0 and relabelled == pytest.approx(3 / 6)
    counts, raw, relabelled = cg.confusion(asked, torch.tensor([0, -1, 1, 1, 2, -1]), 3)
    assert counts[:, 3].tolist() == [1, 0, 1] and raw == relabelled == pytest.approx(4 / 6)
    counts, raw, relabelled = cg.confusion(asked, torch.full((6,), -1), 3)
    assert counts[:, 3].tolist() == [2, 2, 2] and raw == relabelled == 0


def test_d_diagnostics_records_the_none_share(monkeypatch):
    # Fakes are real images, one blanked: the colour reader's matrix has a none column and its share.
    images, labels = cg.make_shapes(64, 32, seed=2)
    images = images.float() / 127.5 - 1
    images[0] = -0.75                                          # a blank dark image
    monkeypatch.setattr(cg, "balanced_labels", lambda n, K, device, gen=None: labels)
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, gen: images)
    monkeypatch.setattr(cg, "d_real_share_and_classes", lambda D, x, y, device: (1.0, y))
    cfg = cg.build_parser().parse_args(["--dataset", "shapes", "--acc-images", "64"])
    rec = cg.d_diagnostics(None, None, (None, None), None, 4, cfg, torch.device("cpu"))
    colour = torch.tensor(rec["confusion_colour"])
    assert colour.shape == (4, 5) and colour[labels[0], 4] >= 1 and colour.sum() == 64
    assert rec["class_none"] == pytest.approx(colour[:, 4].sum().item() / 64) and rec["class_none"] > 0
    assert torch.tensor(rec["confusion_d"])[:, 4].sum() == 0 and rec["class_consistency_d"] == 1.0
    run = types.SimpleNamespace(reals_heldout=None, step=3)
    line = cg.eval_line(run, {**rec, "d_sigma_max": 1.0})
    assert f"class consistency (colour) {rec['class_consistency_colour']:.3f}, relabelled" in line
    assert f"none {rec['class_none']:.3f}" in line and line.count("none") == 1   # D never says none


def test_grid_rows_are_labelled_and_the_training_rng_untouched(tmp_path):
    G = cg.Generator(width=8, num_classes=4)
    names = [name for name, _ in cg.SHAPES]
    buffers, rng = [b.clone() for b in G.buffers()], torch.get_rng_state()
    cg.save_grid(G, tmp_path / "bare.png", 4, 80, torch.device("cpu"), 64, seed=3)
    cg.save_grid(G, tmp_path / "labelled.png", 4, 80, torch.device("cpu"), 64, seed=3, class_names=names)
    bare, labelled = (torch.from_numpy(np.array(Image.open(tmp_path / f))) for f in ("bare.png", "labelled.png"))
    margin = labelled.shape[1] - bare.shape[1]
    assert bare.shape == (4 * 33 + 1, 10 * 33 + 1, 3) and labelled.shape[0] == bare.shape[0] and margin > 20
    assert torch.equal(labelled[:, margin:], bare)             # the same grid, the same noise, beside its labels
    for k in range(4):                                         # text in each row's stretch of the margin
        assert labelled[33 * k + 1:33 * (k + 1), :margin].amax() > 200, names[k]
    assert torch.equal(torch.get_rng_state(), rng) and all(map(torch.equal, G.buffers(), buffers))


def test_grid_labels_of_any_class_folder_name(tmp_path):
    # PIL's default font draws ASCII only: 猫 and 犬 were the same boxes, a newline a ValueError at the first grid
    G = cg.Generator(width=8, num_classes=4)
    cg.save_grid(G, tmp_path / "g.png", 4, 80, torch.device("cpu"), 64, seed=3,
                 class_names=["猫", "犬", "a\nb", "ok"])
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "g.png")))
    rows = [grid[33 * k + 1:33 * (k + 1), :grid.shape[1] - (10 * 33 + 1)] for k in range(4)]  # each row's margin
    assert not torch.equal(rows[0], rows[1]) and rows[2].amax() > 200


# ---------------------------------------------------------------- real runs of the CLI

def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=HERE)


def test_cli_tiny_run_writes_grid_metrics_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = run_cli(*TINY, "--steps", "4", "--eval-every", "2", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert (run / "last.pt").is_file() and (run / "config.json").is_file()
    grids = sorted(os.listdir(run / "samples"))                # before any step, at the first --log-every, evals
    assert grids == ["step0000000.png", "step0000001.png", "step0000002.png", "step0000004.png"]
    with Image.open(run / "samples" / grids[0]) as grid:       # 10 columns of 32 + 1 pixels, 4 rows: one a class
        assert grid.height == 4 * 33 + 1 and grid.width > 10 * 33 + 1   # and a label margin on the left
    assert (run / "samples" / grids[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if not x.get("eval")]
    evals = [x for x in lines if x.get("eval")]
    assert [x["step"] for x in steps] == [1, 2, 3, 4] and [x["step"] for x in evals] == [2, 4]
    assert {"d_loss", "g_loss", "d_cond", "g_cond", "img_per_s"} <= set(steps[0])
    assert {"d_acc_train", "d_acc_heldout", "d_acc_gap", "d_sigma_max", "d_sigma", "class_consistency_colour",
            "class_consistency_colour_relabelled", "class_consistency_d", "class_consistency_d_relabelled",
            "d_class_acc_heldout", "collapse"} <= set(evals[0])
    for key in ("confusion_colour", "confusion_d", "confusion_d_heldout"):  # asked x judged, and none
        counts = torch.tensor(evals[0][key])
        assert counts.shape == (4, 5)
    assert torch.tensor(evals[0]["confusion_d"]).sum(1).tolist() == [32 // 4] * 4  # acc_images // K per label
    assert "class consistency (D)" in r.stdout and "relabelled" in r.stdout
    assert "step 4/4" in r.stdout and "img/s" in r.stdout and "left" in r.stdout
    assert json.loads((run / "config.json").read_text())["loss"] == "2c"


def weights_of(path):
    state = torch.load(path, weights_only=False)
    return state, {f"{m}.{k}": v for m in ("G", "D", "G_ema") for k, v in state[m].items()}


@pytest.mark.parametrize("flags", [["--loss", "2c"], ["--loss", "ac"],
                                   ["--accumulation-steps", "2", "--cr-lambda", "1"]])   # data: 2 batches a D step
def test_resume_continues_exactly(tmp_path, flags):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cg.main([*TINY, *flags, "--steps", "6", "--eval-every", "100", "--run-dir", str(straight)]) == 0
    assert cg.main([*TINY, *flags, "--steps", "3", "--eval-every", "100", "--run-dir", str(split)]) == 0
    batches = 3 * 2 * (2 if "--accumulation-steps" in flags else 1)    # steps x d_steps x micro-batches
    assert torch.load(split / "last.pt", weights_only=False)["data"] == {"epoch": 0, "pos": batches}
    assert cg.main(["--resume", str(split), "--steps", "6"]) == 0
    a, wa = weights_of(straight / "last.pt")
    b, wb = weights_of(split / "last.pt")
    assert a["step"] == b["step"] == 6 and wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for opt in ("opt_G", "opt_D"):
        for sa, sb in zip(a[opt]["state"].values(), b[opt]["state"].values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(steps) and steps.count(3) == 2  # log line + eval at 3, no repeats


def test_resume_of_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    # 64 images in batches of 8, one D step a step: step 8 ends epoch 0 exactly; the checkpoint there resumes
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = [*TINY, "--shapes-size", "64", "--batch-size", "8", "--d-steps", "1", "--eval-every", "4"]
    assert cg.main([*args, "--steps", "8", "--run-dir", str(run)]) == 0
    assert torch.load(run / "last.pt", weights_only=False)["data"] == {"epoch": 0, "pos": 8}
    assert cg.main(["--resume", str(run), "--steps", "10"]) == 0
    assert cg.main([*args, "--steps", "10", "--run-dir", str(straight)]) == 0
    (_, wa), (_, wb) = weights_of(run / "last.pt"), weights_of(straight / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_fresh_run_trains_the_same_with_or_without_cached_fid_statistics(tmp_path):
    # Computing FID's reference at start-up iterates a DataLoader; it must not move the RNG that draws z, y, flips
    args = [*TINY, "--steps", "2", "--eval-every", "100", "--fid-images", "8", "--fid-weights", "random",
            "--data-dir", str(tmp_path / "data")]
    assert cg.main([*args, "--run-dir", str(tmp_path / "computed")]) == 0  # writes the reference statistics
    assert list((tmp_path / "data").glob("fid_*.npz"))
    assert cg.main([*args, "--run-dir", str(tmp_path / "cached")]) == 0    # reads them
    (_, wa), (_, wb) = weights_of(tmp_path / "computed" / "last.pt"), weights_of(tmp_path / "cached" / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("workers,fid_images", [(0, 0), (2, 0), (0, 2)])
def test_folder_run_resumes_bit_for_bit(tmp_path, workers, fid_images):
    # 24 images, batches of 8, 2 D steps a step: the resume at step 2 starts mid-epoch, a DataLoader the
    # uninterrupted run never makes; it must take no number from the RNG that draws z, y and the flips.
    # fid_images: the resume computes FID's reference again (its cache deleted), a DataLoader of its own.
    data = write_folder(tmp_path / "data", 24, classes=2)
    args = [*TINY, "--dataset", "folder", "--data-dir", str(data), "--num-workers", str(workers),
            "--acc-images", "8", "--eval-every", "100", "--fid-images", str(fid_images), "--fid-weights", "random"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cg.main([*args, "--steps", "4", "--run-dir", str(straight)]) == 0
    assert cg.main([*args, "--steps", "1", "--run-dir", str(split)]) == 0
    for cache in split.glob("fid_*.npz"):
        cache.unlink()
    assert cg.main(["--resume", str(split), "--steps", "4"]) == 0
    assert not multiprocessing.active_children()              # the workers end with the run (a gc would wait 10 s)
    (_, wa), (_, wb) = weights_of(straight / "last.pt"), weights_of(split / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_seeds_beyond_what_torch_keeps_are_refused(tmp_path, capsys):
    # torch's CPU generator (mt19937) keeps the low 32 bits of a seed: 2**32 would train seed 0's run
    assert torch.equal(torch.randn(3, generator=torch.Generator().manual_seed(2 ** 32)),
                       torch.randn(3, generator=torch.Generator().manual_seed(0)))
    for seed in (2 ** 32, 2 ** 40):
        r = run_main(capsys, *TINY, "--steps", "1", "--seed", seed, "--run-dir", tmp_path / "r")
        assert "--seed must be in [0, 2**32)" in one_line_error(r) and not (tmp_path / "r").exists()
        r = run_main(capsys, tmp_path / "x", "--seed", seed, "--out-dir", tmp_path / "f", main=sample.main)
        assert "--seed must be in [0, 2**32)" in one_line_error(r) and not (tmp_path / "f").exists()
    assert cg.main([*TINY, "--steps", "1", "--seed", str(2 ** 32 - 1), "--run-dir", str(tmp_path / "top")]) == 0

def test_run_folder_and_image_folder_apart(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 16, classes=2)
    for run in (data / "c0" / "run", data, tmp_path):          # inside the data, the data itself, around it
        r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--run-dir", run)
        assert "overlap: the run's sample grids would be read as training images" in one_line_error(r)
    assert not (data / "c0" / "run").exists() and not (tmp_path / "last.pt").exists()
    run = tmp_path / "run"                                     # a resume that moves the folder in: refused too
    assert cg.main([*TINY, "--dataset", "folder", "--data-dir", str(data), "--steps", "1", "--run-dir", str(run)]) == 0
    r = run_main(capsys, "--resume", run, "--run-dir", data / "c1" / "run", "--steps", "2")
    assert "overlap" in one_line_error(r)
    other = write_folder(tmp_path / "other", 24, classes=3)   # a data set of other classes: said, not torch's text
    r = run_main(capsys, "--resume", run, "--data-dir", other, "--steps", "2")
    assert "does not fit this model: it has 2 classes, the data 3 (Error(s) in loading state_dict" in one_line_error(r)


def test_a_link_in_the_image_folder_to_the_run_folder_is_refused(tmp_path, capsys):
    # The overlap check above compares two real paths; the folder reader follows links, so a link inside the
    # data into the run folder would feed the run its own sample grids, more after every evaluation.
    data, run = write_folder(tmp_path / "data", 16, classes=2), tmp_path / "run"
    assert cg.main([*TINY, "--dataset", "folder", "--data-dir", str(data), "--steps", "1", "--run-dir", str(run)]) == 0
    for target in (run, run / "samples"):
        (data / "c1" / "grids").symlink_to(target, target_is_directory=True)
        r = run_main(capsys, "--resume", run, "--steps", "2")
        assert f"{data / 'c1' / 'grids'} leads into the run folder {run} (through a link)" in one_line_error(r)
        (data / "c1" / "grids").unlink()


def test_the_judge_of_another_image_folder_is_refused(tmp_path, capsys):
    # Same data set kind, class count and image size: only the judge's recorded folder and class names tell that
    # it reads other images (tools/judge.py refuses that mix-up too). A hand-made judge file, untrained.
    data = write_folder(tmp_path / "data", 16, classes=2)
    key = {"dataset": "folder", "img_size": 32, "flip": True, "classes": ["c0", "c1"], "train_images": 16,
           "heldout_images": 0, "data_dir": os.path.realpath(data)}
    judge, run = tmp_path / "judge.pt", tmp_path / "run"
    args = [*TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--judge", judge, "--run-dir", run]
    class TwoClasses(torch.nn.Module):                         # untrained: logits from two colour means
        def forward(self, x):
            return x.mean((2, 3))[:, :2]
    program = torch.export.export(TwoClasses(), (torch.zeros(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    for other in ({"data_dir": str(tmp_path / "other")}, {"classes": ["cat", "dog"]}, {}):
        info = {"num_classes": 2, "data": {**key, **other}, "heldout_accuracy": 1.0, "heldout_images": 0}
        with open(judge, "wb") as f:                           # as tools/judge.py's save_judge writes it
            torch.export.save(program, f, extra_files={"contragan-judge.json": json.dumps(info)})
        r = run_main(capsys, *args)
        if other:
            assert f"judge {judge} reads other data: its {other}" in one_line_error(r) and not run.exists()
    assert r.returncode == 0 and "class consistency (judge, 1.000 on held-out reals)" in r.stdout   # its own


def test_resume_refuses_renamed_classes_and_says_changed_files(tmp_path, capsys, monkeypatch):
    # Classes are numbered in name order: `mv c0 zc0` would give every index another class. Files added or
    # removed are said, and FID's reference is made again of them (its cache is named by the file list; stubbed).
    references = []
    monkeypatch.setattr(cg.FIDEvaluator, "_reference", lambda self, ds, path, protocol: references.append(
        os.path.basename(path)) or (np.zeros(2048), np.eye(2048)))
    monkeypatch.setattr(cg.FIDEvaluator, "__call__", lambda self, G: {"fid": 1.0})
    data, run = write_folder(tmp_path / "data", 16, classes=2), tmp_path / "run"
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "2",
                 "--fid-weights", "random", "--run-dir", run)
    assert r.returncode == 0
    (data / "c0").rename(data / "zc0")
    r = run_main(capsys, "--resume", run, "--steps", "2")
    assert "was trained with class 0 'c0', the data has 'c1' there: give the class folders" in one_line_error(r)
    (data / "zc0").rename(data / "c0")
    next((data / "c0").iterdir()).unlink()
    r = run_main(capsys, "--resume", run, "--steps", "2")
    assert r.returncode == 0 and f"note: the FID protocol changed (the files in {data}: added, removed or " \
        "moved): best.pt" in r.stdout
    assert len(references) == 2 and references[0] != references[1]
    next((data / "c1").iterdir()).rename(data / "c0" / "moved.png")
    r = run_main(capsys, "--resume", run, "--steps", "3", "--fid-images", "0")   # no FID: a note of its own
    assert r.returncode == 0 and f"note: the files in {data}: added, removed or moved since {run / 'last.pt'} " \
        "was saved; the run goes on with the files there now" in r.stdout


def test_fid_protocol_change_on_resume_restarts_best_and_says_so(tmp_path, capsys, monkeypatch):
    scores = iter([5.0, 4.0, 9.0, 8.0])                        # stubbed FIDs: what is tested is their bookkeeping
    monkeypatch.setattr(cg.FIDEvaluator, "__call__", lambda self, G: {"fid": next(scores)})
    run, fid_args = tmp_path / "run", ["--fid-weights", "random", "--eval-batch", "8", "--data-dir", tmp_path]
    r = run_main(capsys, *TINY, *fid_args, "--fid-images", "8", "--steps", "2", "--eval-every", "1", "--run-dir", run)
    assert r.returncode == 0 and "best 4.000 @ 2" in r.stdout
    r = run_main(capsys, "--resume", run, "--fid-images", "16", "--steps", "4")
    assert r.returncode == 0 and "note: the FID protocol changed (--fid-images 8 -> 16)" in r.stdout
    assert "FID 9.000 (best 9.000 @ 3)" in r.stdout and "FID 8.000 (best 8.000 @ 4)" in r.stdout
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["step"] == 4 and best["best_fid"] == 8.0
    assert [h["fid"] for h in best["history"]] == [None, None, 9.0, 8.0]


def test_a_new_world_size_continues_the_same_global_batches():
    data = cg.TensorImages(*cg.make_shapes(70, 8, seed=0), ["a", "b", "c", "d"])
    one = cg.Batches(data, 8, 0, 1, seed=3, device=torch.device("cpu"), flip=False)
    two = [cg.Batches(data, 4, r, 2, seed=3, device=torch.device("cpu"), flip=False) for r in range(2)]
    for b in (one, *two):
        b.load_state_dict({"epoch": 1, "pos": 5})             # mid-epoch: 8 batches an epoch either way
    for _ in range(6):                                         # past the epoch's end
        x1, y1 = next(one)
        x2, y2 = zip(*(next(b) for b in two))
        key = lambda x, y: sorted(zip(y.tolist(), x.flatten(1).sum(1).tolist()))
        assert key(x1, y1) == key(torch.cat(x2), torch.cat(y2))
    assert one.state_dict() == two[0].state_dict() == two[1].state_dict() == {"epoch": 2, "pos": 3}

def test_torn_blank_or_edited_metrics_lines_are_dropped_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "3", "--eval-every", "100", "--run-dir", str(run)]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + lines[1][:20] + "\n" + "\n" + lines[2] + '[1]\n' + lines[3][:9])
    r = run_main(capsys, "--resume", run, "--steps", "4")
    assert r.returncode == 0, r.stderr
    assert "note: 4 unreadable lines" in r.stdout and "Traceback" not in r.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4, 4]                               # step 2's torn line is gone, not repeated


def test_unknown_flag_under_torchrun_is_said_by_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "error: unrecognized arguments: --bogus (see --help)")):
        monkeypatch.setenv("RANK", rank)
        r = run_main(capsys, "--bogus")
        assert r.returncode == 2 and r.stderr.strip() == said


def test_stray_rank_or_world_size_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")                            # left over in a shell: one process, which must speak
    for args in ([], ["--steps", "0"]):
        line = one_line_error(run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "r", *args))
        assert line.startswith("error: RANK=1 is set without WORLD_SIZE") or "--steps must be" in line, line
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")                      # without torchrun: no rank, no rendezvous
    line = one_line_error(run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "r"))
    assert line == "error: WORLD_SIZE=2 is set without RANK, MASTER_ADDR, MASTER_PORT: start the ranks with " \
        "torchrun, or unset WORLD_SIZE", line
    assert not (tmp_path / "r").exists()


def test_collapse_gap_needs_enough_images_a_side(tmp_path, capsys, monkeypatch):
    real = cg.d_diagnostics                                    # a gap far past --collapse-gap, every evaluation
    monkeypatch.setattr(cg, "d_diagnostics", lambda *a: {**real(*a), "d_acc_gap": 1.0})
    r = run_main(capsys, *TINY, "--acc-images", "1", "--steps", "1", "--run-dir", tmp_path / "one")
    assert r.returncode == 0 and "collapse suspected" not in r.stdout
    assert "note: D's train/held-out gap test is off: 1 < 50 images a side (--acc-images)" in r.stdout
    r = run_main(capsys, *TINY, "--acc-images", "50", "--steps", "1", "--run-dir", tmp_path / "fifty")
    assert "collapse suspected at step 1: D overfits" in r.stdout and "gap test" not in r.stdout

def test_fid_during_training_with_random_weights(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fid")
    run, calls, real_generate = tmp_path / "run", [], cg.generate
    monkeypatch.setattr(cg, "generate", lambda G, y, *a: calls.append(y.cpu()) or real_generate(G, y, *a))
    r = run_main(capsys, *TINY, "--steps", "2", "--eval-every", "2", "--fid-images", "16", "--fid-weights", "random",
                 "--eval-batch", "8", "--intra-fid", "--data-dir", tmp_path, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    record = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    assert math.isfinite(record["fid"]) and record["fid"] >= 0
    assert len(record["intra_fid_per_class"]) == 4 and record["intra_fid"] == pytest.approx(
        sum(record["intra_fid_per_class"]) / 4)
    # Intra-class FID routes FID's own fakes by label, in mixed batches with balanced labels (in a batch of one
    # class, G's BatchNorm batch statistics would remove the class). The grids of steps 0 and 1 (4 x 10) draw first.
    assert [len(y) for y in calls[:4]] == [40, 40, 8, 8] and all(len(y.unique()) > 1 for y in calls)
    assert torch.bincount(torch.cat(calls[2:4]), minlength=4).tolist() == [4, 4, 4, 4]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".npz"))[0] == "fid_shapes_heldout_32px_16_random.npz"
    assert "FID protocol" in r.stdout and "RANDOM weights" in r.stdout
    assert (run / "best.pt").is_file()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing lost

def run_main(capsys, *args, main=cg.main):
    """The command line in this process: main(argv) is what `python contragan.py ARGS` runs, without
    the ~6 s of imports a subprocess costs on 2 cores. Returns a CompletedProcess like run_cli's."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:                                 # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def one_line_error(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize("args,expected", [
    (["--dataset", "mnist"], "invalid choice"),
    (["--loss", "wgan"], "invalid choice"),
    (["--loss", "2c", "--batch-size", "1"], "at least 2"),
    (["--temperature", "0"], "must be > 0"),
    (["--loss", "proj", "--no-data-positives"], "needs --loss 2c"),
    (["--img-size", "48"], "not supported"),
    (["--g-width", "1"], "--g-width 1 is too small at 32x32: self-attention needs 4 x width >= 8 channels; the "
                         "smallest width that works is 2"),
    (["--d-width", "1"], "the smallest width that works is 4"),
    (["--img-size", "64", "--d-width", "4"], "--d-width 4 is too small at 64x64"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/images"], "does not exist"),
    (["--lr-g", "nan"], "--lr-g must be > 0 and finite"),              # every flag checked up front
    (["--lr-d", "inf"], "--lr-d must be > 0 and finite"),
    (["--lr-g", "-0.0001"], "--lr-g must be > 0"),
    (["--beta1", "1"], "--beta1 must be in [0, 1)"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1)"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
    (["--cond-lambda", "-1"], "--cond-lambda must be >= 0"),
    (["--cr-lambda", "-1"], "--cr-lambda must be >= 0"),
    (["--loss", "proj", "--embed-head", "mlp"], "needs --loss 2c or d2dce"),
    (["--embed-dim", "0"], "--embed-dim must be at least 1"),
    (["--num-workers", "-1"], "--num-workers must be at least 0"),
    (["--acc-images", "0"], "--acc-images must be at least 1"),        # divided by zero at the first evaluation
    (["--collapse-patience", "0"], "--collapse-patience must be at least 1"),
    (["--intra-fid", "--fid-images", "4", "--fid-weights", "random"], "--intra-fid needs --fid-images of at least 8"),
])
def test_bad_arguments(args, expected, tmp_path, capsys):
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", str(tmp_path / "r"), *args)
    assert expected in one_line_error(r)
    assert not (tmp_path / "r").exists()                       # a failed start leaves no folder behind


def test_bad_image_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.manual_seed(0)
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    gone = write_folder(tmp_path / "gone", 8, classes=2)       # a class folder's link that leads nowhere
    (gone / "c2").symlink_to(tmp_path / "moved", target_is_directory=True)
    for folder, expected in [(empty, "no class sub-folders"), (flat, "no class sub-folders"),
                             (gone, f"{gone / 'c2'} is a link to '{tmp_path / 'moved'}', which does not exist")]:
        assert cg.main([*TINY, "--dataset", "folder", "--data-dir", str(folder), "--steps", "1", "--run-dir",
                        str(tmp_path / "r")]) == 2
        assert expected in capsys.readouterr().err


def test_folder_dataset_trains(tmp_path):
    images, labels = cg.make_shapes(24, 40, seed=0)
    for i, (x, y) in enumerate(zip(images, labels)):
        os.makedirs(tmp_path / "data" / f"c{int(y)}", exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "data" / f"c{int(y)}" / f"{i}.png")
    run = tmp_path / "run"
    assert cg.main([*TINY, "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--steps", "2",
                    "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["num_classes"] == 4


def test_cifar_offline_fails_fast_with_instructions(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    t0 = time.time()
    assert cg.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - t0 < 30 and len(err.splitlines()) == 1
    assert "cifar-10-python.tar.gz" in err and "https://" in err and "--data-dir" in err


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "cannot write" in one_line_error(run_cli(*TINY, "--steps", "1", "--run-dir", str(blocker / "run")))
    run = tmp_path / "run"                                     # samples/ replaced by a file: named
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    (run / "samples").rename(tmp_path / "grids")
    (run / "samples").write_text("not a folder")
    r = run_main(capsys, "--resume", run, "--steps", "2")
    assert f"cannot write to run folder {run}: {run / 'samples'}: not a folder" in one_line_error(r)


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err and (run / "last.pt").read_bytes() == before


def test_corrupt_or_foreign_checkpoint_is_refused_and_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    digest = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()
    assert cg.main(["--resume", str(run), "--loss", "proj", "--steps", "2"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert hashlib.sha256((run / "last.pt").read_bytes()).hexdigest() == digest
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"\x00garbage" * 10)
    assert cg.main(["--resume", str(bad), "--steps", "2"]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert (bad / "last.pt").read_bytes() == b"\x00garbage" * 10


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    calls = {"n": 0}
    real_hinge = cg.d_hinge_loss

    def hinge_that_breaks(real, fake):                         # NaN from the 3rd G step on (2 D steps each)
        calls["n"] += 1
        loss = real_hinge(real, fake)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(cg, "d_hinge_loss", hinge_that_breaks)
    assert cg.main([*TINY, "--steps", "6", "--eval-every", "2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "intact" in err
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())


def test_ctrl_c_saves_and_exits(tmp_path):
    # Ctrl-C signals the terminal's process group: the run and its DataLoader workers; the stop is said once
    run, data = tmp_path / "run", write_folder(tmp_path / "data", 24, classes=2)
    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY, "--dataset", "folder", "--data-dir", str(data),
                             "--num-workers", "2", "--steps", "100000", "--eval-every", "100000", "--run-dir",
                             str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and out.count("SIGINT: finishing this step") == 1, out
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] >= 1
    assert cg.main(["--resume", str(run), "--steps", str(state["step"] + 1)]) == 0


@pytest.mark.parametrize("steps, every", [(10, 5), (11, 5), (4, 2), (3, 10), (250, 20), (7, 1)])
def test_evaluations_left_counts_the_loops_evaluations(steps, every):
    """The time-left estimate counts the evaluations the training loop will run: brute force oracle."""
    for step in range(1, steps + 1):
        oracle = sum(1 for s in range(step, steps + 1) if s % every == 0 or s == steps)
        assert cg.evaluations_left(step, steps, every) == oracle, (step, steps, every)


# ---------------------------------------------------------------- mixed precision

def test_bf16_step_is_finite_and_close_to_fp32():
    cfg = cg.build_parser().parse_args(TINY)
    losses = {}
    for amp in ("none", "bf16"):
        cfg.amp = amp
        trainer = cg.Trainer(cfg, num_classes=4, device=torch.device("cpu"))
        torch.manual_seed(1)
        real, y = cg.make_shapes(8, 32, seed=5)
        logs = trainer.d_step(real.float() / 127.5 - 1, y)
        logs.update(trainer.g_step())
        losses[amp] = {k: v.item() for k, v in logs.items()}
    for k, v in losses["none"].items():
        assert math.isfinite(losses["bf16"][k])
        assert abs(losses["bf16"][k] - v) < 0.05 * abs(v) + 0.05, (k, v, losses["bf16"][k])


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", [cg.conditional_contrastive_loss, cg.data_to_data_cross_entropy_loss])
def test_contrastive_losses_are_fp32_inside_autocast(loss, amp):
    """Inside the step's autocast, 2C and D2D-CE equal their fp32 values and gradients to float32 rounding (CPU
    autocast recasts matmuls as CUDA's does), for fp32 inputs and for the bf16/fp16 embeddings D gives there."""
    gen = torch.Generator().manual_seed(0)
    embed, proxy = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    labels = torch.randint(0, 4, (64,), generator=gen)
    for dtype in (torch.float32, amp):
        e, p = embed.to(dtype), proxy.to(dtype)
        values, grads = [], []
        for autocast in (False, True):
            x, y = e.clone().requires_grad_(), p.clone().requires_grad_()
            with torch.autocast("cpu", dtype=amp, enabled=autocast):
                value = loss(x, y, labels, 0.5)
            values.append(value)
            grads.append(torch.autograd.grad(value, (x, y)))
        assert values[1].dtype == torch.float32
        torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-6)
        for g_autocast, g_fp32 in zip(grads[1], grads[0]):
            torch.testing.assert_close(g_autocast.float(), g_fp32.float(), rtol=1e-5, atol=1e-6)


def test_self_attention_keeps_a_bf16_activation_bf16():
    attn = cg.SelfAttention(16)
    torch.nn.init.constant_(attn.scale, 0.5)                   # a trained, non-zero scale; (1,): the authors' shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn(torch.randn(2, 16, 8, 8).bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------- DDP on the CPU (gloo, 2 processes)

def _two_rank_2c(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)                     # the same global batch on both ranks
    embed, proxy = torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    local = slice(rank * 6, rank * 6 + 6)                      # each rank holds half of it
    e, p = embed[local].clone().requires_grad_(), proxy[local].clone().requires_grad_()
    loss = cg.conditional_contrastive_loss(*cg.gather_global_batch(e, p, labels[local]), temperature=0.5)
    loss.backward()
    torch.save({"loss": loss.detach(), "embed_grad": e.grad, "proxy_grad": p.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_2c_on_two_ranks_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_two_rank_2c, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(12, 16, generator=gen).requires_grad_()
    proxy = torch.randn(12, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 3, (12,), generator=gen)
    loss = cg.conditional_contrastive_loss(embed, proxy, labels, temperature=0.5)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach())
        # all_gather's backward sums the identical per-rank losses' gradients (2x); DDP's gradient
        # averaging over the 2 ranks divides by 2: the model sees exactly the single-process gradient.
        local = slice(rank * 6, rank * 6 + 6)
        torch.testing.assert_close(got["embed_grad"] / 2, embed.grad[local])
        torch.testing.assert_close(got["proxy_grad"] / 2, proxy.grad[local])


def _two_rank_runs(rank, world, port, runs, out_dir):
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for i, argv in enumerate(runs):                            # a fresh rendezvous for each command
        os.environ["MASTER_PORT"] = str(port + i)
        assert cg.main(argv) == 0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + len(runs)}", rank=rank, world_size=world)
    trainer = cg.Trainer(cg.build_parser().parse_args(TINY), num_classes=4, device=torch.device("cpu"), world=world)
    z, y = trainer.sample_latents(4)                           # what the next D or G step feeds G on this rank
    flips = torch.rand(4)                                      # what Batches draws for its flips
    torch.save({"z": z, "y": y, "flips": flips, "G": trainer.G.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_run_the_algorithm_of_one_process(tmp_path):
    """2 gloo ranks. Every rank draws its own z, labels and flips from the same initial weights (DDP broadcasts rank
    0's): the global batch holds batch-size distinct fakes, not batch / world, each world times. FID: exactly
    --fid-images fakes, in the batches one process draws (10 = 4 + 4 + 2), the FID of one process on the same
    weights. A resumed 2-rank run ends where the uninterrupted one does."""
    flags = [*TINY, "--eval-every", "2", "--fid-images", "10", "--eval-batch", "4", "--fid-weights", "random"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # Each run its own FID cache: computing the reference statistics draws from the global RNG (DataLoader's seed)
    runs = [[*flags, "--steps", "4", "--run-dir", str(straight), "--data-dir", str(tmp_path / "a")],
            [*flags, "--steps", "2", "--run-dir", str(split), "--data-dir", str(tmp_path / "b")],
            ["--resume", str(split), "--steps", "4"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_runs, args=(2, port, runs, str(tmp_path)), nprocs=2)
    a, wa = weights_of(straight / "last.pt")
    b, wb = weights_of(split / "last.pt")
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    fids = [json.loads(x)["fid"] for x in (straight / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    # The one-process FID of the final G_ema, on the same weights, through the same evaluator:
    cfg = cg.build_parser().parse_args([*flags, "--run-dir", str(tmp_path / "one"), "--data-dir", str(tmp_path / "a")])
    G = cg.Generator(32, 8, 80, 128, 4)
    G.load_state_dict(a["G_ema"])
    evaluator = cg.FIDEvaluator(cfg, cg.load_data(cfg)[1], "heldout", 4, torch.device("cpu"))
    sizes, real_generate = [], cg.generate
    cg.generate = lambda G, y, *rest: sizes.append(len(y)) or real_generate(G, y, *rest)
    try:
        one = evaluator(G)["fid"]
    finally:
        cg.generate = real_generate
    assert sizes == [4, 4, 2] and one == pytest.approx(fids[-1], rel=1e-6)
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert not torch.equal(r0["z"], r1["z"]) and not torch.equal(r0["flips"], r1["flips"])
    assert len(torch.cat([r0["z"], r1["z"]]).unique(dim=0)) == 8
    for k, v in r0["G"].items():
        assert torch.equal(v, r1["G"][k]), k


def test_torchrun_two_processes_train_and_resume(tmp_path):
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    r = subprocess.run([*torchrun, *TINY, "--steps", "2", "--eval-every", "2", "--run-dir", str(run)],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("step 2/2") == 1                     # only rank 0 logs
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2
    r = subprocess.run([*torchrun, "--resume", str(run), "--steps", "3"], capture_output=True, text=True,
                       timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout and torch.load(run / "last.pt", weights_only=False)["step"] == 3
    # Another number of ranks: the same global batches (test_a_new_world_size_...), a new stream for each rank
    # (1 -> 2 must not give both ranks rank 0's state)
    assert cg.main(["--resume", str(run), "--steps", "4"]) == 0
    assert len(torch.load(run / "last.pt", weights_only=False)["rng"]) == 1
    r = subprocess.run([*torchrun, "--resume", str(run), "--steps", "5"], capture_output=True, text=True,
                       timeout=300, cwd=HERE)
    assert r.returncode == 0 and "note: resumed with 2 ranks a checkpoint of 1" in r.stdout, r.stderr[-3000:]
    rng = torch.load(run / "last.pt", weights_only=False)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


# ---------------------------------------------------------------- image folders as they come

def write_folder(root, n, classes, size=40):
    images, labels = cg.make_shapes(n, size, seed=0)
    for i, (x, y) in enumerate(zip(images, labels)):
        os.makedirs(root / f"c{int(y) % classes}", exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / f"c{int(y) % classes}" / f"{i}.png")
    return root


def test_unreadable_images_are_skipped_and_named(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 24, classes=4)
    (data / "c0" / "notes.png").write_text("not a png")
    good = (data / "c1" / "1.png").read_bytes()
    (data / "c1" / "cut.png").write_bytes(good[:len(good) // 2])   # a truncated file: its header reads fine
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "2", "--run-dir",
                 tmp_path / "run")
    assert r.returncode == 0, r.stderr                         # the evaluation draws all 26: both are met
    warnings = sorted(line for line in r.stderr.splitlines() if line.startswith("warning: "))
    assert len(warnings) == 2 and "c0/notes.png" in warnings[0] and "c1/cut.png" in warnings[1]
    assert all("skipped unreadable image" in w for w in warnings)


def test_one_class_folder_refused_for_2c(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 12, classes=1)
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--run-dir", tmp_path / "r")
    assert "needs at least 2 classes" in one_line_error(r) and not (tmp_path / "r").exists()


def test_image_modes_are_read_by_their_range(tmp_path, capsys):
    full = lambda value, dtype: np.full((8, 8), value, dtype=dtype)
    files = {"a16.png": Image.fromarray(full(40000, np.uint16)),          # I;16: by its range (convert("RGB"): white)
             "b16.tif": Image.fromarray(full(40000, ">u2")),              # I;16B
             "cfloat.tif": Image.fromarray(full(0.25, np.float32)),       # F in [0, 1]: times 255, not black
             "dint.tif": Image.fromarray(full(20000, np.int32)),          # I, read as 16-bit, not clipped
             "etransparent.png": Image.new("RGBA", (8, 8), (0, 0, 255, 0)),  # over white, not its hidden blue
             "fla.png": Image.new("LA", (8, 8), (0, 128)),                # black at half alpha over white
             "gcmyk.tif": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),    # red
             "hbit.png": Image.new("1", (8, 8), 1),
             "igif.gif": Image.new("RGB", (8, 8), (10, 200, 30)),         # GIF: read too
             "jexif.png": Image.new("RGB", (8, 8), (255, 0, 0)),          # stored upside down: shown blue on top
             "xfloat.tif": Image.fromarray(full(3.0, np.float32)),        # a float range other than [0, 1]: refused
             "yint.tif": Image.fromarray(full(-5, np.int32))}
    files["jexif.png"].paste((0, 0, 255), (0, 4, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 3                                          # EXIF orientation: rotate 180 degrees to show
    for name, im in files.items():                            # one class per file: the label names the file
        (tmp_path / "data" / name).mkdir(parents=True)
        im.save(tmp_path / "data" / name / name, **{"exif": exif} if name == "jexif.png" else {})
    ds = cg.load_folder(str(tmp_path / "data"), 8)
    px = {ds.classes[y]: x[:, 0, 0].tolist() for x, y in (ds[j] for j in range(len(ds)))}  # uniform images
    assert px["a16.png"] == px["b16.tif"] == [156] * 3                       # 40000 / 257 = 155.6
    assert px["cfloat.tif"] == [64] * 3 and px["dint.tif"] == [78] * 3       # 0.25 * 255, 20000 / 257
    assert px["etransparent.png"] == [255] * 3 and px["fla.png"] == [127] * 3
    assert px["gcmyk.tif"] == [255, 0, 0] and px["hbit.png"] == [255] * 3 and px["igif.gif"] == [10, 200, 30]
    assert px["jexif.png"] == [0, 0, 255] and "xfloat.tif" not in px and "yint.tif" not in px
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and "xfloat.tif" in warnings[0] and "mode F" in warnings[0]
    assert "yint.tif" in warnings[1] and "mode I" in warnings[1]


def test_symlink_loop_counts_each_image_once(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 16, classes=2)
    os.symlink("..", data / "c0" / "up")                      # ImageFolder follows it: 7,216 images
    os.symlink("0.png", data / "c0" / "again.png")            # the same file twice in one class: once
    ds = cg.load_folder(str(data), 32)
    assert len(ds) == 16
    assert all(os.path.basename(os.path.dirname(path)) == f"c{label}" for path, label in ds.samples)
    os.symlink("../c1", data / "c0" / "other")                # class c1's images inside c0: which class?
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--run-dir", tmp_path / "r")
    assert "also in class 'c0'" in one_line_error(r) and not (tmp_path / "r").exists()


def test_hidden_and_non_image_files_are_left_out(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 16, classes=2)
    (data / ".ipynb_checkpoints").mkdir()                     # a notebook's folder is no class
    (data / "c0" / "._0.png").write_bytes(b"\0" * 64)         # macOS resource fork: not an image
    (data / "c1" / "notes.txt").write_text("labels by hand")
    (data / "c1" / ".cache").mkdir()                          # a hidden folder inside a class: left out
    Image.new("RGB", (8, 8)).save(data / "c1" / ".cache" / "copy.png")
    os.mkfifo(data / "c1" / "pipe.png")                       # not a file: reading it would block
    ds = cg.load_folder(str(data), 32)
    assert ds.classes == ["c0", "c1"] and len(ds) == 16
    out = capsys.readouterr()
    assert "2 files" in out.out and "notes.txt" in out.out and not out.err   # notes.txt and the FIFO


def test_huge_image_is_skipped_and_named(tmp_path, capsys, monkeypatch):
    data = write_folder(tmp_path / "data", 4, classes=2)
    Image.new("RGB", (64, 64)).save(data / "c0" / "huge.png")
    Image.new("RGB", (48, 48)).save(data / "c1" / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1700)      # 4096 pixels: over twice the limit; 2304: over it
    ds = cg.load_folder(str(data), 32)
    for _ in range(2):                                         # named once, not at every draw
        assert [ds[j][0].shape for j in range(len(ds))] == [(3, 32, 32)] * 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "huge.png (DecompressionBombError" in err[0], err
    assert "large.png (DecompressionBombWarning: Image size (2304 pixels) exceeds limit" in err[1]


def test_small_folder_fid_reference_is_a_random_subset(tmp_path, capsys, monkeypatch):
    # Under 200 images there is no held-out split: FID's reference is the training images, drawn at random
    # (their first --fid-images are class 0's alone). The statistics are stubbed: what is measured is which images.
    data, seen = write_folder(tmp_path / "data", 16, classes=2), []
    monkeypatch.setattr(cg.FIDEvaluator, "_reference", lambda self, ds, path, protocol: seen.append(
        [ds[i][1] for i in range(len(ds))]) or (np.zeros(2048), np.eye(2048)))
    monkeypatch.setattr(cg.FIDEvaluator, "__call__", lambda self, G: {"fid": 1.0})
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "8",
                 "--fid-weights", "random", "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert len(seen) == 1 and len(seen[0]) == 8 and 2 <= sum(seen[0]) <= 6
    assert "vs 8 of 16 folder train images (a fixed subset)" in r.stdout


def test_fid_reference_dir_replaces_the_training_images_as_the_reference(tmp_path, capsys, monkeypatch):
    # e.g. Tiny ImageNet's validation split (tools/tiny_imagenet_val.py): its images, drawn at random, are FID's
    # reference; the statistics are stubbed: what is measured is which images, and that the protocol says so.
    data, val = write_folder(tmp_path / "data", 16, classes=2), write_folder(tmp_path / "val", 12, classes=2)
    next((val / "c1").iterdir()).unlink()                      # 11 images: not the training folder's 16
    seen = []
    monkeypatch.setattr(cg.FIDEvaluator, "_reference", lambda self, ds, path, protocol: seen.append(
        (ds, path, protocol)) or (np.zeros(2048), np.eye(2048)))
    monkeypatch.setattr(cg.FIDEvaluator, "__call__", lambda self, G: {"fid": 1.0})
    args = [*TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "8",
            "--fid-weights", "random"]
    r = run_main(capsys, *args, "--fid-reference-dir", val, "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    (ds, path, protocol), = seen
    files = [ds.dataset.dataset.samples[i][0] for i in ds.dataset.indices[:8]]
    assert len(ds) == 8 and all(f.startswith(str(val)) for f in files) and files != sorted(files)
    assert protocol["split"] == "reference" and path.startswith(str(tmp_path / "r"))
    assert "vs 8 of 11 folder reference images (a fixed subset)" in r.stdout
    other = write_folder(tmp_path / "other", 12, classes=3)
    r = run_main(capsys, *args, "--fid-reference-dir", other, "--run-dir", tmp_path / "r2")
    assert "other classes than the training data" in one_line_error(r)
    r = run_main(capsys, *args, "--fid-reference-dir", tmp_path / "none", "--run-dir", tmp_path / "r3")
    assert "does not exist (give it with --fid-reference-dir)" in one_line_error(r)


def test_intra_fid_short_class_fails_before_writing(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 15, classes=2)
    for f in list((data / "c1").iterdir())[1:]:               # c1 keeps one image: no covariance
        f.rename(data / "c0" / f"moved{f.name}")
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "15",
                 "--fid-weights", "random", "--intra-fid", "--batch-size", "4", "--run-dir", tmp_path / "r")
    assert "class 'c1' has 1 of the 15" in one_line_error(r)
    assert not (tmp_path / "r").exists()                       # no 33 MB statistics files left behind


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_data_dir_that_is_a_file(dataset, tmp_path, capsys):
    (tmp_path / "images.zip").write_bytes(b"PK")
    r = run_main(capsys, *TINY, "--dataset", dataset, "--data-dir", tmp_path / "images.zip", "--steps", "1",
                 "--run-dir", tmp_path / "r")
    assert "is a file, not a folder" in one_line_error(r)


def test_out_of_memory_names_the_settings(tmp_path, capsys, monkeypatch):
    r = run_main(capsys, *TINY, "--g-width", 10 ** 9, "--steps", "1", "--run-dir", tmp_path / "r")   # G: 5 TB
    assert "error: out of memory on cpu: --batch-size 8, --eval-batch 16, --g-width 1000000000 or --d-width 8 is " \
        "too large for its memory; no checkpoint was written" == one_line_error(r) and not (tmp_path / "r").exists()
    def oom(self, batches, step):                              # what CUDA raises mid-run
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(cg.Trainer, "iteration", oom)
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "r")
    assert "out of memory on cpu: --batch-size 8, --eval-batch 16, --g-width 8 or --d-width 8 is too" in \
        one_line_error(r)


def test_shapes_beyond_memory_is_refused(tmp_path, capsys):
    r = run_main(capsys, *TINY, "--shapes-size", "10000000", "--steps", "1", "--run-dir", tmp_path / "r")
    assert "GB of memory, more than this machine has" in one_line_error(r)    # not a crash at the allocation


def test_fid_cache_in_unwritable_data_dir_goes_to_run_folder(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file where a folder would be")
    r = run_main(capsys, *TINY, "--steps", "1", "--fid-images", "8", "--fid-weights", "random", "--eval-batch", "8",
                 "--data-dir", tmp_path / "blocker" / "data", "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "fid_shapes_heldout_32px_8_random.npz").is_file()
    assert "cached in the run folder (cannot write to" in r.stdout


def test_fid_caches_of_two_image_sizes_share_a_data_dir(tmp_path, capsys):
    for size in (32, 64):                                      # the protocol's every field is in the file's name
        r = run_main(capsys, *TINY, "--steps", "1", "--fid-images", "8", "--fid-weights", "random", "--eval-batch",
                     "8", "--img-size", size, "--data-dir", tmp_path, "--run-dir", tmp_path / f"r{size}")
        assert r.returncode == 0, r.stderr
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".npz")) == [
        "fid_shapes_heldout_32px_8_random.npz", "fid_shapes_heldout_64px_8_random.npz"]


def test_fid_cache_on_a_full_data_disk_names_the_data_folder_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    data, stats = tmp_path / "data", tmp_path / "data" / "fid_shapes_heldout_32px_8_random.npz"
    args = [*TINY, "--steps", "1", "--fid-images", "8", "--fid-weights", "random", "--eval-batch", "8",
            "--data-dir", data, "--run-dir", tmp_path / "r"]
    with monkeypatch.context() as patch:                      # full before the statistics: refused before them
        patch.setattr(cg.fid.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2 ** 20))
        patch.setattr(cg.fid, "features_from_dataset", lambda *a, **k: pytest.fail("features computed"))
        assert f"cannot write {stats}: 1.0 MiB free there" in one_line_error(run_main(capsys, *args))
    def disk_fills(file, **arrays):                            # full while they are written
        file.write(b"PK" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cg.fid.np, "savez", disk_fills)
    r = run_main(capsys, *args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"error: cannot write {stats} (No space left on device); nothing written"
    assert os.listdir(data) == [] and not (tmp_path / "r").exists()

def test_broken_image_named_once_across_workers_and_epochs(tmp_path, capfd):
    data = write_folder(tmp_path / "data", 15, classes=2)
    good = next((data / "c1").iterdir()).read_bytes()
    (data / "c1" / "cut.png").write_bytes(good[:len(good) // 2])   # truncated: PIL fails only when decoding
    # 16 images, batches of 8, 2 D steps a step: each step is one epoch, new workers every epoch
    r = run_main(capfd, *TINY, "--dataset", "folder", "--data-dir", data, "--num-workers", "2", "--acc-images", "1",
                 "--steps", "3", "--eval-every", "100", "--run-dir", tmp_path / "r")   # capfd: the workers' stderr too
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "c1/cut.png" in warnings[0] and "truncated" in warnings[0]


# ---------------------------------------------------------------- signals, checkpoints, resume

def test_nonfinite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    # A huge finite learning rate: G's weights reach ~1e30 at step 1 (still finite, and saved), its
    # outputs overflow at step 2. The run stops there; every tensor it saved is finite.
    huge = tmp_path / "huge"
    r = run_main(capsys, *TINY, "--lr-g", "1e30", "--steps", "3", "--eval-every", "1", "--run-dir", huge)
    assert "non-finite loss or weights" in one_line_error(r)
    _, saved = weights_of(huge / "last.pt")
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    # G_ema turning NaN after a good checkpoint (losses stay finite: G_ema is not trained): that
    # checkpoint is left byte for byte, and the message says so.
    run = tmp_path / "run"
    real_ema = cg.Trainer.ema_update

    def ema_then_nan(self, step):
        real_ema(self, step)
        if step >= 1:
            next(self.G_ema.parameters()).data.fill_(float("nan"))

    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(cg.Trainer, "ema_update", ema_then_nan)
    r = run_main(capsys, "--resume", run, "--steps", "3", "--eval-every", "1")
    assert "intact" in one_line_error(r) and (run / "last.pt").read_bytes() == before


def test_resume_into_another_run_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = {f: (b / f).read_bytes() for f in ("last.pt", "config.json", "metrics.jsonl")}
    r = run_main(capsys, "--resume", a, "--run-dir", b, "--steps", "2")
    assert "already holds a run" in one_line_error(r)
    assert {f: (b / f).read_bytes() for f in before} == before
    assert not (b / "run.lock").exists()


def test_not_a_checkpoint_and_short_messages(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "cut.pt").write_bytes((run / "last.pt").read_bytes()[:5000])
    for path, expected in [("other.pt", "not a contragan.py checkpoint"), ("notes.txt", "not a torch file"),
                           ("cut.pt", "truncated")]:
        for args, main in ((["--resume", tmp_path / path], cg.main),
                           ([tmp_path / path, "--out-dir", tmp_path / "f"], sample.main)):
            line = one_line_error(run_main(capsys, *args, main=main))
            assert expected in line and len(line) < 200 and "miniz" not in line, line


def test_failed_start_or_resume_writes_nothing(tmp_path, capsys):
    missing = ["--fid-images", "16", "--fid-weights", str(tmp_path / "missing.pth")]   # fails after the data
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "fresh", *missing)
    assert "not found" in one_line_error(r) and not (tmp_path / "fresh").exists()
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = {f: (run / f).read_bytes() for f in os.listdir(run) if os.path.isfile(run / f)}
    assert "not found" in one_line_error(run_main(capsys, "--resume", run, "--steps", "2", *missing))
    assert {f: (run / f).read_bytes() for f in os.listdir(run) if os.path.isfile(run / f)} == before


def test_an_immutable_metrics_file_is_named_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    def immutable(src, dst):                                   # what chattr +i gives os.replace (root too)
        raise PermissionError(errno.EPERM, "Operation not permitted", src, dst)
    monkeypatch.setattr(cg.os, "replace", immutable)
    line = one_line_error(run_main(capsys, *TINY, "--steps", "1", "--run-dir", run))
    assert line == f"error: Operation not permitted: {run}/metrics.jsonl; no checkpoint was written", line
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]


def test_crash_before_first_checkpoint_then_rerun_repeats_no_step(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*TINY, "--steps", "3", "--eval-every", "3", "--run-dir", str(run)]
    real_iteration = cg.Trainer.iteration

    def crash_at_step_2(self, batches, step):
        if step == 1:
            raise RuntimeError("simulated crash")
        return real_iteration(self, batches, step)

    with monkeypatch.context() as patch:
        patch.setattr(cg.Trainer, "iteration", crash_at_step_2)
        with pytest.raises(RuntimeError, match="simulated"):
            cg.main(args)
    assert (run / "metrics.jsonl").read_text() and not (run / "last.pt").exists()
    assert cg.main(args) == 0                                  # the same command again: no "already holds a run"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]                               # log lines 1-3 and the evaluation, once each


def test_a_file_system_without_flock_runs_with_a_note(tmp_path, capsys, monkeypatch):
    def no_flock(fd, operation):                               # as Lustre mounted -o noflock answers
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "run")
    assert r.returncode == 0 and "is not locked (this file system has no flock)" in r.stdout
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "run.lock").exists()


def test_one_run_owns_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "run.lock", "w") as held:                  # a live process holds it: its flock, its pid
        held.write(str(os.getpid()))
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", run)
    assert f"in use by another run (process {os.getpid()}" in one_line_error(r)
    assert not (run / "metrics.jsonl").exists()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (run / "run.lock").write_text(str(dead.pid))              # its process is gone (kill -9): taken over
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    assert (run / "last.pt").is_file() and not (run / "run.lock").exists()


def test_resume_at_or_past_steps_says_nothing_trained(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "2", "--run-dir", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    r = run_main(capsys, "--resume", run, "--steps", "2")
    assert r.returncode == 0 and "nothing trained" in r.stdout and "done" not in r.stdout
    assert (run / "last.pt").read_bytes() == before


def test_compile_says_it_is_compiling_and_passes_its_mode(tmp_path, monkeypatch, capsys):
    modes = []

    def fake_compile(module, mode=None):                       # the message and the mode, not minutes of compiling
        modes.append(mode)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    r = run_main(capsys, *TINY, "--compile", "--steps", "1", "--run-dir", tmp_path / "run")
    assert r.returncode == 0 and "compile G and D" in r.stdout and modes == ["default"] * 3   # G, D, D frozen
    r = run_main(capsys, *TINY, "--compile", "reduce-overhead", "--steps", "1", "--run-dir", tmp_path / "ro")
    assert r.returncode == 0 and modes[3:] == ["reduce-overhead"] * 3
    r = run_main(capsys, "--resume", tmp_path / "ro", "--steps", "2")   # a run flag, kept by a resume
    assert r.returncode == 0 and modes[6:] == ["reduce-overhead"] * 3


def test_compile_mode_parsing(capsys):
    assert [cg.build_parser().parse_args(argv).compile for argv in ([], ["--compile"], ["--compile", "max-autotune"],
            ["--compile", "--steps", "3"])] == [None, "default", "max-autotune", "default"]
    r = run_main(capsys, *TINY, "--compile", "fast")
    assert "argument --compile: invalid choice: 'fast'" in one_line_error(r)


def test_resume_sets_adam_fused_or_foreach_for_this_device(tmp_path):
    """A checkpoint keeps its device's Adam flags (a GPU run's fused=True); resumed on another device, the optimisers
    take this one's (CPU: foreach), as a fresh run there would. CPU -> CUDA: the next test."""
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    state = torch.load(run / "last.pt", weights_only=False)
    for opt in ("opt_G", "opt_D"):
        for group in state[opt]["param_groups"]:
            group.update(fused=True, foreach=False)            # as saved on a GPU
    cg.save_checkpoint(str(run / "last.pt"), state)
    cfg = cg.build_parser().parse_args(["--resume", str(run)])
    checkpoint, path = cg.load_checkpoint(str(run))
    cfg = cg.merge_resume_config(cfg, {"resume": str(run)}, checkpoint, path)
    resumed = cg.setup_run(cfg, checkpoint, path, torch.device("cpu"), 0, 1)
    for opt in (resumed.trainer.opt_G, resumed.trainer.opt_D):
        assert all(g["foreach"] is True and g["fused"] is False for g in opt.param_groups)


def test_resume_of_a_cpu_run_on_cuda_puts_adam_step_on_the_gpu():
    """The CPU -> CUDA order of the test above, with fake CUDA tensors (no GPU, nothing computed): a CPU run's Adam
    state (fused=False, `step` on the CPU) loaded by a CUDA trainer has `step` on the GPU, where fused Adam reads it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cpu = cg.Trainer(cg.build_parser().parse_args(["--g-width", "8", "--d-width", "8"]), 4, torch.device("cpu"))
    for opt in (cpu.opt_G, cpu.opt_D):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        opt.step()                                             # a state to load: step and moments
    with FakeTensorMode(allow_non_fake_inputs=True):
        gpu = types.SimpleNamespace(PARTS=("opt_G", "opt_D"), adam_flags=dict(fused=True, foreach=False))
        for name, model in (("opt_G", cpu.G), ("opt_D", cpu.D)):
            params = [torch.nn.Parameter(torch.empty_like(p, device="cuda")) for p in model.parameters()]
            setattr(gpu, name, torch.optim.Adam(params, **gpu.adam_flags))
        cg.load_trainer_state(gpu, cg.trainer_state(cpu))
        for opt in (gpu.opt_G, gpu.opt_D):
            assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
            for state in opt.state.values():
                assert state["step"].device.type == "cuda" and state["exp_avg"].device.type == "cuda"


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt                                # what Ctrl-C raises while the data loads

    monkeypatch.setattr(cg, "load_data", interrupted)
    try:
        status = cg.main([*TINY, "--steps", "1", "--run-dir", str(tmp_path / "run")])
    except KeyboardInterrupt:
        status = "KeyboardInterrupt traceback"
    assert status == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert not (tmp_path / "run").exists()


def test_torchrun_error_is_said_once(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    r = subprocess.run([*torchrun, *TINY, "--steps", "1", "--lr-g", "nan", "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode != 0 and r.stderr.count("error: --lr-g must be") == 1, r.stderr[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start_cli(*args, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, SCRIPT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)


@pytest.mark.parametrize("sig,launcher", [("SIGTERM", None), ("SIGHUP", None), ("SIGTERM", TORCHRUN)],
                         ids=["SIGTERM", "SIGHUP", "torchrun-SIGTERM"])
def test_sigterm_and_sighup_save_and_exit_like_ctrl_c(tmp_path, capsys, sig, launcher):
    # SIGTERM: how SLURM, Kubernetes and `timeout` stop a job (torchrun passes it on to every rank).
    # SIGHUP: the terminal closed, so the output is gone too (here: a closed pipe); the run still saves.
    run, signum = tmp_path / "run", getattr(signal, sig)
    proc = start_cli(*TINY, "--steps", "100000", "--eval-every", "100000", "--run-dir", run,
                     launcher=launcher or (sys.executable,))
    assert next(line for line in proc.stdout if line.startswith("step ")).startswith("step 1/")
    if sig == "SIGHUP":
        proc.stdout.close()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    if sig == "SIGTERM":
        out = proc.stdout.read()
        assert f"by SIGTERM: saved {run}/last.pt" in out and "(exit status 143)" in out
    assert launcher or proc.returncode == 128 + signum and err == "", err   # torchrun adds its own report
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] >= 1 and len(state["rng"]) == (2 if launcher else 1) and not (run / "run.lock").exists()
    assert run_main(capsys, "--resume", run, "--steps", state["step"] + 1).returncode == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_lost_under_torchrun_names_the_intact_checkpoint(tmp_path, capsys, monkeypatch):
    # Simulated (a real one: kill -9 of a rank under torchrun, tens of seconds on 2 cores): the error gloo raised
    # on rank 1 when rank 0 was killed, after a checkpoint. Said by every rank left: rank 0 may be the one gone.
    run = tmp_path / "run"
    def lost_rank(state):
        run.mkdir()
        (run / "last.pt").write_bytes(b"")                     # saved before the rank was lost
        raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:"
                           "10139: Connection reset by peer. This is typically caused by a remote worker hanging")
    monkeypatch.setattr(cg, "setup_run", lambda *args: None)
    monkeypatch.setattr(cg, "train", lost_rank)
    monkeypatch.setattr(cg, "setup_device", lambda cfg: (torch.device("cpu"), 1, 2))
    for name, value in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    line = one_line_error(run_main(capsys, *TINY, "--steps", "4", "--run-dir", run))
    assert line == f"error: rank 1: another rank stopped or lost its connection (Read error [127.0.0.1]:10139: " \
        f"Connection reset by peer); {run}/last.pt is intact: continue with --resume {run}", line


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    proc = start_cli(*TINY, "--steps", "1", "--run-dir", tmp_path / "run")
    time.sleep(1.0)                                            # inside `import torch` (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "interrupted", err


def test_an_earlier_checkpoint_branches_and_never_rolls_a_run_back(tmp_path, capsys):
    run, new = tmp_path / "run", tmp_path / "new"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    (run / "best.pt").write_bytes((run / "last.pt").read_bytes())   # best.pt at step 1, last.pt later
    assert cg.main(["--resume", str(run), "--steps", "2"]) == 0
    before = {f: (run / f).read_bytes() for f in ("last.pt", "best.pt", "metrics.jsonl")}
    line = one_line_error(run_main(capsys, "--resume", run / "best.pt", "--steps", "3"))
    assert "--run-dir NEW" in line and f"--resume {run}" in line
    assert {f: (run / f).read_bytes() for f in before} == before and not (run / "run.lock").exists()
    assert cg.main(["--resume", str(run / "best.pt"), "--run-dir", str(new), "--steps", "3"]) == 0
    assert torch.load(new / "last.pt", weights_only=False)["step"] == 3
    assert [json.loads(x)["step"] for x in (new / "metrics.jsonl").read_text().splitlines()] == [2, 3, 3]
    assert {f: (run / f).read_bytes() for f in before} == before


def test_resume_of_last_pt_in_its_folder_continues_there(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    monkeypatch.chdir(run)                                     # `--resume last.pt` from inside the run folder
    assert cg.main(["--resume", "last.pt", "--steps", "2"]) == 0
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2 and os.listdir(run).count("runs") == 0


def test_flipped_bytes_are_refused_by_resume_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    good = (run / "last.pt").read_bytes()
    data, middle = bytearray(good), len(good) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (run / "last.pt").write_bytes(data)
    for args, main in ((["--resume", run, "--steps", "2"], cg.main), ([run, "--out-dir", tmp_path / "f"], sample.main)):
        assert "is corrupt" in one_line_error(run_main(capsys, *args, main=main))
    assert (run / "last.pt").read_bytes() == data and not (tmp_path / "f").exists()
    legacy = tmp_path / "legacy.pt"                            # no sha256 seal at its end: read as it is
    legacy.write_bytes(good[:-len(cg.SEAL) - 64])
    assert cg.load_checkpoint(str(legacy))[0]["step"] == 1


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = (run / "last.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"\0" * 1000)                                  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    line = one_line_error(run_main(capsys, "--resume", run, "--steps", "2"))
    assert "No space left on device" in line and f"the previous {run}/last.pt is intact" in line
    assert (run / "last.pt").read_bytes() == before and sorted(os.listdir(run)) == [
        "config.json", "last.pt", "metrics.jsonl", "samples"]  # no last.pt.tmp, no run.lock
    real_open = open                                           # full before the checkpoint: metrics.jsonl

    def full_open(file, mode="r", *args, **kwargs):
        if "a" in mode and str(file).startswith(str(run)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    line = one_line_error(run_main(capsys, "--resume", run, "--steps", "2"))
    assert f"No space left on device: {run}/metrics.jsonl; {run}/last.pt is intact" in line
    assert (run / "last.pt").read_bytes() == before and not (run / "run.lock").exists()


def test_a_blow_up_names_what_is_true_and_the_way_on(tmp_path, capsys):
    # --lr-g 1e30: step 1's weights are ~1e30 but finite (saved), step 2 overflows: that checkpoint is
    # not "good", and resuming it cannot help unless the learning rate can change.
    huge = tmp_path / "huge"
    line = one_line_error(run_main(capsys, *TINY, "--lr-g", "1e30", "--steps", "3", "--eval-every", "1",
                                   "--run-dir", huge))
    assert "(step 1), the last checkpoint with finite weights, is intact" in line and "good" not in line
    assert "lower --lr-g / --lr-d" in line
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    r = run_main(capsys, "--resume", run, "--steps", "2", "--lr-g", "1e-5", "--lr-d", "3e-5")
    assert r.returncode == 0 and "--lr-g 0.0002 -> 1e-05, --lr-d 0.0002 -> 3e-05" in r.stdout
    state = torch.load(run / "last.pt", weights_only=False)    # the optimisers use them, not the loaded rate
    assert [g["lr"] for g in state["opt_G"]["param_groups"]] == [1e-5] * len(state["opt_G"]["param_groups"])
    assert {g["lr"] for g in state["opt_D"]["param_groups"]} == {3e-5} and state["config"]["lr_g"] == 1e-5


@pytest.mark.parametrize("args,expected", [
    (["--lr-g", "0"], "--lr-g must be > 0 and finite"),        # Adam with lr 0 trains nothing, silently
    (["--lr-d", "0"], "--lr-d must be > 0 and finite"),
    (["--adam-eps", "0"], "--adam-eps must be > 0 and finite"),  # 0/0 at step 1: "non-finite", no flag named
    (["--fid-images", "-1"], "--fid-images must be at least 0"),
    (["--fid-images", "1"], "--fid-images must be 0 (off) or at least 2"),     # one image has no covariance
    (["--collapse-gap", "nan"], "--collapse-gap must be >= 0 and finite"),  # NaN: never warns
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2**32)"),  # torch's own error is a traceback
])
def test_flags_refused_up_front(args, expected, tmp_path, capsys):
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "r", *args)
    assert expected in one_line_error(r) and not (tmp_path / "r").exists()


def test_checkpoints_of_other_versions_and_empty_resume_are_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    state = torch.load(run / "last.pt", weights_only=False)
    for name, change, expected in [
            ("newer", lambda c: c["config"].update(new_flag=1), "from a newer contragan.py: it has --new-flag"),
            ("older", lambda c: c.pop("data"), "not a checkpoint of this contragan.py version (no data)"),
            ("odd", lambda c: c.update(config="x"), "version (no config)")]:
        other = {**state, "config": dict(state["config"])}
        change(other)
        torch.save(other, tmp_path / f"{name}.pt")
        assert expected in one_line_error(run_main(capsys, "--resume", tmp_path / f"{name}.pt", "--steps", "2"))
    monkeypatch.chdir(tmp_path)                                # `--resume $UNSET`: never a fresh run
    assert "no checkpoint at ''" in one_line_error(run_main(capsys, *TINY, "--resume", "", "--steps", "1"))
    assert "--run-dir is empty (an unset" in one_line_error(run_main(capsys, *TINY, "--run-dir", "", "--steps", "1"))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- tools: sample.py and plot_runs.py

def test_generate_from_checkpoint(tmp_path):
    run, out = tmp_path / "run", tmp_path / "fakes"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    assert sample.main([str(run), "--num-images", "10", "--out-dir", str(out), "--batch-size", "4"]) == 0
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.endswith(".png")]) == 10 and (out / "grid" / "grid.png").is_file()
    assert Image.open(out / files[0]).size == (32, 32)


@pytest.mark.parametrize("args,expected", [
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=NO_GPU),
    ([], "no checkpoint at"),
])
def test_sample_bad_arguments(args, expected, tmp_path, capsys):
    r = run_main(capsys, tmp_path / "x", "--out-dir", tmp_path / "f", *args, main=sample.main)
    assert expected in one_line_error(r) and not (tmp_path / "f").exists()


def test_generate_refuses_a_folder_that_holds_files(tmp_path, capsys):
    out = tmp_path / "fakes"
    out.mkdir()
    (out / "old.png").write_bytes(b"stale")
    r = run_main(capsys, tmp_path, "--out-dir", out, main=sample.main)
    assert "is not empty" in one_line_error(r) and os.listdir(out) == ["old.png"]


PLOT = [sys.executable, os.path.join(HERE, "tools", "plot_runs.py")]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is an optional extra: pip install matplotlib")
    runs = []
    for loss in ("proj", "2c"):
        runs.append(str(tmp_path / loss))
        assert cg.main([*TINY, "--loss", loss, "--steps", "2", "--eval-every", "1", "--run-dir", runs[-1]]) == 0
    out = tmp_path / "figure3.png"
    r = subprocess.run([*PLOT, *runs, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_to_an_unwritable_folder_is_one_error_line(tmp_path):
    r = subprocess.run([*PLOT, "x", "--out", "/nonexistent/folder/f.png"], capture_output=True, text=True, timeout=300)
    assert "cannot write --out" in one_line_error(r)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(folder)]) == 0
    return folder


def test_sample_refuses_absurd_counts_bad_seeds_and_files_up_front(trained_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, expected in [(["--num-images", 10 ** 12], "GB for its PNGs, but"),
                           (["--seed", 2 ** 64], "--seed must be in [0, 2**32)"),
                           (["--out-dir", tmp_path / "file"], "is a file, not a folder")]:
        line = one_line(capsys, sample.main, [trained_run, "--out-dir", tmp_path / "fakes", *args])
        assert line.startswith("error: ") and expected in line, line
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_sample_failed_or_interrupted_run_keeps_nothing_and_reruns(trained_run, tmp_path, capsys, monkeypatch):
    real_generate, calls = cg.generate, []

    def generate_then_fail(error):
        def generate(*args):
            calls.append(args[1].tolist())
            if error and len(calls) == 2:
                raise error
            return real_generate(*args)
        return generate

    out = tmp_path / "deep" / "fakes"                          # two folders this run creates
    monkeypatch.setattr(cg, "generate", generate_then_fail(KeyboardInterrupt()))
    line = one_line(capsys, sample.main, [trained_run, "--out-dir", out, "--num-images", 12, "--batch-size", 4],
                    code=130)
    assert line.startswith("interrupted") and os.listdir(tmp_path) == []
    out.mkdir(parents=True)                                    # an empty folder given: it stays, empty
    calls.clear()
    monkeypatch.setattr(cg, "generate", generate_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    line = one_line(capsys, sample.main, [trained_run, "--out-dir", out, "--num-images", 12, "--batch-size", 4])
    assert "No space left on device" in line and os.listdir(out) == []
    calls.clear()
    monkeypatch.setattr(cg, "generate", generate_then_fail(None))
    assert sample.main([str(trained_run), "--out-dir", str(out), "--num-images", "12", "--batch-size", "4"]) == 0
    assert len(os.listdir(out)) == 13 and all(sorted(y) == [0, 1, 2, 3] for y in calls[:3])  # every batch mixed


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sample_stopped_by_sigterm_or_sighup_keeps_nothing(trained_run, tmp_path, capsys, monkeypatch, sig):
    # `timeout` and schedulers send SIGTERM; a closed terminal SIGHUP. Here a signal sent by the process itself.
    real_generate, calls, signum = cg.generate, [], getattr(signal, sig)
    def generate(*args):
        calls.append(1)
        if len(calls) == 2:                                    # after one batch of PNGs is written
            os.kill(os.getpid(), signum)
        return real_generate(*args)
    class Unhandled(Exception):
        pass
    def unhandled(*args):                                      # what the signal would do to a script without a handler
        raise Unhandled(sig)
    monkeypatch.setattr(cg, "generate", generate)
    before = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        line = one_line(capsys, sample.main, [trained_run, "--out-dir", tmp_path / "fakes", "--num-images", 12,
                                              "--batch-size", 4], code=128 + signum)
        assert signal.getsignal(signum) is unhandled          # its handler is put back
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert line == f"interrupted by {sig}: nothing kept in {tmp_path / 'fakes'}" and os.listdir(tmp_path) == []


def test_a_checkpoint_holding_nan_is_refused_by_resume_and_sample(trained_run, tmp_path, capsys):
    state = torch.load(trained_run / "last.pt", weights_only=False)
    state["G_ema"]["linear.bias"][0] = float("nan")           # an older checkpoint (no seal, saved unchecked)
    torch.save(state, tmp_path / "nan.pt")
    line = one_line_error(run_main(capsys, "--resume", tmp_path / "nan.pt", "--run-dir", tmp_path / "b", "--steps", 3))
    assert line == f"error: checkpoint {tmp_path / 'nan.pt'} itself holds NaN or inf (in G_ema): it cannot be " \
        "resumed or sampled; use an earlier checkpoint", line
    line = one_line(capsys, sample.main, [tmp_path / "nan.pt", "--out-dir", tmp_path / "fakes", "--num-images", 4])
    assert "itself holds NaN or inf" in line and sorted(os.listdir(tmp_path)) == ["nan.pt"]   # no black PNGs


def test_plot_out_is_checked_by_creating_it(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "file").write_text("")
    for out, expected in [(tmp_path / "file" / "f.png", "Not a directory"), (tmp_path / "a" / "b" / "f.png",
                          "No such file or directory"), (tmp_path, "Is a directory")]:
        line = one_line(capsys, plot_runs.main, ["missing-run", "--out", out])   # --out before the runs
        assert line == f"error: cannot write --out {out}: {expected}", line
    run, bad = tmp_path / "run", tmp_path / "bad"
    run.mkdir(), bad.mkdir()
    record = '{"step": 1, "eval": true, "d_acc_train": 0.5, "d_sigma_max": 1.0}\n'
    (run / "metrics.jsonl").write_text(record + '{"step": 2, "ev')   # torn by a kill mid-write: skipped
    (bad / "metrics.jsonl").write_text("hello\n")
    assert "cannot write .xyz" in one_line(capsys, plot_runs.main, [run, "--out", tmp_path / "f.xyz"])
    assert "not one JSON record per line" in one_line(capsys, plot_runs.main, [bad, "--out", tmp_path / "f.png"])
    assert plot_runs.main([str(run), "--out", str(tmp_path / "figure")]) == 0  # no extension: that very file
    assert (tmp_path / "figure").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["bad", "figure", "file", "run"]
