"""The export config: the embedded default, and strict validation.

Every key is optional; the default fills the rest. Anything unknown, mistyped or out of range raises
:class:`ConfigError` naming the key (the CLI prints that one line, exit 2). Numbers are finite and at most the
largest float32 (the modules compute in float32); seeds are what ``torch.manual_seed`` accepts.
"""
import difflib
import functools
import json
import math
from importlib import resources
from typing import Any, Dict

from ..model import ACTIVATIONS, INIT_STATES
from ..rules import FLOAT32_MAX, LAMBDA_NAMES


class ConfigError(ValueError):
    """A config problem; ``str()`` is one line: ``<key>: <problem>``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


SEED_MAX = 2**64 - 1  # torch.manual_seed takes a 64-bit unsigned seed
MAX_CONFIG_CHARS = 1 << 20


def _show(v: Any) -> str:
    """``v`` as JSON for a message: one short line, whatever its size or depth."""
    try:
        text = json.dumps(v)
    except (ValueError, RecursionError):
        text = f"a {type(v).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=None)
def _default_text() -> str:
    return resources.files("rnnloss.export").joinpath("default_config.json").read_text()


def default_config() -> Dict[str, Any]:
    """A fresh copy of the embedded default config (the package file is read once per process)."""
    return json.loads(_default_text())


# Validators: (key, value) -> the value to keep, or ConfigError.

def _integer(key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {_show(v)}")
    return v


def _positive(key, v):
    if _integer(key, v) <= 0:
        raise ConfigError(key, f"must be > 0, got {v}")
    return v


def _within(check, low, high, problem):
    """``check``, then ``low <= value <= high``, else ``problem`` (a format string taking the value)."""
    def validator(key, v):
        if not low <= check(key, v) <= high:
            raise ConfigError(key, problem.format(v))
        return v
    return validator


def _number(key, v, *, positive):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"expected a number, got {_show(v)}")
    if not math.isfinite(v):
        raise ConfigError(key, f"must be finite, got {v}")
    if abs(v) > FLOAT32_MAX:
        raise ConfigError(key, f"must be at most {FLOAT32_MAX!r} (the largest float32), got {v!r}")
    if v < 0 or (positive and v == 0):
        raise ConfigError(key, f"must be {'>' if positive else '>='} 0, got {v}")
    return float(v)


def _one_of(options):
    def validator(key, v):
        if v not in options:
            raise ConfigError(key, f"expected one of {list(options)}, got {_show(v)}")
        return v
    return validator


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {_show(v)}")
    return v


def _dims(key, v):
    if not isinstance(v, list) or len(v) != 3:
        raise ConfigError(key, f"expected a list [N_in, N_hid, N_out] of three positive integers, got {_show(v)}")
    return [_positive(f"{key}[{i}]", d) for i, d in enumerate(v)]


_POSITIVE = functools.partial(_number, positive=True)
_NON_NEGATIVE = functools.partial(_number, positive=False)
# torch.export would specialise a size-1 axis, and the graph would not be dynamic.
_SIZE = _within(_positive, 2, math.inf, "must be >= 2 (the exported graphs take any size; a size-1 example would "
                                        "fix the axis at 1), got {}")
_SEED = _within(_integer, 0, SEED_MAX, f"must be from 0 to 2**64 - 1 = {SEED_MAX} (what torch.manual_seed accepts), "
                                       "got {}")
_OPSET = _within(_positive, 17, 23, "expected null (17) or an ONNX opset from 17 to 23, got {}")

SCHEMA = {
    "model": {"dims": _dims, "tau": _POSITIVE, "dt": _POSITIVE, "activation": _one_of(ACTIVATIONS),
              "batch_first": _bool, "preact_noise": _NON_NEGATIVE, "postact_noise": _NON_NEGATIVE,
              "init_state": _one_of(INIT_STATES), "learn_alpha": _bool},
    "loss": {name: _NON_NEGATIVE for name in LAMBDA_NAMES},
    "example": {"time": _SIZE, "batch": _SIZE},
    # ExecuTorch programs: the model's fixed number of time steps (the loss's largest), every program's largest batch
    "executorch": {"time": _SIZE, "max_batch": _SIZE},
    "seed": _SEED,
    "opset": lambda key, v: None if v is None else _OPSET(key, v),
    "mask": _bool,  # the loss graphs take a fourth input, mask, shaped like pred
}


def _unknown(key: str, valid) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {'key' if '.' in key else 'section'}{hint}; expected one of {list(valid)}"


def validate(raw: Any) -> Dict[str, Any]:
    """Merge ``raw`` over the default and check every key; returns the full config."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"expected a JSON object, got {type(raw).__name__}")
    config = default_config()
    for section, value in raw.items():
        if section not in SCHEMA:
            raise ConfigError(section, _unknown(section, SCHEMA))
        spec = SCHEMA[section]
        if callable(spec):
            config[section] = spec(section, value)
        elif value is None and section == "executorch":  # no ExecuTorch programs (a machine without executorch)
            config[section] = None
        elif not isinstance(value, dict):
            raise ConfigError(section, f"expected an object{' or null' if section == 'executorch' else ''}, "
                                       f"got {_show(value)}")
        else:
            for key, item in value.items():
                if key not in spec:
                    raise ConfigError(f"{section}.{key}", _unknown(f"{section}.{key}", spec))
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
            text = f.read(MAX_CONFIG_CHARS + 1)  # a bounded read: --config /dev/zero must not fill memory
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("--config", f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigError("--config", f"{path} is longer than {MAX_CONFIG_CHARS} characters; a config is a few lines")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError("--config", f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError("--config", f"{path} is nested too deeply (a config has two levels)") from None
    return validate(raw)
