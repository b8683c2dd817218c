"""Load and validate a DeepSeek-V4 checkpoint directory (official FP8/MXFP4 release, NVIDIA NVFP4, or BF16).

    ckpt = load_checkpoint("/models/dsv4-tiny")
    ckpt.tensors["layers.0.ffn.experts.3.w1.weight"]   # NVFP4Tensor / MXFP4Tensor / FP8BlockTensor / Tensor
    ckpt.dense("layers.0.attn.wq_a.weight")            # dequantised float32
    weights = ckpt.dequantized()                       # what dsv4.reference.ReferenceModel takes

Steps: parse config.json (and its quantization_config), read the shard headers (no tensor data yet), map every name
to its official form (`names.canonical_name`), group each projection's `.weight` with its companions, detect the
storage format of each projection from dtypes + companions (per tensor: NVIDIA's NVFP4 checkpoints keep the MTP
experts in MXFP4), and validate everything against `model_specs(config)`. All problems found are reported together
in one CheckpointFormatError, each naming the tensor and its shard file. Only then is data read, one tensor at a
time, shard by shard.

`Checkpoint.tensors` is keyed by the parameter name the model uses (`<module>.weight` for projections, the tensor
name otherwise). Packed FP4 data is always exposed as uint8 (DeepSeek stores it as int8; the bytes are the same).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

from dsv4.checkpoint.formats import FP8BlockTensor, MXFP4Tensor, NVFP4Tensor
from dsv4.checkpoint.names import TensorSpec, canonical_name, model_specs
from dsv4.config import ModelConfig
from dsv4.errors import CheckpointFormatError

WeightLike = Union[torch.Tensor, NVFP4Tensor, MXFP4Tensor, FP8BlockTensor]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Companions of a projection's `.weight`, longest suffix first so that `.weight_scale_2` is not read as `.weight`.
_COMPANIONS = ("weight_scale_inv", "weight_scale_2", "weight_scale", "input_scale", "weight", "scale")
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# Allowed stored dtypes of unquantised roles (F32 is accepted for BF16 tensors: a lossless superset).
_PLAIN_DTYPES = {"bf16": ("BF16", "F32"), "fp32": ("F32",), "table": ("I64", "I32")}
_MAX_REPORTED = 25


@dataclass
class Checkpoint:
    config: ModelConfig
    path: Path
    tensors: dict[str, WeightLike]
    tokenizer_path: Path | None
    quantization_config: dict[str, Any] | None = None
    formats: dict[str, str] = field(default_factory=dict)   # param name -> bf16|fp32|table|fp8|mxfp4|nvfp4|dense

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One parameter as a plain tensor: quantised ones dequantised, floats cast to `dtype`, integers as-is."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no parameter {name!r}") from None
        if isinstance(t, (NVFP4Tensor, MXFP4Tensor, FP8BlockTensor)):
            return t.dequantize(dtype)
        return t.to(dtype) if t.is_floating_point() else t

    def dequantized(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every parameter through `dense` (for the reference model and the torch ops)."""
        return {name: self.dense(name, dtype) for name in self.tensors}


@dataclass
class _Stored:
    name: str            # name in the file
    file: str            # shard file name
    dtype: str           # safetensors dtype string
    shape: tuple[int, ...]


@dataclass
class _Entry:
    spec: TensorSpec
    kind: str                                  # bf16|fp32|table|fp8|mxfp4|nvfp4|dense
    parts: dict[str, _Stored]                  # companion suffix ("" for plain tensors) -> stored tensor


# ----------------------------------------------------------------------------------------------------------------
# config and shard discovery
# ----------------------------------------------------------------------------------------------------------------
def _check_quantization_config(qc: Any, where: Path) -> tuple[int, int]:
    """Validate config.json's quantization_config; returns the FP8 block shape."""
    if qc is None:
        return (128, 128)
    if not isinstance(qc, dict):
        raise CheckpointFormatError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CheckpointFormatError(f"{where}: quantization_config.fmt {fmt!r} is not supported (only e4m3)")
        moe = qc.get("moe_quant_algo")
        if moe not in (None, "NVFP4", "MXFP4"):
            raise CheckpointFormatError(f"{where}: quantization_config.moe_quant_algo {moe!r} is not supported "
                                        "(NVFP4 or absent)")
        block = qc.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointFormatError(f"{where}: quantization_config.weight_block_size must be two positive "
                                        f"integers, got {block!r}")
        return (block[0], block[1])
    if method == "modelopt":   # generic ModelOpt export (NVFP4 experts, FP8 or BF16 elsewhere)
        algo = qc.get("quant_algo")
        if algo not in ("NVFP4", "MIXED_PRECISION", "FP8"):
            raise CheckpointFormatError(f"{where}: quantization_config.quant_algo {algo!r} is not supported "
                                        "for quant_method 'modelopt' (NVFP4, MIXED_PRECISION, FP8)")
        return (128, 128)
    raise CheckpointFormatError(
        f"{where}: unknown quantisation format: quantization_config.quant_method is {method!r}; this loader reads "
        "'fp8' (DeepSeek's FP8 block + MXFP4 experts, optionally NVIDIA's NVFP4 experts), 'modelopt', or an "
        "unquantised checkpoint (no quantization_config)")


def _shard_map(path: Path) -> tuple[dict[str, str], list[str]]:
    """(tensor name -> shard file name from the index, sorted shard files). A lone model.safetensors is accepted."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{index} is not valid JSON: {e}") from None
        wm = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointFormatError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
        files = sorted(set(wm.values()))
        for f in files:
            if not (path / f).is_file():
                example = next(k for k, v in sorted(wm.items()) if v == f)
                n = sum(1 for v in wm.values() if v == f)
                raise CheckpointFormatError(f"{INDEX_FILE} names shard file {f} (holding {n} tensor(s), e.g. "
                                            f"{example}) but {path / f} does not exist")
        return dict(wm), files
    if (path / SINGLE_FILE).is_file():
        return {}, [SINGLE_FILE]
    raise CheckpointFormatError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")


def _read_headers(path: Path, files: list[str]) -> dict[str, _Stored]:
    stored: dict[str, _Stored] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    if k in stored:
                        raise CheckpointFormatError(f"tensor {k} is stored twice: in {stored[k].file} and in {f}")
                    stored[k] = _Stored(k, f, sl.get_dtype(), tuple(sl.get_shape()))
        except CheckpointFormatError:
            raise
        except Exception as e:  # safetensors raises SafetensorError (a bare Exception subclass) on bad headers
            raise CheckpointFormatError(f"shard {f} is truncated or corrupt (cannot read its safetensors header: "
                                        f"{e})") from None
    return stored


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def _split(name: str, plain: dict[str, TensorSpec], modules: dict[str, TensorSpec]) -> tuple[TensorSpec, str] | None:
    if name in plain:
        return plain[name], ""
    for suffix in _COMPANIONS:
        if name.endswith("." + suffix):
            module = name[: -len(suffix) - 1]
            if module in modules:
                return modules[module], suffix
    return None


def _classify(spec: TensorSpec, parts: dict[str, _Stored], block: tuple[int, int], errors: list[str]) -> str | None:
    """Detect a projection's storage format from its parts' dtypes and check every shape; None on error."""
    out_f, in_f = spec.shape
    w = parts.get("weight")
    if w is None:
        some = next(iter(parts.values()))
        errors.append(f"missing tensor {spec.name}.weight: its companion(s) {sorted(parts)} are in {some.file} "
                      f"but the weight itself is not in any shard")
        return None
    if "scale" in parts and "weight_scale_inv" in parts:
        errors.append(f"{spec.name} has both .scale and .weight_scale_inv (in {w.file}); keep one")
        return None
    scale = parts.get("scale") or parts.get("weight_scale_inv")
    n_err = len(errors)

    def expect(part: _Stored | None, label: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> None:
        if part is None:
            errors.append(f"missing tensor {spec.name}.{label} (needed by {spec.name}.weight, dtype {w.dtype}, "
                          f"in {w.file})")
            return
        if part.dtype not in dtypes:
            errors.append(f"wrong dtype for {part.name} in {part.file}: got {part.dtype}, expected "
                          f"{' or '.join(dtypes)}")
        if shape is not None and part.shape != shape:
            what = "scale shape mismatch" if label != "weight" else "wrong shape"
            errors.append(f"{what} for {part.name} in {part.file}: expected {list(shape)}, got {list(part.shape)}")

    def scalar(part: _Stored | None, label: str, required: bool) -> None:
        if part is None:
            if required:
                errors.append(f"missing tensor {spec.name}.{label} (NVFP4 per-tensor scale; weight in {w.file})")
            return
        if part.dtype != "F32" or math.prod(part.shape) != 1:
            errors.append(f"{part.name} in {part.file} must be an F32 scalar, got {part.dtype} {list(part.shape)}")

    def no_extra(allowed: set[str], kind: str) -> None:
        extra = sorted(set(parts) - allowed)
        if extra:
            errors.append(f"unexpected tensor(s) {[f'{spec.name}.{e}' for e in extra]} next to {kind} weight "
                          f"{spec.name}.weight (in {w.file})")

    if "weight_scale" in parts or "weight_scale_2" in parts:
        kind = "nvfp4"
        if spec.role != "expert":
            errors.append(f"{spec.name} (in {w.file}) is stored as NVFP4, which only routed experts may use")
        expect(w, "weight", ("U8", "I8"), (out_f, in_f // 2))
        expect(parts.get("weight_scale"), "weight_scale", ("F8_E4M3",), (out_f, in_f // 16))
        scalar(parts.get("weight_scale_2"), "weight_scale_2", True)
        scalar(parts.get("input_scale"), "input_scale", False)
        no_extra({"weight", "weight_scale", "weight_scale_2", "input_scale"}, "NVFP4")
    elif w.dtype == "F8_E4M3":
        kind = "fp8"
        expect(w, "weight", ("F8_E4M3",), (out_f, in_f))
        label = "weight_scale_inv" if "weight_scale_inv" in parts else "scale"
        expect(scale, label, ("F8_E8M0", "F32", "U8"), (-(-out_f // block[0]), -(-in_f // block[1])))
        no_extra({"weight", label}, "FP8 block")
    elif w.dtype in ("I8", "U8") and scale is not None:
        kind = "mxfp4"
        if spec.role != "expert":
            errors.append(f"{spec.name} (in {w.file}) is stored as packed FP4 ({w.dtype}), which only routed experts "
                          "may use; expected an F8_E4M3 or BF16 weight")
        expect(w, "weight", ("I8", "U8"), (out_f, in_f // 2))
        expect(scale, "scale", ("F8_E8M0", "U8"), (out_f, in_f // 32))
        no_extra({"weight", "scale", "weight_scale_inv"}, "MXFP4")
    elif w.dtype in ("BF16", "F32", "F16") and len(parts) == 1:
        kind = "dense"
        expect(w, "weight", ("BF16", "F32", "F16"), (out_f, in_f))
    else:
        errors.append(f"wrong dtype for {w.name} in {w.file}: cannot tell its format from dtype {w.dtype} with "
                      f"companions {sorted(set(parts) - {'weight'})} (expected F8_E4M3 + scale, I8/U8 + E8M0 scale, "
                      "U8 + weight_scale/weight_scale_2, or BF16 alone)")
        return None
    return kind if len(errors) == n_err else None


def _validate(cfg: ModelConfig, stored: dict[str, _Stored], index: dict[str, str],
              block: tuple[int, int]) -> list[_Entry]:
    specs = model_specs(cfg)
    plain = {s.name: s for s in specs if s.role not in ("linear", "expert")}
    modules = {s.name: s for s in specs if s.role in ("linear", "expert")}
    errors: list[str] = []

    # index entries whose tensor is not where the index says (a tensor missing altogether is reported below)
    index_file: dict[str, str] = {}
    for name, file in sorted(index.items()):
        index_file[canonical_name(name)] = file
        if name in stored and stored[name].file != file:
            errors.append(f"tensor {name} is in {stored[name].file} but {INDEX_FILE} says {file}")
        elif name not in stored and _split(canonical_name(name), plain, modules) is None:
            errors.append(f"{INDEX_FILE} lists tensor {name} in {file}, which does not contain it (and it is not "
                          "part of this model)")

    groups: dict[str, dict[str, _Stored]] = {}
    for raw in sorted(stored):
        st = stored[raw]
        hit = _split(canonical_name(raw), plain, modules)
        if hit is None:
            errors.append(f"unexpected tensor {raw} in {st.file}: not part of a model with this config.json")
            continue
        spec, suffix = hit
        if suffix in groups.setdefault(spec.name, {}):
            errors.append(f"tensor {spec.name}{'.' + suffix if suffix else ''} appears twice: as "
                          f"{groups[spec.name][suffix].name} and {raw}")
            continue
        groups[spec.name][suffix] = st

    # where each spec's tensors are (to say where a missing one was expected: next to its neighbours)
    files_in_order = [next(iter(groups[s.name].values())).file if groups.get(s.name) else None for s in specs]

    def expected_file(i: int) -> str:
        spec = specs[i]
        for key in (spec.param_name, spec.name):
            if key in index_file:
                return f"{index_file[key]} (per {INDEX_FILE}), which does not contain it"
        near = next((f for f in reversed(files_in_order[:i]) if f), None) or \
            next((f for f in files_in_order[i + 1:] if f), None)
        return f"{near} (where the tensors next to it are); no shard holds it" if near else "any shard"

    entries: list[_Entry] = []
    for i, spec in enumerate(specs):
        parts = groups.get(spec.name)
        if not parts:
            errors.append(f"missing tensor {spec.param_name}: expected in {expected_file(i)}")
            continue
        if spec.role in ("linear", "expert"):
            kind = _classify(spec, parts, block, errors)
            if kind is not None:
                entries.append(_Entry(spec, kind, parts))
            continue
        st = parts[""]
        ok = True
        if st.dtype not in _PLAIN_DTYPES[spec.role]:
            errors.append(f"wrong dtype for {st.name} in {st.file}: got {st.dtype}, expected "
                          f"{' or '.join(_PLAIN_DTYPES[spec.role])}")
            ok = False
        if st.shape != spec.shape:
            errors.append(f"wrong shape for {st.name} in {st.file}: expected {list(spec.shape)}, got {list(st.shape)}")
            ok = False
        if ok:
            entries.append(_Entry(spec, spec.role, parts))
    if errors:
        shown = errors[:_MAX_REPORTED]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise CheckpointFormatError(f"checkpoint does not match its config.json ({len(errors)} problem(s)):\n  "
                                    + "\n  ".join(shown) + more)
    return entries


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def _build(entry: _Entry, data: dict[str, torch.Tensor], block: tuple[int, int]) -> WeightLike:
    kind = entry.kind
    if kind in ("bf16", "fp32", "table", "dense"):
        return data["" if "" in data else "weight"]
    if kind == "fp8":
        scale = data.get("scale", data.get("weight_scale_inv"))
        return FP8BlockTensor(weight=data["weight"], scale=scale, block=block)
    if kind == "mxfp4":
        scale = data.get("scale", data.get("weight_scale_inv"))
        return MXFP4Tensor(packed=data["weight"].view(torch.uint8), scale=scale)
    # NVFP4. `input_scale` is read and deliberately dropped: it is ModelOpt's W4A4 activation calibration
    # (amax / (6 * 448)) for Blackwell's FP4 x FP4 tensor cores. On Hopper we run W4A16 (activations stay BF16),
    # and applying it there was observed to push activations out of range and produce NaN.
    return NVFP4Tensor(packed=data["weight"].view(torch.uint8), scale=data["weight_scale"],
                       scale_2=data["weight_scale_2"].reshape(()))


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", progress: bool = True) -> Checkpoint:
    """Validate then load every tensor of the checkpoint in `path` (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint path {path} is not a directory")
    cfg_file = path / "config.json"
    cfg = ModelConfig.from_file(cfg_file)
    try:
        raw_cfg = json.loads(cfg_file.read_text())
    except Exception:  # from_file already validated it
        raw_cfg = {}
    qc = raw_cfg.get("quantization_config")
    block = _check_quantization_config(qc, cfg_file)

    index, files = _shard_map(path)
    stored = _read_headers(path, files)
    entries = _validate(cfg, stored, index, block)

    by_raw: dict[str, tuple[_Entry, str]] = {}
    for e in entries:
        for suffix, st in e.parts.items():
            by_raw[st.name] = (e, suffix)

    tensors: dict[str, WeightLike] = {}
    formats: dict[str, str] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    from tqdm import tqdm
    bar = tqdm(total=len(by_raw), desc=f"loading {path.name}", unit="tensor", disable=not progress)
    try:
        for f in files:
            names = sorted(n for n, st in stored.items() if st.file == f and n in by_raw)
            if not names:
                continue
            try:
                with safe_open(str(path / f), framework="pt", device="cpu") as h:
                    for n in names:
                        entry, suffix = by_raw[n]
                        t = h.get_tensor(n)
                        expected = _DTYPES.get(stored[n].dtype)
                        if expected is not None and t.dtype != expected:  # defensive: header and data must agree
                            raise CheckpointFormatError(f"{n} in {f}: header says {stored[n].dtype}, read {t.dtype}")
                        if str(device) != "cpu":
                            t = t.to(device)
                        parts = pending.setdefault(entry.spec.name, {})
                        parts[suffix] = t
                        if len(parts) == len(entry.parts):
                            del pending[entry.spec.name]
                            tensors[entry.spec.param_name] = _build(entry, parts, block)
                            formats[entry.spec.param_name] = entry.kind
                        bar.update(1)
            except CheckpointFormatError:
                raise
            except Exception as e:
                raise CheckpointFormatError(f"shard {f} is truncated or corrupt (reading its data failed: {e})") from None
    finally:
        bar.close()

    tok = path / "tokenizer.json"
    ordered = {s.param_name: tensors[s.param_name] for s in model_specs(cfg)}
    return Checkpoint(config=cfg, path=path, tensors=ordered, tokenizer_path=tok if tok.is_file() else None,
                      quantization_config=qc, formats={k: formats[k] for k in ordered})


__all__ = ["Checkpoint", "load_checkpoint", "WeightLike"]
