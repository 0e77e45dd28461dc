"""Interoperability with the real nn4n 1.1.1: its own checkpoints load and reproduce it."""
import pytest
import torch

from rnnloss import CTRNN, RNNLoss
from rnnloss.nn4n import NN4NCheckpointError

nn4n_model = pytest.importorskip("nn4n.model", reason="nn4n 1.1.1 is a test requirement (requirements/nn4n.txt)")
nn4n_criterion = pytest.importorskip("nn4n.criterion", reason="nn4n 1.1.1 is a test requirement (requirements/nn4n.txt)")

DIMS = [3, 12, 2]


def masks(as_numpy):
    g = torch.Generator().manual_seed(0)
    sparsity = (torch.rand(12, 12, generator=g) > 0.3).float()  # nn4n orientation (in, out)
    ei = torch.ones(12, 12)
    ei[9:, :] = -1  # presynaptic neurons 9..11 inhibitory: rows in nn4n's (in, out) layout
    ei_out = torch.ones(12, 2)
    ei_out[9:, :] = -1
    plasticity = torch.where(torch.rand(12, 12, generator=g) > 0.5, 1.0, 0.25)
    conv = (lambda t: t.numpy()) if as_numpy else (lambda t: t)
    return dict(sparsity_masks=[None, conv(sparsity), None], ei_masks=[None, conv(ei), conv(ei_out)],
                plasticity_masks=[None, conv(plasticity), None])


CASES = {
    "defaults": dict(dims=DIMS),
    "tanh_tau_dt_biases": dict(dims=DIMS, activation="tanh", tau=50, dt=5, biases="uniform"),
    "retanh_learned_init": dict(dims=DIMS, activation="retanh", init_state="learn", biases=["normal", None, "zero"]),
    "sigmoid_masks": dict(dims=DIMS, activation="sigmoid", **masks(as_numpy=False)),
}


def trained_nn4n(kwargs, steps=3):
    """An nn4n CTRNN trained a few steps with nn4n's own loss, so the weights are not at init."""
    torch.manual_seed(1)
    net = nn4n_model.CTRNN(**kwargs)
    loss = nn4n_criterion.RNNLoss(net, lambda_in=0.1, lambda_hid=0.1, lambda_out=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = torch.randn(10, 4, 3), torch.randn(10, 4, 2)
    for _ in range(steps):
        out, states = net(x)
        total, _ = loss(out, y, states=states[0])
        opt.zero_grad()
        total.backward()
        net.apply_plasticity()
        opt.step()
    net.eval()
    return net


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_saved_by_nn4n_reproduces_its_outputs(case, tmp_path):
    net = trained_nn4n(CASES[case])
    path = str(tmp_path / "net.pt")
    net.save(path)
    ours = CTRNN.from_nn4n(path).eval()
    x = torch.randn(17, 5, 3)
    with torch.no_grad():
        out_ref, states_ref = net(x)
        out, states = ours(x)
    torch.testing.assert_close(states, states_ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)


def test_weight_components_equal_nn4n_rnnloss(tmp_path):
    net = trained_nn4n(CASES["sigmoid_masks"])
    net.save(str(tmp_path / "net.pt"))
    ours = CTRNN.from_nn4n(str(tmp_path / "net.pt")).eval()
    lambdas = dict(lambda_mse=0.7, lambda_in=0.3, lambda_hid=0.2, lambda_out=0.1)
    theirs = nn4n_criterion.RNNLoss(net, **lambdas)
    x, y = torch.randn(9, 3, 3), torch.randn(9, 3, 2)
    with torch.no_grad():
        pred, states = net(x)
        _, ref = theirs(pred, y, states=states[0])  # nn4n returns only the active ones, in this order
        _, comps = RNNLoss(ours, **lambdas)(pred, y, states[0])
    torch.testing.assert_close(comps[:4], ref, rtol=1e-5, atol=0)


def test_masks_and_learnability_carry_over(tmp_path):
    net = trained_nn4n(CASES["sigmoid_masks"])
    net.save(str(tmp_path / "net.pt"))
    ours = CTRNN.from_nn4n(str(tmp_path / "net.pt"))
    kw = CASES["sigmoid_masks"]
    torch.testing.assert_close(ours.sparsity_hidden, kw["sparsity_masks"][1].T, check_dtype=False)  # nn4n casts
    assert torch.all(ours.sign_hidden[:, 9:] == -1) and torch.all(ours.sign_hidden[:, :9] == 1)
    # nn4n rescales plasticity to [0, 1] over all masks: {0.25, 1} -> {0, 1}
    assert set(ours.plasticity_hidden.unique().tolist()) == {0.0, 1.0}
    # nn4n's default biases=None: zero biases that are not trained
    assert not ours.recurrent_layer.hidden_layer.bias.requires_grad
    assert torch.all(ours.recurrent_layer.hidden_layer.bias == 0)
    learned = CTRNN.from_nn4n(_saved(CASES["retanh_learned_init"], tmp_path))
    assert learned.recurrent_layer.hidden_state.requires_grad and learned.learn_init


def _saved(kwargs, tmp_path, name="other.pt", with_net=False):
    net = trained_nn4n(kwargs)
    path = str(tmp_path / name)
    net.save(path)
    return (path, net) if with_net else path


def test_numpy_masks_need_trust_and_the_error_says_so(tmp_path):
    kwargs = dict(dims=DIMS, **masks(as_numpy=True))
    # (nn4n's own load() cannot read this file under torch >= 2.6: it calls torch.load with the
    # new weights_only=True default; compare with the network that saved it instead.)
    path, net = _saved(kwargs, tmp_path, with_net=True)
    with pytest.raises(NN4NCheckpointError, match="trust_checkpoint=True"):
        CTRNN.from_nn4n(path)
    with pytest.warns(UserWarning, match="full unpickling"):
        ours = CTRNN.from_nn4n(path, trust_checkpoint=True)
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)[1], net(x)[1][0], rtol=1e-5, atol=1e-6)


def test_loaded_checkpoint_dict_and_overrides(tmp_path):
    path = _saved(CASES["defaults"], tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ours = CTRNN.from_nn4n(ckpt, batch_first=True)
    assert ours.batch_first
    x = torch.randn(4, 7, 3)  # (B, T, N_in)
    net = nn4n_model.CTRNN(**CASES["defaults"])
    net.load(path)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)[0], net(x.transpose(0, 1))[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_not_a_checkpoint_is_refused_clearly(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(NN4NCheckpointError, match="not an nn4n checkpoint"):
        CTRNN.from_nn4n(tmp_path / "x.pt")
    ckpt = torch.load(_saved(CASES["defaults"], tmp_path), weights_only=True)
    ckpt["kwargs"]["init_state"] = "keep"
    with pytest.raises(NN4NCheckpointError, match=r"'keep'.*from_nn4n\(path, init_state='zero'\) loads it"):
        CTRNN.from_nn4n(ckpt)
    assert CTRNN.from_nn4n(ckpt, init_state="zero").init_state == "zero"  # what the message advises works


def test_declared_dims_the_tensors_do_not_have_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    ckpt = torch.load(_saved(CASES["defaults"], tmp_path), weights_only=True)
    built = []
    monkeypatch.setattr(CTRNN, "__init__", lambda self, *a, **k: built.append(a))  # must not be reached
    for dims in ([3, 10**12, 2], [3, 12, 10**12], [3, 12], [4, 12, 2]):
        ckpt["kwargs"]["dims"] = dims
        with pytest.raises(NN4NCheckpointError, match=r"do not match the state dict's tensor shapes .*\[12, 3\]"):
            CTRNN.from_nn4n(ckpt)
    ckpt["kwargs"]["dims"] = DIMS
    ckpt["model_state_dict"]["readout_layer.bias"] = [0.0, 0.0]  # not a tensor
    with pytest.raises(NN4NCheckpointError, match="'readout_layer.bias': 'list'"):
        CTRNN.from_nn4n(ckpt)
    assert built == []


def test_loaded_model_scripts_and_trains_with_plasticity(tmp_path):
    ours = CTRNN.from_nn4n(_saved(CASES["sigmoid_masks"], tmp_path))
    scripted = torch.jit.script(ours)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(scripted(x)[0], ours(x)[0])
    w = scripted.recurrent_layer.hidden_layer.weight
    scripted(x)[1].sum().backward()
    raw = w.grad.clone()
    scripted.apply_plasticity()
    torch.testing.assert_close(w.grad, raw * ours.plasticity_hidden)
