"""Registry benchmarks (pytest-benchmark). Run:

    python -m pytest bench/bench_registry.py --benchmark-only -s

Targets: ``ckptreg add`` CLI wall <= 0.3 s (subprocess); Python ``Registry.add`` of a 500-tensor
adapter <= 20 ms; "last 10 by step" and "best by metric" at 100k registered checkpoints <= 50 ms.
Every measurement is also reported as a ratio to a floor measured in the same run on the same
machine (bare interpreter start; a bare DuckDB connect+close), since the host is shared.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckptreg.registry import Registry

N_BIG = 100_000
RESULTS: dict[str, dict] = {}


def _median(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _adapter(folder, n_tensors=500, d=64, r=8):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    rng = np.random.default_rng(0)
    for i in range(n_tensors // 2):
        pre = f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"
        tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((r, d), dtype=np.float32)
        tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((d, r), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny"}))
    return folder


def _report(name, median_s, target_s, floor_s=None, floor_name=None):
    r = {"median_ms": round(median_s * 1e3, 2), "target_ms": target_s * 1e3, "meets": median_s <= target_s}
    if floor_s:
        r[f"floor_{floor_name}_ms"] = round(floor_s * 1e3, 2)
        r["ratio_to_floor"] = round(median_s / floor_s, 2)
    RESULTS[name] = r
    print(f"\n[bench_registry] {name}: {json.dumps(r)}")


def _ckptreg_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "ckptreg")
    return [exe] if os.path.exists(exe) else [sys.executable, "-c", "import sys; from ckptreg.cli import main; sys.exit(main())"]


def test_cli_add_wall(benchmark, tmp_path):
    p = _adapter(tmp_path / "adapter", n_tensors=16)
    db = tmp_path / "cli.duckdb"
    cmd = _ckptreg_cmd()
    steps = itertools.count()
    env = dict(os.environ, CKPTREG_DB=str(db))
    subprocess.run(cmd + ["add", str(p), "--run", "warm", "--step", "0"], env=env, check=True, capture_output=True)

    def add():
        subprocess.run(cmd + ["add", str(p), "--run", "r", "--step", str(next(steps)), "--metric", "loss=0.5"],
                       env=env, check=True, capture_output=True)

    floor = _median(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 10)
    benchmark.pedantic(add, rounds=15, iterations=1)
    _report("cli_add_wall", benchmark.stats.stats.median, 0.3, floor, "python_startup")


def test_api_add_500_tensors(benchmark, tmp_path):
    import duckdb

    p = _adapter(tmp_path / "adapter", n_tensors=500)
    reg = Registry(tmp_path / "api.duckdb")
    reg.add(p, "warm", step=0)
    steps = itertools.count(1)
    floor = _median(lambda: duckdb.connect(str(tmp_path / "floor.duckdb")).close(), 10)
    benchmark.pedantic(lambda: reg.add(p, "r", step=next(steps), metrics={"loss": 0.1}), rounds=30, iterations=1)
    assert reg.get("r@1").n_tensors == 500
    _report("api_add_500_tensors", benchmark.stats.stats.median, 0.020, floor, "duckdb_connect_close")


@pytest.fixture(scope="module")
def big_registry(tmp_path_factory):
    """100k checkpoints (10 runs x 10k steps) and 2 metrics each, built with bulk SQL."""
    import duckdb

    tmp = tmp_path_factory.mktemp("big")
    reg = Registry(tmp / "big.duckdb")
    with reg.batch():  # creates the schema
        pass
    con = duckdb.connect(str(reg.path))
    con.execute("BEGIN")
    con.execute(f"""INSERT INTO runs SELECT 'run-' || r, now(), NULL, NULL FROM range(10) t(r)""")
    con.execute(f"""
        INSERT INTO checkpoints SELECT i + 1, 'run-' || (i % 10), (i // 10) * 100, NULL,
            '/ckpt/' || i, 'peft', 'lora', 'tiny', 8, 2048, 8192, md5(i::VARCHAR), now(),
            '{{}}', '{{"r": 8}}', false, '[]', '[]'
        FROM range({N_BIG}) t(i)""")
    con.execute(f"""
        INSERT INTO metrics (seq, checkpoint_id, name, value, step, logged, latest)
        SELECT row_number() OVER (), c.id, m.name,
            CASE WHEN c.id % 997 = 0 THEN 'nan'::DOUBLE ELSE random() END, c.step, now(), true
        FROM checkpoints c, (VALUES ('loss'), ('acc')) m(name)""")
    con.execute("COMMIT")
    n = con.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    con.close()
    assert n == N_BIG
    return reg


def test_last10_by_step_100k(benchmark, big_registry):
    import duckdb

    floor = _median(lambda: duckdb.connect(str(big_registry.path), read_only=True).close(), 10)
    got = benchmark.pedantic(lambda: big_registry.select("run-3", 10), rounds=30, iterations=1)
    assert [c.step for c in got] == [(9990 + i) * 100 for i in range(10)]
    _report("last10_by_step_100k", benchmark.stats.stats.median, 0.050, floor, "duckdb_connect_close")


def test_best_by_metric_100k(benchmark, big_registry):
    import duckdb

    floor = _median(lambda: duckdb.connect(str(big_registry.path), read_only=True).close(), 10)
    got = benchmark.pedantic(lambda: big_registry.best("run-7", "loss"), rounds=30, iterations=1)
    assert got.run == "run-7" and got.metrics["loss"] == got.metrics["loss"]  # never NaN
    _report("best_by_metric_100k", benchmark.stats.stats.median, 0.050, floor, "duckdb_connect_close")


def test_zz_summary():
    print("\n[bench_registry] summary " + json.dumps(RESULTS, indent=1))
