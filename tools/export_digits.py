"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; offline) as a class-per-folder tree at 32x32.

    pip install scikit-learn                  # an optional extra for tools, like matplotlib
    python tools/export_digits.py data/digits
    python contragan.py --preset cpu-demo --dataset folder --data-dir data/digits --num-workers 0

Writes OUT/<digit>/<index>.png: grey, white strokes on black, the 17 levels (0-16) spread over 0-255 and
resized bilinearly from 8x8 to --size (contragan.py reads them as RGB). Refuses a folder that is not empty.
"""
import argparse
import os
import sys


def export(out, size=32):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()                                     # images (1797, 8, 8) in 0..16, target (1797,)
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"error: {out} is not empty: give a new or empty folder")
    for k in range(10):
        os.makedirs(os.path.join(out, str(k)), exist_ok=True)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        im = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8), mode="L")
        im.resize((size, size), Image.BILINEAR).save(os.path.join(out, str(label), f"{i:04d}.png"))
    return len(digits.target)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (e.g. data/digits, git-ignored)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (contragan.py: 32, 64 or 128)")
    args = p.parse_args(argv)
    try:
        n = export(args.out, args.size)
    except ImportError:
        raise SystemExit("error: tools/export_digits.py needs scikit-learn: pip install scikit-learn") from None
    print(f"wrote {n} digits to {args.out}/<digit>/<index>.png at {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
