"""What every exported program shares: quiet exporters, memory-first writes, and the size rules as nodes of
the graph (for the programs whose inputs each have every axis as a dimension of their own)."""
import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence, Tuple

import torch

from ..loss import RNNLoss
from ..rules import Rule, head


@contextlib.contextmanager
def quiet():
    """The exporters print progress and warn about things that are fine here; keep the command's output clean."""
    # e.g. "torchvision is not installed"; torchao's CUDA kernels on a CPU machine; a pytree deprecation
    logs = [logging.getLogger(name) for name in ("torch.onnx", "torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def write_bytes(save: Callable[[io.BytesIO], None], path: Path) -> None:
    """Serialise into memory, then write with Python's file I/O: torch's own writer aborts the process
    (``terminate called ... unexpected pos``) when a write fails, e.g. on a full disk."""
    buffer = io.BytesIO()
    save(buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def checked_like_pred(pred, label, states, mask, n_out: int, n_hid: int, check):
    """The size rules as graph nodes, for exported programs whose inputs each have every axis as a dimension of
    their own: ``check(ok, message)`` for pred's last axis, emptiness, states' last axis and each axis of label
    and mask against pred's; returns label and mask copied into pred's sizes (an indexed copy, pred-sized:
    any layout, and a bounds check of its own), so that nothing is computed from their own sizes."""
    def like_pred(x, message):
        for k in range(pred.dim()):
            check(torch.scalar_tensor(x.size(k)) == torch.scalar_tensor(pred.size(k)), message)
        no_extra_axes(x, message, check)
        return x.reshape(-1)[torch.arange(pred.numel(), device=x.device)].view(pred.shape)

    pred_shape = head(Rule.GRAPH_SHAPE, "pred", f"[time, batch, {n_out}]")
    check(torch.scalar_tensor(pred.size(-1)) == n_out, pred_shape)
    no_extra_axes(pred, pred_shape, check)
    for name, t in (("pred", pred), ("states", states)):
        if t is not None:
            check(torch.scalar_tensor(t.numel()) > 0, head(Rule.EMPTY, name))
    if states is not None:
        check(torch.scalar_tensor(states.size(-1)) == n_hid, head(Rule.STATES_LAST_DIM, n_hid))
        no_extra_axes(states, head(Rule.STATES_LAST_DIM, n_hid), check)
    return like_pred(label, head(Rule.LABEL_SHAPE)), None if mask is None else like_pred(mask, head(Rule.MASK_SHAPE))


def no_extra_axes(t, message: str, check) -> None:
    """``ExportedProgram.module()`` checks no ranks, and a graph reads only the axes it was traced with: an
    input with extra trailing axes has more elements in its first slice along the last traced axis than the
    graph's sizes say. Counted on that slice only (time × batch elements). ExecuTorch checks ranks itself."""
    if not check.by_index:
        edge = t.narrow(t.dim() - 1, 0, 1)
        count = torch.ones_like(edge, dtype=torch.uint8).sum(dtype=torch.int64)
        check(count == torch.scalar_tensor(edge.numel(), dtype=torch.int64), message)


def unspecialized(example: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The examples with every axis of size 1 repeated to 2 (values kept valid): torch.export fixes an axis
    whose example has size 1, and a fixed axis is checked by an input guard only, which AOTInductor's build and
    the ExecuTorch runtime drop — a pred 2 wide would pass a graph for N_out = 1."""
    return tuple(t.expand(*[max(2, s) for s in t.shape]).contiguous() if 1 in t.shape else t for t in example)


class Refusals:
    """How an exported program refuses: an assertion node (``torch._assert_async``, which torch.export and
    AOTInductor keep), or — where a lowering drops assertions (ExecuTorch) — an index into a 1-element tensor
    that is out of range when the rule fails, whose 1.0 multiplies the outputs, so the kernel's bounds check
    stops the program."""

    def __init__(self, by_index: bool) -> None:
        self.by_index, self.ones = by_index, []

    def __call__(self, ok, message: str) -> None:
        if self.by_index:
            self.ones.append(torch.ones(1, device=ok.device)[torch.where(ok, 0, 1).reshape(1)])
        else:
            torch._assert_async(ok, message)

    def applied(self, *outputs):
        if not self.ones:
            return outputs
        one = torch.cat(self.ones).prod()
        return tuple(t * one for t in outputs)


class Guarded(RNNLoss):
    """The loss as the .pt2 and rnn_loss.pte hold it: its size checks are nodes of the graph
    (:func:`checked_like_pred`); input guards, which AOTInductor's default build drops and the ExecuTorch
    runtime does not check, are not relied on. ``by_index``: see :class:`Refusals`."""
    by_index = False

    def forward(self, pred, label, states=None, mask=None):
        check = Refusals(self.by_index)
        label, mask = checked_like_pred(pred, label, states, mask, self.model.n_out, self.n_hid, check)
        if mask is not None and self.by_index:  # forward's own device-side assertion is an assertion node
            check(((mask >= 0) & torch.isfinite(mask)).all(), head(Rule.MASK_WEIGHTS))
        return check.applied(*super().forward(pred, label, states, mask))


def guarded(loss: RNNLoss, by_index: bool = False) -> Guarded:
    """``loss`` with :class:`Guarded`'s forward: a shallow copy, so the same parameters under the same names."""
    out = copy.copy(loss)
    out.__class__ = Guarded
    out.by_index = by_index
    return out
