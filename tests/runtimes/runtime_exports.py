"""Helpers of the runtime tests — exports for the runtime tests: only the artifacts a test module needs, written by the registry's own
writers (what ``rnnloss-export`` writes), without the parity run and the install."""
import sys
import types

from rnnloss.export.artifacts import REGISTRY, Build, build, describe, sample_inputs
from rnnloss.export.config import validate


def export_to(folder, raw_config, names):
    """Write the artifacts ``names`` of ``raw_config`` (merged over the default) into ``folder``; returns the
    eager loss they were written from and the config."""
    config = validate(raw_config)
    loss = build(config)
    ex = config["example"]
    example = sample_inputs(loss, ex["time"], ex["batch"], seed=config["seed"], mask=config["mask"])
    b = Build(loss, config, example, {**describe(config), "versions": {}, "created": "test"})
    for artifact in REGISTRY:  # in registry order (the ONNX graph settles the opset first)
        if artifact.name in names or artifact.name == "rnn_loss.onnx" and names:
            artifact.write(b, folder / artifact.name)
    return loss, config


def stub_torchvision():
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only; PyPI's torchvision does not
    load beside the CPU torch wheel and would pull a CUDA torch. An empty stand-in is enough for the loss graph
    (which has neither operator)."""
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.ops = types.ModuleType("torchvision.ops")
        tv.ops.nms = tv.ops.roi_align = tv.ops.box_convert = None
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, tv.ops
