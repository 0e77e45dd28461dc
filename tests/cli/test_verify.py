"""--verify DIR: every sum, every manifest field against the artifacts and their config, each artifact's contents
against the config, parity rerun. Exit 0 all hold, 1 not (each problem on a line naming the file or the field),
2 DIR unusable (one line). Runs on copies of the shared export (a full verification: about 2 s)."""
import hashlib
import json

import pytest
import torch

from cases import MANIFEST, one_line
from rnnloss.export.artifacts import REGISTRY, build
from rnnloss.export.config import validate

ARTIFACTS = tuple(a.name for a in REGISTRY)  # every file an export writes (tests/cli/test_artifacts pins the list)


@pytest.fixture
def verify(run_cli, tmp_path):
    def run(folder):
        return run_cli(["--verify", folder, "--device", "cpu", "--quiet"], tmp_path)
    return run


def failures(out):
    return [line.removeprefix("FAILED ") for line in out.splitlines() if line.startswith("FAILED ")]


def edit_manifest(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def resum(folder, name):
    """Rewrite ``name``'s sum in the manifest, as a careless tool would after changing the file."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    edit_manifest(folder, lambda m: m["sha256"].__setitem__(name, digest))


def flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_passes_on_an_intact_export(exported, verify):
    status, out, err = verify(exported)
    assert status == 0 and failures(out) == [] and err == ""
    assert f"verified {exported}: {len(ARTIFACTS)} files match manifest.json, every field of it matches the " \
           "artifacts; all " in out


def test_verify_names_every_artifact_with_a_flipped_bit_and_loads_none(copy_of, verify, monkeypatch):
    from rnnloss.export import artifacts
    folder = copy_of()
    for name in ARTIFACTS:
        flip_bit(folder / name, (folder / name).stat().st_size // 2)
    monkeypatch.setattr(artifacts, "load_scripted", lambda *a, **k: pytest.fail("a file whose sum failed was loaded"))
    monkeypatch.setattr(artifacts, "load_native", lambda *a, **k: pytest.fail("a file whose sum failed was loaded"))
    status, out, _ = verify(folder)
    assert status == 1
    assert sorted(failures(out)) == sorted(f"{name}: sha256 differs from manifest.json (the file changed after the "
                                           "export)" for name in ARTIFACTS)


def test_verify_checks_the_other_artifacts_when_one_is_missing(copy_of, verify):
    folder = copy_of()
    (folder / "rnn_loss.onnx").unlink()
    status, out, _ = verify(folder)
    assert status == 1 and failures(out) == ["rnn_loss.onnx: missing (listed in manifest.json)"]
    passed = {line.split()[0] for line in out.splitlines() if line.rstrip().endswith(" pass")}
    assert passed == set(ARTIFACTS) - {"rnn_loss.onnx"}  # the others are still checked


def test_a_changed_lambda_with_a_matching_sum_fails_the_contents_and_the_parity_checks(copy_of, verify):
    # λ_mse = 1.0 is the first entry of the float64 lambdas buffer, stored raw in rnn_loss.pt's zip. Flip the lowest
    # bit of its second-highest byte (1.0 -> 1.0625) and rewrite the manifest's sum.
    folder = copy_of()
    path = folder / "rnn_loss.pt"
    raw = build(validate(json.loads((folder / MANIFEST).read_text())["config"])).lambdas.numpy().tobytes()
    data = path.read_bytes()
    assert data.count(raw) == 1
    flip_bit(path, data.index(raw) + 8 - 2)
    resum(folder, "rnn_loss.pt")
    status, out, _ = verify(folder)
    found = failures(out)
    assert status == 1
    assert "rnn_loss.pt: lambdas differs from the model its config builds" in found
    assert any(line.startswith("rnn_loss.pt: parity on torchscript cpu failed") for line in found)
    assert all(line.startswith("rnn_loss.pt: ") for line in found)


def test_a_retouched_native_file_with_a_matching_sum_fails(copy_of, verify):
    # λ_mse 0 and W_hid zeroed, the sum rewritten in the manifest.
    folder = copy_of()
    path = folder / "rnnloss_native.pt"
    payload = torch.load(path, weights_only=True)
    payload["loss"]["lambdas"][0] = 0.0
    payload["state_dict"]["recurrent_layer.hidden_layer.weight"].zero_()
    torch.save(payload, path)
    resum(folder, "rnnloss_native.pt")
    status, out, _ = verify(folder)
    found = failures(out)
    assert status == 1
    assert {"rnnloss_native.pt: lambdas differs from the model its config builds",
            "rnnloss_native.pt: model.recurrent_layer.hidden_layer.weight differs from the model its config builds"} \
        <= set(found)
    assert any(line.startswith("rnnloss_native.pt: parity on eager from the file cpu failed") for line in found)


FIELD_EDITS = {
    "lambdas.mse": (lambda m: m["lambdas"].__setitem__("mse", 2.0), "lambdas"),
    "inputs.pred": (lambda m: m["inputs"].__setitem__("pred", ["batch", "time", 2]), "inputs"),
    "dims.n_hid": (lambda m: m["dims"].__setitem__("n_hid", 17), "dims"),
    "active": (lambda m: m["active"].remove("fr"), "active"),
    "opset": (lambda m: m.__setitem__("opset", m["opset"] + 1), "opset"),
    "versions.torch": (lambda m: m["versions"].__setitem__("torch", "0.0.1"), "versions"),
}


@pytest.mark.parametrize("edit", list(FIELD_EDITS))
def test_an_edited_manifest_field_exits_1_naming_the_field(edit, copy_of, verify):
    change, field = FIELD_EDITS[edit]
    folder = copy_of()
    edit_manifest(folder, change)
    status, out, _ = verify(folder)
    found = failures(out)
    assert status == 1
    assert found and all(f"manifest field {field!r}" in line for line in found), found
    # every artifact records the field, so every one is named
    if field not in ("lambdas", "inputs", "dims", "active"):
        assert {f"manifest field {field!r} differs from what {name} records" for name in ARTIFACTS} <= set(found)
    else:
        assert f"manifest field {field!r} does not follow from its config" in found


def test_a_config_edited_together_with_its_fields_still_fails_against_the_artifacts(copy_of, verify):
    # A consistent lie: config, lambdas and nothing else say λ_mse = 2; the artifacts hold 1.
    folder = copy_of()

    def change(m):
        m["config"]["loss"]["lambda_mse"] = 2.0
        m["lambdas"]["mse"] = 2.0
    edit_manifest(folder, change)
    status, out, _ = verify(folder)
    found = failures(out)
    assert status == 1
    for name in ARTIFACTS:
        assert f"manifest field 'lambdas' differs from what {name} records" in found
        assert f"manifest field 'config' differs from what {name} records" in found


@pytest.mark.parametrize("edit, line", [
    (lambda m: m.__setitem__("note", "mine"), "manifest field 'note' is not one this command writes"),
    (lambda m: m.pop("created"), "manifest field 'created' is missing"),
    (lambda m: m["parity"][0].__setitem__("passed", False),
     "manifest field 'parity' does not record the passed checks an export installs with"),
], ids=["unknown_field", "missing_field", "parity_not_passed"])
def test_a_manifest_with_a_field_this_command_does_not_write_exits_1(edit, line, copy_of, verify):
    folder = copy_of()
    edit_manifest(folder, edit)
    status, out, _ = verify(folder)
    assert status == 1 and line in failures(out)


@pytest.mark.parametrize("case, expected", [
    ("missing", "not a folder"), ("file", "not a folder"), ("no_manifest", "has no manifest.json"),
    ("bad_json", "is not valid JSON"), ("not_an_object", "is not a JSON object"),
    ("not_ours", "was not written by rnnloss-export"), ("invalid_config", "the config in manifest.json is invalid"),
])
def test_verify_of_an_unusable_folder_exits_2_in_one_line(case, expected, tmp_path, verify):
    target = tmp_path / "d"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
        manifest = {"bad_json": "{", "not_an_object": "[]", "not_ours": '{"sha256": {"rnn_loss.pt": "00"}}',
                    "invalid_config": json.dumps({"generator": "rnnloss-export", "sha256": {"rnn_loss.pt": "00"},
                                                  "config": {"model": {"tau": -1}}})}.get(case)
        if manifest is not None:
            (target / MANIFEST).write_text(manifest)
    status, _, err = verify(target)
    line = one_line(err)
    assert status == 2 and line.startswith(f"rnnloss-export: --verify {target}") and expected in line, line
