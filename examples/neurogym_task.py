#!/usr/bin/env python3
"""Train a CTRNN with RNNLoss on a neurogym task, the decision period weighted, and plot what it learned.

    make example          # creates .venv-example (neurogym, tqdm) and writes examples/out/neurogym_task.png
    .venv-example/bin/python examples/neurogym_task.py --decision-weight 1   # the same run, unweighted

Each batch row is a stream of back-to-back trials from its own copy of the task (fixation,
stimulus, delay, decision periods). neurogym's integer targets (0 = fixate, k = choice k) become
one-hot vectors, so the readout regresses onto them with the task MSE while the weight and
firing-rate penalties shape the network.

The task error is weighted per time step through RNNLoss's ``mask``: 1 outside the decision period,
``--decision-weight`` (default 5) inside it, the way cognitive-task papers weight the response (the
decision is a few steps of a long trial, so an unweighted mean mostly rewards fixating). A weight
of 1 trains without a mask.

Deterministic: trials come from per-row ``RandomState``s seeded from ``--seed``, the network's
initial weights and noise from ``torch.manual_seed``, and torch runs on one thread, so a run
repeats exactly with the same torch build on the same kind of CPU.

Prints the task MSE over training, then, on a fresh evaluation set: the unweighted MSE, the MSE on
decision steps, and the accuracy (largest output = target) on decision and on fixation steps.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# gymnasium's registry complains that neurogym's task metadata lacks `render_modes`: not ours to fix.
warnings.filterwarnings("ignore", message=".*render_modes", category=UserWarning)

try:
    import neurogym as ngym
    from tqdm import trange
except ImportError as e:  # pragma: no cover - the optional dependencies are missing
    sys.exit(f"{e}: this example needs neurogym and tqdm: `make example` installs them into .venv-example")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rnnloss import CTRNN, RNNLoss  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "neurogym_task.png"


class TrialStream:
    """Sequences of ``seq_len`` steps cut from back-to-back trials, one task copy per batch row.

    ``next()`` returns inputs (T, B, N_obs) float32, targets (T, B) int and ``decision`` (T, B) bool,
    True on the steps of each trial's decision period (from the task's own period boundaries).
    """

    def __init__(self, task: str, env_kwargs: dict, batch: int, seq_len: int, seed: int) -> None:
        self.envs = [ngym.make(task, **env_kwargs).unwrapped for _ in range(batch)]
        for i, env in enumerate(self.envs):
            env.seed(seed + i)
        self.seq_len = seq_len
        self.pending = [[np.zeros((0, *self.envs[0].observation_space.shape), np.float32),
                         np.zeros(0, np.int64), np.zeros(0, bool)] for _ in self.envs]

    def next(self):
        rows = []
        for env, buf in zip(self.envs, self.pending):
            while len(buf[1]) < self.seq_len:
                env.new_trial()
                decision = np.zeros(len(env.gt), bool)
                decision[env.start_ind["decision"]:env.end_ind["decision"]] = True
                buf[0] = np.concatenate([buf[0], env.ob.astype(np.float32)])
                buf[1] = np.concatenate([buf[1], env.gt.astype(np.int64)])
                buf[2] = np.concatenate([buf[2], decision])
            rows.append([b[:self.seq_len] for b in buf])
            buf[:] = [b[self.seq_len:] for b in buf]
        inputs, target, decision = (np.stack([r[k] for r in rows], axis=1) for k in range(3))
        return torch.from_numpy(inputs), torch.from_numpy(target), torch.from_numpy(decision)


def one_hot(target: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, n).float()


def task_mask(decision: torch.Tensor, decision_weight: float):
    """Per-sample weights (T, B): 1 outside the decision period, ``decision_weight`` inside; None for 1."""
    if decision_weight == 1.0:
        return None
    return torch.where(decision, decision_weight, 1.0)


def train(args):
    # One thread: a 64-neuron network gains nothing from more, a busy machine loses much (spinning
    # threads), and the sums then do not depend on how many cores the machine has.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    # 20 ms steps; a 500 ms stimulus keeps a trial at 35 steps (the decision: the last 5), so each
    # 140-step sequence holds four trials.
    env_kwargs = {"dt": 20, "timing": {"stimulus": 500}} if args.task == "PerceptualDecisionMaking-v0" else {"dt": 20}
    stream = TrialStream(args.task, env_kwargs, args.batch, args.seq_len, args.seed)
    n_obs = stream.envs[0].observation_space.shape[0]
    n_act = stream.envs[0].action_space.n
    model = CTRNN((n_obs, args.hidden, n_act), tau=100.0, dt=20.0, activation="relu", preact_noise=0.05)
    loss_fn = RNNLoss(model, lambda_mse=1.0, lambda_in=1e-4, lambda_hid=1e-4, lambda_out=1e-4,
                      lambda_fr=1e-3, lambda_fr_sd=1e-3, lambda_fr_cv=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    bar = trange(args.steps, desc=args.task, unit="step")
    for step in bar:
        x, target, decision = stream.next()
        output, states = model(x)
        total, components = loss_fn(output, one_hot(target, n_act), states,
                                    mask=task_mask(decision, args.decision_weight))
        opt.zero_grad()
        total.backward()
        opt.step()
        model.enforce_constraints()
        history.append(components.detach().numpy())
        if step % 20 == 0:
            bar.set_postfix(total=f"{total.item():.4f}", mse=f"{components[0].item():.4f}")
    return model, loss_fn, np.array(history), n_act, env_kwargs


def evaluate(model, task: str, env_kwargs: dict, n_act: int, seq_len: int, seed: int, batch: int = 64):
    """Unweighted MSE, decision-step MSE and accuracies on fresh trials (another seed), eval mode."""
    x, target, decision = TrialStream(task, env_kwargs, batch, seq_len, seed).next()
    model.eval()
    with torch.no_grad():
        output, states = model(x)
    err = (output - one_hot(target, n_act)).square().mean(-1)
    hit = output.argmax(-1) == target
    return {
        "mse": err.mean().item(),
        "mse_decision": err[decision].mean().item(),
        "acc_decision": hit[decision].float().mean().item(),
        "acc_fixation": hit[~decision].float().mean().item(),
        "target": target.numpy(), "decision": decision.numpy(), "output": output.numpy(), "states": states.numpy(),
    }


def figure(path: Path, names, history, ev, task: str, decision_weight: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.1, 0.8, 1.4]})
    ax = axes[0]
    for k, name in enumerate(names):
        if np.any(history[:, k] > 0):
            ax.semilogy(history[:, k], label=name, lw=1)
    ax.set(title="loss components (λ applied)", xlabel="training step", ylabel="value")
    # Below the axes: every curve stays visible, the MSE's tail included.
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)

    ax = axes[1]
    states = ev["states"]
    ax.hist(states.reshape(-1, states.shape[-1]).mean(0), bins=30, color="tab:gray")
    ax.set(title=f"mean rate per neuron (N={states.shape[-1]})", xlabel="mean rate", ylabel="neurons")

    ax = axes[2]
    output, target, decision = ev["output"][:, 0], ev["target"][:, 0], ev["decision"][:, 0]
    t = np.arange(len(target))
    for start in np.flatnonzero(np.diff(np.concatenate([[0], decision.astype(int)])) == 1):
        end = start + np.argmin(np.append(decision[start:], False))
        ax.axvspan(start - 0.5, end - 0.5, color="gold", alpha=0.3, lw=0)
    for k in range(output.shape[-1]):
        line, = ax.plot(t, output[:, k], lw=1.3, label=f"output {k}")
        ax.plot(t, (target == k).astype(float), color=line.get_color(), lw=3, alpha=0.35)
    ax.set(title="4 trials: output (thin) vs target (thick); decision shaded", xlabel="time step (20 ms)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)

    weighting = "unweighted" if decision_weight == 1.0 else f"decision period weighted ×{decision_weight:g}"
    fig.suptitle(f"CTRNN + RNNLoss on neurogym {task}, {weighting}: on fresh trials, decision accuracy "
                 f"{ev['acc_decision']:.1%}, fixation accuracy {ev['acc_fixation']:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="PerceptualDecisionMaking-v0")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decision-weight", type=float, default=5.0,
                        help="task-error weight of decision-period steps (others: 1); 1 trains without a mask")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="figure path (default: examples/out/neurogym_task.png, which git ignores)")
    args = parser.parse_args()
    if not (args.decision_weight > 0 and np.isfinite(args.decision_weight)):
        parser.error(f"--decision-weight must be finite and > 0, got {args.decision_weight}")
    start = time.perf_counter()
    model, loss_fn, history, n_act, env_kwargs = train(args)
    seconds = time.perf_counter() - start
    ev = evaluate(model, args.task, env_kwargs, n_act, args.seq_len, seed=args.seed + 10_000)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(args.out, loss_fn.component_names, history, ev, args.task, args.decision_weight)
    first, last = history[:20, 0].mean(), history[-20:, 0].mean()
    print(f"decision weight {args.decision_weight:g}: training mse (weighted) first 20 steps {first:.4f} -> "
          f"last 20 steps {last:.4f}; {args.steps} steps in {seconds:.0f} s")
    print(f"fresh trials: mse {ev['mse']:.4f}, mse on decision steps {ev['mse_decision']:.4f}, "
          f"decision accuracy {ev['acc_decision']:.1%}, fixation accuracy {ev['acc_fixation']:.1%}; figure {args.out}")


if __name__ == "__main__":
    main()
