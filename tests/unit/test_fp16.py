"""fp16 training on the CPU (``--precision fp16``): megatron-core's fp16 optimizer with its
dynamic loss scaler, through the train loop (training/loop.py, training/optim.py).

torch's CPU kernels (2.13) cover every fp16 op of the model (matmuls, SDPA, RMSNorm), so
nothing here needs a GPU:
- the loss is scaled before backward and the gradients unscaled after it: the first update's
  grad norm, lr and weights match fp32's on the same batch;
- a tiny LLaMA + TempNet trains: the scaler backs off from 2^16 until the scaled gradients fit
  in fp16 (those steps are skipped: weights and lr schedule unchanged, no NaN stop), then the
  losses fall; the loss scale and the skipped steps are logged;
- an overflow injected later (non-finite gradients, finite loss) skips that step and halves the
  scale; the NaN guard (RunControl, exit code 5) does not fire.
"""
import itertools
import math

import torch

from megatron_tempnet.config import TrainConfig, load_model_preset
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.reports import ReportSpec
from megatron_tempnet.training.step import train_step
from megatron_tempnet.training.optim import build_optimizer, build_scheduler, precision_dtype
from test_tempnet_model_training import VOCAB, noisy_cycle_batches, train


def setup(ctx, tcfg, tr):
    torch.manual_seed(0)
    model = build_tempnet_model(load_model_preset("tiny-llama", vocab_size=VOCAB), tcfg, ctx,
                                params_dtype=precision_dtype(tr.precision), seed=5)
    chunks = [wrap_ddp(model, use_distributed_optimizer=False)]
    optimizer = build_optimizer(chunks, tr, use_distributed_optimizer=False, tempnet_cfg=tcfg)
    return model, chunks, optimizer, build_scheduler(optimizer, tr)


def weights(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_first_update_matches_fp32(single_process):
    # no dropout: the fp16 run's skipped steps draw no masks the fp32 run does not
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, lr=1e-3, dropout=0.0)
    batch = next(noisy_cycle_batches(4, 16, seed=2))
    outs = {}
    for precision in ("fp32", "fp16"):
        tr = TrainConfig(micro_batch_size=4, global_batch_size=4, seq_length=16, train_iters=30,
                         lr=1e-3, lr_warmup_iters=2, precision=precision)
        model, chunks, optimizer, scheduler = setup(single_process, tcfg, tr)
        assert chunks[0].config.fp16 == (precision == "fp16")
        start, steps = weights(model), []
        while not (steps and steps[-1].update_ok):  # fp16: skipped until the scale fits
            steps.append(train_step(chunks, optimizer, scheduler, itertools.repeat(batch), tr, 1,
                                    ReportSpec(loss_channels(tcfg))))
            assert len(steps) <= 20, [(s.update_ok, s.loss_scale) for s in steps]
            if not steps[-1].update_ok:
                assert steps[-1].grad_norm is None and same(weights(model), start)
        # the gradients the optimizer stepped with (its fp32 main parameters': unscaled)
        grads = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
        outs[precision] = steps, grads
    (fp32_steps, fp32_grads), (fp16_steps, fp16_grads) = outs["fp32"], outs["fp16"]
    assert len(fp32_steps) == 1 and fp32_steps[0].loss_scale is None
    skipped = [s.loss_scale.item() for s in fp16_steps[:-1]]
    assert skipped[0] == 2.0**16  # the scale after each step; hysteresis 2: the first
    # overflow keeps it, each further one halves it
    assert all(b == a / 2 for a, b in zip(skipped, skipped[1:]))
    first = fp16_steps[-1]
    assert first.loss_scale.item() == skipped[-1] and first.lr == fp32_steps[0].lr
    # scaled before backward and unscaled after it (else off by the scale, or overflowing)
    assert math.isclose(first.grad_norm, fp32_steps[0].grad_norm, rel_tol=1e-2), \
        (first.grad_norm, fp32_steps[0].grad_norm)
    assert len(fp16_grads) == len(fp32_grads) > 30
    for i, (g16, g32) in enumerate(zip(fp16_grads, fp32_grads)):
        assert float((g16 - g32).norm() / g32.norm()) < 1e-2, i  # ~1e-3: fp16 rounding


def test_fp16_trains_and_skips_overflows_without_stopping(single_process):
    log_v = math.log(VOCAB)
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, lr=1e-3, rho=log_v - 2.83)
    tr = TrainConfig(micro_batch_size=4, global_batch_size=4, seq_length=32, train_iters=30,
                     lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, log_interval=1, precision="fp16")
    model, chunks, optimizer, scheduler = setup(single_process, tcfg, tr)
    inject = {24, 25}  # iterations whose gradients overflow (the loss stays finite)
    iteration = [0]

    def overflow(module, args, output):
        if iteration[0] + 1 in inject and output.requires_grad:
            output.register_hook(lambda grad: grad * math.inf)

    hook = model.embedding.register_forward_hook(overflow)
    steps, snapshots, lines = [], {}, []

    def record(state, out):
        iteration[0] = state.iteration
        steps.append(out)
        if state.iteration in {23, 25}:
            snapshots[state.iteration] = weights(model)

    try:
        state = train(chunks, optimizer, scheduler, noisy_cycle_batches(4, 32, seed=1), tr,
                      single_process, tcfg, histogram=True, log=lines.append,
                      callbacks=[record])
    finally:
        hook.remove()
    assert state.exit_code == 0 and state.iteration == 30 and len(state.metrics) == 30
    ok = [s.update_ok for s in steps]  # steps[i]: iteration i + 1
    settled = ok.index(True)  # the scaler's back-off from 2^16: a prefix of skipped steps
    assert 2 <= settled <= 16 and all(ok[settled:23]) and ok[23:25] == [False, False]
    assert all(ok[25:]), ok
    assert same(snapshots[25], snapshots[23])  # skipped: weights untouched
    assert steps[23].lr == steps[24].lr == steps[22].lr  # the lr schedule waits
    scale = [m["loss scale"] for _, m in state.metrics]
    # hysteresis spent in the back-off: each injected overflow halves the scale at once
    assert scale[settled] < 2.0**16 and scale[24] == scale[22] / 4 == scale[-1]
    assert [m["skipped iterations"] for _, m in state.metrics] == [int(not o) for o in ok]
    assert "loss scale" in lines[-1] and "skipped (loss scale)" in lines[24]
    for _, m in state.metrics:
        assert all(math.isfinite(v) for k, v in m.items() if k != "tau histogram"), m
    first, last = state.metrics[settled][1], state.metrics[-1][1]
    assert last["dro loss"] < first["dro loss"] - 0.5, (first, last)  # ~8.0 -> ~6.8
    assert last["lm loss"] < first["lm loss"] - 0.5, (first, last)  # ~5.5 -> ~4.8
