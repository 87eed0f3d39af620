# fusion-server on a GPU host, on top of vLLM's official OpenAI-server image (which
# brings CUDA, torch and vllm). Cannot be built on the CPU-only development machines.
#
#   docker build -t fusion-server .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models fusion-server
#
# The default command serves config.gpu.yaml; mount your own and pass --config to change it.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fusion ./fusion
COPY tokenizers_align ./tokenizers_align
COPY server ./server
COPY config.yaml config.gpu.yaml ./

# vllm is already in the image; install only our package and its light dependencies.
RUN pip install --no-cache-dir -e . \
 && python -c "import vllm, fusion, server; print('vllm', vllm.__version__)"

EXPOSE 8000
ENTRYPOINT ["fusion-server"]
CMD ["serve", "--config", "config.gpu.yaml", "--host", "0.0.0.0", "--port", "8000"]
