"""API keys from config, env or a file; CORS off unless configured; no text in logs."""

from __future__ import annotations

import logging

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "a secret question"}]}


async def test_keys_from_a_file_and_the_environment(client, tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text("from-file\n\n")
    monkeypatch.setenv("FUSION_API_KEY", "from-env")
    async with client(api_key_file=str(keyfile)) as http:
        for key, status in (("from-file", 200), ("from-env", 200), ("from-fil", 401), ("", 401)):
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, key
        basic = await http.get("/v1/models", headers={"Authorization": "Basic from-file"})
        assert basic.status_code == 401


async def test_cors_is_off_unless_configured(client):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    async with client() as http:
        r = await http.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    async with client(cors_origins=["http://ui.example"]) as http:
        r = await http.options("/v1/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://ui.example"


async def test_prompt_and_completion_text_stay_out_of_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    async with client() as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
    assert "chatcmpl-" in caplog.text  # the request is logged...
    assert "a secret question" not in caplog.text  # ...its text is not
    assert "The cat sat" not in caplog.text
    caplog.clear()
    async with client(log_text=True) as http:
        await http.post("/v1/chat/completions", json=CHAT)
    assert "a secret question" in caplog.text
