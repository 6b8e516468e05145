"""Lifecycle (issue #10 item 1): rm (with merge-input protection and lineage snapshots),
status ok|missing in ls/show, select(skip_missing=), the same files at another step refused,
optimizer/scheduler pickles refused, a database folder that does not exist is an error.
Real files, real DuckDB, the CLI in-process."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers_files import write_peft_adapter

from ckptreg.cli import main
from ckptreg.errors import DuplicateError, FormatError, NotFoundError, UsageError
from ckptreg.registry import Registry


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


def _run(tmp_path, reg, n=4, run="r"):
    """n adapters checkpoint-1..n (distinct weights) registered as run@1..n with a loss each."""
    for s in range(1, n + 1):
        write_peft_adapter(tmp_path / run / f"checkpoint-{s}", s + 100 * len(run))
        reg.add(tmp_path / run / f"checkpoint-{s}", run, metrics={"loss": 1.0 / s})
    return [reg.get(f"{run}@{s}") for s in range(1, n + 1)]


def _events(reg, op):
    return reg.sql(f"SELECT ref, detail FROM events WHERE op = '{op}' ORDER BY seq")[1]


# ----------------------------------------------------------------------------- rm

def test_rm_unregisters_keeps_files_and_records_event(tmp_path, registry):
    cs = _run(tmp_path, registry)
    r = _cli(registry.path, "rm", "r@2", "r@3")
    assert r.exit_code == 0, r.output
    assert "removed r@2" in r.output and "files kept" in r.output
    assert [c.step for c in registry.checkpoints("r")] == [1, 4]
    with pytest.raises(NotFoundError):
        registry.get("r@2")
    for c in cs[1:3]:  # the files stay
        assert os.path.isfile(os.path.join(c.path, "adapter_model.safetensors"))
    ev = _events(registry, "rm")
    assert [e[0] for e in ev] == ["r@2", "r@3"]
    d = json.loads(ev[0][1])
    assert d["fingerprint"] == cs[1].fingerprint and d["path"] == cs[1].path and d["delete_files"] is False
    # an unknown ref: nothing removed, exit 3, registry unchanged
    before = registry.dump()
    r = _cli(registry.path, "rm", "r@1", "r@99")
    assert r.exit_code == NotFoundError.exit_code and "r@99" in r.output
    assert registry.dump() == before


def test_rm_refuses_merge_inputs_and_lineage_keeps_them_after_force(tmp_path, registry):
    cs = _run(tmp_path, registry)
    out = write_peft_adapter(tmp_path / "merged", 999)
    mid = registry.record_merge(path=out, run="r", name="avg", method="linear", params={"scheme": "uniform"},
                                inputs=[("r@1", 0.25), ("r@2", 0.75)], base="r@3")
    before = registry.dump()
    for ref, role in (("r@1", "input"), ("r@3", "base")):
        r = _cli(registry.path, "rm", ref)
        assert r.exit_code == UsageError.exit_code, r.output
        assert f"{ref} (id" in r.output and f"the {role} of registered merge(s) r@avg" in r.output
        assert "--force" in r.output
    assert registry.dump() == before
    with pytest.raises(UsageError, match="r@avg"):
        registry.rm(["r@2"])
    # removing the merge together with its input is not refused
    # --force: removed, lineage still names the input with its ref, fingerprint and weight
    r = _cli(registry.path, "rm", "--force", "r@1", "r@3")
    assert r.exit_code == 0, r.output
    assert "lineage of r@avg keeps it" in r.output
    lin = registry.lineage(mid)
    assert lin["params"] == {"scheme": "uniform"}  # the snapshot is not shown as a param
    i0, i1 = lin["inputs"]
    assert (i0["id"], i0["ref"], i0["fingerprint"], i0["weight"], i0["removed"]) == (
        cs[0].id, "r@1", cs[0].fingerprint, 0.25, True)
    assert (i1["ref"], i1["weight"]) == ("r@2", 0.75) and "removed" not in i1
    assert lin["base"] == cs[2].id and lin["base_ref"] == "r@3" and lin["base_fingerprint"] == cs[2].fingerprint
    shown = json.loads(_cli(registry.path, "show", "r@avg", "--json").output)
    assert [i["ref"] for i in shown["lineage"]["inputs"]] == ["r@1", "r@2"]
    assert "r@1 (removed)" in _cli(registry.path, "show", "r@avg").output
    # removing the merge itself and its last input in one call needs no --force
    assert _cli(registry.path, "rm", "r@avg", "r@2").exit_code == 0
    assert [c.step for c in registry.checkpoints("r")] == [4]


def test_rm_delete_files_only_registered_files_inside_the_folder(tmp_path, registry):
    cs = _run(tmp_path, registry)
    extra = tmp_path / "r" / "checkpoint-2" / "optimizer.pt"  # not registered: must stay
    extra.write_bytes(b"not ckptreg's")
    r = _cli(registry.path, "rm", "--delete-files", "r@1", "r@2")
    assert r.exit_code == 0, r.output
    assert not os.path.exists(cs[0].path)                    # empty afterwards: folder removed
    assert sorted(os.listdir(cs[1].path)) == ["optimizer.pt"]  # registered files gone, folder kept
    assert extra.read_bytes() == b"not ckptreg's"
    assert "did not register" in r.output
    # a single-file checkpoint: only that file goes, its folder and neighbours stay
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"w.weight": torch.randn(4, 4)}, str(flat / "step-7.safetensors"))
    (flat / "notes.txt").write_text("mine")
    registry.add(flat / "step-7.safetensors", "f", step=7)
    assert _cli(registry.path, "rm", "--delete-files", "f@7").exit_code == 0
    assert sorted(os.listdir(flat)) == ["notes.txt"]


def test_rm_delete_files_keeps_a_file_changed_since_registration(tmp_path, registry):
    cs = _run(tmp_path, registry, n=2)
    f = os.path.join(cs[0].path, "adapter_model.safetensors")
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # rewritten by someone else
    r = _cli(registry.path, "rm", "--delete-files", "r@1", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)[0]["files"]
    assert os.path.isfile(f) and res["kept"][0]["path"] == f and "changed" in res["kept"][0]["reason"]
    assert not os.path.exists(os.path.join(cs[0].path, "adapter_config.json"))


# ----------------------------------------------------------------------------- status

def test_ls_and_show_status_ok_or_missing(tmp_path, registry):
    cs = _run(tmp_path, registry, n=3)
    shutil.rmtree(cs[1].path)
    os.unlink(os.path.join(cs[2].path, "adapter_model.safetensors"))
    assert registry.status(cs) == {cs[0].id: "ok", cs[1].id: "missing", cs[2].id: "missing"}
    assert registry.status(["r@1"]) == {cs[0].id: "ok"}
    r = _cli(registry.path, "ls", "--json")
    assert r.exit_code == 0, r.output
    assert [(c["ref"], c["status"]) for c in json.loads(r.output)] == [
        ("r@1", "ok"), ("r@2", "missing"), ("r@3", "missing")]
    table = _cli(registry.path, "ls").output
    assert "status" in table and table.count("missing") == 2
    assert json.loads(_cli(registry.path, "show", "r@2", "--json").output)["status"] == "missing"
    assert json.loads(_cli(registry.path, "show", "r@1", "--json").output)["status"] == "ok"
    assert "missing" in _cli(registry.path, "show", "r@3").output


def test_select_skip_missing(tmp_path, registry):
    cs = _run(tmp_path, registry, n=5)
    shutil.rmtree(cs[3].path)  # r@4 gone
    assert [c.step for c in registry.select("r", 3)] == [3, 4, 5]
    assert [c.step for c in registry.select("r", 3, skip_missing=True)] == [2, 3, 5]
    assert [c.step for c in registry.select("r", 2, every=2, skip_missing=True)] == [2, 5]
    assert [c.step for c in registry.select("r", 2, exclude_final=True, skip_missing=True)] == [2, 3]
    shutil.rmtree(cs[4].path)  # the final one is gone: it is already left out, not one more
    assert [c.step for c in registry.select("r", 2, exclude_final=True, skip_missing=True)] == [2, 3]
    from ckptreg.errors import SelectionError

    with pytest.raises(SelectionError, match="needs 4"):
        registry.select("r", 4, skip_missing=True)


# ----------------------------------------------------------------------------- refusals

def test_same_files_at_another_step_are_refused(tmp_path, registry):
    cs = _run(tmp_path, registry, n=2)
    before = registry.dump()
    r = _cli(registry.path, "add", cs[0].path, "--run", "r", "--step", "5")
    assert r.exit_code == DuplicateError.exit_code, r.output
    assert f"already registered as r@1 (id {cs[0].id})" in r.output
    # a copy of the same files in another folder is the same files too
    shutil.copytree(cs[1].path, tmp_path / "copy" / "checkpoint-9")
    with pytest.raises(DuplicateError, match="r@2"):
        registry.add(tmp_path / "copy" / "checkpoint-9", "r")
    assert registry.dump() == before
    # another run may hold the same files (a fork of a run), and other files register fine
    assert registry.add(cs[0].path, "other", step=1) is not None
    write_peft_adapter(tmp_path / "r" / "checkpoint-3", 12345)
    assert registry.add(tmp_path / "r" / "checkpoint-3", "r") is not None


def test_optimizer_and_scheduler_pickles_refused_even_with_allow_pickle(tmp_path, registry):
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    sch = torch.optim.lr_scheduler.StepLR(opt, 1)
    torch.save(opt.state_dict(), tmp_path / "optimizer-10.pt")
    torch.save(sch.state_dict(), tmp_path / "scheduler-10.pt")
    torch.save(m.state_dict(), tmp_path / "model-10.pt")
    for name, what in (("optimizer-10.pt", "optimizer state"), ("scheduler-10.pt", "scheduler state")):
        r = _cli(registry.path, "add", tmp_path / name, "--run", "r", "--step", "10", "--allow-pickle")
        assert r.exit_code == FormatError.exit_code, r.output
        assert str(tmp_path / name) in r.output and what in r.output and "not model weights" in r.output
    assert registry.checkpoints() == []
    r = _cli(registry.path, "add", tmp_path / "model-10.pt", "--run", "r", "--step", "10", "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert registry.get("r@10").n_params == 15


# ----------------------------------------------------------------------------- database path

def test_database_folder_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    ck = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    bad = tmp_path / "nosuch" / "reg.duckdb"
    for args in (["add", ck, "--run", "r"], ["ls"], ["runs"]):
        r = _cli(bad, *args)
        assert r.exit_code == NotFoundError.exit_code, (args, r.output)
        assert str(bad) in r.output and "does not exist" in r.output
    monkeypatch.setenv("CKPTREG_DB", str(bad))  # a typo in CKPTREG_DB
    r = CliRunner().invoke(main, ["add", str(ck), "--run", "r"])
    assert r.exit_code == NotFoundError.exit_code and str(bad.parent) in r.output
    with pytest.raises(NotFoundError):
        Registry().add(ck, "r")
    assert not bad.parent.exists()
    # the default ./ckptreg.duckdb is created without asking
    monkeypatch.delenv("CKPTREG_DB")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["add", str(ck), "--run", "r"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ckptreg.duckdb").is_file()


def test_merge_names_every_missing_or_changed_input_at_once(tmp_path):
    """A merge over several missing/changed inputs lists all of them in one error (exit 10),
    writes nothing and leaves the registry as it was."""
    from safetensors.torch import save_file

    from ckptreg.errors import ChangedError

    db = tmp_path / "r.duckdb"
    paths = []
    for step in (1, 2, 3, 4):
        p = tmp_path / "run" / f"step-{step}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_file({"w": torch.full((4, 4), float(step))}, str(p))
        paths.append(p)
        assert CliRunner().invoke(main, ["--db", str(db), "add", str(p), "--run", "r", "--step", str(step)]).exit_code == 0
    before = Registry(db).dump()
    paths[0].unlink()                                            # missing
    save_file({"w": torch.full((4, 4), 9.0)}, str(paths[2]))    # changed
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(main, ["--db", str(db), "merge", "--run", "r", "--last", "4", "-q", "-o", str(out)])
    assert res.exit_code == ChangedError.exit_code, res.output
    assert "2 inputs are missing or changed" in res.output
    assert "r@1" in res.output and "r@3" in res.output and "r@2" not in res.output
    assert not out.exists() and Registry(db).dump() == before
    shutil.rmtree(tmp_path / "run")


def test_merge_and_sweep_skip_missing(tmp_path):
    """--skip-missing: a selection leaves out checkpoints whose files are gone (the output is
    the merge of the present ones); without it the merge is refused naming the missing one."""
    from safetensors.torch import load_file, save_file

    from ckptreg.errors import ChangedError

    db = tmp_path / "r.duckdb"
    paths = []
    for step in (1, 2, 3, 4):
        p = tmp_path / "run" / f"step-{step}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_file({"w": torch.full((4, 4), float(step))}, str(p))
        paths.append(p)
        assert CliRunner().invoke(main, ["--db", str(db), "add", str(p), "--run", "r", "--step", str(step)]).exit_code == 0
    paths[2].unlink()                                            # r@3 is gone
    out = tmp_path / "o.safetensors"
    base = ["--db", str(db), "merge", "--run", "r", "--last", "2", "--method", "uniform", "-q", "-o", str(out)]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == ChangedError.exit_code and "r@3" in res.output and not out.exists()
    res = CliRunner().invoke(main, base + ["--skip-missing"])
    assert res.exit_code == 0, res.output
    assert "_skip_missing" in res.output   # its last 2 are not the last 2 registered: its own name
    assert torch.equal(load_file(str(out))["w"], torch.full((4, 4), 3.0))   # mean of steps 2 and 4
    res = CliRunner().invoke(main, ["--db", str(db), "sweep", "--run", "r", "--last", "2", "--method", "uniform",
                                    "--skip-missing", "-q", "-o", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    made = list((tmp_path / "sw").glob("*.safetensors"))
    assert len(made) == 1 and torch.equal(load_file(str(made[0]))["w"], torch.full((4, 4), 3.0))
