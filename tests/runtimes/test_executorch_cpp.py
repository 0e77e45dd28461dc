"""ctrnn_run and ctrnn_train_run (cpp/executorch), built against the executorch wheel's CMake package: the
model program from C++ gives eager's output and states and refuses inputs outside its contract before running;
the training program, driven by plain SGD through ExecuTorch's Module, follows eager torch.optim.SGD.

Tolerances. The programs run ExecuTorch's CPU kernels in float32, eager its own, with other summation orders.
Each step's pre-activation is a sum of N_in + N_hid + 1 terms (inputs, recurrent inputs, bias) and the
recurrence carries every earlier step's rounding along, so the longest chain of roundings behind a state has
n = T·(N_in + N_hid + 1) terms: outputs and states are compared normwise (max |C++ − eager| ≤ rtol ·
max |eager| per tensor) with rtol = sum_rtol(n) = 10·2^-24·max(√n, 16) (rnnloss.export.parity), 9.5e-6
here. Training: one step's allowance is the parity's gradient allowance (gradient_rtol over the states at
the starting weights, as the export's own check of ctrnn_train.pte); errors may add up step by step, so the
100 steps' losses and the final weights get 100 times that.
"""
import copy
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnloss.export.parity import gradient_rtol, sum_rtol
from runtime_exports import export_to

executorch = pytest.importorskip("executorch", reason="executorch is not installed (requirements/executorch.txt)")
pytestmark = [pytest.mark.cpp, pytest.mark.slow, pytest.mark.xdist_group("cpp")]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(executorch.__path__[0]) / "share" / "cmake"
STEPS, LR = 100, 0.05
LAYOUTS = {  # time-first without a mask (the default layout), batch-first with a mask (the other paths)
    "time_first": {"model": {"dims": [3, 16, 2]}, "example": {"time": 6, "batch": 3},
                   "executorch": {"time": 6, "max_batch": 8}, "mask": False},
    "batch_first_masked": {"model": {"dims": [3, 16, 2], "batch_first": True}, "example": {"time": 6, "batch": 3},
                           "executorch": {"time": 6, "max_batch": 8}, "mask": True},
}


def write_tensors(path, **tensors):
    """The programs' tensor file: per tensor int32 name length, name, int32 ndim, int64 sizes, float32 data."""
    with open(path, "wb") as f:
        for name, t in tensors.items():
            t = t.detach().float().contiguous()
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack(f"<i{t.dim()}q", t.dim(), *t.shape))
            f.write(t.numpy().tobytes())


def read_tensors(path):
    data, at, tensors = Path(path).read_bytes(), 0, {}
    while at < len(data):
        (length,) = struct.unpack_from("<i", data, at)
        name = data[at + 4:at + 4 + length].decode()
        at += 4 + length
        (ndim,) = struct.unpack_from("<i", data, at)
        sizes = struct.unpack_from(f"<{ndim}q", data, at + 4)
        at += 4 + 8 * ndim
        count = int(np.prod(sizes))
        tensors[name] = torch.from_numpy(np.frombuffer(data, np.float32, count, at).reshape(sizes).copy())
        at += 4 * count
    return tensors


@pytest.fixture(scope="session")
def programs(tmp_path_factory):
    """cpp/executorch configured and built once per session; {name: path of the program}."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build cpp/executorch")
    if not (PACKAGE / "executorch-config.cmake").is_file():
        pytest.skip(f"this executorch wheel ships no CMake package ({PACKAGE})")
    build = tmp_path_factory.mktemp("executorch_cpp")
    start = time.perf_counter()
    for command in (["cmake", "-S", str(ROOT / "cpp" / "executorch"), "-B", str(build), f"-Dexecutorch_DIR={PACKAGE}"],
                    ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"cpp/executorch built in {time.perf_counter() - start:.1f} s")
    return {name: build / name for name in ("ctrnn_run", "ctrnn_train_run")}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    loss, config = export_to(folder, LAYOUTS[request.param], {"ctrnn.pte", "ctrnn_train.pte"})
    return loss, config, folder


def lay_out(config, time_steps, batch, features, generator, rand=False):
    """A (time, batch, features) draw, laid out as the model takes it."""
    t = (torch.rand if rand else torch.randn)(time_steps, batch, features, generator=generator)
    return t.transpose(0, 1).contiguous() if config["model"]["batch_first"] else t


def run(program, *args):
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300)


def normwise(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_ctrnn_run_gives_eagers_output_and_states(programs, exported, tmp_path):
    loss, config, folder = exported
    n_in, n_hid, _ = config["model"]["dims"]
    steps = config["executorch"]["time"]
    rtol = sum_rtol(steps * (n_in + n_hid + 1))
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5, config["executorch"]["max_batch"]):
        x = lay_out(config, steps, batch, n_in, g)
        write_tensors(tmp_path / "in.bin", x=x)
        done = run(programs["ctrnn_run"], folder / "ctrnn.pte", tmp_path / "in.bin", tmp_path / "out.bin")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        got = read_tensors(tmp_path / "out.bin")
        with torch.no_grad():
            ref = dict(zip(("output", "states"), loss.model(x)))
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name].shape == ref[name].shape, name
            assert normwise(got[name], ref[name]) <= rtol, (batch, name, normwise(got[name], ref[name]), rtol)


def test_ctrnn_run_refuses_what_breaks_the_contract_before_running(programs, exported, tmp_path):
    _, config, folder = exported
    n_in = config["model"]["dims"][0]
    steps, top = config["executorch"]["time"], config["executorch"]["max_batch"]
    g = torch.Generator().manual_seed(2)
    bad = {"a shorter time": lay_out(config, steps - 1, 2, n_in, g),
           "a longer time": lay_out(config, steps + 1, 2, n_in, g),
           "fewer features": lay_out(config, steps, 2, n_in - 1, g),
           "more features": lay_out(config, steps, 2, n_in + 1, g),
           "rank 2": torch.randn(steps, n_in), "rank 4": torch.randn(1, steps, 2, n_in),
           "a batch beyond the bound": lay_out(config, steps, top + 1, n_in, g),
           "an empty batch": lay_out(config, steps, 0, n_in, g)}
    for what, x in bad.items():
        write_tensors(tmp_path / "in.bin", x=x)
        done = run(programs["ctrnn_run"], folder / "ctrnn.pte", tmp_path / "in.bin", tmp_path / "out.bin")
        assert done.returncode == 2, (what, done.returncode, done.stderr)
        assert done.stdout == "" and len(done.stderr.splitlines()) == 1, (what, done.stderr)
        assert done.stderr.startswith(f"ctrnn_run: x is {tuple(x.shape)}; the program "), done.stderr
        assert not (tmp_path / "out.bin").exists()
    # a program that is no program is the runtime's failure: exit 1, one line
    (tmp_path / "broken.pte").write_bytes((folder / "ctrnn.pte").read_bytes()[:4000])
    write_tensors(tmp_path / "in.bin", x=lay_out(config, steps, 2, n_in, g))
    done = run(programs["ctrnn_run"], tmp_path / "broken.pte", tmp_path / "in.bin", tmp_path / "out.bin")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("ctrnn_run: loading "), done.stderr


def train_inputs(config, batch, g):
    """x, target and (with a mask in the config) mask for ctrnn_train_run, of the program's time length."""
    n_in, _, n_out = config["model"]["dims"]
    steps = config["executorch"]["time"]
    inputs = {"x": lay_out(config, steps, batch, n_in, g), "target": lay_out(config, steps, batch, n_out, g)}
    if config["mask"]:
        inputs["mask"] = lay_out(config, steps, batch, n_out, g, rand=True)
    return inputs


def test_ctrnn_train_run_follows_eager_sgd(programs, exported, tmp_path):
    loss, config, folder = exported
    g = torch.Generator().manual_seed(3)
    inputs = train_inputs(config, 5, g)
    write_tensors(tmp_path / "in.bin", **inputs)
    done = run(programs["ctrnn_train_run"], folder / "ctrnn_train.pte", tmp_path / "in.bin", tmp_path / "out.bin",
               "--steps", STEPS, "--lr", LR)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    got = read_tensors(tmp_path / "out.bin")

    eager = copy.deepcopy(loss).eval()  # the training program is the eval-mode model's: no noise
    params = {f"model.{name}": p for name, p in eager.model.named_parameters() if p.requires_grad}
    assert set(got) == {"loss", *params}
    with torch.no_grad():
        states = eager.model(inputs["x"])[1]
    allowed = STEPS * gradient_rtol(eager.active, states, states.numel())
    sgd = torch.optim.SGD(params.values(), lr=LR)
    losses = []
    for _ in range(STEPS):
        sgd.zero_grad()
        output, states = eager.model(inputs["x"])
        total = eager(output, inputs["target"], states, inputs.get("mask"))[0]
        total.backward()
        sgd.step()
        losses.append(total.item())
    losses = torch.tensor(losses, dtype=torch.float64)
    assert got["loss"].shape == (STEPS,)
    assert got["loss"][-1] < got["loss"][0]  # it learns ...
    assert ((got["loss"].double() - losses).abs() <= allowed * losses.abs()).all(), \
        ((got["loss"].double() - losses).abs() / losses.abs()).max()  # ... as eager does
    for name, p in params.items():
        assert normwise(got[name], p.detach()) <= allowed, (name, normwise(got[name], p.detach()), allowed)


def test_ctrnn_train_run_refuses_bad_inputs_and_options_before_running(programs, exported, tmp_path):
    _, config, folder = exported
    n_out = config["model"]["dims"][2]
    steps = config["executorch"]["time"]
    g = torch.Generator().manual_seed(4)
    good = train_inputs(config, 3, g)
    negative = good.get("mask", good["target"]).clone()
    negative.view(-1)[0] = -1.0
    cases = [({**good, "target": lay_out(config, steps, 2, n_out, g)}, ["--steps", 1, "--lr", LR], "its batch differs"),
             ({**good, "target": lay_out(config, steps, 3, n_out + 1, g)}, ["--steps", 1, "--lr", LR], "(n_out)"),
             ({**good, "extra": good["x"]}, ["--steps", 1, "--lr", LR], "does not take"),
             (good, ["--steps", 0, "--lr", LR], "--steps"), (good, ["--steps", 1, "--lr", -1], "--lr"),
             (good, ["--steps", 1], "--lr")]
    if config["mask"]:
        cases += [({"x": good["x"], "target": good["target"]}, ["--steps", 1, "--lr", LR], "no tensor named mask"),
                  ({**good, "mask": negative}, ["--steps", 1, "--lr", LR], "negative or non-finite")]
    else:
        cases += [({**good, "mask": negative}, ["--steps", 1, "--lr", LR], "does not take")]
    for tensors, options, said in cases:
        write_tensors(tmp_path / "in.bin", **tensors)
        done = run(programs["ctrnn_train_run"], folder / "ctrnn_train.pte", tmp_path / "in.bin", tmp_path / "out.bin",
                   *options)
        assert done.returncode == 2 and done.stdout == "", (said, done.returncode, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and said in done.stderr, (said, done.stderr)
        assert not (tmp_path / "out.bin").exists()
