"""Bad configurations fail early with a message naming the values and the fix."""
import pytest

from megatron_tempnet.config import ConfigError, ModelConfig, load_model_preset, padded_vocab_size
from megatron_tempnet.parallel import validate_layout


@pytest.mark.parametrize("kwargs,tp,pp,message", [
    (dict(num_attention_heads=6, hidden_size=96), 4, 1,
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_attention_heads=8, num_query_groups=2, hidden_size=64), 4, 1,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_layers=5), 1, 2, "--num-layers 5 is not divisible by --pipeline-model-parallel-size 2"),
    (dict(hidden_size=100, num_attention_heads=8), 1, 1,
     "--hidden-size 100 is not divisible by --num-attention-heads 8"),
    (dict(num_attention_heads=8, num_query_groups=3, hidden_size=64), 1, 1,
     "--num-attention-heads 8 is not divisible by --num-query-groups 3"),
    (dict(family="bert"), 1, 1, "--model-family 'bert' is unknown"),
])
def test_model_config_errors(kwargs, tp, pp, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig(**kwargs).validate(tp, pp)


def test_world_size_not_divisible():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor-parallel size 2 "
                                         "x pipeline-parallel size 2 = 4"):
        validate_layout(6, 2, 2)
    assert validate_layout(8, 2, 2) == 2


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'llama-9000'.*llama2-7b"):
        load_model_preset("llama-9000")


def test_unknown_field_in_preset(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("family: gpt\nhiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['hiden_size'\]"):
        load_model_preset(str(path))


def test_presets_validate_at_their_intended_layouts():
    for name, tp, pp in [("gpt2-125m", 1, 1), ("gpt2-350m", 2, 1), ("llama-1b", 1, 1),
                         ("llama2-7b", 2, 1), ("llama2-13b", 4, 2), ("llama2-70b", 8, 4),
                         ("tiny-gpt", 2, 2), ("tiny-llama", 2, 2)]:
        load_model_preset(name).validate(tp, pp)
    assert load_model_preset("llama2-70b").num_query_groups == 8
    assert load_model_preset("gpt2-125m").tie_embeddings is True
    assert load_model_preset("llama2-7b").tie_embeddings is False


def test_vocab_padding_like_megatron():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(256, 64, 2) == 256
