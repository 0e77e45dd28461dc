"""Build the artifacts from a config, check their parity with eager mode, install them atomically.

``rnnloss-export`` / ``export/export.py`` call :func:`main`; everything else is importable.
What a user sees (the README's export section says more):

- exit 0: every artifact written, loaded and within tolerance of eager mode; installed in --out.
- exit 1: a parity check failed (``--verify``: a sum, a load or a parity check failed); --out is
  unchanged, and the rejected build is kept beside it only when small or asked for.
- exit 2: anything the user can fix — config, --out in the way, a missing optional dependency,
  disk full, out of memory, permissions — one line on stderr, no traceback, nothing left behind.
- exit 3: a bug (an error nothing above explains); the traceback is printed for a report.
"""
import argparse
import contextlib
import datetime
import errno
import io
import json
import logging
import os
import shutil
import signal
import stat
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import config as config_mod
from . import graph_checks, install, parity
from .artifacts import (ARTIFACTS, GENERATOR, INPUT_NAMES, LOSS_ONNX, LOSS_PT, LOSS_PT2, MANIFEST,  # noqa: F401
                        MASKED_INPUT_NAMES, OUTPUT_NAMES, TRAIN_PT, NotAnExport, build, input_names, read_manifest,
                        sample_inputs, sha256, sum_mismatches)
from .loss import COMPONENT_NAMES, LAMBDA_NAMES, RNNLoss
from .native import NATIVE, save_native
from .trainer import CTRNNTrainer


def axis_names(batch_first: bool) -> Tuple[str, str]:
    return ("batch", "time") if batch_first else ("time", "batch")


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


def save_through_memory(save: Callable[[io.BytesIO], None], path: Path) -> None:
    """Serialise into memory, then write the bytes with Python's own file I/O.

    torch's file writer aborts the whole process (``terminate called after throwing
    c10::Error ... unexpected pos``) when a write fails in its destructor, e.g. on a full disk;
    written this way a full disk is an ``OSError(ENOSPC)`` like any other.
    """
    buffer = io.BytesIO()
    save(buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def export_torchscript(module: torch.nn.Module, path: Path) -> None:
    with _quiet():
        scripted = torch.jit.script(module)
        save_through_memory(lambda f: torch.jit.save(scripted, f), path)


def export_pt2(loss: RNNLoss, example: Sequence[torch.Tensor], path: Path) -> None:
    """The torch.export program (the refusals its input guards lack are traced from the loss)."""
    loss._check_lambdas(force=True)  # λ become constants of the program (tracing skips the check)
    with _quiet():
        program = torch.export.export(loss, tuple(example),
                                      dynamic_shapes=dynamic_shapes(loss.model.batch_first, input_names(example)))
    # The program is saved with its example inputs, whose T·B·N_hid rates can outweigh the weights.
    # A 2 x 2 slice of them keeps what loading uses them for (the guards' messages name the inputs'
    # axes) at a negligible size.
    program.example_inputs = (tuple(t[:2, :2].clone() for t in example), {})
    save_through_memory(lambda f: torch.export.save(program, f), path)


def export_onnx(loss: RNNLoss, example: Sequence[torch.Tensor], path: Path, opset: Optional[int]) -> int:
    """Write a self-contained ONNX graph with its run-time refusals (see graph_checks) and run the
    full checker; returns the opset used."""
    import onnx
    loss._check_lambdas(force=True)  # λ become constants of the graph (tracing skips the check)
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


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def write_artifacts(config: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Write the four graphs and the native weights file into ``folder``; returns the manifest (without parity results)."""
    loss = build(config)
    ex = config["example"]
    example = sample_inputs(loss, ex["time"], ex["batch"], seed=config["seed"], mask=config["mask"])
    export_torchscript(loss, folder / LOSS_PT)
    export_torchscript(CTRNNTrainer(loss), folder / TRAIN_PT)  # eval mode, as the loss
    export_pt2(loss, example, folder / LOSS_PT2)
    opset = export_onnx(loss, example, folder / LOSS_ONNX, config["opset"])
    save_native(loss, folder / NATIVE)
    first, second = axis_names(loss.model.batch_first)
    n_in, n_hid, n_out = config["model"]["dims"]
    inputs = {"pred": [first, second, n_out], "label": [first, second, n_out], "states": [first, second, n_hid]}
    if config["mask"]:
        inputs["mask"] = [first, second, n_out]
    return {
        "generator": GENERATOR,
        "component_names": list(COMPONENT_NAMES),
        "lambdas": {name: config["loss"][key] for name, key in zip(COMPONENT_NAMES, LAMBDA_NAMES)},
        "active": loss.active,
        "dims": {"n_in": n_in, "n_hid": n_hid, "n_out": n_out},
        "inputs": inputs,
        "outputs": {"total": [], "components": [len(COMPONENT_NAMES)]},
        "train_module": {"forward": "(x, target, mask=None) -> (total, components, output, states)",
                         "x": [first, second, n_in], "target": [first, second, n_out],
                         "methods": ["enforce_constraints()", "set_lambda(name, value)", "dims()", "is_batch_first()"]},
        "opset": opset,
        "config": config,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": {name: sha256(folder / name) for name in ARTIFACTS if name != MANIFEST},
    }


REJECTED_KEEP_BYTES = 64 << 20  # a rejected build up to this size is kept without --keep-rejected
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


class UserError(Exception):
    """A problem the user can fix (exit 2); ``str()`` is the one line to print."""


def require_onnx() -> None:
    """Raise UserError naming the extra to install unless the ONNX exporter and runtime import."""
    missing = []
    for name in ONNX_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"the ONNX artifact needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not installed: pip install rnnloss[onnx]")


# Peak memory of an export (max RSS from /usr/bin/time, 2-core CPU VM, torch 2.13.0, 2026-11-28,
# example 2 x 2): 1.12 GB at N_hid = 3000 (36 MB of weights), 2.93 GB at N_hid = 6000 (144 MB): about
# 0.5 GB of libraries plus 17x the weights. The estimate takes 1 GiB + 24x (40 % margin); the rates
# of the parity inputs (autograd keeps several copies) come on top.
MEMORY_BASE = 1 << 30
MEMORY_PER_WEIGHT_BYTE = 24
MEMORY_PER_RATE_BYTE = 64
DISK_PER_WEIGHT_BYTE = 6  # five artifacts (four graphs, the native file) hold the weights once each; one spare


def resource_estimate(config: Dict[str, Any]) -> Tuple[int, int]:
    """(memory, disk) in bytes that exporting ``config`` needs, generously rounded up.

    Weights: W_in, W_hid, W_out, the biases and the initial state in float32. Rates: the
    largest parity input, (T + 7)·(B + 5) samples of x, states, pred, label and mask, that is
    N_in + N_hid + 3·N_out float32 values each (see parity.fresh_shapes).
    """
    n_in, n_hid, n_out = config["model"]["dims"]
    weights = 4 * (n_hid * n_in + n_hid * n_hid + n_out * n_hid + 3 * n_hid + n_out)
    ex = config["example"]
    rates = 4 * (ex["time"] + 7) * (ex["batch"] + 5) * (n_in + n_hid + 3 * n_out)
    return (MEMORY_BASE + MEMORY_PER_WEIGHT_BYTE * weights + MEMORY_PER_RATE_BYTE * rates,
            DISK_PER_WEIGHT_BYTE * weights + 2 * rates + (1 << 20))


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_resources(config: Dict[str, Any], folder: Path) -> None:
    """Refuse (UserError) a config whose export would not fit this machine's memory or the disk
    under ``folder``, before any work: a model too big fails in minutes otherwise."""
    memory, disk = resource_estimate(config)
    dims = config["model"]["dims"]
    available = _available_memory()
    if available is not None and memory > available:
        ex = config["example"]
        raise UserError(f"model.dims {dims} with example time {ex['time']} and batch {ex['batch']}: exporting "
                        f"needs about {_size(memory)} of memory, {_size(available)} is available; use smaller "
                        f"dims or example sizes")
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise UserError(f"not enough disk space: the artifacts of model.dims {dims} need about {_size(disk)}, "
                        f"{_size(free)} is free under {folder}; free some space or choose another --out")


def _rejected(ws: "install.Workspace", real: Path, keep: bool) -> str:
    """Keep the rejected build beside --out as NAME.rejected when small or asked for; says what happened."""
    dest = real.parent / f"{real.name}.rejected"
    size = ws.size()
    if not keep and size > REJECTED_KEEP_BYTES:
        return (f"the rejected build ({size / 2**20:.0f} MiB) was not kept: over {REJECTED_KEEP_BYTES >> 20} MiB; "
                "pass --keep-rejected to keep it")
    try:
        ws.install(dest, f"rejected build {dest}", force=True)
    except install.InTheWay as e:
        return f"the rejected build was not kept: {e}"
    return f"the rejected artifacts are in {dest}"


@contextlib.contextmanager
def _parents_made(folder: Path):
    """Create ``folder`` and its missing parents; remove those again (if still empty) when the
    block fails, so that a failed run leaves nothing behind."""
    made = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        made.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        yield
        ok = True
    finally:
        if not ok:
            for path in made:  # deepest first
                try:
                    path.rmdir()
                except OSError:
                    break


def run(config: Dict[str, Any], out: Path, *, force: bool, device: str, keep_rejected: bool = False,
        stream=None, use_exchange: bool = True) -> int:
    """Export, check parity, print the table, install; returns 0 (all pass) or 1 (parity failed).

    User-fixable problems raise (:class:`UserError`, :class:`install.InTheWay`, ``OSError``,
    ``MemoryError`` …; :func:`main` turns them into one line and exit 2). ``--out`` is checked
    before anything is written and again at the swap (see :mod:`rnnloss.install`).
    """
    stream = stream or sys.stdout
    out = Path(out)
    real = install.resolve_out(out)
    install.check_target(real, f"--out {out}", force)  # before the minutes of exporting
    require_onnx()
    check_resources(config, install.existing_ancestor(real.parent))
    with _parents_made(real.parent), install.Workspace(real, use_exchange=use_exchange) as ws:
        manifest = write_artifacts(config, ws.tmp)
        install.kill_point("written")
        devices = parity.devices_for(device)
        rows = parity.check_artifacts(ws.tmp, build(config), config, devices)
        manifest["parity"] = [row.as_dict() for row in rows]
        manifest["parity_devices"] = devices
        (ws.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        install.kill_point("checked")
        print(parity.format_table(rows), file=stream)
        if not all(row.passed for row in rows):
            print(f"parity FAILED: {out} left unchanged; {_rejected(ws, real, keep_rejected)}", file=stream)
            return 1
        ws.install(real, f"--out {out}", force)
        print(f"all {len(rows)} parity checks passed; artifacts in {out}", file=stream)
        return 0


def verify(folder: Path, *, device: str, stream=None) -> int:
    """Check an export folder: every sha256 against the manifest, then load and rerun parity.

    Returns 0 when every check holds and 1 when one does not (each failing file named on
    ``stream``); raises UserError when ``folder`` is unusable (no folder, no manifest of this
    command, an invalid config in it) or this user may not read it or a file it lists. Parity compares with the eager model rebuilt from the
    manifest's config and seed, as the export did.
    """
    stream = stream or sys.stdout
    folder = Path(folder)
    try:
        is_folder = stat.S_ISDIR(os.stat(folder).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_folder = False
    except OSError as e:  # e.g. a folder above it that this user may not enter
        raise UserError(f"--verify {folder}: cannot read {e.filename}: {e.strerror}") from None
    if not is_folder:
        raise UserError(f"--verify {folder}: not a folder")
    try:
        manifest = read_manifest(folder)
    except NotAnExport as e:
        raise UserError(f"--verify {folder}: {e}") from None
    try:
        config = config_mod.validate(manifest.get("config"))
    except config_mod.ConfigError as e:
        raise UserError(f"--verify {folder}: the config in {MANIFEST} is invalid: {e}") from None
    try:
        problems = sum_mismatches(folder, manifest)
    except OSError as e:  # a file this user may not read: nothing can be said about it
        raise UserError(f"--verify {folder}: cannot read {e.filename}: {e.strerror}") from None
    checked = [name for name in ARTIFACTS if name != MANIFEST]
    problems += [f"{name}: not listed in {MANIFEST}'s sha256 table" for name in checked if name not in manifest["sha256"]]
    require_onnx()
    rows = parity.check_artifacts(folder, build(config), config, parity.devices_for(device))
    print(parity.format_table(rows), file=stream)
    problems += [f"{row.artifact}: parity check on {row.runtime} {row.device} failed"
                 + (f" ({row.error})" if row.error else f" (max rel err {row.max_rel:.3e} > rtol {row.rtol:g})")
                 for row in rows if not row.passed]
    for problem in problems:
        print(f"FAILED {problem}", file=stream)
    if problems:
        return 1
    print(f"verified {folder}: {len(manifest['sha256'])} files match {MANIFEST}; all {len(rows)} parity checks passed",
          file=stream)
    return 0


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    # torch's stream writer reports a failed write as c10::Error "unexpected pos" / "failed writing".
    text = str(e)
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text
                                            or "No space left" in text)


def user_message(e: BaseException, out: str) -> Optional[str]:
    """The one line to print for an exception the user can fix; None for anything else (a bug)."""
    if isinstance(e, (config_mod.ConfigError,)):
        return f"config error: {e}"
    if isinstance(e, (UserError, install.InTheWay)):
        return str(e)
    if parity.is_out_of_memory(e):
        return ("out of memory while exporting; use smaller model.dims or example sizes, or a machine with more "
                "memory")
    if _is_disk_full(e):
        where = getattr(e, "filename", None) or out
        return f"disk full: cannot write {where}; free some space or choose another --out"
    if isinstance(e, OSError):
        where = e.filename or out
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: cannot write {where} ({e.strerror})"
        return f"cannot write --out {out}: {where}: {e.strerror or e}"
    return None


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for any error."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would add the usage)
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(
        prog="rnnloss-export",
        description="Export RNNLoss and CTRNN (TorchScript, ONNX, torch.export), check parity with eager mode and "
                    "install the artifacts atomically in --out. Exit 0: all checks pass; 1: a parity (or --verify) "
                    "check failed; 2: a problem you can fix (config, --out, missing dependency, disk, memory, "
                    "permissions), printed as one line; 3: an unexplained error (a bug), with its traceback.")
    parser.add_argument("--config", help="JSON config (keys and ranges: see the README); the embedded default "
                                         "when absent")
    parser.add_argument("--out", help="output folder (default: artifacts)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where parity runs besides the CPU: cuda (required), auto (if present), cpu (only)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it holds an earlier, unmodified export of this command (and nothing "
                             "else); anything else is never replaced")
    parser.add_argument("--keep-rejected", action="store_true",
                        help=f"keep a build that fails parity in OUT.rejected whatever its size (by default only "
                             f"up to {REJECTED_KEEP_BYTES >> 20} MiB)")
    parser.add_argument("--verify", metavar="DIR",
                        help="check an export folder instead of exporting: sha256 of every artifact against its "
                             "manifest, load each, rerun parity (exit 0 all hold, 1 not, 2 DIR unusable)")
    args = parser.parse_args(argv)
    if args.verify is not None and (args.config or args.out or args.force or args.keep_rejected):
        parser.error("--verify DIR takes no --config, --out, --force or --keep-rejected")
    if args.out is None:
        args.out = "artifacts"
    prog = parser.prog
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__}")
        if args.verify is not None:
            return verify(Path(args.verify), device=args.device)
        config = config_mod.load(args.config)
        return run(config, Path(args.out), force=args.force, device=args.device, keep_rejected=args.keep_rejected)
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM); temporary files removed, --out holds a complete export or is "
              "unchanged", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; temporary files removed, --out holds a complete export or is unchanged",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into "user can fix" (exit 2) and bugs (exit 3)
        message = user_message(e, args.out)
        if message is None:
            traceback.print_exc()
            print(f"{prog}: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
            return 3
        print(f"{prog}: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
