"""Tiny ImageNet's validation split as a class-per-folder tree, for contragan.py's --fid-reference-dir.

    python tools/tiny_imagenet_val.py data/tiny-imagenet-200/val data/tiny-val
    python contragan.py --preset tiny-imagenet --data-dir data/tiny-imagenet-200/train --fid-reference-dir data/tiny-val

The paper's Tiny ImageNet FID is against the validation images (Section 4.3). Their download keeps them in one
folder, val/images/<image>, with each image's class (its WordNet id) in val/val_annotations.txt (tab-separated: image,
wnid, then a bounding box). This writes OUT/<wnid>/<image> for each line: a hard link to the image (no copy, no
space), or a copy where OUT is on another file system. The training split, train/<wnid>/images/<image>, is read as
it is. Refuses an OUT that is not empty, and an annotation whose image is missing, before writing anything.
"""
import argparse
import os
import shutil
import sys


def convert(val_dir, out):
    """Link (or copy) every annotated image of val_dir into out/<wnid>/; returns {wnid: number of images}."""
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise ValueError(f"{annotations} does not exist: give Tiny ImageNet's val folder (it holds images/ and "
                         f"val_annotations.txt)")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty: give a new or empty folder")
    with open(annotations) as f:
        pairs = [line.split("\t")[:2] for line in f if line.strip()]   # (image, wnid)
    for image, _ in pairs:
        if not os.path.isfile(os.path.join(val_dir, "images", image)):
            raise ValueError(f"{os.path.join(val_dir, 'images', image)}, named in {annotations}, does not exist")
    counts = {}
    for image, wnid in pairs:
        os.makedirs(os.path.join(out, wnid), exist_ok=True)
        source, target = os.path.join(val_dir, "images", image), os.path.join(out, wnid, image)
        try:
            os.link(source, target)
        except OSError:                                        # another file system (or no hard links): a copy
            shutil.copyfile(source, target)
        counts[wnid] = counts.get(wnid, 0) + 1
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", help="Tiny ImageNet's val folder (images/ and val_annotations.txt)")
    p.add_argument("out", help="the folder to write, OUT/<wnid>/<image>")
    args = p.parse_args(argv)
    try:
        counts = convert(args.val_dir, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} images of {len(counts)} classes to {args.out}/<wnid>/<image>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
