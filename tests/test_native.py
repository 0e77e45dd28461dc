"""The native C++ artifact (rnnloss_native.pt) as Python writes and reads it."""
import pytest
import torch

from rnnloss import CTRNN, RNNLoss
from rnnloss.native import FORMAT, VERSION, save_native


def test_native_artifact_reads_back_with_weights_only_and_describes_the_loss(tmp_path):
    torch.manual_seed(0)
    signs = torch.ones(8)
    signs[6:] = -1.0
    model = CTRNN((3, 8, 2), activation="tanh", biases=(True, None, False), ei_masks=(None, signs, None),
                  learn_alpha=True, batch_first=True).double()
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=0.25)
    loss.set_lambda("fr", 0.0)  # annealed to 0: still active
    save_native(loss, tmp_path / "n.pt")
    payload = torch.load(tmp_path / "n.pt", weights_only=True)
    assert (payload["format"], payload["version"]) == (FORMAT, VERSION)
    m = payload["model"]
    assert m["dims"] == [3, 8, 2] and m["activation"] == "tanh" and m["batch_first"] and m["learn_alpha"]
    assert m["biases"] == ["trained", "fixed", "absent"]
    assert m["ei_masks"] == [False, True, False] and m["sparsity_masks"] == [False] * 3
    assert payload["loss"]["active"] == [True, False, False, False, True, False, False]
    assert payload["loss"]["lambdas"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    state = model.state_dict()
    assert payload["state_dict"].keys() == state.keys()
    for name, value in state.items():
        assert value.dtype == payload["state_dict"][name].dtype and torch.equal(value, payload["state_dict"][name])


def test_save_native_refuses_what_it_cannot_describe(tmp_path):
    with pytest.raises(TypeError, match="loss must be an RNNLoss, got CTRNN"):
        save_native(CTRNN((3, 8, 2)), tmp_path / "n.pt")
    with pytest.raises(ValueError, match=r"the native C\+\+ loss has no sync_stats"):
        save_native(RNNLoss(CTRNN((3, 8, 2)), sync_stats=True), tmp_path / "n.pt")


def test_load_native_rebuilds_the_eager_loss_exactly(tmp_path):
    # Masks, a fixed (nn4n None) bias, learnable α and v0, and a component annealed to 0 that
    # must stay active: the rebuilt loss gives identical values and has identical state.
    from rnnloss.native import load_native, save_native
    torch.manual_seed(0)
    sparsity = (torch.rand(6, 3) > 0.3).float()
    model = CTRNN((3, 6, 2), activation="softplus", biases=(True, None, True), learn_alpha=True,
                  init_state="learn", sparsity_masks=(sparsity, None, None),
                  ei_masks=(None, torch.tensor([1.0, 1, 1, 1, -1, -1]), None))
    loss = RNNLoss(model, lambda_in=0.1, lambda_fr=0.2, lambda_fr_sd=0.3)
    loss.set_lambda("fr", 0.0)
    save_native(loss, tmp_path / "n.pt")
    back = load_native(tmp_path / "n.pt")
    assert back.active == loss.active
    assert back.state_dict().keys() == loss.state_dict().keys()
    for key, value in loss.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(4, 2, 3)
    out, states = model(x)
    torch.testing.assert_close(back(out, torch.zeros_like(out), states)[1],
                               loss(out, torch.zeros_like(out), states)[1], rtol=0, atol=0)
