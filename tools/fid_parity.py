"""fid.py against pytorch-fid 0.3.0: agreement (features, FID) and speed, offline, in one run.

Both load the same random weights (Kaiming-normal convolutions; the published file cannot be
downloaded here): fid.py from --weights, pytorch-fid from its torch hub cache in a temporary
TORCH_HOME, where it looks for pt_inception-2015-12-05-6726825d.pth without checking the hash.
Both read the same PNG folders. Prints a markdown table.

    .venv/bin/pip install --no-deps --target /tmp/pfid pytorch-fid==0.3.0   # not a dependency
    PYTHONPATH=/tmp/pfid .venv/bin/python tools/fid_parity.py                 # ~3 min on 2 idle cores
"""
import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def write_folder(folder, count, size, seed, tint):
    """Smooth random images (4x4 noise upsampled bicubically), so the features vary like photos'."""
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = (rng.random((4, 4, 3)) * 255 * tint).clip(0, 255).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


class Recorder(torch.nn.Module):
    """Wraps fid.py's model to keep the pool features that features_from_dataset streams away."""

    def __init__(self, model):
        super().__init__()
        self.model, self.pool = model, []

    def forward(self, x):
        pool, logits = self.model(x)
        self.pool.append(pool.numpy().astype(np.float64))
        return pool, logits


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images per folder (two folders)")
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299")
    parser.add_argument("--batch-size", type=int, default=50, help="pytorch-fid's default")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes per side for the best-of timing")
    parser.add_argument("--dim", type=int, default=2048, help="matrix size for the Frechet timing")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="fid_parity_")
    os.environ["TORCH_HOME"] = os.path.join(work, "torch")  # read by torch.hub.get_dir() at call time
    from pytorch_fid import fid_score, inception as pfid_inception  # noqa: E402

    ours = fid.load_inception(random_init=True, seed=0)
    weights = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", fid.WEIGHTS_NAME)
    os.makedirs(os.path.dirname(weights))
    torch.save(ours.state_dict(), weights)
    theirs = pfid_inception.InceptionV3([3]).eval()  # loads `weights` from the hub cache
    ours_tensors = [v for k, v in ours.state_dict().items() if not k.startswith("fc.")]  # no fc in theirs
    theirs_tensors = list(theirs.state_dict().values())  # the same modules, in the same order
    assert len(ours_tensors) == len(theirs_tensors) and all(map(torch.equal, ours_tensors, theirs_tensors))

    folders = [write_folder(os.path.join(work, name), args.images, args.size, seed, tint)
               for name, seed, tint in (("a", 1, 1.0), ("b", 2, 0.8))]
    with torch.no_grad():  # warm-up, so neither side pays the first-call costs in its timing
        ours(torch.zeros(2, 3, args.size, args.size)), theirs(torch.zeros(2, 3, args.size, args.size))

    ours_stats, theirs_stats, ours_pool, theirs_pool = [], [], [], []
    ours_time = theirs_time = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 2048 images: singular covariances, on purpose
        for i, folder in enumerate(folders):  # interleaved, first one side then the other, so that
            files = sorted(os.path.join(folder, name) for name in os.listdir(folder))  # load hits both
            dataset = fid.ImageFolderFlat(folder)
            recorder = Recorder(ours)
            for side in ("theirs", "ours") if i % 2 == 0 else ("ours", "theirs"):
                if side == "theirs":
                    start = time.perf_counter()
                    activations = fid_score.get_activations(files, theirs, args.batch_size, 2048, "cpu", 0)
                    theirs_stats.append((np.mean(activations, 0), np.cov(activations, rowvar=False)))
                    theirs_time += time.perf_counter() - start
                    theirs_pool.append(activations)
                else:
                    start = time.perf_counter()
                    stats, _ = fid.features_from_dataset(recorder, dataset, None, args.batch_size, "cpu")
                    ours_stats.append((stats.mu, stats.sigma))
                    ours_time += time.perf_counter() - start
                    ours_pool.append(np.concatenate(recorder.pool))

        feature_diff = max(np.abs(a - b).max() for a, b in zip(ours_pool, theirs_pool))
        feature_scale = np.abs(np.concatenate(theirs_pool)).mean()
        sigma_diff = max(np.abs(a[1] - b[1]).max() / np.abs(b[1]).max() for a, b in zip(ours_stats, theirs_stats))
        fid_ours = fid.frechet_distance(*ours_stats[0], *ours_stats[1])
        fid_theirs = fid_score.calculate_frechet_distance(*theirs_stats[0], *theirs_stats[1])
        fid_ours_on_theirs = fid.frechet_distance(*theirs_stats[0], *theirs_stats[1])

    # Forward passes alone, alternating batch by batch and keeping each side's best: robust to load
    # from other processes, which the folder timings above share but do not cancel.
    batch = torch.rand(args.batch_size, 3, args.size, args.size)  # [0, 1], pytorch-fid's range
    best = {"ours": float("inf"), "theirs": float("inf")}
    with torch.no_grad():
        for rep in range(args.repeats):
            for side in ("theirs", "ours") if rep % 2 == 0 else ("ours", "theirs"):
                start = time.perf_counter()
                ours(batch * 2 - 1) if side == "ours" else theirs(batch)
                best[side] = min(best[side], time.perf_counter() - start)

    # The Frechet distance at full size, on full-rank covariances (as with 10,000 images).
    rng = np.random.default_rng(0)
    gaussians = []
    for shift in (0.0, 0.3):
        x = rng.standard_normal((2 * args.dim, args.dim)) * rng.uniform(0.2, 1.0, args.dim) + shift
        gaussians += [x.mean(0), np.cov(x, rowvar=False)]
    d_sqrtm, t_sqrtm = timed(fid_score.calculate_frechet_distance, *gaussians)
    d_eigen, t_eigen = min((timed(fid.frechet_distance, *gaussians) for _ in range(3)), key=lambda r: r[1])

    n = 2 * args.images
    print(f"fid.py vs pytorch-fid 0.3.0 | {cpu_name()}, {torch.get_num_threads()} torch threads | torch "
          f"{torch.__version__} | same random weights | {args.images} + {args.images} PNGs {args.size}x{args.size} "
          f"-> 299x299 | batch {args.batch_size}, 0 workers\n")
    print("| quantity | fid.py | pytorch-fid 0.3.0 | difference |")
    print("|---|---|---|---|")
    print(f"| max abs pool-feature difference ({n} images) | - | - | {feature_diff:.2e} "
          f"(mean abs feature {feature_scale:.3f}) |")
    print(f"| max covariance difference / max covariance | - | - | {sigma_diff:.2e} |")
    print(f"| FID, A vs B (each side's own statistics) | {fid_ours:.6f} | {fid_theirs:.6f} | "
          f"{abs(fid_ours - fid_theirs):.2e} ({abs(fid_ours - fid_theirs) / fid_theirs:.1e} rel.) |")
    print(f"| FID, both formulas on pytorch-fid's statistics | {fid_ours_on_theirs:.6f} | {fid_theirs:.6f} | "
          f"{abs(fid_ours_on_theirs - fid_theirs):.2e} |")
    print(f"| Frechet distance, d={args.dim}, full rank: seconds | {t_eigen:.2f} (best of 3) | {t_sqrtm:.2f} "
          f"(sqrtm) | {t_sqrtm / t_eigen:.1f}x faster, values differ by {abs(d_eigen - d_sqrtm) / d_sqrtm:.1e} rel. |")
    print(f"| Inception images/s, folder -> statistics ({n} images, interleaved) | {n / ours_time:.2f} | "
          f"{n / theirs_time:.2f} | {theirs_time / ours_time:.2f}x |")
    print(f"| Inception forward images/s (batch {args.batch_size}, best of {args.repeats}, alternating) | "
          f"{args.batch_size / best['ours']:.2f} | {args.batch_size / best['theirs']:.2f} | "
          f"{best['theirs'] / best['ours']:.2f}x |")


if __name__ == "__main__":
    main()
