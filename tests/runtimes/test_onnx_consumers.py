"""The exported ONNX graph loads and runs in every ONNX consumer we know of — ONNX Runtime (Python and
Node), ``onnx.reference``, tract (symbolic and concrete shapes) and onnx2torch — gives eager's values there,
and no consumer turns a refused input into a number.

Values: another runtime, other reduction order: rtol 1e-4 (rnnloss.export.parity derives the bound; the
inputs here are tiny, so float32 rounding is ~1e-7). Refusals: ONNX Runtime and tract name the rule
(the ScatterND node is named after its message); onnx.reference and onnx2torch raise an index error.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cases import ROOT
from runtime_exports import export_to, stub_torchvision

ALL_RATES = {"lambda_mse": 1.0, "lambda_in": 0.1, "lambda_hid": 0.1, "lambda_out": 0.1,
             "lambda_fr": 1.0, "lambda_fr_sd": 1.0, "lambda_fr_cv": 1.0}
CONFIGS = {"plain": {"model": {"dims": [3, 16, 2]}, "loss": ALL_RATES, "example": {"time": 6, "batch": 3}},
           "masked_batch_first": {"model": {"dims": [3, 16, 2], "batch_first": True}, "loss": ALL_RATES,
                                  "example": {"time": 6, "batch": 3}, "mask": True}}
RTOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def graph(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    loss, config = export_to(folder, CONFIGS[request.param], {"rnn_loss.onnx"})
    return loss, config, folder / "rnn_loss.onnx"


def feeds(config, pred=None, label=None, states=None, mask=None, seed=0):
    """Inputs in the graph's layout, (7, 3) time x batch unless given; mask graded weights when the graph has one."""
    g = np.random.default_rng(seed)
    lead = (3, 7) if config["model"]["batch_first"] else (7, 3)
    n_out, n_hid = config["model"]["dims"][2], config["model"]["dims"][1]
    out = {"pred": pred or (*lead, n_out), "label": label or pred or (*lead, n_out), "states": states or (*lead, n_hid)}
    arrays = {k: g.standard_normal(v).astype(np.float32) for k, v in out.items()}
    arrays["states"] = np.abs(arrays["states"])
    if config["mask"]:
        arrays["mask"] = g.random(mask or out["pred"]).astype(np.float32)
    return arrays


def eager(loss, f):
    with torch.no_grad():
        return [t.numpy() for t in loss(*[torch.from_numpy(f[k]) for k in ("pred", "label", "states", "mask") if k in f])]


def run_ort(path, f):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, f)


def run_reference(path, f):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(str(path)).run(None, f)


def run_onnx2torch(path, f):
    stub_torchvision()
    from onnx2torch import convert
    with torch.no_grad():
        return [t.numpy() for t in convert(str(path))(*[torch.from_numpy(v) for v in f.values()])]


TRACT = """
import json, sys, numpy as np, tract
path, concrete, npz = sys.argv[1], sys.argv[2] == "1", np.load(sys.argv[3])
model = tract.onnx().load(path)
names = [model.input_name(i) for i in range(model.input_count())]
if concrete:
    for i, name in enumerate(names):
        model.set_input_fact(i, ",".join(map(str, npz[name].shape)) + ",f32")
out = model.into_model().into_runnable().run([npz[n] for n in names])
np.savez(sys.argv[4], *[o.to_numpy() for o in out])
"""


def run_tract(path, f, concrete):
    """In a child process: tract aborts the whole process on some malformed graphs (a Rust panic)."""
    pytest.importorskip("tract", reason="tract is not installed (requirements/test-tools.txt)")
    folder = Path(path).parent / f"tract-{os.getpid()}-{concrete}"
    folder.mkdir(exist_ok=True)
    np.savez(folder / "in.npz", **f)
    result = subprocess.run([sys.executable, "-c", TRACT, str(path), "1" if concrete else "0", str(folder / "in.npz"),
                             str(folder / "out.npz")], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode)
    z = np.load(folder / "out.npz")
    return [z[f"arr_{i}"] for i in range(len(z.files))]


NODE_DIR = ROOT / ".node"
NODE = """
const ort = require(process.argv[1] + "/node_modules/onnxruntime-node");
const fs = require("fs");
(async () => {
  const input = JSON.parse(fs.readFileSync(process.argv[3]));
  const feeds = {};
  for (const [k, v] of Object.entries(input)) {
    const bytes = Buffer.from(v.b64, "base64");  // may sit at an offset in a pooled buffer
    feeds[k] = new ort.Tensor("float32", new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4), v.shape);
  }
  try {
    const session = await ort.InferenceSession.create(process.argv[2]);
    const out = await session.run(feeds);
    console.log(JSON.stringify({ok: true, outputs: session.outputNames.map(n => [Array.from(out[n].data), out[n].dims])}));
  } catch (e) { console.log(JSON.stringify({ok: false, error: String(e.message || e)})); }
})();
"""


def run_node(path, f):
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("onnxruntime-node is not installed in .node/ (`make node` installs it; needs node and npm)")
    data = {k: {"shape": list(v.shape), "b64": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode()}
            for k, v in f.items()}
    (Path(path).parent / "feeds.json").write_text(json.dumps(data))
    result = subprocess.run(["node", "-e", NODE, str(NODE_DIR), str(path), str(Path(path).parent / "feeds.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip(), result.stderr[-500:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return [np.asarray(data, np.float32).reshape(dims) for data, dims in reply["outputs"]]


CONSUMERS = {"onnxruntime": run_ort, "onnxruntime-node": run_node, "onnx.reference": run_reference,
             "tract-symbolic": lambda p, f: run_tract(p, f, False), "tract-concrete": lambda p, f: run_tract(p, f, True),
             "onnx2torch": run_onnx2torch}


def available(consumer):
    if consumer == "onnx2torch":
        stub_torchvision()
        pytest.importorskip("onnx2torch", reason="onnx2torch is not installed (requirements/no-deps.txt)")


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_every_consumer_loads_the_graph_and_gives_eagers_values(graph, consumer):
    loss, config, path = graph
    available(consumer)
    for shape_seed, extra in enumerate([{}, {"states": (2, 5, config["model"]["dims"][1])}]):  # states: own samples
        f = feeds(config, seed=shape_seed, **extra)
        got, ref = CONSUMERS[consumer](path, f), eager(loss, f)
        for g, r in zip(got, ref):
            assert np.asarray(g).shape == r.shape
            assert np.abs(np.asarray(g, np.float64) - r).max() <= RTOL * np.abs(r).max()


def _bad_inputs(config):
    lead = (3, 7) if config["model"]["batch_first"] else (7, 3)
    n_out, n_hid = config["model"]["dims"][2], config["model"]["dims"][1]
    other = (lead[0], lead[1] + 1)
    cases = {"label_other_batch": ({"label": (*other, n_out)}, "pred and label must have the same shape"),
             "label_broadcastable": ({"label": (lead[0], 1, n_out)}, "pred and label must have the same shape"),
             "empty_pred": ({"pred": (0, lead[1], n_out)}, "pred must not be empty"),
             "states_wrong_n_hid": ({"states": (*lead, n_hid - 1)}, f"states must have shape"),
             "pred_rank_2": ({"pred": (lead[0], n_out), "label": (lead[0], n_out)}, "pred must have shape")}
    if config["mask"]:
        cases["mask_other_shape"] = ({"mask": (*other, n_out)}, "mask must have pred's shape")
    return cases


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_no_consumer_turns_a_refused_input_into_a_number(graph, consumer):
    loss, config, path = graph
    available(consumer)
    for case, (shapes, message) in _bad_inputs(config).items():
        f = feeds(config, **shapes)
        with pytest.raises(Exception) as refused:
            CONSUMERS[consumer](path, f)
        if consumer.startswith("onnxruntime") and "rank" not in case and "n_hid" not in case:
            assert f"Name:'{message}" in str(refused.value), (case, str(refused.value))


def test_negative_and_nan_mask_weights_are_refused_naming_the_rule(tmp_path):
    loss, config = export_to(tmp_path, CONFIGS["masked_batch_first"], {"rnn_loss.onnx"})
    for bad in (-1.0, float("nan"), float("inf")):
        f = feeds(config)
        f["mask"][0, 0, 0] = bad
        with pytest.raises(Exception, match="Name:'mask must hold finite weights >= 0'"):
            run_ort(tmp_path / "rnn_loss.onnx", f)
        with pytest.raises(Exception):
            run_reference(tmp_path / "rnn_loss.onnx", f)
