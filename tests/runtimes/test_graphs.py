"""The ONNX and torch.export graphs of the loss against eager mode, on shapes other than the export example
(torchvision-style: export, run on other shapes, compare), for all components on and each family alone; one
mixin, CPU and (marked ``cuda``) CUDA. And an AOTInductor build of the .pt2, with default options, refuses
mismatched shapes itself.

Tolerances: ONNX Runtime reduces in other orders, in float64 inside the graph: rtol 1e-4 (rnnloss.export.parity
derives it); the .pt2 runs the same ATen kernels as eager on float64 sums: rtol 1e-5, atol 1e-8 for entries
that are 0 in one and a few ulps in the other.
"""
import numpy as np
import pytest
import torch

from cases import CUDA, NAMES, lambdas_for
from rnnloss.export.artifacts import sample_inputs
from runtime_exports import export_to

# all on; mse alone; a weight penalty alone; the rate terms alone (they share one rate-sum pass)
ACTIVE_SETS = [tuple(range(7)), (0,), (2,), (4,), (5,), (6,)]
SHAPES = [(1, 1), (11, 1), (1, 6), (13, 9)]  # (time, batch); the export example is (5, 3)
RTOL_ORT, RTOL_SAME = 1e-4, 1e-5


@pytest.fixture(scope="module", params=ACTIVE_SETS, ids=lambda a: "+".join(NAMES[i] for i in a))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    config = {"model": {"dims": [3, 12, 2]}, "loss": lambdas_for(request.param), "example": {"time": 5, "batch": 3},
              "seed": len(request.param)}
    loss, _ = export_to(folder, config, {"rnn_loss.onnx", "rnn_loss.pt2"})
    return loss, folder


def normwise_error(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)


class ExportedGraphsMatchEager:
    device = "cpu"
    provider = "CPUExecutionProvider"

    def test_onnx_runtime_matches_eager(self, exported):
        import onnxruntime as ort
        loss, folder = exported
        session = ort.InferenceSession(str(folder / "rnn_loss.onnx"), providers=[self.provider])
        assert session.get_providers()[0] == self.provider
        for time, batch in SHAPES:
            pred, label, states = sample_inputs(loss, time, batch, seed=time * 100 + batch)
            with torch.no_grad():
                ref = [t.numpy() for t in loss(pred, label, states)]
            got = session.run(["total", "components"], {"pred": pred.numpy(), "label": label.numpy(),
                                                         "states": states.numpy()})
            for g, r in zip(got, ref):
                assert g.shape == r.shape and g.dtype == np.float32
                assert normwise_error(g, r) <= RTOL_ORT, (time, batch)
            assert np.array_equal(got[1] == 0, ref[1] == 0)  # inactive entries exactly 0 in both

    def test_exported_program_matches_eager_with_gradients(self, exported):
        import copy
        loss, folder = exported
        program = torch.export.load(str(folder / "rnn_loss.pt2"))
        eager = loss
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, self.device)
            eager = copy.deepcopy(loss).to(self.device)
        module = program.module()
        for time, batch in SHAPES:
            inputs = sample_inputs(loss, time, batch, seed=time * 100 + batch)
            pred, label, states = (t.to(self.device).requires_grad_(True) for t in inputs)
            ref, got = eager(pred, label, states), module(pred, label, states)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=RTOL_SAME, atol=1e-8)
            g_ref = torch.autograd.grad(ref[0], (pred, states), allow_unused=True, materialize_grads=True)
            g_got = torch.autograd.grad(got[0], (pred, states), allow_unused=True, materialize_grads=True)
            for g, r in zip(g_got, g_ref):
                torch.testing.assert_close(g, r, rtol=RTOL_SAME, atol=1e-8)


class TestExportedGraphsCPU(ExportedGraphsMatchEager):
    pass


@pytest.mark.cuda
@CUDA
class TestExportedGraphsCUDA(ExportedGraphsMatchEager):
    device = "cuda"
    provider = "CUDAExecutionProvider"

    def test_onnx_runtime_matches_eager(self, exported):
        import onnxruntime as ort
        if self.provider not in ort.get_available_providers():
            pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
        super().test_onnx_runtime_matches_eager(exported)


@pytest.mark.slow
def test_the_pt2_and_its_aotinductor_build_refuse_bad_shapes_with_default_options(tmp_path):
    """AOTInductor drops torch.export's input guards: the .pt2's size checks are graph nodes, which it keeps —
    also for N_out = 1, whose example would otherwise fix that axis (a fixed axis is checked by a guard only).
    ``module()`` checks no ranks: a label with extra trailing axes that hold more elements is refused by a node."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package
    loss, _ = export_to(tmp_path, {"model": {"dims": [3, 16, 1]}, "example": {"time": 6, "batch": 3}}, {"rnn_loss.pt2"})
    package = aoti_compile_and_package(torch.export.load(str(tmp_path / "rnn_loss.pt2")),
                                       package_path=str(tmp_path / "aoti.pt2"))
    compiled = aoti_load_package(package)
    g = torch.Generator().manual_seed(0)

    def inputs(pred=(7, 3, 1), label=None, states=(7, 3, 16)):
        return (torch.randn(*pred, generator=g), torch.randn(*(label or pred), generator=g),
                torch.rand(*states, generator=g))

    for args in (inputs(), inputs((1, 1, 1), states=(1, 1, 16)), inputs(states=(4, 5, 16))):
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args)[1], loss(*args)[1], rtol=RTOL_SAME, atol=1e-8)
    refused = {"pred and label must have the same shape": [inputs(label=(7, 4, 1)), inputs(label=(7, 1, 1)),
                                                            inputs(label=(7, 3, 2)), inputs(label=(8, 3, 1))],
               "states must have N_hid=16 as its last dimension": [inputs(states=(7, 3, 15))],
               "pred must have shape [time, batch, 1]": [inputs((7, 3, 2), states=(7, 3, 16))],
               "pred must not be empty": [inputs((0, 3, 1))]}
    for message, cases in refused.items():
        for args in cases:
            with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
                with torch.no_grad():
                    compiled(*args)
    program = torch.export.load(str(tmp_path / "rnn_loss.pt2")).module()
    extra = {"pred and label must have the same shape": (lambda p, l, s: (p, l[..., None].expand(7, 3, 1, 4), s)),
             "states must have N_hid=16 as its last dimension": (lambda p, l, s: (p, l, s[..., None].expand(7, 3, 16, 2))),
             r"pred must have shape \[time, batch, 1\]": (lambda p, l, s: (p[..., None].expand(7, 3, 1, 2), l, s))}
    for message, widen in extra.items():
        with pytest.raises(RuntimeError, match=message):
            program(*[t.contiguous() for t in widen(*inputs())])


CHECKED_AOTI = r"""
import sys, torch
from torch._inductor import aoti_compile_and_package, aoti_load_package
package = aoti_compile_and_package(torch.export.load(sys.argv[1]), package_path=sys.argv[2],
                                   inductor_configs={"aot_inductor.check_lowerbound": False})
compiled = aoti_load_package(package)
pred, label, states = torch.rand(7, 3, 1), torch.rand(7, 3, 1), torch.rand(7, 3, 16)
print("one", compiled(pred[:1, :1].contiguous(), label[:1, :1].contiguous(), states[:1, :1].contiguous())[0].item())
for name, args in [("transposed", (pred, torch.rand(3, 7, 1).transpose(0, 1), states)),
                   ("float64", (pred.double(), label.double(), states.double())),
                   ("rank4", (pred, label[..., None], states))]:
    try:
        print(name, "NUMBER", compiled(*args)[0].item())
    except Exception as e:
        print(name, "refused")
"""


@pytest.mark.slow
def test_the_documented_checked_aotinductor_build_refuses_layout_dtype_and_rank_and_takes_size_one(tmp_path):
    # docs/export.md: compile with check_lowerbound off, run with AOTI_RUNTIME_CHECK_INPUTS=1.
    import os
    import subprocess
    import sys
    loss, _ = export_to(tmp_path, {"model": {"dims": [3, 16, 1]}, "example": {"time": 6, "batch": 3}}, {"rnn_loss.pt2"})
    done = subprocess.run([sys.executable, "-c", CHECKED_AOTI, str(tmp_path / "rnn_loss.pt2"), str(tmp_path / "a.pt2")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert float(lines.pop("one")) >= 0
    assert lines == {"transposed": "refused", "float64": "refused", "rank4": "refused"}, lines
