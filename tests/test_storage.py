"""Cheaper storage of RBE layers: seeded positions (the index stored as a 24-byte seed), coefficient
values stored as float16 / bfloat16, and the bytes each option costs (storage_report).

The seeded positions must be the same on every machine and device: the pinned outputs below were
produced by generator version 1 (torch's CPU mt19937); if torch ever draws differently, they fail
here first (and loads of seeded checkpoints are refused by their digest, tested below).
"""
import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rbe_ffn
from rbe_ffn.modules import INDEX_SEED_VERSION, SEED_STATE_BYTES, index_problem, positions_digest, seeded_positions

from conftest import join_safetensors, make_small_ffn, seeded, split_safetensors
from distributed_helpers import WORLD, global_batches, init_process_group, run_world, train


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------- the generator
# (nblk, b, k, seed) -> positions: the three ways random_positions draws (k distinct by redraws,
# the complement by redraws, the first positions of a stable argsort of random keys)
PINNED = {
    (3, 4, 3, 1234): [[3, 6, 15], [4, 5, 12], [8, 9, 15]],
    (2, 4, 8, 7): [[1, 4, 5, 6, 8, 12, 13, 15], [1, 3, 5, 8, 9, 11, 13, 15]],
    (2, 4, 13, 99): [[0, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15], [0, 1, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]],
    (2, 8, 5, 0): [[0, 3, 44, 47, 53], [3, 9, 19, 39, 59]],
}


@pytest.mark.parametrize("args", list(PINNED))
def test_seeded_positions_pinned(args):
    got = seeded_positions(*args)
    assert got.dtype == torch.int16 and got.device.type == "cpu"
    assert got.tolist() == PINNED[args]


# larger cases, as digests: several chunks of _chunk_blocks blocks each (the chunking is part of what a
# seed gives), b = 256 (int32 positions), many duplicates redrawn
PINNED_DIGESTS = {
    (150, 64, 1000, 3): 1731771923872902373,
    (8, 256, 30000, 1): -7106033802208022132,
    (40, 256, 60000, 2): -7107529360817422902,
}


@pytest.mark.parametrize("args", list(PINNED_DIGESTS))
def test_seeded_positions_pinned_digests(args):
    got = seeded_positions(*args)
    assert index_problem(got, args[1]) is None
    assert positions_digest(got) == PINNED_DIGESTS[args]


def test_seeded_positions_independent_of_global_state_and_threads():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = seeded_positions(300, 16, 100, 5)
        torch.manual_seed(1)
        torch.set_num_threads(2)
        b = seeded_positions(300, 16, 100, 5)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
    assert index_problem(a, 16) is None
    assert not torch.equal(a, seeded_positions(300, 16, 100, 6))
    torch.set_rng_state(state)
    seeded_positions(10, 8, 5, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not used


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (2**63, ValueError), (True, TypeError), (1.0, TypeError),
                                      ("3", TypeError), (torch.tensor(3), TypeError)])
def test_bad_seed(bad, err):
    with pytest.raises(err, match="index_seed"):
        rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=bad)
    with pytest.raises(err, match="index_seed"):
        rbe_ffn.RBELinear(10, 12, block_size=8, k=5).use_seeded_index(bad)


def test_ffn_seed_limit():
    with pytest.raises(ValueError, match=r"index_seed must be in \[0, 4611686018427387904\)"):
        make_small_ffn(index_seed=2**62)


# ----------------------------------------------------------------- seeded layers
def test_seeded_layer(device):
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11, device=device, generator=seeded(0))
    assert lin.index_seed == 11
    assert torch.equal(lin.index.cpu(), seeded_positions(4, 8, 5, 11))  # drawn on the CPU for every device
    sd = lin.state_dict()
    assert list(sd) == ["basis", "coeffs", "bias", "index_seed"]
    assert sd["index_seed"].tolist() == [INDEX_SEED_VERSION, 11, positions_digest(seeded_positions(4, 8, 5, 11))]
    # values still come from `generator`, positions from the seed only
    other = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11, device=device, generator=seeded(1))
    assert torch.equal(other.index, lin.index) and not torch.equal(other.coeffs, lin.coeffs)
    plain = rbe_ffn.RBELinear(10, 12, block_size=8, k=5)
    plain.load_state_dict(sd)
    assert plain.index_seed == 11 and torch.equal(plain.index, lin.index.cpu())
    x = torch.randn(3, 10)
    assert torch.equal(plain(x), lin.cpu()(x))


def test_ffn_layer_seeds():
    a, b = make_small_ffn(index_seed=0), make_small_ffn(index_seed=1)
    assert (a.fc1.index_seed, a.fc2.index_seed, b.fc1.index_seed, b.fc2.index_seed) == (0, 1, 2, 3)
    m = make_small_ffn()
    m.use_seeded_index(1)
    assert (m.fc1.index_seed, m.fc2.index_seed) == (2, 3)
    assert torch.equal(m.fc1.index, b.fc1.index) and torch.equal(m.fc2.index, b.fc2.index)


def test_use_seeded_index_keeps_values():
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, generator=seeded(0))
    assert lin.index_seed is None and "index" in lin.state_dict()
    coeffs = lin.coeffs.detach().clone()
    lin.use_seeded_index(4)
    assert lin.index_seed == 4 and torch.equal(lin.index, seeded_positions(4, 8, 5, 4))
    assert torch.equal(lin.coeffs, coeffs)
    assert "index_seed" in lin.state_dict() and "index" not in lin.state_dict()


def test_reset_parameters_keeps_seeded_positions():
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=9)
    lin.reset_parameters(seeded(3))
    assert lin.index_seed == 9 and torch.equal(lin.index, seeded_positions(4, 8, 5, 9))


# ----------------------------------------------------------------- the seed is dropped when the positions change
def test_in_place_write_drops_seed():
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    before = lin.index.clone()
    lin.index[0, 0] = lin.index[0, 0]  # a write of the same value: the positions still are the seed's
    assert lin.index_seed == 11
    lin.index[0] = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int16)
    assert lin.index_seed is None
    sd = lin.state_dict()
    assert "index_seed" not in sd and torch.equal(sd["index"][0], torch.arange(5, dtype=torch.int16))
    lin.index = before  # the seed's positions again: the seed stays dropped (use_seeded_index sets one)
    assert lin.index_seed is None and "index" in lin.state_dict()


def test_writes_inside_inference_mode_drop_seed():
    """Inside torch.inference_mode the index view still carries the buffer's version counter, so a
    write through it (or the setter) is seen: the seed is dropped, the positions are saved."""
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    with torch.inference_mode():
        assert not lin.index.is_inference()
        lin.index[0] = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int16)
    assert lin.index_seed is None and "index" in lin.state_dict()
    other = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, generator=seeded(3))
    lin2 = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    with torch.inference_mode():
        lin2.index = other.index
    assert lin2.index_seed is None and torch.equal(lin2.state_dict()["index"], other.index)


def test_setter_and_explicit_load_drop_seed():
    a = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    b = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, generator=seeded(2))  # explicit positions
    a.load_state_dict(b.state_dict())
    assert a.index_seed is None and torch.equal(a.index, b.index)
    c = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    c.index = b.index
    assert c.index_seed is None
    # an explicit index equal to the seed's positions: the layer still is seeded
    d = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    d.load_state_dict({**b.state_dict(), "index": seeded_positions(4, 8, 5, 11).int()})
    assert d.index_seed == 11


def test_write_behind_version_counter_caught_by_full_check(tmp_path):
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11)
    version = lin.index_bytes._version
    lin.index.data[0].copy_(torch.arange(5, dtype=torch.int16))  # .data: a write the version counter misses
    assert lin.index_bytes._version == version and lin.index[0].tolist() == [0, 1, 2, 3, 4]
    assert lin.index_seed == 11  # so the cheap check misses it (documented)
    path = tmp_path / "lin.safetensors"
    rbe_ffn.save_safetensors(lin, path)  # a full check first: the file gets the explicit index
    assert lin.index_seed is None and lin.check_index_seed() is None
    other = rbe_ffn.RBELinear(10, 12, block_size=8, k=5)
    rbe_ffn.load_safetensors(other, path)
    assert torch.equal(other.index, lin.index)


def test_copies_and_moves_keep_seed():
    m = make_small_ffn(index_seed=5)
    assert copy.deepcopy(m).fc1.index_seed == 10
    m.double()
    assert m.fc1.index_seed == 10 and m.fc1.index.dtype == torch.int16
    with torch.inference_mode():
        inf = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=3)  # no version counter: hashed each time
    assert inf.index_seed == 3 and "index_seed" in inf.state_dict()


def test_meta_then_materialize():
    m = rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5, index_seed=5, device="meta")
    assert m.fc1.index_seed == 10
    sd_meta = m.state_dict()  # the digest of the positions the seed will give
    ref = make_small_ffn(index_seed=5)
    assert torch.equal(sd_meta["fc1.index_seed"], ref.state_dict()["fc1.index_seed"])
    m.to_empty(device="cpu")
    m.fc1.reset_parameters()
    m.fc2.reset_parameters()
    assert torch.equal(m.fc1.index, ref.fc1.index) and m.fc2.index_seed == 11
    # to_empty without re-init: the uninitialized positions are not the seed's
    n = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=5, device="meta").to_empty(device="cpu")
    n.index_bytes.fill_(255)
    assert n.index_seed is None
    # assign=True into a meta module from a seeded state_dict
    a = rbe_ffn.RBEFeedForward(10, 37, block_size=8, k=5, device="meta")
    a.load_state_dict(ref.state_dict(), assign=True)
    assert a.fc1.index_seed == 10 and torch.equal(a.fc1.index, ref.fc1.index)
    x = torch.randn(2, 10)
    assert torch.equal(a(x), ref(x))


# ----------------------------------------------------------------- bad seed states are refused
def _seed_sd(**change):
    sd = dict(rbe_ffn.RBELinear(10, 12, block_size=8, k=5, index_seed=11).state_dict())
    for i, v in change.items():
        sd["index_seed"] = sd["index_seed"].clone()
        sd["index_seed"][int(i[1:])] = v
    return sd


@pytest.mark.parametrize("sd, msg", [
    (lambda: _seed_sd(i0=2), "generator version 2 is not known"),
    (lambda: _seed_sd(i1=-5), "seed -5 is negative"),
    (lambda: _seed_sd(i2=12345), "do not match the digest"),
    (lambda: _seed_sd(i1=12), "do not match the digest"),  # another seed, same digest
    (lambda: {**_seed_sd(), "index_seed": torch.tensor([1, 11], dtype=torch.int64)}, r"int64 tensor \[3\]"),
    (lambda: {**_seed_sd(), "index_seed": torch.tensor([1., 11., 0.])}, r"int64 tensor \[3\]"),
    (lambda: {**_seed_sd(), "index": seeded_positions(4, 8, 5, 12)}, "index given with it does not match"),
])
def test_bad_seed_state_rejected(sd, msg):
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5, generator=seeded(3))
    before = copy.deepcopy(lin)
    with pytest.raises(RuntimeError, match="index_seed: .*" + msg):
        lin.load_state_dict(sd())
    assert states_equal(before, lin) and lin.index_seed is None


def test_seed_and_index_together():
    sd = _seed_sd()
    lin = rbe_ffn.RBELinear(10, 12, block_size=8, k=5)
    lin.load_state_dict({**sd, "index": seeded_positions(4, 8, 5, 11)})
    assert lin.index_seed == 11
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"index\""):
        lin.load_state_dict({k: v for k, v in sd.items() if k != "index_seed"})


# ----------------------------------------------------------------- safetensors
def _header(path):
    return split_safetensors(path.read_bytes())[0]


def test_safetensors_seeded_round_trip(tmp_path):
    a, plain = make_small_ffn(index_seed=3), make_small_ffn()
    pa, pp = tmp_path / "seeded.safetensors", tmp_path / "plain.safetensors"
    rbe_ffn.save_safetensors(a, pa)
    rbe_ffn.save_safetensors(plain, pp)
    h = _header(pa)
    assert "fc1.index_seed" in h and "fc1.index" not in h
    rec = json.loads(h["__metadata__"]["rbe_ffn"])
    assert rec["format"] == 2 and rec["layers"]["fc1"]["index"] == "seeded"
    assert json.loads(_header(pp)["__metadata__"]["rbe_ffn"])["format"] == 1  # nothing new used: format 1
    assert pa.stat().st_size < pp.stat().st_size
    b = make_small_ffn(seed=1)  # explicit positions: takes the seed
    rbe_ffn.load_safetensors(b, pa)
    assert states_equal(a, b) and b.fc2.index_seed == 7
    c = make_small_ffn(seed=1, index_seed=9)  # seeded otherwise: takes the explicit index, drops its seed
    rbe_ffn.load_safetensors(c, pp)
    assert states_equal(plain, c) and c.fc1.index_seed is None


def _rewrite(path, out, edit):
    header, body = split_safetensors(path.read_bytes())
    edit(header)
    out.write_bytes(join_safetensors(header, body))
    return out


def test_safetensors_seed_digest_mismatch(tmp_path):
    from safetensors.torch import save_file
    a = make_small_ffn(index_seed=3)
    sd = {k: v.contiguous() for k, v in a.state_dict().items()}
    sd["fc1.index_seed"] = sd["fc1.index_seed"].clone()
    sd["fc1.index_seed"][2] += 1  # as another torch's generator would look: other positions
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    m = make_small_ffn(seed=1)
    before = copy.deepcopy(m)
    with pytest.raises(ValueError, match="'fc1.index_seed': the positions generated from seed 6 do not match"):
        rbe_ffn.load_safetensors(m, path, require_checksums=False)
    assert states_equal(before, m)


def test_safetensors_record_and_keys_must_agree(tmp_path):
    a, plain = make_small_ffn(index_seed=3), make_small_ffn()
    pa, pp = tmp_path / "seeded.safetensors", tmp_path / "plain.safetensors"
    rbe_ffn.save_safetensors(a, pa)
    rbe_ffn.save_safetensors(plain, pp)

    def claim_seeded(h):
        rec = json.loads(h["__metadata__"]["rbe_ffn"])
        rec["layers"]["fc1"]["index"] = "seeded"
        h["__metadata__"]["rbe_ffn"] = json.dumps(rec)
    bad = _rewrite(pp, tmp_path / "bad.safetensors", claim_seeded)
    with pytest.raises(ValueError, match="'fc1': the record says its index is seeded but the file holds 'fc1.index'"):
        rbe_ffn.load_safetensors(make_small_ffn(seed=1), bad)

    def unknown(h):
        rec = json.loads(h["__metadata__"]["rbe_ffn"])
        rec["layers"]["fc1"]["index"] = "hashed"
        h["__metadata__"]["rbe_ffn"] = json.dumps(rec)
    with pytest.raises(ValueError, match="index is 'hashed'"):
        rbe_ffn.load_safetensors(make_small_ffn(seed=1), _rewrite(pa, tmp_path / "bad2.safetensors", unknown))

    from safetensors.torch import save_file
    both = {k: v.contiguous() for k, v in a.state_dict().items()}
    both["fc1.index"] = a.fc1.index.clone()
    save_file(both, str(tmp_path / "both.safetensors"))
    with pytest.raises(ValueError, match="holds both 'fc1.index' and 'fc1.index_seed'"):
        rbe_ffn.load_safetensors(make_small_ffn(seed=1), tmp_path / "both.safetensors", require_checksums=False)
    neither = {k: v.contiguous() for k, v in a.state_dict().items() if k != "fc1.index_seed"}
    save_file(neither, str(tmp_path / "neither.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['fc1.index'\]"):
        rbe_ffn.load_safetensors(make_small_ffn(seed=1), tmp_path / "neither.safetensors", require_checksums=False)


# ----------------------------------------------------------------- half-width values
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safetensors_values_dtype(tmp_path, dtype):
    a = make_small_ffn(index_seed=2)
    path = tmp_path / "half.safetensors"
    rbe_ffn.save_safetensors(a, path, values_dtype=dtype)
    h = _header(path)
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert h["fc1.coeffs"]["dtype"] == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert h["fc1.basis"]["dtype"] == "F32" and h["fc1.bias"]["dtype"] == "F32"  # only the coefficients
    assert json.loads(h["__metadata__"]["rbe_ffn"])["layers"]["fc2"]["values_dtype"] == name
    b = make_small_ffn(seed=1)
    rbe_ffn.load_safetensors(b, path)
    assert b.fc1.coeffs.dtype == torch.float32
    for la, lb in ((a.fc1, b.fc1), (a.fc2, b.fc2)):
        assert torch.equal(lb.coeffs, la.coeffs.detach().to(dtype).float())  # exactly the rounded values
        assert not torch.equal(lb.coeffs, la.coeffs)
        assert torch.equal(lb.basis, la.basis) and torch.equal(lb.index, la.index)
    # the tensor data: the coefficients take half the bytes, nothing else changes
    full = tmp_path / "full.safetensors"
    rbe_ffn.save_safetensors(a, full)

    def data_bytes(p):
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(p).items() if k != "__metadata__")
    coeff_bytes = sum(lin.coeffs.numel() for lin in (a.fc1, a.fc2)) * 2
    assert data_bytes(full) - data_bytes(path) == coeff_bytes


def test_values_dtype_error_is_small():
    # relative output error of storing the coefficients in half precision (768/3072 in docs/DESIGN.md)
    g = seeded(0)
    lin = rbe_ffn.RBELinear(256, 512, block_size=32, k=100, generator=g)
    with torch.no_grad():
        lin.basis.normal_(0, 1 / (3 * 256) ** 0.5, generator=g)
    x = torch.randn(64, 256, generator=g)
    y = lin(x)
    errs = {}
    for dt in (torch.float16, torch.bfloat16):
        q = copy.deepcopy(lin)
        q.load_state_dict(rbe_ffn.storage_state_dict(lin, dt))
        errs[dt] = ((q(x) - y).norm() / y.norm()).item()
    assert 1e-5 < errs[torch.float16] < 3e-4
    assert 1e-4 < errs[torch.bfloat16] < 3e-3


def test_values_overflow_is_an_error(tmp_path):
    a = make_small_ffn()
    with torch.no_grad():
        a.fc2.coeffs[3, 1] = 7e4  # beyond float16's 65504
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"fc2.coeffs: values up to 70000 do not fit in torch.float16 .*65504"):
        rbe_ffn.save_safetensors(a, path, values_dtype=torch.float16)
    assert not path.exists()
    with pytest.raises(ValueError, match="do not fit in torch.float16"):
        rbe_ffn.storage_state_dict(a, torch.float16)
    rbe_ffn.save_safetensors(a, path, values_dtype=torch.bfloat16)  # float32's range
    b = make_small_ffn(seed=1)
    rbe_ffn.load_safetensors(b, path)
    assert b.fc2.coeffs[3, 1].item() == 70144.0  # 7e4 rounded to bfloat16


@pytest.mark.parametrize("bad, err", [(torch.float64, ValueError), (torch.int8, ValueError), ("float16", TypeError)])
def test_bad_values_dtype(tmp_path, bad, err):
    with pytest.raises(err, match="values_dtype must be"):
        rbe_ffn.save_safetensors(make_small_ffn(), tmp_path / "x.safetensors", values_dtype=bad)
    with pytest.raises(err, match="values_dtype must be"):
        rbe_ffn.storage_report(make_small_ffn(), values_dtype=bad)


def test_storage_state_dict_torch_save(tmp_path):
    a = make_small_ffn(index_seed=4)
    sd = rbe_ffn.storage_state_dict(a, torch.float16)
    assert sd["fc1.coeffs"].dtype == torch.float16 and sd["fc1.basis"].dtype == torch.float32
    torch.save(sd, tmp_path / "x.pt")
    b = make_small_ffn(seed=1)
    b.load_state_dict(torch.load(tmp_path / "x.pt"))
    assert b.fc1.coeffs.dtype == torch.float32 and b.fc1.index_seed == 8
    assert torch.equal(b.fc2.coeffs, a.fc2.coeffs.detach().half().float())


# ----------------------------------------------------------------- bytes
def test_storage_bytes_768_3072():
    m = rbe_ffn.RBEFeedForward(768, 3072, block_size=64, k=300, device="meta")
    blocks = 2 * 12 * 48
    dense32 = 2 * 768 * 3072 * 4
    cases = [("stored", None, 8 * 4 + 300 * 4 + 300 * 2, dense32),
             ("seeded", None, 8 * 4 + 300 * 4, dense32),
             ("stored", torch.float16, 8 * 4 + 300 * 2 + 300 * 2, dense32 // 2),
             ("seeded", torch.bfloat16, 8 * 4 + 300 * 2, dense32 // 2)]
    for index, vd, per_block, dense in cases:
        r = rbe_ffn.storage_report(m, index, vd)
        extra = 2 * SEED_STATE_BYTES if index == "seeded" else 0
        assert r["bytes"] == blocks * per_block + extra, (index, vd)
        assert r["blocks"] == blocks and r["layers"] == 2 and r["dense_bytes"] == dense
        assert r["compression_ratio"] == dense / r["bytes"]
        assert m.storage_bytes(index, vd) == r["bytes"]
    assert rbe_ffn.storage_report(m, "stored")["bytes"] == m.weight_nbytes  # in memory = stored as is
    assert rbe_ffn.storage_report(m)["bytes"] == m.weight_nbytes  # unseeded: as state_dict stores it
    with pytest.raises(ValueError, match="index must be None, 'stored' or 'seeded'"):
        m.fc1.storage_bytes("hashed")
    with pytest.raises(ValueError, match="no RBELinear"):
        rbe_ffn.storage_report(nn.Linear(3, 4))


@pytest.mark.parametrize("index_seed", [None, 3])
@pytest.mark.parametrize("values_dtype", [None, torch.float16])
def test_storage_bytes_match_the_state_dict(index_seed, values_dtype):
    m = nn.Sequential(make_small_ffn(index_seed=index_seed), nn.LayerNorm(10))
    sd = rbe_ffn.storage_state_dict(m, values_dtype)
    weight_keys = [k for k in sd if k.startswith("0.") and not k.endswith("bias")]
    assert rbe_ffn.storage_report(m, values_dtype=values_dtype)["bytes"] == \
        sum(sd[k].numel() * sd[k].element_size() for k in weight_keys)


# ----------------------------------------------------------------- DDP
def _ddp_model(index_seed):
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(16, 32),
                         rbe_ffn.RBEFeedForward(32, 96, block_size=16, k=40, index_seed=index_seed))


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_process_group(rank, port)
    model = _ddp_model(index_seed=5)
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts index_bytes before every forward
    train(ddp, global_batches(), rank)
    torch.save(model.state_dict(), os.path.join(out_dir, f"seeded.{rank}.pt"))
    # rank 1 seeded otherwise: DDP gives it rank 0's positions, which are not its seed's
    other = _ddp_model(index_seed=5 if rank == 0 else 6)
    nn.parallel.DistributedDataParallel(other)
    torch.save(other.state_dict(), os.path.join(out_dir, f"other.{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_seeded(tmp_path, one_thread):
    run_world(_ddp_worker, tmp_path)
    ref = _ddp_model(index_seed=5)
    ref_sd = ref.state_dict()
    train(ref, global_batches(), rank=None)
    for r in range(WORLD):
        sd = torch.load(tmp_path / f"seeded.{r}.pt")
        assert "1.fc1.index_seed" in sd and "1.fc1.index" not in sd  # still seeded after training under DDP
        assert torch.equal(sd["1.fc1.index_seed"], ref_sd["1.fc1.index_seed"])
        assert (sd["1.fc2.coeffs"] - ref.state_dict()["1.fc2.coeffs"]).abs().max() <= 1e-5
    r0, r1 = (torch.load(tmp_path / f"other.{r}.pt") for r in range(WORLD))
    assert torch.equal(r0["1.fc1.index_seed"], ref_sd["1.fc1.index_seed"])
    assert "1.fc1.index_seed" not in r1  # its own seed dropped: it holds rank 0's positions
    assert torch.equal(r1["1.fc1.index"], seeded_positions(12, 16, 40, 10))
