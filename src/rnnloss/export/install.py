"""Put a finished export folder in place of ``--out`` atomically, deleting nothing it did not write.

Rules (what ``rnnloss-export`` promises):

- ``--out`` is resolved through symlinks first. The export is installed at the resolved folder and
  the link itself is left as it is, so a symlinked ``--out`` obeys exactly the rules below for the
  folder it points to; a dangling link gets its target created. ``--out`` may not be the current
  folder or one above it (replacing it would pull the folder from under the shell).
- The user must be allowed to do all of it, which is checked before any work: create entries in
  the folder that holds the target (or in the nearest existing folder above, when folders are
  missing), rename the target there (a sticky folder such as ``/tmp`` lets only the owner of an
  entry rename it), read the earlier export to check it, and delete its files. Otherwise the
  target is :class:`InTheWay` too, naming the folder or file that refuses.
- Without ``--force`` the target must be missing or an empty folder. With ``--force`` it may also
  be an earlier export of this command: a ``manifest.json`` written by it, every other entry a
  plain file the manifest lists, and each of those unchanged since (its sha256 matches). Anything
  else — a file, a foreign entry, a modified artifact — is :class:`InTheWay`: the command stops
  before writing anything and names what is in the way.
- Atomic swap: the new export is built in a temporary folder beside the target (same file
  system) and swapped in with ``renameat2(RENAME_EXCHANGE)`` (Linux ≥ 3.15; ext4, xfs, btrfs,
  tmpfs, …), called through ctypes: one system call exchanges the two names, so at every instant
  the target is the complete old export or the complete new one. The old export then sits under
  the temporary name and is deleted. A missing or empty target is replaced by a plain
  ``rename``, atomic too. Chosen over "``--out`` as a symlink to versioned folders" because the
  target stays a real folder: nothing else (C++ ``rnnloss::load``, ``make cpp``, users'
  scripts, a user's own symlink) sees a change of kind, and no version folders accumulate.
  Where the exchange is not available (another OS, a file system without it) two renames are
  used: old aside, new in. If the process dies between them, the target is missing for that
  moment and the next run (or :func:`clean_leftovers`) renames the old export back.
- Temporary entries are named ``.NAME.rnnloss-PID-RANDOM.{lock,tmp,old}`` beside the target.
  The ``.lock`` file is created first and held with ``flock`` for the run's lifetime; the
  kernel drops the lock when the process dies, however it dies. The next run removes a set of
  entries only when it can take that lock *and* the PID in its name is not running — a
  concurrent live run holds its lock and is never touched. A set this user may not remove
  (another user's) is left alone; it blocks nothing, since every run has names of its own.
  (Without ``fcntl``, i.e. on Windows, leftovers are not removed automatically.)

``RNNLOSS_EXPORT_TEST_KILL_AT=<step>`` makes the process SIGKILL itself at that step of the
sequence (:data:`STEPS`); the test suite uses it to prove the guarantees above. It is read
nowhere else.
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
    """What is at ``real``: ``("free", "")`` (missing or empty folder), ``("export", "")`` (an
    earlier export, nothing else in it, unchanged), ``("blocked", why)`` or ``("unreadable", why)``
    (the user may not read what is there, so it cannot be checked)."""
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
    listed = manifest["sha256"]
    foreign = [e for e in entries if e != MANIFEST and (e not in listed or not is_plain_file(real / e))]
    if foreign:
        return "blocked", (f"{real} holds {_names(real, foreign)} besides the export its {MANIFEST} lists")
    # A listed artifact may be missing (nothing of the user's is lost then); the first changed one blocks.
    present = [e for e in entries if e != MANIFEST]
    try:
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
    """Whether sticky ``folder`` (like /tmp) keeps this user from renaming or deleting ``entry``:
    only the owner of the entry or of the folder (or root) may."""
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if euid == 0:
        return False
    st = os.stat(folder)
    return bool(st.st_mode & stat.S_ISVTX) and euid not in (st.st_uid, os.lstat(entry).st_uid)


def permission_problem(real: Path, kind: str) -> str:
    """Why this user may not install an export at ``real``, holding ``kind`` (see :func:`occupant`);
    empty when nothing stands in the way."""
    folder = existing_ancestor(real.parent)
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    why = _unwritable(folder)
    if why:
        if folder != real.parent:
            return f"cannot create {real.parent}: {why}"
        return f"{why} (the export is built beside {real.name} and renamed into place)"
    if os.path.lexists(real) and _sticky_refuses(real.parent, real):
        return (f"{real} belongs to another user and {real.parent} is sticky (like /tmp): only the owner may "
                "replace it")
    if kind == "export":
        why = _unwritable(real)
        if why:
            return f"cannot delete the earlier export: {why}"
        theirs = next((e for e in sorted(os.listdir(real)) if _sticky_refuses(real, real / e)), None)
        if theirs is not None:
            return f"cannot delete the earlier export: {real}/{theirs} belongs to another user and {real} is sticky"
    return ""


def check_target(real: Path, label: str, force: bool) -> str:
    """Raise InTheWay unless ``real`` may receive an export (see the module docstring); returns
    what is there, ``"free"`` or ``"export"``."""
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
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user
        return True
    return True


def clean_leftovers(real: Path) -> List[str]:
    """Remove the temporary entries of killed runs for the target ``real``; returns their names.

    An entry set ``.NAME.rnnloss-PID-RANDOM.*`` is removed only when its lock can be taken and
    PID is not running, and left when removing it fails. A dead run's ``.old`` (the fallback path
    died between its two renames) is renamed back to ``real`` when ``real`` is missing, so the
    old export returns.
    """
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
        lock = parent / f"{prefix}{tag}.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held: a live run after all
            old, tmp = parent / f"{prefix}{tag}.old", parent / f"{prefix}{tag}.tmp"
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
            continue  # this user may not remove it (another user's, say): it is left, and blocks nothing
        finally:
            if fd is not None:
                os.close(fd)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class Workspace:
    """This run's lock and temporary folder beside the target ``real`` (a context manager).

    Entering removes dead runs' leftovers, then creates and locks ``.lock`` and makes ``tmp``
    (the folder to write the export into). Leaving removes ``tmp`` and ``old`` if they still
    exist and then the lock, whether the run succeeded, failed or raised.
    """

    def __init__(self, real: Path, *, use_exchange: bool = True) -> None:
        self.real = real
        stem = f".{real.name}{_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        self.lock = real.parent / f"{stem}.lock"
        self.tmp = real.parent / f"{stem}.tmp"
        self.old = real.parent / f"{stem}.old"
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
                if os.path.lexists(path):
                    shutil.rmtree(path, ignore_errors=True)
        finally:
            if self._fd is not None:
                os.unlink(self.lock)
                os.close(self._fd)
                self._fd = None

    def size(self) -> int:
        """Bytes in the temporary folder (what a rejected build would keep)."""
        return sum(p.stat().st_size for p in self.tmp.iterdir() if p.is_file())

    def install(self, dest: Path, label: str, force: bool) -> None:
        """Make ``tmp`` the folder ``dest`` (checked again first; see the module docstring)."""
        kind = check_target(dest, label, force)
        if kind == "free":
            try:
                os.rename(self.tmp, dest)  # replaces an empty folder atomically
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise InTheWay(f"{label}: something appeared there during the export; nothing was changed") from None
                raise
            kill_point("swapped")
            return
        if self.use_exchange and exchange(self.tmp, dest):
            kill_point("swapped")
            old = self.tmp  # now the old export
        else:
            os.rename(dest, self.old)
            try:
                kill_point("aside")
                os.rename(self.tmp, dest)
            except BaseException:
                os.rename(self.old, dest)  # put the old one back before anything else
                raise
            kill_point("swapped")
            old = self.old
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
