"""What an export writes (one real export of a small config, shared: the ``exported`` fixture): the five artifacts
and the manifest, the description each embeds, the ONNX graph, the train module, and the writers' refusals."""
import json
import re
from importlib import metadata

import numpy as np
import pytest
import torch

from cases import MANIFEST, ROOT, SMALL, NAMES, script_roundtrip
from rnnloss import CTRNN, RNNLoss, from_torchscript
from rnnloss.export import artifacts
from rnnloss.export.config import validate

# The artifacts every export writes (more may join the registry, e.g. ExecuTorch programs): the loss graphs and
# the native file, all of which read λ.
ARTIFACTS = ("rnn_loss.onnx", "rnn_loss.pt", "ctrnn_train.pt", "rnn_loss.pt2", "rnnloss_native.pt")
WRITTEN = tuple(a.name for a in artifacts.REGISTRY)
UNEMBEDDED = ("sha256", "parity", "parity_devices")  # what only the manifest can record


def manifest_of(folder):
    return json.loads((folder / MANIFEST).read_text())


def test_the_export_writes_exactly_the_registrys_artifacts_and_the_manifest(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(WRITTEN + (MANIFEST,))
    assert set(ARTIFACTS) <= set(WRITTEN) and len(set(WRITTEN)) == len(WRITTEN)
    assert WRITTEN[0] == "rnn_loss.onnx"  # first: writing it settles the opset every artifact records


def test_the_manifest_describes_the_export(exported):
    import hashlib

    import onnxruntime as ort
    m = manifest_of(exported)
    assert m["generator"] == "rnnloss-export" and m["component_names"] == list(NAMES)
    assert m["lambdas"]["fr_sd"] == 0.01 and m["active"] == list(NAMES)
    assert m["dims"] == {"n_in": 3, "n_hid": 16, "n_out": 2}
    # label shares pred's axes; the rates' leading axes are samples of their own, as in eager mode
    assert m["inputs"] == {"pred": ["time", "batch", 2], "label": ["time", "batch", 2],
                           "states": ["states_time", "states_batch", 16]}
    assert m["outputs"] == {"total": [], "components": [7]} and m["dtype"] == "float32"
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["onnxruntime"] == ort.__version__
    assert m["versions"]["executorch"] == metadata.version("executorch")  # (the package has no __version__)
    assert m["config"] == validate(SMALL) and isinstance(m["opset"], int)
    assert sorted(m["sha256"]) == sorted(WRITTEN)
    for name, digest in m["sha256"].items():
        assert hashlib.sha256((exported / name).read_bytes()).hexdigest() == digest
    assert m["parity"] and all(row["passed"] for row in m["parity"]) and m["parity_devices"] == ["cpu"]
    train = torch.jit.load(str(exported / "ctrnn_train.pt"))
    listed = {method.split("(")[0] for method in m["train_module"]["methods"]}
    assert listed == {"enforce_constraints", "set_lambda", "dims", "is_batch_first"}
    assert all(hasattr(train, name) for name in listed)


@pytest.mark.parametrize("name", WRITTEN)
def test_each_artifact_embeds_the_manifest_without_its_sums_and_parity(exported, name):
    artifact = next(a for a in artifacts.REGISTRY if a.name == name)
    embedded = artifact.metadata(exported / name)
    manifest = manifest_of(exported)
    assert embedded == {k: v for k, v in manifest.items() if k not in UNEMBEDDED}


def test_the_onnx_graph_is_self_contained_checked_and_named(exported):
    import onnx
    proto = onnx.load(str(exported / "rnn_loss.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pred", "label", "states"]
    assert [o.name for o in proto.graph.output] == ["total", "components"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"pred": ["time", "batch", 2], "label": ["time", "batch", 2],
                    "states": ["states_time", "states_batch", 16]}
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_onnx_runtime_refuses_states_with_the_wrong_hidden_size(exported):
    import onnxruntime as ort
    session = ort.InferenceSession(str(exported / "rnn_loss.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"pred": np.zeros((4, 2, 2), np.float32), "label": np.zeros((4, 2, 2), np.float32),
             "states": np.ones((4, 2, 15), np.float32)}
    with pytest.raises(Exception, match="states"):
        session.run(None, feeds)


def test_the_docs_loading_example_runs_on_an_export(exported, monkeypatch):
    page = ROOT / "docs" / "export.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
                 if "artifacts/rnn_loss.pt2" in b)
    monkeypatch.chdir(exported.parent)
    namespace = {}
    exec(compile(block, str(page), "exec"), namespace)
    assert {"loss", "session", "program", "model"} <= set(namespace)


def test_the_train_module_trains_with_a_python_optimizer_and_anneals(exported):
    train = torch.jit.load(str(exported / "ctrnn_train.pt"))
    names = [n for n, _ in train.named_parameters()]
    assert names == ["loss.model." + k for k in (
        "recurrent_layer.hidden_state", "recurrent_layer.input_layer.weight", "recurrent_layer.input_layer.bias",
        "recurrent_layer.hidden_layer.weight", "recurrent_layer.hidden_layer.bias", "readout_layer.weight",
        "readout_layer.bias")]
    torch.manual_seed(0)
    x = torch.randn(20, 8, 3)
    target = torch.sin(torch.linspace(0, 3, 20)).reshape(20, 1, 1).expand(20, 8, 2).contiguous()
    opt = torch.optim.Adam(train.parameters(), lr=2e-2)
    first = train(x, target)[1][0].item()
    for _ in range(60):
        total, comps, output, states = train(x, target)
        opt.zero_grad()
        total.backward()
        opt.step()
        train.enforce_constraints()
    assert output.shape == (20, 8, 2) and states.shape == (20, 8, 16)
    assert train(x, target)[1][0].item() < 0.5 * first
    train.set_lambda("fr_sd", 0.0)
    assert train(x, target)[1][5].item() == 0.0 and train.loss.lambdas[5].item() == 0.0
    train.loss.lambdas[5] = 2.0  # the buffer itself works too
    assert train(x, target)[1][5].item() > 0.0


def test_the_train_module_is_saved_in_eval_mode_throughout(exported):
    train = torch.jit.load(str(exported / "ctrnn_train.pt"))
    assert [name for name, module in train.named_modules() if module.training] == []
    assert train.dims() == [3, 16, 2] and not train.is_batch_first()


def test_the_train_module_takes_an_optional_mask(exported):
    from rnnloss.trainer import CTRNNTrainer
    train = torch.jit.load(str(exported / "ctrnn_train.pt"))
    eager = CTRNNTrainer(artifacts.build(validate(SMALL)))
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(7, 2, 3, generator=g), torch.randn(7, 2, 2, generator=g)
    mask = (torch.rand(7, 2, 2, generator=g) > 0.5).float()
    got, ref = train(x, target, mask), eager(x, target, mask)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)  # same kernels, one device
    assert got[1][0].item() != train(x, target)[1][0].item()  # the mask weights the mse
    assert train(x, target, torch.zeros_like(mask))[1][0].item() == 0.0  # Σw = 0 gives mse 0


def test_state_dict_keys_of_eager_scripted_and_trained_modules_are_identical(exported, tmp_path):
    keys = set(artifacts.build(validate(SMALL)).state_dict())
    scripted = torch.jit.load(str(exported / "rnn_loss.pt"))
    train = torch.jit.load(str(exported / "ctrnn_train.pt"))
    assert set(scripted.state_dict()) == keys
    assert {k.removeprefix("loss.") for k in train.state_dict()} == keys
    assert all(k.startswith("loss.") for k in train.state_dict())
    # A module trained through ctrnn_train.pt and saved again (what train_ctrnn does in C++) loads back strictly
    # into eager modules with one call, and computes what the trained module computes.
    opt = torch.optim.SGD(train.parameters(), lr=0.1)
    x, target = torch.randn(7, 4, 3), torch.randn(7, 4, 2)
    for _ in range(3):
        opt.zero_grad()
        train(x, target)[0].backward()
        opt.step()
        train.enforce_constraints()
    torch.jit.save(train, str(tmp_path / "trained.pt"))
    loss = from_torchscript(tmp_path / "trained.pt")
    assert isinstance(loss, RNNLoss) and isinstance(loss.model, CTRNN) and set(loss.state_dict()) == keys
    CTRNN((3, 16, 2)).load_state_dict(loss.model.state_dict(), strict=True)
    output, states = loss.model(x)
    total, comps, out_trained, _ = train(x, target)
    torch.testing.assert_close(output, out_trained, rtol=1e-5, atol=0)  # same kernels, one device
    torch.testing.assert_close(loss(output, target, states)[1], comps, rtol=1e-5, atol=0)
    assert loss.active == list(NAMES) and not loss.training


def test_parity_fails_when_the_artifacts_differ_from_the_config(exported):
    # The checks can fail: compare every artifact with an eager loss whose λ_fr differs (0.5, not 0.01).
    config = validate({**SMALL, "loss": {"lambda_fr": 0.5}})
    rows = artifacts.check_all(exported, config, ["cpu"])
    failed = {r.artifact for r in rows if not r.passed}
    assert set(ARTIFACTS) <= failed
    assert all("allowance" in r.why() for r in rows if r.artifact in ARTIFACTS)


def test_parity_shapes_differ_from_the_example_and_include_ones():
    from rnnloss.export.parity import fresh_shapes
    shapes = fresh_shapes(6, 3)
    assert (6, 3) not in shapes and (1, 1) in shapes
    assert any(t == 1 and b > 1 for t, b in shapes) and any(b == 1 and t > 1 for t, b in shapes)


@pytest.mark.parametrize("writer", ["rnn_loss.pt2", "rnn_loss.onnx", "rnnloss_native.pt"])
@pytest.mark.parametrize("value, kind", [(-0.5, "a negative value"), (float("nan"), "NaN")], ids=["negative", "nan"])
def test_the_writers_refuse_invalid_lambdas_instead_of_baking_them_in(writer, value, kind, tmp_path):
    # Tracing skips forward's value check; an invalid λ in the buffer would become a constant of the graph, or a
    # native file that loading refuses. Written through .data, which nothing but a read of the values sees.
    loss = RNNLoss(CTRNN((3, 8, 2)), lambda_fr=0.01, lambda_fr_sd=0.01).eval()
    config = validate({"model": {"dims": [3, 8, 2]}})
    example = artifacts.sample_inputs(loss, 4, 2, seed=0)
    loss.lambdas.data[5] = value
    build = artifacts.Build(loss, config, example, {})
    with pytest.raises(ValueError, match=r"lambdas\[5\] \('fr_sd'\) must be finite in float32 and >= 0, got " + kind):
        next(a for a in artifacts.REGISTRY if a.name == writer).write(build, tmp_path / writer)
    assert not list(tmp_path.iterdir())


def test_a_loss_exported_from_a_scripted_round_trip_computes_the_same(exported):
    # The artifacts' loss is the eager loss the config builds: its scripted round trip and rnn_loss.pt agree bitwise.
    eager = artifacts.build(validate(SMALL))
    inputs = artifacts.sample_inputs(eager, 5, 2, seed=9)
    loaded = torch.jit.load(str(exported / "rnn_loss.pt"))
    assert torch.equal(loaded(*inputs)[1], script_roundtrip(eager)(*inputs)[1])


@pytest.mark.slow
def test_two_exports_of_one_config_compute_the_same(tmp_path, exported):
    import onnxruntime as ort

    second = tmp_path / "again"  # the two compared artifacts, written again by the registry's writers
    second.mkdir()
    loss = artifacts.build(validate(SMALL))
    example = artifacts.sample_inputs(loss, 6, 3, seed=0)
    build = artifacts.Build(loss, validate(SMALL), example, json.loads((exported / MANIFEST).read_text()))
    for artifact in artifacts.REGISTRY[:2]:
        assert artifact.name in ("rnn_loss.onnx", "rnn_loss.pt")
        artifact.write(build, second / artifact.name)
    inputs = artifacts.sample_inputs(artifacts.build(validate(SMALL)), 5, 2, seed=9)
    a, b = torch.jit.load(str(exported / "rnn_loss.pt")), torch.jit.load(str(second / "rnn_loss.pt"))
    assert torch.equal(a(*inputs)[1], b(*inputs)[1])
    feeds = {k: v.numpy() for k, v in zip(("pred", "label", "states"), inputs)}
    outs = [ort.InferenceSession(str(d / "rnn_loss.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
            for d in (exported, second)]
    assert np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.slow
def test_an_export_with_learned_alpha_init_state_noise_batch_first_and_a_mask_passes_parity(tmp_path):
    # Noise is off in the exported (eval) modules; the train module keeps it for training.
    from rnnloss.export.cli import run
    config = validate({"model": {"dims": [2, 8, 2], "activation": "tanh", "learn_alpha": True,
                                 "init_state": "learn", "preact_noise": 0.1, "batch_first": True},
                       "example": {"time": 4, "batch": 2}, "executorch": {"time": 4, "max_batch": 4}, "mask": True})
    assert run(config, tmp_path / "a", force=False, device="cpu") == 0
    manifest = manifest_of(tmp_path / "a")
    assert manifest["inputs"]["mask"] == ["batch", "time", 2] and manifest["inputs"]["pred"] == ["batch", "time", 2]
    train = torch.jit.load(str(tmp_path / "a" / "ctrnn_train.pt"))
    names = {n for n, p in train.named_parameters() if p.requires_grad}
    assert {"loss.model.recurrent_layer.alpha", "loss.model.recurrent_layer.hidden_state"} <= names
    assert train.is_batch_first()


@pytest.mark.slow
def test_artifact_size_follows_the_weights(tmp_path):
    # At N_hid = 512 the float32 weights are ~1.06 MB. Each artifact holds them once, plus code, graph and
    # metadata (27-90 KB for a tiny model, measured), so 256 KiB is a generous constant. Three N_hid x N_hid
    # placeholder masks per file would give ~4.2 MB.
    # The files as the export writes them (its writers; parity and the install do not change them).
    from rnnloss.export.cli import write_all
    config = validate({"model": {"dims": [3, 512, 2]}, "example": {"time": 3, "batch": 2},
                       "executorch": {"time": 3, "max_batch": 2}})
    written = write_all(config, tmp_path, lambda line: None)["sha256"]
    assert set(written) == set(WRITTEN)
    weights = sum(t.numel() * t.element_size() for t in artifacts.build(config).model.state_dict().values())
    sizes = {name: (tmp_path / name).stat().st_size for name in written}
    assert all(size <= 1.5 * weights + 256 * 1024 for size in sizes.values()), (weights, sizes)


@pytest.mark.parametrize("name", ["rnn_loss.pt", "ctrnn_train.pt"])
def test_the_scripted_files_store_lambda_exactly_as_eager_and_refuse_what_eager_refuses(exported, name):
    # 0.1 and 1e-50 are not float32 numbers: stored as the float64 values (1e-50 through float32 would be 0,
    # silently switching the component off); a bool is refused as by the constructor.
    module = torch.jit.load(str(exported / name))
    buffer = module.lambdas if name == "rnn_loss.pt" else module.loss.lambdas
    eager = RNNLoss(CTRNN((3, 16, 2)), lambda_fr=1.0)
    for value in (0.1, 1e-50, 3):
        module.set_lambda("fr", value)
        eager.set_lambda("fr", value)
        assert buffer[4].item() == eager.lambdas[4].item() == float(value)
    for value, text in ((True, "got a bool"), (-1.0, "got a negative value"), (float("nan"), "got NaN")):
        with pytest.raises(Exception, match=text):
            module.set_lambda("fr", value)
        with pytest.raises((TypeError, ValueError), match=text):
            eager.set_lambda("fr", value)
