# The project on Ray's GPU image: what cluster/*.yaml and k8s/*.yaml run.
#   docker build -t ghcr.io/dreambooth-ray/dreambooth-ray:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

# DeepSpeed JIT-builds a few ops on first use; keep them in one writable place.
ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    PYTHONUNBUFFERED=1

WORKDIR /home/ray/dreambooth-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dreambooth_ray ./dreambooth_ray
# The project's own install step (CUDA torch from the index here: this image has GPUs).
RUN pip install --no-cache-dir ".[test]" ninja \
 && python -c "import dreambooth_ray.cli, deepspeed, diffusers" \
 && dreambooth-ray --help >/dev/null

USER ray
