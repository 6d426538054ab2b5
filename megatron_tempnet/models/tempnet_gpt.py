"""GPT/LLaMA with TempNet and the DRO loss: a megatron-core ``GPTModel`` subclass.

Math: docs/tempnet_math.md sections 1-3; placement and parallelism: docs/parallel_design.md.

The one seam overridden is ``compute_language_model_loss(labels, logits)``, which megatron-core's
``GPTModel._postprocess`` calls on the last pipeline stage with this rank's vocab-parallel
logits shard [s, b, v/tp]. Everything before it (embedding, decoder, PP, output layer) is
megatron-core's own code. On the last stage, per token:

    1. tau (:meth:`TempNetGPTModel.token_tau`) = TempNet(stopgrad(logits)) (loss_modes
       "tempnet_dro" and "tempnet_ce"; the head runs here, outside megatron's RNG-tracker fork,
       so its dropout draws the same mask on all TP ranks), tau* = exact_tau.solve_tau(logits)
       (loss_mode "dro_exact": the minimiser of the DRO loss, detached) or tau = fixed_tau
       (loss_mode "dro_fixed_tau")
    2. (loss, ce, tempered_ce) = vocab-parallel DRO loss (logits, labels, tau, rho, tp_group),
       objective "tempered_ce" (loss = CE(z / tau, y)) for "tempnet_ce", "dro" otherwise
    3. return [b, s, K] with the channels of ``LOSS_CHANNELS``: channel 0 is the differentiable
       loss, the others are detached per-token values for reporting (plain CE at tau = 1,
       tempered CE, tau). ``training.step.masked_sum_loss`` reduces them with the loss mask.

``--dro-loss-impl`` (TempNetConfig.dro_loss_impl) picks the implementation of step 2 (tempnet/loss.py:
reference torch ops, or the fused Triton kernels). With "fused_linear" the second seam,
``_postprocess``, takes over on the training path (labels given): the output projection, steps
1-2 and the gradients run in token chunks (tempnet/fused_linear.py), so the [s, b, v/tp] logits
never exist whole; evaluation and generation (no labels) keep megatron-core's path.

loss_mode "ce" is the plain megatron-core ``GPTModel`` (its forward returns CE [b, s], which the
same loss function reads as a one-channel output): :func:`build_tempnet_model` returns one.

Training modes (docs/tempnet_math.md 2.6) are applied from outside by :func:`apply_training_mode`:
"frozen_lm" sets ``requires_grad=False`` on every LM parameter, so megatron-core DDP gives them no
gradient buffer and the optimizer no state; the frozen LM still runs forward (with no autograd
graph when nothing upstream trains: the DRO loss then keeps no [tokens, V/tp] probabilities).
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_tempnet.config import ConfigError, ModelConfig
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.tempnet import (TempNetConfig, build_tempnet_head, dro_loss_per_token,
                                      solve_tau)
from megatron_tempnet.tempnet.comm import group_rank_size
from megatron_tempnet.tempnet.fused_linear import fused_linear_dro_loss
from megatron_tempnet.tempnet.loss import resolve_impl

# The per-token channels a TempNet/DRO model returns with labels: [b, s, len(LOSS_CHANNELS)].
LOSS_CHANNELS = ("loss", "ce", "tempered_ce", "tau")
# Marks TempNet's parameters; the optimizer puts them in their own group (training/optim.py).
TEMPNET_PARAM_ATTR = "is_tempnet_parameter"
# loss_mode -> the objective of ``dro_loss_per_token`` (tempnet/loss.py row_results)
OBJECTIVES = {"dro_fixed_tau": "dro", "tempnet_dro": "dro", "dro_exact": "dro",
              "tempnet_ce": "tempered_ce"}


class TempNetGPTModel(GPTModel):
    """``GPTModel`` whose loss is the DRO loss (or the tempered CE) with TempNet's, the exact
    or a fixed tau per token.

    Extra constructor arguments: ``tempnet_config`` (a loss_mode of ``OBJECTIVES``, i.e. any but
    "ce") and ``tempnet_seed`` (TempNet's initial weights are drawn from it, the same full W1 on
    every TP rank, each keeping its columns). The head, ``self.tempnet``, exists on the last
    pipeline stage only and only with a loss mode of ``TEMPNET_LOSS_MODES`` ("tempnet_dro",
    "tempnet_ce"); its W1 is sharded by vocabulary columns like the output layer
    (``models.sharding.tp_split_dim``), and megatron-core's ``sharded_state_dict`` recursion
    reaches the head's ``sharded_state_dict`` (``--tempnet-arch``: tempnet/head.py HEADS), so
    checkpoints hold it. "dro_exact" and "dro_fixed_tau" have no parameter beyond the LM's.
    """

    loss_channels = LOSS_CHANNELS  # what forward returns with labels: [b, s, len(...)]

    def __init__(self, *args, tempnet_config: TempNetConfig, tempnet_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tempnet_config = tempnet_config.validate()
        if tempnet_config.loss_mode not in OBJECTIVES:
            raise ConfigError(f"TempNetGPTModel needs --tempnet-loss-mode one of "
                              f"{tuple(OBJECTIVES)}, got {tempnet_config.loss_mode!r} (for 'ce' "
                              "build the plain GPTModel: build_tempnet_model does)")
        self.tempnet = None
        if self.post_process and tempnet_config.uses_tempnet:
            tp_rank, tp_size = group_rank_size(self.tp_group)
            self.tempnet = build_tempnet_head(tempnet_config, self.vocab_size, tp_rank=tp_rank,
                                              tp_size=tp_size, seed=tempnet_seed,
                                              dtype=self.config.params_dtype)
            for param in self.tempnet.parameters():
                setattr(param, TEMPNET_PARAM_ATTR, True)

    def token_tau(self, logits_shard: torch.Tensor) -> torch.Tensor:
        """The model's own tau [...] from this rank's logits shard [..., v/tp] (last stage):
        TempNet's (differentiable in its parameters; dropout in training mode), the exact tau*
        of "dro_exact" (detached) or the constant of "dro_fixed_tau". Identical on all TP ranks;
        training (step 1 of the module docstring) and evaluation both call it."""
        cfg = self.tempnet_config
        if self.tempnet is not None:  # docs/tempnet_math.md 2
            return self.tempnet(logits_shard, self.tp_group)
        if cfg.loss_mode == "dro_exact":
            return solve_tau(logits_shard, cfg.rho, cfg.tau_min, cfg.tau_max, self.tp_group)
        return torch.full(logits_shard.shape[:-1], cfg.fixed_tau, dtype=torch.float32,
                          device=logits_shard.device)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """Per-token loss and report channels [b, s, K] from labels [b, s] and the logits
        shard [s, b, v/tp] (see the module docstring for the steps)."""
        cfg = self.tempnet_config
        target = labels.transpose(0, 1)  # [s, b]
        tau = self.token_tau(logits)  # 1. tau [s, b] from the detached logits
        # 2. vocab-parallel DRO loss or tempered CE (docs/parallel_design.md 3), each [s, b]
        loss, ce, tempered_ce = dro_loss_per_token(logits, target, tau, cfg.rho, self.tp_group,
                                                   objective=OBJECTIVES[cfg.loss_mode],
                                                   impl=cfg.dro_loss_impl)
        # 3. [s, b, K] -> [b, s, K]; only channel 0 carries gradient
        out = torch.stack([loss, ce, tempered_ce, tau.detach().to(loss.dtype)], dim=-1)
        return out.transpose(0, 1).contiguous()

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron-core's ``_postprocess``, except on the training path with
        ``--dro-loss-impl fused_linear``: then :meth:`fused_linear_loss`."""
        if (labels is None or not self.post_process or kwargs.get("mtp_in_postprocess")
                or kwargs.get("inference_context") is not None
                or resolve_impl(self.tempnet_config.dro_loss_impl,
                                hidden_states.device) != "fused_linear"):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                        **kwargs)
        return self.fused_linear_loss(hidden_states, labels, kwargs.get("loss_mask"))

    def fused_linear_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                          loss_mask: torch.Tensor | None) -> torch.Tensor:
        """Steps 1-3 with the output projection fused: [b, s, K] from the final hidden states
        [s, b, H], labels [b, s] and the loss mask [b, s] (the weights of the gradients formed in
        the forward; ``training.step.forward_step`` passes it, None means all ones)."""
        cfg = self.tempnet_config
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region)

        if self.output_layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        else:  # forward identity, backward all-reduce of each rank's partial d hidden
            hidden = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        s, b, h = hidden.shape
        target = labels.transpose(0, 1).reshape(-1)  # [s * b], the hidden states' row order
        mask = (torch.ones(s * b, device=hidden.device) if loss_mask is None
                else loss_mask.transpose(0, 1).reshape(-1))
        params = list(self.tempnet.parameters()) if self.tempnet is not None else []
        loss, ce, tempered_ce, tau = fused_linear_dro_loss(
            hidden.reshape(s * b, h), weight, target, mask, lambda z, _rows: self.token_tau(z),
            cfg.rho, self.tp_group, OBJECTIVES[cfg.loss_mode], tau_params=params)
        out = torch.stack([loss, ce, tempered_ce, tau], dim=-1).view(s, b, len(LOSS_CHANNELS))
        return out.transpose(0, 1).contiguous()


def apply_training_mode(model: torch.nn.Module, tempnet_cfg: TempNetConfig) -> torch.nn.Module:
    """Set requires_grad for the training mode (before DDP wrapping and the optimizer).

    scratch / finetune: everything trains (finetune differs in the weights loaded, not here).
    frozen_lm: only TempNet's parameters train; stages without TempNet (PP > 1) train nothing.
    """
    frozen = tempnet_cfg.training_mode == "frozen_lm"
    for param in model.parameters():
        param.requires_grad_(not frozen or getattr(param, TEMPNET_PARAM_ATTR, False))
    return model


def loss_channels(tempnet_cfg: TempNetConfig) -> tuple[str, ...]:
    """The named per-token channels of the model :func:`build_tempnet_model` builds for
    ``tempnet_cfg`` (training/reports.py ReportSpec): () for "ce" (the plain GPTModel returns the
    CE [b, s]), else :attr:`TempNetGPTModel.loss_channels`."""
    return () if tempnet_cfg.loss_mode == "ce" else TempNetGPTModel.loss_channels


def build_tempnet_model(model_cfg: ModelConfig, tempnet_cfg: TempNetConfig,
                        parallel: ParallelContext, *, params_dtype: torch.dtype = torch.float32,
                        seed: int = 0, use_transformer_engine=None,
                        options: dict | None = None, vp_stage: int | None = None):
    """This rank's stage for ``tempnet_cfg.loss_mode``, with its training mode applied.

    "ce": megatron-core's plain GPTModel (vocab-parallel CE); every other mode:
    :class:`TempNetGPTModel` (TempNet's initial weights drawn from ``seed``). ``options`` and
    ``vp_stage``: see ``models.gpt.build_model``.
    """
    tempnet_cfg.validate()
    if parallel.pp_size > 1 and tempnet_cfg.training_mode == "frozen_lm":
        # earlier stages would hold no trainable parameter and receive no gradient to send back
        raise ConfigError("--tempnet-training-mode frozen_lm needs "
                          "--pipeline-model-parallel-size 1 (only the last stage has TempNet); "
                          "use tensor or data parallelism instead")
    common = dict(params_dtype=params_dtype, use_transformer_engine=use_transformer_engine,
                  options=options, vp_stage=vp_stage)
    if tempnet_cfg.loss_mode == "ce":
        model = build_model(model_cfg, parallel, **common)
    else:
        model = build_model(model_cfg, parallel, model_cls=TempNetGPTModel,
                            tempnet_config=tempnet_cfg, tempnet_seed=seed, **common)
    return apply_training_mode(model, tempnet_cfg)
