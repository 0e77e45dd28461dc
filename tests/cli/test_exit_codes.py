"""The command's exit codes and its lines: 0 all checks pass, 1 a parity failure, 2 anything the user can fix
(one line, no traceback, nothing left behind), 3 a bug (with its traceback); progress on stderr unless --quiet;
--help and --version without torch.

The install is tested with fake artifacts (cases.use_fakes) so that these tests take milliseconds."""
import errno
import shutil
import subprocess
import sys

import pytest
import torch

from cases import SMALL, child_env, leftovers, one_line, use_fakes


def _fresh(code, timeout=60):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=child_env())


def test_an_unknown_argument_is_one_line_exit_2(capsys):
    from rnnloss.export import main
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in one_line(capsys.readouterr().err)


def test_verify_takes_no_export_options(capsys):
    from rnnloss.export import main
    with pytest.raises(SystemExit) as e:
        main(["--verify", "x", "--force"])
    assert e.value.code == 2 and "--verify DIR takes no --config, --out, --force" in one_line(capsys.readouterr().err)


def test_help_answers_without_importing_torch_and_cites_no_document_the_repository_lacks():
    code = ("import sys, rnnloss.export.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    status = e.code\n"
            "print('torch' in sys.modules, status, file=sys.stderr)")
    result = _fresh(code)
    assert result.stderr.split() == ["False", "0"], result.stderr[-2000:]
    assert "usage: rnnloss-export" in result.stdout and "--verify DIR" in result.stdout
    assert "DESIGN" not in result.stdout


def test_version_prints_the_package_version_without_torch():
    from importlib import metadata
    result = _fresh("import sys, rnnloss.export.cli as c\ntry:\n    c.main(['--version'])\nexcept SystemExit as e:\n"
                    "    print('torch' in sys.modules, e.code, file=sys.stderr)")
    assert result.stderr.split() == ["False", "0"], result.stderr[-2000:]
    assert result.stdout.strip() == f"rnnloss-export {metadata.version('rnnloss')}"


def test_the_installed_script_and_the_export_folders_script_run(tmp_path):
    from cases import ROOT
    for command in ([sys.executable, str(ROOT / "export" / "export.py"), "--version"],
                    [sys.executable, "-m", "rnnloss.export.cli", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=child_env(), cwd=tmp_path)
        assert result.returncode == 0 and result.stdout.startswith("rnnloss-export "), result.stderr[-2000:]


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_progress_lines_go_to_stderr_unless_quiet(quiet, tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    status, out, err = run_cli(["--out", "out", "--device", "cpu"] + (["--quiet"] if quiet else []), tmp_path)
    assert status == 0 and "all 1 parity checks passed; artifacts in out" in out
    if quiet:
        assert err == ""
    else:
        lines = err.strip().splitlines()
        assert lines == ["rnnloss-export: wrote rnn_loss.pt", "rnnloss-export: wrote ctrnn_train.pt"], err


FAULTS = {
    "enospc": (OSError(errno.ENOSPC, "No space left on device", "x.pt"), "disk full: cannot write x.pt"),
    "torch_unexpected_pos": (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2752 vs 2640"),
                             "disk full"),
    "memory_error": (MemoryError(), "out of memory"),
    "cpu_allocator": (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
                      "out of memory"),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "out"), "permission denied: cannot write out"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resource_errors_exit_2_in_one_line_and_leave_nothing(fault, tmp_path, run_cli, monkeypatch):
    error, expected = FAULTS[fault]
    from rnnloss.export import cli

    def failing_write(config, folder, progress):
        (folder / "partial.pt").write_bytes(b"half")
        raise error
    use_fakes(monkeypatch).setattr(cli, "write_all", failing_write)
    status, _, err = run_cli(["--out", "new/deeper/out", "--device", "cpu"], tmp_path)
    assert status == 2 and expected in one_line(err)
    assert list(tmp_path.iterdir()) == []  # the parent folders it made are gone too


def test_an_unexplained_error_is_a_bug_exit_3_with_its_traceback(tmp_path, run_cli, monkeypatch):
    from rnnloss.export import cli

    def broken(config, folder, progress):
        raise KeyError("oops")
    use_fakes(monkeypatch).setattr(cli, "write_all", broken)
    status, _, err = run_cli(["--out", "out", "--device", "cpu"], tmp_path)
    assert status == 3 and "Traceback" in err and "internal error (a bug" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_absurd_dims_are_refused_before_any_work(tmp_path, run_cli):
    # W_hid alone is 4e10 bytes at N_hid = 100000; no export of it fits a test machine.
    (tmp_path / "c.json").write_text('{"model": {"dims": [3, 100000, 2]}}')
    status, _, err = run_cli(["--config", "c.json", "--out", "out"], tmp_path)
    assert status == 2
    assert "model.dims [3, 100000, 2] with example time 50 and batch 8: exporting needs about" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_a_huge_output_size_counts_in_the_memory_estimate(tmp_path, run_cli):
    # N_out = 5e6: pred and label dominate the parity inputs.
    (tmp_path / "c.json").write_text('{"model": {"dims": [1, 1, 5000000]}}')
    status, _, err = run_cli(["--config", "c.json", "--out", "out"], tmp_path)
    assert status == 2 and "exporting needs about" in one_line(err)


def test_the_disk_estimate_is_checked_against_the_free_space(tmp_path, run_cli, monkeypatch):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free._replace(free=1000))
    status, _, err = run_cli(["--out", "out"], tmp_path)
    assert status == 2 and "not enough disk space" in one_line(err) and "0.0 MiB is free" in err


def test_a_missing_onnx_extra_names_the_pip_command(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    status, _, err = run_cli(["--out", "out"], tmp_path)
    line = one_line(err)
    assert status == 2 and "onnxscript is not installed: pip install onnxscript" in line and "'.[onnx" in line
    assert list(tmp_path.iterdir()) == []


def test_cuda_requested_without_a_gpu_is_refused(tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    status, _, err = run_cli(["--device", "cuda"], tmp_path)
    assert status == 2 and "--device cuda: no CUDA GPU is visible to torch" in one_line(err)


@pytest.mark.slow
def test_a_parity_failure_exits_1_and_installs_nothing(tmp_path, monkeypatch, capsys):
    # Not faked: a negative allowance makes every real check fail.
    from rnnloss.export import cli, parity
    from rnnloss.export.config import validate
    monkeypatch.setattr(parity, "MARGIN", -1.0)
    # (without the ExecuTorch programs, slow to lower and tested elsewhere)
    assert cli.run(validate({**SMALL, "executorch": None}), tmp_path / "out", force=False, device="cpu") == 1
    assert "parity FAILED: " in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args", [["--out", ""], ["--verify", ""]])
def test_an_empty_folder_name_is_refused_not_taken_for_a_default(args, capsys):
    from rnnloss.export import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "--out and --verify take a folder, got an empty name" in one_line(capsys.readouterr().err)
