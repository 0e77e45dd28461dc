"""The export command fails safely: bad configs, existing folders, failed parity (DESIGN.md §5)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnnloss import export, parity

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": {"dims": [2, 8, 1]}, "example": {"time": 4, "batch": 2}}


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "export" / "export.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


BAD_CONFIGS = {
    "not_json": ("{model: ", "--config: "),
    "unknown_section": ({"modle": {}}, "modle: unknown section"),
    "unknown_key": ({"loss": {"lamda_fr": 0.1}}, "loss.lamda_fr: unknown key"),
    "wrong_type": ({"model": {"tau": "fast"}}, 'model.tau: expected a number, got "fast"'),
    "dims_zero": ({"model": {"dims": [3, 0, 2]}}, "model.dims[1]: must be > 0, got 0"),
    "dims_short": ({"model": {"dims": [3, 2]}}, "model.dims: expected a list"),
    "negative_lambda": ({"loss": {"lambda_fr": -1}}, "loss.lambda_fr: must be >= 0, got -1"),
    "nan_lambda": ('{"loss": {"lambda_hid": NaN}}', "loss.lambda_hid: must be finite, got nan"),
    "time_zero": ({"example": {"time": 0}}, "example.time: must be > 0, got 0"),
    "batch_float": ({"example": {"batch": 2.5}}, "example.batch: expected an integer, got 2.5"),
    "activation": ({"model": {"activation": "gelu"}}, "model.activation: expected one of"),
    "opset": ({"opset": 7}, "opset: expected null or an ONNX opset from 18 to 23, got 7"),
    "top_level_list": ([], "(top level): expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line_naming_the_key_and_no_output(case, tmp_path):
    content, expected = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = cli("--config", str(path), "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = cli("--config", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert result.returncode == 2 and "--config: cannot read" in result.stderr


def previous_output(tmp_path, name, text):
    """An artifacts folder from an earlier run, holding one file, and the small config beside it."""
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / name).write_text(text)
    (tmp_path / "c.json").write_text(json.dumps(SMALL))
    return out


def test_existing_non_empty_output_is_untouched_without_force(tmp_path):
    out = previous_output(tmp_path, "keep.txt", "previous work")
    result = cli("--config", "c.json", "--out", "artifacts", cwd=tmp_path)
    assert result.returncode == 2 and "pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "c.json"]


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "c.json").write_text(json.dumps(SMALL))
    result = cli("--config", "c.json", "--out", "file/artifacts", cwd=tmp_path)
    assert result.returncode == 2 and "cannot write --out" in result.stderr and "Traceback" not in result.stderr


def test_force_replaces_and_prints_an_all_pass_table(tmp_path):
    out = previous_output(tmp_path, "old.txt", "old")
    result = cli("--config", "c.json", "--out", "artifacts", "--force", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(export.ARTIFACTS)
    assert "FAIL" not in result.stdout and result.stdout.count(" pass") >= 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "c.json"]  # no temp folders left


def test_failed_parity_exits_1_and_keeps_the_previous_artifacts(tmp_path, monkeypatch, capsys):
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "previous.txt").write_text("previous")
    monkeypatch.setattr(parity, "MARGIN", -1.0)  # a negative allowance: every check fails
    from rnnloss.config import validate
    status = export.run(validate(SMALL), out, force=True, device="cpu")
    assert status == 1
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert "parity FAILED" in capsys.readouterr().out


def test_cuda_requested_without_a_gpu_is_refused(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    result = cli("--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr


def test_killed_export_leaves_the_previous_artifacts_intact(tmp_path):
    out = previous_output(tmp_path, "previous.txt", "previous")
    proc = subprocess.Popen([sys.executable, str(ROOT / "export" / "export.py"), "--config", "c.json",
                             "--out", "artifacts", "--force"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Wait until the export is under way (its temporary folder exists), then kill it.
    while time.time() < deadline and not any(p.name.startswith(".artifacts.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "previous.txt").read_text() == "previous"
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
