import sys, torch, time
sys.path[:0] = ["/work/main/src"]
import rnnloss.loss as L
states = torch.rand(500,64,512)
def tm(f, k=41):
    for _ in range(5): f()
    ts=[]
    for _ in range(k):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[k//2]*1e3
S = torch.jit.script(L._blocked_rate_sums)
with torch.no_grad():
  for i in range(2):
    print("py", tm(lambda: L._blocked_rate_sums(states, True, True, True)))
    print("script", tm(lambda: S(states, True, True, True)))
    print("sum", tm(lambda: states.sum()))
    a = L._blocked_rate_sums(states, True, True, True); b = S(states, True, True, True)
    print(torch.equal(a[0], b[0]), torch.equal(a[1], b[1]))
