"""Vocab-parallel TempNet head: tau per token from the detached logits (tempnet.md 2 and 3).

Tensor parallelism (tempnet.md 3), for this rank's logits slice z [t, v/tp]:
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
from megatron_tempnet.tempnet.reference import NORM_EPS, compute_dtype

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
    """

    @staticmethod
    def forward(ctx, logits, w1, shift):
        dtype = compute_dtype(w1.dtype)
        t, v = logits.shape
        m = w1.shape[0]
        weight = w1.to(dtype)
        out = torch.empty(t, m + 1, dtype=dtype, device=logits.device)
        for rows in _row_chunks(t, v):
            z = _chunk(logits, rows, shift, dtype)
            out[rows, :m] = z @ weight.t()
            out[rows, m] = torch.linalg.vecdot(z, z, dim=-1)
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
        return None, grad_w1, None


def _row_chunks(t: int, v: int):
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    return [slice(i, min(i + step, t)) for i in range(0, t, step)]


def _chunk(logits, rows, shift, dtype):
    z = logits[rows].to(dtype)
    return z if shift is None else z - shift[rows].to(dtype).unsqueeze(-1)


def full_init_params(config: TempNetConfig, vocab_size: int, seed: int,
                     dtype: torch.dtype = torch.float32) -> dict:
    """TempNet's TP=1 initial parameters, drawn on the CPU from `seed` (tempnet.md 2).

    W1, b1 ~ U(+-1/sqrt(V)), W2, b2 ~ U(+-1/sqrt(M)) (torch.nn.Linear's default, as upstream),
    drawn in this order from one generator; pool_scale s = 0, pool_w w = 1, pool_c c = 0.
    TP ranks draw the full W1 and keep their columns, so every TP layout starts equal.
    """
    m = config.hidden_size
    gen = torch.Generator().manual_seed(int(seed))

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound

    params = {"w1": uniform((m, vocab_size), vocab_size), "b1": uniform((m,), vocab_size),
              "w2": uniform((m, m), m), "b2": uniform((m,), m),
              "pool_scale": torch.zeros(()), "pool_w": torch.ones(m), "pool_c": torch.zeros(())}
    return {k: v.to(dtype) for k, v in params.items()}


class TempNetHead(nn.Module):
    """TempNet on a vocab-parallel logits shard; ``forward(logits_shard, tp_group) -> tau``.

    Parameters (plain nn.Parameters, checkpoint names): w1 [M, V/tp] (TP-sharded along dim 1,
    marked like megatron-core's row-parallel weights), b1 [M], w2 [M, M], b2 [M], pool_scale [],
    pool_w [M], pool_c [] (replicated). ``vocab_size`` is the padded V present in the logits.
    Computation is in fp32 (fp64 with fp64 parameters); tau comes back in that dtype.
    """

    def __init__(self, config: TempNetConfig, vocab_size: int, tp_rank: int = 0,
                 tp_size: int = 1, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__()
        config.validate()
        if vocab_size % tp_size:
            raise ValueError(f"TempNetHead: vocab_size {vocab_size} (the padded vocabulary) is "
                             f"not divisible by the tensor-parallel size {tp_size}")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"TempNetHead: tp_rank {tp_rank} outside [0, {tp_size})")
        self.config = config
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        v_local = vocab_size // tp_size
        full = full_init_params(config, vocab_size, seed)
        full["w1"] = full["w1"][:, tp_rank * v_local:(tp_rank + 1) * v_local]
        for name in PARAM_NAMES:
            setattr(self, name, nn.Parameter(full[name].to(device=device, dtype=dtype).contiguous()))
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
        set_tensor_model_parallel_attributes(self.w1, is_parallel=True, dim=1, stride=1)

    def forward(self, logits_shard: torch.Tensor, tp_group=None) -> torch.Tensor:
        """tau [...] in [tau_min, tau_max] from logits_shard [..., v/tp] (detached here).

        tp_group: this rank's tensor-parallel group (None or size 1: no communication); its
        size must be the ``tp_size`` the head was built with.
        """
        rank, size = group_rank_size(tp_group)
        v_local = self.w1.shape[1]
        if size != self.tp_size or logits_shard.shape[-1] != v_local:
            raise ValueError(f"TempNetHead built for TP={self.tp_size} with a [..., {v_local}] "
                             f"logits shard got [..., {logits_shard.shape[-1]}] on a TP group of "
                             f"size {size}")
        cfg, dtype = self.config, compute_dtype(self.w1.dtype)
        lead = logits_shard.shape[:-1]
        z = logits_shard.detach().reshape(-1, v_local)  # [t, v/tp], own dtype, no grad to the LM

        row_max = None
        if cfg.input_convention == "max_shifted":  # 0. z - max z (tempnet.md 2.1)
            row_max = all_reduce(z.amax(dim=-1).to(dtype), MAX, tp_group)  # [t]
        # 1.+2a. W1 z and ||z||^2 in one packed all-reduce (tempnet.md 3), chunked in fp32
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
        tau = cfg.tau_min + (cfg.tau_max - cfg.tau_min) * torch.sigmoid(o)
        return tau.view(lead)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core dist-checkpointing view: w1 TP-sharded along dim 1, the rest replicated.

        Groups come from ``metadata['tp_group']`` and ``metadata['dp_cp_group']`` when both are
        given; otherwise megatron-core resolves its default groups.
        """
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        metadata = metadata or {}
        groups = {}
        if metadata.get("tp_group") is not None and metadata.get("dp_cp_group") is not None:
            groups = {"tp_group": metadata["tp_group"], "dp_cp_group": metadata["dp_cp_group"]}
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"w1": 1}, sharded_offsets,
                                                   **groups)

    def extra_repr(self) -> str:
        c = self.config
        return (f"V={self.vocab_size}, tp={self.tp_rank}/{self.tp_size}, M={c.hidden_size}, "
                f"tau=[{c.tau_min}, {c.tau_max}], input={c.input_convention}, "
                f"dropout={c.dropout}")
