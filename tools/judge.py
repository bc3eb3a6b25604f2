"""Class consistency on any data set, read by a judge that is not D: a small CNN trained on the real images.

    python tools/judge.py runs/shapes-2c-s0                       # a run folder or checkpoint: its data set
    python tools/judge.py runs/shapes-2c-s0 --judges 5            # five judges (seeds 0-4) instead of three
    python tools/judge.py fakes/ --dataset folder --data-dir data/digits --json   # tools/sample.py's PNGs
    python contragan.py --preset cpu-demo --judge JUDGE.pt2       # the judge's reading at every evaluation

The judge (Judge below) is trained on the run's training images, as contragan.py loads them (cg.load_data: the
same data, split, size and flips), and tested on its held-out images (CIFAR's test split, a fresh shapes draw,
5% of a folder): that accuracy, printed beside every score, is the ceiling of what it can read. It is trained
once per data set and seed and kept in --cache-dir, so that every run on that data is read by the same judges;
the file is self-contained (a torch.export program with its info inside; cg.load_judge reads it, no class
needed), so `contragan.py --judge FILE` logs its reading (one judge's) into metrics.jsonl.

It reads G_ema's fakes (class-balanced labels, shuffled, so that every batch mixes classes, drawn with
BatchNorm batch statistics as tools/sample.py and training's evaluation draw them), or a folder of
<index>_class<label>.png files, into an asked x judged matrix: the share judged as asked (consistency), the
share after the best one-to-one relabelling of the classes (relabelled; high only there: G draws consistent
classes under the wrong labels), and its confidence. A classifier has no "none": a blank or a blur lands in
some class. The share of fakes it reads with less confidence than 95% of the held-out reals (low_confidence;
5% on reals) can point at such images, but need not (docs/judge.md).

A judge's reading of fakes carries the judge: two judges as good on held-out reals can read the same fakes 5-13
points apart (docs/judge.md). So --judges N (default 3) trains N judges of one recipe, judge i with seed i (each
cached, the seed in its file name), and reads the same fakes with each: the printed line gives their mean, range
(min..max) and each one's share. --json: the keys of one reading (consistency, relabelled, matrix, confidence,
low_confidence, judge_heldout_accuracy, judge, ...) are the FIRST judge's (seed 0), as with one judge; the
spread is in consistency_mean, consistency_min, consistency_max and relabelled_mean, relabelled_min,
relabelled_max; judges lists every judge's reading (its file, seed, shares and matrix). Quote the mean and range.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import contragan as cg  # noqa: E402
import fid  # noqa: E402

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "contragan")


class Judge(nn.Module):
    """Images in [-1, 1] (B, 3, H, W), H, W >= 16 -> (B, K) class logits: four blocks of 3x3 conv, BatchNorm, ReLU
    and 2x2 max-pool (width, 2, 4, 8 x width channels), global average pooling, one linear layer."""

    def __init__(self, num_classes, width=16):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def classify(judge, images, batch_size=256):
    """(classes, confidences) of images (uint8, or float in [-1, 1]): each one's arg-max class and its softmax share."""
    device = next(judge.parameters()).device
    logits = [judge(cg.to_signed(x.to(device)) if x.dtype == torch.uint8 else x.to(device).float())
              for x in images.split(batch_size)]
    confidence, classes = torch.cat(logits).float().softmax(1).cpu().max(1)
    return classes, confidence


def save_judge(judge, info, path):
    """The judge as a torch.export program (eval mode: BatchNorm's running statistics baked in; any batch size; on
    the CPU, loadable anywhere) with info as contragan-judge.json inside, written atomically: a run reading it sees
    all or nothing. torch.export, not TorchScript: torch.jit.script/trace warn of their deprecation in torch 2.14."""
    size = info["data"]["img_size"]
    program = torch.export.export(judge.cpu().eval(), (torch.zeros(2, 3, size, size),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:                       # a file object: any name, not only *.pt2
        torch.export.save(program, f, extra_files={"contragan-judge.json": json.dumps(info)})
    os.replace(path + ".tmp", path)


def data_config(dataset, data_dir="data", img_size=32, shapes_size=10000, flip=True):
    """contragan.py's configuration for load_data (fid_images 0: a shapes held-out set of 1,024 for every run)."""
    cfg = cg.build_parser().parse_args([])
    cfg.dataset, cfg.data_dir, cfg.img_size, cfg.shapes_size, cfg.flip = dataset, data_dir, img_size, shapes_size, flip
    cfg.fid_images = 0
    return cfg


def load_split(cfg):
    """(train, heldout) as uint8 (N, 3, H, W) images and (N,) labels, the class names, and the data's key."""
    train, held, K = cg.load_data(cfg)
    if held is None:
        raise cg.UsageError(f"{cfg.data_dir} has under 200 images: contragan.py keeps none held out, so the judge "
                            f"could not be tested")
    classes = train.classes if hasattr(train, "classes") else train.dataset.classes   # folders: a Subset
    train, held = [cg.fixed_sample(d, len(d), seed=0) for d in (train, held)]   # all of it, in memory
    key = {"dataset": cfg.dataset, "img_size": cfg.img_size, "flip": cfg.flip, "classes": list(classes),
           "train_images": len(train[1]), "heldout_images": len(held[1])}
    if cfg.dataset == "shapes":
        key["shapes_size"] = cfg.shapes_size
    else:
        key["data_dir"] = os.path.realpath(cfg.data_dir)
    return train, held, key


def cache_path(key, cache_dir, seed=0):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"judge-{key['dataset']}-{key['img_size']}px-{digest}-seed{seed}.pt2")


def augment(x, flip, shift, gen, blur=True):
    """Random flips (as contragan.py's, when the run flips), shifts of up to `shift` pixels (edges repeated), and
    (blur) a random mix with the 3x3 box blur and Gaussian noise (sigma up to 0.1), so that it reads G's smoother,
    noisier images as it reads reals (without them: 89% agreement with the colour reader on blurred shapes)."""
    B, _, H, W = x.shape
    if flip:
        x = torch.where(torch.rand(B, 1, 1, 1, device=x.device, generator=gen) < 0.5, x.flip(3), x)
    dy, dx = (torch.randint(-shift, shift + 1, (2, B, 1), device=x.device, generator=gen))
    rows = (torch.arange(H, device=x.device) + dy).clamp(0, H - 1)            # (B, H)
    cols = (torch.arange(W, device=x.device) + dx).clamp(0, W - 1)            # (B, W)
    x = x[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if not blur:
        return x
    a = torch.rand(B, 1, 1, 1, device=x.device, generator=gen)  # blurs and noise, as in G's fakes
    x = x + a * (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x)
    sigma = 0.1 * torch.rand(B, 1, 1, 1, device=x.device, generator=gen)
    return x + sigma * torch.randn(x.shape, device=x.device, generator=gen)


def train_judge(train, K, flip, width, steps, batch_size, lr, device, seed=0, log=print):
    """Judge trained by SGD (Nesterov, one-cycle learning rate, weight decay 5e-4) on random batches."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    images, labels = train[0].to(device), train[1].to(device)
    judge = Judge(K, width).to(device).train()
    opt = torch.optim.SGD(judge.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(labels), (batch_size,), device=device, generator=gen)
        x = augment(cg.to_signed(images[idx]), flip, max(images.shape[-1] // 16, 1), gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(judge(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(steps // 5, 1) == 0:
            log(f"judge step {step}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f} s")
    return judge.eval(), time.time() - t0


def get_judge(cfg, path=None, cache_dir=DEFAULT_CACHE, retrain=False, width=None, steps=None, batch_size=None,
              lr=None, device="auto", log=print, seed=0, split=None):
    """(judge, info, path): the data set's judge of this seed from path (default: its file in cache_dir), trained
    if absent. split: load_split(cfg)'s answer, when the caller has it already."""
    device = cg.pick_device(device)
    train, held, key = split or load_split(cfg)
    path = path or cache_path(key, cache_dir, seed)
    if os.path.isfile(path) and not retrain:
        judge, info = cg.load_judge(path, device)
        if info["data"] != key:
            raise cg.UsageError(f"judge {path} was trained on other data ({info['data']}), not {key}: "
                                f"give --retrain to replace it, or another --judge-file")
        return judge, info, path
    if not fid.can_write(folder := os.path.dirname(os.path.abspath(path))):   # tried before minutes of training
        raise cg.UsageError(f"cannot write the judge to {path}: {folder} is not writable (give a writable "
                            f"--cache-dir or --judge-file)")
    gpu = device.type == "cuda"                                # CPU: seconds on small data; GPU: CIFAR in minutes
    width, steps = width or (64 if gpu else 16), steps or (3000 if gpu else 500)
    batch_size = batch_size or (256 if gpu else 64)
    lr = lr or 0.1 * batch_size / 128
    log(f"training the judge for {cfg.dataset} ({len(train[1])} images; width {width}, {steps} steps of "
        f"{batch_size}, seed {seed}, {device}) -> {path}")
    judge, seconds = train_judge(train, len(key["classes"]), cfg.flip, width, steps, batch_size, lr, device, seed,
                                 log=log)
    classes, confidence = classify(judge, held[0])
    info = {"num_classes": len(key["classes"]), "width": width, "data": key,
            "heldout_accuracy": (classes == held[1]).float().mean().item(), "heldout_images": len(held[1]),
            "heldout_confidence": confidence.mean().item(),
            "heldout_confidence_q05": confidence.quantile(0.05).item(),
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device),
                         "seconds": round(seconds, 1)}}
    save_judge(judge, info, path)
    log(f"judge trained in {seconds:.0f} s: {info['heldout_accuracy']:.4f} on {len(held[1])} held-out images")
    return (*cg.load_judge(path, device), path)               # as every later run reads it: from the file


def score(judge, info, asked, images):
    """The judge's reading of images drawn for the labels `asked`: the asked x judged matrix and its shares."""
    K = info["num_classes"]
    judged, confidence = classify(judge, images)
    counts, consistency, relabelled = cg.confusion(asked, judged, K)
    return {"consistency": consistency, "relabelled": relabelled, "chance": 1 / K,
            "judge_heldout_accuracy": info["heldout_accuracy"], "judge_heldout_images": info["heldout_images"],
            "confidence": confidence.mean().item(), "heldout_confidence": info["heldout_confidence"],
            "low_confidence": (confidence < info["heldout_confidence_q05"]).float().mean().item(),
            "num_images": len(asked), "classes": info["data"]["classes"],
            "matrix": counts[:, :K].tolist()}                 # rows: asked; columns: judged (no "none")


def fakes_from_checkpoint(checkpoint, num_images, seed=0, device="cpu"):
    """(labels, images in [-1, 1]) from a checkpoint's G_ema, drawn as tools/sample.py draws them."""
    cfg, K = argparse.Namespace(**checkpoint["config"]), checkpoint["num_classes"]
    G = cg.build_models(cfg, K)[0]
    G.load_state_dict(checkpoint["G_ema"])
    G.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    y = cg.balanced_labels(num_images, K, device, gen)         # class-balanced, shuffled: mixed batches
    return y.cpu(), cg.generate(G, y, cfg.z_dim, cfg.eval_batch, gen).cpu()


def fakes_from_folder(folder):
    """(labels, uint8 images) of a folder's <index>_class<label>.png files (tools/sample.py's names)."""
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d+_class\d+\.png", n))
    if not names:
        raise cg.UsageError(f"{folder} holds no <index>_class<label>.png images (tools/sample.py writes them)")
    images = []
    for name in names:                                         # read as training and fid.py read images
        images.append(torch.from_numpy(np.array(cg.fid.read_image(os.path.join(folder, name)))).permute(2, 0, 1))
    if len({im.shape for im in images}) > 1:
        raise cg.UsageError(f"the images in {folder} differ in size")
    return torch.tensor([int(n.split("_class")[1][:-4]) for n in names]), torch.stack(images)


def spread(readings):
    """Several judges' readings of the same fakes -> the first judge's reading, every judge's (judges), and the mean,
    min and max over the judges of consistency and relabelled (consistency_mean, consistency_min, ...)."""
    out = {**readings[0], "judges": readings}
    for k in ("consistency", "relabelled"):
        values = [r[k] for r in readings]
        out.update({f"{k}_mean": sum(values) / len(values), f"{k}_min": min(values), f"{k}_max": max(values)})
    return out


def report(r):
    """The reading as text: the judges' mean, range and each one's share, then the first judge's confidence and
    matrix with class names."""
    judges, names = r["judges"], [str(c)[:9] for c in r["classes"]]
    seeds = ", ".join(str(j["seed"]) for j in judges)
    accuracies = ", ".join(f"{j['judge_heldout_accuracy']:.3f}" for j in judges)
    lines = [f"{len(judges)} judge(s), seed(s) {seeds}: {accuracies} on {r['judge_heldout_images']} held-out real "
             f"images (their ceiling) | {r['num_images']} images of {r['source']}"]
    if len(judges) == 1:
        lines.append(f"class consistency {r['consistency']:.3f} (chance {r['chance']:.3f}), relabelled "
                     f"{r['relabelled']:.3f}: one judge's reading; on fakes another judge's can differ by 5-13 "
                     f"points (docs/judge.md): --judges 3 gives the spread")
    else:
        for key, name in (("consistency", "class consistency"), ("relabelled", "relabelled")):
            each = ", ".join(f"{j[key]:.3f}" for j in judges)
            lines.append(f"{name} {r[key + '_mean']:.3f}: mean of {len(judges)} judges, range "
                         f"{r[key + '_min']:.3f}..{r[key + '_max']:.3f} ({each})")
        lines[-2] += f" | chance {r['chance']:.3f}"
    lines += [f"first judge {r['judge']}: confidence {r['confidence']:.3f} (held-out reals "
              f"{r['heldout_confidence']:.3f}), low-confidence share {r['low_confidence']:.3f} (held-out reals 0.05)",
              "asked x judged by the first judge (rows: asked):", " " * 10 + "".join(f"{c:>10}" for c in names)]
    return "\n".join(lines + [f"{c:>10}" + "".join(f"{v:>10}" for v in row) for c, row in zip(names, r["matrix"])])


def run(args, log):
    checkpoint = None
    if os.path.isdir(args.source) and not os.path.isfile(os.path.join(args.source, "last.pt")):
        if not args.dataset:
            raise cg.UsageError(f"{args.source} is a folder of images: give its data set with --dataset")
        cfg = data_config(args.dataset, args.data_dir or "data", args.img_size, args.shapes_size, args.flip)
    else:
        checkpoint, path = cg.load_checkpoint(args.source)
        c = checkpoint["config"]
        if args.dataset and args.dataset != c["dataset"]:
            raise cg.UsageError(f"{path} was trained on --dataset {c['dataset']}, not {args.dataset}")
        cfg = data_config(c["dataset"], args.data_dir or c["data_dir"], c["img_size"], c["shapes_size"],
                          c.get("flip", True))
    split = load_split(cfg)                                    # loaded once for every judge
    judges = [get_judge(cfg, path, args.cache_dir, args.retrain, args.width, args.steps, args.batch_size, None,
                        args.device, log, seed, split)        # judge i: seed i (when it is trained here)
              for seed, path in enumerate(args.judge_file or [None] * args.judges)]
    info, device = judges[0][1], next(judges[0][0].parameters()).device
    if checkpoint is not None:
        asked, images = fakes_from_checkpoint(checkpoint, args.num_images, args.seed, device)
    else:
        asked, images = fakes_from_folder(args.source)
    if asked.max() >= info["num_classes"] or images.shape[-1] != cfg.img_size:
        raise cg.UsageError(f"{args.source} has labels up to {asked.max()} and {images.shape[-1]}px images; the "
                            f"judge reads {info['num_classes']} classes at {cfg.img_size}px")
    readings = [{**score(judge, info, asked, images), "judge": path, "seed": info.get("training", {}).get("seed", 0)}
                for judge, info, path in judges]                # files of before the seed was recorded: seed 0
    return {**spread(readings), "source": args.source}


def main(argv=None):
    p = cg.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder or checkpoint (its config gives the data set), or a folder of "
                   "<index>_class<label>.png images")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder", "shapes"])
    p.add_argument("--data-dir", help="as contragan.py's (default: the run's, or 'data')")
    p.add_argument("--img-size", type=int, default=32, help="for a folder of PNGs: as the run's")
    p.add_argument("--shapes-size", type=int, default=10000, help="for a folder of PNGs: as the run's")
    p.add_argument("--flip", default=True, action=argparse.BooleanOptionalAction,
                   help="for a folder of PNGs: as the run's (the judge learns flipped images when it flips)")
    p.add_argument("--num-images", type=int, default=1000, help="fakes drawn from a checkpoint's G_ema")
    p.add_argument("--seed", type=int, default=0, help="the fakes' noise and labels")
    p.add_argument("--judges", type=int, help="how many judges read the fakes, judge i trained with seed i "
                   "(default: 3, or one per --judge-file)")
    p.add_argument("--judge-file", action="append", help="a judge to use, or to write when absent (default: in "
                   "--cache-dir); give it once per judge")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="one judge file per data set and seed")
    p.add_argument("--retrain", action="store_true", help="train the judges again and replace their files")
    p.add_argument("--width", type=int, help="judge width (default: 64 on a GPU, 16 on a CPU)")
    p.add_argument("--steps", type=int, help="judge training steps (default: 3,000 on a GPU, 500 on a CPU)")
    p.add_argument("--batch-size", type=int, help="judge training batch (default: 256 on a GPU, 64 on a CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    try:
        cg.check_ranges(args, [("num_images", lambda v: v >= 1, "at least 1"),
                               ("judges width steps batch_size", lambda v: v is None or v >= 1, "at least 1")])
        if args.judge_file and args.judges not in (None, len(args.judge_file)):
            raise cg.UsageError(f"--judges {args.judges} with {len(args.judge_file)} --judge-file: give one file "
                                f"per judge")
        if args.judge_file and len(set(map(os.path.realpath, args.judge_file))) < len(args.judge_file):
            raise cg.UsageError("the same --judge-file twice: one judge would be counted twice in the spread")
        args.judges = args.judges or 3
        r = run(args, log)
    except (cg.UsageError, fid.FIDError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
