"""The programs train_ctrnn and eval_loss (cpp/tools), with the native and the TorchScript engine."""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from cpp_cases import TOL
from rnnloss import CTRNN, RNNLoss
from rnnloss.export.artifacts import build, sample_inputs
from rnnloss.export.config import validate
from rnnloss.export.native import NATIVE, native_payload, save_native
from rnnloss.trainer import CTRNNTrainer

pytestmark = [pytest.mark.cpp, pytest.mark.xdist_group("cpp")]  # one worker builds and runs the C++
CONFIG = validate({"model": {"dims": [3, 32, 2]}, "example": {"time": 6, "batch": 3}})
LOSS_PT, TRAIN_PT = "rnn_loss.pt", "ctrnn_train.pt"


def script(module, path):
    torch.jit.save(torch.jit.script(module), str(path))


def run(program, *args, **kw):
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """An export folder holding what the programs read: rnn_loss.pt, ctrnn_train.pt and rnnloss_native.pt."""
    folder = tmp_path_factory.mktemp("cpp") / "artifacts"
    folder.mkdir()
    loss = build(CONFIG)
    script(loss, folder / LOSS_PT)
    script(CTRNNTrainer(loss), folder / TRAIN_PT)
    save_native(loss, folder / NATIVE, metadata="{}")
    return folder, loss


def save_inputs(loss, path, seed=1, time=3, batch=2, **changes):
    inputs = dict(zip(("pred", "label", "states"), sample_inputs(loss, time, batch, seed=seed)))
    inputs.update(changes)
    torch.save(inputs, path)
    return inputs


# ---- eval_loss ----

@pytest.mark.parametrize("engine", ["native", "torchscript"])
def test_eval_loss_writes_the_loss_and_gradients_of_python_eager(cpp_build, artifacts, tmp_path, engine):
    folder, loss = artifacts
    inputs = save_inputs(loss, tmp_path / "in.pt", seed=5, time=9, batch=4)
    done = run(cpp_build["eval_loss"], folder, tmp_path / "in.pt", tmp_path / "out.pt", "--engine", engine)
    assert done.returncode == 0, done.stderr
    got = dict(zip(("total", "components", "d_pred", "d_states"), torch.load(tmp_path / "out.pt", weights_only=True)))
    pred, states = inputs["pred"].requires_grad_(True), inputs["states"].requires_grad_(True)
    total, comps = loss(pred, inputs["label"], states)
    d_pred, d_states = torch.autograd.grad(total, (pred, states))
    for key, ref in {"total": total, "components": comps, "d_pred": d_pred, "d_states": d_states}.items():
        torch.testing.assert_close(got[key], ref.detach(), **TOL[torch.float32], msg=key)


@pytest.mark.parametrize("engine, prefix", [("native", ""), ("torchscript", "builtins.ValueError: ")])
def test_eval_loss_reports_the_loss_message_in_one_line(cpp_build, artifacts, tmp_path, engine, prefix):
    # TorchScript raises it as torch::jit::JITException, whose last line is Python's class and message.
    folder, loss = artifacts
    inputs = dict(zip(("pred", "label", "states"), sample_inputs(loss, 3, 2, seed=1)))
    torch.save(dict(inputs, label=inputs["label"][:, :1]), tmp_path / "in.pt")
    done = run(cpp_build["eval_loss"], folder, tmp_path / "in.pt", tmp_path / "out.pt", "--engine", engine)
    with pytest.raises(ValueError) as python:
        loss(inputs["pred"], inputs["label"][:, :1], inputs["states"])
    assert (done.returncode, done.stderr) == (1, f"eval_loss: {prefix}{python.value}\n")


@pytest.mark.parametrize("engine", ["native", "torchscript"])
@pytest.mark.parametrize("key", ["pred", "label", "states"])
def test_eval_loss_reports_the_loss_message_for_an_integer_input(cpp_build, artifacts, tmp_path, engine, key):
    # Not torch's "Only Tensors of floating point ... can require gradients" from making a leaf of it.
    folder, loss = artifacts
    inputs = dict(zip(("pred", "label", "states"), sample_inputs(loss, 3, 2, seed=1)))
    torch.save(dict(inputs, **{key: inputs[key].long()}), tmp_path / "in.pt")
    done = run(cpp_build["eval_loss"], folder, tmp_path / "in.pt", tmp_path / "out.pt", "--engine", engine)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.endswith(f"{key} must be a floating-point tensor (float16, bfloat16, float32 or float64), got "
                                "dtype torch.int64\n")


@pytest.mark.parametrize("inputs, problem", [
    (lambda p, l, s: p, "got a Tensor"),
    (lambda p, l, s: [p, l, s], "got a GenericList"),
    (lambda p, l, s: {"pred": p, "label": l}, "'states' is missing"),
    (lambda p, l, s: {"pred": p, "label": l, "states": s, "rates": s}, "unexpected key 'rates'"),
    (lambda p, l, s: {"pred": p, "label": l, "states": s.tolist()}, "got 'states' as a"),
], ids=["tensor", "list", "missing", "extra", "not_a_tensor"])
def test_eval_loss_refuses_inputs_that_are_not_a_dict_of_the_three_tensors(cpp_build, artifacts, tmp_path, inputs,
                                                                           problem):
    folder, loss = artifacts
    torch.save(inputs(*sample_inputs(loss, 3, 2, seed=1)), tmp_path / "in.pt")
    done = run(cpp_build["eval_loss"], folder, tmp_path / "in.pt", tmp_path / "out.pt")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "INPUTS must be a dict of the tensors 'pred', 'label' and 'states'" in done.stderr and problem in done.stderr


@pytest.mark.parametrize("write, problem", [
    (lambda i, path: torch.save(i, path, _use_new_zipfile_serialization=False),
     "is in torch.save's legacy format (_use_new_zipfile_serialization=False)"),
    (lambda i, path: torch.save(dict(i, pred=i["pred"].to_sparse()), path), "holds a sparse tensor"),
    (lambda i, path: path.write_bytes(b"pred,label,states\n"), "is not a torch.save file (not a zip archive)"),
], ids=["legacy", "sparse", "text"])
def test_eval_loss_says_why_it_cannot_read_inputs(cpp_build, artifacts, tmp_path, write, problem):
    folder, loss = artifacts
    write(dict(zip(("pred", "label", "states"), sample_inputs(loss, 3, 2, seed=1))), tmp_path / "in.pt")
    done = run(cpp_build["eval_loss"], folder, tmp_path / "in.pt", tmp_path / "out.pt")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"cannot read {tmp_path / 'in.pt'}: it {problem}" in done.stderr


@pytest.mark.parametrize("missing", ["inputs", "artifact", "not_a_zip"])
def test_eval_loss_names_the_file_it_cannot_open(cpp_build, artifacts, tmp_path, missing):
    folder, loss = artifacts
    inputs = tmp_path / "in.pt"
    save_inputs(loss, inputs)
    if missing == "inputs":
        inputs = tmp_path / "absent.pt"
        expected = f"eval_loss: cannot read INPUTS {inputs}\n"
    elif missing == "artifact":
        folder = tmp_path / "empty"
        folder.mkdir()
        expected = (f"eval_loss: rnnloss::load: cannot read {folder / NATIVE} (the export command writes it; "
                    "from Python: rnnloss.export.native.save_native(loss, path))\n")
    else:
        folder = tmp_path / "bad"
        folder.mkdir()
        (folder / NATIVE).write_bytes(b"not a zip")
        expected = f"eval_loss: rnnloss::load: cannot read {folder / NATIVE}: it is not a torch.save file (not a " \
                   "zip archive)\n"
    done = run(cpp_build["eval_loss"], folder, inputs, tmp_path / "out.pt")
    assert (done.returncode, done.stderr) == (1, expected)


def test_eval_loss_refuses_an_inconsistent_native_file_in_one_line(cpp_build, tmp_path):
    payload = native_payload(RNNLoss(CTRNN((3, 8, 2)), lambda_mse=1.0))
    payload["loss"]["lambdas"][4] = 0.3  # fr is inactive
    (tmp_path / "bad").mkdir()
    torch.save(payload, tmp_path / "bad" / NATIVE)
    torch.save({"pred": torch.zeros(3, 2, 2), "label": torch.zeros(3, 2, 2), "states": torch.zeros(3, 2, 8)},
               tmp_path / "in.pt")
    done = run(cpp_build["eval_loss"], tmp_path / "bad", tmp_path / "in.pt", tmp_path / "out.pt")
    assert (done.returncode, done.stderr) == (1, f"eval_loss: rnnloss::load: {tmp_path / 'bad' / NATIVE}: lambdas[4] "
                                                 "('fr') is non-zero but component 'fr' is inactive (its lambda was 0 "
                                                 "at construction); build the loss with a non-zero lambda_fr\n")


# ---- train_ctrnn ----

@pytest.mark.parametrize("engine", ["native", "torchscript"])
def test_train_ctrnn_halves_the_mse_anneals_logs_and_keeps_the_masks(cpp_build, tmp_path, engine):
    torch.manual_seed(0)
    n_hid = 32
    hid_mask = (torch.rand(n_hid, n_hid) < 0.5).float()
    signs = torch.ones(n_hid)
    signs[24:] = -1.0  # 24 excitatory, 8 inhibitory neurons

    def fresh():
        return CTRNN((3, n_hid, 2), sparsity_masks=(None, hid_mask, None), ei_masks=(None, signs, signs))
    model = fresh()
    loss = RNNLoss(model, lambda_hid=1e-3, lambda_fr=1e-2, lambda_fr_sd=1e-2)
    folder = tmp_path / "art"
    folder.mkdir()
    script(CTRNNTrainer(loss), folder / TRAIN_PT)
    save_native(loss, folder / NATIVE)
    out = tmp_path / "trained.pt"
    done = run(cpp_build["train_ctrnn"], folder, "--engine", engine, "--steps", 100, "--time", 30, "--out", out,
               "--log-every", 50)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"initial_mse=(\S+) final_mse=(\S+) steps=100", summary)
    assert m and float(m.group(2)) <= 0.5 * float(m.group(1))
    logs = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in logs] == ["1", "50", "100"]  # one line every 50 steps
    assert all(re.match(r"step \d+ total=\S+ mse=\S+ in=\S+ hid=\S+ out=\S+ fr=\S+ fr_sd=\S+ fr_cv=\S+ lambda_fr=",
                        line) for line in logs), logs
    if engine == "torchscript":
        trained = torch.jit.load(str(out)).loss
    else:  # the loss's state_dict as (name, tensor) pairs
        trained = RNNLoss(fresh(), lambda_hid=1e-3, lambda_fr=1e-2, lambda_fr_sd=1e-2)
        trained.load_state_dict(dict(torch.load(out, weights_only=True)))
    w_hid = trained.model.recurrent_layer.hidden_layer.weight
    w_out = trained.model.readout_layer.weight
    assert torch.all(w_hid[hid_mask == 0] == 0)
    assert torch.all(w_hid[:, :24] >= 0) and torch.all(w_hid[:, 24:] <= 0)
    assert torch.all(w_out[:, :24] >= 0) and torch.all(w_out[:, 24:] <= 0)
    assert not torch.equal(w_hid, model.recurrent_layer.hidden_layer.weight)  # it did train
    # λ_fr was annealed to a tenth of its initial value, and took effect.
    assert trained.lambdas[4].item() == pytest.approx(1e-3, rel=1e-12)
    assert logs[-1].endswith("lambda_fr=0.001")
    assert re.search(r"^ms_per_step=\d", done.stdout, flags=re.M)


def test_train_ctrnn_says_why_when_the_mse_did_not_halve(cpp_build, artifacts, tmp_path):
    done = run(cpp_build["train_ctrnn"], artifacts[0], "--steps", 1, "--out", tmp_path / "t.pt")
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and "did not halve" in done.stderr


@pytest.mark.parametrize("args, status, why", [
    ([], 2, "the first argument must be the artifact folder"),
    (["{tmp}", "--device", "tpu"], 2, "--device must be cpu or cuda, got 'tpu'"),
    (["{tmp}", "--engine", "onnx"], 2, "--engine must be native or torchscript, got 'onnx'"),
    (["{tmp}", "--steps", "ten"], 2, "--steps must be an integer > 0, got 'ten'"),
    (["{tmp}", "--steps"], 2, "--steps needs a value"),
    (["{tmp}", "--speed", "1"], 2, "unknown argument --speed"),
    (["{tmp}"], 1, "rnnloss_native.pt"),
    (["{tmp}", "--engine", "torchscript"], 1, "ctrnn_train.pt"),
    # Beyond int64: strtoll saturated at 2^63 - 1 and the run went on (practically forever).
    (["{tmp}", "--steps", "99999999999999999999999"], 2, "--steps must be an integer > 0, got '9999"),
    (["{tmp}", "--seed", "-99999999999999999999999"], 2, "--seed must be an integer, got '-9999"),
    (["{tmp}", "--time", "99999999999999999999999"], 2, "--time must be an integer >= 5, got '9999"),
    (["{tmp}", "--batch", " 4"], 2, "--batch must be an integer > 0, got ' 4'"),  # strtoll skipped spaces
    (["{tmp}", "--log-every", "+5"], 2, "--log-every must be an integer > 0, got '+5'"),
    (["{tmp}", "--steps", "0"], 2, "--steps must be an integer > 0, got '0'"),
    # --out is checked before anything is loaded or trained, not when the model is saved.
    (["{tmp}", "--out", "{tmp}/missing/trained.pt"], 2, "--out {tmp}/missing/trained.pt: folder {tmp}/missing does "
     "not exist"),
    (["{tmp}", "--out", "{tmp}"], 2, "--out {tmp}: is a folder"),
], ids=["none", "device", "engine", "steps", "no_value", "unknown", "no_native", "no_torchscript", "steps_overflow",
        "seed_overflow", "time_overflow", "batch_space", "log_every_plus", "steps_zero", "out_no_folder",
        "out_is_folder"])
def test_train_ctrnn_rejects_bad_arguments_in_one_line(cpp_build, tmp_path, args, status, why):
    done = run(cpp_build["train_ctrnn"], *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == status and len(done.stderr.splitlines()) == 1, done.stderr
    assert why.format(tmp=tmp_path) in done.stderr


def test_train_ctrnn_refuses_an_unwritable_out_folder_before_training(cpp_build, artifacts, tmp_path):
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to its user; this one is not
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    as_user = []
    try:
        if os.geteuid() == 0:  # root writes anywhere: run as nobody
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: root may write into a read-only folder")
            as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            probe = subprocess.run(as_user + [str(cpp_build["train_ctrnn"]), "--help"], capture_output=True, text=True)
            if probe.returncode != 0:  # e.g. the checkout lies in a folder of mode 0700 (mktemp -d)
                pytest.skip(f"nobody cannot run {cpp_build['train_ctrnn']} from where it was built: "
                            f"{probe.stderr.strip()[:160]}")
        done = subprocess.run(as_user + [str(cpp_build["train_ctrnn"]), str(artifacts[0]), "--steps", "1", "--out",
                                         str(locked / "t.pt")], capture_output=True, text=True)
    finally:
        shutil.rmtree(base)
    assert done.returncode == 2 and done.stdout == "", done.stdout  # nothing trained
    assert done.stderr == f"train_ctrnn: --out {locked / 't.pt'}: folder {locked} is not writable\n"


@pytest.mark.parametrize("engine, name", [("native", "ctrnn_trained_native.pt"), ("torchscript", "ctrnn_trained.pt")])
def test_train_ctrnn_writes_into_the_current_folder_by_default_not_the_export(cpp_build, artifacts, tmp_path, engine,
                                                                             name):
    # A file of ours in the export folder would make the next `rnnloss-export --force` refuse it.
    folder, _ = artifacts
    before = sorted(p.name for p in folder.iterdir())
    done = run(cpp_build["train_ctrnn"], folder, "--engine", engine, "--steps", 1, cwd=tmp_path)
    assert done.returncode == 1 and "did not halve" in done.stderr  # one step: it saves, then says so
    assert f"saved ./{name}" in done.stdout and (tmp_path / name).is_file()
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("program", ["train_ctrnn", "eval_loss"])
def test_help_prints_usage_and_exits_0(cpp_build, program):
    done = run(cpp_build[program], "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {program} ") and done.stderr == ""
    assert "--engine native|torchscript" in done.stdout
