"""The OpenAI-compatible judge against a scripted server on 127.0.0.1: ratings, malformed output,
429 then success, 401, an unreachable endpoint, the concurrency limit, and judgment caching."""

from __future__ import annotations

import socket

import pytest

from pipeline.eval.judging import build_tasks, run_judging
from pipeline.eval.prompts import BUILTIN_PROMPTS
from pipeline.eval.questions import Question
from pipeline.judges import OpenAIJudge
from pipeline.stages.base import StageError
from tests.evaluate.fake_openai import FakeOpenAI

KEY = "sk-test-NEVER-LOG-ME-123"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    return "JUDGE_TEST_KEY"


def _judge(server, api_key_env, **kwargs):
    settings = {"model": "judge-model", "api_key_env": api_key_env, "base_url": server.base_url, "retries": 2}
    return OpenAIJudge(**{**settings, **kwargs})


def _tasks(judge, n_questions=2):
    questions = [Question(i, "writing", (f"question {i}", f"follow-up {i}")) for i in range(n_questions)]
    answers = {
        "m": {str(i): {"choices": [{"turns": [f"answer {i}", f"second {i}"]}]} for i in range(n_questions)}
    }
    return build_tasks(questions, answers, BUILTIN_PROMPTS, judge.identity(), samples=1)


def test_valid_ratings_and_what_is_sent(api_key, tmp_path):
    replies = iter(["Solid. Rating: [[8]]", "Weak. Rating: [[3]]", "Rating: [[6]]", "Rating: [[9]]"])
    with FakeOpenAI(lambda body, n: (200, next(replies), {}), api_key=KEY) as server:
        judge = _judge(server, api_key, temperature=0.0, max_tokens=64, concurrency=1)
        tasks = _tasks(judge)
        records = run_judging(judge, tasks, tmp_path / "j.jsonl", progress=False)
    assert [r["score"] for r in records] == [8.0, 3.0, 6.0, 9.0]
    assert [r["turn"] for r in records] == [1, 2, 1, 2]
    assert all(r["judge"][0] == "judge-model" for r in records)
    assert [r["judge"][1] for r in records] == ["single-v1", "single-v1-multi-turn"] * 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["temperature"] == 0.0 and request["body"]["max_tokens"] == 64
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    assert "answer 0" in request["body"]["messages"][1]["content"]
    # the key is in no record and not in the judge's identity (the cache key's input)
    assert KEY not in (tmp_path / "j.jsonl").read_text()
    assert KEY not in repr(judge.identity())


def test_malformed_output_is_a_cached_failure_not_a_score(api_key, tmp_path):
    with FakeOpenAI(lambda body, n: (200, "It is pretty good, maybe a seven.", {}), api_key=KEY) as server:
        judge = _judge(server, api_key)
        tasks = _tasks(judge, n_questions=1)
        records = run_judging(judge, tasks, tmp_path / "j.jsonl", progress=False)
        assert all(r["failed"] and r["score"] is None for r in records)
        assert records[0]["judgment"] == "It is pretty good, maybe a seven."
        sent = len(server.requests)
        again = run_judging(judge, tasks, tmp_path / "j.jsonl", progress=False)
        assert len(server.requests) == sent  # cached: not asked again
    assert again == records


def test_429_is_retried_then_succeeds(api_key, tmp_path):
    def script(body, n):
        if n == 1:
            return 429, "rate limited", {"retry-after-ms": "10"}
        return 200, "Rating: [[7]]", {}

    with FakeOpenAI(script, api_key=KEY) as server:
        judge = _judge(server, api_key, retries=2)
        [(index, outputs)] = list(judge.complete([[{"role": "user", "content": "x"}]], samples=1))
    assert (index, outputs) == (0, ["Rating: [[7]]"])
    assert len(server.requests) == 2


def test_401_is_one_clear_error_without_the_key(api_key):
    with FakeOpenAI(lambda body, n: (200, "[[5]]", {}), api_key="sk-the-right-one") as server:
        judge = _judge(server, api_key)
        with pytest.raises(StageError) as error:
            list(judge.complete([[{"role": "user", "content": "x"}]], samples=1))
    message = str(error.value)
    assert (
        message
        == f"judge: authentication failed at {server.base_url} (HTTP 401): check the key in $JUDGE_TEST_KEY"
    )
    assert KEY not in message
    assert len(server.requests) == 1  # a bad key is not retried


def test_unreachable_endpoint(api_key):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(model="m", api_key_env=api_key, base_url=f"http://127.0.0.1:{port}/v1", retries=0)
    with pytest.raises(
        StageError, match=rf"judge: endpoint unreachable after 0 retries: http://127.0.0.1:{port}/v1"
    ):
        list(judge.complete([[{"role": "user", "content": "x"}]], samples=1))


def test_persistent_server_error_stops_with_status(api_key):
    with FakeOpenAI(lambda body, n: (500, "boom", {"retry-after-ms": "5"}), api_key=KEY) as server:
        judge = _judge(server, api_key, retries=1)
        with pytest.raises(StageError, match=r"judge: HTTP 500 from .* after 1 retries"):
            list(judge.complete([[{"role": "user", "content": "x"}]], samples=1))
    assert len(server.requests) == 2


def test_missing_key_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(
        StageError, match=r"eval\.judge\.api_key_env: environment variable NO_SUCH_JUDGE_KEY is not set"
    ):
        OpenAIJudge(model="m", api_key_env="NO_SUCH_JUDGE_KEY")


def test_concurrency_limit_and_samples(api_key):
    with FakeOpenAI(
        lambda body, n: (200, f"Rating: [[{n % 10 + 1}]]", {}), api_key=KEY, delay_s=0.15
    ) as server:
        judge = _judge(server, api_key, concurrency=2)
        chats = [[{"role": "user", "content": f"chat {i}"}] for i in range(6)]
        results = dict(judge.complete(chats, samples=2))
    assert sorted(results) == list(range(6))
    assert all(len(outputs) == 2 for outputs in results.values())
    assert len(server.requests) == 12
    assert server.peak_in_flight == 2
