"""Run-time refusals inside the exported loss graphs (``rnn_loss.pt2`` and ``rnn_loss.onnx``).

Eager mode and TorchScript raise on bad input before computing anything (``RNNLoss.forward``).
An exported graph has no Python around it, so the checks it can see must be part of the graph:

- **torch.export** (``.pt2``). Its input guards, built from the dynamic shapes that give pred,
  label, states (and mask) one shared ``time`` and ``batch`` dimension and static last axes,
  already refuse a label (or mask) whose shape differs from pred's — broadcastable ones included —
  and states whose last axis is not N_hid. They do not refuse empty axes: torch.export lets a
  dynamic dimension be 0 or 1 at run time whatever its declared minimum. ``RNNLoss.forward``
  adds what is missing when it is exported (``loss._exported_refusals``: assertion nodes,
  ``aten._assert_async.msg``): pred and states must not be empty, and mask weights must be
  finite and >= 0.
- **ONNX**. ONNX Runtime checks rank, dtype and the static axes of each input against the graph's
  declaration, nothing else (other runtimes may not check even that), and the ONNX exporter drops
  torch's assertion nodes.
  :func:`add_onnx_refusals` adds check nodes to the exported model: each check gates the input it
  is about through a ``Reshape`` to the input's own shape when the check holds and to an invalid
  shape (``[-2, …]``) when it fails. Every consumer of that input reads the gated tensor, so the
  check runs before anything uses the input, and a failure stops ``session.run`` with an error
  naming the node — and the node is named after the message (``pred and label must have the same
  shape``). The checks read shapes only, except the mask-weight check (one pass over the mask). The outputs are multiplied by an exact
  1.0 that depends on every gated input, so a check runs even when no component reads its input.
"""
from typing import Dict, List, Optional, Sequence

from ..rules import Rule, head

LABEL_SHAPE = head(Rule.LABEL_SHAPE)
PRED_EMPTY = head(Rule.EMPTY, "pred")
STATES_EMPTY = head(Rule.EMPTY, "states")
STATES_SAMPLES = head(Rule.GRAPH_SAMPLES)
MASK_SHAPE = head(Rule.MASK_SHAPE, "[time, batch, N_out]", "")
MASK_WEIGHTS = head(Rule.MASK_WEIGHTS)


def add_refusals(model):
    """Add the run-time refusals to an exported loss graph in place; returns ``model``.

    Checks (each a ``Reshape`` node named after its message, gating the input it names), for the
    inputs the graph has:

    ======  =====================================================================================
    label   ``LABEL_SHAPE``: label's time and batch sizes are pred's
    pred    ``PRED_EMPTY``: every axis of pred >= 1
    states  ``STATES_SAMPLES``: states' time and batch sizes are pred's; ``STATES_EMPTY``: every
            axis of states >= 1
    mask    ``MASK_SHAPE``: mask's time and batch sizes are pred's; then ``MASK_WEIGHTS``: every
            weight >= 0 and < inf (NaN fails both comparisons)
    ======  =====================================================================================

    Before these, every input's rank and static axes (N_out, N_hid) are checked against the
    graph's declaration (``states must have shape [time, batch, 64]``): ONNX Runtime checks them
    itself, other runtimes (``onnx.reference``) do not. "time and batch sizes" are the axes the
    graph declares with a ``dim_param``, so ``LABEL_SHAPE`` and ``MASK_SHAPE`` mean the whole shape
    is pred's. Dtypes are left to the runtime. States must share pred's
    sizes although eager does not ask it: the exporter takes the shared symbols from whichever input
    comes first, so a graph fed states of other sizes would divide the mse by a count read from
    states — a wrong number.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    names = {i.name for i in graph.input}
    dim_params = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    nodes: List = []
    counter = [0]

    def node(op: str, inputs: Sequence[str], name: Optional[str] = None, **attrs) -> str:
        counter[0] += 1
        out = f"_check_{op}_{counter[0]}"
        nodes.append(helper.make_node(op, list(inputs), [out], name=name or out, **attrs))
        return out

    def const(values: Sequence, dtype: int = TensorProto.INT64, scalar: bool = False) -> str:
        dims = [] if scalar else [len(values)]
        return node("Constant", [], value=helper.make_tensor("value", dtype, dims, list(values)))

    def all_true(flags: str) -> str:
        """A bool scalar: every entry of the bool tensor ``flags`` is true."""
        least = node("ReduceMin", [node("Cast", [flags], to=TensorProto.INT32)], keepdims=0)
        return node("Cast", [least], to=TensorProto.BOOL)

    def shape(x: str) -> str:
        return node("Shape", [x])

    bad = const([-2])  # Reshape takes -1, 0 and sizes; -2 is always an error
    zero = const([0], scalar=True)
    gated: Dict[str, str] = {name: name for name in names}

    def gate(x: str, ok: str, message: str) -> None:
        target = node("Where", [ok, shape(gated[x]), bad])
        counter[0] += 1
        out = f"_check_{x}_{counter[0]}"
        nodes.append(helper.make_node("Reshape", [gated[x], target], [out], name=message))
        gated[x] = out

    def same_sizes(x: str) -> str:
        """A bool scalar: every axis of x declared with a dim_param has pred's size on that axis."""
        axes = [k for k, p in enumerate(dim_params[x]) if p]
        theirs = [dim_params["pred"].index(dim_params[x][k]) for k in axes]
        picked = [node("Gather", [shape(name), const(idx)], axis=0) for name, idx in ((x, axes), ("pred", theirs))]
        return all_true(node("Equal", picked))

    # Rank and static axes first (what ONNX Runtime checks from the declarations, but other
    # runtimes, e.g. onnx.reference, do not), so the gathers below read axes that exist.
    for x in sorted(names):
        dims = list(graph.input)[[i.name for i in graph.input].index(x)].type.tensor_type.shape.dim
        message = "{} must have shape [{}]".format(x, ", ".join(d.dim_param or str(d.dim_value) for d in dims))
        rank_ok = node("Equal", [node("Size", [shape(gated[x])]), const([len(dims)], scalar=True)])
        gate(x, rank_ok, "{} (rank {})".format(message, len(dims)))  # node names must be unique
        static = [k for k, d in enumerate(dims) if not d.dim_param]
        if static:
            sizes = node("Gather", [shape(gated[x]), const(static)], axis=0)
            gate(x, all_true(node("Equal", [sizes, const([dims[k].dim_value for k in static])])), message)
    if "pred" in names:
        for x, message in (("label", LABEL_SHAPE), ("states", STATES_SAMPLES), ("mask", MASK_SHAPE)):
            if x in names:
                gate(x, same_sizes(x), message)
        gate("pred", all_true(node("Greater", [shape("pred"), zero])), PRED_EMPTY)
    if "states" in names:
        gate("states", all_true(node("Greater", [shape("states"), zero])), STATES_EMPTY)
    if "mask" in names:
        m = gated["mask"]
        valid = node("And", [node("GreaterOrEqual", [m, const([0.0], TensorProto.FLOAT, scalar=True)]),
                             node("Less", [m, const([float("inf")], TensorProto.FLOAT, scalar=True)])])
        gate("mask", all_true(valid), MASK_WEIGHTS)
    checks = list(nodes)

    # Every consumer of an input reads its gated version.
    for n in graph.node:
        for k, name in enumerate(n.input):
            if gated.get(name, name) != name:
                n.input[k] = gated[name]

    # An exact 1.0 that depends on every gated input (Size reads no data): the outputs wait for
    # every check even where no component reads the input (e.g. label when lambda_mse = 0).
    nodes.clear()
    count = None
    for x in sorted(gated):
        if gated[x] != x:
            size = node("Size", [gated[x]])
            count = size if count is None else node("Add", [count, size])
    if count is not None:
        one = node("Cast", [node("GreaterOrEqual", [count, zero])], to=TensorProto.FLOAT)
        for out in graph.output:
            raw = out.name + "_unchecked"
            for n in graph.node:
                n.output[:] = [raw if name == out.name else name for name in n.output]
                n.input[:] = [raw if name == out.name else name for name in n.input]
            for init in graph.initializer:  # a graph of weight penalties only folds to constants
                if init.name == out.name:
                    init.name = raw
            nodes.append(helper.make_node("Mul", [raw, one], [out.name], name=f"_check_output_{out.name}"))

    computation = list(graph.node)
    del graph.node[:]
    graph.node.extend(checks + computation + nodes)  # topological order: checks, graph, outputs
    return model
