"""Back from files to eager modules: the native C++ library's file (rnnloss_native.pt) as Python writes and reads
it, and from_torchscript of scripted losses and train modules. (Files that are not ours: test_hostile_files.)"""
import pytest
import torch

from cases import make_inputs, script_roundtrip
from rnnloss import CTRNN, RNNLoss, from_torchscript
from rnnloss.export.native import FORMAT, VERSION, load_native, save_native


def test_the_native_file_reads_back_with_weights_only_and_describes_the_loss(tmp_path):
    torch.manual_seed(0)
    signs = torch.ones(8)
    signs[6:] = -1.0
    model = CTRNN((3, 8, 2), activation="tanh", biases=(True, None, False), ei_masks=(None, signs, None),
                  learn_alpha=True, batch_first=True).double()
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=0.25)
    loss.set_lambda("fr", 0.0)  # annealed to 0: still active
    save_native(loss, tmp_path / "n.pt", metadata='{"a": 1}')
    payload = torch.load(tmp_path / "n.pt", weights_only=True)
    assert (payload["format"], payload["version"]) == (FORMAT, VERSION) == ("rnnloss.native", 1)
    m = payload["model"]
    assert m["dims"] == [3, 8, 2] and m["activation"] == "tanh" and m["batch_first"] and m["learn_alpha"]
    assert m["biases"] == ["trained", "fixed", "absent"]
    assert m["ei_masks"] == [False, True, False] and m["sparsity_masks"] == [False] * 3
    assert payload["loss"]["active"] == [True, False, False, False, True, False, False]
    assert payload["loss"]["lambdas"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert payload["metadata"] == '{"a": 1}'
    state = model.state_dict()
    assert payload["state_dict"].keys() == state.keys()
    for name, value in state.items():
        assert value.dtype == payload["state_dict"][name].dtype and torch.equal(value, payload["state_dict"][name])


def test_the_native_file_writes_options_as_plain_types_whatever_the_attributes_hold(tmp_path):
    # Attributes set after construction (an int flag, a numpy string, a 0-d tensor) are written as the types
    # the readers (load_native, the C++ library, weights_only) take.
    np = pytest.importorskip("numpy")
    model = CTRNN((3, 4, 2))
    model.batch_first, model.activation, model.tau = 1, np.str_("relu"), torch.tensor(100.0)
    save_native(RNNLoss(model), tmp_path / "n.pt")
    m = torch.load(tmp_path / "n.pt", weights_only=True)["model"]
    assert (type(m["batch_first"]), type(m["activation"]), type(m["tau"])) == (bool, str, float)
    back = load_native(tmp_path / "n.pt").model
    assert (back.batch_first, back.activation, back.tau) == (True, "relu", 100.0)


def test_save_native_refuses_what_it_cannot_describe(tmp_path):
    with pytest.raises(TypeError, match="loss must be an RNNLoss, got CTRNN"):
        save_native(CTRNN((3, 8, 2)), tmp_path / "n.pt")
    with pytest.raises(ValueError, match=r"the native C\+\+ loss has no sync_stats"):
        save_native(RNNLoss(CTRNN((3, 8, 2)), sync_stats=True), tmp_path / "n.pt")
    assert list(tmp_path.iterdir()) == []


def _featureful_loss():
    """Masks, a fixed (nn4n None) bias, learnable α and v0, and a component annealed to 0 that must stay active."""
    torch.manual_seed(0)
    sparsity = (torch.rand(6, 3) > 0.3).float()
    model = CTRNN((3, 6, 2), activation="softplus", biases=(True, None, True), learn_alpha=True, init_state="learn",
                  sparsity_masks=(sparsity, None, None), ei_masks=(None, torch.tensor([1.0, 1, 1, 1, -1, -1]), None),
                  plasticity_masks=(None, torch.full((6, 6), 0.5), None))
    loss = RNNLoss(model, lambda_in=0.1, lambda_fr=0.2, lambda_fr_sd=0.3)
    loss.set_lambda("fr", 0.0)
    return loss


def _assert_same_loss(back, loss):
    assert back.active == loss.active
    assert back.state_dict().keys() == loss.state_dict().keys()
    for key, value in loss.state_dict().items():
        assert back.state_dict()[key].dtype == value.dtype and torch.equal(back.state_dict()[key], value), key
    for option in ("tau", "dt", "activation", "batch_first", "learn_alpha", "init_state", "n_in", "n_hid", "n_out"):
        assert getattr(back.model, option) == getattr(loss.model, option), option
    x = torch.randn(4, 2, 3)
    out, states = loss.model(x)
    torch.testing.assert_close(back(out, torch.zeros_like(out), states)[1],
                               loss(out, torch.zeros_like(out), states)[1], rtol=0, atol=0)


def test_load_native_rebuilds_the_eager_loss_exactly(tmp_path):
    loss = _featureful_loss()
    save_native(loss, tmp_path / "n.pt")
    back = load_native(tmp_path / "n.pt")
    assert not back.training
    _assert_same_loss(back, loss)


@pytest.mark.parametrize("wrapper", ["loss", "train_module"])
def test_from_torchscript_keeps_masks_biases_and_learned_state(wrapper, tmp_path):
    from rnnloss.trainer import CTRNNTrainer
    loss = _featureful_loss()
    module = loss if wrapper == "loss" else CTRNNTrainer(loss)
    torch.jit.save(torch.jit.script(module), str(tmp_path / "t.pt"))
    for source in (tmp_path / "t.pt", str(tmp_path / "t.pt"), torch.jit.load(str(tmp_path / "t.pt"))):
        back = from_torchscript(source)
        _assert_same_loss(back, loss)
        assert back.model.readout_layer.bias.requires_grad
        assert not back.model.recurrent_layer.hidden_layer.bias.requires_grad  # nn4n's fixed zero bias


def test_from_torchscript_keeps_the_dtype_and_the_mode():
    loss = RNNLoss(CTRNN((2, 4, 1)).double(), lambda_fr=0.1).eval()
    back = from_torchscript(script_roundtrip(loss))
    assert back.model.readout_layer.weight.dtype == torch.float64 and not back.training
    pred, label, states = make_inputs(loss.model)
    assert torch.equal(back(pred, label, states)[1], loss(pred, label, states)[1])
