r"""The rate-sum engine: :math:`\sum_{s,i} r_{s,i}^2` and the per-neuron sums :math:`\sum_s r_{s,i}`.

``fr``, ``fr_sd`` and ``fr_cv`` need only these two sums of the rates r (every leading index a
sample s, the last axis the neuron i). The loss is memory-bound — its floor is one read of the
rates — so how the sums are taken decides its speed, and at 10^7 float32 rates it also decides
whether the contract's accuracy (1e-5 against float64) holds. :func:`rate_sums` is the one
dispatch point; every path returns float64 sums equal to float32 rounding:

============== ====================================================================================
eager          :class:`_RateSums`: values from :func:`sums` (below) — on a CUDA GPU with Triton from
               :mod:`rnnloss.triton_sums`, one read of the rates for both sums; the backward writes
               :math:`2 g_{sq} r + g_{col}` in one pass (``addcmul``) and is built of differentiable
               operations, so second-order gradients are exact. A naive formulation writes four
               full-size tensors in its backward; this one writes the gradient only. Inside
               ``torch.func`` transforms, plain operations (as under torch.compile): a custom
               Function's saved rates lose an outer transform's tangents, so ``jacfwd`` of
               ``jacfwd`` would see a zero second derivative.
TorchScript    (no autograd Function there) :func:`sums` of the detached rates for the values, plus
               :math:`q - \operatorname{detach}(q)` (exactly 0) for the same sums taken by stock
               operations whenever grad mode is on, so autograd and ``torch.func`` see every
               derivative of the formula; one full-size write more than eager.
torch.compile  plain operations, which Inductor fuses.
torch.export   (and so ONNX, ExecuTorch) the rates cast to float64 first: other runtimes (ONNX
               Runtime) add long reductions one element at a time, which in float32 misses the bound.
============== ====================================================================================

:func:`sums` reads the sample axes in memory order (a batch-first view needs no copy). On the CPU it takes
blocks of about 2^20 rates (4 MiB of float32), each read twice back to back — Σ r² as squared row
norms (no temporary; up to 1024 neurons, where torch's float32 row norm is still exact to 1e-7),
else Σ b·b in the block — and the column sums over groups of 1024 rows in the rates' dtype, so that
the second read comes from the cache; block results are added in float64. A single CPU block sums
its columns in float64 (equal neurons keep equal sums, so σ = 0 stays exactly 0). On a GPU a kernel
launch costs about as much as reading 2^24 rates: float32 rates of 16 neurons or more (float16 32) are
one block (row norms there are tree reductions, accurate at any width; the float64 norms then take at
most 1/8 of the rates' memory); other rates blocks of 2^24, which bounds every temporary. Rates that
must be copied (a neuron subset, a neuron-major buffer) are copied once, whole.
"""
import functools
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float16 / bfloat16 accumulate (and return) in float32; float32 / float64 keep theirs."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return torch.float32
    return t.dtype


def rows_of(states: Tensor) -> Tensor:
    """(samples, N_hid) rows of the rates, their sample axes permuted into memory order (largest stride
    first) so that transposed layouts are read as a view; sums over samples do not depend on the order."""
    order: List[int] = []
    strides = states.stride()
    for axis in range(states.dim() - 1):  # insertion sort by descending stride (TorchScript has no key=)
        at = len(order)
        while at > 0 and strides[order[at - 1]] < strides[axis]:
            at -= 1
        order.insert(at, axis)
    order.append(states.dim() - 1)
    return states.permute(order).reshape(-1, states.size(-1))


def neuron_sums(rows: Tensor) -> Tensor:
    """Per-neuron sums of (samples, N) rows in float64: groups of 1024 rows in the accumulation dtype
    (short sums, exact to ~1e-7), the group sums and the rest added in float64. Differentiable."""
    whole = rows.size(0) // 1024 * 1024
    total = rows.narrow(0, whole, rows.size(0) - whole).sum(0, dtype=torch.float64)
    if whole > 0:
        groups = rows.narrow(0, 0, whole).reshape(whole // 1024, 1024, rows.size(1))
        total = total + groups.sum(1, dtype=accumulation_dtype(rows)).sum(0, dtype=torch.float64)
    return total


def sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """The values of Σ r² and the per-neuron sums (float64), fast and accurate (module docstring).

    Only the sums asked for are taken; the other is a float64 zero."""
    rows = rows_of(states)
    n = rows.size(1)
    acc = accumulation_dtype(rows)
    cpu = rows.device.type == "cpu"
    norms = rows.dtype != torch.float64 and (n <= 1024 or not cpu)
    if cpu:
        step = max(1, 1048576 // n)
        step = step // 1024 * 1024 if step >= 2048 else step  # whole groups of neuron_sums
    else:  # one block where the float64 row norms (8 bytes a sample) stay within 1/8 of the rates
        whole = norms and n * rows.element_size() >= 64
        step = rows.size(0) if whole else max(1, 16777216 // n)
    sq = torch.zeros((), dtype=torch.float64, device=rows.device)
    col = sq
    blocks = rows.split(step)
    for k in range(len(blocks)):
        block = blocks[k]
        if need_sq:
            if norms:
                r = torch.linalg.vector_norm(block, dim=-1, dtype=acc).to(torch.float64)
                sq = sq + (r * r).sum()
            else:
                b = block.to(acc)
                sq = sq + (b * b).sum().to(torch.float64)
        if need_col:
            part = block.sum(0, dtype=torch.float64) if cpu and len(blocks) == 1 else neuron_sums(block)
            col = part if k == 0 else col + part
    return sq, col


def plain_sums(states: Tensor, need_sq: bool, need_col: bool, exporting: bool) -> Tuple[Tensor, Tensor]:
    """Σ r² and the per-neuron sums as plain differentiable operations: torch.compile fuses them; under
    torch.export the rates are cast to float64 first (``vector_norm``: ONNX ReduceL2, no r² temporary)."""
    zero = torch.zeros((), dtype=torch.float64, device=states.device)
    sq, col = zero, zero
    if exporting:
        r = states.to(torch.float64)
        if need_sq:
            norms = torch.linalg.vector_norm(r, dim=-1)
            sq = (norms * norms).sum()
        if need_col:  # a sum over the sample axes (no Reshape: onnx2torch has no allowzero=1 Reshape)
            col = r.sum(dim=list(range(r.dim() - 1))) if r.dim() > 1 else r
        return sq, col
    if need_sq:
        r = states.to(accumulation_dtype(states))
        sq = (r * r).sum(-1).to(torch.float64).sum()
    if need_col:
        col = neuron_sums(rows_of(states))
    return sq, col


def _scripted_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """TorchScript: the values of :func:`sums` and, in grad mode, :math:`q - \\operatorname{detach}(q)`
    for q taken by stock operations (the per-neuron sums first, so that autograd, which runs later
    operations first, adds their broadcast gradient into ``mse_loss``'s fresh gradient in place).

    Grad mode, not ``states.requires_grad``: inside ``torch.func`` transforms the rates do not report
    requiring grad, and values alone would make every second derivative 0."""
    sq, col = sums(states.detach(), need_sq, need_col)
    if not torch.is_grad_enabled():
        return sq, col
    rows = rows_of(states).to(accumulation_dtype(states))
    c, q = _surrogates(rows, need_sq, need_col)
    if rows.device.type == "cpu" and not bool(torch.isfinite(q) & torch.isfinite(c).all()):
        c, q = _surrogates(rows.to(torch.float64), need_sq, need_col)  # a float32 sum overflowed: q - q is NaN
    if need_col:                                                         # (free to ask on the CPU; a GPU gives NaN)
        col = col + (c - c.detach()).to(torch.float64)
    if need_sq:
        sq = sq + (q - q.detach()).to(torch.float64)
    return sq, col


def _surrogates(rows: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """The per-neuron sums (first, see above) and Σ r² of (samples, N) rows by stock operations; 0 if not wanted."""
    c = rows.sum(0) if need_col else rows.new_zeros(())
    q = F.mse_loss(rows, rows.new_zeros((1, 1)).expand(rows.shape), reduction="sum") if need_sq else rows.new_zeros(())
    return c, q


class _RateSums(torch.autograd.Function):
    r"""Eager: (Σr², per-neuron sums) with the one-pass backward :math:`2 g_{sq} r + g_{col}`."""

    generate_vmap_rule = True  # vmap over other inputs (pred, label) with the rates not batched reaches it

    @staticmethod
    def forward(states: Tensor, need_sq: bool, need_col: bool):  # type: ignore[override]
        fused = _fused_kernel(states)
        if fused is not None:
            try:
                return fused(rows_of(states), need_sq, need_col)
            except Exception as e:  # noqa: BLE001 - Triton's compiler and launcher raise many kinds
                _give_up_fused(e)
        return sums(states, need_sq, need_col)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.need = inputs[1:]

    @staticmethod
    def jvp(ctx, states_t: Tensor, _sq: None, _col: None):  # type: ignore[override]
        (states,) = ctx.saved_tensors
        need_sq, need_col = ctx.need
        zero = torch.zeros((), dtype=torch.float64, device=states.device)
        t_sq = 2.0 * (states.to(torch.float64) * states_t.to(torch.float64)).sum() if need_sq else zero
        return t_sq, (neuron_sums(rows_of(states_t)) if need_col else zero)

    @staticmethod
    def backward(ctx, g_sq: Tensor, g_col: Tensor):  # type: ignore[override]
        (states,) = ctx.saved_tensors
        need_sq, need_col = ctx.need
        acc = accumulation_dtype(states)
        if need_sq and need_col:
            grad = torch.addcmul(g_col.to(acc), states, (2.0 * g_sq).to(acc))
        elif need_sq:
            grad = states * (2.0 * g_sq).to(acc)
        else:
            grad = g_col.to(acc).expand(states.shape)
        return grad.to(states.dtype), None, None


FUSED_ON_CUDA = True
"""Whether the eager forward on a CUDA GPU reads the rates once with :mod:`rnnloss.triton_sums` (where Triton
imports and the GPU is an NVIDIA sm_70 or newer, as Triton requires); ``False`` takes the stock operators of
:func:`sums`. The first kernel that fails (no C compiler for Triton's launcher, an unwritable cache, a driver
too old for its ptxas) sets it to ``False`` with a warning that names the error."""


def _fused_kernel(states: Tensor):
    """:func:`rnnloss.triton_sums.fused_sums` where it applies (see :data:`FUSED_ON_CUDA`), else ``None``.
    Plain tensors only: a tensor subclass (a fake tensor, a distributed one) takes the stock operators."""
    if not (FUSED_ON_CUDA and states.is_cuda and type(states) is torch.Tensor and states.numel() > 0):
        return None
    return _fused_on(states.device)


@functools.lru_cache(maxsize=None)
def _fused_on(device: torch.device):
    """The kernel if Triton imports and ``device`` is an NVIDIA GPU of sm_70 or newer, else ``None`` (once a device)."""
    if torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 7:
        return None
    try:
        from .triton_sums import fused_sums
    except ImportError:  # no Triton (CPU builds of torch, some platforms): the stock operators
        return None
    return fused_sums


def _give_up_fused(error: Exception) -> None:
    global FUSED_ON_CUDA
    FUSED_ON_CUDA = False
    warnings.warn(f"rnnloss: the Triton kernel of the rate sums failed ({type(error).__name__}: "
                  f"{str(error).strip()[:300]}); the eager CUDA forward uses stock operators from now on",
                  RuntimeWarning, stacklevel=3)


def rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    r"""float64 :math:`\sum_{s,i} r_{s,i}^2` and :math:`\sum_s r_{s,i}` of ``states`` (…, N_hid): the
    dispatch point of the module docstring's table. Only the sums asked for are taken (the other is 0)."""
    if torch.jit.is_scripting():
        return _scripted_sums(states, need_sq, need_col)
    return _traced_or_eager(states, need_sq, need_col)


@torch.jit.unused
def _traced_or_eager(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():
        return plain_sums(states, need_sq, need_col, torch.compiler.is_exporting())
    if torch._C._functorch.is_functorch_wrapped_tensor(states):
        return plain_sums(states, need_sq, need_col, False)  # torch.func: nested transforms see stock operations
    return _RateSums.apply(states, need_sq, need_col)
