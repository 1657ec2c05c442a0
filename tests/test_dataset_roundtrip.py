"""A task written to a round dataset and read back gives the policy the same prompt it had when generated.

Regression: rows used to be written with sorted keys, which reordered every tool's JSON schema; the
rendered system prompt of a stored task then differed from a freshly generated one, and a model trained
on fresh tasks failed on the stored ones (greedy reward 0.85 -> 0.30 with the phrase vocabulary)."""
from agq_jax.driver.data import AGENTIC, Item, load_items
from agq_jax.envs import make_env
from agq_jax.envs.worlds.generator import generate_tasks
from data_synth.io_utils import atomic_write_jsonl, read_jsonl


def test_stored_task_renders_the_same_prompt(tmp_path):
    from agq_jax.run_config.schema import EnvSection

    tasks = generate_tasks(12, seed=3)  # every domain, several branch types
    path = tmp_path / "agentic.jsonl"
    atomic_write_jsonl(str(path), [t.model_dump(mode="json") for t in tasks])
    loaded = load_items(read_jsonl(str(path)), AGENTIC, EnvSection(max_agent_turns=8, max_user_turns=8),
                        with_gold=False)
    for task, item in zip(tasks, loaded):
        fresh = make_env(task, user="scripted", tools="auto")
        stored = make_env(item.obj, user="scripted", tools="auto")
        assert stored.reset() == fresh.reset()
        assert stored.tool_schemas == fresh.tool_schemas
        assert [list(s["function"]["parameters"]) for s in stored.tool_schemas] == \
               [list(s["function"]["parameters"]) for s in fresh.tool_schemas]  # key order too
    assert isinstance(loaded[0], Item)
