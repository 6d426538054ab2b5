"""Hugging Face conversion: one key-map file per model family."""
from megatron_tempnet.hf import gpt2, llama

FAMILY_MODULES = {"gpt": gpt2, "llama": llama}


def family_module(family: str):
    if family not in FAMILY_MODULES:
        raise ValueError(f"no Hugging Face mapping for model family {family!r}; "
                         f"known: {sorted(FAMILY_MODULES)}")
    return FAMILY_MODULES[family]
