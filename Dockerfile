# dq on CUDA GPU nodes. Build: docker build -t dq .   Run (docs/clusters.md has the mounts a cluster needs):
#   docker run --gpus all --shm-size=8g -v $PWD/outputs:/workspace/outputs dq quant=w4a4 method=dilatequant
#   docker run --gpus all --entrypoint dq-evaluate ... run=/workspace/outputs/<run>
#   docker run --gpus all --entrypoint dq-export ... run=/workspace/outputs/<run>
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# WANDB_MODE=offline: runs are written under each run dir and uploaded later with `wandb sync`; pass
# -e WANDB_MODE=online -e WANDB_API_KEY=... to log live. HF_HOME and DQ_CACHE_DIR are the mount points for the
# Hugging Face cache and dq's calibration / FP-sample caches. DQ_INCEPTION_PATH: the FID network baked in below.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    HF_HOME=/cache/huggingface \
    DQ_CACHE_DIR=/cache/dq \
    DQ_INCEPTION_PATH=/opt/dq/inception-2015-12-05.pt \
    PATH=/opt/venv/bin:$PATH

# gcc + python3-dev: torch.compile (method.distill.compile=true) has Triton build its kernel launchers in C
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev gcc ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /workspace/dq

# torch==2.13.0 (pinned in requirements.txt) resolves to its CUDA build on this image
COPY requirements.txt requirements-gpu.txt requirements-inception.txt ./
RUN pip install -r requirements-gpu.txt \
    && pip install --no-deps -r requirements-inception.txt

# Evaluation without downloads at run time: clean-fid's Inception network (eval=cleanfid, cifar10_paper) and its
# CIFAR-10 statistics (the paper's protocol), fetched once here
RUN mkdir -p /opt/dq \
    && python -c "from cleanfid.downloads_helper import check_download_inception as get; get(fpath='/opt/dq')" \
    && python -c "from cleanfid.features import get_reference_statistics as get; get('cifar10', 32, mode='clean', split='train')"

COPY . .
# the dq-train, dq-evaluate, dq-export and dq-sweep commands; `python train.py` works from /workspace/dq too
RUN pip install --no-deps . \
    && mkdir -p /workspace/outputs /cache/dq /cache/huggingface

# run dirs land in /workspace/outputs (sweeps: /workspace/multirun): mount them; Hydra overrides pass straight through
WORKDIR /workspace
ENTRYPOINT ["dq-train"]
CMD []
