"""Frechet Inception Distance (and Inception Score) as ContraGAN's paper measured them.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule", TTUR) compares two sets of images through
the 2048-d pool features of Inception-V3, each set summarised by a Gaussian N(mu, S):

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Protocol, the same as pytorch-fid (github.com/mseitzer/pytorch-fid) and the TF original it ports:
- the TensorFlow FID Inception graph and its weights ported to PyTorch, pt_inception-2015-12-05-6726825d.pth
  (1008 classes, no aux head), loaded with strict=True;
- images in [-1, 1] (or uint8 in [0, 255]), resized to 299x299 bilinearly (align_corners=False);
- statistics in float64; Tr((S1 S2)^(1/2)) from eigenvalues (see _trace_sqrt_product), not sqrtm.
ContraGAN's CIFAR-10 numbers: 10,000 generated images vs the 10,000 test images. Every score is printed with its
protocol (describe_protocol) because the protocol moves FID by a lot. Differences from pytorch-fid that leave the
number as it is (tools/fid_parity.py measures it; docs/fid.md): input in [-1, 1], streamed statistics, the trace
from eigenvalues (>10x faster), fp32 (not TF32) convolutions on GPUs.

Command line (pytorch-fid's convention):
    python fid.py A B                          # A, B: image folders or .npz statistics files
    python fid.py --save-stats FOLDER OUT.npz  # OUT.npz holds mu, sigma and the protocol
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy.linalg import lapack
from scipy.special import xlogy
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB, InceptionC,
                                          InceptionD, InceptionE)
from torchvision.transforms.functional import pil_to_tensor

# Published with pytorch-fid; ported from the TF graph inception-2015-12-05.tgz used by TTUR's FID.
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its hash prefix
INCEPTION_SIZE = 299
RESIZE = "299x299 bilinear"  # F.interpolate(..., mode="bilinear", align_corners=False)
FEATURE_DIM = 2048
STATS_BYTES = 8 * (FEATURE_DIM + FEATURE_DIM ** 2) + 4096  # an .npz of float64 mu and sigma, and the protocol
DOWNLOAD_TIMEOUT_S = 10  # offline machines should fail in seconds, not hang
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}


class FIDError(Exception):
    """A user-facing failure with a one-line message; the CLI prints it as `error: ...`, exit 2."""


def _one_line(error):
    return " ".join(str(getattr(error, "reason", error)).split())


# ---- The FID Inception-V3 graph: torchvision's Inception3 with the TF graph's pooling quirks -------------------------


class FIDInceptionA(InceptionA):
    """Mixed_5b/c/d. TF's average pool ignores the padded zeros: count_include_pad=False."""

    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(pool)]


class FIDInceptionC(InceptionC):
    """Mixed_6b/c/d/e. Same average-pool quirk as FIDInceptionA."""

    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(pool)]


class FIDInceptionE(InceptionE):
    """Mixed_7b (average pool without padded zeros) and Mixed_7c (max pool: the TF graph has a max pool there,
    although the Inception paper averages; pytorch-fid keeps it, so do we)."""

    def __init__(self, in_channels):
        super().__init__(in_channels)
        self.max_pool = in_channels == 2048  # Mixed_7c; Mixed_7b has 1280 input channels

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pool)]


class FIDInceptionV3(Inception3):
    """The TF FID Inception graph: x (B, 3, H, W) float in [-1, 1] or uint8, any H, W -> (pool (B, 2048), logits
    (B, 1008)). Its state dict has the keys and shapes of Inception3(num_classes=1008, aux_logits=False), as the
    published file. [-1, 1]: a tanh G's range and the TF original's input (uint8 / 127.5 - 1); pytorch-fid takes
    [0, 1] and maps x -> 2x - 1 after the resize (bilinear resizing is affine: the same up to float rounding)."""

    def __init__(self):
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, inception_blocks=blocks,
                         init_weights=False)
        self.weights_tag = "untrained"  # set by load_inception; goes into every protocol

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1  # [0, 255] -> [-1, 1]
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):  # at 299 the resize is the identity
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))  # (B, 192, 71, 71)
        x = self.maxpool2(x)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = torch.flatten(self.avgpool(x), 1)  # (B, 2048): TTUR's pool_3 features
        return pool, self.fc(pool)  # logits (B, 1008); dropout is the identity at inference


def _cached_weights():
    """The published file in torch's hub cache, downloaded once with its hash checked."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:  # download_url_to_file writes a temp file and renames it only once the hash matches
        torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_SHA256_PREFIX)
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors; a bad hash a RuntimeError
        raise FIDError(f"cannot download the FID Inception weights {WEIGHTS_NAME} from {WEIGHTS_URL} "
                       f"({_one_line(e)}); fetch that file elsewhere and pass --weights PATH "
                       f"(weights=PATH in Python)") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return path


def load_inception(weights=None, device="cpu", random_init=False, seed=0):
    """The FID Inception-V3 in eval mode. weights: a path to the published state dict; None: torch's hub cache
    (downloaded once). random_init: Kaiming-normal random weights for tests and offline demos; their scores are
    flagged as not comparable. The caller's RNG stream is left untouched."""
    with torch.random.fork_rng(devices=[]):  # building the modules draws default inits
        model = FIDInceptionV3()
    if random_init:
        # init_weights=False leaves pool features near 1e-8 (machine-notes); Kaiming keeps them O(1).
        generator = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
        nn.init.normal_(model.fc.weight, std=0.01, generator=generator)
        nn.init.zeros_(model.fc.bias)
        model.weights_tag = f"RANDOM weights (seed {seed}) - NOT comparable with any published FID"
    else:
        in_cache = weights is None
        path = _cached_weights() if in_cache else os.fspath(weights)
        if not os.path.isfile(path):
            raise FIDError(f"weights file {path} {'is a folder' if os.path.isdir(path) else 'not found'} "
                           f"(the published file is {WEIGHTS_NAME}, {WEIGHTS_URL})")
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # 91 MB
        published = digest.startswith(WEIGHTS_SHA256_PREFIX)
        if in_cache and not published:
            raise FIDError(f"{path} has sha256 {digest[:8]}..., not {WEIGHTS_SHA256_PREFIX}...: "
                           "not the published file; delete it or pass --weights PATH")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch's text for a non-torch file is unpickler internals ("(101)")
            raise FIDError(f"{path} is not a torch weights file (text, truncated or corrupt?); the published "
                           f"file is {WEIGHTS_NAME}") from None
        try:
            model.load_state_dict(state_dict, strict=True)  # strict: proves the graph is the TF one
        except Exception as e:  # key/shape mismatches mean "another network's weights"
            raise FIDError(f"{path} is not a state dict of the FID Inception graph ({_one_line(e)[:200]})") from None
        model.weights_tag = (WEIGHTS_NAME if published else
                             f"{Path(path).name} (sha256 {digest[:8]}, NOT the published {WEIGHTS_NAME})")
    return model.to(device).eval()


def inception_protocol(model):
    """The protocol keys that the model fixes: which weights, which resize."""
    return {"weights": model.weights_tag, "resize": RESIZE}


# ---- Streaming statistics: 50,000 images never sit in memory at once -------------------------------------------------


class RunningStats:
    """mu = s / n and S = (Q - n mu mu^T) / (n - 1), unbiased like np.cov, from s = sum x and Q = sum x x^T
    accumulated in float64. Sums make DDP exact: all_reduce() adds them across ranks. The one-pass form loses about
    log10(1 + |mu|^2 / var) of float64's 16 digits; pool features are post-ReLU averages with mean and std of the
    same order (test: equal to np.cov to 1e-10). keep_probs: also keep softmax(logits) for the Inception Score."""

    def __init__(self, dim=FEATURE_DIM, keep_probs=False):
        self.dim, self.n, self._sum, self._outer = dim, 0, None, None  # n: images seen
        self._probs = [] if keep_probs else None

    def update(self, features, logits=None):
        x = features.detach().to(torch.float64)  # (B, D)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise FIDError(f"expected features of shape (B, {self.dim}), got {tuple(x.shape)}")
        if x.device.type == "mps":  # no float64 on Apple GPUs
            x = x.cpu()
        if self._sum is None:
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
        self._sum += x.sum(0)
        self._outer += x.T @ x  # (D, D)
        self.n += x.shape[0]
        if self._probs is not None:  # keep_probs=True: the logits are needed
            self._probs.append(torch.softmax(logits.detach().double(), dim=1).cpu().numpy())  # (B, 1008)

    @property
    def mu(self):
        if self.n < 1:
            raise FIDError("no images were seen")
        return (self._sum / self.n).cpu().numpy()

    @property
    def sigma(self):
        n = self.n
        if n < 2:
            raise FIDError(f"a covariance needs at least 2 images, got {n}")
        if n < self.dim:
            warnings.warn(f"FID from {n} < {self.dim} images: the covariance is singular (rank <= {n - 1}); "
                          "the score is biased upwards and comparable only with the same number of images")
        mu = self._sum / n
        return ((self._outer - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()

    @property
    def probs(self):
        if not self._probs:
            raise FIDError("no softmax outputs kept: create RunningStats(keep_probs=True)")
        return np.concatenate(self._probs)  # (N, 1008)

    def all_reduce(self):
        """Sum n, s and Q over torch.distributed ranks (gloo or nccl); a no-op when not initialised. The kept
        softmax outputs (Inception Score) stay on each rank: IS is a per-rank number."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self._sum is None:
            raise FIDError("all_reduce() before any update() on this rank")
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self._sum.device)
        for tensor in (n, self._sum, self._outer):
            dist.all_reduce(tensor)  # SUM
        self.n = int(n.item())
        return self


def _stream(model, batches, total, device, compute_is, progress, class_stats=None):
    """Statistics of (images, labels or None) batches, and the Inception Score (mean, std) if compute_is, else None.
    class_stats, a list of K RunningStats: each image's features also go to class_stats[its label]."""
    model.eval()
    stats, done = RunningStats(keep_probs=compute_is), 0
    cudnn = torch.backends.cudnn  # fp32 convolutions as in the TF original, not TF32 (PyTorch's default on Ampere+)
    with torch.no_grad(), cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                      deterministic=cudnn.deterministic, allow_tf32=False):
        for images, labels in batches:
            if images.dtype != torch.uint8:  # a [0, 255] or unnormalised batch would give a silent wrong FID
                low, high = torch.aminmax(images.detach())
                if low < -1.001 or high > 1.001:
                    raise FIDError(f"images must be in [-1, 1] (or uint8), got values in [{low:.3g}, {high:.3g}]")
            pool, logits = model(images.to(device, non_blocking=True))
            stats.update(pool, logits)
            for k in (labels.unique().tolist() if class_stats is not None else []):
                class_stats[k].update(pool[labels.to(pool.device) == k])
            done += len(images)
            if progress:
                progress(done, total)
    return stats, (inception_score(stats.probs) if compute_is else None)


def features_from_sampler(model, sample_fn, num_images, batch_size, device, compute_is=False, progress=None,
                          class_stats=None):
    """(RunningStats, IS or None) of num_images images from sample_fn(n) -> (n, 3, H, W) float in [-1, 1]; the caller
    puts the generator in the evaluated mode (EMA weights, BatchNorm mode) in sample_fn. progress(done, total): per
    batch. With class_stats (intra-class FID from the same mixed-label batches), sample_fn returns (images, labels)."""
    def batches():
        for done in range(0, num_images, batch_size):
            n = min(batch_size, num_images - done)
            images, labels = sample_fn(n) if class_stats is not None else (sample_fn(n), None)
            if images.ndim != 4 or tuple(images.shape[:2]) != (n, 3):
                raise FIDError(f"sample_fn({n}) must return ({n}, 3, H, W) images, got {tuple(images.shape)}")
            yield images, labels

    return _stream(model, batches(), num_images, device, compute_is, progress, class_stats)


def features_from_dataset(model, dataset, num_images, batch_size, device, num_workers=0, compute_is=False,
                          progress=None):
    """(RunningStats, IS or None) of the first num_images items (all if None) of a data set whose items are images
    in [-1, 1] (or uint8) or (image, label) pairs."""
    total = len(dataset) if num_images is None else num_images
    if total > len(dataset):
        raise FIDError(f"asked for {total} images but the data set has {len(dataset)}")
    # a generator of its own, not the caller's RNG: a training run draws the same numbers whether stats are cached
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(total)), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                                         generator=torch.Generator())
    batches = ((batch[0] if isinstance(batch, (list, tuple)) else batch, None) for batch in loader)  # labels dropped
    return _stream(model, batches, total, device, compute_is, progress)


# ---- The Frechet distance and the Inception Score --------------------------------------------------------------------


def _trace_sqrt_product(sigma1, sigma2):
    """Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1 S2)). Factor S1 = F F^T with F (d, r), r = rank S1; S1 S2 =
    F (F^T S2) has the nonzero eigenvalues of F^T S2 F (AB and BA share them), a symmetric PSD (r, r) matrix whose
    eigenvalues eigvalsh finds far faster than sqrtm finds the whole root of the non-symmetric S1 S2. F comes from
    LAPACK's pivoted Cholesky (dpstrf), which stops at the numerical rank (pivots <= d * eps * max S1_ii): fewer than
    d + 1 images give a singular S1."""
    lower, pivots, rank, _ = lapack.dpstrf(sigma1, lower=1)  # P^T S1 P = L L^T
    if rank == 0:  # S1 = 0: all images identical
        return 0.0
    factor = np.empty((len(sigma1), rank))
    factor[pivots - 1] = np.tril(lower)[:, :rank]  # F = P L, so F F^T = S1; (d, r)
    eigenvalues = np.linalg.eigvalsh(factor.T @ sigma2 @ factor)  # (r,)
    # The sqrtm formula's guard fails on an imaginary part > 1e-3 (a clearly non-PSD product); here negative
    # eigenvalues play that role: rounding leaves ~1e-16 * d * max, a broken input far more.
    if eigenvalues.min() < -1e-6 * max(eigenvalues.max(), 1e-12):
        raise FIDError(f"S1 S2 has a negative eigenvalue {eigenvalues.min():.3g}: covariances are not PSD")
    return np.sqrt(np.clip(eigenvalues, 0, None)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (TTUR, eq. 6 of Heusel et al.), S = sigma.
    Agrees with pytorch-fid's sqrtm formula to ~1e-10 relative (test_fid.py). eps: pytorch-fid's guard, kept: if a
    decomposition fails, retry with eps * I added to S1 and S2."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise FIDError("the statistics contain NaN or inf")
    for sigma in (sigma1, sigma2):  # a covariance is symmetric to rounding (one max-abs pass: np.allclose took 20%
        asymmetry = np.abs(sigma - sigma.T).max()  # of the distance at d = 2048), its diagonal non-negative
        if asymmetry > 1e-8 + 1e-5 * np.abs(sigma).max() or (np.diagonal(sigma) < 0).any():
            raise FIDError("a covariance is not symmetric with a non-negative diagonal")
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        warnings.warn(f"eigenvalue solver failed; adding {eps} to the diagonal of both covariances")
        offset = eps * np.eye(d)
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive chunks: their mean and std. probs: (N, 1008)
    softmax of the FID graph's logits, as in the original (openai/improved-gan inception_score.py: 10 splits)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise FIDError(f"the Inception Score needs at least {splits} images (one per split), got {len(probs)}")
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(0, keepdims=True)  # (1, K): the marginal over the chunk
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(1)  # (N_chunk,); 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---- Statistics files, with their protocol ---------------------------------------------------------------------------


def _normalised(protocol):
    return json.loads(json.dumps(protocol))  # tuples -> lists etc., so that stored == requested


def save_stats(path, mu_sigma, protocol):
    """Write mu, sigma (pytorch-fid's keys) and the protocol (JSON) to an .npz, atomically."""
    mu, sigma, path = *mu_sigma, os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npz"
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     protocol=np.array(json.dumps(_normalised(protocol), sort_keys=True)))
        os.replace(tmp, path)  # a crash leaves either the old file or the new one, never half a file
    except OSError as e:  # a full disk: no half file left to fill it further
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FIDError(f"cannot write {path} ({e.strerror or _one_line(e)}); nothing written") from None


def load_stats(path, expect=None):
    """(mu, sigma, protocol) from an .npz; pytorch-fid's (mu and sigma only) give {}. expect: refuse the file unless
    its protocol equals this one in every key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FIDError(f"{path}: no such statistics file")
    try:
        with np.load(path, allow_pickle=False) as f:
            contents = {key: f[key] for key in f.files}
    except Exception as e:  # a truncated or non-zip file: BadZipFile, ValueError (numpy's pickle advice), EOFError
        reason = _one_line(e) if isinstance(e, OSError) else "not a zip of arrays as np.savez writes"
        raise FIDError(f"{path}: not a readable .npz statistics file ({reason})") from None
    if "mu" not in contents or "sigma" not in contents:
        raise FIDError(f"{path}: no 'mu' and 'sigma' arrays (it has {sorted(contents)})")
    mu, sigma = contents["mu"], contents["sigma"]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or mu.ndim != 1 or not len(mu) \
            or sigma.shape != (len(mu), len(mu)):  # real, (d,) and (d, d)
        raise FIDError(f"{path}: mu {mu.dtype} {mu.shape} and sigma {sigma.dtype} {sigma.shape} do not fit together")
    try:
        protocol = json.loads(str(contents["protocol"])) if "protocol" in contents else {}
    except ValueError:
        protocol = None
    if not isinstance(protocol, dict):
        raise FIDError(f"{path}: its 'protocol' is not a JSON object as save_stats writes")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: its mu or sigma holds NaN or inf (statistics of a broken run?)")
    if expect is not None:
        expect = _normalised(expect)
        if not protocol:
            raise FIDError(f"{path} has no protocol (a pytorch-fid file?), so it cannot be checked against "
                           f"'{describe_protocol(expect)}'; delete it or use another path")
        for key in sorted(set(expect) | set(protocol)):
            if expect.get(key) != protocol.get(key):
                raise FIDError(f"{path} was computed with {key}={protocol.get(key)!r}, but {key}={expect.get(key)!r} "
                               "was requested; delete it or use another path")
    return mu, sigma, protocol


def reference_stats(model, dataset, cache_path, protocol, num_images, batch_size, device, num_workers=0,
                    progress=None):
    """(mu, sigma, protocol) of the first num_images of a data set (all if None): read from cache_path if its stored
    protocol equals `protocol` (e.g. {"dataset": "cifar10", "split": "test", "num_images": 10000,
    **inception_protocol(model)}) in every key, refused if it differs, else computed and cached with it. progress:
    default, a line on stderr every 10 s (minutes of silence on a CPU otherwise); lambda done, total: None for none."""
    # a cache must not be mislabelled: a protocol that names the published weights needs a model that has them
    if WEIGHTS_NAME in str(protocol.get("weights", "")) and model.weights_tag != WEIGHTS_NAME:
        raise FIDError(f"protocol says weights={protocol['weights']!r} but the model has {model.weights_tag!r}")
    if os.path.exists(cache_path):
        mu, sigma, _ = load_stats(cache_path, expect=protocol)
        return mu, sigma, protocol
    _check_writable(cache_path, make_folder=True)
    progress = progress or _progress_printer(f"FID reference {os.path.basename(cache_path)}")
    stats, _ = features_from_dataset(model, dataset, num_images, batch_size, device, num_workers, progress=progress)
    mu, sigma = stats.mu, stats.sigma
    save_stats(cache_path, (mu, sigma), protocol)
    return mu, sigma, protocol


def _side(protocol):
    """One set of images in words: 'cifar10 test 10000'."""
    return " ".join(str(protocol[key]) for key in ("dataset", "split", "num_images") if key in protocol)


def describe_protocol(protocol):
    """One human line. Known keys: weights, resize, dataset, split, num_images, and fake (a string describing the
    generated side, e.g. '10000 (EMA G, BN batch stats)'); any other key is listed."""
    known = ("weights", "resize", "dataset", "split", "num_images", "fake")
    weights = protocol.get("weights", "weights unknown")
    parts = [f"Inception-V3 {'TF weights ' if weights == WEIGHTS_NAME else ''}{weights}"]
    if "resize" in protocol:
        parts.append(protocol["resize"])
    real = _side(protocol)
    if "fake" in protocol:
        parts.append(f"fake {protocol['fake']} vs {real or 'unknown reference'}")
    elif real:
        parts.append(real)
    parts += [f"{key}={value}" for key, value in sorted(protocol.items()) if key not in known]
    return "FID protocol: " + ", ".join(parts)


# ---- Images in a folder, for the command line ------------------------------------------------------------------------


def read_image(path):
    """The image file at path as 8-bit RGB by its real range (convert("RGB") clips: 16-bit would turn white, float
    black), EXIF rotation applied: the one reader of images for FID and for training (contragan.py), so that both see
    the same pixels. One past PIL's pixel limit (Image.MAX_IMAGE_PIXELS) fails with DecompressionBombWarning or -Error,
    where PIL would decode it in full and warn at every read."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            im = ImageOps.exif_transpose(image)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16-bit grey (I: PIL's 32-bit, read as 16), float
                a, top = np.asarray(im, dtype=np.float64), 1.0 if im.mode == "F" else 65535.0
                if not (a.min() >= 0 and a.max() <= top):  # other values refused; NaN fails too
                    raise ValueError(f"mode {im.mode} with values in [{a.min():g}, {a.max():g}], not [0, {top:g}]")
                return Image.fromarray(np.round(a * (255 / top)).astype(np.uint8)).convert("RGB")
            if {"A", "a"} & set(im.getbands()) or "transparency" in im.info:  # transparent pixels over white
                im = im.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
            return im.convert("RGB")


class ImageFolderFlat(torch.utils.data.Dataset):
    """The images directly in a folder (pytorch-fid's extensions, any case; sorted; no subfolders, as pytorch-fid), as
    uint8 (3, H, W) RGB tensors. All must share one size, as pytorch-fid also requires at batch size > 1; every
    header is read up front so that a bad file fails at once."""

    def __init__(self, root):
        root = Path(root)
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise FIDError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
        first_size = None
        for file in self.files:
            try:
                with Image.open(file) as image:  # reads the header only
                    size = image.size
            except OSError as e:  # PIL.UnidentifiedImageError is an OSError
                raise FIDError(f"{file}: not a readable image ({_one_line(e)})") from None
            first_size = first_size or size
            if size != first_size:
                raise FIDError(f"{file} is {size[0]}x{size[1]} but {self.files[0].name} is "
                               f"{first_size[0]}x{first_size[1]}: all images must share one size")
        self.size = first_size[::-1]  # (H, W)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:  # the data (a truncated file) fails only here; FID over fewer files is another number: refuse
            x = pil_to_tensor(read_image(self.files[index]))  # (3, H, W) uint8, read as contragan.py reads it
        except Exception as e:
            raise FIDError(f"{self.files[index]}: not a readable image ({_one_line(e)})") from None
        if x.shape[1:] != self.size:  # an EXIF rotation turns a 32x64 header into a 64x32 image
            raise FIDError(f"{self.files[index]} is {x.shape[2]}x{x.shape[1]} as read (EXIF rotation applied), but "
                           f"{self.files[0].name} is {self.size[1]}x{self.size[0]}: all images must share one size")
        return x


# ---- Command line ----------------------------------------------------------------------------------------------------


def _progress_printer(label, every_s=10):
    """progress(done, total) for features_from_*: a line on stderr every every_s seconds and at the end."""
    start = last = time.perf_counter()

    def report(done, total):
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last, rate = now, done / max(now - start, 1e-9)
            left = round((total - done) / max(rate, 1e-9))
            print(f"{label}: {done}/{total} images | {rate:.1f} img/s | left {left // 60}m{left % 60:02d}s",
                  file=sys.stderr, flush=True)

    return report


def _check_writable(path, make_folder=False):
    """Fail before minutes of statistics, not after: create and remove the temporary file that save_stats writes
    first (os.access says yes to root everywhere), and see that the statistics fit on the disk."""
    folder, probe = os.path.dirname(os.path.abspath(path)), f"{path}.tmp{os.getpid()}"
    try:
        if make_folder and not os.path.exists(folder):
            os.makedirs(folder)  # (a file in its place: "Not a directory" below)
        open(probe, "xb").close()
        os.remove(probe)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise FIDError(f"cannot write {path} ({e.strerror or _one_line(e)})") from None
    if free < STATS_BYTES:  # an empty file fits on a full disk; the statistics do not
        raise FIDError(f"cannot write {path}: {free / 2 ** 20:.1f} MiB free there, its statistics need "
                       f"{STATS_BYTES / 2 ** 20:.0f} MiB")


def can_write(folder):
    """Can a file be created in folder (made if missing)? Tried, as os.access says yes to root on a read-only mount."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # created, then removed
        return True
    except OSError:
        return False


def _open_input(path, compute_is):
    """A .npz file's (mu, sigma, protocol), or a folder's images once every header has been read."""
    if path.endswith(".npz"):
        return load_stats(path)
    if not os.path.isdir(path):
        raise FIDError(f"{path}: " + ("neither a folder of images nor a .npz statistics file" if os.path.exists(path)
                                      else "no such file or folder"))
    dataset = ImageFolderFlat(path)
    if len(dataset) < 2:
        raise FIDError(f"{path}: FID needs at least 2 images for a covariance, found {len(dataset)}")
    if compute_is and len(dataset) < 10:
        raise FIDError(f"{path}: the Inception Score needs at least 10 images (one per split), found {len(dataset)}")
    return dataset


def _folder_stats(path, dataset, model, args, compute_is):
    """(mu, sigma, protocol, IS or None) of a folder's images."""
    stats, is_score = features_from_dataset(model, dataset, None, args.batch_size, args.device, args.num_workers,
                                            compute_is, progress=_progress_printer(path))
    protocol = {**inception_protocol(model), "dataset": f"folder {os.path.abspath(path)}", "num_images": stats.n}
    return stats.mu, stats.sigma, protocol, is_score


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", nargs=2, help="A and B: image folders or .npz statistics files; "
                        "with --save-stats: FOLDER OUT.npz")
    parser.add_argument("--save-stats", action="store_true", help="write the statistics of FOLDER to OUT.npz")
    parser.add_argument("--weights", default=None, help=f"local copy of {WEIGHTS_NAME} (default: torch hub "
                        f"cache, downloaded once from {WEIGHTS_URL})")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (pytorch-fid's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data loader processes (pytorch-fid's default: min(8, CPUs))")
    parser.add_argument("--inception-score", action="store_true",
                        help="also print the Inception Score (1008-way softmax, 10 splits) of each image folder")
    parser.add_argument("--random-weights", action="store_true", help="random Kaiming-normal weights instead of the "
                        "published ones: for tests and offline demos only; the scores are NOT comparable with anything")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, not usage too
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error(f"--batch-size must be at least 1 and --num-workers at least 0 (got {args.batch_size}, "
                     f"{args.num_workers})")
    if not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", args.device):
        parser.error(f"--device {args.device}: not one of cpu, cuda, cuda:N, mps")
    device = torch.device(args.device)
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}[device.type]
    if (device.index or 0) >= count:
        parser.error(f"--device {args.device} asked for, but torch sees {count or 'no'} "
                     f"{'CUDA GPU' if device.type == 'cuda' else device.type.upper() + ' device'}(s)")
    if args.random_weights and args.weights:
        parser.error("--random-weights and --weights exclude each other")
    if args.inception_score and (args.save_stats or all(p.endswith(".npz") for p in args.path)):
        parser.error("--inception-score needs an image folder to compare (not --save-stats, not two .npz)")
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        run(args)
    except FIDError as e:  # from a DataLoader worker: a traceback whose last line holds the message
        print(f"error: {str(e).splitlines()[-1].split('FIDError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # nothing is written before the end: nothing to clean
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run(args):
    """Every check that can fail (files, image headers, the model, comparability) comes before minutes of features."""
    if args.save_stats:
        folder, out = args.path
        if not out.endswith(".npz"):  # the name by which `fid.py A B` reads statistics back
            raise FIDError(f"--save-stats writes .npz files: {out} does not end in .npz")
        if os.path.exists(out):
            raise FIDError(f"{out} exists; delete it or choose another name")
        dataset = _open_input(folder, False)
        if not isinstance(dataset, ImageFolderFlat):
            raise FIDError(f"--save-stats reads a folder of images, not {folder}")
        _check_writable(out)
        model = load_inception(args.weights, args.device, random_init=args.random_weights)
        mu, sigma, protocol, _ = _folder_stats(folder, dataset, model, args, compute_is=False)
        save_stats(out, (mu, sigma), protocol)
        print(f"saved {out}: mu {mu.shape}, sigma {sigma.shape} | {describe_protocol(protocol)}")
        return
    inputs = [_open_input(path, args.inception_score) for path in args.path]
    folders = [isinstance(x, ImageFolderFlat) for x in inputs]
    model = load_inception(args.weights, args.device, random_init=args.random_weights) if any(folders) else None
    (d1, protocol1), (d2, protocol2) = [(FEATURE_DIM, inception_protocol(model)) if folder else (len(x[0]), x[2])
                                        for x, folder in zip(inputs, folders)]
    if d1 != d2:
        raise FIDError(f"A has {d1}-d statistics but B has {d2}-d: not the same features")
    for key in ("weights", "resize"):  # statistics from different Inceptions are not comparable
        if key in protocol1 and key in protocol2 and protocol1[key] != protocol2[key]:
            raise FIDError(f"A has {key}={protocol1[key]!r} but B has {key}={protocol2[key]!r}")
    (mu1, sigma1, protocol1, is1), (mu2, sigma2, protocol2, is2) = [
        _folder_stats(path, x, model, args, args.inception_score) if folder
        else (x[0], x[1], x[2] or {"dataset": f"{path} (protocol unknown)"}, None)
        for path, x, folder in zip(args.path, inputs, folders)]
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    shared = {key: protocol1.get(key, protocol2.get(key)) for key in ("weights", "resize")
              if key in protocol1 or key in protocol2}
    print(f"FID: {fid:.6f}")
    print(describe_protocol({**shared, "fake": f"A ({_side(protocol1)})", "dataset": f"B ({_side(protocol2)})"}))
    for name, score in (("A", is1), ("B", is2)):
        if score is not None:
            print(f"IS({name}): {score[0]:.4f} +- {score[1]:.4f} (10 splits)")


if __name__ == "__main__":
    main()
