"""
How fast this ContraGAN is, against the authors' approach and against the machine's own limit.
One command, one markdown report; every figure in it comes from the same run, on the machine named
at its top.

  python tools/bench.py                          # everything: about 6 minutes on 2 CPU cores
  python tools/bench.py --device cuda            # the same on a GPU
  python tools/bench.py --quick                  # tiny sizes, a smoke test (~20 s)
  python tools/bench.py --device cuda --sections train --train-options bf16,bf16-compile,bf16-reduce-overhead
  python tools/bench.py --threads 1              # steadier on a CPU shared with other jobs
  python tools/bench.py --sections 2c,fid --out perf.md

Sections: 2c (the loss against the literal loop and the authors' code), ddp (the 2C loss
through gather_global_batch in 2 gloo processes against one process), train (one iteration =
5 D steps + 1 G step: time, FLOPs, utilisation, memory, profile), fid (Inception, Frechet distance),
eval (one evaluation as training runs it, projected over a 100k-step run).
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import contragan as cg  # noqa: E402
from test_contragan import literal_2c  # noqa: E402  the tests' oracle, beside its parity test: timed here

# ---------------------------------------------------------------------------------------------
# Timing, memory and the machine
# ---------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, budget_s=1.0, rounds=5, warmup=1):
    """Best over `rounds` rounds of the mean time of n calls (n fills budget_s); a call slower than
    budget_s / 2 is timed once. Best-of, because other processes only ever add time."""
    return seconds_per_call_side_by_side([fn], device, budget_s, rounds, warmup)[0]


def seconds_per_call_side_by_side(fns, device, budget_s=1.0, rounds=5, warmup=1):
    """seconds_per_call for several functions with their rounds interleaved (round 1 of each, then
    round 2 of each, ...), so that a machine that slows down for a while slows them all alike."""
    ns, best = [], []
    for fn in fns:
        for _ in range(warmup):
            fn()
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - t
        ns.append(0 if once > budget_s / 2 else max(1, int(budget_s / rounds / once)))
        best.append(once)
    for _ in range(rounds if any(ns) else 0):
        for i, (fn, n) in enumerate(zip(fns, ns)):
            if n:
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
                best[i] = min(best[i], (time.perf_counter() - t) / n)
    return best


def matmul_rate(device, dtype, budget_s, n):
    """FLOP/s of one large n x n matrix multiply, 2 n^3 / t: the machine's own limit for dense math."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, device, budget_s)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak RSS of the process (VmHWM, reset before each measurement)"
    except OSError:
        return "peak RSS of the process since it started (ru_maxrss)"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average %.1f at start" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s){load}"


def ms(s):
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s" if s < 100 else f"{s:,.0f} s"


def times(r):
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def duration(s):
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 3600 else f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.1f} days"

# ---------------------------------------------------------------------------------------------
# 2C: the project's function, the literal loop, the authors' code
# ---------------------------------------------------------------------------------------------

def authors_2c(embed, proxy, labels, t=1.0, num_classes=10):
    """The 2C loss as the authors' code computes it (PyTorch-StudioGAN's ConditionalContrastiveLoss),
    written here from its description: cosine similarity of every pair by broadcasting (m, 1, D)
    against (1, m, D), so an (m, m, D) tensor; the diagonal removed by indexing with a mask built in
    numpy; the positive mask built on the host by a numpy loop over the classes (a device-to-host
    copy of the labels on every call); then exp() and the ratio. Same value as contragan's."""
    m, device = embed.shape[0], embed.device
    not_self = torch.from_numpy(np.ones((m, m)) - np.eye(m)).bool().to(device)   # (m, m) host-built
    y = labels.cpu().numpy()                                           # device -> host, every call
    member = np.zeros((num_classes, m))                                # member[c, k] = 1[y_k = c]
    for c in range(num_classes):
        member[c, np.where(y == c)[0]] = 1.0
    positive = torch.from_numpy(member).long().to(device)[labels][not_self].view(m, m - 1)  # y_k = y_i
    cosine = F.cosine_similarity(embed.unsqueeze(1), embed.unsqueeze(0), dim=-1)          # (m, m) via (m, m, D)
    exp_sim = torch.exp(cosine[not_self].view(m, m - 1) / t)           # (m, m-1) k != i
    exp_class = torch.exp(F.cosine_similarity(embed, proxy, dim=-1) / t)  # (m,)
    numerator = exp_class + (positive * exp_sim).sum(dim=1)
    denominator = torch.cat([exp_class[:, None], exp_sim], dim=1).sum(dim=1)
    return -torch.log(numerator / denominator).mean()


def authors_2c_matmul(embed, proxy, labels, t=1.0):
    """The same exp() / ratio with host-built masks, but the similarities from one matrix multiply of
    the L2-normalised embeddings: separates what the (m, m, D) broadcast costs from the rest."""
    m, device = embed.shape[0], embed.device
    l, e = F.normalize(embed, dim=1), F.normalize(proxy, dim=1)         # (m, D)
    not_self = torch.from_numpy(np.ones((m, m)) - np.eye(m)).bool().to(device)   # (m, m) host-built
    y = labels.cpu().numpy()
    same = torch.from_numpy(y[:, None] == y[None, :]).to(device)       # (m, m) host-built
    exp_sim = torch.exp(l @ l.t() / t)[not_self].view(m, m - 1)        # (m, m-1) k != i
    positive = same[not_self].view(m, m - 1)                           # (m, m-1) y_k == y_i
    exp_class = torch.exp((l * e).sum(dim=1) / t)                      # (m,)
    numerator = exp_class + (positive * exp_sim).sum(dim=1)
    denominator = exp_class + exp_sim.sum(dim=1)
    return -torch.log(numerator / denominator).mean()


def two_c_inputs(m, dim, device, num_classes=10, seed=0):
    """Embeddings, each sample's proxy and labels; the same seed gives the same global batch on every rank."""
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(m, dim, generator=gen)
    table = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (m,), generator=gen)
    return embed.to(device), table[labels].to(device), labels.to(device)


def bench_2c(device, batches, loop_batch, budget_s=1.0, dim=512):
    """contragan's 2C against the authors' code, the same with a matmul similarity, and the tests'
    literal loop. The authors' code materialises an (m, m, D) tensor: any call over budget_s / 2
    is timed once (on a CPU from batch 256 on); above 256 it also skips the warm-up and the
    interleaving (at 1024: 2 GiB per copy, tens of seconds a call on a CPU)."""
    lines = ["| batch m | contragan (fwd+bwd) | authors' code | authors' code, matmul similarity | literal loop | "
             "authors' code / contragan | matmul variant / contragan | loop / contragan |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for m in batches:
        embed, proxy, labels = two_c_inputs(m, dim, device)
        embed.requires_grad_(True)
        proxy.requires_grad_(True)
        ours = cg.conditional_contrastive_loss(embed, proxy, labels)
        for reference in (authors_2c, authors_2c_matmul):                  # like with like
            torch.testing.assert_close(reference(embed, proxy, labels), ours, rtol=1e-5, atol=1e-5)

        def fwd_bwd(loss_fn):
            return lambda: torch.autograd.grad(loss_fn(embed, proxy, labels), (embed, proxy))
        fns = [fwd_bwd(f) for f in (cg.conditional_contrastive_loss, authors_2c_matmul, authors_2c)]
        if m <= 256:                                                        # rounds interleaved
            t_ours, t_matmul, t_code = seconds_per_call_side_by_side(fns, device, budget_s)
        else:                                                               # the broadcast: tens of seconds
            t_ours, t_matmul = seconds_per_call_side_by_side(fns[:2], device, budget_s)
            t_code = seconds_per_call(fns[2], device, budget_s=0, warmup=0)
        t_loop = None
        if m <= loop_batch:
            torch.testing.assert_close(literal_2c(embed, proxy, labels), ours, rtol=1e-5, atol=1e-5)
            t_loop = seconds_per_call(fwd_bwd(literal_2c), device, budget_s=0, warmup=0)
        ratios[m] = (t_code / t_ours, t_matmul / t_ours, t_loop / t_ours if t_loop else None)
        lines.append(f"| {m} | {ms(t_ours)} | {ms(t_code)} | {ms(t_matmul)} | "
                     f"{ms(t_loop) if t_loop else '- (O(m^2) Python ops, not run)'} | "
                     f"{times(t_code / t_ours)} | {times(t_matmul / t_ours)} | "
                     f"{times(t_loop / t_ours) if t_loop else '-'} |")
    lines.append(f"\n{dim}-d embeddings, 10 classes, fp32, forward + backward to embeddings and proxies, "
                 "best of 5 rounds with the rounds of the three functions interleaved (a call over 0.5 s, such "
                 "as the authors' code from batch 256 on, and the loop: timed once). All four agree to 1e-5 "
                 "(asserted). The authors' code is written here from its description: cosine similarity of "
                 "all pairs by broadcasting (an (m, m, D) tensor), masks built in numpy "
                 "on the host at every call, exp() then the ratio. The matmul variant keeps everything but "
                 "the broadcast.")
    return lines, ratios

# ---------------------------------------------------------------------------------------------
# DDP: the 2C loss through gather_global_batch in 2 gloo processes against one process
# ---------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, sizes, dim, threads, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for m, reps in sizes:
        embed, proxy, labels = two_c_inputs(m, dim, torch.device("cpu"))       # the global batch
        local = slice(rank * m // world, (rank + 1) * m // world)             # this rank's share
        embed, proxy = embed[local].requires_grad_(True), proxy[local].requires_grad_(True)
        labels = labels[local]

        def step():
            g_embed, g_proxy, g_labels = cg.gather_global_batch(embed, proxy, labels)
            torch.autograd.grad(cg.conditional_contrastive_loss(g_embed, g_proxy, g_labels), (embed, proxy))
        for _ in range(2):
            step()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):                                  # the same count on every rank
            step()
        results[m] = (time.perf_counter() - t) / reps
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def bench_ddp(device, sizes, dim=512, world=2):
    if device.type == "cuda":
        return ["- (needs 2 GPUs: `torchrun --nproc_per_node=2` of the training script; this section "
                "measures the gloo path on the CPU only: `python tools/bench.py --device cpu --sections ddp`)"]
    threads = max(1, torch.get_num_threads() // world)         # the same cores in all
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        torch.multiprocessing.spawn(_ddp_worker, args=(world, port, sizes, dim, threads, out), nprocs=world)
        with open(out) as f:
            ranked = {int(k): v for k, v in json.load(f).items()}
    lines = [f"| global batch m | 1 process, {torch.get_num_threads()} thread(s) | {world} gloo processes "
             f"x {threads} thread(s), gather_global_batch | ratio |",
             "|---|---|---|---|"]
    for m, _ in sizes:
        embed, proxy, labels = two_c_inputs(m, dim, device)
        embed.requires_grad_(True)
        proxy.requires_grad_(True)
        single = seconds_per_call(lambda: torch.autograd.grad(
            cg.conditional_contrastive_loss(embed, proxy, labels), (embed, proxy)), device)
        lines.append(f"| {m} | {ms(single)} | {ms(ranked[m])} | {ranked[m] / single:.1f}x |")
    lines.append("\n2C loss + backward per call; ranks all-gather embeddings, proxies and labels, and the "
                 "backward sends each rank its slice's gradient.")
    return lines

# ---------------------------------------------------------------------------------------------
# Training: one iteration = d_steps D steps + 1 G step + EMA, at the default and a small width
# ---------------------------------------------------------------------------------------------

def random_cifar(n=512, num_classes=10, img_size=32):
    """CIFAR-10-shaped uint8 images (speed does not depend on pixel values; no download)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % num_classes
    return cg.TensorImages(images, labels, [str(c) for c in range(num_classes)])


def is_conv(op):
    return "conv" in op.lower()


def profile_steps(trainer, batches, device):
    """Self time per op over one D step + one G step; the share of convolutions (forward and backward)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        trainer.d_step(*next(batches))
        trainer.g_step()
        sync(device)
    return profile_shares(prof.key_averages(), device)


def profile_shares(rows, device):
    """(conv share, [(share, op)] largest first) of the self time in profiler rows (key_averages()). On CUDA an
    op's row holds the device time of the kernels it launched, and each kernel also has a row of its own (device
    type CUDA) with that same time: only the op rows are summed, so no time counts twice."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    per_op = {e.key: getattr(e, key) for e in rows
              if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False)}
    total = sum(per_op.values()) or 1
    conv = sum(v for k, v in per_op.items() if is_conv(k)) / total
    others = sorted(((v / total, k) for k, v in per_op.items() if not is_conv(k)), reverse=True)
    return conv, others


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched (views left out: they launch no kernel). Each costs the host a dispatch and, on a
    GPU, at least one kernel launch. Under an active dispatch mode torch.compile runs eagerly: eager counts only."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def bench_host(device, batch=8, width=4, rounds=3):
    """Ops dispatched per iteration (5 D + 1 G step + EMA; the count does not depend on the width) and the host's
    time per iteration at a width where the math is negligible: the floor under any width's s / iteration."""
    trainer, batches = build_trainer(device, batch, width)
    trainer.iteration(batches, 0)                              # warm-up
    with OpCounter() as counter:
        trainer.iteration(batches, 0)
    host_s = min(time_iteration(trainer, batches, device) for _ in range(rounds))
    return counter.ops, host_s


H100_BF16_DENSE = 989e12                                       # FLOP/s, NVIDIA's H100 SXM datasheet


def host_lines(device, ops, host_s, flops, seconds, width, tiny=(4, 8)):
    """The op count, the host floor, and which bound applies: here (measured) and on one H100 (projected)."""
    lines = ["| quantity | value |", "|---|---|",
             f"| ops dispatched per iteration (eager; views left out) | {ops:,} |",
             f"| s / iteration at width {tiny[0]}, batch {tiny[1]} (host floor) | {host_s:.3g} ({ms(host_s / ops)} "
             f"per op) |"]
    if seconds is not None:
        bound = "host" if host_s > 0.5 * seconds else "device"
        lines.append(f"| s / iteration at width {width} on this device | {seconds:.3g}: {bound}-bound here "
                     f"(floor / it = {host_s / seconds:.0%}) |")
    if flops is not None:
        math_s = flops / (0.4 * H100_BF16_DENSE)
        lines.append(f"| one H100 at 40% of bf16 peak, width {width}: the math | {ms(math_s)} per iteration, "
                     f"{ms(math_s / ops)} per op: host-bound wherever the host takes longer than that to "
                     f"dispatch and launch one op (the floor above: {ms(host_s / ops)} per op on this host) |")
    lines.append(f"\nOps counted with a TorchDispatchMode over one iteration (5 D + 1 G step + EMA), the same at any "
                 f"width. Host floor: the best of 3 iterations at width {tiny[0]}, batch {tiny[1]}" +
                 (", where the GPU's math is negligible." if device.type == "cuda" else
                  "; on a CPU it still holds that width's math, so it is an upper bound on the host's share."))
    return lines


def build_trainer(device, batch, width, amp="none", compile=False):
    argv = ["--batch-size", str(batch), "--g-width", str(width), "--d-width", str(width), "--amp", amp]
    argv += ["--compile", compile] if isinstance(compile, str) else ["--compile"] * compile   # str: a mode
    trainer = cg.Trainer(cg.build_parser().parse_args(argv), 10, device)
    cg.wrap_for_training(trainer)                              # --compile, as a run does
    return trainer, cg.Batches(random_cifar(), batch, 0, 1, 0, device)


def time_iteration(trainer, batches, device):
    sync(device)
    t = time.perf_counter()
    trainer.iteration(batches, 0)
    sync(device)
    return time.perf_counter() - t


def train_config(device, batch, width, count_flops=False, profile=False, **options):
    """One configuration alone in memory: warm-up, FLOPs, one timed iteration, peak memory, profile."""
    trainer, batches = build_trainer(device, batch, width, **options)
    # Warm-up: one D step and one G step (oneDNN/cuDNN plans, allocator, torch.compile), with the
    # FLOPs counted there: the iteration's FLOPs are d_steps x D step + G step, shapes being fixed.
    t = time.perf_counter()
    with FlopCounterMode(display=False) if count_flops else nullcontext() as d_count:
        trainer.d_step(*next(batches))
    with FlopCounterMode(display=False) if count_flops else nullcontext() as g_count:
        trainer.g_step()
    sync(device)
    warmup_s = time.perf_counter() - t
    d_steps = trainer.cfg.d_steps
    flops = d_steps * d_count.get_total_flops() + g_count.get_total_flops() if count_flops else None
    reset_peak_memory(device)
    seconds = time_iteration(trainer, batches, device)
    result = dict(seconds=seconds, flops=flops, peak_mb=peak_memory_mb(device), warmup_s=warmup_s, d_steps=d_steps)
    if profile:
        result["conv_share"], result["others"] = profile_steps(trainer, batches, device)
    return result


def interleaved_best(device, batch, configs, rounds):
    """Best iteration time of each configuration over `rounds` rounds, one iteration of each per
    round, so that the machine's slow spells hit every configuration alike."""
    built = [build_trainer(device, batch, w, **kw) for _, w, kw in configs]
    for trainer, batches in built:                             # warm-up
        trainer.d_step(*next(batches))
        trainer.g_step()
    best = [float("inf")] * len(built)
    for _ in range(rounds):
        for i, (trainer, batches) in enumerate(built):
            best[i] = min(best[i], time_iteration(trainer, batches, device))
    return best


def bench_train(device, batch, width, small_width, small_rounds, peak_fp32, peak_bf16, options, show=None):
    """The training table; show(lines) gets the table so far after each configuration: a limit that hits in a
    later one (a compile: minutes) leaves the rows measured before it."""
    configs = [(f"width {width} (default), fp32", width, {})]
    configs += [(f"width {small_width}, fp32", small_width, {})] * (small_width != width)
    configs += [(f"width {small_width}, {name}", small_width, kw) for name, kw in options]
    lines = ["| configuration | s / iteration | vs fp32 | real images/s | GFLOP / iteration | GFLOP/s | "
             "utilisation | of bf16 matmul rate | peak memory (MB) | 100k iterations | warm-up (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    fp32_at = {w: name for name, w, kw in configs if not kw}   # each width's eager fp32: its FLOPs, its 1x

    def row(name, w):
        r, fp32 = results[name], results[fp32_at[w]]
        r["images_s"] = r["d_steps"] * batch / r["seconds"]
        rate = fp32["flops"] / r["seconds"]                   # the same math as fp32 at this width
        return (f"| {name} | {r['seconds']:.3g} | {fp32['seconds'] / r['seconds']:.2f}x | {r['images_s']:.3g} | "
                f"{fp32['flops'] / 1e9:.0f} | {rate / 1e9:.3g} | {rate / peak_fp32:.0%} | {rate / peak_bf16:.0%} | "
                f"{r['peak_mb']:.0f} | {duration(r['seconds'] * 1e5)} | {r['warmup_s']:.3g} |")
    for name, w, kw in configs:
        eager_fp32 = not kw
        print(f"  train: {name} ...", flush=True)
        results[name] = train_config(device, batch, w, count_flops=eager_fp32, profile=eager_fp32, **kw)
        if show:
            show(lines + [row(c[0], c[1]) for c in configs if c[0] in results])
    if small_rounds:
        print(f"  train: width {small_width}, {small_rounds} interleaved rounds ...", flush=True)
        small = [c for c in configs if c[1] == small_width]
        for (name, _, _), s in zip(small, interleaved_best(device, batch, small, small_rounds)):
            results[name]["seconds"] = min(results[name]["seconds"], s)
    lines += [row(name, w) for name, w, _ in configs]
    flops = {w: results[name]["flops"] for w, name in fp32_at.items()}
    if device.type != "cuda":
        lines.append("| default, one GPU | - | | | | | | | | - (`python tools/bench.py --device cuda`) | |")
    lines.append(f"\nBatch {batch}; one iteration = {results[configs[0][0]]['d_steps']} D steps + 1 G step + "
                 f"EMA update after a warm-up D and G step; width {width}: one iteration; width {small_width}: " +
                 (f"the best of that one and {small_rounds} more rounds in which the {len(configs) - 1} "
                  "configurations take turns (so that slow spells of the machine hit them alike)" if small_rounds
                  else "one iteration") + ". Real images/s = D steps x batch "
                 "/ s. FLOPs counted with torch.utils.flop_counter.FlopCounterMode (fp32 eager; the other options "
                 "do the same math). Utilisation = achieved FLOP/s / the fp32 matrix-multiply rate measured above "
                 "(TF32 on a GPU, as training runs); the next column against the bf16 rate. "
                 f"Memory: {reset_peak_memory(device)}, each configuration alone. The authors' CIFAR-10 run: "
                 "13 h 24 min for 100k iterations on one TITAN RTX, fp32.")
    for name, w, kw in [c for c in configs if not c[2]]:
        r = results[name]
        top = ", ".join(f"{op} {share:.1%}" for share, op in r["others"][:5])
        lines.append(f"\nProfile, {name} (torch.profiler, self time of one D step + one G step): convolutions "
                     f"forward and backward {r['conv_share']:.0%}; everything else {1 - r['conv_share']:.0%}, "
                     f"largest: {top}.")
    return lines, results, flops

# ---------------------------------------------------------------------------------------------
# FID: Inception-V3 throughput, Frechet distance against scipy's sqrtm formula
# ---------------------------------------------------------------------------------------------

def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's formula (fid_score.py, calculate_frechet_distance): a general scipy sqrtm of S1 S2. The inputs
    here are full rank, so its guards (eps on the diagonal, imaginary parts) have nothing to do."""
    from scipy import linalg
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def bench_fid(device, batch, dim):
    import fid
    model = fid.load_inception(device=device, random_init=True)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1  # G's output size; resized to 299 inside
    sec = seconds_per_call(lambda: fid.features_from_sampler(model, lambda n: images[:n], batch, batch, device),
                           device, budget_s=2.0)
    rng = np.random.default_rng(0)
    features1 = rng.standard_normal((2 * dim, dim))
    features2 = rng.standard_normal((2 * dim, dim)) @ (np.eye(dim) + rng.standard_normal((dim, dim)) / dim) + 0.1
    mu1, mu2 = features1.mean(0), features2.mean(0)
    s1, s2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
    fast = fid.frechet_distance(mu1, s1, mu2, s2)
    slow = frechet_distance_sqrtm(mu1, s1, mu2, s2)
    assert abs(fast - slow) <= 1e-6 * abs(slow), (fast, slow)
    t_fast = seconds_per_call(lambda: fid.frechet_distance(mu1, s1, mu2, s2), device, budget_s=2.0, warmup=0)
    t = time.perf_counter()
    frechet_distance_sqrtm(mu1, s1, mu2, s2)
    t_slow = time.perf_counter() - t
    return [
        "| part | fid.py | reference | ratio |", "|---|---|---|---|",
        f"| Inception-V3 features, 32x32 -> 299x299, batch {batch} | {batch / sec:.3g} images/s "
        f"(10,000 images: {duration(1e4 * sec / batch)}) | - | - |",
        f"| Frechet distance, d = {dim} | {ms(t_fast)} (Cholesky + eigvalsh) | {ms(t_slow)} (scipy sqrtm) | "
        f"{t_slow / t_fast:.0f}x |",
        f"\nThe two distances agree to {abs(fast - slow) / abs(slow):.1e} relative (asserted <= 1e-6). Inception "
        "with random weights (same graph and cost as the published ones); features_from_sampler, fp32."]

# ---------------------------------------------------------------------------------------------
# Evaluation as training runs it: FID fakes from G_ema, reference statistics, D's accuracy checks
# ---------------------------------------------------------------------------------------------

def bench_eval(device, width, n_images, fid_images=10000, eval_every=2000, steps=100000, acc_images=1000):
    """Time one evaluation of contragan.train at the default flags and project it over a run:
    fakes of G_ema at batch 64 (BatchNorm batch statistics) through Inception, the real reference
    images through Inception once, D's diagnostics (accuracy on acc_images training + held-out images,
    class judgement of the held-out images and of acc_images fakes). n_images
    fakes are timed and scaled to fid_images. The sample grid and the checkpoint write are left out."""
    import fid
    inception = fid.load_inception(device=device, random_init=True)
    G = cg.Generator(32, width).to(device)
    D = cg.Discriminator(32, width).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    reals = torch.randint(0, 256, (2 * acc_images, 3, 32, 32), dtype=torch.uint8)
    reals_y = torch.randint(0, 10, (2 * acc_images,))

    def fakes(n):
        return cg.generate(G, torch.randint(0, 10, (n,), device=device, generator=gen), 80, 64, gen)
    scaled = reals.to(device).float() / 127.5 - 1.0
    fid.features_from_sampler(inception, fakes, min(n_images, 64), 64, device)           # warm-up
    t_fakes = seconds_per_call(lambda: fid.features_from_sampler(inception, fakes, n_images, 64, device),
                               device, budget_s=0, warmup=0) * fid_images / n_images
    t_reals = seconds_per_call(lambda: fid.features_from_sampler(
        inception, lambda n: scaled[:n], n_images, 64, device), device, budget_s=0, warmup=0) * fid_images / n_images
    diag_cfg = argparse.Namespace(acc_images=acc_images, seed=0, z_dim=80, eval_batch=64, dataset="cifar10")
    t_acc = seconds_per_call(lambda: cg.d_diagnostics(D, G, (reals[:acc_images], reals_y[:acc_images]), (
        reals[acc_images:], reals_y[acc_images:]), 10, diag_cfg, device), device, budget_s=0)
    per_eval = t_fakes + t_acc
    n_evals = steps // eval_every
    total = n_evals * per_eval + t_reals
    lines = ["| part | time |", "|---|---|",
             f"| {fid_images:,} fakes of G_ema (width {width}, batch 64) through Inception | {ms(t_fakes)} |",
             f"| D's accuracy on {acc_images:,} training + {acc_images:,} held-out real images, class confusion "
             f"of {acc_images:,} fakes | {ms(t_acc)} |",
             f"| one evaluation | {ms(per_eval)} ({duration(per_eval)}) |",
             f"| reference statistics, {fid_images:,} real images (once per data set, then cached) | {ms(t_reals)} |",
             f"| {n_evals} evaluations of a {steps:,}-step run (every {eval_every:,}) + the reference | "
             f"{duration(total)} |",
             f"\n{n_images} fakes and {n_images} reals timed, scaled to {fid_images:,}; random Inception weights "
             "(same graph and cost as the published ones); the sample grid and the checkpoint write are left out."]
    return lines, total

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

SECTIONS = ("2c", "ddp", "train", "host", "fid", "eval")
# The training table's options: (row name, build_trainer's keywords). --channels-last measured 1.03x-1.10x on the
# CPU: not worth a flag.
TRAIN_OPTIONS = {"bf16": ("bf16", dict(amp="bf16")), "compile": ("torch.compile", dict(compile=True)),
                 "bf16-compile": ("bf16 + torch.compile", dict(amp="bf16", compile=True)),
                 "bf16-reduce-overhead": ("bf16 + torch.compile reduce-overhead",
                                          dict(amp="bf16", compile="reduce-overhead"))}


def main(argv=None):
    p = cg.OneLineErrorParser(description=__doc__.strip().splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny sizes, no torch.compile (unless "
                   "--train-options asks): a smoke test, not numbers")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (authors' CIFAR-10: 64)")
    p.add_argument("--width", type=int, default=96, help="the default architecture's width (authors: 96)")
    p.add_argument("--small-width", type=int, default=32, help="the small width; the options run at it")
    p.add_argument("--small-rounds", type=int, help="interleaved timing rounds at --small-width (best of "
                   "these and the first iteration; default 3, 0 with --quick)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 gives steadier "
                   "numbers on a machine shared with other jobs")
    p.add_argument("--out", help="also write the report to this markdown file, each section (training: each row) "
                   "as it is measured; a file already there is replaced at the first measurement (checked before "
                   "anything runs)")
    p.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    p.add_argument("--train-options", help="the training table's rows after eager fp32, in this order, from " +
                   ",".join(TRAIN_OPTIONS) + " (default: bf16,compile; with --quick: bf16); reduce-overhead: CUDA "
                   "graphs on a GPU, skipped by torch on a CPU")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        p.error(f"--sections {args.sections}: choose from {','.join(SECTIONS)}")
    if args.train_options is None:
        args.train_options = "bf16" if args.quick else "bf16,compile"
    train_options = [o for o in args.train_options.split(",") if o]   # "": eager fp32 alone
    if not set(train_options) <= set(TRAIN_OPTIONS):
        p.error(f"--train-options {args.train_options}: choose from {','.join(TRAIN_OPTIONS)}")
    if args.quick:
        args.width, args.small_width = min(args.width, 16), min(args.small_width, 8)
    if args.small_rounds is None:
        args.small_rounds = 0 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = ""                                              # --append: the report it adds to
    if args.out:                                               # before minutes of measuring, not after
        try:
            if args.append and os.path.exists(args.out):
                with open(args.out) as f:
                    previous = f.read()
            open(args.out + ".tmp", "w").close()
            os.remove(args.out + ".tmp")
        except OSError as err:
            sys.exit(f"error: cannot write --out {args.out}: {err.strerror or err}")
    device = cg.setup_device(cg.build_parser().parse_args(["--device", args.device]))[0]  # TF32 as training
    start = time.perf_counter()
    report = [f"# ContraGAN benchmarks\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}, "
              f"torch {torch.__version__}: `{' '.join(['python tools/bench.py'] + argv)}`"]

    def emit(lines, done=True):                                # done=False: a section still being measured
        text = "\n".join(lines)
        if done:
            print(text + "\n", flush=True)
            report.append(text)
        if args.out:                                           # the whole report so far, never a half-written file:
            sections_so_far = report if done else report + [text]  # a run cut short keeps what it measured, and
            with open(args.out + ".tmp", "w") as f:            # the old report stays until the first measurement
                f.write(previous + "".join(t + "\n\n" for t in sections_so_far))
            os.replace(args.out + ".tmp", args.out)

    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * os.cpu_count():
        report[0] += ("\n\n**The machine was busy when this run started: other jobs inflate these timings, "
                      "the more so the smaller the operations. Rerun on a quiet machine.**")
    print(report[0] + "\n")
    budget_s = 0.3 if args.quick else 2.0                      # seconds per timed function
    # --quick: 512^2 on a CPU, where a bf16 2048^2 multiply without bf16 hardware takes ~25 s per call
    mm_n = 512 if args.quick and device.type == "cpu" else 8192 if device.type == "cuda" else 2048
    peak = {dt: matmul_rate(device, dt, budget_s, mm_n) for dt in (torch.float32, torch.bfloat16)}
    tf32 = " (TF32 on, as training runs)" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else ""
    emit([f"Matrix-multiply rate (torch.mm, {mm_n}^2, 2n^3/t): fp32{tf32} "
          f"{peak[torch.float32] / 1e9:.4g} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.4g} GFLOP/s."])
    goals = []
    if "2c" in sections:
        lines, ratios = bench_2c(device, (64,) if args.quick else (64, 256, 1024), 64, budget_s / 2)
        emit(["## 2C loss, forward + backward\n"] + lines)
        vs_code, vs_matmul, vs_loop = ratios[64]
        goals.append(f"2C at batch 64: {vs_code:.1f}x the authors' code (goal >= 10x; {vs_matmul:.1f}x its "
                     f"matmul variant), {vs_loop:.0f}x the literal loop (goal >= 100x).")
    if "ddp" in sections:
        sizes = [(64, 10)] if args.quick else [(64, 50), (1024, 10)]
        emit(["## 2C under DDP (gloo, CPU)\n"] + bench_ddp(device, sizes))
    if "train" in sections:
        options = [TRAIN_OPTIONS[o] for o in train_options]
        title = [f"## One training iteration (CIFAR-10 architecture, batch {args.batch_size})\n"]
        lines, results, flops = bench_train(device, args.batch_size, args.width, args.small_width, args.small_rounds,
                                            peak[torch.float32], peak[torch.bfloat16], options,
                                            show=lambda rows: emit(title + rows, done=False))
        emit(title + lines)
        r = next(iter(results.values()))
        goals.append(f"Training at width {args.width}: {flops[args.width] / r['seconds'] / peak[torch.float32]:.0%} "
                     f"of the fp32 matmul rate (goal >= 50%); largest op outside the convolutions: "
                     f"{r['others'][0][1]} {r['others'][0][0]:.1%} of the step (goal <= 10%).")
    if "host" in sections:
        emit(["## Host: ops dispatched and the host's time per iteration\n"] +
             host_lines(device, *bench_host(device), flops.get(args.width) if "train" in sections else None,
                        r["seconds"] if "train" in sections else None, args.width))
    if "fid" in sections:
        batch = 200 if device.type == "cuda" else 4 if args.quick else 32
        emit(["## FID\n"] + bench_fid(device, batch, 256 if args.quick else 2048))
    eval_s = None
    if "eval" in sections:
        n = 16 if args.quick else 2000 if device.type == "cuda" else 128
        lines, eval_s = bench_eval(device, args.width, n)
        emit([f"## Evaluation during training (FID of G_ema, D's accuracy), width {args.width}\n"] + lines)
    if "train" in sections:
        run_s = r["seconds"] * 1e5
        with_eval = (f" + evaluations {duration(eval_s)} = {duration(run_s + eval_s)}" if eval_s is not None
                     else " (evaluations not timed: add the eval section)")
        how = ")." if device.type == "cuda" else "; measure it with `python tools/bench.py --device cuda`)."
        goals.append(f"100k iterations at width {args.width}: training {duration(run_s)}{with_eval} on this "
                     "device (goal on one H100: < 1 h including evaluations" + how)
    emit(["## Goals (measured, not asserted)\n"] + [f"- {g}" for g in goals] +
         [f"\nWhole benchmark: {duration(time.perf_counter() - start)}" +
          (f"; load average {os.getloadavg()[0]:.1f} at the end." if hasattr(os, "getloadavg") else ".")])


if __name__ == "__main__":
    main()
