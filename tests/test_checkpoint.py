"""Checkpoints: save_safetensors / load_safetensors round trips in compressed form, and every
corrupted file is rejected with a ValueError (never a crash, a hang or a silent wrong load).

Allowed outcomes when loading an arbitrary (corrupted) file: ValueError, with the module left
unchanged; or a successful load whose tensors are all valid (right shapes and dtypes, finite,
valid index) and, when the file still carries our SHA-256 sums, bitwise equal to what was saved.
"""
import collections
import copy
import json
import random
import struct
import time

import pytest
import torch
from torch import nn

import rbe_ffn
from rbe_ffn.modules import index_problem

from conftest import join_safetensors, make_small_ffn, split_safetensors


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------- round trips
def test_round_trip_ffn(saved):
    m, path = saved
    other = make_small_ffn(seed=1)
    assert not states_equal(m, other)
    rbe_ffn.load_safetensors(other, path)
    assert states_equal(m, other)
    x = torch.randn(3, 7, 10)
    assert torch.equal(m(x), other(x))


def test_round_trip_sequential_float64(tmp_path):
    def seq(seed):
        g = torch.Generator().manual_seed(seed)
        return nn.Sequential(
            rbe_ffn.RBEFeedForward(16, 40, "relu", block_size=8, k=7, dtype=torch.float64, generator=g),
            nn.LayerNorm(16, dtype=torch.float64),
            rbe_ffn.RBEFeedForward(16, 24, "silu", bias=False, block_size=16, k=30, dtype=torch.float64,
                                   generator=g))
    a, b = seq(0), seq(1)
    path = tmp_path / "seq.safetensors"
    rbe_ffn.save_safetensors(a, path, metadata={"note": "two blocks"})
    rbe_ffn.load_safetensors(b, str(path))
    assert states_equal(a, b)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.equal(a(x), b(x))
    header, _ = split_safetensors(path.read_bytes())
    meta = header["__metadata__"]
    assert meta["note"] == "two blocks"
    layers = json.loads(meta["rbe_ffn"])["layers"]
    assert layers["2.fc2"] == {"in_features": 24, "out_features": 16, "block_size": 16, "k": 30, "bias": False}
    assert set(layers) == {"0.fc1", "0.fc2", "2.fc1", "2.fc2"}


def test_file_holds_no_dense_weight(tmp_path):
    m = make_small_ffn(k=20, block_size=16, d_model=64, d_ff=256)
    path = tmp_path / "ffn.safetensors"
    rbe_ffn.save_safetensors(m, path)
    header, _ = split_safetensors(path.read_bytes())
    dense = 64 * 256
    sizes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    assert set(sizes) == set(m.state_dict())
    for name, shape in sizes.items():
        numel = 1
        for s in shape:
            numel *= s
        assert numel < dense / 4, (name, shape)
    assert path.stat().st_size < dense * 4 / 2  # well under one dense float32 weight


def test_plain_file_without_metadata_loads_when_checksums_not_required(tmp_path):
    from safetensors.torch import save_file
    m = make_small_ffn()
    path = tmp_path / "plain.safetensors"
    save_file(m.state_dict(), str(path))
    other = make_small_ffn(seed=1)
    # no checksums to verify: refused unless the caller opts out explicitly
    with pytest.raises(ValueError, match="no 'rbe_ffn' metadata record.*require_checksums=False"):
        rbe_ffn.load_safetensors(other, path)
    assert states_equal(make_small_ffn(seed=1), other)
    rbe_ffn.load_safetensors(other, path, require_checksums=False)
    assert states_equal(m, other)


def test_non_strict(tmp_path):
    from safetensors.torch import save_file
    m = make_small_ffn()
    sd = dict(m.state_dict())
    del sd["fc2.coeffs"]
    sd["extra"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    other = make_small_ffn(seed=1)
    with pytest.raises(ValueError, match=r"missing keys \['fc2.coeffs'\]; unexpected keys \['extra'\]"):
        rbe_ffn.load_safetensors(other, path)
    res = rbe_ffn.load_safetensors(other, path, strict=False, require_checksums=False)
    assert res.missing_keys == ["fc2.coeffs"]
    assert torch.equal(other.fc1.coeffs, m.fc1.coeffs) and not torch.equal(other.fc2.coeffs, m.fc2.coeffs)


# ----------------------------------------------------------------- mismatched modules
@pytest.mark.parametrize("kw, msg", [({"k": 6}, "'fc1': k is 5 in the file, 6 in the module"),
                                     ({"block_size": 16}, "'fc1': block_size is 8 in the file, 16"),
                                     ({"d_ff": 36}, "'fc1': out_features is 37 in the file, 36")])
def test_other_sizes_rejected(saved, kw, msg):
    _, path = saved
    other = make_small_ffn(**kw)
    before = copy.deepcopy(other)
    with pytest.raises(ValueError, match=msg):
        rbe_ffn.load_safetensors(other, path)
    assert states_equal(before, other)


def test_other_dtype_rejected(saved):
    _, path = saved
    other = make_small_ffn().double()
    with pytest.raises(ValueError, match=r"'fc1.basis': dtype torch.float32 in the file, torch.float64"):
        rbe_ffn.load_safetensors(other, path)


def test_reserved_metadata_key(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        rbe_ffn.save_safetensors(make_small_ffn(), tmp_path / "x.safetensors", metadata={"rbe_ffn": "x"})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        rbe_ffn.load_safetensors(make_small_ffn(), tmp_path / "nope.safetensors")


# ----------------------------------------------------------------- corrupted files
def write_state(tmp_path, sd, with_metadata=False, m=None):
    """A file of `sd`; with_metadata: our record (and sums) computed from module `m`."""
    from safetensors.torch import save_file
    path = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return path


def corrupt(key, fn):
    sd = {k: v.clone() for k, v in make_small_ffn().state_dict().items()}
    sd[key] = fn(sd[key])
    return sd


def _set(t, pos, v):
    t[pos] = v
    return t


CORRUPTIONS = {
    "index_out_of_range": (lambda: corrupt("fc1.index", lambda t: _set(t, (3, 4), 64)),
                           r"'fc1.index': value 64 at \[3, 4\] is outside \[0, 64\)"),
    "index_negative": (lambda: corrupt("fc2.index", lambda t: _set(t, (0, 0), -1)), r"'fc2.index': value -1"),
    "index_duplicate": (lambda: corrupt("fc1.index", lambda t: _set(t, (2, 1), t[2, 0])),
                        r"'fc1.index': duplicate positions in row 2"),
    "index_unsorted": (lambda: corrupt("fc1.index", lambda t: t.flip(1)), r"'fc1.index': unsorted positions in row 0"),
    "index_wrong_dtype": (lambda: corrupt("fc1.index", lambda t: t.int()),
                          r"'fc1.index': dtype torch.int32 in the file, torch.int16"),
    "index_float": (lambda: corrupt("fc1.index", lambda t: t.float()), r"'fc1.index': dtype torch.float32"),
    "coeffs_wrong_dtype": (lambda: corrupt("fc2.coeffs", lambda t: t.half()), r"'fc2.coeffs': dtype torch.float16"),
    "coeffs_wrong_shape": (lambda: corrupt("fc2.coeffs", lambda t: t[:, :4]),
                           r"'fc2.coeffs': shape \[10, 4\] in the file, \[10, 5\]"),
    "bias_wrong_shape": (lambda: corrupt("fc1.bias", lambda t: t.reshape(1, 37)), r"'fc1.bias': shape \[1, 37\]"),
    "coeffs_nan": (lambda: corrupt("fc1.coeffs", lambda t: _set(t, (1, 2), float("nan"))),
                   r"'fc1.coeffs': non-finite value nan at \[1, 2\]"),
    "basis_inf": (lambda: corrupt("fc2.basis", lambda t: _set(t, (0, 7), float("-inf"))), r"'fc2.basis': non-finite"),
    "missing_key": (lambda: {k: v for k, v in make_small_ffn().state_dict().items() if k != "fc1.index"},
                    r"missing keys \['fc1.index'\]"),
    "extra_key": (lambda: {**make_small_ffn().state_dict(), "fc3.coeffs": torch.zeros(2)}, r"unexpected keys \['fc3.coeffs'\]"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_state_rejected(tmp_path, name):
    build, msg = CORRUPTIONS[name]
    path = write_state(tmp_path, build())
    m = make_small_ffn(seed=1)
    before = copy.deepcopy(m)
    with pytest.raises(ValueError, match=msg) as e:
        rbe_ffn.load_safetensors(m, path)
    assert str(path) in str(e.value)
    assert states_equal(before, m)  # nothing was loaded


def test_truncated_and_garbage(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for blob in (data[:-1], data[:len(data) // 2], data[:20], data[:8], data[:3], b"",
                 b"\x00" * 64, bytes(random.Random(0).randrange(256) for _ in range(500)),
                 b"not a safetensors file at all, just text\n" * 10):
        bad.write_bytes(blob)
        m = make_small_ffn(seed=1)
        with pytest.raises(ValueError, match="not a valid safetensors file") as e:
            rbe_ffn.load_safetensors(m, bad)
        assert str(bad) in str(e.value)
        assert states_equal(make_small_ffn(seed=1), m)


def test_data_flip_caught_by_checksum(saved, tmp_path):
    _, path = saved
    header, body = split_safetensors(path.read_bytes())
    off = header["fc1.coeffs"]["data_offsets"][0]
    body = bytearray(body)
    body[off] ^= 1  # a tiny change in a coefficient: still a valid finite float
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(join_safetensors(header, bytes(body)))
    with pytest.raises(ValueError, match="'fc1.coeffs': SHA-256 differs"):
        rbe_ffn.load_safetensors(make_small_ffn(seed=1), bad)


def test_bad_metadata(saved, tmp_path):
    _, path = saved
    header, body = split_safetensors(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    for value, msg in (("{not json", "not valid JSON"), ("[1, 2]", "unknown format"),
                       (json.dumps({"format": 1, "layers": {"fc1": {"k": True}}}), "'fc1': in_features is None"),
                       (json.dumps({"format": 1, "layers": {}, "sha256": {}}), "not recorded in the file")):
        h = copy.deepcopy(header)
        h["__metadata__"]["rbe_ffn"] = value
        bad.write_bytes(join_safetensors(h, body))
        with pytest.raises(ValueError, match=msg):
            rbe_ffn.load_safetensors(make_small_ffn(seed=1), bad)


# ----------------------------------------------------------------- plain load_state_dict checks the index
@pytest.mark.parametrize("name", ["index_out_of_range", "index_negative", "index_duplicate", "index_unsorted"])
def test_load_state_dict_checks_index(name):
    sd = CORRUPTIONS[name][0]()
    m = make_small_ffn(seed=1)
    before = copy.deepcopy(m)
    key = "fc1.index" if "fc1.index" in CORRUPTIONS[name][1] else "fc2.index"
    with pytest.raises(RuntimeError, match=key + ": (value|duplicate|unsorted)"):
        m.load_state_dict(sd)
    layer = m.fc1 if key == "fc1.index" else m.fc2
    blayer = before.fc1 if key == "fc1.index" else before.fc2
    assert states_equal(layer, blayer)  # the layer with the bad index took nothing


def test_load_state_dict_float_index_rejected():
    sd = dict(make_small_ffn().state_dict())
    sd["fc1.index"] = sd["fc1.index"].float() + 0.5
    with pytest.raises(RuntimeError, match="fc1.index: dtype torch.float32 is not an integer dtype"):
        make_small_ffn(seed=1).load_state_dict(sd)


def test_load_state_dict_valid_index_of_other_int_dtype():
    # unchanged behaviour: a valid index of another integer dtype is copied (exactly) as before
    a = make_small_ffn()
    sd = dict(a.state_dict())
    sd["fc1.index"] = sd["fc1.index"].long()
    b = make_small_ffn(seed=1)
    b.load_state_dict(sd)
    assert states_equal(a, b)


# ----------------------------------------------------------------- fuzz
def _mutate(rng: random.Random, data: bytes, header: dict, body: bytes):
    """(kind, bytes) of one random corruption of a valid file."""
    kind = rng.choice(["flip", "flip_header", "truncate", "splice", "shape", "dtype", "offsets", "length",
                       "drop_meta_flip_data", "drop_meta_shape", "meta_edit", "swap_offsets"])
    h = copy.deepcopy(header)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "flip_header":
        b = bytearray(data)
        n = struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8 + n)] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "splice":
        i = rng.randrange(len(data))
        return kind, data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[i:]
    if kind == "length":
        n = rng.choice([0, 1, 2**63, 2**64 - 1, len(data), rng.randrange(2**32)])
        return kind, struct.pack("<Q", n) + data[8:]
    if kind in ("shape", "drop_meta_shape"):
        shape = h[name]["shape"]
        choice = rng.randrange(5)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2**31, 2**62, 2**64 - 1, shape[0] * 2])
        elif choice == 1:
            shape.append(rng.choice([1, 2]))
        elif choice == 2 and shape:
            shape.pop()
        elif choice == 3:
            shape.reverse()
        else:
            h[name]["shape"] = [int(__import__("math").prod(shape))] if shape else [1]
        if kind == "drop_meta_shape":
            h.pop("__metadata__", None)
        return kind, join_safetensors(h, body)
    if kind == "dtype":
        h[name]["dtype"] = rng.choice(["F32", "F64", "F16", "BF16", "I16", "I32", "I64", "U8", "I8", "BOOL", "U16",
                                       "F8_E4M3", "X99", "", 7])
        return kind, join_safetensors(h, body)
    if kind == "offsets":
        off = h[name]["data_offsets"]
        off[rng.randrange(2)] = rng.choice([0, -1, 1, len(body), len(body) + 1, 2**64 - 1, off[0] + 2, off[1] - 2])
        return kind, join_safetensors(h, body)
    if kind == "swap_offsets":
        other = rng.choice(names)
        h[name]["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], h[name]["data_offsets"]
        if rng.random() < 0.5:
            h.pop("__metadata__", None)
        return kind, join_safetensors(h, body)
    if kind == "meta_edit":
        rec = json.loads(h["__metadata__"]["rbe_ffn"])
        layer = rng.choice(list(rec["layers"]))
        field = rng.choice(["in_features", "out_features", "block_size", "k", "bias"])
        rec["layers"][layer][field] = rng.choice([0, 1, 5, 8, 37, -1, True, None, "8", 8.0])
        h["__metadata__"]["rbe_ffn"] = json.dumps(rec)
        return kind, join_safetensors(h, body)
    # drop_meta_flip_data: no checksums left, so the content checks (index, finiteness) must catch it
    h.pop("__metadata__", None)
    b = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return kind, join_safetensors(h, bytes(b))


def _assert_valid(m: rbe_ffn.RBEFeedForward, template):
    for name, t in m.state_dict().items():
        ref = template[name]
        assert t.shape == ref.shape and t.dtype == ref.dtype, name
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    for lin in (m.fc1, m.fc2):
        assert index_problem(lin.index, lin.block_size) is None


def test_fuzz(saved, tmp_path, capsys):
    original, path = saved
    data = path.read_bytes()
    header, body = split_safetensors(data)
    template = original.state_dict()
    target = make_small_ffn(seed=1)
    pristine = copy.deepcopy(target.state_dict())
    bad = tmp_path / "fuzz.safetensors"
    rng = random.Random(1234)
    outcomes = collections.Counter()
    t0 = time.perf_counter()
    n = 2000
    for case in range(n):
        kind, blob = _mutate(rng, data, header, body)
        bad.write_bytes(blob)
        try:
            rbe_ffn.load_safetensors(target, bad)
        except ValueError as e:
            assert str(bad) in str(e), (case, kind, e)
            outcomes[f"{kind}: ValueError"] += 1
            # a rejected file leaves the module unchanged
            for k, v in target.state_dict().items():
                assert torch.equal(v, pristine[k]), (case, kind, k)
            continue
        except Exception as e:  # anything else is a bug in the validation
            raise AssertionError(f"case {case} ({kind}): unexpected {type(e).__name__}: {e}") from e
        _assert_valid(target, template)
        try:
            has_sums = "rbe_ffn" in (split_safetensors(blob)[0].get("__metadata__") or {})
        except Exception:
            has_sums = False
        if has_sums:  # sums recorded: a successful load must be exactly what was saved
            assert states_equal(target, original), (case, kind)
        outcomes[f"{kind}: loaded" + (" (== original)" if has_sums else "")] += 1
        target.load_state_dict(pristine)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nfuzz: {n} cases in {elapsed:.1f} s")
        for k in sorted(outcomes):
            print(f"  {k}: {outcomes[k]}")
    assert sum(outcomes.values()) == n
    assert elapsed < 60
