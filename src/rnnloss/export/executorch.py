"""The ExecuTorch programs: ``ctrnn.pte`` (the model's forward), ``rnn_loss.pte`` (the loss's forward) and
``ctrnn_train.pte`` (the joint forward-backward graph that ExecuTorch's training module runs).

Shapes, memory planning and refusals (every axis a bounded dimension of its own, size rules as
:class:`~rnnloss.export.tracing.Refusals`): docs/export.md, "Shapes and dtypes". Programs run the portable
kernels (XNNPACK brought no gain for these small matrix products).
"""
import contextlib
import copy
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from .parity import Row, compare_loss, gradient_rtol, run_row, sum_rtol
from .tracing import Refusals, checked_like_pred, guarded, quiet, unspecialized

TRAIN_STEPS, TRAIN_LR = 100, 0.05  # the SGD trajectory ctrnn_train.pte is checked on


def _lower(program, path: Path, b, edge=False) -> None:
    from executorch.exir import to_edge, to_edge_transform_and_lower
    constants = {"rnnloss_json": b.metadata_text, "time_steps": b.config["executorch"]["time"],
                 "max_batch": b.config["executorch"]["max_batch"]}
    lowered = to_edge(program, constant_methods=constants) if edge else \
        to_edge_transform_and_lower(program, constant_methods=constants)
    with open(path, "wb") as f:
        f.write(lowered.to_executorch().buffer)


def _batch_axis(config) -> int:
    return 0 if config["model"]["batch_first"] else 1


def _model_inputs(config, batch: int, seed: int, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    n_in, _, outputs = config["model"]["dims"]
    lead = [config["executorch"]["time"]] * 2
    lead[_batch_axis(config)] = batch
    x = torch.randn(*lead, n_in, generator=g)
    target = torch.randn(*lead, outputs, generator=g)
    return (x, target, torch.rand(*lead, outputs, generator=g)) if mask else (x, target)


class _Forward(nn.Module):
    """The model's forward on ``x`` of exactly ``time`` steps and N_in inputs, with contiguous outputs
    (ExecuTorch cannot lower a copy of a batch-first, transposed, view).

    Every axis of ``x`` is a dimension of its own, so that its time and width are nodes the program can
    check (ExecuTorch takes any shape that fits an input's memory); ``x`` is then copied into those constant
    sizes by index (out of range when it is smaller), which is what the unrolled loop reads."""

    def __init__(self, model, time: int) -> None:
        super().__init__()
        self.model, self.time = model, time

    def forward(self, x):
        check = Refusals(by_index=True)
        sizes = [self.time, self.time, self.model.n_in]
        batch = 0 if self.model.batch_first else 1
        sizes[batch] = x.size(batch)
        for k in (1 - batch, 2):
            check(torch.scalar_tensor(x.size(k)) == sizes[k], "")
        check(torch.scalar_tensor(x.size(batch)) > 0, "")  # (eager: x must not be empty)
        x = x.reshape(-1)[torch.arange(sizes[0] * sizes[1] * sizes[2], device=x.device)].view(sizes)
        return check.applied(*(t.contiguous() for t in self.model(x)))


def _x_axes(config):
    return {"x": _own_axes(config, "x", config["model"]["dims"][0])}


def write_model(b, path: Path) -> None:
    with quiet():
        program = torch.export.export(_Forward(b.loss.model.eval(), b.config["executorch"]["time"]),
                                      unspecialized(_model_inputs(b.config, 2, 0)[:1]),
                                      dynamic_shapes=_x_axes(b.config))
        _lower(program, path, b)


def write_loss(b, path: Path) -> None:
    n_out = b.loss.model.n_out
    example = unspecialized([t[:2, :2].contiguous() for t in b.example])  # (batch-first rates: a transposed view)
    shapes = {name: _own_axes(b.config, name, n) for name, n in
              zip(("pred", "label", "states", "mask"), (n_out, n_out, b.loss.n_hid, n_out)[:len(example)])}
    b.loss.check_lambdas()
    with quiet():
        _lower(torch.export.export(guarded(b.loss, by_index=True), example, dynamic_shapes=shapes), path, b)


def _own_axes(config, name: str, n: int):
    """Every axis of an input its own dimension, bounded by the program's time, batch and ``n`` (at least 2:
    see :func:`~rnnloss.export.tracing.unspecialized`), so that each size rule is a node of the graph."""
    from torch.export import Dim
    ex, batch = config["executorch"], _batch_axis(config)
    bounds = {1 - batch: ("time", ex["time"]), batch: ("batch", ex["max_batch"]), 2: ("n", n)}
    return {k: Dim(f"{name}_{what}", min=1, max=max(2, bound)) for k, (what, bound) in bounds.items()}


class TrainStep(nn.Module):
    """``forward(x, target[, mask]) -> (total, components)`` of the model and its loss, the loss first (the
    joint graph differentiates output 0); target and mask get their own sizes, checked as graph nodes."""

    def __init__(self, loss, time: int) -> None:
        super().__init__()
        self.loss, self.time = loss, time

    def forward(self, x, target, mask=None):
        output, states = _Forward(self.loss.model, self.time)(x)
        check = Refusals(by_index=True)
        target, mask = checked_like_pred(output, target, None, mask, self.loss.model.n_out, self.loss.n_hid, check)
        if mask is not None:
            check(((mask >= 0) & torch.isfinite(mask)).all(), "")
        total, components = check.applied(*self.loss(output, target, states, mask))
        return total, components.detach()


def write_train(b, path: Path) -> None:
    from torch.export.experimental import _export_forward_backward

    loss = copy.deepcopy(b.loss)  # in eval mode: the program draws no noise (documented)
    inputs = unspecialized(_model_inputs(b.config, 2, 0, mask=b.config["mask"]))
    shapes = {**_x_axes(b.config),
              **{name: _own_axes(b.config, name, loss.model.n_out) for name in ("target", "mask")[:len(inputs) - 1]}}
    with quiet():
        program = torch.export.export(TrainStep(loss, b.config["executorch"]["time"]), inputs,
                                      dynamic_shapes=shapes, strict=False)
        _lower(_export_forward_backward(program), path, b, edge=True)


@contextlib.contextmanager
def _runtime_quiet():
    """The runtime's C++ start-up logs its CPU probing to stderr (file descriptor 2) on first use."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, quiet():
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _method(path: Path, name: str = "forward"):
    """``run(inputs)`` of a program's method; the runtime's start-up logs (on first use) go nowhere."""
    with _runtime_quiet():
        from executorch.runtime import Runtime
        method = Runtime.get().load_program(str(path)).load_method(name)

    def run(inputs):
        with _runtime_quiet():
            return method.execute(list(inputs))
    return run


def _training_module(path: Path):
    with _runtime_quiet():
        from executorch.extension.training import _load_for_executorch_for_training
        return _load_for_executorch_for_training(str(path))


def metadata(path: Path) -> Dict:
    return json.loads(_method(path, "rnnloss_json")([])[0])


def _batches(c) -> List[int]:
    top = c.config["executorch"]["max_batch"]
    return sorted({1, min(5, top), top})


def check_model(c, device: str) -> Row:
    def body(row: Row) -> None:
        method = _method(c.folder / "ctrnn.pte")
        for i, batch in enumerate(_batches(c)):
            (x,) = _model_inputs(c.config, batch, 500 + i)[:1]
            with torch.no_grad():
                ref = c.eager.model(x)
            got = method([x])
            n = ref[1].numel()
            for a, r in zip(got, ref):  # sums of N_in + N_hid terms per step
                row.compare_gradient(a, r, sum_rtol(n))
        row.checked = f"batches {_batches(c)} x {c.config['executorch']['time']} steps, output and states"
    return run_row(Row("ctrnn.pte", "executorch", device), body)


def check_loss(c, device: str) -> Row:
    def body(row: Row) -> None:
        method = _method(c.folder / "rnn_loss.pte")
        ex = c.config["executorch"]
        shapes = sorted({(1, 1), (ex["time"], 1), (1, ex["max_batch"]), (ex["time"], ex["max_batch"]),
                         (max(1, ex["time"] // 2), min(5, ex["max_batch"]))})
        compare_loss(row, c.eager, lambda *xs: method([x.contiguous() for x in xs]), None, c.loss_inputs(600),
                     shapes)  # ExecuTorch takes contiguous tensors only (batch-first rates are a transposed view)
    return run_row(Row("rnn_loss.pte", "executorch", device), body)


def check_train(c, device: str) -> Row:
    """Gradients of every learned parameter against eager autograd at several batch sizes (normwise, the
    parity's gradient allowance), then TRAIN_STEPS of SGD from the same weights on one batch in ExecuTorch and
    eagerly: the losses of the trajectory and the final weights, each allowed the one-step allowance times
    the number of steps (errors may add up step by step; none is assumed to shrink)."""
    def body(row: Row) -> None:
        from executorch.extension.training import get_sgd_optimizer
        module = _training_module(c.folder / "ctrnn_train.pte")
        eager = TrainStep(copy.deepcopy(c.eager), c.config["executorch"]["time"])
        params = {n: p for n, p in eager.named_parameters() if p.requires_grad}
        def allowance(inputs) -> float:
            with torch.no_grad():
                states = c.eager.model(inputs[0])[1]
            return gradient_rtol(c.eager.active, states, states.numel())

        for i, batch in enumerate(_batches(c)):
            inputs = _model_inputs(c.config, batch, 700 + i, mask=c.config["mask"])
            with _runtime_quiet():
                module.forward_backward("forward", list(inputs))
            grads = torch.autograd.grad(eager(*inputs)[0], list(params.values()))
            got = module.named_gradients()
            for name, g in zip(params, grads):
                row.compare_gradient(got[name], g, allowance(inputs))
        inputs = _model_inputs(c.config, _batches(c)[1], 800, mask=c.config["mask"])
        weights = module.named_parameters()
        for name, p in params.items():  # back to the exported weights (the calls above changed nothing)
            weights[name].copy_(p.detach())
        sgd, reference = get_sgd_optimizer(weights, TRAIN_LR, 0, 0, 0, False), torch.optim.SGD(params.values(), TRAIN_LR)
        steps_allowed = TRAIN_STEPS * allowance(inputs)
        for _ in range(TRAIN_STEPS):
            with _runtime_quiet():
                total, _ = module.forward_backward("forward", list(inputs))
            sgd.step(module.named_gradients())
            reference.zero_grad()
            ref_total = eager(*inputs)[0]
            ref_total.backward()
            reference.step()
            row.compare_gradient(total, ref_total.detach(), steps_allowed)
        for name, p in params.items():
            row.compare_gradient(weights[name], p.detach(), steps_allowed)
        row.checked = f"gradients at batches {_batches(c)}; {TRAIN_STEPS} SGD steps (lr {TRAIN_LR}): losses, weights"
    return run_row(Row("ctrnn_train.pte", "executorch training", device), body)


def contents(path: Path) -> Tuple[None, Dict[str, torch.Tensor]]:
    """The parameters a training program holds (named as in eager's state_dict); the other programs hold
    their weights as constants, which their parity rows check."""
    if path.name != "ctrnn_train.pte":
        return None, {}
    module = _training_module(path)
    config = metadata(path)["config"]
    with _runtime_quiet():  # a first call, after which it lists them
        module.forward_backward("forward", list(_model_inputs(config, 1, 0, mask=config["mask"])))
    return None, {k.removeprefix("loss."): v for k, v in module.named_parameters().items()}
