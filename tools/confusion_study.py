"""Class-confusion study at the CPU demo's budget: on the built-in shapes data, and on real digits (--study digits).

Does G draw the class it is asked for? Every setting below is trained with `--preset cpu-demo` (1,500 G
steps, width 16, batch 32) for a few seeds; the final G_ema's fakes (acc_images // 4 per class) are
judged two ways: by the colour reader (`shapes_class_of`: the palette colour of the most pixels, if
their form is that class's; else "none") and by D's own class judgement. The table gives, mean +- std
over seeds, the share judged as asked (raw), the share after the best one-to-one relabelling of the
classes (high relabelled but low raw: consistent classes under the wrong labels), both counting
"none" as a miss, and the share the colour reader calls none (G drew no class: blank, off-palette
colour, or a palette colour in another class's form); --matrices prints each run's K x (K + 1) colour
matrix (rows: asked; columns: judged, then none) for reading with its sample grid.

    python tools/confusion_study.py              # runs what is missing (2 at a time, 1 thread each)
    python tools/confusion_study.py --report     # only the table, from the runs recorded
    python tools/confusion_study.py --report --page docs/confusion-study.md   # and into the study's page
    python tools/confusion_study.py --report --matrices           # and every recorded run's matrix
    python tools/export_digits.py data/digits && python tools/confusion_study.py --study digits

--study cr: consistency regularization (--cr-lambda 10, the authors' value) on the paper's 2C against 2C alone,
two seeds each on shapes; besides the colour reader's numbers it keeps D's train - held-out accuracy gap at every
evaluation (Section 4.5's overfitting signal), in docs/confusion-study/cr/ and docs/cr-study.md.

--study digits: the same question on real images, scikit-learn's 8x8 digits at 32x32 as an image folder
(tools/export_digits.py), with --num-workers 0: six settings at two seeds, then at 3x the budget (4,500 G
steps, one seed) the best contrastive setting and proj, and two settings searched on this data (one seed).
There is no colour reader: the fakes (1,000 of the final G_ema, as tools/sample.py draws them) are read by the
data set's judge (tools/judge.py: a CNN trained on the training images; its accuracy on the held-out images is
given beside its numbers), which also reads 256 fakes at every evaluation (`--judge`, in metrics.jsonl). That
is one judge's reading (seed 0); another judge can read fakes 5-13 points apart, so quote it as one judge's,
or read the checkpoints with `tools/judge.py CHECKPOINT --judges 3` for the spread (docs/judge.md). Its
results and grids: docs/confusion-study/digits/.

The numbers are computed here from a finished run's last.pt (runs/study[-digits]/<setting>/s<seed>) by
contragan.d_diagnostics, the function training evaluates with, appended to
docs/confusion-study[/digits]/results.jsonl (a torn last line, from an interrupted append, is left out and
cut), and its last sample grid is copied beside it: both are committed,
so a later checkout (runs/ empty) skips the runs already recorded. Every call first records the runs
that have finished; an interrupted run (its last.pt still there) is resumed. Two single-thread runs at
once, not one 2-thread run: on 2 cores two 2-thread runs slow each other 10x.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]
import contragan as cg  # noqa: E402
import judge as J  # noqa: E402  tools/judge.py
SCRIPT = os.path.join(HERE, "..", "contragan.py")
STEPS = cg.PRESETS["cpu-demo"]["steps"]  # 1,500 G steps, unless a setting gives --steps
DOCS = os.path.join(HERE, "..", "docs", "confusion-study")

NO_DATA_POSITIVES = ["--loss", "2c", "--no-data-positives", "--temperature", "0.5"]
D2DCE = ["--loss", "d2dce", "--temperature", "0.5", "--margin", "0.98"]
STUDIES = {  # per study: settings {name: (flags, seeds)}, the runs' folder, its records; a run: <root>/<slug>/s<seed>
    "shapes": {"root": "runs/study", "results": DOCS, "settings": {
        "2c (paper)": (["--loss", "2c"], [0, 1, 2]),
        "2c --no-data-positives t=0.5 lambda=0.5": ([*NO_DATA_POSITIVES, "--cond-lambda", "0.5"], [0, 1, 2]),
        "2c --no-data-positives t=0.5 lambda=1": ([*NO_DATA_POSITIVES, "--cond-lambda", "1"], [0, 1, 2]),
        "d2dce t=0.5 m=0.98 lambda=0.5": ([*D2DCE, "--cond-lambda", "0.5"], [0, 1, 2]),
        "d2dce t=0.5 m=0.98 lambda=1": ([*D2DCE, "--cond-lambda", "1"], [0, 1, 2]),
        "proj": (["--loss", "proj"], [0, 1]),
        "ac": (["--loss", "ac"], [0, 1]),
        # the digits study's best searched setting, checked on shapes (one seed)
        "digits' search: d2dce t=0.5 m=0.98 lambda=4": ([*D2DCE, "--cond-lambda", "4"], [0])}},
    "digits": {"root": "runs/study-digits", "results": os.path.join(DOCS, "digits"), "settings": {  # run in this order
        "2c (paper)": (["--loss", "2c"], [0, 1]),
        "proj": (["--loss", "proj"], [0, 1]),
        "2c --no-data-positives t=0.5 lambda=1": ([*NO_DATA_POSITIVES, "--cond-lambda", "1"], [0, 1]),
        "d2dce t=0.5 m=0.98 lambda=1": ([*D2DCE, "--cond-lambda", "1"], [0, 1]),
        "ac": (["--loss", "ac"], [0, 1]),
        "d2dce t=0.5 m=0.98 lambda=0.5": ([*D2DCE, "--cond-lambda", "0.5"], [0, 1]),
        # 3x the budget, one seed: the best contrastive setting above and proj
        "d2dce t=0.5 m=0.98 lambda=1, 4,500 steps": ([*D2DCE, "--cond-lambda", "1", "--steps", "4500"], [0]),
        "proj, 4,500 steps": (["--loss", "proj", "--steps", "4500"], [0]),
        # a search on this data, one seed: lambda 0.5 -> 1 doubled D2D-CE's consistency; does more go on?
        "search: d2dce t=0.5 m=0.98 lambda=2": ([*D2DCE, "--cond-lambda", "2"], [0]),
        "search: d2dce t=0.5 m=0.98 lambda=4": ([*D2DCE, "--cond-lambda", "4"], [0])}},
    # consistency regularization (the authors' cr_lambda 10.0) on the paper's 2C, shapes, two seeds each
    "cr": {"root": "runs/study-cr", "results": os.path.join(DOCS, "cr"), "settings": {
        "2c (paper)": (["--loss", "2c"], [0, 1]),
        "2c --cr-lambda 10": (["--loss", "2c", "--cr-lambda", "10"], [0, 1])}},
}
STUDY = STUDIES["shapes"]          # the study this process runs (main: --study)
SETTINGS, RESULTS = STUDY["settings"], STUDY["results"]


def use(name, results=None):
    """Make study `name` (its records in `results`, default its docs folder) the one the functions below see."""
    global STUDY, SETTINGS, RESULTS
    STUDY = STUDIES[name]
    SETTINGS, RESULTS = STUDY["settings"], results or STUDY["results"]


def read_jsonl(path):
    """The records of a .jsonl file; a torn last line (an append cut short) is left out, not an error."""
    with open(path) as f:
        *whole, tail = f.read().split("\n")                    # tail: what follows the last newline
    if tail:
        print(f"note: the last line of {path} is torn (an interrupted append): left out", file=sys.stderr)
    records = []
    for i, line in enumerate(l for l in whole if l.strip()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: record {i + 1} of {path} is not JSON: left out", file=sys.stderr)
    return records


def slug(name):
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")  # "2c (paper)" -> "2c-paper"


def run_dir(root, name, seed):
    return os.path.join(root, slug(name), f"s{seed}")


def recorded(name, seed):
    """The final evaluation of (setting, seed) kept in the study's results.jsonl, or None."""
    path = os.path.join(RESULTS, "results.jsonl")
    if not os.path.isfile(path):
        return None
    hits = [r for r in read_jsonl(path) if r.get("setting") == name and r.get("seed") == seed]
    return hits[-1] if hits else None


def final_diagnostics(path):
    """contragan.d_diagnostics of a run's last.pt: its D and G_ema, its fixed real samples."""
    ckpt, _ = cg.load_checkpoint(path)                         # its last.pt, checked as a resume checks it
    cfg = argparse.Namespace(**ckpt["config"])
    G, D = cg.build_models(cfg, ckpt["num_classes"])
    G.load_state_dict(ckpt["G_ema"])
    D.load_state_dict(ckpt["D"])
    train, held, K = cg.load_data(cfg)
    samples = [cg.fixed_sample(data, min(cfg.acc_images, len(data)), seed=cfg.seed + s)
               for data, s in ((train, 2), (held, 3))]
    return {"step": ckpt["step"], **cg.d_diagnostics(D, G, *samples, K, cfg, torch.device("cpu"))}


def judge_reading(path, num_images=1000):
    """The data set's judge (tools/judge.py, cached) on num_images fakes of a run's last.pt, as tools/sample.py
    draws them; None for a run that was trained without --judge (shapes: the colour reader reads them)."""
    checkpoint, _ = cg.load_checkpoint(path)
    if not checkpoint["config"].get("judge"):
        return None
    judge, info = cg.load_judge(checkpoint["config"]["judge"])
    r = J.score(judge, info, *J.fakes_from_checkpoint(checkpoint, num_images))
    return {k: r[k] for k in ("consistency", "relabelled", "low_confidence", "confidence", "judge_heldout_accuracy",
                              "judge_heldout_images", "num_images", "matrix")}


def record(name, seed, path):
    """Keep a finished run's final numbers and last grid in the study's results folder."""
    final = final_diagnostics(path)
    reading = judge_reading(path)
    metrics = os.path.join(path, "metrics.jsonl")
    evals = [r for r in read_jsonl(metrics) if r.get("eval")] if os.path.isfile(metrics) else []
    gaps = [[r["step"], r["d_acc_gap"]] for r in evals if r.get("d_acc_gap") is not None]
    final["gap_over_training"] = gaps                          # D's train - held-out real accuracy (Figure 3)
    final["d_acc_gap_max"] = max(g for _, g in gaps) if gaps else None
    os.makedirs(RESULTS, exist_ok=True)
    results = os.path.join(RESULTS, "results.jsonl")
    if os.path.isfile(results):                                # a torn last line is cut, not glued to this one
        with open(results, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    with open(results, "a") as f:
        f.write(json.dumps({"setting": name, "seed": seed, **final, **({"judge": reading} if reading else {})}) + "\n")
    shutil.copy(os.path.join(path, "samples", f"step{final['step']:07d}.png"),
                os.path.join(RESULTS, f"{slug(name)}-s{seed}.png"))


def steps_of(flags):
    """A setting's G steps: its --steps, else the cpu-demo preset's."""
    return int(flags[flags.index("--steps") + 1]) if "--steps" in flags else STEPS


def final_eval(path, steps=STEPS):
    """The last evaluation record of a run that reached `steps`, or None."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None
    evals = [r for r in read_jsonl(metrics) if r.get("eval")]
    return evals[-1] if evals and evals[-1]["step"] >= steps else None


def train(root, name, flags, seed):
    """Train (setting, seed) unless recorded; a finished or interrupted run is recorded or resumed."""
    path = run_dir(root, name, seed)
    if recorded(name, seed):
        return path
    if final_eval(path, steps_of(flags)):
        record(name, seed, path)
        return path
    args = ["--resume", path] if os.path.isfile(os.path.join(path, "last.pt")) else \
        ["--preset", "cpu-demo", *flags, "--seed", str(seed), "--run-dir", path]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path.rstrip("/") + ".log", "a") as log:
        subprocess.run([sys.executable, SCRIPT, *args], stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    record(name, seed, path)
    return path


def mean_std(values):
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


COLUMNS = {  # per study: (header, key in a record; "judge.x": its judge reading's x)
    "shapes": [("colour: raw", "class_consistency_colour"),
               ("colour: relabelled", "class_consistency_colour_relabelled"),
               ("colour: none", "class_none"), ("D: raw", "class_consistency_d"),
               ("D: relabelled", "class_consistency_d_relabelled"), ("D on held-out reals", "d_class_acc_heldout")],
    "cr": [("colour: raw", "class_consistency_colour"), ("colour: relabelled",
                                                       "class_consistency_colour_relabelled"),
           ("colour: none", "class_none"), ("D gap, final", "d_acc_gap"),
           ("D gap, max over training", "d_acc_gap_max")],
    "digits": [("judge: raw", "judge.consistency"), ("judge: relabelled", "judge.relabelled"),
               ("judge: low confidence", "judge.low_confidence"), ("judge on held-out reals",
                                                                   "judge.judge_heldout_accuracy"),
               ("D: raw", "class_consistency_d"), ("D: relabelled", "class_consistency_d_relabelled"),
               ("D on held-out reals", "d_class_acc_heldout")],
}


def value(r, key):
    if key.startswith("judge."):
        return r["judge"][key[len("judge."):]]
    if key not in r and key.startswith("class_consistency_colour"):   # results recorded before its rename
        return r[key.replace("_colour", "")]
    return r[key]


def report(per_seed=True):
    columns = COLUMNS[next(name for name, study in STUDIES.items() if study is STUDY)]
    lines = ["| setting | seeds | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, (_, seeds) in SETTINGS.items():
        finals = [r for r in (recorded(name, s) for s in seeds) if r]
        cells = [mean_std([value(r, k) for r in finals]) for _, k in columns]
        lines.append(f"| {name} | {len(finals)} of {len(seeds)} | " + " | ".join(cells) + " |")
        if per_seed:
            lines += [f"|  seed {r['seed']} | | " + " | ".join(f"{value(r, k):.2f}" for _, k in columns) + " |"
                      for r in finals]
    return "\n".join(lines)


def grids(page=os.path.join(HERE, "..", "README.md")):
    """The recorded runs' final sample grids as a markdown table: a column per setting, a row per seed; the
    images' paths relative to the page they are shown in."""
    names, folder = list(SETTINGS), os.path.relpath(RESULTS, os.path.dirname(os.path.abspath(page)))
    rows = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in range(max(len(seeds) for _, seeds in SETTINGS.values())):
        rows.append(f"| {s} | " + " | ".join(f"![{n}, seed {s}]({folder}/{slug(n)}-s{s}.png)"
                                              if recorded(n, s) else "-" for n in names) + " |")
    what = "digits 0 to 9" if STUDY is STUDIES["digits"] else "circle/red, square/green, triangle/blue, cross/yellow"
    return f"Final grids (rows: {what}; '-': no run recorded):\n\n" + "\n".join(rows)


def matrices():
    """Each recorded run's matrix, rows asked, columns judged, as counts: the colour reader's (the last column:
    none) on shapes, the judge's on digits."""
    digits = STUDY is STUDIES["digits"]
    classes = [str(k) for k in range(10)] if digits else [c for c, _ in cg.SHAPES]
    lines = []
    for name, (_, seeds) in SETTINGS.items():
        for r in filter(None, (recorded(name, s) for s in seeds)):
            lines += [f"{name}, seed {r['seed']} (step {r['step']}): {'judge' if digits else 'colour reader'}, "
                      f"asked x judged", " " * 9 + "".join(f"{c:>9}" for c in classes + ([] if digits else ["none"]))]
            rows = r["judge"]["matrix"] if digits else r["confusion_colour"]
            lines += [f"{c:>9}" + "".join(f"{v:>9}" for v in row) for c, row in zip(classes, rows)]
    return "\n".join(lines)


def markers(study):
    tag = "study-table" + ("" if study == "shapes" else "-" + study)
    return f"<!-- {tag}:", f"<!-- /{tag} -->"


def main(argv=None):
    p = cg.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="shapes", choices=sorted(STUDIES))
    p.add_argument("--root", help="the runs' folder (default runs/study, runs/study-digits)")
    p.add_argument("--results", help="where the records and grids are kept (default docs/confusion-study[/digits])")
    p.add_argument("--data-dir", default="data/digits", help="--study digits: tools/export_digits.py's folder")
    p.add_argument("--cache-dir", default=J.DEFAULT_CACHE, help="--study digits: the judge's (tools/judge.py)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--report", action="store_true", help="only print the table (and record finished runs)")
    p.add_argument("--page", help="also put the table (means only) and the grids into this file, between "
                   "its study-table markers (digits: study-table-digits, cr: study-table-cr)")
    p.add_argument("--matrices", action="store_true", help="also print every recorded run's matrix")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1 (got {args.jobs})")
    begin, end = markers(args.study)
    if args.page:                                            # checked before hours of runs, not after
        if not os.path.isfile(args.page):
            p.error(f"--page {args.page}: no such file")
        with open(args.page) as f:
            text = f.read()
        if begin not in text or end not in text:
            p.error(f"--page {args.page} has no {begin} ... --> and {end} markers to put the table between")
    use(args.study, args.results)
    root, extra = args.root or STUDY["root"], []
    if args.study == "digits" and not args.report:
        if not os.path.isdir(args.data_dir):
            p.error(f"no digits at {args.data_dir}: export them first (python tools/export_digits.py {args.data_dir})")
        data_dir = os.path.abspath(args.data_dir)
        try:
            _, info, judge_path = J.get_judge(J.data_config("folder", data_dir), cache_dir=args.cache_dir)
        except (cg.UsageError, cg.fid.FIDError) as err:
            p.error(str(err))
        print(f"judge {judge_path}: {info['heldout_accuracy']:.3f} on {info['heldout_images']} held-out digits")
        extra = ["--dataset", "folder", "--data-dir", data_dir, "--num-workers", "0", "--judge", judge_path]
    for name, (flags, seeds) in SETTINGS.items():           # runs finished but not yet recorded
        for seed in seeds:
            if not recorded(name, seed) and final_eval(run_dir(root, name, seed), steps_of(flags)):
                record(name, seed, run_dir(root, name, seed))
    if not args.report:
        # seed-major, so a study stopped early has every setting at its first seeds
        todo = sorted(((s, name, flags + extra) for name, (flags, seeds) in SETTINGS.items() for s in seeds),
                      key=lambda t: t[0])
        with ThreadPoolExecutor(args.jobs) as pool:
            for path in pool.map(lambda t: train(root, t[1], t[2], t[0]), todo):
                print(f"done {path}", flush=True)
    print(report() + "\n\n" + grids())
    if args.matrices:
        print("\n" + matrices())
    if args.page:
        with open(args.page) as f:
            text = f.read()
        start = text.index("\n", text.index(begin)) + 1
        with open(args.page, "w") as f:                      # seeds: --report
            f.write(text[:start] + report(per_seed=False) + "\n\n" + grids(args.page) + "\n" + text[text.index(end):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
