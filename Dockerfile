# dq on a CUDA GPU node: docker build -t dq . && docker run --gpus all dq quant=w4a4 method=dilatequant
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    PATH=/opt/venv/bin:$PATH

# gcc + python3-dev: torch.compile (method.distill.compile=true) has Triton build its kernel launchers in C
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev gcc ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /workspace/dq

# torch==2.13.0 (pinned in requirements.txt) resolves to its CUDA build on this image
COPY requirements.txt requirements-gpu.txt ./
RUN pip install -r requirements-gpu.txt

COPY . .

# Hydra overrides pass straight through: docker run --gpus all dq trainer=gpu quant=w6a6
ENTRYPOINT ["python", "train.py"]
CMD []
