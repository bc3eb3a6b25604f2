"""Bad input to fid.py, tools/sample.py and tools/plot_runs.py: one `error:` line, checked before the work,
nothing half-made left behind. CPU only, no network: random Inception weights and a tiny trained run."""
import errno
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import contragan as cg
import fid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
import plot_runs  # noqa: E402
import sample  # noqa: E402


def write_images(folder, count, size=16, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return folder


def one_line(capsys, main, args, code=2):
    """main(args) as the command line runs it: the exit status and its single stderr line."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:
        status = exit.code
    except KeyboardInterrupt:                                  # escaped: a traceback (and pytest would stop)
        status = "KeyboardInterrupt"
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == code and len(lines) == 1, (args, status, lines)
    return lines[0]


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the check that fails")


# ---------------------------------------------------------------- fid.py


def test_fid_reference_stats_reports_progress_and_checks_its_cache_first(tmp_path, capsys, monkeypatch):
    class Flat(torch.nn.Module):                               # features: the first 2048 pixel values
        def forward(self, x):
            return x.flatten(1)[:, :fid.FEATURE_DIM].double(), torch.zeros(len(x), 1008)

    clock = iter(range(0, 10 ** 6, 4))                         # 4 s per reading: a line every few batches
    monkeypatch.setattr(fid, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.warns(UserWarning, match="singular"):
        fid.reference_stats(Flat(), images, tmp_path / "ref.npz", {"dataset": "toy"}, 40, 4, "cpu")
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) < 10 and lines[-1].startswith("FID reference ref.npz: 40/40 images | "), lines
    for line in lines:
        assert re.fullmatch(r"FID reference ref\.npz: \d+/40 images \| [\d.]+ img/s \| left \d+m\d\ds", line), line
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(fid, "features_from_dataset", no_work)
    with pytest.raises(fid.FIDError, match="cannot write .*Not a directory"):
        fid.reference_stats(Flat(), images, tmp_path / "file" / "ref.npz", {"dataset": "toy"}, 40, 4, "cpu")


def test_fid_cli_checks_output_inputs_and_flags_before_the_features(tmp_path, capsys, monkeypatch):
    ok, one = write_images(tmp_path / "ok", 3), write_images(tmp_path / "one", 1)
    (tmp_path / "file").write_text("")
    np.savez(tmp_path / "d4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "text.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    np.savez(tmp_path / "empty.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    np.savez(tmp_path / "proto.npz", mu=np.zeros(4), sigma=np.eye(4), protocol=np.array("{not json"))
    monkeypatch.setattr(fid, "features_from_dataset", no_work)  # every case fails before minutes of features
    random = ["--random-weights", "--num-workers", "0"]
    cases = [(["--save-stats", ok, tmp_path / "file" / "a.npz", *random], "cannot write"),
             (["--save-stats", ok, tmp_path / "no" / "such" / "a.npz", *random], "No such file or directory"),
             (["--save-stats", ok, tmp_path / "ok", *random], "does not end in .npz"),  # not "exists; delete it"
             ([ok, one, *random], "at least 2 images"),      # B's headers before A's features
             ([ok, tmp_path / "d4.npz", *random], "2048-d statistics but B has 4-d"),
             ([ok, ok, "--inception-score", *random], "at least 10 images"),
             ([tmp_path / "text.npz", tmp_path / "d4.npz"], "do not fit together"),
             ([tmp_path / "empty.npz", tmp_path / "empty.npz"], "do not fit together"),
             ([tmp_path / "proto.npz", tmp_path / "d4.npz"], "'protocol' is not a JSON object"),
             ([ok, ok, "--device", "banana"], "--device banana: not one of cpu, cuda"),
             ([ok, ok, "--weights", tmp_path], "is a folder"),
             ([ok, ok, "--weights", tmp_path / "w.pth", "--random-weights"], "exclude each other"),
             ([tmp_path / "d4.npz", tmp_path / "d4.npz", "--inception-score"], "needs an image folder")]
    for args, expected in cases:
        line = one_line(capsys, fid.main, args)
        assert line.startswith("error: ") and expected in line, (args, line)
    assert sorted(os.listdir(tmp_path)) == ["d4.npz", "empty.npz", "file", "ok", "one", "proto.npz", "text.npz"]


@pytest.mark.parametrize("workers", [0, 1])                   # 1: the error crosses a DataLoader worker
def test_fid_cli_names_a_truncated_image(tmp_path, capsys, workers):
    ok, cut = write_images(tmp_path / "ok", 3), write_images(tmp_path / "cut", 3)
    data = (cut / "001.png").read_bytes()
    (cut / "001.png").write_bytes(data[:len(data) // 2])       # the header reads; the pixels do not
    line = one_line(capsys, fid.main, [cut, ok, "--random-weights", "--num-workers", workers])
    assert line == f"error: {cut / '001.png'}: not a readable image (image file is truncated)", line


# ---------------------------------------------------------------- tools/sample.py and tools/plot_runs.py

TINY = ["--dataset", "shapes", "--shapes-size", "256", "--g-width", "8", "--d-width", "8", "--batch-size", "8",
        "--d-steps", "2", "--acc-images", "32", "--fid-images", "0", "--eval-batch", "16", "--num-workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(folder)]) == 0
    return folder


def test_sample_refuses_absurd_counts_bad_seeds_and_files_up_front(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, expected in [(["--num-images", 10 ** 12], "GB for its PNGs, but"),
                           (["--seed", 2 ** 64], "--seed must be in [0, 2^64)"),
                           (["--out-dir", tmp_path / "file"], "is a file, not a folder")]:
        line = one_line(capsys, sample.main, [run, "--out-dir", tmp_path / "fakes", *args])
        assert line.startswith("error: ") and expected in line, line
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_sample_failed_or_interrupted_run_keeps_nothing_and_reruns(run, tmp_path, capsys, monkeypatch):
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
    line = one_line(capsys, sample.main, [run, "--out-dir", out, "--num-images", 12, "--batch-size", 4], code=130)
    assert line.startswith("interrupted") and os.listdir(tmp_path) == []
    out.mkdir(parents=True)                                    # an empty folder given: it stays, empty
    calls.clear()
    monkeypatch.setattr(cg, "generate", generate_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    line = one_line(capsys, sample.main, [run, "--out-dir", out, "--num-images", 12, "--batch-size", 4])
    assert "No space left on device" in line and os.listdir(out) == []
    calls.clear()
    monkeypatch.setattr(cg, "generate", generate_then_fail(None))
    assert sample.main([str(run), "--out-dir", str(out), "--num-images", "12", "--batch-size", "4"]) == 0
    assert len(os.listdir(out)) == 13 and all(sorted(y) == [0, 1, 2, 3] for y in calls[:3])  # every batch mixed


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
