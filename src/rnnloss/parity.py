"""Parity of the exported artifacts with eager mode.

Every check runs eager mode and one runtime on the same fresh inputs — shapes that differ from
the export example, batch 1 and time 1 included, which is what proves the dynamic axes — and
compares every output (and gradient) with a tolerance derived from what is compared.

Tolerances (float32). Eager and a runtime compute the same formulas on the same float32 inputs
with other reduction orders (ONNX Runtime, another device), other fusion (TorchScript) or float64
sums (the exported graphs); what they may differ by is the float32 rounding of those sums, scaled
by the conditioning of each quantity:

- :func:`sum_rtol` ``(n) = MARGIN · u · max(√n, 16)``, u = 2^-24: the relative error of a float32
  sum of n same-signed terms is ~√n·u for the usual rounding (the worst case, n·u, assumes every
  rounding goes one way); 16 covers the short chains of a few roundings (products, divisions, the
  λ multiply) on small inputs, ``MARGIN = 10`` the tail of the distribution. n is the largest
  reduction of the check (the element count of pred or states). For the default config's largest
  parity input (64·57·13 ≈ 4.7·10^4 rates) it is 1.3e-4.
- :func:`component_tolerances`, per component, absolute: mse, in, hid, out and fr are sums of
  non-negative terms (condition number 1): ``sum_rtol · |value|``. fr_sd is σ of the per-neuron
  means r̄_i; each r̄_i may be off by ``sum_rtol · m_i`` (m_i = neuron i's mean |r|), and
  |δσ| ≤ max_i |δr̄_i| (Cauchy–Schwarz on δσ = Σ_i (r̄_i − μ) δr̄_i / (N σ)), so
  ``sum_rtol · λ · max_i m_i`` — relative to σ that is the condition number max_i m_i / σ
  (≥ μ/σ: a small spread under a large mean is ill-conditioned in float32). fr_cv = σ/μ adds μ's
  relative error ``sum_rtol · mean|r| / |μ|``. total: the sum of the components' allowances.
- :func:`gradient_rtol`, normwise (``max|Δg| ≤ rtol · max|g|`` per gradient tensor):
  ``sum_rtol · κ``, κ the largest condition number above among the active components (the
  gradients of fr_sd and fr_cv are built from r̄_i − μ and σ, with the same errors); a σ that is
  exactly 0 contributes nothing (the loss defines that gradient as 0).

Overflow (any λ up to float32's largest value is accepted, so a component or gradient may leave
float32's range): NaN must sit at the same entries in both (NaN against a number is a
disagreement); ±inf counts as the nearest value that rounds to it, ±(the dtype's overflow
threshold) (:func:`overflow_bound`), so two equal infinities agree, +inf against −inf or against
a finite value far from the threshold disagrees, and a finite value within its allowance of the
threshold agrees with an infinity (the two runtimes' sums rounded to either side of it). An
allowance is never derived from an infinity or a NaN: component allowances use the threshold, a
gradient's norm its finite entries. Gradients are those of ``(total + Σ components) / 2``, which
reaches every component through both outputs with weight 1, as ``total`` alone does in training
(doubling it would overflow float32 for λ above half its range where training does not).

A formula or axis mistake (sample SD instead of population SD, means over the wrong axis, a wrong
count) changes a component by 1e-2 or more, far above ``sum_rtol · κ`` unless κ is huge, and
tests/test_parity.py checks that such mistakes fail.
"""
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .artifacts import LOSS_ONNX, LOSS_PT, LOSS_PT2, OUTPUT_NAMES, TRAIN_PT, input_names, sample_inputs
from .native import NATIVE, load_native
from .trainer import CTRNNTrainer

UNIT_ROUNDOFF = 2.0 ** -24
MARGIN = 10.0


def sum_rtol(n: int) -> float:
    """Relative error allowed for a float32 quantity whose largest sum has ``n`` terms."""
    return MARGIN * UNIT_ROUNDOFF * max(math.sqrt(n), 16.0)


def overflow_bound(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 on the CPU with ±inf replaced by ±(the smallest magnitude that rounds to inf
    in ``t``'s dtype): for float32 2^128 − 2^103, halfway between its largest value and 2^128
    (float64's own largest value for float64, whose threshold is not a float64). NaN stays NaN."""
    x = t.detach().double().cpu()
    info = torch.finfo(t.dtype)
    bound = info.max + info.max / (2.0 - info.eps) * info.eps / 2.0  # + half the spacing at the top
    bound = bound if math.isfinite(bound) else info.max
    return torch.where(torch.isinf(x), torch.copysign(torch.full_like(x, bound), x), x)


def _rate_scales(states: torch.Tensor) -> Tuple[float, float, float, float]:
    """max_i m_i, mean |r|, σ and μ of ``states`` (…, N_hid), in float64."""
    r = states.detach().double().cpu().reshape(-1, states.size(-1))
    means = r.mean(0)
    mu = means.mean()
    sigma = ((means - mu) ** 2).mean().sqrt()
    return r.abs().mean(0).max().item(), r.abs().mean().item(), sigma.item(), mu.item()


def component_tolerances(components: torch.Tensor, lambdas: torch.Tensor, states: Optional[torch.Tensor],
                         n: int) -> torch.Tensor:
    """Absolute allowed error of each of the 7 components (see the module docstring)."""
    base = sum_rtol(n)
    c = overflow_bound(components).abs()
    allowed = base * c
    if states is not None:
        lam = lambdas.detach().double().cpu()
        m_max, m_all, sigma, mu = _rate_scales(states)
        d_sigma = base * m_max
        allowed[5] = lam[5] * d_sigma
        if mu != 0:
            allowed[6] = lam[6] * (d_sigma + sigma * base * m_all / abs(mu)) / abs(mu)
    return allowed


def gradient_rtol(active: Sequence[str], states: Optional[torch.Tensor], n: int) -> float:
    """Normwise relative error allowed for a gradient (see the module docstring)."""
    kappa = 1.0
    if states is not None and ("fr_sd" in active or "fr_cv" in active):
        m_max, m_all, sigma, mu = _rate_scales(states)
        if sigma > 0:
            kappa = max(kappa, m_max / sigma)
            if "fr_cv" in active:
                kappa = max(kappa, m_max / sigma + (m_all / abs(mu) if mu != 0 else math.inf))
    return sum_rtol(n) * kappa


@dataclasses.dataclass
class Row:
    """One artifact × runtime × device check: its largest errors and whether each was allowed.

    ``max_rel`` is normwise (max |runtime − eager| / max |eager| over one tensor), for the table;
    ``worst`` is the largest error / allowance over every compared entry (pass: ≤ 1), ``rtol`` the
    relative allowance of the entry that set ``worst``.
    """
    artifact: str
    runtime: str
    device: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: float = 0.0
    rtol: float = 0.0
    exceeded: bool = False
    checked: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and not self.exceeded

    def update(self, got: torch.Tensor, ref: torch.Tensor, allowed) -> None:
        """Compare ``got`` with ``ref`` entry by entry; ``allowed`` is the absolute allowance
        (a tensor like ``ref`` or a number). NaN must be at the same entries in both; an infinity
        is compared as its dtype's overflow threshold (:func:`overflow_bound`)."""
        if got.shape != ref.shape:
            raise AssertionError(f"shape {list(got.shape)} != eager {list(ref.shape)}")
        got, ref = overflow_bound(got), overflow_bound(ref)
        compared = ~torch.isnan(ref)
        if not torch.equal(~torch.isnan(got), compared):
            raise AssertionError("NaN entries differ from eager")
        allowed = torch.as_tensor(allowed, dtype=torch.float64).expand_as(ref)[compared]
        diff = (got[compared] - ref[compared]).abs()
        if diff.numel() == 0:
            return
        scale = ref[compared].abs().max().item()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.max_rel = max(self.max_rel, diff.max().item() / scale if scale > 0 else
                           (0.0 if diff.max().item() == 0 else math.inf))
        self.exceeded = self.exceeded or bool((diff > allowed).any())
        ratio = torch.where(allowed > 0, diff / allowed, torch.where(diff > 0, math.inf, 0.0))
        k = int(ratio.argmax())
        if ratio[k].item() >= self.worst:
            self.worst = ratio[k].item()
            value = ref[compared][k].abs().item()
            self.rtol = allowed[k].item() / value if value > 0 else allowed[k].item()

    def compare_loss(self, got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], lambdas, states, n) -> None:
        """(total, components) of a runtime against eager's, with the per-component allowances."""
        allowed = component_tolerances(ref[1], lambdas, states, n)
        self.update(got[1], ref[1], allowed)
        self.update(got[0], ref[0], allowed.sum() + sum_rtol(n) * overflow_bound(ref[0]).abs())

    def compare_gradient(self, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
        """Normwise: every entry within ``rtol`` · the largest finite |entry| of ``ref``."""
        finite = ref.detach().double()
        finite = finite[torch.isfinite(finite)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        self.update(got, ref, rtol * scale)

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


def _inputs(loss, time, batch, seed, device, mask):
    return [t.to(device) for t in sample_inputs(loss, time, batch, seed, mask=mask)]


def _loss_outputs_and_grads(fn: Callable, loss_params: Dict[str, torch.Tensor], inputs):
    """(total, components) and the gradients of (total + Σ components) / 2 w.r.t. pred, states, params
    (the halves: see the module docstring).

    ``inputs`` are (pred, label, states[, mask]); the mask, like the label, is a constant.
    """
    pred = inputs[0].detach().clone().requires_grad_(True)
    states = inputs[2].detach().clone().requires_grad_(True)
    total, comps = fn(pred, inputs[1], states, *inputs[3:])
    wanted = [pred, states] + list(loss_params.values())
    grads = torch.autograd.grad(0.5 * total + 0.5 * comps.sum(), wanted, allow_unused=True)
    named = dict(zip(["d_pred", "d_states"] + [f"d_{k}" for k in loss_params], grads))
    return [total, comps], named


def _compare_gradients(row: Row, got: Dict[str, Optional[torch.Tensor]], ref: Dict[str, Optional[torch.Tensor]],
                       rtol: float) -> None:
    for key, g in ref.items():
        if g is None or got.get(key) is None:
            if (g is None) != (got.get(key) is None):
                raise AssertionError(f"gradient {key} present in only one of eager and runtime")
            continue
        row.compare_gradient(got[key], g, rtol)


def _compare_loss(row: Row, eager, runtime, runtime_params, shapes, device, eager_cpu, mask):
    """Values and gradients (pred, states, trainable parameters) of ``runtime`` vs ``eager``.

    Inputs are sampled with the CPU model (its generator is a CPU one) and moved to ``device``.
    """
    eager_params = trainable(eager)
    for i, (t, b) in enumerate(shapes):
        inputs = _inputs(eager_cpu, t, b, seed=100 + i, device=device, mask=mask)
        n = max(inputs[0].numel(), inputs[2].numel())
        ref, ref_g = _loss_outputs_and_grads(eager, eager_params, inputs)
        got, got_g = _loss_outputs_and_grads(runtime, runtime_params, inputs)
        _compare_gradients(row, got_g, ref_g, gradient_rtol(eager.active, inputs[2], n))
        row.compare_loss(got, ref, eager.lambdas, inputs[2], n)
    row.checked = f"{len(shapes)} shapes (T,B) {shapes}{', with mask' if mask else ''}, values + gradients"


def _compare_values(row: Row, eager_cpu, run: Callable, shapes, seed: int, mask: bool) -> None:
    """Values only: ``run(inputs)`` against eager on the CPU, on CPU inputs sampled for each shape
    (seeds ``seed``, ``seed + 1``, …)."""
    for i, (t, b) in enumerate(shapes):
        inputs = _inputs(eager_cpu, t, b, seed=seed + i, device="cpu", mask=mask)
        with torch.no_grad():
            ref = eager_cpu(*inputs)
            got = run(inputs)
        row.compare_loss(got, ref, eager_cpu.lambdas, inputs[2], max(inputs[0].numel(), inputs[2].numel()))


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
    mask = bool(config.get("mask", False))
    shapes = fresh_shapes(ex["time"], ex["batch"])
    rows: List[Row] = []
    for device in devices:
        eager = _moved(eager_cpu, device)

        def torchscript_loss(row, eager=eager, device=device):
            scripted = torch.jit.load(str(folder / LOSS_PT), map_location=device)
            _compare_loss(row, eager, scripted, trainable(scripted), shapes, device, eager_cpu, mask)

        def torchscript_train(row, eager=eager, device=device):
            scripted = torch.jit.load(str(folder / TRAIN_PT), map_location=device)
            trainer = CTRNNTrainer(eager)
            for i, (t, b) in enumerate(shapes):
                g = torch.Generator().manual_seed(200 + i)
                lead = (b, t) if eager.model.batch_first else (t, b)
                x = torch.randn(*lead, eager.model.n_in, generator=g).to(device)
                target = torch.randn(*lead, eager.model.n_out, generator=g).to(device)
                extra = [torch.rand(*lead, eager.model.n_out, generator=g).to(device)] if mask else []
                ref, got = trainer(x, target, *extra), scripted(x, target, *extra)
                n = max(ref[2].numel(), ref[3].numel())
                row.compare_loss(got[:2], ref[:2], eager.lambdas, ref[3], n)
                # output and states: the CTRNN's forward, sums of N_in + N_hid terms per step
                for a, r in zip(got[2:], ref[2:]):
                    row.compare_gradient(a, r, sum_rtol(n))
                rtol = gradient_rtol(eager.active, ref[3], n)
                for a, r in zip(torch.autograd.grad(got[0], list(trainable(scripted).values())),
                                torch.autograd.grad(ref[0], list(trainable(trainer).values()))):
                    row.compare_gradient(a, r, rtol)
            row.checked = (f"{len(shapes)} shapes, forward(x, target{', mask' if mask else ''}) values + "
                           "parameter gradients")

        def exported_program(row, eager=eager, device=device):
            program = torch.export.load(str(folder / LOSS_PT2))
            if device != "cpu":
                from torch.export.passes import move_to_device_pass
                program = move_to_device_pass(program, device)
            module = program.module()
            _compare_loss(row, eager, module, trainable(module), shapes, device, eager_cpu, mask)

        def native_file(row, eager=eager, device=device):
            # The native C++ library's file, read back by Python (the C++ side is tests/test_cpp.py).
            native = _moved(load_native(folder / NATIVE), device)
            _compare_loss(row, eager, native, trainable(native), shapes, device, eager_cpu, mask)

        _check(rows, Row(LOSS_PT, "torchscript", device), torchscript_loss)
        _check(rows, Row(TRAIN_PT, "torchscript", device), torchscript_train)
        _check(rows, Row(LOSS_PT2, "torch.export", device), exported_program)
        _check(rows, Row(NATIVE, "eager from the file", device), native_file)
        if device != "cpu":
            def cross_device(row, eager=eager, device=device):
                _compare_values(row, eager_cpu, lambda inputs: eager(*[x.to(device) for x in inputs]),
                                shapes, 300, mask)
                row.checked = f"{len(shapes)} shapes, eager {device} vs eager cpu"
            _check(rows, Row("RNNLoss (eager)", "eager", f"{device} vs cpu"), cross_device)
    for provider in onnx_providers(devices):
        def onnx_runtime(row, provider=provider):
            import onnxruntime as ort
            session = ort.InferenceSession(str(folder / LOSS_ONNX), providers=[provider])
            if provider not in session.get_providers():
                raise RuntimeError(f"{provider} did not load (session has {session.get_providers()})")

            def run(inputs):
                feeds = {name: x.numpy() for name, x in zip(input_names(inputs), inputs)}
                return [torch.from_numpy(a) for a in session.run(list(OUTPUT_NAMES), feeds)]
            _compare_values(row, eager_cpu, run, shapes, 400, mask)
            row.checked = f"{len(shapes)} shapes (T,B) {shapes}{', with mask' if mask else ''}, values"
        device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        _check(rows, Row(LOSS_ONNX, f"onnxruntime {provider.replace('ExecutionProvider', '')}", device), onnx_runtime)
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
    header = ("artifact", "runtime", "device", "max abs err", "max rel err", "err/allowed", "its rtol", "result")
    body = [(r.artifact, r.runtime, r.device, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.worst:.3f}", f"{r.rtol:.1e}",
             "pass" if r.passed else ("FAIL: " + r.error if r.error else "FAIL")) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    out = io.StringIO()
    for k, line in enumerate([header] + body):
        out.write("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
        if k == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    return out.getvalue().rstrip("\n")
