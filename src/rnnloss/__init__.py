"""rnnloss: the composite CTRNN loss as a deployable module (eager, TorchScript, torch.export, ONNX,
ExecuTorch, native C++).

``CTRNN`` and ``RNNLoss`` are imported on first use, so that ``rnnloss-export --help`` answers
without importing torch.
"""
from importlib import import_module, metadata

__all__ = ["CTRNN", "RNNLoss", "COMPONENT_NAMES", "LAMBDA_NAMES", "from_torchscript"]
_WHERE = {"CTRNN": ".model", "RNNLoss": ".loss", "COMPONENT_NAMES": ".rules", "LAMBDA_NAMES": ".rules",
          "from_torchscript": ".export.native"}
try:
    __version__ = metadata.version("rnnloss")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'rnnloss' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
