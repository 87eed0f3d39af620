# fusion-server on a GPU host, on top of vLLM's official OpenAI-server image (CUDA, torch,
# vLLM). NOT built on the development machines (no Docker engine, no GPU there);
# tests/test_images.py checks what it can without Docker (docs/DEPLOYMENT.md, "Images").
#
#   docker build -t fusion-server .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#     -v ~/.cache/huggingface:/root/.cache/huggingface -e HF_TOKEN \
#     fusion-server serve Qwen/Qwen2.5-7B-Instruct meta-llama/Llama-3.1-8B-Instruct
#
# Without arguments it serves config.gpu.yaml (three ~8B models from the Hub); mount your
# own config and pass `serve --config /path/in/container.yaml` to change it. It listens on
# 0.0.0.0 whatever the arguments (FUSION_SERVER__HOST below; a --host flag still wins).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fusion ./fusion
COPY tokenizers_align ./tokenizers_align
COPY server ./server

# Our package on the image's vLLM, torch and transformers, without the llamacpp extra (it
# compiles llama.cpp; vLLM is the engine here). The image's own versions are passed as
# constraints, so pip adds our light dependencies and replaces nothing the image ships.
RUN python3 -m pip list --format=freeze | grep -v -E '^(pip|setuptools|wheel)==' > /tmp/image.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -c /tmp/image.txt . \
 && rm /tmp/image.txt \
 && python3 -c "import vllm, fusion.engines.vllm_engine, server.app; print('vllm', vllm.__version__)" \
 && fusion-server --help > /dev/null

COPY config.yaml config.gpu.yaml ./

# Outside the container's loopback also when a user's arguments replace CMD
ENV FUSION_SERVER__HOST=0.0.0.0
EXPOSE 8000
# /health waits up to 5 s for an engine's check (server/state.py): the probe waits longer
HEALTHCHECK --interval=10s --timeout=10s --start-period=30m --retries=3 \
  CMD curl -fsS --max-time 9 http://localhost:8000/health || exit 1
ENTRYPOINT ["fusion-server"]
CMD ["serve", "--config", "config.gpu.yaml", "--port", "8000"]
