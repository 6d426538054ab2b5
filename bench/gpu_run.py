"""The one-command GPU run (issue 19): every GPU number of this project from one command on one
CUDA GPU in under 9 minutes, written to OUTDIR/gpu_run.json and OUTDIR/gpu_run.md.

    python3 bench/gpu_run.py OUTDIR             # one CUDA GPU (a lent H100/H200), <= ~8.5 min
    python3 bench/gpu_run.py --smoke OUTDIR     # the same parts at tiny sizes on the CPU (CI)
    python3 bench/gpu_run.py OUTDIR --parts b c # a rerun of some parts only

Parts, run in this order, each in its own process with its own time cap (a part that fails, runs
over its cap or is killed is recorded with its error text and the rest still runs; the JSON and
the Markdown are rewritten when a part starts, after every part and on SIGTERM):

  a   the kernel tests compiled for the GPU: pytest tests/unit/test_dro_kernels.py
      tests/unit/test_dro_fused_linear.py with TRITON_INTERPRET unset (pass/fail counts and the
      failures); --smoke: a few of them under Triton's interpreter
  b   the DRO loss step, forward + backward, bf16 hidden [16384, 4096], V = 32000 and 128256,
      TempNet tau per token: reference / fused / fused_linear next to dense fp32 CE, Liger's
      fused linear CE and Cut Cross-Entropy in the same process (bench/bench_dro_loss.measure),
      with time and extra-peak-memory ratios against Liger and against dense CE; first the two
      machine ceilings (bf16 GEMM 8192^3, device-to-device copy)
  c   the training step (forward + backward + optimizer) of llama-1b (24 layers, hidden 2048,
      16 heads, FFN 5632, V 32000), seq 2048, micro-batch 4, bf16: megatron-core with our SDPA
      spec and the local spec, CE and tempnet_dro with each --dro-loss-impl
      (bench/bench_train.measure; MFU against training.flops.peak_flops)
  c_hf  the peer on the same shape in the same run: Hugging Face LlamaForCausalLM, SDPA, bf16
      autocast over fp32 weights with fused AdamW (what HF Trainer's --bf16 does), eager and
      under torch.compile (--hf-compile: "layers" = each decoder layer compiled, the regional
      compilation that fits the window; "model" = the whole model, compiles for longer)
  d   end to end as a user runs it, each step a subprocess: demo corpus -> tools/
      train_tokenizer.py -> tools/preprocess_data.py -> python -m megatron_tempnet.train
      (tiny-llama + TempNet, tempnet_dro, bf16, --save) -> the same command resumed (--load) ->
      tools/convert_checkpoint_to_hf.py -> tools/generate.py --show-tau; exit codes, key lines

Software on the device (assumptions, from /work/.library/device/KINDS.md, not checked by this
script's author on a GPU): Python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5.x,
numpy, pyyaml, psutil, sentencepiece, tokenizers, safetensors, tensorboard, pytest, pip are there;
megatron-core, liger-kernel and cut-cross-entropy are not, and nothing can be downloaded. `make
gpu-bundle` downloads their wheels (bench/gpu_bundle.txt, --no-deps: their other requirements,
torch, triton, numpy and packaging, are on the device) into .gpu_bundle/, which travels with the
device tool's `carry`; this script installs them offline into <work>/site (pip --target, never
into the image) when they are not importable, and puts that folder and the repository on
PYTHONPATH (the project itself is not installed). DeepSpeed is not needed by any part.

Nothing here has run on a GPU yet (docs/benchmarks.md, "The one-command GPU run").
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
BUNDLE_LIST = BENCH / "gpu_bundle.txt"
KERNEL_TESTS = ["tests/unit/test_dro_kernels.py", "tests/unit/test_dro_fused_linear.py"]
# a few fast kernel tests for --smoke (the whole files take ~20 s under the interpreter)
SMOKE_TESTS = ("test_fused_is_bitwise_deterministic or test_fused_linear_fixed_tau "
               "or test_default_chunk_is_liger_rule or test_dispatch_errors")
# importable module -> distribution (wheel name prefix) of what the bundle may carry
BUNDLE_MODULES = {"megatron.core": "megatron_core", "liger_kernel": "liger_kernel",
                  "cut_cross_entropy": "cut_cross_entropy"}
PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
VERSIONED = ["torch", "triton", "transformers", "megatron-core", "liger-kernel",
             "cut-cross-entropy", "numpy", "sentencepiece", "tokenizers", "pytest"]


class Part:
    def __init__(self, key, title, cap_gpu, cap_smoke):
        self.key, self.title, self.cap_gpu, self.cap_smoke = key, title, cap_gpu, cap_smoke


# Caps in seconds; the GPU caps sum to 495 s, the default budget (setup included) is 500 s:
# under the 9 minutes with imports and compilation.
PARTS = [
    Part("a", "kernel tests on the device (pytest)", 60, 150),
    Part("b", "DRO loss step fwd+bwd vs dense CE, Liger FLCE, Cut CE", 110, 150),
    Part("c", "training step, megatron-core", 160, 200),
    Part("c_hf", "training step, HF transformers peer", 80, 150),
    Part("d", "end to end: corpus -> train -> resume -> export -> generate", 85, 300),
]
PART_KEYS = [p.key for p in PARTS]


# --------------------------------------------------------------------------------------------
# small helpers


def now() -> float:
    return time.monotonic()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def tail(text: str, chars: int = 3000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def read_bundle_list() -> list[str]:
    lines = BUNDLE_LIST.read_text().splitlines() if BUNDLE_LIST.exists() else []
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


# --------------------------------------------------------------------------------------------
# setup: offline install from the bundle, environment facts


def ensure_packages(bundle: Path, site: Path) -> dict:
    """Install the bundle's wheels of the modules that are not importable into ``site``."""
    missing = [m for m in BUNDLE_MODULES if not importable(m)]
    info = {"bundle": str(bundle), "missing_before": missing, "installed": [], "status": "ok"}
    if not missing:
        return info
    wheels = sorted(bundle.glob("*.whl")) if bundle.is_dir() else []
    wanted = {BUNDLE_MODULES[m] for m in missing}
    picked = [w for w in wheels if w.name.split("-")[0].lower() in wanted]
    if not picked:
        info["status"] = (f"skipped: no wheel for {', '.join(missing)} in {bundle} "
                          "(make gpu-bundle, then carry .gpu_bundle)")
        return info
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--find-links",
           str(bundle), "--target", str(site), *map(str, picked)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            info["status"] = f"error: pip install exited {proc.returncode}: " + tail(
                proc.stdout + proc.stderr, 1500)
    except subprocess.TimeoutExpired:
        info["status"] = "error: pip install ran over 180 s"
    info["installed"] = [w.name for w in picked]
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    info["missing_after"] = [m for m in BUNDLE_MODULES if not importable(m)]
    return info


def nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
    except (subprocess.TimeoutExpired, OSError):
        return {}
    if not out:
        return {}
    name, driver, memory = [x.strip() for x in (out[0].split(",") + ["", ""])[:3]]
    return {"gpu": name, "driver": driver, "gpu_memory": memory, "gpus": len(out)}


def environment(argv: list[str], smoke: bool) -> dict:
    import torch  # the parent never touches CUDA itself (no context, no memory on the GPU)

    cuda = torch.cuda.is_available()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in
                            [Path(sys.executable).name, "bench/gpu_run.py", *argv]),
        "mode": "smoke (CPU, tiny sizes)" if smoke else "gpu",
        "host": platform.node(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "cuda_available": cuda, "cuda": torch.version.cuda,
        "versions": {d: version(d) for d in VERSIONED},
        "git": git_describe(),
    }
    env.update(nvidia_smi())
    return env


def git_describe() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return (head + (" (modified)" if dirty.strip() else "")) or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------------------------
# children: one per part (python bench/gpu_run.py --child KEY --child-out FILE [--smoke])


class Rows:
    """Rows of a child, saved after every row so a killed child leaves what it measured."""

    def __init__(self, path: Path):
        self.path, self.rows, self.meta = path, [], {}
        self.save()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()
        print(f"  row: {json.dumps(row, default=str)}", flush=True)

    def save(self) -> None:
        write_json_atomic(self.path, {"meta": self.meta, "rows": self.rows})


def error_text(exc: BaseException) -> str:
    return tail(f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_tb(
        exc.__traceback__)[-3:]), 1500)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_meta() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def ceilings() -> dict:
    """The two machine ceilings (METHOD.md): bf16 GEMM 8192^3 and a device-to-device copy."""
    import torch

    def timed(fn, reps):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * n ** 3 / timed(lambda: a @ b, 10) / 1e12
    del a, b
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8)  # 1 GiB
    y = torch.empty_like(x)
    copy = 2 * x.numel() / timed(lambda: y.copy_(x), 10) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"bf16 GEMM 8192^3 TFLOP/s": round(gemm, 1),
            "device copy TB/s (read+write)": round(copy, 2)}


def child_b(smoke: bool, rows: Rows) -> None:
    """DRO loss step: bench_dro_loss.measure per (V, implementation)."""
    import torch

    import bench_dro_loss as B

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows.meta.update(device_meta())
    if cuda:
        try:
            rows.meta["ceilings"] = ceilings()
        except Exception as exc:  # noqa: BLE001 - recorded, the loss rows still run
            rows.meta["ceilings"] = {"error": error_text(exc)}
    if smoke:
        args = argparse.Namespace(tokens=16, hidden=16, dtype="float32", tempnet_hidden=8,
                                  warmup=0, iters=1)
        vocabs = [257, 1000]
    else:
        args = argparse.Namespace(tokens=16384, hidden=4096, dtype="bfloat16",
                                  tempnet_hidden=256, warmup=2, iters=10)
        vocabs = [32000, 128256]
    rows.meta["shape"] = {"tokens": args.tokens, "hidden": args.hidden, "dtype": args.dtype,
                          "tempnet_M": args.tempnet_hidden, "warmup": args.warmup,
                          "iters": args.iters}
    rows.save()
    # Cut CE last: its kernels autotune on first use (slow), so it cannot cost the other rows.
    # One set of inputs per V, shared by its rows (bench_dro_loss.make_inputs: seed 0).
    order = [(v, impl) for v in vocabs
             for impl in ("liger", "fused_linear", "dense_ce", "fused", "reference")]
    order += [(v, "cce") for v in vocabs]
    inputs, inputs_v = None, None
    for vocab, impl in order:
        row = {"key": impl, "impl": B.LABELS[impl], "V": vocab}
        module = PEER_MODULES.get(impl)
        if module and not importable(module):
            rows.add({**row, "status": f"skipped: {module} not installed"})
            continue
        if module and not cuda:
            rows.add({**row, "status": "skipped: GPU only (installed)"})
            continue
        t0 = now()
        try:
            if inputs_v != vocab:
                inputs = inputs_v = None
                free_memory()
                inputs, inputs_v = B.make_inputs(args, vocab, device), vocab
            got = B.measure(impl, args, vocab, device, inputs)
        except Exception as exc:  # noqa: BLE001 - one row's failure is recorded
            got = {**row, "error": "OOM" if isinstance(exc, torch.OutOfMemoryError)
                   else error_text(exc)}
        if inputs is not None:
            inputs[0].grad = inputs[1].grad = None
        free_memory()
        got.update(key=impl, seconds=round(now() - t0, 1))
        got["status"] = "ok" if "error" not in got else f"error: {got['error']}"
        rows.add(got)


def _megatron_configs(smoke: bool):
    if smoke:
        return [("ce", "sdpa", "n/a"), ("tempnet_dro", "sdpa", "fused_linear"),
                ("tempnet_dro", "sdpa", "reference"), ("ce", "local", "n/a")]
    # most wanted first: a part that runs over its cap keeps the rows before it
    return [("ce", "sdpa", "n/a"), ("tempnet_dro", "sdpa", "fused_linear"),
            ("tempnet_dro", "sdpa", "fused"), ("tempnet_dro", "sdpa", "reference"),
            ("ce", "local", "n/a"), ("tempnet_dro", "local", "fused_linear")]


def model_shape(smoke: bool):
    """(ModelConfig, seq length, micro-batch, precision, warmup, steps)."""
    from megatron_tempnet.config import load_model_preset

    cfg = load_model_preset("tiny-llama" if smoke else "llama-1b")
    cfg.vocab_size = 512 if smoke else 32000
    seq = 64 if smoke else 2048
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq)
    if smoke:
        return cfg, seq, 2, "fp32", 1, 1
    return cfg, seq, 4, "bf16", 2, 5


def child_c(smoke: bool, rows: Rows) -> None:
    """megatron-core training step: bench_train.measure per (loss mode, attention, impl)."""
    import torch

    import bench_train as T

    cfg, seq, mbs, precision, warmup, steps = model_shape(smoke)
    args = argparse.Namespace(micro_batch_size=mbs, seq_length=seq, warmup=warmup, steps=steps,
                              precision=precision, peak_tflops=None)
    ctx = T.initialize(tp=1, pp=1, seed=1234, environ={"MASTER_ADDR": "127.0.0.1",
                                                       "MASTER_PORT": str(free_port())})
    peak = T.peak_flops(ctx.device, precision)
    rows.meta.update(device_meta())
    rows.meta["shape"] = {"preset": "tiny-llama" if smoke else "llama-1b",
                          "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                          "heads": cfg.num_attention_heads, "ffn": cfg.ffn_hidden_size,
                          "vocab": cfg.vocab_size, "seq": seq, "micro_batch": mbs,
                          "precision": precision, "warmup": warmup, "steps": steps,
                          "peak_TFLOPs": peak / 1e12 if peak else None}
    rows.save()
    for loss_mode, attention, impl in _megatron_configs(smoke):
        row = {"model": "megatron-core GPTModel", "loss mode": loss_mode,
               "attention": attention, "impl": impl}
        t0 = now()
        try:
            got = T.measure(cfg, loss_mode, attention, args, ctx,
                            "auto" if impl == "n/a" else impl)
            got = {**row, **got, "impl": impl, "status": "ok"}
        except torch.OutOfMemoryError:
            got = {**row, "status": "error: OOM"}
        except Exception as exc:  # noqa: BLE001 - one configuration's failure is recorded
            got = {**row, "status": f"error: {error_text(exc)}"}
        free_memory()
        got["seconds"] = round(now() - t0, 1)
        rows.add(got)
    T.shutdown()


def child_c_hf(smoke: bool, rows: Rows, compile_mode: str) -> None:
    """The HF transformers peer: LlamaForCausalLM (SDPA) full step, eager and compiled."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron_tempnet.hf.llama import hf_config
    from megatron_tempnet.training.flops import flops_per_token, peak_flops

    cfg, seq, mbs, precision, warmup, steps = model_shape(smoke)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = precision == "bf16"
    peak = peak_flops(device, precision)
    per_token = flops_per_token(cfg, seq, vocab_size=cfg.vocab_size)
    rows.meta.update(device_meta())
    rows.meta["shape"] = {"seq": seq, "micro_batch": mbs, "precision": precision,
                          "warmup": warmup, "steps": steps, "compile": compile_mode,
                          "optimizer": "torch.optim.AdamW (fused on CUDA), fp32 weights, "
                                       + ("bf16 autocast" if bf16 else "fp32")}
    rows.save()
    modes = ["eager"] if smoke else ["eager", "compile"]
    for mode in modes:
        row = {"model": "HF LlamaForCausalLM (sdpa)", "mode": mode}
        t0 = now()
        try:
            row.update(_hf_measure(LlamaForCausalLM, hf_config(cfg, attn_implementation="sdpa"),
                                   cfg.vocab_size, seq, mbs, bf16, warmup, steps, device,
                                   mode, compile_mode))
            row["TFLOP/s"] = row["tokens/s"] * per_token / 1e12
            row["MFU"] = row["tokens/s"] * per_token / peak if peak else None
            row["MFU 6N"] = (row["tokens/s"] * (6 * row["params"] + 12 * cfg.num_layers
                                                * cfg.hidden_size * seq) / peak
                             if peak else None)
            row["status"] = "ok"
        except torch.OutOfMemoryError:
            row["status"] = "error: OOM"
        except Exception as exc:  # noqa: BLE001 - recorded, the next mode still runs
            row["status"] = f"error: {error_text(exc)}"
        free_memory()
        row["seconds"] = round(now() - t0, 1)
        rows.add(row)
    if smoke:
        rows.add({"model": "HF LlamaForCausalLM (sdpa)", "mode": "compile",
                  "status": "skipped: --smoke runs the eager peer only"})


def _hf_measure(model_cls, config, vocab, seq, mbs, bf16, warmup, steps, device, mode,
                compile_mode) -> dict:
    import torch

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    fwd = model
    if mode == "compile":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if compile_mode == "model":
            fwd = torch.compile(model)
        else:  # regional: one compiled decoder layer, reused by all of them
            for layer in model.model.layers:
                layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mbs, seq), generator=g).to(device)
               for _ in range(warmup + steps)]  # made before the clock starts

    def step(events=None):
        tokens = batches.pop()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        if events:
            events[1].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t_first = now()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = now() - t_first
    fb, total = [], []
    for _ in range(steps):
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            step(ev)
            ev[2].record()
            torch.cuda.synchronize()
            fb.append(ev[0].elapsed_time(ev[1]))
            total.append(ev[0].elapsed_time(ev[2]))
        else:
            t0 = now()
            loss = step()
            total.append(1000 * (now() - t0))
            fb.append(None)
    ms = sorted(total)[len(total) // 2]
    fb_ms = sorted(fb)[len(fb) // 2] if cuda else None
    out = {"ms/step": ms, "fwd+bwd ms": fb_ms, "tokens/s": mbs * seq / (ms / 1000),
           "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "params": params, "warmup s (compile)": round(warm_s, 1),
           "attention": model.config._attn_implementation}
    del model, fwd, optimizer
    return out


def child_main(key: str, out_file: Path, smoke: bool, compile_mode: str) -> int:
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO))
    rows = Rows(out_file)
    if key == "b":
        child_b(smoke, rows)
    elif key == "c":
        child_c(smoke, rows)
    elif key == "c_hf":
        child_c_hf(smoke, rows, compile_mode)
    else:
        raise SystemExit(f"unknown child part {key!r}")
    return 0


# --------------------------------------------------------------------------------------------
# the parent: runs the parts under their caps and writes the reports


class Runner:
    def __init__(self, out: Path, work: Path, smoke: bool, start: float, budget_s: float,
                 env: dict, child_env: dict, compile_mode: str):
        self.out, self.work, self.smoke, self.env = out, work, smoke, env
        self.child_env, self.compile_mode = child_env, compile_mode
        self.start = start
        self.deadline = start + budget_s
        self.budget_s = budget_s
        self.parts: dict[str, dict] = {}
        self.procs: set[subprocess.Popen] = set()
        # --smoke runs part d beside the others (two threads): the report is written under it
        self.lock = threading.RLock()
        self.log = out / "gpu_run.log"
        self.log.write_text("")

    def plan(self, keys: list[str]) -> None:
        """List the parts to run, in their order, as pending."""
        for part in PARTS:
            if part.key in keys:
                self.parts[part.key] = {"title": part.title, "status": "pending", "rows": [],
                                        "meta": {}, "cap_s": None, "seconds": None,
                                        "log_tail": None}

    # -- reports
    def report(self) -> dict:
        return {"schema": 1, "issue": 19, "env": self.env, "budget_s": self.budget_s,
                "elapsed_s": round(now() - self.start, 1), "parts": self.parts}

    def write(self) -> None:
        with self.lock:
            for attempt in range(5):  # another thread may add a key while this one copies
                try:
                    data = json.loads(json.dumps(self.report(), default=str))
                    break
                except RuntimeError:
                    time.sleep(0.05)
            else:
                return
            add_ratios(data)
            write_json_atomic(self.out / "gpu_run.json", data)
            md = self.out / "gpu_run.md"
            md.with_name(md.name + ".tmp").write_text(render_markdown(data))
            os.replace(md.with_name(md.name + ".tmp"), md)

    # -- processes
    def run_proc(self, cmd: list[str], cap: float, log_path: Path, env=None) -> tuple:
        """(returncode or None on timeout, seconds, output)."""
        t0 = now()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.child_env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.procs.add(proc)
            try:
                rc = proc.wait(timeout=max(1.0, cap))
            except subprocess.TimeoutExpired:
                self.kill(proc)
                rc = None
            finally:
                with self.lock:
                    self.procs.discard(proc)
        text = log_path.read_text(errors="replace")
        with self.lock, open(self.log, "a") as all_logs:
            all_logs.write(f"\n===== {log_path.name} (rc {rc}, {now() - t0:.1f} s)\n{text}")
        return rc, now() - t0, text

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            self.kill(proc)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """End ``proc`` and its process group (torchrun, pytest workers): TERM, then KILL."""
        if proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def cap_for(self, part: Part) -> float:
        return min(part.cap_smoke if self.smoke else part.cap_gpu, self.deadline - now())

    # -- parts
    def run_part(self, part: Part) -> None:
        cap = self.cap_for(part)
        entry = {"title": part.title, "cap_s": round(cap, 1), "status": "running",
                 "rows": [], "meta": {}, "seconds": None, "log_tail": None}
        with self.lock:
            self.parts[part.key] = entry
        if cap < (5 if self.smoke else 15):
            entry.update(status=f"skipped: out of time budget ({self.budget_s:.0f} s)",
                         cap_s=0)
            self.write()
            return
        self.write()
        print(f"[{now() - self.start:6.1f} s] part {part.key}: {part.title} "
              f"(cap {cap:.0f} s)", flush=True)
        t0 = now()
        try:
            if part.key == "a":
                self.part_a(entry, cap)
            elif part.key == "d":
                self.part_d(entry, cap)
            else:
                self.part_child(part.key, entry, cap)
        except Exception as exc:  # noqa: BLE001 - the runner itself must go on
            entry["status"] = f"error: {error_text(exc)}"
        entry["seconds"] = round(now() - t0, 1)
        print(f"[{now() - self.start:6.1f} s] part {part.key}: {entry['status'][:200]}",
              flush=True)
        self.write()

    def part_a(self, entry: dict, cap: float) -> None:
        junit = self.work / "a_junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *KERNEL_TESTS]
        env = dict(self.child_env)  # TRITON_INTERPRET=1 with --smoke, unset on the GPU
        if self.smoke:
            cmd += ["-k", SMOKE_TESTS]
        entry["meta"]["command"] = " ".join(shlex.quote(c) for c in cmd[1:])
        entry["meta"]["TRITON_INTERPRET"] = env.get("TRITON_INTERPRET", "unset")
        rc, _, text = self.run_proc(cmd, cap, self.work / "a.log", env)
        counts, failures = parse_junit(junit)
        if not counts:  # killed before pytest wrote its report: the verbose lines so far
            counts, failures = parse_verbose(text)
        entry["meta"].update(counts)
        entry["rows"] = failures
        if rc is None:
            entry["status"] = f"timeout: over its cap of {cap:.0f} s"
        elif rc == 0 and counts.get("tests", 0) > 0:
            entry["status"] = "ok"
        else:
            entry["status"] = (f"failed: pytest exited {rc} ({counts.get('failures', '?')} "
                               f"failed, {counts.get('errors', '?')} errors)")
            entry["log_tail"] = tail(text)

    def part_child(self, key: str, entry: dict, cap: float) -> None:
        rows_file = self.work / f"{key}_rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--child-out",
               str(rows_file), "--hf-compile", self.compile_mode]
        if self.smoke:
            cmd.append("--smoke")
        rc, _, text = self.run_proc(cmd, cap, self.work / f"{key}.log")
        if rows_file.exists():
            got = json.loads(rows_file.read_text())
            entry["rows"], entry["meta"] = got["rows"], got["meta"]
        bad = [r for r in entry["rows"] if not str(r.get("status", "")).startswith(
            ("ok", "skipped"))]
        if rc is None:
            entry["status"] = (f"timeout: over its cap of {cap:.0f} s after "
                               f"{len(entry['rows'])} rows")
            entry["log_tail"] = tail(text)
        elif rc != 0:
            entry["status"] = f"failed: exited {rc}"
            entry["log_tail"] = tail(text)
        elif bad:
            entry["status"] = f"failed: {len(bad)} of {len(entry['rows'])} rows failed"
        else:
            entry["status"] = "ok"

    def part_d(self, entry: dict, cap: float) -> None:
        deadline = now() + cap
        d = self.work / "e2e"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        py = sys.executable
        smoke = self.smoke
        vocab = 500 if smoke else 2000
        padded = 512 if smoke else 2048  # tiny-llama pads to a multiple of 64
        rho = round(math.log(padded) - 2.83, 3)  # demo.py: log V - 2.83, as the paper's GPT-2
        iters, more = (4, 6) if smoke else (30, 40)
        ckpt, hf = d / "checkpoints", d / f"hf_iter_{more}"
        train = [py, "-m", "megatron_tempnet.train", "--model", "tiny-llama",
                 "--data-path", str(d / "demo_text_document"), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", str(d / "tok.model"),
                 "--split", "98,2,0", "--seq-length", "64" if smoke else "128",
                 "--micro-batch-size", "2" if smoke else "8",
                 "--global-batch-size", "2" if smoke else "8",
                 "--precision", "fp32" if smoke else "bf16",
                 "--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", str(rho),
                 "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2",
                 "--lr-decay-iters", "100", "--tempnet-lr", "1e-3",
                 "--log-interval", "2" if smoke else "5",
                 "--eval-interval", str(iters), "--eval-iters", "1",
                 "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(iters)]
        steps = [
            ("corpus", [py, "-m", "megatron_tempnet.data.demo_corpus", "--output",
                        str(d / "corpus.jsonl"), "--max-bytes",
                        str(200_000 if smoke else 1_000_000)]),
            ("tokenizer", [py, "tools/train_tokenizer.py", "--input", str(d / "corpus.jsonl"),
                           "--output", str(d / "tok.model"), "--type", "sentencepiece-bpe",
                           "--vocab-size", str(vocab)]),
            ("preprocess", [py, "tools/preprocess_data.py", "--input", str(d / "corpus.jsonl"),
                            "--output-prefix", str(d / "demo"), "--tokenizer-type",
                            "SentencePieceTokenizer", "--tokenizer-model", str(d / "tok.model"),
                            "--append-eod", "--workers", "1"]),
            ("train", train + ["--train-iters", str(iters)]),
            ("resume", train + ["--train-iters", str(more)]),
            ("export", [py, "tools/convert_checkpoint_to_hf.py", "--load", str(ckpt),
                        "--output", str(hf), "--tokenizer-model", str(d / "tok.model")]),
            ("generate", [py, "tools/generate.py", "--model-dir", str(hf), "--prompt",
                          "Return the number of", "--max-new-tokens", "12", "--show-tau",
                          "--seed", "0"]),
        ]
        entry["meta"]["settings"] = {"model": "tiny-llama", "vocab": vocab, "rho": rho,
                                     "precision": "fp32" if smoke else "bf16",
                                     "iterations": f"{iters}, resumed to {more}"}
        failed = None
        for name, cmd in steps:
            left = deadline - now()
            if failed or left < 3:
                entry["rows"].append({"step": name, "status": "skipped: " + (
                    f"{failed} failed" if failed else "out of the part's time cap")})
                continue
            rc, secs, text = self.run_proc(cmd, left, self.work / f"d_{name}.log")
            row = {"step": name, "rc": rc, "seconds": round(secs, 1),
                   "command": " ".join(shlex.quote(str(c)) for c in cmd[1:]),
                   "key_lines": key_lines(text, name)}
            if rc == 0 and name == "resume" and f"iterations {iters}..{more}" not in text:
                rc = "no resume"
                row["note"] = f"the log does not show iterations {iters}..{more}"
            row["status"] = "ok" if rc == 0 else (
                "timeout" if rc is None else f"failed: exit code {rc}")
            if rc != 0:
                row["log_tail"] = tail(text, 2000)
                failed = name
            entry["rows"].append(row)
            self.write()
        entry["status"] = "ok" if failed is None else f"failed: step {failed}"


KEY_LINE = re.compile(r"^(iteration |summary:|saved checkpoint|loaded |validation|wrote |"
                      r"error:|Traceback|\w*Error|model llama|.*\btau \d)")


def key_lines(text: str, step: str = "", keep: int = 10) -> list[str]:
    """The lines worth keeping of one step's output (the generated text: its first lines)."""
    body = [ln.rstrip()[:300] for ln in text.splitlines()[1:] if ln.strip()]
    if step == "generate":
        return [ln for ln in body if not ln.startswith(("Loading", "Writing"))][:keep]
    lines = [ln for ln in body if KEY_LINE.match(ln.strip())]
    return lines[:2] + lines[2:][-(keep - 2):] if len(lines) > keep else lines


TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose(text: str) -> tuple[dict, list[dict]]:
    """Counts from ``pytest -v`` lines (a run stopped before its JUnit report)."""
    results = dict(m.groups() for m in map(TEST_LINE.match, text.splitlines()) if m)
    if not results:
        return {}, []
    values = list(results.values())
    counts = {"tests": len(values), "passed": values.count("PASSED"),
              "failures": values.count("FAILED"), "errors": values.count("ERROR"),
              "skipped": values.count("SKIPPED"), "note": "from the output: pytest was stopped"}
    failures = [{"test": t, "status": r.lower(), "message": "(stopped before its report)"}
                for t, r in results.items() if r in ("FAILED", "ERROR")]
    return counts, failures


def parse_junit(path: Path) -> tuple[dict, list[dict]]:
    if not path.exists():
        return {}, []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}, []
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}, []
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["pytest seconds"] = float(suite.get("time", 0))
    failures = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                 "status": kind, "message": tail(
                                     (node.get("message") or "") + "\n" + (node.text or ""),
                                     1500)})
    return counts, failures


# --------------------------------------------------------------------------------------------
# ratios and the Markdown report


def add_ratios(data: dict) -> None:
    """Part b: time and memory over Liger's and dense CE's at the same V; part c: each row's
    step time over the CE row of the same attention, and over compiled HF."""
    b = data["parts"].get("b")
    if b:
        for row in b["rows"]:
            for peer in ("liger", "dense_ce"):
                ref = next((r for r in b["rows"] if r.get("key") == peer and
                            r.get("V") == row.get("V") and r.get("ms")), None)
                if ref and row.get("ms"):
                    row[f"time vs {peer}"] = row["ms"] / ref["ms"]
                    if row.get("GiB") is not None and ref.get("GiB"):
                        row[f"memory vs {peer}"] = row["GiB"] / ref["GiB"]
    c, c_hf = data["parts"].get("c"), data["parts"].get("c_hf")
    hf = {}
    for r in (c_hf or {}).get("rows", []):
        if r.get("ms/step"):
            hf[r["mode"]] = r["ms/step"]
    for row in (c or {}).get("rows", []):
        if not row.get("ms/step"):
            continue
        ce = next((r for r in c["rows"] if r.get("loss mode") == "ce" and
                   r.get("attention") == row.get("attention") and r.get("ms/step")), None)
        if ce:
            row["time vs CE"] = row["ms/step"] / ce["ms/step"]
        for mode, ms in hf.items():
            row[f"time vs HF {mode}"] = row["ms/step"] / ms


def fnum(x, fmt="{:.1f}") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return fmt.format(x)


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    clean = [[str(c).replace("|", "/").replace("\n", " ") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *["| " + " | ".join(r) + " |" for r in clean]]


def short(status: str, n: int = 160) -> str:
    status = str(status).replace("\n", " ")
    return status if len(status) <= n else status[:n] + "..."


def render_markdown(data: dict) -> str:
    env = data["env"]
    v = env.get("versions", {})
    out = ["# GPU run (bench/gpu_run.py)", "",
           f"- date: {env.get('date')}; mode: {env.get('mode')}; elapsed "
           f"{data.get('elapsed_s')} s of a {data.get('budget_s'):.0f} s budget",
           f"- command: `{env.get('command')}`",
           f"- machine: {env.get('host')}, {env.get('platform')}, {env.get('cpus')} CPUs, "
           f"Python {env.get('python')}; git {env.get('git')}",
           f"- GPU: {env.get('gpu', 'none')} ({env.get('gpu_memory', '')}), driver "
           f"{env.get('driver', 'n/a')}, CUDA {env.get('cuda')}",
           "- versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v),
           f"- setup: {short(env.get('setup', {}).get('status', 'n/a'), 300)}"
           + (f" (installed {', '.join(env['setup']['installed'])})"
              if env.get("setup", {}).get("installed") else ""), ""]
    out += ["| part | status | seconds | cap s |", "| --- | --- | --- | --- |"]
    for key, p in data["parts"].items():
        out.append(f"| {key}: {p['title']} | {short(p['status'])} | {p.get('seconds', '')} | "
                   f"{p.get('cap_s', '')} |")
    parts = data["parts"]
    if "a" in parts:
        p = parts["a"]
        m = p["meta"]
        out += ["", f"## a. {p['title']}", "",
                f"`{m.get('command', '')}` (TRITON_INTERPRET {m.get('TRITON_INTERPRET')}): "
                f"{m.get('tests', '?')} tests, {m.get('passed', '?')} passed, "
                f"{m.get('failures', '?')} failed, {m.get('errors', '?')} errors, "
                f"{m.get('skipped', '?')} skipped"]
        for f in p["rows"]:
            out.append(f"- {f['status']}: `{f['test']}`: {short(f['message'], 300)}")
    if "b" in parts:
        p = parts["b"]
        m = p["meta"]
        out += ["", f"## b. {p['title']}", "", f"Device: {m.get('device', '?')}; shape "
                f"{m.get('shape', {})}; ceilings {m.get('ceilings', 'n/a')}", ""]
        out += md_table(["implementation", "V", "fwd+bwd ms", "extra peak GiB", "time vs Liger",
                         "memory vs Liger", "time vs dense CE", "memory vs dense CE",
                         "status"],
                        [[r.get("impl", r.get("key")), r.get("V"), fnum(r.get("ms")),
                          fnum(r.get("GiB"), "{:.2f}"), ratio(r.get("time vs liger")),
                          ratio(r.get("memory vs liger")), ratio(r.get("time vs dense_ce")),
                          ratio(r.get("memory vs dense_ce")), short(r.get("status", ""), 120)]
                         for r in p["rows"]])
    for key in ("c", "c_hf"):
        if key not in parts:
            continue
        p = parts[key]
        m = p["meta"]
        out += ["", f"## {key}. {p['title']}", "", f"Device: {m.get('device', '?')}; "
                f"{m.get('shape', {})}", ""]
        if key == "c":
            out += md_table(["loss mode", "attention", "DRO impl", "ms/step", "tokens/s",
                             "MFU", "MFU 6N", "peak GiB", "vs CE", "vs HF eager",
                             "vs HF compile", "status"],
                            [[r.get("loss mode"), r.get("attention"), r.get("impl"),
                              fnum(r.get("ms/step")), fnum(r.get("tokens/s"), "{:,.0f}"),
                              pct(r.get("MFU")), pct(r.get("MFU 6N")),
                              fnum(r.get("peak GiB")), ratio(r.get("time vs CE")),
                              ratio(r.get("time vs HF eager")),
                              ratio(r.get("time vs HF compile")),
                              short(r.get("status", ""), 120)] for r in p["rows"]])
        else:
            out += md_table(["model", "mode", "ms/step", "fwd+bwd ms", "tokens/s", "MFU",
                             "MFU 6N", "peak GiB", "warm-up s", "status"],
                            [[r.get("model"), r.get("mode"), fnum(r.get("ms/step")),
                              fnum(r.get("fwd+bwd ms")), fnum(r.get("tokens/s"), "{:,.0f}"),
                              pct(r.get("MFU")), pct(r.get("MFU 6N")),
                              fnum(r.get("peak GiB")), fnum(r.get("warmup s (compile)")),
                              short(r.get("status", ""), 120)] for r in p["rows"]])
    if "d" in parts:
        p = parts["d"]
        out += ["", f"## d. {p['title']}", "", f"Settings: {p['meta'].get('settings', {})}",
                ""]
        out += md_table(["step", "exit code", "seconds", "status", "key lines"],
                        [[r["step"], r.get("rc", ""), r.get("seconds", ""),
                          short(r["status"], 80),
                          "<br>".join("`" + ln[:160].replace("`", "'") + "`" for ln in (
                              r.get("key_lines", [])[:4] if r["step"] == "generate"
                              else r.get("key_lines", [])[-4:]))]
                         for r in p["rows"]])
    for key, p in parts.items():
        if p.get("log_tail"):
            out += ["", f"### log tail of part {key}", "", "```", p["log_tail"][-2000:], "```"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for gpu_run.json, gpu_run.md, gpu_run.log")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU (CI): proves every part runs, measures nothing")
    p.add_argument("--parts", nargs="+", choices=PART_KEYS, default=PART_KEYS)
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of all parts (default 500 on a GPU, 600 --smoke); "
                        "a part gets min(its cap, what is left)")
    p.add_argument("--bundle", default=str(REPO / ".gpu_bundle"),
                   help="folder of wheels made by `make gpu-bundle`")
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=None,
                   help="install missing packages from --bundle (default: on a GPU yes, "
                        "--smoke no)")
    p.add_argument("--work-dir", default=None,
                   help="scratch folder (default: a new temporary folder)")
    p.add_argument("--hf-compile", choices=["layers", "model"], default="layers",
                   help="torch.compile of the HF peer: each decoder layer (default) or the "
                        "whole model")
    p.add_argument("--child", choices=["b", "c", "c_hf"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child and not args.out:
        p.error("give the output folder: bench/gpu_run.py OUTDIR")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, Path(args.child_out), args.smoke, args.hf_compile)

    t_start = now()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_run_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    install = (not args.smoke) if args.install is None else args.install
    site = work / "site"
    setup = (ensure_packages(Path(args.bundle), site) if install
             else {"status": "skipped: --no-install" if args.install is False
                   else "skipped: --smoke uses what is installed", "installed": []})
    paths = [str(site)] if site.is_dir() else []
    paths.append(str(REPO))
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        paths + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else []))
    child_env["PYTHONUNBUFFERED"] = "1"
    if args.smoke:  # the Triton kernels run under the interpreter on the CPU (slow, tiny sizes)
        child_env["TRITON_INTERPRET"] = "1"
    else:  # compiled for the GPU (part a's tests too)
        child_env.pop("TRITON_INTERPRET", None)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    importlib.invalidate_caches()

    env = environment(argv, args.smoke)
    env["setup"] = setup
    env["work_dir"] = str(work)
    budget = args.budget_s or (600.0 if args.smoke else 500.0)
    runner = Runner(out, work, args.smoke, t_start, budget, env, child_env, args.hf_compile)

    def stop(signum, _frame):
        runner.kill_all()
        for p in runner.parts.values():
            if p["status"] == "running":
                p["status"] = f"killed: the run got signal {signum}"
        runner.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if not args.smoke and not env["cuda_available"]:
        env["error"] = "no CUDA device: this is the GPU run; use --smoke on a CPU"
        runner.write()
        print(f"error: {env['error']}", file=sys.stderr)
        return 2
    runner.plan(args.parts)
    runner.write()
    background = None
    if args.smoke and "d" in args.parts:
        # On the CPU part d's subprocesses, mostly imports, overlap the other parts: the smoke
        # run fits CI's 2 minutes. On the GPU every part runs alone (its timings are reported).
        d = next(p for p in PARTS if p.key == "d")
        background = threading.Thread(target=runner.run_part, args=(d,), daemon=True)
        background.start()
    for part in PARTS:
        if part.key in args.parts and not (background and part.key == "d"):
            runner.run_part(part)
    if background:
        background.join()
    runner.write()
    print((out / "gpu_run.md").read_text())
    print(f"wrote {out / 'gpu_run.json'} and {out / 'gpu_run.md'} "
          f"({now() - t_start:.0f} s)")
    ok = all(p["status"] == "ok" for p in runner.parts.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
