"""Smoke test of tools/bench.py: its reference 2C formulations agree with contragan's, and a tiny run
writes the report. Timings are not checked: they are measured, not asserted."""
import torch

import bench
import contragan as cg


def test_reference_formulations_and_tiny_report(tmp_path):
    embed, proxy, labels = bench.two_c_inputs(12, 16, torch.device("cpu"), num_classes=3)
    ours = cg.conditional_contrastive_loss(embed, proxy, labels, 0.5)
    torch.testing.assert_close(bench.authors_2c(embed, proxy, labels, 0.5, num_classes=3), ours)
    torch.testing.assert_close(bench.authors_2c_matmul(embed, proxy, labels, 0.5), ours)
    torch.testing.assert_close(bench.literal_2c(embed, proxy, labels, 0.5), ours)

    out = tmp_path / "perf.md"
    bench.main(["--quick", "--threads", "1", "--sections", "2c,train,eval", "--width", "4", "--small-width", "4",
                "--out", str(out)])
    report = out.read_text()
    for heading in ("# ContraGAN benchmarks", "## 2C loss", "## One training iteration", "## Evaluation during",
                    "## Goals"):
        assert heading in report
    assert "| 64 |" in report and "width 4, bf16" in report and "+ evaluations" in report
