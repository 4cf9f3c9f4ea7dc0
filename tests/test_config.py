"""Config loading: YAML + defaults includes, dotted overrides, validation errors that name the key."""

import glob
import os

import pytest
import yaml

from hstu.trainer.config import ConfigError, RunConfig, load_config, save_config, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_include_and_paper_hyperparameters():
    cfg = load_config(os.path.join(REPO, "configs/ml-1m/hstu.yaml"))
    assert cfg.data.name == "ml-1m" and cfg.data.max_seq_len == 200 and cfg.data.batch_size == 128
    assert (cfg.model.arch, cfg.model.num_layers, cfg.model.num_heads, cfg.model.attention_dim) == ("hstu", 2, 1, 50)
    assert cfg.loss.num_negatives == 128 and cfg.loss.temperature == 0.05
    assert cfg.optim.betas == (0.9, 0.98) and cfg.train.epochs == 101
    large = load_config(os.path.join(REPO, "configs/ml-1m/hstu-large.yaml"))
    assert (large.model.num_layers, large.model.num_heads, large.model.attention_dim) == (8, 2, 25)
    books = load_config(os.path.join(REPO, "configs/amzn-books/hstu.yaml"))
    assert books.data.max_seq_len == 50 and books.loss.num_negatives == 512 and books.model.dropout == 0.5


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs/**/*.yaml"), recursive=True)))
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_dotted_overrides_parse_types():
    cfg = load_config(None, ["model.num_layers=4", "optim.lr=3e-4", "eval.ks=[1,5]", "data.data_dir=/x",
                             "train.stochastic_length.enabled=true", "data.synthetic.num_users=7"])
    assert cfg.model.num_layers == 4 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.eval.ks == [1, 5] and cfg.data.data_dir == "/x"
    assert cfg.train.stochastic_length.enabled is True and cfg.data.synthetic.num_users == 7


def test_int_accepted_for_float_but_not_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.num_layers=2.5"])


@pytest.mark.parametrize("override,key", [
    ("model.num_layerz=3", "model.num_layerz"),
    ("modle.num_layers=3", "modle.num_layers"),
    ("train.epochs=abc", "train.epochs"),
    ("train.stochastic_length.enabled=maybe", "train.stochastic_length.enabled"),
    ("model.arch=gpt", "model.arch"),
    ("train.epochs=0", "train.epochs"),
    ("model.num_layers.x=1", "model.num_layers.x"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["model.num_layers"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  num_layers: 2\n  hidden_size: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "model.hidden_size" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(str(p))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "broken.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/ml-1m/sasrec.yaml"), ["train.epochs=3"])
    out = tmp_path / "config.yaml"
    save_config(cfg, str(out))
    assert not (tmp_path / "config.yaml.tmp").exists()
    again = load_config(str(out))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(out.read_text())["train"]["epochs"] == 3
