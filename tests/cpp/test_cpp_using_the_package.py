"""The installed CMake package: what ``cmake --install`` puts in place, and an outside project that finds it
with nothing but the rnnloss prefix."""
import subprocess
from pathlib import Path

import pytest
import torch

from cpp_cases import configure_command

pytestmark = [pytest.mark.cpp, pytest.mark.xdist_group("cpp")]  # one worker builds and runs the C++


@pytest.fixture
def prefix(cpp_build):
    return cpp_build["prefix"]


def test_install_puts_headers_without_torchscript_and_the_programs(prefix):
    headers = sorted((prefix / "include" / "rnnloss").glob("*.h"))
    assert {h.name for h in headers} == {"rnnloss.h", "ctrnn.h", "loss.h", "load.h"}
    for header in headers:
        text = header.read_text()
        assert "torch/script.h" not in text and "jit" not in text, header
    assert (prefix / "lib" / "cmake" / "rnnloss" / "rnnlossConfig.cmake").is_file()
    for program in ("train_ctrnn", "eval_loss"):  # they run from there: linked with libtorch's path
        done = subprocess.run([str(prefix / "bin" / program), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {program} "), done.stderr
    assert not (prefix / "bin" / "rnnloss_cases").exists()  # the test driver is not installed


def test_an_outside_project_builds_with_only_the_rnnloss_prefix(cpp_build):
    consumer = cpp_build["consumer"]  # configured with -DCMAKE_PREFIX_PATH=<prefix> alone, built in the background
    status, output = consumer.result()
    configured = consumer.configured.stdout + consumer.configured.stderr
    assert consumer.configured.returncode == 0, configured
    # A fresh configure runs TorchConfig.cmake's library lookups: its "library kineto not found"
    # warning is answered by rnnlossTorch.cmake (kineto is inside libtorch_cpu in the wheels).
    assert "kineto" not in configured
    assert status == 0, output[-4000:]
    done = subprocess.run([str(consumer.folder / "build" / "consumer")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("rnnloss::RNNLoss(lambda_mse=1, lambda_fr=0.01)(")


def test_the_package_says_in_one_line_what_to_pass_when_torch_is_gone(cpp_build, prefix, tmp_path):
    config = prefix / "lib" / "cmake" / "rnnloss" / "rnnlossConfig.cmake"
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in config.parent.iterdir():  # a copy of the package whose libtorch is no longer where it was
        (moved / f.name).write_text(f.read_text())
    text = (moved / config.name).read_text()
    recorded = str(Path(torch.utils.cmake_prefix_path) / "Torch")
    assert f'set(_rnnloss_torch_hint "{recorded}")' in text
    (moved / config.name).write_text(text.replace(recorded, str(tmp_path / "gone")))
    app = cpp_build["consumer"].folder
    configured = subprocess.run(["cmake", "-S", str(app), "-B", str(tmp_path / "build"), f"-Drnnloss_DIR={moved}"],
                                capture_output=True, text=True)
    assert configured.returncode != 0
    # One message, which CMake wraps under "Reason given by package:".
    said = " ".join(configured.stderr.split())
    expected = (f"rnnloss needs libtorch, which is no longer at {tmp_path / 'gone'} (where rnnloss was built): "
                "pass -DTorch_DIR=<the folder holding TorchConfig.cmake>, or add libtorch's prefix to CMAKE_PREFIX_PATH")
    assert expected in said, configured.stderr


def test_a_library_only_build_has_no_program_targets(tmp_path):
    build = tmp_path / "library_only"
    done = subprocess.run(configure_command(build, "-DRNNLOSS_BUILD_PROGRAMS=OFF", "-DRNNLOSS_BUILD_TESTS=OFF"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    targets = subprocess.run(["cmake", "--build", str(build), "--target", "help"], capture_output=True, text=True)
    names = {line.split(":")[0].strip(". ") for line in targets.stdout.splitlines()}
    assert "rnnloss" in names and not names & {"train_ctrnn", "eval_loss", "rnnloss_cases"}, targets.stdout
