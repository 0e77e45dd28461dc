"""CUDA-only behaviour of the loss's checks and gradients (marker ``cuda``; skipped without a GPU).

- No host–device synchronisation per call: forward (eager and scripted, with or without a mask) runs under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising operation.
- A bad mask or a bad λ written into the buffer on CUDA is an asynchronous device-side assertion in eager mode
  (checked in a subprocess, since the assertion ends the CUDA context of the process that hits it) and a NaN
  result in a scripted module (TorchScript drops device-side assertions).
- Second-order gradients on CUDA equal the CPU ones (float64, rounding-level agreement).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from cases import ALL_ON, CUDA, make_inputs, make_model
from rnnloss import RNNLoss

pytestmark = [pytest.mark.cuda, CUDA]


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_forward_does_not_synchronise_once_lambdas_were_validated(with_mask, scripted):
    model = make_model((3, 16, 2)).cuda()
    loss = RNNLoss(model, **ALL_ON)
    assert loss.lambdas.device == model.readout_layer.weight.device  # made on the model's device
    if scripted:
        loss = torch.jit.script(loss)
    pred, label, states = make_inputs(model, 7, 5, device="cuda")
    mask = torch.rand(pred.shape[:-1], device="cuda") if with_mask else None
    for _ in range(4 if scripted else 1):  # TorchScript's profiling executor settles its graph in the first calls
        loss(pred, label, states, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            total, _ = loss(pred, label, states, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


def test_bad_mask_on_cuda_is_a_device_side_assertion_not_a_number():
    code = textwrap.dedent("""
        import torch
        from rnnloss import CTRNN, RNNLoss
        loss = RNNLoss(CTRNN((3, 8, 2)).cuda())
        pred = torch.randn(5, 3, 2, device="cuda")
        total, _ = loss(pred, torch.zeros_like(pred), None, -torch.ones(5, 3, device="cuda"))
        print("VALUE", total.item())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "VALUE" not in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("bad", ["mask", "lambda"])
def test_bad_weights_on_cuda_are_a_device_side_assertion_in_eager_and_nan_when_scripted(bad):
    code = textwrap.dedent(f"""
        import torch
        from rnnloss import CTRNN, RNNLoss
        loss = RNNLoss(CTRNN((3, 8, 2)).cuda(), lambda_fr=0.5)
        if "{bad}" == "lambda":
            with torch.no_grad():
                loss.lambdas[4] = -1.0
        pred = torch.randn(5, 3, 2, device="cuda")
        states = torch.rand(5, 3, 8, device="cuda")
        mask = -torch.ones(5, 3, device="cuda") if "{bad}" == "mask" else None
        scripted = torch.jit.script(loss)
        print("SCRIPTED", scripted(pred, torch.zeros_like(pred), states, mask)[0].item())
        total, _ = loss(pred, torch.zeros_like(pred), states, mask)
        print("VALUE", total.item())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "SCRIPTED nan" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0 and "VALUE" not in result.stdout, result.stdout + result.stderr


def test_hessian_vector_product_on_cuda_equals_cpu():
    model = make_model((3, 6, 2), dtype=torch.float64)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 4, 3)
    v = torch.randn(states.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def hvp(loss, pred, label, states, v):
        states = states.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(pred, label, states)[0], states, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), states)
        return h

    ref = hvp(loss, pred, label, states, v)
    got = hvp(RNNLoss(make_model((3, 6, 2), dtype=torch.float64).cuda(), **ALL_ON),
              pred.cuda(), label.cuda(), states.cuda(), v.cuda())
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-14)
