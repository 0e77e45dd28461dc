"""What --out may receive and replace, and the atomic swap, on fake artifacts (cases.use_fakes): --force replaces
only an empty folder or an earlier, unmodified export; anything else is exit 2, one line naming what is in the
way, and nothing touched."""
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cases import MANIFEST, ROOT, TMPFS, child_env, fake_write, leftovers, marker_of, names, one_line, tree, \
    use_fakes, write_fake_export
from rnnloss.export import cli, install


def occupied_cwd(tmp_path):
    (tmp_path / "thesis.tex").write_text("chapter 1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("1,2")
    return tmp_path, ".", "current folder"


def home_like(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH")
    (home / "Documents").mkdir()
    (home / "Documents" / "notes.txt").write_text("notes")
    return tmp_path, "home", ".bashrc, Documents/"


def symlink_to_user_folder(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "my_notes.txt").write_text("mine")
    (tmp_path / "out").symlink_to(target)
    return tmp_path, "out", "my_notes.txt"


def a_file(tmp_path):
    (tmp_path / "out.txt").write_text("a file")
    return tmp_path, "out.txt", "is a file, not a folder"


def export_plus_a_note(tmp_path):
    write_fake_export(tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return tmp_path, "out", "notes.txt besides the export"


def modified_export(tmp_path):
    write_fake_export(tmp_path / "out")
    (tmp_path / "out" / "rnn_loss.pt").write_text("retrained by hand")
    return tmp_path, "out", "rnn_loss.pt changed after the export"


def export_in_a_subfolder(tmp_path):
    write_fake_export(tmp_path / "out")
    write_fake_export(tmp_path / "out" / "nested")
    return tmp_path, "out", "nested/"


def forged_manifest_listing_a_user_file(tmp_path):
    folder = tmp_path / "forged"
    folder.mkdir()
    (folder / "thesis.tex").write_text("my thesis")
    digest = hashlib.sha256(b"my thesis").hexdigest()
    (folder / MANIFEST).write_text(json.dumps({"component_names": [], "sha256": {"thesis.tex": digest}}))
    return tmp_path, "forged", "thesis.tex"


def symlink_loop(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "out")
    return tmp_path, "out", "is a symlink"


IN_THE_WAY = [occupied_cwd, home_like, symlink_to_user_folder, a_file, export_plus_a_note, modified_export,
              export_in_a_subfolder, forged_manifest_listing_a_user_file, symlink_loop]


@pytest.mark.parametrize("setup", IN_THE_WAY, ids=lambda f: f.__name__)
def test_force_refuses_anything_but_an_earlier_export_and_touches_nothing(setup, tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    cwd, out, named = setup(tmp_path)
    before = tree(tmp_path)
    status, _, err = run_cli(["--out", out, "--force", "--device", "cpu"], cwd)
    assert status == 2
    assert named in one_line(err)
    assert tree(tmp_path) == before


def test_the_file_system_root_is_refused(tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    status, _, err = run_cli(["--out", "/", "--force", "--device", "cpu"], tmp_path)
    assert status == 2 and "--out / is the file system root" in one_line(err)


@TMPFS
@pytest.mark.parametrize("content", ["empty", "earlier_export"])
def test_a_mount_point_as_out_is_refused_up_front(content, tmp_path):
    # A tmpfs mounted in a private mount namespace: renaming a mount point fails (EBUSY), so the command must
    # refuse before any work, even when the mount holds nothing or an earlier export.
    disk = tmp_path / "disk"
    disk.mkdir()
    write_fake_export(tmp_path / "earlier")
    fill = "" if content == "empty" else f"cp -a {tmp_path / 'earlier'}/. {disk}/ && "
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} || exit 99; {fill}"
              f"ls -A {disk} > before; "
              f"{sys.executable} {ROOT / 'export' / 'export.py'} --out {disk} --force --device cpu 2>err; "
              "echo $? > status; "
              f"ls -A {disk} > after; ls -A {tmp_path} > beside")
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=tmp_path, timeout=120, env=child_env())
    assert (tmp_path / "status").read_text().split() == ["2"]
    line = one_line((tmp_path / "err").read_text())
    assert f"{disk} is a mount point, which cannot be replaced; name a folder inside it" in line, line
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
    assert not [n for n in (tmp_path / "beside").read_text().split() if ".rnnloss-" in n]


def test_an_earlier_export_needs_force(tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    before = write_fake_export(tmp_path / "out")
    status, _, err = run_cli(["--out", "out"], tmp_path)
    assert status == 2 and "holds an earlier export; pass --force" in one_line(err)
    assert tree(tmp_path / "out") == before


@pytest.mark.parametrize("use_exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_an_earlier_export_and_leaves_no_temporary_entries(use_exchange, tmp_path, monkeypatch, capsys):
    from rnnloss.export.config import validate
    use_fakes(monkeypatch)
    write_fake_export(tmp_path / "out")
    assert cli.run(validate({}), tmp_path / "out", force=True, device="cpu", use_exchange=use_exchange) == 0
    assert marker_of(tmp_path / "out") == "new" and install.occupant(tmp_path / "out")[0] == "export"
    assert leftovers(tmp_path) == []
    assert "all 1 parity checks passed" in capsys.readouterr().out


def test_a_symlinked_out_installs_at_its_target_and_keeps_the_link(tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    target = tmp_path / "store" / "v1"
    write_fake_export(target)
    (tmp_path / "out").symlink_to(target)
    status, _, _ = run_cli(["--out", "out", "--force", "--device", "cpu"], tmp_path)
    assert status == 0
    assert (tmp_path / "out").is_symlink() and os.readlink(tmp_path / "out") == str(target)
    assert marker_of(target) == "new"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "store") == []


def test_an_empty_folder_and_a_dangling_link_receive_the_export(tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "not_yet")
    for out in ("empty", "link"):
        status, _, err = run_cli(["--out", out, "--device", "cpu"], tmp_path)
        assert status == 0, err
    assert marker_of(tmp_path / "empty") == "new" and marker_of(tmp_path / "not_yet") == "new"
    assert (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("limit, keep, kept", [(64 << 20, False, True), (0, False, False), (0, True, True)],
                         ids=["small-kept", "large-not-kept", "large-kept-when-asked"])
def test_failed_parity_exits_1_keeps_the_previous_export_and_the_rejected_build_by_policy(
        limit, keep, kept, tmp_path, run_cli, monkeypatch):
    use_fakes(monkeypatch, passed=False)
    monkeypatch.setattr(cli, "REJECTED_KEEP_BYTES", limit)
    before = write_fake_export(tmp_path / "out")
    args = ["--out", "out", "--force", "--device", "cpu"] + (["--keep-rejected"] if keep else [])
    status, out, _ = run_cli(args, tmp_path)
    assert status == 1 and "parity FAILED: out left unchanged" in out
    assert tree(tmp_path / "out") == before
    assert (tmp_path / "out.rejected").exists() == kept
    assert ("pass --keep-rejected" in out) == (not kept)
    if kept:
        assert marker_of(tmp_path / "out.rejected") == "new"
    assert leftovers(tmp_path) == []


def test_an_earlier_export_that_cannot_be_deleted_after_the_swap_is_named_and_blocks_no_later_run(
        tmp_path, run_cli, monkeypatch):
    # The swap re-checks that the earlier export may be deleted; should deleting it fail even so (its permissions
    # changed in between), the line says where it is, and later runs go on.
    use_fakes(monkeypatch)
    old = write_fake_export(tmp_path / "out")
    stuck = []

    def refuse(folder):
        stuck.append(folder)
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / MANIFEST))
    rmtree = shutil.rmtree

    def rmtree_sparing_stuck(path, ignore_errors=False, **kwargs):
        if os.fspath(path) not in map(os.fspath, stuck):
            return rmtree(path, ignore_errors=ignore_errors, **kwargs)
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    remove = install.Workspace.__dict__["_remove"]  # the staticmethod itself
    monkeypatch.setattr(install.Workspace, "_remove", staticmethod(refuse))
    monkeypatch.setattr(shutil, "rmtree", rmtree_sparing_stuck)
    status, _, err = run_cli(["--out", "out", "--force", "--device", "cpu", "--quiet"], tmp_path)
    assert status == 2 and names(one_line(err), stuck[0]), err
    assert marker_of(tmp_path / "out") == "new" and tree(stuck[0]) == old
    # As left by a run that has ended (this process is still running, so its own are skipped):
    ended = subprocess.Popen(["true"])
    ended.wait()
    pid = re.search(r"rnnloss-(\d+)-", stuck[0].name).group(1)
    stuck.append(stuck[0].rename(stuck[0].with_name(stuck[0].name.replace(f"-{pid}-", f"-{ended.pid}-"))))
    monkeypatch.setattr(install.Workspace, "_remove", remove)
    monkeypatch.setattr(cli, "write_all", fake_write("newer"))
    status, _, err = run_cli(["--out", "out", "--force", "--device", "cpu", "--quiet"], tmp_path)
    assert status == 0, err
    assert marker_of(tmp_path / "out") == "newer" and leftovers(tmp_path) == [stuck[-1].name]


def test_a_leftover_named_with_an_impossible_pid_is_cleaned_not_a_crash(tmp_path, run_cli, monkeypatch):
    # clean_leftovers asks whether the PID in a leftover's name runs; a PID beyond any process is not running.
    use_fakes(monkeypatch)
    (tmp_path / ".out.rnnloss-99999999999999999999-ab.tmp").mkdir()
    status, _, err = run_cli(["--out", "out", "--force"], tmp_path)
    assert status == 0, err
    assert not (tmp_path / ".out.rnnloss-99999999999999999999-ab.tmp").exists()
