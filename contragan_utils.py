"""
What contragan.py's runs need around the method, kept apart so that contragan.py reads as the paper and
its training loop (and stays within 1,000 lines): the data sets (CIFAR, image folders, the built-in
shapes), distributed training (all of torchrun), the run folder (checkpoint files, the folder lock,
resuming) and the command line's range checks. Nothing here knows the model; a reader of the method
never needs to open this file. Sections: data -> torchrun -> run folders -> flag checks.
"""
import argparse
import json
import os
import socket
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


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
    """Which class each shapes image shows, read off its colour (no network): the class whose colour
    is nearest to the most pixels. images: float (B, 3, H, W) in [-1, 1]. Used for class consistency."""
    rgb = (images.float() + 1) * 127.5                                     # (B, 3, H, W)
    colours = torch.tensor([c for _, c in SHAPES], dtype=rgb.dtype, device=rgb.device)
    dist2 = ((rgb[:, None] - colours[None, :, :, None, None]) ** 2).sum(2)  # (B, K, H, W)
    near = dist2 < 60.0 ** 2                                               # pixel within 60 of a colour
    return near.flatten(2).sum(2).argmax(1)                                # (B,)

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

IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

class SkipUnreadable(torch.utils.data.Dataset):
    """An image folder whose broken files (real folders hold some) are skipped when drawn, each named
    once in a warning, the next image taking its place: deterministic, so a resumed run draws the same
    images, and nothing is decoded up front (ImageNet's 1.28M files would cost an hour every start)."""

    def __init__(self, folder):
        self.folder, self.classes, self.warned = folder, folder.classes, set()

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            try:
                return self.folder[j]
            except (OSError, SyntaxError, ValueError) as err:  # what PIL raises on a broken file
                if j not in self.warned:
                    self.warned.add(j)
                    print(f"warning: skipped unreadable image {self.folder.samples[j][0]} ({type(err).__name__}); "
                          f"the next image is used in its place", file=sys.stderr, flush=True)
        raise UsageError(f"no image in {self.folder.root} can be read")

def load_folder(root, img_size):
    """Any class-per-folder tree (root/<class>/<image>), resized and centre-cropped to img_size."""
    import torchvision
    from torchvision import transforms as T
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist (give it with --data-dir)")
    entries = os.listdir(root)
    if not any(os.path.isdir(os.path.join(root, e)) for e in entries):
        if any(e.lower().endswith(IMG_EXT) for e in entries):
            raise UsageError(f"{root!r} holds images but no class sub-folders: put each class's "
                             f"images in {root}/<class name>/")
        raise UsageError(f"image folder {root!r} is empty: it needs one sub-folder of images per class")
    transform = T.Compose([T.Resize(img_size), T.CenterCrop(img_size), T.PILToTensor()])
    try:
        return SkipUnreadable(torchvision.datasets.ImageFolder(root, transform=lambda im: transform(im.convert("RGB"))))
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"image folder {root!r}: {str(err).splitlines()[0]}") from None

def load_data(cfg):
    """(train, heldout, num_classes). heldout: CIFAR's test split; shapes: a fresh draw; folder: a
    fixed 5% of the images set aside (none when the folder is tiny). It feeds D's held-out accuracy
    and, for CIFAR and shapes, FID's reference statistics (the paper: CIFAR-10's 10k test images)."""
    if cfg.dataset in CIFAR:
        if cfg.img_size != 32:
            raise UsageError(f"{cfg.dataset} images are 32x32; --img-size {cfg.img_size} is not supported for it")
        train, heldout = load_cifar(cfg.dataset, cfg.data_dir, True), load_cifar(cfg.dataset, cfg.data_dir, False)
        return train, heldout, len(train.classes)
    if cfg.dataset == "shapes":
        classes = [n for n, _ in SHAPES]
        train = TensorImages(*make_shapes(cfg.shapes_size, cfg.img_size, seed=0), classes)
        return train, TensorImages(*make_shapes(max(cfg.fid_images, 1024), cfg.img_size, seed=1), classes), len(classes)
    data = load_folder(cfg.data_dir, cfg.img_size)
    n_hold = len(data) // 20 if len(data) >= 200 else 0
    if not n_hold:
        return data, None, len(data.classes)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234)).tolist()
    Subset = torch.utils.data.Subset
    return Subset(data, order[n_hold:]), Subset(data, order[:n_hold]), len(data.classes)

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

# Flags that may differ when a run is resumed; every other flag must match the checkpoint.
RUN_FLAGS = {"steps", "log_every", "eval_every", "fid_images", "fid_weights", "eval_batch", "intra_fid",
             "inception_score", "device", "num_workers", "compile", "resume", "run_dir", "data_dir",
             "collapse_gap", "collapse_patience", "acc_images", "preset"}

def save_checkpoint(path, state):
    """Atomic: write a temporary file, flush it to disk, then rename over the old one. config.json next
    to it is written only here, so it always describes a saved run (never a start that failed)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with open(tmp, "w") as f:
        json.dump({**state["config"], "num_classes": state["num_classes"], "world_size": len(state["rng"])}, f, indent=2)
    os.replace(tmp, os.path.join(os.path.dirname(path), "config.json"))

def load_checkpoint(path):
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:                                   # torch's own text is a paragraph of zip internals
        raise UsageError(f"checkpoint {path} is unreadable: truncated, corrupt or not a torch file "
                         f"({type(err).__name__})") from None
    if not (isinstance(checkpoint, dict) and {"G", "D", "G_ema", "config", "step"} <= checkpoint.keys()):
        raise UsageError(f"{path} is a torch file but not a contragan.py checkpoint (no G, D, G_ema, config, step)")
    return checkpoint, path

def claim_run_dir(run_dir, resume_dir):
    """One run owns its folder. Refused: a folder that holds another run (unless it is the one resumed),
    and one that a live process holds (run.lock, created exclusively, holds its pid; the lock of a
    process that is gone, e.g. killed with -9, is taken over). Returns release(), which removes the lock
    and the folders this start created if they are still empty: a failed start leaves nothing behind."""
    resuming_here = resume_dir is not None and os.path.realpath(run_dir) == os.path.realpath(resume_dir)
    if not resuming_here and any(os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "config.json")):
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
    ("lr_g lr_d cond_lambda adam_eps", lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
    ("temperature", lambda v: 0 < v < float("inf"), "> 0 and finite"),
    ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
]

def check_ranges(cfg, table=FLAG_RANGES):
    for names, ok, what in table:
        for name in names.split():
            if not ok(getattr(cfg, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be {what} (got {getattr(cfg, name)})")
