"""The reference's agent protocol as an episode option: <policy> + requirements block + /no_think in the prompt,
<question> to the user (who sees only the question), the episode ending on the agent's <answer> or a transfer
(not on the user's stop), and a reply with no tag and no tool call ending it as malformed."""
from collections import Counter

import pytest

from agq_jax.envs import make_env
from agq_jax.envs.parsing import STOP_MARKER, TRANSFER_MARKER
from agq_jax.envs.users import UserSimulator, UserTurn
from agq_jax.envs.worlds.generator import generate_tasks


class RecordingUser(UserSimulator):
    """Says the stop marker to whatever it is asked, remembering what it was shown."""

    def __init__(self, task):
        self.task, self.seen, self.counters = task, [], Counter()

    def opening(self) -> str:
        return self.task.user_opening

    def respond(self, agent_text: str, messages: list[dict]) -> UserTurn:
        self.seen.append(agent_text)
        return UserTurn(f"Thanks, that's all. {STOP_MARKER}", stop=True)


@pytest.fixture(scope="module")
def task():
    return generate_tasks(1, seed=7)[0]


def _env(task, protocol):
    user = RecordingUser(task)
    env = make_env(task, user=user, protocol=protocol)
    return env, user, env.reset()


def test_reference_prompt(task):
    _, _, msgs = _env(task, "reference")
    system, opening = msgs[0]["content"], msgs[1]["content"]
    assert system.startswith("<policy>\n" + task.system_prompt.strip()) and system.count("### Requirements:") == 1
    assert "<tools>" in system and system.rstrip().endswith("/no_think")
    assert opening.startswith(task.user_opening) and "<question>" in opening and opening.rstrip().endswith("/no_think")
    _, _, plain = _env(task, "plain")
    assert "<policy>" not in plain[0]["content"] and "/no_think" not in plain[1]["content"]


def test_the_episode_ends_on_the_agents_answer_not_the_users_stop(task):
    env, user, _ = _env(task, "reference")
    res = env.step("I need one detail first. <question>Which booking is it?</question>")
    assert user.seen == ["Which booking is it?"] and not res.done            # the user saw the question only
    assert STOP_MARKER in env.messages[-1]["content"]
    assert env.step("<answer>Nothing was changed.</answer>").done and env.record.termination == "answer"
    env, _, _ = _env(task, "plain")                                           # the plain protocol: the stop ends it
    assert env.step("Which booking is it?").done and env.record.termination == "user_stop"


def test_transfer_ends_and_an_untagged_reply_is_malformed(task):
    env, _, _ = _env(task, "reference")
    assert env.step(f"{TRANSFER_MARKER} <answer>Handed over to a human agent.</answer>").done
    assert env.record.termination == "transfer" and env.record.transferred
    env, user, _ = _env(task, "reference")
    assert env.step("Which booking is it?").done and env.record.termination == "malformed"
    assert user.seen == [] and env.record.counters["no_protocol_tag"] == 1
