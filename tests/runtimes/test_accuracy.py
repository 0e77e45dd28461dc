"""The exported graphs keep the accuracy bound at 10^7 elements (ONNX Runtime CPU and the .pt2), and so does
``torch.compile`` of the loss (traced with the ``aot_eager`` backend: the compile-only sums, on the CPU),
against float64 of the formulas on the same float32 inputs (tests/reference.py, NumPy only):

- mse and fr within 1e-5 relative;
- fr_sd and fr_cv within max(1e-5, 4 × floor), the floor being the relative change of σ (or σ/μ)
  when the exact per-neuron means are rounded once to float32 — what any float32 result of σ
  must allow for near-constant rates (10 + randn: means 10 ± 0.007 at N_hid = 512).

The model has N_out = N_hid so that pred, label and states all hold 10^7 elements. One export per N_hid,
sessions reused."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from reference import assert_meets_accuracy_bound, float64_statistics
from runtime_exports import export_to

SHAPES = {64: (625, 250, 64), 512: (1250, 16, 512)}  # (T, B, N): 1.0e7 and 1.02e7 elements
RATES = {
    "relu_randn": lambda g, shape: torch.randn(shape, generator=g).clamp_min(0),
    "uniform": lambda g, shape: torch.rand(shape, generator=g),
    "ten_plus_randn": lambda g, shape: 10 + torch.randn(shape, generator=g),
}


@pytest.fixture(scope="module", params=sorted(SHAPES), ids=lambda n: f"N_hid={n}")
def graphs(request, tmp_path_factory):
    n = request.param
    folder = tmp_path_factory.mktemp(f"accuracy{n}")
    rates = {"lambda_mse": 1.0, "lambda_fr": 1.0, "lambda_fr_sd": 1.0, "lambda_fr_cv": 1.0}
    loss, _ = export_to(folder, {"model": {"dims": [3, n, n]}, "loss": rates, "example": {"time": 5, "batch": 3}},
                        {"rnn_loss.onnx", "rnn_loss.pt2"})
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    session = ort.InferenceSession(str(folder / "rnn_loss.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(folder / "rnn_loss.pt2")).module()

    def run_pt2(*xs):
        with torch.no_grad():
            return program(*xs)[1]

    def run_ort(*xs):
        return torch.from_numpy(session.run(["components"], dict(zip(("pred", "label", "states"),
                                                                     (x.numpy() for x in xs))))[0])

    def run_compiled(*xs):
        with torch.no_grad():
            return compiled(*xs)[1]

    return n, {"onnxruntime": run_ort, "pt2": run_pt2, "torch.compile": run_compiled}


@pytest.mark.slow
@pytest.mark.parametrize("rates", list(RATES))
def test_exported_graphs_meet_the_accuracy_bound_at_ten_million_elements(graphs, rates):
    n, runtimes = graphs
    g = torch.Generator().manual_seed(n)
    shape = SHAPES[n]
    pred, label = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    states = RATES[rates](g, shape)
    ref = float64_statistics(pred, label, states)
    for runtime, run in runtimes.items():
        assert_meets_accuracy_bound(run(pred, label, states), ref, runtime)
    assert np.isfinite(list(ref.values())).all()
