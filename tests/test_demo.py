"""The end-to-end demo: task generator, LoRA/PEFT format, and a shortened `ckptreg demo` run
through the CLI in-process (registry contents, lineage, PEFT loading, leaderboard, plots)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptreg import demo as D  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast and does not collapse when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ task and tokenizer

def test_task_split_is_disjoint_and_correct():
    t = D.make_task(3, n_train=2000, n_heldout=200)
    train_texts = {p.text for p in t.train}
    assert not train_texts & {p.text for p in t.heldout}
    # whole facts are held out, in both operand orders of an addition
    def unordered(f):
        a, op, b = f
        return (min(a, b), op, max(a, b)) if op == "+" else f
    train_facts = {unordered(p.fact) for p in t.train}
    held_facts = {unordered(p.fact) for p in t.heldout}
    assert held_facts and not train_facts & held_facts
    assert len({p.text for p in t.heldout}) == len(t.heldout) == 200
    for p in t.train + t.heldout:
        a, op, b = p.fact
        assert int(p.answer) == (a + b if op == "+" else a - b) >= 0
        lhs, rhs = p.solution.split(" = ")
        assert rhs == p.answer and eval(lhs) == int(p.answer)  # noqa: S307 (digits and +/- only)
        # the numbers of the solution appear in the problem text
        x, _op, y = lhs.split()
        assert f" {x} " in f" {p.text} " and f" {y} " in f" {p.text} "
    # no pretraining sentence contains a question or a worked answer to a story
    assert not any("?" in s for s in t.pretrain)


def test_task_is_seeded():
    a, b, c = D.make_task(7, n_train=300, n_heldout=50), D.make_task(7, n_train=300, n_heldout=50), \
        D.make_task(8, n_train=300, n_heldout=50)
    assert [p.text for p in a.train] == [p.text for p in b.train]
    assert [p.text for p in a.heldout] == [p.text for p in b.heldout]
    assert [p.text for p in a.train] != [p.text for p in c.train]


def test_tokenizer_round_trip():
    tok = D.Tokenizer()
    t = D.make_task(0, n_train=50, n_heldout=20)
    for p in t.train + t.heldout:
        assert tok.decode(tok.encode(p.text)) == p.text
        assert tok.decode(tok.encode(p.solution)) == p.solution
    with pytest.raises(ValueError):
        tok.encode("tom has a unicorn")


# ------------------------------------------------------------------ LoRA and the PEFT format

def _base(seed=0):
    torch.manual_seed(seed)
    tok = D.Tokenizer()
    return D.TinyLM(D.ModelConfig(vocab_size=len(tok))).eval(), tok


def test_lora_with_zero_B_equals_the_base_model():
    base, tok = _base()
    m = copy.deepcopy(base)
    wrapped = D.inject_lora(m)
    assert len(wrapped) == 6 * base.config.n_layers
    assert all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())
    x = torch.randint(3, len(tok), (5, 17))
    with torch.no_grad():
        assert torch.equal(m(x), base(x))  # fresh adapter: B = 0 (PEFT init)
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_()
        assert not torch.allclose(m(x), base(x))
        D.zero_adapter(m)
        assert torch.equal(m(x), base(x))


def test_adapter_folder_is_peft_format(tmp_path):
    from ckptreg import formats

    base, _tok = _base()
    m = copy.deepcopy(base)
    D.inject_lora(m)
    D.save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["task_type"] is None and cfg["use_rslora"] is False
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    tensors = D.read_adapter(tmp_path / "a")
    d = base.config.d_model
    assert tensors["base_model.model.layers.0.attn.q_proj.lora_A.weight"].shape == (8, d)
    assert tensors["base_model.model.layers.0.attn.q_proj.lora_B.weight"].shape == (d, 8)
    assert tensors["base_model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (base.config.d_mlp, 8)
    info = formats.inspect(tmp_path / "a")
    assert (info.format, info.kind) == ("peft", "lora")
    assert info.lora["r"] == 8 and info.lora["lora_alpha"] == 16
    assert len(info.tensors) == 2 * 6 * base.config.n_layers


def _peft_matches_own_lora(base, adapter_dir, x):
    """PeftModel.from_pretrained on the plain-torch model gives our LoRA forward's outputs."""
    peft = pytest.importorskip("peft")
    own = copy.deepcopy(base)
    D.inject_lora(own)
    D.load_adapter(own, adapter_dir)   # the demo's evaluation: the adapter's own rank and scaling
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        a, b, c = own(x), pm(input_ids=x), base(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return (a - c).abs().max().item()


def test_peft_loads_our_adapter_with_the_same_outputs(tmp_path):
    pytest.importorskip("peft")
    base, tok = _base(1)
    m = copy.deepcopy(base)
    D.inject_lora(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    D.save_adapter(m, tmp_path / "a")
    x = torch.randint(3, len(tok), (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(m(x), D.TinyLM.forward(m, x))
    assert _peft_matches_own_lora(base, tmp_path / "a", x) > 1e-3  # the adapter does something


def test_load_adapter_state_rejects_a_wrong_adapter(tmp_path):
    base, _ = _base()
    m = copy.deepcopy(base)
    D.inject_lora(m)
    good = D.adapter_state(m)
    bad = dict(good)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="lacks"):
        D.load_adapter_state(m, bad)
    k = next(iter(good))
    with pytest.raises(ValueError, match="shape"):
        D.load_adapter_state(m, {**good, k: torch.zeros(3, 3)})


def test_lora_finetuning_learns_the_training_problems():
    """A few LoRA steps on a tiny random base: the training loss goes down and only LoRA moves."""
    base, tok = _base(2)
    m = copy.deepcopy(base)
    D.inject_lora(m)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if ".lora_" not in n}
    pairs = D.encode_problems(tok, D.make_task(2, n_train=64, n_heldout=10).train)
    saved = []
    losses = D.finetune_lora(m, pairs, 40, 0, batch_size=16, lr=3e-3, save_at=[10, 20, 30],
                             on_save=lambda s, l: saved.append((s, l)))
    assert [s for s, _ in saved] == [10, 20, 30, 40]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ------------------------------------------------------------------ the demo end to end

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from click.testing import CliRunner
    from ckptreg.cli import main

    tmp = tmp_path_factory.mktemp("demo")
    db, out = tmp / "reg.duckdb", tmp / "out"
    res = CliRunner().invoke(main, ["--db", str(db), "demo", "--quick", "--seed", "5",
                                    "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return db, out, res.output


def test_demo_prints_results(demo_run):
    _db, _out, output = demo_run
    assert "seed:" in output and " 5" in output.split("seed:")[1].splitlines()[0]
    for s in ("base model alone:", "final checkpoint:", "last merging checkpoint:", "best merge:",
              "MWA vs uniform soup:", "leaderboard of run demo-seed5", "vs final"):
        assert s in output, s


def test_demo_registered_checkpoints_with_train_loss(demo_run):
    from ckptreg import Registry

    db, out, _ = demo_run
    reg = Registry(db)
    plain = reg.checkpoints("demo-seed5", merged=False)
    plan = D.DemoPlan.quick()
    assert [c.step for c in plain] == plan.save_steps == [16 * i for i in range(1, 9)] + [150]
    for c in plain:
        assert c.format == "peft" and c.kind == "lora"
        assert math.isfinite(c.metrics["train_loss"]) and c.metrics["train_loss"] > 0
        assert 0.0 <= c.metrics["heldout_acc"] <= 1.0 and c.metrics["heldout_loss"] > 0
        assert Path(c.path).parent == out / "demo-seed5"
    # the base model is registered in its own run with its held-out scores
    base = reg.checkpoints("demo-seed5-base")
    assert len(base) == 1 and base[0].kind == "full"
    assert "heldout_acc" in base[0].metrics
    # training really learned: the final adapter is better than the base model alone
    final = reg.final("demo-seed5")
    assert final.metrics["heldout_loss"] < base[0].metrics["heldout_loss"]


def test_demo_merges_have_lineage_and_scores(demo_run):
    from ckptreg import Registry, formats, weights

    db, _out, _ = demo_run
    reg = Registry(db)
    merged = reg.checkpoints("demo-seed5", merged=True)
    names = {c.name for c in merged}
    for n in ("last_2_unweighted", "last_3_unweighted", "last_5_unweighted", "last_3_2_unweighted",
              "ties_last_3_base_first", "ties_last_3_base_last", "dare_ties_last_3_base_first_seed5",
              "dare_ties_last_3_base_last_seed5", "slerp_last_2_base_first", "slerp_last_2_base_last"):
        assert n in names, (n, sorted(names))
    mwa = [c for c in merged if "_pf-" in c.name]
    assert {c.name.split("_pf-")[1] for c in mwa} == {"0_7", "1_0"}
    assert any("_loss_pf-" in c.name for c in mwa) and any("_steps_pf-" in c.name for c in mwa)
    final = reg.final("demo-seed5")
    for c in merged:
        assert "heldout_acc" in c.metrics and "heldout_loss" in c.metrics, c.name
        lin = reg.lineage(c.id)
        assert lin and lin["inputs"], c.name
        steps = [reg.get(i["id"]).step for i in lin["inputs"]]
        assert final.step not in steps or c.name.endswith("base_last")  # k_last excludes the final
        info = formats.inspect(c.path)
        assert (info.format, info.kind) == ("peft", "lora")
    # a loss-weighted merge used MWA weights of the registered training losses
    c = next(c for c in mwa if c.name.endswith("loss_pf-0_7"))
    lin = reg.lineage(c.id)
    ins = [reg.get(i["id"]) for i in lin["inputs"]]
    want = weights.mwa([x.metrics["train_loss"] for x in ins], [x.step for x in ins], penalty=0.7)
    assert [i["weight"] for i in lin["inputs"]] == pytest.approx(want, rel=1e-9)
    # soups and MWA merges are Σ w_i θ_i of the input adapters, tensor by tensor
    tensors = [D.read_adapter(x.path) for x in ins]
    got = D.read_adapter(c.path)
    for k, v in got.items():
        ref = sum(w * t[k].double() for w, t in zip(want, tensors))
        torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)


def test_demo_merged_adapter_loads_in_peft(demo_run):
    from ckptreg import Registry

    db, out, _ = demo_run
    reg = Registry(db)
    base, tok = D.load_base(out / "demo-seed5" / "base")
    c = reg.get("demo-seed5@last_3_2_unweighted")
    x = torch.tensor([[D.BOS] + tok.encode("tom has 3 apples and buys 4 more . how many apples does tom have ?")])
    assert _peft_matches_own_lora(base, c.path, x) > 0


def test_demo_leaderboard_and_plots(demo_run):
    from ckptreg import Registry, leaderboard

    db, out, _ = demo_run
    rows = leaderboard.leaderboard(Registry(db), "demo-seed5", "heldout_acc")
    assert rows and all(r["score"] is not None for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    finals = [r for r in rows if "final" in r["role"].split(",")]
    assert len(finals) == 1 and finals[0]["step"] == 150
    # quick plan: 5 uniform soups (last 2/3/5, last 2/3 every 2), 4 MWA (loss/steps x p 0.7/1.0),
    # TIES and DARE-TIES last 3 base first/last, SLERP last 2 base first/last, and the 7
    # update-space baselines over the last 3
    assert sum(r["kind"] == "merged" for r in rows) == 5 + 4 + 4 + 2 + 7
    f = finals[0]["score"]
    assert f > 0  # the shortened demo learns something
    for r in rows:
        assert r["vs_final"] == pytest.approx((r["score"] - f) / f * 100)
    for name in ("loss_weights.png", "leaderboard.png"):
        p = out / "demo-seed5" / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        mpl = pytest.importorskip("matplotlib.image")
        img = mpl.imread(str(p))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    summary = json.loads((out / "demo-seed5" / "summary.json").read_text())
    assert summary["seed"] == 5 and summary["run"] == "demo-seed5"


#: the update-space baselines of the quick plan (last 3, density 0.5, seed 5): name -> (method, space, params)
UPDATE_BASELINES = {
    "ties_last_3_base_pretrained_delta": ("ties", "delta", {"density": 0.5}),
    "dare_ties_last_3_base_pretrained_delta_seed5": ("dare_ties", "delta", {"density": 0.5, "seed": 5}),
    "tsv_last_3_base_pretrained_delta": ("tsv", "delta", {}),
    "iso_c_last_3_base_pretrained_delta": ("iso_c", "delta", {}),
    "star_last_3_base_pretrained_delta": ("star", "delta", {}),
    "knots_ties_last_3_base_pretrained_delta": ("knots_ties", "delta", {"density": 0.5}),
    "core_ties_last_3_base_pretrained": ("ties", "core", {"density": 0.5}),
}


def test_demo_update_space_baselines_are_registered_and_ranked(demo_run):
    """Delta-space TIES / DARE-TIES / TSV-M / Iso-C / STAR / KnOTS-TIES and core-space TIES, all
    with base pretrained: registered with their method, space and base in the lineage, scored
    like every other adapter, ranked in the leaderboard and printed, whatever their score."""
    from ckptreg import Registry, formats, leaderboard

    db, _out, output = demo_run
    reg = Registry(db)
    merged = reg.checkpoints("demo-seed5", merged=True)
    names = [c.name for c in merged]
    assert len(names) == len(set(names))
    by_name = {c.name: c for c in merged}
    window = [c.id for c in reg.select("demo-seed5", 3, 1, exclude_final=True)]
    for name, (method, space, params) in UPDATE_BASELINES.items():
        assert name in by_name, (name, sorted(names))
        c = by_name[name]
        lin = reg.lineage(c.id)
        assert lin["method"] == method, name
        assert lin["params"]["space"] == space and lin["params"]["base"] == "pretrained", (name, lin["params"])
        assert lin["base"] is None, name   # no base checkpoint: the updates are the task vectors
        for k, v in params.items():
            assert lin["params"][k] == v, (name, k, lin["params"])
        assert [i["id"] for i in lin["inputs"]] == window, name
        for m in ("heldout_acc", "heldout_loss"):
            assert isinstance(c.metrics[m], float) and math.isfinite(c.metrics[m]), (name, c.metrics)
        assert 0.0 <= c.metrics["heldout_acc"] <= 1.0
        info = formats.inspect(c.path)   # update-space outputs: lora_alpha = r (scaling 1)
        assert (info.format, info.kind) == ("peft", "lora") and info.lora["scaling"] == 1.0, (name, info.lora)
    ranked = leaderboard.leaderboard(reg, "demo-seed5", "heldout_acc")   # merged and plain checkpoints
    rows = {r["name"]: r for r in ranked if r["kind"] == "merged"}
    for name in UPDATE_BASELINES:
        assert rows[name]["score"] == pytest.approx(by_name[name].metrics["heldout_acc"]), name
    # printed: a table holding every one of them with its rank and % vs last merging / final
    section = output.split("update-space baselines, base pretrained")[1].split("seed:")[0]
    for name, (method, space, _p) in UPDATE_BASELINES.items():
        line = next(ln for ln in section.splitlines() if f" {name} " in ln)
        assert line.split()[0] == f"{rows[name]['rank']}/{len(ranked)}" and f" {space} " in line, line
        assert f"{by_name[name].metrics['heldout_acc']:.4f}" in line, line
    summary = json.loads((_out / "demo-seed5" / "summary.json").read_text())
    assert [b["name"] for b in summary["update_baselines"]] == list(UPDATE_BASELINES)


def test_demo_update_space_merge_is_evaluated_as_peft_loads_it(demo_run):
    """The evaluation loads an update-space merge (rank 3 x 8 = 24, lora_alpha 24) with its own rank
    and scaling: the same outputs as PeftModel.from_pretrained, and the same held-out scores the
    demo registered (not the demo adapters' r 8 / alpha 16)."""
    from ckptreg import Registry

    db, out, _ = demo_run
    reg = Registry(db)
    base, tok = D.load_base(out / "demo-seed5" / "base")
    c = reg.get("demo-seed5@tsv_last_3_base_pretrained_delta")
    assert c.lora["r"] == 24 and c.lora["lora_alpha"] == 24
    x = torch.tensor([[D.BOS] + tok.encode("tom has 3 apples and buys 4 more . how many apples does tom have ?")])
    assert _peft_matches_own_lora(base, c.path, x) > 0
    # the registered score is the evaluation of that model: the base plus the formed update s·B·A
    task = D.make_task(5, n_train=D.DemoPlan.quick().n_train, n_heldout=D.DemoPlan.quick().n_heldout)
    pairs = D.encode_problems(tok, task.heldout)
    dense = copy.deepcopy(base)
    t = D.read_adapter(c.path)
    with torch.no_grad():
        for name, mod in dense.named_modules():
            key = D.PEFT_PREFIX + name + ".lora_A.weight"
            if key in t:
                mod.weight += t[key.replace("lora_A", "lora_B")] @ t[key]   # scaling 1 (alpha = r)
    got = D.evaluate(dense, pairs)
    assert got["heldout_acc"] == pytest.approx(c.metrics["heldout_acc"])
    assert got["heldout_loss"] == pytest.approx(c.metrics["heldout_loss"], rel=1e-4)


def test_load_adapter_rejects_an_adapter_that_does_not_fit(tmp_path):
    base, _ = _base()
    m = copy.deepcopy(base)
    D.inject_lora(m)
    D.save_adapter(m, tmp_path / "a")
    good = D.read_adapter(tmp_path / "a")
    from safetensors.torch import save_file

    k = "base_model.model.layers.0.attn.q_proj.lora_A.weight"
    save_file({**good, k: torch.zeros(8, 5)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="q_proj"):
        D.load_adapter(m, tmp_path / "a")
    save_file({n: t for n, t in good.items() if n != k}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        D.load_adapter(m, tmp_path / "a")


def test_demo_again_in_the_same_registry_takes_a_new_run(demo_run):
    from ckptreg import Registry
    from click.testing import CliRunner
    from ckptreg.cli import main

    db, out, _ = demo_run
    res = CliRunner().invoke(main, ["--db", str(db), "demo", "--run", "demo-seed5", "--quick", "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output
    assert len(Registry(db).checkpoints("demo-seed5", merged=False)) == D.DemoPlan.quick().n_checkpoints + 1


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """evaluate()'s one-pass exact match is the greedy-decoding exact match, on a model that gets
    some problems right and some wrong."""
    base, tok = _base(4)
    m = copy.deepcopy(base)
    D.inject_lora(m)
    task = D.make_task(4, n_train=200, n_heldout=40)
    pairs = D.encode_problems(tok, task.train[:60])
    D.finetune_lora(m, D.encode_problems(tok, task.train), 150, 0, batch_size=32, lr=1e-2)
    got = D.evaluate(m, pairs)
    dec = D.greedy_decode(m, [p for p, _a in pairs], max_new_tokens=8)
    want = sum(d == a for d, (_p, a) in zip(dec, pairs)) / len(pairs)
    assert got["heldout_acc"] == pytest.approx(want)
    assert 0 < want < 1, want  # both cases occur
