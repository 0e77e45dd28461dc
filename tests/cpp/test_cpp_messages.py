"""The C++ library refuses what Python refuses, with Python's exception type and message: every rule of
the table that the C++ side enforces (``where(rule)`` contains "C"), the generated header, and λ checked
where they are written (constructor, set_lambda, rnnloss::load, and forward for the buffer)."""
import math

import pytest
import torch

from cpp_cases import ALL_ON, ROOT, lambdas_for, loss_inputs, make_loss, python_error, run_cases
from rnnloss import CTRNN, RNNLoss, rules
from rnnloss.export.native import NATIVE, native_payload, save_native
from rnnloss.rules import Rule, where

pytestmark = [pytest.mark.cpp, pytest.mark.xdist_group("cpp")]  # one worker builds and runs the C++
CPP_RULES = {rule for rule in Rule if "C" in where(rule)}
RATES = dict(lambda_mse=1.0, lambda_fr=0.1, lambda_fr_sd=0.1, lambda_fr_cv=0.1)  # no weight penalty
C10_KIND = {"c10::Error": "RuntimeError"}  # what Python calls the exception C++ throws as c10::Error


def test_rules_header_is_generated_from_the_rules_table():
    header = (ROOT / "cpp" / "src" / "rules.h").read_text()
    assert header == rules.cpp_header(), "cpp/src/rules.h is stale: python -m rnnloss.rules cpp > cpp/src/rules.h"


def cases_by_rule():
    """{rule: [(C++ case, Python callable or the expected (kind, message)), ...]}: each rule's misuses, on the
    artifacts of :func:`artifacts` (0: every component on, 1: mse and rate terms, 2: mse only)."""
    full, rates = make_loss(), make_loss(lambdas=RATES)
    mse_only = make_loss(lambdas=dict(lambda_mse=1.0))
    model = full.model
    pred, label, states = loss_inputs(full)
    x = torch.randn(4, 2, 3)
    out = {}

    def add(rule, case, reference):
        out.setdefault(rule, []).append((case, reference))

    def call(rule, loss, index, p=pred, l=label, s=states, m=None, meta=()):
        case = {"kind": "loss", "artifact": index, "pred": p, "label": l, "states": s, "mask": m, "meta": list(meta)}
        moved = [t.to("meta") if t is not None and k in meta else t
                 for k, t in zip(("pred", "label", "states", "mask"), (p, l, s, m))]
        add(rule, case, lambda: loss(*moved))

    def forward(rule, *args):
        add(rule, {"kind": "forward", "artifact": 0, "x": args[0], "init_state": args[1] if len(args) > 1 else None,
                   "g_out": torch.zeros(()), "g_states": torch.zeros(())}, lambda: model(*args))

    def ctrnn(rule, expected=None, **options):
        kwargs = {k: (tuple(v) if isinstance(v, list) and k.endswith("masks") else v) for k, v in options.items()
                  if k != "n_hid"}
        dims = (3, options.get("n_hid", 8), 2)
        add(rule, {"kind": "ctrnn", "options": {"n_in": 3, "n_hid": 8, "n_out": 2, **options}},
            expected or (lambda: CTRNN(dims, **kwargs)))

    def set_lambda(rule, name, value, index=1, loss=rates):
        add(rule, {"kind": "set_lambda", "artifact": index, "calls": [(name, value)]},
            lambda: loss.set_lambda(name, value))

    def write_lambdas(rule, index, value, loss=rates, artifact=1):
        lambdas = loss.lambdas.clone()
        lambdas[index] = value

        def write_and_call():
            original = loss.lambdas.clone()
            with torch.no_grad():
                loss.lambdas.copy_(lambdas)
            try:
                loss(pred, label, states)
            finally:
                with torch.no_grad():
                    loss.lambdas.copy_(original)
        add(rule, {"kind": "loss", "artifact": artifact, "pred": pred, "label": label, "states": states,
                   "lambdas": lambdas}, write_and_call)

    def replace_lambdas(rule, replacement):
        def replace_and_call():
            loss = RNNLoss(model, lambda_mse=1.0)
            loss.lambdas = replacement
            loss(pred, label)
        add(rule, {"kind": "loss", "artifact": 2, "pred": pred, "label": label, "replace_lambdas": replacement},
            replace_and_call)

    # the loss's constructor, set_lambda and the λ buffer
    add(Rule.MODEL_TYPE, {"kind": "empty_model"},  # C++'s counterpart of Python's RNNLoss(None) ("NoneType")
        ("TypeError", Rule.MODEL_TYPE.value.format("an empty CTRNN holder")))
    set_lambda(Rule.LAMBDA_NAME, "rate", 0.1)
    for value in (-1.0, math.nan, math.inf, 1e39):
        set_lambda(Rule.LAMBDA_VALUE, "fr", value)
    for index, value in [(2, -0.1), (4, math.nan), (6, 1e39)]:
        lambdas = [0.0] * 7
        lambdas[index] = value
        kwargs = dict(lambdas_for([]), **{list(ALL_ON)[index]: value})
        add(Rule.LAMBDA_VALUE, {"kind": "loss_options", "artifact": 0, "lambdas": lambdas},
            lambda kwargs=kwargs: RNNLoss(model, **kwargs))
    write_lambdas(Rule.LAMBDA_VALUE, 4, -1.0)
    write_lambdas(Rule.LAMBDA_VALUE, 5, math.nan)
    set_lambda(Rule.LAMBDA_INACTIVE, "in", 0.5)
    write_lambdas(Rule.LAMBDA_INACTIVE, 1, 0.5)
    replace_lambdas(Rule.LAMBDAS_BUFFER, torch.ones(7, dtype=torch.float32))
    replace_lambdas(Rule.LAMBDAS_BUFFER, torch.ones(6, dtype=torch.float64))
    # Off the CPU forward asserts on the device; its message is the rule's (a device assertion carries
    # no exception type: RuntimeError in Python, c10::Error in C++).
    for index, value in [(0, -1.0), (5, math.nan), (1, 0.5)]:
        lambdas = rates.lambdas.clone()
        lambdas[index] = value
        add(Rule.LAMBDAS_VALUES, {"kind": "device_lambda_check", "artifact": 1, "lambdas": lambdas},
            ("RuntimeError", Rule.LAMBDAS_VALUES.value))
    # forward's inputs
    for p, l, s in [(pred.long(), label, states), (pred, label.int(), states), (pred, label, states > 0.5)]:
        call(Rule.NOT_FLOAT, full, 0, p, l, s)
    call(Rule.EMPTY, full, 0, pred[:0], label[:0], states)
    call(Rule.EMPTY, full, 0, pred, label, states[:0])
    call(Rule.LABEL_SHAPE, full, 0, pred, label[:, :1])
    for meta in [("label",), ("states",), ("pred", "label", "states")]:  # the last: not the model's device
        call(Rule.DEVICE, full, 0, meta=meta)
    call(Rule.DEVICE, full, 0, m=torch.ones(pred.shape), meta=("mask",))
    call(Rule.STATES_MISSING, rates, 1, s=None)
    call(Rule.STATES_LAST_DIM, full, 0, s=states[..., :5])
    call(Rule.STATES_LAST_DIM, full, 0, s=torch.tensor(0.5))
    call(Rule.MASK_DTYPE, full, 0, m=torch.ones(pred.shape, dtype=torch.complex64))
    for shape in [pred.shape[:-1] + (1,), pred.shape + (1,), pred.shape[:1]]:
        call(Rule.MASK_SHAPE, full, 0, m=torch.ones(shape))
    for bad in (-1.0, math.nan, math.inf):
        mask = torch.ones(pred.shape)
        mask[1, 1, 0] = bad
        call(Rule.MASK_WEIGHTS, full, 0, m=mask)
    call(Rule.MASK_WEIGHTS, full, 0, m=-torch.ones(pred.shape[:-1], dtype=torch.int64))
    # the model's forward
    forward(Rule.NOT_FLOAT, x.long())
    forward(Rule.NOT_FLOAT, x, torch.zeros(2, 8, dtype=torch.int64))
    forward(Rule.EMPTY, x[:, :0])
    forward(Rule.X_SHAPE, x[0])
    forward(Rule.X_SHAPE, x[..., :2])
    forward(Rule.X_DTYPE, x.double())
    forward(Rule.INIT_STATE_SHAPE, x, torch.zeros(2, 7))
    # the model's constructor
    ctrnn(Rule.DIMS, n_hid=0)
    for options in [dict(tau=0.0), dict(tau=-1e-5), dict(dt=math.nan), dict(tau=math.inf)]:
        ctrnn(Rule.POSITIVE, **options)
    for options in [dict(preact_noise=-1.0), dict(postact_noise=math.nan)]:
        ctrnn(Rule.NON_NEGATIVE, **options)
    ctrnn(Rule.DT_ABOVE_TAU, dt=200.0)
    ctrnn(Rule.CHOICE, activation="gelu")
    ctrnn(Rule.CHOICE, init_state="keep")
    ctrnn(Rule.PER_LAYER, biases=["uniform", "normal"])
    ctrnn(Rule.PER_LAYER, weights=["zero"] * 4)
    # C++ takes no tensors for weights or biases, and spells Python's None and False "fixed" and "absent":
    # the choices it lists are its own.
    ctrnn(Rule.LAYER_CHOICE, ("ValueError", Rule.LAYER_CHOICE.value.format(
        "weights", "hidden", "['uniform', 'normal', 'zero']", "'gelu'")), weights=["uniform", "gelu", "zero"])
    ctrnn(Rule.LAYER_CHOICE, ("ValueError", Rule.LAYER_CHOICE.value.format(
        "biases", "readout", "['uniform', 'normal', 'zero', 'fixed', 'absent']", "'none'")),
        biases=["uniform", "zero", "none"])
    ctrnn(Rule.LAYER_SHAPE, sparsity_masks=[None, torch.ones(8, 7), None])
    ctrnn(Rule.LAYER_SHAPE, ei_masks=[torch.ones(2), None, None])
    ctrnn(Rule.LAYER_FINITE, plasticity_masks=[None, torch.full((8, 8), math.nan), None])
    ctrnn(Rule.EI_VALUES, ei_masks=[None, torch.full((8,), 2.0), None])
    ctrnn(Rule.PLASTICITY_VALUES, plasticity_masks=[None, None, -torch.ones(2, 8)])
    return [native_payload(full), native_payload(rates), native_payload(mse_only)], out


def test_every_cpp_rule_raises_pythons_exception_and_message(cpp_build, tmp_path):
    artifacts, by_rule = cases_by_rule()
    assert set(by_rule) == CPP_RULES, f"rules without a case: {CPP_RULES - set(by_rule)}"
    entries = [(rule, case, ref) for rule, pairs in by_rule.items() for case, ref in pairs]
    results = run_cases(cpp_build, tmp_path, artifacts, [case for _, case, _ in entries])
    for (rule, case, reference), got in zip(entries, results):
        kind, message = reference if isinstance(reference, tuple) else python_error(reference)
        assert message.startswith(rule.value.split("{}")[0]), (rule, message)  # the case hits its rule
        assert (got[0], C10_KIND.get(got[1], got[1]), got[2]) == ("error", kind, message), (rule, case.get("kind"))


def test_lambda_writes_python_accepts_are_accepted_and_exact(cpp_build, tmp_path):
    # An inactive component may be set to 0; λ keep their float64 value (no float32 rounding).
    artifacts = [native_payload(make_loss(lambdas=RATES))]
    calls = [("in", 0.0), ("fr", 0.1 + 0.2), ("mse", 3), ("fr_cv", 0.0)]
    results = run_cases(cpp_build, tmp_path, artifacts, [{"kind": "set_lambda", "artifact": 0, "calls": calls},
                                                         {"kind": "loss_options", "artifact": 0,
                                                          "lambdas": [1.0, 0.0, 0.0, 0.0, 1e-5 * 1.5, 0.0, 0.0]}])
    python = make_loss(lambdas=RATES)
    for name, value in calls:
        python.set_lambda(name, value)
    assert results[0][0] == "ok" and torch.equal(results[0][1], python.lambdas)
    assert results[1][0] == "ok" and results[1][1][4].item() == 1e-5 * 1.5


def test_device_lambda_check_accepts_a_valid_buffer(cpp_build, tmp_path):
    loss = make_loss(lambdas=RATES)
    lambdas = loss.lambdas.clone()
    lambdas[4] = rules.float32_max()  # the largest λ allowed
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)],
                        [{"kind": "device_lambda_check", "artifact": 0, "lambdas": lambdas}])
    assert results[0] == ("ok",)


def test_a_component_annealed_to_zero_stays_active_after_load(cpp_build, tmp_path):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_fr=0.25))
    loss.set_lambda("fr", 0.0)
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)],
                        [{"kind": "set_lambda", "artifact": 0, "calls": [("fr", 0.5)]},
                         {"kind": "set_lambda", "artifact": 0, "calls": [("in", 0.5)]}])
    assert results[0][0] == "ok" and results[0][1].tolist() == [1.0, 0, 0, 0, 0.5, 0, 0]
    assert results[1] == ("error", "ValueError", Rule.LAMBDA_INACTIVE.value.format("lambda_in", "in", "in"))


# ---- rnnloss::load: the file's λ with the rules' messages, sizes before allocation, unknown keys ----

def lambda_message(index, rule, *args):
    return rules.Rule[rule].value.format(f"lambdas[{index}] ('{rules.COMPONENT_NAMES[index]}')", *args)


@pytest.mark.parametrize("change, problem", [
    (lambda p: p["loss"].update(component_names=["mse", "in", "hid", "out", "rate", "fr_sd", "fr_cv"]),
     "'loss.component_names' is ['mse', 'in', 'hid', 'out', 'rate', 'fr_sd', 'fr_cv'], this library's are "
     "['mse', 'in', 'hid', 'out', 'fr', 'fr_sd', 'fr_cv']: it was written by another version of rnnloss"),
    (lambda p: p["loss"]["lambdas"].__setitem__(4, 0.3), lambda_message(4, "LAMBDA_INACTIVE", "fr", "fr")),
    (lambda p: p["loss"]["lambdas"].__setitem__(0, -1.0), lambda_message(0, "LAMBDA_VALUE", "a negative value")),
    (lambda p: p["loss"]["lambdas"].__setitem__(1, math.nan), lambda_message(1, "LAMBDA_VALUE", "NaN")),
    (lambda p: p["loss"]["lambdas"].__setitem__(1, 1e39),
     lambda_message(1, "LAMBDA_VALUE", "a value beyond float32's range")),
    (lambda p: p["loss"].update(active=[True] * 6), "'loss.active' must be a list of 7 bools, got "
     "[True, True, True, True, True, True]"),
    (lambda p: p["loss"].update(active=[True, 1, False, False, False, False, False]),
     "'loss.active' must be a list of 7 bools, got [True, 1, False, False, False, False, False]"),
    (lambda p: p["loss"].update(active="all"), "'loss.active' must be a list of 7 bools, got 'all'"),
    (lambda p: p.update(version="1"), "has format version '1' (a string); this library reads version 1"),
    (lambda p: p.update(version=2), "has format version 2; this library reads version 1"),
    (lambda p: p["state_dict"].update({"readout_layer.weight": torch.zeros(2, 8, dtype=torch.int64)}),
     "'state_dict.readout_layer.weight' must be a floating-point tensor, got dtype torch.int64"),
    # Checked against the weights before a model of that size is allocated.
    (lambda p: p["model"].update(dims=[3, 2**62, 2]),
     "'model.dims' is [3, 4611686018427387904, 2] but 'state_dict.recurrent_layer.input_layer.weight' has shape "
     "[8, 3]"),
    # Python pickles 10**12 in 6 bytes; libtorch's unpickler reads only 8-byte ints and fails first.
    (lambda p: p["model"].update(dims=[3, 10**12, 2]), "it holds an integer of magnitude 2^31 or more that "
     "libtorch's unpickler cannot read (Expected length to be 8, got 6)"),
], ids=["component_names", "inactive_lambda", "negative_lambda", "nan_lambda", "huge_lambda", "active_six",
        "active_int", "active_str", "version_str", "version_2", "int_tensor", "absurd_dims", "unpicklable_dims"])
def test_load_refuses_an_inconsistent_file_in_one_line(cpp_build, tmp_path, change, problem):
    payload = native_payload(make_loss(lambdas=dict(lambda_mse=1.0, lambda_in=0.1)))  # dims (3, 8, 2); fr inactive
    change(payload)
    torch.save(payload, tmp_path / NATIVE)
    (result,) = run_cases(cpp_build, tmp_path, [], [{"kind": "load", "path": str(tmp_path)}])
    kind, message = result[1], result[2]
    assert (result[0], kind) == ("error", "ValueError") and "\n" not in message, result
    assert message.startswith(f"rnnloss::load: {tmp_path / NATIVE}: ") or \
        message.startswith(f"rnnloss::load: {tmp_path / NATIVE} has format") or \
        message.startswith(f"rnnloss::load: cannot read {tmp_path / NATIVE}: "), message
    assert problem in message, message


def test_load_reads_the_exports_file_and_ignores_its_metadata(cpp_build, tmp_path):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_hid=0.5, lambda_fr_sd=0.25))
    loss.set_lambda("hid", 1 / 3)
    save_native(loss, tmp_path / NATIVE, metadata='{"config": {"seed": 0}}')
    payload = torch.load(tmp_path / NATIVE, weights_only=True)
    payload["future_key"] = {"anything": [1, 2.5, "x"]}  # keys this version does not know are ignored too
    torch.save(payload, tmp_path / "more.pt")
    results = run_cases(cpp_build, tmp_path, [], [{"kind": "load", "path": str(tmp_path)},
                                                  {"kind": "load", "path": str(tmp_path / "more.pt")}])
    for status, lambdas, active, values, names in results:
        assert status == "ok"
        assert torch.equal(lambdas, loss.lambdas) and list(active) == ["mse", "hid", "fr_sd"]
        params = dict(loss.model.named_parameters())
        assert list(names) == list(params)
        for name, value in zip(names, values):
            assert torch.equal(value, params[name].detach()), name
