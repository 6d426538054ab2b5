"""Vocab-parallel TempNet head: tau per token from the detached logits (docs/tempnet_math.md 2).

Tensor parallelism (docs/parallel_design.md 2), for this rank's logits slice z [t, v/tp]:
  0. ("max_shifted" only) all-reduce(max) of the row maxima; z <- z - max z.
  1.+2a. W1 is split by vocabulary columns (this rank holds W1[:, slice], [M, v/tp]). Since
     W1 x = (W1 z) / ||z||, the partial product W1[:, slice] z and the partial squared norm
     sum(z^2) travel in ONE packed all-reduce(sum) of [t, M + 1]; b1 is added once, after it.
     The reduction's backward is the identity (each rank's partial term receives the gradient
     of the sum), so W1's shard gets exactly its columns of the TP=1 gradient.
  2b.-4. Everything after the reduction is replicated: identical inputs and parameters on all TP
     ranks give identical tau and identical gradients (they need only the data-parallel
     reduction). Collectives per forward: 1 ("raw") or 2 ("max_shifted"); none in backward.

Dropout uses the default torch generator of the device. Megatron seeds it identically on all
TP ranks (runtime.set_seed); the head must run OUTSIDE megatron's ``get_cuda_rng_tracker().fork()``
(whose stream is offset by TP rank), so that all TP ranks draw the same mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tempnet.tempnet.comm import MAX, all_reduce, group_rank_size, reduce_from_tp
from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.tempnet.reference import FEATURE_CLAMP, NORM_EPS, VAR_EPS, compute_dtype

PARAM_NAMES = ("w1", "b1", "w2", "b2", "pool_scale", "pool_w", "pool_c")
# Rows of the logits converted to the compute dtype at a time by ``_ProjectLogits``: about
# 2**26 elements (256 MiB in fp32) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 26


class _ProjectLogits(torch.autograd.Function):
    """[W1 z, ||z||^2] per row [t, M + 1] of the detached logits z [t, v/tp], in row chunks.

    The logits stay in their own dtype: each chunk is converted to the compute dtype (fp32, or
    fp64 for fp64 parameters), optionally shifted by ``shift`` [t], multiplied and dropped; the
    backward recomputes the chunk for dW1 = sum_chunks grad[:, :M]^T z_chunk. Nothing of size
    [t, v/tp] in fp32 is allocated or kept for the backward (the logits are saved, not copied).

    ``moments`` (the scale_aware design; ``shift`` is then the row max, so u = z - max z <= 0)
    appends the shard sums [sum u, sum e^u, sum e^u u, sum e^u u^2]: [t, M + 5] in all. They do
    not depend on W1 (no gradient).
    """

    @staticmethod
    def forward(ctx, logits, w1, shift, moments=False):
        dtype = compute_dtype(w1.dtype)
        t, v = logits.shape
        m = w1.shape[0]
        weight = w1.to(dtype)
        out = torch.empty(t, m + (5 if moments else 1), dtype=dtype, device=logits.device)
        for rows in _row_chunks(t, v):
            z = _chunk(logits, rows, shift, dtype)
            out[rows, :m] = z @ weight.t()
            out[rows, m] = torch.linalg.vecdot(z, z, dim=-1)
            if moments:
                e = torch.exp(z)
                out[rows, m + 1] = z.sum(-1)
                out[rows, m + 2] = e.sum(-1)
                e.mul_(z)
                out[rows, m + 3] = e.sum(-1)
                out[rows, m + 4] = torch.linalg.vecdot(e, z, dim=-1)
                del e
        ctx.save_for_backward(logits, w1, shift)
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, w1, shift = ctx.saved_tensors
        grad_w1 = None
        if ctx.needs_input_grad[1]:
            m = w1.shape[0]
            grad_w1 = torch.zeros(w1.shape, dtype=grad.dtype, device=grad.device)
            for rows in _row_chunks(*logits.shape):
                grad_w1.addmm_(grad[rows, :m].t(), _chunk(logits, rows, shift, grad.dtype))
            grad_w1 = grad_w1.to(w1.dtype)
        return None, grad_w1, None, None


def _row_chunks(t: int, v: int):
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    return [slice(i, min(i + step, t)) for i in range(0, t, step)]


def _chunk(logits, rows, shift, dtype):
    z = logits[rows].to(dtype)
    return z if shift is None else z - shift[rows].to(dtype).unsqueeze(-1)


def _uniform(gen, shape, bound):
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def full_init_params(config: TempNetConfig, vocab_size: int, seed: int,
                     dtype: torch.dtype = torch.float32) -> dict:
    """TempNet's TP=1 initial parameters, drawn on the CPU from `seed` (docs/tempnet_math.md 2.5).

    W1, b1 ~ U(+-1/sqrt(V)), W2, b2 ~ U(+-1/sqrt(M)) (torch.nn.Linear's default, as upstream),
    drawn in this order from one generator; pool_scale s = 0, pool_w w = 1, pool_c c = 0.
    TP ranks draw the full W1 and keep their columns, so every TP layout starts equal.
    (The "paper" design; ``scale_aware_init_params`` is the other one's.)
    """
    m = config.hidden_size
    gen = torch.Generator().manual_seed(int(seed))
    params = {"w1": _uniform(gen, (m, vocab_size), 1.0 / math.sqrt(vocab_size)),
              "b1": _uniform(gen, (m,), 1.0 / math.sqrt(vocab_size)),
              "w2": _uniform(gen, (m, m), 1.0 / math.sqrt(m)),
              "b2": _uniform(gen, (m,), 1.0 / math.sqrt(m)),
              "pool_scale": torch.zeros(()), "pool_w": torch.ones(m), "pool_c": torch.zeros(())}
    return {k: v.to(dtype) for k, v in params.items()}


class _VocabParallelHead(nn.Module):
    """What both designs share: parameters drawn at TP=1 and sliced by vocabulary columns (the
    one TP-sharded weight ``SHARDED``, [M, V/tp]; the rest replicated), the shape checks, the
    dist-checkpointing view. Subclasses set PARAM_NAMES, SHARDED, ``init_params`` and
    ``tau_from_shard``; ``forward(logits_shard, tp_group) -> tau``."""

    PARAM_NAMES: tuple = ()
    SHARDED = ""

    def __init__(self, config: TempNetConfig, vocab_size: int, tp_rank: int = 0,
                 tp_size: int = 1, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__()
        config.validate()
        name = type(self).__name__
        if vocab_size % tp_size:
            raise ValueError(f"{name}: vocab_size {vocab_size} (the padded vocabulary) is "
                             f"not divisible by the tensor-parallel size {tp_size}")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"{name}: tp_rank {tp_rank} outside [0, {tp_size})")
        self.config = config
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        v_local = vocab_size // tp_size
        full = self.init_params(config, vocab_size, seed)
        full[self.SHARDED] = full[self.SHARDED][:, tp_rank * v_local:(tp_rank + 1) * v_local]
        for pname in self.PARAM_NAMES:
            setattr(self, pname,
                    nn.Parameter(full[pname].to(device=device, dtype=dtype).contiguous()))
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
        set_tensor_model_parallel_attributes(getattr(self, self.SHARDED), is_parallel=True,
                                             dim=1, stride=1)

    @staticmethod
    def init_params(config: TempNetConfig, vocab_size: int, seed: int) -> dict:
        raise NotImplementedError

    def forward(self, logits_shard: torch.Tensor, tp_group=None) -> torch.Tensor:
        """tau [...] in [tau_min, tau_max] from logits_shard [..., v/tp] (detached here).

        tp_group: this rank's tensor-parallel group (None or size 1: no communication); its
        size must be the ``tp_size`` the head was built with.
        """
        _, size = group_rank_size(tp_group)
        v_local = getattr(self, self.SHARDED).shape[1]
        if size != self.tp_size or logits_shard.shape[-1] != v_local:
            raise ValueError(f"{type(self).__name__} built for TP={self.tp_size} with a "
                             f"[..., {v_local}] logits shard got "
                             f"[..., {logits_shard.shape[-1]}] on a TP group of size {size}")
        lead = logits_shard.shape[:-1]
        z = logits_shard.detach().reshape(-1, v_local)  # [t, v/tp], own dtype, no grad to the LM
        return self.tau_from_shard(z, tp_group).view(lead)

    def tau_from_shard(self, z: torch.Tensor, tp_group) -> torch.Tensor:
        raise NotImplementedError

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core dist-checkpointing view: ``SHARDED`` TP-sharded along dim 1, the rest
        replicated. Groups come from ``metadata['tp_group']`` and ``metadata['dp_cp_group']``
        when both are given; otherwise megatron-core resolves its default groups.
        """
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        metadata = metadata or {}
        groups = {}
        if metadata.get("tp_group") is not None and metadata.get("dp_cp_group") is not None:
            groups = {"tp_group": metadata["tp_group"], "dp_cp_group": metadata["dp_cp_group"]}
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {self.SHARDED: 1},
                                                   sharded_offsets, **groups)

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c.arch}, V={self.vocab_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"M={c.hidden_size}, tau=[{c.tau_min}, {c.tau_max}], "
                + (f"input={c.input_convention}, " if c.arch == "paper"
                   else f"tau0={c.initial_tau}, ")
                + f"dropout={c.dropout}")


class TempNetHead(_VocabParallelHead):
    """The paper's TempNet (``--tempnet-arch paper``) on a vocab-parallel logits shard.

    Parameters (plain nn.Parameters, checkpoint names): w1 [M, V/tp] (TP-sharded along dim 1,
    marked like megatron-core's row-parallel weights), b1 [M], w2 [M, M], b2 [M], pool_scale [],
    pool_w [M], pool_c [] (replicated). ``vocab_size`` is the padded V present in the logits.
    Computation is in fp32 (fp64 with fp64 parameters); tau comes back in that dtype.
    """

    PARAM_NAMES = PARAM_NAMES
    SHARDED = "w1"
    init_params = staticmethod(full_init_params)

    def tau_from_shard(self, z: torch.Tensor, tp_group) -> torch.Tensor:
        cfg, dtype = self.config, compute_dtype(self.w1.dtype)
        row_max = None
        if cfg.input_convention == "max_shifted":  # 0. z - max z (docs/tempnet_math.md 2.1)
            row_max = all_reduce(z.amax(dim=-1).to(dtype), MAX, tp_group)  # [t]
        # 1.+2a. W1 z, ||z||^2: one packed all-reduce (docs/parallel_design.md 2), chunked in fp32
        partial = _ProjectLogits.apply(z, self.w1, row_max)  # [t, M + 1]
        packed = reduce_from_tp(partial, tp_group)  # [t, M + 1]
        m = cfg.hidden_size
        norm = packed[:, m].sqrt().clamp_min(NORM_EPS)  # [t]  max(||z||, 1e-12)
        h = torch.sigmoid(packed[:, :m] / norm.unsqueeze(-1) + self.b1.to(dtype))  # [t, M]
        # 2b. replicated from here on; same dropout mask on all TP ranks (see module doc)
        h = F.dropout(h, p=cfg.dropout, training=self.training)
        h = h @ self.w2.to(dtype).t() + self.b2.to(dtype)  # [t, M]
        # 3. pooling: a = softmax(h / exp(s)); o = w . ((a - 1/M) * h) + c
        a = torch.softmax(h / self.pool_scale.to(dtype).exp(), dim=-1)
        o = ((a - 1.0 / m) * h) @ self.pool_w.to(dtype) + self.pool_c.to(dtype)  # [t]
        # 4. tau = tau_min + (tau_max - tau_min) * sigmoid(o)
        return cfg.tau_min + (cfg.tau_max - cfg.tau_min) * torch.sigmoid(o)


# --- the scale-aware design (--tempnet-arch scale_aware; docs/tempnet_design.md) -------------

SCALE_AWARE_PARAM_NAMES = ("w_dir", "w_feat", "b_hidden", "w_out", "w_out_feat", "b_out")
# The per-token features, from the logits row z (V entries) and p_1 = softmax(z):
SCALE_AWARE_FEATURES = ("log std_V(z)",  # the logits' scale over the vocabulary
                        "log std_p1(z)",  # the scale of z where the softmax puts its mass
                        "H(p_1) / log V",  # the shape: normalised entropy at tau = 1
                        "(max z - mean z) / (std_V(z) sqrt(2 log V))",  # peak height
                        "clamp((KL(p_1 || u) - rho) / Var_p1(z), +-4)")  # Newton step, log tau
# std of w_dir's entries: w_dir x of a unit vector x has this std per hidden unit at init
DIR_INIT_STD = 0.5


def scale_aware_init_params(config: TempNetConfig, vocab_size: int, seed: int,
                            dtype: torch.dtype = torch.float32) -> dict:
    """The scale_aware head's TP=1 initial parameters, drawn on the CPU from `seed`.

    w_dir [M, V] ~ U with std DIR_INIT_STD, w_feat [M, K] ~ U(+-1/sqrt(K)) (in this order, one
    generator); b_hidden, w_out [M], w_out_feat [K], b_out [] = 0. The zero output layer makes
    tau = tau0 for every token at init, with a nonzero gradient for w_out, w_out_feat, b_out.
    """
    m, k = config.hidden_size, len(SCALE_AWARE_FEATURES)
    gen = torch.Generator().manual_seed(int(seed))
    params = {"w_dir": _uniform(gen, (m, vocab_size), DIR_INIT_STD * math.sqrt(3.0)),
              "w_feat": _uniform(gen, (m, k), 1.0 / math.sqrt(k)),
              "b_hidden": torch.zeros(m), "w_out": torch.zeros(m),
              "w_out_feat": torch.zeros(k), "b_out": torch.zeros(())}
    return {key: v.to(dtype) for key, v in params.items()}


def log_tau_offset(config: TempNetConfig, tau: float | None = None) -> float:
    """o with log tau = log tau_min + (log tau_max - log tau_min) * sigmoid(o); tau None: the
    initial tau (``config.initial_tau``), i.e. o0."""
    lo, hi = math.log(config.tau_min), math.log(config.tau_max)
    frac = (math.log(config.initial_tau if tau is None else tau) - lo) / (hi - lo)
    return math.log(frac / (1.0 - frac))


@torch.no_grad()
def start_at_tau(head: "ScaleAwareTempNetHead", tau: float) -> float:
    """Move a scale_aware head still at its init (zero output layer: tau = tau0 everywhere) to
    tau for every token, through b_out (the config is not changed); tau is clamped 1e-3
    (relative, in log space) inside the bounds. Returns the tau set."""
    cfg = head.config
    if head.w_out.count_nonzero() or head.w_out_feat.count_nonzero():
        raise ValueError("start_at_tau: the head's output layer is no longer at its init")
    lo, hi = math.log(cfg.tau_min), math.log(cfg.tau_max)
    margin = 1e-3 * (hi - lo)
    tau = math.exp(min(max(math.log(tau), lo + margin), hi - margin))
    head.b_out.fill_(log_tau_offset(cfg, tau) - log_tau_offset(cfg))
    return tau


def tau_from_log_space(o: torch.Tensor, config: TempNetConfig) -> torch.Tensor:
    """tau = exp(log tau_min + (log tau_max - log tau_min) * sigmoid(o + o0)): in the bounds,
    tau0 at o = 0, and the same relative step up or down (the scale_aware output map)."""
    lo, hi = math.log(config.tau_min), math.log(config.tau_max)
    return torch.exp(lo + (hi - lo) * torch.sigmoid(o + log_tau_offset(config)))


def scale_aware_features(sq_norm, sum_u, s, a, b, vocab: int, rho: float) -> torch.Tensor:
    """The features [t, K] (``SCALE_AWARE_FEATURES``) from the TP-reduced row sums, each [t], of
    u = z - max z: sum u^2, sum u, S = sum e^u, A = sum e^u u, B = sum e^u u^2."""
    log_v = math.log(vocab)
    mean_u = sum_u / vocab
    var_v = (sq_norm / vocab - mean_u * mean_u).clamp_min(VAR_EPS)
    entropy = torch.log(s) - a / s  # H(p_1)
    mean_p = a / s
    var_p = (b / s - mean_p * mean_p).clamp_min(VAR_EPS)
    newton = ((log_v - entropy - rho) / var_p).clamp(-FEATURE_CLAMP, FEATURE_CLAMP)
    return torch.stack([0.5 * torch.log(var_v), 0.5 * torch.log(var_p), entropy / log_v,
                        -mean_u / (var_v.sqrt() * math.sqrt(2.0 * log_v)), newton], dim=-1)


class ScaleAwareTempNetHead(_VocabParallelHead):
    """``--tempnet-arch scale_aware``: a TempNet whose input carries the logits' scale and shape
    and whose tau starts at ``config.tau0`` for every token, with no floor.

    Per token, from the logits row z and u = z - max z (docs/tempnet_design.md says why):
      f = SCALE_AWARE_FEATURES(z)                                                [K]
      x = (z - mean z) / ||z - mean z||   (the direction, centred: shift-invariant)  [V]
      h = tanh(w_dir x + w_feat f + b_hidden);  dropout (default 0)               [M]
      o = w_out . h + w_out_feat . f + b_out                                      []
      tau = exp(log tau_min + (log tau_max - log tau_min) * sigmoid(o + o0)),  tau(o = 0) = tau0
    (``config.initial_tau``; :func:`start_at_tau` moves an untrained head to another start)

    Vocab-parallel: all-reduce(max) of the row maxima [t], then ONE packed all-reduce(sum) of
    [w_dir u, sum u^2, sum u, S, A, B] [t, M + 5] with the row sums of this rank's w_dir columns
    appended as one more row (w_dir x = (w_dir u - mean(u) w_dir 1) / ||u - mean u||): the same
    two collectives as the paper's "max_shifted" convention, none in backward. Everything after
    the reduction is replicated, so TP ranks agree bitwise. Parameters: w_dir [M, V/tp]
    (TP-sharded along dim 1), w_feat [M, K], b_hidden [M], w_out [M], w_out_feat [K], b_out [].
    """

    PARAM_NAMES = SCALE_AWARE_PARAM_NAMES
    SHARDED = "w_dir"
    init_params = staticmethod(scale_aware_init_params)

    def tau_from_shard(self, z: torch.Tensor, tp_group) -> torch.Tensor:
        cfg, dtype = self.config, compute_dtype(self.w_dir.dtype)
        _, size = group_rank_size(tp_group)
        m, vocab = cfg.hidden_size, z.shape[-1] * size
        row_max = all_reduce(z.amax(dim=-1).to(dtype), MAX, tp_group)  # [t]
        partial = _ProjectLogits.apply(z, self.w_dir, row_max, True)  # [t, M + 5]
        col_sums = F.pad(self.w_dir.to(dtype).sum(-1), (0, 5)).unsqueeze(0)  # [1, M + 5]
        packed = reduce_from_tp(torch.cat([partial, col_sums]), tp_group)  # [t + 1, M + 5]
        rows, w_dir_sum = packed[:-1], packed[-1, :m]
        sq_norm, sum_u, s, a, b = rows[:, m:].unbind(-1)
        feats = scale_aware_features(sq_norm, sum_u, s, a, b, vocab, cfg.rho)  # [t, K]
        mean_u = (sum_u / vocab).unsqueeze(-1)
        centred_norm = (sq_norm - vocab * mean_u.squeeze(-1) ** 2).clamp_min(
            vocab * VAR_EPS).sqrt().unsqueeze(-1)
        direction = (rows[:, :m] - mean_u * w_dir_sum) / centred_norm  # [t, M]  w_dir x
        h = torch.tanh(direction + feats @ self.w_feat.to(dtype).t() + self.b_hidden.to(dtype))
        h = F.dropout(h, p=cfg.dropout, training=self.training)  # same mask on all TP ranks
        o = h @ self.w_out.to(dtype) + feats @ self.w_out_feat.to(dtype) + self.b_out.to(dtype)
        return tau_from_log_space(o, cfg)


HEADS = {"paper": TempNetHead, "scale_aware": ScaleAwareTempNetHead}


def build_tempnet_head(config: TempNetConfig, vocab_size: int, **kwargs) -> _VocabParallelHead:
    """The head of ``config.arch`` (``HEADS``); kwargs: tp_rank, tp_size, seed, device, dtype."""
    config.validate()
    return HEADS[config.arch](config, vocab_size, **kwargs)
