import sys, torch, resource
sys.path[:0] = ["/tmp/s", "/work/main/src", "/work/main/bench"]
mode = sys.argv[1]
import rnnloss.loss as L
if mode != "cur":
    import variant
    variant.install(int(mode))
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
r = interleaved(fns, 11, "cpu")
def faults(fn, k=5):
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(k): fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a) * 4096 / 2**20 / k
mib = {k: faults(f) for k, f in fns.items()}
print(mode, " ".join(f"{k} {v*1e3:6.2f}" for k,v in r.items()), f"ratio {r['naive']/r['scripted']:.2f}", "MiB faulted/call:", " ".join(f"{k} {v:.0f}" for k, v in mib.items()))
