"""Disk and permission faults at a run's start: a read-only run directory, a file where the run directory
should be, a run directory on a full disk. Each gives one line on stderr and exit code 2 (the place cannot
hold a run) or 4 (no room), and leaves nothing half-written: a new run leaves no directory, an existing
run's files keep their bytes (its lock file's included).

The faults are real: a read-only bind mount (root ignores permission bits) and a small, filled tmpfs,
mounted for the test and unmounted after it; where mounting is not allowed those tests skip, saying so.
The runs are the tiny supervised runs of test_run_lock.py. A few seconds.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mtrl_arch.cli import main
from test_run_lock import CONFIG, cache, files, finished, tiny  # noqa: F401 (cache, finished: fixtures)


@pytest.fixture
def mount():
    """``mount(*args, target)``: mount for this test (skips where mounting is not allowed); unmounted after."""
    done: list[Path] = []

    def do(*args: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount here ({r.stderr.strip() or r.returncode}); this fault needs root with "
                        "CAP_SYS_ADMIN (as on the project's CI machines)")
        done.append(target)

    yield do
    for t in reversed(done):
        subprocess.run(["umount", str(t)], check=True)


def one_line(capsys, argv: list[str], code: int, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_read_only_run_directory(finished, tmp_path, mount, capsys, cache):
    ro = tmp_path / "ro"
    shutil.copytree(finished, ro / "run")
    mount("--bind", "-o", "ro", str(ro), target=ro)
    run = ro / "run"
    before = files(run)
    for extra in ([], ["train.epochs=2"]):  # a plain resume, and one whose override would rewrite config.yaml
        one_line(capsys, ["train", "--no-progress", "--resume", str(run), *extra], 2,
                 f"cannot write to run directory {run} (Read-only file system)", "give another run_dir")
    assert files(run) == before
    one_line(capsys, ["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={ro / 'new' / 'run'}"], 2,
             "(Read-only file system)")
    assert sorted(p.name for p in ro.iterdir()) == ["run"]
    assert main(["arch", str(run)]) == 0  # readers need no write


def test_a_file_where_the_run_directory_should_be(tmp_path, capsys, cache):
    f = tmp_path / "taken"
    f.write_text("someone's notes\n")
    for run_dir in (f, f / "run"):
        one_line(capsys, ["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={run_dir}"], 2,
                 f"run directory {run_dir}: {f} is a file, not a directory; give another run_dir")
    one_line(capsys, ["train", "--no-progress", "--resume", str(f)], 2, "is not a run directory")
    assert f.read_text() == "someone's notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\1" * 65536)
                out.flush()
        except OSError as e:
            assert e.errno == 28  # ENOSPC


def test_full_disk(finished, tmp_path, mount, capsys, cache):
    disk = tmp_path / "disk"
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", target=disk)
    run = disk / "run"
    shutil.copytree(finished, run)
    _fill(disk)
    before = files(run)
    for extra in ([], ["train.epochs=2"]):
        one_line(capsys, ["train", "--no-progress", "--resume", str(run), *extra], 4,
                 f"in run directory {run} (No space left on device); nothing was left half-written")
    assert files(run) == before
    one_line(capsys, ["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={disk / 'new'}"], 4,
             "(No space left on device)")
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "run"]
    (disk / "filler").unlink()  # room again: the same resume goes on from the intact files
    assert main(["train", "--no-progress", "--resume", str(run), "train.epochs=2"]) == 0
