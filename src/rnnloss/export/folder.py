"""What an export folder is, without torch: its file names, its manifest, the sums of its files.

The install (:mod:`.install`) and the CLI's first checks read only this; the registry of how each
artifact is written, loaded and checked is :mod:`.artifacts`.
"""
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

# Every file an export writes, in the order the export writes them; the manifest last.
FILES = ("rnn_loss.pt", "ctrnn_train.pt", "rnn_loss.pt2", "rnn_loss.onnx", "rnnloss_native.pt", "ctrnn.pte",
         "rnn_loss.pte", "ctrnn_train.pte", "manifest.json")
MANIFEST = "manifest.json"
GENERATOR = "rnnloss-export"  # manifest["generator"]: marks a folder this command wrote


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


def is_plain_file(path: Path, follow_links: bool = False) -> bool:
    """A regular file (not a link, unless ``follow_links``): anything else (a FIFO, a device) could block a
    reader forever. In an export folder a link is foreign; a loader given a path follows it."""
    try:
        return stat.S_ISREG((os.stat if follow_links else os.lstat)(path).st_mode)
    except OSError:
        return False


def read_manifest(folder: Path) -> Dict[str, Any]:
    """The folder's manifest, checked for the keys an export always has (raises NotAnExport)."""
    path = folder / MANIFEST
    if os.path.lexists(path) and not is_plain_file(path):
        raise NotAnExport(f"{path} is not a regular file")
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
            or not all(k in FILES and k != MANIFEST and isinstance(v, str) for k, v in sums.items())):
        # Only names this command writes: a hand-made manifest listing a user's file (thesis.tex)
        # must not make --force replace it.
        raise NotAnExport(f"{path} was not written by {GENERATOR} (no generator mark, or a sha256 table that "
                          "lists files it does not write)")
    return manifest


def check_sums(folder: Path, manifest: Dict[str, Any],
               names: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, str]]:
    """``(name, why)`` for each file of the manifest's sha256 table (or of ``names``, each listed there) that is
    "missing", "not a regular file" or "changed", in that order; one file is hashed per step, so a caller may
    stop early."""
    table = manifest["sha256"]
    for name in table if names is None else names:
        path = folder / name
        if not os.path.lexists(path):
            yield name, "missing"
        elif not is_plain_file(path):
            yield name, "not a regular file"
        elif sha256(path) != table[name]:
            yield name, "changed"


def sum_mismatches(folder: Path, manifest: Dict[str, Any]) -> List[str]:
    """The files listed in the manifest's sha256 table that are missing or differ, as messages."""
    text = {"missing": f"missing (listed in {MANIFEST})", "not a regular file": "not a regular file (not read)",
            "changed": f"sha256 differs from {MANIFEST} (the file changed after the export)"}
    return [f"{name}: {text[why]}" for name, why in check_sums(folder, manifest)]
