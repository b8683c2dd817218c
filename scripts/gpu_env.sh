# Sourced by the scripts/gpu_*.sh checks on the GPU machine (repo root, gpu-bundle parts applied): the bundle's
# environment, extra wheels carried in .gpu/<name>/whl (tvm-ffi; matplotlib for the plots), our sources on
# PYTHONPATH, and $OUT for logs.
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
[ -f /root/dsv4/env.sh ] && . /root/dsv4/env.sh
for whl_dir in .gpu/*/whl; do
  [ -d "$whl_dir" ] || continue
  name=$(basename "$(dirname "$whl_dir")")
  case $name in p1|p2|p3) continue ;; esac
  if [ ! -d "/root/dsv4/$name" ]; then
    mkdir -p "/root/dsv4/$name" && for w in "$whl_dir"/*.whl; do python3 -m zipfile -e "$w" "/root/dsv4/$name"; done
  fi
  export PYTHONPATH=/root/dsv4/$name:${PYTHONPATH:-}
done
export PYTHONPATH=$PWD/backend_src:$PWD/kernels:${PYTHONPATH:-}
