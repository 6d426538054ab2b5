"""Temperature tools beside TempNet, from the calibration literature: the entropy-adaptive
temperature, confidence thresholding and the multi-temperature ensemble (docs/tempnet_math.md
section 5.1). The math once: evaluation (training/evaluate.py, on a vocabulary shard per TP
rank) and generation (tools/generate.py, on the full scores) call these functions.

Per token, with z its logits over V entries and p = softmax(z) (T = 1):
  * entropy-adaptive:  T = base * (1 + alpha * H(p) / log V);
  * threshold:         T = confident_temperature if max p >= threshold else uncertain_temperature;
  * ensemble:          p_ens = (1/K) sum_k softmax(z / T_k), so
                       log p_ens(y) = logsumexp_k log softmax(z / T_k)_y - log K.
Their settings live in one place, ``training.config.EvalConfig`` (its fields named in
``TEMPERATURE_TOOLS``); they are not tuned on the data they are evaluated on.

Vocab-parallel: ``softmax_entropy_and_confidence`` takes this rank's shard z [..., v/tp] and the
TP group (two all-reduces, ``tempnet/comm.py``); with ``tp_group=None`` (or a group of size 1) it
is the plain full-vocabulary computation. Its results are identical on every TP rank, so the
temperatures derived from them are too.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from megatron_tempnet.tempnet.comm import MAX, SUM, all_reduce, group_rank_size
from megatron_tempnet.tempnet.reference import compute_dtype

if TYPE_CHECKING:
    from megatron_tempnet.training.config import EvalConfig


def softmax_entropy_and_confidence(logits_shard: torch.Tensor, tp_group=None):
    """(H, c, V): the entropy H(p) and the confidence c = max p of p = softmax(z) at T = 1 over
    the last dim, [...] each in the compute dtype, and V = the whole vocabulary's size
    (v/tp x TP). With m the global row max, S = sum_v e^(z_v - m) and
    A = sum_v e^(z_v - m) (z_v - m) (both summed over the TP group):
    H = log S - A / S and c = 1 / S. A logit of -inf (a masked entry) adds nothing."""
    z = logits_shard.detach().to(compute_dtype(logits_shard.dtype))
    m = all_reduce(z.amax(dim=-1), MAX, tp_group)  # [...]
    shifted = z - m.unsqueeze(-1)  # [..., v/tp], <= 0
    e = shifted.exp()
    # e * (z - m), with 0 * (-inf) = 0 (its limit) for masked entries
    sums = torch.stack([e.sum(-1), shifted.mul_(e).masked_fill_(e == 0, 0.0).sum(-1)], -1)
    all_reduce(sums, SUM, tp_group)
    s, a = sums[..., 0], sums[..., 1]
    vocab = logits_shard.shape[-1] * group_rank_size(tp_group)[1]
    return torch.log(s) - a / s, 1.0 / s, vocab


def entropy_adaptive_temperature(entropy: torch.Tensor, vocab_size: int, base: float,
                                 alpha: float) -> torch.Tensor:
    """T = base * (1 + alpha * H / log V): base at a one-hot p, base * (1 + alpha) at the
    uniform one (H / log V lies in [0, 1])."""
    if vocab_size < 2:
        raise ValueError(f"the entropy-adaptive temperature needs V >= 2 entries, got {vocab_size}")
    return base * (1.0 + alpha * entropy / math.log(vocab_size))


def confidence_threshold_temperature(confidence: torch.Tensor, threshold: float,
                                     confident_temperature: float,
                                     uncertain_temperature: float) -> torch.Tensor:
    """T = confident_temperature where c >= threshold, else uncertain_temperature (a two-level
    per-token temperature; greedy-when-confident decoding is the limit confident_temperature
    -> 0, whose NLL is infinite on a wrong token, hence a finite value)."""
    return torch.where(confidence >= threshold, confident_temperature, uncertain_temperature
                       ).to(confidence.dtype)


class TokenTemperatures(NamedTuple):
    """Per-token temperatures of the two per-token tools, and which tokens were confident."""

    entropy: torch.Tensor  # the entropy-adaptive T [...]
    threshold: torch.Tensor  # the confidence threshold's T [...]
    confident: torch.Tensor  # bool [...]: c >= confidence_threshold


def token_temperatures(logits_shard: torch.Tensor, config: "EvalConfig",
                       tp_group=None) -> TokenTemperatures:
    """Both per-token tools' temperatures at ``config``'s settings (EvalConfig's fields) from
    one pass over the logits (:func:`softmax_entropy_and_confidence`)."""
    entropy, confidence, vocab = softmax_entropy_and_confidence(logits_shard, tp_group)
    return TokenTemperatures(
        entropy_adaptive_temperature(entropy, vocab, config.entropy_temperature_base,
                                     config.entropy_temperature_alpha),
        confidence_threshold_temperature(confidence, config.confidence_threshold,
                                         config.confident_temperature,
                                         config.uncertain_temperature),
        confidence >= config.confidence_threshold)


def mixture_log_prob(log_probs: torch.Tensor, dim: int) -> torch.Tensor:
    """log of the equal-weight mixture of K distributions along ``dim`` (of size K):
    log (1/K) sum_k p_k = logsumexp_k log p_k - log K."""
    return torch.logsumexp(log_probs, dim=dim) - math.log(log_probs.shape[dim])


def ensemble_nll_and_confidence(nll: torch.Tensor, confidence: torch.Tensor):
    """The ensemble's per-token NLL and confidence from its K members' [..., K]:
    NLL_ens = -logsumexp_k(-NLL_k) + log K, and max p_ens = mean_k max p_k, because every
    member softmax(z / T_k) has its maximum at argmax z (so correctness is unchanged too)."""
    return -mixture_log_prob(-nll, -1), confidence.mean(-1)


def ensemble_log_probs(scores: torch.Tensor, temperatures) -> torch.Tensor:
    """log p_ens over the last dim of the full ``scores`` [..., V] (generation; sample them at
    temperature 1), in the scores' dtype: logsumexp_k log_softmax(scores / T_k) - log K."""
    z = scores.to(compute_dtype(scores.dtype))
    members = torch.stack([torch.log_softmax(z / float(t), dim=-1) for t in temperatures])
    return mixture_log_prob(members, 0).to(scores.dtype)
