"""The export config: every problem is exit 2 and one line naming the key, with nothing left behind; typos get a
suggestion; the shipped default is the embedded one."""
import json

import pytest
import torch

from cases import ROOT, one_line
from rnnloss.export.config import ConfigError, default_config, validate

NESTED = '{"model": ' + "[" * 100000 + "]" * 100000 + "}"
FLOAT32_MAX = "3.4028234663852886e+38"  # the largest float32, as Python prints it
BAD_CONFIGS = {
    "not_json": ("{model: ", "--config: "),
    "unknown_section": ({"modle": {}}, "modle: unknown section (did you mean 'model'?)"),
    "unknown_key": ({"loss": {"lamda_fr": 0.1}}, "loss.lamda_fr: unknown key (did you mean 'lambda_fr'?)"),
    "typo_of_a_model_key": ({"model": {"activaton": "tanh"}}, "model.activaton: unknown key (did you mean "
                                                              "'activation'?)"),
    "unknown_key_unlike_any": ({"example": {"zzz": 1}}, "example.zzz: unknown key; expected one of ['time', 'batch']"),
    "section_not_an_object": ({"model": [3, 8, 2]}, "model: expected an object, got [3, 8, 2]"),
    "wrong_type": ({"model": {"tau": "fast"}}, 'model.tau: expected a number, got "fast"'),
    "bool_as_number": ({"model": {"tau": True}}, "model.tau: expected a number, got true"),
    "dims_zero": ({"model": {"dims": [3, 0, 2]}}, "model.dims[1]: must be > 0, got 0"),
    "dims_short": ({"model": {"dims": [3, 2]}}, "model.dims: expected a list"),
    "negative_lambda": ({"loss": {"lambda_fr": -1}}, "loss.lambda_fr: must be >= 0, got -1"),
    "nan_lambda": ('{"loss": {"lambda_hid": NaN}}', "loss.lambda_hid: must be finite, got nan"),
    "lambda_over_float32": ({"loss": {"lambda_fr": 1e39}}, f"loss.lambda_fr: must be at most {FLOAT32_MAX}"),
    "tau_over_float32": ({"model": {"tau": 1e300}}, f"model.tau: must be at most {FLOAT32_MAX}"),
    "dt_above_tau": ({"model": {"dt": 200.0}}, "model.dt: must not exceed model.tau (100.0), got 200.0"),
    "time_zero": ({"example": {"time": 0}}, "example.time: must be > 0, got 0"),
    "batch_one": ({"example": {"batch": 1}}, "example.batch: must be >= 2"),
    "batch_float": ({"example": {"batch": 2.5}}, "example.batch: expected an integer, got 2.5"),
    "activation": ({"model": {"activation": "gelu"}}, "model.activation: expected one of"),
    "opset": ({"opset": 7}, "opset: expected null (17) or an ONNX opset from 17 to 23, got 7"),
    "mask_not_bool": ({"mask": 1}, "mask: expected true or false, got 1"),
    "top_level_list": ([], "(top level): expected a JSON object"),
    # torch.manual_seed takes 0 ... 2**64 - 1.
    "seed_2_pow_64": ('{"seed": 18446744073709551616}', "seed: must be from 0 to 2**64 - 1"),
    "seed_negative": ({"seed": -1}, "seed: must be from 0 to 2**64 - 1"),
    "nested_too_deep": (NESTED, "is nested too deeply"),
    "deep_value": ('{"model": {"dims": ' + "[" * 500 + "]" * 500 + "}}", "model.dims: expected a list"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_exits_2_with_one_line_naming_the_key_and_leaves_nothing(case, tmp_path, run_cli):
    content, expected = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    status, _, err = run_cli(["--config", path, "--out", "out"], tmp_path)
    assert status == 2
    line = one_line(err)
    assert line.startswith("rnnloss-export: config error: ") and expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", "Exceeds the limit"),
    (b" " * (2 << 20), "longer than 1048576 characters"),
], ids=["not_utf8", "5000_digit_integer", "two_MiB"])
def test_an_unreadable_config_exits_2_in_one_line(tmp_path, run_cli, content, message):
    (tmp_path / "c.json").write_bytes(content)
    status, _, err = run_cli(["--config", "c.json", "--out", "out"], tmp_path)
    assert status == 2 and message in one_line(err)


def test_an_endless_config_file_is_read_boundedly(tmp_path, run_cli):
    status, _, err = run_cli(["--config", "/dev/zero", "--out", "out"], tmp_path)
    assert status == 2 and "longer than 1048576 characters" in one_line(err)


def test_a_missing_config_file_is_one_line(tmp_path, run_cli):
    status, _, err = run_cli(["--config", tmp_path / "nope.json"], tmp_path)
    assert status == 2 and "--config: cannot read" in one_line(err)


def test_the_largest_seed_torch_accepts_is_valid():
    assert validate({"seed": 2**64 - 1})["seed"] == 2**64 - 1
    torch.manual_seed(2**64 - 1)  # the bound is torch's own


def test_validate_fills_every_key_from_the_default_and_keeps_the_given_ones():
    config = validate({"model": {"dims": [2, 5, 1]}, "loss": {"lambda_fr": 0}})
    default = default_config()
    assert config["model"]["dims"] == [2, 5, 1] and config["model"]["tau"] == default["model"]["tau"]
    assert config["loss"]["lambda_fr"] == 0.0 and config["loss"]["lambda_mse"] == default["loss"]["lambda_mse"]
    assert set(config) == set(default)


def test_a_config_error_is_a_value_error_naming_its_key():
    with pytest.raises(ConfigError) as err:
        validate({"example": {"time": -3}})
    assert isinstance(err.value, ValueError) and err.value.key == "example.time"


def test_the_default_config_turns_every_component_on():
    assert all(v > 0 for v in default_config()["loss"].values())


def test_the_shipped_default_config_is_the_embedded_default():
    shipped = ROOT / "export" / "configs" / "default.json"
    assert json.loads(shipped.read_text()) == default_config() == validate({})


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "export" / "configs").glob("*.json")))
def test_every_shipped_config_is_valid(name):
    validate(json.loads((ROOT / "export" / "configs" / name).read_text()))
