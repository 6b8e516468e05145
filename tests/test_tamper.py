"""Issue #9 item 13: the cheap check's blind spot. ``ckptreg verify`` (cheap) samples windows, so
one byte changed in the middle of a big tensor, mtime restored with os.utime, used to pass; the
inode change time (st_ctime) recorded at add cannot be set back by a user, so the cheap check now
reports such a file as changed (or, with a recorded full hash, compares that)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from helpers_files import write_peft_adapter
from safetensors.torch import save_file

from ckptreg.cli import main
from ckptreg.errors import ChangedError
from ckptreg.registry import Registry

HINT = "chmod/chown also move it"


@pytest.fixture
def cli(db_path):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["--db", str(db_path), *map(str, args)])

    return run


def _big(path, seed=0):
    """A real 6 MiB tensor file (1536 x 1024 float32)."""
    g = torch.Generator().manual_seed(seed)
    save_file({"big.weight": torch.randn(1536, 1024, generator=g)}, str(path))
    return path


def _flip_middle_byte(path):
    """XOR one byte in the middle of the file, same size, atime/mtime restored."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_cheap_verify_catches_one_middle_byte_with_mtime_restored(cli, db_path, tmp_path):
    m = _big(tmp_path / "step-1.safetensors")
    assert cli("add", m, "--run", "r").exit_code == 0
    assert cli("verify").exit_code == 0                    # right after add: ok
    before = Registry(db_path).dump()
    _flip_middle_byte(m)
    r = cli("verify", "--json")
    assert r.exit_code == 10, r.output
    row = json.loads(r.stdout)[0]
    assert row["status"] == "changed" and str(m.resolve()) in row["detail"]
    assert "inode change time moved since registration" in row["detail"] and HINT in row["detail"]
    r = cli("verify")
    assert r.exit_code == 10 and str(m.resolve()) in r.output
    with pytest.raises(ChangedError, match="inode change time moved"):   # a merge refuses it too
        Registry(db_path).check_unchanged("r@1")
    assert Registry(db_path).dump() == before               # the check records nothing


def test_full_hash_decides_when_ctime_moved(cli, db_path, tmp_path):
    m = _big(tmp_path / "step-1.safetensors", seed=1)
    assert cli("add", m, "--run", "r", "--full-hash").exit_code == 0
    _flip_middle_byte(m)
    _flip_middle_byte(m)                                   # content restored, ctime moved
    r = cli("verify", "--json")
    assert r.exit_code == 0, r.output
    assert "full hash matches" in json.loads(r.stdout)[0]["detail"]
    Registry(db_path).check_unchanged("r@1")
    _flip_middle_byte(m)                                   # now really changed
    r = cli("verify", "--json")
    assert r.exit_code == 10, r.output
    row = json.loads(r.stdout)[0]
    assert "content changed since its full hash was recorded" in row["detail"]
    assert str(m.resolve()) in row["detail"]


def test_chmod_alone_is_reported_with_the_hint_and_add_replace_clears_it(cli, db_path, tmp_path):
    m = _big(tmp_path / "step-1.safetensors", seed=2)
    assert cli("add", m, "--run", "r").exit_code == 0
    os.chmod(m, 0o600)
    r = cli("verify")
    assert r.exit_code == 10 and HINT in r.output and str(m.resolve()) in r.output
    assert cli("add", m, "--run", "r").exit_code == 0      # a plain re-add blesses nothing
    assert cli("verify").exit_code == 10
    r = cli("add", m, "--run", "r", "--replace")           # the user vouches: stats recorded again
    assert r.exit_code == 0, r.output
    assert cli("verify").exit_code == 0
    assert Registry(db_path).get("r@1").id == 1


def test_old_rows_without_ctime_keep_the_old_behaviour(cli, db_path, tmp_path):
    import duckdb

    m = _big(tmp_path / "step-1.safetensors", seed=3)
    assert cli("add", m, "--run", "r").exit_code == 0
    con = duckdb.connect(str(db_path))                     # a row written before ctime_ns existed
    files = json.loads(con.execute("SELECT files FROM checkpoints").fetchone()[0])
    assert {"ctime_ns", "ino", "dev"} <= set(files[0])
    for f in files:
        for k in ("ctime_ns", "ino", "dev"):
            f.pop(k)
    con.execute("UPDATE checkpoints SET files = ?", [json.dumps(files)])
    con.close()
    os.chmod(m, 0o600)
    assert cli("verify").exit_code == 0


def test_legitimate_flows_stay_ok(cli, db_path, tmp_path):
    """add -> verify, merge (check_unchanged of the inputs), verify of the output, --overwrite
    of the output (re-registered with new stats), rm --delete-files of an unchanged checkpoint."""
    for s in (1, 2, 3):
        assert cli("add", write_peft_adapter(tmp_path / "run" / f"checkpoint-{s}", s), "--run", "sft").exit_code == 0
    assert cli("verify").exit_code == 0
    out = tmp_path / "merged"
    r = cli("merge", "--run", "sft", "--last", 2, "-q", "--name", "m1", "-o", out)
    assert r.exit_code == 0, r.output
    r = cli("verify", "--json")
    assert r.exit_code == 0 and {x["status"] for x in json.loads(r.stdout)} == {"ok"}, r.output
    r = cli("merge", "--run", "sft", "--last", 3, "-q", "--name", "m1", "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    r = cli("verify", "--json")
    assert r.exit_code == 0 and {x["status"] for x in json.loads(r.stdout)} == {"ok"}, r.output
    other = write_peft_adapter(tmp_path / "other" / "checkpoint-9", 9)
    assert cli("add", other, "--run", "other").exit_code == 0
    r = cli("rm", "--delete-files", "other@9")
    assert r.exit_code == 0, r.output
    assert not (other / "adapter_model.safetensors").exists()
    assert cli("verify").exit_code == 0
