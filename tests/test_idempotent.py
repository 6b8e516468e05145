"""Issue #10, engine side: re-running a merge or a sweep is idempotent (an identical registered
output is reported "up to date" and skipped; --overwrite recomputes; an extended grid computes only
its new points), default names encode everything that changes the result, and metric weighting
by a value logged before the checkpoint says so (stderr note, lineage params["metric_lag"])."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptreg import engine
from ckptreg.cli import main
from ckptreg.errors import OutputExistsError
from ckptreg.registry import Registry
from helpers_engine import make_lora_run
from helpers_files import random_lora_state, write_peft_adapter

STEPS = (10, 20, 30, 40, 50, 60)


@pytest.fixture
def env(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    db = str(tmp_path / "reg.duckdb")

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", db, *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res

    return reg, run, tmp_path


def _stats(folder) -> dict:
    """{relative path: (inode, mtime_ns, size)} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


# --------------------------------------------------------------------------------- item 1: merge

def test_merge_rerun_is_up_to_date_and_overwrite_recomputes(env):
    reg, run, tmp = env
    first = json.loads(run("merge", "--run", "sft", "--last", 3, "-q", "--json").stdout)
    assert first["status"] == "merged"
    files = _stats(first["path"])
    before = reg.dump()
    res = run("merge", "--run", "sft", "--last", 3, "-q", "--json")
    again = json.loads(res.stdout)
    assert again["status"] == "up to date" and again["id"] == first["id"] and again["path"] == first["path"]
    assert f"up to date: sft@last_3_unweighted_incl_final (id {first['id']}) at {first['path']}" in res.stderr
    assert _stats(first["path"]) == files and reg.dump() == before   # nothing written, no new version
    # the plain output says the same
    res = run("merge", "--run", "sft", "--last", 3)
    assert res.stdout.strip() == f"{first['id']}\tlast_3_unweighted_incl_final" and "up to date" in res.stderr
    assert "wrote" not in res.stderr and _stats(first["path"]) == files
    # --overwrite recomputes (same id, same version, new files)
    res = run("merge", "--run", "sft", "--last", 3, "-q", "--overwrite", "--json")
    over = json.loads(res.stdout)
    assert over["status"] == "merged" and over["id"] == first["id"] and "up to date" not in res.stderr
    assert _stats(first["path"]) != files
    assert [c.version for c in reg.checkpoints("sft", merged=True)] == [1]


def test_other_parameters_under_the_same_name_are_refused_at_its_path_and_versioned_elsewhere(env):
    reg, run, tmp = env
    first = json.loads(run("merge", "--run", "sft", "--last", 3, "-q", "--name", "soup", "--json").stdout)
    files = _stats(first["path"])
    before = reg.dump()
    # other inputs, same name, same (default) path: refused as before, nothing changed
    res = run("merge", "--run", "sft", "--last", 2, "-q", "--name", "soup", code=OutputExistsError.exit_code)
    assert "exists (use --overwrite" in res.output
    # other weights, same inputs
    run("merge", "--run", "sft", "--last", 3, "-q", "--name", "soup", "--method", "mwa", "--metric", "train_loss",
        "--penalty", 0.7, code=OutputExistsError.exit_code)
    assert _stats(first["path"]) == files and reg.dump() == before
    # at another path it is the next version; re-running that one is up to date too
    other = tmp / "elsewhere"
    v2 = json.loads(run("merge", "--run", "sft", "--last", 2, "-q", "--name", "soup", "-o", other, "--json").stdout)
    assert v2["status"] == "merged" and reg.get(v2["id"]).version == 2
    again = json.loads(run("merge", "--run", "sft", "--last", 2, "-q", "--name", "soup", "-o", other,
                           "--json").stdout)
    assert again["status"] == "up to date" and again["id"] == v2["id"]
    # and v1's own recipe at v1's path is still up to date (not a third version)
    again = json.loads(run("merge", "--run", "sft", "--last", 3, "-q", "--name", "soup", "--json").stdout)
    assert again["status"] == "up to date" and again["id"] == first["id"]
    assert sorted(c.version for c in reg.checkpoints("sft", merged=True)) == [1, 2]


def test_api_merge_up_to_date_needs_unchanged_output_and_the_same_input_fingerprints(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    spec = engine.make_spec(reg, "ties", reg.select("sft", 3), base="first", params={"density": 0.5},
                            selection={"last": 3})
    res = engine.merge_result(reg, spec)
    c = res.checkpoint
    assert res.status == "merged"
    spec2 = engine.make_spec(reg, "ties", reg.select("sft", 3), base="first", params={"density": 0.5},
                             selection={"last": 3})
    res2 = engine.merge_result(reg, spec2)
    again = res2.checkpoint
    assert res2.status == engine.UP_TO_DATE and again.id == c.id and again == reg.get(c.id)
    # other method parameters are not the same merge (the same name given explicitly: by
    # default density 0.7 would be named _d0_7, another output)
    with pytest.raises(OutputExistsError):
        engine.merge(reg, engine.make_spec(reg, "ties", reg.select("sft", 3), base="first",
                                           params={"density": 0.7}, selection={"last": 3}, name=spec.name))
    # an input re-registered with other files (same id, new fingerprint) is not up to date
    final = reg.final("sft")
    write_peft_adapter(final.path, random_lora_state(999, n_layers=2, d=24, r=4), r=4, alpha=8, d=24)
    reg.add(final.path, run="sft", step=final.step, replace=True)
    assert reg.get(final.ref).id == final.id
    with pytest.raises(OutputExistsError):
        engine.merge(reg, engine.make_spec(reg, "ties", reg.select("sft", 3), base="first",
                                           params={"density": 0.5}, selection={"last": 3}))
    s3 = engine.make_spec(reg, "ties", reg.select("sft", 3), base="first", params={"density": 0.5},
                          selection={"last": 3})
    res3 = engine.merge_result(reg, s3, overwrite=True)
    assert res3.checkpoint.id == c.id and res3.status == "merged"
    # a deleted output is not up to date: refused before any work (naming the way out), and
    # --overwrite recomputes it under the same id
    import shutil

    from ckptreg.errors import ChangedError

    shutil.rmtree(c.path)
    before = reg.dump()
    with pytest.raises(ChangedError, match="--overwrite recomputes"):
        engine.merge(reg, engine.make_spec(reg, "ties", reg.select("sft", 3), base="first",
                                           params={"density": 0.5}, selection={"last": 3}))
    assert reg.dump() == before and not Path(c.path).exists()
    s4 = engine.make_spec(reg, "ties", reg.select("sft", 3), base="first", params={"density": 0.5},
                          selection={"last": 3})
    res4 = engine.merge_result(reg, s4, overwrite=True)
    assert res4.checkpoint.id == c.id and res4.status == "merged"
    reg.check_unchanged(c.id)
    # a changed output is never "up to date"
    f = Path(c.path) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(OutputExistsError):
        engine.merge(reg, engine.make_spec(reg, "ties", reg.select("sft", 3), base="first",
                                           params={"density": 0.5}, selection={"last": 3}))


# --------------------------------------------------------------------------------- item 1: sweep

def test_sweep_twice_skips_everything_and_an_extended_grid_computes_one_output(env):
    reg, run, tmp = env
    sw = tmp / "sw"
    rows = json.loads(run("sweep", "--run", "sft", "--last", "2,3", "--method", "uniform", "-o", sw, "-q",
                          "--json").stdout)
    assert [r["status"] for r in rows] == ["merged", "merged"]
    files = _stats(sw)
    before = reg.dump()
    res = run("sweep", "--run", "sft", "--last", "2,3", "--method", "uniform", "-o", sw, "-q", "--json")
    again = json.loads(res.stdout)
    assert [r["status"] for r in again] == ["up to date", "up to date"]
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    for r in rows:
        assert f"up to date: sft@{r['name']} (id {r['id']}) at {r['path']}" in res.stderr
    assert _stats(sw) == files and reg.dump() == before
    # one more --last value: exactly one new output, the others untouched
    res = run("sweep", "--run", "sft", "--last", "2,3,4", "--method", "uniform", "-o", sw, "-q", "--json")
    ext = json.loads(res.stdout)
    assert [r["status"] for r in ext] == ["up to date", "up to date", "merged"]
    now = _stats(sw)
    assert {k: v for k, v in now.items() if k in files} == files
    new_files = set(now) - set(files)
    assert new_files and all(k.startswith("last_4_unweighted_incl_final" + os.sep) for k in new_files)
    assert len(reg.checkpoints("sft", merged=True)) == 3
    assert reg.get("sft@last_4_unweighted_incl_final").id == ext[2]["id"]


def test_sweep_of_mixed_methods_twice_writes_nothing(env):
    reg, run, tmp = env
    sw = tmp / "mixed"
    args = ("sweep", "--run", "sft", "--last", "2,3", "--method", "uniform,mwa,ties", "--penalty", "0.5,0.9",
            "--density", 0.5, "--base", "first", "-o", sw, "-q", "--json")
    rows = json.loads(run(*args).stdout)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"merged"}
    files = _stats(sw)
    before = reg.dump()
    again = json.loads(run(*args).stdout)
    assert {r["status"] for r in again} == {"up to date"} and [r["id"] for r in again] == [r["id"] for r in rows]
    assert _stats(sw) == files and reg.dump() == before
    # the API says the same (the CLI gave every merge of the grid --density and --base), and
    # --overwrite recomputes
    kw = {"base": "first", "params": {"density": 0.5}}
    specs = [engine.make_spec(reg, "mwa", reg.select("sft", 3), metric="train_loss", penalty=0.5,
                              selection={"run": "sft", "last": 3, "every": 1, "exclude_final": False}, **kw),
             engine.make_spec(reg, "uniform", reg.select("sft", 2),
                              selection={"run": "sft", "last": 2, "every": 1, "exclude_final": False}, **kw)]
    specs = [dataclasses.replace(s, out=str(engine.default_out(s, parent=sw))) for s in specs]
    results = engine.sweep_results(reg, specs)
    got = [r.checkpoint for r in results]
    assert [r.status for r in results] == ["up to date", "up to date"]
    assert {c.id for c in got} <= {r["id"] for r in rows} and _stats(sw) == files
    results = engine.sweep_results(reg, specs, overwrite=True)
    assert [r.status for r in results] == ["merged", "merged"]


# --------------------------------------------------------------------------------- item 2: names

def test_default_names_never_collide_across_settings_that_change_the_result(env):
    reg, run, tmp = env
    ins = reg.select("sft", 3, exclude_final=True)   # the paper's selection: the last 3 before the final
    sel = {"last": 3, "every": 1, "exclude_final": True}

    def name(method="uniform", selection=sel, inputs=ins, **kw):
        return engine.make_spec(reg, method, inputs, selection=dict(selection), **kw).name

    base = name()
    assert base == "last_3_unweighted"   # the paper's configuration keeps the paper's name
    pairs = {
        "space": (name(space="factors"), name(space="delta")),
        "include_final": (name(), name(selection={**sel, "exclude_final": False}, inputs=reg.select("sft", 3))),
        "rank": (name(space="delta"), name(space="delta", rank=2)),
        "out_dtype": (name(), name(out_dtype="bfloat16")),
        "power": (name("mwa", metric="train_loss", penalty=0.7),
                  name("mwa", metric="train_loss", penalty=0.7, power=3)),
        "direction": (name("mwa", metric="train_loss", penalty=0.7),
                      name("mwa", metric="train_loss", penalty=0.7, direction="max")),
        "weights": (name("linear"), name("linear", weights=[0.2, 0.3, 0.5])),
        "svd": (name("cart"), name("cart", params={"svd": "randomized"})),
        "ties_space": (name("task_arithmetic", base="first"), name("task_arithmetic", base="first", space="delta")),
        "sign": (name("ties", base="first", params={"density": 0.5}),
                 name("ties", base="first", params={"density": 0.5, "sign": "frequency"})),
        "lam": (name("task_arithmetic", base="first"), name("task_arithmetic", base="first", params={"lam": 0.5})),
        "t": (name("slerp", base="first", selection={**sel, "last": 2}, inputs=ins[-2:]),
              name("slerp", base="first", selection={**sel, "last": 2}, inputs=ins[-2:], params={"t": 0.3})),
        "rank_ratio": (name("cart"), name("cart", params={"rank_ratio": 0.2})),
        "seed": (name("dare_ties", base="first", params={"density": 0.5}),
                 name("dare_ties", base="first", params={"density": 0.5, "seed": 3})),
    }
    for what, (a, b) in pairs.items():
        assert a != b, what
    assert pairs["space"] == ("last_3_unweighted", "last_3_unweighted_delta")
    assert pairs["include_final"][1] == "last_3_unweighted_incl_final"
    assert pairs["rank"][1] == "last_3_unweighted_delta_r2"
    assert pairs["out_dtype"][1] == "last_3_unweighted_bf16"
    assert pairs["power"] == ("last_3_loss_pf-0_7", "last_3_loss_pf-0_7_q3_0")
    assert pairs["direction"][1] == "last_3_loss_pf-0_7_max"
    assert pairs["svd"] == ("cart_last_3", "cart_last_3_rsvd")   # exact is the default (METHODS.md)
    assert pairs["sign"] == ("ties_last_3_base_first", "ties_last_3_base_first_freq")
    assert pairs["lam"][1] == "task_arithmetic_last_3_base_first_lam0_5"
    assert pairs["t"] == ("slerp_last_2_base_first", "slerp_last_2_base_first_t0_3")
    assert pairs["rank_ratio"][1] == "cart_last_3_rr0_2"
    assert pairs["seed"] == ("dare_ties_last_3_base_first", "dare_ties_last_3_base_first_seed3")
    # the defaults spelled out give no suffix either
    assert name("mwa", metric="train_loss", penalty=0.7, power=2.0, direction="min") == "last_3_loss_pf-0_7"
    # through the CLI: a factor-space and a delta-space merge, a selection with and without the
    # final checkpoint, all registered side by side as version 1 of their own names
    for extra in ((), ("--space", "delta"), ("--exclude-final",), ("--space", "delta", "--rank", 2)):
        d = json.loads(run("merge", "--run", "sft", "--last", 3, "-q", "--json", *extra).stdout)
        assert d["status"] == "merged", extra
    got = sorted((c.name, c.version) for c in reg.checkpoints("sft", merged=True))
    assert got == [("last_3_unweighted", 1), ("last_3_unweighted_incl_final", 1),
                   ("last_3_unweighted_incl_final_delta", 1), ("last_3_unweighted_incl_final_delta_r2", 1)]
    # a default-named spec merged in delta space through the API is named for it too
    spec = engine.make_spec(reg, "uniform", reg.select("sft", 2), selection={"last": 2})
    res = engine.merge_result(reg, spec, space="delta")
    c = res.checkpoint
    assert c.name == "last_2_unweighted_incl_final_delta" == res.spec.name


# --------------------------------------------------------------------------------- item 3: metric lag

def _lagged_run(tmp_path):
    """Run r, steps 10/20/30; the train loss of r@10 was logged at step 7, of r@30 at step 30."""
    db = tmp_path / "lag.duckdb"
    reg = Registry(db)
    for i, (step, logged) in enumerate(((10, 7), (20, None), (30, 30))):
        folder = write_peft_adapter(tmp_path / "r" / f"checkpoint-{step}",
                                    random_lora_state(i, n_layers=1, d=16, r=2), r=2, alpha=4, d=16)
        reg.add(folder, run="r", step=step, metrics={"train_loss": 1.0 - 0.1 * i},
                metric_steps={"train_loss": logged} if logged is not None else None)
    return reg, str(db)


NOTE = ("note: train_loss of r@10 was logged at step 7, 3 step(s) before the checkpoint: its weight uses "
        "that older value")


def test_metric_weighting_by_an_older_value_says_so(tmp_path):
    reg, db = _lagged_run(tmp_path)
    assert reg.get("r@10").metric_lag("train_loss") == 3

    def cli(*args):
        res = CliRunner().invoke(main, ["--db", db, *map(str, args)])
        assert res.exit_code == 0, res.output
        return res

    res = cli("merge", "--run", "r", "--last", 3, "--method", "mwa", "--metric", "train_loss", "--penalty", 0.7,
              "-q", "--json")
    d = json.loads(res.stdout)
    assert res.stderr.count("note: ") == 1 and NOTE in res.stderr
    assert reg.lineage(d["id"])["params"]["metric_lag"] == {"r@10": 3}
    # the re-run is up to date and still says which weight uses an older value
    res = cli("merge", "--run", "r", "--last", 3, "--method", "mwa", "--metric", "train_loss", "--penalty", 0.7,
              "-q", "--json")
    assert json.loads(res.stdout)["status"] == "up to date" and NOTE in res.stderr
    # unweighted and step-weighted merges do not depend on the value: no note, no metric_lag
    res = cli("merge", "--run", "r", "--last", 3, "-q", "--json")
    assert "note:" not in res.stderr and "metric_lag" not in reg.lineage(json.loads(res.stdout)["id"])["params"]
    res = cli("merge", "--run", "r", "--last", 3, "--method", "mwa", "--metric", "step", "--penalty", 0.7, "-q")
    assert "note:" not in res.stderr
    # a sweep notes each input once, whatever the number of merges weighted by it
    res = cli("sweep", "--run", "r", "--last", "2,3", "--method", "mwa", "--penalty", "0.5,0.9", "-o",
              tmp_path / "sw", "-q", "--json")
    rows = json.loads(res.stdout)
    assert res.stderr.count("note: ") == 1 and NOTE in res.stderr
    with_r10 = [r for r in rows if "10" in r["inputs"].split(",")]
    assert with_r10 and all(reg.lineage(r["id"])["params"]["metric_lag"] == {"r@10": 3} for r in with_r10)
    assert all("metric_lag" not in reg.lineage(r["id"])["params"] for r in rows if r not in with_r10)
    # the Python API records it the same way
    spec = engine.make_spec(reg, "linear", reg.select("r", 3), scheme="metric", metric="train_loss",
                            selection={"last": 3}, name="api_metric")
    c = engine.merge(reg, spec)
    assert engine.metric_lags(spec) == {"r@10": 3} and reg.lineage(c.id)["params"]["metric_lag"] == {"r@10": 3}
