// rbe_ops_common.h - argument checks and tables of the rbe_ffn operators, shared by the CPU
// registration (csrc/rbe_ops.cpp) and the CUDA one (cuda/rbe_ops_cuda.cpp).
// Every tensor a kernel will read is checked here: dtype, device, shape, and on
// CPU the index values (the CUDA file validates those on the device).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "rbe.h"

namespace rbe {

using at::Tensor;

// ---- argument checks ----
inline int act_code(const std::string& name) {
    if (name == "none" || name == "identity") return RBE_ACT_NONE;
    if (name == "gelu") return RBE_ACT_GELU;
    if (name == "gelu_tanh") return RBE_ACT_GELU_TANH;
    if (name == "relu") return RBE_ACT_RELU;
    if (name == "silu") return RBE_ACT_SILU;
    TORCH_CHECK_VALUE(false, "rbe_ffn: unknown activation '", name, "' (expected gelu, gelu_tanh, relu, silu or none)");
}

// the name act_code reads as `code` (the operators' `activation` argument)
inline const char* act_name(int code) {
    switch (code) {
    case RBE_ACT_GELU: return "gelu";
    case RBE_ACT_GELU_TANH: return "gelu_tanh";
    case RBE_ACT_RELU: return "relu";
    case RBE_ACT_SILU: return "silu";
    default: return "none";
    }
}

// float32/float64 everywhere; float16/bfloat16 as well where half_ok (the CUDA operators)
inline void check_float(const Tensor& t, const char* name, bool half_ok = false) {
    const at::ScalarType s = t.scalar_type();
    const bool half = s == at::kHalf || s == at::kBFloat16;
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || (half && half_ok), "rbe_ffn: ", name,
                     " must be float32 or float64", half_ok ? " (or float16/bfloat16)" : "", ", got ", s,
                     half && !half_ok ? " (float16 and bfloat16: only the CUDA linear, feed-forward, decode and activation operators)" : "");
}

inline void check_block_size(int64_t b) {
    TORCH_CHECK_VALUE(b >= 4 && b <= RBE_MAX_B, "rbe_ffn: block_size must be in [4, ", RBE_MAX_B, "], got ", b);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A compressed weight [out, in] at block size b: checks every tensor the kernels will read.
struct Weight {
    Tensor basis, coeffs, index;
    int64_t out, in, b, k;
    int wide;
};

// The caller's index [nblk, k] (contiguous, int16 or int32: wide), on the CPU: a private copy of it,
// validated as it is made. The kernels read this copy, never the caller's tensor: a thread that
// rewrites the index during the call (load_state_dict) can tear the copy but cannot send a
// kernel out of bounds. (CUDA validates on the device, on the same stream as the writes.)
// The copy and its check run over ranges of blocks in torch's thread pool (at one token they
// cost about a tenth of a 768/3072 feed-forward call); the first bad position is the smallest
// over the ranges, as one sequential pass would report it.
inline Tensor checked_index(const char* name, const Tensor& index, int64_t nblk, int64_t k, int64_t b, bool wide) {
    Tensor snap = at::empty(index.sizes(), index.options());
    const int64_t width = wide ? 4 : 2, grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(k, 1));
    char* dst = static_cast<char*>(snap.data_ptr());
    const char* src = static_cast<const char*>(index.data_ptr());
    long bad = -1;
    for (int attempt = 0; attempt < 3; attempt++) {  // a copy torn by a concurrent reload: copy again
        std::atomic<long> first{-1};
        at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
            const long off = (long)(b0 * k);
            const long r = rbe_index_snapshot(dst + off * width, src + off * width, wide, (long)(b1 - b0), (int)k, (int)b);
            if (r < 0) return;
            long cur = first.load();
            while ((cur < 0 || off + r < cur) && !first.compare_exchange_weak(cur, off + r)) {
            }
        });
        bad = first.load();
        if (bad < 0) break;
    }
    TORCH_CHECK_INDEX(bad < 0, "rbe_ffn: ", name, ": index is corrupted at block ", bad / std::max<int64_t>(k, 1),
                      ", slot ", bad % std::max<int64_t>(k, 1),
                      ": positions must be strictly increasing within a block and lie in [0, ", b * b,
                      ") (or another thread kept rewriting it during the call)");
    return snap;
}

inline Weight check_weight(const char* name, const Tensor& basis, const Tensor& coeffs, const Tensor& index,
                           int64_t out, int64_t in, int64_t b, at::ScalarType dtype, at::Device device) {
    check_block_size(b);
    TORCH_CHECK_VALUE(out > 0 && in > 0, "rbe_ffn: ", name, ": sizes must be positive, got out=", out, " in=", in);
    const int64_t nblk = cdiv(out, b) * cdiv(in, b);
    TORCH_CHECK_TYPE(basis.scalar_type() == dtype && coeffs.scalar_type() == dtype, "rbe_ffn: ", name,
                     ": basis and coeffs must have the input's dtype ", dtype, ", got ", basis.scalar_type(), " and ",
                     coeffs.scalar_type());
    TORCH_CHECK_TYPE(index.scalar_type() == at::kShort || index.scalar_type() == at::kInt, "rbe_ffn: ", name,
                     ": index must be int16 or int32, got ", index.scalar_type());
    TORCH_CHECK_VALUE(basis.device() == device && coeffs.device() == device && index.device() == device,
                      "rbe_ffn: ", name, ": tensors must be on the input's device ", device);
    TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(0) == nblk && basis.size(1) == RBE_NPAT, "rbe_ffn: ", name,
                      ": basis must be [", nblk, ", 8] for a ", out, "x", in, " weight at block_size ", b, ", got ",
                      basis.sizes());
    TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(0) == nblk && coeffs.size(1) <= b * b, "rbe_ffn: ", name,
                      ": coeffs must be [", nblk, ", k] with k <= ", b * b, ", got ", coeffs.sizes());
    TORCH_CHECK_VALUE(index.sizes() == coeffs.sizes(), "rbe_ffn: ", name, ": index must have the shape of coeffs ",
                      coeffs.sizes(), ", got ", index.sizes());
    Weight w{basis.contiguous(), coeffs.contiguous(), index.contiguous(), out, in, b, coeffs.size(1),
             index.scalar_type() == at::kInt};
    if (w.k > 0 && w.index.device().is_cpu()) w.index = checked_index(name, w.index, nblk, w.k, b, w.wide);
    return w;
}

// an optional tensor (a bias) made contiguous, or none
inline c10::optional<Tensor> contiguous_or_none(const c10::optional<Tensor>& t) {
    return t.has_value() ? c10::optional<Tensor>(t->contiguous()) : c10::nullopt;
}

inline void check_bias(const c10::optional<Tensor>& bias, int64_t out, at::ScalarType dtype, at::Device device,
                       const char* name) {
    if (!bias.has_value()) return;
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "rbe_ffn: ", name, " must have the input's dtype ", dtype,
                     ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == device, "rbe_ffn: ", name, " must be on the input's device");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "rbe_ffn: ", name, " must be [", out, "], got ",
                      bias->sizes());
}

struct Plan {
    Tensor t;
    int64_t b, nf;
};

// rows [b, b+nf) of the plan's analysis and synthesis slabs satisfy v[n] == v[b-1-n] exactly
template <typename T>
bool pattern_rows_mirrored(const T* plan, int64_t b, int64_t nf) {
    for (int64_t slab = 0; slab < 2; slab++)
        for (int64_t r = b; r < b + nf; r++) {
            const T* v = plan + (slab * (b + nf) + r) * b;
            for (int64_t n = 0; n < b / 2; n++)
                if (!(v[n] == v[b - 1 - n])) return false;
        }
    return true;
}

inline Plan check_plan(const Tensor& plan, at::ScalarType dtype, at::Device device) {
    TORCH_CHECK_VALUE(plan.dim() == 3 && plan.size(0) == 3, "rbe_ffn: plan must be [3, b+nf, b], got ", plan.sizes());
    const int64_t b = plan.size(2), nf = plan.size(1) - b;
    check_block_size(b);
    TORCH_CHECK_VALUE(nf >= RBE_NFIX && nf <= RBE_NFIX + b, "rbe_ffn: plan has a bad number of pattern rows ", nf);
    TORCH_CHECK_TYPE(plan.scalar_type() == dtype, "rbe_ffn: plan must have the input's dtype ", dtype);
    TORCH_CHECK_VALUE(plan.device() == device, "rbe_ffn: plan must be on the input's device");
    Tensor pc = plan.contiguous();
    if (pc.is_cpu() && (dtype == at::kFloat || dtype == at::kDouble)) {
        bool mirrored = false;
        AT_DISPATCH_FLOATING_TYPES(dtype, "rbe_plan_mirrored", [&] { mirrored = pattern_rows_mirrored(pc.data_ptr<scalar_t>(), b, nf); });
        TORCH_CHECK_VALUE(mirrored, "rbe_ffn: the plan's pattern rows (analysis and synthesis rows b..b+nf) must be "
                          "mirror-symmetric, v[n] = v[b-1-n], as the plans rbe_ffn builds are (the CPU kernels "
                          "rely on it); this plan was not built by rbe_ffn or has been changed");
    }
    return Plan{pc, b, nf};
}

inline Tensor as_tokens(const Tensor& x, int64_t n, const char* what, bool half_ok = false) {
    check_float(x, what, half_ok);
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == n, "rbe_ffn: ", what, " must have last dimension ", n, ", got shape ",
                      x.sizes());
    return x.reshape({-1, n}).contiguous();
}

inline std::vector<int64_t> with_last(const Tensor& x, int64_t n) {
    std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
    s.back() = n;
    return s;
}


// The scales of a weight's numbers: its coefficients are coeffs * coeff, its pattern numbers
// basis * pattern (the "scaled" parametrization hands the operators its parameters and these)
struct Scales {
    double coeff = 1.0, pattern = 1.0;
    bool none() const { return coeff == 1.0 && pattern == 1.0; }
};

inline Scales check_scales(double coeff, double pattern, const char* layer) {
    for (double v : {coeff, pattern})
        TORCH_CHECK_VALUE(std::isfinite(v) && v != 0.0, "rbe_ffn: the scales of ", layer,
                          " (coeff_scale, pattern_scale) must be finite and non-zero, got ", coeff, ", ", pattern);
    return Scales{coeff, pattern};
}

// W with its numbers multiplied by their scales (new tensors; W itself when there are none), for
// kernels that read the numbers as they are (the CUDA path)
inline Weight scaled_weight(const Weight& W, const Scales& s) {
    if (s.none()) return W;
    Weight out = W;
    if (s.coeff != 1.0) out.coeffs = W.coeffs.mul(s.coeff);
    if (s.pattern != 1.0) out.basis = W.basis.mul(s.pattern);
    return out;
}

// the arguments of the feed-forward operators, checked
struct FFNArgs {
    Tensor x2;
    Plan P;
    Weight W1, W2;
    c10::optional<Tensor> bias1, bias2;
    int act;
    int64_t chunk;
    Scales scales1, scales2;
};

inline FFNArgs check_ffn(const Tensor& x, const Tensor& plan, const Tensor& basis1, const Tensor& coeffs1,
                         const Tensor& index1, const c10::optional<Tensor>& bias1, const Tensor& basis2,
                         const Tensor& coeffs2, const Tensor& index2, const c10::optional<Tensor>& bias2,
                         int64_t d_model, int64_t d_ff, const std::string& activation, int64_t chunk_tokens,
                         const Scales& scales1 = {}, const Scales& scales2 = {}, bool half_ok = false) {
    Tensor x2 = as_tokens(x, d_model, "input", half_ok);
    Plan P = check_plan(plan, x.scalar_type(), x.device());
    Weight W1 = check_weight("fc1", basis1, coeffs1, index1, d_ff, d_model, P.b, x.scalar_type(), x.device());
    Weight W2 = check_weight("fc2", basis2, coeffs2, index2, d_model, d_ff, P.b, x.scalar_type(), x.device());
    check_bias(bias1, d_ff, x.scalar_type(), x.device(), "fc1.bias");
    check_bias(bias2, d_model, x.scalar_type(), x.device(), "fc2.bias");
    TORCH_CHECK_VALUE(chunk_tokens >= 0, "rbe_ffn: chunk_tokens must be >= 0 (0: no chunking), got ", chunk_tokens);
    const int64_t Tn = x2.size(0);
    const int64_t chunk = chunk_tokens > 0 ? std::min(chunk_tokens, Tn) : Tn;
    return FFNArgs{x2, P, W1, W2, contiguous_or_none(bias1), contiguous_or_none(bias2), act_code(activation), std::max<int64_t>(chunk, 1),
                   scales1, scales2};
}

// psi [b*b], the pattern images [8*b*b] and their pseudo-inverse [8*b*b] (double), for the codec
inline std::vector<double> codec_tables(int b) {
    const size_t bb = (size_t)b * b;
    std::vector<double> tabs(17 * bb), work(8 * bb + 200);
    rbe_dct_matrix(tabs.data(), b);
    rbe_pattern_images(tabs.data() + bb, b);
    rbe_pattern_pinv(tabs.data() + 9 * bb, work.data(), b);
    return tabs;
}

}  // namespace rbe
