"""Tests of tools/judge.py, its judge files and contragan.py --judge on cases whose answer is known: the colour reader
of the built-in shapes, "generators" that return real images of a known class. CPU, seconds."""
import glob
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import contragan as cg
import judge as J

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "shapes", "--shapes-size", "256", "--g-width", "8", "--d-width", "8", "--batch-size", "8",
        "--d-steps", "2", "--acc-images", "32", "--fid-images", "0", "--eval-batch", "16", "--num-workers", "0",
        "--ema-start", "1", "--ema-decay", "0.9", "--log-every", "1", "--flip"]   # flips: as the judge's data_config
TRAIN = ["--width", "8", "--steps", "150", "--device", "cpu"]   # the judge: a second on a CPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run on shapes (its checkpoint) and its data set's judges of seeds 0 and 1, trained once for these
    tests (judge: the first's file)."""
    root = tmp_path_factory.mktemp("judge")
    assert cg.main([*TINY, "--steps", "1", "--eval-every", "100", "--run-dir", str(root / "run")]) == 0
    cfg = J.data_config("shapes", shapes_size=256)
    judges = [J.get_judge(cfg, cache_dir=str(root / "cache"), width=8, steps=150, device="cpu", seed=seed)
              for seed in (0, 1)]
    return {"root": root, "run": str(root / "run"), "cache": str(root / "cache"), "judge": judges[0][2],
            "judges": [path for _, _, path in judges], "cfg": cfg, "info": judges[0][1]}


def reals_of(classes, seed=7):
    """A real shapes image of each asked class (uint8), drawn from a fresh set: a "generator" with known output."""
    images, labels = cg.make_shapes(4 * len(classes) + 400, 32, seed)
    pools = [images[labels == k] for k in range(4)]
    return torch.stack([pools[k][i % len(pools[k])] for i, k in enumerate(classes.tolist())])


def judge_json(capsys, *args):
    assert J.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_heldout_accuracy_is_its_own(tiny):
    # Recomputed here from the saved file and contragan's held-out split, in batches of another size.
    judge, info = cg.load_judge(tiny["judge"])
    _, held, _ = cg.load_data(tiny["cfg"])
    with torch.no_grad():
        logits = torch.cat([judge(cg.to_signed(x)) for x in held.images.split(100)])
    assert info["heldout_images"] == len(held) == 1024
    assert info["heldout_accuracy"] == pytest.approx((logits.argmax(1) == held.labels).float().mean().item(), abs=1e-6)
    assert info["heldout_accuracy"] >= 0.98


def test_the_judge_file_is_self_contained(tiny):
    # torch alone reads it, with no network class: the program and its weights, in eval mode, any batch size.
    with open(tiny["judge"], "rb") as f:
        program = torch.export.load(f).module()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    judge, info = cg.load_judge(tiny["judge"])
    assert program(x).shape == (5, 4) and torch.equal(program(x), judge(x)) and judge(x[:1]).shape == (1, 4)
    assert info["data"]["classes"] == ["circle", "square", "triangle", "cross"] and info["num_classes"] == 4


def study_fakes():
    """G_ema's fakes of the shapes study (docs/confusion-study/*.png: 10 per class a row, 1-pixel padding), uint8."""
    from PIL import Image
    cells = []
    for path in sorted(glob.glob(os.path.join(HERE, "..", "docs", "confusion-study", "*.png"))):
        grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        cells += [grid[:, 1 + 33 * r:33 * (r + 1), 1 + 33 * c:33 * (c + 1)] for r in range(4) for c in range(10)]
    return torch.stack(cells)


def test_agrees_with_the_colour_reader_on_reals_and_on_fakes_it_names(tiny):
    judge, info = cg.load_judge(tiny["judge"])
    images, _ = cg.make_shapes(400, 32, seed=9)
    x = cg.to_signed(images)
    assert (J.classify(judge, x)[0] == cg.shapes_class_of(x)).float().mean() >= 0.98
    fakes = cg.to_signed(study_fakes())                        # trained generators' fakes
    named = cg.shapes_class_of(fakes)
    classes, confidence = J.classify(judge, fakes)
    assert len(fakes) >= 400 and (named >= 0).sum() >= 300
    assert (classes[named >= 0] == named[named >= 0]).float().mean() >= 0.98
    # the fakes the colour reader calls none get a class too, but mostly with low confidence
    low = confidence < info["heldout_confidence_q05"]
    assert low[named < 0].float().mean() >= 0.5 and low[named >= 0].float().mean() <= 0.1


def test_a_generator_of_the_next_class_reads_raw_0_relabelled_1(tiny, capsys, monkeypatch):
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, gen=None: cg.to_signed(reals_of((y + 1) % 4)))
    r = judge_json(capsys, tiny["run"], "--cache-dir", tiny["cache"], "--num-images", "400", "--judges", "2")
    assert r["num_images"] == 400 and len(r["judges"]) == 2
    for j in r["judges"]:                                      # every judge, each within its own ceiling
        acc = j["judge_heldout_accuracy"]
        assert torch.tensor(j["matrix"]).sum(1).tolist() == [100] * 4   # balanced
        assert j["consistency"] <= 1 - acc + 0.02 and j["relabelled"] >= acc - 0.02
        assert [row.index(max(row)) for row in j["matrix"]] == [1, 2, 3, 0]


def test_a_generator_that_ignores_the_label_reads_chance(tiny, capsys, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, g=None:
                        cg.to_signed(reals_of(torch.randint(0, 4, y.shape, generator=gen))))
    r = judge_json(capsys, tiny["run"], "--cache-dir", tiny["cache"], "--num-images", "1000", "--judges", "2")
    assert r["chance"] == 0.25 and abs(r["consistency_mean"] - 0.25) < 0.05 and r["relabelled_max"] < 0.33


def blends(y, w=0.5):
    """Ambiguous "fakes": half the asked class's real image, half the next class's (the same every call)."""
    return w * cg.to_signed(reals_of(y)) + (1 - w) * cg.to_signed(reals_of((y + 1) % 4, seed=8))


def test_several_judges_give_each_reading_their_mean_and_range(tiny, capsys, monkeypatch):
    # Two cached judges (seeds 0 and 1, the seed in each file's name) read the same ambiguous fakes; each one's
    # reading is what its file reads alone, the top-level keys are the first judge's, the spread is theirs.
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, gen=None: blends(y))
    monkeypatch.setattr(J, "train_judge", lambda *a, **k: pytest.fail("a cached judge was trained again"))
    r = judge_json(capsys, tiny["run"], "--cache-dir", tiny["cache"], "--judges", "2")
    judges = r["judges"]
    assert [j["seed"] for j in judges] == [0, 1] and [j["judge"] for j in judges] == tiny["judges"]
    assert [os.path.basename(p).split("-")[-1] for p in tiny["judges"]] == ["seed0.pt2", "seed1.pt2"]
    assert [cg.load_judge(p)[1]["training"]["seed"] for p in tiny["judges"]] == [0, 1]
    for j in judges:                                           # as the judge's file reads the fakes alone
        alone = judge_json(capsys, tiny["run"], "--judge-file", j["judge"])
        assert alone["judges"] == [j] and {k: alone[k] for k in j} == j
    assert {k: r[k] for k in judges[0]} == judges[0]           # the first judge's reading, as before
    for key in ("consistency", "relabelled"):
        values = [j[key] for j in judges]
        assert r[key + "_mean"] == pytest.approx(sum(values) / 2, abs=1e-12)
        assert (r[key + "_min"], r[key + "_max"]) == (min(values), max(values))
        assert r[key + "_min"] <= r[key + "_mean"] <= r[key + "_max"]
    assert J.main([tiny["run"], "--cache-dir", tiny["cache"], "--judges", "2"]) == 0   # the text says the same
    out = capsys.readouterr().out
    assert f"class consistency {r['consistency_mean']:.3f}: mean of 2 judges, range {r['consistency_min']:.3f}.." \
           f"{r['consistency_max']:.3f} ({judges[0]['consistency']:.3f}, {judges[1]['consistency']:.3f})" in out
    assert f"relabelled {r['relabelled_mean']:.3f}: mean of 2 judges, range {r['relabelled_min']:.3f}.." in out


def test_the_number_of_judges_is_checked_in_one_line(tiny, capsys):
    for args, says in [(["--judges", "0"], "--judges must be at least 1"),
                       (["--judges", "2", "--judge-file", tiny["judge"]], "give one file per judge"),
                       (["--judge-file", tiny["judge"], "--judge-file", tiny["judge"]], "the same --judge-file twice")]:
        assert J.main([tiny["run"], "--cache-dir", tiny["cache"], *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err


def test_a_folder_of_pngs_and_the_text_report(tiny, capsys):
    # Real images saved as tools/sample.py names them: the judge reads them as it reads the held-out reals.
    from PIL import Image
    folder = tiny["root"] / "pngs"
    folder.mkdir()
    y = torch.arange(80) % 4
    for i, (image, label) in enumerate(zip(reals_of(y, seed=11), y.tolist())):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}_class{label}.png")
    one = ["--dataset", "shapes", "--shapes-size", "256", "--cache-dir", tiny["cache"], "--judges", "1"]
    r = judge_json(capsys, str(folder), *one)
    assert r["num_images"] == 80 and r["consistency"] >= 0.95 and r["judge"] == tiny["judge"]   # the cached judge
    assert J.main([str(folder), *one]) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "held-out real images (their ceiling)" in out and "    circle" in out
    assert f"relabelled {r['relabelled']:.3f}: one judge's reading;" in out   # one judge says it is one
    assert J.main([str(folder), "--cache-dir", tiny["cache"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--dataset" in err


def test_a_blank_lands_in_some_class_with_low_confidence(tiny):
    # A classifier has no "none": blank images are given one of the K classes (the colour reader says -1);
    # here the judge is less sure of them than of 95% of the held-out reals, and of real images it is not.
    judge, info = cg.load_judge(tiny["judge"])
    blank = torch.full((40, 3, 32, 32), -0.75)
    assert (cg.shapes_class_of(blank) == -1).all()
    r = J.score(judge, info, torch.arange(40) % 4, blank)
    assert sum(map(sum, r["matrix"])) == 40 and r["low_confidence"] == 1.0   # every blank judged, none sure
    reals = reals_of(torch.arange(400) % 4, seed=12)
    assert J.score(judge, info, torch.arange(400) % 4, reals)["low_confidence"] <= 0.1


def test_it_reads_the_cue_it_learned(tiny):
    # On shapes colour alone separates the classes: a red square is "circle" to the judge, none to the reader.
    judge, _ = cg.load_judge(tiny["judge"])
    images, labels = cg.make_shapes(400, 32, seed=5)
    squares = images[labels == 1].float()
    red = torch.where(squares.amax(1, keepdim=True) > 120, torch.tensor([230.0, 70, 60])[:, None, None], squares)
    x = red / 127.5 - 1
    assert (cg.shapes_class_of(x) == -1).all() and (J.classify(judge, x)[0] == 0).float().mean() >= 0.95


def test_contragan_logs_the_judges_reading(tiny, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(HERE, "..", "contragan.py"), *TINY, "--steps", "2",
                        "--eval-every", "2", "--judge", tiny["judge"], "--run-dir", str(run)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' in line][-1]
    assert rec["judge_heldout_accuracy"] == tiny["info"]["heldout_accuracy"] and 0 < rec["judge_confidence"] <= 1
    assert torch.tensor(rec["confusion_judge"]).shape == (4, 5) and torch.tensor(rec["confusion_judge"]).sum() == 32
    assert 0 <= rec["class_consistency_judge"] <= rec["class_consistency_judge_relabelled"] <= 1
    assert f"class consistency (judge, {rec['judge_heldout_accuracy']:.3f} on held-out reals) " \
           f"{rec['class_consistency_judge']:.3f}" in r.stdout


def test_contragan_refuses_a_bad_or_foreign_judge_in_one_line(tiny, tmp_path, capsys):
    assert cg.main([*TINY, "--steps", "1", "--judge", str(tmp_path / "none.pt"), "--run-dir",
                    str(tmp_path / "a")]) == 2                 # at start-up: before the first step, nothing kept
    err = capsys.readouterr().err
    assert err == f"error: no judge file at {str(tmp_path / 'none.pt')!r} (tools/judge.py trains and saves one)\n"
    assert not (tmp_path / "a").exists()
    with zipfile.ZipFile(tiny["judge"]) as old, zipfile.ZipFile(tmp_path / "foreign.pt", "w") as new:
        for name in old.namelist():                            # a judge of another data set: its info rewritten
            data = old.read(name)
            if name.endswith("contragan-judge.json"):
                info = json.loads(data)
                data = json.dumps({**info, "data": {**info["data"], "dataset": "cifar10"}})
            new.writestr(name, data)
    assert cg.main([*TINY, "--steps", "1", "--judge", str(tmp_path / "foreign.pt"), "--run-dir",
                    str(tmp_path / "b")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "reads other data" in err and "cifar10" in err
    assert "step 1/1" not in out and not (tmp_path / "b").exists()  # refused before the first step, nothing kept


def test_an_old_judge_file_is_refused_in_one_line(tiny, tmp_path, capsys):
    # Earlier versions wrote a pickled state dict, which needed the network's class to load: re-run tools/judge.py.
    torch.save({"format": "contragan-judge-1", **tiny["info"], "state_dict": J.Judge(4, 8).state_dict()},
               tmp_path / "old.pt")
    assert cg.main([*TINY, "--steps", "1", "--judge", str(tmp_path / "old.pt"), "--run-dir",
                    str(tmp_path / "a")]) == 2                 # at start-up: before the first step, nothing kept
    err = capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert err == f"error: {tmp_path / 'old.pt'} is not a judge file of this version: re-run tools/judge.py to " \
                  f"write one\n"


def test_a_cached_judge_of_other_data_is_refused(tiny, capsys):
    assert J.main([tiny["run"], "--judge-file", tiny["judge"], "--data-dir", "elsewhere", *TRAIN]) == 0  # shapes
    capsys.readouterr()
    cfg = J.data_config("shapes", shapes_size=300)
    with pytest.raises(cg.UsageError, match="was trained on other data"):
        J.get_judge(cfg, tiny["judge"])
    assert J.cache_path(J.load_split(cfg)[2], "c") != J.cache_path(J.load_split(tiny["cfg"])[2], "c")


def test_an_unwritable_cache_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the cache folder would be")   # read-only for root too
    monkeypatch.setattr(J, "train_judge", lambda *a, **k: pytest.fail("trained before the output was tried"))
    assert J.main([tiny["run"], "--cache-dir", str(tmp_path / "blocker" / "cache"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write the judge to ") and "not writable" in err[0]
