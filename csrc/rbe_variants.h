/* rbe_variants.h - internal to the kernel files (and their C tests): the instruction-set
 * variants behind the float32 entry points of rbe.h, which rbe_linear.c chooses between at
 * run time, and the pattern's rank-1 terms that every kernel family expands.
 * Not part of the public kernel API.
 */
#ifndef RBE_VARIANTS_H
#define RBE_VARIANTS_H

#include "rbe.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RBE_X86_KERNELS 1 /* rbe_avx2.c's and rbe_avx512.c's kernels exist (chosen at run time) */
#endif

/* A coefficient's position idx = u*b + v in its block (rbe.h) split without a division when b is
 * a power of two (the usual case): rbe_pos_shift(b) is log2 b, or -1 for other b, and
 * rbe_pos_row(idx, b, sh) = idx / b (idx >= 0); then v = idx - u*b. */
static inline int rbe_pos_shift(int b) { return b > 0 && (b & (b - 1)) == 0 ? __builtin_ctz((unsigned)b) : -1; }
static inline int rbe_pos_row(int idx, int b, int sh) { return sh >= 0 ? idx >> sh : idx / b; }

/* The pattern of a block as rank-1 terms between the plan's separable rows (rbe_plan.c):
 * term {k, g, f} adds p_k * (synthesis row g) (analysis row f)^T. Phi_1 (the d term) is not
 * separable: it is sum_m (analysis row RBE_NFIX + m) with weight p_1, m < nf - RBE_NFIX.
 * Forward: Yh[g] += p_k Xh[b + f]; transposed: DX[b + f] += p_k Gh[g]; gradient:
 * dp_k += Gh[b + g] . Xh[b + f] (all rows counted past the b DCT rows). */
#define RBE_NTERMS 8
static const int rbe_pattern_terms[RBE_NTERMS][3] = {
    {0, 0, 0}, /* Phi_0 = 1 1^T */
    {2, 0, 1}, /* Phi_2 = 1 (z^2)^T + (z^2) 1^T */
    {2, 1, 0},
    {3, 0, 2}, /* Phi_3 = 1 cos(pi z)^T */
    {4, 2, 0}, /* Phi_4 = cos(pi z) 1^T */
    {5, 0, 3}, /* Phi_5 = 1 cos(2 pi z)^T */
    {6, 3, 0}, /* Phi_6 = cos(2 pi z) 1^T */
    {7, 2, 2}, /* Phi_7 = cos(pi z) cos(pi z)^T */
};

/* The activations evaluated in float32 (RBE_ACT_F32, rbe_act_f32.h) at a given width: lanes 16
 * (AVX-512: the caller checks rbe_cpu_has_avx512), 8 (AVX2 + FMA) or 1; y = act(x) (y may be x),
 * g (if not NULL) = act'(x), times dy if dy is not NULL. The same bits at every width (tested). */
void rbe_act_f32_lanes(float* y, float* g, const float* dy, const float* x, long n, int act, int lanes);
/* gelu for float32 results with AVX-512 (rbe_act.c; x86 builds, and only where the CPU has
 * AVX-512): y = gelu(x) (y may be x, or NULL), g = gelu'(x) (or NULL), times dy when dy is not
 * NULL, the bits of the scalar definition (rbe_act_scalar_f32, rbe_act_grad_scalar_f32); whole
 * vectors of 8 only: returns how many values were done. *slow (when not NULL) is increased by the
 * number of values that took the scalar definition itself. */
long rbe_gelu_avx512(float* y, float* g, const float* dy, const float* x, long n, long* slow);

/* portable float32 kernels (the double ones are rbe.h's _f64 entry points, same bodies) */
void rbe_analysis_f32_portable(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch,
                               long T, int n, long p0, long p1);
void rbe_rows_forward_f32_portable(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                                   const rbe_plan_f32* P, const float* bias, int act, float* scratch, long T, long p0,
                                   long p1);
void rbe_cols_backward_f32_portable(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                    float* scratch, long T, long p0, long p1);
void rbe_few_analysis_f32_portable(float* Xf, const float* x, const float* At, int b, int nf, long T, int n,
                                   long p0, long p1);
void rbe_few_rows_forward_f32_portable(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                       const rbe_plan_f32* P, const float* At, const float* bias, int act,
                                       float* scratch, long T, long p0, long p1);
void rbe_params_backward_f32_portable(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                      const rbe_weight_f32* W, const rbe_plan_f32* P, int accumulate, long T,
                                      long p0, long p1);

/* x86 kernels: AVX2 + FMA (rbe_avx2.c) and AVX-512 (rbe_avx512.c), both rbe_x86_impl.h.
 * sched may be NULL in rows_forward (block by block); _blocks: without schedules, block by
 * block: cols in coefficient order (any T), params for one tile (T <= RBE_TILE); the others
 * need the schedule. */
void rbe_few_analysis_f32_avx2(float* Xf, const float* x, const float* At, int b, int nf, long T, int n,
                               long p0, long p1);
void rbe_few_rows_forward_f32_avx2(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                   const rbe_plan_f32* P, const float* At, const float* bias, int act,
                                   float* scratch, long T, long p0, long p1);
int rbe_one_rows_forward_f32_avx2(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                  const rbe_packed_f32* K, const rbe_plan_f32* P, const float* At, const float* bias,
                                  int act, float* scratch, long p0, long p1);
void rbe_analysis_f32_avx2(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch, long T,
                           int n, long p0, long p1);
void rbe_rows_forward_f32_avx2(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                               const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                               float* scratch, long T, long p0, long p1);
void rbe_cols_backward_f32_avx2(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                const rbe_sched_f32* sched, float* scratch, long T, long p0, long p1);
void rbe_cols_backward_f32_avx2_blocks(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                       float* scratch, long T, long p0, long p1);
void rbe_cols_coeffs_backward_f32_avx2(float* dx, float* dcoeffs, const rbe_grad_next_f32* next, const float* Gh,
                                       const float* Xh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                       const rbe_sched_f32* sched, int accumulate, float* scratch, long T, long p0, long p1);
void rbe_params_backward_f32_avx2(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                  const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                                  int accumulate, long T, long p0, long p1);
void rbe_params_backward_f32_avx2_blocks(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                         const rbe_weight_f32* W, const rbe_plan_f32* P, int accumulate, long T,
                                         long p0, long p1);
void rbe_few_analysis_f32_avx512(float* Xf, const float* x, const float* At, int b, int nf, long T, int n,
                               long p0, long p1);
void rbe_few_rows_forward_f32_avx512(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                   const rbe_plan_f32* P, const float* At, const float* bias, int act,
                                   float* scratch, long T, long p0, long p1);
int rbe_one_rows_forward_f32_avx512(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                  const rbe_packed_f32* K, const rbe_plan_f32* P, const float* At, const float* bias,
                                  int act, float* scratch, long p0, long p1);
void rbe_analysis_f32_avx512(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch,
                             long T, int n, long p0, long p1);
void rbe_rows_forward_f32_avx512(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                                 const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                                 float* scratch, long T, long p0, long p1);
void rbe_cols_backward_f32_avx512(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                  const rbe_sched_f32* sched, float* scratch, long T, long p0, long p1);
void rbe_cols_backward_f32_avx512_blocks(float* dx, const float* Gh, const rbe_weight_f32* W,
                                         const rbe_plan_f32* P, float* scratch, long T, long p0, long p1);
void rbe_cols_coeffs_backward_f32_avx512(float* dx, float* dcoeffs, const rbe_grad_next_f32* next, const float* Gh,
                                         const float* Xh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                         const rbe_sched_f32* sched, int accumulate, float* scratch, long T, long p0, long p1);
void rbe_params_backward_f32_avx512(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                    const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                                    int accumulate, long T, long p0, long p1);
void rbe_params_backward_f32_avx512_blocks(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                           const rbe_weight_f32* W, const rbe_plan_f32* P, int accumulate, long T,
                                           long p0, long p1);

/* The x86 kernels of one instruction set, as the float32 entry points of rbe_linear.c choose
 * between them: rows_forward (any sched), cols_backward with a schedule, else _blocks;
 * params_backward with a schedule (and acc), else _blocks for one tile, else the portable one. */
typedef struct {
    const char* name;
    void (*analysis)(float*, const float*, const float*, const rbe_plan_f32*, float*, long, int, long, long);
    void (*rows_forward)(float*, float*, float*, const float*, const rbe_weight_f32*, const rbe_plan_f32*,
                         const rbe_sched_f32*, const float*, int, float*, long, long, long);
    void (*cols_backward)(float*, const float*, const rbe_weight_f32*, const rbe_plan_f32*, const rbe_sched_f32*,
                          float*, long, long, long);
    void (*cols_backward_blocks)(float*, const float*, const rbe_weight_f32*, const rbe_plan_f32*, float*, long,
                                 long, long);
    void (*cols_coeffs_backward)(float*, float*, const rbe_grad_next_f32*, const float*, const float*,
                                 const rbe_weight_f32*, const rbe_plan_f32*, const rbe_sched_f32*, int, float*, long,
                                 long, long);
    void (*params_backward)(float*, float*, const float*, const float*, const rbe_weight_f32*, const rbe_plan_f32*,
                            const rbe_sched_f32*, int, long, long, long);
    void (*params_backward_blocks)(float*, float*, const float*, const float*, const rbe_weight_f32*,
                                   const rbe_plan_f32*, int, long, long, long);
    void (*few_analysis)(float*, const float*, const float*, int, int, long, int, long, long);
    void (*few_rows_forward)(float*, float*, float*, const float*, const rbe_weight_f32*, const rbe_plan_f32*,
                             const float*, const float*, int, float*, long, long, long);
    int (*one_rows_forward)(float*, float*, float*, const float*, const rbe_weight_f32*, const rbe_packed_f32*,
                            const rbe_plan_f32*, const float*, const float*, int, float*, long, long);
} rbe_x86_kernels_f32;
#ifdef RBE_X86_KERNELS
extern const rbe_x86_kernels_f32 rbe_x86_avx2, rbe_x86_avx512;
#endif

#ifdef __cplusplus
}
#endif
#endif
