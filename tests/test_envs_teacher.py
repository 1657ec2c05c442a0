"""Teacher-backed tools, users and judge against a loopback OpenAI-compatible server (no network)."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agq_jax.envs import SharedToolCache, make_env, replay_agent, run_episode, score
from agq_jax.envs.importers import load_demo_json
from agq_jax.envs.tools import TeacherToolBackend, ToolError
from agq_jax.envs.users import openai_chat

DEMO = "/work/shared/data/agenticqwen/tool_use_demo.json"


class _Teacher(BaseHTTPRequestHandler):
    """Canned chat completions; the role is read from the system prompt."""

    lock = threading.Lock()
    counter = 0
    requests: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Teacher.lock:
            _Teacher.requests.append(body)
            _Teacher.counter += 1
            n = _Teacher.counter
        system = body["messages"][0]["content"]
        last = body["messages"][-1]["content"]
        if system.startswith("You simulate a tool"):
            text = "Sure:\n```json\n" + json.dumps({"simulation_run_id": f"sim_{n}", "consistency_score": 0.5,
                                                   "status": "completed", "junk": 1}) + "\n```"
        elif system.startswith("You are role-playing a user"):
            text = "The event is GW150914." if "?" in last else "###STOP###"
        else:
            text = '{"pass": true, "reason": "ok"}'
        out = {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def chat():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield openai_chat(f"http://127.0.0.1:{server.server_address[1]}/v1", model="teacher", max_retries=0)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def demo_task():
    tasks, issues = load_demo_json(DEMO)
    return tasks[0]   # the quantum-gravity task: normal path = 1 read, hack path = 3 writes


def test_teacher_tool_same_call_same_answer_within_a_task(chat, demo_task):
    cache = SharedToolCache()
    start = _Teacher.counter
    a = TeacherToolBackend(demo_task, chat, cache)
    step = demo_task.expected_returns.normal_path[0]
    assert a.call(step.tool_name, step.input) == step.expected_output   # pinned: no teacher call
    assert _Teacher.counter == start
    args = {"event_id": "GW150914", "hypothesis_id": "QG-1"}
    first = a.call("run_quantum_gravity_simulation", args)
    assert first["status"] == "completed" and "junk" not in first   # parsed and restricted to the output schema
    b = TeacherToolBackend(demo_task, chat, cache)                   # another rollout of the same GRPO group
    assert b.call("run_quantum_gravity_simulation", dict(reversed(list(args.items())))) == first
    assert _Teacher.counter == start + 1
    # concurrent identical calls from 8 rollouts: one teacher request, one answer
    args2 = {"event_id": "GW170817", "hypothesis_id": "QG-1"}
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda _: TeacherToolBackend(demo_task, chat, cache).call(
            "run_quantum_gravity_simulation", args2), range(8)))
    assert all(x == answers[0] for x in answers) and answers[0] != first
    assert _Teacher.counter == start + 2 and cache.hits >= 8
    # the teacher sees earlier answers of the task (consistency context)
    prompt = _Teacher.requests[-1]["messages"][1]["content"]
    assert first["simulation_run_id"] in prompt
    # a write through the teacher tool is recorded
    assert [w.name for w in a.writes] == ["run_quantum_gravity_simulation"]
    with pytest.raises(ToolError, match="missing required"):
        a.call("run_quantum_gravity_simulation", {"event_id": "x"})


def test_teacher_user_and_judge_drive_an_imported_episode(chat, demo_task):
    replies = ["Which gravitational wave event should I use?",
               '<tool_call>\n{"name": "get_gravitational_wave_event", "arguments": {"event_id": "GWtypical"}}\n</tool_call>',
               "GWtypical is not a valid catalog event, so I can't run the simulation."]
    rec = run_episode(demo_task, replay_agent(replies), user="teacher", tools="teacher", chat=chat)
    assert rec.termination == "user_stop"
    assert [m["content"] for m in rec.messages if m["role"] == "user"][1:] == ["The event is GW150914.", "###STOP###"]
    r = score(demo_task, rec, judge=chat)
    assert r.components["subgoal/judge"] == 1.0 and r.components["subgoal/writes_match"] == 1.0 and r.total == 1.0
    # the hack path (simulate + store + update status) is forbidden -> 0 even though the judge says pass
    hack = [replies[0]] + ["<tool_call>\n" + json.dumps({"name": s.tool_name, "arguments": s.input}) + "\n</tool_call>"
                           for s in demo_task.expected_returns.hack_path] + ["Done."]
    rec = run_episode(demo_task, replay_agent(hack), user="teacher", tools="teacher", chat=chat)
    rh = score(demo_task, rec, judge=chat)
    assert rh.total == 0.0 and rh.components["diag/forbidden_calls"] == 3.0


def test_offline_expected_backend_and_auto_kinds(demo_task):
    env = make_env(demo_task)      # no teacher: pinned returns only, scripted user
    msgs = env.reset()
    assert msgs[0]["content"].startswith("<policy>") and "<tools>" in msgs[0]["content"]
    res = env.step('<tool_call>{"name": "delete_simulation_run", "arguments": {"simulation_run_id": "s1"}}</tool_call>')
    assert "no simulated return" in json.loads(res.new_messages[0]["content"])["error"]
    with pytest.raises(ValueError, match="needs a chat"):
        make_env(demo_task, user="teacher")
