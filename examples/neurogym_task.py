#!/usr/bin/env python3
"""Train a CTRNN with RNNLoss on a neurogym task and save a figure of what it learned.

    make example                       # creates .venv-example (neurogym, tqdm) and runs this
    .venv-example/bin/python examples/neurogym_task.py --task PerceptualDecisionMaking-v0 --steps 600

neurogym yields inputs (T, B, N_obs) and integer targets (T, B) (0 = fixate, k = choice k); the
targets become one-hot vectors over the action space, so the readout regresses onto them with the
task MSE while the weight and firing-rate penalties shape the network. The figure shows the
named loss components over training, the distribution of mean firing rates across neurons, and
one sequence's output against its target.
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", module="gymnasium")  # deprecation chatter from neurogym's wrappers

try:
    import neurogym as ngym
    from tqdm import trange
except ImportError as e:  # pragma: no cover - the optional dependencies are missing
    sys.exit(f"{e}: this example needs neurogym and tqdm: `make example` installs them into .venv-example")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rnnloss import CTRNN, RNNLoss  # noqa: E402


def one_hot(target: np.ndarray, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(target, dtype=torch.long), n).float()


def train(task: str, steps: int, hidden: int, batch: int, seq_len: int, seed: int):
    torch.manual_seed(seed)
    # 20 ms steps; a 500 ms stimulus keeps a trial at ~35 steps, so every sequence holds decisions.
    env_kwargs = {"dt": 20, "timing": {"stimulus": 500}} if task == "PerceptualDecisionMaking-v0" else {"dt": 20}
    dataset = ngym.Dataset(task, env_kwargs=env_kwargs, batch_size=batch, seq_len=seq_len)
    dataset.seed(seed)
    n_obs = dataset.env.observation_space.shape[0]
    n_act = dataset.env.action_space.n
    model = CTRNN((n_obs, hidden, n_act), tau=100.0, dt=20.0, activation="relu", preact_noise=0.05)
    loss_fn = RNNLoss(model, lambda_mse=1.0, lambda_in=1e-4, lambda_hid=1e-4, lambda_out=1e-4,
                      lambda_fr=1e-3, lambda_fr_sd=1e-3, lambda_fr_cv=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    bar = trange(steps, desc=task, unit="step")
    for step in bar:
        inputs, target = dataset()
        x = torch.as_tensor(inputs, dtype=torch.float32)
        y = one_hot(target, n_act)
        output, states = model(x)
        total, components = loss_fn(output, y, states)
        opt.zero_grad()
        total.backward()
        opt.step()
        model.enforce_constraints()
        history.append(components.detach().numpy())
        if step % 20 == 0:
            bar.set_postfix(total=f"{total.item():.4f}", mse=f"{components[0].item():.4f}")
    model.eval()
    inputs, target = dataset()
    with torch.no_grad():
        output, states = model(torch.as_tensor(inputs, dtype=torch.float32))
    accuracy = decision_accuracy(output.numpy(), target)
    return model, loss_fn, np.array(history), inputs, target, output.numpy(), states.numpy(), accuracy


def decision_accuracy(output: np.ndarray, target: np.ndarray) -> float:
    """Fraction of decision steps (target != fixate) where the largest output is the target."""
    decide = target > 0
    return float((output.argmax(-1)[decide] == target[decide]).mean()) if decide.any() else float("nan")


def figure(path: Path, names, history, target, output, states, task: str, accuracy: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for k, name in enumerate(names):
        if np.any(history[:, k] > 0):
            ax.semilogy(history[:, k], label=name, lw=1)
    ax.set(title="loss components (λ applied)", xlabel="training step")
    ax.legend(fontsize=8, ncol=2)
    ax = axes[1]
    mean_rates = states.reshape(-1, states.shape[-1]).mean(0)
    ax.hist(mean_rates, bins=30, color="tab:gray")
    ax.set(title=f"mean firing rate per neuron (N={states.shape[-1]})", xlabel="mean rate", ylabel="neurons")
    ax = axes[2]
    n_act = output.shape[-1]
    t = np.arange(output.shape[0])
    for k in range(n_act):
        line, = ax.plot(t, output[:, 0, k], label=f"output {k}")
        ax.plot(t, (target[:, 0] == k).astype(float), "--", color=line.get_color(), lw=1)
    ax.set(title="one sequence (~4 trials): output (solid) vs target (dashed)", xlabel="time step")
    ax.legend(fontsize=8)
    fig.suptitle(f"CTRNN + RNNLoss on neurogym {task}: decision accuracy {accuracy:.0%} on a fresh batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="PerceptualDecisionMaking-v0")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/neurogym_task.png")
    args = parser.parse_args()
    model, loss_fn, history, inputs, target, output, states, accuracy = train(
        args.task, args.steps, args.hidden, args.batch, args.seq_len, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(out, loss_fn.component_names, history, target, output, states, args.task, accuracy)
    first, last = history[:20, 0].mean(), history[-20:, 0].mean()
    print(f"mse first 20 steps {first:.4f} -> last 20 steps {last:.4f}; decision accuracy {accuracy:.1%}; "
          f"figure {out}")


if __name__ == "__main__":
    main()
