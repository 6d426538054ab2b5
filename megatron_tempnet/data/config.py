"""The data section of a training run: one field per Megatron-LM data/tokenizer flag.

Sequence length, seed and batch sizes are training flags (megatron_tempnet.config.TrainConfig);
they are passed to build_datasets / build_micro_batch_iterator as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # --data-path: prefixes ("data/corpus_text_document"), or weighted "0.3 data/a 0.7 data/b";
    # an item may hold several whitespace-separated words.
    data_path: list[str] = field(default_factory=list)
    split: str = "949,50,1"  # train,valid,test weights of each dataset's documents
    tokenizer_type: str = "sentencepiece"  # or huggingface; Megatron-LM names accepted too
    tokenizer_model: str | None = None  # .model file, or tokenizers JSON file / directory
    # sample-index cache (None: <first prefix dir>/index_cache), in a data-<key> sub-directory
    # per version of the data files (datasets.cache_dir)
    data_cache_path: str | None = None
    num_workers: int = 0  # DataLoader worker processes per rank
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mmap_bin_files: bool = True
