"""CTRNN: the §4 dynamics against a float64 step-by-step reference, masks, noise, layout."""
import numpy as np
import pytest
import torch

from cases import make_model
from reference import ctrnn_run
from rnnloss import CTRNN
from rnnloss.model import ACTIVATIONS

NN4N_KEYS = {"recurrent_layer.hidden_state", "recurrent_layer.input_layer.weight", "recurrent_layer.input_layer.bias",
             "recurrent_layer.hidden_layer.weight", "recurrent_layer.hidden_layer.bias",
             "readout_layer.weight", "readout_layer.bias"}


def reference_outputs(model, x, v0=None):
    rl = model.recurrent_layer
    return ctrnn_run(x, rl.input_layer.weight, rl.input_layer.bias, rl.hidden_layer.weight, rl.hidden_layer.bias,
                     model.readout_layer.weight, model.readout_layer.bias, model.dt / model.tau,
                     model.activation, v0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_init_state", [False, True], ids=["v0_zero", "v0_given"])
def test_dynamics_match_float64_step_by_step_reference(activation, with_init_state):
    model = make_model((3, 7, 2), dtype=torch.float64, activation=activation, tau=50.0, dt=10.0)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    v0 = torch.randn(4, 7, dtype=torch.float64) if with_init_state else None
    output, states = model(x, v0)
    ref_out, ref_states = reference_outputs(model, x, v0)
    np.testing.assert_allclose(states.detach().numpy(), ref_states, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(output.detach().numpy(), ref_out, rtol=1e-10, atol=1e-12)


def test_float32_dynamics_close_to_reference():
    model = make_model((3, 16, 2))
    x = torch.randn(20, 5, 3)
    output, states = model(x)
    ref_out, ref_states = reference_outputs(model, x)
    np.testing.assert_allclose(states.detach().numpy(), ref_states, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(output.detach().numpy(), ref_out, rtol=1e-4, atol=1e-6)


def test_batch_first_is_the_transposed_default():
    torch.manual_seed(3)
    tf = CTRNN((2, 5, 3))
    bf = CTRNN((2, 5, 3), batch_first=True)
    bf.load_state_dict(tf.state_dict())
    x = torch.randn(7, 4, 2)
    out_tf, st_tf = tf(x)
    out_bf, st_bf = bf(x.transpose(0, 1))
    assert out_bf.shape == (4, 7, 3) and st_bf.shape == (4, 7, 5)
    torch.testing.assert_close(out_bf, out_tf.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(st_bf, st_tf.transpose(0, 1), rtol=0, atol=0)


def test_parameter_names_are_nn4n_s():
    assert set(make_model().state_dict()) == NN4N_KEYS


def test_no_biases_option_removes_bias_parameters():
    model = make_model(biases=False)
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    model(torch.randn(3, 2, 3))


def test_noise_only_in_training_mode():
    model = make_model(preact_noise=0.5, postact_noise=0.5)
    x = torch.randn(5, 2, 3)
    model.train()
    assert not torch.equal(model(x)[1], model(x)[1])
    model.eval()
    torch.testing.assert_close(model(x)[1], model(x)[1], rtol=0, atol=0)
    ref_out, ref_states = reference_outputs(model.double(), x.double())
    np.testing.assert_allclose(model(x.double())[1].detach().numpy(), ref_states, rtol=1e-10)


def test_sparsity_and_dale_masks_hold_after_enforce_constraints():
    torch.manual_seed(0)
    n_in, n_hid, n_out = 2, 6, 2
    hid_mask = (torch.rand(n_hid, n_hid) > 0.5).float()
    signs = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0])  # last two neurons inhibitory
    model = CTRNN((n_in, n_hid, n_out), sparsity_masks=(None, hid_mask, None), ei_masks=(None, signs, signs))
    w_hid, w_out = model.recurrent_layer.hidden_layer.weight, model.readout_layer.weight

    def check():
        assert torch.all(w_hid[hid_mask == 0] == 0)
        assert torch.all(w_hid[:, :4] >= 0) and torch.all(w_hid[:, 4:] <= 0)
        assert torch.all(w_out[:, :4] >= 0) and torch.all(w_out[:, 4:] <= 0)

    check()  # enforced at construction
    # Dale's law starts satisfied without zeroing the weights that were allowed.
    assert torch.count_nonzero(w_hid) == torch.count_nonzero(hid_mask)
    with torch.no_grad():  # an optimizer step that breaks every constraint
        w_hid.copy_(torch.randn(n_hid, n_hid))
        w_out.copy_(torch.randn(n_out, n_hid))
    model.enforce_constraints()
    check()
    assert set(model.state_dict()) == NN4N_KEYS | {"sparsity_hidden", "sign_hidden", "sign_readout"}


def test_forward_never_mutates_parameters():
    model = make_model(sparsity_masks=(None, torch.ones(8, 8), None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 2, 3))[0].sum().backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_weight_initialisations(init):
    model = make_model((4, 9, 2), weights=init)
    w = model.recurrent_layer.hidden_layer.weight
    if init == "zero":
        assert torch.all(w == 0)
    elif init == "uniform":
        assert w.abs().max() <= 1 / 3 and w.std() > 0
    else:
        assert w.std() > 0


def test_learnable_alpha_is_per_neuron_trains_and_stays_in_range():
    model = make_model((2, 6, 1), dtype=torch.float64, learn_alpha=True, tau=100.0, dt=10.0)
    alpha = model.recurrent_layer.alpha
    assert alpha.shape == (6,) and torch.all(alpha.float() == 0.1)  # dt/τ, made in float32 then cast
    with torch.no_grad():
        alpha.copy_(torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 0.3], dtype=torch.float64))
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    # reference: the §4 dynamics with a per-neuron α (elementwise)
    rl = model.recurrent_layer
    v = torch.zeros(3, 6, dtype=torch.float64)
    r = torch.relu(v)
    for t in range(5):
        pre = r @ rl.hidden_layer.weight.T + rl.hidden_layer.bias + x[t] @ rl.input_layer.weight.T + rl.input_layer.bias
        v = (1 - alpha) * v + alpha * pre
        r = torch.relu(v)
    torch.testing.assert_close(model(x)[1][-1], r, rtol=1e-12, atol=0)
    model(x)[1].sum().backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0  # (a silent relu neuron gets 0)
    with torch.no_grad():
        alpha.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0, 1.0, 1e-5], dtype=torch.float64))
    model.enforce_constraints()
    assert alpha.tolist() == [1e-3, 1e-3, 0.5, 1.0, 1.0, 1e-3]


def test_learnable_initial_state_is_v0_and_trains():
    model = make_model((2, 4, 1), dtype=torch.float64, init_state="learn")
    h = model.recurrent_layer.hidden_state
    assert h.requires_grad
    with torch.no_grad():
        h.copy_(torch.tensor([0.5, -0.2, 1.0, 0.0], dtype=torch.float64))
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    ref = model(x, h.detach().expand(2, 4).clone())[1]
    out = model(x)[1]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    fixed = make_model((2, 4, 1))
    assert not fixed.recurrent_layer.hidden_state.requires_grad


def test_plasticity_scales_gradients_per_synapse():
    scale = torch.tensor([[0.0, 1.0], [0.5, 2.0]])
    model = CTRNN((2, 2, 1), plasticity_masks=(None, scale, None))
    model(torch.randn(4, 3, 2))[1].pow(2).sum().backward()
    w = model.recurrent_layer.hidden_layer.weight
    raw, other = w.grad.clone(), model.recurrent_layer.input_layer.weight.grad.clone()
    model.apply_plasticity()
    torch.testing.assert_close(w.grad, raw * scale)
    torch.testing.assert_close(model.recurrent_layer.input_layer.weight.grad, other)  # no mask: unchanged
    with pytest.raises(ValueError, match="plasticity_masks for the hidden layer must be >= 0"):
        CTRNN((2, 2, 1), plasticity_masks=(None, -scale, None))


def test_explicit_weights_and_bias_options():
    w_hid = torch.arange(16.0).reshape(4, 4) / 10
    model = CTRNN((2, 4, 3), weights=("normal", w_hid, "zero"), biases=(None, "zero", torch.tensor([1.0, 2.0, 3.0])))
    torch.testing.assert_close(model.recurrent_layer.hidden_layer.weight.detach(), w_hid)
    assert torch.all(model.readout_layer.weight == 0)
    b_in = model.recurrent_layer.input_layer.bias
    assert not b_in.requires_grad and torch.all(b_in == 0)          # None: nn4n's fixed zero bias
    assert model.recurrent_layer.hidden_layer.bias.requires_grad     # "zero": learnable from 0
    assert model.readout_layer.bias.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"weights for the hidden layer must have shape \[4, 4\]"):
        CTRNN((2, 4, 3), weights=("uniform", torch.zeros(3, 4), "uniform"))


def test_dale_initialisation_balances_excitation_and_inhibition():
    torch.manual_seed(0)
    signs = torch.tensor([1.0] * 8 + [-1.0] * 2)  # 8 E, 2 I presynaptic neurons
    model = CTRNN((2, 10, 2), ei_masks=(None, signs, None))
    w = model.recurrent_layer.hidden_layer.weight
    assert torch.all(w[:, :8] >= 0) and torch.all(w[:, 8:] <= 0)
    assert torch.count_nonzero(w) == w.numel()  # signs imposed by |w|·sign, nothing zeroed
    torch.testing.assert_close(w[:, :8].sum(), -w[:, 8:].sum())


def test_backward_graph_has_no_per_step_select_of_the_input_drive():
    # Indexing the (T, B, N) drive per step makes each step's backward zero-fill a full (T, B, N)
    # tensor (O(T²) memory traffic, once half a training step); the model unbinds it once instead.
    model = make_model((3, 8, 2))
    output, states = model(torch.randn(12, 2, 3))
    seen, stack, kinds = set(), [states.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds.append(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    assert kinds.count("SelectBackward0") == 0
    assert kinds.count("UnbindBackward0") == 1
