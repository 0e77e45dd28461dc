import sys, torch, statistics, time
step = sys.argv[1]
if step != "cur":
    import re
    p = "/tmp/s/src/rnnloss/loss.py"
    s = open(sys.argv[2] if len(sys.argv) > 2 else "/work/main/src/rnnloss/loss.py").read().replace("(16777216 if gpu else 1048576)", f"(16777216 if gpu else {step})")
    open(p, "w").write(s)
    sys.path.insert(0, "/tmp/s/src")
else:
    sys.path.insert(0, "/work/main/src")
sys.path.insert(1, "/work/main/bench")
import rnnloss
from bench_loss import ALL_ON, interleaved, consecutive, floor
from rnnloss import CTRNN, RNNLoss
t,b,n = 500,64,512
torch.manual_seed(0)
model = CTRNN((3,n,2)); loss = RNNLoss(model, **ALL_ON).eval(); sc = torch.jit.script(loss)
pred = torch.randn(t,b,2); label = torch.randn(t,b,2); states = torch.rand(t,b,n)
def fwd(fn):
    def run():
        with torch.no_grad(): return fn(pred,label,states)
    return run
fns = {"floor": fwd(floor), "eager": fwd(loss), "scripted": fwd(sc)}
r = interleaved(fns, 21, "cpu"); a = consecutive(fns, 21, "cpu")
print(step, rnnloss.__file__[:12], " ".join(f"{k} {v*1e3:.3f}ms({v/r['floor']:.2f}x)" for k,v in r.items()), "| alone", " ".join(f"{k} {v/a['floor']:.2f}x" for k,v in a.items()))
