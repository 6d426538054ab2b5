"""The model code an export carries (config.json ``auto_map``, ``trust_remote_code=True``):
three files that need only torch and transformers.

    configuration_tempnet.py  copied from megatron_tempnet/hf/remote/ (the package imports it)
    modeling_tempnet.py       copied from megatron_tempnet/hf/remote/ (the package imports it)
    tempnet_math.py           GENERATED here from the package's own source: the dense TempNet
                              of both designs (tempnet/reference.py ``tempnet_reference``,
                              ``scale_aware_reference``, the oracles the vocab-parallel heads
                              are tested against) and the exact-tau solver (tempnet/exact_tau.py
                              ``solve_tau``, with single-process stand-ins of tempnet/comm.py),
                              their constants, and nn.Module heads with the parameter names and
                              shapes of tempnet/head.py's.

So the math has one home (the package), the export runs that same source, and the package's
classes (``megatron_tempnet.hf.modeling``) and an export's differ only in ``tempnet_math``
(tests/unit/test_hf_remote_code.py checks the two agree).
"""
from __future__ import annotations

import builtins
import dataclasses
import dis
import inspect
import shutil
import textwrap
import types
from pathlib import Path


REMOTE_DIR = Path(__file__).resolve().parent / "remote"
COPIED_FILES = ("configuration_tempnet.py", "modeling_tempnet.py")
GENERATED_FILE = "tempnet_math.py"
CODE_FILES = COPIED_FILES + (GENERATED_FILE,)
# The TempNetConfig fields an exported model carries (the ones that define its tau).
EXPORTED_TEMPNET_FIELDS = ("arch", "tau0", "hidden_size", "tau_min", "tau_max", "rho",
                           "input_convention", "loss_mode")

_HEADER = '''"""TempNet's per-token temperature in plain torch, GENERATED from megatron-tempnet
{version} by megatron_tempnet/hf/remote_code.py; do not edit. No megatron-core, no
megatron_tempnet.

Copied source (single process: the tensor-parallel collectives are identities here):
{origins}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

'''

# Single-process stand-ins of tempnet/comm.py (what it does for group None).
_COMM = '''
SUM = MAX = None  # tempnet/comm.py's reduce ops: no tensor parallelism in an export


def group_rank_size(group) -> tuple[int, int]:
    return 0, 1


def all_reduce(tensor: torch.Tensor, op=SUM, group=None) -> torch.Tensor:
    return tensor
'''

# What the generated module adds around the copied functions (the interface modeling_tempnet.py
# imports: TEMPNET_LOSS_MODES, tempnet_config, build_head, solve_tau).
_TAIL = '''

class TempNetSettings:
    """The TempNetConfig fields the exported tau reads (config.json "tempnet"; a missing field
    takes TempNetConfig's default, loss_mode "tempnet_dro")."""

    def __init__(self, settings: dict):
        values = dict(DEFAULTS, **{{k: v for k, v in settings.items() if k in DEFAULTS}})
        for name, value in values.items():
            setattr(self, name, value)
        if self.arch not in PARAM_SHAPES:
            raise ValueError(f"tempnet arch {{self.arch!r}}: this code knows "
                             f"{{list(PARAM_SHAPES)}}")
        if not 0 < self.tau_min < self.tau_max:
            raise ValueError(f"tempnet tau bounds [{{self.tau_min}}, {{self.tau_max}}]: need "
                             "0 < tau_min < tau_max")

{initial_tau}

def tempnet_config(settings: dict) -> TempNetSettings:
    return TempNetSettings(settings)


class _Head(nn.Module):
    """A TempNet head at TP=1 with the parameters of megatron_tempnet's (zeros until loaded);
    tau [...] = tempnet_reference(logits [..., V_pad], parameters, config) (no dropout)."""

    ARCH = ""

    def __init__(self, config: TempNetSettings, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        dims = {{"m": config.hidden_size, "v": vocab_size, "k": NUM_FEATURES}}
        for name, shape in PARAM_SHAPES[self.ARCH].items():
            setattr(self, name, nn.Parameter(torch.zeros([dims[d] for d in shape])))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        params = {{name: getattr(self, name) for name in PARAM_SHAPES[self.ARCH]}}
        return tempnet_reference(logits, params, self.config)


class TempNetHead(_Head):
    """--tempnet-arch paper (megatron_tempnet.tempnet.head.TempNetHead)."""

    ARCH = "paper"


class ScaleAwareTempNetHead(_Head):
    """--tempnet-arch scale_aware (megatron_tempnet.tempnet.head.ScaleAwareTempNetHead)."""

    ARCH = "scale_aware"


HEADS = {{"paper": TempNetHead, "scale_aware": ScaleAwareTempNetHead}}


def build_head(config: TempNetSettings, padded_vocab_size: int) -> _Head:
    return HEADS[config.arch](config, padded_vocab_size)
'''


def _copied_functions():
    """(module, function) pairs whose source the generated file holds, in order."""
    from megatron_tempnet.tempnet import exact_tau, reference

    return [(reference, reference.compute_dtype), (reference, reference.tempnet_reference),
            (reference, reference.scale_aware_reference), (exact_tau, exact_tau._kl_and_var),
            (exact_tau, exact_tau.solve_tau)]


def _constants() -> dict:
    from megatron_tempnet.tempnet import exact_tau, head, reference
    from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES, TempNetConfig

    defaults = dataclasses.asdict(TempNetConfig(loss_mode="tempnet_dro"))
    return {"NORM_EPS": reference.NORM_EPS, "VAR_EPS": reference.VAR_EPS,
            "FEATURE_CLAMP": reference.FEATURE_CLAMP, "MAX_ITERS": exact_tau.MAX_ITERS,
            "KL_TOL": exact_tau.KL_TOL, "TEMPNET_LOSS_MODES": tuple(TEMPNET_LOSS_MODES),
            "NUM_FEATURES": len(head.SCALE_AWARE_FEATURES),
            "DEFAULTS": {k: defaults[k] for k in EXPORTED_TEMPNET_FIELDS},
            "PARAM_SHAPES": param_shapes()}


def param_shapes() -> dict:
    """{arch: {parameter: shape in "m" (M), "v" (padded V), "k" (features)}}, read off the
    package's own initialisers (tempnet/head.py) at sizes that tell the dimensions apart."""
    from megatron_tempnet.tempnet.config import TempNetConfig
    from megatron_tempnet.tempnet.head import HEADS, SCALE_AWARE_FEATURES

    m, v = 7, 11
    names = {m: "m", v: "v", len(SCALE_AWARE_FEATURES): "k"}
    out = {}
    for arch, cls in HEADS.items():
        params = cls.init_params(TempNetConfig(arch=arch, hidden_size=m), v, 0)
        out[arch] = {name: tuple(names[d] for d in params[name].shape)
                     for name in cls.PARAM_NAMES}
    return out


def _initial_tau_source() -> str:
    from megatron_tempnet.tempnet.config import TempNetConfig

    return textwrap.indent(textwrap.dedent(inspect.getsource(TempNetConfig.initial_tau.fget)),
                           "    ")


def _literal(value, column: int, indent: int = 0) -> str:
    """repr(value), a dict that does not fit before column 100 one item a line."""
    text = repr(value)
    if not isinstance(value, dict) or column + len(text) <= 100:
        return text
    pad = " " * (indent + 4)
    items = [f"{pad}{k!r}: {_literal(v, len(pad) + len(repr(k)) + 2, indent + 4)},"
             for k, v in value.items()]
    return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"


def tempnet_math_source() -> str:
    """The text of an export's tempnet_math.py."""
    from megatron_tempnet import __version__

    functions = _copied_functions()
    origins = "\n".join(f"    {mod.__name__}.{fn.__name__}" for mod, fn in functions)
    parts = [_HEADER.format(version=__version__, origins=origins)]
    parts += [f"{name} = {_literal(value, len(name) + 3)}" for name, value in _constants().items()]
    parts.append(_COMM)
    for _, fn in functions:
        parts.append("\n" + inspect.getsource(fn))
    parts.append(_TAIL.format(initial_tau=_initial_tau_source()))
    source = "\n".join(parts)
    check_self_contained(source)
    return source


def check_self_contained(source: str) -> None:
    """Compile ``source`` as a module and refuse it if any function reads a global it does not
    define (a helper the package's source gained, not copied here) or imports the package."""
    module = types.ModuleType("tempnet_math_check")
    exec(compile(source, GENERATED_FILE, "exec"), module.__dict__)
    known = set(module.__dict__) | set(dir(builtins))
    missing = set()
    for value in list(module.__dict__.values()):
        codes = []
        if isinstance(value, types.FunctionType):
            codes.append(value.__code__)
        elif isinstance(value, type) and value.__module__ == module.__name__:
            codes += [f.__code__ for f in vars(value).values()
                      if isinstance(f, types.FunctionType)]
            codes += [p.fget.__code__ for p in vars(value).values() if isinstance(p, property)]
        while codes:
            code = codes.pop()
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
            missing |= {ins.argval for ins in dis.get_instructions(code)
                        if ins.opname == "LOAD_GLOBAL" and ins.argval not in known}
    if missing:
        raise RuntimeError(f"generated {GENERATED_FILE} uses undefined names {sorted(missing)}: "
                           "copy their source too (megatron_tempnet/hf/remote_code.py)")
    if "megatron" in "".join(line for line in source.splitlines()
                             if line.lstrip().startswith(("import ", "from "))):
        raise RuntimeError(f"generated {GENERATED_FILE} imports megatron code")


def write_remote_code(directory) -> list[Path]:
    """Write configuration_tempnet.py, modeling_tempnet.py and tempnet_math.py into
    ``directory``; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in COPIED_FILES:
        shutil.copyfile(REMOTE_DIR / name, out / name)
        written.append(out / name)
    (out / GENERATED_FILE).write_text(tempnet_math_source(), encoding="utf-8")
    written.append(out / GENERATED_FILE)
    return written
