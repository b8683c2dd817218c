# Sourced by the scripts/gpu_*.sh checks on the GPU machine (repo root, gpu-bundle parts applied): the bundle's
# environment, the tvm-ffi wheel carried in .gpu/tvmffi, our sources on PYTHONPATH, and $OUT for logs.
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
[ -f /root/dsv4/env.sh ] && . /root/dsv4/env.sh
if ls .gpu/tvmffi/whl/*.whl >/dev/null 2>&1 && [ ! -d /root/dsv4/tvmffi ]; then
  mkdir -p /root/dsv4/tvmffi && for w in .gpu/tvmffi/whl/*.whl; do python3 -m zipfile -e "$w" /root/dsv4/tvmffi; done
fi
[ -d /root/dsv4/tvmffi ] && export PYTHONPATH=/root/dsv4/tvmffi:${PYTHONPATH:-}
export PYTHONPATH=$PWD/backend_src:$PWD/kernels:${PYTHONPATH:-}
