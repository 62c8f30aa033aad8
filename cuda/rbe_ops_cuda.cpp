// rbe_ops_cuda.cpp - the CUDA kernels of the rbe_ffn operators (built only when torch has CUDA).
//
// Like csrc/rbe_ops.cpp this layer checks arguments (csrc/rbe_ops_common.h), allocates and
// calls: the launchers of cuda/rbe_kernels.cu, always on torch's current stream, and the
// matrix products through ATen (cuBLAS). The GPU path is the decode path of DESIGN.md
// section 3: each weight is decoded for the duration of one call into a transient dense
// matrix (Psi^T Chat Psi per block as two batched products, the pattern added while the
// blocks are laid out), multiplied with cuBLAS, and freed when the call returns. Only the
// input (and, in the standard variant, the pre-activation) is saved for backward. Parameter
// gradients are the dense weight gradient projected on the stored numbers:
//   dcoeffs[p][q] = (Psi dW_p Psi^T)[index[p][q]],  dbasis[p][k] = <dW_p, Phi_k>.
// float64 inputs compute in float64; float32, float16 and bfloat16 in float32, except the
// half types' products with the tokens, which run on the tensor cores in that type (float32
// accumulation inside cuBLAS), as a dense module's do.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "rbe_cuda.h"
#include "rbe_dct_path.h"
#include "rbe_ops_common.h"

namespace rbe {
namespace {

int cuda_dtype(at::ScalarType s) {
    switch (s) {
    case at::kFloat: return RBE_CUDA_F32;
    case at::kDouble: return RBE_CUDA_F64;
    case at::kHalf: return RBE_CUDA_F16;
    case at::kBFloat16: return RBE_CUDA_BF16;
    default: TORCH_CHECK_TYPE(false, "rbe_ffn: no CUDA kernel for dtype ", s);
    }
}

// the type products and transforms run in
at::ScalarType compute_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t e, const char* what) {
    TORCH_CHECK(e == cudaSuccess, "rbe_ffn: CUDA kernel '", what, "' failed: ", cudaGetErrorString(e));
}

struct Tables {
    Tensor psi, phi;  // [b, b] DCT rows, [8, b, b] pattern images, in the compute type
};

Tables tables(int64_t b, at::ScalarType ct, at::Device dev) {
    auto opt = at::TensorOptions().dtype(ct).device(dev);
    Tables t{at::empty({b, b}, opt), at::empty({RBE_NPAT, b, b}, opt)};
    check_launch(rbe_cuda_tables(t.psi.data_ptr(), t.phi.data_ptr(), cuda_dtype(ct), (int)b, stream()), "tables");
    return t;
}

// ---- index validation, once per version of an index tensor ----
// An index is checked on the device when it is new or has been written since its last check
// (its version counter, which every in-place torch operation bumps and which views share): a call
// on unchanged weights does not synchronise with the host, so it can be captured in a CUDA graph.
// Entries are keyed on the memory (storage, first element, size), not on the tensor object: a
// module hands the operators a fresh view of its index buffer at every call. Writes that bypass
// the counter (through .data or a raw pointer) are not seen; the kernels stay memory-safe whatever
// the index holds (positions outside the block are skipped), the result is then wrong. Inference
// tensors have no version counter: they are checked at every call.
struct Validated {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // expired once freed (its memory may then be reused)
    const void* data;
    int64_t numel, k, b, version;
    int wide;
};
std::mutex g_validated_mu;
std::vector<Validated> g_validated;  // one entry per live index memory; expired ones pruned on insert

// the index's version, or -1 for an inference tensor (none)
int64_t version_of(const Tensor& index) { return index.is_inference() ? -1 : index._version(); }

bool same_memory(const Validated& v, const Weight& W) {
    return !v.storage.expired() && v.storage._unsafe_get_target() == W.index.storage().unsafeGetStorageImpl() &&
           v.data == W.index.data_ptr() && v.numel == W.index.numel() && v.k == W.k && v.wide == W.wide &&
           v.b == W.b;
}

bool validated(const Weight& W, int64_t version) {
    if (version < 0) return false;
    std::lock_guard<std::mutex> lock(g_validated_mu);
    for (const Validated& v : g_validated)
        if (same_memory(v, W)) return v.version == version;
    return false;
}

void remember(const Weight& W, int64_t version) {
    if (version < 0) return;
    std::lock_guard<std::mutex> lock(g_validated_mu);
    g_validated.erase(std::remove_if(g_validated.begin(), g_validated.end(),
                                     [&](const Validated& v) { return v.storage.expired() || same_memory(v, W); }),
                      g_validated.end());
    g_validated.push_back(Validated{W.index.storage().getWeakStorageImpl(), W.index.data_ptr(), W.index.numel(), W.k,
                                    W.b, version, W.wide});
}

bool capturing() {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    check_launch(cudaStreamIsCapturing(stream(), &st), "stream capture query");
    return st != cudaStreamCaptureStatusNone;
}

// Whether the DCT-domain path takes this call; its tables are built first, never inside a capture.
bool use_dct_path(const Tensor& x, int64_t b) {
    if (!dct_path_enabled()) return false;
    if (!dct_tables_ready(b, x.scalar_type(), x.device())) {
        TORCH_CHECK(!capturing(), "rbe_ffn: the DCT-domain path's tables for block size ", b, " and ", x.scalar_type(),
                    " are built at their first call, which cannot be inside a CUDA-graph capture: run one call "
                    "before capturing");
        dct_prepare_tables(b, x.scalar_type(), x.device());
    }
    return true;
}

// The index values of the weights not validated at their current version, checked on the
// device: one synchronisation for all of them, none when every one is known. The versions are
// read before the check, so a write racing with it leaves the index to be checked again.
void check_indexes(const std::vector<std::pair<const char*, const Weight*>>& all) {
    std::vector<std::pair<const char*, const Weight*>> ws;
    std::vector<int64_t> versions;
    for (const auto& w : all) {
        const int64_t version = version_of(w.second->index);
        if (w.second->k > 0 && !validated(*w.second, version)) ws.push_back(w), versions.push_back(version);
    }
    if (ws.empty()) return;
    TORCH_CHECK(!capturing(), "rbe_ffn: ", ws[0].first, ": an index not validated yet inside a CUDA-graph capture: "
                "run one call on these weights before capturing (the warm-up torch.cuda.graphs and torch.compile "
                "do). An index is validated again when it is new or written since its last use, and at every "
                "call when it is an inference tensor (no version counter) or not contiguous (copied per call)");
    Tensor bad = at::empty({(int64_t)ws.size()}, ws[0].second->index.options().dtype(at::kLong));
    for (size_t i = 0; i < ws.size(); i++) {
        const Weight& W = *ws[i].second;
        check_launch(rbe_cuda_index_check(reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>() + i),
                                          W.index.data_ptr(), W.wide, W.basis.size(0), (int)W.k, (int)W.b, stream()),
                     "index check");
    }
    Tensor host = bad.cpu();
    for (size_t i = 0; i < ws.size(); i++) {
        const uint64_t pos = (uint64_t)host.data_ptr<int64_t>()[i];
        if (pos == ~0ULL) continue;
        const Weight& W = *ws[i].second;
        TORCH_CHECK_INDEX(false, "rbe_ffn: ", ws[i].first, ": index is corrupted at block ", pos / W.k, ", slot ",
                          pos % W.k, ": positions must be strictly increasing within a block and lie in [0, ",
                          W.b * W.b, ")");
    }
    for (size_t i = 0; i < ws.size(); i++) remember(*ws[i].second, versions[i]);
}

// W's dense [out, in] matrix in its parameters' dtype (built in the compute type ct)
Tensor decode_dense(const Weight& W, const Tables& T, at::ScalarType ct) {
    const int64_t nblk = W.basis.size(0), b = W.b;
    Tensor chat = at::empty({nblk, b, b}, W.basis.options().dtype(ct));
    check_launch(rbe_cuda_scatter(chat.data_ptr(), cuda_dtype(ct), W.coeffs.data_ptr(),
                                  cuda_dtype(W.coeffs.scalar_type()), W.index.data_ptr(), W.wide, nblk, (int)W.k,
                                  (int)b, stream()),
                 "scatter");
    Tensor blk = at::matmul(T.psi.t(), at::matmul(chat, T.psi)).contiguous();  // Psi^T Chat Psi
    TORCH_INTERNAL_ASSERT(blk.scalar_type() == ct && blk.numel() == nblk * b * b);
    chat.reset();
    Tensor w = at::empty({W.out, W.in}, W.basis.options());
    check_launch(rbe_cuda_assemble(w.data_ptr(), cuda_dtype(w.scalar_type()), blk.data_ptr(), T.phi.data_ptr(),
                                   cuda_dtype(ct), W.basis.data_ptr(), cuda_dtype(W.basis.scalar_type()), (int)W.out,
                                   (int)W.in, (int)b, stream()),
                 "assemble");
    return w;
}

// Projects a dense weight gradient dw [out, in] (compute type) on W's stored numbers:
// dbasis [nblk, 8] and dcoeffs [nblk, k] in the parameters' dtype (each only if asked for).
void project(Tensor* dbasis, Tensor* dcoeffs, const Tensor& dw, const Weight& W, const Tables& T) {
    if (!dbasis && !dcoeffs) return;
    const int64_t nblk = W.basis.size(0), b = W.b;
    Tensor blk = at::empty({nblk, b, b}, dw.options());
    check_launch(rbe_cuda_split(blk.data_ptr(), cuda_dtype(dw.scalar_type()), dw.data_ptr(),
                                cuda_dtype(dw.scalar_type()), (int)W.out, (int)W.in, (int)b, 0, stream()),
                 "split");
    if (dbasis) *dbasis = at::matmul(blk.view({nblk, b * b}), T.phi.view({RBE_NPAT, b * b}).t()).to(W.basis.scalar_type());
    if (dcoeffs) {
        Tensor hat = at::matmul(T.psi, at::matmul(blk, T.psi.t())).contiguous();  // Psi dW Psi^T
        TORCH_INTERNAL_ASSERT(hat.scalar_type() == dw.scalar_type() && hat.numel() == nblk * b * b);
        *dcoeffs = at::empty(W.coeffs.sizes(), W.coeffs.options());
        check_launch(rbe_cuda_gather(dcoeffs->data_ptr(), cuda_dtype(W.coeffs.scalar_type()), hat.data_ptr(),
                                     cuda_dtype(hat.scalar_type()), W.index.data_ptr(), W.wide, nblk, (int)W.k,
                                     (int)b, stream()),
                     "gather");
    }
}

// acc (compute type) += a^T b. Half inputs multiply on the tensor cores (float32 accumulation,
// the product rounded to the input dtype, as a dense module's weight gradient is).
void add_at_b(Tensor& acc, const Tensor& a, const Tensor& b) {
    if (a.scalar_type() == acc.scalar_type())
        acc.addmm_(a.t(), b);
    else
        acc.add_(at::mm(a.t(), b));
}

// out = a wd^T (+ bias)
void affine(Tensor& out, const Tensor& a, const Tensor& wd, const c10::optional<Tensor>& bias) {
    if (bias.has_value())
        at::addmm_out(out, *bias, a, wd.t());
    else
        at::mm_out(out, a, wd.t());
}

void act_forward(Tensor& y, const Tensor& x, int act) {
    check_launch(rbe_cuda_act_forward(y.data_ptr(), x.data_ptr(), x.numel(), act, cuda_dtype(x.scalar_type()), stream()),
                 "activation");
}

void act_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int act) {
    check_launch(rbe_cuda_act_backward(dx.data_ptr(), dy.data_ptr(), x.data_ptr(), x.numel(), act,
                                       cuda_dtype(x.scalar_type()), stream()),
                 "activation backward");
}

Tensor empty0(const at::TensorOptions& opt) { return at::empty({0}, opt); }

// the number of SMs of a device, asked once
int multiprocessors(int device) {
    static std::mutex mu;
    static std::map<int, int> known;
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(device);
    if (it != known.end()) return it->second;
    int n = 0;
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "multiprocessor count");
    return known[device] = n;
}

// The few-token coefficient product of the DCT-domain path on CUDA (csrc/rbe_dct_path.h's
// FewRowsFn): out [T, R, b] from xa [C, rows, T], in groups of at most RBE_CUDA_FEW_MAX tokens,
// each block row's columns split so that there are about two thread blocks per SM.
void few_rows_cuda(Tensor& out, const Tensor& xa, const Weight& W) {
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), rows = xa.size(1), T = xa.size(2);
    TORCH_INTERNAL_ASSERT(xa.is_contiguous() && xa.size(0) == C && out.size(0) == T && out.size(1) == R &&
                          out.size(2) == W.b);
    if (W.k == 0) {
        out.zero_();
        return;
    }
    // shared-memory atomics: the order of each sum, and so its last bits, varies between runs
    at::globalContext().alertNotDeterministic(
        "rbe_ffn: the few-token CUDA kernel (rbe_ffn.dct_path(few_tokens=...))");
    const int sms = multiprocessors(xa.device().index());
    const int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(C, cdiv(2 * (int64_t)std::max(sms, 1), R)));
    for (int64_t t0 = 0; t0 < T; t0 += RBE_CUDA_FEW_MAX) {
        const int64_t n = std::min<int64_t>(RBE_CUDA_FEW_MAX, T - t0);
        const Tensor src = n == T ? xa : xa.narrow(2, t0, n).contiguous();
        Tensor part = at::empty({nsplit, n, R, W.b}, xa.options());
        check_launch(rbe_cuda_few_rows(part.data_ptr(), src.data_ptr(), cuda_dtype(xa.scalar_type()),
                                       W.coeffs.data_ptr(), cuda_dtype(W.coeffs.scalar_type()), W.index.data_ptr(),
                                       W.wide, (int)R, (int)C, (int)W.k, (int)W.b, (int)rows, (int)n, (int)nsplit,
                                       stream()),
                     "few-token rows");
        out.narrow(0, t0, n).copy_(nsplit == 1 ? part[0] : part.sum(0));
    }
}

// Chat densified in one pass by rbe_cuda_densify (csrc/rbe_dct_path.h's DensifyFn), when the block
// fits its shared memory
Tensor densify_cuda(const Weight& W, const Tensor& phihat) {
    if ((size_t)W.b * W.b * phihat.element_size() > RBE_CUDA_DENSIFY_SHARED) return Tensor();
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b);
    Tensor big = at::empty({R * W.b, C * W.b}, W.basis.options());
    check_launch(rbe_cuda_densify(big.data_ptr(), cuda_dtype(big.scalar_type()), phihat.data_ptr(),
                                  cuda_dtype(phihat.scalar_type()), W.basis.data_ptr(), W.coeffs.data_ptr(),
                                  W.index.data_ptr(), W.wide, (int)R, (int)C, (int)W.k, (int)W.b, stream()),
                 "densify");
    return big;
}

// registers the kernels with the DCT-domain path when the library is loaded
const bool dct_kernels_registered = (set_few_rows_cuda(&few_rows_cuda), set_densify_cuda(&densify_cuda), true);

// Entered by every operator: the current device is the input's, and autocast stays out of the
// products inside (the autograd engine runs backward with the forward's autocast state, which
// would turn the float32 decode products into bfloat16 ones behind the kernels' backs).
struct OpScope {
    c10::cuda::CUDAGuard device;
    c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::DispatchKeySet(c10::DispatchKey::AutocastCUDA)};
    explicit OpScope(const Tensor& t) : device(t.device()) {}
};

// ---- codec ----
std::tuple<Tensor, Tensor, Tensor, Tensor> encode_cuda(const Tensor& weight, int64_t b, int64_t k) {
    const OpScope scope(weight);
    check_float(weight, "weight");
    TORCH_CHECK_VALUE(weight.dim() == 2, "rbe_ffn.compress: weight must be 2-D [out, in], got ", weight.dim(), "-D");
    TORCH_CHECK_VALUE(weight.numel() > 0, "rbe_ffn.compress: weight is empty ", weight.sizes());
    check_block_size(b);
    TORCH_CHECK_VALUE(k >= 0 && k <= b * b, "rbe_ffn.compress: k must be in [0, block_size^2 = ", b * b, "], got ", k);
    Tensor w = weight.contiguous();
    const int64_t nonfinite = at::logical_not(at::isfinite(w)).sum().item<int64_t>();
    TORCH_CHECK_VALUE(nonfinite == 0, "rbe_ffn.compress: weight has ", nonfinite, " NaN or infinite values");
    const int64_t out = w.size(0), in = w.size(1), nblk = cdiv(out, b) * cdiv(in, b), bb = b * b;
    const bool wide = b > 128;
    auto dopt = w.options().dtype(at::kDouble);
    std::vector<double> host = codec_tables((int)b);  // psi, phi, pinv (the CPU encoder's tables)
    Tensor tab = at::from_blob(host.data(), {17, b, b}, at::kDouble).to(w.device());
    Tensor psi = tab[0], phi = tab.narrow(0, 1, RBE_NPAT).reshape({RBE_NPAT, bb});
    Tensor pinv = tab.narrow(0, 1 + RBE_NPAT, RBE_NPAT).reshape({RBE_NPAT, bb});
    // the blocks, edge blocks filled by even reflection, in double
    Tensor blk = at::empty({nblk, b, b}, dopt);
    check_launch(rbe_cuda_split(blk.data_ptr(), RBE_CUDA_F64, w.data_ptr(), cuda_dtype(w.scalar_type()), (int)out,
                                (int)in, (int)b, 1, stream()),
                 "split");
    Tensor flat = blk.view({nblk, bb});
    Tensor basis = at::matmul(flat, pinv.t()).to(w.scalar_type());
    // the residual is taken against the stored (rounded) pattern numbers, as on the CPU
    Tensor resid = (flat - at::matmul(basis.to(at::kDouble), phi)).view({nblk, b, b});
    Tensor hat = at::matmul(psi, at::matmul(resid, psi.t())).reshape({nblk, bb});  // Psi E Psi^T
    Tensor idx;
    if (k == bb) {
        idx = at::arange(bb, dopt.dtype(at::kLong)).expand({nblk, bb}).contiguous();
    } else if (k == 0) {
        idx = at::empty({nblk, 0}, dopt.dtype(at::kLong));
    } else {  // the k largest |Ehat|, ties to the lower flat index (stable sort), then ascending
        Tensor order = std::get<1>(at::sort(hat.abs(), /*stable=*/true, /*dim=*/1, /*descending=*/true));
        idx = std::get<0>(at::sort(order.narrow(1, 0, k), 1));
    }
    Tensor kept = hat.gather(1, idx);
    Tensor coeffs = kept.to(w.scalar_type());
    Tensor index = idx.to(wide ? at::kInt : at::kShort);
    // squared error against the stored values: interior blocks in the DCT domain (Parseval),
    // edge blocks over their real entries
    Tensor drop = hat.scatter(1, idx, kept - coeffs.to(at::kDouble));
    Tensor rec = at::matmul(psi.t(), at::matmul(drop.view({nblk, b, b}), psi)).contiguous();
    Tensor energy = drop.pow(2).sum(1).contiguous();
    Tensor err = at::empty({nblk}, dopt);
    check_launch(rbe_cuda_block_error(err.data_ptr<double>(), rec.data_ptr<double>(), energy.data_ptr<double>(),
                                      (int)out, (int)in, (int)b, stream()),
                 "block error");
    return {basis, coeffs, index, err};
}

Tensor decode_cuda(const Tensor& basis, const Tensor& coeffs, const Tensor& index, int64_t out, int64_t in, int64_t b) {
    const OpScope scope(basis);
    check_float(basis, "basis", true);
    Weight W = check_weight("decode", basis, coeffs, index, out, in, b, basis.scalar_type(), basis.device());
    check_indexes({{"decode", &W}});
    const at::ScalarType ct = compute_type(basis.scalar_type());
    return decode_dense(W, tables(b, ct, basis.device()), ct);
}

// ---- linear ----
Tensor linear_cuda(const Tensor& x, const Tensor& plan, const Tensor& basis, const Tensor& coeffs, const Tensor& index,
                   const c10::optional<Tensor>& bias, int64_t in, int64_t out, double coeff_scale,
                   double pattern_scale, bool /*bf16_sparse: a CPU kernel*/) {
    const OpScope scope(x);
    Tensor x2 = as_tokens(x, in, "input", true);
    Plan P = check_plan(plan, x.scalar_type(), x.device());
    Weight W = check_weight("linear", basis, coeffs, index, out, in, P.b, x.scalar_type(), x.device());
    const Scales sc = check_scales(coeff_scale, pattern_scale, "the linear layer");
    check_bias(bias, out, x.scalar_type(), x.device(), "bias");
    check_indexes({{"linear", &W}});
    if (use_dct_path(x, P.b)) return dct_linear(x, x2, W, sc, bias);
    W = scaled_weight(W, sc);
    const at::ScalarType ct = compute_type(x.scalar_type());
    Tensor wd = decode_dense(W, tables(P.b, ct, x.device()), ct);
    Tensor y = at::empty(with_last(x, out), x2.options());  // returned as a base tensor, not a view
    Tensor y2 = y.view({x2.size(0), out});
    affine(y2, x2, wd, bias);
    return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& plan,
                                                                const Tensor& basis, const Tensor& coeffs,
                                                                const Tensor& index, int64_t in, int64_t out,
                                                                std::array<bool, 4> mask, double coeff_scale,
                                                                double pattern_scale, bool /*bf16_sparse*/) {
    const OpScope scope(x);
    Tensor x2 = as_tokens(x, in, "input", true);
    Tensor g2 = as_tokens(grad, out, "grad", true);
    TORCH_CHECK_VALUE(g2.size(0) == x2.size(0) && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
                      "rbe_ffn: grad must match the input's tokens, dtype and device");
    Plan P = check_plan(plan, x.scalar_type(), x.device());
    Weight W = check_weight("linear", basis, coeffs, index, out, in, P.b, x.scalar_type(), x.device());
    const Scales sc = check_scales(coeff_scale, pattern_scale, "the linear layer");
    check_indexes({{"linear", &W}});
    if (use_dct_path(x, P.b)) return dct_linear_backward(x, x2, g2, W, sc, mask);
    W = scaled_weight(W, sc);
    const at::ScalarType ct = compute_type(x.scalar_type());
    const Tables T = tables(P.b, ct, x.device());
    auto opt = x2.options();
    Tensor dx = empty0(opt), db = empty0(opt), dc = empty0(opt), dbias = empty0(opt);
    if (mask[0]) dx = at::mm(g2, decode_dense(W, T, ct)).view(x.sizes());
    if (mask[1] || mask[2]) {
        Tensor dw = at::mm(g2.t(), x2).to(ct);  // [out, in], transient
        project(mask[1] ? &db : nullptr, mask[2] ? &dc : nullptr, dw, W, T);
    }
    if (mask[3]) dbias = at::sum(g2, {0}, false, ct).to(x.scalar_type());
    if (mask[1] && sc.pattern != 1.0) db.mul_(sc.pattern);  // the gradients of the parameters passed in
    if (mask[2] && sc.coeff != 1.0) dc.mul_(sc.coeff);
    return {dx, db, dc, dbias};
}

// ---- the feed-forward block ----
std::tuple<Tensor, Tensor, Tensor> ffn_cuda(const Tensor& x, const Tensor& plan, const Tensor& basis1,
                                            const Tensor& coeffs1, const Tensor& index1,
                                            const c10::optional<Tensor>& bias1, const Tensor& basis2,
                                            const Tensor& coeffs2, const Tensor& index2,
                                            const c10::optional<Tensor>& bias2, int64_t d_model, int64_t d_ff,
                                            std::string activation, int64_t chunk_tokens, bool keep_pre,
                                            double coeff_scale1, double coeff_scale2, double pattern_scale1,
                                            double pattern_scale2,
                                            bool /*f32_activation: the CUDA kernels evaluate in double*/,
                                            bool /*bf16_sparse: a CPU kernel*/) {
    const OpScope scope(x);
    FFNArgs a = check_ffn(x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, bias2, d_model, d_ff,
                          activation, chunk_tokens, check_scales(coeff_scale1, pattern_scale1, "fc1"),
                          check_scales(coeff_scale2, pattern_scale2, "fc2"), true);
    check_indexes({{"fc1", &a.W1}, {"fc2", &a.W2}});
    if (use_dct_path(x, a.P.b)) {
        auto [y, pre] = dct_ffn(x, a, keep_pre);
        return {y, pre, empty0(a.x2.options())};  // no saved hidden input on CUDA (the CPU's ffn_saves_hidden)
    }
    a.W1 = scaled_weight(a.W1, a.scales1), a.W2 = scaled_weight(a.W2, a.scales2);
    const at::ScalarType ct = compute_type(x.scalar_type());
    const Tables T = tables(a.P.b, ct, x.device());
    const Tensor wd1 = decode_dense(a.W1, T, ct), wd2 = decode_dense(a.W2, T, ct);
    const int64_t Tn = a.x2.size(0);
    auto opt = a.x2.options();
    Tensor y = at::empty(x.sizes(), opt);  // returned as a base tensor, not a view
    Tensor y2 = y.view({Tn, d_model});
    Tensor pre = keep_pre ? at::empty(with_last(x, d_ff), opt) : empty0(opt);
    for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
        const int64_t n = std::min(a.chunk, Tn - t0);
        Tensor h = keep_pre ? pre.view({Tn, d_ff}).narrow(0, t0, n) : at::empty({n, d_ff}, opt);
        affine(h, a.x2.narrow(0, t0, n), wd1, a.bias1);
        Tensor hid = keep_pre ? at::empty({n, d_ff}, opt) : h;  // in place when h is not kept
        act_forward(hid, h, a.act);
        Tensor yc = y2.narrow(0, t0, n);
        affine(yc, hid, wd2, a.bias2);
    }
    return {y, pre, empty0(opt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward_cuda(
    const Tensor& grad, const Tensor& x, const Tensor& pre, const Tensor& hidden, const Tensor& plan,
    const Tensor& basis1, const Tensor& coeffs1, const Tensor& index1, const c10::optional<Tensor>& bias1,
    const Tensor& basis2, const Tensor& coeffs2, const Tensor& index2, int64_t d_model, int64_t d_ff,
    std::string activation, int64_t chunk_tokens, std::array<bool, 7> mask, double coeff_scale1,
    double coeff_scale2, double pattern_scale1, double pattern_scale2,
    bool /*f32_activation: the CUDA kernels evaluate in double*/, bool /*bf16_sparse: a CPU kernel*/) {
    const OpScope scope(x);
    TORCH_CHECK_VALUE(hidden.numel() == 0, "rbe_ffn: ffn_backward on CUDA takes no saved hidden input (the CUDA ffn "
                      "returns an empty one)");
    FFNArgs a = check_ffn(x, plan, basis1, coeffs1, index1, bias1, basis2, coeffs2, index2, c10::nullopt, d_model,
                          d_ff, activation, chunk_tokens, check_scales(coeff_scale1, pattern_scale1, "fc1"),
                          check_scales(coeff_scale2, pattern_scale2, "fc2"), true);
    Tensor g2 = as_tokens(grad, d_model, "grad", true);
    const int64_t Tn = a.x2.size(0);
    TORCH_CHECK_VALUE(g2.size(0) == Tn && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
                      "rbe_ffn: grad must match the input's tokens, dtype and device");
    const bool saved = pre.numel() > 0;
    Tensor pre2;
    if (saved) {
        pre2 = as_tokens(pre, d_ff, "saved pre-activation", true);
        TORCH_CHECK_VALUE(pre2.size(0) == Tn && pre.scalar_type() == x.scalar_type() && pre.device() == x.device(),
                          "rbe_ffn: saved pre-activation has ", pre2.size(0), " tokens of ", pre.scalar_type(),
                          ", expected ", Tn, " of ", x.scalar_type(), " on the input's device");
    }
    check_indexes({{"fc1", &a.W1}, {"fc2", &a.W2}});
    if (use_dct_path(x, a.P.b)) return dct_ffn_backward(x, g2, saved ? pre2 : Tensor(), a, mask);
    a.W1 = scaled_weight(a.W1, a.scales1), a.W2 = scaled_weight(a.W2, a.scales2);
    const at::ScalarType dt = x.scalar_type(), ct = compute_type(dt);
    const Tables T = tables(a.P.b, ct, x.device());
    auto opt = a.x2.options(), copt = opt.dtype(ct);
    const bool need1 = mask[0] || mask[1] || mask[2] || mask[3];
    const bool dw1_on = mask[1] || mask[2], dw2_on = mask[4] || mask[5];
    const Tensor wd1 = !saved || mask[0] ? decode_dense(a.W1, T, ct) : Tensor();
    const Tensor wd2 = need1 ? decode_dense(a.W2, T, ct) : Tensor();
    // weight gradients of the whole call, dense and transient, projected once at the end
    Tensor dw1 = dw1_on ? at::zeros({d_ff, d_model}, copt) : Tensor();
    Tensor dw2 = dw2_on ? at::zeros({d_model, d_ff}, copt) : Tensor();
    Tensor dbias1 = mask[3] ? at::zeros({d_ff}, copt) : empty0(opt);
    Tensor dbias2 = mask[6] ? at::zeros({d_model}, copt) : empty0(opt);
    Tensor dx = mask[0] ? at::empty(x.sizes(), opt) : empty0(opt);
    for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
        const int64_t n = std::min(a.chunk, Tn - t0);
        const Tensor xc = a.x2.narrow(0, t0, n), gc = g2.narrow(0, t0, n);
        Tensor h;  // standard: the saved pre-activation; checkpointed: recomputed
        if (saved) {
            h = pre2.narrow(0, t0, n);
        } else {
            h = at::empty({n, d_ff}, opt);
            affine(h, xc, wd1, a.bias1);
        }
        if (dw2_on) {
            Tensor hid = at::empty({n, d_ff}, opt);
            act_forward(hid, h, a.act);
            add_at_b(dw2, gc, hid);
        }
        if (mask[6]) dbias2.add_(at::sum(gc, {0}, false, ct));
        if (!need1) continue;
        Tensor dh = at::mm(gc, wd2);
        act_backward(dh, dh, h, a.act);
        if (dw1_on) add_at_b(dw1, dh, xc);
        if (mask[3]) dbias1.add_(at::sum(dh, {0}, false, ct));
        if (mask[0]) {
            Tensor dxc = dx.view({Tn, d_model}).narrow(0, t0, n);
            at::mm_out(dxc, dh, wd1);
        }
    }
    Tensor db1 = empty0(opt), dc1 = empty0(opt), db2 = empty0(opt), dc2 = empty0(opt);
    if (dw1_on) project(mask[1] ? &db1 : nullptr, mask[2] ? &dc1 : nullptr, dw1, a.W1, T);
    if (dw2_on) project(mask[4] ? &db2 : nullptr, mask[5] ? &dc2 : nullptr, dw2, a.W2, T);
    // the gradients of the numbers passed in: their scales times those of the scaled numbers
    if (mask[1] && a.scales1.pattern != 1.0) db1.mul_(a.scales1.pattern);
    if (mask[2] && a.scales1.coeff != 1.0) dc1.mul_(a.scales1.coeff);
    if (mask[4] && a.scales2.pattern != 1.0) db2.mul_(a.scales2.pattern);
    if (mask[5] && a.scales2.coeff != 1.0) dc2.mul_(a.scales2.coeff);
    if (mask[3]) dbias1 = dbias1.to(dt);
    if (mask[6]) dbias2 = dbias2.to(dt);
    return {dx, db1, dc1, dbias1, db2, dc2, dbias2};
}

// ---- activations alone ----
Tensor activation_cuda(const Tensor& x, std::string activation) {
    const OpScope scope(x);
    check_float(x, "input", true);
    const int act = act_code(activation);
    Tensor xc = x.contiguous(), y = at::empty_like(xc);
    act_forward(y, xc, act);
    return y;
}

Tensor activation_backward_cuda(const Tensor& grad, const Tensor& x, std::string activation) {
    const OpScope scope(x);
    check_float(x, "input", true);
    TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
                      "rbe_ffn: grad must match the input's shape, dtype and device");
    const int act = act_code(activation);
    Tensor xc = x.contiguous(), gc = grad.contiguous(), dx = at::empty_like(xc);
    act_backward(dx, gc, xc, act);
    return dx;
}

}  // namespace
}  // namespace rbe

TORCH_LIBRARY_IMPL(rbe_ffn, CUDA, m) {
    m.impl("encode", &rbe::encode_cuda);
    m.impl("decode", &rbe::decode_cuda);
    m.impl("linear", &rbe::linear_cuda);
    m.impl("linear_backward", &rbe::linear_backward_cuda);
    m.impl("ffn", &rbe::ffn_cuda);
    m.impl("ffn_backward", &rbe::ffn_backward_cuda);
    m.impl("activation", &rbe::activation_cuda);
    m.impl("activation_backward", &rbe::activation_backward_cuda);
}
