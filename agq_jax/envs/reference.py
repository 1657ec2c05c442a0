"""The AgenticQwen reference's agent protocol, as an option of the episode runtime (`make_env(protocol=...)`).

Under protocol "reference" the agent sees its policy inside <policy> tags followed by a requirements block
(one tool per step with brief reasoning first, ask when a parameter is missing, confirmation before a
database change, transfer only as a last resort), its tools, and answer rules; the user's opening carries a
note asking for <question> tags and a final <answer>, and ends with /no_think (the paper's models are
non-thinking). The episode runs: a tool call goes to the tools, a <question> to the user (who sees only the
question), a reply with <answer> or the transfer marker ends the episode, and a reply with none of these
ends it as malformed, as in the reference's agent loop. When the user says the stop marker the agent still
owes its final <answer>.

The texts below are this project's wording of the reference's requirements; imported AgenticQwen tasks keep
their own (already in their system prompt), and `render_system` only adds what is missing.
"""
from __future__ import annotations

import re

from agq_jax.envs.parsing import TRANSFER_MARKER, parse_reply
from agq_jax.envs.schema import Task

PROTOCOLS = ("plain", "reference")

REQUIREMENTS = f"""### Requirements:
1. Call one tool at a time, and state your brief reasoning before every tool call; never send a bare tool call.

2. The user has probably not given everything you need. If any required parameter of a tool is missing, uncertain or ambiguous, ask the user before calling the tool. Never guess or invent parameters.

3. Only the user can end the task. If the request breaks the policy and nothing else can be done, you may reply with "{TRANSFER_MARKER}" to end it; this is a last resort.

4. If you said a request breaks the policy and the user then brings new information, decide whether it makes the request an allowed exception: if it does, continue; if the user brings nothing valid and keeps insisting, you may reply with "{TRANSFER_MARKER}".

5. Ask the user for confirmation before any change to the database."""

ANSWER_RULES = f"""When the user ends the conversation with "###STOP", give your final answer inside <answer> and </answer> tags.
If you choose "{TRANSFER_MARKER}", also give your conclusion inside <answer> and </answer> tags.
Keep the final answer to one or two sentences.

You must not end the task yourself: write <answer></answer> only after the user's "###STOP" or together with "{TRANSFER_MARKER}".

Put every question to the user inside <question> and </question> tags.

/no_think"""

USER_NOTE = ("\nNote: give your brief reasoning before using any tool or asking the user anything; keep it short. "
             "Put questions to the user inside <question> and </question> tags. When the task is finished, give "
             "the final answer inside <answer></answer> tags as the termination signal. /no_think")

_POLICY = re.compile(r"<policy>.*?</policy>", re.S)


def policy_block(task: Task) -> str:
    """The task's policy inside <policy> tags, with the requirements block (the reference's layout)."""
    text = task.system_prompt.strip()
    if not _POLICY.search(text):
        text = f"<policy>\n{text}\n</policy>"
    if "### Requirements:" not in text:
        text += "\n\n" + REQUIREMENTS
    return text


def render_system(task: Task, tools_block: str) -> str:
    """System message under the reference protocol: policy + requirements, the tools, the answer rules."""
    return f"{policy_block(task)}{tools_block}\n\n{ANSWER_RULES}"


def render_opening(task: Task) -> str:
    text = task.user_opening
    return text if "<question>" in text else text.rstrip() + " " + USER_NOTE.strip()


def to_reference_replies(replies: list[str], final_answer: str) -> list[str]:
    """Plain-protocol gold replies in the reference protocol: text to the user becomes a <question>, a tool
    call keeps its reasoning line, and the episode ends with `final_answer` after the user's stop."""
    out = []
    for r in replies:
        p = parse_reply(r)
        if p.tool_calls or p.transfer or p.question or p.answer:
            out.append(r)
        else:
            out.append(f"<question>{r.strip()}</question>")
    if not any(TRANSFER_MARKER in r for r in out):
        out.append(f"<answer>{final_answer}</answer>")
    return out


def final_answer(task: Task) -> str:
    """The gold episode's closing <answer> (the reference protocol ends on it)."""
    bt = task.branch.branch_type
    if bt == "refusal":
        return "I carried out what the policy allows and declined the rest, because it is not permitted."
    if bt == "confirmation":
        return "Nothing was changed, as you did not confirm."
    return "Your request has been completed."


LADDER = 2   # rungs of the reference user's escape ladder (a lie, then a special exception) before it stops


def gold_for(task: Task, protocol: str) -> list[str]:
    """The task's gold replies in `protocol` (they are written in the plain protocol). A refusal is repeated
    until any user has given up (a teacher user climbs the reference's ladder even when the task lists no
    escape steps); a replay stops when the episode ends, so unused repeats cost nothing."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown agent protocol {protocol!r}; use one of {PROTOCOLS}")
    replies = list(task.gold_replies)
    if task.branch.branch_type == "refusal" and replies:
        repeats = next((i for i, r in enumerate(reversed(replies)) if r != replies[-1]), len(replies))
        replies += [replies[-1]] * max(0, LADDER + 1 - repeats)
    return replies if protocol == "plain" else to_reference_replies(replies, final_answer(task))
