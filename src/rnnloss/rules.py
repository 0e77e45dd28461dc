"""The package's tables: the components (:class:`Term`) and every refusal (:class:`Rule`).

Each :class:`Rule` member's value is its message template (``{}`` filled in order by the raiser). How
the same text reaches every runtime: docs/design.md ("Every refusal is a row of one table");
``python -m rnnloss.rules cpp|docs`` writes ``cpp/src/rules.h`` and ``docs/errors.md``.

:func:`float32_max` is the one Python spelling of the largest λ (and config number) accepted.
"""
import enum
import math
import sys
from typing import List

import torch
from torch import Tensor


def float32_max() -> float:
    """The largest float32, (2 - 2^-23) * 2^127: a λ (and a config number) must stay finite in float32.
    A function, not a literal, because TorchScript cannot read a float defined outside its code."""
    return (2.0 - 2.0 ** -23) * 2.0 ** 127


FLOAT32_MAX = float32_max()


class Term(enum.Enum):
    """The seven components, in the order of the ``components`` vector; ``Term.FR.value`` indexes it (in
    TorchScript too)."""
    MSE = 0
    IN = 1
    HID = 2
    OUT = 3
    FR = 4
    FR_SD = 5
    FR_CV = 6


COMPONENT_NAMES = tuple(term.name.lower() for term in Term)
LAMBDA_NAMES = tuple("lambda_" + name for name in COMPONENT_NAMES)


class Rule(enum.Enum):
    # the loss: constructor and set_lambda
    UNKNOWN_KEYWORD = "RNNLoss got an unexpected keyword argument {}{}; valid keywords are {}"
    MODEL_TYPE = "model must be a CTRNN (or a subclass), got {}"
    LAMBDA_TYPE = "{} must be a real number (int or float), got {}"
    LAMBDA_VALUE = "{} must be finite in float32 and >= 0, got {}"
    LAMBDA_INACTIVE = ("{} is non-zero but component '{}' is inactive (its lambda was 0 at construction); "
                       "build the loss with a non-zero lambda_{}")
    LAMBDA_NAME = "set_lambda: name must be one of {}, got '{}'"
    LAMBDAS_BUFFER = "lambdas must be a float64 tensor of shape [7], got dtype {} and shape {}"
    LAMBDAS_VALUES = "lambdas must be finite in float32, >= 0, and 0 for inactive components"
    SYNC_EAGER_ONLY = ("RNNLoss(sync_stats=True) runs eagerly only: its all-reduce of the statistics cannot be "
                       "scripted or exported; build the loss with sync_stats=False for TorchScript, ONNX or "
                       "torch.export")
    SYNC_NO_GROUP = ("RNNLoss(sync_stats=True) needs torch.distributed initialised: call "
                     "torch.distributed.init_process_group before the first forward")
    # the loss: forward
    NOT_FLOAT = "{} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {}"
    EMPTY = "{} must not be empty, got shape {}"
    LABEL_SHAPE = "pred and label must have the same shape, got pred {} and label {}"
    DEVICE = "{} must be on the device of {} ({}), got {}"
    STATES_MISSING = "states is required when lambda_fr, lambda_fr_sd or lambda_fr_cv > 0, got None"
    STATES_LAST_DIM = "states must have N_hid={} as its last dimension, got shape {}"
    MASK_DTYPE = "mask must be a real tensor (floating point, integer or bool), got dtype {}"
    MASK_SHAPE = "mask must have pred's shape {} or pred's shape without its last axis {}, got shape {}"
    MASK_WEIGHTS = "mask must hold finite weights >= 0"
    # exported graphs only (what eager checks differently or not at all)
    GRAPH_SHAPE = "{} must have shape {}"
    # the model: forward
    X_SHAPE = "x must have shape {} with N_in={}, got shape {}"
    X_DTYPE = "x must have the model's dtype {}, got dtype {}"
    INIT_STATE_SHAPE = "init_state must have shape [B, N_hid] = {}, got shape {}"
    # the model: constructor
    DIMS = "dims must be a sequence (N_in, N_hid, N_out) of three positive ints, got {}"
    POSITIVE = "{} must be a finite number > 0, got {}"
    NON_NEGATIVE = "{} must be a finite number >= 0, got {}"
    DT_ABOVE_TAU = "dt must not exceed tau (alpha = dt / tau must be <= 1), got dt={}, tau={}"
    CHOICE = "{} must be one of {}, got {}"
    PER_LAYER = "{} must be one value or a sequence of three (input, hidden, readout), got {}"
    LAYER_CHOICE = "{} for the {} layer must be one of {}, got {}"
    LAYER_SHAPE = "{} for the {} layer must have shape {}, got {}"
    LAYER_FINITE = "{} for the {} layer must be finite"
    EI_VALUES = "ei_masks for the {} layer must hold only +1, -1 and 0"
    PLASTICITY_VALUES = "plasticity_masks for the {} layer must be >= 0 (gradient scales)"


# Rules raised as TypeError (c10::TypeError in C++); every other rule is a ValueError.
TYPE_ERRORS = frozenset({Rule.UNKNOWN_KEYWORD, Rule.MODEL_TYPE, Rule.LAMBDA_TYPE, Rule.NOT_FLOAT, Rule.MASK_DTYPE,
                         Rule.X_DTYPE, Rule.PER_LAYER})
# Where each rule is enforced, for the error reference: E eager, S TorchScript, C native C++, G exported graphs
# (ONNX Runtime, onnx.reference, tract, onnx2torch, .pt2, AOTInductor, the ExecuTorch programs).
WHERE = {Rule.UNKNOWN_KEYWORD: "E", Rule.LAMBDA_TYPE: "E", Rule.SYNC_EAGER_ONLY: "ES", Rule.SYNC_NO_GROUP: "E",
         Rule.MODEL_TYPE: "EC",
         Rule.LAMBDA_NAME: "ESC", Rule.LAMBDA_VALUE: "ESC", Rule.LAMBDA_INACTIVE: "ESC", Rule.LAMBDAS_BUFFER: "ESC",
         Rule.LAMBDAS_VALUES: "ESC",
         Rule.NOT_FLOAT: "ESC", Rule.EMPTY: "ESCG", Rule.LABEL_SHAPE: "ESCG", Rule.DEVICE: "ESC",
         Rule.STATES_MISSING: "ESC", Rule.STATES_LAST_DIM: "ESCG", Rule.MASK_DTYPE: "ESC", Rule.MASK_SHAPE: "ESCG",
         Rule.MASK_WEIGHTS: "ESCG", Rule.GRAPH_SHAPE: "G", Rule.X_SHAPE: "ESC",
         Rule.X_DTYPE: "ESC", Rule.INIT_STATE_SHAPE: "ESC"}


def where(rule: Rule) -> str:
    """The runtimes that enforce ``rule`` (letters of :data:`WHERE`; model constructor rules: E and C)."""
    return WHERE.get(rule, "EC")


def head(rule: Rule, *static) -> str:
    """The part of ``rule``'s message an exported graph raises: up to ``, got`` and up to the first ``{}``
    that ``static`` (values known at export time, such as N_hid) does not fill."""
    parts = rule.value.split(", got")[0].split("{}")
    return "{}".join(parts[:len(static) + 1]).rstrip().format(*static)


def error(rule: Rule, *args) -> Exception:
    """The exception ``rule`` raises, for eager-only code (scripted code raises its own, same text)."""
    return (TypeError if rule in TYPE_ERRORS else ValueError)(rule.value.format(*args))


# ---- scriptable helpers: eager and TorchScript run these, so both raise the same text ----

def dtype_name(t: Tensor) -> str:
    """``torch.float32`` etc. (TorchScript would print a dtype as its integer code)."""
    names = ["torch.float32", "torch.float64", "torch.float16", "torch.bfloat16", "torch.bool", "torch.uint8",
             "torch.int8", "torch.int16", "torch.int32", "torch.int64", "torch.complex64", "torch.complex128"]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8,
              torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128]
    for i in range(len(dtypes)):
        if t.dtype == dtypes[i]:
            return names[i]
    return "a non-floating dtype"


def shape_of(t: Tensor) -> List[int]:
    """The shape as a list: prints ``[2, 3]`` in eager and TorchScript alike."""
    return list(t.shape)


def check_float_tensor(t: Tensor, name: str) -> None:
    """NOT_FLOAT unless ``t`` is a real floating tensor, EMPTY if it has no elements."""
    if not t.is_floating_point():
        raise TypeError(Rule.NOT_FLOAT.value.format(name, dtype_name(t)))
    if t.numel() == 0:
        raise ValueError(Rule.EMPTY.value.format(name, shape_of(t)))


def lambda_problem(value: float) -> str:
    """What is wrong with ``value`` as a λ ('' when nothing): words, not digits, since eager, TorchScript
    and C++ print floats differently and the message must be the same everywhere."""
    if math.isnan(value):
        return "NaN"
    if value < 0.0:
        return "a negative value"
    if value > float32_max():
        return "a value beyond float32's range"
    return ""


def check_lambda(name: str, value: float, active: bool, component: str) -> None:
    """LAMBDA_VALUE for a value that is not a λ, LAMBDA_INACTIVE for a non-zero λ of an inactive component."""
    problem = lambda_problem(value)
    if problem != "":
        raise ValueError(Rule.LAMBDA_VALUE.value.format(name, problem))
    if value != 0.0 and not active:
        raise ValueError(Rule.LAMBDA_INACTIVE.value.format(name, component, component))


# ---- generated files ----

def cpp_header() -> str:
    """``cpp/src/rules.h``: the table as C++ constants (``kLabelShape`` ...), and the float32 limit."""
    lines = ["// Generated from src/rnnloss/rules.py by `python -m rnnloss.rules cpp`; do not edit.",
             "// Each message is a template: rules::format fills the {} in order (see rules.cpp).", "#pragma once", "",
             "namespace rnnloss::rules {", "",
             f"inline constexpr double kFloat32Max = {FLOAT32_MAX!r};", "",
             "/// The components, in the order of the components vector.",
             "enum Term : int { " + ", ".join("k" + t.name.title().replace("_", "") for t in Term) + " };",
             "inline constexpr const char* kComponentNames[] = {" + ", ".join(f'"{n}"' for n in COMPONENT_NAMES)
             + "};", ""]
    def camel(rule: Rule) -> str:
        return "k" + "".join(part.capitalize() for part in rule.name.split("_"))
    for rule in Rule:
        text = rule.value.replace("\\", "\\\\").replace('"', '\\"')
        kind = "TypeError" if rule in TYPE_ERRORS else "ValueError"
        lines.append(f"inline constexpr const char* {camel(rule)} = \"{text}\";  // {kind}, {where(rule)}")
    lines += ["", "/// The rules raised as TypeError (c10::TypeError); every other is a ValueError.",
              "inline constexpr const char* kTypeErrors[] = {" + ", ".join(camel(r) for r in Rule if r in TYPE_ERRORS)
              + "};"]
    return "\n".join(lines + ["", "}  // namespace rnnloss::rules", ""])


def docs_reference() -> str:
    """``docs/errors.md``: every rule, its exception type, its message and where it is enforced."""
    legend = {"E": "eager", "S": "TorchScript", "C": "C++", "G": "exported graphs"}
    out = ["# Errors", "", "<!-- Generated from src/rnnloss/rules.py by `python -m rnnloss.rules docs`. -->", "",
           "Every refusal, with the same text in every runtime that enforces it. `{}` are filled with what was "
           "given; an exported graph raises the text before `, got` (it cannot format run-time values). "
           "TorchScript raises the message as `torch.jit.Error` in Python, C++ as `c10::Error` "
           "(`c10::TypeError` / `c10::ValueError`).", "",
           "| rule | raises | message | enforced in |", "|---|---|---|---|"]
    for rule in Rule:
        kind = "TypeError" if rule in TYPE_ERRORS else "ValueError"
        runtimes = ", ".join(legend[c] for c in where(rule))
        out.append(f"| `{rule.name}` | {kind} | {rule.value.replace('|', '&#124;')} | {runtimes} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover - exercised by the staleness tests
    sys.stdout.write({"cpp": cpp_header, "docs": docs_reference}[sys.argv[1]]())
