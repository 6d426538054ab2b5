"""The start-up every command shares (train, evaluate): the tokenizer, every configuration check
(``arguments.resolve``, before any process group or dataset), the process groups, and this
rank's model stage."""
from __future__ import annotations

from megatron_tempnet.arguments import RunConfig, resolve
from megatron_tempnet.data.tokenizers import load_tokenizer
from megatron_tempnet.models.gpt import scale_options
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.parallel import ParallelContext, initialize
from megatron_tempnet.parallel.runtime import detect_launch_env
from megatron_tempnet.training.optim import precision_dtype
from megatron_tempnet.training.reports import ReportSpec


def start(run: RunConfig):
    """(ParallelContext, tokenizer): the vocabulary size into ``run.model``, ``resolve``, then
    the process groups of ``run.parallel``."""
    par = run.parallel
    tokenizer = load_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model.vocab_size = tokenizer.vocab_size
    resolve(run, detect_launch_env().world_size)
    ctx = initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                     run.train.seed, virtual_pp=par.virtual_size)
    return ctx, tokenizer


def build_stage(run: RunConfig, ctx: ParallelContext) -> list:
    """This rank's model chunks for ``run``: its pipeline stage, or with the interleaved
    pipeline its ``--virtual-pipeline-model-parallel-size`` chunks (TempNet per its loss mode,
    training mode applied), in the run's precision, with the run's sequence parallelism and
    recomputation; TempNet's init drawn from the run's seed."""
    options = scale_options(run.parallel, run.train)
    vp = run.parallel.virtual_size
    return [build_tempnet_model(run.model, run.tempnet, ctx,
                                params_dtype=precision_dtype(run.train.precision),
                                seed=run.train.seed, options=options,
                                vp_stage=v if vp > 1 else None) for v in range(vp)]


def report_spec(run: RunConfig) -> ReportSpec:
    """The run's report spec: the loss channels of its model, the tau histogram over
    TempNetConfig's tau bounds in ``--tau-histogram-bins`` bins (training and evaluation)."""
    return ReportSpec.build(run.tempnet, loss_channels(run.tempnet), run.eval.tau_histogram_bins)
