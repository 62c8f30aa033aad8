/* rbe_linear.c - y = x W^T + bias computed in the transform domain (DESIGN.md section 3).
 *
 * Forward, per tile of RBE_TILE tokens:
 *   1. analysis: Xh_j = A x_j^T  (DCT of every input segment, plus its projections
 *      on the pattern's analysis vectors), feature-major;
 *   2. rows: Yh_i = sum_j (sparse product c_uv Xh_j[v] -> Yh_i[u]) + pattern combination;
 *      y_i = S^T Yh_i (inverse DCT + pattern synthesis), bias and activation on write.
 * Backward: Gh_i = S g_i^T, then dx_j = A^T (sum_i transposed products), and
 * dcoeffs / dbasis as dot products over tokens of Gh and Xh rows.
 */
#include "rbe.h"

// transform rows + output tile + the fast DCT's work rows
size_t rbe_rows_scratch(int b, int nf) { return (size_t)(4 * b + nf) * RBE_TILE; }

#define RBE_T float
#define RBE_SFX(name) name##_f32
#define RBE_KSFX(name) name##_f32_portable
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_KSFX

#define RBE_T double
#define RBE_SFX(name) name##_f64
#define RBE_KSFX(name) name##_f64
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_KSFX

/* float32: the AVX2 kernels (rbe_avx2.c) where the CPU has AVX2 + FMA, else the portable ones */
void rbe_analysis_f32(float* Xh, const float* x, const float* A, const float* dct, float* scratch, long T, int n,
                      int b, int nf, long p0, long p1) {
#ifdef RBE_X86_KERNELS
    if (rbe_cpu_has_avx2()) {
        rbe_analysis_f32_avx2(Xh, x, A, dct, scratch, T, n, b, nf, p0, p1);
        return;
    }
#endif
    rbe_analysis_f32_portable(Xh, x, A, dct, scratch, T, n, b, nf, p0, p1);
}

void rbe_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xh, const float* S, const float* dct, const float* basis,
                          const float* coeffs, const void* index, int wide, const rbe_sched_f32* sched,
                          const float* bias, int act, float* scratch, long T, int out, int in, int b, int nf, int k,
                          long p0, long p1) {
#ifdef RBE_X86_KERNELS
    if (rbe_cpu_has_avx2()) {
        rbe_rows_forward_f32_avx2(y, pre, Xnext, Xh, S, dct, basis, coeffs, index, wide, sched ? sched->start : NULL,
                                  sched ? sched->off : NULL, sched ? sched->val : NULL, bias, act, scratch, T, out, in,
                                  b, nf, k, p0, p1);
        return;
    }
#endif
    rbe_rows_forward_f32_portable(y, pre, Xnext, Xh, S, dct, basis, coeffs, index, wide, bias, act, scratch, T, out, in,
                                  b, nf, k, p0, p1);
}

void rbe_cols_backward_f32(float* dx, const float* Gh, const float* A, const float* dct, const float* basis,
                           const float* coeffs_t, const int32_t* index_t, const rbe_sched_f32* sched, float* scratch,
                           long T, int out, int in, int b, int nf, int k, long p0, long p1) {
#ifdef RBE_X86_KERNELS
    if (sched && rbe_cpu_has_avx2()) {
        rbe_cols_backward_f32_avx2(dx, Gh, A, dct, basis, sched->start, sched->off, sched->val, scratch, T, out, in, b,
                                   nf, p0, p1);
        return;
    }
    if (coeffs_t && rbe_cpu_has_avx2()) {
        rbe_cols_backward_f32_avx2_blocks(dx, Gh, A, dct, basis, coeffs_t, index_t, scratch, T, out, in, b, nf, k, p0,
                                          p1);
        return;
    }
#endif
    rbe_cols_backward_f32_portable(dx, Gh, A, dct, basis, coeffs_t, index_t, scratch, T, out, in, b, nf, k, p0,
                                   p1);
}

void rbe_params_backward_f32(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh, const void* index,
                             int wide, const rbe_sched_f32* sched, int accumulate, long T, int out, int in, int b,
                             int nf, int k, long p0, long p1) {
#ifdef RBE_X86_KERNELS
    if (sched && sched->acc && rbe_cpu_has_avx2()) {
        rbe_params_backward_f32_avx2(dbasis, dcoeffs, Gh, Xh, sched->start, sched->off, sched->pos, sched->acc,
                                     accumulate, T, out, in, b, nf, k, p0, p1);
        return;
    }
    if (T <= RBE_TILE && rbe_cpu_has_avx2()) {
        rbe_params_backward_f32_avx2_blocks(dbasis, dcoeffs, Gh, Xh, index, wide, accumulate, T, out, in, b, nf, k,
                                            p0, p1);
        return;
    }
#endif
    rbe_params_backward_f32_portable(dbasis, dcoeffs, Gh, Xh, index, wide, accumulate, T, out, in, b, nf, k, p0,
                                     p1);
}
