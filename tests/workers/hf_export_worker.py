"""torchrun worker (2 processes): train tiny models through the entry point and save them.

  llama: tiny-llama (GQA) + TempNet at TP=2;  gpt: tiny-gpt (tied embeddings) + TempNet at PP=2.
Each run trains 3 iterations with --save, then measures on a fixed probe batch (forward only,
dropout off): plain CE (tau = 1) and tempered CE (TempNet's tau) — the numbers the exported
Hugging Face model must reproduce.
Usage: hf_export_worker.py <data prefix> <tokenizer model> <work dir>
"""
import sys
from pathlib import Path

import torch

from megatron_tempnet import train as entry
from megatron_tempnet.arguments import parse_args
from megatron_tempnet.training.step import forward_backward, reduce_reports
from torchrun import save_rank_result

PROBE_SEED, PROBE_SHAPE = 0, (2, 25)


def probe_batch():
    tokens = torch.randint(0, 400, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))
    b, s = tokens.shape[0], tokens.shape[1] - 1
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous()}


def probe(trainer) -> dict | None:
    batch = probe_batch()
    model = trainer.model_chunks[0].module
    model.eval()
    reports = forward_backward(trainer.model_chunks, iter([batch]), num_microbatches=1,
                               seq_length=batch["tokens"].shape[1],
                               micro_batch_size=batch["tokens"].shape[0], forward_only=True,
                               spec=trainer.spec)
    if not reports:
        return None
    return {k: (lambda v: (v[0] / v[1]).item())(reduce_reports(reports, k))
            for k in ("lm loss", "tempered ce")}


def main(data, tokenizer, work):
    results = {}
    for name, preset, tp, pp in [("llama", "tiny-llama", 2, 1), ("gpt", "tiny-gpt", 1, 2)]:
        argv = ["--model", preset, "--data-path", data, "--tokenizer-model", tokenizer,
                "--split", "99,1,0", "--seq-length", "32", "--micro-batch-size", "2",
                "--global-batch-size", "4", "--train-iters", "3", "--lr", "5e-3",
                "--log-interval", "3", "--tensor-model-parallel-size", str(tp),
                "--pipeline-model-parallel-size", str(pp), "--tempnet-loss-mode", "tempnet_dro",
                "--tempnet-rho", "4.0",
                "--tempnet-hidden-size", "16", "--tempnet-lr", "1e-2", "--eval-iters", "0",
                "--save", str(Path(work) / name)]
        trainer = entry.build(parse_args(argv))
        trainer.train()
        results[name] = probe(trainer)
    save_rank_result(results)


if __name__ == "__main__":
    main(*sys.argv[1:4])
