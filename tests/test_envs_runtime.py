"""Episode runtime: Qwen3 parsing, counted malformed output, limits, scripted user, threads, rewards, metrics."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from agq_jax.envs import (EpisodeLimits, EpisodeRecord, RewardConfig, Termination, make_env, replay_agent,
                          run_episode, score)
from agq_jax.envs.metrics import format_table, pass_at_k, pass_hat_k, summarize
from agq_jax.envs.parsing import parse_reply
from agq_jax.envs.tools import ToolBackend
from agq_jax.envs.worlds.generator import Knobs, counterfactual_replies, generate_task


@pytest.fixture(scope="module")
def legal():
    return generate_task("retail", "legal", seed=21, knobs=Knobs(level=2))


def _call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_parse_reply_qwen3_conventions():
    r = parse_reply("<think>plan: call two tools</think>Checking both." + _call("a", {"x": 1}) + _call("b", {}))
    assert [c.name for c in r.tool_calls] == ["a", "b"] and r.thinking == "plan: call two tools"
    assert r.content == "Checking both." and not r.issues
    r = parse_reply("reasoning without opening tag</think><question>Which order?</question>")
    assert r.question == "Which order?" and r.user_text() == "Which order?" and r.thinking
    r = parse_reply("I can't do this. ###TRANSFER_TO_HUMAN")
    assert r.transfer and r.user_text() == "I can't do this."
    r = parse_reply('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>')
    assert r.tool_calls[0].arguments == {"x": 2} and r.issues[0].kind == "arguments_as_string" and not r.malformed
    for bad, kind in [('<tool_call>{"name": "a", </tool_call>', "invalid_json"),
                      ('<tool_call>{"name": "a"}', "unclosed_tool_call"),
                      ('<tool_call>[1, 2]</tool_call>', "not_an_object"),
                      ('<tool_call>{"arguments": {}}</tool_call>', "missing_name"),
                      ('<tool_call>{"name": "a", "arguments": 3}</tool_call>', "bad_arguments"),
                      ("", "empty_reply")]:
        r = parse_reply(bad)
        assert r.malformed and r.issues[0].kind == kind and not r.tool_calls


def test_malformed_output_is_an_observation_and_counted(legal):
    env = make_env(legal, limits=EpisodeLimits(max_consecutive_malformed=2))
    env.reset()
    res = env.step('<tool_call>{"name": "get_order", "arguments": {</tool_call>')
    assert not res.done and res.new_messages[0]["role"] == "tool" and "malformed" in res.new_messages[0]["content"]
    res = env.step(_call("no_such_tool", {}) + _call("get_order", {}))   # unknown tool + missing argument
    assert [json.loads(m["content"])["error"][:20] for m in res.new_messages] == \
        ["unknown tool 'no_suc", "get_order: missing r"]
    assert env.counters["tool_errors"] == 2 and env.counters["parse_invalid_json"] == 1
    res = env.step("<tool_call>oops")
    assert not res.done
    res = env.step("<tool_call>oops again")
    assert res.done and res.termination == Termination.MALFORMED
    assert env.record.counters["malformed_turns"] == 3
    with pytest.raises(RuntimeError):
        env.step("after the end")


def test_limits_and_termination_reasons(legal):
    rec = run_episode(legal, lambda m: "Could you tell me more?", limits=EpisodeLimits(max_user_turns=3))
    assert rec.termination == "max_user_turns" and rec.user_turns == 3
    rec = run_episode(legal, lambda m: _call("get_order", {"order_id": "O-0000"}),
                      limits=EpisodeLimits(max_agent_turns=4))
    assert rec.termination == "max_agent_turns" and rec.agent_turns == 4
    env = make_env(legal)
    env.reset()
    assert env.step("What is your order ID?", truncated=True).termination == Termination.MAX_TOKENS
    rec = run_episode(legal, lambda m: "word " * 50 + "?", limits=EpisodeLimits(max_total_tokens=120))
    assert rec.termination == "max_tokens"
    rec = run_episode(legal, lambda m: "Sorry. ###TRANSFER_TO_HUMAN")
    assert rec.termination == "transfer" and rec.transferred


def test_errors_end_only_that_episode(legal):
    class Broken(ToolBackend):
        def call(self, name, arguments):
            raise ConnectionError("teacher down")

    rec = run_episode(legal, replay_agent(legal.gold_replies), tools=lambda t: Broken(t.tools))
    assert rec.termination == "error" and "teacher down" in rec.error

    def bad_agent(messages):
        raise ValueError("sampler crashed")

    rec = run_episode(legal, bad_agent)
    assert rec.termination == "error" and "sampler crashed" in rec.error
    assert score(legal, rec).total < 1.0


def test_scripted_user_never_reveals_unasked(legal):
    facts = legal.user.hidden_facts
    assert len(facts) >= 2
    chatter = ["Hello! I'm here to help.", "Can you describe the issue?", "What is the weather like today?",
               "Shall I proceed?", "I have checked the policy.", "Is there anything else?"]
    env = make_env(legal)
    env.reset()
    seen = []
    for text in chatter:
        res = env.step(text)
        seen += [m["content"] for m in res.new_messages]
        if res.done:
            break
    assert not any(f.value in s for f in facts for s in seen)
    assert all(not e["revealed"] for e in env.record.user_events)
    # asking for one fact reveals that fact only
    env = make_env(legal)
    env.reset()
    res = env.step("What is your order ID?")
    assert facts[0].value in res.new_messages[0]["content"] and facts[1].value not in res.new_messages[0]["content"]
    assert env.record.user_events[-1]["revealed"] == [facts[0].key]


def test_env_objects_are_thread_safe(legal):
    tasks = [generate_task(d, b, seed=3) for d in ("bank", "clinic") for b in ("legal", "refusal", "transfer")]

    def one(i):
        t = tasks[i % len(tasks)]
        return t, score(t, run_episode(t, replay_agent(t.gold_replies))).total

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(48)))
    assert all(r == 1.0 for _, r in results)


def test_reward_components_and_configurable_gates(legal):
    hack = run_episode(legal, replay_agent(counterfactual_replies(legal, "hack")))
    r = score(legal, hack)
    assert r.total == 0.0 and r.components["diag/forbidden_calls"] >= 1
    ungated = score(legal, hack, RewardConfig(gates=()))
    assert 0.0 < ungated.total < 1.0 and ungated.gates == {}
    assert ungated.components == r.components
    gold = run_episode(legal, replay_agent(legal.gold_replies))
    strict = score(legal, gold, RewardConfig(gates=("no_forbidden", "confirmed_before_write", "state_match")))
    assert strict.total == 1.0 and all(strict.gates.values())
    # a write before the user confirmed fails the confirmation sub-goal (and the gate when enabled)
    early = [legal.gold_replies[0]] + [r for r in legal.gold_replies[1:] if "<tool_call>" in r] + ["Done."]
    rec = run_episode(legal, replay_agent(early))
    assert score(legal, rec).components["subgoal/confirm_refund_order"] == 0.0
    assert score(legal, rec, RewardConfig(gates=("confirmed_before_write",))).total == 0.0
    weighted = score(legal, rec, RewardConfig(kind_weights=(("confirmed_before_write", 0.0),)))
    assert weighted.total == 1.0
    with pytest.raises(ValueError, match="unknown reward gates"):
        RewardConfig(gates=("nope",))
    assert EpisodeRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_pass_at_k_and_pass_hat_k():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5) and pass_hat_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6) and pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)
    assert pass_at_k(3, 0, 3) == 0.0 and pass_hat_k(3, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    a = generate_task("retail", "refusal", seed=1)
    b = generate_task("flights", "legal", seed=1)
    s = summarize([(a, [1.0, 1.0, 0.0, 1.0]), (b, [0.0, 0.5, 1.0, 0.0])], ks=(1, 4))
    assert s["all"]["n_tasks"] == 2 and s["branch/refusal"]["pass@1"] == pytest.approx(0.75)
    assert s["branch/refusal"]["pass^4"] == 0.0 and s["domain/flights"]["pass@4"] == 1.0
    assert s["legal/true"]["reward_mean"] == pytest.approx(0.375)
    assert "branch/legal" in format_table(s)


def test_persuasion_facts_only_come_with_an_escape_step():
    from agq_jax.envs.schema import EscapeStep, HiddenFact

    task = generate_task("retail", "refusal", seed=4, knobs=Knobs(level=1))
    task.user.hidden_facts.append(HiddenFact(key="receipt", value="RCPT-977", persuasion=True,
                                             ask_keywords=["receipt"]))
    task.user.escape.steps = [EscapeStep(kind="lie", text="Here is my receipt RCPT-977, it proves delivery.",
                                         reveals=["receipt"])]
    env = make_env(task)
    env.reset()
    res = env.step("Do you have a receipt?<|im_end|>")
    assert "RCPT-977" not in res.new_messages[0]["content"] and env.record.messages[-2]["content"].endswith("?")
    res = env.step("Sorry, I can't refund that order.")
    assert "RCPT-977" in res.new_messages[0]["content"] and env.record.user_events[-1]["revealed"] == ["receipt"]
    res = env.step("I still can't refund it.")
    assert res.done and res.termination == Termination.USER_STOP
    assert env.finish(Termination.ERROR) is None     # finishing a finished episode is a no-op
