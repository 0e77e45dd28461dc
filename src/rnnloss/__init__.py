"""rnnloss: the composite CTRNN loss as a deployable module (eager, TorchScript, ONNX, torch.export)."""
from .loss import COMPONENT_NAMES, LAMBDA_NAMES, RNNLoss
from .model import CTRNN
from .scripted import from_torchscript

__all__ = ["CTRNN", "RNNLoss", "COMPONENT_NAMES", "LAMBDA_NAMES", "from_torchscript"]
__version__ = "0.1.0"
