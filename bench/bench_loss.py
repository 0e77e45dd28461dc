#!/usr/bin/env python3
"""Benchmark RNNLoss against the memory floor and a naive transcription, side by side.

Prints medians of interleaved runs (every variant once per round, rounds repeated) and the
ratios ours/floor and naive/ours, for eager, the scripted module and ONNX Runtime (forward),
and against the peer a user would pick: ``torch.compile`` of the naive transcription (and of
RNNLoss itself, fullgraph); the peak extra memory of one forward + backward; then a training step
(CTRNN forward + loss + backward), eager vs scripted vs C++. Also checks, at full size, that every
formulation agrees with float64. Usage:

    python bench/bench_loss.py [--device cpu|cuda] [--rounds N] [--sizes T,B,N ...] [--no-compile]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rnnloss import CTRNN, RNNLoss  # noqa: E402
from rnnloss import ratesums  # noqa: E402

ALL_ON = dict(lambda_mse=1.0, lambda_in=1e-3, lambda_hid=1e-3, lambda_out=1e-3,
              lambda_fr=1e-2, lambda_fr_sd=1e-2, lambda_fr_cv=1e-2)


def naive_loss(model, pred, label, states, lam):
    """The obvious transcription: every component on its own."""
    w_in = model.recurrent_layer.input_layer.weight
    w_hid = model.recurrent_layer.hidden_layer.weight
    w_out = model.readout_layer.weight
    n_hid = states.shape[-1]
    mse = (pred - label).square().mean()
    c_in = torch.norm(w_in) ** 2 / w_in.numel()
    c_hid = torch.norm(w_hid) ** 2 / w_hid.numel()
    c_out = torch.norm(w_out) ** 2 / w_out.numel()
    fr = states.square().mean()
    rbar = states.mean(dim=(0, 1))
    mu = states.mean()
    sd = torch.sqrt(((rbar - mu) ** 2).sum() / n_hid)
    cv = sd / mu
    comps = torch.stack([mse, c_in, c_hid, c_out, fr, sd, cv]) * lam
    return comps.sum(), comps


def floor(pred, label, states):
    """One read pass over the inputs: the least any loss over them can cost."""
    return pred.sum() + label.sum() + states.sum()


def ort_floor_session(ort, options, pred, states):
    """ONNX Runtime's own floor: one ReduceSum over each input (its reductions are slower than
    torch's, so ORT's ratio is also printed against this)."""
    from onnx import TensorProto, helper
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["time", "batch", t.shape[-1]])
              for name, t in (("pred", pred), ("label", pred), ("states", states))]
    nodes = [helper.make_node("ReduceSum", [name], [name + "_sum"], keepdims=0) for name in ("pred", "label", "states")]
    outputs = [helper.make_tensor_value_info(name + "_sum", TensorProto.FLOAT, []) for name in ("pred", "label", "states")]
    model = helper.make_model(helper.make_graph(nodes, "floor", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, rounds, device, inner=1):
    """Median seconds per call of each fn, measured in interleaved rounds (CUDA: event times)."""
    times = {k: [] for k in fns}
    # Warm-up: TorchScript's profiling executor records shapes on the first calls and optimises
    # the graph after them (the first ~4 calls of a scripted module are several times slower).
    for _ in range(5):
        for fn in fns.values():
            fn()
    sync(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds_per_call(fn, inner, device))
    return {k: statistics.median(v) for k, v in times.items()}


def seconds_per_call(fn, inner, device):
    """Wall time per call on the CPU; on CUDA, the time between two CUDA events recorded on the
    stream before and after the calls (what the GPU spent, launch gaps included)."""
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def consecutive(fns, rounds, device):
    """Median seconds per call with each fn run ``rounds`` times in a row (after its warm-up).

    Interleaving is fairer between variants, but a variant that frees large blocks slows the
    next one's memory traffic, so the forward ratios to the floor are printed both ways.
    """
    return {name: interleaved({name: fn}, rounds, device)[name] for name, fn in fns.items()}


def fmt(seconds):
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:9.1f} µs"


def peak_extra_memory(t, b, n, device, variant):
    """Peak memory of one forward + backward beyond the inputs and the gradients it must return.

    CUDA: the allocator's peak. CPU: the process's peak RSS (VmHWM) over the forward + backward,
    reset just before it through /proc/self/clear_refs, in a fresh interpreter (large blocks go
    back to the OS when freed, so every temporary shows up as new pages).
    """
    code = (f"import sys; sys.path[:0] = {[str(Path(__file__).resolve().parent)]!r}; "
            f"import bench_loss; bench_loss._memory_child({t}, {b}, {n}, {device!r}, {variant!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return f"not measured ({out.stderr.strip().splitlines()[-1][:120] if out.stderr.strip() else out.returncode})"
    extra = float(out.stdout.split()[-1])
    return f"{extra / 2**20:8.1f} MiB = {extra / (t * b * n * 4):4.2f}x states"


def _memory_child(t, b, n, device, variant):
    torch.manual_seed(0)
    model = CTRNN((3, n, 2)).to(device)
    loss = RNNLoss(model, **ALL_ON)
    fn = loss if variant == "ours eager" else (lambda p, l, s: naive_loss(model, p, l, s, loss.lambdas))
    pred = torch.randn(t, b, 2, device=device, requires_grad=True)
    label = torch.randn(t, b, 2, device=device)
    states = torch.rand(t, b, n, device=device, requires_grad=True)
    small = torch.rand(5, 3, n, device=device, requires_grad=True)  # warm-up: code paths, not sizes
    fn(pred[:5, :3].detach(), label[:5, :3], small)[0].backward()
    grads = (states.numel() + pred.numel()) * 4
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(pred, label, states)[0].backward()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - base - grads)
        return
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS")
    fn(pred, label, states)[0].backward()
    print(status("VmHWM") - base - grads)


def stock_ops(loss):
    """``loss`` with the eager CUDA forward's Triton kernel switched off (ratesums.FUSED_ON_CUDA) for the call."""
    def call(*args):
        before, ratesums.FUSED_ON_CUDA = ratesums.FUSED_ON_CUDA, False
        try:
            return loss(*args)
        finally:
            ratesums.FUSED_ON_CUDA = before
    return call


def bench_loss(t, b, n, device, rounds, compile_peers=True):
    torch.manual_seed(0)
    model = CTRNN((3, n, 2)).to(device)
    loss = RNNLoss(model, **ALL_ON).eval()
    scripted = torch.jit.script(loss)
    lam = loss.lambdas
    pred = torch.randn(t, b, 2, device=device)
    label = torch.randn(t, b, 2, device=device)
    states = torch.rand(t, b, n, device=device)
    states_g = states.clone().requires_grad_(True)
    pred_g = pred.clone().requires_grad_(True)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(pred, label, states)
        return run

    def fwd_bwd(fn):
        def run():
            total, _ = fn(pred_g, label, states_g)
            total.backward()
            states_g.grad = None
            pred_g.grad = None
            for p in model.parameters():
                p.grad = None
        return run

    naive = lambda p, l, s: naive_loss(model, p, l, s, lam)  # noqa: E731
    fns = {"floor": fwd(floor), "ours eager": fwd(loss), "ours scripted": fwd(scripted), "naive": fwd(naive)}
    kernel = ratesums._fused_kernel(states) is not None  # the eager CUDA forward's Triton kernel
    if kernel:  # side by side with the stock operators it replaces
        fns["ours eager, stock ops"] = fwd(stock_ops(loss))
    peers = {}
    compile_failures = []
    if compile_peers:
        # The peer a user would pick instead: torch.compile of the naive transcription; and
        # torch.compile of RNNLoss itself (fullgraph=True fails on any graph break).
        peers = {"naive torch.compile": torch.compile(naive),
                 "ours torch.compile(fullgraph)": torch.compile(loss, fullgraph=True)}
        for name, fn in list(peers.items()):
            try:  # compile both variants now: a compiler failure is reported, not a crash
                fwd(fn)()
                fwd_bwd(fn)()
            except Exception as e:  # noqa: BLE001 (Inductor raises many kinds)
                first = next((line for line in str(e).splitlines() if line.strip()), "")
                compile_failures.append(f"{name}: not measured, compiling failed: {type(e).__name__}: {first[:300]}")
                del peers[name]
        fns.update({k: fwd(v) for k, v in peers.items()})
    ort_note = ""
    if device == "cpu":
        try:
            import onnxruntime as ort
            from rnnloss.export.artifacts import REGISTRY, Build
            from rnnloss.export.config import validate
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "loss.onnx"
                config = validate({"model": {"dims": [3, n, 2]}})
                onnx_entry = next(a for a in REGISTRY if a.name == "rnn_loss.onnx")
                onnx_entry.write(Build(loss, config, (pred[:5, :3], label[:5, :3], states[:5, :3]), {}), path)
                options = ort.SessionOptions()
                # ORT's idle threads spin for a while after each run and would steal the 2 cores
                # from whatever the interleaved bench runs next (the floor read 23 ms instead of 1.5).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.add_session_config_entry("session.inter_op.allow_spinning", "0")
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feeds = {"pred": pred.numpy(), "label": label.numpy(), "states": states.numpy()}
            fns["ours onnxruntime"] = lambda: session.run(None, feeds)
            floor_session = ort_floor_session(ort, options, pred, states)
            fns["onnxruntime floor (ReduceSum)"] = lambda: floor_session.run(None, feeds)
        except ImportError as e:
            ort_note = f"(onnxruntime not run: {e})"
    fwd_times = interleaved(fns, rounds, device)
    alone = consecutive({k: fns[k] for k in ("floor", "ours eager", "ours scripted")}, rounds, device)
    bwd_fns = {"floor (read states, write grad)": lambda: torch.mul(states, 2.0),
               "ours eager": fwd_bwd(loss), "ours scripted": fwd_bwd(scripted), "naive": fwd_bwd(naive)}
    if kernel:
        bwd_fns["ours eager, stock ops"] = fwd_bwd(stock_ops(loss))
    bwd_fns.update({k: fwd_bwd(v) for k, v in peers.items()})
    bwd_times = interleaved(bwd_fns, rounds, device)
    print(f"\n(T, B, N) = ({t}, {b}, {n}), {t * b * n / 1e6:.1f} M rates, fp32, {device} {ort_note}")
    if device == "cuda":
        print("  eager forward's rate sums: " + ("the Triton kernel (rnnloss.triton_sums); 'stock ops' without it"
                                              if kernel else "stock operators (no Triton, or a GPU before sm_70)"))
    for line in compile_failures:
        print("  " + line)
    print("  forward:")
    for k, v in fwd_times.items():
        extra = "" if k in ("floor", "naive", "onnxruntime floor (ReduceSum)", "naive torch.compile") else \
            f"  ours/floor {v / fwd_times['floor']:5.2f}x  naive/ours {fwd_times['naive'] / v:5.2f}x"
        if "naive torch.compile" in peers and k.startswith("ours") and k != "ours onnxruntime":
            extra += f"  ours/compiled naive {v / fwd_times['naive torch.compile']:5.2f}x"
        if k == "ours onnxruntime":
            extra += f"  ours/ORT floor {v / fwd_times['onnxruntime floor (ReduceSum)']:5.2f}x"
        print(f"    {k:34s} {fmt(v)}{extra}")
    print("  forward, each variant run alone (no interleaving):")
    for k, v in alone.items():
        extra = "" if k == "floor" else f"  ours/floor {v / alone['floor']:5.2f}x"
        print(f"    {k:34s} {fmt(v)}{extra}")
    print("  forward + backward:")
    fl = bwd_times["floor (read states, write grad)"]
    for k, v in bwd_times.items():
        extra = "" if k.startswith("floor") or k in ("naive", "naive torch.compile") else \
            f"  ours/floor {v / fl:5.2f}x  naive/ours {bwd_times['naive'] / v:5.2f}x"
        if "naive torch.compile" in peers and k.startswith("ours"):
            extra += f"  ours/compiled naive {v / bwd_times['naive torch.compile']:5.2f}x"
        print(f"    {k:34s} {fmt(v)}{extra}")
    print("  peak extra memory of one forward + backward, beyond inputs and returned gradients:")
    for variant in ("ours eager", "naive"):
        print(f"    {variant:34s} {peak_extra_memory(t, b, n, device, variant)}")
    check_accuracy(loss, {"ours eager": loss, "ours scripted": scripted, "naive": naive, **peers}, pred, label, states)


def check_accuracy(loss, variants, pred, label, states):
    """Every formulation (name -> fn) against the float64 formulas at this size (relative error)."""
    r = states.double().reshape(-1, states.shape[-1])
    rbar, mu = r.mean(0), r.mean()
    sigma = ((rbar - mu) ** 2).mean().sqrt()
    ref = torch.stack([((pred.double() - label.double()) ** 2).mean(), (r ** 2).mean(), sigma, sigma / mu])
    lam = loss.lambdas.double()[[0, 4, 5, 6]]
    with torch.no_grad():
        for name, fn in variants.items():
            got = fn(pred, label, states)[1].double()[[0, 4, 5, 6]] / lam.to(pred.device)
            err = ((got - ref.to(got.device)).abs() / ref.abs().to(got.device)).max().item()
            print(f"    accuracy vs float64 ({name}): max rel err {err:.1e} over mse, fr, fr_sd, fr_cv")


def bench_training(t, b, n, device, rounds, cpp_program=None):
    """One optimisation step (forward, loss, backward, Adam, enforce_constraints), eager vs
    scripted in Python, and the C++ program train_ctrnn on the same model when it is built: its
    native engine (the C++ library, from rnnloss_native.pt) and its TorchScript engine."""
    from rnnloss.trainer import CTRNNTrainer
    torch.manual_seed(0)
    model = CTRNN((3, n, 2)).to(device)
    loss = RNNLoss(model, **ALL_ON)
    eager = CTRNNTrainer(loss)
    scripted = torch.jit.script(CTRNNTrainer(loss))
    x = torch.randn(t, b, 3, device=device)
    target = torch.randn(t, b, 2, device=device)

    def step(module):
        opt = torch.optim.Adam(module.parameters(), lr=1e-4)

        def run():
            total = module(x, target)[0]
            opt.zero_grad()
            total.backward()
            opt.step()
            module.enforce_constraints()
        return run

    times = interleaved({"eager": step(eager), "scripted": step(scripted)}, rounds, device)
    print(f"\ntraining step (forward + loss + backward + Adam + constraints), (T, B, N) = ({t}, {b}, {n}), {device}:")
    print(f"    Python eager     {fmt(times['eager'])}")
    print(f"    Python scripted  {fmt(times['scripted'])}  eager/scripted {times['eager'] / times['scripted']:5.2f}x")
    if cpp_program is not None:
        for engine in ("native", "torchscript"):
            ms = cpp_step_seconds(cpp_program, engine, loss, t, b, device, rounds)
            if isinstance(ms, str):
                print(f"    C++ {engine:<12} not measured: {ms}")
            else:
                print(f"    C++ {engine:<12} {fmt(ms)}  eager/C++ {times['eager'] / ms:5.2f}x  scripted/C++ "
                      f"{times['scripted'] / ms:5.2f}x  (same run; its own task data, median after 5 steps)")


def bench_executorch(t, b, n, rounds):
    """The model's forward in ExecuTorch (ctrnn.pte, portable kernels) against eager and TorchScript, and one
    SGD training step in ExecuTorch (ctrnn_train.pte with its training module) against eager: ratios, one run."""
    try:
        from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer
        from executorch.runtime import Runtime
    except ImportError as e:
        print(f"\n(ExecuTorch not measured: {e})")
        return
    from rnnloss.export.artifacts import REGISTRY, Build, build, describe, sample_inputs
    from rnnloss.export.config import validate
    config = validate({"model": {"dims": [3, n, 2]}, "example": {"time": t, "batch": b},
                       "executorch": {"time": t, "max_batch": max(b, 2)}})
    loss = build(config)
    entries = {a.name: a for a in REGISTRY}
    x = torch.randn(t, b, 3)
    target = torch.randn(t, b, 2)
    with tempfile.TemporaryDirectory() as d:
        build_ = Build(loss, config, sample_inputs(loss, t, b, 0), {**describe(config), "versions": {}, "created": ""})
        for name in ("ctrnn.pte", "ctrnn_train.pte"):
            entries[name].write(build_, Path(d) / name)
        forward = Runtime.get().load_program(str(Path(d) / "ctrnn.pte")).load_method("forward")
        trainer = _load_for_executorch_for_training(str(Path(d) / "ctrnn_train.pte"))
    trainer.forward_backward("forward", [x, target])
    sgd = get_sgd_optimizer(trainer.named_parameters(), 1e-4, 0, 0, 0, False)
    scripted = torch.jit.script(loss.model)
    eager_opt = torch.optim.SGD([p for p in loss.model.parameters() if p.requires_grad], lr=1e-4)

    def eager_step():
        eager_opt.zero_grad()
        output, states = loss.model(x)
        loss(output, target, states)[0].backward()
        eager_opt.step()

    def et_step():
        trainer.forward_backward("forward", [x, target])
        sgd.step(trainer.named_gradients())

    with torch.no_grad():
        fwd = interleaved({"eager": lambda: loss.model(x), "scripted": lambda: scripted(x),
                           "executorch": lambda: forward.execute([x])}, rounds, "cpu")
    steps = interleaved({"eager": eager_step, "executorch": et_step}, rounds, "cpu")
    print(f"\nExecuTorch (portable kernels), (T, B, N) = ({t}, {b}, {n}), cpu:")
    print(f"    model forward: eager {fmt(fwd['eager'])}, TorchScript {fmt(fwd['scripted'])}, ExecuTorch "
          f"{fmt(fwd['executorch'])}  executorch/eager {fwd['executorch'] / fwd['eager']:5.2f}x  "
          f"executorch/scripted {fwd['executorch'] / fwd['scripted']:5.2f}x")
    print(f"    SGD training step: eager {fmt(steps['eager'])}, ExecuTorch {fmt(steps['executorch'])}  "
          f"executorch/eager {steps['executorch'] / steps['eager']:5.2f}x")


def cpp_step_seconds(cpp_program, engine, loss, t, b, device, rounds):
    """Median training-step time of ``train_ctrnn --engine ENGINE`` on ``loss`` (or why it failed)."""
    import re
    import subprocess
    from rnnloss.export.native import NATIVE, save_native
    from rnnloss.trainer import CTRNNTrainer
    with tempfile.TemporaryDirectory() as d:
        if engine == "native":
            save_native(loss, Path(d) / NATIVE)
        else:
            torch.jit.save(torch.jit.script(CTRNNTrainer(loss).cpu()), str(Path(d) / "ctrnn_train.pt"))
        result = subprocess.run([str(cpp_program), d, "--engine", engine, "--steps", str(5 + 3 * rounds), "--time",
                                 str(t), "--batch", str(b), "--device", device, "--log-every", "100000", "--out",
                                 str(Path(d) / "trained.pt")], capture_output=True, text=True)
    found = re.search(r"ms_per_step=(\S+)", result.stdout)
    if found:
        return float(found.group(1)) / 1e3
    return f"{cpp_program} failed: {result.stderr.strip()[-200:]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", nargs="*", help="T,B,N triples (default depends on the device)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (compiling takes minutes)")
    parser.add_argument("--cpp", default=str(Path(__file__).resolve().parents[1] / "cpp" / "build" / "train_ctrnn"),
                        help="the built train_ctrnn program for the C++ training-step timing ('' to skip)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_loss: --device cuda: no CUDA GPU visible")
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else \
        ([(500, 64, 512), (500, 256, 1024)] if args.device == "cuda" else [(100, 16, 64), (500, 64, 512)])
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"rnnloss benchmark: torch {torch.__version__}, {name}, {time.strftime('%Y-%m-%d')}")
    for t, b, n in sizes:
        bench_loss(t, b, n, args.device, args.rounds, compile_peers=not args.no_compile)
    cpp = Path(args.cpp) if args.cpp else None
    if cpp is not None and not cpp.exists():
        print(f"\n(C++ training step not measured: {cpp} is not built; `make cpp` builds it)")
        cpp = None
    for t, b, n in [(100, 16, 64), (100, 64, 256)]:
        bench_training(t, b, n, args.device, max(3, args.rounds // 3), cpp)
    if args.device == "cpu":
        bench_executorch(50, 8, 64, max(3, args.rounds // 3))


if __name__ == "__main__":
    main()
