"""Distributed merges (issue #11 item 4): real torchrun / launcher-API jobs of 2 and 3 gloo ranks on
localhost; every output tensor byte for byte the single-process merge's, registered once with the
same lineage; a rank killed mid-merge leaves nothing registered and nothing behind.

This file is also the worker the jobs run (``python tests/test_distributed.py worker ...``)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# every merge of a job: (key, refs, method, params, base, space)
MERGES = [
    ("lin", ["sft@20", "sft@30", "sft@40"], "linear", {}, None, "factors"),
    ("ties", ["sft@20", "sft@30", "sft@40"], "ties", {"density": 0.5}, "sft@10", "factors"),
    ("dare", ["sft@20", "sft@30", "sft@40"], "dare_ties", {"density": 0.6, "seed": 3}, "sft@10", "factors"),
    ("slerp", ["sft@30", "sft@40"], "slerp", {"t": 0.3}, None, "factors"),
    ("cart", ["sft@20", "sft@30", "sft@40"], "cart", {"rank_ratio": 0.5}, None, "factors"),
    ("delta", ["sft@20", "sft@30", "sft@40"], "linear", {}, None, "delta"),
    ("delta_ties", ["sft@20", "sft@30", "sft@40"], "ties", {"density": 0.5}, None, "delta"),
    ("hf_ties", ["full@200", "full@300", "full@400"], "ties", {"density": 0.4}, "full@100", "factors"),
    ("file_lin", ["files@10", "files@20", "files@30"], "linear", {}, None, "factors"),
]
SWEEP = dict(run="files", last=(2, 3), every=(1,), method=("uniform", "mwa"), metric=("train_loss",), penalty=(0.5,))


# ------------------------------------------------------------------------------------------------
# the worker (runs in every rank)

def _run_all(db, out, keys):
    from ckptreg import api, engine
    from ckptreg.registry import Registry

    reg = Registry(db)
    res = {}
    for key, refs, method, params, base, space in MERGES:
        if key not in keys:
            continue
        spec = api.plan_merge(reg, refs, method=method, params=params, base=base, space=space,
                              out=str(Path(out) / (key + (".safetensors" if key.startswith("file") else ""))),
                              name=f"m_{key}")
        c = engine.merge(reg, spec, space=space, chunk_elems=40, progress=_stall())
        res[key] = c.id
    if "sweep" in keys:
        specs, _ = api.expand_sweep(reg, out=str(Path(out) / "sweep"), **SWEEP)
        got = engine.sweep(reg, specs, chunk_elems=40)
        res["sweep"] = [c.id for c in got]
    return res


def _stall():
    """CKPTREG_TEST_STALL=RANK:MARKER: that rank, once it has written its first chunk, writes its
    pid to MARKER and sleeps (so the test can kill it mid-merge)."""
    spec = os.environ.get("CKPTREG_TEST_STALL")
    if not spec or spec.split(":", 1)[0] != os.environ.get("RANK"):
        return None
    marker = spec.split(":", 1)[1]

    def progress(done, total, name):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)

    return progress


def worker(argv):
    db, out, keys, result = argv[0], argv[1], argv[2].split(","), argv[3]
    res = _run_all(db, out, keys)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{result}.{rank}").write_text(json.dumps(res))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[2:])
    sys.exit(0)

# ------------------------------------------------------------------------------------------------
# the tests

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(HERE))
from helpers_files import random_full_state, random_lora_state, write_hf_model, write_peft_adapter  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(root: Path, dbs):
    """The same input files registered, in the same order, into every registry of ``dbs``."""
    from ckptreg.registry import Registry

    regs = [Registry(d) for d in dbs]
    lora, full, files = [], [], []
    for i, s in enumerate((10, 20, 30, 40)):
        lora.append((write_peft_adapter(root / "sft" / f"checkpoint-{s}",
                                        random_lora_state(100 + i, n_layers=3, d=24, r=4), r=4, alpha=8, d=24), s))
    for i, s in enumerate((100, 200, 300, 400)):
        full.append((write_hf_model(root / "full" / f"checkpoint-{s}", random_full_state(10 + i, n_layers=3, d=16),
                                    shards=2), s))
    for i, s in enumerate((10, 20, 30)):
        p = root / "files" / f"step_{s}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(50 + i)
        save_file({f"layer.{k}.w": torch.randn(17 + 3 * k, 9, generator=g) for k in range(7)}
                  | {"emb": torch.randn(120, 8, generator=g).to(torch.bfloat16), "steps": torch.arange(5) + i}, str(p))
        files.append((p, s))
    for reg in regs:
        for i, (p, s) in enumerate(lora):
            reg.add(p, run="sft", step=s, metrics={"train_loss": 1.0 / (1 + i)})
        for i, (p, s) in enumerate(full):
            reg.add(p, run="full", step=s, metrics={"train_loss": 2.0 - 0.1 * i})
        for i, (p, s) in enumerate(files):
            reg.add(p, run="files", step=s, metrics={"train_loss": 1.0 + 1.0 / s})
    return regs


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env["CKPTREG_DIST_TIMEOUT"] = "60"
    env.pop("CKPTREG_DB", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(n, args, timeout=120, cwd=None, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"] + args
    if not wait:
        return subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tensors(path) -> dict:
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} twice in {p}"
                out[k] = h.get_tensor(k)
    return out


def _same_bytes(a_path, b_path):
    a, b = _tensors(a_path), _tensors(b_path)
    assert set(a) == set(b) and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(torch.uint8).numpy().tobytes() == \
            b[k].contiguous().view(torch.uint8).numpy().tobytes(), f"{k} differs in {a_path}"


def _no_temporaries(folder: Path):
    left = [p for p in folder.rglob("*") if ".ckptreg-tmp" in p.name or p.name.startswith("part-")
            or "ckptreg-lock" in p.name]
    assert not left, left


def _compare(reg_d, reg_s, ids_d, ids_s):
    for cd, cs in zip(ids_d, ids_s):
        a, b = reg_d.get(cd), reg_s.get(cs)
        assert a.name == b.name and a.merged and b.merged
        _same_bytes(a.path, b.path)
        la, lb = reg_d.lineage(a), reg_s.lineage(b)
        assert la["method"] == lb["method"] and la["inputs"] == lb["inputs"] and la["base"] == lb["base"]
        assert {k: v for k, v in la["params"].items() if k != "selection"} == \
            {k: v for k, v in lb["params"].items() if k != "selection"}


def _single(db, out, keys):
    sys.path.insert(0, str(ROOT))
    return _run_all(db, out, keys)


def _check_job(tmp_path, n, keys, res_d, reg_d, reg_s):
    res_s = _single(tmp_path / "s.duckdb", tmp_path / "single", keys)
    per_rank = [json.loads(Path(f"{tmp_path / 'res'}.{r}").read_text()) for r in range(n)]
    assert all(p == per_rank[0] for p in per_rank), per_rank   # every rank returned the same checkpoints
    merged = reg_d.checkpoints(merged=True)
    n_out = sum(len(v) if isinstance(v, list) else 1 for v in per_rank[0].values())
    assert len(merged) == len({c.id for c in merged}) == n_out   # registered once each
    for k in keys:
        a, b = per_rank[0][k], res_s[k]
        _compare(reg_d, reg_s, a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])
    _no_temporaries(tmp_path / "dist")


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_merges_equal_single_process_bytes(tmp_path, n):
    regs = _inputs(tmp_path / "in", [tmp_path / "d.duckdb", tmp_path / "s.duckdb"])
    keys = [m[0] for m in MERGES] + ["sweep"]
    r = _torchrun(n, [str(HERE / "test_distributed.py"), "worker", str(tmp_path / "d.duckdb"),
                      str(tmp_path / "dist"), ",".join(keys), str(tmp_path / "res")], timeout=180)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    _check_job(tmp_path, n, keys, None, *regs)
    # the layout: one shard (at least) per rank + the index; a PEFT adapter stays one file
    idx = json.loads((tmp_path / "dist" / "file_lin" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == n
    assert (tmp_path / "dist" / "delta" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "dist" / "delta" / "adapter_config.json").is_file()


def _staging(folder: Path) -> list:
    return [p for p in folder.glob(".*ckptreg-tmp*")] if folder.is_dir() else []


@pytest.mark.slow
def test_rank_killed_mid_merge_leaves_nothing(tmp_path):
    """kill -9 of rank 1 once it has started writing its shard in the staging folder: every rank
    aborts, nothing is registered, no shard, temporary or lock is left."""
    (reg,) = _inputs(tmp_path / "in", [tmp_path / "d.duckdb"])
    marker = tmp_path / "stalled"
    env_extra = {"CKPTREG_TEST_STALL": f"1:{marker}"}
    os.environ.update(env_extra)
    try:
        p = _torchrun(2, [str(HERE / "test_distributed.py"), "worker", str(tmp_path / "d.duckdb"),
                          str(tmp_path / "dist"), "hf_ties", str(tmp_path / "res")], wait=False)
    finally:
        os.environ.pop("CKPTREG_TEST_STALL")
    try:
        deadline = time.time() + 90
        while not marker.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), p.stdout.read().decode()[-3000:] if p.poll() is not None else "no marker"
        time.sleep(0.2)
        staged = _staging(tmp_path / "dist")
        assert staged and any(f.suffix == ".safetensors" for f in staged[0].iterdir())   # rank 1 is writing
        os.kill(int(marker.read_text()), signal.SIGKILL)
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    text = out.decode()
    # the surviving rank aborts either at its next collective (the lost peer) or on the SIGTERM
    # torchrun's agent sends every rank once one died, whichever comes first; both clean up. Its
    # message can still be cut off when the SIGTERM lands after the cleanup, while the traceback
    # prints (the handler is the default one again by then): then torchrun's own line says so
    assert ("another rank failed or was lost" in text or "stopped by SIGTERM" in text
            or "closing signal SIGTERM" in text), text[-3000:]
    assert reg.checkpoints(merged=True) == []
    assert not (tmp_path / "dist" / "hf_ties").exists()
    _no_temporaries(tmp_path / "dist")


def _cli(n_or_torchrun, args, cwd):
    if n_or_torchrun == "torchrun":
        return _torchrun(2, ["-m", "ckptreg", "--"] + args, cwd=cwd)
    return subprocess.run([sys.executable, "-m", "ckptreg"] + args + ["--nproc-per-node", str(n_or_torchrun)],
                          env=_env(), cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("form", [3, "torchrun"])
def test_cli_invocation_forms(tmp_path, form):
    """``ckptreg merge ... --nproc-per-node 3`` (the launcher API) and the plain torchrun form
    ``torchrun ... -m ckptreg -- merge --run ...`` (ckptreg's options as typed, --run included),
    byte for byte the single-process merge; a NaN in an input on one rank's share fails every rank
    with the same error (exit 17), nothing registered or left."""
    from ckptreg.cli import main
    from click.testing import CliRunner

    regs = _inputs(tmp_path / "in", [tmp_path / "d.duckdb", tmp_path / "s.duckdb"])
    args = ["merge", "--run", "files", "--last", "3", "--method", "dare_ties", "--density", "0.5", "--base", "first",
            "-o"]
    r = _cli(form, ["--db", str(tmp_path / "d.duckdb")] + args + [str(tmp_path / "dist" / "m.safetensors")],
             cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    lines = [x for x in r.stdout.splitlines() if "\t" in x]
    assert len(lines) == 1   # rank 0 prints the result, the other ranks nothing
    s = CliRunner().invoke(main, ["--db", str(tmp_path / "s.duckdb")] + args + [str(tmp_path / "m.safetensors")])
    assert s.exit_code == 0, s.output
    (a,), (b,) = regs[0].checkpoints(merged=True), regs[1].checkpoints(merged=True)
    assert lines[0].split("\t") == [str(a.id), a.name] and a.name == b.name
    assert Path(a.path) == tmp_path / "dist" / "m" and Path(b.path).is_file()
    _compare(regs[0], regs[1], [a.id], [b.id])

    # a NaN in one tensor of one input: only the rank merging that tensor fails; all abort
    g = torch.Generator().manual_seed(7)
    bad = {f"layer.{k}.w": torch.randn(17 + 3 * k, 9, generator=g) for k in range(7)}
    bad["layer.6.w"][2, 3] = float("nan")
    for i, s_ in enumerate((10, 20)):
        f = tmp_path / "bad" / f"step_{s_}.safetensors"
        f.parent.mkdir(exist_ok=True)
        save_file(bad if i else {k: v.nan_to_num() + 1 for k, v in bad.items()}, str(f))
        regs[0].add(f, run="bad", step=s_)
    r = _cli(form, ["--db", str(tmp_path / "d.duckdb"), "merge", "--run", "bad", "--last", "2", "-o",
                    str(tmp_path / "dist2" / "bad.safetensors")], cwd=tmp_path)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "has NaN values" in text and "rank " in text, text[-3000:]
    if form != "torchrun":
        assert r.returncode == 17
    assert [c.id for c in regs[0].checkpoints(merged=True)] == [a.id]
    assert not (tmp_path / "dist2" / "bad").exists()
    _no_temporaries(tmp_path / "dist2") if (tmp_path / "dist2").exists() else None
