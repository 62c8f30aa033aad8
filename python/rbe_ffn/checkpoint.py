"""Saving and loading modules with RBE layers as safetensors files, in compressed form.

The file holds ``module.state_dict()`` as it is (basis, coeffs, index, bias of every
RBELinear, plus any other state): no dense weight is ever built. Its safetensors metadata
key ``"rbe_ffn"`` holds JSON:

    {"format": 1,
     "layers": {"fc1": {"in_features": .., "out_features": .., "block_size": .., "k": .., "bias": true}, ...},
     "sha256": {"fc1.basis": "<hex digest of the tensor's bytes>", ...}}

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

from .modules import RBELinear, index_problem

METADATA_KEY = "rbe_ffn"
FORMAT_VERSION = 1
_LAYER_FIELDS = ("in_features", "out_features", "block_size", "k", "bias")


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


def save_safetensors(module: nn.Module, path, metadata: dict | None = None) -> None:
    """Write ``module.state_dict()`` to a safetensors file, with a record of every RBELinear
    (in_features, out_features, block_size, k, bias) and a SHA-256 of every tensor in the
    metadata. ``metadata``: extra str -> str entries (the key "rbe_ffn" is reserved)."""
    from safetensors.torch import save_file

    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
    if METADATA_KEY in extra:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for the RBE layer record")
    tensors = {}
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                            "safetensors stores tensors only")
        # a copy per tensor: safetensors refuses tensors that share storage, and needs them contiguous
        tensors[name] = t.detach().cpu().contiguous().clone()
    record = {"format": FORMAT_VERSION,
              "layers": {name: _layer_record(m) for name, m in _rbe_layers(module).items()},
              "sha256": {name: _sha256(t) for name, t in tensors.items()}}
    extra[METADATA_KEY] = json.dumps(record, sort_keys=True)
    path = os.fspath(path)
    _check_regular_file(path, "write", must_exist=False)
    save_file(tensors, path, metadata=extra)


def _read(path: str, module: nn.Module, expected: dict, strict: bool):
    """(SHA-256 sums from the metadata, {key: tensor}) for the keys of `expected` the file holds, checking shapes
    against the header before any tensor is read. Errors of the safetensors parser become
    ValueError; our own checks raise ValueError directly."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            sums = _check_metadata(f.metadata() or {}, module, strict)  # before shapes: clearer messages
            keys = list(f.keys())
            missing = sorted(set(expected) - set(keys))
            unexpected = sorted(set(keys) - set(expected))
            if strict and (missing or unexpected):
                parts = []
                if missing:
                    parts.append(f"missing keys {missing}")
                if unexpected:
                    parts.append(f"unexpected keys {unexpected}")
                raise _FileProblem("; ".join(parts) + " (strict=True)")
            tensors = {}
            for key in keys:
                if key not in expected:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(expected[key].shape)
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
    return sums, tensors


class _FileProblem(ValueError):
    pass


def _check_metadata(meta: dict, module: nn.Module, strict: bool) -> dict | None:
    """The SHA-256 sums of the parsed "rbe_ffn" record (None when there is no record), after
    checking the record against the module's RBE layers."""
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _FileProblem(f"metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise _FileProblem(f"metadata {METADATA_KEY!r}: unknown format (expected a JSON object with "
                           f"\"format\": {FORMAT_VERSION})")
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
    if strict:
        lacking = sorted(set(ours) - set(layers))
        if lacking:
            raise _FileProblem(f"metadata: the module's RBE layers {lacking} are not recorded in the file")
    return sums


def load_safetensors(module: nn.Module, path, strict: bool = True, *, check_finite: bool = True,
                     require_checksums: bool = True):
    """Load a file written by ``save_safetensors`` into ``module``, after checking every tensor:
    keys (all present, none extra, when ``strict``), shapes and dtypes equal to the module's,
    every RBELinear index valid (integer, in [0, b*b), strictly increasing per row), floating
    values finite (unless ``check_finite=False``), the RBE layer record of the metadata (when
    present), and the SHA-256 sum of every tensor loaded.

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
    expected = module.state_dict()
    index_keys = {_key(name, "index"): m.block_size for name, m in _rbe_layers(module).items()}
    try:
        sums, tensors = _read(path, module, expected, strict)
        unverified = []
        for key, t in tensors.items():
            want = expected[key]
            if t.dtype != want.dtype:
                raise _FileProblem(f"tensor {key!r}: dtype {t.dtype} in the file, {want.dtype} in the module")
            if sums is None or key not in sums:
                unverified.append(key)  # reported after the content checks, which name the actual problem
            elif _sha256(t) != sums[key]:
                raise _FileProblem(f"tensor {key!r}: SHA-256 differs from the one recorded in the metadata "
                                   "(corrupted data)")
            if key in index_keys:
                problem = index_problem(t, index_keys[key])
                if problem is not None:
                    raise _FileProblem(f"tensor {key!r}: {problem}")
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
    return module.load_state_dict(tensors, strict=strict)
