"""``rnnloss-export``: config -> artifacts -> parity -> atomic install; ``--verify DIR`` checks a folder.

Exit statuses 0-3: :func:`main`'s description (``--help``) and docs/export.md.
torch is imported only once the arguments are parsed, so ``--help`` and ``--version`` answer at once.
"""
import argparse
import contextlib
import datetime
import errno
import itertools
import json
import os
import shutil
import signal
import stat
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .. import __version__

REJECTED_KEEP_BYTES = 64 << 20  # a rejected build up to this size is kept without --keep-rejected
UNVERIFIABLE = ("sha256", "parity", "parity_devices")  # the manifest fields the artifacts do not embed


class UserError(Exception):
    """A problem the user can fix (exit 2); ``str()`` is the one line to print."""


def require(config: Dict[str, Any]) -> None:
    """UserError naming what to install unless every module the artifacts of ``config`` need imports."""
    from .artifacts import wanted
    missing = []
    for name in sorted({m for a in wanted(config) for m in a.needs}):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: pip install "
                        f"{' '.join(missing)} (from a source checkout: pip install -e '.[onnx,executorch]')")


# Peak memory of an export (max RSS, 2-core CPU, torch 2.13.0): about 0.5 GB of libraries plus 17x the
# weights (1.12 GB at N_hid = 3000, 2.93 GB at 6000). The estimate takes 1 GiB + 24x (a 40 % margin), plus
# 64 bytes per rate of the largest parity input (autograd keeps several copies).
MEMORY_BASE, MEMORY_PER_WEIGHT_BYTE, MEMORY_PER_RATE_BYTE = 1 << 30, 24, 64
DISK_PER_WEIGHT_BYTE = 10  # eight artifacts hold the weights once each; two spare


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_resources(config: Dict[str, Any], folder: Path) -> None:
    """UserError when exporting ``config`` would not fit this machine's memory or the disk under ``folder``."""
    n_in, n_hid, n_out = dims = config["model"]["dims"]
    ex = config["example"]
    weights = 4 * (n_hid * n_in + n_hid * n_hid + n_out * n_hid + 3 * n_hid + n_out)
    # The largest parity input: (T + 7)·(B + 5) samples of x, states, pred, label and mask.
    rates = 4 * (ex["time"] + 7) * (ex["batch"] + 5) * (n_in + n_hid + 3 * n_out)
    memory = MEMORY_BASE + MEMORY_PER_WEIGHT_BYTE * weights + MEMORY_PER_RATE_BYTE * rates
    disk = DISK_PER_WEIGHT_BYTE * weights + 2 * rates + (1 << 20)
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = None
    if available is not None and memory > available:
        raise UserError(f"model.dims {dims} with example time {ex['time']} and batch {ex['batch']}: exporting needs "
                        f"about {_size(memory)} of memory, {_size(available)} is available; use smaller dims or "
                        "example sizes")
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise UserError(f"not enough disk space: the artifacts of model.dims {dims} need about {_size(disk)}, "
                        f"{_size(free)} is free under {folder}; free some space or choose another --out")


@contextlib.contextmanager
def _parents_made(folder: Path):
    """Create ``folder`` and its missing parents; remove them again (if still empty) when the block fails."""
    made = list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in made:
            try:
                path.rmdir()
            except OSError:
                break
        raise


def run(config: Dict[str, Any], out: Path, *, force: bool, device: str, keep_rejected: bool = False,
        stream=None, progress: Callable[[str], None] = lambda line: None, use_exchange: bool = True) -> int:
    """Export, check parity, print the table, install; 0 when every check passes, 1 when one fails.
    User-fixable problems raise (:class:`UserError`, ``InTheWay``, ``OSError`` ...)."""
    from . import install
    stream = stream or sys.stdout
    out = Path(out)
    real = install.resolve_out(out)
    install.check_target(real, f"--out {out}", force)  # before the minutes of exporting
    require(config)
    check_resources(config, install.existing_ancestor(real.parent))
    with _parents_made(real.parent), install.Workspace(real, use_exchange=use_exchange) as ws:
        manifest = write_all(config, ws.tmp, progress)
        install.kill_point("written")
        rows = _parity(ws.tmp, config, device, progress)
        manifest["parity"] = [row.as_dict() for row in rows]
        manifest["parity_devices"] = _devices(device)
        (ws.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        install.kill_point("checked")
        from .parity import format_table
        print(format_table(rows), file=stream)
        if not all(row.passed for row in rows):
            print(f"parity FAILED: {out} left unchanged; {_rejected(ws, real, keep_rejected)}", file=stream)
            return 1
        _stop_if_terminated()  # a SIGTERM whose exception was lost: not installed
        ws.install(real, f"--out {out}", force)
        print(f"all {len(rows)} parity checks passed; artifacts in {out}", file=stream)
        return 0


def write_all(config: Dict[str, Any], folder: Path, progress: Callable[[str], None]) -> Dict[str, Any]:
    """Every artifact of the registry into ``folder``; returns the manifest (without parity results)."""
    import torch

    from .artifacts import Build, build, describe, sample_inputs, wanted
    from .folder import sha256
    loss = build(config)
    ex = config["example"]
    example = sample_inputs(loss, ex["time"], ex["batch"], seed=config["seed"], mask=config["mask"])
    versions: Dict[str, Optional[str]] = {"rnnloss": __version__, "torch": torch.__version__}
    from importlib import metadata as packages
    for name in ("onnx", "onnxruntime", "onnxscript", "executorch"):  # (executorch has no __version__)
        try:
            versions[name] = packages.version(name)
        except packages.PackageNotFoundError:
            versions[name] = None
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    metadata = {**describe(config), "versions": versions, "created": created}
    b = Build(loss, config, example, metadata)
    for artifact in wanted(config):  # the ONNX graph first: it sets "opset", which every artifact records
        artifact.write(b, folder / artifact.name)
        progress(f"wrote {artifact.name} ({(folder / artifact.name).stat().st_size / 2**20:.1f} MiB)")
    return {**metadata, "sha256": {a.name: sha256(folder / a.name) for a in wanted(config)}}


def _devices(choice: str) -> List[str]:
    import torch
    return ["cpu", "cuda"] if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else ["cpu"]


def _parity(folder: Path, config: Dict[str, Any], device: str, progress, names=None):
    from .artifacts import check_all, wanted
    chosen = [a for a in wanted(config) if names is None or a.name in names]
    return check_all(folder, config, _devices(device), chosen, progress)


def _rejected(ws, real: Path, keep: bool) -> str:
    """Keep the rejected build beside --out as NAME.rejected when small or asked for; says what happened."""
    from . import install
    dest = real.parent / f"{real.name}.rejected"
    size = sum(p.stat().st_size for p in ws.tmp.iterdir() if p.is_file())
    if not keep and size > REJECTED_KEEP_BYTES:
        return (f"the rejected build ({size / 2**20:.0f} MiB) was not kept: over {REJECTED_KEEP_BYTES >> 20} MiB; "
                "pass --keep-rejected to keep it")
    try:
        ws.install(dest, f"rejected build {dest}", force=True)
    except install.InTheWay as e:
        return f"the rejected build was not kept: {e}"
    return f"the rejected artifacts are in {dest}"


def verify(folder: Path, *, device: str, stream=None, progress=lambda line: None) -> int:
    """Check an export folder: sums, the manifest and each artifact against its config (:func:`manifest_problems`),
    then parity. 0 when all hold, 1 when one does not (each problem on one line); UserError when ``folder`` is
    unusable. A file whose sum fails is never loaded."""
    from .config import ConfigError, validate
    from .folder import MANIFEST, NotAnExport, read_manifest, sum_mismatches
    stream = stream or sys.stdout
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            raise UserError(f"--verify {folder}: not a folder")
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"--verify {folder}: not a folder") from None
    except OSError as e:
        raise UserError(f"--verify {folder}: cannot read {e.filename}: {e.strerror}") from None
    try:
        manifest = read_manifest(folder)
        config = validate(manifest.get("config"))
        problems = sum_mismatches(folder, manifest)
    except NotAnExport as e:
        raise UserError(f"--verify {folder}: {e}") from None
    except ConfigError as e:
        raise UserError(f"--verify {folder}: the config in {MANIFEST} is invalid: {e}") from None
    except OSError as e:
        raise UserError(f"--verify {folder}: cannot read {e.filename}: {e.strerror}") from None
    from .artifacts import wanted
    require(config)
    listed, bad = manifest["sha256"], {p.split(":")[0] for p in problems}
    problems += [f"{a.name}: not listed in {MANIFEST}'s sha256 table" for a in wanted(config) if a.name not in listed]
    intact = [a for a in wanted(config) if a.name in listed and a.name not in bad]
    problems += manifest_problems(folder, manifest, config, intact)
    rows = _parity(folder, config, device, progress, {a.name for a in intact})
    from .parity import format_table
    print(format_table(rows), file=stream)
    problems += [f"{row.artifact}: parity on {row.runtime} {row.device} failed: {row.why()}" for row in rows
                 if not row.passed]
    for problem in problems:
        print(f"FAILED {problem}", file=stream)
    if problems:
        return 1
    print(f"verified {folder}: {len(manifest['sha256'])} files match {MANIFEST}, every field of it matches the "
          f"artifacts; all {len(rows)} parity checks passed", file=stream)
    return 0


def manifest_problems(folder: Path, manifest: Dict[str, Any], config: Dict[str, Any], intact) -> List[str]:
    """Every manifest field against what the config implies and against each artifact's embedded copy; each
    artifact's parameters, buffers and model options against the config's model."""
    import torch

    from .artifacts import build, describe
    problems = []
    expected = describe(config)
    fields = set(expected) | {"opset", "versions", "created"} | set(UNVERIFIABLE)
    problems += [f"manifest field {k!r} is not one this command writes" for k in sorted(set(manifest) - fields)]
    problems += [f"manifest field {k!r} is missing" for k in sorted(fields - set(manifest))]
    problems += [f"manifest field {k!r} does not follow from its config" for k in sorted(expected)
                 if k in manifest and manifest[k] != expected[k]]
    recorded = manifest.get("parity")
    if not (isinstance(recorded, list) and recorded and all(isinstance(r, dict) and r.get("passed") is True
                                                            for r in recorded)):
        problems.append("manifest field 'parity' does not record the passed checks an export installs with")
    eager = build(config)
    reference = eager.state_dict()
    for artifact in intact:
        path = folder / artifact.name
        try:
            embedded = artifact.metadata(path)
            loss, state = artifact.contents(path)
        except Exception as e:  # noqa: BLE001 - a file that does not load is a failed check
            problems.append(f"{artifact.name}: cannot be read ({type(e).__name__}: {str(e).strip()[:200]})")
            continue
        for key in sorted(set(manifest) - set(UNVERIFIABLE)):
            if embedded.get(key) != manifest[key]:
                problems.append(f"manifest field {key!r} differs from what {artifact.name} records")
        if loss is not None:
            for option in ("tau", "dt", "activation", "preact_noise", "postact_noise", "batch_first", "learn_alpha",
                           "init_state", "n_in", "n_hid", "n_out"):
                if getattr(loss.model, option) != getattr(eager.model, option):
                    problems.append(f"{artifact.name}: model option {option} is {getattr(loss.model, option)!r}, "
                                    f"the config gives {getattr(eager.model, option)!r}")
            if loss.active != eager.active:
                problems.append(f"{artifact.name}: active components {loss.active}, the config gives {eager.active}")
        for key, tensor in state.items():
            ref = reference.get(key if loss is not None else key.removeprefix("model."), reference.get(key))
            if loss is None and ref is None:
                continue  # a graph constant that is not a parameter or buffer of the loss
            if ref is None or ref.shape != tensor.shape or not torch.equal(ref.to(tensor.dtype), tensor):
                problems.append(f"{artifact.name}: {key} differs from the model its config builds")
        missing = set(reference) - set(state) if loss is not None else set()
        problems += [f"{artifact.name}: has no {key}" for key in sorted(missing)]
    return problems


def user_message(e: BaseException, out: str) -> Optional[str]:
    """The one line to print for an exception the user can fix; None for anything else (a bug)."""
    from .config import ConfigError
    from .install import InTheWay
    from .parity import is_out_of_memory
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    if isinstance(e, (UserError, InTheWay)):
        return str(e)
    if is_out_of_memory(e):
        return "out of memory while exporting; use smaller model.dims or example sizes, or a machine with more memory"
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or (
        isinstance(e, RuntimeError) and any(s in text for s in ("unexpected pos", "PytorchStreamWriter failed",
                                                               "No space left")))
    if full:
        return f"disk full: cannot write {getattr(e, 'filename', None) or out}; free some space or choose another --out"
    if isinstance(e, OSError):
        where = e.filename or out
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: cannot write {where} ({e.strerror})"
        return f"cannot write --out {out}: {where}: {e.strerror or e}"
    return None


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for any error."""


_terminated = False  # set by the handler: Python drops an exception raised in a weakref callback or __del__


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    raise _Terminated()


def _stop_if_terminated() -> None:
    """Raise :class:`_Terminated` if a SIGTERM came whose exception was lost (checked at each progress line and
    before the install)."""
    if _terminated:
        raise _Terminated()


def _report_terminated(prog: str) -> int:
    print(f"{prog}: terminated (SIGTERM); temporary files removed, --out holds a complete export or is unchanged",
          file=sys.stderr)
    return 128 + signal.SIGTERM


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would add the usage)
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(
        prog="rnnloss-export",
        description="Export RNNLoss and CTRNN (TorchScript, torch.export, ONNX, ExecuTorch, the native C++ file), "
                    "check parity with eager mode and install the artifacts atomically in --out. Exit 0: all checks "
                    "pass; 1: a parity (or --verify) check failed; 2: a problem you can fix, printed as one line; "
                    "3: a bug, with its traceback.")
    parser.add_argument("--config", help="JSON config (every key optional; docs/export.md lists them); the embedded "
                                         "default when absent")
    parser.add_argument("--out", help="output folder (default: artifacts)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where parity runs besides the CPU: cuda (required), auto (if present), cpu (only)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it holds an earlier, unmodified export of this command and nothing else")
    parser.add_argument("--keep-rejected", action="store_true",
                        help=f"keep a build that fails parity in OUT.rejected whatever its size (by default only up "
                             f"to {REJECTED_KEEP_BYTES >> 20} MiB)")
    parser.add_argument("--verify", metavar="DIR",
                        help="check an export folder instead: sums, every manifest field against the artifacts and "
                             "their config, loading, parity (exit 0 all hold, 1 not, 2 DIR unusable)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if args.out == "" or args.verify == "":
        parser.error("--out and --verify take a folder, got an empty name")
    if args.verify is not None and (args.config or args.out or args.force or args.keep_rejected):
        parser.error("--verify DIR takes no --config, --out, --force or --keep-rejected")
    out = args.out or "artifacts"
    prog = parser.prog

    def progress(line: str) -> None:
        _stop_if_terminated()
        if not args.quiet:
            print(f"{prog}: {line}", file=sys.stderr, flush=True)

    global _terminated
    _terminated = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        from . import config as config_mod
        config = None if args.verify is not None else config_mod.load(args.config)
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__}")
        if args.verify is not None:
            return verify(Path(args.verify), device=args.device, progress=progress)
        status = run(config, Path(out), force=args.force, device=args.device, keep_rejected=args.keep_rejected,
                     progress=progress)
        _stop_if_terminated()
        return status
    except _Terminated:
        return _report_terminated(prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; temporary files removed, --out holds a complete export or is unchanged",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into "user can fix" (exit 2) and bugs (exit 3)
        if _terminated:  # the SIGTERM's own exception was lost, e.g. inside a half-imported module
            return _report_terminated(prog)
        message = user_message(e, out)
        if message is None:
            traceback.print_exc()
            print(f"{prog}: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
            return 3
        print(f"{prog}: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
