"""The export config (DESIGN.md §5): the embedded default, and strict validation.

Every key is optional; the default fills the rest. Anything unknown, mistyped or out of range
raises :class:`ConfigError` naming the key, so the CLI can print one line and exit 2.
"""
import copy
import json
import math
from importlib import resources
from typing import Any, Dict

from .loss import LAMBDA_NAMES
from .model import ACTIVATIONS, INIT_STATES


class ConfigError(ValueError):
    """A config problem; ``str()`` is one line: ``<key>: <problem>``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def default_config() -> Dict[str, Any]:
    return json.loads(resources.files("rnnloss").joinpath("default_config.json").read_text())


def _positive_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {json.dumps(v)}")
    if v <= 0:
        raise ConfigError(key, f"must be > 0, got {v}")
    return v


def _non_negative_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {json.dumps(v)}")
    if v < 0:
        raise ConfigError(key, f"must be >= 0, got {v}")
    return v


def _number(key, v, *, positive=False, minimum=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"expected a number, got {json.dumps(v)}")
    if not math.isfinite(v):
        raise ConfigError(key, f"must be finite, got {v}")
    if positive and v <= 0:
        raise ConfigError(key, f"must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {v}")
    return float(v)


def _dims(key, v):
    if not isinstance(v, list) or len(v) != 3:
        raise ConfigError(key, f"expected a list [N_in, N_hid, N_out] of three positive integers, got {json.dumps(v)}")
    return [_positive_int(f"{key}[{i}]", d) for i, d in enumerate(v)]


def _activation(key, v):
    if v not in ACTIVATIONS:
        raise ConfigError(key, f"expected one of {list(ACTIVATIONS)}, got {json.dumps(v)}")
    return v


def _init_state(key, v):
    if v not in INIT_STATES:
        raise ConfigError(key, f"expected one of {list(INIT_STATES)}, got {json.dumps(v)}")
    return v


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {json.dumps(v)}")
    return v


def _opset(key, v):
    if v is None:
        return None
    value = _positive_int(key, v)
    if not 18 <= value <= 23:
        raise ConfigError(key, f"expected null or an ONNX opset from 18 to 23, got {value}")
    return value


SCHEMA = {
    "model": {"dims": _dims, "tau": lambda k, v: _number(k, v, positive=True),
              "dt": lambda k, v: _number(k, v, positive=True), "activation": _activation, "batch_first": _bool,
              "preact_noise": lambda k, v: _number(k, v, minimum=0), "postact_noise": lambda k, v: _number(k, v, minimum=0),
              "init_state": _init_state, "learn_alpha": _bool},
    "loss": {name: (lambda k, v: _number(k, v, minimum=0)) for name in LAMBDA_NAMES},
    "example": {"time": _positive_int, "batch": _positive_int},
    "seed": lambda k, v: _non_negative_int(k, v),
    "opset": _opset,
    "mask": _bool,  # the loss graphs take a fourth input, mask, shaped like pred
}


def validate(raw: Any) -> Dict[str, Any]:
    """Merge ``raw`` over the default and check every key; returns the full config."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"expected a JSON object, got {type(raw).__name__}")
    config = default_config()
    for section, value in raw.items():
        if section not in SCHEMA:
            raise ConfigError(section, f"unknown section; expected one of {list(SCHEMA)}")
        spec = SCHEMA[section]
        if callable(spec):
            config[section] = spec(section, value)
            continue
        if not isinstance(value, dict):
            raise ConfigError(section, f"expected an object, got {json.dumps(value)}")
        for key, item in value.items():
            if key not in spec:
                raise ConfigError(f"{section}.{key}", f"unknown key; expected one of {list(spec)}")
            config[section][key] = spec[key](f"{section}.{key}", item)
    model = config["model"]
    if model["dt"] > model["tau"]:
        raise ConfigError("model.dt", f"must not exceed model.tau ({model['tau']}), got {model['dt']}")
    return config


def load(path) -> Dict[str, Any]:
    """Read and validate a JSON config file; ``None`` gives the embedded default."""
    if path is None:
        return validate({})
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return validate(copy.deepcopy(raw))
