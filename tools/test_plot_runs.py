"""Tests of tools/plot_runs.py on hand-written metrics.jsonl files whose answers are known: the mean +- std over
seeds (--seeds) and the three lines of the paper's Figure 3 (`figure3_marks`). No training: seconds.
(The figure itself, from real tiny runs, is tested in test_contragan.py.)"""
import json

import pytest

import plot_runs
from test_fid import one_line  # main(args) as the command line runs it: its status and one stderr line


def evaluation(step, **values):
    """One evaluation record as contragan.py writes it (the keys plot_runs requires, plus `values`)."""
    return {"step": step, "eval": True, "d_acc_train": 0.9, "d_sigma_max": 1.0, **values}


def write_run(folder, records, config=None, torn=False):
    """A run folder: metrics.jsonl with training lines between the evaluations (as contragan.py logs them)."""
    folder.mkdir(parents=True)
    lines = []
    for r in records:
        lines += [json.dumps({"step": r["step"], "d_loss": 1.0, "g_loss": 2.0}), json.dumps(r)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 99, "ev' if torn else ""))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def three_seeds(tmp_path):
    """Best FIDs 10, 9, 11 (mean 10, sample std 1; the population std would be sqrt(2/3) = 0.816); D's class
    consistency at the last evaluation 0.5, 0.6, 0.7 (mean 0.6, sample std 0.1); earlier values differ."""
    config = {"loss": "2c", "steps": 80000, "seed": 0, "run_dir": "a"}
    runs = [
        write_run(tmp_path / "s0", [evaluation(2000, fid=12.0, class_consistency_d=0.9),
                                    evaluation(4000, fid=10.0, class_consistency_d=0.1),
                                    evaluation(6000, fid=11.0, class_consistency_d=0.5, class_consistency=0.4)],
                  {**config, "seed": 0, "run_dir": "s0"}),
        write_run(tmp_path / "s1", [evaluation(2000, fid=9.0, class_consistency_d=0.2),
                                    evaluation(4000, fid=None, class_consistency_d=0.6)],   # an evaluation without FID
                  {**config, "seed": 1, "run_dir": "s1"}, torn=True),                     # killed mid-write
        write_run(tmp_path / "s2", [evaluation(2000, fid=13.0, class_consistency_d=0.3),
                                    evaluation(4000, fid=11.0, class_consistency_d=0.7)],
                  {**config, "seed": 2, "run_dir": "s2"}),
    ]
    return runs


def test_seeds_mean_and_sample_std_of_best_fid_and_last_consistency(three_seeds, capsys):
    summary = plot_runs.seed_summary(three_seeds)
    assert summary == {"best FID": [10.0, 9.0, 11.0], "class consistency (D), last evaluation": [0.5, 0.6, 0.7]}
    assert plot_runs.main(["--seeds", *three_seeds]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "best FID: 10.000 +- 1.000 (mean +- sample std over 3 runs: 10.000, 9.000, 11.000)",
        "class consistency (D), last evaluation: 0.600 +- 0.100 (mean +- sample std over 3 runs: 0.500, 0.600, 0.700)"]
    assert err == ""                                           # one setting: seeds and folders apart, nothing else


def test_seeds_refuses_one_run_or_a_run_without_fid_and_notes_other_settings(three_seeds, tmp_path, capsys):
    assert one_line(capsys, plot_runs.main, ["--seeds", three_seeds[0]]) == \
        "error: --seeds needs at least 2 runs of one setting"
    no_fid = write_run(tmp_path / "nofid", [evaluation(2000, fid=None)])
    assert "nofid has no FID in its metrics.jsonl" in one_line(capsys, plot_runs.main, ["--seeds", *three_seeds,
                                                                                        no_fid])
    other = write_run(tmp_path / "other", [evaluation(2000, fid=20.0)], {"loss": "proj", "steps": 80000})
    assert plot_runs.main(["--seeds", *three_seeds, other]) == 0
    out, err = capsys.readouterr()
    assert err == "note: these runs differ in loss (config.json): not one setting\n"
    assert out.startswith("best FID: 12.500 +- ")               # (10 + 9 + 11 + 20) / 4; no consistency in all four


def test_figure3_marks_gap_best_fid_and_collapse():
    """Known answer. Gap: 0.5 does not exceed 0.5, 0.51 at step 4 does. FID: 15 -> 18 -> 19 -> 20 rises 3 times
    before the best (not a collapse); best 12 at step 7 (step 8 ties it: the earliest counts); then 12 -> 13 -> 14
    -> 15 rises 3 times in a row: collapse at step 11 (the window 12, 12, 13, 14 ending at step 10 does not)."""
    gaps = [0.1, 0.3, 0.5, 0.51, 0.7, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    fids = [30, 20, 15, 18, 19, 20, 12, 12, 13, 14, 15, 16]
    evals = [evaluation(step, d_acc_gap=g, fid=f) for step, (g, f) in enumerate(zip(gaps, fids), start=1)]
    evals.insert(5, evaluation(5, d_acc_gap=0.9, fid=None))   # an evaluation without FID: skipped by the FID lines
    assert plot_runs.figure3_marks(evals) == {"gap": 4, "best_fid": 7, "fid": 12, "collapse": 11}
    assert plot_runs.figure3_marks(evals[:-2])["collapse"] is None   # 12, 13, 14: only 2 rises yet
    no_fid_no_heldout = [evaluation(s) for s in (1, 2, 3)]     # --fid-images 0, and no held-out split
    assert plot_runs.figure3_marks(no_fid_no_heldout) == {"gap": None, "best_fid": None, "fid": None,
                                                          "collapse": None}


def test_plot_prints_and_draws_the_marks(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plotting is an optional extra: pip install matplotlib")
    fids = [30, 20, 12, 13, 14, 15]
    run = write_run(tmp_path / "tiny-proj-s0", [evaluation(1000 * s, d_acc_gap=0.1 * s, fid=f)
                                                for s, f in enumerate(fids, start=1)])
    assert plot_runs.main([run, "--out", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "tiny-proj-s0: D's train - held-out accuracy gap first > 0.5: step 6000 (solid) | best FID 12.000: step " \
           "3000 (dashed) | collapse (FID up 3 evaluations in a row after its best): step 6000 (dotted)" in out
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_colour_readers_key_of_older_runs_is_read_as_todays(tmp_path):
    # contragan.py writes class_consistency_colour[_relabelled]; older runs wrote it without "_colour"
    old = write_run(tmp_path / "old", [evaluation(2000, fid=9.0, class_consistency=0.4,
                                                  class_consistency_relabelled=0.5)])
    new = write_run(tmp_path / "new", [evaluation(2000, fid=8.0, class_consistency_colour=0.6)])
    assert plot_runs.read_evals(old)[-1]["class_consistency_colour_relabelled"] == 0.5
    assert plot_runs.seed_summary([old, new])["class consistency (colour), last evaluation"] == [0.4, 0.6]
