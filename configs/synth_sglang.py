"""Teacher-driven synthesis round against SGLang / sglang-jax OpenAI-compatible servers.

Every role inherits `teachers.default` and sets only what differs. The API key (if the server was started
with --api-key) is read from the env var named by `api_key_env`, never from this file. Start the teachers
with the scripts in launch/, then:
`python -m data_synth.run --config=configs/synth_sglang.py --round=0`
Override on the command line, e.g. `--config.teachers.default.base_url=http://host:30000/v1`.
"""
from agq_jax.envs import sources
from agq_jax.run_config import defaults

# The paper's 5K personas live in shared/ beside the repository (or $AGQ_SHARED): envs.sources' one lookup.
# Without them the built-in personas seed stage 1 ("" = data_synth.personas).
PERSONAS = sources.released_file(sources.PERSONAS) or ""


def get_config():
    c = defaults()
    c.name = "synth_sglang"
    c.data.agentic_weight = 1.0
    c.data.reasoning_weight = 1.0
    d = c.teachers.default
    d.base_url, d.model = "http://127.0.0.1:30000/v1", "Qwen/Qwen3-8B"
    d.temperature, d.max_tokens, d.timeout_s, d.max_retries, d.backoff_s, d.concurrency = 0.7, 4096, 300.0, 3, 2.0, 16
    c.teachers.mock_user.temperature, c.teachers.mock_user.max_tokens = 0.3, 512
    c.teachers.mock_tool.temperature, c.teachers.mock_tool.max_tokens = 0.0, 512
    c.teachers.judge.temperature, c.teachers.judge.max_tokens = 0.0, 512
    c.teachers.solver.temperature = 0.6
    c.synth.agentic.num_procedural = 0
    c.synth.agentic.procedural_per_round = 0
    c.synth.agentic.persona_path = PERSONAS
    c.synth.agentic.num_personas = 8
    c.synth.reasoning.persona_path = PERSONAS
    return c
