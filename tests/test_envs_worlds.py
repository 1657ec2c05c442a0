"""Procedural worlds: gold = 1, hack = 0, guessing < 1, refusing a legal task < 1 — every domain and branch."""
import json

import pytest

from agq_jax.envs import Termination, replay_agent, run_episode, score
from agq_jax.envs.runtime import approx_token_count, system_message
from agq_jax.envs.schema import BRANCH_TYPES, Task, state_hash
from agq_jax.envs.tools import StateToolBackend
from agq_jax.envs.worlds import domains, get_world
from agq_jax.envs.worlds.generator import (Knobs, counterfactual_replies, generate_task, generate_tasks,
                                           harder_variant, make_splits)

DOMAINS = domains()
CASES = [(d, b, lv) for d in DOMAINS for b in BRANCH_TYPES for lv in (0, 3)]


@pytest.fixture(scope="module")
def tasks():
    return {(d, b, lv): generate_task(d, b, seed=11, knobs=Knobs(level=lv)) for d, b, lv in CASES}


def test_six_domains_with_3_to_5_tools_and_typed_state():
    assert len(DOMAINS) >= 6
    for d in DOMAINS:
        w = get_world(d)
        assert 3 <= len(w.tool_schemas()) <= 5
        assert {t.kind for t in w.tool_schemas()} == {"read", "write", "transfer"}
        assert all(len(t.param_names) <= 3 for t in w.tool_schemas())
        t = generate_task(d, "legal", seed=0)
        with pytest.raises(Exception):   # the state is typed: a wrong field type is rejected
            bad = json.loads(json.dumps(t.initial_state))
            rec = next(iter(bad[w.spec.entity + "s"].values()))
            rec[w.spec.owner_id_field] = {"not": "a string"}
            w.load_state(bad)


@pytest.mark.parametrize("domain,branch,level", CASES)
def test_gold_scores_one_and_counterfactuals_do_not(tasks, domain, branch, level):
    task = tasks[(domain, branch, level)]
    rec = run_episode(task, replay_agent(task.gold_replies))
    r = score(task, rec)
    assert r.total == 1.0, r.components
    assert rec.termination == (Termination.TRANSFER.value if branch == "transfer" else Termination.USER_STOP.value)
    assert rec.messages == task.gold_trajectory
    assert len(rec.raw_replies) == len(task.gold_replies)

    hack = run_episode(task, replay_agent(counterfactual_replies(task, "hack")))
    rh = score(task, hack)
    assert rh.total == 0.0 and rh.gates["no_forbidden"] is False, rh.components

    guess = run_episode(task, replay_agent(counterfactual_replies(task, "guess")))
    rg = score(task, guess)
    assert rg.total < 1.0 and any(v == 0.0 for k, v in rg.components.items() if k.startswith("subgoal/ask_"))

    if task.branch.legal:
        ref = run_episode(task, replay_agent(counterfactual_replies(task, "refuse")))
        assert score(task, ref).total < 1.0


@pytest.mark.parametrize("domain", DOMAINS)
def test_tree_branch_and_hack_path_executable(tasks, domain):
    for b in BRANCH_TYPES:
        task = tasks[(domain, b, 3)]
        node = task.behavior_tree.find(task.branch.node_id)
        assert node is not None and node.branch_type == b
        assert task.branch.legal == (b not in ("refusal", "transfer"))
        # the hack path runs on the tools (policy lives in the SOP, not in the tools) and changes the state
        backend = StateToolBackend(task)
        for step in task.expected_returns.hack_path:
            assert backend.call(step.tool_name, step.input) == step.expected_output
        assert backend.state_hash() != state_hash(task.initial_state)
        assert task.rubric.forbidden_actions
        # distractor records are present and the user holds back every hidden fact in the opening
        assert len(task.initial_state[get_world(domain).spec.entity + "s"]) == 1 + task.difficulty.n_distractors
        assert all(f.value not in task.user_opening for f in task.user.hidden_facts)


def test_refusal_escape_strategy_lie_then_plead(tasks):
    task = tasks[("retail", "refusal", 3)]
    kinds = [s.kind for s in task.user.escape.steps]
    assert kinds[:2] == ["lie", "plead"]
    rec = run_episode(task, replay_agent(task.gold_replies))
    user_texts = [m["content"] for m in rec.messages if m["role"] == "user"]
    assert task.user.escape.steps[0].text in user_texts and task.user.escape.steps[1].text in user_texts
    assert [e["escape_step"] for e in rec.user_events if e["escape_step"] is not None] == list(range(len(kinds)))


def test_lowest_difficulty_is_small():
    for t in generate_tasks(60, seed=5, knobs=Knobs(level=0)):
        assert 1 <= len(t.gold_actions) <= 3
        assert approx_token_count(t.system_prompt) < 300
        assert len(t.tools) == 3
        for m in t.gold_trajectory:
            if m["role"] == "tool":
                assert len(m["content"]) < 300
        assert approx_token_count(system_message(t)) < 700


def test_deterministic_by_seed_and_json_round_trip():
    a = generate_task("bank", "refusal", seed=3, knobs=Knobs(level=2))
    b = generate_task("bank", "refusal", seed=3, knobs=Knobs(level=2))
    c = generate_task("bank", "refusal", seed=4, knobs=Knobs(level=2))
    assert a.model_dump_json() == b.model_dump_json()
    assert a.id != c.id and a.initial_state != c.initial_state
    assert Task.model_validate_json(a.model_dump_json()) == a


def test_splits_are_disjoint_by_seed_and_domain():
    train, held = make_splits(60, 30, seed=1)
    assert not {t.id for t in train} & {t.id for t in held}
    assert not {state_hash(t.initial_state) for t in train} & {state_hash(t.initial_state) for t in held}
    train, held = make_splits(30, 20, seed=1, heldout_domains=["clinic"])
    assert {t.domain for t in held} == {"clinic"} and "clinic" not in {t.domain for t in train}
    with pytest.raises(ValueError, match="unknown held-out"):
        make_splits(1, 1, heldout_domains=["nope"])


def test_harder_variant_turns_the_knobs():
    t = generate_task("library", "refusal", seed=9)
    h = harder_variant(t)
    h2 = harder_variant(h, step=2)
    assert h.lineage.source_task_id == t.id and h.lineage.method == "harder_variant" and h.lineage.round == 1
    for a, b in ((t, h), (h, h2)):
        assert b.difficulty.level > a.difficulty.level
        assert b.difficulty.n_distractors > a.difficulty.n_distractors
        assert b.difficulty.adversarial_pressure >= a.difficulty.adversarial_pressure
    assert h2.difficulty.tree_depth > t.difficulty.tree_depth and h2.difficulty.n_steps > t.difficulty.n_steps
    rec = run_episode(h2, replay_agent(h2.gold_replies))
    assert score(h2, rec).total == 1.0
    with pytest.raises(ValueError, match="procedural"):
        harder_variant(Task(id="x", system_prompt="s", user_opening="u"))


def test_gold_trajectory_renders_to_the_gold_replies_with_the_qwen3_template(tasks):
    """SFT on `gold_trajectory` through the chat template trains exactly the raw `gold_replies` strings."""
    from agq_jax.tokenizer import load_qwen3_tokenizer

    tok = load_qwen3_tokenizer()
    for b in BRANCH_TYPES:
        task = tasks[("it_tickets", b, 3)]
        text = tok.apply_chat_template(task.gold_trajectory, tokenize=False, enable_thinking=False)
        assert text.startswith("<|im_start|>system\n" + system_message(task) + "<|im_end|>")
        pos = 0
        for reply in task.gold_replies:
            at = text.find("<|im_start|>assistant\n", pos)
            assert at >= 0
            body_start = at + len("<|im_start|>assistant\n")
            body = text[body_start:text.find("<|im_end|>", body_start)]
            assert body.split("</think>\n\n")[-1] == reply
            pos = body_start


def _restated(reply: str, want: str, other: str) -> str:
    import re
    return re.sub(rf"(?<![\w-]){re.escape(want)}(?![\w-])", other, reply)


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("branch", ["clarification", "legal"])
def test_a_correcting_user_says_no_to_a_wrong_option_and_cheap_policies_still_lose(tasks, domain, branch):
    """env.user_corrects: a restatement naming the other option gets "No. I'd like X." and no confirmation;
    restating right afterwards succeeds, while writing anyway, refusing or doing nothing score below the gold
    path, and the gold episode is unchanged. (A restatement naming the choice's keyword before it was asked
    for is itself a question for it: the user reveals the fact, as without the rule.)"""
    from agq_jax.envs.users import CONFIRM_ASK, wanted_options

    task = tasks[(domain, branch, 0)]
    (want, options), = wanted_options(task)
    others = [o for o in options if o != want]
    gold = task.gold_replies
    i = next(j for j, r in enumerate(gold) if CONFIRM_ASK.search(r) and _restated(r, want, others[0]) != r)
    wrong_q = _restated(gold[i], want, others[0])

    def play(replies, corrects=True):
        rec = run_episode(task, replay_agent(replies), user="scripted", tools="state", user_corrects=corrects)
        return rec, score(task, rec)

    rec, r = play(gold)
    assert r.total == 1.0 and rec.messages == task.gold_trajectory
    rec, r = play(gold[:i] + [wrong_q] + gold[i:])                   # wrong, corrected, then right
    said = [m["content"] for m in rec.messages if m["role"] == "user"]
    assert f"No. I'd like {want}." in said and r.success, said
    assert [e["confirmed"] for e in rec.user_events if e["confirmed"] is not None] == [False, True]
    cheap = {
        "writes the wrong option after the no": gold[:i] + [wrong_q, _restated(gold[i + 1], want, others[0])],
        "writes the right option without a yes": gold[:i] + [wrong_q] + gold[i + 1:],
        "does nothing": ["Goodbye."],
        "refuses": counterfactual_replies(task, "refuse"),
    }
    for name, replies in cheap.items():
        _, rc = play(replies)
        assert rc.total < 1.0 and not rc.success, (name, rc.components)
    # without the rule the scripted user confirms the wrong option: the old world, kept as the default
    rec, _ = play(gold[:i] + [wrong_q] + gold[i:], corrects=False)
    assert "Yes, please go ahead." in [m["content"] for m in rec.messages if m["role"] == "user"][2]


def test_user_corrects_is_refused_for_a_teacher_user():
    from agq_jax.run_config import schema
    from agq_jax.envs.world import WorldSpec

    with pytest.raises(ValueError, match="user_corrects"):
        WorldSpec(user="teacher", user_corrects=True)
    with pytest.raises(ValueError, match="config env: .*user_corrects"):
        schema.EnvSection(user="teacher", user_corrects=True)
