"""Teacher-driven synthesis round against SGLang / sglang-jax OpenAI-compatible servers.

Endpoints per role; every role inherits `default`. The API key (if the server was started with
--api-key) is read from the env var named by `api_key_env`, never from this file.
Start the teachers with the scripts in launch/, then:
`python -m data_synth.run --config=configs/synth_sglang.py --round=0`
Override on the command line, e.g. `--config.teachers.default.base_url=http://host:30000/v1`.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("synth_tiny", os.path.join(os.path.dirname(__file__), "synth_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
agentic_defaults, reasoning_defaults = _tiny.agentic_defaults, _tiny.reasoning_defaults

# The paper's 5K personas live in shared/ beside the repository (or $AGQ_SHARED); resolved from this file, not
# the working directory. Without them stage 1 falls back to the built-in personas ("" = none configured).
_SHARED = os.environ.get("AGQ_SHARED") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
PERSONAS = os.path.normpath(os.path.join(_SHARED, "data", "agenticqwen", "persona_5K.jsonl"))
if not os.path.isfile(PERSONAS):
    PERSONAS = ""


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "synth_sglang"
    c.runs_dir = "runs"
    c.progress = True
    c.cache_dir = ""
    c.check_health = True
    c.health_timeout_s = 60.0
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    c.teachers = ml_collections.ConfigDict(dict(
        default=dict(base_url="http://127.0.0.1:30000/v1", model="Qwen/Qwen3-8B", api_key_env="",
                     temperature=0.7, max_tokens=4096, timeout_s=300.0, max_retries=3, backoff_s=2.0,
                     concurrency=16, seed=0, extra_body=off),
        synthesizer=dict(),
        mock_user=dict(temperature=0.3, max_tokens=512),
        mock_tool=dict(temperature=0.0, max_tokens=512),
        judge=dict(temperature=0.0, max_tokens=512),
        solver=dict(temperature=0.6, max_tokens=4096),
    ))
    c.agentic = agentic_defaults(num_procedural=0, procedural_per_round=0, persona_path=PERSONAS, num_personas=8)
    c.reasoning = reasoning_defaults(persona_path=PERSONAS)
    return c
