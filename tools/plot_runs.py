"""The paper's Figure 3 from runs' metrics.jsonl (matplotlib; no torch needed).

    python tools/plot_runs.py runs/cifar10-proj-s0 runs/cifar10-2c-s0 --out figure3.png

Panels: D's accuracy on training vs held-out real images, FID (and intra-class FID when measured), the
largest singular value of D's weights, against G steps; plus class confusion: class consistency (raw
and relabelled) over steps, and the last run's final confusion matrix. Bad input: one `error:` line,
status 2 (as contragan.py).
"""
import argparse
import json
import os
import sys


class UsageError(Exception):
    pass


def plot_runs(runs, out):
    """The paper's Figure 3 for one or several runs: D's accuracy on training vs held-out real images,
    FID (and intra-class FID when measured), and the largest singular value of D's weights, against G
    steps; plus class confusion: class consistency (raw and relabelled) over steps, and the last run's
    final confusion matrix."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    for run in runs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            raise UsageError(f"{run} has no metrics.jsonl")
        with open(path) as f:
            evals = [r for r in map(json.loads, f) if r.get("eval")]
        if not evals:
            raise UsageError(f"{run} has no evaluation yet")
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
        reader = "class_consistency" if "class_consistency" in evals[-1] else "class_consistency_d"
        for key, style, kind in ((reader, "-", "raw"), (reader + "_relabelled", ":", "relabelled")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:                                         # the colour reader on shapes, else D's
                axes[3].plot(*zip(*points), style, color=line.get_color(),
                             label=f"{name} {kind} ({'colour' if reader == 'class_consistency' else 'D'})")
        matrix = evals[-1].get("confusion_colour") or evals[-1].get("confusion_d")
        for r in evals:
            if r.get("collapse"):
                for ax in axes[:4]:
                    ax.axvline(r["step"], color=line.get_color(), alpha=0.3, lw=0.8)
    if matrix:                                                 # rows: asked label, columns: judged class
        axes[4].imshow(matrix, cmap="Blues")
        axes[4].set_ylabel("asked label")
    for ax, title in zip(axes, ["D accuracy on real images (train vs held-out)", "FID (EMA G)",
                                "largest singular value of D's weights",
                                "class consistency of fakes (raw, relabelled)",
                                f"confusion at step {steps[-1]}, {name} (x: judged class)"]):
        ax.set_title(title)
        ax.set_xlabel("G step" if ax is not axes[4] else "judged class")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        elif not (ax is axes[4] and matrix):                   # e.g. FID off (--fid-images 0)
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's Figure 3 for contragan.py runs.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="figure3.png", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        if not os.access(os.path.dirname(os.path.abspath(args.out)), os.W_OK):
            raise UsageError(f"cannot write --out {args.out}: its folder is missing or not writable")
        return plot_runs(args.runs, args.out)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
