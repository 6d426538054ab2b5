"""Synthetic batches shared by tests and their torchrun workers (the usual Megatron GPT batch:
tokens, labels, loss_mask, position_ids, each [b, s])."""
import torch


def random_batches(vocab: int, n: int, b: int, s: int, seed: int) -> list[dict]:
    """n batches of random tokens; labels are the tokens shifted left; ~20% of tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (b, s), generator=gen)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                    "loss_mask": (torch.rand(b, s, generator=gen) > 0.2).float(),
                    "position_ids": torch.arange(s).expand(b, s).contiguous()})
    return out


def rank_micro_batches(batch: dict, ctx) -> list[dict]:
    """This data-parallel rank's rows of a global batch, as micro-batches of one sequence."""
    per_rank = batch["tokens"].shape[0] // ctx.dp_size
    rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    return [{k: v[rows][i:i + 1] for k, v in batch.items()} for i in range(per_rank)]
