"""Teacher client against a loopback OpenAI-compatible server: cache, retries, accounting, health."""
import asyncio
import concurrent.futures
import json
import socket
import time

import pytest

from data_synth.replay_server import ReplayServer
from data_synth.teachers import (Endpoint, TeacherClient, TeacherError, TeacherUnavailable, client_from_config,
                                 split_thinking, wait_until_healthy)


def _ep(url, **kw):
    return Endpoint(base_url=url, model="tiny", **{"backoff_s": 0.01, "timeout_s": 5.0, **kw})


def test_cache_makes_rerun_free_and_counts_tokens(tmp_path):
    rules = [{"match": ["capital of France"], "replies": ["<think>easy</think>Paris"]}]
    with ReplayServer(rules) as srv:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        with TeacherClient({"synthesizer": _ep(srv.base_url)}, cache_dir=str(tmp_path)) as c:
            r = c.chat_sync("synthesizer", msgs)
            assert (r.text, r.reasoning, r.cached) == ("Paris", "easy", False)
            assert r.completion_tokens > 0 and r.prompt_tokens > 0
            r2 = c.chat_sync("synthesizer", msgs, sample=1)  # a different sample is a different request
            assert not r2.cached
        assert srv.request_count() == 2
        with TeacherClient({"synthesizer": _ep(srv.base_url)}, cache_dir=str(tmp_path)) as c:
            assert c.chat_sync("synthesizer", msgs).cached
            assert c.chat_sync("synthesizer", msgs, sample=1).cached
            st = c.stats_dict()["synthesizer"]
            assert st["cache_hits"] == 2 and st["requests"] == 0
        assert srv.request_count() == 2  # the re-run issued zero requests


def test_retries_with_backoff_then_success_and_then_give_up():
    rules = [{"match": ["flaky"], "replies": [{"status": 500, "content": "boom"}, {"status": 503}, "ok"]},
             {"match": ["always down"], "replies": [{"status": 500}]},
             {"match": ["bad request"], "replies": [{"status": 400}]}]
    with ReplayServer(rules) as srv, TeacherClient({"judge": _ep(srv.base_url, max_retries=3)}) as c:
        assert c.chat_sync("judge", [{"role": "user", "content": "flaky"}]).text == "ok"
        with pytest.raises(TeacherError) as ei:
            c.chat_sync("judge", [{"role": "user", "content": "always down"}])
        assert ei.value.kind == "server_error" and srv.base_url in str(ei.value)
        with pytest.raises(TeacherError) as ei:
            c.chat_sync("judge", [{"role": "user", "content": "bad request"}])
        assert ei.value.kind == "bad_request"
        st = c.stats_dict()["judge"]
        # flaky: 3 requests, always down: 4 (1 + 3 retries), bad request: 1 (not retried)
        assert st["requests"] == 8 and st["errors"] == {"server_error": 6, "bad_request": 1}


def test_timeout_is_counted():
    rules = [{"match": ["slow"], "replies": [{"content": "late", "delay_s": 1.5}]}]
    with ReplayServer(rules) as srv, TeacherClient({"judge": _ep(srv.base_url, timeout_s=0.3, max_retries=1)}) as c:
        with pytest.raises(TeacherError) as ei:
            c.chat_sync("judge", [{"role": "user", "content": "slow"}])
        assert ei.value.kind == "timeout"


def test_bounded_concurrency_async_and_threads():
    rules = [{"match": ["q"], "replies": [{"content": "a", "delay_s": 0.2}]}]
    with ReplayServer(rules) as srv, TeacherClient({"solver": _ep(srv.base_url, concurrency=2)}) as c:
        async def many():
            return await asyncio.gather(*[c.chat("solver", [{"role": "user", "content": f"q{i}"}]) for i in range(6)])
        t0 = time.perf_counter()
        out = asyncio.run(many())
        elapsed = time.perf_counter() - t0
        assert [r.text for r in out] == ["a"] * 6
        assert elapsed >= 0.55  # 6 requests, 2 at a time, 0.2 s each -> at least 3 waves
        chat = c.as_callable("solver")
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            assert list(ex.map(lambda i: chat([{"role": "user", "content": f"q{i}"}]), range(4))) == ["a"] * 4


def _run_config(**teachers):
    from agq_jax.run_config import RunConfig, defaults

    c = defaults()
    for key, value in teachers.items():
        section, field = key.split("__")
        c.teachers[section][field] = value
    return RunConfig.from_configdict(c)


def test_run_config_teachers_reach_the_client(monkeypatch, tmp_path):
    """Every role inherits teachers.default field by field; a role's own value wins; the key is read from the
    env var the config names and never appears in what is logged; extra solver models become solver roles."""
    from agq_jax.run_config.core import UnknownKnobError

    monkeypatch.setenv("AGQ_TEST_KEY", "sk-secret-123")
    rc = _run_config(default__base_url="http://x/v1", default__model="m", default__api_key_env="AGQ_TEST_KEY",
                     default__concurrency=3, default__enable_thinking=True, judge__model="big",
                     judge__temperature=0.0, judge__max_tokens=77, mock_user__timeout_s=9.0).replace(
        **{"teachers.solver_models": ("s2", "s3")})
    with client_from_config(rc.teachers, cache_dir=str(tmp_path)) as c:
        eps = c.endpoints
        assert sorted(eps) == ["judge", "mock_tool", "mock_user", "solver", "solver/1", "solver/2", "synthesizer"]
        assert (eps["judge"].model, eps["judge"].temperature, eps["judge"].max_tokens) == ("big", 0.0, 77)
        assert eps["synthesizer"].model == "m" and eps["synthesizer"].temperature == 0.7  # the default's
        assert eps["mock_user"].timeout_s == 9.0 and eps["mock_tool"].timeout_s == 120.0
        assert all(e.concurrency == 3 and e.base_url == "http://x/v1" for e in eps.values())
        assert eps["judge"].extra_body == {"chat_template_kwargs": {"enable_thinking": True}}
        assert [eps[r].model for r in rc.teachers.solver_roles()] == ["m", "s2", "s3"]
        assert eps["judge"].api_key() == "sk-secret-123"
        assert "sk-secret" not in json.dumps(eps["judge"].public()) and "sk-secret" not in repr(eps["judge"])
        monkeypatch.delenv("AGQ_TEST_KEY")
        with pytest.raises(TeacherUnavailable, match="AGQ_TEST_KEY"):
            eps["judge"].api_key()
    with pytest.raises(UnknownKnobError, match="teachers.judge.api_key"):
        _run_config(judge__api_key="literal")
    with pytest.raises(ValueError, match="teachers.judge: no base_url"):
        _run_config(judge__model="big").teachers.endpoints()
    assert client_from_config(_run_config().teachers, cache_dir=str(tmp_path)) is None  # offline


def test_down_teacher_fails_fast_with_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port}/v1/models"):
        wait_until_healthy(url, timeout_s=1.0, poll_s=0.2)
    assert time.monotonic() - t0 < 10
    with TeacherClient({"judge": _ep(url, max_retries=1)}) as c:
        with pytest.raises(TeacherError, match=f"127.0.0.1:{port}") as ei:
            c.chat_sync("judge", [{"role": "user", "content": "hi"}])
        assert ei.value.kind == "connection"


def test_health_ok_and_split_thinking():
    with ReplayServer([], model="qwen3-tiny") as srv:
        assert wait_until_healthy(srv.base_url, timeout_s=5)["data"][0]["id"] == "qwen3-tiny"
    assert split_thinking("<think>a\nb</think>\n{\"x\": 1}") == ('{"x": 1}', "a\nb")
    assert split_thinking("<think>never closed") == ("", "never closed")


def test_parser_lifted_tool_calls_are_put_back_into_the_text():
    rules = [{"match": ["weather"], "replies": [{"content": "Let me check.",
                                                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}]}]
    with ReplayServer(rules) as srv, TeacherClient({"solver": _ep(srv.base_url)}) as c:
        text = c.chat_sync("solver", [{"role": "user", "content": "weather in Oslo?"}]).text
    assert text.startswith("Let me check.")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text


def test_stage_counts_every_bad_reply_and_drops_with_reasons(tmp_path):
    import pydantic
    from data_synth.stages import run_stage

    class Answer(pydantic.BaseModel):
        value: int

    rules = [{"match": ["item-a"], "replies": ["not json", {"content": '{"value": ', "finish_reason": "length"},
                                               {"value": 3}]},
             {"match": ["item-b"], "replies": [{"status": 500}]},
             {"match": ["item-c"], "replies": [{"value": "three"}, "I'm sorry, I can't do that.", {"value": -1}]}]

    async def fn(item, ctx):
        def check(a):
            if a.value < 0:
                raise ValueError("value must be >= 0")
        obj, _ = await ctx.ask_json("synthesizer", [{"role": "system", "content": "Reply JSON {value: int}."},
                                                    {"role": "user", "content": item["id"]}], Answer, check=check)
        return [{"id": item["id"], "value": obj.value}]

    with ReplayServer(rules) as srv, TeacherClient({"synthesizer": _ep(srv.base_url, max_retries=1)},
                                                   cache_dir=str(tmp_path / "cache")) as c:
        out, rej, st = asyncio.run(run_stage("toy", [{"id": "item-a"}, {"id": "item-b"}, {"id": "item-c"}], fn,
                                             stage_dir=str(tmp_path / "stages"), client=c, progress=False))
    assert out == [{"id": "item-a", "value": 3}]
    by = {r["item"]: r for r in rej}
    assert by["item-b"]["failures"] == ["teacher_error:server_error"] * 3
    assert by["item-c"]["failures"] == ["schema", "refused", "invalid"] and "value must be" in by["item-c"]["detail"]
    assert st.failures == {"non_json": 1, "truncated": 1, "teacher_error:server_error": 3, "schema": 1,
                           "refused": 1, "invalid": 1}
    assert (st.inputs, st.outputs, st.rejected) == (3, 1, 2)
