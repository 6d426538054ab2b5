"""fused_linear DRO loss (tempnet/fused_linear.py) against the dense reference.

Dense oracle: logits = hidden @ W^T, tau = TempNet (tempnet_reference) or fixed, per-token loss
by dro_loss_per_token_reference, L = c * sum(loss * mask), all gradients by autograd in fp64.
Kernels run under Triton's interpreter without a GPU (tests/conftest.py). Chunks smaller than
the token count and vocabularies that are not multiples of the block size are exercised.
"""
import random

import pytest
import torch

from megatron_tempnet.tempnet import (TempNetConfig, TempNetHead, dro_loss_per_token_reference,
                                      tempnet_reference)
from megatron_tempnet.tempnet.fused_linear import default_chunk_tokens, fused_linear_dro_loss
from megatron_tempnet.tempnet.head import PARAM_NAMES

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def make_case(seed, tokens=11, hidden=16, vocab=203):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.7
    target = torch.randint(0, vocab, (tokens,), generator=g)
    mask = (torch.rand(tokens, generator=g) > 0.25).float()
    mask[0] = 1.0
    target = torch.where(mask > 0, target, torch.full_like(target, -100))
    return h, w, target, mask


def make_head(seed, vocab, perturb=True):
    cfg = TempNetConfig(hidden_size=8, dropout=0.0, tau_min=0.3, tau_max=3.0,
                        loss_mode="tempnet_dro")
    head = TempNetHead(cfg, vocab, seed=seed, dtype=torch.float64)
    if perturb:  # away from the init's pool_scale = 0 / pool_w = 1 symmetric point
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return head


def dense(h, w, target, mask, rho, objective, head=None, fixed_tau=None, scale=0.37):
    """fp64 oracle: (per-token loss, tau, grads of h, w and the head's parameters)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    logits = h @ w.t()
    params = {}
    if head is not None:
        params = {k: v.detach().clone().requires_grad_(True)
                  for k, v in zip(PARAM_NAMES, (getattr(head, n) for n in PARAM_NAMES))}
        tau = tempnet_reference(logits, params, head.config)
    else:
        tau = torch.full(target.shape, fixed_tau, dtype=torch.float64)
    loss, _, _ = dro_loss_per_token_reference(logits, target, tau, rho, objective)
    (scale * (loss * mask).sum()).backward()
    return loss.detach(), tau.detach(), h.grad, w.grad, {k: p.grad for k, p in params.items()}


def fused(h, w, target, mask, rho, objective, dtype, chunk, head=None, fixed_tau=None,
          scale=0.37, train_lm=True):
    h = h.detach().to(DEVICE, dtype).requires_grad_(train_lm)
    w = w.detach().to(DEVICE, dtype).requires_grad_(train_lm)
    if head is not None:
        head = make_head(0, w.shape[0]).to(DEVICE)
        head.load_state_dict(fused.head_state)
        head.float()
        params = list(head.parameters())

        def tau_fn(logits, rows):
            return head(logits)
    else:
        params = []

        def tau_fn(logits, rows):
            return torch.full((logits.shape[0],), fixed_tau, device=logits.device)
    loss, ce, tempered, tau = fused_linear_dro_loss(h, w, target.to(DEVICE), mask.to(DEVICE),
                                                    tau_fn, rho, None, objective, params, chunk)
    (scale * (loss * mask.to(DEVICE)).sum()).backward()
    grads = {n: p.grad for n, p in zip(PARAM_NAMES, params)}
    return loss.detach(), tau, h.grad, w.grad, grads, ce, tempered


def compare(ours, ref, dtype, where, train_lm=True):
    tol = TOL[dtype]
    torch.testing.assert_close(ours[0].cpu().double(), ref[0], **tol, msg=f"loss: {where}")
    torch.testing.assert_close(ours[1].cpu().double(), ref[1], **tol, msg=f"tau: {where}")
    if train_lm:
        torch.testing.assert_close(ours[2].cpu().double(), ref[2], **tol, msg=f"dh: {where}")
        torch.testing.assert_close(ours[3].cpu().double(), ref[3], **tol, msg=f"dW: {where}")
    for name, g in ref[4].items():
        torch.testing.assert_close(ours[4][name].cpu().double(), g, **tol,
                                   msg=f"d{name}: {where}")


@pytest.mark.parametrize("objective", ["dro", "tempered_ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_with_tempnet_matches_dense(seed, dtype, objective):
    h, w, target, mask = make_case(seed)
    if dtype == torch.bfloat16:  # the oracle sees the same rounded inputs
        h, w = h.bfloat16().double(), w.bfloat16().double()
    head = make_head(seed, w.shape[0])
    fused.head_state = head.state_dict()
    rho = 2.5
    ref = dense(h, w, target, mask, rho, objective, head=head)
    chunk = random.Random(seed).choice([1, 4, 11, 64])
    ours = fused(h, w, target, mask, rho, objective, dtype, chunk, head=head)
    compare(ours, ref, dtype, f"{dtype} {objective} chunk {chunk} seed {seed}")


def test_fused_linear_fixed_tau_and_reported_ce(seed):
    h, w, target, mask = make_case(seed, tokens=9, vocab=130)
    ref = dense(h, w, target, mask, 4.0, "dro", fixed_tau=1.7)
    ours = fused(h, w, target, mask, 4.0, "dro", torch.float32, 4, fixed_tau=1.7)
    compare(ours, ref, torch.float32, f"fixed tau, seed {seed}")
    logits = h @ w.t()
    _, ce, tempered = dro_loss_per_token_reference(logits, target, torch.full((9,), 1.7), 4.0)
    torch.testing.assert_close(ours[5].cpu().double(), ce, **TOL[torch.float32])
    torch.testing.assert_close(ours[6].cpu().double(), tempered, **TOL[torch.float32])


def test_fused_linear_frozen_lm_trains_only_tempnet(seed):
    h, w, target, mask = make_case(seed, tokens=7, vocab=50)
    head = make_head(seed, 50)
    fused.head_state = head.state_dict()
    ref = dense(h, w, target, mask, 2.0, "dro", head=head)
    ours = fused(h, w, target, mask, 2.0, "dro", torch.float32, 3, head=head, train_lm=False)
    assert ours[2] is None and ours[3] is None
    compare(ours, ref, torch.float32, f"frozen LM, seed {seed}", train_lm=False)


def test_upstream_gradient_must_follow_the_mask(seed):
    h, w, target, mask = make_case(seed, tokens=5, vocab=40)
    hh = h.float().to(DEVICE).requires_grad_(True)
    loss, *_ = fused_linear_dro_loss(hh, w.float().to(DEVICE), target.to(DEVICE),
                                     mask.to(DEVICE), lambda z, rows: torch.ones(z.shape[0]),
                                     1.0, chunk_tokens=2)
    with pytest.raises(RuntimeError, match="not proportional to the token weights"):
        (loss * torch.arange(5.0)).sum().backward()


def test_default_chunk_is_liger_rule():
    assert default_chunk_tokens(16384, 128256, 4096) == 512
    assert default_chunk_tokens(16384, 32000, 4096) == 2048
    assert default_chunk_tokens(10, 50, 64) == 16
