"""CLI conventions (issue 12 item 5): every command's --help ends with an example, every option
has help text, progress goes to stderr (plain lines when stderr is not a terminal), --quiet
silences it. In-process through click's CliRunner (stderr there is not a terminal)."""
from __future__ import annotations

import os
import re
import shlex

import click
import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import UsageError
from helpers_engine import make_full_run


def _walk(cmd, path):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], path + [name])


COMMANDS = list(_walk(main, ["ckptreg"]))
IDS = [" ".join(p) for p, _ in COMMANDS]


def test_the_walk_sees_every_command():
    names = {p[-1] for p, _ in COMMANDS}
    assert {"ckptreg", "add", "ls", "merge", "sweep", "weights", "leaderboard", "demo"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_every_option_has_help(path, cmd):
    bare = [p.opts[-1] for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert bare == [], f"{' '.join(path)}: options without help text: {bare}"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_every_help_ends_with_an_example(path, cmd, tmp_path, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(main, path[1:] + ["--help"])
    assert r.exit_code == 0, r.output
    lines = r.output.rstrip().splitlines()
    # the last paragraph is the example block: an "Example:" heading, then command lines
    tail = []
    for line in reversed(lines):
        if not line.strip():
            break
        tail.insert(0, line)
    assert tail and tail[0].strip() == "Example:", f"{' '.join(path)} --help ends with {lines[-3:]}"
    examples = [x.strip() for x in tail[1:]]
    assert examples and all(x.startswith("ckptreg ") for x in examples), examples
    if len(path) > 1:
        assert any(shlex.split(x)[1] == path[1] for x in examples), (path, examples)
    # every example parses: its subcommand exists and takes those options and values
    monkeypatch.chdir(tmp_path)
    os.mkdir("out")   # `scan out/` wants an existing folder
    for x in examples:
        args = shlex.split(x)[1:]
        sub = main.commands[args[0]]
        sub.make_context(args[0], args[1:], parent=click.Context(main, info_name="ckptreg"))


# ------------------------------------------------------------------------------------- progress

U = r"[\d.]+ (?:B|kB|MB|GB)"
LINE = re.compile(rf"^merging \S+: +\d+\.\d% {U}/[\d.]+ MB {U}/s (eta \d+s|[\d.]+s)$")


@pytest.fixture
def big_run(tmp_path):
    # ~2.2 MB a checkpoint, so byte counts read in MB
    make_full_run(tmp_path, steps=(100, 200, 300), d=256)
    return str(tmp_path / "reg.duckdb"), tmp_path


def test_merge_progress_lines_when_stderr_is_not_a_terminal(big_run):
    db, tmp = big_run
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "full", "--last", "3", "-o", str(tmp / "m1")],
                           env={"CKPTREG_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("merging ")]
    assert len(lines) >= 3, r.stderr
    for x in lines:
        assert LINE.match(x), x
    assert re.search(r" 100\.0% [\d.]+ MB/[\d.]+ MB [\d.]+ [MG]B/s [\d.]+s$", lines[-1]), lines[-1]
    pct = [float(x.split()[2].rstrip("%")) for x in lines]
    assert pct == sorted(pct) and pct[-1] == 100.0, pct
    # no terminal control sequences (a rich bar) in a log
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr
    assert r.stdout.strip().split("\t")[0].isdigit()   # stdout keeps only the result


def test_merge_progress_default_interval_prints_the_end_once(big_run):
    db, tmp = big_run
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "full", "--last", "3", "-o", str(tmp / "m2")])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("merging ")]
    # a merge shorter than the 5 s interval: one line, its end
    assert len(lines) == 1 and LINE.match(lines[0]) and " 100.0% " in lines[0], r.stderr


def test_quiet_silences_progress(big_run):
    db, tmp = big_run
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "full", "--last", "3", "-o", str(tmp / "m3"), "-q"],
                           env={"CKPTREG_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "full", "--last", "2,3", "--method", "uniform",
                                  "-o", str(tmp / "sw"), "--quiet"], env={"CKPTREG_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr


def test_sweep_progress_lines(big_run):
    db, tmp = big_run
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "full", "--last", "2,3", "--method", "uniform",
                                  "-o", str(tmp / "sw")], env={"CKPTREG_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("sweep: ")]
    assert lines, r.stderr
    assert all(re.search(r"\d+\.\d% .* [kMG]?B/s", x) for x in lines), lines
    assert " 100.0% " in lines[-1]


def test_bad_progress_interval_is_a_usage_error(big_run):
    db, tmp = big_run
    out = tmp / "m4"
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "full", "--last", "3", "-o", str(out)],
                           env={"CKPTREG_PROGRESS_INTERVAL": "soon"})
    assert r.exit_code == UsageError.exit_code == 2
    assert "error: CKPTREG_PROGRESS_INTERVAL='soon' is not a number of seconds >= 0" in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------- exit codes

def test_usage_errors_exit_2(tmp_path):
    db = str(tmp_path / "r.duckdb")
    r = CliRunner().invoke(main, ["--db", db, "merge", "--no-such-option"])   # click's own usage error
    assert r.exit_code == 2 and "No such option" in r.output
    r = CliRunner().invoke(main, ["--db", db, "leaderboard", "--run", "r", "--score", "gsm8k=abc"])
    assert r.exit_code == UsageError.exit_code == 2   # ckptreg's UsageError
    assert "error: score weight for 'gsm8k' is not a number: 'abc'" in r.stderr


def test_format_error_exit_code_differs_from_usage_error(tmp_path):
    from ckptreg.errors import FormatError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = CliRunner().invoke(main, ["--db", str(tmp_path / "r.duckdb"), "add", str(bad), "--run", "r", "--step", "1"])
    assert r.exit_code == FormatError.exit_code, r.output
    assert FormatError.exit_code not in (0, 1, 2) and r.exit_code != UsageError.exit_code
