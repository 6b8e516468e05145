"""Aliases (built-in and user), mutable tags and versioned merged names: resolution through
Registry.get/_resolve and therefore everywhere a ref is accepted (show, log, merge inputs, --base)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import DuplicateError, NotFoundError, UsageError
from ckptreg.registry import Registry
from helpers_files import write_peft_adapter

LOSS = {10: 0.9, 20: 0.3, 30: 0.5}
ACC = {10: 0.2, 20: 0.4, 30: 0.6}


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "reg.duckdb")
    for s in (10, 20, 30):
        r.add(write_peft_adapter(tmp_path / "run" / f"checkpoint-{s}", s, r=4, alpha=8), "r",
              metrics={"eval_loss": LOSS[s], "acc": ACC[s]})
    return r


@pytest.fixture
def cli(tmp_path):
    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", str(tmp_path / "reg.duckdb"), *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res
    return run


def _merged(reg, tmp_path, name, folder, seed, inputs=("r@10", "r@20"), **kw):
    out = write_peft_adapter(tmp_path / folder, seed, r=4, alpha=8)
    return reg.record_merge(path=out, run="r", name=name, method="linear", params={},
                            inputs=[(i, 0.5) for i in inputs], **kw)


def _events(reg, op):
    _, rows = reg.sql(f"SELECT op, ref, checkpoint_id, detail FROM events WHERE op = '{op}' ORDER BY seq")
    return [(o, ref, cid, json.loads(d)) for o, ref, cid, d in rows]


def test_builtin_aliases(reg, tmp_path):
    assert reg.get("r@final").step == 30
    assert reg.get("r@latest").step == 30
    assert reg.get("r@best:eval_loss").step == 20        # loss-like name: lowest
    assert reg.get("r@best:acc").step == 30              # score-like name: highest
    assert reg.get("r@best:acc:min").step == 10
    assert reg.get("r@best:eval_loss:max").step == 10
    mid = _merged(reg, tmp_path, "soup", "soup", 7)
    assert reg.get("r@latest").id == mid                 # merged ones count for latest ...
    assert reg.get("r@final").step == 30                 # ... never for final
    with pytest.raises(NotFoundError, match="closest: eval_loss"):
        reg.get("r@best:eval_los")
    with pytest.raises(NotFoundError, match="no run named 'q'"):
        reg.get("q@final")


def test_user_alias_create_move_delete(reg, tmp_path):
    assert reg.alias("r@20", "prod")["status"] == "created"
    assert reg.get("r@prod").step == 20
    assert reg.alias("r@20", "prod")["status"] == "unchanged"
    r = reg.alias("r@best:acc", "prod")
    assert r["status"] == "moved" and r["previous"] == reg.get("r@20").id
    assert reg.get("r@prod").step == 30
    _, rows = reg.sql("SELECT count(*) FROM aliases")
    assert rows == [(1,)]                                # moved, not duplicated
    assert [a["ref"] for a in reg.aliases(ckpt="r@30")] == ["r@prod"]
    assert reg.alias("r@prod", "prod", delete=True)["status"] == "deleted"
    with pytest.raises(NotFoundError, match="no checkpoint 'r@prod'"):
        reg.get("r@prod")
    ev = _events(reg, "alias")
    assert [e[1] for e in ev] == ["r@prod"] * 3
    assert ev[0][3]["target"] == "r@20" and ev[1][3]["previous"] == reg.get("r@20").id
    assert ev[2][3]["deleted"] is True
    with pytest.raises(NotFoundError, match="no alias r@prod"):
        reg.alias("r@10", "prod", delete=True)


def test_alias_names_that_would_shadow_are_refused(reg, tmp_path):
    _merged(reg, tmp_path, "soup", "soup", 7)
    before = reg.dump()
    for bad, err in (("12", UsageError), ("final", UsageError), ("latest", UsageError),
                     ("best:acc", UsageError), ("x:v2", UsageError), ("soup", DuplicateError)):
        with pytest.raises(err):
            reg.alias("r@10", bad)
    assert reg.dump() == before
    reg.alias("r@10", "golden")
    with pytest.raises(DuplicateError, match="user alias"):     # and a merge may not shadow an alias
        _merged(reg, tmp_path, "golden", "golden-out", 8)
    with pytest.raises(UsageError, match="built-in"):
        _merged(reg, tmp_path, "final", "final-out", 8)


def test_merged_names_are_versioned(reg, tmp_path):
    v1 = _merged(reg, tmp_path, "soup", "soup-a", 7)
    v2 = _merged(reg, tmp_path, "soup", "soup-b", 8, inputs=("r@20", "r@30"))
    assert v2 != v1
    assert reg.get("r@soup").id == v2 and reg.get("r@soup").version == 2
    assert reg.get("r@soup:v1").id == v1 and reg.get("r@soup:v2").id == v2
    assert reg.get(v2).ref == "r@soup:v2" and reg.get(v1).ref == "r@soup"
    assert [i["ref"] for i in reg.lineage("r@soup:v1")["inputs"]] == ["r@10", "r@20"]
    assert [i["ref"] for i in reg.lineage("r@soup")["inputs"]] == ["r@20", "r@30"]
    with pytest.raises(NotFoundError, match="has version"):
        reg.get("r@soup:v3")
    # replace = the newest version replaced in place (same id, same version)
    v2b = _merged(reg, tmp_path, "soup", "soup-b", 9, inputs=("r@10", "r@30"), replace=True)
    assert v2b == v2 and reg.get("r@soup").version == 2
    assert [i["ref"] for i in reg.lineage(v2)["inputs"]] == ["r@10", "r@30"]
    # the same output path again without replace is not a new version
    with pytest.raises(DuplicateError, match="already registered"):
        _merged(reg, tmp_path, "soup", "soup-b", 9)
    ev = _events(reg, "merge")
    assert [(e[3]["version"], e[3]["replaced"]) for e in ev] == [(1, False), (2, False), (2, True)]


def test_tags_are_mutable(reg, cli):
    cli("tag", "r@10", "keep=yes", "stage=a")
    cli("tag", "r@20", "stage=a")
    cli("tag", "r@30", "stage=b", "keep=no")
    got = json.loads(cli("ls", "--tag", "stage=a", "--json").stdout)
    assert [d["ref"] for d in got] == ["r@10", "r@20"]
    got = json.loads(cli("ls", "--tag", "stage=a", "--tag", "keep=yes", "--json").stdout)
    assert [d["ref"] for d in got] == ["r@10"]
    d = json.loads(cli("tag", "r@10", "stage=b", "--remove", "keep", "--json").stdout)
    assert d["tags"] == {"stage": "b"}
    assert Registry(reg.path).get("r@10").tags == {"stage": "b"}
    assert [d["ref"] for d in json.loads(cli("ls", "--tag", "stage=b", "--json").stdout)] == ["r@10", "r@30"]
    before = reg.dump()
    res = cli("tag", "r@10", "--remove", "nosuch", code=NotFoundError.exit_code)
    assert "has no tag 'nosuch'" in res.output and "its tags: stage" in res.output
    cli("tag", "r@10", code=UsageError.exit_code)
    assert reg.dump() == before
    ev = _events(reg, "tag")
    assert len(ev) == 4 and ev[-1][3] == {"set": {"stage": "b"}, "removed": ["keep"],
                                          "before": {"keep": "yes", "stage": "a"}}


def test_aliases_and_versions_everywhere_a_ref_is_accepted(reg, cli, tmp_path):
    """show, log, merge inputs and --base go through Registry.get/_resolve: aliases, built-ins and
    versions work in each."""
    v1 = _merged(reg, tmp_path, "soup", "soup-a", 7)
    v2 = _merged(reg, tmp_path, "soup", "soup-b", 8)
    cli("alias", "r@20", "prod")
    cli("alias", "r@soup:v1", "old-soup")
    # show
    d = json.loads(cli("show", "r@prod", "--json").stdout)
    assert d["step"] == 20 and d["aliases"] == ["r@prod"]
    d = json.loads(cli("show", "r@soup", "--json").stdout)
    assert d["id"] == v2 and d["version"] == 2 and d["ref"] == "r@soup:v2"
    out = cli("show", "r@old-soup").stdout
    assert "version" in out and f"{v1}" in out
    got = json.loads(cli("ls", "--merged", "--json").stdout)
    assert [(d["ref"], d["version"]) for d in got] == [("r@soup", 1), ("r@soup:v2", 2)]
    table = cli("ls", "--run", "r").stdout
    assert "version" in table.splitlines()[0] and "r@soup:v2" in table
    # log
    cli("log", "r@prod", "extra=1.5")
    cli("log", "r@soup:v1", "extra=2.5")
    cli("log", "r@best:acc", "extra=3.5")
    assert reg.get("r@20").metrics["extra"] == 1.5
    assert reg.get(v1).metrics["extra"] == 2.5 and "extra" not in reg.get(v2).metrics
    assert reg.get("r@30").metrics["extra"] == 3.5
    # merge inputs
    res = cli("merge", "r@prod", "r@final", "--method", "linear", "-o", tmp_path / "m1", "--name", "m1",
              "-q", "--json")
    lin = reg.lineage("r@m1")
    assert [i["id"] for i in lin["inputs"]] == [reg.get("r@20").id, reg.get("r@30").id]
    res = cli("merge", "r@old-soup", "r@soup", "--method", "linear", "-o", tmp_path / "m2", "--name", "m2", "-q")
    assert [i["id"] for i in reg.lineage("r@m2")["inputs"]] == [v1, v2]
    # --base
    cli("merge", "r@prod", "r@30", "--method", "task_arithmetic", "--base", "r@best:eval_loss:max",
        "-o", tmp_path / "m3", "--name", "m3", "-q")
    assert reg.lineage("r@m3")["base"] == reg.get("r@10").id
    cli("merge", "r@20", "r@30", "--method", "task_arithmetic", "--base", "r@soup:v1",
        "-o", tmp_path / "m4", "--name", "m4", "-q")
    assert reg.lineage("r@m4")["base"] == v1
    # an unknown alias names the closest
    res = cli("show", "r@prd", code=NotFoundError.exit_code)
    assert "closest" in res.output and "r@prod" in res.output


def test_alias_cli_messages_and_refusals(reg, cli):
    res = cli("alias", "r@20", "prod")
    assert "r@prod -> r@20" in res.output
    res = cli("alias", "r@30", "prod")
    assert "moved r@prod to r@30" in res.output
    assert json.loads(cli("aliases", "--json").stdout)[0]["target"] == "r@30"
    res = cli("alias", "r@30", "7", code=UsageError.exit_code)
    assert "is a number" in res.output
    res = cli("alias", "r@30", "final", code=UsageError.exit_code)
    assert "built-in" in res.output
    cli("alias", "r@prod", "prod", "--delete")
    res = cli("alias", "r@30", "prod", "--delete", code=NotFoundError.exit_code)
    assert "no alias r@prod" in res.output
