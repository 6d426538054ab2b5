"""Validation metrics, vocab-parallel: perplexity and calibration at tau = 1, with the model's own
tau, and at the best single global temperature (docs/tempnet_math.md section 5).

What is computed (all loss-mask weighted, reduced over TP, micro-batches and DP):
  * perplexity exp(mean NLL) at tau = 1; with the model's own per-token tau: TempNet's (loss
    modes "tempnet_dro", "tempnet_ce") or the exact tau* (loss_mode "dro_exact",
    tempnet/exact_tau.py); at the fixed tau (loss_mode "dro_fixed_tau"); at the best global T;
  * expected calibration error (ECE, ``EvalConfig.ece_bins`` = 15 equal-width confidence bins
    (lo, hi], Guo et al. 2017) of next-token prediction at the same temperatures: confidence =
    max softmax prob, correct = (argmax == target). A temperature tau > 0 changes the confidence,
    never the argmax, so one correctness flag serves every temperature;
  * top-1 accuracy, the own tau's mean and a fixed-bin histogram over [tau_min, tau_max];
  * the temperature tools beside TempNet (tempnet/temperature_tools.py, docs/tempnet_math.md
    5.1) at EvalConfig's settings, not tuned on this data: the entropy-adaptive T and
    confidence thresholding (per-token temperatures, columns like the own tau) and the
    multi-temperature ensemble (its K members' per-token NLL and confidence combined into one
    column: NLL_ens = -logsumexp_k(-NLL_k) + log K, confidence = mean_k confidence_k).

The best global T (reported beside tau = 1 and TempNet's tau; docs/tempnet_math.md 5):
  1. pass 1: every temperature of a coarse grid in the same pass: ``EvalConfig.temperature_points``
     (25) log-spaced temperatures in [temperature_min, temperature_max] = [0.05, 20] (ratio 1.28
     between neighbours) plus T = 1 and the fixed tau;
  2. pass 2 (``refine_points`` > 0): the mean NLL is convex in beta = 1/T (a log-sum-exp of
     functions linear in beta minus a linear term), hence unimodal in T, so its minimum lies
     between the best coarse point's two neighbours; ``refine_points`` (16) log-spaced
     temperatures spanning that bracket (ratio ~1.03) are evaluated by running the model again
     over the same micro-batches (recorded in pass 1: token ids only, no logits). The best T is
     the argmin over both grids, so it is never worse than tau = 1 or any grid point.

Vocab-parallel statistics of one token (:func:`vocab_parallel_token_stats`; the [tokens, V]
logits are never gathered), from this rank's shard z [t, v/tp], target y and temperatures tau_j:
  1. m = max_v z: all-reduce(max) of the local row maxima                                  [t]
  2. all-reduce(sum) of the packed [t, 3 + J]: z_y (owner rank), #{v < y : z_v = m} (ties that
     come before the target), [z_y = m] (owner rank), S_j = sum_v exp((z_v - m) / tau_j)
  3. NLL_j = lse(z / tau_j) - z_y / tau_j = (m - z_y) / tau_j + log S_j;  confidence_j = 1 / S_j;
     correct = [z_y = m] and no tie before y (argmax takes the lowest index among ties).
Two collectives per micro-batch, for any number of temperatures (plus those of the own tau:
TempNet's one, or the exact solver's few, and the temperature tools' two: the entropy and the
confidence at T = 1 that set their per-token temperatures).

PP > 1: the model runs through megatron-core's schedule with ``forward_only=True``; the last
stage's loss_func turns the logits shard into one vector of per-micro-batch sums (see
``_StatLayout``), which are summed over micro-batches and all-reduced over DP. The result is
broadcast from the last stage over the pipeline group, so every rank returns the same dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_tempnet.tempnet.comm import MAX, SUM, all_reduce, group_rank_size
from megatron_tempnet.tempnet.exact_tau import solve_tau
from megatron_tempnet.tempnet.reference import compute_dtype
from megatron_tempnet.tempnet.temperature_tools import (ensemble_nll_and_confidence,
                                                        token_temperatures)
from megatron_tempnet.training.ddp import params_synced
from megatron_tempnet.training.config import TEMPERATURE_TOOLS, EvalConfig
from megatron_tempnet.training.metrics_log import tau_histogram, tau_histogram_edges
from megatron_tempnet.training.step import chunk_iterators
from megatron_tempnet.training.reports import ReportSpec


# ---------------------------------------------------------------------------------------------
# The math, once: per-token statistics on a vocab shard.

def vocab_parallel_token_stats(logits_shard: torch.Tensor, target: torch.Tensor,
                               temperatures: torch.Tensor, tp_group=None):
    """Per-token NLL and confidence at each temperature, and argmax correctness, vocab-parallel.

    logits_shard [t, v/tp] (rank r holds global ids [r*v/tp, (r+1)*v/tp)), target [t] global ids
    (out of range, e.g. -100: garbage values, mask them), temperatures [t, J] or [J] (> 0, the
    same on all TP ranks). Returns (nll [t, J], confidence [t, J], correct [t] bool), identical
    on all TP ranks. Two collectives (see the module docstring).
    """
    rank, size = group_rank_size(tp_group)
    z = logits_shard.detach().to(compute_dtype(logits_shard.dtype))  # [t, v/tp]
    t, v_local = z.shape
    start = rank * v_local
    inv_tau = 1.0 / temperatures.to(z.dtype).expand(t, -1)  # [t, J]

    # 1. global row max
    m = all_reduce(z.amax(dim=-1), MAX, tp_group)  # [t]
    # 2. local sums, packed into one all-reduce
    owned = (target >= start) & (target < start + v_local)  # [t]
    local_y = torch.where(owned, target - start, 0).long()
    z_y = torch.where(owned, z.gather(-1, local_y.unsqueeze(-1)).squeeze(-1), 0.0)  # [t]
    ids = torch.arange(start, start + v_local, device=z.device)
    at_max = z == m.unsqueeze(-1)  # [t, v/tp]
    ties_before = (at_max & (ids.unsqueeze(0) < target.unsqueeze(-1))).sum(-1)  # [t]
    target_is_max = owned & (z_y == m)
    shifted = z - m.unsqueeze(-1)  # [t, v/tp], <= 0
    del at_max
    buf = torch.empty_like(shifted)
    sums = [torch.mul(shifted, inv_tau[:, j:j + 1], out=buf).exp_().sum(-1)
            for j in range(inv_tau.shape[1])]  # S_j [t] each; one [t, v/tp] buffer
    packed = torch.stack([z_y, ties_before.to(z.dtype), target_is_max.to(z.dtype), *sums], -1)
    all_reduce(packed, SUM, tp_group)  # [t, 3 + J]
    z_y, ties_before, target_is_max, s = packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3:]
    # 3. per-token results
    nll = (m - z_y).unsqueeze(-1) * inv_tau + torch.log(s)  # [t, J]
    confidence = 1.0 / s  # [t, J]
    correct = (target_is_max > 0.5) & (ties_before < 0.5)  # [t]
    return nll, confidence, correct


def ece_bin_index(confidence: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Equal-width bins (lo, hi] of [0, 1]: ceil(c * B) - 1, clamped to [0, B - 1]."""
    return (torch.ceil(confidence * num_bins).long() - 1).clamp_(0, num_bins - 1)


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE from per-bin sums [B, 3] = (weight, confidence sum, correct sum):
    sum_b |correct_b - confidence_b| / total weight."""
    total = float(bins[:, 0].sum())
    return float((bins[:, 2] - bins[:, 1]).abs().sum()) / max(total, 1e-30)


# ---------------------------------------------------------------------------------------------
# Per-micro-batch sums (the schedule's loss_func) and their layout.

# The moment sums of the own tau (and, for "tempnet_dro", of the exact tau* of the same logits):
# sum w tau^2, sum w tau*, sum w tau*^2, sum w tau tau* -> tau std, R^2 and Pearson vs tau*.
TAU_MOMENTS = 4
# The temperature tools' scalar sums: sum w T_entropy, sum w [confidence >= threshold].
TOOL_SUMS = 2


def tracks_exact_tau(tempnet_cfg) -> bool:
    """Whether the evaluation compares the own tau with the exact per-token tau* of the DRO
    loss (tempnet/exact_tau.py: the minimiser over tau of the loss TempNet is trained with):
    loss_mode "tempnet_dro". ("tempnet_ce"'s per-token optimum argmin_tau CE(z/tau, y) depends on
    the label (it is tau -> 0 whenever y is the argmax), so no label-free target exists.)"""
    return tempnet_cfg is not None and tempnet_cfg.loss_mode == "tempnet_dro"


@dataclass(frozen=True)
class _StatLayout:
    """Offsets of the flat per-micro-batch sum vector. Columns j < len(temperatures) are the
    global temperatures ``temperatures``; the next (if ``token_tau``) is the model's own
    per-token tau (TempNet's or the exact tau*); then (if ``tools``: the EvalConfig with their
    settings) one column per temperature tool, in ``TEMPERATURE_TOOLS``' order, from
    ``tool_col`` on. ``tau_star``: the moments carry tau* too; the tau histogram has
    ``hist_bins`` bins over ``hist_bounds``."""

    temperatures: tuple
    token_tau: bool
    ece_bins: int
    hist_bins: int
    tau_star: bool = False
    hist_bounds: tuple = (0.0, 1.0)
    tools: EvalConfig | None = None

    @property
    def tool_col(self) -> int:
        return len(self.temperatures) + int(self.token_tau)

    @property
    def num_cols(self) -> int:
        return self.tool_col + len(TEMPERATURE_TOOLS) * (self.tools is not None)

    @property
    def size(self) -> int:  # count, correct, tau sum | nll [J] | bins [J, B, 3] | tau hist [H]
        return (3 + self.num_cols * (1 + 3 * self.ece_bins)  # | tau moments [4] | tool sums [2]
                + (self.hist_bins + TAU_MOMENTS) * self.token_tau
                + TOOL_SUMS * (self.tools is not None))

    def split(self, vec: torch.Tensor) -> dict:
        j, b = self.num_cols, self.ece_bins
        nll_end = 3 + j
        bins_end = nll_end + j * b * 3
        hist_end = bins_end + self.hist_bins * self.token_tau
        moments_end = hist_end + TAU_MOMENTS * self.token_tau
        return {"count": vec[0], "correct": vec[1], "tau_sum": vec[2],
                "nll": vec[3:nll_end], "bins": vec[nll_end:bins_end].view(j, b, 3),
                "tau_hist": vec[bins_end:hist_end], "tau_moments": vec[hist_end:moments_end],
                "tool_sums": vec[moments_end:]}


def _micro_batch_sums(layout: _StatLayout, model, tp_group, batch, logits):
    """loss_func: logits [b, s, v/tp] -> (0, token count, {"eval": flat sums})."""
    mask = batch["loss_mask"].reshape(-1).to(torch.float64)  # [t]
    target = batch["labels"].reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])  # [t, v/tp]
    temps = torch.tensor(layout.temperatures, dtype=torch.float64, device=logits.device)
    temps = temps.expand(flat.shape[0], -1)  # [t, J0]
    tau = None
    if layout.token_tau:  # TempNet in eval mode, outside megatron's RNG fork (head.py), or tau*
        tau = model.token_tau(logits).reshape(-1).to(torch.float64)  # [t]
        temps = torch.cat([temps, tau.unsqueeze(-1)], dim=-1)  # [t, J]
    tools = layout.tools
    if tools is not None:  # entropy T, threshold T, then the ensemble's K members
        tool_t = token_temperatures(flat, tools, tp_group)
        members = torch.tensor(tools.ensemble_temperatures, dtype=torch.float64,
                               device=logits.device).expand(flat.shape[0], -1)  # [t, K]
        temps = torch.cat([temps, tool_t.entropy.unsqueeze(-1).to(torch.float64),
                           tool_t.threshold.unsqueeze(-1).to(torch.float64), members], dim=-1)
    nll, conf, correct = vocab_parallel_token_stats(flat, target, temps, tp_group)
    if tools is not None:  # the K members' columns -> one ensemble column
        k0 = layout.num_cols - 1
        ens_nll, ens_conf = ensemble_nll_and_confidence(nll[:, k0:], conf[:, k0:])
        nll = torch.cat([nll[:, :k0], ens_nll.unsqueeze(-1)], dim=-1)  # [t, num_cols]
        conf = torch.cat([conf[:, :k0], ens_conf.unsqueeze(-1)], dim=-1)
    keep = (mask != 0).unsqueeze(-1)
    wk = torch.where(keep[:, 0], mask, 0.0)  # [t] float64: the kept tokens' weights
    w = mask.to(nll.dtype).unsqueeze(-1)  # [t, 1]
    nll_sum = torch.where(keep, nll * w, 0.0).sum(0)  # [J] (masked tokens may hold garbage)
    cw = correct.to(nll.dtype).unsqueeze(-1) * w
    j, nb = layout.num_cols, layout.ece_bins
    index = (ece_bin_index(conf, nb) + torch.arange(j, device=conf.device) * nb) * 3  # [t, J]
    bins = torch.zeros(j * nb * 3, dtype=nll.dtype, device=nll.device)
    for k, value in enumerate((w.expand_as(conf), conf * w, cw.expand_as(conf))):
        bins.index_add_(0, (index + k).reshape(-1), torch.where(keep, value, 0.0).reshape(-1))
    head = [w.sum(), cw.sum(), (tau.unsqueeze(-1) * w).sum() if tau is not None
            else torch.zeros((), dtype=nll.dtype, device=nll.device)]
    parts = [torch.stack(head), nll_sum, bins]
    if tau is not None:
        parts.append(tau_histogram(tau, mask, *layout.hist_bounds,
                                   bins=layout.hist_bins).to(nll.dtype))
        star = torch.zeros_like(tau)
        if layout.tau_star:  # the DRO loss's exact per-token optimum on the same logits
            cfg = model.tempnet_config
            star = solve_tau(logits, cfg.rho, cfg.tau_min, cfg.tau_max,
                             tp_group).reshape(-1).to(tau.dtype)
        wt = wk.to(tau.dtype)
        parts.append(torch.stack([(wt * tau * tau).sum(), (wt * star).sum(),
                                  (wt * star * star).sum(), (wt * tau * star).sum()]))
    if tools is not None:
        wt = wk.to(nll.dtype)
        parts.append(torch.stack([(wt * tool_t.entropy.to(nll.dtype)).sum(),
                                  (wt * tool_t.confident.to(nll.dtype)).sum()]))
    vec = torch.cat(parts)
    assert vec.numel() == layout.size
    return logits.new_zeros(()), mask.sum().to(torch.int), {"eval": vec}


def _eval_forward_step(loss_func, data_iterator, model):
    """megatron-core forward_step_func: the model without labels returns the logits shard
    [b, s, v/tp] on the last stage (hidden states elsewhere)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, partial(loss_func, batch)


def unwrap_model(module):
    """The model inside its wrappers (DDP, Float16Module)."""
    while hasattr(module, "module"):  # DDP, Float16Module
        module = module.module
    return module


def _run_pass(model_chunks, batches, layout, ctx, *, num_microbatches, seq_length,
              micro_batch_size):
    """One forward-only pass; this rank's DP-reduced sums (last stage) or None, and the batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = unwrap_model(model_chunks[-1])
    loss_func = partial(_micro_batch_sums, layout, model, ctx.tp_group)
    seen = [next(batches) for _ in range(num_microbatches)]  # this pass's, for the replay
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=partial(_eval_forward_step, loss_func),
            data_iterator=chunk_iterators(model_chunks, iter(seen), num_microbatches),
            model=model_chunks, num_microbatches=num_microbatches,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    if not ctx.is_last_stage:
        return None, seen
    total = torch.stack([r["eval"] for r in reports]).sum(0) if reports else \
        torch.zeros(layout.size, dtype=torch.float64, device=ctx.device)
    return all_reduce(total, SUM, ctx.dp_group), seen


def _refine_grid(coarse: list, nll: torch.Tensor, points: int) -> list:
    """``points`` log-spaced temperatures between the neighbours of the best coarse point."""
    k = int(torch.argmin(nll))
    lo, hi = coarse[max(k - 1, 0)], coarse[min(k + 1, len(coarse) - 1)]
    if points <= 0 or lo == hi:
        return []
    return torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64).tolist()


def evaluate(model_chunks: list, batches, num_batches: int, ctx, *, seq_length: int,
             micro_batch_size: int, num_microbatches: int,
             config: EvalConfig | None = None, spec: ReportSpec | None = None) -> dict:
    """Validation metrics over ``num_batches`` global batches of ``num_microbatches`` micro-batches
    each (``batches`` yields this DP rank's micro-batches, as in training).

    Every rank returns the same dict (broadcast from the last stage over ``ctx.pp_group``):
    scalars "eval tokens", "accuracy", "ppl tau=1", "ece tau=1", "best T", "ppl best T",
    "ece best T"; with TempNet "ppl tempnet", "ece tempnet", "tau mean", "tau std" and
    "tau histogram" ({"edges": [...], "counts": [...]}) (loss_mode "tempnet_dro" adds "tau* mean",
    "tau* std", "r2 tau*", "pearson tau*": :func:`tau_agreement` with the exact tau*; the
    per-token tau* costs a few extra passes over the logits); with loss_mode "dro_exact" the same
    for the exact tau* with "ppl exact tau", "ece exact tau"; with a fixed tau "fixed tau",
    "ppl fixed tau", "ece fixed tau"; the temperature tools at ``config``'s settings (every
    model): "ppl entropy T", "ece entropy T", "entropy T mean", "ppl threshold T",
    "ece threshold T", "threshold confident fraction", "ppl ensemble", "ece ensemble", and
    "temperature tools" (their settings: {EvalConfig field: value}); and "temperature grid"
    ([[T, ppl, ece], ...], both passes, sorted by T). The model is run in eval mode and put
    back in its previous mode.
    ``spec`` (training/reports.py; the run's, ``training.stage.report_spec``): the tau
    histogram's bounds and bins (None: the model's TempNetConfig and ``config``'s bins).
    """
    config = (config or EvalConfig()).validate()
    model = unwrap_model(model_chunks[-1])
    tcfg = getattr(model, "tempnet_config", None)
    spec = spec or ReportSpec.build(tcfg, getattr(model, "loss_channels", ()),
                                    config.tau_histogram_bins)
    token_tau = own_tau_name(tcfg) is not None
    fixed = tcfg.fixed_tau if tcfg is not None and tcfg.loss_mode == "dro_fixed_tau" else None
    coarse = config.coarse_grid(() if fixed is None else (fixed,))
    modes = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        run = partial(_run_pass, model_chunks, ctx=ctx, num_microbatches=num_microbatches,
                      seq_length=seq_length, micro_batch_size=micro_batch_size)
        layout = _StatLayout(tuple(coarse), token_tau, config.ece_bins, spec.histogram_bins,
                             tracks_exact_tau(tcfg), spec.tau_bounds or (0.0, 1.0), config)
        recorded = []
        first = None
        for _ in range(num_batches):
            sums, seen = run(batches, layout)
            recorded += seen
            first = sums if first is None or sums is None else first + sums
        # pass 2: the fine grid (identical on every last-stage rank: the sums are all-reduced)
        fine = []
        if ctx.is_last_stage and config.refine_points and first is not None:
            fine = _refine_grid(coarse, layout.split(first)["nll"][:len(coarse)],
                                config.refine_points)
        fine = _broadcast_from_last_stage(fine, ctx)
        second = None
        if fine:
            fine_layout = _StatLayout(tuple(fine), False, config.ece_bins, 0)
            replay = iter(recorded)
            for _ in range(num_batches):
                sums, _ = run(replay, fine_layout)
                second = sums if second is None or sums is None else second + sums
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)
    result = None
    if ctx.is_last_stage:
        result = _metrics(layout, first, fine_layout if fine else None, second, fixed, tcfg,
                          config)
    return _broadcast_from_last_stage(result, ctx)


def own_tau_name(tempnet_cfg) -> str | None:
    """The metric name of the model's own per-token tau: "tempnet" (a TempNet head), "exact tau"
    (loss_mode "dro_exact": tau* of tempnet/exact_tau.py) or None (plain model, fixed tau)."""
    if tempnet_cfg is None:
        return None
    if tempnet_cfg.uses_tempnet:
        return "tempnet"
    return "exact tau" if tempnet_cfg.loss_mode == "dro_exact" else None


def _broadcast_from_last_stage(obj, ctx):
    if ctx.pp_size == 1 or ctx.pp_group is None:
        return obj
    box = [obj]
    src = dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1)
    dist.broadcast_object_list(box, src=src, group=ctx.pp_group)
    return box[0]


def _metrics(layout, first, fine_layout, second, fixed, tcfg, config) -> dict:
    """Final dict from the DP-reduced sums of pass 1 (and pass 2)."""
    a = layout.split(first.double().cpu())
    count = float(a["count"])
    denom = max(count, 1e-30)

    def ppl(nll_sum):
        return math.exp(min(float(nll_sum) / denom, 700.0))

    grid = {}  # T -> (ppl, ece): coarse, then fine
    for j, temp in enumerate(layout.temperatures):
        grid[temp] = (ppl(a["nll"][j]), expected_calibration_error(a["bins"][j]))
    if fine_layout is not None:
        b = fine_layout.split(second.double().cpu())
        for j, temp in enumerate(fine_layout.temperatures):
            grid.setdefault(temp, (ppl(b["nll"][j]), expected_calibration_error(b["bins"][j])))
    best = min(grid, key=lambda t: (grid[t][0], abs(math.log(t))))
    out = {"eval tokens": count, "accuracy": float(a["correct"]) / denom,
           "ppl tau=1": grid[1.0][0], "ece tau=1": grid[1.0][1]}
    if layout.token_tau:
        j, name = len(layout.temperatures), own_tau_name(tcfg)
        out.update({f"ppl {name}": ppl(a["nll"][j]),
                    f"ece {name}": expected_calibration_error(a["bins"][j]),
                    "tau mean": float(a["tau_sum"]) / denom,
                    "tau histogram": {"edges": tau_histogram_edges(*layout.hist_bounds,
                                                                   layout.hist_bins),
                                      "counts": a["tau_hist"].tolist()}})
        out.update(tau_agreement(float(a["tau_sum"]), *a["tau_moments"].tolist(), denom,
                                 layout.tau_star))
    if fixed is not None:
        out.update({"fixed tau": float(fixed), "ppl fixed tau": grid[float(fixed)][0],
                    "ece fixed tau": grid[float(fixed)][1]})
    if layout.tools is not None:
        for j, name in enumerate(TEMPERATURE_TOOLS, layout.tool_col):
            out.update({f"ppl {name}": ppl(a["nll"][j]),
                        f"ece {name}": expected_calibration_error(a["bins"][j])})
        entropy_t, confident = a["tool_sums"].tolist()
        out.update({"entropy T mean": entropy_t / denom,
                    "threshold confident fraction": confident / denom,
                    "temperature tools": _tool_settings(layout.tools)})
    out.update({"best T": best, "ppl best T": grid[best][0], "ece best T": grid[best][1],
                "temperature grid": [[t, *grid[t]] for t in sorted(grid)]})
    return out


def _tool_settings(config: EvalConfig) -> dict:
    """The temperature tools' settings as evaluated: {EvalConfig field: value}."""
    out = {}
    for fields in TEMPERATURE_TOOLS.values():
        for name in fields:
            value = getattr(config, name)
            out[name] = [float(v) for v in value] if isinstance(value, (list, tuple)) else value
    return out


def tau_agreement(tau_sum: float, tau_sq: float, star_sum: float, star_sq: float,
                  cross: float, weight: float, with_star: bool) -> dict:
    """"tau std" (the own tau's spread over tokens) from weighted sums; with ``with_star`` also
    "tau* mean", "tau* std", "r2 tau*" = 1 - sum (tau - tau*)^2 / sum (tau* - mean tau*)^2 (how
    much of tau*'s per-token variation the own tau explains; can be < 0) and "pearson tau*".
    Both are None when tau* (or tau, for Pearson) has no spread (e.g. all at a bound)."""
    mean, var = tau_sum / weight, max(tau_sq / weight - (tau_sum / weight) ** 2, 0.0)
    out = {"tau std": math.sqrt(var)}
    if not with_star:
        return out
    s_mean = star_sum / weight
    s_var = max(star_sq / weight - s_mean ** 2, 0.0)
    cov = cross / weight - mean * s_mean
    resid = max(tau_sq - 2 * cross + star_sq, 0.0) / weight  # mean (tau - tau*)^2
    tiny = 1e-12 * max(s_mean * s_mean, 1e-30)
    out.update({"tau* mean": s_mean, "tau* std": math.sqrt(s_var),
                "r2 tau*": 1.0 - resid / s_var if s_var > tiny else None,
                "pearson tau*": (cov / math.sqrt(s_var * var)
                                 if s_var > tiny and var > 1e-12 * mean * mean else None)})
    return out


def format_eval_table(metrics: dict, title: str = "validation") -> str:
    """Printable table of :func:`eval_rows`; columns ppl, ECE."""
    rows = eval_rows(metrics)
    width = max(len(r[0]) for r in rows)
    lines = [f"{title}: {metrics['eval tokens']:.0f} tokens, top-1 accuracy "
             f"{metrics['accuracy']:.4f}",
             f"{'':<{width}}  {'ppl':>12}  {'ECE':>8}"]
    lines += [f"{name:<{width}}  {p:>12.4f}  {e:>8.4f}" for name, p, e in rows]
    if "tau std" in metrics:
        line = f"own tau over tokens: mean {metrics['tau mean']:.4f}, std {metrics['tau std']:.4f}"
        if "tau* mean" in metrics:
            def num(key):
                return "n/a (no spread)" if metrics[key] is None else f"{metrics[key]:.4f}"
            line += (f"; exact tau*: mean {metrics['tau* mean']:.4f}, std "
                     f"{metrics['tau* std']:.4f}; R^2 {num('r2 tau*')}, "
                     f"Pearson {num('pearson tau*')}")
        lines.append(line)
    return "\n".join(lines)


def eval_rows(metrics: dict) -> list[tuple[str, float, float]]:
    """(label, ppl, ECE) of an evaluation dict: tau = 1, TempNet tau / exact tau* / fixed tau,
    the temperature tools (when the dict has them), best global T (the console table and the
    Hugging Face model card)."""
    rows = [("tau = 1", metrics["ppl tau=1"], metrics["ece tau=1"])]
    if "ppl tempnet" in metrics:
        rows.append((f"TempNet tau (mean {metrics['tau mean']:.3f})", metrics["ppl tempnet"],
                     metrics["ece tempnet"]))
    if "ppl exact tau" in metrics:
        rows.append((f"exact tau* (mean {metrics['tau mean']:.3f})", metrics["ppl exact tau"],
                     metrics["ece exact tau"]))
    if "ppl fixed tau" in metrics:
        rows.append((f"fixed tau = {metrics['fixed tau']:g}", metrics["ppl fixed tau"],
                     metrics["ece fixed tau"]))
    rows += _tool_rows(metrics)
    if "ppl best T" in metrics:
        rows.append((f"best global T = {metrics['best T']:.4g}", metrics["ppl best T"],
                     metrics["ece best T"]))
    return rows


def _tool_rows(metrics: dict) -> list:
    """The temperature tools' rows (none for a dict without their settings)."""
    cfg = metrics.get("temperature tools")
    if not cfg:
        return []
    temps = ", ".join(f"{t:g}" for t in cfg["ensemble_temperatures"])
    labels = {
        "entropy T": f"entropy-adaptive T (base {cfg['entropy_temperature_base']:g}, "
                     f"a {cfg['entropy_temperature_alpha']:g}; mean "
                     f"{metrics['entropy T mean']:.3f})",
        "threshold T": f"confidence threshold {cfg['confidence_threshold']:g} (T "
                       f"{cfg['confident_temperature']:g} / {cfg['uncertain_temperature']:g}; "
                       f"{metrics['threshold confident fraction']:.1%} confident)",
        "ensemble": f"ensemble T in {{{temps}}}"}
    return [(labels[name], metrics[f"ppl {name}"], metrics[f"ece {name}"])
            for name in TEMPERATURE_TOOLS]


class EvalCallback:
    """Train-loop callback ``fn(state, step_output)`` (TrainLoop's ``callbacks``): evaluates
    every ``config.eval_interval`` iterations (0: never in between) and at the last iteration,
    prints the table (rank 0), passes the dict to ``logger.log_eval`` (a MetricsLogger, or None)
    and keeps ``(iteration, metrics)`` in ``self.results``. ``batches`` is the validation
    micro-batch iterator of this DP rank; it is not rewound between evaluations (Megatron-LM's
    behaviour: build it with ``data.datasets.num_samples(...)[1]`` validation samples)."""

    def __init__(self, model_chunks: list, batches, ctx, config: EvalConfig, train_cfg,
                 spec: ReportSpec | None = None, *, logger=None, log=print):
        self.chunks, self.batches, self.ctx = model_chunks, batches, ctx
        self.config, self.train_cfg, self.spec = config.validate(), train_cfg, spec
        self.logger, self.log = logger, log
        self.results: list = []

    def due(self, iteration: int) -> bool:
        interval = self.config.eval_interval
        return self.config.eval_iters > 0 and (
            iteration == self.train_cfg.train_iters or (interval > 0 and iteration % interval == 0))

    def run(self, iteration: int) -> dict:
        tc = self.train_cfg
        with params_synced(self.chunks):  # --overlap-param-gather: this step's weights
            metrics = evaluate(self.chunks, self.batches, self.config.eval_iters, self.ctx,
                               seq_length=tc.seq_length, micro_batch_size=tc.micro_batch_size,
                               num_microbatches=tc.num_microbatches(self.ctx.dp_size),
                               config=self.config, spec=self.spec)
        self.results.append((iteration, metrics))
        if self.ctx.rank == 0:
            self.log(format_eval_table(metrics, f"validation at iteration {iteration}"))
        if self.logger is not None:
            self.logger.log_eval(iteration, metrics)
        return metrics

    def __call__(self, state, out=None) -> None:
        if self.due(state.iteration):
            self.run(state.iteration)
