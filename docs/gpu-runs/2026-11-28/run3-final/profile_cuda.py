import sys, torch
sys.path.insert(0, "bench")
import bench_loss as b
from rnnloss import CTRNN, RNNLoss
torch.manual_seed(0)
for (T, B, N) in [(500, 256, 1024)]:
    m = CTRNN((3, N, 2)).cuda(); loss = RNNLoss(m, **b.ALL_ON).eval()
    p = torch.randn(T, B, 2, device="cuda"); l = torch.randn_like(p); s = torch.rand(T, B, N, device="cuda")
    sg = s.clone().requires_grad_(True)
    for _ in range(5):
        with torch.no_grad(): loss(p, l, s)
        loss(p, l, sg)[0].backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.no_grad(): loss(p, l, s)
        torch.cuda.synchronize()
        loss(p, l, sg)[0].backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
