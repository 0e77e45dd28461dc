"""Build the artifacts of DESIGN.md §5 from a config, check their parity, install them atomically.

``rnnloss-export`` / ``export/export.py`` call :func:`main`; everything else is importable.
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import config as config_mod
from . import graph_checks
from .loss import COMPONENT_NAMES, LAMBDA_NAMES, RNNLoss
from .model import CTRNN
from .trainer import CTRNNTrainer

LOSS_PT, TRAIN_PT, LOSS_ONNX, LOSS_PT2, MANIFEST = (
    "rnn_loss.pt", "ctrnn_train.pt", "rnn_loss.onnx", "rnn_loss.pt2", "manifest.json")
ARTIFACTS = (LOSS_PT, TRAIN_PT, LOSS_ONNX, LOSS_PT2, MANIFEST)
INPUT_NAMES = ("pred", "label", "states")
MASKED_INPUT_NAMES = INPUT_NAMES + ("mask",)  # with "mask": true in the config
OUTPUT_NAMES = ("total", "components")


def build(config: Dict[str, Any]) -> RNNLoss:
    """The model (seeded) and its loss, in eval mode, as the config says."""
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


def axis_names(batch_first: bool) -> Tuple[str, str]:
    return ("batch", "time") if batch_first else ("time", "batch")


def input_names(example: Sequence[torch.Tensor]) -> Tuple[str, ...]:
    """The graph inputs for example inputs (pred, label, states[, mask])."""
    return MASKED_INPUT_NAMES if len(example) == len(MASKED_INPUT_NAMES) else INPUT_NAMES


def dynamic_shapes(batch_first: bool, names: Sequence[str] = INPUT_NAMES) -> Dict[str, Dict[int, Any]]:
    """One ``time`` and one ``batch`` dimension shared by every input; the last axis is static."""
    from torch.export import Dim
    dims = {name: Dim(name, min=1) for name in ("time", "batch")}
    first, second = axis_names(batch_first)
    return {name: {0: dims[first], 1: dims[second]} for name in names}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about things that are fine here; keep the CLI clean."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def export_torchscript(module: torch.nn.Module, path: Path) -> None:
    with _quiet():
        torch.jit.save(torch.jit.script(module), str(path))


def export_pt2(loss: RNNLoss, example: Sequence[torch.Tensor], path: Path) -> None:
    """The torch.export program, with the refusals its input guards lack (see graph_checks)."""
    with _quiet(), graph_checks.traced_refusals(loss):
        program = torch.export.export(loss, tuple(example),
                                      dynamic_shapes=dynamic_shapes(loss.model.batch_first, input_names(example)))
    torch.export.save(program, str(path))


def export_onnx(loss: RNNLoss, example: Sequence[torch.Tensor], path: Path, opset: Optional[int]) -> int:
    """Write a self-contained ONNX graph with its run-time refusals (see graph_checks) and run the
    full checker; returns the opset used."""
    import onnx
    kwargs = {} if opset is None else {"opset_version": opset}
    names = input_names(example)
    with _quiet():
        torch.onnx.export(loss, tuple(example), str(path), dynamo=True, input_names=list(names),
                          output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes(loss.model.batch_first, names),
                          external_data=False, **kwargs)
    proto = graph_checks.add_onnx_refusals(onnx.load(str(path)))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def write_artifacts(config: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Write the four graphs into ``folder``; returns the manifest (without parity results)."""
    loss = build(config)
    ex = config["example"]
    example = sample_inputs(loss, ex["time"], ex["batch"], seed=config["seed"], mask=config["mask"])
    export_torchscript(loss, folder / LOSS_PT)
    export_torchscript(CTRNNTrainer(loss), folder / TRAIN_PT)
    export_pt2(loss, example, folder / LOSS_PT2)
    opset = export_onnx(loss, example, folder / LOSS_ONNX, config["opset"])
    first, second = axis_names(loss.model.batch_first)
    n_in, n_hid, n_out = config["model"]["dims"]
    inputs = {"pred": [first, second, n_out], "label": [first, second, n_out], "states": [first, second, n_hid]}
    if config["mask"]:
        inputs["mask"] = [first, second, n_out]
    return {
        "component_names": list(COMPONENT_NAMES),
        "lambdas": {name: config["loss"][key] for name, key in zip(COMPONENT_NAMES, LAMBDA_NAMES)},
        "active": loss.active,
        "dims": {"n_in": n_in, "n_hid": n_hid, "n_out": n_out},
        "inputs": inputs,
        "outputs": {"total": [], "components": [len(COMPONENT_NAMES)]},
        "train_module": {"forward": "(x, target, mask=None) -> (total, components, output, states)",
                         "x": [first, second, n_in], "target": [first, second, n_out],
                         "methods": ["enforce_constraints()", "set_lambda(name, value)"]},
        "opset": opset,
        "config": config,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": {name: sha256(folder / name) for name in ARTIFACTS if name != MANIFEST},
    }


class OutputExists(Exception):
    pass


def _refuse_existing(out: Path, force: bool) -> bool:
    """Raise unless ``out`` may be written; returns whether it holds files to replace."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out} exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not force:
        raise OutputExists(f"--out {out} exists and is not empty; pass --force to replace it")
    return occupied


def install(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing non-empty ``out`` needs ``force``.

    The old folder is renamed aside first and removed only after the new one is in place, so an
    interruption leaves either the old or the new artifacts, never a mixture.
    """
    if _refuse_existing(out, force):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)


def run(config: Dict[str, Any], out: Path, *, force: bool, device: str, stream=None) -> int:
    """Export, check parity, print the table, install; returns the exit status (0 all pass, 1 not)."""
    from . import parity

    stream = stream or sys.stdout
    out = out.resolve()
    _refuse_existing(out, force)  # before the minutes of exporting; install() checks again
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = write_artifacts(config, tmp)
        devices = parity.devices_for(device)
        rows = parity.check_artifacts(tmp, build(config), config, devices)
        manifest["parity"] = [row.as_dict() for row in rows]
        manifest["parity_devices"] = devices
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        print(parity.format_table(rows), file=stream)
        ok = all(row.passed for row in rows)
        if not ok:
            rejected = out.parent / f"{out.name}.rejected"
            shutil.rmtree(rejected, ignore_errors=True)
            os.rename(tmp, rejected)
            print(f"parity FAILED: {out} left unchanged; the rejected artifacts are in {rejected}", file=stream)
            return 1
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifacts are not
        install(tmp, out, force)
        print(f"all {len(rows)} parity checks passed; artifacts in {out}", file=stream)
        return 0
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rnnloss-export",
        description="Export RNNLoss and CTRNN (TorchScript, ONNX, torch.export) and check parity with eager mode.")
    parser.add_argument("--config", help="JSON config (DESIGN §5); the embedded default when absent")
    parser.add_argument("--out", default="artifacts", help="output folder (default: artifacts)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where parity runs besides the CPU: cuda (required), auto (if present), cpu (only)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda: no CUDA GPU is visible to torch {torch.__version__}", file=sys.stderr)
        return 2
    try:
        return run(config, Path(args.out), force=args.force, device=args.device)
    except OutputExists as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
