r"""One read of the rates for both sums on a CUDA GPU: a Triton kernel for the eager forward.

The stock-operator path of :func:`rnnloss.ratesums.sums` reads the rates twice on a GPU (row norms, then
column sums) and launches several kernels; the loss is memory-bound, so its forward costs two reads or
more. :func:`fused_sums` reads every rate once: each program sums a strip of samples × up to ``BLOCK_N``
neurons in tiles of ``BLOCK_S`` samples — a tile's sums in the accumulation dtype (float32 for float16 /
bfloat16 / float32 rates, float64 for float64), the tiles added in float64 — and writes its float64
partial sums, which torch adds. Strips are 512 samples, shorter (down to one tile) where that leaves
fewer than 1024 programs to spread over the GPU. Deterministic: no atomics.

Only the eager forward on CUDA takes it (:class:`rnnloss.ratesums._RateSums`); its backward, TorchScript,
torch.compile, torch.export and every exported artifact keep stock operators, and machines without Triton
keep the stock path. On the CPU, Triton's interpreter (``TRITON_INTERPRET=1`` before this module is
imported) runs the same kernel; the tests check it there against float64 sums.
"""
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_S, MAX_STRIP, MIN_PROGRAMS = 32, 512, 1024


@triton.jit
def _strip_sums(x, sq_out, col_out, n_rows, n_cols, stride_s, stride_n,
                ACC: tl.constexpr, NEED_SQ: tl.constexpr, NEED_COL: tl.constexpr,
                STRIP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    strip = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    sq = tl.zeros([BLOCK_N], dtype=tl.float64)
    col = tl.zeros([BLOCK_N], dtype=tl.float64)
    for start in range(0, STRIP, BLOCK_S):
        rows = strip * STRIP + start + tl.arange(0, BLOCK_S)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        r = tl.load(x + rows[:, None] * stride_s + cols[None, :].to(tl.int64) * stride_n,
                    mask=ok, other=0.0).to(ACC)
        if NEED_SQ:
            sq += tl.sum(r * r, axis=0).to(tl.float64)
        if NEED_COL:
            col += tl.sum(r, axis=0).to(tl.float64)
    if NEED_SQ:
        tl.store(sq_out + strip * n_cols + cols, sq, mask=col_ok)
    if NEED_COL:
        tl.store(col_out + strip * n_cols + cols, col, mask=col_ok)


def fused_sums(rows: Tensor, need_sq: bool, need_col: bool, strip: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    r"""float64 :math:`\sum_{s,i} r_{s,i}^2` and :math:`\sum_s r_{s,i}` of (samples, N) ``rows`` (any strides),
    read once; the sum not asked for is a float64 zero. ``strip``: samples per program, a multiple of
    ``BLOCK_S`` up to ``MAX_STRIP`` (default: as the module docstring says).

    Shape: ``rows`` (S, N) with S, N ≥ 1; returns () and (N,) (or () when ``need_col`` is false).

    Accuracy: a tile's sum has at most ``BLOCK_S`` roundings of the accumulation dtype (u = 2^-24 for
    float32; Triton does not document its order), everything after is float64: within ``BLOCK_S``·u·Σ|r| per
    neuron and (``BLOCK_S`` + 1)·u·Σr² for Σr². A float32 tile of one neuron overflows when its Σr² exceeds
    the largest float32 (rates of about 3e18). Memory: the partial sums, at most S/``BLOCK_S``·N·16 bytes.
    """
    n_rows, n_cols = rows.shape
    block_n = min(128, triton.next_power_of_2(n_cols))
    col_blocks = triton.cdiv(n_cols, block_n)
    if strip is None:
        strip = MAX_STRIP
        while strip > BLOCK_S and triton.cdiv(n_rows, strip) * col_blocks < MIN_PROGRAMS:
            strip //= 2
    strips = triton.cdiv(n_rows, strip)
    sq = torch.empty((strips, n_cols) if need_sq else (1,), dtype=torch.float64, device=rows.device)
    col = torch.empty((strips, n_cols) if need_col else (1,), dtype=torch.float64, device=rows.device)
    acc = tl.float64 if rows.dtype == torch.float64 else tl.float32
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():  # CPU: the interpreter
        _strip_sums[(strips, col_blocks)](rows, sq, col, n_rows, n_cols, rows.stride(0), rows.stride(1), ACC=acc,
                                          NEED_SQ=need_sq, NEED_COL=need_col, STRIP=strip, BLOCK_S=BLOCK_S,
                                          BLOCK_N=block_n, enable_fp_fusion=True)
    zero = torch.zeros((), dtype=torch.float64, device=rows.device)
    return (sq.sum() if need_sq else zero), (col.sum(0) if need_col else zero)
