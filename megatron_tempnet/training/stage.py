"""The start-up every command shares (train, evaluate): the tokenizer, every configuration check
(``arguments.resolve``, before any process group or dataset), the process groups, and this
rank's model stage."""
from __future__ import annotations

from megatron_tempnet.arguments import RunConfig, resolve
from megatron_tempnet.cli import process_rank
from megatron_tempnet.config import ConfigError
from megatron_tempnet.data.tokenizers import load_tokenizer
from megatron_tempnet.models.gpt import scale_options
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.parallel import ParallelContext, initialize
from megatron_tempnet.parallel.runtime import detect_launch_env
from megatron_tempnet.training.checkpoint_layout import load_format, resolve_load_dir
from megatron_tempnet.training.optim import precision_dtype
from megatron_tempnet.training.reports import ReportSpec
from megatron_tempnet.training.run_record import read_run_record, saved_padded_vocab


def start(run: RunConfig):
    """(ParallelContext, tokenizer): the vocabulary size into ``run.model``, ``resolve``, then
    the process groups of ``run.parallel``."""
    par = run.parallel
    tokenizer = load_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model.vocab_size = tokenizer.vocab_size
    keep_checkpoint_padding(run, par.tensor_model_parallel_size)
    resolve(run, detect_launch_env().world_size)
    ctx = initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                     run.train.seed, virtual_pp=par.virtual_size)
    return ctx, tokenizer


def keep_checkpoint_padding(run: RunConfig, tp: int) -> None:
    """A run that loads a checkpoint (resume, --finetune, evaluation) keeps the vocabulary
    padding it was saved with (the embedding, output layer and TempNet's W1 have that many
    rows), whatever this run's TP: Megatron pads to make_vocab_size_divisible_by x TP, so a TP=2
    checkpoint of a 3000-token vocabulary has 3072 rows and TP=1 would build 3008. The padding
    is kept by setting make_vocab_size_divisible_by to padded / TP (said on one line); a TP that
    does not divide the saved padding is a one-line error. Nothing is read (and nothing done)
    when --load names no checkpoint yet, one of another vocabulary (the shape check names that)
    or an unreadable one (the load's checksum check names the corrupt file)."""
    ck, m = run.checkpoint, run.model
    if not ck.load:
        return
    try:
        fmt = load_format(ck.load)  # a format the run cannot load: its Checkpointer says so
        path = resolve_load_dir(ck.load, ck.save, fmt)
        record = read_run_record(path, fmt) if path is not None else None
    except Exception:  # noqa: BLE001 -- the Checkpointer reports it with its own words
        return
    if record is None or record["model"].get("vocab_size") != m.vocab_size:
        return
    saved = saved_padded_vocab(record)
    if saved == m.padded_vocab_size(tp):
        return
    if saved % tp:
        raise ConfigError(f"--load {ck.load}: its model pads the vocabulary of {m.vocab_size} to "
                          f"{saved} rows (saved at TP={record['parallel']['tp']}), which "
                          f"--tensor-model-parallel-size {tp} does not divide: use a TP that "
                          f"divides {saved}")
    m.make_vocab_size_divisible_by = saved // tp
    if process_rank() == 0:
        print(f"note: the checkpoint's vocabulary padding ({saved} rows, saved at TP="
              f"{record['parallel']['tp']}) is kept at TP={tp}: --make-vocab-size-divisible-by "
              f"{saved // tp}", flush=True)


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
