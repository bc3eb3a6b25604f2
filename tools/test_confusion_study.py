"""tools/confusion_study.py on bad input: a torn results line, a --page without its markers, --jobs 0. No runs."""
import json
import os

import pytest

import confusion_study as cs
from test_fid import one_line  # main(args) as the command line runs it: its status and one stderr line

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def default_study():
    yield
    cs.use("shapes")                                           # main() chose another study or records folder


def first_record():
    with open(os.path.join(HERE, "..", "docs", "confusion-study", "results.jsonl")) as f:
        return json.loads(f.readline())                        # 2c (paper), seed 0


def test_a_torn_results_line_is_left_out_and_cut_before_the_next_record(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    good = first_record()
    (results / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good)[:40])   # an append cut short
    assert cs.main(["--report", "--results", str(results), "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr()
    assert "| 2c (paper) | 1 of 3 |" in out.out and "last line" in out.err and "torn" in out.err
    # the next record starts on its own line: the torn tail is cut, every line parses
    monkeypatch.setattr(cs, "final_diagnostics", lambda path: {"step": 1500, **{k: v for k, v in good.items()
                                                                              if k not in ("setting", "seed")}})
    monkeypatch.setattr(cs, "judge_reading", lambda path: None)
    run = tmp_path / "runs" / "proj" / "s0"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step0001500.png").write_bytes(b"png")
    cs.record("proj", 0, str(run))
    lines = (results / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["setting"] for line in lines] == ["2c (paper)", "proj"]
    assert (results / "proj-s0.png").read_bytes() == b"png"


def test_a_page_missing_or_without_markers_is_one_line(tmp_path, capsys):
    line = one_line(capsys, cs.main, ["--report", "--page", tmp_path / "nope.md"])
    assert line.startswith("error: --page") and "no such file" in line
    (tmp_path / "R.md").write_text("# a readme\n<!-- study-table: x -->\n")
    line = one_line(capsys, cs.main, ["--report", "--page", tmp_path / "R.md"])
    assert "<!-- /study-table -->" in line
    line = one_line(capsys, cs.main, ["--report", "--study", "digits", "--page", tmp_path / "R.md"])
    assert "study-table-digits" in line        # the digits table has markers of its own


def test_jobs_0_and_missing_digits_are_one_line(tmp_path, capsys):
    line = one_line(capsys, cs.main, ["--jobs", "0", "--root", tmp_path / "runs"])
    assert "--jobs must be at least 1" in line and not (tmp_path / "runs").exists()
    line = one_line(capsys, cs.main, ["--study", "digits", "--data-dir", tmp_path / "none", "--root",
                                              tmp_path / "runs"])
    assert "tools/export_digits.py" in line and not (tmp_path / "runs").exists()


def test_the_table_and_grids_go_between_the_markers_with_paths_from_the_page(tmp_path, capsys):
    results, page = tmp_path / "results", tmp_path / "sub" / "P.md"
    results.mkdir()
    page.parent.mkdir()
    (results / "results.jsonl").write_text(json.dumps(first_record()) + "\n")
    page.write_text("intro\n<!-- study-table: here -->\nold table\n<!-- /study-table -->\nend\n")
    assert cs.main(["--report", "--results", str(results), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n<!-- study-table: here -->\n| setting |")
    assert text.endswith("<!-- /study-table -->\nend\n")
    assert "old table" not in text and "| 2c (paper) | 1 of 3 |" in text and "](../results/2c-paper-s0.png)" in text


def test_a_longer_setting_is_finished_only_at_its_own_steps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"eval": True, "step": 1500}) + "\n")
    flags = cs.STUDIES["digits"]["settings"]["proj, 4,500 steps"][0]
    assert cs.steps_of(flags) == 4500 and cs.steps_of(["--loss", "proj"]) == cs.STEPS
    assert cs.final_eval(str(run)) and not cs.final_eval(str(run), cs.steps_of(flags))   # 1,500 of 4,500: resume
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"eval": True, "step": 4500}) + "\n")
    assert cs.final_eval(str(run), 4500)["step"] == 4500


def test_a_record_keeps_d_gap_at_every_evaluation(tmp_path, monkeypatch):
    # --study cr: D's train - held-out gap at every evaluation of metrics.jsonl, and its maximum (lines without
    # an evaluation or without a gap are left out); a hand-written run with a known answer.
    monkeypatch.setattr(cs, "final_diagnostics", lambda path: {"step": 500, "d_acc_gap": 0.1})
    monkeypatch.setattr(cs, "judge_reading", lambda path: None)
    monkeypatch.setattr(cs, "RESULTS", str(tmp_path / "results"))
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step0000500.png").write_bytes(b"png")
    lines = [{"step": 250, "eval": True, "d_acc_gap": 0.3}, {"step": 300, "d_loss": 1.0},
             {"step": 400, "eval": True}, {"step": 500, "eval": True, "d_acc_gap": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cs.record("2c (paper)", 0, str(run))
    r = json.loads((tmp_path / "results" / "results.jsonl").read_text())
    assert r["gap_over_training"] == [[250, 0.3], [500, 0.1]] and r["d_acc_gap_max"] == 0.3
