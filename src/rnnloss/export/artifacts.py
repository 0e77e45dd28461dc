"""The artifact registry: one :class:`Artifact` per file an export writes.

Each entry says how its file is written, how it is loaded and compared with eager mode (its parity
rows), and what it records. Every artifact embeds the export's description (``rnnloss.json``: the
config, λ, dims, inputs, versions — the manifest without its sums and parity results), so that
``--verify`` can hold every field of the manifest against every file, and the file's own contents
(its parameters and buffers, and the model options it records) against the config. Adding an
artifact is adding one entry to :data:`REGISTRY`.
"""
import copy
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..loss import RNNLoss
from ..model import CTRNN
from ..rules import COMPONENT_NAMES, LAMBDA_NAMES
from ..trainer import CTRNNTrainer
from . import executorch, onnx_checks
from .folder import GENERATOR
from .tracing import guarded, quiet, unspecialized, write_bytes
from .native import NATIVE, from_torchscript, load_native, load_scripted, save_native
from .parity import Row, compare_loss, fresh_shapes, gradient_rtol, run_row, sum_rtol, trainable, weights

INPUTS = ("pred", "label", "states")
OUTPUTS = ("total", "components")
METADATA = "rnnloss.json"  # the description every artifact embeds


def build(config: Dict[str, Any]) -> RNNLoss:
    """The model (seeded) and its loss, in eval mode, as the (validated) config says."""
    torch.manual_seed(config["seed"])
    m = config["model"]
    model = CTRNN(tuple(m["dims"]), tau=m["tau"], dt=m["dt"], activation=m["activation"],
                  batch_first=m["batch_first"], preact_noise=m["preact_noise"], postact_noise=m["postact_noise"],
                  init_state=m["init_state"], learn_alpha=m["learn_alpha"])
    return RNNLoss(model, **config["loss"]).eval()


def sample_inputs(loss: RNNLoss, time: int, batch: int, seed: int, mask: bool = False) -> Tuple[torch.Tensor, ...]:
    """pred and states from the model on random input, a random label; with ``mask``, graded weights
    shaped like pred, about a third of them 0."""
    g = torch.Generator().manual_seed(seed)
    model = loss.model
    x = torch.randn(*((batch, time) if model.batch_first else (time, batch)), model.n_in, generator=g)
    with torch.no_grad():
        pred, states = model(x)
    label = torch.randn(pred.shape, generator=g)
    if not mask:
        return pred, label, states
    weights = torch.rand(pred.shape, generator=g) * 1.5
    return pred, label, states, torch.where(weights < 0.5, torch.zeros_like(weights), weights)


def axes(config: Dict[str, Any], prefix: str = "") -> Tuple[str, str]:
    """The names of the two leading axes in the config's layout."""
    return (prefix + "batch", prefix + "time") if config["model"]["batch_first"] else (prefix + "time", prefix + "batch")


def input_shapes(config: Dict[str, Any]) -> Dict[str, List[Any]]:
    """The loss graphs' inputs as the ONNX graph declares them: label and mask share pred's axes, states (whose
    leading axes are samples, as in eager mode) have their own."""
    n_out, n_hid = config["model"]["dims"][2], config["model"]["dims"][1]
    shapes = {"pred": [*axes(config), n_out], "label": [*axes(config), n_out],
              "states": [*axes(config, "states_"), n_hid]}
    if config["mask"]:
        shapes["mask"] = [*axes(config), n_out]
    return shapes


def describe(config: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest fields that follow from the config alone."""
    first, second = axes(config)
    n_in, n_hid, n_out = config["model"]["dims"]
    inputs = input_shapes(config)
    return {
        "generator": GENERATOR, "component_names": list(COMPONENT_NAMES),
        "lambdas": {name: config["loss"][key] for name, key in zip(COMPONENT_NAMES, LAMBDA_NAMES)},
        "active": [name for name, key in zip(COMPONENT_NAMES, LAMBDA_NAMES) if config["loss"][key] > 0],
        "dims": {"n_in": n_in, "n_hid": n_hid, "n_out": n_out}, "inputs": inputs, "dtype": "float32",
        "outputs": {"total": [], "components": [len(COMPONENT_NAMES)]},
        "train_module": {"forward": "(x, target, mask=None) -> (total, components, output, states)",
                         "x": [first, second, n_in], "target": [first, second, n_out],
                         "methods": ["enforce_constraints()", "set_lambda(name, value)", "dims()", "is_batch_first()"]},
        "config": config,
    }


@dataclasses.dataclass
class Build:
    """What a writer gets: the eager loss (CPU, eval), the config, example inputs, the description to embed."""
    loss: RNNLoss
    config: Dict[str, Any]
    example: Tuple[torch.Tensor, ...]
    metadata: Dict[str, Any]

    @property
    def metadata_text(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)


@dataclasses.dataclass
class Check:
    """What a parity check gets: the folder, eager mode on the CPU, and fresh shapes."""
    folder: Path
    eager: RNNLoss
    config: Dict[str, Any]

    @property
    def shapes(self) -> List[Tuple[int, int]]:
        return fresh_shapes(self.config["example"]["time"], self.config["example"]["batch"])

    def loss_inputs(self, seed: int, device: str = "cpu") -> Callable[[int, int, int], List[torch.Tensor]]:
        """``inputs(i, time, batch)``: fresh loss inputs (sampled on the CPU, moved to ``device``)."""
        return lambda i, t, b: [x.to(device) for x in sample_inputs(self.eager, t, b, seed + i, self.config["mask"])]


def _moved(loss: RNNLoss, device: str) -> RNNLoss:
    return loss if device == "cpu" else copy.deepcopy(loss).to(device)


# ---- TorchScript: rnn_loss.pt and ctrnn_train.pt ----

def _write_scripted(module_for: Callable[[RNNLoss], torch.nn.Module]):
    def write(b: Build, path: Path) -> None:
        with quiet():
            scripted = torch.jit.script(module_for(b.loss))
            write_bytes(lambda f: torch.jit.save(scripted, f, _extra_files={METADATA: b.metadata_text}), path)
    return write


def _zip_metadata(path: Path) -> Dict[str, Any]:
    """The embedded description of a TorchScript or torch.export archive, read without loading it."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("/extra/" + METADATA)), None)
        if name is None:
            raise ValueError(f"{path.name} has no embedded {METADATA}")
        return json.loads(archive.read(name))


def _check_loss_pt(c: Check, device: str) -> Row:
    def body(row: Row) -> None:
        scripted = load_scripted(c.folder / "rnn_loss.pt", device)
        compare_loss(row, _moved(c.eager, device), scripted, trainable(scripted), c.loss_inputs(100, device),
                     c.shapes)
    return run_row(Row("rnn_loss.pt", "torchscript", device), body)


def _check_train_pt(c: Check, device: str) -> Row:
    def body(row: Row) -> None:
        scripted = load_scripted(c.folder / "ctrnn_train.pt", device)
        eager = CTRNNTrainer(_moved(c.eager, device))
        m = c.eager.model
        for i, (t, b) in enumerate(c.shapes):
            g = torch.Generator().manual_seed(200 + i)
            lead = (b, t) if m.batch_first else (t, b)
            x = torch.randn(*lead, m.n_in, generator=g).to(device)
            target = torch.randn(*lead, m.n_out, generator=g).to(device)
            extra = [torch.rand(*lead, m.n_out, generator=g).to(device)] if c.config["mask"] else []
            ref, got = eager(x, target, *extra), scripted(x, target, *extra)
            n = max([ref[2].numel(), ref[3].numel()] + [w.numel() for w in weights(c.eager)])
            row.compare_loss(got[:2], ref[:2], c.eager.lambdas, ref[3], n)
            for a, r in zip(got[2:], ref[2:]):  # output and states: sums of N_in + N_hid terms per step
                row.compare_gradient(a, r, sum_rtol(n))
            rtol = gradient_rtol(c.eager.active, ref[3], n)
            for a, r in zip(torch.autograd.grad(got[0], list(trainable(scripted).values())),
                            torch.autograd.grad(ref[0], list(trainable(eager).values()))):
                row.compare_gradient(a, r, rtol)
        row.checked = f"{len(c.shapes)} shapes, forward(x, target) values + parameter gradients"
    return run_row(Row("ctrnn_train.pt", "torchscript", device), body)


def _eager_state(load: Callable[[Path], RNNLoss]):
    """``contents`` of a file that loads back into an eager loss: the loss and its state."""
    def contents(path: Path) -> Tuple[RNNLoss, Dict[str, torch.Tensor]]:
        loss = load(path)
        return loss, loss.state_dict()
    return contents


# ---- torch.export: rnn_loss.pt2 ----

def dynamic_shapes(config: Dict[str, Any], names: Sequence[str], every_axis: bool) -> Dict[str, Dict[int, Any]]:
    """The inputs' dynamic axes: as :func:`input_shapes` declares them (the ONNX graph), or with ``every_axis``
    (the .pt2) every axis of every input its own, so that each size check is a node of the graph that
    AOTInductor keeps (:func:`~rnnloss.export.tracing.checked_like_pred`) rather than an input guard, which it
    drops."""
    from torch.export import Dim
    declared = input_shapes(config)
    dims: Dict[str, Any] = {}
    out = {}
    for name in names:  # (every_axis: examples through tracing.unspecialized)
        key = (lambda k: f"{name}_{k}") if every_axis else (lambda k: str(declared[name][k]))
        out[name] = {k: dims.setdefault(key(k), Dim(key(k), min=1)) for k in range(3)
                     if every_axis or isinstance(declared[name][k], str)}
    return out


def _names(example: Sequence[torch.Tensor]) -> Tuple[str, ...]:
    return INPUTS + ("mask",) if len(example) == 4 else INPUTS


def _write_pt2(b: Build, path: Path) -> None:
    b.loss.check_lambdas()  # λ become constants of the program
    with quiet():
        program = torch.export.export(guarded(b.loss), unspecialized(b.example),
                                      dynamic_shapes=dynamic_shapes(b.config, _names(b.example), every_axis=True))
    # Saved with its example inputs, whose rates can outweigh the weights: a 2 x 2 slice keeps what loading
    # uses them for (the guards' messages name the inputs' axes).
    program.example_inputs = (tuple(t[:2, :2].clone() for t in b.example), {})
    write_bytes(lambda f: torch.export.save(program, f, extra_files={METADATA: b.metadata_text}), path)


def _check_pt2(c: Check, device: str) -> Row:
    def body(row: Row) -> None:
        program = torch.export.load(str(c.folder / "rnn_loss.pt2"))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, device)
        module = program.module()
        compare_loss(row, _moved(c.eager, device), module, trainable(module), c.loss_inputs(100, device), c.shapes)
    return run_row(Row("rnn_loss.pt2", "torch.export", device), body)


def _pt2_state(path: Path) -> Tuple[None, Dict[str, torch.Tensor]]:
    with quiet():
        return None, dict(torch.export.load(str(path)).state_dict)


# ---- ONNX: rnn_loss.onnx ----

def _write_onnx(b: Build, path: Path) -> None:
    import onnx
    b.loss.check_lambdas()
    names = _names(b.example)
    opset = b.config["opset"] or 17  # 17: the newest opset onnx2torch converts; written as 18, then rewritten
    with quiet():
        torch.onnx.export(b.loss, tuple(b.example), str(path), dynamo=True, input_names=list(names),
                          output_names=list(OUTPUTS), dynamic_shapes=dynamic_shapes(b.config, names, False),
                          external_data=False, opset_version=max(opset, 18))
    proto = onnx_checks.add_refusals(onnx.load(str(path)))
    if opset == 17:
        onnx_checks.to_opset17(proto)
    b.metadata["opset"] = opset
    proto.metadata_props.add(key=METADATA, value=b.metadata_text)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _onnx_metadata(path: Path) -> Dict[str, Any]:
    import onnx
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA])


def _check_onnx(c: Check, device: str) -> Row:
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"

    def body(row: Row) -> None:
        import onnxruntime as ort
        session = ort.InferenceSession(str(c.folder / "rnn_loss.onnx"), providers=[provider])
        if provider not in session.get_providers():
            raise RuntimeError(f"{provider} did not load (session has {session.get_providers()})")

        def run(*inputs):
            feeds = {name: x.detach().cpu().numpy() for name, x in zip(_names(inputs), inputs)}
            return [torch.from_numpy(a) for a in session.run(list(OUTPUTS), feeds)]
        compare_loss(row, c.eager, run, None, c.loss_inputs(400), c.shapes)
    return run_row(Row("rnn_loss.onnx", f"onnxruntime {provider.replace('ExecutionProvider', '')}", device), body)


def _onnx_state(path: Path) -> Tuple[None, Dict[str, torch.Tensor]]:
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(path))
    return None, {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}


# ---- the native C++ library's file: rnnloss_native.pt ----

def _write_native(b: Build, path: Path) -> None:
    save_native(b.loss, path, metadata=b.metadata_text)


def _native_metadata(path: Path) -> Dict[str, Any]:
    return json.loads(torch.load(str(path), map_location="cpu", weights_only=True)["metadata"])


def _check_native(c: Check, device: str) -> Row:
    def body(row: Row) -> None:  # read back by Python; the C++ library itself: tests/cpp
        native = _moved(load_native(c.folder / NATIVE), device)
        compare_loss(row, _moved(c.eager, device), native, trainable(native), c.loss_inputs(100, device), c.shapes)
    return run_row(Row(NATIVE, "eager from the file", device), body)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file of an export.

    ``write(build, path)`` writes it; ``check(check, device)`` loads it and returns its parity row;
    ``metadata(path)`` reads the description it embeds without running it; ``contents(path)`` loads it into
    ``(eager loss or None, {name: tensor})``: the eager modules it rebuilds (whose options ``--verify``
    compares) and the parameters and buffers it holds."""
    name: str
    write: Callable[[Build, Path], None]
    check: Callable[[Check, str], Row]
    metadata: Callable[[Path], Dict[str, Any]]
    contents: Callable[[Path], Tuple[Optional[RNNLoss], Dict[str, torch.Tensor]]]
    needs: Tuple[str, ...] = ()  # optional modules it needs to be written and checked
    devices: Tuple[str, ...] = ("cpu", "cuda")  # where its parity runs (of those the export checks)


# The ONNX graph first: writing it settles the opset, which every artifact's description then records.
REGISTRY: Tuple[Artifact, ...] = (
    Artifact("rnn_loss.onnx", _write_onnx, _check_onnx, _onnx_metadata, _onnx_state,
             needs=("onnx", "onnxruntime", "onnxscript")),
    Artifact("rnn_loss.pt", _write_scripted(lambda loss: loss), _check_loss_pt, _zip_metadata, _eager_state(from_torchscript)),
    Artifact("ctrnn_train.pt", _write_scripted(CTRNNTrainer), _check_train_pt, _zip_metadata, _eager_state(from_torchscript)),
    Artifact("rnn_loss.pt2", _write_pt2, _check_pt2, _zip_metadata, _pt2_state),
    Artifact(NATIVE, _write_native, _check_native, _native_metadata, _eager_state(load_native)),
    Artifact("ctrnn.pte", executorch.write_model, executorch.check_model, executorch.metadata, executorch.contents,
             needs=("executorch",), devices=("cpu",)),
    Artifact("rnn_loss.pte", executorch.write_loss, executorch.check_loss, executorch.metadata, executorch.contents,
             needs=("executorch",), devices=("cpu",)),
    Artifact("ctrnn_train.pte", executorch.write_train, executorch.check_train, executorch.metadata,
             executorch.contents, needs=("executorch",), devices=("cpu",)),
)


def wanted(config: Dict[str, Any]) -> Tuple[Artifact, ...]:
    """The artifacts an export of ``config`` writes: the registry, less the ExecuTorch programs with
    ``"executorch": null``."""
    return tuple(a for a in REGISTRY if config["executorch"] is not None or "executorch" not in a.needs)


def check_all(folder: Path, config: Dict[str, Any], devices: Sequence[str], artifacts=REGISTRY,
              progress: Callable[[str], None] = lambda line: None) -> List[Row]:
    """Every artifact's parity rows on every device (ONNX Runtime's CUDA provider where it is installed)."""
    check = Check(folder, build(config), config)
    rows: List[Row] = []
    for artifact in artifacts:
        for device in [d for d in devices if d in artifact.devices]:
            if artifact.name.endswith(".onnx") and device != "cpu" and not _ort_has_cuda():
                continue
            row = artifact.check(check, device)
            progress(f"parity {row.artifact} on {row.runtime} {row.device}: {'pass' if row.passed else 'FAIL'}")
            rows.append(row)
    return rows + [_cross_device(check, device) for device in devices[1:]]


def _cross_device(c: Check, device: str) -> Row:
    def body(row: Row) -> None:
        eager = _moved(c.eager, device)
        compare_loss(row, c.eager, lambda *xs: [y.cpu() for y in eager(*[x.to(device) for x in xs])], None,
                     c.loss_inputs(300), c.shapes)
        row.checked = f"{len(c.shapes)} shapes, eager {device} vs eager cpu"
    return run_row(Row("RNNLoss (eager)", "eager", f"{device} vs cpu"), body)


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
