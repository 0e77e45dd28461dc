"""Scripted == eager after a torch.jit save/load round trip, for the loss, the model and a user's
pipeline holding both. One implementation mixin, run on CPU and (marked ``cuda``) on a GPU."""
import pytest
import torch

from conftest import ALL_ON, ALL_SUBSETS, CUDA, NAMES, lambdas_for, make_inputs, make_model, script_roundtrip
from rnnloss import CTRNN, RNNLoss

RTOL = 1e-5  # fp32, same device, same kernels: only fusion/ordering differences


def grads_of(module, outputs, inputs):
    """Gradients of sum(total + components) w.r.t. the given inputs and every named parameter."""
    total, comps = outputs
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}
    wanted = list(inputs) + list(params.values())
    grads = torch.autograd.grad(total + comps.sum(), wanted, allow_unused=True)
    return list(grads[: len(inputs)]), dict(zip(params, grads[len(inputs):]))


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def assert_same(a, b, rtol=RTOL):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)


class ScriptedMatchesEager:
    device = "cpu"

    def loss_pair(self, tmp_path, active, dims=(3, 8, 2)):
        model = make_model(dims).to(self.device)
        eager = RNNLoss(model, **lambdas_for(active))
        return eager, script_roundtrip(eager, tmp_path)

    def check_loss(self, eager, scripted, time, batch, seed=0):
        pred, label, states = make_inputs(eager.model, time, batch, seed=seed, device=self.device)
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

    @pytest.mark.parametrize("active", ALL_SUBSETS, ids=lambda a: "+".join(NAMES[i] for i in a))
    def test_every_set_of_active_components(self, tmp_path, active):
        eager, scripted = self.loss_pair(tmp_path, active)
        self.check_loss(eager, scripted, 6, 3)

    @pytest.mark.parametrize("time, batch", [(1, 1), (1, 5), (9, 1), (17, 4)])
    def test_all_on_across_shapes(self, tmp_path, time, batch):
        eager, scripted = self.loss_pair(tmp_path, tuple(range(7)))
        self.check_loss(eager, scripted, time, batch)

    def test_scripted_keeps_component_names_and_lambdas(self, tmp_path):
        eager, scripted = self.loss_pair(tmp_path, tuple(range(7)))
        assert list(scripted.component_names) == list(NAMES)
        torch.testing.assert_close(scripted.lambdas, eager.lambdas)
        # Annealing through the buffer takes effect in the scripted module.
        pred, label, states = make_inputs(eager.model, device=self.device)
        before = scripted(pred, label, states)[1]
        scripted.lambdas[5] = 0.0
        after = scripted(pred, label, states)[1]
        assert after[5].item() == 0.0 and before[5].item() != 0.0
        torch.testing.assert_close(after[[0, 1, 2, 3, 4, 6]], before[[0, 1, 2, 3, 4, 6]])

    @pytest.mark.parametrize("batch_first", [False, True])
    def test_model_forward_and_gradients(self, tmp_path, batch_first):
        model = make_model((3, 8, 2), activation="tanh", batch_first=batch_first).to(self.device)
        scripted = script_roundtrip(model, tmp_path)
        x = torch.randn(7, 3, 3, device=self.device, requires_grad=True)
        out_e, st_e = model(x)
        out_s, st_s = scripted(x)
        assert_same(out_e, out_s)
        assert_same(st_e, st_s)
        ge = torch.autograd.grad((out_e.sum() + st_e.sum()), [x] + trainable(model))
        gs = torch.autograd.grad((out_s.sum() + st_s.sum()), [x] + trainable(scripted))
        for a, b in zip(ge, gs):
            assert_same(a, b)

    def test_model_with_every_feature(self, tmp_path):
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
        scripted = script_roundtrip(model, tmp_path)
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

    def test_scripted_enforce_constraints(self, tmp_path):
        mask = torch.eye(8)
        model = CTRNN((3, 8, 2), sparsity_masks=(None, mask, None)).to(self.device)
        scripted = script_roundtrip(model, tmp_path)
        with torch.no_grad():
            scripted.recurrent_layer.hidden_layer.weight.fill_(1.0)
        scripted.enforce_constraints()
        torch.testing.assert_close(scripted.recurrent_layer.hidden_layer.weight, mask.to(self.device))

    def test_user_pipeline_holding_model_and_loss_scripts(self, tmp_path):
        class Pipeline(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = make_model((3, 8, 2))
                self.loss = RNNLoss(self.net, **ALL_ON)

            def forward(self, x, target):
                output, states = self.net(x)
                total, comps = self.loss(output, target, states)
                return total, comps

        eager = Pipeline().to(self.device)
        scripted = script_roundtrip(eager, tmp_path)
        x = torch.randn(5, 2, 3, device=self.device)
        target = torch.randn(5, 2, 2, device=self.device)
        out_e, out_s = eager(x, target), scripted(x, target)
        for a, b in zip(out_e, out_s):
            assert_same(a, b)
        ge = torch.autograd.grad(out_e[0], trainable(eager))
        gs = torch.autograd.grad(out_s[0], trainable(scripted))
        for a, b in zip(ge, gs):
            assert_same(a, b)


class TestScriptedMatchesEagerCPU(ScriptedMatchesEager):
    device = "cpu"


@pytest.mark.cuda
@CUDA
class TestScriptedMatchesEagerCUDA(ScriptedMatchesEager):
    device = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_scripted_rate_statistics_equal_eager_to_the_bit_on_the_cpu(tmp_path, grad, dtype):
    # Contiguous CPU rates: the scripted module takes the eager forward's own sums (and, with a
    # gradient wanted, adds an exact zero carrying the graph), so fr, fr_sd and fr_cv are the same
    # bits. 2.4 M rates over 512 neurons: several of the sums' 2^20-rate blocks.
    model = make_model((3, 512, 2), dtype=dtype)
    eager = RNNLoss(model, **ALL_ON)
    scripted = script_roundtrip(eager, tmp_path)
    pred, label, states = make_inputs(model, 600, 8, seed=3)
    states.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        comps_e, comps_s = eager(pred, label, states)[1], scripted(pred, label, states)[1]
    assert comps_s.requires_grad == grad
    assert torch.equal(comps_e[4:], comps_s[4:]), (comps_e[4:], comps_s[4:])
