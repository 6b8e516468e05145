"""Many real processes adding into one registry file: nothing lost, nothing doubled, no exception.

Each worker is a fresh interpreter (``subprocess``), so DuckDB's one-writer-process rule, the lock
file and the spool are exercised for real.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest

from ckptreg.registry import Registry
from helpers_files import raw_safetensors

N_PROCS = 4
N_ADDS = 100

WORKER = textwrap.dedent("""
    import json, pathlib, struct, sys, time
    from ckptreg.registry import Registry
    db, path, worker, n, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    reg = Registry(db, lock_timeout=timeout)
    template = pathlib.Path(path).read_bytes()[:-12]   # the header; each step saves its own weights
    ids, spooled = 0, 0
    for i in range(n):
        step = worker * 100000 + i
        f = pathlib.Path(path).with_name(f"w{worker}-{i}.safetensors")
        f.write_bytes(template + struct.pack("<3f", step, i, worker))
        cid = reg.add(f, "shared", step=step, metrics={"loss": 1.0 / (i + 1), "worker": worker})
        if cid is None:
            spooled += 1
        else:
            ids += 1
        if i % 10 == 0:
            reg.log(cid if cid is not None else f"shared@{step}", {"eval": float(i)})
    print(json.dumps({"ids": ids, "spooled": spooled}))
""")


def _run_workers(tmp_path, db, timeout):
    files = []
    for w in range(N_PROCS):
        p = tmp_path / f"w{w}.safetensors"
        raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(range(12)))
        files.append(p)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(db), str(files[w]), str(w), str(N_ADDS), str(timeout)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(N_PROCS)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        assert "Traceback" not in err, err
        results.append(json.loads(out))
    return results


def _check_all_present(db):
    reg = Registry(db, lock_timeout=60)
    reg.ingest()
    assert reg.spool_status() == {"pending": [], "rejected": []}
    _, rows = reg.sql("SELECT step, count(*) FROM checkpoints WHERE run = 'shared' GROUP BY step")
    counts = dict(rows)
    expected = {w * 100000 + i for w in range(N_PROCS) for i in range(N_ADDS)}
    assert set(counts) == expected
    assert set(counts.values()) == {1}
    _, rows = reg.sql("SELECT count(*) FROM metrics WHERE name = 'loss'")
    assert rows[0][0] == N_PROCS * N_ADDS
    _, rows = reg.sql("SELECT count(*), count(DISTINCT checkpoint_id) FROM metrics WHERE name = 'eval'")
    assert rows[0] == (N_PROCS * N_ADDS // 10, N_PROCS * N_ADDS // 10)
    _, rows = reg.sql("SELECT count(*) FROM tensors")
    assert rows[0][0] == 2 * N_PROCS * N_ADDS
    c = reg.get(f"shared@{3 * 100000 + 10}")
    assert c.metrics == {"loss": pytest.approx(1 / 11), "worker": 3.0, "eval": 10.0}


def test_concurrent_writers_all_present(tmp_path):
    db = tmp_path / "conc.duckdb"
    results = _run_workers(tmp_path, db, timeout=120.0)
    assert sum(r["ids"] + r["spooled"] for r in results) == N_PROCS * N_ADDS
    _check_all_present(db)


def test_concurrent_writers_short_timeout_spool_then_ingest(tmp_path):
    db = tmp_path / "conc.duckdb"
    results = _run_workers(tmp_path, db, timeout=0.005)
    total_spooled = sum(r["spooled"] for r in results)
    assert sum(r["ids"] + r["spooled"] for r in results) == N_PROCS * N_ADDS
    assert total_spooled > 0, results  # with a 5 ms bound and 4 writers, some must have spooled
    _check_all_present(db)


def test_threads_in_one_process(tmp_path):
    """Threads share DuckDB's per-process instance cache: writers and readers must still serialise."""
    import threading

    db = tmp_path / "threads.duckdb"
    p = tmp_path / "w.safetensors"
    raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    errors, spooled = [], []

    def work(t):
        reg = Registry(db, lock_timeout=60)
        try:
            for i in range(15):
                f = raw_safetensors(tmp_path / f"w{t}-{i}.safetensors",  # each step saves its own weights
                                    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                    struct.pack("<2f", t, i))
                if reg.add(f, "t", step=t * 1000 + i, metrics={"loss": i}) is None:
                    spooled.append(1)
                reg.checkpoints("t")
                reg.get(f"t@{t * 1000}")
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    reg = Registry(db)
    reg.ingest()
    assert sorted(c.step for c in reg.checkpoints("t")) == sorted(t * 1000 + i for t in range(4) for i in range(15))
