import pytest

from graft.config import FitConfig, load_config, parse_head, parse_unfreeze
from graft.errors import GraftError


def test_defaults_then_yaml_then_overrides(tmp_path):
    config_file = tmp_path / "graft.yaml"
    config_file.write_text("model:\n  backbone: resnet50.a1_in1k\ntrain:\n  lr: 0.01\n  epochs: 7\n")
    config = load_config(config_file, {"train.lr": 0.002, "train.epochs": None})
    assert config.model.backbone == "resnet50.a1_in1k"  # from YAML
    assert config.train.lr == 0.002  # the flag wins over YAML
    assert config.train.epochs == 7  # an unset flag (None) leaves the YAML value
    assert config.train.strategy == "finetune"  # default


def test_unknown_key_names_the_file_and_key(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(GraftError, match=r"bad.yaml: unknown key 'train.learning_rate'.*lr"):
        load_config(config_file)


@pytest.mark.parametrize("key, value, message", [
    ("train.strategy", "magic", "strategy 'magic'"),
    ("model.head", "mlp:abc", "mlp:WIDTH"),
    ("train.unfreeze", "last:0", "last:K"),
    ("data.val_fraction", 1.5, "val_fraction"),
    ("model.pool", "sum", "pool 'sum'"),
    ("train.bn_stats", "sometimes", "bn_stats"),
])
def test_invalid_values_are_rejected_with_the_fix(key, value, message):
    with pytest.raises(GraftError, match=message):
        load_config(None, {key: value})


def test_head_and_unfreeze_specs():
    assert parse_head("linear") == []
    assert parse_head("mlp:512,256") == [512, 256]
    assert parse_unfreeze("all") is None
    assert parse_unfreeze("last:2") == 2


def test_round_trip_through_dict():
    config = load_config(None, {"model.cut_at": "layer3", "data.image_size": 64})
    assert FitConfig.from_dict(config.to_dict()) == config
