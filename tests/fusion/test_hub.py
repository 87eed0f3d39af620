"""Hugging Face Hub sources: spelling, GGUF picking, and the real huggingface_hub code path
against a Hub-layout cache built from the packaged models (``HF_HUB_OFFLINE=1``) and a
loopback server that answers as the Hub does for missing and gated repos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fusion import hub
from fusion.hub import HubRef
from fusion.sources import SourceError
from tests.fixtures.hub_cache import add_gguf_repo, add_model_repo, add_repo

QWEN_GGUF = "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"


@pytest.mark.parametrize(
    ("source", "ref"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", HubRef("Qwen/Qwen2.5-7B-Instruct")),
        ("hf:Qwen/Qwen2.5-7B-Instruct", HubRef("Qwen/Qwen2.5-7B-Instruct")),
        ("hf:org/m@v1.0", HubRef("org/m", "v1.0")),
        ("org/m-GGUF:Q4_K_M", HubRef("org/m-GGUF", None, "Q4_K_M")),
        ("org/m-GGUF@abc123:q8_0", HubRef("org/m-GGUF", "abc123", "q8_0")),
        ("pip:smollm2-135m-instruct", None),
        ("gguf:/models/x.gguf", None),
        ("./models/x", None),
        ("/models/x", None),
        ("~/models/x", None),
        ("just-a-name", None),
    ],
)
def test_which_sources_are_hub_models(source, ref):
    assert hub.parse(source) == ref


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse("org/model") is None
    assert hub.parse("hf:org/model") is None
    assert hub.parse("org/other") == HubRef("org/other")


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("org/m-GGUF:Q4_K_M", "org/m-GGUF"),
        ("hf:org/m@v1", "org/m"),
        ("./weights/phi-3-mini.gguf", "phi-3-mini"),
        ("gguf:/x/y.gguf", "y"),
        ("pip:smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("/models/Meta-Llama-3-8B/", "Meta-Llama-3-8B"),
    ],
)
def test_default_model_names(source, name):
    assert hub.default_name(source) == name


FILES = (
    "README.md",
    "m-Q4_K_M.gguf",
    "m-Q8_0-00001-of-00002.gguf",
    "m-Q8_0-00002-of-00002.gguf",
    "m.IQ2_XS.gguf",
    "mmproj-m-f16.gguf",
)


def test_gguf_tags_pick_files_as_llama_cpp_does():
    pick = hub.pick_gguf
    assert pick(HubRef("o/m", quant="Q4_K_M"), FILES) == ["m-Q4_K_M.gguf"]
    assert pick(HubRef("o/m", quant="q4_k_m"), FILES) == ["m-Q4_K_M.gguf"]  # any case
    assert pick(HubRef("o/m"), FILES) == ["m-Q4_K_M.gguf"]  # the default tag
    assert pick(HubRef("o/m", quant="Q8_0"), FILES) == [  # every part, the first first
        "m-Q8_0-00001-of-00002.gguf",
        "m-Q8_0-00002-of-00002.gguf",
    ]
    assert pick(HubRef("o/m", quant="IQ2_XS"), FILES) == ["m.IQ2_XS.gguf"]


def test_a_missing_quant_names_the_repo_and_what_it_has():
    with pytest.raises(SourceError) as err:
        hub.pick_gguf(HubRef("o/m", quant="Q5_K_S"), FILES)
    assert str(err.value).startswith("o/m has no GGUF of quantisation Q5_K_S")
    assert "IQ2_XS, Q4_K_M, Q8_0" in str(err.value)


def test_several_quants_without_the_default_need_a_tag():
    with pytest.raises(SourceError, match=r"several GGUF quantisations .* e\.g\. o/m:Q5_K_S"):
        hub.pick_gguf(HubRef("o/m"), ("m-Q8_0.gguf", "m-Q5_K_S.gguf"))
    assert hub.pick_gguf(HubRef("o/m"), ("m-Q8_0.gguf",)) == ["m-Q8_0.gguf"]  # the only one
    with pytest.raises(SourceError, match="has no GGUF file"):
        hub.pick_gguf(HubRef("o/m"), ("config.json", "mmproj-f16.gguf"))


# -- the real huggingface_hub code path, offline, against a cache built here ---------------------
def _offline(hf_home: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (huggingface_hub reads its environment once,
    at import) with HF_HOME = ``hf_home`` and HF_HUB_OFFLINE=1."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


def _resolve(hf_home: Path, *sources: str, weights: bool = True) -> list[str]:
    script = (
        "import json, sys\nfrom fusion import hub\nfrom fusion.sources import SourceError\n"
        "out = []\n"
        f"for s in {list(sources)!r}:\n"
        "    try:\n"
        f"        out.append(hub.materialize(s, weights={weights}))\n"
        "    except SourceError as exc:\n"
        "        out.append('error: ' + str(exc))\n"
        "print(json.dumps(out))\n"
    )
    done = _offline(hf_home, script)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_gguf_repos_resolve_from_the_hub_cache_offline(tmp_path):
    add_gguf_repo(tmp_path, "qwen2.5-coder-0.5b-instruct")
    smol = add_gguf_repo(tmp_path, "smollm2-135m-instruct")
    tagged, default, by_tag, missing = _resolve(
        tmp_path, f"hf:{QWEN_GGUF}:Q4_K_M", QWEN_GGUF, f"{smol}:q4_1", f"{smol}:Q8_0"
    )
    snapshots = tmp_path / "hub" / "models--Qwen--Qwen2.5-Coder-0.5B-Instruct-GGUF" / "snapshots"
    assert tagged == default
    assert tagged.startswith(f"gguf:{snapshots}") and tagged.endswith("-q4_k_m.gguf")
    assert Path(tagged[5:]).stat().st_size > 100 << 20  # the real file, through the blob
    assert by_tag.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert missing == f"error: {smol} has no GGUF of quantisation Q8_0 (it has: Q4_1)"


def test_a_model_repo_resolves_to_its_snapshot_and_a_revision_to_its_own(tmp_path):
    main = add_model_repo(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    files = {p.name: p for p in main.iterdir() if p.name != "model.safetensors"}
    v2 = add_repo(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", files, revision="v2")
    folder, pinned, tokenizer_only = _resolve(
        tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "hf:HuggingFaceTB/SmolLM2-135M-Instruct@v2"
    ) + _resolve(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct@v2", weights=False)
    assert folder == f"hf:{main}"
    assert pinned == (  # v2 has no weights…
        "error: HuggingFaceTB/SmolLM2-135M-Instruct@v2 has no weights (*.safetensors or "
        "pytorch_model*.bin) in the local Hub cache (HF_HUB_OFFLINE is set); a GGUF repo needs "
        "its quantisation, e.g. ORG/NAME:Q4_K_M"
    )
    assert tokenizer_only == f"hf:{v2}"  # …but a tokenizer, which is all a remote engine needs
    assert (Path(folder[3:]) / "model.safetensors").is_file()


def test_what_is_not_in_the_cache_offline_is_a_clear_error_naming_the_repo(tmp_path):
    (message,) = _resolve(tmp_path, "meta-llama/Llama-3.1-8B-Instruct")
    assert message.startswith("error: meta-llama/Llama-3.1-8B-Instruct is not in the local")
    assert "not in the local Hub cache" in message and "HF_HUB_OFFLINE is set" in message
    assert str(tmp_path / "hub") in message  # where it looked: HF_HOME honoured


def test_a_repo_without_a_tokenizer_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    add_repo(tmp_path, "org/no-tokenizer", {"config.json": config})
    (message,) = _resolve(tmp_path, "org/no-tokenizer")
    assert message == (
        "error: org/no-tokenizer has no tokenizer (tokenizer.json, tokenizer.model, *.tiktoken, "
        "or remote code (auto_map))"
    )


# -- online: a loopback server answering as the Hub does ---------------------------------------
class _FakeHub(BaseHTTPRequestHandler):
    """Answers as the Hub does (huggingface_hub reads the X-Error-Code header): a missing
    repo is a 404 everywhere; a gated repo's files are listed to anyone, but its access
    check and its downloads are a 403 without a token that was granted access."""

    def do_GET(self) -> None:
        if "/gated" not in self.path:
            self._answer(404, {"error": "Repository not found"}, "RepoNotFound")
        elif "/auth-check" in self.path or "/resolve/" in self.path:
            self._answer(403, {"error": "Access to this model is restricted"}, "GatedRepo")
        else:  # the tree listing
            self._answer(200, [{"type": "file", "oid": "0" * 40, "size": 2, "path": "config.json"}])

    do_HEAD = do_GET

    def _answer(self, code: int, payload: object, error: str | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        if error:
            self.send_header("X-Error-Code", error)
            self.send_header("X-Error-Message", str(payload))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _online(hf_home: Path, endpoint: str, source: str) -> str:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint}
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE"):
        env.pop(name, None)
    script = (  # the check alone: it must catch a gated repo before any download
        "from fusion import hub\nfrom fusion.sources import SourceError\n"
        f"try:\n    hub.check({source!r})\n    print('passed')\n"
        "except SourceError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_missing_repo_online_says_not_found(tmp_path, fake_hub):
    message = _online(tmp_path, fake_hub, "org/missing")
    assert message.startswith("org/missing was not found on the Hub")
    assert "HF_TOKEN" in message


def test_a_gated_repo_online_says_to_accept_the_licence_and_set_a_token(tmp_path, fake_hub):
    message = _online(tmp_path, fake_hub, "org/gated")
    assert message.startswith("org/gated is gated")
    assert "https://huggingface.co/org/gated" in message and "HF_TOKEN" in message


def test_a_cached_model_resolves_when_the_hub_cannot_be_reached_without_offline_set(tmp_path):
    """As huggingface_hub falls back to its cache: no HF_HUB_OFFLINE, no network."""
    repo = add_gguf_repo(tmp_path, "smollm2-135m-instruct")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path),
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
    }
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(name, None)
    script = f"from fusion import hub\nhub.check({repo!r})\nprint(hub.materialize({repo!r}))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_transformers_offline_counts_as_offline(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    script = (
        "from fusion import hub\ntry:\n    hub.materialize('org/x')\n"
        "except Exception as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert "(HF_HUB_OFFLINE is set)" in done.stdout


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unsloth_style_tags_match_the_end_of_the_name():
    files = ("m-UD-Q4_K_XL.gguf", "m-Q4_K_XL.gguf", "m-UD-IQ1_S.gguf")
    assert hub.pick_gguf(HubRef("o/m", quant="UD-Q4_K_XL"), files) == ["m-UD-Q4_K_XL.gguf"]
    assert hub.pick_gguf(HubRef("o/m", quant="ud-iq1_s"), files) == ["m-UD-IQ1_S.gguf"]


def test_weights_are_the_shards_not_mistrals_consolidated_copy():
    from fusion.sources import weight_files

    names = [
        "consolidated.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "original/model.safetensors",
        "training_args.bin",
    ]
    assert weight_files(names) == names[1:3]
    assert weight_files(["pytorch_model.bin", "training_args.bin"]) == ["pytorch_model.bin"]
    assert weight_files(["consolidated.safetensors"]) == []
