#!/usr/bin/env python
"""Does a TempNet design learn the per-token optimum? Frozen synthetic logits with a known tau*.

TempNet is trained alone (the frozen-LM setting) with the DRO loss on fixed logits; there its
optimum per token is the exact tau* of tempnet/exact_tau.py (d loss / d tau = rho - KL(p_tau || u)
whatever the label), so the R^2 of TempNet's tau against tau* on held-out rows measures whether
the design can learn the map at all. The logits are Gaussian rows times a per-row scale
(log-uniform in [0.5, 4]) with 0 to 3 spiked tokens of random height (shape), so tau* varies
with both the scale and the shape.

Variants: the paper's design (``--tempnet-arch paper``, dropout 0.5 and 0), the scale_aware design
and ablations of each of its choices (features removed, dropout 0.5, a linear tau map as the
paper's instead of log space). Prints a Markdown table: R^2 and the std of tau on held-out rows,
mean ± std over seeds, and the seconds per run.

    python bench/bench_tempnet_arch.py [--seeds 1 2 3] [--vocab 2048] [--steps 300]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.tempnet import (TempNetConfig, build_tempnet_head,  # noqa: E402
                                      dro_loss_per_token, solve_tau)
from megatron_tempnet.tempnet import head as head_module  # noqa: E402

TAU_MIN, TAU_MAX = 0.05, 20.0
# name -> (arch, TempNet lr, dropout, features kept (None: all), linear tau map, direction)
VARIANTS = {
    "paper (dropout 0.5)": ("paper", 3e-2, 0.5, None, False, True),
    "paper (dropout 0)": ("paper", 3e-2, 0.0, None, False, True),
    "scale_aware": ("scale_aware", 1e-2, 0.0, None, False, True),
    "scale_aware, no scale features (f0, f1)": ("scale_aware", 1e-2, 0.0, (2, 3, 4), False, True),
    "scale_aware, no Newton feature (f4)": ("scale_aware", 1e-2, 0.0, (0, 1, 2, 3), False, True),
    "scale_aware, direction only (no features)": ("scale_aware", 1e-2, 0.0, (), False, True),
    "scale_aware, features only (no direction)": ("scale_aware", 1e-2, 0.0, None, False, False),
    "scale_aware, dropout 0.5": ("scale_aware", 1e-2, 0.5, None, False, True),
    "scale_aware, linear tau map": ("scale_aware", 1e-2, 0.0, None, True, True),
}


def synthetic_logits(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    scale = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(4.0), generator=gen))
    g = torch.randn(n, vocab, generator=gen)
    spikes = torch.randint(0, 4, (n, 1), generator=gen) > torch.arange(4)
    g[:, :4] += 4 * torch.rand(n, 1, generator=gen) * spikes
    return g * scale[:, None]


@contextmanager
def ablated(features, linear_map: bool):
    """Patch the scale_aware head's feature function / tau map for one variant."""
    saved = head_module.scale_aware_features, head_module.tau_from_log_space
    if features is not None:
        keep = torch.zeros(len(head_module.SCALE_AWARE_FEATURES))
        keep[list(features)] = 1.0

        def masked(*args, **kwargs):
            return saved[0](*args, **kwargs) * keep.to(args[0].dtype)
        head_module.scale_aware_features = masked
    if linear_map:
        def linear(o, cfg):  # the paper's map, started at tau0
            frac = (cfg.initial_tau - cfg.tau_min) / (cfg.tau_max - cfg.tau_min)
            return cfg.tau_min + (cfg.tau_max - cfg.tau_min) * torch.sigmoid(
                o + math.log(frac / (1 - frac)))
        head_module.tau_from_log_space = linear
    try:
        yield
    finally:
        head_module.scale_aware_features, head_module.tau_from_log_space = saved


def run_one(variant, rho: float, seed: int, vocab: int, steps: int, batch: int):
    arch, lr, dropout, features, linear_map, direction = variant
    gen = torch.Generator().manual_seed(seed)
    train, held_out = synthetic_logits(4096, vocab, gen), synthetic_logits(1024, vocab, gen)
    target = solve_tau(held_out, rho, TAU_MIN, TAU_MAX)
    labels = torch.randint(0, vocab, (train.shape[0],), generator=gen)
    cfg = TempNetConfig(arch=arch, loss_mode="tempnet_dro", rho=rho, tau_min=TAU_MIN,
                        tau_max=TAU_MAX, hidden_size=64, dropout=dropout)
    torch.manual_seed(seed)
    with ablated(features, linear_map):
        head = build_tempnet_head(cfg, vocab, seed=seed)
        params = [p for n, p in head.named_parameters() if direction or n != "w_dir"]
        if not direction:
            with torch.no_grad():
                head.w_dir.zero_()
        opt = torch.optim.Adam(params, lr=lr)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, train.shape[0], (batch,), generator=gen)
            loss, _, _ = dro_loss_per_token(train[idx], labels[idx], head(train[idx]), rho,
                                            None, impl="reference")
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            tau = head.eval()(held_out)
    r2 = 1 - float(((tau - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())
    return r2, float(tau.std()), float(target.std()), seconds


def fmt(values, spec="{:.3f}"):
    mean = statistics.fmean(values)
    return spec.format(mean) + (f" ± {spec.format(statistics.stdev(values))}"
                                if len(values) > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--rho", nargs="+", type=float, default=[1.0, 3.0])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"frozen synthetic logits: V={args.vocab}, 4096 train / 1024 held-out rows, "
          f"{args.steps} Adam steps x {args.batch} rows, M=64, tau in [{TAU_MIN}, {TAU_MAX}], "
          f"seeds {args.seeds}\n")
    print("| variant | rho | R² τ vs τ* (held out) | τ std | τ* std | s/run |")
    print("|---|---|---|---|---|---|")
    for name in args.variants:
        for rho in args.rho:
            runs = [run_one(VARIANTS[name], rho, s, args.vocab, args.steps, args.batch)
                    for s in args.seeds]
            r2, std, star_std, secs = zip(*runs)
            print(f"| {name} | {rho:g} | {fmt(r2)} | {fmt(std)} | {fmt(star_std)} | "
                  f"{statistics.fmean(secs):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
