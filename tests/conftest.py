import itertools

import pytest
import torch

from rnnloss import CTRNN, RNNLoss

NAMES = ("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")
ALL_ON = dict(lambda_mse=1.0, lambda_in=0.3, lambda_hid=0.5, lambda_out=0.7,
              lambda_fr=0.11, lambda_fr_sd=0.13, lambda_fr_cv=0.17)
# Every non-empty set of active components, as tuples of indices.
ALL_SUBSETS = [s for k in range(1, 8) for s in itertools.combinations(range(7), k)]

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")


def lambdas_for(active):
    """Keyword lambdas with the components in ``active`` (indices) on, the rest 0."""
    keys = list(ALL_ON)
    return {k: (ALL_ON[k] if i in active else 0.0) for i, k in enumerate(keys)}



def never_free(t: torch.Tensor) -> bool:
    """Stands in for ``rnnloss.loss._readback_is_free``: every device counts as one where reading λ
    back is a host–device synchronisation, so the CPU runs the λ check's GPU logic."""
    return False


def readback_as_on_a_gpu(monkeypatch):
    """Run the λ check's GPU logic on the CPU in eager mode (TorchScript keeps what it compiled
    first: scripted tests patch ``_readback_is_free`` with :func:`never_free` in a fresh process)."""
    import rnnloss.loss
    monkeypatch.setattr(rnnloss.loss, "_readback_is_free", never_free)

def make_model(dims=(3, 8, 2), seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return CTRNN(dims, **kw).to(dtype)


def make_inputs(model, time=5, batch=3, seed=1, dtype=None, device="cpu", positive=True):
    """pred, label, states with the model's dims; rates positive so μ is well away from 0."""
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or model.readout_layer.weight.dtype
    pred = torch.randn(time, batch, model.n_out, generator=g, dtype=torch.float64)
    label = torch.randn(time, batch, model.n_out, generator=g, dtype=torch.float64)
    states = torch.rand(time, batch, model.n_hid, generator=g, dtype=torch.float64)
    if not positive:
        states = states * 2 - 1
    return tuple(t.to(dtype=dtype, device=device) for t in (pred, label, states))


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def full_loss(model):
    return RNNLoss(model, **ALL_ON)


def script_roundtrip(module, tmp_path, name="m.pt"):
    """torch.jit.script, save and load back: what a deployed pipeline would run."""
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module), str(path))
    return torch.jit.load(str(path))
