"""Issue #10 leftovers on the registry side: `ckptreg gc --merged` (retention over a run's merged
outputs, against hand-computed sets, with protection of merges that feed other merges, aliased and
keep-tagged ones, and deletion of registered files only), and Registry.to_pandas()/to_arrow()
for real (equal to `export --format json`), their missing-package error simulated in a subprocess.
Real files, real DuckDB, the CLI in-process."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers_files import random_lora_state, write_peft_adapter

from ckptreg.cli import main
from ckptreg.errors import UsageError

# merged outputs of run r, in registration order: name -> (score, how it is protected)
MERGES = ["a", "b", "c", "d", "e", "f", "g"]
SCORE = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.95, "e": 0.2, "f": 0.3}  # g: no score


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


@pytest.fixture
def merged_run(tmp_path, registry):
    """Run r: plain checkpoint-10..40, and merged outputs a..g (registered in that order):
    c is an input of f, d is aliased r@prod, e is tagged keep; a, e and g are single files in one
    shared folder `outs/` beside an unregistered file, the others are adapter folders."""
    from safetensors.torch import save_file

    for s in (10, 20, 30, 40):
        write_peft_adapter(tmp_path / "r" / f"checkpoint-{s}", s)
        registry.add(tmp_path / "r" / f"checkpoint-{s}", "r", metrics={"loss": 1.0 / s})
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / "notes.txt").write_text("not written by ckptreg")
    ids = {}
    for n, name in enumerate(MERGES):
        if name in ("a", "e", "g"):
            path = outs / f"{name}.safetensors"
            save_file(random_lora_state(100 + n), str(path))
        else:
            path = write_peft_adapter(tmp_path / f"merge-{name}", 100 + n)
        inputs = [("r@c", 1.0), ("r@10", 1.0)] if name == "f" else [("r@10", 0.5), ("r@20", 0.5)]
        ids[name] = registry.record_merge(path=path, run="r", name=name, method="linear",
                                          params={}, inputs=inputs)
        if name in SCORE:
            registry.log(ids[name], {"score": SCORE[name]})
    registry.alias(ids["d"], "prod")
    registry.tag(ids["e"], {"keep": "yes"})
    return registry, ids


def _plan(db, *args):
    r = _cli(db, "gc", "--run", "r", "--merged", "--json", *args)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    return {d["name"] for d in got["delete"]}, {k["name"] for k in got["keep"]}, got


@pytest.mark.parametrize("args, keep", [
    # always kept: c (input of f), d (alias r@prod), e (tag keep)
    (["--keep-last", 2], {"f", "g", "c", "d", "e"}),                  # by registration time
    (["--keep-best", 2, "--metric", "score"], {"d", "a", "c", "e"}),  # score is max-like: d, a
    (["--keep-best", 1, "--metric", "score", "--direction", "min"], {"e", "c", "d"}),
    (["--keep-best", 1, "--metric", "score", "--direction", "min", "--keep-last", 1],
     {"e", "g", "c", "d"}),
])
def test_gc_merged_policies_against_hand_computed_sets(merged_run, args, keep):
    reg, ids = merged_run
    before = repr(reg.dump())
    delete, kept, got = _plan(reg.path, *args)
    assert kept == keep and delete == set(MERGES) - keep
    assert got["dry_run"] is True and got["merged"] is True
    assert all(k["step"] is None for k in got["keep"] + got["delete"])   # plain ones never listed
    assert got["bytes_freed"] == sum(f["size"] for d in got["delete"]
                                     for f in json.loads(reg.sql(
                                         f"SELECT files FROM checkpoints WHERE id = {d['id']}")[1][0][0]))
    assert repr(reg.dump()) == before
    table = _cli(reg.path, "gc", "--run", "r", "--merged", *args)
    assert table.exit_code == 0, table.output
    assert "dry run" in table.output and f"would remove {len(delete)} checkpoint(s)" in table.output


def test_gc_merged_reasons(merged_run):
    reg, ids = merged_run
    _, _, got = _plan(reg.path, "--keep-best", 1, "--metric", "score")
    why = {k["name"]: k["reasons"] for k in got["keep"]}
    assert why == {"d": ["best 1 by score (max)", "alias r@prod"], "e": ["tag keep"],
                   "c": ["input of merge r@f"]}


def test_gc_merged_yes_deletes_only_registered_files_and_no_plain_checkpoint(tmp_path, merged_run):
    reg, ids = merged_run
    stray = tmp_path / "merge-b" / "README.md"
    stray.write_text("the user's notes")
    plain_before = [(c.id, c.step, c.fingerprint) for c in reg.checkpoints("r", merged=False)]
    r = _cli(reg.path, "gc", "--run", "r", "--merged", "--keep-last", 2, "--yes", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert {d["name"] for d in res["delete"]} == {"a", "b"} and res["dry_run"] is False
    assert sorted(c.name for c in reg.checkpoints("r", merged=True)) == ["c", "d", "e", "f", "g"]
    assert [(c.id, c.step, c.fingerprint) for c in reg.checkpoints("r", merged=False)] == plain_before
    assert all(os.path.isdir(tmp_path / "r" / f"checkpoint-{s}") for s in (10, 20, 30, 40))
    # a: a single file in a shared folder: only that file goes, the folder and its other files stay
    outs = tmp_path / "outs"
    assert sorted(os.listdir(outs)) == ["e.safetensors", "g.safetensors", "notes.txt"]
    # b: a folder with an unregistered file: registered files go, the folder and README stay
    assert sorted(os.listdir(tmp_path / "merge-b")) == ["README.md"]
    assert stray.read_text() == "the user's notes"
    ev = reg.sql("SELECT ref, detail FROM events WHERE op = 'gc' ORDER BY seq")[1]
    assert sorted(e[0] for e in ev) == ["r@a", "r@b"]
    assert json.loads(ev[0][1])["policy"]["merged"] is True
    # lineage of the kept merge f still resolves its (kept) input c
    assert [i["ref"] for i in reg.lineage("r@f")["inputs"]] == ["r@c", "r@10"]
    # again: nothing left to do
    delete, kept, _ = _plan(reg.path, "--keep-last", 2)
    assert delete == set()


def test_gc_merged_usage_errors_and_plain_gc_unchanged(merged_run):
    reg, ids = merged_run
    before = repr(reg.dump())
    r = _cli(reg.path, "gc", "--run", "r", "--merged", "--keep-every", 2)
    assert r.exit_code == UsageError.exit_code
    assert "--keep-every" in r.output and "merged checkpoints have none" in r.output
    with pytest.raises(UsageError, match="keep_every needs steps"):
        reg.gc("r", keep_every=2, merged=True)
    assert repr(reg.dump()) == before
    # plain gc still never lists a merged output (10 and 20 are inputs of merges, 40 is final)
    r = _cli(reg.path, "gc", "--run", "r", "--keep-last", 1, "--json")
    got = json.loads(r.output)
    assert {d["step"] for d in got["delete"]} == {30} and all(
        k["step"] is not None for k in got["keep"])


# --------------------------------------------------------------------------- to_pandas / to_arrow

def _export_json(reg, tmp_path):
    out = tmp_path / "export.json"
    r = _cli(reg.path, "export", "--format", "json", "-o", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def _missing(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def _norm(v):
    """Comparable form of a cell from pandas/arrow or from the JSON export."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if _missing(v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _flat_json(rows, metric_names):
    """The JSON export's rows in the table shape: metrics.NAME columns (a NaN value is "nan" in
    JSON, an absent one is missing), tags/params as they are."""
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if k == "metrics":
                for m in metric_names:
                    x = v.get(m)
                    d[f"metrics.{m}"] = float("nan") if x == "nan" else x
            else:
                d[k] = v
        out.append(d)
    return out


def _same_rows(table_rows, json_rows):
    """Table rows (pandas/arrow records) against the flattened JSON rows: tags/params are JSON
    text in a table; a NaN metric and an absent one are both missing there (NaN/null)."""
    assert len(table_rows) == len(json_rows)
    for t, j in zip(table_rows, json_rows):
        assert list(t) == list(j)
        for k in j:
            a, b = t[k], j[k]
            if k in ("tags", "params") and isinstance(a, str):
                a = json.loads(a)
            if k.startswith("metrics."):
                if _missing(b):
                    assert _missing(a), (t["ref"], k, a, b)
                else:
                    assert a == pytest.approx(b), (t["ref"], k, a, b)
                continue
            assert _norm(a) == _norm(b), (t["ref"], k, a, b)


@pytest.fixture
def exp_reg(tmp_path, registry):
    for s in (10, 20, 30):
        registry.add(write_peft_adapter(tmp_path / "run" / f"checkpoint-{s}", s), "r",
                     metrics={"eval_loss": float("nan") if s == 20 else 1.0 / s, "acc": s / 100},
                     tags={"lr": "1e-4"})
    registry.record_merge(path=write_peft_adapter(tmp_path / "soup-a", 7), run="r", name="soup",
                          method="linear", params={"scheme": "uniform"},
                          inputs=[("r@10", 0.25), ("r@30", 0.75)])
    registry.record_merge(path=write_peft_adapter(tmp_path / "soup-b", 8), run="r", name="soup",
                          method="task_arithmetic", params={"lam": 0.5},
                          inputs=[("r@20", 1.0), ("r@30", 1.0)], base="r@10")
    return registry


def test_to_pandas_equals_export_json(exp_reg, tmp_path):
    pytest.importorskip("pandas")
    want = _export_json(exp_reg, tmp_path)
    rows = want if isinstance(want, list) else want["checkpoints"]
    df = exp_reg.to_pandas()
    assert len(df) == len(rows) == 5
    assert list(df.columns) == list(_flat_json(rows, ["acc", "eval_loss"])[0])
    _same_rows(df.to_dict("records"), _flat_json(rows, ["acc", "eval_loss"]))
    by_ref = df.set_index("ref")
    assert by_ref.loc["r@30", "metrics.acc"] == pytest.approx(0.30)
    assert math.isnan(by_ref.loc["r@20", "metrics.eval_loss"])
    assert by_ref.loc["r@soup:v2", "method"] == "task_arithmetic"
    assert by_ref.loc["r@soup:v2", "base_ref"] == "r@10"


def test_to_arrow_equals_export_json(exp_reg, tmp_path):
    pa = pytest.importorskip("pyarrow")
    want = _export_json(exp_reg, tmp_path)
    rows = want if isinstance(want, list) else want["checkpoints"]
    t = exp_reg.to_arrow()
    assert isinstance(t, pa.Table) and t.num_rows == 5
    assert t.column_names == list(_flat_json(rows, ["acc", "eval_loss"])[0])
    _same_rows(t.to_pylist(), _flat_json(rows, ["acc", "eval_loss"]))
    assert t.column("inputs").to_pylist()[4] == [
        {"id": 2, "ref": "r@20", "weight": 1.0, "position": 0},
        {"id": 3, "ref": "r@30", "weight": 1.0, "position": 1}]


@pytest.mark.parametrize("method, module", [("to_pandas", "pandas"), ("to_arrow", "pyarrow")])
def test_missing_optional_package_is_a_usage_error(exp_reg, method, module):
    """Absence simulated in a fresh interpreter (sys.modules[name] = None makes the import fail)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from ckptreg.registry import Registry\n"
            "from ckptreg.errors import UsageError\n"
            f"r = Registry({str(exp_reg.path)!r})\n"
            "try:\n"
            f"    r.{method}()\n"
            "except UsageError as e:\n"
            "    print('USAGE', e.exit_code, e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"USAGE {UsageError.exit_code} "), p.stdout + p.stderr
    assert repr(module) in p.stdout and "not installed" in p.stdout
