"""
What contragan.py's runs need around the method, kept apart so that contragan.py reads as the paper and
its training loop (and stays within 1,000 lines): the data sets (CIFAR, image folders, the built-in
shapes), distributed training (all of torchrun), the run folder (checkpoint files, the folder lock,
resuming) and the command line's range checks. Nothing here knows the model; a reader of the method
never needs to open this file. Sections: data -> torchrun -> run folders -> flag checks.
"""
import argparse
import hashlib
import io
import json
import os
import socket
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import numpy as np
from PIL import Image, ImageOps


class UsageError(Exception):
    """A problem with the user's input: main() prints 'error: <message>' and exits with status 2."""


# --------------------------------------------------------------------------------------------
# Data: CIFAR-10/100 (torchvision), any class-per-folder tree (ImageFolder), built-in shapes
# --------------------------------------------------------------------------------------------

def to_signed(images):  # uint8 in [0, 255] -> float in [-1, 1], the range of G's tanh (fid.py does the same)
    return images.float() / 127.5 - 1.0

def uniform_labels(n, num_classes, device, generator=None):  # y uniform over classes: training and FID
    return torch.randint(0, num_classes, (n,), device=device, generator=generator)

def balanced_labels(n, num_classes, device, generator=None):
    """n labels, each class n / K times (+-1): class after class (grid rows), or shuffled with a generator
    (mixed batches: G_ema draws with BatchNorm batch statistics, which a one-class batch would remove)."""
    y = torch.arange(n, device=device) * num_classes // n
    return y if generator is None else y[torch.randperm(n, device=device, generator=generator)]

class TensorImages(torch.utils.data.Dataset):
    """A data set held in memory as uint8 (N, 3, H, W) images and int64 (N,) labels."""

    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

SHAPES = [("circle", (230, 70, 60)), ("square", (70, 200, 90)),
          ("triangle", (80, 120, 240)), ("cross", (235, 210, 70))]

def make_shapes(n, img_size=32, seed=0):
    """The built-in data set: one coloured shape per image at a random position and size on a noisy
    dark background; class = shape and colour. Deterministic in (n, img_size, seed); no download."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPES)
    labels = labels[torch.randperm(n, generator=gen)]
    S = img_size
    r = (0.15 + 0.15 * torch.rand(n, generator=gen)) * S                   # (n,) half-size
    cx = r + (S - 2 * r) * torch.rand(n, generator=gen)                    # (n,) centre, inside
    cy = r + (S - 2 * r) * torch.rand(n, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    dx = xx[None] - cx[:, None, None]                                      # (n, S, S)
    dy = yy[None] - cy[:, None, None]
    r3 = r[:, None, None]
    masks = torch.stack([dx ** 2 + dy ** 2 < r3 ** 2,                                # circle
                         torch.maximum(dx.abs(), dy.abs()) < 0.8 * r3,               # square
                         (dy < 0.8 * r3) & (dx.abs() < (dy + r3) * 0.6),             # triangle
                         ((dx.abs() < r3 / 3) & (dy.abs() < r3)) |
                         ((dy.abs() < r3 / 3) & (dx.abs() < r3))])                  # cross
    mask = masks[labels, torch.arange(n)]                                  # (n, S, S)
    colours = torch.tensor([c for _, c in SHAPES], dtype=torch.float32)
    colour = colours[labels] + 20 * torch.randn(n, 3, generator=gen)       # (n, 3) jittered
    background = 30 + 8 * torch.randn(n, 3, S, S, generator=gen)
    images = torch.where(mask[:, None], colour[:, :, None, None], background)
    return images.clamp(0, 255).round().to(torch.uint8), labels

def shapes_class_of(images):
    """Which class each shapes image shows, or -1 for none (no network). A pixel takes the palette colour
    nearest to it if within 80 (4 sigma of the data's colour jitter); the colour of the most pixels names
    the class if those pixels are at least 1% of the image and have its form, judged by three features:
    fill, the share of their bounding box they cover (ideal: circle pi/4, square 1, triangle 1/2, cross
    5/9); below, how far their centroid lies below the box's centre, in box heights (the triangle's apex
    is up: 1/6; the others 0); roundness, their count over the area of the disc about the centroid that
    reaches their farthest pixel (ideal: circle 1, square and cross 2/pi, triangle 0.41; unlike fill, it
    does not change when the shape is tilted).
    Real images, 32x32 and 64x64: fill circle 0.67-0.90, square 1, triangle 0.48-0.63, cross 0.47-0.64;
    below triangle 0.12-0.17, the others within 0.045; roundness circle 0.80-0.96, the others 0.40-0.74.
    The ranges in `forms` add room for G's samples (blurred edges; squares often tilted and circles
    oval, which lowers fill and roundness). images: float (B, 3, H, W) in [-1, 1]."""
    forms = torch.tensor([[0.65, 0.93, -0.1, 0.1, 9],     # circle (fill lo, hi; below lo, hi; roundness hi)
                          [0.75, 1.00, -0.1, 0.1, 0.78],  # square
                          [0.40, 0.70, 0.05, 0.3, 0.78],  # triangle
                          [0.40, 0.70, -0.1, 0.1, 0.78]], device=images.device)  # cross
    rgb = (images.float() + 1) * 127.5                                     # (B, 3, H, W)
    H, W = rgb.shape[2:]
    colours = torch.tensor([c for _, c in SHAPES], dtype=rgb.dtype, device=rgb.device)
    dist2, nearest = ((rgb[:, None] - colours[None, :, :, None, None]) ** 2).sum(2).min(1)  # (B, H, W)
    nearest[dist2 > 80.0 ** 2] = -1                                        # no palette colour
    k = torch.stack([(nearest == c).sum((1, 2)) for c in range(len(SHAPES))], 1).argmax(1)  # (B,)
    mask = nearest == k[:, None, None]                                     # (B, H, W) its pixels
    n = mask.sum((1, 2))
    rows, cols = mask.any(2).float(), mask.any(1).float()                  # (B, H), (B, W)
    top, height = rows.argmax(1), H - rows.flip(1).argmax(1) - rows.argmax(1)
    fill = n / (height * (W - cols.flip(1).argmax(1) - cols.argmax(1)))
    y, x = torch.meshgrid(torch.arange(H, device=rgb.device), torch.arange(W, device=rgb.device), indexing="ij")
    cy, cx = [(mask * t).sum((1, 2))[:, None, None] / n.clamp(min=1)[:, None, None] for t in (y, x)]
    below = (cy.flatten() - top - (height - 1) / 2) / height
    reach = torch.where(mask, (y - cy) ** 2 + (x - cx) ** 2, 0).amax((1, 2)).sqrt() + 0.5  # to its pixel's edge
    roundness = n / (torch.pi * reach ** 2)
    lo, hi, below_lo, below_hi, round_hi = forms[k].T
    ok = (n >= 0.01 * H * W) & (lo <= fill) & (fill <= hi) & (below_lo <= below) & (below <= below_hi)
    return torch.where(ok & (roundness <= round_hi), k, -1)

CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}

def load_cifar(name, data_dir, train):
    """CIFAR-10/100 via torchvision, downloaded into data_dir once; offline, fail in seconds."""
    import torchvision
    cls = getattr(torchvision.datasets, CIFAR[name])
    old_timeout = socket.getdefaulttimeout()
    try:
        ds = cls(data_dir, train=train, download=False)
    except RuntimeError:                                       # not there yet: download it
        try:
            socket.setdefaulttimeout(20)                       # a dead network fails, never hangs
            ds = cls(data_dir, train=train, download=True)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UsageError(
                f"could not download {name} ({cls.filename} from {cls.url}): {reason}. Offline: fetch that file "
                f"elsewhere and put it, or its extracted folder {cls.base_folder}/, in --data-dir "
                f"({os.path.join(data_dir, cls.filename)})") from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, 3, 32, 32) uint8
    return TensorImages(images, torch.tensor(ds.targets), list(ds.classes))

# GIF, animated WebP and multi-page TIFF: the first frame. Other types (.heic, .avif, ...) are left out, said once.
IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")

def to_rgb(im):
    """A PIL image as 8-bit RGB by its real range (convert("RGB") clips: 16-bit would turn white, float
    black): 16-bit grey (I;16*, and I, PIL's 32-bit mode, read as 16-bit) / 257, float (F) in [0, 1]
    * 255, other values refused (ValueError); transparent pixels over white; EXIF rotation applied."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a, top = np.asarray(im, dtype=np.float64), 1.0 if im.mode == "F" else 65535.0
        if not (a.min() >= 0 and a.max() <= top):             # NaN fails too
            raise ValueError(f"mode {im.mode} with values in [{a.min():g}, {a.max():g}], not [0, {top:g}]")
        return Image.fromarray(np.round(a * (255 / top)).astype(np.uint8)).convert("RGB")
    if {"A", "a"} & set(im.getbands()) or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")

class SkipUnreadable(torch.utils.data.Dataset):
    """An image folder whose broken files (real folders hold some) are skipped when drawn, each named
    once in a warning, the next image taking its place: deterministic, so a resumed run draws the same
    images, and nothing is decoded up front (ImageNet's 1.28M files would cost an hour every start)."""

    def __init__(self, root, samples, classes, transform):
        self.root, self.samples, self.classes, self.transform = root, samples, classes, transform
        # in shared memory: DataLoader workers (new ones every epoch) all see which files were named
        self.warned = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            try:
                with Image.open(self.samples[j][0]) as im:
                    return self.transform(to_rgb(im)), self.samples[j][1]
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises
                if not self.warned[j]:
                    self.warned[j] = True
                    print(f"warning: skipped unreadable image {self.samples[j][0]} ({type(err).__name__}: "
                          f"{err}); the next image is used in its place", file=sys.stderr, flush=True)
        raise UsageError(f"no image in {self.root} can be read")

def load_folder(root, img_size):
    """Any class-per-folder tree (root/<class>/.../<image>), resized and centre-cropped to img_size. Hidden
    files and folders (.name) are left out. Linked folders are followed; a folder or file met twice
    (a loop such as class/up -> ..) counts once, and one met in two classes is refused."""
    from torchvision import transforms as T
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist (give it with --data-dir)")
    owner, samples = {os.path.realpath(root): None}, []   # the class of each folder and file met, by real path

    def first_time(real, path, k):                            # real: the path with every link resolved
        n = len(owner)
        if owner.setdefault(real, k) not in (k, None):
            raise UsageError(f"{path} is also in class {classes[owner[real]]!r} (through a link): "
                             f"each image needs one class")
        return len(owner) > n
    try:
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        if not classes:
            if any(e.lower().endswith(IMG_EXT) for e in entries):
                raise UsageError(f"{root!r} holds images but no class sub-folders: put each class's "
                                 f"images in {root}/<class name>/")
            raise UsageError(f"image folder {root!r} is empty: it needs one sub-folder of images per class")
        left_out = [os.path.join(root, e) for e in entries if e not in classes]
        for k, c in enumerate(classes):
            stack, found = [os.path.join(root, c)], []
            while stack:
                d = stack.pop()
                if first_time(real_d := os.path.realpath(d), d, k):
                    for e in os.scandir(d):
                        if e.name.startswith("."):
                            continue
                        if e.is_dir():
                            stack.append(e.path)
                        elif not (e.is_file() and e.name.lower().endswith(IMG_EXT)):  # FIFOs, devices too
                            left_out.append(e.path)
                        elif first_time(os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_d, e.name),
                                        e.path, k):
                            found.append(e.path)
            if not found:
                raise UsageError(f"class folder {os.path.join(root, c)} holds no image ({' '.join(IMG_EXT)})")
            samples += [(p, k) for p in sorted(found, key=os.path.split)]
    except OSError as err:
        raise UsageError(f"cannot read {err.filename}: {err.strerror}") from None
    if left_out and is_main_process():
        print(f"note: {len(left_out)} files in {root} are not read: not in a class folder or not "
              f"{' '.join(IMG_EXT)} (e.g. {left_out[0]})", flush=True)
    resize = T.Compose([T.Resize(img_size), T.CenterCrop(img_size), T.PILToTensor()])
    return SkipUnreadable(root, samples, classes, resize)

def load_data(cfg):
    """(train, heldout, num_classes). heldout: CIFAR's test split; shapes: a fresh draw; folder: a
    fixed 5% of the images set aside (none when the folder is tiny). It feeds D's held-out accuracy
    and, for CIFAR and shapes, FID's reference statistics (the paper: CIFAR-10's 10k test images)."""
    if cfg.dataset != "shapes" and os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        raise UsageError(f"--data-dir {cfg.data_dir} is a file, not a folder")
    if cfg.dataset in CIFAR:
        if cfg.img_size != 32:
            raise UsageError(f"{cfg.dataset} images are 32x32; --img-size {cfg.img_size} is not supported for it")
        train, heldout = load_cifar(cfg.dataset, cfg.data_dir, True), load_cifar(cfg.dataset, cfg.data_dir, False)
        return train, heldout, len(train.classes)
    if cfg.dataset == "shapes":
        n, S = max(cfg.shapes_size, cfg.fid_images), cfg.img_size     # make_shapes' peak: ~100 bytes a pixel
        if hasattr(os, "sysconf") and 100 * n * S * S > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            raise UsageError(f"drawing {n} shapes images of {S}x{S} (--shapes-size, --fid-images) needs about "
                             f"{100 * n * S * S / 2 ** 30:.0f} GB of memory, more than this machine has")
        classes = [n for n, _ in SHAPES]
        train = TensorImages(*make_shapes(cfg.shapes_size, cfg.img_size, seed=0), classes)
        return train, TensorImages(*make_shapes(max(cfg.fid_images, 1024), cfg.img_size, seed=1), classes), len(classes)
    data = load_folder(cfg.data_dir, cfg.img_size)
    n_hold = len(data) // 20 if len(data) >= 200 else 0
    # train in a fixed random order, not class by class: FID's reference is its first --fid-images
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234)).tolist()
    Subset = torch.utils.data.Subset
    return Subset(data, order[n_hold:]), Subset(data, order[:n_hold]) if n_hold else None, len(data.classes)

def can_write(folder):
    """Whether a file can be created in folder (made if missing): tried, since os.access says yes to root
    on a read-only mount."""
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(probe := os.path.join(folder, f".write-test-{os.getpid()}"), os.O_CREAT | os.O_WRONLY))
        os.remove(probe)
        return True
    except OSError:
        return False

class Batches:
    """Endless real batches in [-1, 1], flipped at random when `flip` (the authors' only augmentation:
    on for CIFAR-10, off for Tiny ImageNet). A DistributedSampler gives each torchrun rank its share;
    (epoch, batch) is what a checkpoint saves, so a resumed run sees the very same batches."""

    def __init__(self, dataset, local_batch, rank, world, seed, device, num_workers=0, flip=True):
        if len(dataset) < local_batch * world:
            raise UsageError(f"the data set has {len(dataset)} images, fewer than one batch of {local_batch * world}")
        self.dataset, self.batch, self.device, self.num_workers = dataset, local_batch, device, num_workers
        self.flip = flip
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.pos, self._it = 0, 0, None
        if isinstance(dataset, TensorImages):                  # in memory: keep it on the device
            self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None

    def _batches(self):
        self.sampler.set_epoch(self.epoch)
        idx = list(self.sampler)[self.pos * self.batch:]
        n = len(idx) // self.batch
        if isinstance(self.dataset, TensorImages):             # in memory: index, no collation
            idx = torch.tensor(idx, device=self.device)
            for b in range(n):
                ids = idx[b * self.batch:(b + 1) * self.batch]
                yield self.images[ids], self.labels[ids]
        else:
            yield from torch.utils.data.DataLoader(
                torch.utils.data.Subset(self.dataset, idx[:n * self.batch]), batch_size=self.batch,
                num_workers=self.num_workers, pin_memory=self.device.type == "cuda")

    def __next__(self):
        while True:
            if self._it is None:
                self._it = self._batches()
            try:
                images, labels = next(self._it)
                break
            except StopIteration:
                self.epoch, self.pos, self._it = self.epoch + 1, 0, None
        self.pos += 1
        x = to_signed(images.to(self.device, non_blocking=True))   # (B, 3, H, W)
        if self.flip:
            flip = torch.rand(x.shape[0], device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x, labels.to(self.device, non_blocking=True)

def fixed_sample(dataset, n, seed):
    """A fixed random subset as uint8 (n, 3, H, W) images and (n,) labels (D's accuracy checks)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(dataset, TensorImages):
        return dataset.images[order], dataset.labels[order]
    items = [dataset[i] for i in order.tolist()]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# --------------------------------------------------------------------------------------------
# Distributed training (torchrun): the process group, DDP wrappers, the 2C all-gather, ranks agreeing
# to stop, every rank's RNG state. All that changes under torchrun; one process skips all of it.
# --------------------------------------------------------------------------------------------

def is_main_process():
    return os.environ.get("RANK", "0") == "0"                 # only rank 0 prints, writes and errs

def pick_device(choice, index=0, tf32=True):
    """--device auto|cuda|cpu; on a GPU, TF32 as --tf32 says and cuDNN autotuning."""
    use_cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(index)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)

def setup_device(cfg):
    """(device, rank, world) from torchrun's environment; joins the process group when world > 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")), cfg.tf32)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
        # torch.distributed.nn's all_gather is the public differentiable collective; recent torch
        # versions flag it as deprecated in favour of a private one, which we do not use.
        warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")
    return device, rank, world

def ddp(module, world):
    """DistributedDataParallel around a module that trains (G, D); the module itself in one process."""
    if world == 1:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

def gather_global_batch(embed, proxy, labels):
    """Under DDP, all-gather so the 2C loss sees the global batch; a no-op in a single process.

    torch.distributed.nn's all_gather is differentiable: every rank computes the same loss on the
    global batch, and its backward sums each rank's gradient for the local slice over ranks. DDP then
    averages parameter gradients over ranks, which turns that sum back into exactly the gradient of
    the single-process loss on the whole batch (tested in test_contragan.py).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embed, proxy, labels
    from torch.distributed.nn.functional import all_gather
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)                        # labels need no gradient
    return torch.cat(all_gather(embed)), torch.cat(all_gather(proxy)), torch.cat(all_labels)

def any_rank(flag, device, world):
    """True on every rank when flag (a bool or a 0-d tensor) is true on any: all ranks stop together."""
    flag = torch.as_tensor(flag, device=device).to(torch.int32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

def wait_for_rank0(world):
    if world > 1:
        dist.barrier()

def rng_states(device, world):
    """Every rank's RNG state (rank 0 saves them all), so that a resumed run draws the same numbers."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states

def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Run folders: checkpoint files, the folder lock, resuming, metrics.jsonl
# --------------------------------------------------------------------------------------------

# Flags that may differ when a run is resumed (the learning rates too: the way on after a blow-up);
# every other flag must match the checkpoint.
RUN_FLAGS = {"steps", "log_every", "eval_every", "fid_images", "fid_weights", "eval_batch", "intra_fid",
             "inception_score", "device", "num_workers", "compile", "resume", "run_dir", "data_dir",
             "collapse_gap", "collapse_patience", "acc_images", "preset", "lr_g", "lr_d"}

SEAL = b"contragan-sha256:"  # then the sha256 of torch.save's bytes before it; torch.load ignores this tail

def save_checkpoint(path, state):
    """Atomic: write a temporary file (torch.save's bytes, then SEAL and their sha256), flush it to disk,
    rename it over the old one. config.json next to it is written only here, so it always describes a
    saved run. A failed write (a full disk) removes the temporary file and says what is intact."""
    tmp, digest, saved = path + ".tmp", hashlib.sha256(), False
    try:
        with open(tmp, "wb") as f:
            torch.save(state, argparse.Namespace(write=lambda b: digest.update(b) or f.write(b), flush=f.flush))
            f.write(SEAL + digest.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        saved = True
        with open(tmp, "w") as f:
            json.dump({**state["config"], "num_classes": state["num_classes"], "world_size": len(state["rng"])}, f, indent=2)
        os.replace(tmp, os.path.join(os.path.dirname(path), "config.json"))
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = f"{path} is saved, config.json not updated" if saved else \
            f"the previous {path} is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UsageError(f"cannot save {path}: {err.strerror or err}; {kept}") from None

def load_checkpoint(path):
    """(checkpoint, path): a run folder's last.pt or a file, its sha256 checked when it has one (a
    checkpoint written before checksums has none and is read as it is)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    n = len(SEAL) + 64
    if data[-n:-64] == SEAL and hashlib.sha256(memoryview(data)[:-n]).hexdigest().encode() != data[-64:]:
        raise UsageError(f"checkpoint {path} is corrupt: its bytes do not match the sha256 saved with them "
                         f"(a disk or copy fault); use another checkpoint or a backup copy")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:                                   # torch's own text is a paragraph of zip internals
        raise UsageError(f"checkpoint {path} is unreadable: truncated, corrupt or not a torch file "
                         f"({type(err).__name__})") from None
    if not (isinstance(checkpoint, dict) and {"G", "D", "G_ema", "config", "step"} <= checkpoint.keys()):
        raise UsageError(f"{path} is a torch file but not a contragan.py checkpoint (no G, D, G_ema, config, step)")
    missing = sorted({"opt_G", "opt_D", "num_classes", "data", "rng", "best_fid", "best_step"} - checkpoint.keys())
    if missing or not isinstance(checkpoint["config"], dict):
        raise UsageError(f"{path} is not a checkpoint of this contragan.py version (no {', '.join(missing) or 'config'})")
    return checkpoint, path

def claim_run_dir(run_dir, resume_path=None):
    """One run owns its folder. Refused: a folder that holds another run (unless it is the one resumed),
    an earlier checkpoint (best.pt) resumed in its folder, whose last.pt and metrics.jsonl it would
    roll back, and a folder that a live process holds (run.lock, created exclusively, holds its pid; the
    lock of a process that is gone, e.g. killed with -9, is taken over). Returns release(), which removes
    the lock and the folders this start created if they are still empty: a failed start leaves nothing."""
    here = resume_path is not None and os.path.realpath(run_dir) == os.path.realpath(os.path.dirname(resume_path))
    if here and os.path.basename(resume_path) != "last.pt" and os.path.exists(os.path.join(run_dir, "last.pt")):
        raise UsageError(f"resuming {resume_path} in its own folder would overwrite {run_dir}/last.pt and cut "
                         f"metrics.jsonl: branch from it with --run-dir NEW, or continue with --resume {run_dir}")
    if not here and any(os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "config.json")):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --run-dir")
    lock, created = os.path.join(run_dir, "run.lock"), not os.path.isdir(run_dir)
    try:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                with open(lock) as f:
                    pid = f.read().strip() or str(os.getpid())  # empty: its owner is writing its pid
                try:
                    os.kill(int(pid), 0)                       # signal 0 only asks whether it exists
                except ProcessLookupError:                     # gone (killed with -9): take the lock over
                    os.remove(lock)
                    continue
                except PermissionError:                        # alive, another user's
                    pass
                raise UsageError(f"{run_dir} is in use by another run (process {pid}; its lock is {lock})")
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    except OSError as err:
        raise UsageError(f"cannot write to run folder {run_dir}: {err.strerror or err}") from None

    def release():
        os.remove(lock)
        for folder in [os.path.join(run_dir, "samples")] + [run_dir] * created:
            try:
                os.rmdir(folder)                               # only if empty
            except OSError:
                pass
    return release

def merge_resume_config(cfg, explicit, checkpoint, path):
    """The checkpoint's configuration, with the run flags (RUN_FLAGS) of this command on top. A model
    or training flag given now that differs from the checkpoint is refused: it is another run."""
    saved = checkpoint["config"]
    for key in sorted(saved.keys() - vars(cfg).keys()):       # a flag this version would silently drop
        raise UsageError(f"checkpoint {path} is from a newer contragan.py: it has --{key.replace('_', '-')}, "
                         f"which this one does not know")
    for key, value in explicit.items():
        if key not in RUN_FLAGS and key in saved and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"checkpoint {path} is from another configuration: it has {flag} {saved[key]}, "
                             f"this command asks for {value} (drop the flag to resume it)")
    merged = {**vars(cfg), **saved}                            # flags newer than the checkpoint: defaults
    merged.update({k: v for k, v in explicit.items() if k in RUN_FLAGS})
    return argparse.Namespace(**merged)

def evaluations_left(step, steps, eval_every):
    """How many evaluations the loop still runs at steps step..steps (every eval_every and at the end)."""
    return steps // eval_every - (step - 1) // eval_every + (steps % eval_every > 0)

def format_duration(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

def cut_metrics(path, step):
    """metrics.jsonl cut back to the checkpoint's step (all of it on a fresh start): a crash before the
    first checkpoint leaves lines that a rerun would otherwise repeat. A torn last line goes too."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------
# The command line's checks
# --------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):                                  # one line, not usage + error
        self.exit(2, f"error: {message} (see --help)\n")

# Each numeric flag's range, as one table: (flags, test, what the value must be). NaN fails every
# test, so "nan" and "inf" are refused along with the negative and zero values that make no sense.
FLAG_RANGES = [
    ("steps log_every eval_every d_steps batch_size eval_batch g_width d_width z_dim shared_dim embed_dim "
     "shapes_size acc_images collapse_patience", lambda v: v >= 1, "at least 1"),
    ("num_workers ema_start", lambda v: v >= 0, "at least 0"),
    ("seed", lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),      # torch's seeds are 64-bit
    ("cond_lambda collapse_gap", lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
    ("temperature lr_g lr_d adam_eps", lambda v: 0 < v < float("inf"), "> 0 and finite"),
    ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
]

def check_ranges(cfg, table=FLAG_RANGES):
    for names, ok, what in table:
        for name in names.split():
            if not ok(getattr(cfg, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be {what} (got {getattr(cfg, name)})")
