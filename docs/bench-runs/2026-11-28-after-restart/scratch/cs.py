import torch, time
torch.manual_seed(0)
rows = torch.rand(32000, 512)
h = rows[:31744]
def tm(f, k=41):
    for _ in range(3): f()
    ts=[]
    for _ in range(k):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[k//2]*1e3
print("plain sum", tm(lambda: rows.sum()))
print("a grouped sum(1)", tm(lambda: h.reshape(31,1024,512).sum(1)))
print("a2 grouped sum(1) f64 out", tm(lambda: h.reshape(31,1024,512).sum(1, dtype=torch.float64)))
print("d sum(0) f64", tm(lambda: rows.sum(0, dtype=torch.float64)))
print("e sum(0) f32", tm(lambda: rows.sum(0)))
print("norms", tm(lambda: torch.linalg.vector_norm(rows, dim=-1)))
print("gemv", tm(lambda: rows.t() @ torch.ones(32000)))
print("b loop", tm(lambda: [rows[k*1024:(k+1)*1024].sum(0) for k in range(31)]))
x64 = rows.double()
ref = x64.sum(0)
for name, v in [("a", h.reshape(31,1024,512).sum(1).double().sum(0) + rows[31744:].double().sum(0)), ("d", rows.sum(0, dtype=torch.float64)), ("e", rows.sum(0).double()), ("gemv", (rows.t() @ torch.ones(32000)).double())]:
    print(name, ((v - ref).abs() / ref.abs()).max().item())
