"""Against a real SGLang server: sglang-jax (CPU, its own Python 3.12 venv) serving a tiny random Qwen3
(head_dim 128, the real Qwen3 tokenizer) written by this project's HF export.

One server per module, started by launch/teachers/sglang_jax.sh and awaited with launch/wait_healthy.py
(the production scripts), stopped by a process-group kill that must leave no process behind.
Needs .venv-sglang (`make sglang-venv`); without it the server tests fail and say so.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# One server per module: `make test` runs with `--dist loadfile`, which keeps these tests on one worker.
pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[1]
SGLANG_VENV = REPO / ".venv-sglang"
LAUNCH_JAX = REPO / "launch" / "teachers" / "sglang_jax.sh"
LAUNCH_GPU = REPO / "launch" / "teachers" / "sglang_gpu.sh"
SERVED_NAME = "tiny-qwen3"
WARMED_UP = "The server is fired up and ready to roll"  # sglang-jax logs this after its warm-up request
# head_dim 128 is what sglang-jax's attention supports; vocab = the real Qwen3 tokenizer's rows.
TINY = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=128, max_position_embeddings=4096, torch_dtype="float32")


def _load_wait_healthy():
    spec = importlib.util.spec_from_file_location("wait_healthy", REPO / "launch" / "wait_healthy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wait_healthy = _load_wait_healthy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclasses.dataclass
class Server:
    base_url: str          # http://127.0.0.1:PORT (append /v1 for OpenAI clients)
    model: str
    checkpoint: Path
    log_path: Path
    startup_s: float


@pytest.fixture(scope="module")
def sglang_venv():
    """The server's own venv; a missing one fails (not skips) the server tests, before any work."""
    if not (SGLANG_VENV / "bin" / "python").exists():
        pytest.fail(f"{SGLANG_VENV} is missing: run `make sglang-venv` (sglang-jax in its own Python 3.12 venv) "
                    "before the sglang tests", pytrace=False)
    return SGLANG_VENV


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny Qwen3 in Flax NNX, exported by agq_jax (safetensors + config + real tokenizer files)."""
    from flax import nnx

    from agq_jax.models import qwen3

    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**TINY), rngs=nnx.Rngs(0))
    out = qwen3.save_pretrained(model, tmp_path_factory.mktemp("sglang") / "tiny_qwen3")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file(), \
        "save_pretrained wrote no tokenizer files for a Qwen3-vocab model"
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _group_rss_gb(pgid: int) -> float:
    """Resident memory of every process in the group (Linux /proc), for the log line only."""
    total = 0
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if d.name.isdigit() and int(fields[2]) == pgid:  # fields[2] = pgrp
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # fields[21] = rss pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**30


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace_s`; reap the leader."""
    pgid = proc.pid  # start_new_session=True: the launcher (exec'd into the server) leads its own group
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sglang_server(sglang_venv, tiny_model_dir):
    port = _free_port()
    log_path = tiny_model_dir.parent / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}  # not the test's 8 devices
    # setpriv --pdeathsig: if pytest is killed outright (teardown never runs) the server gets SIGTERM and
    # stops its own children. (A preexec_fn would fork a multithreaded JAX process.)
    guard = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
    cmd = [*guard, str(LAUNCH_JAX), "--model-path", str(tiny_model_dir), "--device", "cpu", "--profile", "cpu-tiny",
           "--port", str(port), "--served-model-name", SERVED_NAME]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    try:
        try:
            wait_healthy.wait_healthy(f"http://127.0.0.1:{port}", timeout_s=600, poll_s=0.5,
                                      alive=lambda: proc.poll() is None)
        except wait_healthy.NotHealthy as e:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"sglang-jax did not come up: {e}\n--- {log_path} (tail) ---\n{tail}", pytrace=False)
        # sglang-jax sends itself one warm-up request after /v1/models answers. Let it finish first:
        # 0.1.0rc0's scheduler crashes when a return_logprob request joins a running batch without
        # logprobs (reproduced with two plain /generate calls), and the parity test asks for logprobs.
        deadline = time.monotonic() + 120
        while WARMED_UP not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            assert proc.poll() is None, f"sglang-jax exited during warm-up; see {log_path}"
            time.sleep(0.5)
        server = Server(f"http://127.0.0.1:{port}", SERVED_NAME, tiny_model_dir, log_path,
                        round(time.monotonic() - t0, 1))
        print(f"\nsglang-jax up in {server.startup_s}s: {' '.join(cmd)}", file=sys.stderr)
        yield server
    finally:
        print(f"\nsglang-jax process group RSS before shutdown: {_group_rss_gb(proc.pid):.2f} GiB", file=sys.stderr)
        _stop_group(proc)
        assert not _group_alive(proc.pid), f"processes of server group {proc.pid} survived shutdown"


def test_chat_completion_through_openai_client(sglang_server):
    """The production path: the openai client against /v1 returns generated text from the real server."""
    import openai

    client = openai.OpenAI(base_url=sglang_server.base_url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    t0 = time.monotonic()
    resp = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Name three prime numbers."}], max_tokens=8,
        temperature=0.0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    latency = time.monotonic() - t0
    msg = resp.choices[0].message
    assert isinstance(msg.content, str) and msg.content.strip(), resp
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert 1 <= resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 0
    print(f"\nchat completion: {latency:.2f}s for {resp.usage.completion_tokens} tokens: {msg.content!r}",
          file=sys.stderr)


def test_server_generates_what_the_exported_model_computes(sglang_server, tiny_model_dir):
    """Greedy tokens and their log-probs from sglang-jax equal this project's model on the same export,
    and the server renders chat prompts with the exported chat template (same prompt token count)."""
    import jax.numpy as jnp

    from agq_jax.models import qwen3
    from agq_jax.tokenizer import encode_chat, load_qwen3_tokenizer

    tok = load_qwen3_tokenizer()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 * 3?"}]
    prompt = encode_chat(tok, messages, add_generation_prompt=True, enable_thinking=False)
    chat = _post(sglang_server.base_url + "/v1/chat/completions",
                 {"model": SERVED_NAME, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                  "chat_template_kwargs": {"enable_thinking": False}})
    assert chat["usage"]["prompt_tokens"] == len(prompt), "server rendered a different chat prompt"

    n_new = 6
    gen = _post(sglang_server.base_url + "/generate",
                {"input_ids": prompt, "return_logprob": True,
                 "sampling_params": {"max_new_tokens": n_new, "temperature": 0.0, "ignore_eos": True}})
    out_ids = gen["output_ids"]
    server_lp = np.array([lp for lp, _tid, _txt in gen["meta_info"]["output_token_logprobs"]])
    assert len(out_ids) == n_new and [t for _lp, t, _txt in gen["meta_info"]["output_token_logprobs"]] == out_ids

    model = qwen3.from_pretrained(tiny_model_dir, dtype=jnp.float32)
    logits = np.asarray(model(jnp.asarray([prompt + out_ids[:-1]])).logits[0, len(prompt) - 1:], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ours = logp[np.arange(n_new), out_ids]
    # Each served token is our argmax (up to float noise between two fp32 implementations)...
    assert np.all(logp.max(-1) - ours < 1e-4), (out_ids, logp.argmax(-1).tolist())
    # ...with the same log-probability.
    np.testing.assert_allclose(server_lp, ours, atol=2e-3)


def test_synthesis_round_with_garbage_teachers_rejects_everything(sglang_server, tmp_path):
    """A teacher-driven round (every role -> this server) finishes; random weights mean every item is
    rejected with a reason and counted, nothing crashes, and the requests really reached the server."""
    from agq_jax.envs.reasoning_problems import generate_seed_set
    from data_synth.run import run_round

    from agq_jax.run_config import RunConfig, load_configdict

    config = load_configdict(str(REPO / "configs" / "synth_sglang.py"))
    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps({"id": f"p{i}", "persona": p}) + "\n" for i, p in enumerate(
        ["A pharmacist who manages prescription refills.", "A travel agent who rebooks cancelled flights."])))
    config.name = "sglang_garbage"
    config.run_dir = str(tmp_path / "runs")
    config.verbose = False
    t = config.teachers
    t.cache_dir, t.health_timeout_s = str(tmp_path / "teacher_cache"), 30.0
    d = t.default
    d.base_url, d.model = sglang_server.base_url + "/v1", SERVED_NAME
    d.max_tokens, d.timeout_s, d.max_retries, d.backoff_s, d.concurrency = 24, 120.0, 1, 0.1, 4
    for role in ("synthesizer", "mock_user", "mock_tool", "judge", "solver"):
        t[role].max_tokens = 24  # roles that set their own max_tokens would override the default
    a, r = config.synth.agentic, config.synth.reasoning
    a.num_procedural, a.persona_path, a.num_personas, a.max_attempts = 0, str(personas), 2, 2
    r.num_procedural, r.max_attempts = 0, 1
    failed = [p.model_dump() for p in generate_seed_set(2, seed=3, kinds=("arithmetic", "algebra"))]

    res = run_round(RunConfig.from_configdict(config), 0, failures={"reasoning": failed})

    assert res.mode == "teacher"
    assert (res.n_agentic, res.n_reasoning) == (0, 0)
    rejections = [json.loads(x) for x in Path(res.round_dir, "rejections.jsonl").read_text().splitlines()]
    manifest = json.loads(Path(res.manifest_path).read_text())
    assert manifest["counts"] == {"agentic": 0, "reasoning": 0, "rejected": len(rejections)}
    assert rejections and all(r.get("stage") and r.get("reason") for r in rejections), rejections[:3]
    # Every item that entered a stage left it as an output or a counted rejection.
    for s in res.stages:
        assert s["outputs"] + s["rejected"] == s["inputs"], s
    by_stage = {s["name"]: s for s in res.stages}
    for first in ("agentic/blueprint", "reasoning/self_instruct", "reasoning/persona"):
        assert by_stage[first]["inputs"] == 2 and by_stage[first]["rejected"] == 2, by_stage.get(first)
    assert sum(s["rejected"] for s in res.stages) == len(rejections)
    usage = res.teacher_stats
    assert sum(u["requests"] for u in usage.values()) > 0 and sum(u["completion_tokens"] for u in usage.values()) > 0
    served = {m["model"] if isinstance(m, dict) else m for m in manifest["teachers"]["models"].values()}
    assert served == {SERVED_NAME}


def test_full_size_smoke_with_every_teacher_role_on_sglang(sglang_server, tmp_path):
    """configs/8b.py:cpu-smoke for one round of one GRPO step with every teacher role (synthesizer, mock user,
    mock tools, judge, solver) on this real sglang-jax server. Its random weights answer garbage: every malformed
    reply is counted and retried or rejected, and the round finishes with a GRPO step, an evaluation and an
    export. (The recipe's two steps and two rounds are test_train_entry's, on the loopback teacher.)"""
    url = sglang_server.base_url + "/v1"
    argv = ["--config=configs/8b.py:cpu-smoke", f"--config.run_dir={tmp_path / 'run'}", "--config.rounds=1",
            "--config.rl.steps_per_round=1", "--config.eval.k=1",
            f"--config.teachers.default.base_url={url}", f"--config.teachers.default.model={SERVED_NAME}",
            "--config.teachers.default.max_retries=1", "--config.teachers.default.backoff_s=0.1",
            *[f"--config.teachers.{role}.max_tokens=24" for role in ("synthesizer", "mock_user", "mock_tool",
                                                                     "judge", "solver")]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "agq_jax.train", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(out["evals"]) == {"round0"} and Path(out["export"], "config.json").is_file()
    man = json.loads((tmp_path / "run" / "data" / "round_0" / "manifest.json").read_text())
    assert man["mode"] == "teacher" and man["counts"]["rejected"] > 0
    assert {m for m in man["teachers"]["models"].values()} == {SERVED_NAME}
    usage = man["teachers"]["usage"]
    assert usage["synthesizer"]["requests"] > 0 and usage["synthesizer"]["completion_tokens"] > 0
    grpo = [json.loads(line)["metrics"] for line in open(tmp_path / "run" / "metrics.jsonl")
            if json.loads(line)["kind"] == "grpo"]
    assert len(grpo) == 1 and all("train/loss" in m for m in grpo)


def test_launch_scripts_build_the_documented_commands(tmp_path):
    """Both launchers (the GPU one cannot run here) print the exact server command, never an API key."""
    env = {**os.environ, "MY_TEACHER_KEY": "sk-secret-value"}
    gpu = subprocess.run([str(LAUNCH_GPU), "--model-path", "Qwen/Qwen3-8B", "--tp", "4", "--dp", "2", "--port", "30001",
                          "--api-key-env", "MY_TEACHER_KEY", "--dry-run"], capture_output=True, text=True, env=env)
    assert gpu.returncode == 0, gpu.stderr
    assert gpu.stdout.split()[1:] == [
        "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-8B", "--host", "127.0.0.1", "--port", "30001",
        "--tp-size", "4", "--dp-size", "2", "--tool-call-parser", "qwen", "--reasoning-parser", "qwen3",
        "--api-key", "$MY_TEACHER_KEY"]
    jax_cmd = subprocess.run([str(LAUNCH_JAX), "--model-path", str(tmp_path), "--device", "tpu", "--tp", "8",
                              "--dry-run", "--", "--page-size", "64"], capture_output=True, text=True)
    assert jax_cmd.returncode == 2 and "no config.json" in jax_cmd.stderr  # an empty dir is not a checkpoint
    (tmp_path / "config.json").write_text("{}")
    jax_cmd = subprocess.run([str(LAUNCH_JAX), "--model-path", str(tmp_path), "--device", "tpu", "--tp", "8",
                              "--dry-run", "--", "--page-size", "64"], capture_output=True, text=True)
    words = jax_cmd.stdout.split()
    assert jax_cmd.returncode == 0 and words[0] == "JAX_PLATFORMS=tpu" and "sgl_jax.launch_server" in words
    for flag, value in (("--tp-size", "8"), ("--dtype", "bfloat16"), ("--tool-call-parser", "qwen25"),
                        ("--reasoning-parser", "qwen3"), ("--page-size", "64")):
        assert words[words.index(flag) + 1] == value, (flag, words)
    assert "--attention-backend" not in words  # TPU keeps the Pallas flash-attention default
    bad = subprocess.run([str(LAUNCH_GPU), "--model-path", "m", "--tp", "four"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tp must be a number" in bad.stderr


def test_wait_healthy_fails_fast_naming_the_url():
    port = _free_port()  # nothing listens there
    with pytest.raises(wait_healthy.NotHealthy, match=rf"http://127\.0\.0\.1:{port}/v1/models: no answer within"):
        wait_healthy.wait_healthy(f"http://127.0.0.1:{port}/v1", timeout_s=1.0, poll_s=0.2)
    with pytest.raises(wait_healthy.NotHealthy, match="server process exited"):
        wait_healthy.wait_healthy(f"http://127.0.0.1:{port}", timeout_s=60, alive=lambda: False)
    script = str(REPO / "launch" / "wait_healthy.py")
    cli = subprocess.run([sys.executable, script, f"http://127.0.0.1:{port}", "--timeout", "1"],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and f"http://127.0.0.1:{port}/v1/models" in cli.stderr, cli.stderr
    cli = subprocess.run([sys.executable, script, f"127.0.0.1:{port}"], capture_output=True, text=True)
    assert cli.returncode == 2 and "must start with http://" in cli.stderr, cli.stderr
