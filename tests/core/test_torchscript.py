"""Scripted == eager after a torch.jit save/load round trip, for the loss, the model and a user's pipeline holding
both: one mixin (:class:`ScriptedMatchesEager`), run on the CPU and, marked ``cuda``, on a GPU.

Tolerance: float32, one device, the same kernels: rtol 1e-5 (fusion and summation order only), atol 1e-7 for
entries near 0 (gradients of components that are sums of many products).
"""
import pytest
import torch

from cases import ALL_ON, COVERING, CUDA, MISTAKES, NAMES, introduce, lambdas_for, make_inputs, make_model, \
    script_roundtrip, subset_id
from rnnloss import CTRNN, RNNLoss

RTOL, ATOL = 1e-5, 1e-7


def grads_of(module, outputs, inputs):
    """Gradients of total + Σ components w.r.t. ``inputs`` and every trainable parameter of ``module``."""
    total, comps = outputs
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(total + comps.sum(), list(inputs) + list(params.values()), allow_unused=True)
    return list(grads[: len(inputs)]), dict(zip(params, grads[len(inputs):]))


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def assert_same(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def check_loss(eager, scripted, time, batch, device, seed=0):
    """Values and the gradients w.r.t. pred, states and every parameter, scripted against eager."""
    pred, label, states = make_inputs(eager.model, time, batch, seed=seed, device=device)
    pred.requires_grad_(True)
    states.requires_grad_(True)
    out_e, out_s = eager(pred, label, states), scripted(pred, label, states)
    for a, b in zip(out_e, out_s):
        assert_same(a, b)
    (gp_e, gs_e), params_e = grads_of(eager, out_e, (pred, states))
    (gp_s, gs_s), params_s = grads_of(scripted, out_s, (pred, states))
    assert_same(gp_e, gp_s)
    assert_same(gs_e, gs_s)
    assert params_e.keys() == params_s.keys()
    for name in params_e:
        assert_same(params_e[name], params_s[name])


class ScriptedMatchesEager:
    device = "cpu"

    def loss_pair(self, active, dims=(3, 8, 2)):
        eager = RNNLoss(make_model(dims).to(self.device), **lambdas_for(active))
        return eager, script_roundtrip(eager)

    @pytest.mark.parametrize("active", COVERING, ids=subset_id)
    def test_every_covering_set_of_active_components(self, active):
        eager, scripted = self.loss_pair(active)
        for call in range(3):  # the profiling executor's first calls and its specialised graph
            check_loss(eager, scripted, 6, 3, self.device, seed=call)

    @pytest.mark.parametrize("time, batch", [(1, 1), (1, 5), (9, 1), (17, 4)])
    def test_all_components_across_shapes(self, time, batch):
        eager, scripted = self.loss_pair(tuple(range(7)))
        check_loss(eager, scripted, time, batch, self.device)

    def test_scripted_keeps_component_names_and_lambdas_and_anneals_through_the_buffer(self):
        eager, scripted = self.loss_pair(tuple(range(7)))
        assert list(scripted.component_names) == list(NAMES)
        torch.testing.assert_close(scripted.lambdas, eager.lambdas, rtol=0, atol=0)
        pred, label, states = make_inputs(eager.model, device=self.device)
        before = scripted(pred, label, states)[1]
        scripted.lambdas[5] = 0.0
        after = scripted(pred, label, states)[1]
        assert after[5].item() == 0.0 and before[5].item() != 0.0
        torch.testing.assert_close(after[[0, 1, 2, 3, 4, 6]], before[[0, 1, 2, 3, 4, 6]], rtol=0, atol=0)
        scripted.set_lambda("fr_sd", 0.26)  # twice ALL_ON's 0.13
        torch.testing.assert_close(scripted(pred, label, states)[1][5], 2 * before[5], rtol=RTOL, atol=0)

    @pytest.mark.parametrize("batch_first", [False, True])
    def test_model_forward_and_gradients(self, batch_first):
        model = make_model((3, 8, 2), activation="tanh", batch_first=batch_first).to(self.device)
        scripted = script_roundtrip(model)
        x = torch.randn(7, 3, 3, device=self.device, requires_grad=True)
        out_e, st_e = model(x)
        out_s, st_s = scripted(x)
        assert_same(out_e, out_s)
        assert_same(st_e, st_s)
        ge = torch.autograd.grad((out_e.sum() + st_e.sum()), [x] + trainable(model))
        gs = torch.autograd.grad((out_s.sum() + st_s.sum()), [x] + trainable(scripted))
        for a, b in zip(ge, gs):
            assert_same(a, b)

    def test_model_with_every_feature(self):
        torch.manual_seed(0)
        n = 8
        model = CTRNN((3, n, 2), activation="softplus", learn_alpha=True, init_state="learn",
                      biases=(None, "zero", "normal"), weights=("normal", "uniform", "zero"),
                      sparsity_masks=(None, (torch.rand(n, n) > 0.3).float(), None),
                      ei_masks=(None, torch.tensor([1.0] * 6 + [-1.0] * 2), None),
                      plasticity_masks=(torch.full((n, 3), 0.5), None, None)).to(self.device)
        with torch.no_grad():
            model.recurrent_layer.hidden_state.normal_()
            model.readout_layer.weight.normal_()
        scripted = script_roundtrip(model)
        x = torch.randn(6, 4, 3, device=self.device)
        out_e, st_e = model(x)
        out_s, st_s = scripted(x)
        assert_same(out_e, out_s)
        assert_same(st_e, st_s)
        (out_e.sum() + st_e.pow(2).sum()).backward()
        (out_s.sum() + st_s.pow(2).sum()).backward()
        model.apply_plasticity()
        scripted.apply_plasticity()
        for (name, a), b in zip(model.named_parameters(), scripted.parameters()):
            assert_same(a.grad, b.grad)
            assert (a.grad is None) == (name.endswith("input_layer.bias"))  # nn4n-style fixed bias

    def test_scripted_enforce_constraints(self):
        mask = torch.eye(8)
        scripted = script_roundtrip(CTRNN((3, 8, 2), sparsity_masks=(None, mask, None)).to(self.device))
        with torch.no_grad():
            scripted.recurrent_layer.hidden_layer.weight.fill_(1.0)
        scripted.enforce_constraints()
        torch.testing.assert_close(scripted.recurrent_layer.hidden_layer.weight, mask.to(self.device))

    def test_user_pipeline_holding_model_and_loss_scripts(self):
        class Pipeline(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = make_model((3, 8, 2))
                self.loss = RNNLoss(self.net, **ALL_ON)

            def forward(self, x, target):
                output, states = self.net(x)
                return self.loss(output, target, states)

        eager = Pipeline().to(self.device)
        scripted = script_roundtrip(eager)
        x = torch.randn(5, 2, 3, device=self.device)
        target = torch.randn(5, 2, 2, device=self.device)
        out_e, out_s = eager(x, target), scripted(x, target)
        for a, b in zip(out_e, out_s):
            assert_same(a, b)
        grads_e = torch.autograd.grad(out_e[0], trainable(eager))
        for a, b in zip(grads_e, torch.autograd.grad(out_s[0], trainable(scripted))):
            assert_same(a, b)


class TestScriptedMatchesEagerCPU(ScriptedMatchesEager):
    device = "cpu"


@pytest.mark.cuda
@CUDA
class TestScriptedMatchesEagerCUDA(ScriptedMatchesEager):
    device = "cuda"


@pytest.fixture(scope="module")
def scripted_covering_set():
    """(eager, scripted) for every covering set, scripted before any mistake is introduced."""
    pairs = {}
    for active in COVERING:
        eager = RNNLoss(make_model(), **lambdas_for(active))
        pairs[active] = (eager, script_roundtrip(eager))
    return pairs


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_consistency_sweep_fails_for_exactly_the_sets_a_deliberate_mistake_reaches(
        mistake, scripted_covering_set, monkeypatch):
    # The scripted modules are made first (TorchScript keeps the correct formulas it compiled), then the mistake
    # goes into eager mode: the comparison must fail for every set with an affected component, and only those.
    values, gradients = introduce(monkeypatch, mistake)
    caught = []
    for active, (eager, scripted) in scripted_covering_set.items():
        try:
            check_loss(eager, scripted, 6, 3, "cpu")
        except (AssertionError, RuntimeError):  # RuntimeError: eager's total no longer reaches any input
            caught.append(active)
    assert caught == [a for a in COVERING if (values | gradients) & set(a)]
