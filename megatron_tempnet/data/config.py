"""The data section of a training run: one field per Megatron-LM data/tokenizer flag.

Sequence length, seed and batch sizes are training flags (megatron_tempnet.config.TrainConfig);
they are passed to build_datasets / build_micro_batch_iterator as arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Datasets and tokenizer of a run; flags keep Megatron-LM's names.

    Attributes:
        data_path: dataset prefixes (data/corpus_text_document: the .bin/.idx pair of
            tools/preprocess_data.py), or a weighted blend "0.3 data/a 0.7 data/b"; an item
            may hold several whitespace-separated words.
        split: train,valid,test weights of each dataset's documents (a weight 0 drops a
            split).
        tokenizer_type: the tokenizer family: a SentencePiece model or a Hugging Face
            tokenizers JSON file; Megatron-LM's names map onto them (data/tokenizers.py
            TOKENIZER_TYPES; GPT2BPETokenizer's vocab + merges files are not read: use the
            model's tokenizer.json with HuggingFaceTokenizer).
        tokenizer_model: the SentencePiece .model file, or the tokenizers JSON file (or a
            directory holding tokenizer.json).
        data_cache_path: directory of megatron-core's sample-index cache, in a data-<key>
            sub-directory per version of the data files (None: <first prefix's
            directory>/index_cache; data/datasets.py cache_dir).
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        reset_position_ids: restart the position ids after every end-of-document token
            (learned positions only: RoPE ignores position ids, as in Megatron-LM).
        reset_attention_mask: Megatron-LM's document-isolating attention mask; NOT applied
            here yet: the pipeline builds no attention mask (causal attention spans the
            whole sequence, data/datasets.py create_attention_mask=False).
        eod_mask_loss: leave the end-of-document tokens out of the loss.
        mmap_bin_files: memory-map the .bin files (false: read them with file reads).
    """

    data_path: list[str] = field(default_factory=list)
    split: str = "949,50,1"
    tokenizer_type: str = "sentencepiece"
    tokenizer_model: str | None = None
    data_cache_path: str | None = None
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mmap_bin_files: bool = True
