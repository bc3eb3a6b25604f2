"""Smoke test of tools/bench.py: its reference 2C formulations agree with contragan's, and a tiny run
writes the report. Timings are not checked: they are measured, not asserted."""
import pytest
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
    bench.main(["--quick", "--threads", "1", "--sections", "2c,train,host,eval", "--width", "4",
                "--small-width", "4", "--out", str(out)])
    report = out.read_text()
    for heading in ("# ContraGAN benchmarks", "## 2C loss", "## One training iteration", "## Host",
                    "## Evaluation during", "## Goals"):
        assert heading in report
    assert "| 64 |" in report and "width 4, bf16" in report and "+ evaluations" in report
    assert "ops dispatched per iteration" in report and "-bound here" in report


def test_profile_shares_count_each_kernel_once():
    """Synthetic profiler rows of a CUDA step: each op row holds its kernels' device time, and the kernels have rows
    of their own (named as cuDNN names them, without "conv"). Known answer: convolutions 60%, add 30%, mul 10%."""
    from types import SimpleNamespace as Row
    from torch.autograd import DeviceType
    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    rows = [Row(key="aten::cudnn_convolution", device_type=cpu, self_device_time_total=60.0),
            Row(key="aten::add", device_type=cpu, self_device_time_total=30.0),
            Row(key="aten::mul", device_type=cpu, self_device_time_total=10.0),
            Row(key="sm90_xmma_fprop_implicit_gemm_bf16", device_type=cuda, self_device_time_total=60.0),
            Row(key="vectorized_elementwise_kernel<add>", device_type=cuda, self_device_time_total=30.0),
            Row(key="vectorized_elementwise_kernel<mul>", device_type=cuda, self_device_time_total=10.0),
            Row(key="ProfilerStep#1", device_type=cpu, self_device_time_total=0.0, is_user_annotation=True)]
    conv, others = bench.profile_shares(rows, torch.device("cuda"))
    assert conv == pytest.approx(0.6) and [(round(s, 6), k) for s, k in others[:2]] == [(0.3, "aten::add"),
                                                                                         (0.1, "aten::mul")]
    cpu_rows = [Row(key="aten::add", device_type=cpu, self_cpu_time_total=5.0)]   # none of these: no convolution
    assert bench.profile_shares(cpu_rows, torch.device("cpu")) == (0.0, [(1.0, "aten::add")])


def test_op_counter_counts_dispatched_ops_not_views():
    a, b = torch.ones(3), torch.ones(3)
    with bench.OpCounter() as counter:
        (a + b).view(-1).t()[0:2].mul_(2)                      # add, mul_; view, t, slice launch nothing
    assert counter.ops == 2
    with bench.OpCounter() as counter:
        a.view(3, 1).expand(3, 4)                              # none of these
    assert counter.ops == 0


def test_unwritable_out_is_one_line_before_any_measuring(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit:
        bench.main(["--quick", "--sections", "2c", "--out", str(tmp_path / "file" / "perf.md")])
    assert str(exit.value).startswith("error: cannot write --out") and "Matrix-multiply" not in capsys.readouterr().out


def test_bogus_section_is_one_line_status_2(capsys):
    with pytest.raises(SystemExit) as exit:                    # an explicit check: python -O keeps it
        bench.main(["--quick", "--sections", "2c,bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: --sections 2c,bogus: choose from")


def test_a_run_cut_short_keeps_the_rows_measured_and_the_old_report_until_then(tmp_path, monkeypatch):
    out = tmp_path / "perf.md"
    out.write_text("# the previous report\n")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt                                # as a time limit's signal would
    measure = bench.train_config
    monkeypatch.setattr(bench, "matmul_rate", cut)             # cut before anything is measured: the old report
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--threads", "1", "--sections", "train", "--out", str(out)])
    assert out.read_text() == "# the previous report\n"
    monkeypatch.setattr(bench, "matmul_rate", lambda *args: 1e9)
    monkeypatch.setattr(bench, "train_config", lambda device, batch, width, **kw: cut() if "amp" in kw else measure(
        device, batch, width, **kw))                           # cut in the second configuration (bf16)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--threads", "1", "--sections", "train", "--width", "4", "--small-width", "4",
                    "--batch-size", "8", "--out", str(out), "--append"])
    report = out.read_text()
    assert report.startswith("# the previous report\n# ContraGAN benchmarks") and "## One training iteration" in report
    assert "| width 4 (default), fp32 | " in report and "width 4, bf16" not in report


def test_train_options_bad_one_is_one_line_and_reduce_overhead_reaches_torch_compile(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--quick", "--sections", "train", "--train-options", "bf16,fast"])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: --train-options bf16,fast: choose")
    modes = []

    def fake_compile(module, mode=None):
        modes.append(mode)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    name, options = bench.TRAIN_OPTIONS["bf16-reduce-overhead"]
    trainer, _ = bench.build_trainer(torch.device("cpu"), 8, 4, **options)
    assert modes == ["reduce-overhead"] * 3 and trainer.cfg.amp == "bf16"
