"""TempNet (per-token temperature) and the KL-DRO loss, vocab-parallel (docs/tempnet_math.md)."""
from megatron_tempnet.tempnet.comm import all_reduce, group_rank_size, reduce_from_tp
from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.tempnet.exact_tau import solve_tau
from megatron_tempnet.tempnet.head import (PARAM_NAMES, SCALE_AWARE_PARAM_NAMES,
                                           ScaleAwareTempNetHead, TempNetHead, build_tempnet_head,
                                           full_init_params)
from megatron_tempnet.tempnet.loss import dro_loss, dro_loss_per_token
from megatron_tempnet.tempnet.reference import (dro_loss_per_token_reference, dro_loss_reference,
                                                reduce_token_losses, scale_aware_reference,
                                                tempnet_reference)

__all__ = ["PARAM_NAMES", "SCALE_AWARE_PARAM_NAMES", "ScaleAwareTempNetHead", "TempNetConfig",
           "TempNetHead", "all_reduce", "build_tempnet_head", "dro_loss", "scale_aware_reference",
           "dro_loss_per_token", "dro_loss_per_token_reference", "dro_loss_reference",
           "full_init_params", "group_rank_size", "reduce_from_tp", "reduce_token_losses",
           "solve_tau", "tempnet_reference"]
