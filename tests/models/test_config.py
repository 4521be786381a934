import pytest

from moetrt.errors import ConfigError
from moetrt.models import PRESETS, ModelConfig, get_preset


def test_presets_are_valid_and_round_trip_through_json(tmp_path):
    for name, config in PRESETS.items():
        path = tmp_path / f"{name}.json"
        config.to_json(path)
        assert ModelConfig.from_json(path) == config
        assert ModelConfig.from_json(config.to_json()) == config


def test_350m_preset_matches_the_published_model():
    c = get_preset("gpt-moe-350m-64e")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size) == (24, 1024, 16, 4096, 51200)
    assert c.moe_layers == tuple(range(1, 24, 2)) and c.num_experts == 64 and c.top_k == 1
    counts = c.parameter_counts()
    # 0.35B active per token (the model's name); experts dominate the total
    assert 0.35e9 < counts["active"] < 0.36e9
    experts = 12 * 64 * (2 * 4096 * 1024 + 4096 + 1024)
    assert counts["total"] - experts == counts["active"] - 12 * (2 * 4096 * 1024 + 4096 + 1024)


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(moe_layers=(1, 4)), "layer index 4 is out of range"),
    (dict(moe_layers=(-1,)), "layer index -1 is out of range"),
    (dict(top_k=2, num_experts=1), "top_k (2) is larger than num_experts (1)"),
    (dict(top_k=3), "top_k must be 1 or 2"),
    (dict(moe_layers=(1, 1)), "duplicates"),
    (dict(moe_layers=(3, 1)), "must be sorted"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(moe_capacity_factor=-1.0), "moe_capacity_factor must be >= 0"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(moe_layers=(), num_experts=8), "moe_layers is empty"),
    (dict(num_experts=0), "num_experts must be >= 1"),
])
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_preset("tiny").replace(**change)


def test_unknown_fields_and_bad_json_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict(get_preset("tiny").to_dict() | {"num_expert": 3})
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gpt-5")
