"""What an export folder holds: artifact names, the modules and inputs they are built from, sums.

Both :mod:`rnnloss.export` (which writes the folder) and :mod:`rnnloss.parity` (which checks it)
import this module; neither imports the other.
"""
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .loss import RNNLoss
from .model import CTRNN
from .native import NATIVE

LOSS_PT, TRAIN_PT, LOSS_ONNX, LOSS_PT2, MANIFEST = (
    "rnn_loss.pt", "ctrnn_train.pt", "rnn_loss.onnx", "rnn_loss.pt2", "manifest.json")
ARTIFACTS = (LOSS_PT, TRAIN_PT, LOSS_ONNX, LOSS_PT2, NATIVE, MANIFEST)
INPUT_NAMES = ("pred", "label", "states")
MASKED_INPUT_NAMES = INPUT_NAMES + ("mask",)  # with "mask": true in the config
OUTPUT_NAMES = ("total", "components")
GENERATOR = "rnnloss-export"  # manifest["generator"]: marks a folder this command wrote


def build(config: Dict[str, Any]) -> RNNLoss:
    """The model (seeded) and its loss, in eval mode, as the (validated) config says."""
    torch.manual_seed(config["seed"])
    m = config["model"]
    model = CTRNN(tuple(m["dims"]), tau=m["tau"], dt=m["dt"], activation=m["activation"],
                  batch_first=m["batch_first"], preact_noise=m["preact_noise"], postact_noise=m["postact_noise"],
                  init_state=m["init_state"], learn_alpha=m["learn_alpha"])
    return RNNLoss(model, **config["loss"]).eval()


def sample_inputs(loss: RNNLoss, time: int, batch: int, seed: int, mask: bool = False) -> Tuple[torch.Tensor, ...]:
    """pred and states from running the model on random input, and a random label; with ``mask``,
    also graded weights shaped like pred, about a third of them 0."""
    g = torch.Generator().manual_seed(seed)
    model = loss.model
    shape = (batch, time) if model.batch_first else (time, batch)
    x = torch.randn(*shape, model.n_in, generator=g)
    with torch.no_grad():
        pred, states = model(x)
    label = torch.randn(pred.shape, generator=g)
    if not mask:
        return pred, label, states
    weights = torch.rand(pred.shape, generator=g) * 1.5
    return pred, label, states, torch.where(weights < 0.5, torch.zeros_like(weights), weights)


def input_names(example: Sequence[torch.Tensor]) -> Tuple[str, ...]:
    """The graph inputs for example inputs (pred, label, states[, mask])."""
    return MASKED_INPUT_NAMES if len(example) == len(MASKED_INPUT_NAMES) else INPUT_NAMES


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NotAnExport(Exception):
    """``folder`` has no readable manifest written by this command; ``str()`` says why."""


class Unreadable(NotAnExport):
    """The manifest is there but cannot be read (no permission, say): what the folder is, is unknown."""


def read_manifest(folder: Path) -> Dict[str, Any]:
    """The folder's manifest, checked for the keys an export always has (raises NotAnExport)."""
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotAnExport(f"{folder} has no {MANIFEST}") from None
    except OSError as e:
        raise Unreadable(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise NotAnExport(f"cannot read {path}: {e}") from None
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):
        raise NotAnExport(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise NotAnExport(f"{path} is not a JSON object")
    sums = manifest.get("sha256")
    # Older exports carry no generator mark; their component_names list stands in for it.
    marked = manifest.get("generator") == GENERATOR or "component_names" in manifest
    if (not marked or not isinstance(sums, dict) or not sums
            or not all(k in ARTIFACTS and k != MANIFEST and isinstance(v, str) for k, v in sums.items())):
        # Only names this command writes: a hand-made manifest listing a user's file (thesis.tex)
        # must not make --force replace it.
        raise NotAnExport(f"{path} was not written by {GENERATOR} (no generator mark, or a sha256 table that "
                          "lists files it does not write)")
    return manifest


def check_sums(folder: Path, manifest: Dict[str, Any],
               names: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, str]]:
    """``(name, "missing")`` or ``(name, "changed")`` for each file of the manifest's sha256 table (or
    of ``names``, each listed there) that is not a plain file in ``folder`` or whose sha256 differs,
    in the table's (or ``names``') order, hashing one file per step: a caller may stop early."""
    table = manifest["sha256"]
    for name in table if names is None else names:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            yield name, "missing"
        elif sha256(path) != table[name]:
            yield name, "changed"


def sum_mismatches(folder: Path, manifest: Dict[str, Any]) -> List[str]:
    """The files listed in the manifest's sha256 table that are missing or differ, as messages."""
    return [f"{name}: missing (listed in {MANIFEST})" if why == "missing" else
            f"{name}: sha256 differs from {MANIFEST} (the file changed after the export)"
            for name, why in check_sums(folder, manifest)]
