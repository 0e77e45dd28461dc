"""Hostile files: a FIFO as manifest.json or as an artifact, a TorchScript archive whose __setstate__ loops, a
scripted module that is not ours, a native file that claims huge dims. Each must end within seconds with a
one-line refusal — from ``rnnloss-export --force``, ``--verify`` and ``rnnloss.from_torchscript`` — never hang,
never allocate what the file claims.

Every case runs in a child process with a deadline (:data:`DEADLINE`), so that a hang fails the test instead of
stalling the suite."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from cases import MANIFEST, ROOT, TESTS, child_env, one_line, write_fake_export

# A hang never ends; these deadlines only have to stay above honest run times on a loaded 2-core machine.
DEADLINE = 20  # seconds: importing torch (1-5 s) and refusing; a hang is killed here
# A full --verify of the suite's small export: 11 s alone on a 2-core VM (7 s of it importing ExecuTorch's
# runtime, which imports its exporter), 13-15 s beside the suite's other worker; 60 s is 4x that.
VERIFY_DEADLINE = 60

LOOPING_MODULE = textwrap.dedent("""
    import sys, torch
    from typing import Tuple

    class Loops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = 1

        @torch.jit.export
        def __getstate__(self) -> Tuple[int, bool]:
            return (self.n, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[int, bool]) -> None:
            self.n = state[0]
            self.training = state[1]
            while self.n > 0:  # never ends: loading runs this
                self.n = self.n + 1 - 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.save(torch.jit.script(Loops()), sys.argv[1])
""")


def bounded(args, cwd, deadline=DEADLINE):
    """Run ``args`` with a deadline; (status, stdout, stderr, seconds). A hang fails the test."""
    start = time.monotonic()
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=deadline, env=child_env())
    except subprocess.TimeoutExpired:
        shown = " ".join(str(a) for a in args[1:])
        pytest.fail(f"{shown[-300:]} did not finish within {deadline} s (it hangs on a hostile file)")
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def export_command(*args):
    return [sys.executable, str(ROOT / "export" / "export.py"), *map(str, args), "--device", "cpu", "--quiet"]


def python(code):
    return [sys.executable, "-c", "import sys\nsys.path.insert(0, %r)\n" % str(TESTS) + textwrap.dedent(code)]


@pytest.fixture(scope="module")
def looping_archive(tmp_path_factory):
    """A TorchScript archive whose __setstate__ never returns (torch.jit.load of it hangs)."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "make.py").write_text(LOOPING_MODULE)
    subprocess.run([sys.executable, str(folder / "make.py"), str(folder / "loops.pt")], check=True, timeout=120,
                   env=child_env(), capture_output=True)
    return folder / "loops.pt"


def respaced(archive, dest):
    """The same archive with ``def  __setstate__`` (two spaces): the code TorchScript compiles is unchanged."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(".py"):
                data = data.replace(b"def __setstate__", b"def  __setstate__")
            out.writestr(info, data)
    return dest


# ---- from_torchscript

@pytest.mark.parametrize("variant", ["as_saved", "respaced"])
def test_from_torchscript_refuses_an_archive_whose_setstate_loops_in_one_line(variant, looping_archive, tmp_path):
    path = looping_archive if variant == "as_saved" else respaced(looping_archive, tmp_path / "loops.pt")
    status, out, err, _ = bounded(python(f"""
        import rnnloss
        try:
            rnnloss.from_torchscript({str(path)!r})
        except ValueError as e:
            print(type(e).__name__, e)
        """), tmp_path)
    assert status == 0, err[-2000:]
    line = one_line(out)
    assert line.startswith("NotAnRNNLossFile ") and "defines __setstate__" in line, line


def test_from_torchscript_refuses_a_fifo_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "rnn_loss.pt")
    status, out, err, _ = bounded(python(f"""
        import rnnloss
        try:
            rnnloss.from_torchscript({str(tmp_path / "rnn_loss.pt")!r})
        except ValueError as e:
            print(type(e).__name__, e)
        """), tmp_path)
    assert status == 0, err[-2000:]
    assert "is not a regular file" in one_line(out) or "not a TorchScript archive" in one_line(out)


def test_from_torchscript_names_what_a_scripted_module_of_someone_else_lacks(tmp_path):
    status, out, err, _ = bounded(python("""
        import torch, rnnloss
        try:
            rnnloss.from_torchscript(torch.jit.script(torch.nn.Linear(2, 2)))
        except ValueError as e:
            print(type(e).__name__, e)
        """), tmp_path)
    assert status == 0, err[-2000:]
    line = one_line(out)
    assert line.startswith("NotAnRNNLossFile ") and line.endswith(
        " is not an rnnloss TorchScript module: it has no model, component_names, _on, lambdas"), line


def test_load_native_refuses_huge_declared_dims_before_building_anything(tmp_path):
    # A small model's file that claims N_hid = 200000 (W_hid alone would be 160 GB): refused from the sizes of the
    # stored tensors, in one line, with no module built (CTRNN's constructor would allocate the claimed size).
    status, out, err, _ = bounded(python(f"""
        import torch
        from cases import make_model
        from rnnloss import RNNLoss
        from rnnloss.export import native
        payload = native.native_payload(RNNLoss(make_model((3, 8, 2)), lambda_fr=0.1))
        payload["model"]["dims"] = [3, 200000, 2]
        torch.save(payload, {str(tmp_path / "n.pt")!r})
        def never(*args, **kwargs):
            raise AssertionError("a module was built")
        native.CTRNN.__init__ = never
        try:
            native.load_native({str(tmp_path / "n.pt")!r})
        except ValueError as e:
            print(type(e).__name__, e)
        """), tmp_path)
    assert status == 0, err[-2000:]
    line = one_line(out)
    assert line.startswith("NotAnRNNLossFile ") and "model.dims [3, 200000, 2] needs" in line, line
    assert "recurrent_layer.input_layer.weight of shape [200000, 3], got [8, 3]" in line


def code_bomb(path):
    """A 20 KiB zip whose one code entry unpacks to 17 MiB (a few hundred GiB would do no worse to a reader that
    unpacks it whole)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/code/__torch__/m.py", b" " * (17 << 20))


# Each loader on every hostile file: one line naming the file, no hang, no unbounded allocation.
LOADERS = {"from_torchscript": "rnnloss.from_torchscript", "load_native": "native.load_native",
           "from_nn4n": "rnnloss.CTRNN.from_nn4n"}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_fifo_a_code_bomb_and_a_file_of_another_kind_in_one_line(loader, tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    code_bomb(tmp_path / "bomb.pt")
    status, out, err, _ = bounded(python(f"""
        import torch, rnnloss
        from rnnloss.export import native
        from cases import make_model
        torch.save({{"weights": torch.ones(2)}}, "dict.pt")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), "linear.pt")
        for name in ("fifo.pt", "bomb.pt", "dict.pt", "linear.pt", "missing.pt"):
            try:
                {LOADERS[loader]}(name)
                print(name, "LOADED")
            except (ValueError, FileNotFoundError) as e:
                print(name, type(e).__name__, " ".join(str(e).split()))
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]  # this process's own peak
        print("peak MiB", int(hwm.split()[1]) >> 10)  # (ru_maxrss would count the forking parent's)
        """), tmp_path)
    assert status == 0, err[-2000:]
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert int(lines.pop("peak")[4:]) < 1024, "a loader unpacked the 17 MiB entry many times over"
    for name, said in lines.items():
        assert "LOADED" not in said and len(said) < 400, (name, said)
    assert "is not a regular file" in lines["fifo.pt"]
    if loader != "from_nn4n":  # (nn4n's checkpoints are pickles, not TorchScript: torch.load refuses the bomb)
        assert all(said.startswith("NotAnRNNLossFile ") for said in lines.values()), lines
        assert "does not exist" in lines["missing.pt"]
    if loader == "from_torchscript":
        assert "holds more than 16 MiB of code" in lines["bomb.pt"]


# ---- rnnloss-export --force and --verify

def export_with(folder, name, make, listed=True):
    """A fake earlier export whose ``name`` is replaced by ``make(path)``; the manifest lists it (with the sum of
    what was there before) or not."""
    files = ("rnn_loss.onnx", "rnn_loss.pt") if listed else ("rnn_loss.onnx",)
    write_fake_export(folder, files=files)
    path = folder / name
    if path.exists():
        path.unlink()
    make(path)
    return folder


@pytest.mark.parametrize("case", ["fifo_manifest", "fifo_artifact", "looping_archive"])
def test_force_refuses_a_hostile_file_in_out_in_one_line_and_touches_nothing(case, looping_archive, tmp_path):
    import shutil
    out = tmp_path / "out"
    if case == "fifo_manifest":
        out.mkdir()
        os.mkfifo(out / MANIFEST)
        expected = "manifest.json is not a regular file"
    elif case == "fifo_artifact":
        export_with(out, "rnn_loss.pt", os.mkfifo)
        expected = "rnn_loss.pt besides the export its manifest.json lists"
    else:
        export_with(out, "rnn_loss.pt", lambda p: shutil.copy(looping_archive, p))
        expected = "rnn_loss.pt changed after the export"
    before = sorted(os.listdir(out))
    status, _, err, _ = bounded(export_command("--out", out, "--force"), tmp_path)
    assert status == 2 and expected in one_line(err), err
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_verify_refuses_a_fifo_manifest_in_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / MANIFEST)
    status, _, err, _ = bounded(export_command("--verify", tmp_path / "d"), tmp_path)
    assert status == 2 and "manifest.json is not a regular file" in one_line(err)


@pytest.mark.slow  # a full verification in a child process: ~11 s
@pytest.mark.parametrize("case", ["fifo_artifact", "looping_archive", "respaced_looping_archive", "huge_native_dims"])
def test_verify_fails_a_hostile_artifact_within_seconds_naming_it(case, copy_of, looping_archive, tmp_path):
    # In a real export, one artifact replaced and its sum rewritten (as an attacker would): --verify must not open
    # a FIFO or run the archive's code, and must say in single lines what is wrong with that file.
    import torch
    folder = copy_of()
    name = "rnnloss_native.pt" if case == "huge_native_dims" else "rnn_loss.pt"
    path = folder / name
    path.unlink()
    if case == "fifo_artifact":
        os.mkfifo(path)
    elif case == "huge_native_dims":
        from rnnloss.export import native
        from rnnloss.export.artifacts import build
        from rnnloss.export.config import validate
        from cases import SMALL
        payload = native.native_payload(build(validate(SMALL)))
        payload["model"]["dims"] = [3, 200000, 2]
        torch.save(payload, path)
    else:
        archive = looping_archive if case == "looping_archive" else respaced(looping_archive, tmp_path / "r.pt")
        path.write_bytes(archive.read_bytes())
    if case != "fifo_artifact":
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["sha256"][name] = digest
        (folder / MANIFEST).write_text(json.dumps(manifest))
    status, out, err, _ = bounded(export_command("--verify", folder), tmp_path, VERIFY_DEADLINE)
    assert status == 1, out + err[-2000:]
    assert "Traceback" not in err
    found = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert found and all(line.startswith(f"FAILED {name}: ") for line in found), found
    if case == "fifo_artifact":
        assert found == [f"FAILED {name}: not a regular file (not read)"]
