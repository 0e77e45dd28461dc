import torch, time
torch.manual_seed(0)
rows = torch.rand(32000, 512)
def tm(f, k=31):
    for _ in range(3): f()
    ts=[]
    for _ in range(k):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[k//2]*1e3
def blocked(step, sq, col):
    def run():
        for b in rows.split(step):
            sq(b); col(b)
    return run
norm = lambda b: torch.linalg.vector_norm(b, dim=-1)
mulsum = lambda b: (b*b).sum()
dot = lambda b: torch.dot(b.reshape(-1), b.reshape(-1))
def grp(b):
    m = b.size(0) // 1024
    return b[:m*1024].reshape(m, 1024, b.size(1)).sum(1)
s0 = lambda b: b.sum(0)
none = lambda b: None
for step in (1024, 2048, 4096):
    for sqn, sq in (("norm", norm), ("mulsum", mulsum), ("dot", dot), ("none", none)):
        for cn, c in (("grp", grp), ("sum0", s0), ("none", none)):
            print(step, sqn, cn, f"{tm(blocked(step, sq, c)):.3f}")
print("plain sum", tm(lambda: rows.sum()))
