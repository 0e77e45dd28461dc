"""Input checks shared by the model and the loss.

Every function here compiles with TorchScript, so eager and scripted modules raise the same
messages. TorchScript formats a dtype as its integer code, hence :func:`dtype_name`.
"""
from typing import List

import torch
from torch import Tensor


def dtype_name(t: Tensor) -> str:
    """The dtype of ``t`` as ``torch.float32`` etc., identically in eager and TorchScript."""
    d = t.dtype
    if d == torch.float32:
        return "torch.float32"
    if d == torch.float64:
        return "torch.float64"
    if d == torch.float16:
        return "torch.float16"
    if d == torch.bfloat16:
        return "torch.bfloat16"
    if d == torch.bool:
        return "torch.bool"
    if d == torch.uint8:
        return "torch.uint8"
    if d == torch.int8:
        return "torch.int8"
    if d == torch.int16:
        return "torch.int16"
    if d == torch.int32:
        return "torch.int32"
    if d == torch.int64:
        return "torch.int64"
    if d == torch.complex64:
        return "torch.complex64"
    if d == torch.complex128:
        return "torch.complex128"
    return "a non-floating dtype"


def shape_of(t: Tensor) -> List[int]:
    """The shape as a plain list: prints the same (``[2, 3]``) in eager and TorchScript."""
    return list(t.shape)


def check_float_tensor(t: Tensor, name: str) -> None:
    """Raise TypeError unless ``t`` is a real floating tensor, ValueError if it is empty."""
    if not t.is_floating_point():
        raise TypeError(
            "{} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            "got dtype {}".format(name, dtype_name(t))
        )
    if t.numel() == 0:
        raise ValueError(
            "{} must not be empty, got shape {}".format(name, shape_of(t))
        )


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float16 / bfloat16 accumulate (and return) in float32; float32 / float64 keep theirs."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return torch.float32
    return t.dtype
