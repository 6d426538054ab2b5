"""A DeepSpeed checkpoint -> a megatron-core (torch_dist) checkpoint of its model weights
(tools/convert_deepspeed_checkpoint.py; tools/convert_checkpoint_to_hf.py goes through it).

DeepSpeed saves one ``mp_rank_{tp:02d}_model_states.pt`` per tensor-parallel rank and does not
reshard. Here one process per saved tensor-parallel rank (PP = 1, as DeepSpeed trained: gloo on
the CPU, a free port) builds the model of the run record, loads its rank's module weights
(training/deepspeed.py DeepSpeedModelLoader: the checks of any load) and megatron-core's
``dist_checkpointing`` saves them: ``SAVE/iter_NNNNNNN/`` + ``latest_checkpointed_iteration.txt``,
with the iteration, consumed samples and run record of the DeepSpeed checkpoint and checksums.
That checkpoint loads at any TP/PP: ``--finetune``, evaluation, the Hugging Face export, or a
resume with ``--no-load-optim --no-load-rng`` (no optimizer state is converted: ZeRO's
partitions stay DeepSpeed's).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from megatron_tempnet.config import ConfigError

CONFIG_ERROR = re.compile(r"ConfigError: (.*)$")


def deepspeed_to_torch_dist(load: str, save: str, log=print) -> Path:
    """Convert the DeepSpeed checkpoint ``load`` names (a save dir or one iter_* dir) into the
    new checkpoint directory ``save``; returns the iteration directory written."""
    from megatron_tempnet.parallel.runtime import free_port
    from megatron_tempnet.training.checkpoint_layout import (check_new_save_dir, iteration_dir,
                                                             resolve_load_dir)
    from megatron_tempnet.training.deepspeed import read_client_state

    path = resolve_load_dir(load, None, "deepspeed")
    if path is None:
        raise ConfigError(f"--load {load}: no checkpoint there yet")
    check_new_save_dir(save)
    client = read_client_state(path)
    tp, pp = client["config"]["parallel"]["tp"], client["config"]["parallel"].get("pp", 1)
    if pp != 1:
        raise ConfigError(f"checkpoint {path} records PP={pp}: DeepSpeed checkpoints of this "
                          "project are PP=1 (is its run record damaged?)")
    args = (tp, free_port(), str(path), str(save))
    if tp == 1:
        _convert_rank(0, *args)
    else:
        import torch.multiprocessing as mp

        try:
            mp.spawn(_convert_rank, args=args, nprocs=tp, join=True)
        except mp.ProcessRaisedException as e:  # a child's one-line error, else the traceback
            found = CONFIG_ERROR.search(str(e).strip())
            raise ConfigError(found.group(1)) if found else e
    out = iteration_dir(save, client["iteration"])
    log(f"converted DeepSpeed checkpoint {path} (TP={tp}) -> {out} (megatron-core "
        "dist_checkpointing, model weights; loads at any TP/PP)")
    return out


def _convert_rank(rank: int, world: int, port: int, path: str, save: str) -> None:
    """One tensor-parallel rank: build, load this rank's DeepSpeed weights, save its shards."""
    if world > 1:  # spawned: the conversion runs on the CPU (gloo), whatever GPUs there are
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch.distributed as dist

    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.parallel import initialize, shutdown
    from megatron_tempnet.training import integrity
    from megatron_tempnet.training.checkpoint_config import CheckpointConfig
    from megatron_tempnet.training.checkpoint_layout import (CHECKPOINT_VERSION, iteration_dir,
                                                             write_latest)
    from megatron_tempnet.training.checkpointing import (WEIGHTS_ONLY, model_sharded_state_dict,
                                                         save_sharded)
    from megatron_tempnet.training.deepspeed import DeepSpeedModelLoader, read_client_state
    from megatron_tempnet.training.run_record import record_configs

    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ctx = initialize(world, 1, seed=0, environ=env)
    try:
        client = read_client_state(Path(path))
        record = client["config"]
        model_cfg, tempnet = record_configs(record)
        tempnet = dataclasses.replace(tempnet, training_mode="scratch")
        model = build_tempnet_model(model_cfg, tempnet, ctx)
        cfg = CheckpointConfig(load=path, no_load_optim=True, no_load_rng=True).validate()
        DeepSpeedModelLoader(cfg, [model], ctx, {**record, "parallel": {
            "tp": world, "pp": 1, "dp": 1}}, log=lambda line: None).load()
        out = iteration_dir(save, client["iteration"])
        if rank == 0:
            out.mkdir(parents=True)
        dist.barrier()
        state = model_sharded_state_dict([model])
        state.update(iteration=client["iteration"], consumed_samples=client["consumed_samples"],
                     checkpoint_version=CHECKPOINT_VERSION, config=record, lineage=None,
                     **{WEIGHTS_ONLY: f"converted from the DeepSpeed checkpoint {path}"})
        save_sharded(state, out)
        dist.barrier()
        integrity.write_manifest(out)
        if rank == 0:
            write_latest(save, client["iteration"])
        dist.barrier()
    finally:
        if world > 1:
            shutdown()
