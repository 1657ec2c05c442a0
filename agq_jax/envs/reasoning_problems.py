"""Verifiable reasoning problems: the record schema, seed loading, and the offline procedural generator.

The generator makes arithmetic, algebra and multi-hop lookup problems (over a generated fact table
served to the agent through the BM25 search tool) with difficulty knobs, so the reasoning flywheel
runs with no teacher: a failed problem is replaced by a procedurally harder one of the same kind.
Everything is a pure function of (kind, difficulty, seed).
"""
from __future__ import annotations

import dataclasses
import json
import random
from fractions import Fraction
from typing import Any, Literal

import pydantic

from agq_jax.envs.schema import stable_hash

KINDS = ("arithmetic", "algebra", "multihop")


class Lineage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    parents: list[str] = []
    round: int = 0
    stage: str = "seed"
    derivation: str = "seed"       # seed / procedural / self_instruct / persona / harder / ...
    teacher: str | None = None     # model that wrote it, if any
    prompt_hash: str | None = None


class ReasoningProblem(pydantic.BaseModel):
    """One verifiable problem (a row of round_<r>/reasoning.jsonl)."""
    model_config = pydantic.ConfigDict(extra="forbid")
    id: str
    question: str = pydantic.Field(min_length=1)
    answer: str = pydantic.Field(min_length=1)
    source: str = "seed"
    kind: str = "open"
    difficulty: dict[str, int] = {}
    documents: list[dict[str, str]] = []   # local corpus for the search tool ({"id", "text"})
    tools: list[Literal["python", "search"]] = ["python"]
    lineage: Lineage = Lineage()
    consistency: dict[str, Any] = {}       # how a synthesized label was agreed (k solutions, answers, solvers)


def problem_id(question: str, answer: str, salt: Any = "") -> str:
    return "rp-" + stable_hash({"q": question, "a": answer, "s": salt}, n=12)


def load_seed_problems(path: str, *, round_idx: int = 0) -> tuple[list[ReasoningProblem], list[dict]]:
    """Read JSONL rows {question, answer, source}; returns (problems, rejects) where each reject
    names the file, line and the offending field instead of failing the whole file."""
    good, bad = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"where": where, "reason": "non_json", "detail": e.msg})
                continue
            if not isinstance(row, dict):
                bad.append({"where": where, "reason": "schema", "detail": "row is not an object"})
                continue
            missing = [k for k in ("question", "answer") if not str(row.get(k, "")).strip()]
            if missing:
                bad.append({"where": where, "reason": "schema", "detail": f"missing field(s) {missing}"})
                continue
            q, a = str(row["question"]), str(row["answer"])
            good.append(ReasoningProblem(
                id=str(row.get("id") or problem_id(q, a)), question=q, answer=a, source=str(row.get("source", "seed")),
                kind=str(row.get("kind", "open")), lineage=Lineage(round=round_idx, stage="seed", derivation="seed")))
    return good, bad


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Knobs the flywheel turns: more operations, bigger operands, more hops, more distractors."""
    num_ops: int = 2          # arithmetic: operators in the expression
    max_operand: int = 20     # arithmetic / algebra: operand magnitude
    algebra_level: int = 1    # 1 linear, 2 linear with both sides, 3 two-variable system
    hops: int = 2             # multihop: chained lookups
    distractors: int = 4      # multihop: unrelated facts in the corpus

    def harder(self, kind: str) -> "Difficulty":
        if kind == "arithmetic":
            return dataclasses.replace(self, num_ops=self.num_ops + 1, max_operand=int(self.max_operand * 1.5) + 1)
        if kind == "algebra":
            return dataclasses.replace(self, algebra_level=min(3, self.algebra_level + 1),
                                       max_operand=int(self.max_operand * 1.5) + 1)
        return dataclasses.replace(self, hops=self.hops + 1, distractors=self.distractors + 2)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Difficulty":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in (d or {}).items() if k in names})


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def gen_arithmetic(rng: random.Random, d: Difficulty) -> tuple[str, str, dict]:
    ops = "+-*"
    expr = str(rng.randint(1, d.max_operand))
    val = Fraction(int(expr))
    for _ in range(d.num_ops):
        op, n = rng.choice(ops + ("/" if d.num_ops >= 3 else "")), rng.randint(1, d.max_operand)
        expr = f"({expr}) {op} {n}" if op in "*/" and rng.random() < 0.5 else f"{expr} {op} {n}"
        # evaluate with Python precedence by recomputing from the string with Fractions
        val = _eval_fraction(expr)
    return f"Compute the exact value of {expr}. Give the answer as an integer or a reduced fraction.", _fmt(val), {}


def _eval_fraction(expr: str) -> Fraction:
    """Evaluate an expression of integers, + - * / and parentheses exactly (no eval)."""
    toks = expr.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def atom():
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t == "(":
            v = add()
            pos += 1  # ')'
            return v
        return Fraction(int(t))

    def mul():
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] in "*/":
            op = toks[pos]
            pos += 1
            r = atom()
            v = v * r if op == "*" else v / r
        return v

    def add():
        nonlocal pos
        v = mul()
        while pos < len(toks) and toks[pos] in "+-":
            op = toks[pos]
            pos += 1
            r = mul()
            v = v + r if op == "+" else v - r
        return v

    return add()


def gen_algebra(rng: random.Random, d: Difficulty) -> tuple[str, str, dict]:
    m = d.max_operand
    x = rng.randint(-m, m)
    if d.algebra_level <= 1:
        a, b = rng.randint(2, m), rng.randint(-m, m)
        return f"Solve for x: {a}x + ({b}) = {a * x + b}.", str(x), {}
    if d.algebra_level == 2:
        a, c = rng.randint(2, m), rng.randint(1, m)
        if a == c:
            a += 1
        b, dd = rng.randint(-m, m), None
        dd = a * x + b - c * x
        return f"Solve for x: {a}x + ({b}) = {c}x + ({dd}).", str(x), {}
    y = rng.randint(-m, m)
    while True:
        a, b, c, e = (rng.randint(1, m) for _ in range(4))
        if a * e - b * c != 0:
            break
    return (f"Solve the system {a}x + {b}y = {a * x + b * y} and {c}x + {e}y = {c * x + e * y}. "
            f"What is x + y?", str(x + y), {})


_NAMES = ["Arlo", "Bex", "Cato", "Dara", "Eli", "Fenn", "Gia", "Hugo", "Iris", "Juno", "Kai", "Lio", "Mara", "Nico",
          "Odin", "Pia", "Quin", "Rhea", "Sol", "Tess", "Uma", "Vik", "Wren", "Xan", "Yara", "Zed"]
_RELS = [("mentor", "the mentor of {a} is {b}."), ("neighbor", "{a} lives next door to {b}."),
         ("sibling", "{a}'s older sibling is {b}.")]


def gen_multihop(rng: random.Random, d: Difficulty) -> tuple[str, str, dict]:
    """A chain e0 -rel-> e1 -rel-> ... -> e_h, then the number of e_h's house; documents hold the facts."""
    people = rng.sample(_NAMES, k=min(len(_NAMES), d.hops + 1 + d.distractors))
    chain = people[:d.hops + 1]
    docs, rels = [], []
    for i in range(d.hops):
        rel, tmpl = rng.choice(_RELS)
        rels.append(rel)
        docs.append(tmpl.format(a=chain[i], b=chain[i + 1]))
    numbers = {p: rng.randint(10, 999) for p in people}
    docs += [f"{p} lives in house number {numbers[p]}." for p in people]
    for p in people[d.hops + 1:]:
        rel, tmpl = rng.choice(_RELS)
        docs.append(tmpl.format(a=p, b=rng.choice([o for o in people if o != p])))
    rng.shuffle(docs)
    path = chain[0]
    for rel in rels:
        path = f"the {rel} of {path}" if rel != "sibling" else f"the older sibling of {path}"
    q = (f"Using the search tool over the town records, find the house number of {path}. "
         f"Answer with the number only.")
    documents = [{"id": f"doc{i}", "text": t[0].upper() + t[1:]} for i, t in enumerate(docs)]
    return q, str(numbers[chain[-1]]), {"documents": documents}


_GENERATORS = {"arithmetic": gen_arithmetic, "algebra": gen_algebra, "multihop": gen_multihop}


def generate_problem(kind: str, difficulty: Difficulty, seed: int, *, round_idx: int = 0,
                     parents: list[str] | None = None, derivation: str = "procedural") -> ReasoningProblem:
    if kind not in _GENERATORS:
        raise ValueError(f"unknown procedural kind {kind!r} (known: {KINDS})")
    rng = random.Random(f"{kind}-{seed}-{json.dumps(dataclasses.asdict(difficulty), sort_keys=True)}")
    q, a, extra = _GENERATORS[kind](rng, difficulty)
    return ReasoningProblem(
        id=problem_id(q, a, seed), question=q, answer=a, source="procedural", kind=kind,
        difficulty=dataclasses.asdict(difficulty), documents=extra.get("documents", []),
        tools=["python", "search"] if kind == "multihop" else ["python"],
        lineage=Lineage(parents=parents or [], round=round_idx, stage="procedural", derivation=derivation))


def generate_seed_set(n: int, seed: int, *, kinds=KINDS, difficulty: Difficulty = Difficulty(),
                      round_idx: int = 0) -> list[ReasoningProblem]:
    """n problems cycling over kinds, deterministic in seed."""
    return [generate_problem(kinds[i % len(kinds)], difficulty, seed * 100_003 + i, round_idx=round_idx)
            for i in range(n)]


def harder_variant(p: ReasoningProblem, *, round_idx: int, salt: int = 0) -> ReasoningProblem:
    """A procedurally harder problem of the same kind (offline expansion from a failure)."""
    kind = p.kind if p.kind in _GENERATORS else "arithmetic"
    d = Difficulty.from_dict(p.difficulty).harder(kind)
    seed = int(stable_hash({"parent": p.id, "salt": salt}, n=8), 16)
    return generate_problem(kind, d, seed, round_idx=round_idx, parents=[p.id], derivation="harder")
