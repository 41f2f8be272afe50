# gemrun's OpenAI/Ollama-compatible server on the CPU (torch 2.13.0's CPU wheel), serving the embedded Gemma 3 270M
# unless told otherwise. The API key comes from the environment; every route but /health then needs it.
#
#   docker build -t gemrun .
#   docker run --rm -p 8000:8000 -e GEMRUN_API_KEY=$KEY gemrun
#   docker run --rm -p 8000:8000 -e GEMRUN_API_KEY=$KEY -v /models:/models:ro gemrun -m /models/gemma-3-12b-it-q4_0.gguf
FROM python:3.11-slim

# gcc builds gemrun's AVX-512 VNNI kernels on first use (they fall back to PyTorch's where the CPU lacks them)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gemrun ./gemrun
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 gemrun

USER gemrun
ENV GEMRUN_CACHE=/home/gemrun/.cache/gemrun
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# SIGTERM drains in-flight requests (--shutdown-deadline) and exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["gemrun", "serve", "--host", "0.0.0.0", "--port", "8000"]
