import pytest

from data_helpers import TOKENIZER_KINDS, UNICODE_DOCS
from megatron_tempnet.data.tokenizers import (NO_PAD_ID, TokenizerConfig, TokenizerError,
                                              build_tokenizer, load_tokenizer, token_dtype)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_roundtrip_unicode_and_whitespace(tokenizers, corpus_docs, kind):
    tok = tokenizers[kind]
    for text in UNICODE_DOCS + corpus_docs[:50]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(UNICODE_DOCS) == [tok.tokenize(t) for t in UNICODE_DOCS]


def test_special_ids(tokenizers):
    sp, bpe = tokenizers["sentencepiece"], tokenizers["huggingface"]
    assert (sp.eod, sp.bos, sp.pad) == (2, 1, 3)  # LLaMA layout: </s>, <s>, plus <pad>
    assert bpe.eod == 0 and bpe.bos is None and bpe.pad == 1  # <|endoftext|>, <|pad|>
    assert sp.eod not in sp.tokenize("plain text")


def test_explicit_special_tokens(tokenizer_configs):
    cfg = tokenizer_configs["huggingface"]
    tok = load_tokenizer("HuggingFaceTokenizer", cfg.model, eod_token="<|pad|>", pad_token=None)
    assert tok.eod == 1
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer("hf", cfg.model, eod_token="<nope>")


def test_no_pad_token_uses_megatron_sentinel(tokenizer_configs):
    tok = build_tokenizer(tokenizer_configs["huggingface"])
    tok.pad_id = None
    assert tok.pad == NO_PAD_ID


def test_padded_vocab_size(tokenizers):
    sp, bpe = tokenizers["sentencepiece"], tokenizers["huggingface"]
    assert (sp.vocab_size, bpe.vocab_size) == (800, 600)
    assert sp.padded_vocab_size() == 896
    assert sp.padded_vocab_size(128, tensor_parallel_size=2) == 1024
    assert sp.padded_vocab_size(1, 1) == 800
    assert bpe.padded_vocab_size(128, 1) == 640
    assert bpe.padded_vocab_size(64, 4) == 768


def test_token_dtype_threshold():
    assert token_dtype(65499).__name__ == "uint16"
    assert token_dtype(65500).__name__ == "int32"


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_missing_tokenizer_file_names_the_path(tmp_path, kind):
    missing = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(TokenizerError, match=str(missing)) as e:
        build_tokenizer(TokenizerConfig(kind, str(missing)))
    assert "not found" in str(e.value)


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer("sentencepiece", str(bad))
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'gpt2'"):
        load_tokenizer("gpt2", str(bad))
