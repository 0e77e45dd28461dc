#!/usr/bin/env python3
"""Train a CTRNN with DistributedDataParallel and global-batch firing-rate statistics.

    torchrun --nproc_per_node=2 examples/ddp_train.py                 # CPU processes, gloo
    torchrun --nproc_per_node=4 examples/ddp_train.py --backend nccl  # one GPU per process

Every rank draws its share of each global batch (a delayed-response task), and
``RNNLoss(..., sync_stats=True)`` all-reduces the sums behind mse, fr, fr_sd and fr_cv, so every
rank optimises the loss of the whole batch; DDP averages the gradients. Rank 0 logs and saves.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rnnloss import CTRNN, RNNLoss  # noqa: E402


def batch(step: int, size: int, time: int, seed: int):
    """The global batch of ``step`` (identical on every rank): hold a cue's sign, report it late."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    sign = torch.randint(0, 2, (size,), generator=g).float() * 2 - 1
    x = 0.1 * torch.randn(time, size, 2, generator=g)
    x[: time // 5, :, 0] += sign
    x[:, :, 1] = 1.0  # a constant context channel
    y = torch.zeros(time, size, 1)
    y[time * 3 // 5:, :, 0] = sign
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ddp_ctrnn.pt")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun, e.g. `torchrun --nproc_per_node=2 examples/ddp_train.py`")

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Uneven shares are fine: the statistics are sums over the global batch.
    shares = [args.global_batch // world + (1 if r < args.global_batch % world else 0) for r in range(world)]
    start = sum(shares[:rank])

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = CTRNN((2, 64, 1), activation="relu").to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = RNNLoss(model, lambda_mse=1.0, lambda_hid=1e-3, lambda_fr=1e-3, lambda_fr_sd=1e-3,
                      lambda_fr_cv=1e-3, sync_stats=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        x, y = batch(step, args.global_batch, args.time, args.seed)
        x, y = x[:, start:start + shares[rank]].to(device), y[:, start:start + shares[rank]].to(device)
        output, states = ddp(x)
        total, components = loss_fn(output, y, states)  # identical on every rank
        opt.zero_grad()
        total.backward()
        opt.step()
        model.enforce_constraints()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            named = " ".join(f"{n}={v:.4g}" for n, v in zip(loss_fn.component_names, components.tolist()) if v)
            print(f"step {step:4d} total={total.item():.5f} {named}", flush=True)
    final_mse = components[0].item()
    if rank == 0:
        torch.save(model.state_dict(), args.out)
        print(f"world_size={world} shares={shares} final_mse={final_mse:.5f} saved {args.out}")
    # Drop the last autograd graph (it holds collective work objects) and let every rank arrive
    # before the process group goes away.
    del total, components, output, states
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
