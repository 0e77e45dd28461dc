"""The export command run by a user whom file permissions apply to, not by root.

Root reads, writes and deletes whatever it likes, so a suite run as root (containers, CI) never
meets a permission error. Each test here sets files up as root, then runs the command in a child
process that gives up root for an unprivileged uid (``nobody``) with ``setgroups``/``setgid``/
``setuid`` before it calls ``export.main``: from then on the kernel checks every file access as
it would for that user. The child imports the package first, as root, because the interpreter
may live where that user cannot read (a pyenv under ``/root``); a run that got past the checks
these tests expect would then fail on a lazy import, which fails the test as well.

Skipped, with the reason, when the suite does not run as root, when the uid cannot be switched,
or when the switched process may still write a root-owned folder.
"""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from cases import child_env, names, one_line, write_fake_export

pytestmark = [pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                 reason="needs root, to switch to an unprivileged uid (root itself ignores file "
                                        "permissions)"),
              pytest.mark.slow]  # each test runs the command in a child process that imports torch: 3-4 s

DENIED = os.strerror(errno.EACCES)
SKIP = 77
CHILD = textwrap.dedent("""
    import os, sys
    import torch  # imported as root: the interpreter may live where the user cannot read
    from rnnloss.export import artifacts, cli, config, install, native, parity
    config.default_config()  # read (and cached) as root: the checkout may be private to root (mktemp -d)
    uid, gid, area = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        print(f"cannot switch to uid {uid}: {e}")
        sys.exit(77)
    try:
        os.listdir(area)
    except OSError as e:
        print(f"uid {uid} cannot reach the test folder {area}: {e}")
        sys.exit(77)
    try:
        os.mkdir(os.path.join(area, "probe"))
    except PermissionError:
        pass
    else:
        print(f"uid {uid} may still write a root-owned folder of mode 0755")
        sys.exit(77)
    sys.exit(cli.main(sys.argv[4:]))
""")


def unprivileged():
    """(uid, gid) of ``nobody``, or 65534 where no such user is listed."""
    import pwd
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


USER, GROUP = unprivileged()


@pytest.fixture
def area():
    """A root-owned folder of mode 0755 the user can enter but not write (pytest's tmp_path lies
    under a folder of mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="rnnloss-perm-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def run_as_user(area, *args):
    """``rnnloss-export ARGS`` from ``area`` as the unprivileged user; returns (status, stderr)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(USER), str(GROUP), str(area), *args], cwd=area,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    if proc.returncode == SKIP:
        pytest.skip(proc.stdout.strip())
    return proc.returncode, proc.stderr


def snapshot(folder):
    """Every entry under ``folder``: its mode, owner and, for a file, the sha256 of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, folder)] = (st.st_mode, st.st_uid, digest)
    return out


def make(path, mode, owner=0):
    path.mkdir()
    os.chown(path, owner, GROUP if owner else 0)
    os.chmod(path, mode)  # after chown, which may clear a sticky bit
    return path


def test_an_unreadable_config_exits_2_naming_it(area):
    (area / "c.json").write_text("{}")
    os.chmod(area / "c.json", 0o600)  # root's
    status, err = run_as_user(area, "--config", "c.json", "--out", "out", "--device", "cpu")
    line = one_line(err)
    assert status == 2 and f"cannot read c.json: {DENIED}" in line, line
    assert sorted(os.listdir(area)) == ["c.json"]


@pytest.mark.parametrize("out", ["shared/out", "shared/new/deeper/out"], ids=["out", "out-under-missing-folders"])
def test_out_in_a_folder_the_user_cannot_write_exits_2_naming_it_and_creates_nothing(out, area):
    shared = make(area / "shared", 0o755)
    before = snapshot(area)
    status, err = run_as_user(area, "--out", out, "--device", "cpu")
    line = one_line(err)
    assert status == 2 and names(line, shared) and "write" in line, line
    assert snapshot(area) == before


def folder_not_writable(area):
    """The export lies in a folder of root's: the user may not rename anything in it."""
    out = make(area / "shared", 0o755) / "out"
    write_fake_export(out)
    return out, out.parent, "write"


def export_folder_not_writable(area):
    """The user's folder holds an export of root's, whose files the user may not delete."""
    out = make(area / "mine", 0o755, owner=USER) / "out"
    write_fake_export(out)
    return out, out, "delete"


def sticky_folder(area):
    """Like /tmp: anyone may write in it, but only an entry's owner may rename or delete it. The
    export's folder is writable by anyone, so only the sticky rule stands in the way."""
    out = make(area / "tmp", 0o1777) / "out"
    write_fake_export(out)
    os.chmod(out, 0o777)
    return out, out, "sticky"


def unreadable_artifact(area):
    """The user's folder and export, but one file of it is root's, mode 0600: it cannot be
    checked against the manifest."""
    out = make(area / "mine", 0o755, owner=USER) / "out"
    write_fake_export(out)
    for path in (out, out / "manifest.json", out / "rnn_loss.onnx"):
        os.chown(path, USER, GROUP)
    os.chmod(out / "rnn_loss.pt", 0o600)
    return out, out / "rnn_loss.pt", "cannot read"


@pytest.mark.parametrize("setup", [folder_not_writable, export_folder_not_writable, sticky_folder,
                                   unreadable_artifact], ids=lambda f: f.__name__)
def test_force_over_an_export_the_user_may_not_replace_exits_2_and_leaves_it_untouched(setup, area):
    out, named, problem = setup(area)
    before = snapshot(area)
    status, err = run_as_user(area, "--out", os.path.relpath(out, area), "--force", "--device", "cpu")
    line = one_line(err)
    assert status == 2 and names(line, named) and problem in line, line
    assert snapshot(area) == before  # every file's bytes, mode and owner; no temporary entry left


def export_with_an_unreadable_artifact(area):
    """rnn_loss.pt is root's, mode 0600."""
    os.chmod(area / "artifacts" / "rnn_loss.pt", 0o600)
    return "artifacts", Path("artifacts") / "rnn_loss.pt"


def export_in_a_folder_the_user_cannot_enter(area):
    """The export's folder lies in a folder of root's, mode 0700."""
    make(area / "private", 0o700)
    os.rename(area / "artifacts", area / "private" / "artifacts")
    return "private/artifacts", Path("private") / "artifacts"


@pytest.mark.parametrize("setup", [export_with_an_unreadable_artifact, export_in_a_folder_the_user_cannot_enter],
                         ids=lambda f: f.__name__)
def test_verify_of_an_export_the_user_may_not_read_exits_2_naming_the_path(setup, area):
    # A manifest with a valid config, so that --verify gets as far as reading the artifacts.
    write_fake_export(area / "artifacts")
    manifest = area / "artifacts" / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), config={})))
    folder, named = setup(area)
    before = snapshot(area)
    status, err = run_as_user(area, "--verify", folder)
    line = one_line(err)
    assert status == 2 and f"cannot read {named}: {DENIED}" in line, line
    assert snapshot(area) == before
