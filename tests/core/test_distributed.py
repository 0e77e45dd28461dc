"""sync_stats=True: two gloo processes give the single-process loss and, after DDP's averaging,
the single-process gradients on the concatenated batch; sync_stats=False stays per rank. On CUDA the same
check runs over nccl."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cases import ALL_ON, CUDA, ROOT
from rnnloss import CTRNN, RNNLoss
T, BATCH, DIMS = 6, 8, (3, 10, 2)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def global_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(T, BATCH, DIMS[0], generator=g), torch.randn(T, BATCH, DIMS[2], generator=g)


def global_mask():
    """Per-sample weights (T, B): graded, with the first two steps of every trial not counted."""
    w = torch.rand(T, BATCH, generator=torch.Generator().manual_seed(8)) * 3
    w[:2] = 0.0
    return w


def fresh_model():
    torch.manual_seed(0)
    return CTRNN(DIMS, activation="softplus")


def _worker(rank, world, init_file, split, sync, out_dir, masked=False, backend="gloo"):
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = fresh_model().to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        loss = RNNLoss(model, sync_stats=sync, **ALL_ON)
        x, y = global_batch()
        start = sum(split[:rank])
        xs, ys = x[:, start:start + split[rank]].to(device), y[:, start:start + split[rank]].to(device)
        mask = global_mask()[:, start:start + split[rank]].to(device) if masked else None
        output, states = ddp(xs)
        total, comps = loss(output, ys, states, mask)
        total.backward()  # DDP averages the parameter gradients over the ranks
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"total": total.detach().cpu(), "comps": comps.detach().cpu(), "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del total, comps, output, states  # the graph holds collective work objects
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, split, sync, masked=False, backend="gloo"):
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(len(split), str(init_file), split, sync, str(tmp_path), masked, backend),
             nprocs=len(split), join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(len(split))]


def single_process(x=None, y=None, mask=None, device="cpu"):
    model = fresh_model().to(device)
    loss = RNNLoss(model, **ALL_ON)
    gx, gy = global_batch()
    x = (gx if x is None else x).to(device)
    y = (gy if y is None else y).to(device)
    output, states = model(x)
    total, comps = loss(output, y, states, None if mask is None else mask.to(device))
    total.backward()
    return (total.detach().cpu(), comps.detach().cpu(),
            {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})


# nccl: one rank per visible GPU, two at most, compared with one process on the first GPU. One GPU is world
# size 1: it runs the collective and its backward on the device, but only two ranks check what they sum.
NCCL = pytest.param(None, True, "nccl", marks=[
    pytest.mark.cuda, CUDA, pytest.mark.skipif(not dist.is_nccl_available(), reason="this torch has no nccl backend")])


@pytest.mark.slow
@pytest.mark.parametrize("split, masked, backend", [((4, 4), False, "gloo"), ((3, 5), False, "gloo"),
                                                    ((3, 5), True, "gloo"), NCCL],
                         ids=["even", "uneven_3+5", "uneven_3+5_masked", "nccl_masked"])
def test_synced_loss_and_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path, split, masked, backend):
    # With a mask, Σ w·e² and Σ w are all-reduced: the weighted mean over the global batch.
    if split is None:
        split = (3, 5) if torch.cuda.device_count() > 1 else (8,)
    ranks = run_ranks(tmp_path, split, sync=True, masked=masked, backend=backend)
    total, comps, grads = single_process(mask=global_mask() if masked else None,
                                         device="cuda:0" if backend == "nccl" else "cpu")
    for r in ranks:
        torch.testing.assert_close(r["total"], total, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["comps"], comps, rtol=1e-5, atol=0)
        for name, g in grads.items():
            # other reduction order (two partial sums + an all-reduce): rtol 1e-4
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_default_is_per_rank_statistics(tmp_path):
    ranks = run_ranks(tmp_path, (3, 5), sync=False)
    x, y = global_batch()
    _, whole, _ = single_process()
    for rank, (start, size) in enumerate(((0, 3), (3, 5))):
        _, local, _ = single_process(x[:, start:start + size], y[:, start:start + size])
        torch.testing.assert_close(ranks[rank]["comps"], local, rtol=1e-5, atol=0)
        assert not torch.allclose(ranks[rank]["comps"][5], whole[5], rtol=1e-3)  # fr_sd is per rank


def test_sync_stats_refuses_scripting_and_export_with_a_clear_message():
    loss = RNNLoss(fresh_model(), lambda_fr_sd=0.1, sync_stats=True)
    with pytest.raises(ValueError, match="runs eagerly only"):
        torch.jit.script(loss)
    x, y = global_batch()
    output, states = loss.model(x)
    with pytest.raises(Exception, match="runs eagerly only"):
        torch.export.export(loss, (output.detach(), y, states.detach()))
    with pytest.raises(ValueError, match="process_group is only used with sync_stats=True"):
        RNNLoss(fresh_model(), process_group=object())


def test_sync_stats_false_scripts_and_exports_as_before(tmp_path):
    loss = RNNLoss(fresh_model(), lambda_fr_sd=0.1, sync_stats=False)
    torch.jit.save(torch.jit.script(loss), str(tmp_path / "l.pt"))
    x, y = global_batch()
    output, states = loss.model(x)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "l.pt"))(output, y, states)[1], loss(output, y, states)[1])


@pytest.mark.slow
def test_ddp_example_runs_with_torchrun(tmp_path):
    import socket
    import subprocess
    with socket.socket() as s:  # a free port on the loopback for torchrun's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = ROOT / "examples" / "ddp_train.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(example), "--steps", "40", "--global-batch", "9",
                             "--out", str(tmp_path / "ddp.pt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "world_size=2 shares=[5, 4]" in result.stdout
    state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert "recurrent_layer.hidden_layer.weight" in state
