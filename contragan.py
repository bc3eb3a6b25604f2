"""
ContraGAN in one file: a conditional GAN whose discriminator learns data-to-data and data-to-class
relations through the conditional contrastive (2C) loss.

  Minguk Kang and Jaesik Park, "ContraGAN: Contrastive Learning for Conditional Image Generation",
  NeurIPS 2020, arXiv:2006.12681. Authors' code: POSTECH-CVLab/PyTorch-StudioGAN (2020 version).

Read it top to bottom next to the paper: losses (the part to copy) -> layers -> Generator ->
Discriminator -> data -> evaluation -> training -> command line. Where the paper and the authors'
code differ, this file follows the code and says so at that line.

  python contragan.py --dataset cifar10 --loss 2c          # the paper's CIFAR-10 ContraGAN run
  python contragan.py --dataset shapes --preset cpu-demo   # offline, minutes on a laptop CPU
  torchrun --nproc_per_node=4 contragan.py --dataset cifar10 --loss 2c   # DDP, global batch
  python contragan.py --generate runs/cifar10-2c-s0 --num-images 10000 --out-dir fakes/
  python contragan.py --plot runs/cifar10-proj-s0 runs/cifar10-2c-s0    # the paper's Figure 3
"""
import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

try:  # fid.py sits next to this file; training works without it and says FID is unavailable.
    import fid
except ImportError:
    fid = None


# --------------------------------------------------------------------------------------------
# Losses: pure tensor functions (torch only; no config, device or globals). Copy freely.
# --------------------------------------------------------------------------------------------

def d_hinge_loss(real_logit, fake_logit):
    """Hinge loss for D (Lim & Ye 2017; Miyato et al. 2018): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logit).mean() + F.relu(1.0 + fake_logit).mean()


def g_hinge_loss(fake_logit):
    """Hinge loss for G: -E[D(G(z))]."""
    return -fake_logit.mean()


def conditional_contrastive_loss(embed, proxy, labels, temperature=1.0):
    """The conditional contrastive (2C) loss of ContraGAN (paper Section 3, "conditional contrastive loss").

        loss_i = -log( [exp(l_i.e_i / t) + sum_{k != i, y_k = y_i} exp(l_i.l_k / t)]
                     / [exp(l_i.e_i / t) + sum_{k != i}            exp(l_i.l_k / t)] )
        loss   = (1/m) sum_i loss_i

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
    fp16 for t < 0.09). Old versions of their code returned -log(t * ratio): a constant -log(t) off.
    """
    dtype = torch.promote_types(embed.dtype, torch.float32)    # fp16/bf16 in -> fp32 math
    l = F.normalize(embed.to(dtype), dim=1)                    # (m, D)  l_i
    e = F.normalize(proxy.to(dtype), dim=1)                    # (m, D)  e_i = e(y_i)
    data_sim = l @ l.t() / temperature                         # (m, m)  l_i . l_k / t
    class_sim = (l * e).sum(dim=1, keepdim=True) / temperature  # (m, 1)  l_i . e_i / t
    m = l.shape[0]
    is_self = torch.eye(m, dtype=torch.bool, device=l.device)   # (m, m)  k == i
    same_class = (labels[:, None] == labels[None, :]) & ~is_self  # (m, m)  k != i, y_k == y_i
    data_sim = data_sim.masked_fill(is_self, float("-inf"))    # drop k == i from both sums
    log_denominator = torch.logsumexp(torch.cat([class_sim, data_sim], dim=1), dim=1)  # (m,)
    log_numerator = torch.logsumexp(
        torch.cat([class_sim, data_sim.masked_fill(~same_class, float("-inf"))], dim=1), dim=1)  # (m,)
    return (log_denominator - log_numerator).mean()


def projection_logit(adv_logit, feature, class_embed):
    """Projection discriminator (Miyato & Koyama 2018, ProjGAN): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.

    adv_logit (B,) = psi(phi(x)); feature (B, C) = phi(x); class_embed (B, C) = embed(y_i) per sample.
    """
    return adv_logit + (class_embed * feature).sum(dim=1)


def acgan_loss(class_logits, labels):
    """ACGAN's auxiliary classifier loss (Odena et al. 2017): cross-entropy of D's class logits.

    As the paper compared it ("ACGAN-Mod"): applied to REAL images in the D step and to fakes in
    the G step, never to fakes in the D step.
    """
    return F.cross_entropy(class_logits.float(), labels)


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


# --------------------------------------------------------------------------------------------
# Layers: spectral norm, SN conv/linear/embedding, conditional BatchNorm, self-attention
# --------------------------------------------------------------------------------------------

class SpectralNorm(nn.Module):
    """W / sigma(W) with sigma estimated by one power iteration per training forward (Miyato et al.
    2018), as torch.nn.utils.spectral_norm does, but always in fp32 outside autocast so a bf16/fp16
    run keeps an exact normaliser. u and v are buffers (the authors' parameter counts exclude them).
    """

    def __init__(self, weight, eps=1e-6):
        super().__init__()
        out_features = weight.shape[0]
        in_features = weight[0].numel()
        self.eps = eps  # authors: eps=1e-6 in every spectral_norm call
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0, eps=eps))

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.flatten(1).float()                      # (out, in*kh*kw)
            if self.training:
                with torch.no_grad():                          # one power iteration per forward
                    self.v.copy_(F.normalize(w.t() @ self.u, dim=0, eps=self.eps))
                    self.u.copy_(F.normalize(w @ self.v, dim=0, eps=self.eps))
            # clones: a second forward before backward must not see these buffers change in place
            sigma = self.u.clone() @ w @ self.v.clone()        # the largest singular value of W
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


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then x * (1 + gain(c)) + bias(c) (BigGAN; the authors' code).

    c = concat(shared class embedding, one chunk of z). gain/bias are SN linears without bias.
    """

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
        return x + self.scale * self.out(o)


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
        h = F.interpolate(F.relu(self.bn1(x, cond)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """D block: ReLU -> conv3 -> ReLU -> conv3 [-> avgpool2]; skip conv1 [-> avgpool2] only when
    down-sampling or changing channels. first=True is D's input block: conv3 -> ReLU -> conv3 ->
    avgpool2, skip avgpool2 -> conv1.

    Authors' quirk, kept: their block starts with an in-place ReLU that also overwrites the tensor the
    skip holds, so the skip carries relu(x), not x (ResNet/BigGAN carry x).
    """

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


# --------------------------------------------------------------------------------------------
# Generator and Discriminator: BigGAN-style SN-ResNet (the authors' big_resnet)
# --------------------------------------------------------------------------------------------

# Channel multipliers of `width`, block by block, and the resolution that gets self-attention.
# 32 is the paper's CIFAR-10 model; 64 and 128 follow the same BigGAN pattern (Tiny ImageNet, ImageNet).
G_ARCH = {32: dict(ch=[4, 4, 4, 4], attn=16),
          64: dict(ch=[8, 8, 4, 2, 1], attn=32),
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
        assert z_dim % (n_blocks + 1) == 0, "z_dim must split into (blocks + 1) equal chunks"
        self.chunk = z_dim // (n_blocks + 1)                   # 80 // 4 = 20 for CIFAR-10
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

      loss="2c"   -> {"adv": (B,), "embed": (B, embed_dim), "proxy": (B, embed_dim)}  ContraGAN
      loss="proj" -> {"adv": (B,)}  the projection term already added                ProjGAN
      loss="ac"   -> {"adv": (B,), "class_logits": (B, K)}                             ACGAN

    ContraGAN's D has no projection term: 2C replaces it. Defaults: the CIFAR-10 model,
    2,517,186 params with the 2C head, 2,415,170 with the projection head.
    """

    def __init__(self, img_size=32, width=96, num_classes=10, loss="2c", embed_dim=512):
        super().__init__()
        if loss not in ("2c", "proj", "ac"):
            raise ValueError(f"unknown loss {loss!r}: choose 2c, proj or ac")
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
        if loss == "2c":
            self.embed_head = sn_linear(C, embed_dim)          # h -> l(x), one linear, no MLP
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
        if self.loss == "2c":
            return {"adv": adv, "embed": self.embed_head(h), "proxy": self.proxy(y)}
        if self.loss == "proj":
            return {"adv": projection_logit(adv, h, self.class_embed(y))}
        return {"adv": adv, "class_logits": self.class_head(h)}
