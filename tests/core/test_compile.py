"""``torch.compile`` of a training step (CTRNN + RNNLoss) with ``fullgraph=True``: no graph break, and the
compiled loss gives eager's components and gradients (the input and every learned parameter), with and
without a mask, at two input sizes (the second one, masked, compiles anew; its 1170 samples take the
rate sums' path for more than 1024 samples).

On the CPU the graph is compiled with the ``aot_eager`` backend: it traces the same forward and backward
graphs as Inductor (Dynamo, AOTAutograd, functionalisation), in a few seconds; Inductor's C++ code generation
takes about 20 s on two cores, and the benchmark (``bench/bench_loss.py``) runs it. On CUDA the test uses
Inductor, the backend users get (its Triton kernels replace the package's own, which runs eagerly only).

Also: float16 and bfloat16 inputs accumulate in float32 when compiled as in eager; the checks of values
(mask weights, λ) become graph assertions, a RuntimeError with the rule's message (eager: ValueError); and on
CUDA, Inductor at the benchmark's size (where torch 2.11's Inductor once failed to compile the loss) meets the
accuracy bound against float64 of the formulas. The CPU's 10^7-rate accuracy check of the compiled loss is in
tests/runtimes/test_accuracy.py.

Tolerance: the compiled graphs reduce in another order (Inductor splits and fuses reductions). rtol 1e-4 is
the project's allowance across runtimes with other reduction orders, inside the range that the parity module
derives for sums of this length (docs/parity.md: 4e-5 to 3e-4); atol 1e-7 for gradients near 0. On the CPU
under aot_eager the components come out bit-identical and the gradients within 3e-7 relative.
"""
import re

import pytest
import torch

from cases import ALL_ON, CUDA, DEVICES, make_inputs, make_model
from reference import assert_meets_accuracy_bound, float64_statistics
from rnnloss import RNNLoss
from rnnloss.rules import Rule

RTOL, ATOL = 1e-4, 1e-7


def learned(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step(model, loss, x, label, mask):
    """One training step's loss and gradients: (components, grad of x, grads of the parameters)."""
    x = x.clone().requires_grad_(True)
    output, states = model(x)
    total, comps = loss(output, label, states, mask)
    grads = torch.autograd.grad(total, [x, *learned(model).values()])
    return comps.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager_without_graph_breaks(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    # On CUDA a realistic width for Inductor's kernels; the benchmark's size is the last test of this file
    model = make_model((3, 512 if device == "cuda" else 16, 2), activation="softplus").to(device)
    loss = RNNLoss(model, **ALL_ON)
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(3)
    for time, batch, masked in ((7, 5, False), (130, 9, True)):  # 1170 samples: a group of 1024 and the rest
        x = torch.randn(time, batch, 3, generator=g).to(device)
        label = torch.randn(time, batch, 2, generator=g).to(device)
        mask = torch.rand(time, batch, generator=g).to(device) if masked else None
        want, want_grads = step(model, loss, x, label, mask)
        got, got_grads = step(model, compiled, x, label, mask)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
        for name, a, b in zip(["x", *learned(model)], got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_loss_accumulates_half_precision_inputs_in_float32_as_eager_does(dtype):
    torch._dynamo.reset()
    model = make_model((3, 16, 2))
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 40, 8, dtype=dtype)
    with torch.no_grad():
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(pred, label, states)[1]
        want = loss(pred, label, states)[1]
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_compiled_loss_refuses_bad_mask_weights_and_lambdas_with_the_rules_message():
    torch._dynamo.reset()
    model = make_model((3, 16, 2))
    loss = RNNLoss(model, **ALL_ON)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    pred, label, states = make_inputs(model, 7, 5)
    mask = torch.ones(7, 5)
    compiled(pred, label, states, mask)
    mask[3, 2] = -1.0
    with pytest.raises(RuntimeError, match=re.escape(Rule.MASK_WEIGHTS.value)):
        compiled(pred, label, states, mask)
    with torch.no_grad():
        loss.lambdas[4] = -1.0  # written past set_lambda's check: forward's own check must catch it
    with pytest.raises(RuntimeError, match=re.escape(Rule.LAMBDAS_VALUES.value)):
        compiled(pred, label, states)


@pytest.mark.cuda
@CUDA
def test_inductor_at_the_benchmark_size_meets_the_accuracy_bound():
    # (T, B, N) = (500, 64, 512): 32,000 rows and 1.6e7 rates, the size of the benchmark's Inductor failure on
    # torch 2.11 (its mixed-order reductions start at 4,096 rows and 5 * 2^20 elements). The bounds of
    # docs/formulas.md, "Accuracy": mse and fr 1e-5 relative, fr_sd and fr_cv max(1e-5, 4 x the float32 floor).
    torch._dynamo.reset()
    model = make_model((3, 512, 2)).cuda()
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    g = torch.Generator().manual_seed(11)
    pred, label = torch.randn(500, 64, 2, generator=g), torch.randn(500, 64, 2, generator=g)
    states = torch.rand(500, 64, 512, generator=g)
    ref = float64_statistics(pred, label, states)
    compiled = torch.compile(loss, fullgraph=True)
    states_g = states.cuda().requires_grad_(True)
    total, got = compiled(pred.cuda(), label.cuda(), states_g)
    total.backward()  # the backward graph compiles too
    assert_meets_accuracy_bound(got, ref, "Inductor on CUDA")
    assert torch.isfinite(states_g.grad).all()
