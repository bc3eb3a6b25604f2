"""D2D-CE against a literal per-sample loop of the authors' code (merged into test_contragan.py later)."""
import pytest
import torch

import contragan as cg
from test_contragan import TINY, run_cli
from literal_losses import literal_d2dce  # tools/, on the path via test_contragan


CASES = [  # (batch m, number of classes, labels rule, temperature, margin)
    (2, 2, "distinct", 0.5, 0.98), (2, 1, "same", 0.5, 0.98), (6, 1, "same", 1.0, 0.98),
    (8, 8, "distinct", 0.25, 0.98), (9, 3, "random", 0.5, 0.98), (16, 4, "random", 0.75, 0.9),
    (33, 10, "random", 1.0, 0.5), (12, 5, "random", 0.25, 1.0)]


@pytest.mark.parametrize("m,K,rule,t,m_p", CASES)
def test_d2dce_equals_the_authors_code_as_a_loop(m, K, rule, t, m_p):
    gen = torch.Generator().manual_seed(m * 100 + K)
    labels = {"random": torch.randint(0, K, (m,), generator=gen), "same": torch.zeros(m, dtype=torch.long),
              "distinct": torch.randperm(m, generator=gen)}[rule]
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
