"""Parity of the exported artifacts with eager mode.

Every check runs eager mode and one runtime on the same fresh inputs — shapes that differ from
the export example, batch 1 and time 1 included, which is what proves the dynamic axes — and
records the normwise error: ``max_abs = max|runtime − eager|`` and
``max_rel = max_abs / max|eager|`` over every output (and gradient) of every shape.

Tolerances (normwise relative, float32), stated once here:

- ``SAME_KERNELS = 1e-5``: TorchScript and ``.pt2`` on the device eager used: the same ATen
  kernels; only fusion and op order may differ (a few ulp ≈ 1e-7 per reduction, far inside).
- ``OTHER_REDUCTIONS = 1e-4``: ONNX Runtime, or eager on another device: other reduction orders.
  fp32 summation of n terms has relative error ≲ n·ε in the worst case and ~√n·ε typically; for
  the largest reduction here (n ≈ 64·(T+7)·(B+5) ≈ 5e4 rates) √n·ε ≈ 1.3e-5, so 1e-4 leaves an
  8x margin while still catching any formula or axis mistake (those are O(1e-2) or larger).
"""
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .artifacts import INPUT_NAMES, LOSS_ONNX, LOSS_PT, LOSS_PT2, OUTPUT_NAMES, TRAIN_PT, sample_inputs
from .trainer import CTRNNTrainer

SAME_KERNELS = 1e-5
OTHER_REDUCTIONS = 1e-4


@dataclasses.dataclass
class Row:
    artifact: str
    runtime: str
    device: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    rtol: float = SAME_KERNELS
    checked: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.max_rel <= self.rtol

    def update(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        if got.shape != ref.shape:
            raise AssertionError(f"shape {list(got.shape)} != eager {list(ref.shape)}")
        if not torch.equal(torch.isfinite(got), torch.isfinite(ref)):
            raise AssertionError("non-finite entries differ from eager")
        finite = torch.isfinite(ref)
        diff = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
        scale = ref[finite].abs().max().item() if finite.any() else 0.0
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def devices_for(choice: str) -> List[str]:
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return ["cpu", "cuda"]
    return ["cpu"]


def fresh_shapes(time: int, batch: int) -> List[Tuple[int, int]]:
    """(time, batch) pairs that differ from the export example, batch 1 and time 1 among them."""
    shapes = [(1, 1), (time + 3, 1), (1, batch + 2), (time + 7, batch + 5)]
    return [s for s in shapes if s != (time, batch)]


def _inputs(loss, time, batch, seed, device):
    return [t.to(device) for t in sample_inputs(loss, time, batch, seed)]


def _loss_outputs_and_grads(fn: Callable, loss_params: Dict[str, torch.Tensor], pred, label, states):
    """(total, components) and the gradients of total + Σ components w.r.t. pred, states, params."""
    pred = pred.detach().clone().requires_grad_(True)
    states = states.detach().clone().requires_grad_(True)
    total, comps = fn(pred, label, states)
    wanted = [pred, states] + list(loss_params.values())
    grads = torch.autograd.grad(total + comps.sum(), wanted, allow_unused=True)
    named = dict(zip(["d_pred", "d_states"] + [f"d_{k}" for k in loss_params], grads))
    return [total, comps], named


def _compare_loss(row: Row, eager, runtime, runtime_params, shapes, device, eager_cpu):
    """Values and gradients (pred, states, trainable parameters) of ``runtime`` vs ``eager``.

    Inputs are sampled with the CPU model (its generator is a CPU one) and moved to ``device``.
    """
    eager_params = trainable(eager)
    for i, (t, b) in enumerate(shapes):
        pred, label, states = _inputs(eager_cpu, t, b, seed=100 + i, device=device)
        ref, ref_g = _loss_outputs_and_grads(eager, eager_params, pred, label, states)
        got, got_g = _loss_outputs_and_grads(runtime, runtime_params, pred, label, states)
        for key, g in ref_g.items():
            if g is None or got_g.get(key) is None:
                if (g is None) != (got_g.get(key) is None):
                    raise AssertionError(f"gradient {key} present in only one of eager and runtime")
                continue
            row.update(got_g[key], g)
        for a, r in zip(got, ref):
            row.update(a, r)
    row.checked = f"{len(shapes)} shapes (T,B) {shapes}, values + gradients"


def trainable(module) -> Dict[str, torch.Tensor]:
    """The parameters that receive gradients (nn4n's fixed zero biases and init state do not)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, or torch's allocator failing (CUDA: OutOfMemoryError; CPU: a RuntimeError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def _check(rows: List[Row], row: Row, body: Callable[[Row], None]) -> None:
    try:
        body(row)
    except Exception as e:  # a failure to load or run is a failed check, reported in the table
        if is_out_of_memory(e):
            raise  # not the artifact's fault: the caller reports it (exit 2)
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    rows.append(row)


def check_artifacts(folder: Path, eager_cpu, config: Dict[str, Any], devices: Sequence[str]) -> List[Row]:
    """Run every artifact on every runtime and device against eager; returns the table rows."""
    ex = config["example"]
    shapes = fresh_shapes(ex["time"], ex["batch"])
    rows: List[Row] = []
    for device in devices:
        eager = _moved(eager_cpu, device)

        def torchscript_loss(row, eager=eager, device=device):
            scripted = torch.jit.load(str(folder / LOSS_PT), map_location=device)
            _compare_loss(row, eager, scripted, trainable(scripted), shapes, device, eager_cpu)

        def torchscript_train(row, eager=eager, device=device):
            scripted = torch.jit.load(str(folder / TRAIN_PT), map_location=device)
            trainer = CTRNNTrainer(eager)
            for i, (t, b) in enumerate(shapes):
                g = torch.Generator().manual_seed(200 + i)
                lead = (b, t) if eager.model.batch_first else (t, b)
                x = torch.randn(*lead, eager.model.n_in, generator=g).to(device)
                target = torch.randn(*lead, eager.model.n_out, generator=g).to(device)
                ref, got = trainer(x, target), scripted(x, target)
                for a, r in zip(got, ref):
                    row.update(a, r)
                for a, r in zip(torch.autograd.grad(got[0], list(trainable(scripted).values())),
                                torch.autograd.grad(ref[0], list(trainable(trainer).values()))):
                    row.update(a, r)
            row.checked = f"{len(shapes)} shapes, forward(x, target) values + parameter gradients"

        def exported_program(row, eager=eager, device=device):
            program = torch.export.load(str(folder / LOSS_PT2))
            if device != "cpu":
                from torch.export.passes import move_to_device_pass
                program = move_to_device_pass(program, device)
            module = program.module()
            _compare_loss(row, eager, module, trainable(module), shapes, device, eager_cpu)

        _check(rows, Row(LOSS_PT, "torchscript", device, rtol=SAME_KERNELS), torchscript_loss)
        _check(rows, Row(TRAIN_PT, "torchscript", device, rtol=SAME_KERNELS), torchscript_train)
        _check(rows, Row(LOSS_PT2, "torch.export", device, rtol=SAME_KERNELS), exported_program)
        if device != "cpu":
            def cross_device(row, eager=eager, device=device):
                for i, (t, b) in enumerate(shapes):
                    inputs = _inputs(eager_cpu, t, b, seed=300 + i, device="cpu")
                    with torch.no_grad():
                        ref = eager_cpu(*inputs)
                        got = eager(*[x.to(device) for x in inputs])
                    for a, r in zip(got, ref):
                        row.update(a, r)
                row.checked = f"{len(shapes)} shapes, eager {device} vs eager cpu"
            _check(rows, Row("RNNLoss (eager)", "eager", f"{device} vs cpu", rtol=OTHER_REDUCTIONS), cross_device)
    for provider in onnx_providers(devices):
        def onnx_runtime(row, provider=provider):
            import onnxruntime as ort
            session = ort.InferenceSession(str(folder / LOSS_ONNX), providers=[provider])
            if provider not in session.get_providers():
                raise RuntimeError(f"{provider} did not load (session has {session.get_providers()})")
            for i, (t, b) in enumerate(shapes):
                inputs = _inputs(eager_cpu, t, b, seed=400 + i, device="cpu")
                with torch.no_grad():
                    ref = eager_cpu(*inputs)
                feeds = {name: x.numpy() for name, x in zip(INPUT_NAMES, inputs)}
                got = session.run(list(OUTPUT_NAMES), feeds)
                for a, r in zip(got, ref):
                    row.update(torch.from_numpy(a), r)
            row.checked = f"{len(shapes)} shapes (T,B) {shapes}, values"
        device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        _check(rows, Row(LOSS_ONNX, f"onnxruntime {provider.replace('ExecutionProvider', '')}", device,
                         rtol=OTHER_REDUCTIONS), onnx_runtime)
    return rows


def onnx_providers(devices: Sequence[str]) -> List[str]:
    """CPU always; CUDA where onnxruntime-gpu is installed (and a GPU is in use)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ["CPUExecutionProvider"]  # reported as a failed row: the ONNX artifact cannot be run
    available = ort.get_available_providers()
    out = ["CPUExecutionProvider"]
    if "cuda" in devices and "CUDAExecutionProvider" in available:
        out.append("CUDAExecutionProvider")
    return out


def _moved(loss, device):
    if device == "cpu":
        return loss
    import copy
    return copy.deepcopy(loss).to(device)


def format_table(rows: Sequence[Row]) -> str:
    header = ("artifact", "runtime", "device", "max abs err", "max rel err", "rtol", "result")
    body = [(r.artifact, r.runtime, r.device, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.rtol:g}",
             "pass" if r.passed else ("FAIL: " + r.error if r.error else "FAIL")) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    out = io.StringIO()
    for k, line in enumerate([header] + body):
        out.write("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
        if k == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    return out.getvalue().rstrip("\n")
