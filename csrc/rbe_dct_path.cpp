// rbe_dct_path.cpp - the DCT-domain paths (rbe_dct_path.h): dense for many tokens, sparse for few; any device.
#include "rbe_dct_path.h"

#include "rbe_variants.h"  // the pattern's rank-1 terms

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/version.h>

#include <atomic>
#include <map>
#include <mutex>
#include <utility>

namespace rbe {

namespace {

std::atomic<bool> g_dct_path{false};
std::atomic<int64_t> g_few_tokens{0};
std::atomic<FewRowsFn> g_few_rows_cuda{nullptr};
std::atomic<DensifyFn> g_densify_cuda{nullptr};

// ---- the tables of a block size, per (b, dtype, device), built once ----
// psi [b, b] (DCT rows) and phihat = Psi Phi_k Psi^T in the compute type (float64 for float64,
// else float32), phihat held as [8, b*b] (the CUDA densify kernel), as [b(u), 8, b(v)] (the
// densify product) and as [b(u), b(v), 8] (the pattern gradient). Built in double on the host, laid out there and
// copied once, synchronously (so another stream never sees them half-written): a call inside a
// CUDA-graph capture must find them ready (dct_tables_ready; the first call must come before).
struct Tables {
    Tensor psi, phihat_k, phihat_ukv, phihat_uvk;
};

at::ScalarType compute_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

using TableKey = std::tuple<int64_t, int, int, int>;

TableKey table_key(int64_t b, at::ScalarType dt, at::Device dev) {
    return std::make_tuple(b, (int)dt, (int)dev.type(), (int)dev.index());
}

// A table cache: the entry of key, built by build() the first time (entries are never removed, so
// the references handed out stay valid)
template <typename V>
struct TableCache {
    std::mutex mu;
    std::map<TableKey, V> entries;

    template <typename Build>
    const V& get(const TableKey& key, Build build) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = entries.find(key);
        return it != entries.end() ? it->second : entries.emplace(key, build()).first->second;
    }
    bool has(const TableKey& key) {
        std::lock_guard<std::mutex> lock(mu);
        return entries.count(key) > 0;
    }
};

Tables build_tables(int64_t b, at::ScalarType ct, at::Device dev) {
    const int64_t bb = b * b;
    std::vector<double> host(9 * bb);
    rbe_dct_matrix(host.data(), (int)b);
    rbe_pattern_images(host.data() + bb, (int)b);
    // a copy that owns its memory: .to() below may be a no-op
    Tensor all = at::from_blob(host.data(), {9, b, b}, at::kDouble).clone();
    Tensor psi = all[0];
    Tensor phihat = at::matmul(psi, at::matmul(all.narrow(0, 1, RBE_NPAT), psi.t()));
    auto on = [&](const Tensor& host_table, at::ScalarType type) { return host_table.contiguous().to(dev, type); };
    return Tables{on(psi, ct), on(phihat.reshape({RBE_NPAT, bb}), ct), on(phihat.permute({1, 0, 2}), ct),
                  on(phihat.permute({1, 2, 0}), ct)};
}

TableCache<Tables> g_tables;

// (one entry per compute type: float32, float16 and bfloat16 inputs share theirs)
const Tables& tables(int64_t b, at::ScalarType dt, at::Device dev) {
    const at::ScalarType ct = compute_type(dt);
    return g_tables.get(table_key(b, ct, dev), [&] { return build_tables(b, ct, dev); });
}

// Where each kept coefficient sits, [nblk, k] int64 each: its weight row i*b + u, its block column
// j and its column v within the block, and whether its index value is a position at all (the
// others are sent to position 0: row i*b, column 0 of block (i, j))
struct CoeffCoords {
    Tensor row, j, v, valid;
};

CoeffCoords coeff_coords(const Weight& W) {
    const int64_t C = cdiv(W.in, W.b), b = W.b;
    Tensor idx = W.index.to(at::kLong);
    Tensor valid = at::logical_and(idx.ge(0), idx.lt(b * b));
    idx = at::where(valid, idx, at::zeros_like(idx));
    Tensor p = at::arange(W.basis.size(0), idx.options()).unsqueeze(1);
    return {at::floor_divide(p, C) * b + at::floor_divide(idx, b), at::remainder(p, C), at::remainder(idx, b), valid};
}

// the flat positions of the coefficients in the densified [R*b, C*b] matrix, and their mask
std::pair<Tensor, Tensor> dense_positions(const Weight& W) {
    const CoeffCoords cc = coeff_coords(W);
    const int64_t cols = cdiv(W.in, W.b) * W.b;
    return {cc.row * cols + cc.j * W.b + cc.v, cc.valid};
}

// Chat laid out as one dense [R*b, C*b] matrix in dtype dt (the pattern part and the scattered
// coefficients summed in the compute type, then rounded once)
Tensor densify(const Weight& W, const Tables& T, at::ScalarType dt) {
    const DensifyFn kernel = g_densify_cuda.load();
    if (W.basis.is_cuda() && kernel && W.basis.scalar_type() == dt) {  // one pass, written once in dt
        Tensor big = kernel(W, T.phihat_k);
        if (big.defined()) return big;
    }
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), b = W.b;
    const at::ScalarType ct = T.phihat_ukv.scalar_type();
    // the pattern part written once, in place: row u of block row i is basis_i [C, 8] times
    // Phihat[:, u, :] [8, b], a batched product whose output is the [R, b, C, b] layout itself
    Tensor big = at::matmul(W.basis.to(ct).view({R, 1, C, RBE_NPAT}), T.phihat_ukv.unsqueeze(0)).view({R * b * C * b});
    if (W.k > 0) {
        auto [pos, valid] = dense_positions(W);
        Tensor vals = at::where(valid, W.coeffs.to(ct), at::zeros({}, W.coeffs.options().dtype(ct)));
        big.scatter_add_(0, pos.view({-1}), vals.view({-1}));  // valid positions are distinct
    }
    return big.view({R * b, C * b}).to(dt);
}

// A dense [R*b, C*b] gradient dChat (compute type) on the stored numbers, times their scales (the
// gradients of the numbers passed in), rounded once to the parameters' dtype: dbasis [nblk, 8]
// and dcoeffs [nblk, k], each only if asked for
void project(Tensor* dbasis, Tensor* dcoeffs, const Tensor& dchat, const Weight& W, const Tables& T,
             const Scales& sc) {
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), b = W.b;
    const at::ScalarType pt = W.basis.scalar_type();
    if (dbasis) {  // per (i, u): dChat row u of block row i [C, b] times Phihat[:, u, :]^T [b, 8], summed over u
        Tensor g = at::matmul(dchat.view({R, b, C, b}), T.phihat_uvk.unsqueeze(0)).sum(1).view({R * C, RBE_NPAT});
        *dbasis = (sc.pattern != 1.0 ? g.mul(sc.pattern) : g).to(pt);
    }
    if (dcoeffs) {
        if (W.k == 0) {
            *dcoeffs = at::zeros(W.coeffs.sizes(), W.coeffs.options());
            return;
        }
        auto [pos, valid] = dense_positions(W);
        Tensor vals = dchat.reshape({-1}).take(pos);
        Tensor g = at::where(valid, vals, at::zeros_like(vals));
        *dcoeffs = (sc.coeff != 1.0 ? g.mul(sc.coeff) : g).to(pt);
    }
}

// Half inputs (CUDA only): the transforms run in float32 and their results are rounded once to
// the input dtype for the main products, which run on the tensor cores with float32 output; the
// inverse transform and the bias are added in float32 and rounded once. (Rounding after every
// product instead made the error 2.0-2.6x the dense module's own in an emulation, against
// 1.6-1.8x this way: docs/DESIGN.md section 5.1.)

// x2 [n, width] zero-padded to nseg*b features, each b-long segment transformed in the compute
// type (psi's): [n, nseg*b] in x2's dtype
Tensor seg_dct(const Tensor& x2, int64_t nseg, const Tensor& psi) {
    const int64_t n = x2.size(0), b = psi.size(0), pad = nseg * b - x2.size(1);
    const Tensor xc = x2.to(psi.scalar_type());
    Tensor xp = pad > 0 ? at::constant_pad_nd(xc, {0, pad}) : xc;
    return at::mm(xp.reshape({n * nseg, b}), psi.t()).view({n, nseg * b}).to(x2.scalar_type());
}

// a b in the compute type: half operands give a float32 product (float32 accumulation; mm with
// out_dtype, torch >= 2.8; before, the operands are widened and the product runs in float32)
Tensor mm_ct(const Tensor& a, const Tensor& b) {
    const at::ScalarType ct = compute_type(a.scalar_type());
    if (a.scalar_type() == ct) return at::mm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    return at::mm(a, b, ct);
#else
    return at::mm(a.to(ct), b.to(ct));
#endif
}

// out [n, width] (any floating dtype; may be a view into a larger tensor) = the first `width`
// features of the inverse per-segment transform of yh [n, nseg*b] (compute type), plus bias,
// computed in the compute type and rounded once
void seg_idct_out(Tensor& out, const Tensor& yh, const Tensor& psi, const c10::optional<Tensor>& bias) {
    const int64_t n = yh.size(0), b = psi.size(0), width = out.size(1), full = yh.size(1);
    if (width == full && out.is_contiguous() && out.scalar_type() == yh.scalar_type()) {
        Tensor flat = out.view({n * (full / b), b});
        at::mm_out(flat, yh.reshape({n * (full / b), b}), psi);
        if (bias.has_value()) out.add_(*bias);
        return;
    }
    Tensor r = at::mm(yh.reshape({n * (full / b), b}), psi).view({n, full}).narrow(1, 0, width);
    out.copy_(bias.has_value() ? r + bias->to(r.scalar_type()) : r);
}

// acc (compute type) += a^T b (half operands: a float32 product)
void add_at_b(Tensor& acc, const Tensor& a, const Tensor& b) {
    if (a.scalar_type() == acc.scalar_type())
        acc.addmm_(a.t(), b);
    else
        acc.add_(mm_ct(a.t(), b));
}

Tensor activation(const Tensor& x, int64_t act) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rbe_ffn::activation", "")
                               .typed<Tensor(const Tensor&, std::string)>();
    return op.call(x, act_name((int)act));
}

Tensor activation_backward(const Tensor& g, const Tensor& x, int64_t act) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rbe_ffn::activation_backward", "")
                               .typed<Tensor(const Tensor&, const Tensor&, std::string)>();
    return op.call(g, x, act_name((int)act));
}

// ---- the few-token sparse product ----
// The plan's rows (csrc/rbe.h): analysis A = [psi; f_0..f_{nf-1}] and synthesis S = [psi; g_0..],
// [b+nf, b] each, and the pattern's terms as a [8, nf, nf] tensor: Phi_k = sum_{g,f}
// terms[k][g][f] g_g f_f^T. All in the compute type; built once per (b, dtype, device) from the
// double plan (eigenvalue tolerance 1e-15 for float64, 1e-9 else, as the operators' plans).
struct FewTables {
    Tensor A, S, terms;
    int64_t nf;
};

FewTables build_few_tables(int64_t b, at::ScalarType ct, at::Device dev) {
    std::vector<double> plan(3 * (2 * b + 4) * b), work(3 * b * b + b);
    const int64_t nf = rbe_plan_build(plan.data(), work.data(), (int)b, ct == at::kDouble ? 1e-15 : 1e-9);
    const int64_t rows = b + nf;
    Tensor host = at::from_blob(plan.data(), {2, rows, b}, at::kDouble).clone();  // A, S (the DCT tables unused)
    Tensor terms = at::zeros({RBE_NPAT, nf, nf}, at::kDouble);
    auto t = terms.accessor<double, 3>();
    for (const auto& term : rbe_pattern_terms) t[term[0]][term[1]][term[2]] = 1;
    for (int64_t m = RBE_NFIX; m < nf; m++) t[1][m][m] = 1;  // the d term, weighted by p_1
    auto opt = at::TensorOptions().dtype(ct).device(dev);
    return FewTables{host[0].contiguous().to(opt), host[1].contiguous().to(opt), terms.to(opt), nf};
}

TableCache<FewTables> g_few_tables;

const FewTables& few_tables(int64_t b, at::ScalarType ct, at::Device dev) {
    return g_few_tables.get(table_key(b, ct, dev), [&] { return build_few_tables(b, ct, dev); });
}

// The coefficient part, written by the pure-ATen model (every device): out [T, R, b] (compute
// type) = sum over the kept coefficients of block (i, j) of c * xa[v][t] at row u, where
// xa: [C, b+nf, T] is the transformed input, segment-major and token-minor.
void few_rows_model(Tensor& out, const Tensor& xa, const Weight& W) {
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), b = W.b, rows = xa.size(1), T = xa.size(2);
    out.zero_();
    if (W.k == 0) return;
    const CoeffCoords cc = coeff_coords(W);
    Tensor src = cc.j * rows + cc.v;  // the coefficient's row of xa
    Tensor c = at::where(cc.valid, W.coeffs.to(xa.scalar_type()), at::zeros({}, xa.options()));
    Tensor vals = xa.reshape({C * rows, T}).index_select(0, src.view({-1})) * c.view({-1, 1});  // [nnz, T]
    Tensor acc = at::zeros({R * b, T}, xa.options());
    acc.index_add_(0, cc.row.view({-1}), vals);
    out.copy_(acc.view({R, b, T}).permute({2, 0, 1}));
}

// out [n, out_features] (a view) = x2 W^T (+ bias) for a few tokens, in the compute type
void few_linear_out(Tensor& out, const Tensor& x2, const Weight& W, const c10::optional<Tensor>& bias) {
    const at::ScalarType ct = compute_type(x2.scalar_type());
    const FewTables& F = few_tables(W.b, ct, x2.device());
    const int64_t n = x2.size(0), R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), b = W.b, nf = F.nf, rows = b + nf;
    const Tensor xc = x2.to(ct);
    const int64_t pad = C * b - W.in;
    Tensor xa = at::mm((pad > 0 ? at::constant_pad_nd(xc, {0, pad}) : xc).reshape({n * C, b}), F.A.t())
                    .view({n, C, rows});
    Tensor yh = at::empty({n, R, rows}, xc.options());
    Tensor yc = yh.narrow(2, 0, b);
    Tensor xa_t = xa.permute({1, 2, 0}).contiguous();  // [C, rows, n]
    FewRowsFn cuda = g_few_rows_cuda.load();
    if (x2.is_cuda() && cuda) {
        cuda(yc, xa_t, W);
    } else {
        few_rows_model(yc, xa_t, W);
    }
    // the pattern: yh[t][i][b+g] = sum_{j,k,f} basis[i,j][k] terms[k][g][f] xa[t][j][b+f]
    Tensor w = at::einsum("kgf,tjf->jktg", {F.terms, xa.narrow(2, b, nf)}).reshape({C * RBE_NPAT, n * nf});
    Tensor z = at::mm(W.basis.to(ct).view({R, C * RBE_NPAT}), w).view({R, n, nf}).permute({1, 0, 2});
    yh.narrow(2, b, nf).copy_(z);
    Tensor y = at::mm(yh.view({n * R, rows}), F.S).view({n, R * b}).narrow(1, 0, W.out);
    if (bias.has_value())
        out.copy_(y + bias->to(ct));
    else
        out.copy_(y);
}

bool few(int64_t n) { return n > 0 && n <= g_few_tokens.load(std::memory_order_relaxed); }

Tensor empty0(const at::TensorOptions& opt) { return at::empty({0}, opt); }

// Entered by every function below: the products are the kernel's own arithmetic, so neither
// autograd (the operators' derivatives are registered separately) nor autocast (which would turn
// float32 products into bfloat16 ones) may see them.
struct Scope {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    c10::impl::ExcludeDispatchKeyGuard no_autocast{
        c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA})};
};

// the arguments with each weight's numbers multiplied by their scales (the scales kept: project reads them)
FFNArgs scaled(const FFNArgs& a) {
    FFNArgs s = a;
    s.W1 = scaled_weight(a.W1, a.scales1), s.W2 = scaled_weight(a.W2, a.scales2);
    return s;
}

}  // namespace

bool dct_tables_ready(int64_t b, at::ScalarType dt, at::Device dev) {
    const at::ScalarType ct = compute_type(dt);
    return g_tables.has(table_key(b, ct, dev)) && g_few_tables.has(table_key(b, ct, dev));
}

void dct_prepare_tables(int64_t b, at::ScalarType dt, at::Device dev) {
    tables(b, dt, dev);
    few_tables(b, compute_type(dt), dev);
}

bool dct_path_enabled() { return g_dct_path.load(std::memory_order_relaxed); }
bool set_dct_path(bool on) { return g_dct_path.exchange(on); }
int64_t set_dct_few_tokens(int64_t n) { return g_few_tokens.exchange(std::max<int64_t>(n, 0)); }
void set_few_rows_cuda(FewRowsFn fn) { g_few_rows_cuda.store(fn); }
void set_densify_cuda(DensifyFn fn) { g_densify_cuda.store(fn); }

// ---- linear ----
Tensor dct_linear(const Tensor& x, const Tensor& x2, const Weight& Win, const Scales& sc,
                  const c10::optional<Tensor>& bias) {
    const Scope scope;
    const Weight W = scaled_weight(Win, sc);
    const Tables& T = tables(W.b, x.scalar_type(), x.device());
    const int64_t n = x2.size(0);
    Tensor y = at::empty(with_last(x, W.out), x2.options());  // a base tensor, not a view
    if (n == 0) return y;
    if (few(n)) {
        Tensor y2 = y.view({n, W.out});
        few_linear_out(y2, x2, W, bias);
        return y;
    }
    Tensor yh = mm_ct(seg_dct(x2, cdiv(W.in, W.b), T.psi), densify(W, T, x.scalar_type()).t());
    Tensor y2 = y.view({n, W.out});
    seg_idct_out(y2, yh, T.psi, bias);
    return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dct_linear_backward(const Tensor& x, const Tensor& x2, const Tensor& g2,
                                                               const Weight& Win, const Scales& sc,
                                                               std::array<bool, 4> mask) {
    const Scope scope;
    const Weight W = scaled_weight(Win, sc);
    const at::ScalarType dt = x.scalar_type(), ct = compute_type(dt);
    const Tables& T = tables(W.b, dt, x.device());
    const int64_t R = cdiv(W.out, W.b), C = cdiv(W.in, W.b), n = x2.size(0);
    auto opt = x2.options();
    Tensor dx = empty0(opt), db = empty0(opt), dc = empty0(opt), dbias = empty0(opt);
    Tensor gh = seg_dct(g2, R, T.psi);
    if (mask[0]) {
        dx = at::empty(x.sizes(), opt);
        if (n > 0) {
            Tensor dx2 = dx.view({n, W.in});
            seg_idct_out(dx2, mm_ct(gh, densify(W, T, dt)), T.psi, c10::nullopt);
        }
    }
    if (mask[1] || mask[2]) {
        Tensor dchat = at::zeros({R * W.b, C * W.b}, opt.dtype(ct));
        add_at_b(dchat, gh, seg_dct(x2, C, T.psi));
        project(mask[1] ? &db : nullptr, mask[2] ? &dc : nullptr, dchat, W, T, sc);
    }
    if (mask[3]) dbias = at::sum(g2, {0}, false, ct).to(dt);
    return {dx, db, dc, dbias};
}

// ---- the feed-forward block ----
std::tuple<Tensor, Tensor> dct_ffn(const Tensor& x, const FFNArgs& args, bool keep_pre) {
    const Scope scope;
    const FFNArgs a = scaled(args);
    const at::ScalarType dt = x.scalar_type();
    const Tables& T = tables(a.P.b, dt, x.device());
    const int64_t d_model = a.W1.in, d_ff = a.W1.out, Tn = a.x2.size(0), b = a.P.b;
    auto opt = a.x2.options();
    Tensor y = at::empty(x.sizes(), opt);  // a base tensor, not a view
    Tensor pre = keep_pre ? at::empty(with_last(x, d_ff), opt) : empty0(opt);
    if (Tn == 0) return {y, pre};
    Tensor y2 = y.view({Tn, d_model});
    if (few(Tn)) {  // the whole call at once (a few tokens are far below any chunk's memory)
        Tensor h = keep_pre ? pre.view({Tn, d_ff}) : at::empty({Tn, d_ff}, opt);
        few_linear_out(h, a.x2, a.W1, a.bias1);
        few_linear_out(y2, activation(h, a.act), a.W2, a.bias2);
        return {y, pre};
    }
    const Tensor big1 = densify(a.W1, T, dt), big2 = densify(a.W2, T, dt);
    for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
        const int64_t n = std::min(a.chunk, Tn - t0);
        Tensor h = keep_pre ? pre.view({Tn, d_ff}).narrow(0, t0, n) : at::empty({n, d_ff}, opt);
        seg_idct_out(h, mm_ct(seg_dct(a.x2.narrow(0, t0, n), cdiv(d_model, b), T.psi), big1.t()), T.psi, a.bias1);
        Tensor hid = activation(h, a.act);
        Tensor yc = y2.narrow(0, t0, n);
        seg_idct_out(yc, mm_ct(seg_dct(hid, cdiv(d_ff, b), T.psi), big2.t()), T.psi, a.bias2);
    }
    return {y, pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dct_ffn_backward(const Tensor& x, const Tensor& g2,
                                                                                    const Tensor& pre2,
                                                                                    const FFNArgs& args,
                                                                                    std::array<bool, 7> mask) {
    const Scope scope;
    const FFNArgs a = scaled(args);
    const at::ScalarType dt = x.scalar_type(), ct = compute_type(dt);
    const Tables& T = tables(a.P.b, dt, x.device());
    const int64_t d_model = a.W1.in, d_ff = a.W1.out, Tn = a.x2.size(0), b = a.P.b;
    const int64_t Cm = cdiv(d_model, b), Cf = cdiv(d_ff, b);  // segments of d_model and of d_ff
    auto opt = a.x2.options(), copt = opt.dtype(ct);
    const bool saved = pre2.defined();
    const bool need1 = mask[0] || mask[1] || mask[2] || mask[3];
    const bool dw1_on = mask[1] || mask[2], dw2_on = mask[4] || mask[5];
    const Tensor big1 = !saved || mask[0] ? densify(a.W1, T, dt) : Tensor();
    const Tensor big2 = need1 ? densify(a.W2, T, dt) : Tensor();
    // the gradients of the two densified matrices over the whole call, projected once at the end
    Tensor dchat1 = dw1_on ? at::zeros({Cf * b, Cm * b}, copt) : Tensor();
    Tensor dchat2 = dw2_on ? at::zeros({Cm * b, Cf * b}, copt) : Tensor();
    Tensor dbias1 = mask[3] ? at::zeros({d_ff}, copt) : empty0(opt);
    Tensor dbias2 = mask[6] ? at::zeros({d_model}, copt) : empty0(opt);
    Tensor dx = mask[0] ? at::empty(x.sizes(), opt) : empty0(opt);
    for (int64_t t0 = 0; t0 < Tn; t0 += a.chunk) {
        const int64_t n = std::min(a.chunk, Tn - t0);
        const Tensor xc = a.x2.narrow(0, t0, n), gc = g2.narrow(0, t0, n);
        Tensor xh;  // fc1's transformed input, when the recompute or dW1 needs it
        if (!saved || dw1_on) xh = seg_dct(xc, Cm, T.psi);
        Tensor h;  // standard: the saved pre-activation; checkpointed: recomputed
        if (saved) {
            h = pre2.narrow(0, t0, n);
        } else {
            h = at::empty({n, d_ff}, opt);
            seg_idct_out(h, mm_ct(xh, big1.t()), T.psi, a.bias1);
        }
        const Tensor gh = seg_dct(gc, Cm, T.psi);
        if (dw2_on) add_at_b(dchat2, gh, seg_dct(activation(h, a.act), Cf, T.psi));
        if (mask[6]) dbias2.add_(at::sum(gc, {0}, false, ct));
        if (!need1) continue;
        Tensor dh = at::empty({n, d_ff}, opt);
        seg_idct_out(dh, mm_ct(gh, big2), T.psi, c10::nullopt);
        dh = activation_backward(dh, h, a.act);
        const Tensor dhh = seg_dct(dh, Cf, T.psi);
        if (dw1_on) add_at_b(dchat1, dhh, xh);
        if (mask[3]) dbias1.add_(at::sum(dh, {0}, false, ct));
        if (mask[0]) {
            Tensor dxc = dx.view({Tn, d_model}).narrow(0, t0, n);
            seg_idct_out(dxc, mm_ct(dhh, big1), T.psi, c10::nullopt);
        }
    }
    Tensor db1 = empty0(opt), dc1 = empty0(opt), db2 = empty0(opt), dc2 = empty0(opt);
    if (dw1_on) project(mask[1] ? &db1 : nullptr, mask[2] ? &dc1 : nullptr, dchat1, a.W1, T, a.scales1);
    if (dw2_on) project(mask[4] ? &db2 : nullptr, mask[5] ? &dc2 : nullptr, dchat2, a.W2, T, a.scales2);
    if (mask[3]) dbias1 = dbias1.to(dt);
    if (mask[6]) dbias2 = dbias2.to(dt);
    return {dx, db1, dc1, dbias1, db2, dc2, dbias2};
}

}  // namespace rbe
