"""Reasoning episodes: tools behind the ToolBackend interface, final answers rewarded by equivalence."""
import json
import re

import pytest

from agq_jax.envs.parsing import format_tool_call
from agq_jax.envs.reasoning import make_reasoning_env, run_reasoning_episode, score_reasoning
from agq_jax.envs.runtime import Termination
from agq_jax.envs.sandbox import SandboxLimits
from agq_jax.envs.search import BM25Index, SearchBackend
from agq_jax.envs.reasoning_problems import Difficulty, ReasoningProblem, generate_problem

LIM = SandboxLimits(time_s=5.0, memory_mb=512)


def test_python_tool_then_correct_boxed_answer_gets_reward_one():
    p = ReasoningProblem(id="p1", question="What is 123456789 * 987654321?", answer="121932631112635269")
    replies = iter([format_tool_call("python", {"code": "print(123456789 * 987654321)"}),
                    "The product is \\boxed{121932631112635269}."])
    seen = []

    def agent(messages):
        seen.append(messages)
        return next(replies)

    env = make_reasoning_env(p, sandbox_limits=LIM)
    assert [t["function"]["name"] for t in env.tool_schemas] == ["python"]
    rec = run_reasoning_episode(p, agent, sandbox_limits=LIM)
    tool_msg = seen[1][-1]
    assert tool_msg["role"] == "tool" and json.loads(tool_msg["content"])["stdout"].strip() == "121932631112635269"
    assert rec.correct and rec.finish == "final_answer" and rec.termination == Termination.USER_STOP.value
    assert score_reasoning(p, rec).total == 1.0


def test_equivalent_and_wrong_answers():
    p = ReasoningProblem(id="p2", question="Half of one?", answer="1/2", tools=[])
    for reply, want in [("\\boxed{0.5}", 1.0), ("<answer>\\frac{1}{2}</answer>", 1.0), ("\\boxed{2}", 0.0)]:
        env = make_reasoning_env(p)
        env.reset()
        res = env.step(reply)
        assert res.done and env.reward().total == want, reply


def test_no_answer_is_nudged_then_ends_and_truncation_ends():
    p = ReasoningProblem(id="p3", question="1+1?", answer="2", tools=[])
    env = make_reasoning_env(p)
    env.reset()
    r1 = env.step("Let me think about it.")
    assert not r1.done and r1.new_messages[0]["role"] == "user"
    r2 = env.step("Still thinking.")
    assert r2.done and r2.termination == Termination.MALFORMED and env.reward().total == 0.0
    env.reset()
    assert env.step("\\boxed{", truncated=True).termination == Termination.MAX_TOKENS


def _resolver_agent(question: str):
    """An honest multi-hop agent: parses the facts it retrieved, walks the relation chain, searches for the
    next person when a fact is missing, and answers once it reaches the house number."""
    rels = re.findall(r"the (mentor|neighbor|older sibling) of", question)
    start = re.search(r"of (\w+)\. Answer", question).group(1)
    pats = {"mentor": r"The mentor of (\w+) is (\w+)", "neighbor": r"(\w+) lives next door to (\w+)",
            "older sibling": r"(\w+)'s older sibling is (\w+)"}

    def agent(messages):
        docs = [h["text"] for m in messages if m["role"] == "tool"
                for h in json.loads(m["content"]).get("results", [])]
        person = start
        for rel in reversed(rels):
            nxt = next((b for d in docs for a, b in re.findall(pats[rel], d) if a == person), None)
            if nxt is None:
                return format_tool_call("search", {"query": person, "k": 10})
            person = nxt
        house = next((n for d in docs for a, n in re.findall(r"(\w+) lives in house number (\d+)", d)
                      if a == person), None)
        return f"\\boxed{{{house}}}" if house else format_tool_call("search", {"query": f"{person} house", "k": 10})
    return agent


def test_multihop_with_search_tool():
    for seed in range(3):
        p = generate_problem("multihop", Difficulty(hops=2, distractors=3), seed=seed)
        env = make_reasoning_env(p)
        assert [t["function"]["name"] for t in env.tool_schemas] == ["python", "search"]
        rec = run_reasoning_episode(p, _resolver_agent(p.question), sandbox_limits=LIM)
        assert rec.tool_calls and all(c["name"] == "search" for c in rec.tool_calls)
        assert rec.correct, (p.question, rec.answer, p.answer)


def test_search_backend_errors_and_ranking():
    sb = SearchBackend.from_documents([{"id": "a", "text": "Arlo lives in house number 12."},
                                       {"id": "b", "text": "The mentor of Bex is Arlo."},
                                       {"id": "c", "text": "Cato likes tea."}])
    hits = sb.call("search", {"query": "Where does Arlo live? house number"})["results"]
    assert hits[0]["id"] == "a" and all(h["id"] != "c" for h in hits)
    from agq_jax.envs.tools import ToolError
    with pytest.raises(ToolError):
        sb.call("search", {"query": "x", "k": 0})
    with pytest.raises(ValueError, match="corpus document 0"):
        BM25Index([{"title": "no text"}])
