"""`fusion-server serve ORG/A ORG/B` from the Hugging Face Hub cache, as a user types it:
HF_HUB_OFFLINE=1, HF_HOME holding a Hub-layout cache built from the packaged models, the
OpenAI SDK streaming a fused answer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from openai import OpenAI

from tests.fixtures.hub_cache import add_gguf_repo
from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration


def test_serve_two_hub_models_offline_streams_a_fused_answer(tmp_path):
    smol = add_gguf_repo(tmp_path, "smollm2-135m-instruct")
    qwen = add_gguf_repo(tmp_path, "qwen2.5-coder-0.5b-instruct")
    port = free_port()
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc, url = launch(
        ["server", "serve", smol, f"{qwen}:Q4_K_M", "--port", str(port), "--api-key", "K"],
        port,
        env=env,
    )
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="K")
        assert [m.id for m in client.models.list().data] == ["fusion", smol, qwen]
        stream = client.chat.completions.create(
            model="fusion",
            messages=[{"role": "user", "content": "Name a colour of the sky."}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 0
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    # the engines came from the Hub cache, on llama.cpp (GGUF repos on a CPU host)
    assert f"{tmp_path}/hub/models--Qwen--Qwen2.5-Coder-0.5B-Instruct-GGUF" in output
    assert "engine llamacpp" in output


def test_serve_refuses_a_hub_model_missing_offline_before_listening(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "org/not-cached", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "fusion-server: org/not-cached is not in the local Hub cache" in done.stderr
