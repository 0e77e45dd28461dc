"""The export command and its artifacts, on a small config exported once; --verify on copies of it."""
import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import readback_as_on_a_gpu
from rnnloss import CTRNN, RNNLoss, export, from_torchscript, parity
from rnnloss.config import validate

SMALL = {"model": {"dims": [3, 16, 2]}, "example": {"time": 6, "batch": 3}}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "artifacts"
    status = export.run(validate(SMALL), out, force=False, device="cpu")
    assert status == 0
    return out


def test_export_writes_exactly_the_listed_artifacts(artifacts):
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(export.ARTIFACTS)


def test_manifest_describes_the_artifacts(artifacts):
    m = json.loads((artifacts / "manifest.json").read_text())
    assert m["component_names"] == ["mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv"]
    assert m["lambdas"]["fr_sd"] == 0.01 and m["dims"] == {"n_in": 3, "n_hid": 16, "n_out": 2}
    assert m["inputs"]["states"] == ["time", "batch", 16] and m["outputs"]["components"] == [7]
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["onnxruntime"] == ort.__version__
    for name, digest in m["sha256"].items():
        assert hashlib.sha256((artifacts / name).read_bytes()).hexdigest() == digest
    assert m["parity"] and all(row["passed"] for row in m["parity"])
    assert isinstance(m["opset"], int)
    train = torch.jit.load(str(artifacts / "ctrnn_train.pt"))
    listed = {method.split("(")[0] for method in m["train_module"]["methods"]}
    assert listed == {"enforce_constraints", "set_lambda", "dims", "is_batch_first"}
    assert all(hasattr(train, name) for name in listed)


def test_onnx_graph_is_self_contained_checked_and_named(artifacts):
    proto = onnx.load(str(artifacts / "rnn_loss.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pred", "label", "states"]
    assert [o.name for o in proto.graph.output] == ["total", "components"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"pred": ["time", "batch", 2], "label": ["time", "batch", 2], "states": ["time", "batch", 16]}
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in artifacts.iterdir() if p.suffix not in (".pt", ".onnx", ".pt2", ".json")) == []


def test_onnx_runtime_refuses_states_with_the_wrong_hidden_size(artifacts):
    session = ort.InferenceSession(str(artifacts / "rnn_loss.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"pred": np.zeros((4, 2, 2), np.float32), "label": np.zeros((4, 2, 2), np.float32),
             "states": np.ones((4, 2, 15), np.float32)}
    with pytest.raises(Exception, match="states"):
        session.run(None, feeds)


def test_train_module_trains_with_a_python_optimizer_and_anneals(artifacts):
    train = torch.jit.load(str(artifacts / "ctrnn_train.pt"))
    names = [n for n, _ in train.named_parameters()]
    assert names == ["loss.model." + k for k in ("recurrent_layer.hidden_state", "recurrent_layer.input_layer.weight", "recurrent_layer.input_layer.bias",
                                                 "recurrent_layer.hidden_layer.weight", "recurrent_layer.hidden_layer.bias",
                                                 "readout_layer.weight", "readout_layer.bias")]
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


def test_two_exports_of_one_config_compute_the_same(tmp_path, artifacts):
    second = tmp_path / "again"
    assert export.run(validate(SMALL), second, force=False, device="cpu") == 0
    inputs = export.sample_inputs(export.build(validate(SMALL)), 5, 2, seed=9)
    for name in ("rnn_loss.pt",):
        a, b = torch.jit.load(str(artifacts / name)), torch.jit.load(str(second / name))
        assert torch.equal(a(*inputs)[1], b(*inputs)[1])
    feeds = {k: v.numpy() for k, v in zip(("pred", "label", "states"), inputs)}
    outs = [ort.InferenceSession(str(d / "rnn_loss.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
            for d in (artifacts, second)]
    assert np.array_equal(outs[0][1], outs[1][1])


def test_parity_check_fails_when_the_artifact_differs_from_eager(artifacts):
    # The checks can fail: compare the exported graphs with an eager loss whose λ differ.
    config = validate(SMALL)
    other = export.build(config)
    other.lambdas[4] = 0.5
    rows = parity.check_artifacts(artifacts, other, config, ["cpu"])
    assert {r.artifact for r in rows if not r.passed} == {"rnn_loss.pt", "rnn_loss.pt2", "rnn_loss.onnx", "ctrnn_train.pt",
                                                          "rnnloss_native.pt"}


def test_parity_shapes_differ_from_the_example_and_include_ones():
    shapes = parity.fresh_shapes(6, 3)
    assert (6, 3) not in shapes and (1, 1) in shapes
    assert any(t == 1 and b > 1 for t, b in shapes) and any(b == 1 and t > 1 for t, b in shapes)


def test_shipped_default_config_is_the_embedded_default():
    from pathlib import Path
    from rnnloss.config import default_config
    shipped = Path(__file__).resolve().parents[1] / "export" / "configs" / "default.json"
    assert json.loads(shipped.read_text()) == default_config() == validate({})


def test_export_of_a_model_with_learned_alpha_init_state_and_noise_passes_parity(tmp_path):
    # Noise is off in the exported (eval) modules; the train module keeps it for training.
    config = validate({"model": {"dims": [2, 8, 2], "activation": "tanh", "learn_alpha": True,
                                 "init_state": "learn", "preact_noise": 0.1, "batch_first": True},
                       "example": {"time": 4, "batch": 2}})
    assert export.run(config, tmp_path / "a", force=False, device="cpu") == 0
    train = torch.jit.load(str(tmp_path / "a" / "ctrnn_train.pt"))
    names = {n for n, p in train.named_parameters() if p.requires_grad}
    assert {"loss.model.recurrent_layer.alpha", "loss.model.recurrent_layer.hidden_state"} <= names
    assert train.is_batch_first()


def test_train_module_is_saved_in_eval_mode_throughout(artifacts):
    train = torch.jit.load(str(artifacts / "ctrnn_train.pt"))
    assert [name for name, module in train.named_modules() if module.training] == []


def eager_keys(config):
    return set(export.build(validate(config)).state_dict())


def test_state_dict_keys_of_eager_scripted_and_trained_modules_are_identical(artifacts, tmp_path):
    keys = eager_keys(SMALL)
    scripted = torch.jit.load(str(artifacts / "rnn_loss.pt"))
    train = torch.jit.load(str(artifacts / "ctrnn_train.pt"))
    assert set(scripted.state_dict()) == keys
    assert {k.removeprefix("loss.") for k in train.state_dict()} == keys and all(
        k.startswith("loss.") for k in train.state_dict())
    # A module trained through ctrnn_train.pt and saved again (what train_ctrnn does in C++) loads
    # back strictly into eager modules with one call, and computes what the trained module computes.
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
    total, comps, out_trained, states_trained = train(x, target)
    # The same kernels on the same device: rtol 1e-5 (a few ulp of reordering at most).
    torch.testing.assert_close(output, out_trained, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss(output, target, states)[1], comps, rtol=1e-5, atol=0)
    assert loss.active == ["mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv"] and not loss.training


def test_from_torchscript_keeps_masks_biases_and_learned_state(tmp_path):
    from rnnloss.trainer import CTRNNTrainer
    torch.manual_seed(3)
    model = CTRNN((3, 6, 2), sparsity_masks=[None, torch.rand(6, 6) > 0.3, None],
                  ei_masks=[None, None, torch.tensor([1.0, -1, 1, 1, -1, 1])], plasticity_masks=[torch.ones(6, 3), None, None],
                  biases=[True, None, False], learn_alpha=True, init_state="learn", activation="tanh", batch_first=True)
    loss = RNNLoss(model, lambda_hid=0.2, lambda_fr=0.1)
    torch.jit.save(torch.jit.script(CTRNNTrainer(loss)), str(tmp_path / "t.pt"))
    back = from_torchscript(tmp_path / "t.pt")
    assert set(back.state_dict()) == set(loss.state_dict())
    for key, value in loss.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert back.active == loss.active and back.model.batch_first and back.model.activation == "tanh"
    assert back.model.readout_layer.bias is None
    assert not back.model.recurrent_layer.hidden_layer.bias.requires_grad  # nn4n's fixed zero bias


def test_artifact_size_follows_the_weights(tmp_path):
    # At N_hid = 512 the float32 weights are ~1.06 MB. Each artifact holds them once, plus code,
    # graph and metadata: 27-75 KB for a tiny model (measured), so 256 KiB is a generous constant.
    # Three N_hid x N_hid placeholder masks per file (the old behaviour) would give ~4.2 MB.
    config = validate({"model": {"dims": [3, 512, 2]}, "example": {"time": 3, "batch": 2}})
    assert export.run(config, tmp_path / "big", force=False, device="cpu") == 0
    weights = sum(t.numel() * t.element_size() for t in export.build(config).model.state_dict().values())
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    sizes = {name: (tmp_path / "big" / name).stat().st_size for name in manifest["sha256"]}
    assert all(size <= 1.5 * weights + 256 * 1024 for size in sizes.values()), (weights, sizes)


@pytest.fixture
def copy_of(artifacts, tmp_path):
    def copy():
        dest = tmp_path / "copy"
        shutil.copytree(artifacts, dest)
        return dest
    return copy


def verify(folder, capsys):
    status = export.main(["--verify", str(folder), "--device", "cpu"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_verify_passes_on_an_intact_export(artifacts, capsys):
    status, out, _ = verify(artifacts, capsys)
    assert status == 0 and "verified" in out and "FAIL" not in out


def flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["rnn_loss.pt", "ctrnn_train.pt", "rnn_loss.pt2", "rnn_loss.onnx",
                                  "rnnloss_native.pt"])
def test_verify_catches_one_flipped_bit_in_any_artifact(name, copy_of, capsys):
    folder = copy_of()
    flip_bit(folder / name, (folder / name).stat().st_size // 2)
    status, out, _ = verify(folder, capsys)
    assert status == 1 and f"FAILED {name}: sha256 differs" in out


def test_verify_reruns_parity_so_a_changed_lambda_fails_even_with_a_matching_sum(copy_of, capsys):
    # λ_mse = 1.0 is the first entry of the lambdas buffer, stored raw in rnn_loss.pt's zip. Flip
    # the lowest bit of its second-highest byte (float32: 1.0 -> 1.0078; float64: 1.0 -> 1.0625)
    # and rewrite the manifest's sum, as a careless tool would: only the parity rerun can see it.
    folder = copy_of()
    path = folder / "rnn_loss.pt"
    lambdas = export.build(validate(SMALL)).lambdas.detach()
    raw = lambdas.numpy().tobytes()
    data = path.read_bytes()
    assert data.count(raw) == 1
    flip_bit(path, data.index(raw) + lambdas.element_size() - 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["rnn_loss.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    status, out, _ = verify(folder, capsys)
    assert status == 1 and "FAILED rnn_loss.pt: parity check on torchscript cpu failed" in out


def test_verify_reruns_parity_on_the_native_file_too(copy_of, capsys):
    # The attack that once passed: a retouched rnnloss_native.pt (λ_mse 0, W_hid zeroed) with
    # its sum rewritten in the manifest.
    folder = copy_of()
    path = folder / "rnnloss_native.pt"
    payload = torch.load(path, weights_only=True)
    payload["loss"]["lambdas"][0] = 0.0
    payload["state_dict"]["recurrent_layer.hidden_layer.weight"].zero_()
    torch.save(payload, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["rnnloss_native.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    status, out, _ = verify(folder, capsys)
    assert status == 1 and "FAILED rnnloss_native.pt: parity check" in out


@pytest.mark.parametrize("case", ["missing", "file", "no_manifest", "bad_json"])
def test_verify_of_an_unusable_folder_exits_2_in_one_line(case, tmp_path, capsys):
    target = tmp_path / "d"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
        if case == "bad_json":
            (target / "manifest.json").write_text("{")
    status, _, err = verify(target, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "--verify" in lines[0] and "Traceback" not in err

def test_train_module_takes_an_optional_mask(artifacts):
    from rnnloss.trainer import CTRNNTrainer
    train = torch.jit.load(str(artifacts / "ctrnn_train.pt"))
    eager = CTRNNTrainer(export.build(validate(SMALL)))
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(7, 2, 3, generator=g), torch.randn(7, 2, 2, generator=g)
    mask = (torch.rand(7, 2, 2, generator=g) > 0.5).float()
    got, ref = train(x, target, mask), eager(x, target, mask)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)  # same kernels (rnnloss.parity)
    assert got[1][0].item() != train(x, target)[1][0].item()  # the mask weights the mse
    assert train(x, target, torch.zeros_like(mask))[1][0].item() == 0.0  # Σw = 0 gives mse 0


@pytest.mark.parametrize("writer", ["pt2", "onnx", "native"])
@pytest.mark.parametrize("value, kind", [(-0.5, "a negative value"), (float("nan"), "NaN")])
@pytest.mark.parametrize("readback", ["cpu_logic", "gpu_logic"])
def test_exports_refuse_invalid_lambdas_instead_of_baking_them_in(writer, value, kind, readback, tmp_path,
                                                                 monkeypatch):
    # Tracing skips the λ check (it reads values back); an invalid λ in the buffer would otherwise
    # become a constant of the exported graph, or a native file that loading refuses. Off the CPU a
    # forward reads λ back only when the buffer may have changed: an export must read them anyway,
    # here after a write through .data, which the version counter does not see.
    from rnnloss.native import save_native
    if readback == "gpu_logic":
        readback_as_on_a_gpu(monkeypatch)
    model = CTRNN((3, 8, 2))
    loss = RNNLoss(model, lambda_fr=0.01, lambda_fr_sd=0.01)
    example = (torch.randn(4, 2, 2), torch.randn(4, 2, 2), torch.rand(4, 2, 8))
    loss(*example)  # validated once
    loss.lambdas.data[5] = value
    with pytest.raises(ValueError, match=r"lambdas\[5\] \('fr_sd'\) must be finite and >= 0; it was set to " + kind):
        if writer == "pt2":
            export.export_pt2(loss, example, tmp_path / "loss.pt2")
        elif writer == "onnx":
            export.export_onnx(loss, example, tmp_path / "loss.onnx", opset=None)
        else:
            save_native(loss, tmp_path / "rnnloss_native.pt")
    assert not list(tmp_path.iterdir())
