"""megatron-tempnet: Megatron-style GPT/LLaMA pretraining with a learned per-token temperature."""
__version__ = "0.1.0"
