"""Saving and loading modules with RBE layers as safetensors files, in compressed form.

The file holds ``module.state_dict()`` as it is (basis, coeffs, index, bias of every
RBELinear, plus any other state): no dense weight is ever built. Its safetensors metadata
key ``"rbe_ffn"`` holds JSON:

    {"format": 1,
     "layers": {"fc1": {"in_features": .., "out_features": .., "block_size": .., "k": .., "bias": true}, ...},
     "sha256": {"fc1.basis": "<hex digest of the tensor's bytes>", ...}}

Format 2 (written only when one of these options is used; format 1 otherwise, so such files
stay readable by older versions) adds two optional fields to a layer's record:

- ``"index": "seeded"``: the layer stores ``<layer>.index_seed`` (int64 [version, seed, digest],
  see RBELinear) instead of ``<layer>.index``; loading regenerates the positions from the seed
  and refuses them unless their digest matches (another torch random generator, for instance);
- ``"values_dtype": "float16"`` (or ``"bfloat16"``, ``"float32"``): ``<layer>.coeffs`` is stored
  in that dtype (``save_safetensors(..., values_dtype=...)``) and cast to the layer's on load.

``load_safetensors`` checks everything before the module is touched, so a rejected file
leaves the module unchanged. Every problem with the file (truncated or garbled bytes,
wrong keys, shapes or dtypes, invalid index, non-finite values, metadata or checksum
mismatch, a checksum missing) is a ``ValueError`` naming the file and the tensor. A missing
file is the usual ``FileNotFoundError``, a directory ``IsADirectoryError``; a FIFO or a
device is refused (ValueError) on save and load instead of blocking.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import torch
from torch import nn

from .modules import RBELinear, check_values_dtype, index_problem
from .codec import index_dtype
from .storage import storage_state_dict

METADATA_KEY = "rbe_ffn"
FORMAT_VERSION = 2  # the newest this version reads and writes; 1 is written when nothing of 2 is used
_FORMATS = (1, 2)
_LAYER_FIELDS = ("in_features", "out_features", "block_size", "k", "bias")
_VALUES_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _rbe_layers(module: nn.Module) -> dict:
    return {name: m for name, m in module.named_modules() if isinstance(m, RBELinear)}


def _layer_record(m: RBELinear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "block_size": m.block_size, "k": m.k,
            "bias": m.bias is not None}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # raw bytes, any dtype
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _check_regular_file(path: str, action: str, must_exist: bool) -> None:
    """A path that exists must be a regular file (or a link to one): reading a FIFO blocks
    forever waiting for a writer, writing one blocks waiting for a reader, a directory gives
    the parser's "No such device", a device file is not a checkpoint. FileNotFoundError as
    usual when it must exist and does not."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if must_exist:
            raise
        return
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot {action} a safetensors file: the path is a directory, "
                                "not a file", path)
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{path}: cannot {action} a safetensors file: the path is {kind}, not a regular file")


def save_safetensors(module: nn.Module, path, metadata: dict | None = None, *,
                     values_dtype: torch.dtype | None = None) -> None:
    """Write ``module.state_dict()`` to a safetensors file, with a record of every RBELinear
    (in_features, out_features, block_size, k, bias) and a SHA-256 of every tensor in the
    metadata. ``metadata``: extra str -> str entries (the key "rbe_ffn" is reserved).

    Seeded layers (RBELinear.index_seed) store their seed instead of their index, after a full
    check that their positions still are the seed's. ``values_dtype`` (torch.float16,
    torch.bfloat16 or torch.float32) stores every RBELinear's ``coeffs`` in that dtype
    (rbe_ffn.storage_state_dict; values beyond its range are a ValueError)."""
    from safetensors.torch import save_file

    values_dtype = check_values_dtype(values_dtype)
    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
    if METADATA_KEY in extra:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for the RBE layer record")
    layers = _rbe_layers(module)
    for m in layers.values():
        m.check_index_seed()  # drops a seed whose positions were changed behind the version counter
    tensors = {}
    for name, t in storage_state_dict(module, values_dtype).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                            "safetensors stores tensors only")
        # a copy per tensor: safetensors refuses tensors that share storage, and needs them contiguous
        tensors[name] = t.detach().cpu().contiguous().clone()
    records = {}
    for name, m in layers.items():
        rec = records[name] = _layer_record(m)
        if _key(name, "index_seed") in tensors:
            rec["index"] = "seeded"
        coeffs = tensors.get(_key(name, "coeffs"))
        if values_dtype is not None and coeffs is not None and coeffs.dtype != m.coeffs.dtype:
            rec["values_dtype"] = str(values_dtype).removeprefix("torch.")
    fmt = 2 if any("index" in r or "values_dtype" in r for r in records.values()) else 1
    record = {"format": fmt, "layers": records, "sha256": {name: _sha256(t) for name, t in tensors.items()}}
    extra[METADATA_KEY] = json.dumps(record, sort_keys=True)
    path = os.fspath(path)
    _check_regular_file(path, "write", must_exist=False)
    save_file(tensors, path, metadata=extra)


def _read(path: str, module: nn.Module, specs: dict, pairs: dict, strict: bool):
    """(the parsed metadata record, {key: tensor}) for the keys of `specs` ({key: (shape, dtype)})
    the file holds, checking keys and shapes against the header before any tensor is read. `pairs`:
    the RBE layers' (index key, index_seed key), of which a file holds exactly one. Errors of the
    safetensors parser become ValueError; our own checks raise ValueError directly."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            record = _check_metadata(f.metadata() or {}, module, strict)  # before shapes: clearer messages
            keys = list(f.keys())
            for ki, ks in pairs.values():
                if ki in keys and ks in keys:
                    raise _FileProblem(f"the file holds both {ki!r} and {ks!r} (one of them, please)")
            seed_of = dict(pairs.values())  # index key -> index_seed key; either one will do
            missing = sorted(k for k in set(specs) - set(keys)
                             if k not in seed_of.values() and not (k in seed_of and seed_of[k] in keys))
            unexpected = sorted(set(keys) - set(specs))
            if strict and (missing or unexpected):
                parts = []
                if missing:
                    parts.append(f"missing keys {missing}")
                if unexpected:
                    parts.append(f"unexpected keys {unexpected}")
                raise _FileProblem("; ".join(parts) + " (strict=True)")
            tensors = {}
            for key in keys:
                if key not in specs:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = specs[key][0]
                if shape != want:
                    raise _FileProblem(f"tensor {key!r}: shape {list(shape)} in the file, {list(want)} in the module")
                tensors[key] = f.get_tensor(key)
    except _FileProblem:
        raise
    except (OSError, MemoryError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ValueError(f"{path}: cannot read the safetensors file ({type(e).__name__}: {e})") from e
    except Exception as e:  # the parser's SafetensorError and anything else it raises on garbled bytes
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from e
    return record, tensors


class _FileProblem(ValueError):
    pass


def _check_metadata(meta: dict, module: nn.Module, strict: bool) -> dict | None:
    """The parsed "rbe_ffn" record (None when there is none), after checking it against the
    module's RBE layers: {"layers": {...}, "sha256": {...}}."""
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _FileProblem(f"metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
    # `type(...) is int`: JSON true must not pass for format 1
    if not isinstance(record, dict) or type(record.get("format")) is not int or record["format"] not in _FORMATS:
        raise _FileProblem(f"metadata {METADATA_KEY!r}: unknown format (expected a JSON object with "
                           f"\"format\" one of {list(_FORMATS)})")
    layers, sums = record.get("layers", {}), record.get("sha256", {})
    if not isinstance(layers, dict) or not isinstance(sums, dict) or \
            not all(isinstance(v, str) for v in sums.values()):
        raise _FileProblem(f"metadata {METADATA_KEY!r}: \"layers\" and \"sha256\" must be JSON objects")
    ours = _rbe_layers(module)
    for name, rec in layers.items():
        if name not in ours:
            if strict:
                raise _FileProblem(f"metadata: the file has an RBE layer {name!r} that the module lacks")
            continue
        if not isinstance(rec, dict):
            raise _FileProblem(f"metadata for RBE layer {name!r} is not a JSON object")
        mine = _layer_record(ours[name])
        for field in _LAYER_FIELDS:
            # `is` for the types: JSON true must not pass for 1, nor 1.0 for 1
            if field not in rec or type(rec[field]) is not type(mine[field]) or rec[field] != mine[field]:
                raise _FileProblem(f"RBE layer {name!r}: {field} is {rec.get(field)!r} in the file, "
                                   f"{mine[field]!r} in the module")
        if rec.get("index", "stored") not in ("stored", "seeded"):
            raise _FileProblem(f"RBE layer {name!r}: index is {rec['index']!r} (expected \"seeded\" or none)")
        if "values_dtype" in rec and rec["values_dtype"] not in _VALUES_DTYPES:
            raise _FileProblem(f"RBE layer {name!r}: values_dtype is {rec['values_dtype']!r} (expected one of "
                               f"{sorted(_VALUES_DTYPES)})")
    if strict:
        lacking = sorted(set(ours) - set(layers))
        if lacking:
            raise _FileProblem(f"metadata: the module's RBE layers {lacking} are not recorded in the file")
    return {"layers": layers, "sha256": sums}


def load_safetensors(module: nn.Module, path, strict: bool = True, *, check_finite: bool = True,
                     require_checksums: bool = True):
    """Load a file written by ``save_safetensors`` into ``module``, after checking every tensor:
    keys (all present, none extra, when ``strict``), shapes and dtypes equal to the module's,
    every RBELinear index valid (integer, in [0, b*b), strictly increasing per row), floating
    values finite (unless ``check_finite=False``), the RBE layer record of the metadata (when
    present), and the SHA-256 sum of every tensor loaded.

    A layer's positions may come as ``index`` or as ``index_seed`` (a seeded layer's, whatever the
    module's layer holds now): the positions are then regenerated from the seed and must match the
    digest recorded with it; the layer then claims the seed. ``coeffs`` stored in another dtype
    (``values_dtype`` in the record) are cast to the layer's.

    A tensor without a recorded SHA-256 (a plain safetensors file of the module's state_dict,
    a file whose metadata record was removed, or a record that lacks some sums) is an error:
    its corruption could not be detected. ``require_checksums=False`` loads such tensors
    unverified (the sums that are recorded are still checked).

    Raises ValueError naming the file and the problem; the module is then left unchanged.
    A path that is missing is the usual FileNotFoundError, a directory IsADirectoryError, any
    other non-regular file (FIFO, device) a ValueError. Returns what
    ``module.load_state_dict`` returns."""
    path = os.fspath(path)
    _check_regular_file(path, "read", must_exist=True)
    layers = _rbe_layers(module)
    specs = {key: (tuple(t.shape), t.dtype) for key, t in module.state_dict().items()}
    pairs, index_keys, seed_keys, coeff_keys = {}, {}, {}, {}
    for name, m in layers.items():
        ki, ks = _key(name, "index"), _key(name, "index_seed")
        specs.pop(ki, None)
        specs.pop(ks, None)
        specs[ki] = (tuple(m.index.shape), index_dtype(m.block_size))
        specs[ks] = ((3,), torch.int64)
        pairs[name], index_keys[ki], seed_keys[ks], coeff_keys[_key(name, "coeffs")] = (ki, ks), m.block_size, m, name
    try:
        record, tensors = _read(path, module, specs, pairs, strict)
        sums = None if record is None else record["sha256"]
        recs = {} if record is None else record["layers"]
        for name, (ki, ks) in pairs.items():
            rec = recs.get(name)
            if isinstance(rec, dict):
                seeded = rec.get("index") == "seeded"
                if (seeded and ki in tensors) or (not seeded and ks in tensors):
                    raise _FileProblem(f"RBE layer {name!r}: the record says its index is "
                                       f"{'seeded' if seeded else 'stored'} but the file holds "
                                       f"{ki if seeded else ks!r}")
        unverified, positions = [], {}
        for key, t in tensors.items():
            want = specs[key][1]
            rec = recs.get(coeff_keys.get(key)) if key in coeff_keys else None
            if isinstance(rec, dict) and "values_dtype" in rec:
                want = _VALUES_DTYPES[rec["values_dtype"]]  # cast to the layer's dtype below
            if t.dtype != want:
                raise _FileProblem(f"tensor {key!r}: dtype {t.dtype} in the file, {want} in the module")
            if sums is None or key not in sums:
                unverified.append(key)  # reported after the content checks, which name the actual problem
            elif _sha256(t) != sums[key]:
                raise _FileProblem(f"tensor {key!r}: SHA-256 differs from the one recorded in the metadata "
                                   "(corrupted data)")
            if key in index_keys:
                problem = index_problem(t, index_keys[key])
                if problem is not None:
                    raise _FileProblem(f"tensor {key!r}: {problem}")
            if key in seed_keys:
                try:
                    positions[key.removesuffix("_seed")] = seed_keys[key].positions_from_seed_state(t)[0]
                except ValueError as e:
                    raise _FileProblem(f"tensor {key!r}: {e}") from None
            if check_finite and (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                raise _FileProblem(f"tensor {key!r}: non-finite value {t[tuple(bad)].item()} at {bad}")
        # Without a sum, a flipped bit in a coefficient loads silently (it stays a finite float).
        if unverified and require_checksums:
            if sums is None:
                why = (f"the file has no {METADATA_KEY!r} metadata record, so no SHA-256 sums to verify its "
                       "tensors (not written by rbe_ffn.save_safetensors, or the record was removed)")
            else:
                why = (f"the {METADATA_KEY!r} metadata record has no SHA-256 sum for tensor(s) {unverified} "
                       "(the checksum record is missing or incomplete)")
            raise _FileProblem(why + "; pass require_checksums=False to load them unverified")
    except _FileProblem as e:
        raise ValueError(f"{path}: {e}") from None
    for key, t in list(tensors.items()):
        if key in coeff_keys and t.dtype != specs[key][1]:
            tensors[key] = t.to(specs[key][1])
    tensors.update(positions)  # with their seed: load_state_dict checks the pair by digest only
    return module.load_state_dict(tensors, strict=strict)
