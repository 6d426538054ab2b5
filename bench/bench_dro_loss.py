"""Loss-step benchmark: forward + backward time and extra peak memory of the output projection
and the loss, for our DRO-loss implementations with TempNet's per-token tau and for plain-CE
peers (docs/parallel_design.md section 5; the peers' H100 numbers: docs/gpu_baselines.md).

Inputs: hidden [tokens, hidden] and the output weight [V, hidden] in --dtype (bf16 by default on
a GPU), targets uniform over V, all tokens kept. Rows:

    dense torch (fp32 CE)     logits = h @ W^T, F.cross_entropy on logits.float()   (peer, plain CE)
    dense DRO (fp32)          logits = h @ W^T, TempNet tau, the dense fp32 DRO loss by autograd
                              (tempnet/reference.py: what one writes without this project)
    reference                 logits, TempNet tau, --dro-loss-impl reference (tempnet/loss.py)
    fused                     logits, TempNet tau, --dro-loss-impl fused (Triton)
    fused_linear              --dro-loss-impl fused_linear: projection + TempNet + loss chunked
    Liger FLCE / Cut CE       plain-CE peers, when liger-kernel / cut-cross-entropy are installed

TempNet (M = --tempnet-hidden, 256) runs on every DRO row, so the DRO rows do more work than the
CE peers. Time: median of --iters timed iterations after --warmup (CUDA events on a GPU,
perf_counter on the CPU). Extra peak memory: torch.cuda.max_memory_allocated during one
iteration minus what was allocated before it (inputs, weights, TempNet), GPU only.

    python bench/bench_dro_loss.py                              # one GPU: tokens 16384, H 4096
    python bench/bench_dro_loss.py --tokens 256 --hidden 64 --vocab 1000 --iters 2   # CPU smoke
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tempnet.tempnet import TempNetConfig, TempNetHead  # noqa: E402
from megatron_tempnet.tempnet.fused_linear import fused_linear_dro_loss  # noqa: E402
from megatron_tempnet.tempnet.loss import dro_loss_per_token, kernels_available  # noqa: E402
from megatron_tempnet.tempnet.reference import dro_loss_per_token_reference  # noqa: E402

RHO = 8.0
IMPLS = ["dense_ce", "dense_dro", "reference", "fused", "fused_linear", "liger", "cce"]
LABELS = {"dense_ce": "dense torch (fp32 CE)", "dense_dro": "dense DRO (fp32)",
          "reference": "reference", "fused": "fused", "fused_linear": "fused_linear",
          "liger": "Liger FLCE (plain CE)", "cce": "Cut CE (plain CE)"}


def make_step(impl: str, h, w, target, head):
    """A closure running forward + backward of one loss step for ``impl``."""
    tokens = h.shape[0]
    mask = torch.ones(tokens, device=h.device)

    def tau_of(logits):
        return head(logits)

    if impl == "dense_ce":
        def step():
            F.cross_entropy((h @ w.t()).float(), target).backward()
    elif impl == "dense_dro":
        def step():
            logits = h @ w.t()
            loss, _, _ = dro_loss_per_token_reference(logits, target, tau_of(logits), RHO)
            loss.mean().backward()
    elif impl in ("reference", "fused"):
        def step():
            logits = h @ w.t()
            loss, _, _ = dro_loss_per_token(logits, target, tau_of(logits), RHO, impl=impl)
            loss.mean().backward()
    elif impl == "fused_linear":
        params = list(head.parameters())

        def step():
            loss, _, _, _ = fused_linear_dro_loss(h, w, target, mask,
                                                  lambda z, _rows: tau_of(z), RHO,
                                                  tau_params=params)
            (loss * mask).sum().div(tokens).backward()
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def step():
            liger(w, h, target).backward()
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():
            linear_cross_entropy(h, w, target).backward()
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    return step


def unavailable(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    if impl in ("fused", "fused_linear"):
        return kernels_available(device)
    if impl in ("liger", "cce"):
        if device.type != "cuda":
            return "GPU only"
        module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[impl]
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    return None


def make_inputs(args, vocab: int, device: torch.device):
    """(hidden [tokens, hidden], weight [V, hidden], both requiring grad, in --dtype; targets
    uniform over V), drawn from seed 0 on the CPU: the same for every implementation."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).to(device, dtype)
    w = (torch.randn(vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(device, dtype)
    h.requires_grad_(True)
    w.requires_grad_(True)
    target = torch.randint(0, vocab, (args.tokens,), generator=g).to(device)
    return h, w, target


def measure(impl: str, args, vocab: int, device: torch.device, inputs=None) -> dict:
    """One row; ``inputs``: ``make_inputs``' tensors, to share them between implementations
    (bench/gpu_run.py does: drawing [128256, 4096] on the CPU takes seconds)."""
    row = {"impl": LABELS[impl], "V": vocab}
    why = unavailable(impl, device)
    if why:
        return {**row, "error": why}
    h, w, target = inputs if inputs is not None else make_inputs(args, vocab, device)
    head = TempNetHead(TempNetConfig(hidden_size=args.tempnet_hidden, dropout=0.0,
                                     loss_mode="tempnet_dro"), vocab, device=device)
    step = make_step(impl, h, w, target, head)

    def clear_grads():
        h.grad = w.grad = None
        head.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    try:
        for _ in range(args.warmup):
            step()
            clear_grads()
        times = []
        base = peak = 0
        for _ in range(args.iters):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
                peak = max(peak, torch.cuda.max_memory_allocated() - base)
            else:
                t0 = time.perf_counter()
                step()
                times.append(1000 * (time.perf_counter() - t0))
            clear_grads()
    except torch.OutOfMemoryError:
        return {**row, "error": "OOM"}
    return {**row, "ms": statistics.median(times), "GiB": peak / 2**30 if cuda else None}


def table(rows: list[dict]) -> str:
    head = ["implementation", "V", "fwd+bwd ms", "extra peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["impl"], str(r["V"]), f"n/a ({r['error']})", ""]
        else:
            gib = "n/a" if r["GiB"] is None else f"{r['GiB']:.2f}"
            cells = [r["impl"], str(r["V"]), f"{r['ms']:.1f}", gib]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--tempnet-hidden", type=int, default=256, help="TempNet's M")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"# DRO loss step: tokens {args.tokens}, hidden {args.hidden}, {args.dtype}, TempNet "
          f"M={args.tempnet_hidden}; {name}; torch {torch.__version__}; "
          f"{datetime.date.today()}", flush=True)
    rows = []
    for vocab in args.vocab:
        for impl in args.impls:
            rows.append(measure(impl, args, vocab, device))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  done: {impl} V={vocab}", file=sys.stderr, flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
