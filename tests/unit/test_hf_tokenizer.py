"""The exported tokenizer (megatron_tempnet/hf/tokenizer.py): AutoTokenizer loads a fast
tokenizer with a pad token that gives training's ids (no BOS or EOS added) for SentencePiece
BPE / unigram models and byte-level BPE JSON files, decodes them back, and an export that would
not is refused."""
import json

import pytest
from transformers import AutoTokenizer

from data_helpers import UNICODE_DOCS
from megatron_tempnet.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer
from megatron_tempnet.data.tokenizers import TokenizerError, load_tokenizer
from megatron_tempnet.hf.tokenizer import check_exported_tokenizer, export_tokenizer

EXTRA = ["", " ", "  a  b   c ", "\n\n x\t\ty", "1234 5678", "<s> </s> <pad> <unk>",
         "<|endoftext|><|pad|>", "▁x ▁ y", "🙂🙂 ☃ \u00a0nbsp"]


@pytest.fixture(scope="module")
def unigram_path(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("unigram") / "sp_unigram.model"
    return train_tokenizer(TokenizerTrainingConfig([str(corpus_file)], str(out),
                                                   "sentencepiece-unigram", vocab_size=700))


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-unigram", "huggingface"])
def test_exported_tokenizer_gives_training_ids(kind, tmp_path, tokenizers, unigram_path,
                                               corpus_docs):
    ours = (load_tokenizer("sentencepiece", unigram_path) if kind == "sentencepiece-unigram"
            else tokenizers[kind])
    texts = corpus_docs[:150] + UNICODE_DOCS + EXTRA
    ids = export_tokenizer(ours.path, tmp_path, model_max_length=4096, probe_texts=texts)
    assert ids == {"bos_token_id": ours.eod, "eos_token_id": ours.eod,
                   "pad_token_id": ours.pad_id if ours.pad_id is not None else ours.eod}
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert ("tokenizer.model" in names) == (kind != "huggingface")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.is_fast and len(hf) == ours.vocab_size and hf.model_max_length == 4096
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == tuple(ids.values())
    for text in texts:
        expected = ours.tokenize(text)
        assert hf(text)["input_ids"] == expected, text
        assert hf.decode(expected) == ours.detokenize(expected), text
    batch = hf(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][-1] == ids["pad_token_id"]  # padding works (right side)


@pytest.mark.parametrize("kind", ["sentencepiece-bpe", "sentencepiece-unigram"])
def test_sentencepiece_without_byte_fallback(kind, tmp_path, corpus_file, corpus_docs):
    """Without byte fallback, characters outside the vocabulary are <unk> in both (SentencePiece
    decodes it as " ⁇ ", so only the ids are compared there)."""
    path = train_tokenizer(TokenizerTrainingConfig([str(corpus_file)], str(tmp_path / "t.model"),
                                                   kind, vocab_size=600, byte_fallback=False))
    ours = load_tokenizer("sentencepiece", path)
    texts = corpus_docs[:100] + UNICODE_DOCS + EXTRA + ["日本語 7 ☃", "x ☃☃ 9 日"]
    assert any(ours._sp.unk_id() in ours.tokenize(t) for t in texts)
    out = tmp_path / "out"
    out.mkdir()
    export_tokenizer(path, out, model_max_length=128, probe_texts=texts)
    hf = AutoTokenizer.from_pretrained(out)
    assert [hf(t)["input_ids"] for t in texts] == [ours.tokenize(t) for t in texts]


def test_post_processor_adding_specials_is_dropped(tmp_path, tokenizers):
    """A tokenizers JSON whose post-processor adds a BOS (e.g. LLaMA 3's): training encoded
    without it (add_special_tokens=False), so the export adds nothing either."""
    from tokenizers import Tokenizer, processors

    src = tokenizers["huggingface"]
    tok = Tokenizer.from_file(src.path)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", src.eod)])
    assert tok.encode("hello").ids[0] == src.eod
    path = tmp_path / "with_bos.json"
    tok.save(str(path))
    out = tmp_path / "out"
    out.mkdir()
    export_tokenizer(str(path), out, model_max_length=128)
    hf = AutoTokenizer.from_pretrained(out)
    assert hf("hello")["input_ids"] == src.tokenize("hello")
    assert src.tokenize("hello")[0] != src.eod


def test_a_tokenizer_giving_other_ids_is_refused(tmp_path, tokenizers, unigram_path):
    ours = tokenizers["sentencepiece"]
    export_tokenizer(ours.path, tmp_path, model_max_length=128)

    class OffByOne:  # training's tokenizer, as if the conversion had shifted an id
        path, vocab_size, detokenize = ours.path, ours.vocab_size, ours.detokenize

        def tokenize(self, text):
            return [i + (i == ours.tokenize("Hello")[-1]) for i in ours.tokenize(text)]

    with pytest.raises(TokenizerError, match="encodes 'Hello world.*please report"):
        check_exported_tokenizer(tmp_path, OffByOne(), ["x", "Hello world, the value is 42."])
    with pytest.raises(TokenizerError, match="800 tokens; training's .*sp_unigram.model has 7"):
        check_exported_tokenizer(tmp_path, load_tokenizer("sentencepiece", unigram_path), ["x"])
