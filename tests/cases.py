"""Shared case tables and helpers of the test suite; tests import from here, never from one another.

Nothing here is taken from the code under test where the test needs an independent value: the
component names and λ tables are written out, references live in ``reference.py``.

- Loss cases: :data:`NAMES`, :data:`ALL_ON`, :func:`lambdas_for`, the sets of active components
  (:data:`ALL_SUBSETS`, all 127, and :data:`COVERING`, the covering set the sweeps run),
  :func:`make_model`, :func:`make_inputs`, :func:`script_roundtrip`, :data:`DEVICES`.
- CLI cases: :data:`ROOT`, :func:`child_env`, :func:`one_line`, :func:`names`, :func:`tree`, an earlier
  export on disk (:func:`write_fake_export`) and fake artifacts and parity for the install sequence
  (:func:`fake_write`, :func:`fake_parity`), also used by the subprocesses of the kill tests.
"""
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ---------------------------------------------------------------- the loss

NAMES = ("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")
LAMBDA_KEYS = tuple("lambda_" + n for n in NAMES)
# Distinct λ, none a power of two, so that a component swapped with another or a λ applied twice shows.
ALL_ON = dict(lambda_mse=1.0, lambda_in=0.3, lambda_hid=0.5, lambda_out=0.7,
              lambda_fr=0.11, lambda_fr_sd=0.13, lambda_fr_cv=0.17)
# Every non-empty set of active components, as tuples of indices (127).
ALL_SUBSETS = [s for k in range(1, 8) for s in itertools.combinations(range(7), k)]


def _covering(sample=10, seed=20261207):
    """Every single component, every pair, all seven, and a seeded sample of ``sample`` other sets (39 in all):
    each component alone and each interaction of two is exercised, which is where a term can read another's
    statistics or gradient; the sample guards the larger mixtures."""
    fixed = [s for s in ALL_SUBSETS if len(s) <= 2] + [tuple(range(7))]
    others = [s for s in ALL_SUBSETS if s not in fixed]
    return fixed + sorted(random.Random(seed).sample(others, sample), key=lambda s: (len(s), s))


COVERING = _covering()


def subset_id(active):
    return "+".join(NAMES[i] for i in active)


def lambdas_for(active):
    """Keyword lambdas with the components in ``active`` (indices) at their :data:`ALL_ON` value, the rest 0."""
    return {k: (ALL_ON[k] if i in active else 0.0) for i, k in enumerate(LAMBDA_KEYS)}


def lambda_vector(active):
    """The λ of :func:`lambdas_for` as a float64 tensor, for the references."""
    return torch.tensor([ALL_ON[k] if i in active else 0.0 for i, k in enumerate(LAMBDA_KEYS)], dtype=torch.float64)


CUDA_REASON = "needs a CUDA GPU; none is visible to torch"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]

W_KEYS = ("model.recurrent_layer.input_layer.weight", "model.recurrent_layer.hidden_layer.weight",
          "model.readout_layer.weight")


def make_model(dims=(3, 8, 2), seed=0, dtype=torch.float32, **kw):
    from rnnloss import CTRNN
    torch.manual_seed(seed)
    return CTRNN(dims, **kw).to(dtype)


def make_inputs(model, time=5, batch=3, seed=1, dtype=None, device="cpu", positive=True):
    """pred, label, states (T, B, ·) with the model's dims, drawn in float64 and rounded once to ``dtype``;
    rates in (0, 1) (or (-1, 1) without ``positive``) so that μ is well away from 0."""
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or model.readout_layer.weight.dtype
    pred = torch.randn(time, batch, model.n_out, generator=g, dtype=torch.float64)
    label = torch.randn(time, batch, model.n_out, generator=g, dtype=torch.float64)
    states = torch.rand(time, batch, model.n_hid, generator=g, dtype=torch.float64)
    if not positive:
        states = states * 2 - 1
    return tuple(t.to(dtype=dtype, device=device) for t in (pred, label, states))


def weights_of(module):
    """(W_in, W_hid, W_out) of an RNNLoss (eager or scripted) or a CTRNN."""
    m = module.model if hasattr(module, "model") else module
    return m.recurrent_layer.input_layer.weight, m.recurrent_layer.hidden_layer.weight, m.readout_layer.weight


def script_roundtrip(module, tmp_path=None, name="m.pt"):
    """torch.jit.script, save and load back: what a deployed pipeline would run (in memory without ``tmp_path``)."""
    scripted = torch.jit.script(module)
    if tmp_path is None:
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)
    path = tmp_path / name
    torch.jit.save(scripted, str(path))
    return torch.jit.load(str(path))


# ---------------------------------------------------------------- deliberate mistakes
# Each sweep that was cut to the covering set proves it still has the power to catch these: introduced into the
# eager code (rnnloss.terms looks the functions up at call time), the sweep's own check must fail for exactly the
# sets that contain an affected component. TorchScript compiles from source once per process, so a mistake is
# only ever introduced into eager code (a scripted module made before it keeps the correct formulas).

def _sample_sd(mean_rates):
    n = mean_rates.numel()
    dev = mean_rates - mean_rates.mean()
    sd = ((dev * dev).sum() / (n - 1)).sqrt()  # N − 1: the sample SD, not the population SD
    return sd, sd / mean_rates.mean()


def _means_over_the_wrong_axis(states, need_sq, need_col):
    from rnnloss import ratesums
    sq, _ = ratesums.rate_sums(states, need_sq, False)
    col = states.to(torch.float64).reshape(states.size(-1), -1).sum(1)  # groups of consecutive rates, not neurons
    return sq, col if need_col else torch.zeros((), dtype=torch.float64)


def _square_of_the_mean(states, need_sq, need_col):
    from rnnloss import ratesums
    _, col = ratesums.rate_sums(states, False, need_col)
    total = states.to(torch.float64).sum()
    return total * total / states.numel() if need_sq else torch.zeros((), dtype=torch.float64), col


def _detached_backward(states, need_sq, need_col):
    from rnnloss import ratesums
    return ratesums.sums(states.detach(), need_sq, need_col)  # right values, no gradient to the rates


# name -> (function of rnnloss.terms replaced, its replacement, components whose values change, whose gradients do)
MISTAKES = {
    "sample_sd": ("rate_sd_cv", _sample_sd, {5, 6}, {5, 6}),
    "means_over_the_wrong_axis": ("rate_sums", _means_over_the_wrong_axis, {5, 6}, {5, 6}),
    "square_of_the_mean": ("rate_sums", _square_of_the_mean, {4}, {4}),
    "detached_backward": ("rate_sums", _detached_backward, set(), {4, 5, 6}),
}
VALUE_MISTAKES = [m for m, (_, _, values, _) in MISTAKES.items() if values]


def introduce(monkeypatch, mistake):
    """Put ``mistake`` into the eager code for the rest of the test; returns (values, gradients) it affects."""
    import rnnloss.terms
    name, replacement, values, gradients = MISTAKES[mistake]
    monkeypatch.setattr(rnnloss.terms, name, replacement)
    return values, gradients


# ---------------------------------------------------------------- the command line

KILL_ENV = "RNNLOSS_EXPORT_TEST_KILL_AT"  # the install's test hook (rnnloss.export.install)
GENERATOR = "rnnloss-export"              # manifest["generator"] of an export
MANIFEST = "manifest.json"
# A config small enough to export in seconds.
# executorch.time 6: the ExecuTorch programs unroll the time loop, and lowering them takes time per step
SMALL = {"model": {"dims": [3, 16, 2]}, "example": {"time": 6, "batch": 3}, "executorch": {"time": 6, "max_batch": 8}}


def _can_mount_tmpfs():
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# Tests that mount a small tmpfs in a private mount namespace (a mount point, a full disk).
TMPFS = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -Urm and tmpfs mounts (Linux user namespaces)")


def child_env(**extra):
    """The environment for a child process: this checkout's package first, whatever the cwd; no kill hook."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop(KILL_ENV, None)
    env.update(extra)
    return env


def one_line(err):
    """The single line of ``err``; fails if there are more or a traceback."""
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


def write_fake_export(folder, marker="old", files=("rnn_loss.pt", "rnn_loss.onnx")):
    """A folder that is, by the install's rules, an earlier export: a manifest of this command listing
    files whose sha256 it records. Returns the folder's tree."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name in files:
        data = f"{marker} {name}".encode()
        (folder / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST).write_text(json.dumps({"generator": GENERATOR, "marker": marker, "sha256": sums}))
    return tree(folder)


def marker_of(folder):
    return json.loads((Path(folder) / MANIFEST).read_text())["marker"]


def leftovers(folder):
    """The install's temporary entries (``.NAME.rnnloss-PID-RANDOM.*``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".rnnloss-" in p.name)


def fake_write(marker):
    """A stand-in for ``rnnloss.export.cli.write_all``: two small files and the manifest that lists them."""
    def write(config, folder, progress=lambda line: None):
        sums = {}
        for name in ("rnn_loss.pt", "ctrnn_train.pt"):
            data = f"{marker} {name}".encode()
            (Path(folder) / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
            progress(f"wrote {name}")
        return {"generator": GENERATOR, "marker": marker, "sha256": sums}
    return write


def fake_parity(passed):
    """A stand-in for ``rnnloss.export.artifacts.check_all``: one row, passed or failed."""
    def check_all(folder, config, devices, artifacts=(), progress=lambda line: None):
        from rnnloss.export.parity import Row
        return [Row("rnn_loss.pt", "fake", "cpu", error="" if passed else "a fake failure")]
    return check_all


def use_fakes(monkeypatch, marker="new", passed=True):
    """The export command writes fake artifacts and parity passes (or fails): the install in milliseconds."""
    from rnnloss.export import artifacts, cli
    monkeypatch.setattr(cli, "write_all", fake_write(marker))
    monkeypatch.setattr(artifacts, "check_all", fake_parity(passed))
    return monkeypatch
