"""megatron-tempnet: Megatron-style GPT/LLaMA pretraining with a learned per-token temperature."""
from megatron_tempnet._warnings import hide_benign_warnings

__version__ = "0.1.0"

hide_benign_warnings()
