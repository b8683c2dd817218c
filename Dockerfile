# dsv4-triton: DeepSeek-V4 on Triton Inference Server (decoupled Python backend + dsv4 engine, CuTe DSL kernels).
#
# Base: NVIDIA Triton 25.10 (-py3 image: Triton with the Python backend, Ubuntu 24.04, Python 3.12,
# CUDA 13.0.2, driver >= 575 or a data-center compat driver). CUDA 13 matches the cu130 torch build and the
# -cu13 CuTe DSL libraries our Hopper kernels use. Its Python backend is newer than the local 2.51 bundle and
# reads BYTES tensors correctly under numpy 2, so no numpy<2 stub site is needed here (DSV4_STUB_SYSPATH unset).
#
# Build:   docker build -t dsv4-triton .
# Run (embedded demo checkpoint):
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 dsv4-triton
# Run a real checkpoint with the CuTe DSL kernels:
#   docker run --rm --gpus all --shm-size=2g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v /path/to/ckpt:/ckpt:ro -e DSV4_CHECKPOINT=/ckpt -e DSV4_OPS_BACKEND=cute \
#     -e DSV4_MAX_MODEL_LEN=8192 -e DSV4_MAX_NUM_SEQS=64 -e DSV4_KV_CACHE_MEMORY_BYTES=34359738368 dsv4-triton
# Other overrides (else config.pbtxt's parameters): DSV4_DEVICE, DSV4_DTYPE, DSV4_NUM_KV_BLOCKS,
# DSV4_MAX_NUM_BATCHED_TOKENS. Then: python -m client.stream "Hello" --url localhost:8001
FROM nvcr.io/nvidia/tritonserver:25.10-py3

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG CUTLASS_DSL_VERSION=4.8.1

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dsv4

# torch first (pinned, CUDA 13 build) so that the project's "torch>=2.4" never pulls another build
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir \
      "nvidia-cutlass-dsl==${CUTLASS_DSL_VERSION}" \
      "nvidia-cutlass-dsl-libs-base==${CUTLASS_DSL_VERSION}" \
      "nvidia-cutlass-dsl-libs-core==${CUTLASS_DSL_VERSION}" \
      "nvidia-cutlass-dsl-libs-cu13==${CUTLASS_DSL_VERSION}" \
      "tritonclient[grpc]==2.62.0"

# the engine package (dsv4, dsv4_kernels, client), installed into the Python the backend stub embeds
COPY pyproject.toml ./
COPY backend_src ./backend_src
COPY kernels ./kernels
COPY client ./client
RUN pip install --no-cache-dir ./

COPY model_repository ./model_repository
COPY checkpoints ./checkpoints

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository", "/opt/dsv4/model_repository"]
