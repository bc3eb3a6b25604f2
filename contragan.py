"""
ContraGAN in one file: a conditional GAN whose discriminator learns data-to-data and data-to-class relations
through the conditional contrastive (2C) loss. Minguk Kang and Jaesik Park, "ContraGAN: Contrastive Learning
for Conditional Image Generation", NeurIPS 2020, arXiv:2006.12681; authors' code: POSTECH-CVLab/PyTorch-StudioGAN.

Read it top to bottom next to the paper: Section 3 (the losses; the 2C loss is the part to copy) -> Algorithm 1
(`Config`, `Trainer`) -> the appendix's networks. Below one banner, what runs it: data -> torchrun -> evaluation
(FID, Figure 3, class confusion) -> the run and its folder -> the command line. Where the paper and the authors'
code differ, this file follows the code and says so at that line. It imports fid.py and nothing else of its project.
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import os
import signal
import socket
import sys
import time
import types
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta

def interrupted_while_importing(signum, frame):  # Ctrl-C in the seconds of `import torch`: one line, no traceback
    print("interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":                                     # main() puts its own handler in place
    signal.signal(signal.SIGINT, interrupted_while_importing)
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils import parametrize

import fid  # fid.py, next to this file: FID as the paper measured it (Inception-V3, TF weights)

# --------------------------------------------------------------------------------------------
# Section 3: the losses (2C: Eq. 8). Pure tensor functions (torch only; no config, device or globals). Copy freely.
# --------------------------------------------------------------------------------------------

def d_hinge_loss(real_logit, fake_logit):
    """Hinge loss for D (Lim & Ye 2017; Miyato et al. 2018): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logit).mean() + F.relu(1.0 + fake_logit).mean()

def g_hinge_loss(fake_logit):
    """Hinge loss for G: -E[D(G(z))]."""
    return -fake_logit.mean()

def conditional_contrastive_loss(embed, proxy, labels, temperature=1.0, data_positives=True):
    """The conditional contrastive (2C) loss of ContraGAN with temperature t: the paper's Eq. 8 (Section 3).

        loss_i = -log( [exp(l_i.e_i / t) + sum_{k != i, y_k = y_i} exp(l_i.l_k / t)]
                     / [exp(l_i.e_i / t) + sum_{k != i}            exp(l_i.l_k / t)] )
        loss   = (1/m) sum_i loss_i

    data_positives=False drops the same-class samples from the NUMERATOR only (they stay in the
    denominator): the class proxy is the one positive, the paper's Eq. 7. It is the authors'
    `pos_collected_numerator` switch (PyTorch-StudioGAN src/utils/losses.py, commit 21594bd), which they advised
    turning off against ContraGAN's class confusion (their issue #81); True, the paper's Eq. 8, is the default.

    Paper symbol -> argument:
        l(x_i) = h(D's image feature of sample i)  -> embed[i]     (m, D); L2-normalised here
        e(y_i) = class embedding (proxy) of y_i    -> proxy[i]     (m, D); L2-normalised here
        y_i                                        -> labels[i]    (m,) integer class labels
        t                                          -> temperature  (1.0 in every reported run)
        m                                          -> batch size   (the global batch under DDP)

    As the authors' code does (the paper's equation does not say so): the self pair k = i is in
    neither sum, and only the sample's own class proxy appears. A sample with no other same-class
    sample keeps its proxy term, so there is never a 0/0. The authors take exp() and divide; this is
    the same value as a difference of two log-sum-exps, which cannot overflow (exp(1/t) overflows
    fp16 for t < 0.09). Their code at 21594bd returns -log(t * ratio): -log(t) off, the same gradients.
    """
    with torch.autocast(embed.device.type, enabled=False):     # fp32 math, also inside a step's autocast
        dtype = torch.promote_types(embed.dtype, torch.float32)    # fp16/bf16 in -> fp32 math
        lx = F.normalize(embed.to(dtype), dim=1)                   # (m, D)  l(x_i)
        ey = F.normalize(proxy.to(dtype), dim=1)                   # (m, D)  e(y_i)
        m = lx.shape[0]
        # Every exponent of the ratio in one row per sample i: column 0 is l_i.e_i / t, column 1 + k is l_i.l_k / t.
        exponents = torch.cat([(lx * ey).sum(dim=1, keepdim=True), lx @ lx.t()], dim=1) / temperature  # (m, 1 + m)
        is_self = torch.eye(m, dtype=torch.bool, device=lx.device)  # (m, m)  k == i: in neither sum
        proxy_term = torch.ones(m, 1, dtype=torch.bool, device=lx.device)  # (m, 1)  in both sums
        in_denominator = torch.cat([proxy_term, ~is_self], dim=1)  # (m, 1 + m)  proxy, every k != i
        same_class = labels[:, None] == labels[None, :]           # (m, m)  y_k == y_i
        if not data_positives:                                     # Eq. 7: the proxy is the only positive
            same_class = torch.zeros_like(same_class)
        in_numerator = in_denominator & torch.cat([proxy_term, same_class], dim=1)  # (m, 1 + m)  and y_k == y_i
        # loss_i = -log(numerator_i / denominator_i) = log sum_{denominator} exp(.) - log sum_{numerator} exp(.)
        log_denominator = torch.logsumexp(exponents.masked_fill(~in_denominator, float("-inf")), dim=1)  # (m,)
        log_numerator = torch.logsumexp(exponents.masked_fill(~in_numerator, float("-inf")), dim=1)      # (m,)
        return (log_denominator - log_numerator).mean()

def data_to_data_cross_entropy_loss(embed, proxy, labels, temperature=0.5, margin=0.98):
    """D2D-CE, the authors' own remedy for 2C's class confusion (ReACGAN: Kang, Shim, Cho, Park, "Rebooting
    ACGAN: Auxiliary Classifier GANs with Stable Training", NeurIPS 2021, arXiv:2111.01118):

        loss_i = -log( exp([l_i.e_i - m_p]_- / t)
                     / (exp([l_i.e_i - m_p]_- / t) + sum_{j: y_j != y_i} exp([l_i.l_j - m_n]_+ / t)) )

    with [x]_- = min(x, 0), [x]_+ = max(x, 0), m_n = 1 - m_p. Unlike 2C, same-class samples are in
    neither sum ("false negative removal"): the proxy is the one positive, every other class a negative,
    and the margins stop pulling a sample closer than m_p and pushing it further than m_n.

    Paper symbol -> argument: l_i -> embed[i] (m, D), e_i = e(y_i) -> proxy[i] (m, D), both L2-normalised
    here; y_i -> labels[i] (m,); t -> temperature (their CIFAR-10: 0.5); m_p -> margin (their: 0.98).

    Computed as their code computes it (PyTorch-StudioGAN src/utils/losses.py, Data2DataCrossEntropyLoss,
    commit 947b35e), which produced their numbers and differs from the equation in one place, marked
    below. Their exp() and sum is written as a log-sum-exp here: the same value, no overflow at small t.
    """
    with torch.autocast(embed.device.type, enabled=False):     # fp32 math, also inside a step's autocast
        dtype = torch.promote_types(embed.dtype, torch.float32)    # fp16/bf16 in -> fp32 math
        lx = F.normalize(embed.to(dtype), dim=1)                   # (m, D)  l_i
        ey = F.normalize(proxy.to(dtype), dim=1)                   # (m, D)  e_i = e(y_i)
        data_sim = (lx @ lx.t() + margin - 1.0) / temperature      # (m, m)  (l_i . l_j - m_n) / t
        is_self = torch.eye(lx.shape[0], dtype=torch.bool, device=lx.device)
        # Their code, not the equation: every negative is scaled by exp(-M_i), M_i = max_{j != i} of the
        # similarity before the [.]_+ (detached; meant for stability), while the positive is not: the value
        # and the gradients differ from the equation unless M_i = 0.
        row_max = data_sim.masked_fill(is_self, float("-inf")).amax(dim=1, keepdim=True).detach()  # (m, 1)
        negative = labels[:, None] != labels[None, :]              # (m, m)  y_j != y_i (so j != i)
        neg_logits = (F.relu(data_sim) - row_max).masked_fill(~negative, float("-inf"))  # (m, m)
        pos_attraction = F.relu((margin - (lx * ey).sum(dim=1)) / temperature)  # (m,)  -[l_i.e_i - m_p]_- / t
        log_denominator = torch.logsumexp(torch.cat([-pos_attraction[:, None], neg_logits], dim=1), dim=1)  # (m,)
        return (pos_attraction + log_denominator).mean()           # -log(exp(-a_i) / denominator_i)

def projection_logit(adv_logit, feature, class_embed):
    """Projection discriminator (Miyato & Koyama 2018, ProjGAN): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.

    adv_logit (B,) = psi(phi(x)); feature (B, C) = phi(x); class_embed (B, C) = embed(y_i) per sample."""
    return adv_logit + (class_embed * feature).sum(dim=1)

def acgan_loss(class_logits, labels):
    """ACGAN's auxiliary classifier loss (Odena et al. 2017): cross-entropy of D's class logits.

    As the authors ran it (PyTorch-StudioGAN src/worker.py, 21594bd): the D step adds it on real AND fake images,
    each with its own labels; the G step on the fakes."""
    return F.cross_entropy(class_logits.float(), labels)

def cr_augment(images, ratio=1 / 8):
    """Consistency regularization's augmentation as the authors' CR_DiffAug (src/utils/cr_diff_aug.py, 21594bd): per
    sample a horizontal flip with p = 0.5, then a shift by whole pixels dy, dx drawn apart from [-s, s], s = int(S *
    ratio), out[i, j] = in[i + dy, j + dx], reflected at the border (F.pad "reflect": the edge row not repeated)."""
    B, S = images.shape[0], images.shape[2]                    # square images (B, C, S, S)
    images = torch.where(torch.rand(B, 1, 1, 1, device=images.device) < 0.5, images.flip(3), images)
    s = int(S * ratio)                                         # 4 pixels at 32x32, 8 at 64x64
    dy, dx = torch.randint(-s, s + 1, (2, B, 1), device=images.device)  # (B, 1) each, both ends included
    padded = F.pad(images, [s, s, s, s], mode="reflect")      # (B, C, S + 2s, S + 2s)
    rows = torch.arange(S, device=images.device) + dy + s       # (B, S): row i reads padded row i + dy + s
    cols = torch.arange(S, device=images.device) + dx + s       # (B, S)
    return padded[torch.arange(B, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]
                  ].permute(0, 3, 1, 2)                        # (B, S, S, C) -> (B, C, S, S)

def consistency_loss(out, out_aug):
    """CR (Zhang et al. 2020) as the authors add it to D's loss (src/worker.py, 21594bd): MSE (the mean over
    elements) of D's outputs on reals vs on `cr_augment`ed reals: the adversarial logit (ProjGAN's holds its
    projection) plus the class output: the 2C/D2D-CE embedding L2-normalised, as their D returns it (big_resnet.py;
    the proxies, the same on both sides, are left out), or ACGAN's class logits."""
    loss = F.mse_loss(out["adv"].float(), out_aug["adv"].float())
    if "embed" in out:
        loss = loss + F.mse_loss(F.normalize(out["embed"].float(), dim=1), F.normalize(out_aug["embed"].float(), dim=1))
    if "class_logits" in out:
        loss = loss + F.mse_loss(out["class_logits"].float(), out_aug["class_logits"].float())
    return loss

def gather_global_batch(embed, proxy, labels):
    """Under DDP, all-gather so the 2C loss sees the global batch. Each rank's backward sums the gradient of its
    slice over ranks; DDP's average turns that back into the single-process gradient on the whole batch (tested)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embed, proxy, labels
    from torch.distributed.nn.functional import all_gather   # differentiable (the labels pass through untouched)
    return tuple(torch.cat(all_gather(x)) for x in (embed, proxy, labels))

def uniform_labels(n, num_classes, device, generator=None):  # y uniform over classes: training and FID
    return torch.randint(0, num_classes, (n,), device=device, generator=generator)

# --------------------------------------------------------------------------------------------
# Algorithm 1: d_steps D steps, one G step, the EMA update (one iteration; the authors' schedule)
# --------------------------------------------------------------------------------------------

def setting(default, help, **flag):  # a settings field: its default, its --help (with its source), argparse's extras
    return field(default=default, metadata=dict(help=help, **flag))

@dataclass
class Config:
    """Defaults: the paper's Table 1 CIFAR-10 run. 'T1: x' cites PyTorch-StudioGAN src/configs/Experiments_in_paper/
    Table1/contra_biggan_cifar32_hinge_no.json at commit 6260dd7 (its proj_ and ac_ files: the same values)."""
    loss: str = setting("2c", "ContraGAN (2C), ReACGAN's D2D-CE, ProjGAN, ACGAN", choices=["2c", "d2dce", "proj", "ac"])
    # The networks (the appendix)
    img_size: int = setting(32, "32, 64 or 128 (the architecture's sizes)")
    g_width: int = setting(96, "G channels = 4 x width (T1: 96)")
    d_width: int = setting(96, "D channels = 2 x width (T1: 96)")
    z_dim: int = setting(80, "z size, split into (G blocks + 1) chunks (T1: 80 = 4 x 20)")
    shared_dim: int = setting(128, "G's shared class embedding (T1: 128)")
    embed_dim: int = setting(512, "2C embedding size (T1: 512)")
    embed_head: str = setting("linear", "2C's head h (Section 4.3's ablation; T1: linear); mlp: SN linear, ReLU, SN "
                              "linear, their nonlinear_embed (big_resnet.py, 21594bd)", choices=["linear", "mlp"])
    # The losses (Section 3)
    temperature: float = setting(1.0, "2C / D2D-CE temperature t (T1: 1.0; ReACGAN: 0.5 for D2D-CE)")
    margin: float = setting(0.98, "D2D-CE's positive margin m_p; m_n = 1 - m_p (authors: 0.98)")
    data_positives: bool = setting(True, "same-class samples in 2C's numerator (Eq. 8); --no-data-positives: the "
                                   "proxy alone (the paper's Eq. 7), the authors' confusion remedy")
    cond_lambda: float = setting(1.0, "lambda, the class term's weight (T1: 1.0; ReACGAN: 0.5 for D2D-CE)")
    cr_lambda: float = setting(0.0, "consistency regularization's weight, D step only; 0 = off (authors' ContraGAN + "
                               "CR: 10.0, src/configs/CIFAR10/CRGAN(C).json at 21594bd)")
    # Algorithm 1: its schedule, Adam, the EMA of G
    batch_size: int = setting(64, "GLOBAL batch: split over torchrun's ranks (T1: 64)")
    accumulation_steps: int = setting(1, "micro-batches of --batch-size per D or G step (T1: 1; Table 2: 4)")
    lr_g: float = setting(2e-4, "Adam lr of G (T1: 2e-4)")
    lr_d: float = setting(2e-4, "Adam lr of D (T1: 2e-4)")
    beta1: float = setting(0.5, "Adam beta1 (T1: 0.5)")
    beta2: float = setting(0.999, "Adam beta2 (T1: 0.999)")
    adam_eps: float = setting(1e-6, "Adam eps (authors: 1e-6)")
    d_steps: int = setting(5, "D steps per G step (T1: 5)")
    steps: int = setting(80000, "G steps (T1: 80,000; 100,000 in the authors' later README runs)")
    flip: bool = setting(False, "random flips of reals (T1: off; README runs: on)")
    ema_decay: float = setting(0.9999, "EMA decay of G_ema (T1: 0.9999)")
    ema_start: int = setting(1000, "G step where the EMA starts; a copy of G before (T1: 1000)")
    seed: int = setting(0, "initial weights, z, labels, data order")
    # Engineering, not the method: how the update runs (autocast), not what it computes
    amp: str = setting("none", "autocast; fp16 uses a GradScaler", choices=["none", "bf16", "fp16"])

class Trainer:
    """G, D, the EMA generator and their optimisers, and the two update steps of the paper.

    D step (authors' code): hinge(D(x), D(G(z))) + lambda * cond, cond = 2C on REAL embeddings (ContraGAN) or
    cross-entropy on real and fake logits (ACGAN); ProjGAN's condition is in D's logit. G step: -mean D(G(z, y)) +
    lambda * cond on the fakes, with D frozen (its heads and proxies are not updated by G)."""

    def __init__(self, cfg, num_classes, device, world=1):
        self.cfg, self.num_classes, self.device, self.world = cfg, num_classes, device, world
        torch.manual_seed(cfg.seed)                            # same initial weights on every rank
        self.G, self.D = [m.to(device) for m in build_models(cfg, num_classes)]  # trained, saved, averaged into G_ema
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)  # the EMA of G: the generator evaluated
        # What the steps call. Here G and D; wrap_for_training (a run's, below the banner) puts them in DDP and
        # torch.compile, and keeps D_frozen, for the G step, out of DDP (D gets no gradient there: DDP would wait).
        self.G_train, self.D_train, self.D_frozen = self.G, self.D, self.D
        self.adam_flags = dict(fused=device.type == "cuda", foreach=device.type != "cuda")  # one kernel a step on GPU
        adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **self.adam_flags)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, **adam)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, **adam)
        # Engineering, not Algorithm 1: autocast's dtype (--amp), fp16's loss scaling, a NaN/inf-loss flag on the device
        # (no host syncs); under torchrun, each rank its own z, y, flips (authors: seed + rank, src/loader.py, 947b35e)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.autocast = functools.partial(torch.autocast, device.type, dtype=self.amp_dtype,
                                          enabled=self.amp_dtype is not None)  # `with self.autocast():` in the steps
        self.scaler_G = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.scaler_D = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        if world > 1:
            torch.manual_seed(cfg.seed + dist.get_rank())

    def sample_latents(self, batch):
        """z ~ N(0, I) and y uniform over classes: fresh for every step (authors)."""
        z = torch.randn(batch, self.cfg.z_dim, device=self.device)
        return z, uniform_labels(batch, self.num_classes, self.device)

    def condition_loss(self, out, labels):
        """lambda * the class term of D's outputs `out` for images of class `labels`: 2C or D2D-CE on their
        embeddings (under DDP over the global batch), ACGAN's cross-entropy on their class logits; 0 for
        proj, whose condition is inside D's logit. D2D-CE is fed as 2C is (authors' src/worker.py at 947b35e)."""
        cfg = self.cfg
        if cfg.loss in ("2c", "d2dce"):
            embed, proxy, labels = gather_global_batch(out["embed"], out["proxy"], labels)
            if cfg.loss == "d2dce":
                return cfg.cond_lambda * data_to_data_cross_entropy_loss(embed, proxy, labels, cfg.temperature,
                                                                         cfg.margin)
            return cfg.cond_lambda * conditional_contrastive_loss(embed, proxy, labels, cfg.temperature,
                                                                  cfg.data_positives)
        if cfg.loss == "ac":
            return cfg.cond_lambda * acgan_loss(out["class_logits"], labels)
        return torch.zeros((), device=self.device)

    def update(self, optimizer, scaler, loss, micro=0):
        """backward of loss / N, micro-batch `micro` of N = --accumulation-steps, then after the last the Adam step (via
        fp16's GradScaler) as in the authors' src/worker.py (21594bd); a non-finite loss is flagged."""
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / self.cfg.accumulation_steps).backward()
        if micro == self.cfg.accumulation_steps - 1:
            scaler.step(optimizer)
            scaler.update()
        self.nonfinite |= ~torch.isfinite(loss.detach())

    def d_step(self, real, real_y, micro=0):
        """One D step on real images (B, 3, H, W) in [-1, 1] of classes real_y (B,): this rank's share of the batch."""
        B = real.shape[0]
        z, fake_y = self.sample_latents(B)
        with torch.no_grad(), self.autocast():
            fake = self.G_train(z, fake_y)
        images, labels = [real, fake], [real_y, fake_y]
        if self.cfg.cr_lambda:                                 # consistency regularization: augmented reals too
            images, labels = images + [cr_augment(real)], labels + [real_y]
        with self.autocast():
            # One D forward over real, fake (and augmented real) together (D has no BatchNorm): the same outputs
            # as the authors' two (three) calls would give with one power iteration of spectral norm, not two.
            out = self.D_train(torch.cat(images), torch.cat(labels))
            real_out = {k: v[:B] for k, v in out.items()}       # D's outputs on the reals,
            fake_out = {k: v[B:2 * B] for k, v in out.items()}  # on the fakes
            adv = d_hinge_loss(real_out["adv"].float(), fake_out["adv"].float())
            cond = self.condition_loss(real_out, real_y)       # 2C, D2D-CE: real images only (authors)
            if self.cfg.loss == "ac":                          # ACGAN as the authors ran it: the fakes too
                cond = cond + self.condition_loss(fake_out, fake_y)
            loss = adv + cond
            if self.cfg.cr_lambda:                             # D step only (authors); on the augmented reals:
                aug_out = {k: v[2 * B:] for k, v in out.items()}
                loss = loss + self.cfg.cr_lambda * consistency_loss(real_out, aug_out)
        self.update(self.opt_D, self.scaler_D, loss, micro)
        return {"d_loss": loss.detach(), "d_adv": adv.detach(), "d_cond": cond.detach()}

    def g_step(self, micro=0):
        """One G step on fresh z, y (this rank's share of the batch) through the frozen D."""
        z, y = self.sample_latents(self.cfg.batch_size // self.world)
        self.D.requires_grad_(False)                           # D frozen in the G step
        with self.autocast():
            out = self.D_frozen(self.G_train(z, y), y)
            adv = g_hinge_loss(out["adv"].float())
            cond = self.condition_loss(out, y)
            loss = adv + cond
        self.update(self.opt_G, self.scaler_G, loss, micro)
        self.D.requires_grad_(True)
        return {"g_loss": loss.detach(), "g_adv": adv.detach(), "g_cond": cond.detach()}

    @torch.no_grad()
    def ema_update(self, step):
        """G_ema <- decay * G_ema + (1 - decay) * G from G step ema_start on; a copy of G before it.
        Every floating entry of G's state_dict is averaged, buffers included (BN running statistics,
        spectral-norm u and v), as the authors' ema class does (biggan_utils.py, commit 21594bd);
        the one integer entry, BN's batch counter, is copied (they average it and truncate)."""
        decay = self.cfg.ema_decay if step >= self.cfg.ema_start else 0.0
        ema_state, state = self.G_ema.state_dict(), self.G.state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]
        # ema + (1 - decay) * (G - ema) = decay * ema + (1 - decay) * G, for every tensor in one call
        torch._foreach_lerp_([ema_state[k] for k in floats], [state[k] for k in floats], 1.0 - decay)
        for k in state.keys() - set(floats):
            ema_state[k].copy_(state[k])

    def iteration(self, batches, step):
        """One G step of the schedule: d_steps D steps on fresh real batches, one G step, EMA; each step on N =
        --accumulation-steps micro-batches of --batch-size (the 2C loss sees one micro-batch at a time, as theirs)."""
        n = self.cfg.accumulation_steps
        for i in range(self.cfg.d_steps * n):
            d_logs = self.d_step(*next(batches), micro=i % n)
        for micro in range(n):
            g_logs = self.g_step(micro)
        self.ema_update(step)
        return {**d_logs, **g_logs}

    PARTS = ("G", "D", "G_ema", "opt_G", "opt_D", "scaler_G", "scaler_D")  # what a checkpoint holds of it (below)

def build_models(cfg, num_classes):
    return (Generator(cfg.img_size, cfg.g_width, cfg.z_dim, cfg.shared_dim, num_classes),
            Discriminator(cfg.img_size, cfg.d_width, num_classes, cfg.loss, cfg.embed_dim,
                          getattr(cfg, "embed_head", "linear")))  # checkpoints older than --embed-head: linear

# --------------------------------------------------------------------------------------------
# Appendix: Generator and Discriminator, a BigGAN-style SN-ResNet (the authors' big_resnet)
# --------------------------------------------------------------------------------------------

# Channel multipliers of `width` and the resolution that gets self-attention: the authors' big_resnet.py
# (g_in/out_dims_collection, d_in/out_dims_collection, commit 21594bd). G's `ch` has one entry more than
# it has blocks: the 4x4 input's, then each block's output. D's has one per block, each block's output
# (its input is the image). 32 is CIFAR-10, 64 Tiny ImageNet, 128 ImageNet; their logs' counts are tested.
G_ARCH = {32: dict(ch=[4, 4, 4, 4], attn=16),
          64: dict(ch=[16, 8, 4, 2, 1], attn=32),
          128: dict(ch=[16, 16, 8, 4, 2, 1], attn=64)}
D_ARCH = {32: dict(ch=[2, 2, 2, 2], down=[True, True, False, False], attn=16),
          64: dict(ch=[1, 2, 4, 8, 16], down=[True, True, True, True, False], attn=32),
          128: dict(ch=[1, 2, 4, 8, 16, 16], down=[True, True, True, True, True, False], attn=64)}

class Generator(nn.Module):
    """G(z, y): hierarchical z (one chunk to the 4x4 input, one to each block), a shared class
    embedding, conditional BatchNorm, self-attention. Defaults: the CIFAR-10 model, 9,416,196 params."""

    def __init__(self, img_size=32, width=96, z_dim=80, shared_dim=128, num_classes=10):
        super().__init__()
        arch = G_ARCH[img_size]
        ch = [m * width for m in arch["ch"]]
        n_blocks = len(ch) - 1
        self.chunk, rest = divmod(z_dim, len(ch))              # equal chunks of z: 80 // 4 = 20 for CIFAR-10
        if rest:                                               # one for the 4x4 input, one for each block
            raise ValueError(f"z_dim {z_dim} must split into {len(ch)} equal chunks at {img_size}x{img_size}")
        self.ch0 = ch[0]
        self.shared = orthogonal_init(nn.Embedding(num_classes, shared_dim))  # plain, no SN
        self.linear = sn_linear(self.chunk, ch[0] * 4 * 4)
        cond_dim = shared_dim + self.chunk                     # 128 + 20 = 148
        self.blocks = nn.ModuleList([GBlock(ch[i], ch[i + 1], cond_dim) for i in range(n_blocks)])
        self.attn_after = [4 * 2 ** (i + 1) for i in range(n_blocks)].index(arch["attn"])  # block index
        self.attn = SelfAttention(ch[self.attn_after + 1])     # on the output of that block
        self.bn = nn.BatchNorm2d(ch[-1], eps=1e-4)             # the only affine BN in G
        self.to_rgb = sn_conv(ch[-1], 3, 3)

    def forward(self, z, y):                                   # z (B, z_dim), y (B,) -> (B, 3, S, S)
        z_chunks = torch.split(z, self.chunk, dim=1)
        shared = self.shared(y)                                # (B, shared_dim)
        h = self.linear(z_chunks[0]).view(z.shape[0], self.ch0, 4, 4)  # (B, C0, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, z_chunks[i + 1]], dim=1))  # cond (B, 148)
            if i == self.attn_after:
                h = self.attn(h)
        return torch.tanh(self.to_rgb(F.relu(self.bn(h))))

class Discriminator(nn.Module):
    """D(x, y) with one of three heads on the sum-pooled feature h = sum_{H,W} relu(trunk(x)):

      loss="2c"    -> {"adv": (B,), "embed": (B, embed_dim), "proxy": (B, embed_dim)}   ContraGAN
      loss="d2dce" -> the same outputs as "2c", for the D2D-CE loss                     ReACGAN
      loss="proj"  -> {"adv": (B,)}, the projection term already added                  ProjGAN
      loss="ac"    -> {"adv": (B,), "class_logits": (B, K)}                              ACGAN

    ContraGAN's D has no projection term: 2C replaces it. Every output also holds "h" (B, C), the pooled
    feature, which no loss uses: evaluation reads D's class judgement off it (`d_class_scores`).
    Defaults: the CIFAR-10 model, 2,517,186 params with the 2C head, 2,415,170 with the projection head.
    """

    def __init__(self, img_size=32, width=96, num_classes=10, loss="2c", embed_dim=512, embed_head="linear"):
        super().__init__()
        if loss not in ("2c", "d2dce", "proj", "ac"):
            raise ValueError(f"unknown loss {loss!r}: choose 2c, d2dce, proj or ac")
        arch = D_ARCH[img_size]
        ch = [m * width for m in arch["ch"]]
        self.loss = loss
        self.blocks = nn.ModuleList(
            [DBlock(3 if i == 0 else ch[i - 1], ch[i], arch["down"][i], first=(i == 0))
             for i in range(len(ch))])
        resolutions = [img_size // 2 ** (sum(arch["down"][:i + 1])) for i in range(len(ch))]
        self.attn_after = resolutions.index(arch["attn"])
        self.attn = SelfAttention(ch[self.attn_after])
        C = ch[-1]
        self.adv_head = sn_linear(C, 1)
        if loss in ("2c", "d2dce"):
            self.embed_head = sn_linear(C, embed_dim)          # h -> l(x), one linear: the paper's choice
            if embed_head == "mlp":                            # the authors' nonlinear_embed (big_resnet.py, 21594bd)
                self.embed_head = nn.Sequential(self.embed_head, nn.ReLU(), sn_linear(embed_dim, embed_dim))
            self.proxy = sn(nn.Embedding(num_classes, embed_dim))  # e(y)
        elif loss == "proj":
            self.class_embed = sn(nn.Embedding(num_classes, C))
        else:
            self.class_head = sn_linear(C, num_classes)

    def features(self, x):                                     # x (B, 3, S, S) -> h (B, C)
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_after:
                h = self.attn(h)
        return F.relu(h).sum(dim=(2, 3))                       # global SUM pooling (not mean)

    def forward(self, x, y):
        h = self.features(x)                                   # (B, C)
        adv = self.adv_head(h).squeeze(1)                      # (B,)
        if self.loss in ("2c", "d2dce"):
            return {"adv": adv, "h": h, "embed": self.embed_head(h), "proxy": self.proxy(y)}
        if self.loss == "proj":
            return {"adv": projection_logit(adv, h, self.class_embed(y)), "h": h}
        return {"adv": adv, "h": h, "class_logits": self.class_head(h)}

# --------------------------------------------------------------------------------------------
# Their blocks and layers: residual blocks, conditional BatchNorm, self-attention, spectral norm
# --------------------------------------------------------------------------------------------

class GBlock(nn.Module):
    """G up-block: CBN -> ReLU -> up x2 -> conv3 -> CBN -> ReLU -> conv3, skip: up x2 -> conv1."""

    def __init__(self, c_in, c_out, cond_dim):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(c_in, cond_dim)
        self.conv1 = sn_conv(c_in, c_out, 3)
        self.bn2 = ConditionalBatchNorm2d(c_out, cond_dim)
        self.conv2 = sn_conv(c_out, c_out, 3)
        self.skip = sn_conv(c_in, c_out, 1)

    def forward(self, x, cond):
        h = upsample2x(F.relu(self.bn1(x, cond)))
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        # A 1x1 conv commutes with nearest up-sampling: conv first, on 4x fewer pixels, same result.
        return h + upsample2x(self.skip(x))

class DBlock(nn.Module):
    """D block: ReLU -> conv3 -> ReLU -> conv3 [-> avgpool2]; skip conv1 [-> avgpool2] only when down-sampling or
    changing channels. first=True is D's input block: conv3 -> ReLU -> conv3 -> avgpool2, skip avgpool2 -> conv1.

    Authors' quirk, kept: their block starts with an in-place ReLU that also overwrites the tensor the skip holds, so
    the skip carries relu(x), not x (ResNet/BigGAN carry x)."""

    def __init__(self, c_in, c_out, downsample, first=False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = sn_conv(c_in, c_out, 3)
        self.conv2 = sn_conv(c_out, c_out, 3)
        self.skip = sn_conv(c_in, c_out, 1) if (first or downsample or c_in != c_out) else None

    def forward(self, x):
        if self.first:
            h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
            return h + self.skip(F.avg_pool2d(x, 2))
        x = F.relu(x)                                          # the skip below sees relu(x) (quirk)
        h = self.conv2(F.relu(self.conv1(x)))
        skip = self.skip(x) if self.skip is not None else x
        if self.downsample:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip

class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then x * (1 + gain(c)) + bias(c) (BigGAN; the authors' code).

    c = concat(shared class embedding, one chunk of z). gain/bias are SN linears without bias."""

    def __init__(self, channels, cond_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-4, momentum=0.1, affine=False)
        self.gain = sn_linear(cond_dim, channels, bias=False)
        self.bias = sn_linear(cond_dim, channels, bias=False)

    def forward(self, x, cond):                                # x (B, C, H, W), cond (B, cond_dim)
        gain = 1.0 + self.gain(cond)[:, :, None, None]         # (B, C, 1, 1)
        bias = self.bias(cond)[:, :, None, None]               # (B, C, 1, 1)
        return self.bn(x) * gain + bias

class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) as in BigGAN: theta, phi -> C/8; g -> C/2; 2x2
    max-pool on phi and g; output conv back to C; learnable scale starting at 0. 1.25 C^2 + 1 params."""

    def __init__(self, channels):
        super().__init__()
        self.theta = sn_conv(channels, channels // 8, 1, bias=False)
        self.phi = sn_conv(channels, channels // 8, 1, bias=False)
        self.g = sn_conv(channels, channels // 2, 1, bias=False)
        self.out = sn_conv(channels // 2, channels, 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        theta = self.theta(x).flatten(2)                       # (B, C/8, HW)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)          # (B, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)              # (B, C/2, HW/4)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, -1)  # (B, HW, HW/4)
        o = (g @ attn.transpose(1, 2)).view(B, C // 2, H, W)   # (B, C/2, H, W)
        return x + self.scale[0] * self.out(o)                 # 0-d: a bf16 output stays bf16

def upsample2x(x):
    """Nearest x2 as a view + copy: F.interpolate(mode="nearest") took 6x longer on a CPU (tools/bench.py)."""
    B, C, H, W = x.shape
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)

class SpectralNorm(nn.Module):
    """W / sigma(W), sigma from one power iteration per training forward (Miyato et al. 2018) as torch.nn.utils.
    spectral_norm does, in fp32 outside autocast (exact under bf16/fp16); u, v: buffers (not in the authors' counts)."""

    def __init__(self, weight, eps=1e-6):
        super().__init__()
        self.eps = eps  # authors: eps=1e-6 in every spectral_norm call
        self.register_buffer("u", F.normalize(torch.randn(weight.shape[0]), dim=0, eps=eps))   # (out,)
        self.register_buffer("v", F.normalize(torch.randn(weight[0].numel()), dim=0, eps=eps))  # (in*kh*kw,)

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            w, u, v = weight.flatten(1).float(), self.u, self.v   # (out, in*kh*kw), (out,), (in*kh*kw,)
            if self.training:                                  # one power iteration per forward, into new tensors:
                with torch.no_grad():                          # a second forward before backward keeps this u, v
                    v = F.normalize(w.t() @ u, dim=0, eps=self.eps)
                    u = F.normalize(w @ v, dim=0, eps=self.eps)
                    self.u.copy_(u), self.v.copy_(v)           # the next forward starts from them
            sigma = torch.dot(u, w @ v)                        # u^T W v, the largest singular value of W
            return (weight.float() / sigma).to(weight.dtype)

def orthogonal_init(module):
    """Orthogonal weights and zero biases: the authors' 'ortho' initialisation."""
    nn.init.orthogonal_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module

def sn(module):
    """Orthogonal init, then spectral norm on module.weight (every conv/linear/embedding of G and D)."""
    orthogonal_init(module)
    parametrize.register_parametrization(module, "weight", SpectralNorm(module.weight))
    return module

def sn_conv(c_in, c_out, kernel_size, bias=True):
    return sn(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias))

def sn_linear(f_in, f_out, bias=True):
    return sn(nn.Linear(f_in, f_out, bias=bias))

# ============================================================================================
# The method ends here. Below: what a run needs that the paper does not describe, in sections: the
# data sets, distributed training (torchrun), evaluation, the run and its folder, the command line.
# ============================================================================================

class UsageError(Exception):
    """A problem with the user's input: main() prints 'error: <message>' and exits with status 2."""

class RankError(UsageError):
    """A UsageError that every rank says, not rank 0 alone: rank 0 may be the one missing."""

# ---- Data: CIFAR-10/100 (torchvision), any class-per-folder tree, built-in shapes ---------------------------------

def to_signed(images):  # uint8 in [0, 255] -> float in [-1, 1], the range of G's tanh (fid.py does the same)
    return images.float() / 127.5 - 1.0

def balanced_labels(n, num_classes, device, generator=None):
    """n labels, n / K (+-1) per class: in order (grid rows), or shuffled (no one-class batch for BatchNorm)."""
    y = torch.arange(n, device=device) * num_classes // n
    return y if generator is None else y[torch.randperm(n, device=device, generator=generator)]

class TensorImages(torch.utils.data.TensorDataset):
    """A data set held in memory as uint8 (N, 3, H, W) images and int64 (N,) labels."""

    def __init__(self, images, labels, classes):
        super().__init__(images, labels)
        self.images, self.labels, self.classes = images, labels, classes

SHAPES = [("circle", (230, 70, 60)), ("square", (70, 200, 90)), ("triangle", (80, 120, 240)), ("cross", (235, 210, 70))]

def make_shapes(n, img_size=32, seed=0):
    """Built-in data, deterministic in its arguments: one coloured shape (the class) per image on a noisy background."""
    gen, S = torch.Generator().manual_seed(seed), img_size
    labels = (torch.arange(n) % len(SHAPES))[torch.randperm(n, generator=gen)]
    r = (0.15 + 0.15 * torch.rand(n, generator=gen)) * S                   # (n,) half-size
    cx = r + (S - 2 * r) * torch.rand(n, generator=gen)                    # (n,) centre, inside
    cy = r + (S - 2 * r) * torch.rand(n, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    dx, dy, r3 = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], r[:, None, None]  # (n, S, S)
    masks = torch.stack([dx ** 2 + dy ** 2 < r3 ** 2,                                # circle
                         torch.maximum(dx.abs(), dy.abs()) < 0.8 * r3,               # square
                         (dy < 0.8 * r3) & (dx.abs() < (dy + r3) * 0.6),             # triangle
                         ((dx.abs() < r3 / 3) & (dy.abs() < r3)) |
                         ((dy.abs() < r3 / 3) & (dx.abs() < r3))])                  # cross
    mask = masks[labels, torch.arange(n)]                                  # (n, S, S)
    colour = torch.tensor([c for _, c in SHAPES], dtype=torch.float32)[labels] + 20 * torch.randn(n, 3, generator=gen)
    background = 30 + 8 * torch.randn(n, 3, S, S, generator=gen)
    images = torch.where(mask[:, None], colour[:, :, None, None], background)
    return images.clamp(0, 255).round().to(torch.uint8), labels

def shapes_class_of(images):
    """Which class each shapes image (float (B, 3, H, W) in [-1, 1]) shows, or -1 for none: the commonest palette
    colour (within 80, 4 sigma of the jitter) if its pixels are >= 1% of the image and fit that class's `forms` row
    (fill of their bounding box, centroid below the box centre, roundness; the measured ranges: docs/judge.md)."""
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
    lo, hi, below_lo, below_hi, round_hi = forms[k].T
    ok = (n >= 0.01 * H * W) & (lo <= fill) & (fill <= hi) & (below_lo <= below) & (below <= below_hi)
    return torch.where(ok & (n / (torch.pi * reach ** 2) <= round_hi), k, -1)   # roundness: area / enclosing disc

CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}

def load_cifar(name, data_dir, train):
    """CIFAR-10/100 via torchvision: downloaded into data_dir once, then read (md5-checked) from there."""
    import torchvision
    cls, old_timeout = getattr(torchvision.datasets, CIFAR[name]), socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(20)                           # offline: fail in seconds, never hang
        ds = cls(data_dir, train=train, download=True)         # no download when the files are there
    except Exception as err:
        raise UsageError(f"could not download {name} ({cls.filename} from {cls.url}): "
                         f"{(str(err) or type(err).__name__).splitlines()[0]}. "
                         f"Offline: fetch that file elsewhere and put it, or its extracted folder {cls.base_folder}/,"
                         f" in --data-dir ({os.path.join(data_dir, cls.filename)})") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, 3, 32, 32) uint8
    return TensorImages(images, torch.tensor(ds.targets), list(ds.classes))

# GIF, animated WebP and multi-page TIFF: the first frame. Other types (.heic, .avif, ...) are left out, said once.
IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")

class FolderImages(torch.utils.data.Dataset):
    """A class-per-folder tree's images (load_folder's list); an unreadable one is named once and the next drawn
    instead (reading all first would take hours). fingerprint: a hash of the file list, kept in checkpoints."""

    def __init__(self, root, samples, classes, transform):
        self.root, self.samples, self.classes, self.transform = root, samples, classes, transform
        listing = json.dumps([(p[len(os.path.join(root, "")):], k) for p, k in samples])  # paths from root, classes
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]   # of the file list: no image read
        self.warned = torch.zeros(len(samples), dtype=torch.bool).share_memory_()  # seen by every loader worker

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in (k % len(self) for k in range(i, i + len(self))):
            try:
                return self.transform(fid.read_image(self.samples[j][0])), self.samples[j][1]   # fid.py's reader
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, RuntimeWarning) as err:  # PIL's
                if not self.warned[j]:
                    self.warned[j] = True
                    print(f"warning: skipped unreadable image {self.samples[j][0]} ({type(err).__name__}: "
                          f"{err}); the next image is used in its place", file=sys.stderr, flush=True)
        raise UsageError(f"no image in {self.root} can be read")

def load_folder(root, img_size, flag="--data-dir", run_dir=None):
    """A class-per-folder tree (root/<class>/.../<image>), resized and centre-cropped; links followed, loops once,
    never into run_dir (its sample grids would become training images). Not torchvision's ImageFolder lister: its
    os.walk has no loop detection, and its list deduplicated by real path took 6x as long (docs/performance.md)."""
    from torchvision import transforms as T
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist (give it with {flag})")
    owner, samples = {os.path.realpath(root): None}, []   # the class of each folder and file met, by real path
    run_real = os.path.realpath(run_dir) if run_dir else None
    def first_time(real, path, k):                            # real: the path with every link resolved
        n = len(owner)
        if owner.setdefault(real, k) not in (k, None):
            raise UsageError(f"{path} is also in class {classes[owner[real]]!r} (through a link): "
                             f"each image needs one class")
        return len(owner) > n
    try:
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        if dangling := [os.path.join(root, e) for e in entries if not os.path.exists(os.path.join(root, e))]:
            raise UsageError(f"{dangling[0]} is a link to {os.readlink(dangling[0])!r}, which does not exist (a "
                             f"class folder moved?): fix or remove the link")
        if not classes:
            raise UsageError(f"image folder {root!r} holds no class sub-folders: put each class's images in "
                             f"{root}/<class name>/")
        left_out = [os.path.join(root, e) for e in entries if e not in classes]
        for k, c in enumerate(classes):
            stack, found = [os.path.join(root, c)], []
            while stack:
                d = stack.pop()
                real_d = os.path.realpath(d)
                if first_time(real_d, d, k):
                    if run_real is not None and os.path.commonpath([real_d, run_real]) == run_real:
                        raise UsageError(f"{d} leads into the run folder {run_dir} (through a link): the run's "
                                         f"sample grids would be read as training images; remove the link")
                    for e in (e for e in os.scandir(d) if not e.name.startswith(".")):  # hidden: left out
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
    return FolderImages(root, samples, classes, resize)

def load_data(cfg):
    """(train, heldout, num_classes); heldout: CIFAR's test split, a fresh shapes draw, or 5% of a folder (>= 200)."""
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
        classes = [name for name, _ in SHAPES]
        train = TensorImages(*make_shapes(cfg.shapes_size, cfg.img_size, seed=0), classes)
        return train, TensorImages(*make_shapes(max(cfg.fid_images, 1024), cfg.img_size, seed=1), classes), len(classes)
    data = load_folder(cfg.data_dir, cfg.img_size, run_dir=cfg.run_dir)
    n_hold = len(data) // 20 if len(data) >= 200 else 0    # shuffled below: FID's reference is the first images
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234)).tolist()
    heldout = torch.utils.data.Subset(data, order[:n_hold]) if n_hold else None
    return torch.utils.data.Subset(data, order[n_hold:]), heldout, len(data.classes)

class Batches:
    """Endless real batches in [-1, 1]; its state (epoch, batch) is saved, so a resumed run sees the same batches."""

    def __init__(self, dataset, local_batch, rank, world, seed, device, num_workers=0, flip=True):
        if len(dataset) < local_batch * world:
            raise UsageError(f"the data set has {len(dataset)} images, fewer than one batch of {local_batch * world}")
        self.dataset, self.batch, self.device = dataset, local_batch, device
        self.num_workers, self.flip = num_workers, flip
        self.sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=seed, drop_last=True)  # per rank
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
        if isinstance(self.dataset, TensorImages):             # in memory: index; (0, B) at an epoch's end
            for ids in torch.tensor(idx[:n * self.batch], dtype=torch.long, device=self.device).view(n, self.batch):
                yield self.images[ids], self.labels[ids]
        else:                                                  # its own generator: the global RNG draws z, y, flips
            yield from torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, idx[:n * self.batch]),
                self.batch, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.sampler.seed + self.epoch))

    def __next__(self):
        if self._it is None:
            self._it = self._batches()
        while (batch := next(self._it, None)) is None:         # the epoch is over: the next one
            self.epoch, self.pos, self._it = self.epoch + 1, 0, self._batches()
        self.pos += 1
        x = to_signed(batch[0].to(self.device, non_blocking=True))   # (B, 3, H, W)
        if self.flip:                                          # the authors' only augmentation (off in the paper)
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=self.device) < 0.5, x.flip(3), x)
        return x, batch[1].to(self.device, non_blocking=True)

def fixed_sample(dataset, n, seed):
    """A fixed random subset as uint8 (n, 3, H, W) images and (n,) labels (D's accuracy checks)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return tuple(torch.utils.data.default_collate([dataset[i] for i in order]))   # (images, labels)

# ---- Distributed training (torchrun): process group, DDP, the 2C all-gather, stopping together, RNG states ---------

def is_main_process():                                         # only rank 0 prints, writes and errs; a stray
    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"   # RANK: refused aloud

def pick_device(choice, index=0, tf32=True):
    """--device auto|cuda|cpu; on a GPU, TF32 as --tf32 says and cuDNN autotuning."""
    if not (torch.cuda.is_available() if choice == "auto" else choice == "cuda"):
        return torch.device("cpu")
    torch.cuda.set_device(index)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", index)

def setup_device(cfg):
    """(device, rank, world) from torchrun's environment; joins the process group when world > 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")), cfg.tf32)
    if world > 1 and not dist.is_initialized():              # torchrun has met every rank; ranks started by hand
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))  # wait here
        warnings.filterwarnings("ignore", message=".*nn.functional.all_gather is deprecated")  # public, differentiable
    return device, rank, world

def wrap_for_training(trainer):
    """Sets the modules Trainer's steps call: G_train, D_train: G and D in DDP (world > 1); D_frozen: the plain D (the
    G step gives D no gradient: DDP would wait for one); each compiled with --compile. Trainer.G and .D stay the plain
    modules that are saved and averaged into G_ema."""
    modules = [trainer.G, trainer.D, trainer.D]
    if trainer.world > 1:
        modules[:2] = [nn.parallel.DistributedDataParallel(m) for m in modules[:2]]  # device_ids None: one a rank
    if trainer.cfg.compile:
        modules = [torch.compile(m, mode=trainer.cfg.compile) for m in modules]
    trainer.G_train, trainer.D_train, trainer.D_frozen = modules

def any_rank(flag, device, world):
    """True on every rank when flag (a bool or a 0-d tensor) is true on any: all ranks stop together."""
    flag = torch.as_tensor(flag, device=device).to(torch.int32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

def rng_states(device, world):
    """Every rank's RNG state (rank 0 saves them all), so that a resumed run draws the same numbers."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states

# ---- Evaluation: sample grid, FID of the EMA generator (fid.py), Figure 3's diagnostics ----------------------------

@torch.no_grad()
def generate(G, labels, z_dim, batch_size, generator=None):
    """G's images in [-1, 1] for labels, as the authors evaluate G_ema: in train mode, so BatchNorm normalises with
    each batch's statistics, and its running buffers restored after (the EMA averages them too)."""
    G.train()
    buffers = [b.clone() for b in G.buffers()]
    out = [G(torch.randn(len(y), z_dim, device=y.device, generator=generator), y).float()
           for y in labels.split(batch_size)]
    torch._foreach_copy_(list(G.buffers()), buffers)
    return torch.cat(out)

def save_grid(G, path, num_classes, z_dim, device, batch_size, seed, class_names=None):
    """A PNG with one row per class, its name in a left margin if class_names are given. The noise comes from its own
    generator, the same at every evaluation (rows comparable over training; training's RNG untouched)."""
    import torchvision
    from PIL import ImageDraw, ImageOps
    cols = 10 if num_classes <= 20 else 5
    gen = torch.Generator(device=device).manual_seed(seed)
    images = generate(G, balanced_labels(num_classes * cols, num_classes, device), z_dim, batch_size, gen)
    grid = torchvision.utils.make_grid(images * 0.5 + 0.5, nrow=cols, padding=1)   # save_image's rounding below
    grid = Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy())
    if class_names:                                            # PIL's default font (no file needed) draws ASCII
        names = [n if n.isascii() and n.isprintable() else ascii(n)[1:-1] for n in class_names]  # only: 猫 -> \u732b
        margin, row = int(max(map(ImageDraw.Draw(grid).textlength, names))) + 6, images.shape[2] + 1  # newline: \n
        grid = ImageOps.expand(grid, (margin, 0, 0, 0))        # a black margin on the left
        for k, name in enumerate(names):
            ImageDraw.Draw(grid).text((3, k * row + row // 2 - 5), name, fill=(255, 255, 255))
    grid.save(path)

@torch.no_grad()
def d_real_share_and_classes(D, images, labels, device, batch_size=256):
    """D on images (N, 3, H, W), uint8 or in [-1, 1]: the share it calls real (Figure 3), the class it sees in each."""
    D.eval()                                                   # no power iteration: state untouched
    outs = [D(to_signed(x.to(device)) if x.dtype == torch.uint8 else x.to(device), y.to(device))
            for x, y in zip(images.split(batch_size), labels.split(batch_size))]
    judged = torch.cat([d_class_scores(D, o["h"]).argmax(1).cpu() for o in outs])  # eval mode too: SN heads
    D.train()
    return sum(int((o["adv"] > 0).sum()) for o in outs) / max(len(labels), 1), judged

def d_class_scores(D, h):
    """D's class judgement (B, K) of its features h: cosine to each proxy (2C, D2D-CE), <embed(y), h> for each y
    (proj: arg-max_y D(x, y), whose adversarial term is the same for all y), the class logits (ACGAN)."""
    if D.loss in ("2c", "d2dce"):
        return F.normalize(D.embed_head(h), dim=1) @ F.normalize(D.proxy.weight, dim=1).t()
    return h @ D.class_embed.weight.t() if D.loss == "proj" else D.class_head(h)

def confusion(asked, judged, num_classes):
    """K x (K + 1) counts of asked (rows) vs judged classes, the last "none" (-1), the share judged as asked, and that
    share after the best relabelling (Hungarian). Only the second high: G draws classes under the wrong labels."""
    from scipy.optimize import linear_sum_assignment
    K, judged = num_classes, torch.where(judged < 0, num_classes, judged).cpu()   # none (-1): column K
    counts = torch.bincount(asked.cpu() * (K + 1) + judged, minlength=K * (K + 1)).view(K, K + 1)
    rows, cols = linear_sum_assignment(counts[:, :K].numpy(), maximize=True)
    n = max(len(asked), 1)
    return counts, counts.diag().sum().item() / n, counts[rows, cols].sum().item() / n

def load_judge(path, device="cpu", expect=None):
    """(judge, info) from a file tools/judge.py writes: a torch.export program (images in [-1, 1] -> class logits, in
    eval mode) and its info (data set, classes, image size, held-out accuracy); expect: its num_classes and data."""
    if not os.path.isfile(path):
        raise UsageError(f"no judge file at {path!r} (tools/judge.py trains and saves one)")
    try:                                     # read as a zip first: torch.export.load logs a traceback for other files
        with zipfile.ZipFile(path) as archive:
            info = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("contragan-judge.json"))))
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile):   # e.g. an older judge file: a pickled state dict
        raise UsageError(f"{path} is not a judge file of this version: re-run tools/judge.py to write one") from None
    have = {"num_classes": info["num_classes"], **info["data"]}
    wrong = {key: have.get(key) for key, value in (expect or {}).items() if have.get(key) != value}
    if wrong:
        raise UsageError(f"judge {path} reads other data: its {wrong}, not {({k: expect[k] for k in wrong})}")
    with open(path, "rb") as f:                                # a file object: any name, not only *.pt2
        return torch.export.load(f).module().to(device).requires_grad_(False), info   # frozen: no autograd graph

def d_diagnostics(D, G_ema, reals_train, reals_heldout, num_classes, cfg, device, judge=None):
    """Figure 3's overfitting probe on real (images, labels): training, held-out (or None); class confusion of G_ema's
    fakes, their classes read by D, by their colours (shapes), by --judge's CNN."""
    rec = {"d_acc_train": d_real_share_and_classes(D, *reals_train, device)[0]}
    if reals_heldout is not None:
        rec["d_acc_heldout"], judged = d_real_share_and_classes(D, *reals_heldout, device)
        rec["d_acc_gap"] = rec["d_acc_train"] - rec["d_acc_heldout"]
        counts, rec["d_class_acc_heldout"], _ = confusion(reals_heldout[1], judged, num_classes)
        rec["confusion_d_heldout"] = counts.tolist() if num_classes <= 100 else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 4)  # the same fakes every evaluation
    n_fakes = max(cfg.acc_images // num_classes, 1) * num_classes   # --acc-images sizes the fakes too
    y = balanced_labels(n_fakes, num_classes, device, gen)
    fake = generate(G_ema, y, cfg.z_dim, cfg.eval_batch, gen)
    readers = {"d": d_real_share_and_classes(D, fake, y, device)[1]}
    if cfg.dataset == "shapes":                                # the class read off the colour
        readers["colour"] = shapes_class_of(fake)
    if judge is not None:                                      # --judge: (its CNN, its info), loaded once by Run
        confidence, readers["judge"] = torch.cat([judge[0](x) for x in fake.split(256)]).softmax(1).max(1)
        rec.update(judge_heldout_accuracy=judge[1]["heldout_accuracy"], judge_confidence=confidence.mean().item())
    for name, judged in readers.items():
        key = "class_consistency_" + name
        counts, rec[key], rec[key + "_relabelled"] = confusion(y, judged, num_classes)
        rec["confusion_" + name] = counts.tolist() if num_classes <= 100 else None
        if name == "colour":                                   # only the colour reader can say "no class"
            rec["class_none"] = counts[:, -1].sum().item() / len(y)
    return rec

def spectral_norms(model):
    """{layer: sigma}: u^T W v, each weight's largest singular value, what SN divides it by (Figure 3 right)."""
    weights = {name: m.parametrizations.weight for name, m in model.named_modules()
               if parametrize.is_parametrized(m, "weight")}    # p[0]: its SpectralNorm, p.original: W
    return {name: float(p[0].u @ p.original.detach().flatten(1).float() @ p[0].v) for name, p in weights.items()}

def detect_collapse(history, gap_threshold, patience):
    """Section 4.5's collapse, or None: D's train - held-out accuracy past a threshold, or FID up `patience` times."""
    if (gap := history[-1].get("d_acc_gap")) is not None and gap > gap_threshold:
        return f"D overfits: train/held-out accuracy gap {gap:.2f} > {gap_threshold}"
    fids = [h["fid"] for h in history if h.get("fid") is not None][-(patience + 1):]
    if len(fids) == patience + 1 and all(b > a for a, b in zip(fids, fids[1:])):
        return f"FID rose {patience} evaluations in a row ({' -> '.join(f'{f:.2f}' for f in fids)})"
    return None

class FIDEvaluator:
    """FID of G_ema as the paper measured it (`description`), on rank 0 (the other ranks wait in their next step)."""

    def __init__(self, cfg, reference, split, num_classes, device):
        self.cfg, self.num_classes, self.device = cfg, num_classes, device
        if cfg.intra_fid and cfg.fid_images < 2 * num_classes:   # before minutes of reference statistics
            raise UsageError(f"--intra-fid needs --fid-images of at least {2 * num_classes}: 2 fakes per class, "
                             f"for a covariance")
        random_weights = cfg.fid_weights == "random"
        try:
            self.inception = fid.load_inception(weights=None if random_weights else cfg.fid_weights,
                                                device=device, random_init=random_weights)
        except fid.FIDError as err:                            # name this script's flags, not fid.py's
            raise UsageError(str(err).replace("--weights PATH", "--fid-weights PATH (or --fid-images 0 "
                                              "to train without FID)")) from None
        n_ref = min(cfg.fid_images, len(reference))
        files = reference.dataset.fingerprint if cfg.dataset == "folder" else None  # the file list it is made of
        self.protocol = {"dataset": cfg.dataset, "split": split, "num_images": n_ref, "img_size": cfg.img_size,
                         **fid.inception_protocol(self.inception), **({"files": files} if files else {})}
        self.description = (f"FID protocol: {cfg.fid_images} fakes of G_ema (BatchNorm batch statistics, batch "
                            f"{cfg.eval_batch}) vs {n_ref} of {len(reference)} {cfg.dataset} {split} images (a fixed "
                            f"subset); Inception-V3 {self.protocol['weights']}; {self.protocol['resize']}")
        weights = "random" if random_weights else "tf"        # every protocol key in the name; changed files:
        name = f"fid_{cfg.dataset}_{split}_{cfg.img_size}px_{n_ref}_{weights}" + (f"_{files}" if files else "")
        stem = os.path.join(cfg.data_dir if split in ("test", "heldout") else cfg.run_dir, name)  # a new reference
        names = [stem + ".npz"] + [f"{stem}_class{k}.npz" for k in range(num_classes) if cfg.intra_fid]
        if split in ("test", "heldout") and not all(map(os.path.exists, names)) and not fid.can_write(cfg.data_dir):
            stem = os.path.join(cfg.run_dir, os.path.basename(stem))   # e.g. a read-only shared data set
            self.description += f"; reference statistics cached in the run folder (cannot write to {cfg.data_dir})"
        subset, self.class_ref = torch.utils.data.Subset(reference, range(n_ref)), None
        if cfg.intra_fid:                                      # checked before any statistics are written
            labels = torch.tensor([reference[i][1] for i in range(n_ref)])   # each image read once
            counts = torch.bincount(labels, minlength=num_classes)
            if counts.min() < 2:
                k, classes = int(counts.argmin()), getattr(reference, "classes", None) or reference.dataset.classes
                raise UsageError(f"--intra-fid needs 2 reference images per class, for a covariance: class "
                                 f"{classes[k]!r} has {counts[k]} of the {n_ref} (of {len(reference)} in all)")
            self.class_ref = [self._reference(torch.utils.data.Subset(subset, torch.where(labels == k)[0].tolist()),
                                              f"{stem}_class{k}.npz", {**self.protocol, "class": k})
                              for k in range(num_classes)]
        self.ref = self._reference(subset, stem + ".npz", self.protocol)

    def _reference(self, dataset, path, protocol):             # computed once, cached; mu, sigma
        return fid.reference_stats(self.inception, dataset, path, protocol, num_images=len(dataset),
                                   batch_size=self.cfg.eval_batch, device=self.device)[:2]

    def __call__(self, G):
        """{'fid', ['intra_fid', 'intra_fid_per_class']} of --fid-images fakes in --eval-batch batches."""
        cfg, K = self.cfg, self.num_classes
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)  # the same fakes' noise every time
        class_stats = [fid.RunningStats() for _ in range(K)] if self.class_ref else None
        if class_stats is None:
            labels = uniform_labels(cfg.fid_images, K, self.device, gen)
        else:                                                  # intra-FID: the same fakes, by label, in mixed batches
            labels = balanced_labels(cfg.fid_images, K, self.device, gen)
        batches = iter(labels.split(cfg.eval_batch))           # fid.py asks in the same eval_batch chunks
        def sample(n):
            y = next(batches)
            x = generate(G, y, cfg.z_dim, cfg.eval_batch, gen)
            return x if class_stats is None else (x, y)
        stats = fid.features_from_sampler(self.inception, sample, cfg.fid_images, cfg.eval_batch, self.device,
                                          class_stats=class_stats)[0]
        out = {"fid": fid.frechet_distance(stats.mu, stats.sigma, *self.ref)}
        if class_stats is not None:
            per_class = [fid.frechet_distance(s.mu, s.sigma, *ref) for s, ref in zip(class_stats, self.class_ref)]
            out["intra_fid"], out["intra_fid_per_class"] = sum(per_class) / K, per_class
        return out

# ---- The run: set up, resume, then one loop that trains, logs, evaluates, saves and stops on a signal ------------

# Ctrl-C, SIGTERM (SLURM, `timeout`) and SIGHUP stop a run: at once in start-up, saved in the loop (train's handler).
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]

def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)

def start_run(cfg, explicit):
    """Resolve the configuration (a resumed run: the checkpoint's), own the run folder, run."""
    checkpoint = ckpt_path = None
    if cfg.run_dir == "":                                      # as --resume "": an unset variable is no default
        raise UsageError("--run-dir is empty (an unset variable?): give a folder, or leave the flag out")
    if cfg.resume is not None:                                 # --resume "" (an unset variable) too: no fresh run
        checkpoint, ckpt_path = load_checkpoint(cfg.resume)
        run_dir = cfg.run_dir or os.path.dirname(ckpt_path) or "."  # --resume last.pt: this folder
        cfg = merge_resume_config(cfg, explicit, checkpoint, ckpt_path)
        cfg.run_dir = run_dir
    validate(cfg)
    cfg.run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.dataset}-{cfg.loss}-s{cfg.seed}")
    at = [os.path.realpath(cfg.run_dir), os.path.realpath(cfg.data_dir)]  # either inside the other
    if cfg.dataset == "folder" and os.path.commonpath(at) in at:
        raise UsageError(f"--run-dir {cfg.run_dir} and the image folder --data-dir {cfg.data_dir} overlap: the "
                         f"run's sample grids would be read as training images; give folders apart")
    if checkpoint is not None and checkpoint["step"] >= cfg.steps:
        say(f"nothing trained: {ckpt_path} is at step {checkpoint['step']}, --steps {cfg.steps} (give more)")
        return 0
    device, rank, world = setup_device(cfg)
    release = claim_run_dir(cfg.run_dir, ckpt_path) if rank == 0 else None   # only rank 0 owns the folder
    try:
        return train(setup_run(cfg, checkpoint, ckpt_path, device, rank, world))
    except (OSError, RuntimeError) as err:                     # a full disk, a folder removed; out of memory; a rank
        lost = world > 1 and (isinstance(err, dist.DistError) or "gloo" in str(err))  # lost: its collectives fail
        oom = isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
        if not (lost or oom or isinstance(err, OSError)):
            raise
        last = os.path.join(cfg.run_dir, "last.pt")
        kept = f"; {last} is intact" if os.path.exists(last) else "; no checkpoint was written"
        if lost:                                               # gloo: "[file:line] Read error ...: reset by peer. ..."
            if os.path.exists(last):
                kept += f": continue with --resume {cfg.run_dir}"
            raise RankError(f"rank {rank}: another rank stopped or lost its connection "
                            f"({str(err).split('] ')[-1].split('. ')[0]}){kept}") from None
        if oom:
            raise UsageError(f"out of memory on {device}: --batch-size {cfg.batch_size}, --eval-batch "
                             f"{cfg.eval_batch}, --g-width {cfg.g_width} or --d-width {cfg.d_width} is too large for "
                             f"its memory{kept}") from None
        raise UsageError(f"{err.strerror or err}: {err.filename or cfg.run_dir}{kept}") from None
    finally:
        if release is not None:
            release()

def say(*args, **kwargs):
    """print on rank 0 (the other ranks print nothing), flushed."""
    if not is_main_process():
        return
    try:
        print(*args, **kwargs, flush=True)
    except OSError:                                            # the terminal is gone (SIGHUP, a closed pipe): train on
        sys.stdout = open(os.devnull, "w")

def setup_run(cfg, checkpoint, ckpt_path, device, rank, world):
    """The run's state (a namespace) once its folder is owned: data, models, FID reference, the fixed images of the
    diagnostics; a checkpoint's state restored. Nothing is written into the folder but metrics.jsonl, cut."""
    train_set, heldout, num_classes = load_data(cfg)
    data = getattr(train_set, "dataset", train_set)            # a folder's: a Subset
    class_names, data_files = list(data.classes), getattr(data, "fingerprint", None)
    if num_classes < 2 and cfg.loss in ("2c", "d2dce", "ac"):
        raise UsageError(f"--loss {cfg.loss} needs at least 2 classes: with one its class term is "
                         f"exactly 0 every step (use --loss proj, or give more classes)")
    judge = None
    if cfg.judge is not None:                                  # another data's judge: refused now, as judge.py does
        folder = {"data_dir": os.path.realpath(cfg.data_dir)} if cfg.dataset == "folder" else {}
        judge = load_judge(cfg.judge, device, expect=dict(dataset=cfg.dataset, num_classes=num_classes,
                                                          img_size=cfg.img_size, classes=class_names, **folder))
    run = types.SimpleNamespace(cfg=cfg, device=device, rank=rank, world=world, num_classes=num_classes,
                                class_names=class_names, data_files=data_files, judge=judge)
    run.trainer = Trainer(cfg, num_classes, device, world)     # Algorithm 1: G, D, G_ema, their optimisers
    wrap_for_training(run.trainer)                             # DDP, compile
    run.batches = Batches(train_set, cfg.batch_size // world, rank, world, cfg.seed, device, cfg.num_workers, cfg.flip)
    run.step, run.best_fid, run.best_step, run.history = 0, None, None, []
    run.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if checkpoint is not None:
        resume(run, checkpoint, ckpt_path)
    run.saved_step = run.step                                  # last.pt's step when it exists
    n_g, n_d = [sum(p.numel() for p in m.parameters()) for m in (run.trainer.G, run.trainer.D)]
    say(f"config: {json.dumps(vars(cfg), sort_keys=True)}")
    ranks = f" x {world} ranks" if world > 1 else ""
    say(f"G {n_g:,} params | D {n_d:,} params | {cfg.loss} | {device}{ranks} | global batch {cfg.batch_size} | "
        f"run {cfg.run_dir}")
    run.evaluator = None
    if cfg.fid_images > 0 and rank == 0:
        run.evaluator = FIDEvaluator(cfg, *fid_reference(cfg, train_set, heldout, class_names), num_classes, device)
        say(run.evaluator.description)
    run.reals_train = fixed_sample(train_set, min(cfg.acc_images, len(train_set)), seed=cfg.seed + 2)
    run.reals_heldout, run.gap_threshold = None, cfg.collapse_gap
    if heldout is not None:
        run.reals_heldout = fixed_sample(heldout, min(cfg.acc_images, len(heldout)), seed=cfg.seed + 3)
        n_gap = min(len(run.reals_train[1]), len(run.reals_heldout[1]))
        if n_gap < 50:                                         # the gap's sd <= sqrt(0.5 / n): 0.1 at 50 a side
            run.gap_threshold = float("inf")
            say(f"note: D's train/held-out gap test is off: {n_gap} < 50 images a side (--acc-images)")
    if checkpoint is not None:                                 # last: a reference made above draws from the RNG
        restore_rng(run, checkpoint)
    if rank == 0:                                              # lines past the checkpoint would be repeated
        cut_metrics(run.metrics_path, run.step)
    if cfg.compile:
        say("--compile: the first steps compile G and D, about a minute on a GPU and several on a CPU")
    return run

def fid_reference(cfg, train_set, heldout, class_names):
    """(FID's real images, their split): CIFAR's test split, a fresh shapes draw, a folder's training images, or the
    tree in --fid-reference-dir (e.g. a validation split)."""
    if cfg.fid_reference_dir:
        reference = load_folder(cfg.fid_reference_dir, cfg.img_size, "--fid-reference-dir")
        if reference.classes != class_names:
            raise UsageError(f"--fid-reference-dir {cfg.fid_reference_dir}: other classes than the training data")
        order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(1234))  # the same each run
        return torch.utils.data.Subset(reference, order.tolist()), "reference"
    if cfg.dataset == "folder":
        return train_set, "train"
    return heldout, "test" if cfg.dataset in CIFAR else "heldout"

def resume(run, checkpoint, path):
    """The checkpoint's models, optimisers, step, best FID, history and data position; this command's rates."""
    cfg, was = run.cfg, checkpoint["config"]
    try:
        load_trainer_state(run.trainer, checkpoint)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UsageError(f"checkpoint {path} does not fit this model: it has {checkpoint['num_classes']} classes, "
                         f"the data {run.num_classes} ({str(err).splitlines()[0].rstrip(':')})") from None
    for k, (was_name, name) in enumerate(zip(checkpoint["classes"], run.class_names)):
        if was_name != name:                                   # classes are numbered in name order: all would move
            raise UsageError(f"checkpoint {path} was trained with class {k} {was_name!r}, the data has {name!r} "
                             f"there: give the class folders their old names (or the data it was trained on), "
                             f"or start a new run")
    run.step, run.best_fid, run.best_step = checkpoint["step"], checkpoint["best_fid"], checkpoint["best_step"]
    run.history = checkpoint["history"]
    def changes(keys):                                         # "--flag old -> new" of each changed key
        return [f"--{k.replace('_', '-')} {was.get(k)} -> {getattr(cfg, k)}" for k in keys if was[k] != getattr(cfg, k)]
    files = []
    if checkpoint["files"] != run.data_files:
        files = [f"the files in {cfg.data_dir}: added, removed or moved"]
    protocol_changes = changes(("fid_images", "fid_weights", "eval_batch")) + files
    if protocol_changes and cfg.fid_images and was["fid_images"]:   # FIDs of two protocols are not compared
        run.best_fid, run.best_step, run.history = None, None, [{**h, "fid": None} for h in run.history]
        say(f"note: the FID protocol changed ({', '.join(protocol_changes)}): best.pt and the FID-rise collapse "
            f"check start afresh at this resume; earlier FIDs in metrics.jsonl are of the old protocol")
    elif files:
        say(f"note: {files[0]} since {path} was saved; the run goes on with the files there now")
    run.batches.load_state_dict(checkpoint["data"])            # global batches: the same order for any world size
    for opt, key in ((run.trainer.opt_G, "lr_g"), (run.trainer.opt_D, "lr_d")):
        for group in opt.param_groups:                         # the loaded state holds the checkpoint's rate
            group["lr"] = getattr(cfg, key)
    rates = changes(("lr_g", "lr_d"))
    say(f"resumed {path} at step {run.step}" + (f" ({', '.join(rates)})" if rates else ""))

def restore_rng(run, checkpoint):
    """Each rank's RNG state as saved; with another number of ranks, a new stream for each rank."""
    if len(checkpoint["rng"]) == run.world:
        rng = checkpoint["rng"][run.rank]
        torch.set_rng_state(rng["cpu"])
        if run.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], run.device)
        return
    torch.manual_seed(int(hashlib.sha256(f"{run.cfg.seed} {run.step} {run.rank}".encode()).hexdigest()[:8], 16))
    say(f"note: resumed with {run.world} ranks a checkpoint of {len(checkpoint['rng'])}: the same global "
        f"batches follow, each rank with a new random stream from --seed, the step and its rank")

def train(run):
    """Train to --steps (returns 0) or to Ctrl-C, SIGTERM, SIGHUP: saved, returns 128 + signal (130, 143, 129)."""
    cfg, pid, stop = run.cfg, os.getpid(), types.SimpleNamespace(signum=0, time=0.0)

    def request_stop(signum, frame):
        if os.getpid() != pid:                                 # a DataLoader worker (Ctrl-C hits the process group)
            return
        if stop.signum == 0:
            stop.signum, stop.time = signum, time.time()
            say(f"\n{signal.Signals(signum).name}: finishing this step, saving, exiting "
                f"(Ctrl-C again to abort without saving)")
        elif time.time() > stop.time + 2:                      # again (not SLURM's copy): leave, unsaved
            raise KeyboardInterrupt(signum)

    previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
    try:
        if run.step == 0:                                      # a first look, before any step: the initial G_ema
            write_grid(run)
        t_last, step_last, eval_s = time.time(), run.step, 0.0  # the ETA: training steps and evaluations apart
        while run.step < cfg.steps:
            logs = run.trainer.iteration(run.batches, run.step)
            run.step += 1
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                check_finite(run)
                log_progress(run, logs, (time.time() - t_last) / max(run.step - step_last, 1), eval_s)
                t_last, step_last = time.time(), run.step
            if run.step == cfg.log_every and cfg.log_every < cfg.eval_every:  # an early look before the first eval
                write_grid(run)
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                t_eval = time.time()
                save(run, best=record_evaluation(run, evaluate(run)))
                t_last, step_last, eval_s = time.time(), run.step, time.time() - t_eval
            stopping = stop.signum > 0                         # under torchrun, all ranks stop at one step: agreed
            if run.world > 1:                                  # every 10 steps, well within torchrun's 30 s to SIGKILL
                stopping = run.step % min(cfg.log_every, 10) == 0 and any_rank(stopping, run.device, run.world)
            if stopping and run.step < cfg.steps:
                if run.saved_step < run.step:                  # not just saved by the evaluation
                    save(run)
                how, status = "another rank's signal", 128 + signal.SIGTERM   # that rank's signal is not known here
                if stop.signum:
                    how, status = signal.Signals(stop.signum).name, 128 + stop.signum
                say(f"interrupted at step {run.step} by {how}: saved {cfg.run_dir}/last.pt; continue "
                    f"with --resume {cfg.run_dir} (exit status {status})")
                return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        run.batches._it = None                                 # its DataLoader workers end now, not at a later gc
    if run.best_fid is None:
        say(f"done: {cfg.run_dir}/last.pt")
    else:
        say(f"done: best FID {run.best_fid:.3f} at step {run.best_step} ({cfg.run_dir}/best.pt)")
    return 0

def log_progress(run, logs, per_step, eval_s):
    """The console's progress line and its metrics.jsonl record; per_step: seconds a training step (no evaluation)."""
    cfg = run.cfg
    r = {"step": run.step, **{k: round(float(v), 5) for k, v in logs.items()},
         "img_per_s": round(cfg.d_steps * cfg.accumulation_steps * cfg.batch_size / per_step, 1),
         "s_per_step": round(per_step, 4), "time": round(time.time(), 1)}
    left = per_step * (cfg.steps - run.step) + eval_s * evaluations_left(run.step, cfg.steps, cfg.eval_every)
    say(f"step {run.step}/{cfg.steps} | d {r['d_loss']:.4f} (adv {r['d_adv']:.4f} cond {r['d_cond']:.4f}) "
        f"| g {r['g_loss']:.4f} (adv {r['g_adv']:.4f} cond {r['g_cond']:.4f}) | {r['img_per_s']:.1f} img/s | "
        f"{per_step:.3f} s/step | left {format_duration(left)}")
    write_metrics(run, r)

def evaluations_left(step, steps, eval_every):
    """How many evaluations the loop still runs at steps step..steps (every eval_every and at the end)."""
    return steps // eval_every - (step - 1) // eval_every + (steps % eval_every > 0)

def format_duration(seconds):
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

def write_metrics(run, record):
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

def write_grid(run):                                           # rank 0: samples/step<step>.png, G_ema's grid
    if run.rank == 0:
        path = os.path.join(run.cfg.run_dir, "samples", f"step{run.step:07d}.png")
        save_grid(run.trainer.G_ema, path, run.num_classes, run.cfg.z_dim, run.device, run.cfg.eval_batch,
                  run.cfg.seed, run.class_names)

def evaluate(run):
    """FID (every rank), then on rank 0 the grid and Figure 3's diagnostics: the evaluation's record."""
    trainer = run.trainer
    check_finite(run, trainer_state(trainer))                    # before FID and the grid see NaN weights
    record = {"step": run.step, "eval": True}
    if run.evaluator is not None:
        t0 = time.time()
        record.update(run.evaluator(trainer.G_ema))
        record["fid_seconds"] = round(time.time() - t0, 1)
    if run.rank == 0:
        write_grid(run)
        record.update(d_diagnostics(trainer.D, trainer.G_ema, run.reals_train, run.reals_heldout, run.num_classes,
                                    run.cfg, run.device, run.judge))
        sigmas = spectral_norms(trainer.D)
        record["d_sigma_max"], record["d_sigma"] = max(sigmas.values()), sigmas
    return record

def record_evaluation(run, record):
    """History, the collapse check, the best FID, the console and metrics.jsonl (rank 0); True if FID improved."""
    if run.rank != 0:                                          # its record holds FID alone
        return False
    run.history.append({k: record.get(k) for k in ("step", "fid", "d_acc_gap")})
    record["collapse"] = detect_collapse(run.history, run.gap_threshold, run.cfg.collapse_patience)
    improved = record.get("fid") is not None and (run.best_fid is None or record["fid"] < run.best_fid)
    if improved:
        run.best_fid, run.best_step = record["fid"], run.step
    say(eval_line(run, record))
    if run.evaluator is not None:
        say(run.evaluator.description)
    if record["collapse"]:
        say(f"WARNING collapse suspected at step {run.step}: {record['collapse']}")
    write_metrics(run, record)
    return improved

def eval_line(run, r):
    """The console's line of one evaluation record r."""
    held = run.reals_heldout is not None
    parts = [f"eval step {run.step}"]
    if "fid" in r:
        parts.append(f"FID {r['fid']:.3f} (best {run.best_fid:.3f} @ {run.best_step})")
    if "intra_fid" in r:
        parts.append(f"intra-FID {r['intra_fid']:.3f}")
    parts.append(f"D acc train {r['d_acc_train']:.3f}" + (f" held-out {r['d_acc_heldout']:.3f}" if held else ""))
    parts.append(f"max sigma(W_D) {r['d_sigma_max']:.2f}")
    if held:
        parts.append(f"D class acc held-out {r['d_class_acc_heldout']:.3f}")
    readers = (("d", "D", ""), ("colour", "colour", f", none {r.get('class_none', 0):.3f}"),
               ("judge", f"judge, {r.get('judge_heldout_accuracy', 0):.3f} on held-out reals", ""))
    for reader, name, extra in readers:
        key = "class_consistency_" + reader
        if key in r:
            parts.append(f"class consistency ({name}) {r[key]:.3f}, relabelled {r[key + '_relabelled']:.3f}{extra}")
    return " | ".join(parts)

def check_finite(run, state=None):
    """Stop on a non-finite loss, or state to be saved or evaluated (a huge lr blows weights up before losses)."""
    flag = run.trainer.nonfinite
    if state is not None:
        tensors = [t for k in ("G", "D", "G_ema") for t in state[k].values() if t.is_floating_point()]
        tensors += [t for k in ("opt_G", "opt_D") for s in state[k]["state"].values()
                    for name, t in s.items() if name != "step"]
        flag = flag | ~torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()
    if not any_rank(flag, run.device, run.world):
        return
    last, best = os.path.join(run.cfg.run_dir, "last.pt"), os.path.join(run.cfg.run_dir, "best.pt")
    kept = "no checkpoint was written: start again with lower --lr-g / --lr-d"
    if os.path.exists(last):
        kept = (f"{last} (step {run.saved_step}), the last checkpoint with finite weights, is intact but may be far "
                f"off already (see samples/): resume it with lower --lr-g / --lr-d")
        if os.path.exists(best):
            kept += f", or branch from {best} with --resume {best} --run-dir NEW"
    raise UsageError(f"non-finite loss or weights at or before step {run.step}: run stopped without saving it; {kept}")

def save(run, best=False):
    """last.pt (and best.pt): every rank checks its state and gives its RNG state; rank 0 writes."""
    state = trainer_state(run.trainer)
    check_finite(run, state)                                   # every save comes through here
    state.update(step=run.step, best_fid=run.best_fid, best_step=run.best_step, history=run.history,
                 config=vars(run.cfg), num_classes=run.num_classes, data=run.batches.state_dict(),
                 classes=run.class_names, files=run.data_files, rng=rng_states(run.device, run.world))
    if run.rank == 0:
        save_checkpoint(os.path.join(run.cfg.run_dir, "last.pt"), state)
        if best:
            save_checkpoint(os.path.join(run.cfg.run_dir, "best.pt"), state)
    run.saved_step = run.step

# ---- Run folders: checkpoint files, the folder lock, resuming, metrics.jsonl ---------------------------------------

# Flags that may differ from the checkpoint when a run is resumed (the learning rates: the way on after a blow-up)
RUN_FLAGS = set("steps log_every eval_every fid_images fid_weights eval_batch intra_fid device num_workers compile "
                "resume run_dir data_dir collapse_gap collapse_patience acc_images preset lr_g lr_d judge".split())

SEAL = b"contragan-sha256:"  # then the sha256 of torch.save's bytes before it; torch.load ignores this tail

def trainer_state(trainer):
    """What a checkpoint holds of Trainer: its PARTS' state dicts."""
    return {name: getattr(trainer, name).state_dict() for name in trainer.PARTS}

def load_trainer_state(trainer, state):
    for name in trainer.PARTS:
        part = state[name]
        if name.startswith("opt_"):  # this device's fused/foreach BEFORE loading: torch puts Adam's `step` on
            # the GPU only for fused groups of the loaded state, and fused CUDA Adam reads it there
            part = {**part, "param_groups": [{**g, **trainer.adam_flags} for g in part["param_groups"]]}
        getattr(trainer, name).load_state_dict(part)

def save_checkpoint(path, state):
    """Atomic (a temporary file: torch.save's bytes, SEAL, their sha256; fsync, rename), then config.json."""
    tmp, buffer = path + ".tmp", io.BytesIO()
    kept = f"the previous {path} is intact" if os.path.exists(path) else "no checkpoint was written"
    try:
        torch.save(state, buffer)                              # in memory first: its sha256 follows it in the file
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.write(SEAL + hashlib.sha256(buffer.getbuffer()).hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        kept = f"{path} is saved, config.json not updated"
        with open(tmp, "w") as f:
            json.dump({**state["config"], "num_classes": state["num_classes"], "world_size": len(state["rng"])}, f,
                      indent=2)
        os.replace(tmp, os.path.join(os.path.dirname(path), "config.json"))
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UsageError(f"cannot save {path}: {err.strerror or err}; {kept}") from None

def load_checkpoint(path):
    """(checkpoint, path): a run folder's last.pt or a file, its sha256 checked, its weights finite."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise UsageError(f"no checkpoint at {path!r} ({err.strerror})") from None
    except OSError as err:
        raise UsageError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    n = len(SEAL) + 64                                         # a checkpoint without SEAL: torch.load's checks
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
    lack = sorted({"opt_G", "opt_D", "num_classes", "data", "rng", "best_fid", "best_step", "history", "classes",
                   "files"} - checkpoint.keys())
    if lack or not isinstance(checkpoint["config"], dict):
        raise UsageError(f"{path} is not a checkpoint of this contragan.py version (no {', '.join(lack) or 'config'})")
    parts = {k: list(checkpoint[k].values()) for k in ("G", "D", "G_ema")}   # runs never save NaN (check_finite);
    parts.update({k: [t for s in checkpoint[k]["state"].values() for t in s.values()] for k in ("opt_G", "opt_D")})
    if bad := [k for k, ts in parts.items() if not all(t.isfinite().all() for t in ts if torch.is_tensor(t))]:
        raise UsageError(f"checkpoint {path} itself holds NaN or inf (in {', '.join(bad)}): it cannot be resumed or "
                         f"sampled; use an earlier checkpoint")    # edited by hand, or a disk fault
    return checkpoint, path

def claim_run_dir(run_dir, resume_path=None):
    """One run owns its folder: run.lock, flock'ed for the run's life (the kernel drops it when the process ends,
    even by kill -9), holds its pid. release() removes it and the folders made here if empty: nothing is left."""
    import fcntl                                               # POSIX only (Linux, macOS)
    here = resume_path is not None and os.path.realpath(run_dir) == os.path.realpath(os.path.dirname(resume_path))
    if here and os.path.basename(resume_path) != "last.pt" and os.path.exists(os.path.join(run_dir, "last.pt")):
        raise UsageError(f"resuming {resume_path} in its own folder would overwrite {run_dir}/last.pt and cut "
                         f"metrics.jsonl: branch from it with --run-dir NEW, or continue with --resume {run_dir}")
    if not here and any(os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "config.json")):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another "
                         f"--run-dir")
    lock, created = os.path.join(run_dir, "run.lock"), not os.path.isdir(run_dir)
    try:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode(errors="replace").strip() or "?"   # "?": it is writing its pid now
            os.close(fd)
            raise UsageError(f"{run_dir} is in use by another run (process {pid}; its lock is {lock})") from None
        except OSError:                                        # no flock on this file system (Lustre -o noflock)
            print(f"note: {lock} is not locked (this file system has no flock): one run at a time is up to you")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as err:                                     # e.g. samples/ replaced by a file: named
        why = "not a folder" if isinstance(err, FileExistsError) else err.strerror or err
        raise UsageError(f"cannot write to run folder {run_dir}: {err.filename or run_dir}: {why}") from None
    def release():
        os.remove(lock)
        os.close(fd)
        folders = [os.path.join(run_dir, "samples")] + ([run_dir] if created else [])   # the run's own, not the user's
        for folder in folders:
            with contextlib.suppress(OSError):
                os.rmdir(folder)                               # only if empty
    return release

def merge_resume_config(cfg, explicit, checkpoint, path):
    """The checkpoint's flags, with this command's RUN_FLAGS on top; a different model or training flag is refused."""
    saved = checkpoint["config"]
    unknown = sorted(saved.keys() - vars(cfg).keys())          # a flag this version would silently drop
    if unknown:
        raise UsageError(f"checkpoint {path} is from a newer contragan.py: it has --{unknown[0].replace('_', '-')}, "
                         f"which this one does not know")
    for key, value in explicit.items():
        if key not in RUN_FLAGS and key in saved and saved[key] != value:
            raise UsageError(f"checkpoint {path} is from another configuration: it has --{key.replace('_', '-')} "
                             f"{saved[key]}, this command asks for {value} (drop the flag to resume it)")
    merged = {**vars(cfg), **saved}                            # flags newer than the checkpoint: defaults
    merged.update({k: v for k, v in explicit.items() if k in RUN_FLAGS})
    return argparse.Namespace(**merged)

def cut_metrics(path, step):
    """metrics.jsonl cut to the checkpoint's step (all of it on a fresh start): a rerun repeats none. A torn
    (interrupted), blank or edited line is dropped and counted."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                line_step = int(json.loads(line)["step"]) if line.endswith("\n") else None
            except (ValueError, TypeError, KeyError):
                line_step = None
            if line_step is None:
                dropped += 1
            elif line_step <= step:
                kept.append(line)
    if dropped:
        print(f"note: {dropped} unreadable lines of {path} dropped (torn, blank or edited)")
    with open(path + ".tmp", "w") as f:                       # the folder is writable: run.lock is in it
        f.writelines(kept)
    try:
        os.replace(path + ".tmp", path)
    except OSError as err:                                     # e.g. an immutable metrics.jsonl: named, no .tmp left
        os.remove(path + ".tmp")
        raise OSError(err.errno, err.strerror, path) from None

# ---- Command line --------------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):                                  # one line, not usage + error
        self.exit(2, f"error: {message} (see --help)\n" if is_main_process() else None)  # torchrun: rank 0 says it

# Each numeric flag's range: (flags, test, what the value must be). NaN fails every test, so "nan" is refused too.
FLAG_RANGES = [
    ("steps log_every eval_every d_steps accumulation_steps batch_size eval_batch g_width d_width z_dim shared_dim "
     "embed_dim shapes_size acc_images collapse_patience", lambda v: v >= 1, "at least 1"),
    ("num_workers ema_start fid_images", lambda v: v >= 0, "at least 0"),
    ("seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),      # torch's CPU mt19937 keeps a seed's low 32 bits
    ("cond_lambda cr_lambda collapse_gap", lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
    ("temperature lr_g lr_d adam_eps", lambda v: 0 < v < float("inf"), "> 0 and finite"),
    ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("margin", lambda v: 0 < v <= 1, "in (0, 1]"),             # m_n = 1 - m_p must lie in [0, 1)
]

def check_ranges(cfg, table=FLAG_RANGES):
    for names, ok, what in table:
        for name in names.split():
            if not ok(getattr(cfg, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be {what} (got {getattr(cfg, name)})")

# Named defaults; each value's source: docs/experiments.md. cifar10-readme: the authors' later README run.
# tiny-imagenet: the paper's Table 2 run. cpu-demo: a CPU's, minutes on shapes.
PRESETS = {"cifar10-readme": dict(dataset="cifar10", steps=100000, flip=True),
           "tiny-imagenet": dict(dataset="folder", img_size=64, g_width=80, d_width=80, z_dim=100, embed_dim=768,
                                 batch_size=256, accumulation_steps=4, lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.999,
                                 d_steps=1, steps=100000, ema_start=20000, flip=False),
           "cpu-demo": dict(dataset="shapes", g_width=16, d_width=16, batch_size=32, d_steps=2, steps=1500, flip=True,
                            eval_every=250, log_every=50, fid_images=0, ema_start=250, ema_decay=0.995,
                            acc_images=256)}  # EMA horizon ~200 steps: 0.9999 would lag a short run

@dataclass
class RunConfig:
    """The run's settings: engineering, not the method (data, folder, evaluation, diagnostics, device)."""
    dataset: str = setting("cifar10", "shapes: built in, offline", choices=["cifar10", "cifar100", "folder", "shapes"])
    data_dir: str = setting("data", "where CIFAR is downloaded to / read from, or the image folder (<class>/<image>)")
    shapes_size: int = setting(10000, "number of training images of --dataset shapes")
    run_dir: str = setting(None, "output folder (default runs/<dataset>-<loss>-s<seed>)")
    resume: str = setting(None, "a run folder or checkpoint to continue exactly")
    log_every: int = setting(100, "progress line and metrics every N G steps")
    eval_every: int = setting(2000, "grid, FID, D diagnostics and checkpoint every N G steps (authors: 2000)")
    fid_images: int = setting(10000, "fakes (and reference images) for FID; 0 = no FID (paper: 10,000)")
    fid_reference_dir: str = setting(None, "FID against this class-per-folder tree (a validation split, as the paper's "
                                     "Tiny ImageNet FID), not CIFAR's test split, a shapes draw or the training folder")
    fid_weights: str = setting(None, "local pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, "
                               "downloaded once); 'random' = random weights, a smoke test only")
    eval_batch: int = setting(64, "G_ema batch at evaluation; BN uses its statistics (authors: 64)")
    intra_fid: bool = setting(False, "also FID per class and their mean", action="store_true")
    acc_images: int = setting(1000, "reals for D's train/held-out accuracy; as many fakes for confusion")
    collapse_gap: float = setting(0.3, "warn of collapse when D's train - held-out accuracy exceeds this")
    collapse_patience: int = setting(3, "warn of collapse when FID rises this many evaluations in a row")
    judge: str = setting(None, "a judge file (tools/judge.py) that reads the fakes' classes too")
    device: str = setting("auto", "auto: cuda if torch sees a GPU", choices=["auto", "cuda", "cpu"])
    num_workers: int = setting(4, "data loader workers (--dataset folder)")
    tf32: bool = setting(True, "TF32 matmuls on Ampere+ GPUs")
    compile: str = setting(None, "torch.compile G and D; MODE: its mode, reduce-overhead and max-autotune add "
                           "CUDA graphs (GPU only; skipped on CPUs)", nargs="?", const="default", metavar="MODE",
                           choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])

def defaults(preset=None):  # what a flag not given takes: the preset's value, else its field's default
    return {"preset": preset, **asdict(Config()), **asdict(RunConfig()), **PRESETS.get(preset, {})}

def build_parser(suppress=False):
    """A flag per field of Config and RunConfig. suppress=True: a parse holds only the flags given (main: `defaults`
    fills in the rest); either way --help shows the defaults."""
    p = OneLineErrorParser(description="ContraGAN (Kang & Park, NeurIPS 2020) in one file. " + Config.__doc__,
                           argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (flags given still win): " +
                   "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    for option in fields(Config) + fields(RunConfig):
        kw = dict(option.metadata)                             # help; choices, action, nargs where it has them
        if option.default is not None:
            kw["help"] += f" (default: {option.default})"
        if isinstance(option.default, bool) and "action" not in kw:
            kw["action"] = argparse.BooleanOptionalAction      # --flip / --no-flip
        elif option.default is not None and not isinstance(option.default, bool):
            kw["type"] = type(option.default)                  # int, float or str, as its default
        p.add_argument("--" + option.name.replace("_", "-"), **kw)
    if not suppress:
        p.set_defaults(**defaults())
    return p

def validate(cfg):
    """Bad input: one clear line (main prints it), before anything is built or written."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}  # torchrun's
    if env["WORLD_SIZE"] in (None, "1") and env["RANK"] not in (None, "0"):
        raise UsageError(f"RANK={env['RANK']} is set without WORLD_SIZE: unset RANK, or start the ranks with torchrun")
    if env["WORLD_SIZE"] not in (None, "1") and (lack := [k for k, v in env.items() if not v]):
        raise UsageError(f"WORLD_SIZE={env['WORLD_SIZE']} is set without {', '.join(lack)}: start the ranks with "
                         f"torchrun, or unset WORLD_SIZE")
    check_ranges(cfg)                                          # every numeric flag: FLAG_RANGES
    if cfg.img_size not in G_ARCH:
        raise UsageError(f"--img-size {cfg.img_size} is not supported: the architecture has 32, 64 and 128")
    g, d, S = G_ARCH[cfg.img_size], D_ARCH[cfg.img_size], cfg.img_size   # self-attention maps C to C // 8 >= 1,
    attn = (("g_width", g["ch"][[4 * 2 ** j for j in range(len(g["ch"]))].index(g["attn"])]),   # C = mult x width:
            ("d_width", d["ch"][[S >> sum(d["down"][:i + 1]) for i in range(len(d["ch"]))].index(d["attn"])]))
    for flag, mult in attn:                                    # the channels where each model's attention is
        if getattr(cfg, flag) * mult < 8:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)} is too small at {S}x{S}: self-attention "
                             f"needs {mult} x width >= 8 channels; the smallest width that works is {-(-8 // mult)}")
    if cfg.z_dim % len(g["ch"]):                               # Generator's chunks of z
        raise UsageError(f"--z-dim {cfg.z_dim} must split into {len(g['ch'])} equal chunks at {S}x{S}")
    if cfg.loss in ("2c", "d2dce") and cfg.batch_size < 2:
        raise UsageError(f"--loss {cfg.loss} needs --batch-size of at least 2: it contrasts samples within a batch")
    if cfg.embed_head == "mlp" and cfg.loss not in ("2c", "d2dce"):
        raise UsageError("--embed-head mlp is the 2C embedding's head: it needs --loss 2c or d2dce")
    if not cfg.data_positives and cfg.loss != "2c":
        raise UsageError(f"--no-data-positives changes the 2C loss: it needs --loss 2c (got --loss {cfg.loss})")
    world = int(env["WORLD_SIZE"] or 1)
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must divide by the {world} ranks")
    if cfg.fid_images == 1:
        raise UsageError("--fid-images must be 0 (off) or at least 2")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU")

def main(argv=None):
    explicit = vars(build_parser(suppress=True).parse_args(argv))  # the flags given (argv None: sys.argv[1:])
    cfg = argparse.Namespace(**{**defaults(explicit.get("preset")), **explicit})
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}  # the loop's own: train's request_stop
    try:
        return start_run(cfg, explicit)                        # checks cfg (a resumed run's: merged) first
    except KeyboardInterrupt as err:                           # a signal in start-up, or a second one: no traceback
        signum = err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
        print(f"interrupted{'' if signum == signal.SIGINT else ' by ' + signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except (UsageError, fid.FIDError) as err:
        if is_main_process() or isinstance(err, RankError):   # under torchrun: by rank 0 (RankError: by all)
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
