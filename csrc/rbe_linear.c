/* rbe_linear.c - y = x W^T + bias computed in the transform domain (DESIGN.md section 3).
 *
 * Forward, per tile of RBE_TILE tokens:
 *   1. analysis: Xh_j = A x_j^T  (DCT of every input segment, plus its projections
 *      on the pattern's analysis vectors), feature-major;
 *   2. rows: Yh_i = sum_j (sparse product c_uv Xh_j[v] -> Yh_i[u]) + pattern combination;
 *      y_i = S^T Yh_i (inverse DCT + pattern synthesis), bias and activation on write.
 * Backward: Gh_i = S g_i^T, then dx_j = A^T (sum_i transposed products), and
 * dcoeffs / dbasis as dot products over tokens of Gh and Xh rows.
 *
 * The float32 entry points choose at run time between the AVX-512 kernels (rbe_avx512.c), the
 * AVX2 + FMA ones (rbe_avx2.c) and the portable ones (rbe_linear_impl.h, also the double
 * kernels): the best the CPU has, capped by RBE_FFN_ISA (rbe.h).
 */
#include "rbe_variants.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// transform rows + output tile + the fast DCT's work rows
size_t rbe_rows_scratch(int b, int nf) { return (size_t)(4 * b + nf) * RBE_TILE; }
size_t rbe_few_size(int n, int b, int nf, long T) {
    return (size_t)((n + b - 1) / b) * (size_t)(b + nf) * (size_t)T + RBE_FEW_SLACK;
}
// RBE_FEW_STREAMS accumulators [rows][RBE_FEW_MAX] (the portable kernel uses the first) + slack, one
// token's output segment [b], one analysed token [rows]
size_t rbe_few_scratch(int b, int nf) {
    return (size_t)(b + nf) * RBE_FEW_MAX * RBE_FEW_STREAMS + RBE_FEW_SLACK + (size_t)b + (size_t)(b + nf);
}

// rbe_one_rows_forward: the few-token scratch, then (RBE_PACK_ROWS) the compact DCT rows of the
// input and the zero its padding reads
size_t rbe_one_scratch(int in, int b, int nf) {
    return rbe_few_scratch(b, nf) + (size_t)((in + b - 1) / b) * (size_t)b + RBE_PACK_ROW_LANES;
}

#define RBE_T float
#define RBE_SFX(name) name##_f32
#define RBE_KSFX(name) name##_f32_portable
#define RBE_WEIGHT rbe_weight_f32
#define RBE_PLAN rbe_plan_f32
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_KSFX
#undef RBE_WEIGHT
#undef RBE_PLAN

#define RBE_T double
#define RBE_SFX(name) name##_f64
#define RBE_KSFX(name) name##_f64
#define RBE_WEIGHT rbe_weight_f64
#define RBE_PLAN rbe_plan_f64
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_KSFX
#undef RBE_WEIGHT
#undef RBE_PLAN

// ---- the instruction set of the float32 kernels, chosen once ----

static int isa_best(void) {
    if (rbe_cpu_has_avx512()) return RBE_ISA_AVX512;
    if (rbe_cpu_has_avx2()) return RBE_ISA_AVX2;
    return RBE_ISA_PORTABLE;
}

// the best one, capped by RBE_FFN_ISA
static int isa_choose(void) {
    const int best = isa_best();
    const char* cap = getenv("RBE_FFN_ISA");
    if (!cap || !*cap) return best;
    int level = -1;
    if (!strcmp(cap, "avx512")) level = RBE_ISA_AVX512;
    else if (!strcmp(cap, "avx2")) level = RBE_ISA_AVX2;
    else if (!strcmp(cap, "portable")) level = RBE_ISA_PORTABLE;
    if (level < 0) {
        fprintf(stderr, "rbe_ffn: RBE_FFN_ISA=%s is not one of avx512, avx2, portable: ignored\n", cap);
        return best;
    }
    return level < best ? level : best;
}

int rbe_cpu_isa_level(void) {
    static atomic_int chosen = -1;  // threads racing on the first call compute the same value
    int level = atomic_load_explicit(&chosen, memory_order_relaxed);
    if (level < 0) {
        level = isa_choose();
        atomic_store_explicit(&chosen, level, memory_order_relaxed);
    }
    return level;
}

const char* rbe_cpu_isa(void) {
    static const char* const names[] = {"portable", "avx2", "avx512"};
    return names[rbe_cpu_isa_level()];
}

// ---- the float32 entry points: the chosen x86 kernels, else the portable ones ----

#ifdef RBE_X86_KERNELS
const rbe_x86_kernels_f32 rbe_x86_avx2 = {"avx2",
                                          rbe_analysis_f32_avx2,
                                          rbe_rows_forward_f32_avx2,
                                          rbe_cols_backward_f32_avx2,
                                          rbe_cols_backward_f32_avx2_blocks,
                                          rbe_cols_coeffs_backward_f32_avx2,
                                          rbe_params_backward_f32_avx2,
                                          rbe_params_backward_f32_avx2_blocks,
                                          rbe_few_analysis_f32_avx2,
                                          rbe_few_rows_forward_f32_avx2,
                                          rbe_one_rows_forward_f32_avx2};
const rbe_x86_kernels_f32 rbe_x86_avx512 = {"avx512",
                                            rbe_analysis_f32_avx512,
                                            rbe_rows_forward_f32_avx512,
                                            rbe_cols_backward_f32_avx512,
                                            rbe_cols_backward_f32_avx512_blocks,
                                            rbe_cols_coeffs_backward_f32_avx512,
                                            rbe_params_backward_f32_avx512,
                                            rbe_params_backward_f32_avx512_blocks,
                                            rbe_few_analysis_f32_avx512,
                                            rbe_few_rows_forward_f32_avx512,
                                            rbe_one_rows_forward_f32_avx512};
#endif

static const rbe_x86_kernels_f32* x86(void) {
#ifdef RBE_X86_KERNELS
    switch (rbe_cpu_isa_level()) {
    case RBE_ISA_AVX512: return &rbe_x86_avx512;
    case RBE_ISA_AVX2: return &rbe_x86_avx2;
    }
#endif
    return NULL;
}

void rbe_analysis_f32(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch, long T,
                      int n, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k) k->analysis(Xh, x, M, P, scratch, T, n, p0, p1);
    else rbe_analysis_f32_portable(Xh, x, M, P, scratch, T, n, p0, p1);
}

void rbe_few_analysis_f32(float* Xf, const float* x, const float* At, int b, int nf, long T, int n, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k) k->few_analysis(Xf, x, At, b, nf, T, n, p0, p1);
    else rbe_few_analysis_f32_portable(Xf, x, At, b, nf, T, n, p0, p1);
}

void rbe_few_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                              const rbe_plan_f32* P, const float* At, const float* bias, int act, float* scratch,
                              long T, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k) k->few_rows_forward(y, pre, Xnext, Xf, W, P, At, bias, act, scratch, T, p0, p1);
    else rbe_few_rows_forward_f32_portable(y, pre, Xnext, Xf, W, P, At, bias, act, scratch, T, p0, p1);
}

int rbe_one_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                             const rbe_packed_f32* K, const rbe_plan_f32* P, const float* At, const float* bias,
                             int act, float* scratch, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    return k ? k->one_rows_forward(y, pre, Xnext, Xf, W, K, P, At, bias, act, scratch, p0, p1) : -2;
}

void rbe_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                          const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                          float* scratch, long T, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k) k->rows_forward(y, pre, Xnext, Xh, W, P, sched, bias, act, scratch, T, p0, p1);
    else rbe_rows_forward_f32_portable(y, pre, Xnext, Xh, W, P, bias, act, scratch, T, p0, p1);
}

void rbe_cols_backward_f32(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                           const rbe_sched_f32* sched, float* scratch, long T, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k && sched) k->cols_backward(dx, Gh, W, P, sched, scratch, T, p0, p1);
    else if (k && W->coeffs) k->cols_backward_blocks(dx, Gh, W, P, scratch, T, p0, p1);
    else rbe_cols_backward_f32_portable(dx, Gh, W, P, scratch, T, p0, p1);
}

int rbe_cols_coeffs_backward_f32(float* dx, float* dcoeffs, const rbe_grad_next_f32* next, const float* Gh,
                                 const float* Xh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                 const rbe_sched_f32* sched, int accumulate, float* scratch, long T, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (!k) return -2;
    k->cols_coeffs_backward(dx, dcoeffs, next, Gh, Xh, W, P, sched, accumulate, scratch, T, p0, p1);
    return 0;
}

void rbe_params_backward_f32(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                             const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                             int accumulate, long T, long p0, long p1) {
    const rbe_x86_kernels_f32* k = x86();
    if (k && ((sched && sched->acc) || !dcoeffs)) {
        k->params_backward(dbasis, dcoeffs, Gh, Xh, W, P, sched, accumulate, T, p0, p1);
        return;
    }
    accumulate &= 1;  // no schedule, no sums held between calls: each call adds its own
    if (k && T <= RBE_TILE) k->params_backward_blocks(dbasis, dcoeffs, Gh, Xh, W, P, accumulate, T, p0, p1);
    else rbe_params_backward_f32_portable(dbasis, dcoeffs, Gh, Xh, W, P, accumulate, T, p0, p1);
}

// Schedule of the sparse products for groups [g0, g1): the coefficients of one block-row
// (transpose = 0: group i, key u, source row (j, v)) or of one block-column (transpose = 1:
// group j, key v, source row (i, u)), sorted by key with counting sort. For group g the
// entries [start[g*(b+1) + key], start[g*(b+1) + key + 1]) are written to one output row;
// off[e] = (block * rows + source row) * TILE is the source row's offset inside a tile's
// transform, val[e] the coefficient times `scale` and pos[e] (may be NULL) its flat position in coeffs.
// start: [ngroups, b+1]; off, val, pos: [R*C*k], group g's entries from g*(blocks per group)*k.
void rbe_schedule_f32(int32_t* start, int32_t* off, float* val, int32_t* pos, const rbe_weight_f32* W, int nf,
                      int transpose, float scale, long g0, long g1) {
    const float* coeffs = W->coeffs;
    const void* index = W->index;
    const int wide = W->wide, b = W->b, k = W->k;
    const int R = (W->out + b - 1) / b, C = (W->in + b - 1) / b, rows = b + nf, per = transpose ? R : C;
    const int sh = rbe_pos_shift(b);
    for (long g = g0; g < g1; g++) {
        int32_t* st = start + g * (b + 1);
        for (int e = 0; e <= b; e++) st[e] = 0;
        for (int m = 0; m < per; m++) {
            long blk = transpose ? (long)m * C + g : g * C + m;
            for (int q = 0; q < k; q++) {
                int idx = wide ? ((const int32_t*)index)[blk * k + q] : ((const int16_t*)index)[blk * k + q];
                int u = rbe_pos_row(idx, b, sh), v = idx - u * b;
                st[(transpose ? v : u) + 1]++;
            }
        }
        for (int e = 0; e < b; e++) st[e + 1] += st[e];
        const long base = g * per * (long)k;
        for (int m = 0; m < per; m++) {
            long blk = transpose ? (long)m * C + g : g * C + m;
            for (int q = 0; q < k; q++) {
                int idx = wide ? ((const int32_t*)index)[blk * k + q] : ((const int16_t*)index)[blk * k + q];
                int u = rbe_pos_row(idx, b, sh), v = idx - u * b;
                int key = transpose ? v : u, src = transpose ? u : v;
                long e = base + st[key]++;
                off[e] = (int32_t)(((long)m * rows + src) * RBE_TILE);
                val[e] = coeffs[blk * k + q] * scale;
                if (pos) pos[e] = (int32_t)(blk * k + q);
            }
        }
        for (int e = b; e > 0; e--) st[e] = st[e - 1];  // placing advanced st[key] to the next key's start
        st[0] = 0;
        for (int e = 0; e <= b; e++) st[e] += (int32_t)base;  // absolute entry numbers
    }
}

