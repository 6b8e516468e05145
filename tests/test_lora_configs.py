"""LoRA adapter configs: validation at `add`, PEFT's alpha_pattern/rank_pattern matching, and
factor-space merges refused when the adapters' scalings differ (delta space handles them exactly).

Everything through real files: PEFT adapter folders written by PEFT itself or by
helpers_files.write_peft_adapter, DuckDB registries in tmp_path, the CLI in-process."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptreg import engine, formats
from ckptreg.cli import main
from ckptreg.errors import FormatError, MismatchError
from ckptreg.registry import Registry
from helpers_files import random_lora_state, write_peft_adapter

D, R = 24, 4


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


def _adapter(tmp_path, step, seed, **kw):
    kw.setdefault("r", R)
    kw.setdefault("alpha", 8)
    t = random_lora_state(seed, n_layers=2, d=D, r=kw["r"])
    return write_peft_adapter(tmp_path / "run" / f"checkpoint-{step}", t, d=D, **kw)


# ------------------------------------------------------------------------------------------------
# PEFT's pattern matching, against PEFT itself

class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(12, 12)
        self.k_proj = torch.nn.Linear(12, 12)
        self.v_proj = torch.nn.Linear(12, 12)


class _Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Attn(), _Attn(), _Attn()])
        self.proj = torch.nn.Linear(12, 12)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Body()


# keys: "proj" (must match only model.proj, not q/k/v_proj), a full path, a full path that would
# match only with PEFT's "base_model.model." prefix left on, regexes, first-key-wins overlap
ALPHA_PATTERN = {
    "proj": 99,
    "model.layers.1.k_proj": 5,
    "model.model.layers.2.q_proj": 77,     # never applies in PEFT (module keys have no extra "model.")
    r"layers\.[02]\.v_proj": 3,
    r"layers\.\d\.v_proj": 11,             # layers.1.v_proj only: the key above wins for 0 and 2
    "q_proj": 6,
}
RANK_PATTERN = {"q_proj": 2, r"model\.layers\.2\.k_proj": 3}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_module_scaling_equals_peft(tmp_path, use_rslora):
    """ckptreg's per-module scaling of a PEFT-saved adapter equals PEFT's module.scaling["default"]
    for every module, with alpha_pattern/rank_pattern keys matched as PEFT matches them."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "proj"],
                          init_lora_weights=False, use_rslora=use_rslora,
                          alpha_pattern=dict(ALPHA_PATTERN), rank_pattern=dict(RANK_PATTERN))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Tiny(), cfg)
        folder = tmp_path / "adapter"
        model.save_pretrained(str(folder))
        loaded = peft.PeftModel.from_pretrained(_Tiny(), str(folder))
    want = {n: m.scaling["default"] for n, m in loaded.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert len(want) == 10
    assert want["base_model.model.model.proj"] == pytest.approx(99 / (math.sqrt(R) if use_rslora else R))

    info = formats.inspect(folder)
    got = {}
    for name, ti in info.tensors.items():
        pr = engine._lora_pair(name)
        if pr is not None and pr[1] == "A":
            got[pr[0].replace("\0", "")] = engine._module_scale(info.lora, pr[0], ti.shape[0])
    assert got.keys() == want.keys()
    for mod in want:
        assert got[mod] == want[mod], (mod, got[mod], want[mod])
    # the cases the old endswith/re.search matching got wrong
    den = (lambda r: math.sqrt(r)) if use_rslora else (lambda r: r)
    assert got["base_model.model.model.layers.0.k_proj"] == 8 / den(R)           # "proj" does not apply
    assert got["base_model.model.model.layers.2.q_proj"] == 6 / den(2)           # extra-"model." key does not
    assert got["base_model.model.model.layers.1.v_proj"] == 11 / den(R)
    assert got["base_model.model.model.layers.2.k_proj"] == 8 / den(3)


def test_pattern_key_semantics():
    keys = ["proj", r"layers\.\d\.v_proj", "model.layers.1.k_proj"]
    assert formats.lora_pattern_key(keys, "model.layers.0.q_proj") is None
    assert formats.lora_pattern_key(keys, "model.proj") == "proj"
    assert formats.lora_pattern_key(keys, "proj") == "proj"
    assert formats.lora_pattern_key(keys, "model.layers.3.v_proj") == r"layers\.\d\.v_proj"
    assert formats.lora_pattern_key(keys, "model.layers.1.k_proj") == "model.layers.1.k_proj"
    assert formats.lora_pattern_key(keys, "xmodel.layers.1.k_proj") is None
    assert formats.lora_module_key("base_model.model.model.layers.0.q_proj\0") == "model.layers.0.q_proj"


# ------------------------------------------------------------------------------------------------
# factor space refuses differing scalings; delta space merges them exactly

DIFFS = {
    "lora_alpha": ({"alpha": 8}, {"alpha": 16}, "lora_alpha=16"),
    "use_rslora": ({"alpha": 8}, {"alpha": 8, "use_rslora": True}, "use_rslora=True"),
    "alpha_pattern": ({"alpha": 8}, {"alpha": 8, "extra_config": {"alpha_pattern": {"v_proj": 2}}},
                      'alpha_pattern={"v_proj": 2}'),
}


@pytest.mark.parametrize("what", sorted(DIFFS))
def test_cli_factor_merge_refuses_differing_scalings(tmp_path, what):
    a, b, shown = DIFFS[what]
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, (step, kw) in enumerate(((10, a), (20, a), (30, b))):
        reg.add(_adapter(tmp_path, step, i, **kw), run="run", step=step)
    before = reg.dump()
    out = tmp_path / "merged"
    res = _cli(db, "merge", "--run", "run", "--last", 3, "-o", out, "-q")
    assert res.exit_code == MismatchError.exit_code, res.output
    assert "run@30" in res.output and "run@10" in res.output and shown in res.output, res.output
    assert "--space delta" in res.output
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert Registry(db).dump() == before
    # the same adapters merge in delta space
    res = _cli(db, "merge", "--run", "run", "--last", 3, "--space", "delta", "--rank", 3 * R, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    # equal scalings reached differently are not a difference: alpha/r = 8/4 = 2 = 4/sqrt(4) (rsLoRA)
    reg2 = Registry(tmp_path / "reg2.duckdb")
    reg2.add(_adapter(tmp_path / "x", 10, 0, alpha=8), run="x", step=10)
    reg2.add(_adapter(tmp_path / "x", 20, 1, alpha=4, use_rslora=True), run="x", step=20)
    res = _cli(tmp_path / "reg2.duckdb", "merge", "--run", "x", "--last", 2, "-o", tmp_path / "m2", "-q")
    assert res.exit_code == 0, res.output


def test_api_merge_and_sweep_refuse_before_writing(tmp_path):
    """engine.merge and engine.sweep raise MismatchError before anything is written, also in a
    sweep where another (good) merge would otherwise be written first."""
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, step in enumerate((10, 20, 30)):
        reg.add(_adapter(tmp_path, step, i, alpha=8), run="run", step=step)
    reg.add(_adapter(tmp_path, 40, 3, alpha=32), run="run", step=40)
    before = reg.dump()
    bad = reg.select("run", 2)                       # run@30 (alpha 8) and run@40 (alpha 32)
    with pytest.raises(MismatchError, match=r"(?s)run@30.*run@40: r=4, lora_alpha=32.*space='delta'"):
        engine.merge(reg, engine.make_spec(reg, "linear", bad, name="bad", out=str(tmp_path / "bad")))
    base = reg.get("run@10")
    with pytest.raises(MismatchError, match="run@40"):
        engine.merge(reg, engine.make_spec(reg, "task_arithmetic", [reg.get("run@20"), reg.get("run@40")],
                                           base=base, name="ta", out=str(tmp_path / "ta")))
    good = engine.make_spec(reg, "linear", [reg.get("run@10"), reg.get("run@20")], name="good",
                            out=str(tmp_path / "good"))
    ties = engine.make_spec(reg, "ties", bad, base=base, params={"density": 0.5}, name="ties",
                            out=str(tmp_path / "ties"))
    with pytest.raises(MismatchError, match="run@40"):
        engine.sweep(reg, [good, ties])
    assert not (tmp_path / "good").exists() and not (tmp_path / "ties").exists()
    assert not (tmp_path / "bad").exists() and not (tmp_path / "ta").exists()
    assert Registry(db).dump() == before


def test_cli_sweep_refuses_differing_scalings(tmp_path):
    """`ckptreg sweep` (factor space): the K=2 selection is fine, K=3 reaches an adapter with
    another lora_alpha; the whole sweep is refused before any of its outputs is written."""
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, (step, alpha) in enumerate(((10, 32), (20, 8), (30, 8))):
        reg.add(_adapter(tmp_path, step, i, alpha=alpha), run="run", step=step)
    before = reg.dump()
    out = tmp_path / "sw"
    res = _cli(db, "sweep", "--run", "run", "--last", "2,3", "--method", "uniform", "-o", out, "-q")
    assert res.exit_code == MismatchError.exit_code, res.output
    assert "run@10: r=4, lora_alpha=32" in res.output and "--space delta" in res.output, res.output
    assert not out.exists() or not any(out.iterdir())
    assert Registry(db).dump() == before


def test_factor_merge_refuses_adapter_without_config(tmp_path):
    """A bare LoRA .safetensors (no adapter_config.json: scaling unknown) with a PEFT adapter."""
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    reg.add(_adapter(tmp_path, 10, 0), run="run", step=10)
    bare = tmp_path / "bare" / "step_20.safetensors"
    bare.parent.mkdir()
    from safetensors.torch import save_file
    save_file(random_lora_state(1, 2, D, R), str(bare))
    reg.add(bare, run="run", step=20)
    before = reg.dump()
    res = _cli(db, "merge", "run@10", "run@20", "-o", tmp_path / "m", "-q")
    assert res.exit_code == MismatchError.exit_code, res.output
    assert "run@20 has no adapter_config.json" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "m").exists() and Registry(db).dump() == before


def test_delta_merge_of_differing_scalings_is_exact(tmp_path):
    """--space delta with different lora_alpha / rsLoRA / alpha_pattern equals the float64
    reference sum_i w_i s_i B_i A_i computed here from the files and the formula."""
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    cfgs = [
        dict(alpha=8),                                                     # s = 8/4
        dict(alpha=16, use_rslora=True),                                   # s = 16/2
        dict(alpha=3, extra_config={"alpha_pattern": {"v_proj": 20, "proj": 1000}}),  # q 3/4, v 20/4
    ]
    for i, kw in enumerate(cfgs):
        reg.add(_adapter(tmp_path, (i + 1) * 10, 40 + i, **kw), run="run", step=(i + 1) * 10)

    def scale(i, name):
        if i == 0:
            return 8 / R
        if i == 1:
            return 16 / math.sqrt(R)
        return (20 if ".v_proj." in name else 3) / R   # "proj" must not match q_proj/v_proj

    out = tmp_path / "merged"
    res = _cli(db, "merge", "--run", "run", "--last", 3, "--space", "delta", "--rank", 3 * R,
               "-o", out, "-q")
    assert res.exit_code == 0, res.output
    srcs = [load_file(str(tmp_path / "run" / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (10, 20, 30)]
    got = load_file(str(out / "adapter_model.safetensors"))
    ocfg = json.loads((out / "adapter_config.json").read_text())
    s_out = ocfg["lora_alpha"] / ocfg["r"]
    n = 0
    for ka in got:
        if ".lora_A." not in ka:
            continue
        kb = ka.replace("lora_A", "lora_B")
        ref = sum((1 / 3) * scale(i, ka) * (srcs[i][kb].double() @ srcs[i][ka].double()) for i in range(3))
        g = s_out * (got[kb].double() @ got[ka].double())
        assert torch.allclose(g, ref, rtol=1e-5, atol=1e-6), ka
        n += 1
    assert n == 4


# ------------------------------------------------------------------------------------------------
# validation of adapter_config.json at add

BAD = [
    # (id, config edits as raw JSON text fragments or values, key named, value shown)
    ("alpha_nan", {"lora_alpha": "NaN"}, "'lora_alpha'", "nan"),
    ("alpha_inf", {"lora_alpha": "Infinity"}, "'lora_alpha'", "inf"),
    ("alpha_neg", {"lora_alpha": "-16"}, "'lora_alpha'", "-16"),
    ("alpha_absurd", {"lora_alpha": "1e308"}, "'lora_alpha'", "1e+308"),
    ("alpha_bigint", {"lora_alpha": "1" + "0" * 400}, "'lora_alpha'", "1000000000"),
    ("alpha_str", {"lora_alpha": '"16"'}, "'lora_alpha'", "'16'"),
    ("alpha_bool", {"lora_alpha": "true"}, "'lora_alpha'", "True"),
    ("alpha_scaling", {"lora_alpha": "40004"}, "'lora_alpha'", "40004"),
    ("r_zero", {"r": "0"}, "'r'", "0"),
    ("r_neg", {"r": "-4"}, "'r'", "-4"),
    ("r_float", {"r": "4.5"}, "'r'", "4.5"),
    ("r_nan", {"r": "NaN"}, "'r'", "nan"),
    ("r_str", {"r": '"4"'}, "'r'", "'4'"),
    ("rslora_str", {"use_rslora": '"false"'}, "'use_rslora'", "'false'"),
    ("ap_nan", {"alpha_pattern": '{"q_proj": NaN}'}, "alpha_pattern['q_proj']", "nan"),
    ("ap_str", {"alpha_pattern": '{"q_proj": "x"}'}, "alpha_pattern['q_proj']", "'x'"),
    ("ap_neg", {"alpha_pattern": '{"q_proj": -2}'}, "alpha_pattern['q_proj']", "-2"),
    ("ap_absurd", {"alpha_pattern": '{"q_proj": 1e300}'}, "alpha_pattern['q_proj']", "1e+300"),
    ("ap_list", {"alpha_pattern": '["q_proj", 2]'}, "'alpha_pattern'", "['q_proj', 2]"),
    ("ap_regex", {"alpha_pattern": '{"q_proj(": 2}'}, "alpha_pattern key 'q_proj('", "regular expression"),
    ("rp_zero", {"rank_pattern": '{"q_proj": 0}'}, "rank_pattern['q_proj']", "0"),
    ("rp_float", {"rank_pattern": '{"q_proj": 2.5}'}, "rank_pattern['q_proj']", "2.5"),
    ("rp_nan", {"rank_pattern": '{"q_proj": NaN}'}, "rank_pattern['q_proj']", "nan"),
    ("rp_bool", {"rank_pattern": '{"q_proj": true}'}, "rank_pattern['q_proj']", "True"),
    # alpha 20000 / r 4 = 5000 is fine, but rank_pattern gives q_proj r = 1: scaling 20000
    ("rp_small_rank_scaling", {"lora_alpha": "20000", "rank_pattern": '{"q_proj": 1}'}, "'lora_alpha'", "r = 1"),
]


def _write_raw_config(folder: Path, edits: dict):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps({k: v for k, v in cfg.items() if k not in edits}, indent=2)
    extra = ",\n".join(f'  "{k}": {v}' for k, v in edits.items())
    (folder / "adapter_config.json").write_text(text[:-2] + ",\n" + extra + "\n}")


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_cli_add_refuses_bad_config(tmp_path, case):
    _, edits, key, shown = case
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    reg.add(_adapter(tmp_path, 10, 0), run="run", step=10)
    before = reg.dump()
    folder = _adapter(tmp_path, 20, 1)
    _write_raw_config(folder, edits)
    res = _cli(db, "add", folder, "--run", "run", "--step", 20)
    assert res.exit_code == FormatError.exit_code, res.output
    msg = " ".join(res.output.split())
    assert str(folder / "adapter_config.json") in msg, msg
    assert key in msg and shown in msg, msg
    assert Registry(db).dump() == before
    # a registered adapter whose config went bad later is refused at merge time, nothing written
    reg.add(_adapter(tmp_path, 30, 2), run="run", step=30)
    before = reg.dump()
    _write_raw_config(tmp_path / "run" / "checkpoint-30", edits)
    out = tmp_path / "merged"
    res = _cli(db, "merge", "run@10", "run@30", "-o", out, "-q")
    assert res.exit_code == FormatError.exit_code, res.output
    assert not out.exists() and Registry(db).dump() == before


@pytest.mark.parametrize("edits,scaling", [
    ({"lora_alpha": "0"}, 0.0),                       # valid but a no-op adapter: accepted
    ({"lora_alpha": "2048", "r": "1"}, 2048.0),       # large but real
    ({"lora_alpha": "40000"}, 1e4),                   # exactly at the bound (r = 4)
    ({"use_rslora": "null"}, 2.0),
    ({"alpha_pattern": "null", "rank_pattern": "{}"}, 2.0),
])
def test_cli_add_accepts_edge_configs(tmp_path, edits, scaling):
    db = tmp_path / "reg.duckdb"
    folder = _adapter(tmp_path, 10, 0)
    if "r" in edits:   # tensors must have rank 1 for r = 1
        folder = write_peft_adapter(tmp_path / "run" / "checkpoint-10", random_lora_state(0, 2, D, 1), r=1,
                                    alpha=8, d=D)
    _write_raw_config(folder, edits)
    res = _cli(db, "add", folder, "--run", "run", "--step", 10)
    assert res.exit_code == 0, res.output
    assert Registry(db).get("run@10").lora["scaling"] == scaling


def test_missing_alpha_uses_peft_default(tmp_path):
    """No lora_alpha in adapter_config.json: PEFT's LoraConfig default 8, not r."""
    folder = _adapter(tmp_path, 10, 0, r=R)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    peft = pytest.importorskip("peft")
    assert formats.inspect(folder).lora["scaling"] == peft.LoraConfig.from_pretrained(str(folder)).lora_alpha / R
