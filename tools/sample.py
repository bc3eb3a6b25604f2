"""Images from a trained run's G_ema, for FID tools and for looking (nanoGPT keeps its sample.py apart too).

    python tools/sample.py runs/cifar10-2c-s0 --num-images 10000 --out-dir fakes/
    python fid.py fakes/ data/cifar10-test/        # or any FID tool that reads a folder of PNGs

Writes N PNG files named <index>_class<label>.png (class-balanced labels, every batch mixed) and
grid/grid.png (one row per class), drawn as contragan.py evaluates: BatchNorm batch statistics, batches of
the run's --eval-batch. Bad input: one `error:` line, status 2 (as contragan.py); a failed run keeps no
images, Ctrl-C, SIGTERM (`timeout`, a scheduler) and SIGHUP neither (status 128 + the signal: 130, 143, 129).
"""
import argparse
import os
import shutil
import signal
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import contragan as cg  # noqa: E402


def generate_from_checkpoint(path, num_images, out_dir, batch_size=None, seed=0, device="auto"):
    """num_images PNGs and a per-class grid from the G_ema of a run folder or checkpoint file. A run that
    fails or is interrupted removes what it wrote: the rerun finds the folder as it was (absent or empty)."""
    from PIL import Image
    out_dir = os.path.abspath(out_dir)                         # "" or "new/..": the folder checked is the one written
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise cg.UsageError(f"--out-dir {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):        # FID tools would read old files with the new
        raise cg.UsageError(f"--out-dir {out_dir} is not empty: FID would read its old files too; "
                               f"give a new or empty folder")
    checkpoint, path = cg.load_checkpoint(path)
    cfg, K = argparse.Namespace(**checkpoint["config"]), checkpoint["num_classes"]
    made, existing = None, out_dir                             # made: the highest folder this run creates
    while not os.path.exists(existing):
        made, existing = existing, os.path.dirname(existing)
    need, free = num_images * max(3 * cfg.img_size ** 2, 4096), shutil.disk_usage(existing).free
    if need > free:                                            # PNGs of G's output: about the raw pixels, >= 1 block
        raise cg.UsageError(f"--num-images {num_images} needs about {need / 1e9:,.1f} GB for its PNGs, but "
                               f"{existing} has {free / 1e9:,.1f} GB free")
    batch_size = batch_size or cfg.eval_batch                  # BatchNorm statistics as at evaluation
    device = cg.pick_device(device, tf32=getattr(cfg, "tf32", True))
    G = cg.build_models(cfg, K)[0]
    try:
        G.load_state_dict(checkpoint["G_ema"])
    except RuntimeError as err:
        raise cg.UsageError(f"checkpoint {path} does not fit its own configuration "
                               f"({str(err).splitlines()[0]})") from None
    G.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        os.makedirs(os.path.join(out_dir, "grid"), exist_ok=True)
        for start in range(0, num_images, batch_size):
            # Labels made per batch (memory flat for any count): class-balanced overall, shuffled so that
            # every batch mixes classes (G_ema draws with BatchNorm batch statistics).
            n = min(batch_size, num_images - start)
            y = (torch.arange(start, start + n, device=device) % K)[torch.randperm(n, device=device, generator=gen)]
            images = cg.generate(G, y, cfg.z_dim, batch_size, gen)
            images = ((images * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
            for i, (image, label) in enumerate(zip(images.permute(0, 2, 3, 1).cpu().numpy(), y.tolist())):
                Image.fromarray(image).save(os.path.join(out_dir, f"{start + i:06d}_class{label}.png"))
        # The grid goes one level down: FID tools read only the top level, where every image has one size.
        cg.save_grid(G, os.path.join(out_dir, "grid", "grid.png"), K, cfg.z_dim, device, batch_size, seed)
    except BaseException as err:                               # Ctrl-C, a full disk: half a set is no set
        for entry in [made] if made else [os.path.join(out_dir, name) for name in os.listdir(out_dir)
                                          if name == "grid" or "_class" in name and name.endswith(".png")]:
            if os.path.isdir(entry):
                shutil.rmtree(entry, ignore_errors=True)
            elif os.path.lexists(entry):
                os.remove(entry)
        if isinstance(err, OSError):
            raise cg.UsageError(f"cannot write to {out_dir}: {err.strerror or err} (nothing kept)") from None
        raise
    print(f"wrote {num_images} images and grid/grid.png to {out_dir} (G_ema of {path}, step {checkpoint['step']})")
    return 0


def main(argv=None):
    p = cg.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (its last.pt) or a checkpoint file")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--out-dir", default="fakes")
    p.add_argument("--batch-size", type=int, help="G_ema's batch (default: the run's --eval-batch, as its FID)")
    p.add_argument("--seed", type=int, default=0, help="0 <= SEED < 2**32")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    previous = {s: signal.signal(s, cg.interrupt) for s in cg.STOP_SIGNALS}   # each one: KeyboardInterrupt(signum)
    try:
        cg.check_ranges(args, [("num_images batch_size", lambda v: v is None or v >= 1, "at least 1"),
                                  ("seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)")])   # as contragan.py
        if args.device == "cuda" and not torch.cuda.is_available():
            raise cg.UsageError("--device cuda asked for, but torch sees no CUDA GPU")
        return generate_from_checkpoint(args.checkpoint, args.num_images, args.out_dir, args.batch_size,
                                        args.seed, args.device)
    except cg.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:                           # generate_from_checkpoint removed what it wrote
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
        name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(f"interrupted{name}: nothing kept in {args.out_dir}", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
