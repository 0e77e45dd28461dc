"""Helpers of the C++ tests: models and inputs, Python eager references, and ``run_cases``, which runs a
list of cases through ``rnnloss_cases`` (cpp/tests/rnnloss_cases.cpp) in one process.

Every reference comes from Python eager on the same inputs, independently of the C++ code. Python eager
and libtorch run the same ATen kernels; they differ only in the order of a few float64 / float32 sums (the
rate statistics), so the tolerances are the parity suite's same-kernel ones: fp32 rtol 1e-5, float64 rtol
1e-10. atol: the values are O(1), so an entry that should be 0 may be off by a few ulps of O(1) terms:
1e-7 in float32, 1e-14 in float64.
"""
import shutil
import subprocess
from pathlib import Path

import torch

from cases import ALL_ON, COVERING, lambdas_for  # noqa: F401 (the suite's shared tables, used by the tests here)
from rnnloss import CTRNN, RNNLoss

ROOT = Path(__file__).resolve().parents[2]
# The tests' own build: -O1 (the same IEEE arithmetic, about 40 % less compile time than the Release -O3 users
# get in cpp/build, whose cache it leaves alone); not build/: setuptools' build/lib lives there.
BUILD = ROOT / "cpp" / "build-tests"
TEST_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}
ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "retanh")
# An outside project that uses the installed package (conftest.Consumer builds it).
CONSUMER_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(consumer CXX)
find_package(rnnloss REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer rnnloss::rnnloss)
"""
CONSUMER_MAIN = r"""#include <rnnloss/rnnloss.h>
#include <iostream>
int main() {
  rnnloss::CTRNN model(rnnloss::CTRNNOptions(3, 16, 2).activation("tanh"));
  rnnloss::RNNLoss loss(model, rnnloss::RNNLossOptions().lambda_fr(0.01));
  auto [output, states] = model->forward(torch::randn({20, 4, 3}));
  auto [total, components] = loss->forward(output, torch::zeros_like(output), states);
  total.backward();
  std::cout << *loss << "\n" << total.item<double>() << "\n";
  return model->readout_layer->weight.grad().abs().sum().item<double>() > 0 ? 0 : 1;
}
"""


def forget_other_torch(build: Path) -> None:
    """Drop ``build``'s CMake cache when it was configured against another libtorch (``make test-latest`` runs
    these tests with torch 2.14.1): libtorch's libraries are cached by path, and a new CMAKE_PREFIX_PATH alone
    would link the old ones."""
    cache = build / "CMakeCache.txt"
    torch_dir = Path(torch.utils.cmake_prefix_path) / "Torch"
    if cache.exists() and f"Torch_DIR:PATH={torch_dir}\n" not in cache.read_text():
        cache.unlink()
        shutil.rmtree(build / "CMakeFiles", ignore_errors=True)


def configure_command(build: Path, *options: str):
    """cmake's configure of cpp/ against this torch's libtorch; Ninja when it is installed and the folder is
    new (a configured folder keeps its generator: the Makefile's ``cpp`` target chooses the same way)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "CMakeCache.txt").exists() else []
    return ["cmake", "-S", str(ROOT / "cpp"), "-B", str(build), *generator,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *options]


def make_loss(dims=(3, 8, 2), dtype=torch.float32, batch_first=False, seed=0, lambdas=None, **kw):
    torch.manual_seed(seed)
    model = CTRNN(dims, batch_first=batch_first, **kw).to(dtype)
    return RNNLoss(model, **(ALL_ON if lambdas is None else lambdas))


def loss_inputs(loss, time=5, batch=3, seed=1):
    """pred, label, states in the model's layout and dtype; positive rates (μ well away from 0)."""
    g = torch.Generator().manual_seed(seed)
    m = loss.model
    lead = (batch, time) if m.batch_first else (time, batch)
    dtype = m.readout_layer.weight.dtype
    pred = torch.randn(*lead, m.n_out, generator=g, dtype=torch.float64).to(dtype)
    label = torch.randn(*lead, m.n_out, generator=g, dtype=torch.float64).to(dtype)
    states = torch.rand(*lead, m.n_hid, generator=g, dtype=torch.float64).to(dtype)
    return pred, label, states


def masked_model(activation, batch_first=False, dtype=torch.float32):
    """A CTRNN using every option the native model mirrors: masks, E/I signs (per neuron and per synapse),
    learnable α and v_0, an untrained bias."""
    torch.manual_seed(7)
    n_in, n_hid, n_out = 3, 10, 2
    sparse = (torch.rand(n_hid, n_hid) < 0.6).float()
    signs = torch.ones(n_hid)
    signs[7:] = -1.0
    in_signs = torch.randint(-1, 2, (n_hid, n_in)).float()
    model = CTRNN((n_in, n_hid, n_out), activation=activation, batch_first=batch_first, learn_alpha=True,
                  init_state="learn", biases=(True, None, "normal"), sparsity_masks=(None, sparse, None),
                  ei_masks=(in_signs, signs, signs), plasticity_masks=(None, None, torch.rand(n_out, n_hid)))
    with torch.no_grad():  # v_0 and α away from their initial values, so they matter
        model.recurrent_layer.hidden_state.uniform_(-0.5, 0.5)
        model.recurrent_layer.alpha.uniform_(0.05, 0.3)
    return model.to(dtype)


def run_cases(build, tmp_path: Path, artifacts, cases):
    """Run ``cases`` (dicts, see cpp/tests/rnnloss_cases.cpp) in one C++ process; one result each."""
    torch.save({"artifacts": artifacts, "cases": cases}, tmp_path / "cases.pt")
    done = subprocess.run([str(build["rnnloss_cases"]), str(tmp_path / "cases.pt"), str(tmp_path / "results.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert len(results) == len(cases)
    return results


def python_error(fn):
    """(class name, message) of the exception ``fn`` raises in Python eager; ("ok", "") if none."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return "ok", ""


def python_loss_result(loss, pred, label, states, mask=None):
    """total, components and d total / d (pred, states, trainable parameters), Python eager."""
    pred = pred.clone().requires_grad_(True)
    states = None if states is None else states.clone().requires_grad_(True)
    total, components = loss(pred, label, states, mask)
    params = [(n, p) for n, p in loss.model.named_parameters() if p.requires_grad]
    wrt = [pred] + ([states] if states is not None else []) + [p for _, p in params]
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    d_states = grads[1] if states is not None else None
    return total.detach(), components.detach(), grads[0], d_states, grads[-len(params):], [n for n, _ in params]


def assert_loss_result(got, ref, tol, where, input_tol=None):
    """C++ result ``got`` against Python's ``ref``; ``input_tol`` (default ``tol``) for d/dpred, d/dstates."""
    input_tol = input_tol or tol
    assert got[0] == "ok", (where, got)
    _, total, components, d_pred, d_states, d_params, names = got
    r_total, r_comps, r_pred, r_states, r_params, r_names = ref
    assert list(names) == r_names, where
    torch.testing.assert_close(total, r_total, **tol, msg=lambda m: f"{where} total: {m}")
    assert torch.equal(components == 0, r_comps == 0), f"{where}: inactive components must be exactly 0"
    torch.testing.assert_close(components, r_comps, **tol, msg=lambda m: f"{where} components: {m}")
    torch.testing.assert_close(d_pred, r_pred, **input_tol, msg=lambda m: f"{where} d/dpred: {m}")
    if r_states is None:
        assert d_states is None, where
    else:
        torch.testing.assert_close(d_states, r_states, **input_tol, msg=lambda m: f"{where} d/dstates: {m}")
    for name, g, r in zip(names, d_params, r_params):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{where} d/d{name}: {m}")
