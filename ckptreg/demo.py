"""The end-to-end demo: a tiny transformer learns arithmetic word problems with LoRA on a CPU,
every checkpoint goes into the registry from inside the training loop, and the paper's merging
procedure (MWA paper §5.1) runs through the library.

Everything is generated in code with a seeded RNG: no downloads, no pretrained weights.

1. Task: word problems such as ``tom has 3 apples and buys 4 more . how many apples does tom
   have ?``; the model answers with the worked equation ``3 + 4 = 7`` (word-level tokens, every
   number one token) and is scored by exact match of its greedy answer. The held-out split
   holds *arithmetic facts* (a, op, b) that never occur in the fine-tuning split, so held-out
   accuracy measures reading the problem, not recall of a string seen in training.
2. Base model: a decoder-only transformer (plain PyTorch) "pretrained" with full-parameter
   training on symbolic arithmetic (``3 + 4 = 7``, alone or after an unrelated story) and on the
   stories without questions, so it knows the numbers, the words and the sums but has never
   answered a question (its held-out accuracy is ~0).
3. LoRA (rank 8, alpha 16, q/k/v/o and the MLP linears), implemented here with PEFT's module and
   key names: the saved adapters are PEFT adapter folders that ``peft.PeftModel.from_pretrained``
   loads onto :class:`TinyLM`.
4. Fine-tuning with AdamW (warm-up, then a slow cosine that ends well above zero, so the loss is
   still noisy and decreasing at the end), an adapter saved every few steps and registered with
   ``ckptreg.Registry(db).add`` from inside the loop.
5. Merges (uniform soups, MWA, TIES, DARE-TIES, SLERP) through ``ckptreg.engine``; and, with base
   pretrained (the task vectors are the LoRA updates themselves), the update-space baselines of
   :data:`UPDATE_BASELINES`: delta-space TIES, DARE-TIES, TSV-M, Iso-C, STAR, KnOTS-TIES and
   core-space TIES. Evaluation of every adapter on the held-out split (each loaded with its own
   rank and scaling, :func:`load_adapter`), ``Registry.log`` of the scores, the leaderboard and plots.

This module never prints: progress goes to a ``log`` callback (the CLI prints it).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Task: arithmetic word problems, generated from a seed
# --------------------------------------------------------------------------------------------

MAX_OPERAND = 12  # operands 0..12, answers 0..24: every number is one token

NAMES = ["tom", "ann", "bob", "eve", "sam", "lia", "max", "zoe", "ben", "kim", "joe", "amy"]
OBJECTS = ["apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps", "cups", "keys"]

# (story, question) pairs; {a} is the first operand, {b} the second; {n}/{m} names, {o} object.
ADD_TEMPLATES = [
    ("{n} has {a} {o} and buys {b} more .", "how many {o} does {n} have ?"),
    ("{n} has {a} {o} . {m} gives {n} {b} more .", "how many {o} now ?"),
    ("there are {a} {o} in a box . {n} puts in {b} more .", "how many {o} are in the box ?"),
    ("{n} finds {b} {o} and already had {a} .", "how many {o} in total ?"),
]
SUB_TEMPLATES = [
    ("{n} has {a} {o} and eats {b} .", "how many are left ?"),
    ("{n} has {a} {o} and gives {b} to {m} .", "how many {o} does {n} have ?"),
    ("there are {a} {o} in a box . {n} takes out {b} .", "how many {o} are in the box ?"),
    ("{n} had {a} {o} but lost {b} .", "how many are left ?"),
]

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


def _template_words() -> list[str]:
    words: list[str] = []
    for story, question in ADD_TEMPLATES + SUB_TEMPLATES:
        for w in (story + " " + question).split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    return words


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary: specials, the numbers, the symbols and the
    words of the templates. Built from constants (not from data), so every run has the same ids."""

    def __init__(self, max_number: int = 2 * MAX_OPERAND):
        vocab = list(SPECIALS)
        vocab += [str(i) for i in range(max_number + 1)]
        vocab += ["+", "-", "="]
        for w in NAMES + OBJECTS + _template_words():
            if w not in vocab:
                vocab.append(w)
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as e:  # a bug in the generator, not user input
            raise ValueError(f"word {e.args[0]!r} is not in the demo vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (PAD, BOS))

    def to_json(self) -> dict:
        return {"type": "ckptreg-demo-word-level", "vocab": self.vocab,
                "pad": PAD, "bos": BOS, "eos": EOS}


@dataclass(frozen=True)
class Problem:
    text: str      # the question, ending in "?"
    solution: str  # the target the model learns to write: the equation, e.g. "3 + 4 = 7"
    answer: str    # the number, as text (the last token of the solution)
    fact: tuple    # (a, op, b): the arithmetic fact behind it


@dataclass
class Task:
    train: list[Problem]
    heldout: list[Problem]
    pretrain: list[str]          # base-model corpus: equations, stories without questions
    train_facts: list[tuple]
    heldout_facts: list[tuple]


def _facts() -> list[tuple]:
    facts = [(a, "+", b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    facts += [(a, "-", b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    return facts


def _value(fact: tuple) -> int:
    a, op, b = fact
    return a + b if op == "+" else a - b


def _equation(fact: tuple) -> str:
    a, op, b = fact
    return f"{a} {op} {b} = {_value(fact)}"


def _story(rng: random.Random, fact: tuple) -> tuple[str, str, str]:
    """(story, question, solution) for a fact; the solution lists the numbers in text order."""
    a, op, b = fact
    story, question = rng.choice(ADD_TEMPLATES if op == "+" else SUB_TEMPLATES)
    n, m = rng.sample(NAMES, 2)
    o = rng.choice(OBJECTS)
    kw = dict(a=a, b=b, n=n, m=m, o=o)
    first_b = story.index("{b}") < story.index("{a}")
    solution = _equation((b, op, a) if first_b else fact)
    return story.format(**kw), question.format(**kw), solution


def _problem(rng: random.Random, fact: tuple) -> Problem:
    story, question, solution = _story(rng, fact)
    return Problem(text=f"{story} {question}", solution=solution, answer=str(_value(fact)), fact=fact)


def make_task(seed: int, n_train: int = 6000, n_heldout: int = 400, heldout_frac: float = 0.2,
              n_pretrain: int = 6000) -> Task:
    """Generate the task. The held-out split holds whole arithmetic facts: no (a, op, b) of a
    held-out problem occurs in the fine-tuning split (in either operand order), so no held-out
    string does either.

    The pretraining corpus teaches the base model the pieces, never the task: every equation
    (``3 + 4 = 7``, alone or after an *unrelated* story) and the stories without a question."""
    rng = random.Random(seed)
    facts = _facts()
    # split on unordered facts so "3 + 4" and "4 + 3" land on the same side
    groups: dict[tuple, list[tuple]] = {}
    for f in facts:
        a, op, b = f
        groups.setdefault((min(a, b), op, max(a, b)) if op == "+" else f, []).append(f)
    keys = sorted(groups, key=str)
    rng.shuffle(keys)
    held_keys = set(keys[: max(1, int(len(keys) * heldout_frac))])
    heldout_facts = sorted((f for k in held_keys for f in groups[k]), key=str)
    train_facts = sorted((f for k in keys if k not in held_keys for f in groups[k]), key=str)
    train = [_problem(rng, rng.choice(train_facts)) for _ in range(n_train)]
    heldout_set: dict[str, Problem] = {}
    i = 0  # distinct held-out strings, every held-out fact represented
    while len(heldout_set) < n_heldout and i < 50 * n_heldout:
        p = _problem(rng, heldout_facts[i % len(heldout_facts)])
        heldout_set.setdefault(p.text, p)
        i += 1
    heldout = list(heldout_set.values())
    pretrain = []
    for _ in range(n_pretrain):
        kind = rng.random()
        if kind < 0.3:
            pretrain.append(_equation(rng.choice(facts)))
        elif kind < 0.7:
            story, _q, _s = _story(rng, rng.choice(facts))
            pretrain.append(f"{story} {_equation(rng.choice(facts))}")  # unrelated equation
        else:
            pretrain.append(_story(rng, rng.choice(facts))[0])
    return Task(train=train, heldout=heldout, pretrain=pretrain,
                train_facts=train_facts, heldout_facts=heldout_facts)


# --------------------------------------------------------------------------------------------
# Model: a tiny decoder-only transformer with PEFT-compatible module names
# --------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 384
    max_len: int = 32

    def to_json(self) -> dict:
        return {"model_type": "ckptreg-demo-tinylm", **self.__dict__}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.n_heads

        def split(t):
            return t.view(B, T, h, D // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder-only transformer. Module names (``layers.0.attn.q_proj``, ``layers.0.mlp.up_proj``)
    are what the adapter keys and PEFT's ``target_modules`` refer to."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids, **_ignored):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)[None]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------
# LoRA, laid out like PEFT's: <module>.base_layer, <module>.lora_A, <module>.lora_B
# --------------------------------------------------------------------------------------------

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
LORA_R = 8
LORA_ALPHA = 16
BASE_MODEL_NAME = "ckptreg-demo/tinylm-base"  # base_model_name_or_path in adapter_config.json


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(x)) * alpha / r, initialised like PEFT (A Kaiming-uniform,
    B zero, so a fresh adapter leaves the model unchanged)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: int):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def inject_lora(model: nn.Module, r: int = LORA_R, alpha: int = LORA_ALPHA,
                targets: Sequence[str] = TARGET_MODULES) -> list[str]:
    """Replace every nn.Linear whose name ends in one of ``targets`` by a LoRALinear, freeze the
    base weights, and return the wrapped module names (sorted)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return sorted(wrapped)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


PEFT_PREFIX = "base_model.model."


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved key names (``base_model.model.<module>.lora_A.weight``)."""
    return {PEFT_PREFIX + n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (PEFT key names) into an injected model; every LoRA parameter must be
    present with its shape."""
    params = dict(model.named_parameters())
    expected = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    got = set()
    with torch.no_grad():
        for key, t in tensors.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if name not in expected:
                raise ValueError(f"adapter tensor {key!r} matches no LoRA parameter of the model")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(t.to(params[name].dtype))
            got.add(name)
    missing = expected - got
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]!r}")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a PEFT adapter folder into an injected model the way PEFT reads it: each module's
    rank is that of its stored factors and its scaling comes from ``adapter_config.json``
    (``lora_alpha / r``, ``rank_pattern`` / ``alpha_pattern`` and rsLoRA resolved per module by
    :func:`ckptreg.formats.lora_module_config`). So the demo's own adapters (r 8, alpha 16) and
    merges written in update space (any rank, ``lora_alpha = r``) go through one evaluation.
    Every LoRA module of the model must get both factors, with its in/out features."""
    from .formats import lora_module_config

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = read_adapter(folder)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        mod, sep, which = name.rpartition(".lora_")
        if not sep or mod not in mods or which not in ("A.weight", "B.weight"):
            raise ValueError(f"{folder}: adapter tensor {key!r} matches no LoRA parameter of the model")
        factors.setdefault(mod, {})[which[0]] = t
    missing = sorted(set(mods) - {m for m, f in factors.items() if len(f) == 2})
    if missing:
        raise ValueError(f"{folder}: adapter lacks LoRA factors of {len(missing)} modules, e.g. {missing[0]!r}")
    with torch.no_grad():
        for mod, m in mods.items():
            A, B = factors[mod]["A"], factors[mod]["B"]
            r = int(A.shape[0])
            base = m.base_layer
            if A.dim() != 2 or B.dim() != 2 or r < 1 or tuple(A.shape) != (r, base.in_features) \
                    or tuple(B.shape) != (base.out_features, r):
                raise ValueError(f"{folder}: module {mod!r} has factors A {tuple(A.shape)}, B {tuple(B.shape)}; "
                                 f"the model expects A (r, {base.in_features}) and B ({base.out_features}, r)")
            for lin, t in ((m.lora_A, A), (m.lora_B, B)):
                w = lin.weight
                if tuple(w.shape) == tuple(t.shape):
                    w.copy_(t.to(w.dtype))
                else:   # another rank: new factors of that shape
                    lin.weight = nn.Parameter(t.to(w.dtype).clone(), requires_grad=w.requires_grad)
                    lin.in_features, lin.out_features = t.shape[1], t.shape[0]
            m.scaling = lora_module_config(cfg, mod, r)[2]


def zero_adapter(model: nn.Module) -> None:
    """Set every lora_B to zero: the model computes exactly the base model."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.zero_()


def adapter_config(r: int = LORA_R, alpha: int = LORA_ALPHA) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter on a custom module."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": BASE_MODEL_NAME,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a PEFT adapter folder: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model)
    tmp = folder / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(), indent=2) + "\n")
    return folder


def read_adapter(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def save_base(model: TinyLM, tok: Tokenizer, folder: str | os.PathLike) -> Path:
    """Save the base model once: model.safetensors + config.json + the tokenizer vocabulary."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps(tok.to_json()) + "\n")
    return folder


def load_base(folder: str | os.PathLike) -> tuple[TinyLM, Tokenizer]:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("model_type", None)
    model = TinyLM(ModelConfig(**cfg))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tok = Tokenizer()
    vocab = json.loads((folder / "tokenizer.json").read_text())["vocab"]
    if vocab != tok.vocab:
        raise ValueError(f"{folder}: tokenizer vocabulary differs from this version of the demo")
    return model.eval(), tok


# --------------------------------------------------------------------------------------------
# Batching, training, evaluation
# --------------------------------------------------------------------------------------------

def encode_problems(tok: Tokenizer, problems: Sequence[Problem]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) with the prompt starting at <bos> and the answer ending in <eos>."""
    return [([BOS] + tok.encode(p.text), tok.encode(p.solution) + [EOS]) for p in problems]


def lm_batch(seqs: Sequence[list[int]], loss_from: Sequence[int]):
    """Right-padded inputs/targets; positions before ``loss_from[i]`` (the prompt) and padding
    are ignored in the loss (-100). Causal attention makes right padding harmless."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, loss_from)):
        s = torch.tensor(s, dtype=torch.long)
        n = len(s) - 1
        x[i, :n] = s[:-1]
        tgt = s[1:].clone()
        tgt[: max(0, start - 1)] = -100
        y[i, :n] = tgt
    return x, y


def qa_batch(pairs: Sequence[tuple[list[int], list[int]]]):
    return lm_batch([p + a for p, a in pairs], [len(p) for p, _a in pairs])


@torch.no_grad()
def evaluate(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
             batch_size: int = 512) -> dict[str, float]:
    """Held-out loss: mean cross-entropy per target token (the worked equation, the answer and
    <eos>), teacher-forced. Exact-match accuracy: the share of problems whose greedy decoding is
    exactly the target (``3 + 4 = 7 <eos>``).

    Greedy decoding reproduces the target iff the argmax at every target position, given the
    target prefix, is the next target token (by induction over the positions), so one
    teacher-forced pass gives the greedy exact match without a decoding loop
    (:func:`greedy_decode` is the loop, used to show answers and in the tests)."""
    model.eval()
    total_loss, total_tokens, correct = 0.0, 0, 0
    for i in range(0, len(pairs), batch_size):
        x, y = qa_batch(pairs[i:i + batch_size])
        logits = model(x)
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                      ignore_index=-100, reduction="sum").item()
        mask = y != -100
        total_tokens += int(mask.sum())
        hit = (logits.argmax(-1) == y) | ~mask
        correct += int(hit.all(dim=1).sum())
    return {"heldout_loss": total_loss / max(1, total_tokens), "heldout_acc": correct / max(1, len(pairs))}


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy decoding until <eos> (included) or ``max_new_tokens``; one prompt at a time."""
    model.eval()
    outs = []
    for p in prompts:
        seq = torch.tensor([p], dtype=torch.long)
        new: list[int] = []
        for _ in range(max_new_tokens):
            if seq.shape[1] >= model_max_len(model):
                break
            nxt = int(model(seq)[0, -1].argmax())
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            if nxt == EOS:
                break
        outs.append(new)
    return outs


def model_max_len(model: nn.Module) -> int:
    inner = model
    while not isinstance(inner, TinyLM) and hasattr(inner, "model"):
        inner = inner.model  # PeftModel -> LoraModel -> TinyLM
    return inner.config.max_len if isinstance(inner, TinyLM) else 10**9


def _lr_lambda(warmup: int, total: int, floor: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def pretrain_base(model: TinyLM, tok: Tokenizer, corpus: Sequence[str], steps: int, seed: int,
                  batch_size: int = 64, lr: float = 6e-3, log: Callable[[str], None] | None = None) -> list[float]:
    """Full-parameter language modelling on the pretraining corpus (loss on every token)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[BOS] + tok.encode(s) + [EOS] for s in corpus]
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(1, steps // 10), steps, 0.05))
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(seqs), (batch_size,), generator=g).tolist()
        x, y = lm_batch([seqs[i] for i in idx], [1] * batch_size)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  pretrain step {step + 1}/{steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def finetune_lora(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], steps: int, seed: int,
                  *, batch_size: int = 32, lr: float = 4e-3, save_at: Sequence[int] = (),
                  on_save: Callable[[int, float], None] | None = None,
                  log: Callable[[str], None] | None = None) -> list[float]:
    """LoRA fine-tuning (only lora_A/lora_B train) with AdamW: linear warm-up, then a cosine that
    ends at 30% of the peak rate, so the loss is still noisy and decreasing at the end (where
    checkpoint merging helps). At every step in ``save_at`` and at the last step, ``on_save(step,
    train_loss)`` gets the mean training loss since the previous save."""
    g = torch.Generator().manual_seed(seed + 1)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(1, steps // 20), steps, 0.3))
    model.train()
    losses: list[float] = []
    since_save: list[float] = []
    save_at = set(save_at) | {steps}
    for step in range(1, steps + 1):
        idx = torch.randint(len(pairs), (batch_size,), generator=g).tolist()
        x, y = qa_batch([pairs[i] for i in idx])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        since_save.append(losses[-1])
        if on_save and step in save_at:
            model.eval()
            on_save(step, sum(since_save) / len(since_save))
            model.train()
            since_save = []
        if log and step % max(1, steps // 10) == 0:
            log(f"  finetune step {step}/{steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# The end-to-end demo
# --------------------------------------------------------------------------------------------

@dataclass
class DemoPlan:
    """Sizes of one demo run. ``quick`` is the shortened demo of the tests (seconds, fewer merges)."""

    steps: int = 640                 # LoRA fine-tuning steps
    pretrain_steps: int = 1200       # full-parameter base pretraining steps
    pretrain_lr: float = 6e-3
    n_checkpoints: int = 20          # adapters saved on the interval; the final one comes on top
    n_train: int = 6000
    n_heldout: int = 1000
    soup_sizes: tuple = (2, 3, 4, 5, 8, 10)
    intervals: tuple = (2, 3)
    shortlist: int = 2
    penalties: tuple = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    mwa_metrics: tuple = ("train_loss", "step")
    baseline_sizes: tuple = (3, 5, 10)   # TIES / DARE-TIES windows (the paper's last 3, 5, 10)
    update_sizes: tuple = (3, 5, 10)     # windows of the update-space baselines (UPDATE_BASELINES)
    density: float = 0.5                 # TIES / DARE-TIES density
    batch_size: int = 32
    lr: float = 4e-3                 # LoRA peak learning rate

    @classmethod
    def quick(cls, steps: int = 150) -> "DemoPlan":
        return cls(steps=steps, pretrain_steps=500, n_checkpoints=8, n_train=1500, n_heldout=100,
                   soup_sizes=(2, 3, 5), intervals=(2,), shortlist=1, penalties=(0.7, 1.0),
                   mwa_metrics=("train_loss", "step"), baseline_sizes=(3,), update_sizes=(3,))

    @property
    def save_every(self) -> int:
        """Interval so that n_checkpoints land on it and the final step falls off it."""
        return max(1, self.steps // (self.n_checkpoints + 1))

    @property
    def save_steps(self) -> list[int]:
        """The checkpoint steps: n_checkpoints on the interval, then the final step (off it, like
        the paper's runs: 1000, 2000, ..., 17000, then 17814)."""
        return [s for s in (self.save_every * i for i in range(1, self.n_checkpoints + 1))
                if s < self.steps] + [self.steps]


SCORE = "heldout_acc"

#: The update-space baselines (method, space, parameters taken from the plan/seed), every one with
#: base pretrained: the task vectors are the LoRA updates s·B·A themselves (METHODS.md "Low-rank
#: families"). Default names: ``ties_last_5_base_pretrained_delta``, ``tsv_last_5_base_pretrained_delta``,
#: ``core_ties_last_5_base_pretrained``, ...
UPDATE_BASELINES = (
    ("ties", "delta", ("density",)),
    ("dare_ties", "delta", ("density", "seed")),
    ("tsv", "delta", ()),
    ("iso_c", "delta", ()),
    ("star", "delta", ()),
    ("knots_ties", "delta", ("density",)),
    ("ties", "core", ("density",)),
)


class Evaluator:
    """Base model + injected LoRA; loads any adapter folder from disk and scores it."""

    def __init__(self, base_dir: Path, pairs):
        self.model, self.tok = load_base(base_dir)
        inject_lora(self.model)
        self.model.eval()
        self.pairs = pairs

    def base_only(self) -> dict[str, float]:
        zero_adapter(self.model)
        return evaluate(self.model, self.pairs)

    def adapter(self, folder) -> dict[str, float]:
        load_adapter(self.model, folder)   # its own rank and scaling: update-space merges too
        return evaluate(self.model, self.pairs)


def _fresh_run(reg, wanted: str | None, seed: int, out: Path) -> str:
    """A run name that is new both in the registry and under ``out`` (nothing is overwritten)."""
    from .errors import DuplicateError, OutputExistsError

    names = {r["run"] for r in reg.runs()}
    if wanted:
        if wanted in names or f"{wanted}-base" in names:
            raise DuplicateError(f"run {wanted!r} already exists in {reg.path}; pick another --run "
                                 f"or another --db")
        if (out / wanted).exists():
            raise OutputExistsError(f"{out / wanted} exists; pick another --run or --out")
        return wanted
    base = f"demo-seed{seed}"
    run, i = base, 1
    while run in names or f"{run}-base" in names or (out / run).exists():
        i += 1
        run = f"{base}-{i}"
    return run


#: Default torch threads. Measured on this project's 2-core machine: a second thread makes a
#: pretraining step ~1.5x faster on idle cores (17 vs 26 ms) but 15-20x slower when other jobs
#: already load the cores (spinning OpenMP workers); and the numbers depend on the thread count.
#: One thread keeps the demo fast everywhere and its results reproducible; ``threads=2`` is there.
DEFAULT_THREADS = 1


def run_demo(db=None, out="ckptreg-demo", *, steps: int | None = None, seed: int = 0, quick: bool = False,
             run: str | None = None, threads: int | None = None, plan: DemoPlan | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Run the whole demo; returns a summary dict (also holding the leaderboard rows).

    ``db``: registry path (None = default). ``out``: folder for the base model, the adapters,
    the merges and the plots. ``log(msg)`` receives progress lines. ``threads``: torch threads
    for the run (default :data:`DEFAULT_THREADS`), restored afterwards."""
    threads = int(threads) if threads else DEFAULT_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(db, out, steps=steps, seed=seed, quick=quick, run=run, threads=threads,
                         plan=plan, log=log)
    finally:
        torch.set_num_threads(before)


def _run_demo(db, out, *, steps, seed, quick, run, threads, plan, log) -> dict:
    from . import api, engine
    from . import leaderboard as lb
    from . import plots
    from .registry import Registry

    say = log or (lambda _m: None)
    t_start = time.time()
    timings: dict[str, float] = {}
    if plan is None:
        plan = DemoPlan.quick(steps or 150) if quick else DemoPlan(**({"steps": steps} if steps else {}))
    out = Path(out).expanduser().absolute()
    reg = Registry(db)
    run = _fresh_run(reg, run, seed, out)
    run_dir = out / run
    run_dir.mkdir(parents=True)
    say(f"seed {seed}; run {run!r}; registry {reg.path}; outputs in {run_dir}; {threads} torch thread(s)")

    # 1. task, tokenizer, base model ------------------------------------------------------
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    task = make_task(seed, n_train=plan.n_train, n_heldout=plan.n_heldout)
    tok = Tokenizer()
    say(f"task: {len(task.train)} training problems over {len(task.train_facts)} facts, "
        f"{len(task.heldout)} held-out problems over {len(task.heldout_facts)} unseen facts")
    say(f"  e.g. {task.train[0].text!r} -> {task.train[0].solution!r}")
    model = TinyLM(ModelConfig(vocab_size=len(tok)))
    say(f"pretraining the base model ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{plan.pretrain_steps} full-parameter steps on equations and stories)")
    pre_losses = pretrain_base(model, tok, task.pretrain, plan.pretrain_steps, seed, lr=plan.pretrain_lr, log=say)
    base_dir = save_base(model, tok, run_dir / "base")
    timings["pretrain_s"] = time.time() - t0

    heldout_pairs = encode_problems(tok, task.heldout)
    train_pairs = encode_problems(tok, task.train)
    ev = Evaluator(base_dir, heldout_pairs)
    base_metrics = ev.base_only()
    base_run = f"{run}-base"
    base_id = reg.add(base_dir, run=base_run, step=plan.pretrain_steps,
                      metrics={"pretrain_loss": sum(pre_losses[-50:]) / len(pre_losses[-50:])})
    reg.log(f"{base_run}@{plan.pretrain_steps}", base_metrics)
    say(f"base model alone (no adapter): held-out accuracy {base_metrics['heldout_acc']:.3f}, "
        f"loss {base_metrics['heldout_loss']:.3f}")

    # 2. LoRA fine-tuning, registering every checkpoint from inside the loop -----------------
    t0 = time.time()
    inject_lora(model)
    torch.manual_seed(seed + 2)
    for m in model.modules():  # re-draw lora_A from the seed (independent of injection order)
        if isinstance(m, LoRALinear):
            nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
    every = plan.save_every
    say(f"LoRA fine-tuning: r={LORA_R}, alpha={LORA_ALPHA} on {', '.join(TARGET_MODULES)}; "
        f"{plan.steps} steps, an adapter every {every} steps + the final one")

    def on_save(step: int, train_loss: float) -> None:
        folder = save_adapter(model, run_dir / f"checkpoint-{step}")
        reg.add(folder, run=run, step=step, metrics={"train_loss": train_loss})
        say(f"  step {step:>5}  train_loss {train_loss:.4f}  -> registered {run}@{step}")

    finetune_lora(model, train_pairs, plan.steps, seed, batch_size=plan.batch_size, lr=plan.lr,
                  save_at=plan.save_steps, on_save=on_save)
    timings["finetune_s"] = time.time() - t0

    # 3. evaluate the plain checkpoints ----------------------------------------------------
    t0 = time.time()
    scores: dict[int, dict] = {}

    def score(c) -> dict:
        if c.id not in scores:
            m = ev.adapter(c.path)
            reg.log(c.id, m)
            scores[c.id] = m
        return scores[c.id]

    plain = reg.checkpoints(run, merged=False)
    for c in plain:
        score(c)
    final = reg.final(run)
    say(f"evaluated {len(plain)} checkpoints on the held-out split; final {final.ref}: "
        f"accuracy {scores[final.id]['heldout_acc']:.3f} (base alone {base_metrics['heldout_acc']:.3f})")
    timings["eval_plain_s"] = time.time() - t0

    # 4. the paper's merging procedure --------------------------------------------------------
    t0 = time.time()
    merged_dir = run_dir / "merged"
    n_avail = len(plain) - 1  # k_last excludes the final checkpoint

    def window(k, m):
        return reg.select(run, last=k, every=m, exclude_final=True)

    def spec(method, k, m, **kw):
        s = engine.make_spec(reg, method, window(k, m), selection={"last": k, "every": m, "exclude_final": True}, **kw)
        return dataclasses.replace(s, out=str(merged_dir / s.name))

    def run_sweep(specs, what):
        done = engine.sweep(reg, specs, overwrite=True)
        for c in done:
            score(c)
        say(f"  {what}: {len(done)} merges")
        return done

    def rank_key(c):
        m = scores[c.id]
        return (-m[SCORE], m["heldout_loss"])

    def grid(**kw):
        """The sweep grid's specs (``api.expand_sweep``: the one grid expansion; windows the run
        cannot fill are left out), duplicates kept (engine.sweep merges them once)."""
        return api.expand_sweep(reg, run=run, exclude_final=True, out=merged_dir, **kw)[0]

    # 4a. uniform soups of the last k, with and without intervals: every k first, then each k
    # over the intervals (k >= 2), in the plan's order
    sizes, everys = list(plan.soup_sizes), [1] + [m for m in plan.intervals if m != 1]

    def soup_order(s):
        k, m = s.selection["last"], s.selection["every"]
        return (m != 1, sizes.index(k), everys.index(m))

    soup_specs = sorted((s for s in grid(last=sizes, every=everys, method="uniform")
                         if s.selection["every"] == 1 or s.selection["last"] >= 2), key=soup_order)
    soups = run_sweep(soup_specs, "uniform soups (last k, last k every m)")
    soup_sel = {c.id: s.selection for c, s in zip(soups, soup_specs)}
    shortlist = sorted(soups, key=rank_key)[: plan.shortlist]
    short_windows = [(soup_sel[c.id]["last"], soup_sel[c.id]["every"]) for c in shortlist]
    say("  shortlisted: " + ", ".join(f"{c.name} ({scores[c.id][SCORE]:.3f})" for c in shortlist))

    # 4b. loss- and step-weighted MWA over the penalties, on the shortlisted windows (one pass)
    mwa_specs = [s for (k, m) in short_windows
                 for s in grid(last=k, every=m, method="mwa", metric=plan.mwa_metrics, penalty=plan.penalties)]
    mwa = run_sweep(mwa_specs, "metrics-weighted averages (loss, steps) x penalties")

    # 4c. baselines: TIES, DARE-TIES (last 3/5/10), SLERP (last 2), base first and base last
    base_specs = []
    for method in ("ties", "dare_ties"):
        for k in plan.baseline_sizes:
            if k <= n_avail:
                for b in ("first", "last"):
                    params = {"density": plan.density}
                    if method == "dare_ties":
                        params["seed"] = seed
                    base_specs.append(spec(method, k, 1, base=b, params=params))
    for b in ("first", "last"):
        base_specs.append(spec("slerp", 2, 1, base=b, params={"t": 0.5}))
    baselines = run_sweep(base_specs, "TIES / DARE-TIES / SLERP baselines")

    # 4d. update-space baselines (METHODS.md "Low-rank families"): the task vectors are the LoRA
    # updates themselves (base pretrained, no base checkpoint), merged exactly from the factors
    # in delta space (TIES / DARE-TIES one dense layer at a time, truncated back to r 8; TSV-M,
    # Iso-C, STAR, KnOTS-TIES in the span of the stacked factors) and TIES on the core matrices.
    # One sweep per space (every point the exact factored merge engine.merge runs), evaluated
    # like every other adapter; listed in (window, UPDATE_BASELINES) order.
    up_specs = []
    for k in plan.update_sizes:
        if k > n_avail:
            continue
        for method, space, params in UPDATE_BASELINES:
            params = {x: {"density": plan.density, "seed": seed}[x] for x in params}
            up_specs.append((spec(method, k, 1, base="pretrained", params=params, space=space), space))
    update_baselines: list = [None] * len(up_specs)
    for space in dict.fromkeys(sp for _s, sp in up_specs):   # delta, then core
        idx = [i for i, (_s, sp) in enumerate(up_specs) if sp == space]
        for i, c in zip(idx, engine.sweep(reg, [up_specs[i][0] for i in idx], space=space, overwrite=True)):
            update_baselines[i] = c
    for c in update_baselines:
        score(c)
    say(f"  update-space baselines (base pretrained: delta-space TIES / DARE-TIES / TSV-M / Iso-C / STAR / "
        f"KnOTS-TIES, core-space TIES): {len(update_baselines)} merges")
    timings["merge_eval_s"] = time.time() - t0

    # 5. leaderboard and plots -------------------------------------------------------------------
    t0 = time.time()
    rows = lb.leaderboard(reg, run, SCORE, base=f"{base_run}@{plan.pretrain_steps}")
    for r in rows:
        m = scores.get(r["id"])
        r["heldout_loss"] = m["heldout_loss"] if m else None
    last_merging = window(1, 1)[0]
    all_merged = soups + mwa + baselines + update_baselines
    best = min(all_merged, key=rank_key)
    best_mwa = min(mwa, key=rank_key) if mwa else None
    plots_out = {}
    try:
        loss_mwa = [c for c in mwa if "_loss_pf-" in (c.name or "")]
        pick = min(loss_mwa, key=rank_key) if loss_mwa else (best_mwa or best)
        lin = reg.lineage(pick.id)
        ins = [reg.get(i["id"]) for i in lin["inputs"]]
        ws = [i["weight"] for i in lin["inputs"]]
        plain_now = reg.checkpoints(run, merged=False)
        plots_out["weights"] = str(plots.plot_weights(
            ins, "train_loss", ws, run_dir / "loss_weights.png", run_ckpts=plain_now,
            title=f"{pick.name}: train loss, chosen checkpoints and their weights"))
        plots_out["leaderboard"] = str(plots.plot_leaderboard(
            rows, run_dir / "leaderboard.png", title=f"{run}: held-out accuracy"))
    except Exception as e:  # plots are optional (matplotlib); say why, keep the results
        from .errors import UsageError
        if not isinstance(e, UsageError):
            raise
        say(f"plots skipped: {e}")
    timings["report_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    # MWA vs its uniform soup, per shortlisted window
    mwa_vs_uniform = []
    for c, (k, m) in zip(shortlist, short_windows):
        mine = [x for x, s in zip(mwa, mwa_specs) if (s.selection["last"], s.selection["every"]) == (k, m)]
        if not mine:
            continue
        bm = min(mine, key=rank_key)
        mwa_vs_uniform.append({"window": c.name, "uniform_acc": scores[c.id][SCORE],
                               "best_mwa": bm.name, "best_mwa_acc": scores[bm.id][SCORE],
                               "pct": lb.pct_change(scores[bm.id][SCORE], scores[c.id][SCORE])})

    def brief(c):
        return {"ref": c.ref, "name": c.name, "step": c.step, **scores[c.id]}

    ranks = {r["id"]: r["rank"] for r in rows}

    def _vs(c, space):
        lin = reg.lineage(c.id)
        return {**brief(c), "method": lin["method"], "space": space, "rank": ranks.get(c.id),
                "vs_last_merging": lb.pct_change(scores[c.id][SCORE], scores[last_merging.id][SCORE]),
                "vs_final": lb.pct_change(scores[c.id][SCORE], scores[final.id][SCORE])}

    summary = {
        "seed": seed, "run": run, "threads": threads, "db": str(reg.path), "out": str(run_dir), "steps": plan.steps,
        "save_every": every, "n_checkpoints": len(plain), "n_merges": len(all_merged),
        "base": {"ref": f"{base_run}@{plan.pretrain_steps}", "id": base_id, **base_metrics},
        "final": brief(final), "last_merging": brief(last_merging),
        "best": {**brief(best), "vs_last_merging": lb.pct_change(scores[best.id][SCORE], scores[last_merging.id][SCORE]),
                 "vs_final": lb.pct_change(scores[best.id][SCORE], scores[final.id][SCORE])},
        "best_mwa": brief(best_mwa) if best_mwa else None,
        "update_baselines": [_vs(c, space) for c, (_s, space) in zip(update_baselines, up_specs)],
        "shortlist": [c.name for c in shortlist],
        "mwa_vs_uniform": mwa_vs_uniform,
        "leaderboard": rows, "plots": plots_out, "timings": timings,
        "merged_paths": [c.path for c in all_merged],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
