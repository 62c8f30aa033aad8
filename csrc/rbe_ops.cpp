// rbe_ops.cpp - torch operator schemas and CPU kernels of rbe_ffn.
// This layer only checks arguments, dispatches on dtype, allocates, hands
// ranges to torch's thread pool and calls the C kernels of rbe.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "rbe.h"
#include "rbe_dct_path.h"
#include "rbe_ops_common.h"

// The Python extension module: importing it loads the operators. cpu_isa() names the float32 CPU
// kernels in use (rbe.h: "avx512", "avx2" or "portable"), bf16_sparse() whether they run the
// sparse products on bfloat16 operands when asked (bf16_sparse of ffn, linear and their backwards).
static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(rbe_cpu_isa()); }

static PyObject* bf16_sparse(PyObject*, PyObject*) { return PyBool_FromLong(rbe_bf16_sparse_available()); }

static PyObject* set_dct_few_tokens(PyObject*, PyObject* n) {
    const long long v = PyLong_AsLongLong(n);
    if (v == -1 && PyErr_Occurred()) return nullptr;
    return PyLong_FromLongLong(rbe::set_dct_few_tokens(v));
}

static PyObject* dct_path_enabled(PyObject*, PyObject*) { return PyBool_FromLong(rbe::dct_path_enabled()); }

static PyObject* pack_max_block(PyObject*, PyObject*) { return PyLong_FromLong(RBE_PACK_MAX_B); }

namespace rbe {
// the most tokens of a call that takes the few-token forward (few_tokens, below)
constexpr int64_t FEW_TOKENS = RBE_FEW_MAX;
bool ffn_saves_hidden(int64_t Tn, int64_t chunk_tokens, const std::string& activation);
bool ffn_pre_in_tiles(bool float32, bool bf16_sparse);
}

static PyObject* ffn_saves_hidden(PyObject*, PyObject* args) {
    long long tokens, chunk;
    const char* activation;
    if (!PyArg_ParseTuple(args, "LLs", &tokens, &chunk, &activation)) return nullptr;
    return PyBool_FromLong(rbe::ffn_saves_hidden(tokens, chunk, activation));
}

static PyObject* ffn_pre_in_tiles(PyObject*, PyObject* args) {
    int float32, bf16;
    if (!PyArg_ParseTuple(args, "pp", &float32, &bf16)) return nullptr;
    return PyBool_FromLong(rbe::ffn_pre_in_tiles(float32 != 0, bf16 != 0));
}

static PyObject* set_dct_path(PyObject*, PyObject* on) {
    const int v = PyObject_IsTrue(on);
    if (v < 0) return nullptr;
    return PyBool_FromLong(rbe::set_dct_path(v != 0));
}

extern "C" PyObject* PyInit__C(void) {
    static PyMethodDef methods[] = {
        {"cpu_isa", cpu_isa, METH_NOARGS,
         "The instruction set of the float32 CPU kernels: 'avx512', 'avx2' or 'portable' (the best the CPU "
         "has, capped by the environment variable RBE_FFN_ISA, read once)."},
        {"bf16_sparse", bf16_sparse, METH_NOARGS,
         "Whether the bf16_sparse argument of ffn / linear takes effect (AVX-512 BF16 present, the AVX-512 "
         "kernels chosen, a compiler that knows them)."},
        {"set_dct_path", set_dct_path, METH_O,
         "Route the linear and feed-forward operators of every device through the DCT-domain paths "
         "(csrc/rbe_dct_path.h) when true; returns the previous setting."},
        {"dct_path_enabled", dct_path_enabled, METH_NOARGS,
         "Whether the linear and feed-forward operators take the DCT-domain paths (set_dct_path)."},
        {"ffn_saves_hidden", ffn_saves_hidden, METH_VARARGS,
         "ffn_saves_hidden(tokens, chunk_tokens, activation): whether the CPU ffn operator with keep_pre "
         "returns fc2's analysed input as its third result (docs/DESIGN.md, the standard mode's saved tensors)."},
        {"ffn_pre_in_tiles", ffn_pre_in_tiles, METH_VARARGS,
         "ffn_pre_in_tiles(float32, bf16_sparse): where the CPU ffn operator returns a saved hidden input, "
         "whether its second result (act'(h)) is laid out in tiles, [tiles, ceil(d_ff/b), b, 64], instead of "
         "[*, d_ff]."},
        {"pack_max_block", pack_max_block, METH_NOARGS,
         "The largest block size the packed operators (pack_coeffs, linear_packed, ffn_packed) take."},
        {"set_dct_few_tokens", set_dct_few_tokens, METH_O,
         "On the DCT-domain path, forward calls of at most n tokens take the few-token sparse product "
         "(0: none); returns the previous n."},
        {nullptr, nullptr, 0, nullptr}};
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "rbe_ffn operators", -1, methods};
    PyObject* mod = PyModule_Create(&def);
    // the largest call of the few-token forward (rbe::FEW_TOKENS), for the fake kernel's copy of
    // ffn_saves_hidden (python/rbe_ffn/_ops.py)
    if (mod && PyModule_AddIntConstant(mod, "FEW_TOKENS", (long)rbe::FEW_TOKENS) < 0) {
        Py_DECREF(mod);
        return nullptr;
    }
    return mod;
}

namespace rbe {

using at::Tensor;

// ---- the C kernels' structs over checked tensors, and type-overloaded views of the kernels ----
template <typename T>
struct CTypes;
template <>
struct CTypes<float> {
    using weight = rbe_weight_f32;
    using plan = rbe_plan_f32;
};
template <>
struct CTypes<double> {
    using weight = rbe_weight_f64;
    using plan = rbe_plan_f64;
};

template <typename T>
static typename CTypes<T>::weight cweight(const Weight& W) {
    return {W.basis.data_ptr<T>(), W.coeffs.data_ptr<T>(), W.index.data_ptr(), W.wide,
            (int)W.out, (int)W.in, (int)W.b, (int)W.k};
}
static rbe_plan_f32 plan_view(const float* p, int b, int nf) { return rbe_plan_view_f32(p, b, nf); }
static rbe_plan_f64 plan_view(const double* p, int b, int nf) { return rbe_plan_view_f64(p, b, nf); }
template <typename T>
static typename CTypes<T>::plan cplan(const Plan& P) {
    return plan_view(P.t.data_ptr<T>(), (int)P.b, (int)P.nf);
}

static void encode(float* bs, float* cf, void* ix, int wide, double* err, const float* w, const double* tabs,
                   double* work, int out, int in, int b, int k, long p0, long p1) {
    rbe_encode_f32(bs, cf, ix, wide, err, w, tabs, work, out, in, b, k, p0, p1);
}
static void encode(double* bs, double* cf, void* ix, int wide, double* err, const double* w, const double* tabs,
                   double* work, int out, int in, int b, int k, long p0, long p1) {
    rbe_encode_f64(bs, cf, ix, wide, err, w, tabs, work, out, in, b, k, p0, p1);
}
static void decode(float* w, const rbe_weight_f32* W, const double* tabs, double* work, long p0, long p1) {
    rbe_decode_f32(w, W, tabs, work, p0, p1);
}
static void decode(double* w, const rbe_weight_f64* W, const double* tabs, double* work, long p0, long p1) {
    rbe_decode_f64(w, W, tabs, work, p0, p1);
}
static void analysis(float* o, const float* x, const float* M, const rbe_plan_f32* P, float* s, long T, int n,
                     long p0, long p1) {
    rbe_analysis_f32(o, x, M, P, s, T, n, p0, p1);
}
static void analysis(double* o, const double* x, const double* M, const rbe_plan_f64* P, double* s, long T, int n,
                     long p0, long p1) {
    rbe_analysis_f64(o, x, M, P, s, T, n, p0, p1);
}
// (float kernels take the AVX2 schedule when one was built; double kernels have none)
static void rows_forward(float* y, float* pre, float* Xn, const float* Xh, const rbe_weight_f32* W,
                         const rbe_plan_f32* P, const rbe_sched_f32* sc, const float* bias, int act, float* s, long T,
                         long p0, long p1) {
    rbe_rows_forward_f32(y, pre, Xn, Xh, W, P, sc, bias, act, s, T, p0, p1);
}
static void rows_forward(double* y, double* pre, double* Xn, const double* Xh, const rbe_weight_f64* W,
                         const rbe_plan_f64* P, const rbe_sched_f32*, const double* bias, int act, double* s, long T,
                         long p0, long p1) {
    rbe_rows_forward_f64(y, pre, Xn, Xh, W, P, bias, act, s, T, p0, p1);
}
static void cols_backward(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                          const rbe_sched_f32* sc, float* s, long T, long p0, long p1) {
    rbe_cols_backward_f32(dx, Gh, W, P, sc, s, T, p0, p1);
}
static void cols_backward(double* dx, const double* Gh, const rbe_weight_f64* W, const rbe_plan_f64* P,
                          const rbe_sched_f32*, double* s, long T, long p0, long p1) {
    rbe_cols_backward_f64(dx, Gh, W, P, s, T, p0, p1);
}
static void params_backward(float* db, float* dc, const float* Gh, const float* Xh, const rbe_weight_f32* W,
                            const rbe_plan_f32* P, const rbe_sched_f32* sc, int acc, long T, long p0, long p1) {
    rbe_params_backward_f32(db, dc, Gh, Xh, W, P, sc, acc, T, p0, p1);
}
static void params_backward(double* db, double* dc, const double* Gh, const double* Xh, const rbe_weight_f64* W,
                            const rbe_plan_f64* P, const rbe_sched_f32*, int acc, long T, long p0, long p1) {
    rbe_params_backward_f64(db, dc, Gh, Xh, W, P, acc, T, p0, p1);
}
static void few_at(float* At, const rbe_plan_f32* P) { rbe_few_at_f32(At, P); }
static void few_at(double* At, const rbe_plan_f64* P) { rbe_few_at_f64(At, P); }
static void few_analysis(float* Xf, const float* x, const float* At, int b, int nf, long T, int n, long p0, long p1) {
    rbe_few_analysis_f32(Xf, x, At, b, nf, T, n, p0, p1);
}
static void few_analysis(double* Xf, const double* x, const double* At, int b, int nf, long T, int n, long p0,
                         long p1) {
    rbe_few_analysis_f64(Xf, x, At, b, nf, T, n, p0, p1);
}
static void few_rows_forward(float* y, float* pre, float* Xn, const float* Xf, const rbe_weight_f32* W,
                             const rbe_plan_f32* P, const float* At, const float* bias, int act, float* s, long T,
                             long p0, long p1) {
    rbe_few_rows_forward_f32(y, pre, Xn, Xf, W, P, At, bias, act, s, T, p0, p1);
}
static void few_rows_forward(double* y, double* pre, double* Xn, const double* Xf, const rbe_weight_f64* W,
                             const rbe_plan_f64* P, const double* At, const double* bias, int act, double* s, long T,
                             long p0, long p1) {
    rbe_few_rows_forward_f64(y, pre, Xn, Xf, W, P, At, bias, act, s, T, p0, p1);
}
static void bias_backward(float* d, const float* g, long T, int out, int acc, long o0, long o1) {
    rbe_bias_backward_f32(d, g, T, out, acc, o0, o1);
}
static void bias_backward(double* d, const double* g, long T, int out, int acc, long o0, long o1) {
    rbe_bias_backward_f64(d, g, T, out, acc, o0, o1);
}
static void act_forward(float* y, const float* x, long n, int act) { rbe_act_forward_f32(y, x, n, act); }
static void act_forward(double* y, const double* x, long n, int act) { rbe_act_forward_f64(y, x, n, act); }
static void act_backward(float* dx, const float* dy, const float* x, long n, int act) {
    rbe_act_backward_f32(dx, dy, x, n, act);
}
static void act_backward(double* dx, const double* dy, const double* x, long n, int act) {
    rbe_act_backward_f64(dx, dy, x, n, act);
}
static void act_forward_grad(float* y, float* g, const float* x, long n, int act) {
    rbe_act_forward_grad_f32(y, g, x, n, act);
}
static void act_forward_grad(double* y, double* g, const double* x, long n, int act) {
    rbe_act_forward_grad_f64(y, g, x, n, act);
}
// the activations whose value and derivative share work (rbe_act_forward_grad); relu's backward
// also must pass +0 where x <= 0 even for an infinite dy, which dy * act'(x) would turn into NaN
static bool fused_act_grad(int act) {
    act &= ~RBE_ACT_F32;
    return act == RBE_ACT_GELU || act == RBE_ACT_GELU_TANH || act == RBE_ACT_SILU;
}

// the activation code the kernels get: with RBE_ACT_F32 (evaluated in float32) when the caller
// asks for it (f32_activation: the result is rounded to a 16-bit type anyway) and the layer is
// float32; double layers and relu / none are exact either way (the ones fused_act_grad names
// are the ones rbe_act_f32.h evaluates)
static int with_f32_activation(int act, bool f32_activation, at::ScalarType dtype) {
    return f32_activation && dtype == at::kFloat && fused_act_grad(act) ? act | RBE_ACT_F32 : act;
}
static double max_abs(const float* x, long n) { return rbe_max_abs_f32(x, n); }
static double max_abs(const double* x, long n) { return rbe_max_abs_f64(x, n); }

// argument checks shared with the CUDA registration (cuda/rbe_ops_cuda.cpp)

// ---- tables ----

Tensor make_plan(int64_t b, double tol) {
    check_block_size(b);
    TORCH_CHECK_VALUE(tol > 0 && tol < 1, "rbe_ffn: plan tolerance must be in (0, 1), got ", tol);
    std::vector<double> plan(3 * (2 * b + 4) * b), work(3 * b * b + b);
    const int64_t nf = rbe_plan_build(plan.data(), work.data(), (int)b, tol);
    Tensor t = at::empty({3, b + nf, b}, at::kDouble);
    std::copy(plan.begin(), plan.begin() + 3 * (b + nf) * b, t.data_ptr<double>());
    return t;
}

// ---- codec ----
std::tuple<Tensor, Tensor, Tensor, Tensor> encode_cpu(const Tensor& weight, int64_t b, int64_t k) {
    check_float(weight, "weight");
    TORCH_CHECK_VALUE(weight.dim() == 2, "rbe_ffn.compress: weight must be 2-D [out, in], got ", weight.dim(), "-D");
    TORCH_CHECK_VALUE(weight.numel() > 0, "rbe_ffn.compress: weight is empty ", weight.sizes());
    check_block_size(b);
    TORCH_CHECK_VALUE(k >= 0 && k <= b * b, "rbe_ffn.compress: k must be in [0, block_size^2 = ", b * b, "], got ", k);
    Tensor w = weight.contiguous();
    const int64_t out = w.size(0), in = w.size(1), nblk = cdiv(out, b) * cdiv(in, b);
    const bool wide = b > 128;
    Tensor basis = at::empty({nblk, RBE_NPAT}, w.options());
    Tensor coeffs = at::empty({nblk, k}, w.options());
    Tensor index = at::empty({nblk, k}, w.options().dtype(wide ? at::kInt : at::kShort));
    Tensor err = at::empty({nblk}, w.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "rbe_encode", [&] {
        long bad = w.scalar_type() == at::kFloat
                       ? rbe_count_nonfinite_f32((const float*)w.data_ptr(), (long)w.numel())
                       : rbe_count_nonfinite_f64((const double*)w.data_ptr(), (long)w.numel());
        TORCH_CHECK_VALUE(bad == 0, "rbe_ffn.compress: weight has ", bad, " NaN or infinite values");
        const std::vector<double> tabs = codec_tables((int)b);
        at::parallel_for(0, nblk, 1, [&](int64_t p0, int64_t p1) {
            std::vector<double> work(rbe_encode_work((int)b));
            encode(basis.data_ptr<scalar_t>(), coeffs.data_ptr<scalar_t>(), index.data_ptr(), wide,
                   err.data_ptr<double>(), w.data_ptr<scalar_t>(), tabs.data(), work.data(), (int)out, (int)in, (int)b,
                   (int)k, (long)p0, (long)p1);
        });
    });
    return {basis, coeffs, index, err};
}

Tensor decode_cpu(const Tensor& basis, const Tensor& coeffs, const Tensor& index, int64_t out, int64_t in, int64_t b) {
    check_float(basis, "basis");
    Weight W = check_weight("decode", basis, coeffs, index, out, in, b, basis.scalar_type(), basis.device());
    Tensor w = at::empty({out, in}, basis.options());
    const int64_t nblk = W.basis.size(0);
    AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "rbe_decode", [&] {
        const std::vector<double> tabs = codec_tables((int)b);
        const auto cw = cweight<scalar_t>(W);
        at::parallel_for(0, nblk, 1, [&](int64_t p0, int64_t p1) {
            std::vector<double> work(3 * b * b);
            decode(w.data_ptr<scalar_t>(), &cw, tabs.data(), work.data(), (long)p0, (long)p1);
        });
    });
    return w;
}

// ---- work items over torch's threads, balanced as they run ----
// Items [0, n) on the intra-op threads: each thread first takes, one at a time, the items of the
// share at::parallel_for would give it, then what is left of the others' shares, one item at a
// time from their ends. A thread the machine slows (another process on its core) then no longer
// holds the others at the region's end. `body(take)` runs once per thread share and calls take()
// for its items until it returns -1 (thread-local scratch lives in body). An item is computed the
// same way whichever thread takes it, so the bits do not depend on the threads.
class ItemShares {
  public:
    ItemShares(int64_t n, int64_t parts) : share_(parts) {
        for (int64_t t = 0; t < parts; t++) share_[t].store(pack(n * t / parts, n * (t + 1) / parts));
    }
    // the next item for share t (its own first, then the others' from their ends), or -1
    int64_t take(int64_t t) {
        const int64_t parts = (int64_t)share_.size();
        for (int64_t u = 0; u < parts; u++) {
            std::atomic<uint64_t>& s = share_[(t + u) % parts];
            uint64_t v = s.load(std::memory_order_relaxed);
            for (;;) {
                const int64_t lo = (int64_t)(v >> 32), hi = (int64_t)(v & 0xffffffffu);
                if (lo >= hi) break;
                const uint64_t w = u == 0 ? pack(lo + 1, hi) : pack(lo, hi - 1);
                if (s.compare_exchange_weak(v, w, std::memory_order_relaxed)) return u == 0 ? lo : hi - 1;
            }
        }
        return -1;
    }

  private:
    static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t)lo << 32 | (uint64_t)hi; }
    std::vector<std::atomic<uint64_t>> share_;
};

template <typename Body>
static void balanced_for(int64_t n, const Body& body) {
    if (n <= 0) return;
    TORCH_INTERNAL_ASSERT(n < (int64_t(1) << 31), "balanced_for: too many items");
    const int64_t parts = std::min<int64_t>(n, at::in_parallel_region() ? 1 : at::get_num_threads());
    ItemShares shares(n, parts);
    if (parts == 1) {
        body([&]() { return shares.take(0); });
        return;
    }
    at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) body([&]() { return shares.take(t); });
    });
}

// ---- the linear kernels on raw token-major buffers ----
template <typename T>
static void scratch_for(std::vector<T>& s, const Plan& P) {
    s.resize(rbe_rows_scratch((int)P.b, (int)P.nf));
}

// The run-grouped schedule of a weight's sparse products for the x86 float kernels, AVX2 or
// AVX-512 (rbe.h); `on` is false (and the portable kernels run) for double, or when the chosen
// float kernels are the portable ones (no AVX2, or RBE_FFN_ISA=portable).
struct Sched {
    Tensor start, off, val, pos, acc;
    rbe_sched_f32 s{nullptr, nullptr, nullptr, nullptr, nullptr};
    bool on = false;
    const rbe_sched_f32* get() const { return on ? &s : nullptr; }
};

template <typename T>
static Sched make_sched(const Weight& W, const Plan& P, bool transpose, bool with_pos, double coeff_scale) {
    Sched sc;
    if (!std::is_same<T, float>::value || rbe_cpu_isa_level() < RBE_ISA_AVX2) return sc;
    const int64_t R = cdiv(W.out, P.b), C = cdiv(W.in, P.b), groups = transpose ? C : R;
    auto iopt = W.coeffs.options().dtype(at::kInt);
    sc.start = at::empty({groups, P.b + 1}, iopt);
    sc.off = at::empty({R * C * W.k}, iopt);
    sc.val = at::empty({R * C * W.k}, W.coeffs.options());
    if (with_pos) {  // the parameter gradient: positions and a work array in schedule order
        sc.pos = at::empty({R * C * W.k}, iopt);
        sc.acc = at::empty({R * C * W.k}, W.coeffs.options());
    }
    int32_t* pos = with_pos ? sc.pos.data_ptr<int32_t>() : nullptr;
    const rbe_weight_f32 cw = cweight<float>(W);
    balanced_for(groups, [&](const auto& take) {
        for (int64_t g; (g = take()) >= 0;)
            rbe_schedule_f32(sc.start.data_ptr<int32_t>(), sc.off.data_ptr<int32_t>(), sc.val.data_ptr<float>(), pos,
                             &cw, (int)P.nf, transpose, (float)coeff_scale, (long)g, (long)g + 1);
    });
    sc.s = rbe_sched_f32{sc.start.data_ptr<int32_t>(), sc.off.data_ptr<int32_t>(), sc.val.data_ptr<float>(), pos,
                         with_pos ? sc.acc.data_ptr<float>() : nullptr};
    sc.on = true;
    return sc;
}

// A weight's schedules for one operator call, built on first use and reused by the call's later
// chunks of tokens (rebuilt per chunk they took about a fifth of a chunked training step:
// callgrind, 768/3072, 1024 tokens, 8 MiB chunks). rows (transpose = 0) serves the rows forward
// (the checkpointed recompute) and the params backward, cols (transpose = 1) the input gradient;
// the one that computes the coefficient gradient carries its positions and work array: cols when
// the two passes are one (cols_carry_coeffs), else rows.
// Their bytes (sched_bytes) count against the chunk budget (python/rbe_ffn/functional.py).
struct SchedCache {
    bool rows_pos, cols_pos;
    Sched rows, cols;
    bool rows_built = false, cols_built = false;
    Tensor basis;  // the pattern numbers times their scale (on_schedules), once per call
};

// Whether a call's sparse products run on schedules (make_sched builds them exactly then): float32
// on the x86 kernels, with the schedules kept across the call's chunks (`cached`) or more than one
// tile of tokens (for one tile the block-by-block kernels are cheaper than building a schedule).
// On schedules a weight's scales go into its numbers: the coefficient scale into the schedules'
// values (which copy the coefficients anyway), the pattern scale into a copy of the pattern numbers
// (8 per block: scaled_pattern), so no transform-domain input or output gradient is scaled (scale_rows
// passes over [tokens, width] each), and the parameter gradients come out as those of the format's
// numbers: the operator multiplies them by the scales once, after the call's last chunk
// (scale_param_grads). Elsewhere (few tokens, one tile, float64, the portable kernels) the analysed
// input and output gradient are scaled instead. For powers of two the two give the same bits
// (tests/test_ffn.py).
template <typename T>
static bool on_schedules(bool cached, int64_t ntiles) {
    return std::is_same_v<T, float> && rbe_cpu_isa_level() >= RBE_ISA_AVX2 && (cached || ntiles > 1);
}

// W with its pattern numbers times the pattern scale (scaled_weight's pattern half), for a call on
// schedules; with a cache the copy is made once per call and kept there
static Weight scaled_pattern(SchedCache* c, const Weight& W, const Scales& s) {
    const Scales pattern{1.0, s.pattern};
    if (!c) return scaled_weight(W, pattern);
    if (!c->basis.defined()) c->basis = scaled_weight(W, pattern).basis;
    Weight out = W;
    out.basis = c->basis;
    return out;
}

// a call on schedules: its parameter gradients (empty where not wanted) from those of the format's numbers
static void scale_param_grads(Tensor& dbasis, Tensor& dcoeffs, const Scales& s) {
    if (dbasis.numel() > 0 && s.pattern != 1.0) dbasis.mul_(s.pattern);
    if (dcoeffs.numel() > 0 && s.coeff != 1.0) dcoeffs.mul_(s.coeff);
}

// Whether the input gradient and the coefficient gradient run as one pass over the transposed
// schedule (rbe_cols_coeffs_backward_f32: the source rows read once for both): float32 on the x86
// kernels, both wanted, float32 operands (the bfloat16 kernels keep two passes), and at least
// two block columns (its work items) per thread. The two ways give the same bits (rbe.h), so the
// thread count choosing between them changes only the speed. One tile of tokens builds no
// schedule and keeps the two passes as well.
template <typename T>
static bool cols_carry_coeffs(bool dx, bool dcoeffs, bool bf16_sparse, const Weight& W) {
    return std::is_same_v<T, float> && dx && dcoeffs && rbe_cpu_isa_level() >= RBE_ISA_AVX2 &&
           !(bf16_sparse && rbe_bf16_sparse_available()) && cdiv(W.in, W.b) >= 2 * at::get_num_threads();
}

// the cache of one weight's backward (dx, dcoeffs wanted): the one decision, kept for every chunk
template <typename T>
static SchedCache backward_scheds(bool dx, bool dcoeffs, bool bf16_sparse, const Weight& W) {
    const bool fused = cols_carry_coeffs<T>(dx, dcoeffs, bf16_sparse, W);
    return SchedCache{dcoeffs && !fused, fused};
}

// (coeff_scale: the weight's, into the values; see on_schedules)
template <typename T>
static const Sched& rows_sched(SchedCache* c, Sched& own, const Weight& W, const Plan& P, int64_t ntiles,
                               bool with_pos, double coeff_scale) {
    if (!c) {  // one tile of tokens: the block-by-block kernels are cheaper than building a schedule
        if (ntiles > 1) own = make_sched<T>(W, P, false, with_pos, coeff_scale);
        return own;
    }
    if (!c->rows_built) c->rows = make_sched<T>(W, P, false, c->rows_pos, coeff_scale), c->rows_built = true;
    return c->rows;
}

template <typename T>
static const Sched& cols_sched(SchedCache* c, Sched& own, const Weight& W, const Plan& P, int64_t ntiles,
                               bool with_pos, double coeff_scale) {
    if (!c) {
        if (ntiles > 1) own = make_sched<T>(W, P, true, with_pos, coeff_scale);
        return own;
    }
    if (!c->cols_built) c->cols = make_sched<T>(W, P, true, c->cols_pos, coeff_scale), c->cols_built = true;
    return c->cols;
}

// dh[t][f] *= act[tile][f / b][f % b][t % 64] for t < n, f < d: dh * act'(h) with act'(h) in tiles
// (RBE_ACT_PRE_TILES), block by block; the product fused_act_grad's activations take token-major
template <typename T>
static void mul_by_tiles(T* dh, const T* act, int64_t n, int64_t d, int64_t b) {
    const int64_t nb = cdiv(d, b);
    at::parallel_for(0, cdiv(n, RBE_TILE) * nb, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; p++) {
            const int64_t tile = p / nb, j = p % nb, t0 = tile * RBE_TILE, t1 = std::min(n, t0 + RBE_TILE);
            const int64_t nc = std::min(b, d - j * b);
            const T* a = act + p * b * RBE_TILE;
            for (int64_t t = t0; t < t1; t++) {
                T* row = dh + t * d + j * b;
                for (int64_t r = 0; r < nc; r++) row[r] *= a[r * RBE_TILE + (t - t0)];
            }
        }
    });
}

// rbe_grad_next_f32 over these buffers (float32 only: hands_on in ffn_backward_cpu)
template <typename T>
static rbe_grad_next_f32 grad_next(const T* dact, Tensor& Gh, T* dbias, int accumulate) {
    if constexpr (std::is_same_v<T, float>) return {dact, Gh.data_ptr<float>(), dbias, accumulate};
    TORCH_INTERNAL_ASSERT(false, "rbe_ffn: a float64 gradient handed on");
}

// schedules are cached across chunks when there are several chunks of several tiles each
static bool cache_scheds(int64_t Tn, int64_t chunk) { return chunk < Tn && chunk > RBE_TILE; }

// A transform-domain input with its rows scaled: X holds `groups` blocks of b + nf rows of `width`
// lanes (a tile's segments: width RBE_TILE; the few-token analysis: width T), the first b of them
// DCT coefficients (times s.coeff) and the rest pattern projections (times s.pattern). The kernels
// then read the parameters and give what the parameters times their scales give (the same bits
// when the scales are powers of two), so a scaled weight needs no scaled copy of its numbers.
// Scaling the analysed output gradient the same way gives both the input gradient of the scaled
// numbers and the gradients of the parameters themselves.
// With a source Y (not X), X = Y scaled, Y left as it is (the same bits as scaling in place; a
// factor of 1 copies).
template <typename T>
static void scale_rows(T* X, int64_t groups, const Plan& P, int64_t width, const Scales& s, const T* Y = nullptr) {
    if (s.none() && !Y) return;
    const int64_t rows = P.b + P.nf;
    const T sc = (T)s.coeff, sp = (T)s.pattern;
    at::parallel_for(0, groups, std::max<int64_t>(1, (1 << 14) / (rows * width)), [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; g++) {
            T* x = X + g * rows * width;
            const T* y = Y ? Y + g * rows * width : x;
            if (sc != T(1) || Y)
                for (int64_t e = 0; e < P.b * width; e++) x[e] = y[e] * sc;
            if (sp != T(1) || Y)
                for (int64_t e = P.b * width; e < rows * width; e++) x[e] = y[e] * sp;
        }
    });
}

// Xh = analysis of x [T, n] with the plan's A (which = 0) or S (which = 1) rows: [ntiles, ceil(n/b), b+nf, TILE]
template <typename T>
static Tensor analyse(const T* x, int64_t Tn, int64_t n, const Plan& P, int which, const at::TensorOptions& opt) {
    const int64_t ntiles = cdiv(Tn, RBE_TILE), nseg = cdiv(n, P.b), rows = P.b + P.nf;
    Tensor Xh = at::empty({ntiles, nseg, rows, RBE_TILE}, opt);
    const auto cp = cplan<T>(P);
    const T* M = which ? cp.S : cp.A;
    T* o = Xh.data_ptr<T>();
    balanced_for(ntiles * nseg, [&](const auto& take) {
        std::vector<T> s;
        scratch_for(s, P);
        for (int64_t p; (p = take()) >= 0;) analysis(o, x, M, &cp, s.data(), (long)Tn, (int)n, (long)p, (long)p + 1);
    });
    return Xh;
}

// a thread's scratch for the kernels on bfloat16 operands (rbe.h), for a source tile of `segments`
// segments: torch's allocator aligns it to 64 bytes, so each 128-byte row is two cache lines, and
// leaves it unfilled (the kernels write before they read)
static Tensor bf16_scratch(int64_t segments, const Plan& P) {
    return at::empty({(int64_t)rbe_bf16_scratch((int)segments, (int)P.b, (int)P.nf)}, at::kShort);
}
static uint16_t* bits(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<int16_t>()); }
// whether a float32 call asked for bfloat16 operands (bf16_sparse) gets them: only the scheduled
// kernels have them, and only where the CPU does (rbe.h)
template <typename T>
static bool bf16_operands(bool bf16_sparse, const Sched& sc) {
    return std::is_same_v<T, float> && bf16_sparse && sc.on && rbe_bf16_sparse_available();
}

// y (and pre) [T, out] = act(x W^T + bias). Xh_in: x already analysed (then x is unused; off
// schedules its rows already scaled by the caller); Xnext: also write the analysis of y for a next
// layer (then y may be null). See rbe.h. The weight's numbers are W's times `scale` (on_schedules).
// bf16_sparse: the scheduled kernels on bfloat16 operands, where the CPU has them (rbe.h).
template <typename T>
static void linear_raw(T* y, T* pre, const T* x, int64_t Tn, const Weight& W, const T* bias, int act, const Plan& P,
                       const at::TensorOptions& opt, const T* Xh_in = nullptr, T* Xnext = nullptr,
                       SchedCache* cache = nullptr, const Scales& scale = {}, bool bf16_sparse = false) {
    if (Tn == 0) return;
    const int64_t R = cdiv(W.out, P.b), ntiles = cdiv(Tn, RBE_TILE);
    const bool on = on_schedules<T>(cache != nullptr, ntiles);
    TORCH_INTERNAL_ASSERT(!Xh_in || scale.none() || on, "linear_raw: scale an analysed input before the call");
    Tensor Xh;
    if (!Xh_in) {
        Xh = analyse<T>(x, Tn, W.in, P, 0, opt);
        if (!on) scale_rows(Xh.data_ptr<T>(), ntiles * cdiv(W.in, P.b), P, RBE_TILE, scale);
    }
    const T* X = Xh_in ? Xh_in : Xh.data_ptr<T>();
    const Weight Ws = on ? scaled_pattern(cache, W, scale) : W;  // (holds the scaled copy the kernels read)
    const auto cw = cweight<T>(Ws);
    const auto cp = cplan<T>(P);
    Sched own;
    const Sched& sc = rows_sched<T>(cache, own, W, P, ntiles, false, scale.coeff);
    const bool b16_on = bf16_operands<T>(bf16_sparse, sc);
    balanced_for(ntiles * R, [&](const auto& take) {
        std::vector<T> s;
        scratch_for(s, P);
        if constexpr (std::is_same_v<T, float>) {
            if (b16_on) {  // each source tile rounded once per thread (the kernel's `rounded`, rbe.h)
                const Tensor b16 = bf16_scratch(cdiv(W.in, P.b), P);
                long rounded = -1;
                for (int64_t p; (p = take()) >= 0;)
                    rbe_rows_forward_bf16(y, pre, Xnext, X, &cw, &cp, sc.get(), bias, act, s.data(), bits(b16),
                                          &rounded, (long)Tn, (long)p, (long)p + 1);
                return;
            }
        }
        for (int64_t p; (p = take()) >= 0;)
            rows_forward(y, pre, Xnext, X, &cw, &cp, sc.get(), bias, act, s.data(), (long)Tn, (long)p, (long)p + 1);
    });
}

// ---- few tokens: the forward vectorized along features (rbe.h), for calls of at most FEW_TOKENS ----
// Below this many tokens a 16-lane tile wastes most of its work (callgrind, 768/3072, b = 64,
// k = 300: see docs/DESIGN.md); the choice is made on the call's token count, never per chunk, so
// a call's results do not depend on its chunking (a token's few-token results do not depend on T).
// The kernels take the whole call, or each chunk of it under a memory limit (at most RBE_FEW_MAX
// tokens: why 16, docs/DESIGN.md, few tokens).
static bool few_tokens(int64_t Tn) { return Tn > 0 && Tn <= FEW_TOKENS; }

// the analysis rows transposed, [b, b+nf] (rbe_few_at)
template <typename T>
static Tensor few_tables(const Plan& P, const at::TensorOptions& opt) {
    Tensor At = at::empty({P.b, P.b + P.nf}, opt);
    const auto cp = cplan<T>(P);
    few_at(At.data_ptr<T>(), &cp);
    return At;
}

// Xf = the few-token analysis of x [T, n]: rbe_few_size(n, b, nf, T) elements
template <typename T>
static Tensor few_analyse(const T* x, int64_t Tn, int64_t n, const Plan& P, const T* At,
                          const at::TensorOptions& opt) {
    Tensor Xf = at::empty({(int64_t)rbe_few_size((int)n, (int)P.b, (int)P.nf, (long)Tn)}, opt);
    T* o = Xf.data_ptr<T>();
    at::parallel_for(0, cdiv(n, P.b), 1, [&](int64_t p0, int64_t p1) {
        few_analysis(o, x, At, (int)P.b, (int)P.nf, (long)Tn, (int)n, (long)p0, (long)p1);
    });
    return Xf;
}

// y (and pre) [T, out] = act(x W^T + bias) from Xf = few_analyse(x); Xnext: also the few-token
// analysis of y (then y may be null), rbe_few_size(out, b, nf, T) elements
template <typename T>
static void few_linear_raw(T* y, T* pre, T* Xnext, const T* Xf, int64_t Tn, const Weight& W, const T* bias, int act,
                           const Plan& P, const T* At) {
    const auto cw = cweight<T>(W);
    const auto cp = cplan<T>(P);
    balanced_for(cdiv(W.out, P.b), [&](const auto& take) {
        std::vector<T> s(rbe_few_scratch((int)P.b, (int)P.nf));
        for (int64_t p; (p = take()) >= 0;)
            few_rows_forward(y, pre, Xnext, Xf, &cw, &cp, At, bias, act, s.data(), (long)Tn, (long)p, (long)p + 1);
    });
}

// gradients of y = x W^T + bias given g = dL/dy [T, out]; null outputs are skipped.
// Xh_in: x already analysed (then x is unused). Returns whether the call ran on schedules
// (on_schedules): then dbasis and dcoeffs are the gradients of the format's numbers (W's times
// `scale`), for the caller to scale after its last chunk (scale_param_grads).
template <typename T>
static bool linear_backward_raw(T* dx, T* dbasis, T* dcoeffs, T* dbias, int accumulate, const T* g, const T* x,
                                int64_t Tn, const Weight& W, const Plan& P, const at::TensorOptions& opt,
                                const T* Xh_in = nullptr, SchedCache* cache = nullptr, const Scales& scale = {},
                                bool bf16_sparse = false, const rbe_grad_next_f32* next = nullptr,
                                const Tensor& Gh_in = Tensor(), int sums = 0) {
    // next: dx handed on to the layer below (rbe_grad_next_f32; only where the one-pass kernel runs:
    // hands_on), dx null. Gh_in: g already analysed (as next writes it, unscaled; g and dbias unused).
    // sums: RBE_SUMS_CONTINUE / RBE_SUMS_HOLD for the scheduled coefficient gradients, when this is
    // one chunk of a call whose chunks share the schedules in `cache` (chunk_sums)
    const int64_t R = cdiv(W.out, P.b), C = cdiv(W.in, P.b), ntiles = cdiv(Tn, RBE_TILE);
    const bool on = on_schedules<T>(cache != nullptr, ntiles);
    if (Tn == 0) return on;
    if (dbias)
        at::parallel_for(0, W.out, 64, [&](int64_t o0, int64_t o1) {
            bias_backward(dbias, g, (long)Tn, (int)W.out, accumulate, (long)o0, (long)o1);
        });
    if (!dx && !next && !dbasis && !dcoeffs) return on;
    const Weight Ws = on ? scaled_pattern(cache, W, scale) : W;  // (holds the scaled copy the kernels read)
    const auto cw = cweight<T>(Ws);
    const auto cp = cplan<T>(P);
    Tensor Gh = Gh_in.defined() ? Gh_in : analyse<T>(g, Tn, W.out, P, 1, opt);
    // off schedules, numbers W's times `scale`: dx from the scaled Gh, and the gradients of W's own
    // numbers = scaled Gh . Xh
    if (!on) scale_rows(Gh.data_ptr<T>(), ntiles * R, P, RBE_TILE, scale);
    Tensor Xh;  // x analysed, for the parameter gradients
    auto analysed_x = [&]() -> const T* {
        if (Xh_in) return Xh_in;
        if (!Xh.defined()) Xh = analyse<T>(x, Tn, W.in, P, 0, opt);
        return Xh.data_ptr<T>();
    };
    bool coeffs_done = false;
    if (dx || next) {
        // the transposed product runs over coefficients grouped by column: a schedule (AVX2, several
        // tiles of tokens) or block by block, each term added to its column's row (one tile:
        // building the schedule would cost as much as the product; and the portable kernels)
        Sched own;
        const bool fuse = cache ? cache->cols_pos : cols_carry_coeffs<T>(true, dcoeffs, bf16_sparse, W);
        const Sched& sc = cols_sched<T>(cache, own, W, P, ntiles, fuse, scale.coeff);
        auto cwt = cw;  // with the schedule on, the coefficients are read from it only
        if (sc.on) cwt.coeffs = nullptr, cwt.index = nullptr;
        if constexpr (std::is_same_v<T, float>) {
            if (fuse && dcoeffs && sc.on) {  // (sc carries pos and acc)
                // the coefficient gradient in the same pass, block column by block column
                const float* X = analysed_x();
                balanced_for(C, [&](const auto& take) {
                    std::vector<T> s;
                    scratch_for(s, P);
                    for (int64_t p; (p = take()) >= 0;) {
                        const int rc = rbe_cols_coeffs_backward_f32(dx, dcoeffs, next, Gh.data_ptr<float>(), X, &cwt,
                                                                    &cp, sc.get(), accumulate | sums, s.data(),
                                                                    (long)Tn, (long)p, (long)p + 1);
                        TORCH_INTERNAL_ASSERT(rc == 0, "rbe_cols_coeffs_backward_f32 without x86 kernels");
                    }
                });
                coeffs_done = true;
            }
        }
        TORCH_INTERNAL_ASSERT(coeffs_done || !next, "rbe_ffn: the input gradient handed on without the one-pass kernel");
        if (!coeffs_done) {
            const bool b16_on = bf16_operands<T>(bf16_sparse, sc);
            balanced_for(ntiles * C, [&](const auto& take) {
                std::vector<T> s;
                scratch_for(s, P);
                if constexpr (std::is_same_v<T, float>) {
                    if (b16_on) {  // each source tile rounded once per thread, as in linear_raw
                        const Tensor b16 = bf16_scratch(R, P);
                        long rounded = -1;
                        for (int64_t p; (p = take()) >= 0;)
                            rbe_cols_backward_bf16(dx, Gh.data_ptr<float>(), &cwt, &cp, sc.get(), s.data(), bits(b16),
                                                   &rounded, (long)Tn, (long)p, (long)p + 1);
                        return;
                    }
                }
                for (int64_t p; (p = take()) >= 0;)
                    cols_backward(dx, Gh.data_ptr<T>(), &cwt, &cp, sc.get(), s.data(), (long)Tn, (long)p, (long)p + 1);
            });
        }
    }
    if (coeffs_done) dcoeffs = nullptr;
    if (dbasis || dcoeffs) {
        const T* X = analysed_x();
        Sched own;
        const Sched& sc = dcoeffs ? rows_sched<T>(cache, own, W, P, ntiles, true, scale.coeff) : own;  // dbasis alone: none
        if constexpr (std::is_same_v<T, float>) {
            if (dcoeffs && bf16_operands<T>(bf16_sparse, sc)) {
                at::parallel_for(0, R, 1, [&](int64_t p0, int64_t p1) {
                    const Tensor s = bf16_scratch(C, P);
                    rbe_params_backward_bf16(dbasis, dcoeffs, Gh.data_ptr<float>(), X, bits(s), &cw, &cp, sc.get(),
                                             accumulate | sums, (long)Tn, (long)p0, (long)p1);
                });
                return on;
            }
        }
        balanced_for(R, [&](const auto& take) {  // block rows
            for (int64_t p; (p = take()) >= 0;)
                params_backward(dbasis, dcoeffs, Gh.data_ptr<T>(), X, &cw, &cp, sc.get(),
                                accumulate | (sc.on && dcoeffs ? sums : 0), (long)Tn, (long)p, (long)p + 1);
        });
    }
    return on;
}

// ---- the range the transform-domain kernels can take ----
// An intermediate row of the transforms sums up to b input values (the DCT butterflies, the
// pattern projections), so a finite input near the type's maximum can overflow where the dense
// product would not; and the DCT turns one infinity into inf - inf = NaN across a segment.
// So inputs are checked before the kernels run and results after: a non-finite result from
// finite inputs and finite parameters is an error, never a silent answer. NaN inputs and
// non-finite parameters propagate, as in a dense layer; so do non-finite upstream gradients
// (a loss scaler skips such steps), which give non-finite gradients.
template <typename T>
static double max_abs_of(const Tensor& t) {  // NaN when t holds a NaN
    const T* p = t.data_ptr<T>();
    return at::parallel_reduce(
        0, t.numel(), 1 << 16, 0.0,
        [&](int64_t i0, int64_t i1, double m) {
            const double v = max_abs(p + i0, (long)(i1 - i0));
            return (std::isnan(m) || std::isnan(v)) ? NAN : std::max(m, v);
        },
        [](double a, double c) { return (std::isnan(a) || std::isnan(c)) ? NAN : std::max(a, c); });
}

// the largest |value| the kernels take at block size b: the type's maximum / (4 b)
template <typename T>
static double range_limit(int64_t b) {
    return (double)std::numeric_limits<T>::max() / (4.0 * (double)b);
}

// max |t| of a checked input (NaN if it holds a NaN). Raises for finite values past the limit,
// and for infinities unless inf_ok (upstream gradients).
template <typename T>
static double check_range(const Tensor& t, int64_t b, const char* what, bool inf_ok = false) {
    const double m = max_abs_of<T>(t);
    TORCH_CHECK_VALUE(inf_ok || !std::isinf(m), "rbe_ffn: ", what, " has infinite values; the transform-domain "
                      "kernels cannot carry an infinity (the DCT would spread it as NaN over its segment)");
    TORCH_CHECK_VALUE(!std::isfinite(m) || m <= range_limit<T>(b), "rbe_ffn: ", what, " has values up to |x| = ", m,
                      ", beyond what the ", sizeof(T) == 4 ? "float32" : "float64",
                      " transform-domain kernels take at block_size ", b, " (", range_limit<T>(b),
                      " = the type's maximum / (4 * block_size)); scale it down",
                      sizeof(T) == 4 ? " or compute in float64" : "");
    return m;
}

// after the kernels: results computed from finite inputs (in_max) and finite parameters must be finite
template <typename T>
static void check_finite_results(std::initializer_list<Tensor> results, double in_max,
                                 std::initializer_list<c10::optional<Tensor>> params, const char* what) {
    if (!std::isfinite(in_max)) return;
    bool finite = true;
    for (const Tensor& r : results) finite = finite && (r.numel() == 0 || std::isfinite(max_abs_of<T>(r)));
    if (finite) return;
    for (const auto& p : params)  // only on failure: non-finite parameters propagate, as in a dense layer
        if (p.has_value() && p->numel() > 0 && !std::isfinite(max_abs_of<T>(*p))) return;
    TORCH_CHECK_VALUE(false, "rbe_ffn: ", what, " overflowed ", sizeof(T) == 4 ? "float32" : "float64",
                      " (non-finite values from finite inputs and parameters, max |input| = ", in_max,
                      "); scale the input or the weights down", sizeof(T) == 4 ? ", or compute in float64" : "");
}

template <typename T>
static T* ptr_or_null(const c10::optional<Tensor>& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---- operators: linear ----
Tensor linear_cpu(const Tensor& x, const Tensor& plan, const Tensor& basis, const Tensor& coeffs, const Tensor& index,
                  const c10::optional<Tensor>& bias, int64_t in, int64_t out, double coeff_scale,
                  double pattern_scale, bool bf16_sparse) {
    Tensor x2 = as_tokens(x, in, "input");
    Plan P = check_plan(plan, x.scalar_type(), x.device());
    Weight W = check_weight("linear", basis, coeffs, index, out, in, P.b, x.scalar_type(), x.device());
    const Scales sc = check_scales(coeff_scale, pattern_scale, "the linear layer");
    check_bias(bias, out, x.scalar_type(), x.device(), "bias");
    const c10::optional<Tensor> bc = contiguous_or_none(bias);
    // y is allocated in the input's leading shape (contiguous: the kernels write it as [T, out]),
    // so the operator returns a base tensor, not a view (FSDP2 warns about views)
    Tensor y = at::empty(with_last(x, out), x2.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_linear", [&] {
        const double m = check_range<scalar_t>(x2, P.b, "input");
        const int64_t Tn = x2.size(0);
        if (dct_path_enabled()) {
            y = dct_linear(x, x2, W, sc, bc);
        } else if (few_tokens(Tn)) {
            Tensor At = few_tables<scalar_t>(P, x2.options());
            Tensor Xf = few_analyse<scalar_t>(x2.data_ptr<scalar_t>(), Tn, in, P, At.data_ptr<scalar_t>(), x2.options());
            scale_rows(Xf.data_ptr<scalar_t>(), cdiv(in, P.b), P, Tn, sc);
            few_linear_raw<scalar_t>(y.data_ptr<scalar_t>(), nullptr, nullptr, Xf.data_ptr<scalar_t>(), Tn, W,
                                     ptr_or_null<scalar_t>(bc), RBE_ACT_NONE, P, At.data_ptr<scalar_t>());
        } else {
            linear_raw<scalar_t>(y.data_ptr<scalar_t>(), nullptr, x2.data_ptr<scalar_t>(), Tn, W,
                                 ptr_or_null<scalar_t>(bc), RBE_ACT_NONE, P, x2.options(), nullptr, nullptr, nullptr, sc,
                                 bf16_sparse);
        }
        check_finite_results<scalar_t>({y}, m, {W.basis, W.coeffs, bc}, "the output");
    });
    return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& plan,
                                                               const Tensor& basis, const Tensor& coeffs,
                                                               const Tensor& index, int64_t in, int64_t out,
                                                               std::array<bool, 4> mask, double coeff_scale,
                                                               double pattern_scale, bool bf16_sparse) {
    Tensor x2 = as_tokens(x, in, "input");
    Tensor g2 = as_tokens(grad, out, "grad");
    TORCH_CHECK_VALUE(g2.size(0) == x2.size(0) && grad.scalar_type() == x.scalar_type(),
                      "rbe_ffn: grad must match the input's tokens and dtype");
    Plan P = check_plan(plan, x.scalar_type(), x.device());
    Weight W = check_weight("linear", basis, coeffs, index, out, in, P.b, x.scalar_type(), x.device());
    const Scales sc = check_scales(coeff_scale, pattern_scale, "the linear layer");
    auto opt = x2.options();
    Tensor dx = mask[0] ? at::empty(x.sizes(), opt) : at::empty({0}, opt);
    Tensor db = mask[1] ? at::empty(W.basis.sizes(), opt) : at::empty({0}, opt);
    Tensor dc = mask[2] ? at::empty(W.coeffs.sizes(), opt) : at::empty({0}, opt);
    Tensor dbias = mask[3] ? at::empty({out}, opt) : at::empty({0}, opt);
    if (x2.size(0) == 0) {  // no tokens: zero parameter gradients
        db.zero_(), dc.zero_(), dbias.zero_();
        return {dx, db, dc, dbias};
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_linear_backward", [&] {
        using T = scalar_t;
        const double mg = check_range<T>(g2, P.b, "grad", true), mx = check_range<T>(x2, P.b, "input");
        if (dct_path_enabled()) {
            std::tie(dx, db, dc, dbias) = dct_linear_backward(x, x2, g2, W, sc, mask);
        } else {
            if (linear_backward_raw<T>(mask[0] ? dx.data_ptr<T>() : nullptr, mask[1] ? db.data_ptr<T>() : nullptr,
                                       mask[2] ? dc.data_ptr<T>() : nullptr, mask[3] ? dbias.data_ptr<T>() : nullptr,
                                       0, g2.data_ptr<T>(), x2.data_ptr<T>(), x2.size(0), W, P, opt, nullptr,
                                       nullptr, sc, bf16_sparse))
                scale_param_grads(db, dc, sc);
        }
        const double m = std::isfinite(mg) ? mx : mg;
        check_finite_results<T>({dx, db, dc, dbias}, m, {W.basis, W.coeffs}, "the gradient");
    });
    return {dx, db, dc, dbias};
}

// ---- operators: the feed-forward block ----
// transform-domain buffer of a [tokens, d_ff] hidden activation (fc2's input)
// (its tiles are its first dimension: a tile's numbers are its stride(0))
static std::vector<int64_t> hidden_shape(int64_t tokens, int64_t d_ff, const Plan& P) {
    return {cdiv(tokens, RBE_TILE), cdiv(d_ff, P.b), P.b + P.nf, RBE_TILE};
}
static Tensor hidden_analysis(int64_t tokens, int64_t d_ff, const Plan& P, const at::TensorOptions& opt) {
    return at::empty(hidden_shape(tokens, d_ff, P), opt);
}

// Whether the standard (keep_pre) CPU feed-forward keeps, for its backward, act'(h) in `pre` and
// fc2's analysed input (hidden_analysis of act(h), unscaled) in `hidden`, instead of h: then the
// backward evaluates no activation and analyses no [T, d_ff] input for fc2's parameter gradients.
// For the activations whose value and derivative share work (relu's backward must pass +0 where
// h <= 0 even for an infinite gradient), beyond the few-token path, on chunks of whole tiles (each
// chunk writes its own tiles of `hidden`), and off the DCT-domain path. The fake kernel
// (python/rbe_ffn/_ops.py, saves_hidden) writes the same rule over a symbolic token count, which
// tests/test_ffn.py checks against this function.
static bool hidden_keepable(int64_t Tn, int64_t chunk_tokens, const std::string& activation) {
    const bool fusable = activation == "gelu" || activation == "gelu_tanh" || activation == "silu";
    return fusable && Tn > FEW_TOKENS && (chunk_tokens <= 0 || chunk_tokens % RBE_TILE == 0 || chunk_tokens >= Tn);
}
bool ffn_saves_hidden(int64_t Tn, int64_t chunk_tokens, const std::string& activation) {
    return !dct_path_enabled() && hidden_keepable(Tn, chunk_tokens, activation);
}
// Where the standard forward saves `hidden`, whether its act'(h) in `pre` is kept in tiles
// (RBE_ACT_PRE_TILES: [tiles, ceil(d_ff/b), b, 64], act_tiles_shape) for the backward to hand fc2's
// input gradient on (rbe_grad_next_f32): float32 on the x86 kernels with float32 operands, the
// kernels that can. Elsewhere pre is [*, d_ff]. The fake kernel asks this function.
bool ffn_pre_in_tiles(bool float32, bool bf16_sparse) {
    return float32 && rbe_cpu_isa_level() >= RBE_ISA_AVX2 && !(bf16_sparse && rbe_bf16_sparse_available());
}
static std::vector<int64_t> act_tiles_shape(int64_t tokens, int64_t d_ff, const Plan& P) {
    return {cdiv(tokens, RBE_TILE), cdiv(d_ff, P.b), P.b, RBE_TILE};
}

std::tuple<Tensor, Tensor, Tensor> ffn_cpu(const Tensor& x, const Tensor& plan, const Tensor& basis1,
                                           const Tensor& coeffs1, const Tensor& index1,
                                           const c10::optional<Tensor>& bias1, const Tensor& basis2,
                                           const Tensor& coeffs2, const Tensor& index2,
                                           const c10::optional<Tensor>& bias2, int64_t d_model, int64_t d_ff,
                                           std::string activation, int64_t chunk_tokens, bool keep_pre,
                                           double coeff_scale1, double coeff_scale2, double pattern_scale1,
                                           double pattern_scale2, bool f32_activation, bool bf16_sparse) {
    FFNArgs a = check_ffn(x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, bias2, d_model, d_ff,
                          activation, chunk_tokens, check_scales(coeff_scale1, pattern_scale1, "fc1"),
                          check_scales(coeff_scale2, pattern_scale2, "fc2"));
    const int64_t Tn = a.x2.size(0);
    auto opt = a.x2.options();
    Tensor y = at::empty(x.sizes(), opt);  // [T, d_model] in x's shape: a base tensor, not a view
    const bool saves = keep_pre && ffn_saves_hidden(Tn, chunk_tokens, activation);
    const bool tiles = saves && ffn_pre_in_tiles(x.scalar_type() == at::kFloat, bf16_sparse);
    Tensor pre = tiles      ? at::empty(act_tiles_shape(Tn, d_ff, a.P), opt)
                 : keep_pre ? at::empty(with_last(x, d_ff), opt)
                            : at::empty({0}, opt);
    Tensor hidden = saves ? hidden_analysis(Tn, d_ff, a.P, opt) : at::empty({0}, opt);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_ffn", [&] {
        using T = scalar_t;
        const double m = check_range<T>(a.x2, a.P.b, "input");
        if (dct_path_enabled()) {
            std::tie(y, pre) = dct_ffn(x, a, keep_pre);
            hidden = at::empty({0}, opt);  // (the path was switched on since `saves` was decided)
            check_finite_results<T>({y}, m, {a.W1.basis, a.W1.coeffs, a.bias1, a.W2.basis, a.W2.coeffs, a.bias2},
                                    "the output");
            return;
        }
        a.act = with_f32_activation(a.act, f32_activation, x.scalar_type());
        if (few_tokens(Tn)) {  // a token's bits do not depend on the chunks
            Tensor At = few_tables<T>(a.P, opt);
            const T* at_ = At.data_ptr<T>();
            for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {  // chunks: the memory limit
                const int64_t n = std::min(Tn - t0, a.chunk);
                Tensor Xf1 = few_analyse<T>(a.x2.data_ptr<T>() + t0 * d_model, n, d_model, a.P, at_, opt);
                Tensor Xf2 = at::empty({(int64_t)rbe_few_size((int)d_ff, (int)a.P.b, (int)a.P.nf, (long)n)}, opt);
                scale_rows(Xf1.data_ptr<T>(), cdiv(d_model, a.P.b), a.P, n, a.scales1);
                few_linear_raw<T>(nullptr, keep_pre ? pre.data_ptr<T>() + t0 * d_ff : nullptr, Xf2.data_ptr<T>(),
                                  Xf1.data_ptr<T>(), n, a.W1, ptr_or_null<T>(a.bias1), a.act, a.P, at_);
                scale_rows(Xf2.data_ptr<T>(), cdiv(d_ff, a.P.b), a.P, n, a.scales2);
                few_linear_raw<T>(y.data_ptr<T>() + t0 * d_model, nullptr, nullptr, Xf2.data_ptr<T>(), n, a.W2,
                                  ptr_or_null<T>(a.bias2), RBE_ACT_NONE, a.P, at_);
            }
            check_finite_results<T>({y}, m, {a.W1.basis, a.W1.coeffs, a.bias1, a.W2.basis, a.W2.coeffs, a.bias2},
                                    "the output");
            return;
        }
        // fc1 writes the activated hidden tile straight into fc2's transform-domain input,
        // so the [T, d_ff] hidden activation never exists token-major. Saving it (ffn_saves_hidden),
        // fc1 writes each chunk's tiles of `hidden`, and pre receives act'(h); fc2 reads them
        // directly, or, off schedules, a scaled copy when fc2 has scales (hidden keeps the unscaled
        // numbers the backward's parameter gradients take)
        const int64_t R2 = cdiv(d_ff, a.P.b), tile_len = saves ? hidden.stride(0) : 0;
        const bool cached = cache_scheds(Tn, a.chunk);
        const bool on = on_schedules<T>(cached, cdiv(std::min(a.chunk, Tn), RBE_TILE));  // (every chunk alike)
        Tensor Xh2 = saves && (on || a.scales2.none()) ? Tensor()
                                                       : hidden_analysis(std::min(a.chunk, Tn), d_ff, a.P, opt);
        SchedCache s1{false, false}, s2{false, false};
        for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
            const int64_t n = std::min(a.chunk, Tn - t0), groups = cdiv(n, RBE_TILE) * R2;
            T* saved = saves ? hidden.data_ptr<T>() + t0 / RBE_TILE * tile_len : nullptr;
            T* pc = !keep_pre ? nullptr
                    : tiles   ? pre.data_ptr<T>() + t0 / RBE_TILE * pre.stride(0)
                              : pre.data_ptr<T>() + t0 * d_ff;
            const int act1 = a.act | (saves ? RBE_ACT_PRE_GRAD : 0) | (tiles ? RBE_ACT_PRE_TILES : 0);
            linear_raw<T>(nullptr, pc, a.x2.data_ptr<T>() + t0 * d_model, n, a.W1, ptr_or_null<T>(a.bias1), act1,
                          a.P, opt, nullptr, saves ? saved : Xh2.data_ptr<T>(), cached ? &s1 : nullptr, a.scales1,
                          bf16_sparse);
            if (!on) {  // (on schedules fc2's scales go into its numbers)
                if (!saves) scale_rows(Xh2.data_ptr<T>(), groups, a.P, RBE_TILE, a.scales2);
                else if (Xh2.defined()) scale_rows(Xh2.data_ptr<T>(), groups, a.P, RBE_TILE, a.scales2, saved);
            }
            linear_raw<T>(y.data_ptr<T>() + t0 * d_model, nullptr, nullptr, n, a.W2, ptr_or_null<T>(a.bias2),
                          RBE_ACT_NONE, a.P, opt, Xh2.defined() ? Xh2.data_ptr<T>() : saved, nullptr,
                          cached ? &s2 : nullptr, on ? a.scales2 : Scales{}, bf16_sparse);
        }
        check_finite_results<T>({y}, m, {a.W1.basis, a.W1.coeffs, a.bias1, a.W2.basis, a.W2.coeffs, a.bias2},
                                "the output");
    });
    return {y, pre, hidden};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward_cpu(
    const Tensor& grad, const Tensor& x, const Tensor& pre, const Tensor& hidden, const Tensor& plan,
    const Tensor& basis1, const Tensor& coeffs1, const Tensor& index1, const c10::optional<Tensor>& bias1,
    const Tensor& basis2, const Tensor& coeffs2, const Tensor& index2, int64_t d_model, int64_t d_ff,
    std::string activation, int64_t chunk_tokens, std::array<bool, 7> mask, double coeff_scale1,
    double coeff_scale2, double pattern_scale1, double pattern_scale2, bool f32_activation, bool bf16_sparse) {
    FFNArgs a = check_ffn(x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, c10::nullopt, d_model,
                          d_ff, activation, chunk_tokens, check_scales(coeff_scale1, pattern_scale1, "fc1"),
                          check_scales(coeff_scale2, pattern_scale2, "fc2"));
    Tensor g2 = as_tokens(grad, d_model, "grad");
    const int64_t Tn = a.x2.size(0);
    TORCH_CHECK_VALUE(g2.size(0) == Tn && grad.scalar_type() == x.scalar_type(),
                      "rbe_ffn: grad must match the input's tokens and dtype");
    const bool saved = pre.numel() > 0;
    // what ffn returned as `hidden`: then pre holds act'(h) (ffn_saves_hidden), in tiles where
    // ffn_pre_in_tiles said so (a 4-dimensional pre), else token-major
    const bool has_hidden = hidden.numel() > 0, tiled = has_hidden && pre.dim() == 4;
    Tensor pre2;  // token-major
    if (tiled) {
        const std::vector<int64_t> want = act_tiles_shape(Tn, d_ff, a.P);
        TORCH_CHECK_VALUE(pre.sizes() == at::IntArrayRef(want) && pre.is_contiguous() &&
                              pre.scalar_type() == x.scalar_type() && pre.device() == x.device(),
                          "rbe_ffn: a saved act'(h) in tiles must be a contiguous ", x.scalar_type(),
                          " tensor of shape ", at::IntArrayRef(want), " on ", x.device(), ", got ", pre.sizes(), " ",
                          pre.scalar_type());
    } else if (saved) {
        pre2 = as_tokens(pre, d_ff, "saved pre-activation");
        TORCH_CHECK_VALUE(pre2.size(0) == Tn && pre.scalar_type() == x.scalar_type(),
                          "rbe_ffn: saved pre-activation has ", pre2.size(0), " tokens of ", pre.scalar_type(),
                          ", expected ", Tn, " of ", x.scalar_type());
    }
    if (has_hidden) {
        TORCH_CHECK_VALUE(saved, "rbe_ffn: ffn_backward got a saved hidden input without its pre (both come from ffn)");
        TORCH_CHECK_VALUE(hidden_keepable(Tn, chunk_tokens, activation),
                          "rbe_ffn: ffn_backward got a saved hidden input that ffn does not save for ", Tn,
                          " tokens, chunk_tokens=", chunk_tokens, ", activation '", activation, "'");
        const std::vector<int64_t> want = hidden_shape(Tn, d_ff, a.P);
        TORCH_CHECK_VALUE(hidden.sizes() == at::IntArrayRef(want) && hidden.is_contiguous() &&
                              hidden.scalar_type() == x.scalar_type() && hidden.device() == x.device(),
                          "rbe_ffn: saved hidden input must be a contiguous ", x.scalar_type(), " tensor of shape ",
                          at::IntArrayRef(want), " on ", x.device(), ", got ", hidden.sizes(), " ",
                          hidden.scalar_type());
    }
    auto opt = a.x2.options();
    auto maybe = [&](bool on, at::IntArrayRef s) { return on ? at::zeros(s, opt) : at::empty({0}, opt); };
    Tensor dx = mask[0] ? at::empty(x.sizes(), opt) : at::empty({0}, opt);
    Tensor db1 = maybe(mask[1], a.W1.basis.sizes()), dc1 = maybe(mask[2], a.W1.coeffs.sizes());
    Tensor dbias1 = maybe(mask[3], {d_ff});
    Tensor db2 = maybe(mask[4], a.W2.basis.sizes()), dc2 = maybe(mask[5], a.W2.coeffs.sizes());
    Tensor dbias2 = maybe(mask[6], {d_model});
    if (Tn == 0) return {dx, db1, dc1, dbias1, db2, dc2, dbias2};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_ffn_backward", [&] {
        using T = scalar_t;
        const double mg = check_range<T>(g2, a.P.b, "grad", true), mx = check_range<T>(a.x2, a.P.b, "input");
        if (dct_path_enabled() && !has_hidden) {  // (what the forward saved decides: the DCT-domain
                                                  // backward takes h, never the hidden input)
            std::tie(dx, db1, dc1, dbias1, db2, dc2, dbias2) = dct_ffn_backward(x, g2, pre2, a, mask);
            const double m = std::isfinite(mg) ? mx : mg;
            check_finite_results<T>({dx, db1, dc1, dbias1, db2, dc2, dbias2}, m,
                                    {a.W1.basis, a.W1.coeffs, a.bias1, a.W2.basis, a.W2.coeffs}, "the gradient");
            return;
        }
        a.act = with_f32_activation(a.act, f32_activation, x.scalar_type());
        const int64_t cn = std::min(a.chunk, Tn);
        // standard: a = act(h) from the saved h, or, with `hidden`, act'(h) and a in the transform
        // domain as saved; checkpointed: h recomputed, and a only in the transform domain (fc1
        // writes fc2's analysed input directly)
        const bool need1 = mask[0] || mask[1] || mask[2] || mask[3];
        // with fc1's gradients wanted, act'(h) is computed with act(h) (one erfc, not two): standard,
        // into dact (the third [chunk, d_ff] buffer the chunk budget counts: hpre is not used);
        // checkpointed, by the recompute into hpre, in place of h (RBE_ACT_PRE_GRAD: h itself is
        // needed for nothing else)
        const bool fused = need1 && fused_act_grad(a.act);
        const bool from_h = saved && !has_hidden;  // act(h) (and act'(h)) evaluated here from h
        Tensor hid = from_h ? at::empty({cn, d_ff}, opt) : Tensor();
        // (token-major [cn, d_ff], or in tiles where the chunk hands on: at least as many numbers)
        const int64_t tiles_numel = cdiv(cn, RBE_TILE) * cdiv(d_ff, a.P.b) * a.P.b * RBE_TILE;
        Tensor hpre = saved ? Tensor() : at::empty({std::max(cn * d_ff, tiles_numel)}, opt);
        Tensor dact = fused && from_h ? at::empty({cn, d_ff}, opt) : Tensor();
        const int64_t tile_len = has_hidden ? hidden.stride(0) : 0;
        Tensor dh;  // fc2's input gradient, token-major: where it is not handed on
        const bool cached = cache_scheds(Tn, a.chunk);
        bool on1 = false, on2 = false;  // whether the chunks ran on schedules (linear_backward_raw)
        // fc2's input gradient (dh) is wanted whenever fc1's gradients are
        SchedCache s1 = backward_scheds<T>(mask[0], mask[2], bf16_sparse, a.W1),
                   s2 = backward_scheds<T>(need1, mask[5], bf16_sparse, a.W2);
        // fc2's input gradient handed straight on to fc1 (rbe_grad_next_f32): no token-major dh, and
        // no passes of their own for dh * act'(h), fc1's bias sums and the analysis of its output
        // gradient. Where fc2's one-pass kernel runs (s2.cols_pos, on a schedule: a chunk of one tile
        // without a cache builds none), act'(h) is at hand in tiles (the forward kept it so, or the
        // checkpointed recompute writes it so) and fc1 wants more than its bias.
        auto hands_on = [&](int64_t n) {
            return std::is_same_v<T, float> && fused && s2.cols_pos && (mask[0] || mask[1] || mask[2]) &&
                   (cached || n > RBE_TILE) && (tiled || !saved);
        };
        for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
            const int64_t n = std::min(a.chunk, Tn - t0);
            const int acc = t0 > 0;
            const T* xc = a.x2.data_ptr<T>() + t0 * d_model;
            const T* h = nullptr;
            const T* gt = nullptr;  // act'(h) in tiles (RBE_ACT_PRE_TILES)
            Tensor Xh2;  // checkpointed: fc2's input in the transform domain, freed before fc1's backward
            const T* Xs = nullptr;  // fc2's input in the transform domain, as saved or recomputed
            if (has_hidden) {
                if (tiled) gt = pre.data_ptr<T>() + t0 / RBE_TILE * pre.stride(0);
                else h = pre2.data_ptr<T>() + t0 * d_ff;  // act'(h)
                Xs = hidden.data_ptr<T>() + t0 / RBE_TILE * tile_len;
            } else if (saved) {
                h = pre2.data_ptr<T>() + t0 * d_ff;
                T* hp = hid.data_ptr<T>();
                T* gp = fused ? dact.data_ptr<T>() : nullptr;  // (saved here)
                at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
                    const long len = (long)((r1 - r0) * d_ff);
                    if (fused) act_forward_grad(hp + r0 * d_ff, gp + r0 * d_ff, h + r0 * d_ff, len, a.act);
                    else act_forward(hp + r0 * d_ff, h + r0 * d_ff, len, a.act);
                });
            } else {
                Xh2 = hidden_analysis(n, d_ff, a.P, opt);
                const int in_tiles = hands_on(n) ? RBE_ACT_PRE_TILES : 0;
                linear_raw<T>(nullptr, hpre.data_ptr<T>(), xc, n, a.W1, ptr_or_null<T>(a.bias1),
                              fused ? a.act | RBE_ACT_PRE_GRAD | in_tiles : a.act, a.P, opt, nullptr,
                              Xh2.data_ptr<T>(), cached ? &s1 : nullptr, a.scales1, bf16_sparse);
                (in_tiles ? gt : h) = hpre.data_ptr<T>();
                Xs = Xh2.data_ptr<T>();
            }
            // act'(h) token-major, where fused: evaluated here from h, else h itself (saved or recomputed
            // as act'; null where it is in tiles: gt)
            const T* gp = !fused ? nullptr : from_h ? dact.data_ptr<T>() : h;
            const T* g2c = g2.data_ptr<T>() + t0 * d_model;
            T* db2p = mask[4] ? db2.data_ptr<T>() : nullptr;
            T* dc2p = mask[5] ? dc2.data_ptr<T>() : nullptr;
            T* dbias2p = mask[6] ? dbias2.data_ptr<T>() : nullptr;
            const T* hidp = from_h ? hid.data_ptr<T>() : nullptr;
            T* dxp = mask[0] ? dx.data_ptr<T>() + t0 * d_model : nullptr;
            T* db1p = mask[1] ? db1.data_ptr<T>() : nullptr;
            T* dc1p = mask[2] ? dc1.data_ptr<T>() : nullptr;
            T* dbias1p = mask[3] ? dbias1.data_ptr<T>() : nullptr;
            // with the schedules kept for the call, each coefficient's sum runs on over the chunks and
            // reaches dcoeffs once, after the last (RBE_SUMS_*): the sums an unchunked call gives
            const int sums = cached ? (t0 > 0 ? RBE_SUMS_CONTINUE : 0) | (t0 + n < Tn ? RBE_SUMS_HOLD : 0) : 0;
            if (hands_on(n)) {  // (fc1's gradients wanted: need1)
                // fc1's output gradient, analysed: the same numbers as analysing dh would give
                Tensor Gh1 = hidden_analysis(n, d_ff, a.P, opt);
                const rbe_grad_next_f32 next = grad_next(gt, Gh1, dbias1p, acc);
                on2 = linear_backward_raw<T>(nullptr, db2p, dc2p, dbias2p, acc, g2c, hidp, n, a.W2, a.P, opt, Xs,
                                             cached ? &s2 : nullptr, a.scales2, bf16_sparse, &next, Tensor(), sums);
                Xh2.reset();
                on1 = linear_backward_raw<T>(dxp, db1p, dc1p, nullptr, acc, nullptr, xc, n, a.W1, a.P, opt, nullptr,
                                             cached ? &s1 : nullptr, a.scales1, bf16_sparse, nullptr, Gh1, sums);
                continue;
            }
            if (need1 && !dh.defined()) dh = at::empty({cn, d_ff}, opt);
            on2 = linear_backward_raw<T>(need1 ? dh.data_ptr<T>() : nullptr, db2p, dc2p, dbias2p, acc, g2c, hidp, n,
                                         a.W2, a.P, opt, Xs, cached ? &s2 : nullptr, a.scales2, bf16_sparse, nullptr,
                                         Tensor(), sums);
            Xh2.reset();  // so the chunk's peak is h, dh and one transform-domain copy (the memory limit's budget)
            if (!need1) continue;
            T* dhp = dh.data_ptr<T>();
            if (gt) mul_by_tiles(dhp, gt, n, d_ff, a.P.b);  // (fused: act'(h) kept in tiles, not handed on)
            else at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
                if (fused) {  // dh * act'(h): what act_backward computes, with act'(h) already at hand
                    for (int64_t i = r0 * d_ff; i < r1 * d_ff; i++) dhp[i] *= gp[i];
                } else {
                    act_backward(dhp + r0 * d_ff, dhp + r0 * d_ff, h + r0 * d_ff, (long)((r1 - r0) * d_ff), a.act);
                }
            });
            on1 = linear_backward_raw<T>(dxp, db1p, dc1p, dbias1p, acc, dhp, xc, n, a.W1, a.P, opt, nullptr,
                                         cached ? &s1 : nullptr, a.scales1, bf16_sparse, nullptr, Tensor(), sums);
        }
        if (on1) scale_param_grads(db1, dc1, a.scales1);  // (every chunk ran the same way)
        if (on2) scale_param_grads(db2, dc2, a.scales2);
        const double m = std::isfinite(mg) ? mx : mg;
        check_finite_results<T>({dx, db1, dc1, dbias1, db2, dc2, dbias2}, m,
                                {a.W1.basis, a.W1.coeffs, a.bias1, a.W2.basis, a.W2.coeffs}, "the gradient");
    });
    return {dx, db1, dc1, dbias1, db2, dc2, dbias2};
}

// ---- operators: activations alone (tests compare them with torch's) ----
Tensor activation_cpu(const Tensor& x, std::string activation) {
    check_float(x, "input");
    const int act = act_code(activation);
    Tensor xc = x.contiguous(), y = at::empty_like(xc);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_activation", [&] {
        scalar_t* yp = y.data_ptr<scalar_t>();
        const scalar_t* xp = xc.data_ptr<scalar_t>();
        at::parallel_for(0, xc.numel(), 4096, [&](int64_t i0, int64_t i1) {
            act_forward(yp + i0, xp + i0, (long)(i1 - i0), act);
        });
    });
    return y;
}

Tensor activation_backward_cpu(const Tensor& grad, const Tensor& x, std::string activation) {
    check_float(x, "input");
    TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
                      "rbe_ffn: grad must match the input's shape and dtype");
    const int act = act_code(activation);
    Tensor xc = x.contiguous(), gc = grad.contiguous(), dx = at::empty_like(xc);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rbe_activation_backward", [&] {
        scalar_t* dp = dx.data_ptr<scalar_t>();
        const scalar_t *gp = gc.data_ptr<scalar_t>(), *xp = xc.data_ptr<scalar_t>();
        at::parallel_for(0, xc.numel(), 4096, [&](int64_t i0, int64_t i1) {
            act_backward(dp + i0, gp + i0, xp + i0, (long)(i1 - i0), act);
        });
    });
    return dx;
}

// ---- one token from packed coefficients (rbe.h): the pack, and the operators that read it ----
// A pack is one uint8 tensor: eight int64 (PACK_MAGIC, out, in, b, k, steps, layout, 0), then the
// arrays of rbe_packed_f32 of its layout, each on a 64-byte boundary: RBE_PACK_STEPS (first, nstep,
// mask, val, col) where the kernels are AVX-512 or portable, RBE_PACK_ROWS (first, gsteps,
// lane_row, val, src) where they are AVX2 and the weight's sources fit 16 bits. Either layout is
// read by either x86 kernel set (the same bits); the portable kernels undo it.
static constexpr int64_t PACK_MAGIC = 0x314b434150454252;  // "RBEPACK1", little-endian
struct PackLayout {  // byte offsets of the arrays of rbe_packed_f32 in a pack, and its size
    int64_t first, val, bytes;       // both layouts
    int64_t nstep, mask, col;        // RBE_PACK_STEPS
    int64_t gsteps, lane_row, src;   // RBE_PACK_ROWS
};
static PackLayout pack_layout(int64_t layout, int64_t out, int64_t in, int64_t b, int64_t k, int64_t steps) {
    auto up = [](int64_t n) { return (n + 63) / 64 * 64; };
    const int64_t R = cdiv(out, b), nblk = R * cdiv(in, b);
    PackLayout L{};
    L.first = 64;
    if (layout == RBE_PACK_ROWS) {
        const int64_t groups = R * RBE_FEW_STREAMS * rbe_pack_row_groups((int)b);
        L.gsteps = L.first + up(4 * (R + 1));
        L.lane_row = L.gsteps + up(2 * groups);
        L.val = L.lane_row + up(groups * RBE_PACK_ROW_LANES);
        L.src = L.val + up(4 * steps * RBE_PACK_ROW_LANES);
        L.bytes = L.src + 2 * steps * RBE_PACK_ROW_LANES;
        return L;
    }
    L.nstep = L.first + up(4 * (nblk + 1));
    L.mask = L.nstep + up(nblk * rbe_pack_groups((int)b));
    L.val = L.mask + up(2 * steps);
    L.col = L.val + up(4 * nblk * k);
    L.bytes = L.col + steps * RBE_PACK_LANES;
    return L;
}

// the shapes the packed kernels take: b up to RBE_PACK_MAX_B (their row tables), sizes they index
// with int and int32
static void check_pack_shape(const char* name, int64_t out, int64_t in, int64_t b) {
    check_block_size(b);
    TORCH_CHECK_VALUE(b <= RBE_PACK_MAX_B, "rbe_ffn: ", name, ": block_size ", b, " is past the packed kernels' ",
                      RBE_PACK_MAX_B);
    TORCH_CHECK_VALUE(out > 0 && in > 0 && out <= INT32_MAX && in <= INT32_MAX, "rbe_ffn: ", name,
                      ": sizes must be in [1, 2^31), got out=", out, " in=", in);
}

// RBE_PACK_ROWS takes sources j*b + v below 65536 (and a zero at C*b)
static bool rows_fit(int64_t in, int64_t b) { return cdiv(in, b) * b <= 65535; }

Tensor pack_coeffs_cpu(const Tensor& coeffs, const Tensor& index, int64_t out, int64_t in, int64_t b) {
    check_pack_shape("pack_coeffs", out, in, b);
    TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kFloat, "rbe_ffn: pack_coeffs: coeffs must be float32 (the packed "
                     "kernels are float32), got ", coeffs.scalar_type());
    TORCH_CHECK_TYPE(index.scalar_type() == at::kShort || index.scalar_type() == at::kInt,
                     "rbe_ffn: pack_coeffs: index must be int16 or int32, got ", index.scalar_type());
    const int64_t nblk = cdiv(out, b) * cdiv(in, b);
    TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(0) == nblk && coeffs.size(1) <= b * b && index.sizes() ==
                      coeffs.sizes(), "rbe_ffn: pack_coeffs: coeffs and index must be [", nblk, ", k] with k <= ",
                      b * b, " for a ", out, "x", in, " weight at block_size ", b, ", got ", coeffs.sizes(), " and ",
                      index.sizes());
    const int64_t k = coeffs.size(1);
    const bool wide = index.scalar_type() == at::kInt;
    Tensor cf = coeffs.contiguous();
    Tensor ix = k > 0 ? checked_index("pack_coeffs", index.contiguous(), nblk, k, b, wide) : index;
    const int64_t layout = rbe_cpu_isa_level() == RBE_ISA_AVX2 && rows_fit(in, b) ? RBE_PACK_ROWS : RBE_PACK_STEPS;
    const bool rowpack = layout == RBE_PACK_ROWS;
    std::vector<int32_t> work(rowpack ? rbe_pack_rows_work((int)in, (int)b) : 2 * b + 1);
    const long steps = rowpack ? rbe_pack_rows_steps(work.data(), ix.data_ptr(), wide, (int)out, (int)in, (int)k, (int)b)
                               : rbe_pack_steps(work.data(), ix.data_ptr(), wide, (long)nblk, (int)k, (int)b);
    TORCH_CHECK_VALUE(steps <= INT32_MAX, "rbe_ffn: pack_coeffs: the weight is too large to pack (",
                      steps, " steps)");
    const PackLayout L = pack_layout(layout, out, in, b, k, steps);
    Tensor blob = at::zeros({L.bytes}, coeffs.options().dtype(at::kByte));
    uint8_t* p = blob.data_ptr<uint8_t>();
    const int64_t head[8] = {PACK_MAGIC, out, in, b, k, (int64_t)steps, layout, 0};
    memcpy(p, head, sizeof head);
    if (rowpack)
        rbe_pack_rows_f32((int32_t*)(p + L.first), (uint16_t*)(p + L.gsteps), p + L.lane_row, (float*)(p + L.val),
                          (uint16_t*)(p + L.src), work.data(), cf.data_ptr<float>(), ix.data_ptr(), wide, (int)out,
                          (int)in, (int)k, (int)b);
    else
        rbe_pack_f32((int32_t*)(p + L.first), p + L.nstep, (uint16_t*)(p + L.mask), (float*)(p + L.val), p + L.col,
                     work.data(), cf.data_ptr<float>(), ix.data_ptr(), wide, (long)nblk, (int)k, (int)b);
    return blob;
}

// The kernels' view of a pack for an out x in weight at block size b, its header and size checked
// (its offsets the kernels check as they follow them). blob: made contiguous and 64-byte aligned.
static rbe_packed_f32 packed_view(Tensor& blob, const char* name, int64_t out, int64_t in, int64_t b) {
    TORCH_CHECK_TYPE(blob.scalar_type() == at::kByte && blob.dim() == 1, "rbe_ffn: ", name, " must be the uint8 "
                     "tensor rbe_ffn.pack_coeffs makes, got ", blob.scalar_type(), " of shape ", blob.sizes());
    TORCH_CHECK_VALUE(blob.device().is_cpu(), "rbe_ffn: ", name, " must be on the CPU");
    if (!blob.is_contiguous() || reinterpret_cast<uintptr_t>(blob.data_ptr()) % 64) blob = blob.clone();
    TORCH_CHECK_VALUE(blob.numel() >= 64, "rbe_ffn: ", name, " is not a pack (", blob.numel(), " bytes)");
    int64_t h[8];
    memcpy(h, blob.data_ptr(), sizeof h);
    TORCH_CHECK_VALUE(h[0] == PACK_MAGIC, "rbe_ffn: ", name, " is not a pack made by rbe_ffn.pack_coeffs");
    check_pack_shape(name, out, in, b);
    TORCH_CHECK_VALUE(h[1] == out && h[2] == in && h[3] == b, "rbe_ffn: ", name, " packs a ", h[1], "x", h[2],
                      " weight at block_size ", h[3], ", not ", out, "x", in, " at ", b);
    const int64_t nblk = cdiv(out, b) * cdiv(in, b), k = h[4], steps = h[5], layout = h[6];
    const bool rowpack = layout == RBE_PACK_ROWS;
    TORCH_CHECK_VALUE((layout == RBE_PACK_STEPS || (rowpack && rows_fit(in, b))) && h[7] == 0 && k >= 0 &&
                      k <= b * b && steps >= 0 && steps <= INT32_MAX &&
                      (rowpack || steps <= nblk * rbe_pack_groups((int)b) * b), "rbe_ffn: ", name,
                      " is corrupted (its header is wrong)");
    const PackLayout L = pack_layout(layout, out, in, b, k, steps);
    TORCH_CHECK_VALUE(blob.numel() == L.bytes, "rbe_ffn: ", name, " is corrupted (", blob.numel(),
                      " bytes where its header says ", L.bytes, ")");
    const uint8_t* p = blob.data_ptr<uint8_t>();
    if (rowpack)
        return rbe_packed_f32{(int)out, (int)in, (int)b, (int)k, (long)steps, (const int32_t*)(p + L.first),
                              nullptr, nullptr, (const float*)(p + L.val), nullptr, RBE_PACK_ROWS,
                              (const uint16_t*)(p + L.gsteps), p + L.lane_row, (const uint16_t*)(p + L.src)};
    return rbe_packed_f32{(int)out, (int)in, (int)b, (int)k, (long)steps, (const int32_t*)(p + L.first),
                          p + L.nstep, (const uint16_t*)(p + L.mask), (const float*)(p + L.val), p + L.col,
                          RBE_PACK_STEPS, nullptr, nullptr, nullptr};
}

// A weight read from a pack: its basis (checked), and the pack; on the portable kernels, its
// coefficients and index undone from the pack (rbe_unpack_f32) for the few-token kernels.
struct PackedWeight {
    Tensor basis, blob, coeffs, index;
    rbe_packed_f32 K;
    // the packed coefficient values as a tensor (a view into blob; RBE_PACK_ROWS: with its
    // padding zeros), for check_finite_results
    Tensor values() const {
        const int64_t n = K.layout == RBE_PACK_ROWS ? (int64_t)K.steps * RBE_PACK_ROW_LANES : basis.size(0) * K.k;
        return at::from_blob((void*)K.val, {n}, basis.options());
    }
};
static PackedWeight packed_weight(const char* name, const Tensor& pack, const Tensor& basis, int64_t out,
                                  int64_t in, int64_t b) {
    PackedWeight w{basis.contiguous(), pack, Tensor(), Tensor(), {}};
    w.K = packed_view(w.blob, name, out, in, b);
    const int64_t nblk = cdiv(out, b) * cdiv(in, b);
    TORCH_CHECK_TYPE(basis.scalar_type() == at::kFloat && basis.device().is_cpu(), "rbe_ffn: ", name,
                     ": basis must be a float32 CPU tensor, got ", basis.scalar_type(), " on ", basis.device());
    TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(0) == nblk && basis.size(1) == RBE_NPAT, "rbe_ffn: ", name,
                      ": basis must be [", nblk, ", 8], got ", basis.sizes());
    if (rbe_cpu_isa_level() == RBE_ISA_PORTABLE) {
        w.coeffs = at::empty({nblk, w.K.k}, basis.options());
        w.index = at::empty({nblk, w.K.k}, basis.options().dtype(at::kInt));
        int rc;
        if (w.K.layout == RBE_PACK_ROWS) {
            std::vector<int32_t> work(rbe_pack_rows_work((int)in, (int)b));
            rc = rbe_unpack_rows_f32(w.coeffs.data_ptr<float>(), w.index.data_ptr<int32_t>(), work.data(), &w.K, 0,
                                     (long)cdiv(out, b));
        } else {
            rc = rbe_unpack_f32(w.coeffs.data_ptr<float>(), w.index.data_ptr<int32_t>(), &w.K, 0, (long)nblk);
        }
        TORCH_CHECK_VALUE(rc == 0, "rbe_ffn: ", name, " is corrupted");
    }
    return w;
}

// y (and Xnext) of one token from Xf (its one-token analysis), as few_linear_raw at T = 1
static void packed_linear_raw(float* y, float* Xnext, const float* Xf, const PackedWeight& w, const float* bias,
                              int act, const Plan& P, const float* At, const char* name) {
    const int64_t out = w.K.out, b = w.K.b;
    if (w.coeffs.defined()) {  // the portable kernels: the few-token forward of the undone weight
        Weight W{w.basis, w.coeffs, w.index, out, w.K.in, b, w.K.k, 1};
        few_linear_raw<float>(y, nullptr, Xnext, Xf, 1, W, bias, act, P, At);
        return;
    }
    const rbe_weight_f32 cw{w.basis.data_ptr<float>(), nullptr, nullptr, 1, (int)out, w.K.in, (int)b, w.K.k};
    const auto cp = cplan<float>(P);
    std::atomic<int> bad{0};
    balanced_for(cdiv(out, b), [&](const auto& take) {
        std::vector<float> s(w.K.layout == RBE_PACK_ROWS ? rbe_one_scratch(w.K.in, (int)b, (int)P.nf)
                                                          : rbe_few_scratch((int)b, (int)P.nf));
        for (int64_t p; (p = take()) >= 0;)
            if (rbe_one_rows_forward_f32(y, nullptr, Xnext, Xf, &cw, &w.K, &cp, At, bias, act, s.data(), (long)p,
                                         (long)p + 1))
                bad = 1;
    });
    TORCH_CHECK_VALUE(!bad, "rbe_ffn: ", name, " is corrupted (an offset past its arrays, or a block that does "
                      "not hold its k coefficients)");
}

// Xf = the one-token analysis of x (n features) into a buffer of rbe_few_size(n, b, nf, 1) floats, on
// the calling thread: a few microseconds, less than waking the pool costs
static void packed_analyse(float* Xf, const float* x, int64_t n, const Plan& P, const float* At, const Scales& s) {
    few_analysis(Xf, x, At, (int)P.b, (int)P.nf, 1, (int)n, 0, (long)cdiv(n, P.b));
    scale_rows(Xf, cdiv(n, P.b), P, 1, s);
}

static Tensor packed_input(const Tensor& x, int64_t n, const Tensor& plan, Plan& P) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "rbe_ffn: the packed operators take float32 inputs, got ",
                     x.scalar_type());
    Tensor x2 = as_tokens(x, n, "input");
    P = check_plan(plan, at::kFloat, x.device());
    TORCH_CHECK_VALUE(x.device().is_cpu(), "rbe_ffn: the packed operators run on the CPU");
    return x2;
}

Tensor linear_packed_cpu(const Tensor& x, const Tensor& plan, const Tensor& pack, const Tensor& basis,
                         const c10::optional<Tensor>& bias, int64_t in, int64_t out, double coeff_scale,
                         double pattern_scale) {
    Plan P;
    Tensor x2 = packed_input(x, in, plan, P);
    const PackedWeight w = packed_weight("pack", pack, basis, out, in, P.b);
    const Scales sc = check_scales(coeff_scale, pattern_scale, "the linear layer");
    check_bias(bias, out, at::kFloat, x.device(), "bias");
    const c10::optional<Tensor> bc = contiguous_or_none(bias);
    Tensor y = at::empty(with_last(x, out), x2.options());
    const double m = check_range<float>(x2, P.b, "input");
    Tensor At = few_tables<float>(P, x2.options());
    Tensor Xf = at::empty({(int64_t)rbe_few_size((int)in, (int)P.b, (int)P.nf, 1)}, x2.options());
    for (int64_t t = 0; t < x2.size(0); t++) {
        packed_analyse(Xf.data_ptr<float>(), x2.data_ptr<float>() + t * in, in, P, At.data_ptr<float>(), sc);
        packed_linear_raw(y.data_ptr<float>() + t * out, nullptr, Xf.data_ptr<float>(), w, ptr_or_null<float>(bc),
                          RBE_ACT_NONE, P, At.data_ptr<float>(), "pack");
    }
    check_finite_results<float>({y}, m, {w.basis, w.values(), bc}, "the output");
    return y;
}

Tensor ffn_packed_cpu(const Tensor& x, const Tensor& plan, const Tensor& pack1, const Tensor& basis1,
                      const c10::optional<Tensor>& bias1, const Tensor& pack2, const Tensor& basis2,
                      const c10::optional<Tensor>& bias2, int64_t d_model, int64_t d_ff, std::string activation,
                      double coeff_scale1, double coeff_scale2, double pattern_scale1, double pattern_scale2,
                      bool f32_activation) {
    Plan P;
    Tensor x2 = packed_input(x, d_model, plan, P);
    const PackedWeight w1 = packed_weight("pack1", pack1, basis1, d_ff, d_model, P.b);
    const PackedWeight w2 = packed_weight("pack2", pack2, basis2, d_model, d_ff, P.b);
    const Scales s1 = check_scales(coeff_scale1, pattern_scale1, "fc1"), s2 = check_scales(coeff_scale2,
                                                                                         pattern_scale2, "fc2");
    check_bias(bias1, d_ff, at::kFloat, x.device(), "fc1.bias");
    check_bias(bias2, d_model, at::kFloat, x.device(), "fc2.bias");
    const c10::optional<Tensor> b1 = contiguous_or_none(bias1), b2 = contiguous_or_none(bias2);
    const int act = with_f32_activation(act_code(activation), f32_activation, at::kFloat);
    Tensor y = at::empty(x.sizes(), x2.options());
    const double m = check_range<float>(x2, P.b, "input");
    Tensor At = few_tables<float>(P, x2.options());
    const float* at_ = At.data_ptr<float>();
    Tensor Xf1 = at::empty({(int64_t)rbe_few_size((int)d_model, (int)P.b, (int)P.nf, 1)}, x2.options());
    Tensor Xf2 = at::empty({(int64_t)rbe_few_size((int)d_ff, (int)P.b, (int)P.nf, 1)}, x2.options());
    for (int64_t t = 0; t < x2.size(0); t++) {  // token by token: each token's bits as the ffn operator's at T = 1
        packed_analyse(Xf1.data_ptr<float>(), x2.data_ptr<float>() + t * d_model, d_model, P, at_, s1);
        packed_linear_raw(nullptr, Xf2.data_ptr<float>(), Xf1.data_ptr<float>(), w1, ptr_or_null<float>(b1), act, P,
                          at_, "pack1");
        scale_rows(Xf2.data_ptr<float>(), cdiv(d_ff, P.b), P, 1, s2);
        packed_linear_raw(y.data_ptr<float>() + t * d_model, nullptr, Xf2.data_ptr<float>(), w2,
                          ptr_or_null<float>(b2), RBE_ACT_NONE, P, at_, "pack2");
    }
    check_finite_results<float>({y}, m, {w1.basis, w1.values(), b1, w2.basis, w2.values(), b2}, "the output");
    return y;
}

}  // namespace rbe

TORCH_LIBRARY(rbe_ffn, m) {
    m.def("make_plan(int block_size, float tol) -> Tensor");
    m.def("encode(Tensor weight, int block_size, int k) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("decode(Tensor basis, Tensor coeffs, Tensor index, int out_features, int in_features, int block_size) -> Tensor");
    m.def("linear(Tensor x, Tensor plan, Tensor basis, Tensor coeffs, Tensor index, Tensor? bias, "
          "int in_features, int out_features, float coeff_scale=1., float pattern_scale=1., bool bf16_sparse=False) -> "
          "Tensor");
    m.def("linear_backward(Tensor grad, Tensor x, Tensor plan, Tensor basis, Tensor coeffs, Tensor index, "
          "int in_features, int out_features, bool[4] output_mask, float coeff_scale=1., float pattern_scale=1., "
          "bool bf16_sparse=False) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("ffn(Tensor x, Tensor plan, Tensor basis1, Tensor coeffs1, Tensor index1, Tensor? bias1, Tensor basis2, "
          "Tensor coeffs2, Tensor index2, Tensor? bias2, int d_model, int d_ff, str activation, int chunk_tokens, "
          "bool keep_pre, float coeff_scale1=1., float coeff_scale2=1., float pattern_scale1=1., "
          "float pattern_scale2=1., bool f32_activation=False, bool bf16_sparse=False) -> (Tensor, Tensor, Tensor)");
    m.def("ffn_backward(Tensor grad, Tensor x, Tensor pre, Tensor hidden, Tensor plan, Tensor basis1, Tensor coeffs1, "
          "Tensor index1, Tensor? bias1, Tensor basis2, Tensor coeffs2, Tensor index2, int d_model, int d_ff, "
          "str activation, int chunk_tokens, bool[7] output_mask, float coeff_scale1=1., float coeff_scale2=1., "
          "float pattern_scale1=1., float pattern_scale2=1., bool f32_activation=False, bool bf16_sparse=False) -> "
          "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("pack_coeffs(Tensor coeffs, Tensor index, int out_features, int in_features, int block_size) -> Tensor");
    m.def("linear_packed(Tensor x, Tensor plan, Tensor pack, Tensor basis, Tensor? bias, int in_features, "
          "int out_features, float coeff_scale=1., float pattern_scale=1.) -> Tensor");
    m.def("ffn_packed(Tensor x, Tensor plan, Tensor pack1, Tensor basis1, Tensor? bias1, Tensor pack2, "
          "Tensor basis2, Tensor? bias2, int d_model, int d_ff, str activation, float coeff_scale1=1., "
          "float coeff_scale2=1., float pattern_scale1=1., float pattern_scale2=1., bool f32_activation=False) -> "
          "Tensor");
    m.def("activation(Tensor x, str activation) -> Tensor");
    m.def("activation_backward(Tensor grad, Tensor x, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(rbe_ffn, CompositeExplicitAutograd, m) { m.impl("make_plan", &rbe::make_plan); }

TORCH_LIBRARY_IMPL(rbe_ffn, CPU, m) {
    m.impl("encode", &rbe::encode_cpu);
    m.impl("decode", &rbe::decode_cpu);
    m.impl("linear", &rbe::linear_cpu);
    m.impl("linear_backward", &rbe::linear_backward_cpu);
    m.impl("ffn", &rbe::ffn_cpu);
    m.impl("ffn_backward", &rbe::ffn_backward_cpu);
    m.impl("pack_coeffs", &rbe::pack_coeffs_cpu);
    m.impl("linear_packed", &rbe::linear_packed_cpu);
    m.impl("ffn_packed", &rbe::ffn_packed_cpu);
    m.impl("activation", &rbe::activation_cpu);
    m.impl("activation_backward", &rbe::activation_backward_cpu);
}
