"""The README's Python example runs as written and does what it says."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_training_example_runs_and_lowers_the_loss(capsys):
    code = next(b for b in python_blocks() if "opt.step()" in b)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("'mse'", "'fr_sd'", "'fr_cv'"))
    loss_fn, model, x, target = (namespace[k] for k in ("loss_fn", "model", "x", "target"))
    output, states = model(x)
    final = loss_fn(output, target, states)[1][0].item()
    import torch
    torch.manual_seed(0)  # the example's seed: the same initial weights, untrained
    untrained = type(model)((3, 64, 2))
    assert final < loss_fn.lambdas[0].item() * ((untrained(x)[0] - target) ** 2).mean().item()
