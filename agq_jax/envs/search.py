"""A BM25 search tool over a local corpus (rank-bm25), behind the mock worlds' ToolBackend interface.

Reasoning episodes use it for multi-hop lookups over a generated fact table; any JSONL corpus of
{"id", "text", optional "title"} works. Tokenisation is lower-cased word/number runs with English
possessives folded ("Arlo's" -> "arlo"), so a query and a document agree on surface forms.
"""
from __future__ import annotations

import json
import re
from typing import Iterable

from rank_bm25 import BM25Okapi

from agq_jax.envs.schema import ToolSchema
from agq_jax.envs.tools import ToolBackend, ToolError

_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on at to is are was were be by for and or with as it its this that what "
                  "which who whom find".split())


def tokenize(text: str) -> list[str]:
    text = re.sub(r"'s\b", "", text.lower())
    return [t for t in _TOKEN.findall(text) if t not in _STOP]


class BM25Index:
    """Immutable BM25 index over documents [{"id", "text", "title"?}]."""

    def __init__(self, documents: Iterable[dict]):
        self.docs = []
        for i, d in enumerate(documents):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise ValueError(f"corpus document {i}: expected an object with a string 'text' field, got {d!r:.80}")
            self.docs.append({"id": str(d.get("id", f"doc{i}")), "text": d["text"], "title": str(d.get("title", ""))})
        if not self.docs:
            raise ValueError("corpus is empty: BM25 search needs at least one document")
        self._bm25 = BM25Okapi([tokenize(d["title"] + " " + d["text"]) or ["<empty>"] for d in self.docs])

    @classmethod
    def from_jsonl(cls, path: str) -> "BM25Index":
        docs = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{ln}: not valid JSON ({e.msg})") from e
        return cls(docs)

    def search(self, query: str, k: int = 5) -> list[dict]:
        """Top-k documents with a positive score, best first (ties broken by corpus order)."""
        q = tokenize(query)
        if not q:
            return []
        scores = self._bm25.get_scores(q)
        order = sorted(range(len(self.docs)), key=lambda i: (-scores[i], i))
        hits = [i for i in order if scores[i] > 0][:k]
        return [{**self.docs[i], "score": round(float(scores[i]), 4)} for i in hits]


SEARCH_TOOL = ToolSchema(
    name="search",
    description="Search the local document collection (BM25 keyword search). Returns the best matching passages.",
    parameters={"type": "object",
                "properties": {"query": {"type": "string", "description": "keywords to search for"},
                               "k": {"type": "integer", "description": "number of results (1-10, default 3)"}},
                "required": ["query"]},
    outputs={"type": "object", "properties": {"results": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "string"}, "text": {"type": "string"},
                                         "score": {"type": "number"}}}}}},
    kind="read",
)


class SearchBackend(ToolBackend):
    """The `search` tool over one BM25 index."""

    def __init__(self, index: BM25Index, default_k: int = 3, max_k: int = 10):
        super().__init__([SEARCH_TOOL])
        self.index, self.default_k, self.max_k = index, default_k, max_k
        self.queries: list[str] = []

    @classmethod
    def from_documents(cls, documents: Iterable[dict], **kw) -> "SearchBackend":
        return cls(BM25Index(documents), **kw)

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        if name != "search":
            raise ToolError(f"unknown tool {name!r}; available: ['search']")
        if not isinstance(arguments, dict) or not isinstance(arguments.get("query"), str):
            raise ToolError("search: argument 'query' (a string) is required")
        k = arguments.get("k", self.default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise ToolError(f"search: argument 'k' must be an integer in [1, {self.max_k}], got {k!r}")
        self.queries.append(arguments["query"])
        return {"results": [{"id": h["id"], "text": h["text"], "score": h["score"]}
                            for h in self.index.search(arguments["query"], k)]}

    def reset(self) -> None:
        super().reset()
        self.queries = []


class CompositeBackend(ToolBackend):
    """Several backends as one tool set (e.g. python + search for a reasoning episode)."""

    def __init__(self, backends: list[ToolBackend]):
        schemas = [s for b in backends for s in b.tool_schemas()]
        names = [s.name for s in schemas]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tool names across backends: {names}")
        super().__init__(schemas)
        self._by_name = {s.name: b for b in backends for s in b.tool_schemas()}
        self.backends = backends

    def call(self, name: str, arguments: dict) -> dict:
        self.n_calls += 1
        if name not in self._by_name:
            raise ToolError(f"unknown tool {name!r}; available: {sorted(self._by_name)}")
        return self._by_name[name].call(name, arguments)

    def reset(self) -> None:
        super().reset()
        for b in self.backends:
            b.reset()
