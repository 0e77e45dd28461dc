"""ONNX and torch.export graphs of the loss against eager, on shapes other than the export
example (torchvision-style: export, run on other shapes, compare), for all components on, each
component alone and MSE only. CPU always; CUDA (ORT CUDA provider, .pt2 on CUDA) where present."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import CUDA, NAMES, lambdas_for, make_model
from rnnloss import RNNLoss, export

ACTIVE_SETS = [tuple(range(7))] + [(i,) for i in range(7)]  # (0,) is "MSE only"
SHAPES = [(1, 1), (11, 1), (1, 6), (13, 9)]  # (time, batch); the export example is (5, 3)
RTOL_ORT = 1e-4  # other runtime, other reduction order: see rnnloss.parity for the derivation
RTOL_SAME = 1e-5  # .pt2 runs the same ATen kernels as eager


def normwise_error(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.fixture(scope="module", params=ACTIVE_SETS, ids=lambda a: "+".join(NAMES[i] for i in a))
def exported(request, tmp_path_factory):
    model = make_model((3, 12, 2), seed=len(request.param))
    loss = RNNLoss(model, **lambdas_for(request.param)).eval()
    folder = tmp_path_factory.mktemp("graphs")
    example = export.sample_inputs(loss, 5, 3, seed=0)
    export.export_onnx(loss, example, folder / "loss.onnx", opset=None)
    export.export_pt2(loss, example, folder / "loss.pt2")
    return loss, folder


class ExportedGraphsMatchEager:
    device = "cpu"
    provider = "CPUExecutionProvider"

    def inputs(self, loss, time, batch):
        return export.sample_inputs(loss, time, batch, seed=time * 100 + batch)

    def test_onnx_runtime_matches_eager(self, exported):
        loss, folder = exported
        session = ort.InferenceSession(str(folder / "loss.onnx"), providers=[self.provider])
        assert session.get_providers()[0] == self.provider
        for time, batch in SHAPES:
            pred, label, states = self.inputs(loss, time, batch)
            with torch.no_grad():
                ref = [t.numpy() for t in loss(pred, label, states)]
            got = session.run(["total", "components"], {"pred": pred.numpy(), "label": label.numpy(),
                                                         "states": states.numpy()})
            for g, r in zip(got, ref):
                assert g.shape == r.shape and g.dtype == np.float32
                assert normwise_error(g, r) <= RTOL_ORT, (time, batch)
            assert np.array_equal(got[1] == 0, ref[1] == 0)  # inactive entries exactly 0 in both

    def test_exported_program_matches_eager_with_gradients(self, exported):
        loss, folder = exported
        program = torch.export.load(str(folder / "loss.pt2"))
        eager = loss
        if self.device != "cpu":
            import copy
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, self.device)
            eager = copy.deepcopy(loss).to(self.device)
        module = program.module()
        for time, batch in SHAPES:
            pred, label, states = (t.to(self.device).requires_grad_(True) for t in self.inputs(loss, time, batch))
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
        if self.provider not in ort.get_available_providers():
            pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
        super().test_onnx_runtime_matches_eager(exported)


@pytest.mark.cuda
@CUDA
def test_eager_cuda_matches_eager_cpu():
    model = make_model((3, 64, 2))
    loss = RNNLoss(model, **lambdas_for(tuple(range(7))))
    cuda = RNNLoss(make_model((3, 64, 2)).cuda(), **lambdas_for(tuple(range(7))))
    for time, batch in SHAPES:
        inputs = export.sample_inputs(loss, time, batch, seed=1)
        with torch.no_grad():
            ref = loss(*inputs)
            got = cuda(*[t.cuda() for t in inputs])
        for g, r in zip(got, ref):
            assert normwise_error(g.cpu(), r) <= RTOL_ORT

