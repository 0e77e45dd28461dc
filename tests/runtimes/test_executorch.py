"""The ExecuTorch programs (ctrnn.pte, rnn_loss.pte, ctrnn_train.pte) from an outside program's view: a
script that imports only torch and executorch loads each one and gets eager's values, trains 100 steps and
lowers the loss as eager does; bad inputs end in an error, never a number.

Tolerances: the programs run ExecuTorch's portable kernels, other summation orders than eager in float32:
the parity module's float32 allowances (rtol about 1e-4 at these sizes; rnnloss.export.parity derives them);
the training trajectory allows that per step times the number of steps.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch

from rnnloss.export.artifacts import sample_inputs
from runtime_exports import export_to

pytest.importorskip("executorch", reason="executorch is not installed (requirements/executorch.txt)")
# One worker for the whole module: its programs are exported once (about 15 s), not once per worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("executorch")]
CONFIG = {"model": {"dims": [3, 16, 2]}, "example": {"time": 6, "batch": 3},
          "executorch": {"time": 6, "max_batch": 8}, "mask": True}
OUTSIDE = r"""
import json, sys, torch
from executorch.runtime import Runtime
from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer
folder, inputs = sys.argv[1], torch.load(sys.argv[2])
runtime = Runtime.get()
model = runtime.load_program(folder + "/ctrnn.pte").load_method("forward")
loss = runtime.load_program(folder + "/rnn_loss.pte").load_method("forward")
output, states = model.execute([inputs["x"]])
total, components = loss.execute([output, inputs["target"], states, inputs["mask"]])
train = _load_for_executorch_for_training(folder + "/ctrnn_train.pte")
train.forward_backward("forward", [inputs["x"], inputs["target"], inputs["mask"]])
sgd = get_sgd_optimizer(train.named_parameters(), 0.05, 0, 0, 0, False)
losses = []
for _ in range(100):
    step_total, _ = train.forward_backward("forward", [inputs["x"], inputs["target"], inputs["mask"]])
    sgd.step(train.named_gradients())
    losses.append(float(step_total))
assert "rnnloss" not in sys.modules
torch.save({"output": output, "states": states, "total": total, "components": components, "losses": losses},
           sys.argv[3])
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pte")
    loss, config = export_to(folder, CONFIG, {"ctrnn.pte", "rnn_loss.pte", "ctrnn_train.pte"})
    return loss, config, folder


def test_an_outside_program_gets_eagers_values_and_trains_as_eager_does(programs, tmp_path):
    loss, config, folder = programs
    g = torch.Generator().manual_seed(5)
    x, target, mask = torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 2, generator=g), torch.rand(6, 4, 2,
                                                                                                      generator=g)
    torch.save({"x": x, "target": target, "mask": mask}, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", OUTSIDE, str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, text=True, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        output, states = loss.model(x)
        total, components = loss(output, target, states, mask)
    for name, ref in (("output", output), ("states", states), ("components", components)):
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    loss = copy.deepcopy(loss)  # the module's loss stays as exported
    model = loss.model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        output, states = model(x)
        step_total = loss(output, target, states, mask)[0]
        step_total.backward()
        opt.step()
        losses.append(step_total.item())
    assert losses[-1] < losses[0]  # it learns ...
    for ours, theirs in zip(got["losses"], losses):  # ... as eager does: 1e-4 a step, 100 steps
        assert abs(ours - theirs) <= 100 * 1e-4 * abs(theirs)


def test_every_program_answers_its_description_and_shape_contract(programs):
    from executorch.runtime import Runtime
    _, config, folder = programs
    for name in ("ctrnn.pte", "rnn_loss.pte", "ctrnn_train.pte"):
        program = Runtime.get().load_program(str(folder / name))
        assert json.loads(program.load_method("rnnloss_json").execute([])[0])["config"] == config
        assert program.load_method("time_steps").execute([])[0] == 6
        assert program.load_method("max_batch").execute([])[0] == 8


def _refused(method, inputs):
    with pytest.raises(RuntimeError, match="failed with error"):
        method.execute(inputs)


# x of another time or width with as many elements as a valid one: ExecuTorch takes any shape that fits an
# input's memory, so only the program's own nodes can refuse these (time 6, N_in 3, batch 4).
SAME_SIZE_X = [(3, 4, 6), (2, 4, 9), (9, 4, 2), (18, 4, 1), (12, 2, 3), (6, 2, 6)]


def test_the_model_program_refuses_another_length_width_dtype_rank_or_a_batch_beyond_its_bound(programs):
    from executorch.runtime import Runtime
    _, _, folder = programs
    method = Runtime.get().load_program(str(folder / "ctrnn.pte")).load_method("forward")
    assert method.execute([torch.randn(6, 8, 3)])[0].shape == (6, 8, 2)  # the bound itself runs
    for bad in (torch.randn(5, 4, 3), torch.randn(7, 4, 3), torch.randn(6, 4, 2), torch.randn(6, 9, 3),
                torch.randn(6, 4, 3).double(), torch.randn(6, 3), torch.randn(6, 0, 3),
                *[torch.randn(s) for s in SAME_SIZE_X]):
        _refused(method, [bad])


def test_the_loss_program_refuses_what_the_graphs_refuse(programs):
    from executorch.runtime import Runtime
    loss, _, folder = programs
    method = Runtime.get().load_program(str(folder / "rnn_loss.pte")).load_method("forward")
    pred, label, states, mask = sample_inputs(loss, 4, 3, seed=1, mask=True)
    with torch.no_grad():
        torch.testing.assert_close(method.execute([pred, label, states, mask])[1], loss(pred, label, states, mask)[1],
                                   rtol=1e-4, atol=1e-7)
    negative = mask.clone()
    negative[0, 0, 0] = -1.0
    nan = mask.clone()
    nan[1, 1, 1] = float("nan")
    for bad in ([pred, label[:, :1], states, mask], [pred, label[:, :, :1], states, mask],
                [pred, label, states[..., :15], mask], [pred, label, states, mask[:, :2]],
                [pred, label, states, negative], [pred, label, states, nan],
                [pred[:0], label[:0], states, mask[:0]]):
        _refused(method, [t.contiguous() for t in bad])  # (ExecuTorch refuses other layouts itself)


def test_the_training_program_refuses_inputs_of_another_size_or_a_bad_mask(programs):
    from executorch.extension.training import _load_for_executorch_for_training
    _, _, folder = programs
    train = _load_for_executorch_for_training(str(folder / "ctrnn_train.pte"))
    g = torch.Generator().manual_seed(2)
    x, target, mask = torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 2, generator=g), torch.rand(6, 4, 2,
                                                                                                      generator=g)
    assert torch.isfinite(train.forward_backward("forward", [x, target, mask])[0])
    negative = mask.clone()
    negative[0, 0, 0] = -1.0
    for bad in ([torch.randn(7, 4, 3), target, mask], [torch.randn(6, 4, 4), target, mask],
                [x, torch.randn(6, 4, 3), mask], [x, torch.randn(6, 4, 1), mask], [x, torch.randn(7, 4, 2), mask],
                [x, torch.randn(5, 4, 2), mask], [x, torch.randn(6, 5, 2), mask], [x, target, torch.rand(6, 4, 3)],
                [x, target, torch.rand(6, 3, 2)], [x, target, negative], [x, target, mask * float("nan")],
                *[[torch.randn(s), target, mask] for s in SAME_SIZE_X]):
        with pytest.raises(RuntimeError, match="Failed to execute"):
            train.forward_backward("forward", bad)


def test_with_one_output_the_programs_refuse_a_wider_pred_target_or_mask(tmp_path):
    """An example axis of size 1 would be fixed by torch.export, and the runtime does not check fixed axes."""
    from executorch.extension.training import _load_for_executorch_for_training
    from executorch.runtime import Runtime
    loss, _ = export_to(tmp_path, {**CONFIG, "model": {"dims": [3, 16, 1]}}, {"rnn_loss.pte", "ctrnn_train.pte"})
    method = Runtime.get().load_program(str(tmp_path / "rnn_loss.pte")).load_method("forward")
    train = _load_for_executorch_for_training(str(tmp_path / "ctrnn_train.pte"))
    pred, label, states, mask = sample_inputs(loss, 6, 4, seed=3, mask=True)
    with torch.no_grad():
        torch.testing.assert_close(method.execute([pred, label, states, mask])[1], loss(pred, label, states, mask)[1],
                                   rtol=1e-4, atol=1e-7)
    wide = [t.expand(6, 4, 2).contiguous() for t in (pred, label, mask)]
    for bad in ([wide[0], wide[1], states, wide[2]], [pred, wide[1], states, mask], [pred, label, states, wide[2]]):
        _refused(method, bad)
    x = torch.randn(6, 4, 3)
    assert torch.isfinite(train.forward_backward("forward", [x, label, mask])[0])
    for bad in ([x, wide[1], mask], [x, label, wide[2]]):
        with pytest.raises(RuntimeError, match="Failed to execute"):
            train.forward_backward("forward", bad)
