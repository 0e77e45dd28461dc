import torch, torch.nn.functional as F, linecache, textwrap
import rnnloss.loss as L
SRC = '''
import torch
import torch.nn.functional as F
from typing import Tuple, List
from torch import Tensor
def _sums_for_autograd(rows: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    cols: List[Tensor] = []
    sqs: List[Tensor] = []
    for b in rows.split(BLOCK):
        if need_col:
            cols.append(b.sum(0))
        if need_sq:
            sqs.append(F.mse_loss(b, b.new_zeros((1, 1)).expand(b.shape), reduction="sum"))
    col = torch.stack(cols).sum(0) if need_col else rows.new_zeros(())
    sq = torch.stack(sqs).sum() if need_sq else rows.new_zeros(())
    return col, sq
'''
def install(block):
    src = SRC.replace("BLOCK", str(block))
    fn = f"/tmp/s/gen_{block}.py"
    open(fn, "w").write(src)
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"gen_{block}", fn)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    L._sums_for_autograd = m._sums_for_autograd
