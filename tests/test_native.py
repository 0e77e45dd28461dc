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
