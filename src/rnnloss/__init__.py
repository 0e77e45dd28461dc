"""rnnloss: the composite CTRNN loss as a deployable module (eager, TorchScript, ONNX, torch.export)."""
from .loss import COMPONENT_NAMES, LAMBDA_NAMES, RNNLoss
from .model import CTRNN

__all__ = ["CTRNN", "RNNLoss", "COMPONENT_NAMES", "LAMBDA_NAMES"]
__version__ = "0.1.0"
