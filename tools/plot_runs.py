"""The paper's Figure 3 from runs' metrics.jsonl, and the mean +- std over seeds (matplotlib; no torch needed).

    python tools/plot_runs.py runs/tiny-proj-s0 runs/tiny-2c-s0 --out figure3.png
    python tools/plot_runs.py --seeds runs/cifar10-2c-s0 runs/cifar10-2c-s1 runs/cifar10-2c-s2

Panels: D's accuracy on training vs held-out real images, FID (and intra-class FID when measured), the
largest singular value of D's weights, against G steps; plus class confusion: class consistency (raw
and relabelled; on shapes the colour reader's none share) over steps, and the last run's final
confusion matrix (its last column: none). Each run's three lines of the paper's Figure 3 (Section 4.5,
Tiny ImageNet) are drawn in its colour and printed: solid where D's train - held-out accuracy gap first
exceeds 0.5, dashed at the best FID, dotted at the collapse (`figure3_marks`). --seeds prints, instead of a
figure, the mean +- std over the runs of their best FID and last class consistency (`seed_summary`).
Bad input: one `error:` line, status 2 (as contragan.py).
"""
import argparse
import json
import os
import statistics
import sys

GAP = 0.5      # Figure 3: the solid line where D's train - held-out accuracy gap first exceeds 0.5 (Section 4.5)
PATIENCE = 3   # the collapse: FID up this many evaluations in a row after its best (contragan.py --collapse-patience)
# Keys of config.json that may differ between runs of one setting (--seeds): where and how it ran, not what.
NOT_THE_SETTING = {"seed", "run_dir", "resume", "data_dir", "device", "num_workers", "world_size", "compile"}


class UsageError(Exception):
    pass


def read_evals(run):
    """The evaluation records of a run folder's metrics.jsonl, in order."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run} has no metrics.jsonl")
    try:
        with open(path) as f:                                  # a torn last line (killed mid-write): skipped
            evals = [r for r in map(json.loads, (x for x in f if x.endswith("\n"))) if r.get("eval")]
    except (ValueError, AttributeError) as err:                # not JSON, or JSON but not a record
        raise UsageError(f"{path}: not one JSON record per line ({err})") from None
    if not evals:
        raise UsageError(f"{run} has no evaluation yet")
    if not all({"step", "d_acc_train", "d_sigma_max"} <= r.keys() for r in evals):
        raise UsageError(f"{path}: evaluations without step, d_acc_train or d_sigma_max (not contragan.py's?)")
    for r in evals:                                            # older runs: the colour reader's keys had no suffix
        for key in ("class_consistency", "class_consistency_relabelled"):
            if key in r:
                r[key.replace("consistency", "consistency_colour")] = r.pop(key)
    return evals


def figure3_marks(evals, gap=GAP, patience=PATIENCE):
    """The three lines of the paper's Figure 3 for one run, as G steps (None: it did not happen).

    gap:      the first evaluation where D's train - held-out accuracy (`d_acc_gap`) exceeds `gap` (0.5);
    best_fid: the evaluation with the lowest FID (the earliest of equal ones), and that FID;
    collapse: the first evaluation after the best FID at which FID has risen `patience` evaluations in a row.
    The paper does not define its collapse numerically; this rule is contragan.py's FID-rise warning, kept to
    the part after the best FID (from which a run that collapsed does not recover)."""
    gap_step = next((r["step"] for r in evals if r.get("d_acc_gap") is not None and r["d_acc_gap"] > gap), None)
    fids = [(r["step"], r["fid"]) for r in evals if r.get("fid") is not None]
    if not fids:
        return {"gap": gap_step, "best_fid": None, "fid": None, "collapse": None}
    best = min(range(len(fids)), key=lambda i: fids[i][1])   # min(): the first of equal minima
    collapse = None
    for i in range(best + patience, len(fids)):             # FIDs i - patience .. i strictly rising
        if all(fids[j][1] < fids[j + 1][1] for j in range(i - patience, i)):
            collapse = fids[i][0]
            break
    return {"gap": gap_step, "best_fid": fids[best][0], "fid": fids[best][1], "collapse": collapse}


def describe_marks(name, marks):
    """One line: the run's three Figure 3 marks, as plot_runs draws them."""
    def at(step):
        return "never" if step is None else f"step {step}"
    best = "best FID: not measured" if marks["fid"] is None else f"best FID {marks['fid']:.3f}: {at(marks['best_fid'])}"
    return (f"{name}: D's train - held-out accuracy gap first > {GAP}: {at(marks['gap'])} (solid) | {best} (dashed) | "
            f"collapse (FID up {PATIENCE} evaluations in a row after its best): {at(marks['collapse'])} (dotted)")


def seed_summary(runs):
    """{quantity: [value of each run]} for runs of one setting (seeds): the best FID of each run, and each class
    consistency that every run's last evaluation holds (the judge's, the colour reader's, D's)."""
    evals = [read_evals(run) for run in runs]
    summary = {}
    for run, records in zip(runs, evals):
        if all(r.get("fid") is None for r in records):
            raise UsageError(f"{run} has no FID in its metrics.jsonl (trained with --fid-images 0?)")
    summary["best FID"] = [min(r["fid"] for r in records if r.get("fid") is not None) for records in evals]
    for key, reader in (("class_consistency_judge", "judge"), ("class_consistency_colour", "colour"),
                        ("class_consistency_d", "D")):
        if all(records[-1].get(key) is not None for records in evals):
            summary[f"class consistency ({reader}), last evaluation"] = [records[-1][key] for records in evals]
    return summary


def differing_settings(runs):
    """The config.json keys (what was trained) on which the runs differ; runs without config.json are skipped."""
    configs = []
    for run in runs:
        path = os.path.join(run, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                configs.append(json.load(f))
    keys = {k for c in configs for k in c} - NOT_THE_SETTING
    return sorted(k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1)


def print_seed_summary(runs):
    """The paper's "mean +- std over 3 seeds": std is the sample standard deviation (n - 1 in the denominator);
    the paper does not say which it used (over 3 runs the population one is sqrt(2/3) = 0.82 times this)."""
    if len(runs) < 2:
        raise UsageError("--seeds needs at least 2 runs of one setting")
    if differing := differing_settings(runs):
        print(f"note: these runs differ in {', '.join(differing)} (config.json): not one setting", file=sys.stderr)
    for quantity, values in seed_summary(runs).items():
        each = ", ".join(f"{v:.3f}" for v in values)
        print(f"{quantity}: {statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} "
              f"(mean +- sample std over {len(values)} runs: {each})")
    return 0


def plot_runs(runs, out):
    """The paper's Figure 3 for one or several runs: D's accuracy on training vs held-out real images,
    FID (and intra-class FID when measured), and the largest singular value of D's weights, against G
    steps; plus class confusion: class consistency (raw and relabelled; none on shapes) over steps, and
    the last run's final confusion matrix. Vertical lines: each run's `figure3_marks`, also printed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    fmt = os.path.splitext(out)[1][1:].lower() or "png"       # no extension: a PNG at exactly that path
    if fmt not in fig.canvas.get_supported_filetypes():        # before the runs are read, not after
        raise UsageError(f"--out {out}: matplotlib cannot write .{fmt} files (use .png, .pdf or .svg)")
    for run in runs:
        evals = read_evals(run)
        name = os.path.basename(os.path.normpath(run))
        if [os.path.basename(os.path.normpath(r)) for r in runs].count(name) > 1:  # e.g. study/<setting>/s0
            name = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(run))), name)
        steps = [r["step"] for r in evals]
        line, = axes[0].plot(steps, [r["d_acc_train"] for r in evals], label=f"{name} train")
        if "d_acc_heldout" in evals[0]:
            axes[0].plot(steps, [r["d_acc_heldout"] for r in evals], "--", color=line.get_color(),
                         label=f"{name} held-out")
        for key, style in (("fid", "-"), ("intra_fid", "--")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:
                axes[1].plot(*zip(*points), style, color=line.get_color(), label=f"{name} {key.replace('_', '-')}")
        axes[2].plot(steps, [r["d_sigma_max"] for r in evals], label=name)
        reader = "class_consistency_colour" if "class_consistency_colour" in evals[-1] else "class_consistency_d"
        for key, style, kind in ((reader, "-", "raw"), (reader + "_relabelled", ":", "relabelled"),
                                 ("class_none", "--", "none")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:                                         # the colour reader on shapes, else D's
                axes[3].plot(*zip(*points), style, color=line.get_color(),
                             label=f"{name} {kind} ({'colour' if reader.endswith('colour') else 'D'})")
        matrix = evals[-1].get("confusion_colour") or evals[-1].get("confusion_d")
        marks = figure3_marks(evals)
        for key, style in (("gap", "-"), ("best_fid", "--"), ("collapse", ":")):
            if marks[key] is not None:                         # the paper's three lines, in the run's colour
                for ax in axes[:4]:
                    ax.axvline(marks[key], color=line.get_color(), ls=style, alpha=0.6, lw=1)
        print(describe_marks(name, marks))
    if matrix:                                                 # rows: asked label, columns: judged class
        axes[4].imshow(matrix, cmap="Blues")
        axes[4].set_ylabel("asked label")
        if len(matrix[0]) > len(matrix):                       # the last column: judged as no class
            axes[4].set_xticks([0, len(matrix) - 1, len(matrix)], [0, len(matrix) - 1, "none"])
    for ax, title in zip(axes, ["D accuracy on real images (train vs held-out)", "FID (EMA G)",
                                "largest singular value of D's weights",
                                "class consistency of fakes (raw, relabelled; none)",
                                f"confusion at step {steps[-1]}, {name} (x: judged class)"]):
        ax.set_title(title)
        ax.set_xlabel("G step" if ax is not axes[4] else "judged class")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        elif not (ax is axes[4] and matrix):                   # e.g. FID off (--fid-images 0)
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.suptitle(f"vertical lines, per run (Figure 3): solid, D's train - held-out accuracy gap first > {GAP}; "
                 f"dashed, best FID; dotted, collapse (FID up {PATIENCE} evaluations in a row after its best)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=100, format=fmt)
    print(f"wrote {out}")
    return 0


def check_writable(path):
    """Create the file now, and remove it again if it is new: os.access says yes to root everywhere."""
    existed = os.path.exists(path)
    try:
        open(path, "ab").close()
    except OSError as err:
        raise UsageError(f"cannot write --out {path}: {err.strerror or err}") from None
    if not existed:
        os.remove(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's Figure 3 for contragan.py runs; --seeds: mean +- std.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="figure3.png", help="the figure to write (.png unless another extension)")
    p.add_argument("--seeds", action="store_true", help="no figure: print the mean +- std over the runs (seeds "
                   "of one setting) of their best FID and last class consistency, as the paper reports (3 seeds)")
    p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")  # one line, not usage too
    args = p.parse_args(argv)
    try:
        if args.seeds:
            return print_seed_summary(args.runs)
        check_writable(args.out)
        return plot_runs(args.runs, args.out)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
