"""Sweeps in update space (issue #13 items 1 and 5): ``sweep(..., space="delta"|"core", rank=)``
on real PEFT adapter folders runs every point as the exact factored merge ``merge`` runs, with
the factor-space sweep's guarantees (targets checked and locked first, up-to-date points
skipped, grid extension computes only the new points, duplicates once, a failing point leaves
nothing of itself). Float64 references come from tests/test_methods_lowrank.py and
tests/test_lora_spaces.py (written from METHODS.md), never from the code under test."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptreg import api, engine
from ckptreg.cli import main
from ckptreg.errors import ChangedError, ParameterError, TargetBusyError
from ckptreg.registry import Registry
from helpers_engine import load_any
from helpers_ref import ref_best_rank, ref_ties
from test_lora_spaces import MODS, _adapters, _f64, _factors, _rel, _update, ref_core
from test_methods_lowrank import ref_iso_c, ref_tsv

METHODS5 = ["tsv", "iso_c", "star", "knots_ties", "ties"]
SPECS = [(4, 8, False), (2, 3, False), (3, 12, False)]   # mixed ranks and lora_alpha (update space takes them)


def _taus(ins, mod):
    return [s * (_f64(b) @ _f64(a)) for a, b, s in (_factors(x, mod) for x in ins)]


def _files(folder) -> dict:
    """{path: mtime_ns} of every file under ``folder`` (lock files and temporaries included)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[p] = os.stat(p).st_mtime_ns
    return out


def _same_tensors(a, b):
    ta, tb = load_any(a), load_any(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_delta_sweep_equals_single_merges_and_references(tmp_path):
    """A delta-space sweep over tsv, iso_c, star, knots_ties, ties equals the single delta-space
    merges of the same points tensor for tensor, under the same names; tsv, iso_c and ties equal
    their float64 references; a re-run writes nothing; each single merge at the sweep's output
    is up to date with the sweep point."""
    reg = _adapters(tmp_path / "a", SPECS)
    p = {"density": 0.5}
    res = api.sweep_results(reg, run="sft", last=3, method=METHODS5, params=p, space="delta", out=tmp_path / "sw")
    assert [r.status for r in res] == [engine.MERGED] * 5
    names = [r.checkpoint.name for r in res]
    assert names == [f"{m}_last_3_base_pretrained_incl_final_delta" for m in METHODS5]
    # the same points as single merges, in a second registry over the same adapter folders
    reg2 = Registry(tmp_path / "single.duckdb")
    for c in reg.checkpoints("sft", merged=False):
        reg2.add(c.path, run="sft", step=c.step, metrics=c.metrics)
    for m, r in zip(METHODS5, res):
        one = api.merge_spec_run(reg2, run="sft", last=3, method=m, params=r.spec.params, space="delta",
                                 out=tmp_path / "single" / r.checkpoint.name)
        assert one.status == engine.MERGED and one.checkpoint.name == r.checkpoint.name
        _same_tensors(one.checkpoint.path, r.checkpoint.path)
        cfg = json.loads((Path(r.checkpoint.path) / "adapter_config.json").read_text())
        assert cfg == json.loads((Path(one.checkpoint.path) / "adapter_config.json").read_text())
        lin = reg.lineage(r.checkpoint)
        assert lin["base"] is None and lin["params"]["base"] == "pretrained" and lin["params"]["space"] == "delta"
    ins = reg.select("sft", 3)
    by = dict(zip(METHODS5, res))
    for mod in MODS:
        taus = _taus(ins, mod)
        assert _rel(_update(by["tsv"].checkpoint.path, mod), torch.from_numpy(ref_tsv(taus))) < 1e-5
        assert _rel(_update(by["iso_c"].checkpoint.path, mod), torch.from_numpy(ref_iso_c(taus))) < 1e-5
        ties = ref_best_rank(ref_ties(torch.zeros_like(taus[0]), taus, [1.0] * 3, 0.5), 4)   # default rank: max r
        assert _rel(_update(by["ties"].checkpoint.path, mod), ties) < 1e-9
    # re-run: every point up to date, nothing written (no file added, none touched)
    before = _files(tmp_path / "sw")
    again = api.sweep_results(reg, run="sft", last=3, method=METHODS5, params=p, space="delta", out=tmp_path / "sw")
    assert [r.status for r in again] == [engine.UP_TO_DATE] * 5
    assert [r.checkpoint.id for r in again] == [r.checkpoint.id for r in res]
    assert _files(tmp_path / "sw") == before
    assert len(reg.checkpoints("sft", merged=True)) == 5
    # the equal single merge at the sweep's output is up to date with the sweep point
    for m, r in zip(METHODS5, res):
        one = api.merge_spec_run(reg, run="sft", last=3, method=m, params=r.spec.params, space="delta",
                                 out=r.checkpoint.path)
        assert one.status == engine.UP_TO_DATE and one.checkpoint.id == r.checkpoint.id
    assert _files(tmp_path / "sw") == before


def test_grid_extension_computes_only_new_points_and_single_merge_counts(tmp_path):
    """Extending the grid computes one new point (the rest up to date, untouched); a point made
    before by a single merge at the sweep's output is up to date in the sweep; duplicates
    (base pretrained given or implied) are merged once; rank names and truncates."""
    reg = _adapters(tmp_path, SPECS)
    out = tmp_path / "sw"
    first = api.sweep_results(reg, run="sft", last=[2, 3], method=["tsv", "ties"], params={"density": 0.5},
                              space="delta", rank=3, out=out)
    assert [r.status for r in first] == [engine.MERGED] * 4
    assert all(r.checkpoint.name.endswith("_delta_r3") for r in first)
    before = _files(out)
    ext = api.sweep_results(reg, run="sft", last=[2, 3], method=["tsv", "ties", "iso_c"], params={"density": 0.5},
                            space="delta", rank=3, out=out)
    assert [r.status for r in ext].count(engine.MERGED) == 2   # iso_c for K = 2 and K = 3: the new points
    ext2 = api.sweep_results(reg, run="sft", last=[2, 3, 1], method=["tsv"], params={"density": 0.5},
                             space="delta", rank=3, out=out)
    assert [r.status for r in ext2] == [engine.UP_TO_DATE, engine.UP_TO_DATE, engine.MERGED]   # one new point
    now = _files(out)
    assert all(now[f] == t for f, t in before.items())   # the earlier points' files untouched
    # a single merge first, then the sweep finds it up to date
    single = api.merge_spec_run(reg, run="sft", last=3, method="star", space="delta", rank=3,
                                out=out / "star_last_3_base_pretrained_incl_final_delta_r3")
    assert single.status == engine.MERGED
    sw = api.sweep_results(reg, run="sft", last=3, method=["star"], space="delta", rank=3, out=out)
    assert sw[0].status == engine.UP_TO_DATE and sw[0].checkpoint.id == single.checkpoint.id
    # duplicates: ties with base pretrained given and ties with it implied are one merge
    ins = reg.select("sft", 3)
    specs = [engine.make_spec(reg, "ties", ins, params={"density": 0.3}, selection={"last": 3}, space="delta"),
             engine.make_spec(reg, "ties", ins, params={"density": 0.3}, base="pretrained", selection={"last": 3},
                              space="delta")]
    assert specs[0].name == specs[1].name
    got = engine.sweep_results(reg, specs, space="delta")
    assert got[0].checkpoint.id == got[1].checkpoint.id and got[0].status == engine.MERGED
    c = got[0].checkpoint
    assert c.name == "ties_last_3_base_pretrained_incl_final_delta_d0_3"
    for mod in MODS:
        taus = _taus(ins, mod)
        assert _rel(_update(c.path, mod), ref_best_rank(ref_ties(torch.zeros_like(taus[0]), taus, [1.0] * 3, 0.3),
                                                         4)) < 1e-9
    cfg = json.loads((Path(first[0].checkpoint.path) / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3


def test_core_space_sweep(tmp_path):
    """A core-space sweep: element-wise methods are the core-space variant (core_ prefix, equal to
    U_B · TIES(M_t) · V_A), the SVD family carries the _core suffix and equals delta space; each
    point is up to date with the equal single merge."""
    reg = _adapters(tmp_path, SPECS)
    res = api.sweep_results(reg, run="sft", last=3, method=["ties", "tsv"], params={"density": 0.5}, space="core",
                            out=tmp_path / "sw")
    assert [r.checkpoint.name for r in res] == ["core_ties_last_3_base_pretrained_incl_final",
                                                "tsv_last_3_base_pretrained_incl_final_core"]
    ins = reg.select("sft", 3)
    for mod in MODS:
        UB, VA, Ms = ref_core([_factors(x, mod) for x in ins])
        M = ref_ties(torch.zeros_like(Ms[0]), Ms, [1.0] * 3, 0.5)
        assert _rel(_update(res[0].checkpoint.path, mod), UB @ M @ VA) < 1e-9
        assert _rel(_update(res[1].checkpoint.path, mod), torch.from_numpy(ref_tsv(_taus(ins, mod)))) < 1e-5
    for m, r in zip(["ties", "tsv"], res):
        one = api.merge_spec_run(reg, run="sft", last=3, method=m, params=r.spec.params, space="core",
                                 out=r.checkpoint.path)
        assert one.status == engine.UP_TO_DATE and one.checkpoint.id == r.checkpoint.id
    assert reg.lineage(res[0].checkpoint)["params"]["space"] == "core"


def test_every_point_checked_and_locked_before_any_is_computed(tmp_path):
    """A point that cannot be made (iso_cts is dense only) or whose target another thread is
    writing refuses the whole sweep before any point is computed: nothing registered or written."""
    reg = _adapters(tmp_path, SPECS)
    out = tmp_path / "sw"
    with pytest.raises(ParameterError, match="space='delta'.*not iso_cts"):
        api.sweep(reg, run="sft", last=3, method=["tsv", "iso_cts"], space="delta", out=out)
    assert reg.checkpoints("sft", merged=True) == [] and _files(out) == {}
    from ckptreg.writer import TargetLock

    held, release = threading.Event(), threading.Event()

    def hold():
        lk = TargetLock(out / "iso_c_last_3_base_pretrained_incl_final_delta").acquire()
        held.set()
        release.wait(30)
        lk.release(keep=False)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(30)
        with pytest.raises(TargetBusyError, match="iso_c_last_3"):
            api.sweep(reg, run="sft", last=3, method=["tsv", "iso_c"], space="delta", out=out)
    finally:
        release.set()
        t.join()
    assert reg.checkpoints("sft", merged=True) == []
    assert not (out / "tsv_last_3_base_pretrained_incl_final_delta").exists()
    # rank in factor space and an unknown space are refused before anything
    with pytest.raises(ParameterError, match="rank only applies"):
        engine.sweep(reg, api.plan_sweep(reg, run="sft", last=2, method=["uniform"], out=out).specs, rank=2)
    with pytest.raises(ParameterError, match="space must be"):
        engine.sweep(reg, api.plan_sweep(reg, run="sft", last=2, method=["uniform"], out=out).specs, space="dense")


def test_failing_point_leaves_nothing_earlier_points_stay(tmp_path):
    """The oldest adapter is rewritten while the first points are computed: the K = 3 points that
    read it fail with ChangedError and leave nothing of themselves; the K = 2 points computed
    before are complete, registered outputs and stay; a re-run after fixing computes the rest."""
    reg = _adapters(tmp_path, SPECS)
    out = tmp_path / "sw"
    oldest = reg.first("sft")
    f = Path(oldest.path) / "adapter_model.safetensors"
    orig = load_any(oldest.path)
    done = []

    def progress(d, total, name):
        if not done:
            done.append(1)
            save_file({k: v + 1 for k, v in orig.items()}, str(f))   # a concurrent change of an input

    with pytest.raises(ChangedError):
        api.sweep(reg, run="sft", last=[2, 3], method=["tsv", "ties"], params={"density": 0.5}, space="delta",
                  out=out, progress=progress)
    kept = {c.name for c in reg.checkpoints("sft", merged=True)}
    assert kept == {"tsv_last_2_base_pretrained_incl_final_delta", "ties_last_2_base_pretrained_incl_final_delta"}, kept
    on_disk = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert sorted(kept) == on_disk, on_disk   # no partial output of a failed point
    assert not [p for p in out.iterdir() if "ckptreg-tmp" in p.name]
    save_file(orig, str(f))
    reg.add(oldest.path, run="sft", step=oldest.step, replace=True)
    res = api.sweep_results(reg, run="sft", last=[2, 3], method=["tsv", "ties"], params={"density": 0.5},
                            space="delta", out=out)
    assert [r.status for r in res] == [engine.UP_TO_DATE] * 2 + [engine.MERGED] * 2


def test_cli_sweep_space_delta_and_core(tmp_path):
    """`ckptreg sweep --space delta --rank R` and `--space core` in-process: names, one row per
    point, a re-run all up to date; the sweep point and `ckptreg merge` of it share a name and
    output; --rank without --space delta|core is refused (exit 8), nothing registered."""
    reg = _adapters(tmp_path, SPECS)
    db = str(reg.path)
    del reg
    args = ["--db", db, "sweep", "--run", "sft", "--last", "2,3", "--method", "tsv,ties", "--density", "0.5",
            "--space", "delta", "--rank", "3", "-o", str(tmp_path / "sw"), "--json", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads(r.stdout)
    assert len(rows) == 4 and all(x["status"] == "merged" and x["name"].endswith("_delta_r3") for x in rows), rows
    before = _files(tmp_path / "sw")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and all(x["status"] == "up to date" for x in json.loads(r.stdout)), r.output
    assert _files(tmp_path / "sw") == before
    tsv3 = next(x for x in rows if x["name"].startswith("tsv_last_3"))
    # (a sweep gives every point its parameters: the single merge of that point gets --density too)
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "sft", "--last", "3", "--method", "tsv",
                                  "--density", "0.5", "--space", "delta", "--rank", "3", "-o", tsv3["path"],
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["status"] == "up to date" and got["id"] == tsv3["id"] and got["name"] == tsv3["name"]
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "sft", "--last", "3", "--method", "ties,tsv",
                                  "--density", "0.5", "--space", "core", "-o", str(tmp_path / "swc"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert [x["name"] for x in json.loads(r.stdout)] == ["core_ties_last_3_base_pretrained_incl_final",
                                                         "tsv_last_3_base_pretrained_incl_final_core"]
    n = len(Registry(db).checkpoints("sft", merged=True))
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "sft", "--last", "2", "--method", "uniform",
                                  "--rank", "3", "-o", str(tmp_path / "swf"), "-q"])
    assert r.exit_code == 8 and "rank only applies to space='delta' or 'core'" in r.output, r.output
    assert len(Registry(db).checkpoints("sft", merged=True)) == n and not (tmp_path / "swf").exists()


def test_cli_sweep_space_delta_refuses_full_models(tmp_path):
    """--space delta on full models: exit 8 naming the space, nothing registered or written."""
    from helpers_files import random_full_state

    reg = Registry(tmp_path / "reg.duckdb")
    for i in range(2):
        f = tmp_path / "full" / f"step-{i + 1}.safetensors"
        f.parent.mkdir(exist_ok=True)
        save_file(random_full_state(i), str(f))
        reg.add(f, run="m", step=i + 1, metrics={"train_loss": 1.0 - 0.1 * i})
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "m", "--last", "2", "--method", "uniform,ties",
                                  "--density", "0.5", "--space", "delta", "-o", str(tmp_path / "sw"), "-q"])
    assert r.exit_code == 8 and "space='delta' needs LoRA adapters" in r.output, r.output
    assert Registry(db).checkpoints("m", merged=True) == []
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_distributed_delta_sweep_equals_single_process(tmp_path):
    """`ckptreg sweep --space delta --nproc-per-node 2`: each update-space point runs as a
    distributed merge; every output byte for byte the single-process sweep's, registered once,
    with the same names and lineage, nothing left behind."""
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import _compare, _env, _inputs, _no_temporaries

    reg_d, reg_s = _inputs(tmp_path / "in", [tmp_path / "d.duckdb", tmp_path / "s.duckdb"])
    args = ["sweep", "--run", "sft", "--last", "2,3", "--method", "tsv,ties", "--density", "0.5", "--space", "delta",
            "--rank", "3", "--json", "-q"]
    r = subprocess.run([sys.executable, "-m", "ckptreg", "--db", str(tmp_path / "d.duckdb")] + args
                       + ["-o", str(tmp_path / "dist"), "--nproc-per-node", "2"],
                       env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows_d = json.loads(r.stdout)
    s = CliRunner().invoke(main, ["--db", str(tmp_path / "s.duckdb")] + args + ["-o", str(tmp_path / "single")])
    assert s.exit_code == 0, s.output
    rows_s = json.loads(s.stdout)
    assert [x["name"] for x in rows_d] == [x["name"] for x in rows_s] and len(rows_d) == 4
    assert len(reg_d.checkpoints("sft", merged=True)) == 4
    _compare(reg_d, reg_s, [x["id"] for x in rows_d], [x["id"] for x in rows_s])
    _no_temporaries(tmp_path / "dist")
