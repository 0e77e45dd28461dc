"""Put a finished export folder in place of ``--out`` atomically, deleting nothing it did not write.

- ``--out`` is resolved through symlinks (the link stays; a dangling one gets its target created); the root, the
  current folder and folders above it are refused.
- The target must be missing or an empty folder; with ``--force`` also an earlier export of this command (its
  manifest plus only plain files it lists, each unchanged). Anything else, a mount point, or a permission the run
  will need (sticky folders such as /tmp included) is :class:`InTheWay`, before any work.
- The export is built beside the target and swapped in by ``renameat2(RENAME_EXCHANGE)``, so the target is at every
  instant the complete old or new export; the old one is then deleted, manifest first. Without the exchange: two
  renames (old aside, new in); a death between them is repaired by the next run. The target stays a real folder
  (not a link to versioned folders): nothing that reads it sees a change of kind.
- Temporary entries are ``.NAME.rnnloss-PID-RANDOM.{lock,tmp,old}``; the lock is held with ``flock`` while the run
  lives. The next run removes a set only when it can take the lock and PID is not running, so never a live run's;
  a set it may not remove is left and blocks nothing. Without ``fcntl`` (Windows) nothing is removed.
- ``RNNLOSS_EXPORT_TEST_KILL_AT=<step>`` SIGKILLs the process at that step of :data:`STEPS`, for the tests only.
"""
import ctypes
import errno
import os
import secrets
import shutil
import signal
import stat
from pathlib import Path
from typing import List, Optional, Tuple

from .folder import GENERATOR, MANIFEST, NotAnExport, Unreadable, check_sums, is_plain_file, read_manifest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

KILL_ENV = "RNNLOSS_EXPORT_TEST_KILL_AT"
# The install sequence in order; the fallback path adds "aside" between "checked" and "swapped".
STEPS = ("locked", "tmp-created", "written", "checked", "aside", "swapped", "old-partly-removed", "old-removed")
_TAG = ".rnnloss-"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def kill_point(step: str) -> None:
    """SIGKILL this process if the test hook asks for ``step`` (see the module docstring)."""
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class InTheWay(Exception):
    """``--out`` cannot be used; ``str()`` is one line naming the path and what is there."""


def resolve_out(out: Path) -> Path:
    """The real folder ``--out`` names (symlinks resolved), refused if it holds the cwd."""
    real = Path(os.path.realpath(out))
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:
        cwd = None
    if real.parent == real:
        raise InTheWay(f"--out {out} is the file system root")
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise InTheWay(f"--out {out} is the current folder or holds it; the export replaces --out as a whole, "
                       "so name a folder inside it (e.g. --out artifacts)")
    return real


def _names(folder: Path, entries: List[str]) -> str:
    shown = [e + ("/" if (folder / e).is_dir() and not (folder / e).is_symlink() else "") for e in entries[:5]]
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    return ", ".join(shown) + more


def occupant(real: Path) -> Tuple[str, str]:
    """What is at ``real``: ``("free", "")`` (missing or empty folder), ``("export", "")`` (an earlier, unchanged
    export and nothing else), ``("blocked", why)``, or ``("unreadable", why)`` (so it cannot be checked)."""
    if not os.path.lexists(real):
        return "free", ""
    if real.is_symlink():  # only a symlink loop survives realpath
        return "blocked", f"{real} is a symlink (a loop, or a link where a folder is needed)"
    if os.path.ismount(real):  # renaming it fails with EBUSY, but only at the very end
        return "blocked", f"{real} is a mount point, which cannot be replaced; name a folder inside it"
    if not real.is_dir():
        return "blocked", f"{real} is a file, not a folder"
    try:
        entries = sorted(os.listdir(real))
    except OSError as e:
        return "unreadable", f"cannot read {real}: {e.strerror}"
    if not entries:
        return "free", ""
    try:
        manifest = read_manifest(real)
    except Unreadable as e:
        return "unreadable", str(e)
    except NotAnExport as e:
        return "blocked", f"{real} holds {_names(real, entries)}: not an export of {GENERATOR} ({e})"
    present = [e for e in entries if e != MANIFEST]
    foreign = [e for e in present if e not in manifest["sha256"] or not is_plain_file(real / e)]
    if foreign:
        return "blocked", f"{real} holds {_names(real, foreign)} besides the export its {MANIFEST} lists"
    try:  # a listed artifact may be missing (nothing of the user's is lost then); the first changed one blocks
        changed = next((name for name, why in check_sums(real, manifest, present) if why == "changed"), None)
    except OSError as e:
        return "unreadable", f"cannot read {e.filename}: {e.strerror}, so it cannot be checked against {MANIFEST}"
    if changed is not None:
        return "blocked", f"{real}/{changed} changed after the export (its sha256 differs from {MANIFEST})"
    return "export", ""


def existing_ancestor(path: Path) -> Path:
    """``path`` itself or the nearest folder above it that exists (for this user: one it may see)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _unwritable(folder: Path) -> str:
    """Why this user may not create, rename or delete entries in ``folder``; empty when it may."""
    if os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return ""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        pass
    return f"no permission to write in {folder}"


def _sticky_refuses(folder: Path, entry: Path) -> bool:
    """Whether sticky ``folder`` (like /tmp) keeps this user from renaming or deleting ``entry``: only the owner
    of the entry or of the folder (or root) may."""
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if euid == 0:
        return False
    st = os.stat(folder)
    return bool(st.st_mode & stat.S_ISVTX) and euid not in (st.st_uid, os.lstat(entry).st_uid)


def permission_problem(real: Path, kind: str) -> str:
    """Why this user may not install an export at ``real``, holding ``kind`` (see :func:`occupant`); empty when
    nothing stands in the way."""
    folder = existing_ancestor(real.parent)
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    why = _unwritable(folder)
    if why:
        if folder != real.parent:
            return f"cannot create {real.parent}: {why}"
        return f"{why} (the export is built beside {real.name} and renamed into place)"
    if os.path.lexists(real) and _sticky_refuses(real.parent, real):
        return f"{real} belongs to another user and {real.parent} is sticky (like /tmp): only the owner may replace it"
    if kind == "export":
        why = _unwritable(real)
        if why:
            return f"cannot delete the earlier export: {why}"
        theirs = next((e for e in sorted(os.listdir(real)) if _sticky_refuses(real, real / e)), None)
        if theirs is not None:
            return f"cannot delete the earlier export: {real}/{theirs} belongs to another user and {real} is sticky"
    return ""


def check_target(real: Path, label: str, force: bool) -> str:
    """Raise InTheWay unless ``real`` may receive an export; returns what is there, ``"free"`` or ``"export"``."""
    kind, why = occupant(real)
    if kind == "blocked":
        raise InTheWay(f"{label}: {why}; nothing was changed (--force replaces only an empty folder "
                       "or an earlier, unmodified export)")
    if kind == "unreadable":
        raise InTheWay(f"{label}: {why}; nothing was changed")
    if kind == "export" and not force:
        raise InTheWay(f"{label} holds an earlier export; pass --force to replace it")
    why = permission_problem(real, kind)
    if why:
        raise InTheWay(f"{label}: {why}; nothing was changed")
    return kind


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no PID is that large
        return False
    except OSError:  # EPERM: a process of another user
        pass
    return True


def clean_leftovers(real: Path) -> List[str]:
    """Remove the temporary entries of dead runs (their lock free, their PID not running) for the target ``real``;
    returns their names. A dead run's ``.old`` (killed between the two renames) is renamed back to a missing
    ``real`` first, so the old export returns."""
    if fcntl is None:  # pragma: no cover
        return []
    parent, prefix = real.parent, f".{real.name}{_TAG}"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    tags = {n[len(prefix):].rsplit(".", 1)[0] for n in names if n.startswith(prefix) and "." in n[len(prefix):]}
    removed = []
    for tag in sorted(tags):
        pid = tag.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        lock, tmp, old = (parent / f"{prefix}{tag}.{ext}" for ext in ("lock", "tmp", "old"))
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while held: a live run after all
            if old.is_dir() and not os.path.lexists(real):
                os.rename(old, real)
            for path in (tmp, old):
                if os.path.lexists(path):
                    shutil.rmtree(path)
                    removed.append(path.name)
            if fd is not None:
                os.unlink(lock)
                removed.append(lock.name)
        except OSError:
            continue  # locked, or this user may not remove it (another user's, say): it is left, and blocks nothing
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False where the OS or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class Workspace:
    """This run's lock and temporary folder beside the target ``real`` (a context manager).

    Entering removes dead runs' leftovers, then creates and locks ``lock`` and makes ``tmp`` (where the export
    is written). Leaving removes ``tmp``, ``old`` and then the lock, however the run ended.
    """

    def __init__(self, real: Path, *, use_exchange: bool = True) -> None:
        self.real = real
        stem = real.parent / f".{real.name}{_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        self.lock, self.tmp, self.old = (Path(f"{stem}.{ext}") for ext in ("lock", "tmp", "old"))
        self.use_exchange = use_exchange
        self._fd: Optional[int] = None

    def __enter__(self) -> "Workspace":
        clean_leftovers(self.real)
        self._fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kill_point("locked")
            os.mkdir(self.tmp, 0o777)  # the umask applies, as for any folder the user makes
        except BaseException:
            self.__exit__()
            raise
        kill_point("tmp-created")
        return self

    def __exit__(self, *exc) -> None:
        try:
            for path in (self.tmp, self.old):
                shutil.rmtree(path, ignore_errors=True)  # quiet when it is gone: installed, or never made
        finally:
            if self._fd is not None:
                os.unlink(self.lock)
                os.close(self._fd)
                self._fd = None

    def install(self, dest: Path, label: str, force: bool) -> None:
        """Make ``tmp`` the folder ``dest``, checked again first (see the module docstring)."""
        kind = check_target(dest, label, force)
        old = None
        if kind == "free":
            try:
                os.rename(self.tmp, dest)  # replaces an empty folder atomically
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise InTheWay(f"{label}: something appeared there during the export; nothing was changed") \
                        from None
                raise
        elif self.use_exchange and exchange(self.tmp, dest):
            old = self.tmp  # now the old export
        else:
            os.rename(dest, self.old)
            try:
                kill_point("aside")
                os.rename(self.tmp, dest)
            except BaseException:
                os.rename(self.old, dest)  # put the old one back before anything else
                raise
            old = self.old
        kill_point("swapped")
        if old is None:
            return
        try:
            self._remove(old)
        except OSError as e:  # checked before, so only if its permissions changed during the run
            raise InTheWay(f"{label}: the new export is in place, but the earlier one could not be deleted "
                           f"({e.filename}: {e.strerror}); it is left in {old}") from None
        kill_point("old-removed")

    @staticmethod
    def _remove(folder: Path) -> None:
        # The manifest first: a half-removed folder is then no longer taken for an export.
        if (folder / MANIFEST).exists():
            os.unlink(folder / MANIFEST)
        kill_point("old-partly-removed")
        shutil.rmtree(folder)
