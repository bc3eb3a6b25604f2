"""Class-confusion study on the built-in shapes data, at the CPU demo's budget.

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

The numbers are computed here from a finished run's last.pt (runs/study/<setting>/s<seed>) by
contragan.d_diagnostics, the function training evaluates with, appended to
docs/confusion-study/results.jsonl, and its last sample grid is copied beside it: both are committed,
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
sys.path.insert(0, os.path.join(HERE, ".."))
import contragan as cg  # noqa: E402
SCRIPT = os.path.join(HERE, "..", "contragan.py")
STEPS = 1500  # the cpu-demo preset's
RESULTS = os.path.join(HERE, "..", "docs", "confusion-study")

NO_DATA_POSITIVES = ["--loss", "2c", "--no-data-positives", "--temperature", "0.5"]
D2DCE = ["--loss", "d2dce", "--temperature", "0.5", "--margin", "0.98"]
SETTINGS = {  # name: (flags, seeds); a run's folder is runs/study/<slug(name)>/s<seed>
    "2c (paper)": (["--loss", "2c"], [0, 1, 2]),
    "2c --no-data-positives t=0.5 lambda=0.5": ([*NO_DATA_POSITIVES, "--cond-lambda", "0.5"], [0, 1, 2]),
    "2c --no-data-positives t=0.5 lambda=1": ([*NO_DATA_POSITIVES, "--cond-lambda", "1"], [0, 1, 2]),
    "d2dce t=0.5 m=0.98 lambda=0.5": ([*D2DCE, "--cond-lambda", "0.5"], [0, 1, 2]),
    "d2dce t=0.5 m=0.98 lambda=1": ([*D2DCE, "--cond-lambda", "1"], [0, 1, 2]),
    "proj": (["--loss", "proj"], [0, 1]),
    "ac": (["--loss", "ac"], [0, 1]),
}


def slug(name):
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")  # "2c (paper)" -> "2c-paper"


def run_dir(root, name, seed):
    return os.path.join(root, slug(name), f"s{seed}")


def recorded(name, seed):
    """The final evaluation of (setting, seed) kept in docs/confusion-study/results.jsonl, or None."""
    path = os.path.join(RESULTS, "results.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        hits = [r for r in map(json.loads, f) if r["setting"] == name and r["seed"] == seed]
    return hits[-1] if hits else None


def final_diagnostics(path):
    """contragan.d_diagnostics of a run's last.pt: its D and G_ema, its fixed real samples."""
    ckpt = torch.load(os.path.join(path, "last.pt"), map_location="cpu", weights_only=False)
    cfg = argparse.Namespace(**ckpt["config"])
    G, D = cg.build_models(cfg, ckpt["num_classes"])
    G.load_state_dict(ckpt["G_ema"])
    D.load_state_dict(ckpt["D"])
    train, held, K = cg.load_data(cfg)
    samples = [cg.fixed_sample(data, min(cfg.acc_images, len(data)), seed=cfg.seed + s)
               for data, s in ((train, 2), (held, 3))]
    return {"step": ckpt["step"], **cg.d_diagnostics(D, G, *samples, K, cfg, torch.device("cpu"))}


def record(name, seed, path):
    """Keep a finished run's final numbers and last grid in docs/confusion-study/."""
    final = final_diagnostics(path)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "results.jsonl"), "a") as f:
        f.write(json.dumps({"setting": name, "seed": seed, **final}) + "\n")
    shutil.copy(os.path.join(path, "samples", f"step{STEPS:07d}.png"),
                os.path.join(RESULTS, f"{slug(name)}-s{seed}.png"))


def final_eval(path):
    """The last evaluation record of a run that reached STEPS, or None."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None
    with open(metrics) as f:
        evals = [r for r in map(json.loads, f) if r.get("eval")]
    return evals[-1] if evals and evals[-1]["step"] >= STEPS else None


def train(root, name, flags, seed):
    path = run_dir(root, name, seed)
    if recorded(name, seed):
        return path
    if final_eval(path):
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


def report(per_seed=True):
    keys = ["class_consistency", "class_consistency_relabelled", "class_none", "class_consistency_d",
            "class_consistency_d_relabelled", "d_class_acc_heldout"]
    lines = ["| setting | seeds | colour: raw | colour: relabelled | colour: none | D: raw | D: relabelled | "
             "D on held-out reals |", "|---|---|---|---|---|---|---|---|"]
    for name, (_, seeds) in SETTINGS.items():
        finals = [r for r in (recorded(name, s) for s in seeds) if r]
        cells = [mean_std([r[k] for r in finals]) for k in keys]
        lines.append(f"| {name} | {len(finals)} of {len(seeds)} | " + " | ".join(cells) + " |")
        if per_seed:
            lines += [f"|  seed {r['seed']} | | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in finals]
    return "\n".join(lines)


def grids(page_dir=os.path.join(HERE, "..")):
    """The recorded runs' final sample grids as a markdown table: a column per setting, a row per seed; the
    image links relative to page_dir, the folder of the page that shows them."""
    images = os.path.relpath(RESULTS, page_dir).replace(os.sep, "/")
    names = list(SETTINGS)
    rows = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in range(max(len(seeds) for _, seeds in SETTINGS.values())):
        rows.append(f"| {s} | " + " | ".join(f"![{n}, seed {s}]({images}/{slug(n)}-s{s}.png)"
                                              if recorded(n, s) else "-" for n in names) + " |")
    return "Final grids (rows: circle/red, square/green, triangle/blue, cross/yellow; '-': no run recorded):\n\n" + \
        "\n".join(rows)


def matrices():
    """Each recorded run's colour matrix: rows asked, columns judged (the last: none), as counts."""
    classes = [c for c, _ in cg.SHAPES]
    lines = []
    for name, (_, seeds) in SETTINGS.items():
        for r in filter(None, (recorded(name, s) for s in seeds)):
            lines += [f"{name}, seed {r['seed']} (step {r['step']}): colour reader, asked x judged",
                      " " * 9 + "".join(f"{c:>9}" for c in classes + ["none"])]
            lines += [f"{c:>9}" + "".join(f"{v:>9}" for v in row) for c, row in zip(classes, r["confusion_colour"])]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/study")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print the table (and record finished runs)")
    p.add_argument("--page", help="also put the table (means only) and the grids into this markdown file, "
                   "between its study-table markers (docs/confusion-study.md)")
    p.add_argument("--matrices", action="store_true", help="also print every recorded run's colour matrix")
    args = p.parse_args()
    for name, (_, seeds) in SETTINGS.items():               # runs finished but not yet recorded
        for seed in seeds:
            if not recorded(name, seed) and final_eval(run_dir(args.root, name, seed)):
                record(name, seed, run_dir(args.root, name, seed))
    if not args.report:
        # seed-major, so a study stopped early has every setting at its first seeds
        todo = sorted(((s, name, flags) for name, (flags, seeds) in SETTINGS.items() for s in seeds),
                      key=lambda t: t[0])
        with ThreadPoolExecutor(args.jobs) as pool:
            for path in pool.map(lambda t: train(args.root, t[1], t[2], t[0]), todo):
                print(f"done {path}", flush=True)
    print(report() + "\n\n" + grids())
    if args.matrices:
        print("\n" + matrices())
    if args.page:
        with open(args.page) as f:
            text = f.read()
        start = text.index("\n", text.index("<!-- study-table:")) + 1
        end = text.index("<!-- /study-table -->")
        with open(args.page, "w") as f:
            f.write(text[:start] + report(per_seed=False) + "\n\n" +
                    grids(os.path.dirname(os.path.abspath(args.page))) + "\n" + text[end:])  # seeds: --report


if __name__ == "__main__":
    main()
