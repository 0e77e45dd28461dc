"""The ONNX graph's run-time refusals, built so that every ONNX consumer can load the graph.

An exported graph has no Python around it, and the ONNX exporter drops torch's assertion nodes,
so the rules a graph can see are added as nodes (:func:`add_refusals`). Each rule is one
``ScatterND`` named after the rule's message: it writes into a 1-element tensor at index 0 when
the rule holds and at index 1 — out of range — when it fails, so the node itself fails in every
runtime (what each one raises: docs/export.md). No output shape
depends on a check (tract refuses a graph whose shapes depend on data), and the checks use only
operators all of them implement: Shape, Gather, Equal, Greater, Less, Not, And, Cast, ReduceSum,
Where, ScatterND, Mul. Each output is multiplied by an exact 1.0 that depends on every rule, so
no output is computed without them; the rules come first in node order, so they fail first.

:func:`to_opset17` rewrites an opset-18 graph as opset 17 (the Reduce operators take their axes
as an attribute there), the newest opset onnx2torch converts; ``value_info`` is dropped, since
tract cannot unify it with concrete input shapes.
"""
from typing import List, Sequence

from ..rules import Rule, head

REDUCE_AXES_INPUT_SINCE_18 = {"ReduceMean", "ReduceL2", "ReduceL1", "ReduceMin", "ReduceMax", "ReduceProd",
                              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def add_refusals(model):
    """Add the rules (in place; returns ``model``): each input's rank and static axes as declared
    (GRAPH_SHAPE), label's and mask's shapes equal to pred's (LABEL_SHAPE, MASK_SHAPE), no empty pred
    or states (EMPTY), finite mask weights >= 0 (MASK_WEIGHTS). Dtypes are the runtime's to check."""
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    nodes: List = []

    def node(op: str, args: Sequence[str], name: str = "", **attrs) -> str:
        out = f"_check_{len(nodes)}_{op}"
        nodes.append(helper.make_node(op, list(args), [out], name=name or out, **attrs))
        return out

    def const(values, dtype=TensorProto.INT64, dims=None) -> str:
        dims = [len(values)] if dims is None else dims
        return node("Constant", [], value=helper.make_tensor("value", dtype, dims, list(values)))

    def all_true(flags: str) -> str:
        not_true = node("Cast", [node("Not", [flags])], to=TensorProto.INT64)
        return node("Equal", [node("ReduceSum", [not_true], keepdims=0), const([0], dims=[])])

    ones: List[str] = []

    def rule(ok: str, message: str) -> None:
        one = const([1.0], TensorProto.FLOAT)
        where = node("Where", [ok, const([0], dims=[1, 1]), const([1], dims=[1, 1])])
        ones.append(node("ScatterND", [one, where, one], name=message))

    def sizes(x: str, axes: Sequence[int]) -> str:
        return node("Gather", [node("Shape", [x]), const(list(axes))], axis=0)

    for x, t in inputs.items():
        dims = t.shape.dim
        message = head(Rule.GRAPH_SHAPE, x, "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]")
        rank = node("Shape", [node("Shape", [x])])
        rule(all_true(node("Equal", [rank, const([len(dims)])])), f"{message} (rank {len(dims)})")
        static = [k for k, d in enumerate(dims) if not d.dim_param]
        if static:
            expected = const([dims[k].dim_value for k in static])
            rule(all_true(node("Equal", [sizes(x, static), expected])), message)
    for x, message in (("label", head(Rule.LABEL_SHAPE)), ("mask", head(Rule.MASK_SHAPE))):
        if x in inputs:
            axes = range(len(inputs[x].shape.dim))
            rule(all_true(node("Equal", [sizes(x, axes), sizes("pred", axes)])), message)
    for x in ("pred", "states"):
        rule(all_true(node("Greater", [node("Shape", [x]), const([0], dims=[])])), head(Rule.EMPTY, x))
    if "mask" in inputs:
        dtype = inputs["mask"].elem_type
        negative = node("Less", ["mask", const([0.0], dtype, dims=[])])
        finite = node("Less", ["mask", const([float("inf")], dtype, dims=[])])  # NaN fails it too
        rule(all_true(node("And", [node("Not", [negative]), finite])), head(Rule.MASK_WEIGHTS))
    checks = list(nodes)
    del nodes[:]
    one = ones[0]
    for other in ones[1:]:
        one = node("Mul", [one, other])
    for out in graph.output:
        raw = out.name + "_unchecked"
        for n in graph.node:
            n.output[:] = [raw if name == out.name else name for name in n.output]
            n.input[:] = [raw if name == out.name else name for name in n.input]
        for init in graph.initializer:  # a graph of weight penalties alone folds to constants
            if init.name == out.name:
                init.name = raw
        scalar = node("ReduceSum", [one], keepdims=0)
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            scalar = node("Cast", [scalar], to=out.type.tensor_type.elem_type)
        nodes.append(helper.make_node("Mul", [raw, scalar], [out.name], name=f"_check_output_{out.name}"))
    computation = list(graph.node)
    del graph.node[:]
    graph.node.extend(checks + computation + nodes)
    del graph.value_info[:]
    return model


def to_opset17(model):
    """An opset-18 graph as opset 17 (in place; returns ``model``): the Reduce operators whose axes became
    an input in 18 take them as an attribute again. ``onnx.checker`` then checks every node against 17."""
    from onnx import helper, numpy_helper

    constants = {i.name: i for i in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    for n in model.graph.node:
        if n.op_type not in REDUCE_AXES_INPUT_SINCE_18:
            continue
        for a in [a for a in n.attribute if a.name == "noop_with_empty_axes"]:
            n.attribute.remove(a)
        if len(n.input) > 1 and n.input[1]:
            axes = numpy_helper.to_array(constants[n.input[1]]).ravel()
            n.attribute.append(helper.make_attribute("axes", [int(a) for a in axes]))
            del n.input[1:]
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 17
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    kept = [i for i in model.graph.initializer if i.name in used]  # the axes, now attributes
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model
