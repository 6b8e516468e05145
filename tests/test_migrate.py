"""`ckptreg migrate --to URL [--merge]`: a registry copied between backends (DuckDB file <->
PostgreSQL database, DuckDB -> DuckDB) with every row, ids and sequences kept, counts verified,
a non-empty target refused unless --merge. Real files, real databases, the CLI in-process."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers_backends import full_file, open_registry, populate, snapshot
from helpers_files import random_full_state, write_hf_model

from ckptreg.cli import main
from ckptreg.errors import DuplicateError, OutputExistsError
from ckptreg.registry.migrate import COPY_TABLES, migrate

PAIRS = [("duckdb", "duckdb"), ("duckdb", "postgresql"), ("postgresql", "duckdb"), ("postgresql", "postgresql")]


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


def _counts(reg):
    return {t: reg.sql(f"SELECT count(*) FROM {t}")[1][0][0] for t in COPY_TABLES}


@pytest.mark.parametrize("src_kind,dst_kind", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_migrate_copies_every_row_keeps_ids_and_moves_sequences(tmp_path, fresh_db, src_kind, dst_kind):
    src_loc, dst_loc = fresh_db(src_kind), fresh_db(dst_kind)
    src = open_registry(src_loc)
    made = populate(src, tmp_path / "files")
    before = snapshot(src)
    counts = _counts(src)
    assert all(counts[t] > 0 for t in COPY_TABLES), counts

    r = _cli(src_loc, "migrate", "--to", dst_loc, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    # progress: one stderr line per table
    for t in COPY_TABLES:
        assert f"migrate: {t}: {counts[t]} row(s) written" in r.stderr
        assert summary["tables"][t] == {"source": counts[t], "target_before": 0, "written": counts[t],
                                        "skipped": 0, "target": counts[t]}
    dst = open_registry(dst_loc)
    assert _counts(dst) == counts
    assert snapshot(dst) == before  # ids, refs, metrics (NaN too), lineage, aliases, events, params
    assert dst.get("a@prod").id == src.get("a@200").id
    assert dst.lineage("a@avg")["inputs"] == src.lineage("a@avg")["inputs"]
    # the sequences are past every id ever handed out (the removed checkpoint's id included)
    top = max(made["removed_id"], made["merged"].id)
    cid = dst.add(full_file(tmp_path / "new.safetensors", 99), "b", step=1, metrics={"loss": 2.0})
    assert cid == top + 1
    assert dst.history("b@1")[-1]["seq"] == max(e[0] for e in before["history"]) + 1
    m = dst.sql("SELECT max(seq) FROM metrics")[1][0][0]
    assert m == max(before_seq for (before_seq,) in src.sql("SELECT seq FROM metrics")[1]) + 1
    # the source is untouched
    assert snapshot(src) == before


@pytest.mark.parametrize("dst_kind", ["duckdb", "postgresql"])
def test_migrate_refuses_a_non_empty_target(tmp_path, fresh_db, dst_kind):
    src_loc, dst_loc = fresh_db("duckdb"), fresh_db(dst_kind)
    populate(open_registry(src_loc), tmp_path / "files")
    dst = open_registry(dst_loc)
    dst.add(full_file(tmp_path / "x.safetensors", 7), "other", step=5)
    before = snapshot(dst)
    r = _cli(src_loc, "migrate", "--to", dst_loc)
    assert r.exit_code == OutputExistsError.exit_code == 9, r.output
    assert "is not empty (1 runs, 1 checkpoints" in r.stderr and "--merge" in r.stderr
    assert snapshot(dst) == before
    with pytest.raises(OutputExistsError):
        migrate(src_loc, dst_loc)
    assert snapshot(dst) == before


@pytest.mark.parametrize("src_kind,dst_kind", PAIRS[:3], ids=[f"{a}-to-{b}" for a, b in PAIRS[:3]])
def test_migrate_merge_adds_only_what_is_missing_with_clashing_ids_remapped(tmp_path, fresh_db, src_kind, dst_kind):
    src_loc, dst_loc = fresh_db(src_kind), fresh_db(dst_kind)
    src, dst = open_registry(src_loc), open_registry(dst_loc)
    shared = write_hf_model(tmp_path / "shared-checkpoint-100", random_full_state(0, n_layers=1, d=8))
    # target: its own checkpoint first (id 1), then the same files as the source's a@100 (id 2)
    dst.add(full_file(tmp_path / "t.safetensors", 5), "t", step=1, metrics={"loss": 9.0})
    dst.add(shared, "a", step=100, metrics={"loss": 1.0})
    # source: a@100 (id 1), a@200 (id 2: taken in the target), a merge of both, an alias
    src.add(shared, "a", step=100, metrics={"loss": 1.0})
    src.add(write_hf_model(tmp_path / "b-checkpoint-200", random_full_state(1, n_layers=1, d=8)), "a", step=200,
            metrics={"loss": 0.5})
    src.log("a@200", {"loss": 0.25})
    import ckptreg

    merged = ckptreg.merge(src, ["a@100", "a@200"], method="linear", name="avg", out=tmp_path / "avg")
    src.alias("a@200", "prod")

    r = _cli(src_loc, "migrate", "--to", dst_loc, "--merge", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["tables"]["checkpoints"]["written"] == 2 and s["tables"]["checkpoints"]["skipped"] == 1
    assert s["remapped"]["checkpoints"] == 1
    dst = open_registry(dst_loc)
    assert [c.ref for c in dst.checkpoints()] == ["a@100", "a@200", "a@avg", "t@1"]
    assert dst.get("t@1").id == 1 and dst.get("a@100").id == 2  # the target's own ids stay
    a200 = dst.get("a@200")
    assert a200.id not in (1, 2) and a200.metrics == {"loss": 0.25}
    assert dst.get("a@avg").id == merged.id  # free in the target: kept
    lin = dst.lineage("a@avg")
    assert [(i["ref"], i["id"]) for i in lin["inputs"]] == [("a@100", 2), ("a@200", a200.id)]
    assert [i["weight"] for i in lin["inputs"]] == [i["weight"] for i in src.lineage("a@avg")["inputs"]]
    assert dst.get("a@prod").id == a200.id
    assert len(dst.history("a@200")) == len(src.history("a@200"))
    assert [e["op"] for e in dst.history("a@100")] == ["add"]  # both had it: the target's history stays
    assert dst.get("t@1").metrics == {"loss": 9.0}
    # the same merge again adds nothing
    before = snapshot(dst)
    r = _cli(src_loc, "migrate", "--to", dst_loc, "--merge", "--json")
    assert r.exit_code == 0, r.output
    assert all(v["written"] == 0 for v in json.loads(r.stdout)["tables"].values())
    assert snapshot(dst) == before
    # a new add in the target gets an id no one used
    nid = dst.add(full_file(tmp_path / "n.safetensors", 11), "n", step=1)
    assert nid > max(c.id for c in dst.checkpoints() if c.ref != "n@1")


@pytest.mark.parametrize("dst_kind", ["duckdb", "postgresql"])
def test_migrate_merge_conflict_is_refused_and_writes_nothing(tmp_path, fresh_db, dst_kind):
    src_loc, dst_loc = fresh_db("duckdb"), fresh_db(dst_kind)
    src, dst = open_registry(src_loc), open_registry(dst_loc)
    src.add(full_file(tmp_path / "s1.safetensors", 1), "a", step=1)
    src.add(full_file(tmp_path / "s2.safetensors", 2), "a", step=2)
    dst.add(full_file(tmp_path / "d2.safetensors", 3), "a", step=2)  # a@2 with other files
    before = snapshot(dst)
    r = _cli(src_loc, "migrate", "--to", dst_loc, "--merge")
    assert r.exit_code == DuplicateError.exit_code == 4, r.output
    assert "1 conflicting entry, nothing written: a@2: target id 1 is" in r.stderr
    assert snapshot(dst) == before


def test_migrate_usage_errors(tmp_path, fresh_db):
    loc = fresh_db("duckdb")
    r = _cli(tmp_path / "missing.duckdb", "migrate", "--to", loc)
    assert r.exit_code == 3 and "no such registry to migrate from" in r.stderr
    populate(open_registry(loc), tmp_path / "files")
    r = _cli(loc, "migrate", "--to", loc)
    assert r.exit_code == 2 and "source and target are the same registry" in r.stderr


@pytest.mark.parametrize("src_kind,dst_kind", [("duckdb", "postgresql"), ("postgresql", "duckdb"), ("duckdb", "duckdb")])
def test_migrate_many_rows_in_chunks_and_scalar_shapes(tmp_path, fresh_db, src_kind, dst_kind):
    """More tensor rows than one INSERT statement carries (chunked), 0-dim tensors (shape [])."""
    import torch
    from safetensors.torch import save_file

    from ckptreg.registry import migrate as mig

    n = mig._MAX_PARAMS // 7 + 500  # tensors has 7 columns: two statements at least
    f = tmp_path / "many.safetensors"
    t = {f"t{i:05d}": torch.full((1,), float(i)) for i in range(n)}
    t.update({"scalar_a": torch.tensor(1.5), "scalar_b": torch.tensor(2)})
    save_file(t, str(f))
    src_loc, dst_loc = fresh_db(src_kind), fresh_db(dst_kind)
    src = open_registry(src_loc)
    src.add(f, "big", step=1, metrics={f"m{i}": float(i) for i in range(50)})
    s = migrate(src_loc, dst_loc)
    assert s["tables"]["tensors"]["written"] == n + 2
    dst = open_registry(dst_loc)
    inv = dst.inventory("big@1")
    assert inv == src.inventory("big@1")
    assert tuple(inv["scalar_a"].shape) == () and inv["scalar_b"].dtype == "I64"
    assert dst.get("big@1").metrics == src.get("big@1").metrics


def test_migrate_refuses_the_same_server_database_under_another_user(fresh_db):
    url = fresh_db("postgresql")
    other = url.replace("postgresql://postgres@", "postgresql://someone:secret@")
    assert other != url
    r = _cli(url, "migrate", "--to", other)
    assert r.exit_code == 2 and "source and target are the same registry" in r.stderr
    assert "secret" not in r.output


@pytest.mark.parametrize("dst_kind", ["duckdb", "postgresql"])
def test_a_migrate_that_fails_midway_leaves_nothing_behind(tmp_path, fresh_db, dst_kind):
    """One transaction on the target: a failure after some tables were written (here: the
    progress callback raising after the tensors) rolls everything back; a DuckDB file the
    migrate created is removed again."""
    src_loc, dst_loc = fresh_db("duckdb"), fresh_db(dst_kind)
    populate(open_registry(src_loc), tmp_path / "files")

    def boom(table, n):
        if table == "tensors":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate(src_loc, dst_loc, progress=boom)
    if dst_kind == "duckdb":
        assert not dst_loc.exists() and not dst_loc.with_name(dst_loc.name + ".wal").exists()
    else:
        assert all(v == 0 for v in _counts(open_registry(dst_loc)).values())
    # and the same migrate then succeeds
    s = migrate(src_loc, dst_loc)
    assert s["tables"]["checkpoints"]["target"] == s["tables"]["checkpoints"]["source"] > 0
