#!/usr/bin/env python3
"""Build the local Triton toolchain under ``.triton/`` (git-ignored). Idempotent.

Run it with the interpreter whose version the Python-backend stub must match (the project venv's
python; the stub embeds ``libpython<major.minor>``):

    .venv/bin/python scripts/triton_setup.py            # or: bash scripts/triton_env.sh
    .venv/bin/python scripts/triton_setup.py --check    # only verify, exit 1 if something is missing
    source .triton/env.sh                               # PATH/LD_LIBRARY_PATH for hand use

Layout produced (paths in ``.triton/triton_env.json``, read by ``scripts/triton_local.py``)::

    .triton/pkgs/          pip --target: nvidia-pytriton==0.7.0 (tritonserver 2.51 bundle), tritonclient==2.50.0
                           (perf_analyzer lives in its wheel data), nvidia-cuda-runtime-cu12 (libcudart.so.12)
    .triton/libexec/       the real tritonserver and perf_analyzer binaries (copied)
    .triton/bin/           wrapper scripts tritonserver / perf_analyzer that set LD_LIBRARY_PATH (+ DSV4_STUB_SYSPATH)
    .triton/backends/python/   libtriton_python.so, triton_python_backend_utils.py and the stub for this Python
    .triton/stub_site/     numpy==1.26.4 only. Triton 2.51's Python backend mis-reads BYTES tensors under numpy 2;
                           the stub ignores PYTHONPATH, so model.py prepends DSV4_STUB_SYSPATH to sys.path itself.
    .triton/env.sh         exports for an interactive shell

The project venv additionally gets the client side: tritonclient==2.50.0 installed with --no-deps (its
``numpy<2`` pin is only needed by the server's stub; the client works with the venv's numpy 2) plus its
grpc/http dependencies and matplotlib (load-test plots). ``--no-client`` skips that.

Debian ``libb64-0d`` (needed by perf_analyzer) is apt-installed when missing and we are root.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PYTRITON = "nvidia-pytriton==0.7.0"
TRITONCLIENT = "tritonclient==2.50.0"
# the wheel extras [all] minus cuda-python, resolved by hand so that the venv keeps its numpy
CLIENT_DEPS = [
    "grpcio>=1.41.0",
    "protobuf>=3.5.0,<5",
    "python-rapidjson>=0.9.1",
    "packaging>=14.1",
    "urllib3>=2.0.7",
    "aiohttp>=3.8.1,<4",
    "geventhttpclient>=1.4.4,<=2.0.2",
    "matplotlib",
]
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"
STUB_NUMPY = "numpy==1.26.4"
SCHEMA = 2


def log(msg: str) -> None:
    print(f"[triton-setup] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def dist_version(site: Path, dist: str) -> str | None:
    """Version of ``dist`` installed in ``site`` (a --target dir or site-packages), from its dist-info."""
    norm = dist.replace("-", "_").lower()
    if not site.is_dir():
        return None
    for p in site.glob("*.dist-info"):
        name, _, ver = p.name[: -len(".dist-info")].rpartition("-")
        if name.replace("-", "_").lower() == norm:
            return ver
    return None


def pinned(spec: str) -> tuple[str, str]:
    name, _, ver = spec.partition("==")
    return name, ver


def python_info(python: Path) -> dict:
    code = (
        "import json,sys,sysconfig,site;"
        "print(json.dumps({'version': '%d.%d' % sys.version_info[:2],"
        "'libdir': sysconfig.get_config_var('LIBDIR'),"
        "'ldlibrary': sysconfig.get_config_var('LDLIBRARY'),"
        "'instsoname': sysconfig.get_config_var('INSTSONAME'),"
        "'purelib': sysconfig.get_paths()['purelib'],"
        "'platlib': sysconfig.get_paths()['platlib'],"
        "'base_prefix': sys.base_prefix}))"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def find_libpython(info: dict) -> Path:
    """Directory holding libpython<ver>.so.1.0, which the stub links against."""
    soname = f"libpython{info['version']}.so.1.0"
    candidates = [info.get("libdir"), os.path.join(info["base_prefix"], "lib"),
                  "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/usr/lib", "/usr/lib64"]
    for d in candidates:
        if d and (Path(d) / soname).exists():
            return Path(d)
    raise SystemExit(
        f"[triton-setup] {soname} not found (looked in {candidates}). The Python-backend stub embeds it: "
        f"install the shared libpython (Debian: apt-get install libpython{info['version']}; pyenv: "
        f"PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)."
    )


def copy_if_changed(src: Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    if mode is not None:
        dst.chmod(mode)


def write_if_changed(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    if mode is not None:
        path.chmod(mode)


def ensure_libb64(check_only: bool) -> bool:
    have = subprocess.run(["sh", "-c", "ldconfig -p | grep -q 'libb64.so.0d'"]).returncode == 0
    if have or check_only:
        return have
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("WARNING: libb64.so.0d missing and cannot apt-get install it (need root + apt): perf_analyzer "
            "will not start; install Debian/Ubuntu package libb64-0d.")
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", "libb64-0d"], env=env).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "libb64-0d"], env=env)
    return True


def ldd_missing(binary: Path, ld_path: str) -> list[str]:
    env = dict(os.environ, LD_LIBRARY_PATH=ld_path)
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    return [ln.split()[0] for ln in out.splitlines() if "not found" in ln]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=None,
                    help="interpreter whose version/site-packages the stub uses (default: .venv/bin/python if "
                         "present, else this interpreter)")
    ap.add_argument("--root", default=str(REPO / ".triton"), help="server root (default .triton/)")
    ap.add_argument("--no-client", action="store_true", help="do not install tritonclient etc. into the venv")
    ap.add_argument("--no-apt", action="store_true", help="never run apt-get (perf_analyzer needs libb64-0d)")
    ap.add_argument("--check", action="store_true", help="verify only; exit 1 when something is missing")
    args = ap.parse_args(argv)

    root = Path(args.root).resolve()
    venv_py = REPO / ".venv" / "bin" / "python"
    python = Path(args.python) if args.python else (venv_py if venv_py.exists() else Path(sys.executable))
    python = python.absolute()
    info = python_info(python)
    ver = info["version"]
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    problems: list[str] = []

    # 1. tool wheels into a dedicated --target dir (only their binaries/libs are used, never imported)
    pkgs = root / "pkgs"
    want = [PYTRITON, TRITONCLIENT, CUDART]
    stale = [s for s in want if dist_version(pkgs, pinned(s)[0]) != pinned(s)[1]]
    if stale:
        if args.check:
            problems.append(f"{pkgs}: missing/outdated {stale}")
        else:
            shutil.rmtree(pkgs, ignore_errors=True)
            run(pip + ["install", "--no-deps", "--no-compile", "--target", pkgs] + want)

    # 2. stub site: numpy<2 only, for the stub's Python version (pip of that interpreter picks the wheel)
    stub_site = root / "stub_site"
    if dist_version(stub_site, "numpy") != pinned(STUB_NUMPY)[1]:
        if args.check:
            problems.append(f"{stub_site}: {STUB_NUMPY} missing")
        else:
            shutil.rmtree(stub_site, ignore_errors=True)
            run(pip + ["install", "--no-deps", "--no-compile", "--target", stub_site, STUB_NUMPY])

    # 3. client side into the venv (tritonclient without its numpy<2 pin)
    purelib = Path(info["purelib"])
    if not args.no_client:
        if dist_version(purelib, "tritonclient") != pinned(TRITONCLIENT)[1] or \
                dist_version(purelib, "geventhttpclient") is None or dist_version(purelib, "matplotlib") is None:
            if args.check:
                problems.append(f"{python}: tritonclient/matplotlib not installed")
            else:
                run(pip + ["install", "--no-deps", TRITONCLIENT])
                run(pip + ["install"] + CLIENT_DEPS)

    if args.check:
        layout_file = root / "triton_env.json"
        if not layout_file.exists():
            problems.append(f"{layout_file} missing")
        else:
            lay = json.loads(layout_file.read_text())
            if lay.get("schema") != SCHEMA or lay.get("python_version") != ver:
                problems.append(f"{layout_file} is from another setup (schema/Python version)")
            for key in ("tritonserver", "perf_analyzer"):
                if not Path(lay.get(key, "/nonexistent")).exists():
                    problems.append(f"{key} missing")
            if not (root / "backends" / "python" / "triton_python_backend_stub").exists():
                problems.append("python backend stub missing")
    if problems:
        for p in problems:
            log("MISSING: " + p)
        return 1
    if args.check:
        log(f"ok: {root}")
        return 0

    # 4. server root: binaries, python backend + the stub for this Python version
    bundle = pkgs / "pytriton" / "tritonserver"
    stub_src = bundle / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub_src.exists():
        have = sorted(p.name for p in (bundle / "python_backend_stubs").iterdir())
        raise SystemExit(f"[triton-setup] no Python-backend stub for Python {ver} in {PYTRITON} (has {have})")
    pa_src = pkgs / "bin" / "perf_analyzer"
    libexec, backends = root / "libexec", root / "backends" / "python"
    copy_if_changed(bundle / "bin" / "tritonserver", libexec / "tritonserver", 0o755)
    copy_if_changed(pa_src, libexec / "perf_analyzer", 0o755)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        copy_if_changed(bundle / "backends" / "python" / name, backends / name)
    copy_if_changed(stub_src, backends / "triton_python_backend_stub", 0o755)

    libpython_dir = find_libpython(info)
    ld_paths = [str(pkgs / "nvidia_pytriton.libs"), str(pkgs / "nvidia" / "cuda_runtime" / "lib"),
                str(libpython_dir)]
    site_dirs = list(dict.fromkeys([info["purelib"], info["platlib"]]))
    stub_sys_path = [str(stub_site)] + site_dirs + [str(REPO / "backend_src"), str(REPO / "kernels"), str(REPO)]

    # 5. perf_analyzer's system dependency
    have_b64 = ensure_libb64(check_only=args.no_apt)

    # 6. wrappers + env files
    ld = os.pathsep.join(ld_paths)
    sp = os.pathsep.join(stub_sys_path)
    wrapper = """#!/bin/sh
# generated by scripts/triton_setup.py: run the bundled {name} with its libraries
export LD_LIBRARY_PATH="{ld}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
export DSV4_STUB_SYSPATH="${{DSV4_STUB_SYSPATH:-{sp}}}"
{extra}exec "{exe}" "$@"
"""
    # tritonserver: add our backend directory unless the caller names one
    ts_extra = ('case " $* " in *" --backend-directory"*) ;; *) set -- "$@" --backend-directory "{b}";; esac\n'
                .format(b=root / "backends"))
    write_if_changed(root / "bin" / "tritonserver",
                     wrapper.format(name="tritonserver", ld=ld, sp=sp, extra=ts_extra,
                                    exe=libexec / "tritonserver"), 0o755)
    write_if_changed(root / "bin" / "perf_analyzer",
                     wrapper.format(name="perf_analyzer", ld=ld, sp=sp, extra="",
                                    exe=libexec / "perf_analyzer"), 0o755)
    layout = {
        "schema": SCHEMA,
        "repo": str(REPO),
        "python": str(python),
        "python_version": ver,
        "tritonserver": str(libexec / "tritonserver"),
        "perf_analyzer": str(libexec / "perf_analyzer"),
        "backend_directory": str(root / "backends"),
        "ld_library_path": ld_paths,
        "stub_sys_path": stub_sys_path,
        "versions": {"nvidia-pytriton": pinned(PYTRITON)[1], "tritonclient": pinned(TRITONCLIENT)[1],
                     "stub_numpy": pinned(STUB_NUMPY)[1]},
    }
    write_if_changed(root / "triton_env.json", json.dumps(layout, indent=2) + "\n")
    write_if_changed(root / "env.sh", (
        "# generated by scripts/triton_setup.py; usage: source .triton/env.sh\n"
        f'export PATH="{root / "bin"}:$PATH"\n'
        f'export DSV4_STUB_SYSPATH="{sp}"\n'
    ))

    # 7. smoke checks
    for exe in (libexec / "tritonserver", backends / "triton_python_backend_stub", libexec / "perf_analyzer"):
        missing = ldd_missing(exe, ld)
        if missing:
            msg = f"{exe.name}: unresolved libraries {missing}"
            if exe.name == "perf_analyzer" and not have_b64:
                log("WARNING: " + msg)
            else:
                raise SystemExit("[triton-setup] " + msg)
    env = dict(os.environ, LD_LIBRARY_PATH=ld)
    r = subprocess.run([str(libexec / "tritonserver"), "--help"], capture_output=True, text=True, env=env)
    if "Usage: tritonserver" not in (r.stdout + r.stderr):
        raise SystemExit(f"[triton-setup] tritonserver does not start: {r.stderr[-2000:]}")
    log(f"ready: {root}  (stub Python {ver}, libpython in {libpython_dir})")
    log(f"hand use: source {root / 'env.sh'}; tritonserver --model-repository model_repository")
    return 0


if __name__ == "__main__":
    sys.exit(main())
