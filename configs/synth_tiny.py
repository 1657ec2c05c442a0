"""Offline synthesis round (no teacher): procedural agentic tasks + procedural reasoning problems.

`python -m data_synth.run --config=configs/synth_tiny.py --round=0`; later rounds pass `--failures=F.jsonl`
and get procedurally harder variants of what the policy failed. Set `teachers` (see synth_sglang.py) to
switch every stage to teacher synthesis.
"""
import ml_collections


def agentic_defaults(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        enabled=True, seed=0,
        num_procedural=12,           # round 0: procedural tasks (offline default; also mixed in with teachers)
        procedural_per_round=4,      # later rounds: fresh procedural tasks
        level=0,                     # procedural difficulty level (worlds.generator.Knobs)
        domains=(),                  # procedural domains; () = all
        persona_path="", num_personas=0, workflow_path="",
        min_tools=3, max_tools=5, max_params=3, min_branch_types=3, max_branches_per_tree=6,
        min_cases_per_side=3,        # an expanded tree holds >= this many legal and illegal cases (the reference: 3)
        validate_with_teacher=True, solver_role="solver",
        validation_user="scripted",  # scripted | teacher (mock_user role)
        validation_tools="expected",  # expected (pinned returns) | teacher (mock_tool role)
        concurrency=8, validate_concurrency=4, max_attempts=3,
    ))
    c.update(kw)
    return c


def reasoning_defaults(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        enabled=True, seed=0,
        seed_path="",                # JSONL {question, answer, source}
        num_procedural=12, fresh_procedural_per_round=4,
        kinds=("arithmetic", "algebra", "multihop"),
        difficulty=ml_collections.ConfigDict(dict(num_ops=2, max_operand=20, algebra_level=1, hops=2,
                                                  distractors=4)),
        harder_per_failure=1,
        variants_per_failure=2, personas_per_failure=1, persona_path="",
        k_solutions=3, solver_roles=("solver",),
        concurrency=8, max_attempts=3,
    ))
    c.update(kw)
    return c


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "synth_tiny"
    c.runs_dir = "runs"
    c.progress = True
    c.teachers = ml_collections.ConfigDict()   # empty: offline
    c.cache_dir = ""                            # default runs/<name>/teacher_cache
    c.check_health = True
    c.health_timeout_s = 30.0
    c.agentic = agentic_defaults()
    c.reasoning = reasoning_defaults()
    return c
