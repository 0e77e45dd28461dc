"""The export command fails safely: bad configs, occupied --out, resource errors, kills, failed parity.

Most tests run ``export.main`` in this process; the install sequence itself is tested with fake
artifacts (:func:`fake_write`) so that each test takes milliseconds, and the kill tests run it in
a subprocess that SIGKILLs itself at a named step (``RNNLOSS_EXPORT_TEST_KILL_AT``).
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rnnloss import export, install, parity
from rnnloss.artifacts import GENERATOR, MANIFEST

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": {"dims": [2, 8, 1]}, "example": {"time": 4, "batch": 2}}


def child_env(**extra):
    """The environment for a child process: this checkout's package first, whatever the cwd."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop(install.KILL_ENV, None)
    env.update(extra)
    return env


def run_main(args, cwd, monkeypatch, capsys):
    """export.main in this process, from ``cwd``; returns (status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    status = export.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def names(line, path):
    """Whether ``line`` names ``path`` itself, not merely something inside it."""
    return re.search(re.escape(str(path)) + r"(?![\w/.-])", line) is not None


def tree(folder):
    """Every path under ``folder`` (links not followed) with its bytes (files) or target (links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


# ---------------------------------------------------------------- config values

NESTED = '{"model": ' + "[" * 100000 + "]" * 100000 + "}"
BAD_CONFIGS = {
    "not_json": ("{model: ", "--config: "),
    "unknown_section": ({"modle": {}}, "modle: unknown section"),
    "unknown_key": ({"loss": {"lamda_fr": 0.1}}, "loss.lamda_fr: unknown key"),
    "wrong_type": ({"model": {"tau": "fast"}}, 'model.tau: expected a number, got "fast"'),
    "dims_zero": ({"model": {"dims": [3, 0, 2]}}, "model.dims[1]: must be > 0, got 0"),
    "dims_short": ({"model": {"dims": [3, 2]}}, "model.dims: expected a list"),
    "negative_lambda": ({"loss": {"lambda_fr": -1}}, "loss.lambda_fr: must be >= 0, got -1"),
    "nan_lambda": ('{"loss": {"lambda_hid": NaN}}', "loss.lambda_hid: must be finite, got nan"),
    # float32 max is 3.4028234663852886e38; 1e39 would be inf in the float32 modules.
    "lambda_over_float32": ({"loss": {"lambda_fr": 1e39}}, "loss.lambda_fr: must be at most 3.4028234663852886e+38"),
    "tau_over_float32": ({"model": {"tau": 1e300}}, "model.tau: must be at most 3.4028234663852886e+38"),
    "time_zero": ({"example": {"time": 0}}, "example.time: must be > 0, got 0"),
    "batch_one": ({"example": {"batch": 1}}, "example.batch: must be >= 2"),
    "batch_float": ({"example": {"batch": 2.5}}, "example.batch: expected an integer, got 2.5"),
    "activation": ({"model": {"activation": "gelu"}}, "model.activation: expected one of"),
    "opset": ({"opset": 7}, "opset: expected null or an ONNX opset from 18 to 23, got 7"),
    "top_level_list": ([], "(top level): expected a JSON object"),
    # torch.manual_seed takes 0 ... 2**64 - 1.
    "seed_2_pow_64": ('{"seed": 18446744073709551616}', "seed: must be from 0 to 2**64 - 1"),
    "seed_negative": ({"seed": -1}, "seed: must be from 0 to 2**64 - 1"),
    "nested_too_deep": (NESTED, "is nested too deeply"),
    "deep_value": ('{"model": {"dims": ' + "[" * 500 + "]" * 500 + "}}", "model.dims: expected a list"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line_naming_the_key_and_no_output(case, tmp_path, monkeypatch, capsys):
    content, expected = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    status, _, err = run_main(["--config", path, "--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2
    assert expected in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_largest_seed_torch_accepts_is_valid():
    from rnnloss.config import validate
    assert validate({"seed": 2**64 - 1})["seed"] == 2**64 - 1
    torch.manual_seed(2**64 - 1)  # the bound is torch's own


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    status, _, err = run_main(["--config", tmp_path / "nope.json"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "--config: cannot read" in one_line(err)


def test_unknown_argument_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in one_line(capsys.readouterr().err)


def test_help_cites_no_document_the_repository_lacks(capsys):
    with pytest.raises(SystemExit):
        export.main(["--help"])
    assert "DESIGN" not in capsys.readouterr().out


# ---------------------------------------------------------------- what --out may replace

def write_fake_export(folder, marker="old", names=("rnn_loss.pt", "rnn_loss.onnx")):
    """A folder that is, by the rules, an earlier export: a manifest of this command listing
    files whose sha256 it records. Returns the folder's tree."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name in names:
        data = f"{marker} {name}".encode()
        (folder / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST).write_text(json.dumps({"generator": GENERATOR, "marker": marker, "sha256": sums}))
    return tree(folder)


def occupied_cwd(tmp_path):
    (tmp_path / "thesis.tex").write_text("chapter 1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("1,2")
    return tmp_path, ".", "thesis.tex"


def home_like(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH")
    (home / "Documents").mkdir()
    (home / "Documents" / "notes.txt").write_text("notes")
    return tmp_path, "home", ".bashrc, Documents/"


def symlink_to_user_folder(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "my_notes.txt").write_text("mine")
    (tmp_path / "out").symlink_to(target)
    return tmp_path, "out", "my_notes.txt"


def a_file(tmp_path):
    (tmp_path / "out.txt").write_text("a file")
    return tmp_path, "out.txt", "is a file, not a folder"


def export_plus_a_note(tmp_path):
    write_fake_export(tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return tmp_path, "out", "notes.txt besides the export"


def modified_export(tmp_path):
    write_fake_export(tmp_path / "out")
    (tmp_path / "out" / "rnn_loss.pt").write_text("retrained by hand")
    return tmp_path, "out", "rnn_loss.pt changed after the export"


def export_in_a_subfolder(tmp_path):
    write_fake_export(tmp_path / "out")
    write_fake_export(tmp_path / "out" / "nested")
    return tmp_path, "out", "nested/"


IN_THE_WAY = [occupied_cwd, home_like, symlink_to_user_folder, a_file, export_plus_a_note, modified_export,
              export_in_a_subfolder]


@pytest.mark.parametrize("setup", IN_THE_WAY, ids=lambda f: f.__name__)
def test_force_refuses_anything_but_an_earlier_export_and_touches_nothing(setup, tmp_path, monkeypatch, capsys):
    cwd, out, named = setup(tmp_path)
    before = tree(tmp_path)
    status, _, err = run_main(["--out", out, "--force", "--device", "cpu"], cwd, monkeypatch, capsys)
    assert status == 2
    line = one_line(err)
    assert named in line or (out == "." and "current folder" in line), line
    assert tree(tmp_path) == before


def test_earlier_export_needs_force(tmp_path, monkeypatch, capsys):
    before = write_fake_export(tmp_path / "out")
    status, _, err = run_main(["--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "holds an earlier export; pass --force" in one_line(err)
    assert tree(tmp_path / "out") == before


# ---------------------------------------------------------------- the install sequence, on fake artifacts

def fake_write(marker):
    """A stand-in for export.write_artifacts: two small files and the manifest that lists them."""
    def write(config, folder):
        sums = {}
        for name in ("rnn_loss.pt", "ctrnn_train.pt"):
            data = f"{marker} {name}".encode()
            (folder / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
        return {"generator": GENERATOR, "marker": marker, "sha256": sums}
    return write


def fake_parity(passed):
    def check(folder, eager, config, devices):
        return [parity.Row("rnn_loss.pt", "fake", "cpu", error="" if passed else "a fake failure")]
    return check


@pytest.fixture
def fake(monkeypatch):
    """export.run writes fake artifacts and parity passes, unless the test says otherwise."""
    monkeypatch.setattr(export, "write_artifacts", fake_write("new"))
    monkeypatch.setattr(parity, "check_artifacts", fake_parity(True))
    return monkeypatch


def marker_of(folder):
    return json.loads((folder / MANIFEST).read_text())["marker"]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".rnnloss-" in p.name)


@pytest.mark.parametrize("use_exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_an_earlier_export_and_leaves_no_temporary_entries(use_exchange, tmp_path, fake, capsys):
    write_fake_export(tmp_path / "out")
    from rnnloss.config import validate
    assert export.run(validate({}), tmp_path / "out", force=True, device="cpu", use_exchange=use_exchange) == 0
    assert marker_of(tmp_path / "out") == "new" and install.occupant(tmp_path / "out")[0] == "export"
    assert leftovers(tmp_path) == []
    assert "all 1 parity checks passed" in capsys.readouterr().out


def test_symlinked_out_installs_at_its_target_and_keeps_the_link(tmp_path, fake, capsys):
    target = tmp_path / "store" / "v1"
    write_fake_export(target)
    (tmp_path / "out").symlink_to(target)
    status, _, _ = run_main(["--out", "out", "--force", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 0
    assert (tmp_path / "out").is_symlink() and os.readlink(tmp_path / "out") == str(target)
    assert marker_of(target) == "new"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "store") == []


def test_empty_folder_and_dangling_link_receive_the_export(tmp_path, fake, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "not_yet")
    for out in ("empty", "link"):
        status, _, err = run_main(["--out", out, "--device", "cpu"], tmp_path, fake, capsys)
        assert status == 0, err
    assert marker_of(tmp_path / "empty") == "new" and marker_of(tmp_path / "not_yet") == "new"
    assert (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("limit, keep, kept", [(64 << 20, False, True), (0, False, False), (0, True, True)],
                         ids=["small-kept", "large-not-kept", "large-kept-when-asked"])
def test_failed_parity_exits_1_keeps_the_previous_export_and_the_rejected_build_by_policy(
        limit, keep, kept, tmp_path, fake, capsys):
    before = write_fake_export(tmp_path / "out")
    fake.setattr(parity, "check_artifacts", fake_parity(False))
    fake.setattr(export, "REJECTED_KEEP_BYTES", limit)
    args = ["--out", "out", "--force", "--device", "cpu"] + (["--keep-rejected"] if keep else [])
    status, out, _ = run_main(args, tmp_path, fake, capsys)
    assert status == 1 and "parity FAILED" in out
    assert tree(tmp_path / "out") == before
    assert (tmp_path / "out.rejected").exists() == kept
    assert ("pass --keep-rejected" in out) == (not kept)
    if kept:
        assert marker_of(tmp_path / "out.rejected") == "new"
    assert leftovers(tmp_path) == []


def test_parity_check_can_fail_for_real(tmp_path, monkeypatch, capsys):
    # Not faked: a tolerance no error can meet makes every real check fail (exit 1).
    monkeypatch.setattr(parity, "MARGIN", -1.0)  # a negative allowance
    from rnnloss.config import validate
    assert export.run(validate(SMALL), tmp_path / "out", force=False, device="cpu") == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


FAULTS = {
    "enospc": (OSError(errno.ENOSPC, "No space left on device", "x.pt"), "disk full: cannot write x.pt"),
    "torch_unexpected_pos": (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2752 vs "
                                          "2640"), "disk full"),
    "memory_error": (MemoryError(), "out of memory"),
    "cpu_allocator": (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
                      "out of memory"),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "out"), "permission denied: cannot write out"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resource_errors_exit_2_in_one_line_and_leave_nothing(fault, tmp_path, fake, capsys):
    error, expected = FAULTS[fault]

    def failing_write(config, folder):
        (folder / "partial.pt").write_bytes(b"half")
        raise error
    fake.setattr(export, "write_artifacts", failing_write)
    status, _, err = run_main(["--out", "new/deeper/out", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 2 and expected in one_line(err)
    assert list(tmp_path.iterdir()) == []  # the parent folders it made are gone too


def test_an_earlier_export_that_cannot_be_deleted_after_the_swap_is_named_and_blocks_no_later_run(
        tmp_path, fake, capsys):
    # The swap re-checks that the earlier export may be deleted; should deleting it fail even so
    # (its permissions changed in between), the line says where it is, and later runs go on.
    old = write_fake_export(tmp_path / "out")
    stuck = []

    def refuse(folder):
        stuck.append(folder)
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / MANIFEST))
    rmtree = shutil.rmtree

    def rmtree_sparing_stuck(path, ignore_errors=False, **kwargs):
        if Path(path) not in stuck:
            return rmtree(path, ignore_errors=ignore_errors, **kwargs)
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    remove = install.Workspace.__dict__["_remove"]  # the staticmethod itself
    fake.setattr(install.Workspace, "_remove", staticmethod(refuse))
    fake.setattr(shutil, "rmtree", rmtree_sparing_stuck)
    status, _, err = run_main(["--out", "out", "--force", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 2 and names(one_line(err), stuck[0]), err
    assert marker_of(tmp_path / "out") == "new" and tree(stuck[0]) == old
    # As left by a run that has ended (this process is still running, so its own are skipped):
    ended = subprocess.Popen(["true"])
    ended.wait()
    pid = re.search(r"rnnloss-(\d+)-", stuck[0].name).group(1)
    stuck.append(stuck[0].rename(stuck[0].with_name(stuck[0].name.replace(f"-{pid}-", f"-{ended.pid}-"))))
    fake.setattr(install.Workspace, "_remove", remove)
    fake.setattr(export, "write_artifacts", fake_write("newer"))
    status, _, err = run_main(["--out", "out", "--force", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 0, err
    assert marker_of(tmp_path / "out") == "newer" and leftovers(tmp_path) == [stuck[-1].name]


def test_unexplained_error_is_a_bug_exit_3_with_traceback(tmp_path, fake, capsys):
    def broken(config, folder):
        raise KeyError("oops")
    fake.setattr(export, "write_artifacts", broken)
    status, _, err = run_main(["--out", "out", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 3 and "Traceback" in err and "internal error" in err
    assert list(tmp_path.iterdir()) == []


def test_absurd_dims_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # W_hid alone is 4e10 bytes at N_hid = 100000; no export of it fits a test machine.
    (tmp_path / "c.json").write_text(json.dumps({"model": {"dims": [3, 100000, 2]}}))
    status, _, err = run_main(["--config", "c.json", "--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "model.dims [3, 100000, 2] with example time 50 and batch 8: exporting needs about" \
        in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_a_huge_output_size_counts_in_the_memory_estimate(tmp_path, monkeypatch, capsys):
    # N_out = 5e6: pred and label dominate (the estimate once counted the N_hid rates only).
    (tmp_path / "c.json").write_text(json.dumps({"model": {"dims": [1, 1, 5000000]}}))
    status, _, err = run_main(["--config", "c.json", "--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "exporting needs about" in one_line(err)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", "Exceeds the limit"),
    (b" " * (2 << 20), "longer than 1048576 characters"),
], ids=["not_utf8", "5000_digit_integer", "two_MiB"])
def test_unreadable_configs_exit_2_in_one_line(tmp_path, monkeypatch, capsys, content, message):
    (tmp_path / "c.json").write_bytes(content)
    status, _, err = run_main(["--config", "c.json", "--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and message in one_line(err)


def test_a_forged_manifest_listing_a_user_file_does_not_let_force_replace_it(tmp_path, monkeypatch, capsys):
    import hashlib
    folder = tmp_path / "forged"
    folder.mkdir()
    (folder / "thesis.tex").write_text("my thesis")
    digest = hashlib.sha256(b"my thesis").hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"component_names": [], "sha256": {"thesis.tex": digest}}))
    status, _, err = run_main(["--out", "forged", "--force"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "thesis.tex" in one_line(err)
    assert (folder / "thesis.tex").read_text() == "my thesis"


def test_disk_estimate_is_checked_against_free_space(tmp_path, monkeypatch, capsys):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: free._replace(free=1000))
    status, _, err = run_main(["--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "not enough disk space" in one_line(err) and "0.0 MiB is free" in err


def test_missing_onnx_extra_names_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    status, _, err = run_main(["--out", "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "needs onnxscript" in one_line(err) and "pip install rnnloss[onnx]" in err
    assert list(tmp_path.iterdir()) == []


def test_cuda_requested_without_a_gpu_is_refused(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    status, _, err = run_main(["--device", "cuda"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "no CUDA GPU" in one_line(err)


# ---------------------------------------------------------------- kills

KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from rnnloss import export, install, parity
    from test_cli import fake_parity, fake_write
    export.write_artifacts = fake_write("new")
    parity.check_artifacts = fake_parity(True)
    if {fallback!r}:
        install.exchange = lambda a, b: False
    if {sleep!r}:
        write = export.write_artifacts
        def slow(config, folder):
            manifest = write(config, folder)
            import time; time.sleep(60)
            return manifest
        export.write_artifacts = slow
    sys.exit(export.main(["--out", "out", "--force", "--device", "cpu"]))
""")


def start(tmp_path, *, step=None, fallback=False, sleep=False):
    env = child_env(**({install.KILL_ENV: step} if step else {}))
    code = KILL_SCRIPT.format(tests=str(ROOT / "tests"), fallback=fallback, sleep=sleep)
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


KILL_CASES = [(s, False) for s in install.STEPS if s != "aside"] + [("aside", True), ("swapped", True)]


@pytest.mark.parametrize("step, fallback", KILL_CASES, ids=[f"{s}{'-two-renames' if f else ''}" for s, f in KILL_CASES])
def test_sigkill_at_each_install_step_leaves_a_complete_export_and_the_next_run_cleans_up(
        step, fallback, tmp_path):
    old = write_fake_export(tmp_path / "out")
    proc = start(tmp_path, step=step, fallback=fallback)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the hook did not fire at {step}"
    out = tmp_path / "out"
    if fallback and step == "aside":
        assert not out.exists()  # the documented window of the two-rename fallback
    else:
        assert install.occupant(out)[0] == "export" and marker_of(out) in ("old", "new")
        assert marker_of(out) == "old" or step not in ("locked", "tmp-created", "written", "checked")
    # What the next run does first:
    install.clean_leftovers(out)
    assert leftovers(tmp_path) == []
    assert install.occupant(out)[0] == "export"
    if marker_of(out) == "old":
        assert tree(out) == old


def test_next_run_removes_a_killed_runs_leftovers(tmp_path, fake, capsys):
    write_fake_export(tmp_path / "out")
    proc = start(tmp_path, step="checked")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and leftovers(tmp_path) != []
    status, _, _ = run_main(["--out", "out", "--force", "--device", "cpu"], tmp_path, fake, capsys)
    assert status == 0 and leftovers(tmp_path) == []


def wait_for_artifacts(tmp_path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if tmps and any(tmps[0].iterdir()):
            return
        time.sleep(0.05)
    raise AssertionError("the export never started writing")


def test_a_live_runs_temporary_folder_is_never_removed(tmp_path):
    write_fake_export(tmp_path / "out")
    proc = start(tmp_path, sleep=True)
    try:
        wait_for_artifacts(tmp_path, proc)
        live = leftovers(tmp_path)
        assert install.clean_leftovers(tmp_path / "out") == [] and leftovers(tmp_path) == live
    finally:
        proc.kill()
        proc.communicate()
    assert sorted(install.clean_leftovers(tmp_path / "out")) == live and leftovers(tmp_path) == []


def test_sigterm_mid_export_exits_143_in_one_line_and_leaves_no_temporary_folder(tmp_path):
    old = write_fake_export(tmp_path / "out")
    proc = start(tmp_path, sleep=True)
    wait_for_artifacts(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in one_line(err)
    assert leftovers(tmp_path) == [] and tree(tmp_path / "out") == old


def test_real_export_killed_midway_keeps_the_previous_export(tmp_path):
    # The whole command, not fakes: SIGKILL while it writes, then the next run's cleanup.
    old = write_fake_export(tmp_path / "artifacts")
    (tmp_path / "c.json").write_text(json.dumps(SMALL))
    proc = subprocess.Popen([sys.executable, str(ROOT / "export" / "export.py"), "--config", "c.json",
                             "--out", "artifacts", "--force"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=child_env())
    wait_for_artifacts(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tree(tmp_path / "artifacts") == old
    install.clean_leftovers(tmp_path / "artifacts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "c.json"]


def _can_mount_tmpfs():
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -Urm and tmpfs mounts (Linux user namespaces)")
def test_full_disk_exits_2_in_one_line_and_leaves_nothing(tmp_path):
    # A real full disk: a 120 KiB tmpfs in a private mount namespace. The small export's
    # artifacts are ~180 KB together. The command refuses up front (its estimate is > 1 MiB);
    # with that check switched off a write fails with ENOSPC, which must end the same way.
    (tmp_path / "c.json").write_text(json.dumps(SMALL))
    (tmp_path / "unchecked.py").write_text(
        "import sys\nfrom rnnloss import export\nexport.check_resources = lambda config, folder: None\n"
        "sys.exit(export.main(sys.argv[1:]))\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    args = f"--config c.json --out {disk}/out --device cpu"
    script = (f"mount -t tmpfs -o size=120k tmpfs {disk} || exit 99; "
              f"{sys.executable} {ROOT / 'export' / 'export.py'} {args} 2>estimate.err; echo $? >>status; "
              f"{sys.executable} unchecked.py {args} 2>write.err; echo $? >>status; ls -A {disk} >left")
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=tmp_path, timeout=300, env=child_env())
    assert (tmp_path / "status").read_text().split() == ["2", "2"]
    assert "not enough disk space" in one_line((tmp_path / "estimate.err").read_text())
    line = one_line((tmp_path / "write.err").read_text())
    assert line.startswith("rnnloss-export: disk full: cannot write "), line
    assert (tmp_path / "left").read_text() == ""  # nothing partial on the full disk
