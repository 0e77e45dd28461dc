import sys, torch
sys.path[:0] = ["/work/main/src", "/work/main/bench"]
import rnnloss.loss as L
from typing import Tuple
from torch import Tensor
mode = sys.argv[1]
if mode == "blocked":
    def _scripted_rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
        if not (torch.is_grad_enabled() and states.requires_grad):
            return L._rate_sum_values(states, need_sq, need_col)
        return L._blocked_rate_sums(states, need_sq, need_col, False)
    L._scripted_rate_sums = _scripted_rate_sums
from bench_loss import naive_loss, ALL_ON, interleaved
from rnnloss import CTRNN, RNNLoss
t,b,n = 500,64,512
torch.manual_seed(0)
model = CTRNN((3,n,2)); loss = RNNLoss(model, **ALL_ON).eval(); sc = torch.jit.script(loss); lam = loss.lambdas
pred = torch.randn(t,b,2); label = torch.randn(t,b,2); states = torch.rand(t,b,n)
sg = states.clone().requires_grad_(True); pg = pred.clone().requires_grad_(True)
def fb(fn):
    def run():
        tot,_ = fn(pg,label,sg); tot.backward(); sg.grad=None; pg.grad=None
        for p in model.parameters(): p.grad=None
    return run
naive = lambda p,l,s: naive_loss(model,p,l,s,lam)
fns = {"eager": fb(loss), "scripted": fb(sc), "naive": fb(naive), "floor": lambda: torch.mul(states,2.0)}
r = interleaved(fns, 9, "cpu")
for k,v in r.items(): print(f"{mode} {k:10s} {v*1e3:8.2f} ms  naive/x {r['naive']/v:5.2f}")
if len(sys.argv) > 2:
    import time
    for name in ("scripted",):
        ts=[]
        for _ in range(20):
            t0=time.perf_counter(); fns[name](); ts.append(time.perf_counter()-t0)
        ts.sort(); print(mode, name, "consecutive median", ts[10]*1e3)
    from torch.profiler import profile
    with profile() as p:
        for _ in range(3): fns["scripted"]()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
