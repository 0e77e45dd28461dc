"""``torch.compile`` of a training step (CTRNN + RNNLoss) with ``fullgraph=True``: no graph break, and the
compiled loss gives eager's components and gradients (the input and every learned parameter), with and
without a mask, at two input sizes (the second one, masked, compiles anew; its 1170 samples take the
rate sums' path for more than 1024 samples).

On the CPU the graph is compiled with the ``aot_eager`` backend: it traces the same forward and backward
graphs as Inductor (Dynamo, AOTAutograd, functionalisation), in a few seconds; Inductor's C++ code generation
takes about 20 s on two cores, and the benchmark (``bench/bench_loss.py``) runs it. On CUDA the test uses
Inductor, the backend users get (its Triton kernels replace the package's own, which runs eagerly only).

Tolerance: the compiled graphs reduce in another order (Inductor splits and fuses reductions), so rtol 1e-4,
the contract's bound across runtimes with different reduction orders; atol 1e-7 for gradients near 0.
"""
import pytest
import torch

from cases import ALL_ON, DEVICES, make_model
from rnnloss import RNNLoss

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
    # Inductor picks its reduction kernels by size (on torch 2.11 it failed on CUDA at the bench's N_hid = 512)
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
