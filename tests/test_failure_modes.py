"""benchmarks/failure_modes.py on real episodes: procedural tasks, scripted agents run through the env and its
scorer, the record written as the driver writes a failure, then sorted into the mode the agent's mistake is."""
import json
import sys
from pathlib import Path

from agq_jax.envs import replay_agent, run_episode, score
from agq_jax.envs.worlds.generator import counterfactual_replies, generate_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import failure_modes  # noqa: E402


def _record(task, replies):
    """A failure row as the driver writes it (driver.evaluate.episode_for_failure, Item.failure_row)."""
    rec = run_episode(task, replay_agent(replies))
    r = score(task, rec)
    assert r.total < 1.0, "a scripted mistake must fail the task"
    return {"type": "agentic", "task": json.loads(task.model_dump_json()),
            "episode": {"termination": rec.termination, "reward": r.total, "components": r.components,
                        "messages": rec.messages[-12:]}}


def _swap_in_last_write(task, old: str, new: str):
    replies = list(task.gold_replies)
    i = max(j for j, rep in enumerate(replies) if "<tool_call>" in rep)
    assert old in replies[i]
    replies[i] = replies[i].replace(old, new)
    return replies


def test_each_scripted_mistake_lands_in_its_mode(tmp_path):
    clar = generate_task("bank", "clarification", seed=3)
    gold_write = clar.gold_actions[-1].arguments
    other = "landlord" if gold_write["payee"] == "savings" else "savings"
    acct = gold_write["account_id"]
    wrong_acct = acct[:-1] + ("0" if acct[-1] != "0" else "1")
    refusal = generate_task("bank", "refusal", seed=3)
    legal = generate_task("clinic", "legal", seed=4)
    rows = {
        "write, wrong choice": _record(clar, _swap_in_last_write(clar, f'"payee": "{gold_write["payee"]}"',
                                                                 f'"payee": "{other}"')),
        "write, wrong id": _record(clar, _swap_in_last_write(clar, f'"account_id": "{acct}"',
                                                             f'"account_id": "{wrong_acct}"')),
        "wrote, gold has none": _record(refusal, counterfactual_replies(refusal, "hack")),
        "no write (user_stop)": _record(legal, counterfactual_replies(legal, "refuse")[:-1] + ["Done."]),
        "no write, id not found": _record(clar, [clar.gold_replies[0], clar.gold_replies[1].replace(acct, wrong_acct),
                                                 "Done."]),
    }
    for want, row in rows.items():
        assert failure_modes.failure_mode(row["task"], row["episode"]) == want, (want, row["episode"]["components"])
    # a transfer task (no write on the gold path) where the agent looks up and stops instead of handing over
    transfer = generate_task("library", "transfer", seed=5)
    n_reads = sum(1 for c in transfer.gold_actions if c.name.startswith("get_"))
    row = _record(transfer, transfer.gold_replies[:1 + n_reads] + ["Done."])
    assert failure_modes.failure_mode(row["task"], row["episode"]) == "no write as gold, subgoal transferred"

    # the CLI over a run directory's failure files: one count per mode, per branch type
    (tmp_path / "run" / "failures").mkdir(parents=True)
    with open(tmp_path / "run" / "failures" / "round_1.jsonl", "w") as f:
        for row in rows.values():
            f.write(json.dumps(row) + "\n")
    modes = failure_modes.count_modes([str(tmp_path / "run" / "failures" / "round_1.jsonl")])
    assert modes["clarification"] == {"write, wrong choice": 1, "write, wrong id": 1, "no write, id not found": 1}
    assert modes["refusal"] == {"wrote, gold has none": 1} and modes["legal"] == {"no write (user_stop)": 1}
    assert failure_modes.main([str(tmp_path / "run"), "--json"]) == 0
