"""The C++ build the tests of this folder share: cpp/ configured and built once per session into
cpp/build-tests (at -O1; the Makefile's ``cpp`` target builds cpp/build; setuptools' build/ is left alone), installed
into a temporary prefix, and an outside project built against that prefix in the background (a compile
of libtorch's headers without a precompiled header: about 20 s of one core, overlapped with the tests)."""
import os
import shutil
import subprocess
import time

import pytest

from cpp_cases import BUILD, CONSUMER_CMAKE, CONSUMER_MAIN, TEST_FLAGS, configure_command, forget_other_torch


def check(command, **kw):
    done = subprocess.run(command, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


class Consumer:
    """The outside project (its CMakeLists.txt is five lines), to be configured with only
    ``-DCMAKE_PREFIX_PATH=prefix`` and built: :meth:`start` runs the configure (``configured``) and starts the
    build; :meth:`result` waits for it and returns (status, output)."""

    def __init__(self, folder, prefix):
        self.folder, self.prefix = folder, prefix
        folder.mkdir()
        (folder / "CMakeLists.txt").write_text(CONSUMER_CMAKE)
        (folder / "main.cpp").write_text(CONSUMER_MAIN)
        self.configured = self.process = self.log = None

    def start(self):
        self.configured = subprocess.run(["cmake", "-S", str(self.folder), "-B", str(self.folder / "build"),
                                          f"-DCMAKE_PREFIX_PATH={self.prefix}"], capture_output=True, text=True)
        self.log = open(self.folder / "build.log", "w+")
        if self.configured.returncode == 0:
            self.process = subprocess.Popen(["cmake", "--build", str(self.folder / "build")], stdout=self.log,
                                            stderr=subprocess.STDOUT)
        return self

    def result(self):
        if self.configured is None:
            self.start()
        if self.process is None:
            return self.configured.returncode, self.configured.stdout + self.configured.stderr
        status = self.process.wait(timeout=600)
        self.log.seek(0)
        return status, self.log.read()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.log is not None:
            self.log.close()


OUTSIDE_TEST = "test_an_outside_project_builds_with_only_the_rnnloss_prefix"


@pytest.fixture(scope="session")
def cpp_build(request, tmp_path_factory):
    """{program name: path} of the built programs; "seconds": how long configure and build took; "prefix": the
    install prefix; "consumer": the outside project (:class:`Consumer`), building in the background from here
    on when its test is among those selected."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build cpp/")
    start = time.monotonic()
    forget_other_torch(BUILD)
    check(configure_command(BUILD, "-DRNNLOSS_BUILD_PROGRAMS=ON", "-DRNNLOSS_BUILD_TESTS=ON", *TEST_FLAGS))
    check(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2)])
    seconds = time.monotonic() - start
    prefix = tmp_path_factory.mktemp("install") / "prefix"
    check(["cmake", "--install", str(BUILD), "--prefix", str(prefix)])
    consumer = Consumer(tmp_path_factory.mktemp("outside") / "consumer", prefix)
    if any(item.name == OUTSIDE_TEST for item in request.session.items):
        consumer.start()
    programs = {name: BUILD / name for name in ("train_ctrnn", "eval_loss", "rnnloss_cases")}
    yield {**programs, "seconds": seconds, "prefix": prefix, "consumer": consumer}
    consumer.stop()
