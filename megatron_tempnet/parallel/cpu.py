"""megatron-core on a machine without CUDA: the ONE place that redirects its CUDA assumptions.

megatron-core (0.16.x) is written for GPUs. Its code paths are plain PyTorch and run fine on the
CPU with the gloo backend, except for a handful of CUDA assumptions, found by probing 0.16.1 on
torch 2.13 (CPU build):

1. ``torch.cuda.current_device()`` used as an allocation device (rotary embeddings, the global
   attention buffer, PP receive buffers, DDP grad buffers, checkpoint buffers)  -> ``"cpu"``.
2. ``torch.cuda.synchronize()`` (PP p2p, checkpoint save)                       -> no-op.
3. The CUDA RNG tracker: ``torch.cuda.get_rng_state``/``manual_seed`` and megatron's
   ``_set_cuda_rng_state`` (every GPTModel forward forks the tracker, even with dropout 0)
   -> the CPU generator, so ``tracker.fork()`` swaps CPU RNG states exactly as it swaps CUDA
   ones on a GPU (dropout inside a fork draws from the tracker's stream).
4. Literal ``device="cuda"`` / ``torch.device("cuda")`` in a few modules (the schedules' token
   counter even at PP=1, grad clipping, grad scaler, optimizers, checkpoint exchange)
   -> those modules see a ``torch`` whose factory functions allocate on the CPU instead.
5. ``Tensor.cuda()``                                                            -> identity.
6. ``Tensor.type()`` strings compared with ``'torch.cuda.FloatTensor'`` by the mixed-precision
   and distributed optimizers -> ``Tensor.type()`` with no argument answers the CUDA spelling.
7. ``dist_checkpointing.save``'s results queue lives in a *spawn*-context ``Manager`` (spawn keeps
   CUDA out of the child), whose start re-imports ``__main__`` and with it torch and
   megatron-core: 5-8 s per process at the first save on a CPU box. Without CUDA a *fork*-context
   Manager does the same job in a fraction of a second (the same fork DataLoader workers use).

Nothing here is active when CUDA is available: :func:`activate` returns False and changes
nothing. It is pinned to the megatron-core versions it was tested on (:data:`TESTED_MCORE`);
another version raises an error instead of silently half-working. Activation is idempotent and
process-wide (these are patches of third-party modules: the documented exception to the
project's no-monkey-patching rule, kept in one file with its own tests).
"""
from __future__ import annotations

import functools
import importlib
import logging
import types

import torch

TESTED_MCORE = ((0, 16), (0, 17))  # [lower, upper) on (major, minor)

# Modules of megatron-core that spell the device "cuda" literally (found by grep on 0.16.1).
_LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")

_active = False


def is_active() -> bool:
    return _active


def _to_cpu_device(device):
    """'cuda', 'cuda:0', torch.device('cuda'), or an int GPU index -> 'cpu'; others unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA host allocator
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside the modules that spell the device "cuda" literally."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):  # everything else is the real torch
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)


_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
               torch.bfloat16: "torch.cuda.BFloat16Tensor"}


def _fork_results_queue():
    """Stands in for ``filesystem_async._get_write_results_queue`` (item 7): one queue per
    process, created on first use."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    return filesystem_async._results_queue


def _mcore_version() -> tuple[int, int]:
    from megatron.core import package_info

    major, minor = package_info.__version__.split(".")[:2]
    return int(major), int(minor)


def check_mcore_version() -> None:
    version = _mcore_version()
    lo, hi = TESTED_MCORE
    if not lo <= version < hi:
        raise RuntimeError(
            f"megatron_tempnet.parallel.cpu was tested with megatron-core "
            f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}, found {version[0]}.{version[1]}: "
            "install megatron-core==0.16.1, or probe the new version and extend this module")


def activate(force: bool = False) -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU when CUDA is unavailable.

    Returns True if the redirection is (now) active. With CUDA present it does nothing and
    returns False, unless ``force`` (used by tests to exercise it on a GPU machine).
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_mcore_version()

    # 1-3: torch.cuda functions megatron-core calls at run time.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # The tracker warns when the CPU RNG moves inside a fork; here the forked stream IS the CPU
    # generator, so the warning would fire on every initialisation and mean nothing.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    # 4: literal "cuda" devices.
    cpu_torch = _CpuTorch()
    for name in _LITERAL_CUDA_MODULES:
        importlib.import_module(name).torch = cpu_torch

    # 5-6: tensor methods.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _TYPE_NAMES:
            return _TYPE_NAMES[self.dtype]
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_

    # 7: dist_checkpointing's results queue from a fork-context Manager.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = _fork_results_queue
    _active = True
    return True
