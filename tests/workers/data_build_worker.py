"""torchrun worker: build the blended datasets on 2 gloo ranks (rank 0 writes the index caches,
rank 1 loads them after megatron-core's barrier) and return each rank's first micro-batch."""
import sys

import torch
import torch.distributed as dist

from megatron_tempnet.data.datasets import build_datasets, build_micro_batch_iterator
from megatron_tempnet.data.tokenizers import load_tokenizer
from torchrun import save_rank_result

if __name__ == "__main__":
    case = torch.load(sys.argv[1], weights_only=False)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = load_tokenizer(*case["tokenizer"])
    train, valid, _ = build_datasets(case["cfg"], tokenizer, case["seq_length"], case["seed"],
                                     *case["samples"])
    it = build_micro_batch_iterator(train, case["mbs"], case["gbs"], rank, world)
    save_rank_result({"rank": rank, "train": len(train), "valid": len(valid),
                      "tokens": next(it)["tokens"].tolist()})
    dist.destroy_process_group()
