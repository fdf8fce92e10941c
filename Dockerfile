# The app as a Hugging Face Space (Docker SDK: README.md's front matter says `sdk: docker`, `app_port: 7860`) or on
# any Docker host with an NVIDIA GPU (`docker run --gpus all -p 7860:7860 -e FINETUNER_AUTH=user:pass IMAGE`).
# Spaces give the container the GPU driver; torch's CUDA wheels from PyPI bring the rest.
FROM python:3.11-slim

# cmake and a compiler build llama-cpp-python (the export's llama.cpp); git for Hub ids with revisions.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*

# Spaces run the container as user 1000.
RUN useradd -m -u 1000 user
USER user
# The app serves where Spaces expect it: every interface, the front matter's app_port. SPACE_ID (set by Spaces)
# makes it require the login from the FINETUNER_AUTH secret and put the workspace on /data when the Space has
# persistent storage.
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-gpu.txt ./
RUN pip install --no-cache-dir --user -r requirements-gpu.txt
COPY --chown=user . .
RUN python scripts/fetch_converter.py vendor

EXPOSE 7860
CMD ["python", "main.py"]
