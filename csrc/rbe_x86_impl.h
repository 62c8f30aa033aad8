/* rbe_x86_impl.h - the body of the x86 float32 kernels, written once for any vector width;
 * included by rbe_avx2.c (8 floats, AVX2 + FMA) and rbe_avx512.c (16 floats, AVX-512).
 *
 * Same contracts as the portable kernels of rbe_linear_impl.h (rbe.h), which are tested
 * against these. The including file defines, before the #include:
 *   XT              the target attribute of every function, e.g. __attribute__((target("avx2,fma")))
 *   XSFX(name), XSFX_BLOCKS(name)  the entry points' names (rbe_variants.h): name##_avx2, name##_avx2_blocks
 *   VF, VW          the vector type and its float lanes (8 or 16; 16 divides every lane count)
 *   VZERO() VLOAD(p) VSTORE(p, v) VADD(a, b) VSUB(a, b) VMUL(a, b) VFMA(a, b, c) = a*b + c
 *   VSET1(x) VBCAST(p) (= VSET1(*p), from memory)
 * and, after it, the four primitives declared below, where the register blocking differs
 * (and sparse_sched_bf16, coeff_grads_bf16 when it defines XBF16, their target attribute):
 *   gemm_tile       out[i][t] (+)= sum_p L[i*li + p*lp] Rm[p][t] over a tile (the pattern
 *                   projections and the dense parts of the fast DCT are all this one product);
 *   hsum(v)         the sum of a vector's lanes;
 *   coeff_grads     sacc[e] += g . Xt[off[e]] over the entries [e0, e1) of one output row (the
 *                   scheduled parameter gradient), sharing reductions between entries;
 *   run_product_dots  one output row's run of the sparse product with coeff_grads' dot
 *                   products of the same rows (the one-pass backward);
 * and one_sparse, the packed one-token walk (its own section below).
 * Here, per tile of TL tokens: the tile transposes (8 x 8, AVX), the fast DCT dct2_tile /
 * dct3_tile, analysis and synthesis, the sparse products (sparse_sched: one output row in
 * TL / VW registers while all its coefficients across a block-row or block-column are applied,
 * with prefetch; sparse_block: block by block), the pattern terms (rbe_pattern_terms) and the
 * entry points.
 *
 * Lanes: a tile of at most 16 tokens is computed on 16 lanes (lanes()), a quarter of the work;
 * lanes past the tokens hold what zero-padded tokens give, and every lane's arithmetic is the
 * same sequence at either width, so results are bitwise the same at 16 or TL lanes (the
 * reductions over lanes included: the extra lanes add exact zeros at the end of each chain).
 */
#include <immintrin.h>
#include <string.h>

#define TL RBE_TILE
#ifndef RBE_PREFETCH
#define RBE_PREFETCH 8 /* entries ahead: rows come from L2/L3 in schedule order */
#endif
#define INLINE_ALWAYS __attribute__((always_inline)) inline

#if RBE_TILE != 64
#error "the x86 kernels assume 64-token tiles"
#endif

// out[i][t] (+)= sum_p L[i*li + p*lp] Rm[p][t] for i < n_out, p < P, t < nl (nl: 16 or TL lanes).
// Rows of out are ldo floats apart, rows of Rm ldr apart; acc != 0 adds to out. Each lane is
// the chain out (or 0), then one fused multiply-add per p in order.
XT static void gemm_tile(float* restrict out, long ldo, int acc, const float* restrict L, long li, long lp,
                         const float* restrict Rm, long ldr, int n_out, int P, int nl);
XT static inline float hsum(VF v);
// sacc[e] += sum over nl lanes of g[t] * Xt[off[e] + t], for e in [e0, e1)
XT static void coeff_grads(float* restrict sacc, const float* restrict g, const float* restrict Xt,
                           const int32_t* restrict off, int e0, int e1, int nl);

#ifdef XBF16
// the DCT rows [0, b) of each of n segments of a tile ([n][rows][TL]) rounded to bfloat16 into out,
// at the same offsets (where the schedules point; the pattern rows are not read there)
static inline void to_bf16_rows(uint16_t* out, const float* tile, int n, int rows, int b) {
    for (int j = 0; j < n; j++) rbe_to_bf16(out + (size_t)j * rows * TL, tile + (size_t)j * rows * TL, (long)b * TL);
}
// out[key][:] = sum over the key's entries of val[e] * src[off[e]][:] (whole tiles) with the rows
// and the values rounded to bfloat16, the sums in float32
XBF16 static void sparse_sched_bf16(float* restrict out, const uint16_t* restrict src,
                                         const int32_t* restrict start, const int32_t* restrict off,
                                         const float* restrict val, int b);
// the same on a tile of n segments (src_tile, float32), rounded into bf16 scratch when the tile
// differs from *done (the tile last rounded there; -1 at first)
static inline void sparse_sched_tile_bf16(float* out, uint16_t* bf16, long* done, long tile, const float* src_tile,
                                          int n, int rows, const int32_t* start, const rbe_sched_f32* sched,
                                          int b) {
    if (*done != tile) to_bf16_rows(bf16, src_tile, n, rows, b);
    *done = tile;
    sparse_sched_bf16(out, bf16, start, sched->off, sched->val, b);
}
// coeff_grads on bfloat16 rows (g and Xt rounded to bfloat16, float32 sums). XBF16 is the target
// attribute of these two (the instructions need AVX-512 BF16, which the kernels' own target lacks)
XBF16 static void coeff_grads_bf16(float* restrict sacc, const uint16_t* restrict g,
                                        const uint16_t* restrict Xt, const int32_t* restrict off, int e0, int e1,
                                        int nl);
#endif

// Lanes a tile of nt tokens is computed on: a tile of at most 16 tokens (a few tokens at a time,
// as in generation) takes 16 lanes, a quarter of the work; lanes past nt hold what zero-padded
// tokens give, exactly as in a full-width tile, so results do not depend on the width.
static inline int lanes(int nt) { return nt <= 16 ? 16 : TL; }

/* Fast orthonormal DCT of a tile along its feature rows (rbe_plan.c builds `tab`):
 * the even outputs of a size-N DCT-II are the size-N/2 DCT-II of a[n] = x[n] + x[N-1-n],
 * the odd ones a dense (N/2)^2 product with d[n] = x[n] - x[N-1-n]; recursion while N
 * is even and > 2, then a dense N0 x N0 product. About b^2/3 multiply-adds instead of b^2,
 * all of them in gemm_tile; the scale factors are folded into the tables.
 * dct2: out rows ldo apart <- in [N][TL];  work: 2N rows of TL (for N even and > 2 the half
 * sums a are left in its first N/2 rows). */
XT static void dct2_tile(float* restrict out, long ldo, const float* restrict in, int N, const float* tab,
                         float* restrict work, int nl) {
    if (N % 2 || N <= 2) {
        gemm_tile(out, ldo, 0, tab, N, 1, in, TL, N, N, nl);
        return;
    }
    const int h = N / 2;
    float* a = work;
    float* d = work + (long)h * TL;
    for (int n = 0; n < h; n++) {
        const float* x0 = in + (long)n * TL;
        const float* x1 = in + (long)(N - 1 - n) * TL;
        for (int t = 0; t < nl; t += VW) {
            VF u = VLOAD(x0 + t), v = VLOAD(x1 + t);
            VSTORE(a + (long)n * TL + t, VADD(u, v));
            VSTORE(d + (long)n * TL + t, VSUB(u, v));
        }
    }
    gemm_tile(out + ldo, 2 * ldo, 0, tab, h, 1, d, TL, h, h, nl);
    dct2_tile(out, 2 * ldo, a, h, tab + (long)h * h, work + 2L * h * TL, nl);
}

// dct3 (the transpose): out [N][TL] <- in rows ldi apart. For N even and > 2 in two halves:
// dct3_halves leaves a (the inverse of the even rows) and d (of the odd ones) in work's first N
// rows, and dct3_join writes out[n] = a[n] + d[n], out[N-1-n] = a[n] - d[n]
XT static void dct3_tile(float* restrict out, const float* restrict in, long ldi, int N, const float* tab,
                         float* restrict work, int nl);
XT static void dct3_halves(const float* restrict in, long ldi, int N, const float* tab, float* restrict work, int nl) {
    const int h = N / 2;
    dct3_tile(work, in, 2 * ldi, h, tab + (long)h * h, work + 2L * h * TL, nl);
    gemm_tile(work + (long)h * TL, TL, 0, tab, 1, h, in + ldi, 2 * ldi, h, h, nl);
}
XT static void dct3_join(float* restrict out, const float* restrict work, int N, int nl) {
    const int h = N / 2;
    for (int n = 0; n < h; n++) {
        float* y0 = out + (long)n * TL;
        float* y1 = out + (long)(N - 1 - n) * TL;
        for (int t = 0; t < nl; t += VW) {
            VF u = VLOAD(work + (long)n * TL + t), v = VLOAD(work + (long)(h + n) * TL + t);
            VSTORE(y0 + t, VADD(u, v));
            VSTORE(y1 + t, VSUB(u, v));
        }
    }
}
XT static void dct3_tile(float* restrict out, const float* restrict in, long ldi, int N, const float* tab,
                         float* restrict work, int nl) {
    if (N % 2 || N <= 2) {
        gemm_tile(out, TL, 0, tab, 1, N, in, ldi, N, N, nl);
        return;
    }
    dct3_halves(in, ldi, N, tab, work, nl);
    dct3_join(out, work, N, nl);
}

/* The pattern's vectors are mirror-symmetric, f[n] = f[b-1-n] (rbe_plan_build makes them so
 * exactly; check_plan refuses a plan that is not), so for an even b a pattern projection is
 * f[:b/2] . (x[n] + x[b-1-n]) over the half sums the DCT's first split computes anyway, and a
 * pattern synthesis adds to the even half a before the last butterfly: b/2 multiply-adds per
 * vector instead of b, the same sum in exact arithmetic. */

// Xh rows [0, b) = DCT of xt, rows [b, b+nf) = pattern projections P xt; xt: [b][TL]
// (lanes [nl, TL) of Xh are set to zero: what zero-padded tokens would give, so every reader of a
// transform-domain tile may take all TL lanes)
XT static void analyse_tile(float* restrict Xh, const float* restrict xt, const float* M, const float* dct, int b,
                            int nf, float* restrict work, int nl) {
    dct2_tile(Xh, TL, xt, b, dct, work, nl);
    if (b % 2 == 0 && b > 2)  // dct2_tile left the half sums a in work's first b/2 rows
        gemm_tile(Xh + (long)b * TL, TL, 0, M + (long)b * b, b, 1, work, TL, nf, b / 2, nl);
    else
        gemm_tile(Xh + (long)b * TL, TL, 0, M + (long)b * b, b, 1, xt, TL, nf, b, nl);
    if (nl < TL)
        for (int m = 0; m < b + nf; m++)
            for (int t = nl; t < TL; t += VW) VSTORE(Xh + (long)m * TL + t, VZERO());
}

// out [b][TL] = Psi^T H[0, b) + P^T H[b, b+nf)  (H: [b+nf][TL], M = [Psi; P])
XT static void synthesise_tile(float* restrict out, const float* restrict H, const float* M, const float* dct, int b,
                               int nf, float* restrict work, int nl) {
    if (b % 2 || b <= 2) {
        dct3_tile(out, H, TL, b, dct, work, nl);
        gemm_tile(out, TL, 1, M + (long)b * b, 1, b, H + (long)b * TL, TL, b, nf, nl);
        return;
    }
    dct3_halves(H, TL, b, dct, work, nl);
    gemm_tile(work, TL, 1, M + (long)b * b, 1, b, H + (long)b * TL, TL, b / 2, nf, nl);  // into a
    dct3_join(out, work, b, nl);
}

// The two sparse products below hold one output row in nv = nl / VW registers (a whole tile of
// 64 lanes, or a 16-lane tile); nv is a constant in each caller, so the accumulator arrays stay
// in registers. Every row sums its coefficients in the same order at either width.

// a[:nv] += val[q] * src[off[q]][:] for q in [e, pe), prefetching RBE_PREFETCH entries ahead
// within the run [.., e1): one output row's accumulators (nv registers) over part of its run
XT static INLINE_ALWAYS void run_product(VF* a, const float* restrict src, const int32_t* restrict off,
                                         const float* restrict val, int e, int pe, int e1, int nv) {
    for (int q = e; q < pe; q++) {
        const float* x = src + off[q];
        const char* ahead = (const char*)(src + off[q + RBE_PREFETCH < e1 ? q + RBE_PREFETCH : q]);
        for (int line = 0; line < nv * VW / 16; line++) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
        const VF c = VBCAST(val + q);
        for (int v = 0; v < nv; v++) a[v] = VFMA(c, VLOAD(x + VW * v), a[v]);
    }
}
// run_product over a whole run [e, e1), and with it the entries' coefficient dot products
// sacc[q] += src[off[q]] . xrow, as coeff_grads sums them (the including file: how the two share
// the rows they read)
XT static INLINE_ALWAYS void run_product_dots(VF* a, float* restrict sacc, const float* restrict xrow,
                                              const float* restrict src, const int32_t* restrict off,
                                              const float* restrict val, int e, int e1, int nv);

// out[key][:] = sum over the key's entries e of val[e] * src[off[e]][:]  (keys [0, b)).
// With sacc (else NULL), also the entries' coefficient dot products
// with xs, the rows of the products' own source: sacc[e] += src[off[e]] . xs[key] (the parameter
// gradient's sums; g . x = x . g in every lane): one pass over the source instead of the
// parameter gradient's own pass.
XT static INLINE_ALWAYS void sparse_sched_w(float* restrict out, float* restrict sacc, const float* restrict xs,
                                            const float* restrict src, const int32_t* restrict start,
                                            const int32_t* restrict off, const float* restrict val, int b,
                                            int nv) {
    for (int key = 0; key < b; key++) {
        VF a[TL / VW];
        for (int v = 0; v < nv; v++) a[v] = VZERO();
        if (sacc) run_product_dots(a, sacc, xs + (long)key * TL, src, off, val, start[key], start[key + 1], nv);
        else run_product(a, src, off, val, start[key], start[key + 1], start[key + 1], nv);
        float* o = out + (long)key * TL;
        for (int v = 0; v < nv; v++) VSTORE(o + VW * v, a[v]);
    }
}

XT static void sparse_sched(float* restrict out, float* restrict sacc, const float* restrict xs,
                            const float* restrict src, const int32_t* restrict start, const int32_t* restrict off,
                            const float* restrict val, int b) {
    sparse_sched_w(out, sacc, xs, src, start, off, val, b, TL / VW);
}

XT static void sparse_sched16(float* restrict out, float* restrict sacc, const float* restrict xs,
                              const float* restrict src, const int32_t* restrict start, const int32_t* restrict off,
                              const float* restrict val, int b) {
    sparse_sched_w(out, sacc, xs, src, start, off, val, b, 16 / VW);
}

// out[row][:] += cf[q] * in[col][:] for one block's coefficients (idx = row*b + col, ascending),
// each row held in registers for its run: the sparse product without a schedule (a single
// tile of tokens, where building the schedule would cost as much as the product)
XT static INLINE_ALWAYS void sparse_block_w(float* restrict out, const float* restrict in,
                                            const float* restrict cf, const void* index, int wide, long base,
                                            int k, int b, int nv) {
    const int16_t* i16 = (const int16_t*)index + base;
    const int32_t* i32 = (const int32_t*)index + base;
    const int sh = rbe_pos_shift(b);
    int q = 0;
    while (q < k) {
        int idx = wide ? i32[q] : i16[q];
        const int row = rbe_pos_row(idx, b, sh), end = (row + 1) * b;
        float* o = out + (long)row * TL;
        VF a[TL / VW];
        for (int v = 0; v < nv; v++) a[v] = VLOAD(o + VW * v);
        do {
            const float* x = in + (long)(idx - row * b) * TL;
            const VF c = VBCAST(cf + q);
            for (int v = 0; v < nv; v++) a[v] = VFMA(c, VLOAD(x + VW * v), a[v]);
            if (++q < k) idx = wide ? i32[q] : i16[q];
        } while (q < k && idx < end);
        for (int v = 0; v < nv; v++) VSTORE(o + VW * v, a[v]);
    }
}

// sparse_block_w on nl lanes (a whole tile, or 16): nv a constant in each instance
XT static void sparse_block(float* restrict out, const float* restrict in, const float* restrict cf,
                            const void* index, int wide, long base, int k, int b, int nl) {
    if (nl == TL) sparse_block_w(out, in, cf, index, wide, base, k, b, TL / VW);
    else sparse_block_w(out, in, cf, index, wide, base, k, b, 16 / VW);
}

// The transposed product of one block: out[col][:] += cf[q] * in[row][:] (idx = row*b + col,
// ascending), each term added to its output row in memory (at b = 64 the block's output rows
// are in L1). Every output row takes its terms in ascending row order: the chain the block's
// coefficients re-sorted by column would give, with no re-sorting per call. Consecutive terms
// here go to different rows; in the forward (sparse_block_w) they go to the same row, and adding
// them in memory there made a one-tile forward about twice as slow (each load waits on the store
// before it), so the forward keeps its rows in registers and the two stay separate.
XT static INLINE_ALWAYS void sparse_block_t_w(float* restrict out, const float* restrict in,
                                              const float* restrict cf, const void* index, int wide, long base,
                                              int k, int b, int nv) {
    const int16_t* i16 = (const int16_t*)index + base;
    const int32_t* i32 = (const int32_t*)index + base;
    const int sh = rbe_pos_shift(b);
    for (int q = 0; q < k; q++) {
        const int idx = wide ? i32[q] : i16[q], row = rbe_pos_row(idx, b, sh);
        float* o = out + (long)(idx - row * b) * TL;
        const float* x = in + (long)row * TL;
        const VF c = VBCAST(cf + q);
        for (int v = 0; v < nv; v++) VSTORE(o + VW * v, VFMA(c, VLOAD(x + VW * v), VLOAD(o + VW * v)));
    }
}

// sparse_block_t_w on nl lanes
XT static void sparse_block_t(float* restrict out, const float* restrict in, const float* restrict cf,
                              const void* index, int wide, long base, int k, int b, int nl) {
    if (nl == TL) sparse_block_t_w(out, in, cf, index, wide, base, k, b, TL / VW);
    else sparse_block_t_w(out, in, cf, index, wide, base, k, b, 16 / VW);
}

XT static inline void axpy_lanes(float* restrict dst, float a, const float* restrict src, int nl) {
    VF c = VSET1(a);
    for (int t = 0; t < nl; t += VW)
        VSTORE(dst + t, VFMA(c, VLOAD(src + t), VLOAD(dst + t)));
}
// (lanes past nl are zero in one of the operands, so stopping there gives the same sum)
XT static inline float dot_lanes(const float* restrict a, const float* restrict b, int nl) {
    VF s[16 / VW];  // each chain sums every 16th group of VW lanes
    for (int v = 0; v < 16 / VW; v++) s[v] = VMUL(VLOAD(a + VW * v), VLOAD(b + VW * v));
    for (int t = 16; t < nl; t += 16)
        for (int v = 0; v < 16 / VW; v++) s[v] = VFMA(VLOAD(a + t + VW * v), VLOAD(b + t + VW * v), s[v]);
    for (int v = 1; v < 16 / VW; v++) s[0] = VADD(s[0], s[v]);
    return hsum(s[0]);
}

// 8x8 transpose of r0..r7 in registers
XT static inline void transpose8(__m256* r) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// xt[c][t] = x[t0 + t][j*b + c], zero past nc columns / nt tokens; xt: [b, TL]
XT static void load_tile_t(float* restrict xt, const float* restrict x, long t0, int nt, int n, int j, int b, int nc) {
    const float* base = x + (size_t)t0 * n + (size_t)j * b;
    int c = 0;
    if (nt == TL)
        for (; c + 8 <= nc; c += 8)
            for (int t = 0; t < TL; t += 8) {
                __m256 r[8];
                for (int q = 0; q < 8; q++) r[q] = _mm256_loadu_ps(base + (size_t)(t + q) * n + c);
                transpose8(r);
                for (int q = 0; q < 8; q++) _mm256_storeu_ps(xt + (size_t)(c + q) * TL + t, r[q]);
            }
    for (int cc = c; cc < b; cc++)
        for (int t = 0; t < TL; t += 8) _mm256_storeu_ps(xt + (size_t)cc * TL + t, _mm256_setzero_ps());
    for (int t = 0; t < nt; t++)
        for (int cc = c; cc < nc; cc++) xt[(size_t)cc * TL + t] = base[(size_t)t * n + cc];
}

// y[t0 + t][c0 + r] = src[r][t] for r < nr, t < nt (src: [>= nr, TL], y rows ld apart)
XT static void store_tile_t(float* restrict y, long ld, const float* restrict src, int nr, int nt) {
    int r = 0;
    if (nt == TL)
        for (; r + 8 <= nr; r += 8)
            for (int t = 0; t < TL; t += 8) {
                __m256 v[8];
                for (int q = 0; q < 8; q++) v[q] = _mm256_loadu_ps(src + (size_t)(r + q) * TL + t);
                transpose8(v);
                for (int q = 0; q < 8; q++) _mm256_storeu_ps(y + (size_t)(t + q) * ld + r, v[q]);
            }
    for (int t = 0; t < nt; t++)
        for (int rr = (nt == TL ? r : 0); rr < nr; rr++) y[(size_t)t * ld + rr] = src[(size_t)rr * TL + t];
}

// out[r][t] = src[r][t] for r < nr, t < nt, and zero for the rest of [b][TL] (src: [>= nr][TL])
XT static void copy_tile(float* restrict out, const float* restrict src, int nr, int nt, int b) {
    for (int r = 0; r < b; r++) {
        float* o = out + (size_t)r * TL;
        const float* x = src + (size_t)r * TL;
        if (r < nr && nt == TL)
            for (int t = 0; t < TL; t += VW) VSTORE(o + t, VLOAD(x + t));
        else
            for (int t = 0; t < TL; t++) o[t] = r < nr && t < nt ? x[t] : 0.0f;
    }
}

// s[r] = (fresh ? 0 : s[r]) + x[r][0] + x[r][1] + ... + x[r][nt - 1] for r < nr: one tile's part of
// rbe_bias_backward's sums in token order, on a feature-major tile x ([>= nr][TL])
XT static void bias_sums(float* restrict s, const float* restrict x, int nr, int nt, int fresh) {
    int r = 0;
    if (nt == TL)
        for (; r + 8 <= nr; r += 8) {
            __m256 a = fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(s + r);
            for (int t = 0; t < TL; t += 8) {
                __m256 v[8];
                for (int q = 0; q < 8; q++) v[q] = _mm256_loadu_ps(x + (size_t)(r + q) * TL + t);
                transpose8(v);  // v[q]: features r..r+7 of token t + q
                for (int q = 0; q < 8; q++) a = _mm256_add_ps(a, v[q]);
            }
            _mm256_storeu_ps(s + r, a);
        }
    for (; r < nr; r++) {
        float a = fresh ? 0.0f : s[r];
        for (int t = 0; t < nt; t++) a += x[(size_t)r * TL + t];
        s[r] = a;
    }
}

XT void XSFX(rbe_analysis_f32)(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch,
                               long T, int n, long p0, long p1) {
    const int b = P->b, nf = P->nf, nseg = (n + b - 1) / b, rows = b + nf;
    for (long p = p0; p < p1; p++) {
        long tile = p / nseg;
        int j = (int)(p % nseg);
        long t0 = tile * TL;
        int nt = T - t0 < TL ? (int)(T - t0) : TL;
        int nc = n - j * b < b ? n - j * b : b;
        load_tile_t(scratch, x, t0, nt, n, j, b, nc);
        analyse_tile(Xh + (size_t)p * rows * TL, scratch, M, P->dct, b, nf, scratch + (size_t)b * TL, lanes(nt));
    }
}

// The pattern of a block (rbe_variants.h's rank-1 terms) over nl lanes of a tile:
// forward Y[g] += p_k E[f] (Y, E: the nf pattern rows of the output / input transform)
XT static void pattern_forward(float* restrict Y, const float* restrict E, const float* pk, int nd, int nl) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        axpy_lanes(Y + (size_t)term[1] * TL, pk[term[0]], E + (size_t)term[2] * TL, nl);
    }
    for (int m = 0; m < nd; m++) axpy_lanes(Y + (size_t)(RBE_NFIX + m) * TL, pk[1], E + (size_t)(RBE_NFIX + m) * TL, nl);
}

// transposed: D[f] += p_k G[g]
XT static void pattern_backward(float* restrict D, const float* restrict G, const float* pk, int nd, int nl) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        axpy_lanes(D + (size_t)term[2] * TL, pk[term[0]], G + (size_t)term[1] * TL, nl);
    }
    for (int m = 0; m < nd; m++) axpy_lanes(D + (size_t)(RBE_NFIX + m) * TL, pk[1], G + (size_t)(RBE_NFIX + m) * TL, nl);
}

XT static void rows_body(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                         const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                         float* scratch, uint16_t* bf16, long* rounded, long T, long p0, long p1) {
#ifndef XBF16
    (void)bf16, (void)rounded;
#else
    long own = -1;
    long* bf16_tile = rounded ? rounded : &own;  // the tile whose rows bf16 holds (rbe.h)
#endif
    const int out = W->out, in = W->in, b = W->b, k = W->k, nf = P->nf;
    const float* basis = W->basis;
    const int32_t* sstart = sched ? sched->start : NULL;
    const int R = (out + b - 1) / b, C = (in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const int pre_grad = pre && (act & RBE_ACT_PRE_GRAD), pre_tiles = pre_grad && (act & RBE_ACT_PRE_TILES);
    act &= ~(RBE_ACT_PRE_GRAD | RBE_ACT_PRE_TILES);
    float* yh = scratch;
    float* yt = scratch + (size_t)rows * TL;
    for (long p = p0; p < p1; p++) {
        long tile = p / R;
        int i = (int)(p % R);
        long t0 = tile * TL;
        int nt = T - t0 < TL ? (int)(T - t0) : TL;
        int nr = out - i * b < b ? out - i * b : b;
        const int nl = sstart ? TL : lanes(nt);  // the scheduled product works on whole tiles
        const float* Xt = Xh + (size_t)tile * C * rows * TL;
        if (sstart) {
#ifdef XBF16
            if (bf16)
                sparse_sched_tile_bf16(yh, bf16, bf16_tile, tile, Xt, C, rows, sstart + (size_t)i * (b + 1), sched,
                                       b);
            else
#endif
            sparse_sched(yh, NULL, NULL, Xt, sstart + (size_t)i * (b + 1), sched->off, sched->val, b);
            for (int e = b * TL; e < rows * TL; e += VW) VSTORE(yh + e, VZERO());
        } else {
            for (int e = 0; e < rows * TL; e += VW) VSTORE(yh + e, VZERO());
            for (int j = 0; j < C; j++)
                sparse_block(yh, Xt + (size_t)j * rows * TL, W->coeffs + ((size_t)i * C + j) * k, W->index, W->wide,
                             ((long)i * C + j) * k, k, b, nl);
        }
        for (int j = 0; j < C; j++) {
            long blk = (long)i * C + j;
            const float* X = Xt + (size_t)j * rows * TL;
            pattern_forward(yh + (size_t)b * TL, X + (size_t)b * TL, basis + (size_t)blk * RBE_NPAT, nd, nl);
        }
        synthesise_tile(yt, yh, P->S, P->dct, b, nf, yt + (size_t)b * TL, nl);
        if (bias)
            for (int r = 0; r < nr; r++) {
                VF bv = VSET1(bias[i * b + r]);
                for (int t = 0; t < nl; t += VW)
                    VSTORE(yt + (size_t)r * TL + t, VADD(bv, VLOAD(yt + (size_t)r * TL + t)));
            }
        if (pre_grad) {  // act and act' at once, act' into yh (free after the synthesis), then to pre
            if (nl == TL) rbe_act_forward_grad_f32(yt, yh, yt, (long)nr * TL, act);
            else
                for (int r = 0; r < nr; r++)
                    rbe_act_forward_grad_f32(yt + (size_t)r * TL, yh + (size_t)r * TL, yt + (size_t)r * TL, nl, act);
            if (pre_tiles) copy_tile(pre + ((size_t)tile * R + i) * b * TL, yh, nr, nt, b);
            else store_tile_t(pre + (size_t)t0 * out + (size_t)i * b, out, yh, nr, nt);
        } else {
            if (pre) store_tile_t(pre + (size_t)t0 * out + (size_t)i * b, out, yt, nr, nt);
            if (act != RBE_ACT_NONE && nl == TL) rbe_act_forward_f32(yt, yt, (long)nr * TL, act);  // whole tile
            else if (act != RBE_ACT_NONE)
                for (int r = 0; r < nr; r++) rbe_act_forward_f32(yt + (size_t)r * TL, yt + (size_t)r * TL, nl, act);
        }
        if (y) store_tile_t(y + (size_t)t0 * out + (size_t)i * b, out, yt, nr, nt);
        if (Xnext) {  // the next layer's analysis of this (activated) tile; rows past nr are padding
            for (int e = nr * TL; e < b * TL; e += VW) VSTORE(yt + e, VZERO());
            analyse_tile(Xnext + ((size_t)tile * R + i) * rows * TL, yt, P->A, P->dct, b, nf,
                         yt + (size_t)b * TL, nl);
        }
    }
}

XT void XSFX(rbe_rows_forward_f32)(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                                   const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                                   float* scratch, long T, long p0, long p1) {
    rows_body(y, pre, Xnext, Xh, W, P, sched, bias, act, scratch, NULL, NULL, T, p0, p1);
}

// sacc[e] = 0 for the schedule's entries [e0, e1), unless the sums continue (RBE_SUMS_CONTINUE)
static inline void start_sums(float* restrict sacc, int accumulate, long e0, long e1) {
    if (!(accumulate & RBE_SUMS_CONTINUE))
        for (long e = e0; e < e1; e++) sacc[e] = 0;
}
// dcoeffs[pos[e]] = (or += with accumulate & 1) sacc[e] for the schedule's entries [e0, e1): the
// coefficient gradient, summed in schedule order, back in coefficient order (not yet with
// RBE_SUMS_HOLD: a later call continues the sums)
static inline void scatter_sums(float* restrict dcoeffs, const float* restrict sacc, const int32_t* restrict pos,
                                int accumulate, long e0, long e1) {
    if (accumulate & RBE_SUMS_HOLD) return;
    if (accumulate & 1)
        for (long e = e0; e < e1; e++) dcoeffs[pos[e]] += sacc[e];
    else
        for (long e = e0; e < e1; e++) dcoeffs[pos[e]] = sacc[e];
}

// Input gradient. With a schedule (transpose = 1) the transposed product runs run by run; without
// one (a single tile of tokens), block by block, each term added to its column's row
// (sparse_block_t).
// bf16 (NULL: float32): scratch of rbe_bf16_scratch(R, b, nf) elements for the scheduled product on
// bfloat16 rows (sparse_sched_bf16; only the including file that defines XBF16 passes it), with
// *bf16_tile the tile last rounded there.
// sacc (float32 schedule only; else NULL): also the coefficient dot products of the tile's entries
// against Xj, Xh's segment j of the same tile (sparse_sched's dot products).
XT static void cols_item(float* dx, const rbe_grad_next_f32* next, const float* Gh, const rbe_weight_f32* W,
                         const rbe_plan_f32* P, const rbe_sched_f32* sched, float* scratch, uint16_t* bf16,
                         long* bf16_tile, float* sacc, const float* Xj, long T, long tile, int j) {
#ifndef XBF16
    (void)bf16, (void)bf16_tile;
#endif
    const int out = W->out, in = W->in, b = W->b, k = W->k, nf = P->nf;
    const float* basis = W->basis;
    const int R = (out + b - 1) / b, C = (in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    float* dh = scratch;
    float* dt = scratch + (size_t)rows * TL;
    const long t0 = tile * TL;
    const int nt = T - t0 < TL ? (int)(T - t0) : TL;
    const int nc = in - j * b < b ? in - j * b : b;
    const int nl = lanes(nt);
    const float* Gt = Gh + (size_t)tile * R * rows * TL;
    if (sched) {
        const int32_t* st = sched->start + (size_t)j * (b + 1);
#ifdef XBF16
        if (bf16)  // on whole tiles (a short tile's lanes past its tokens are zero)
            sparse_sched_tile_bf16(dh, bf16, bf16_tile, tile, Gt, R, rows, st, sched, b);
        else
#endif
        (nl == TL ? sparse_sched : sparse_sched16)(dh, sacc, Xj, Gt, st, sched->off, sched->val, b);
        for (int e = b * TL; e < rows * TL; e += VW) VSTORE(dh + e, VZERO());
    } else {
        for (int e = 0; e < rows * TL; e += VW) VSTORE(dh + e, VZERO());
    }
    for (int i = 0; i < R; i++) {
        long blk = (long)i * C + j;
        const float* G = Gt + (size_t)i * rows * TL;
        if (!sched)
            sparse_block_t(dh, G, W->coeffs + blk * k, W->index, W->wide, blk * k, k, b, nl);
        pattern_backward(dh + (size_t)b * TL, G + (size_t)b * TL, basis + (size_t)blk * RBE_NPAT, nd, nl);
    }
    synthesise_tile(dt, dh, P->A, P->dct, b, nf, dt + (size_t)b * TL, nl);
    if (!next) {
        store_tile_t(dx + (size_t)t0 * in + (size_t)j * b, in, dt, nc, nt);
        return;
    }
    // handed on (rbe_grad_next_f32): dh = dx * act'(h) on the tile's tokens and features, zero past
    // them (as the analysis of a token-major dh pads it), its bias sums, and its analysis (lanes
    // past nl are neither read nor written)
    const float* da = next->dact + ((size_t)tile * C + j) * b * TL;  // act'(h) of the tile
    for (int r = 0; r < b; r++) {
        float* d = dt + (size_t)r * TL;
        const float* f = da + (size_t)r * TL;
        if (r < nc)
            for (int t = 0; t < nl; t += VW) VSTORE(d + t, VMUL(VLOAD(d + t), VLOAD(f + t)));
        for (int t = r < nc ? nt : 0; t < nl; t++) d[t] = 0.0f;
    }
    if (next->dbias) bias_sums(next->dbias + (size_t)j * b, dt, nc, nt, tile == 0 && !next->accumulate);
    analyse_tile(next->Gh + ((size_t)tile * C + j) * rows * TL, dt, P->S, P->dct, b, nf, dt + (size_t)b * TL, nl);
}

// work items p = tile*C + j in [p0, p1)
XT static void cols_backward(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                             const rbe_sched_f32* sched, float* scratch, uint16_t* bf16, long* rounded, long T,
                             long p0, long p1) {
    const int C = (W->in + W->b - 1) / W->b;
    long own = -1;
    long* bf16_tile = rounded ? rounded : &own;  // the tile whose rows bf16 holds (rbe.h)
    for (long p = p0; p < p1; p++)
        cols_item(dx, NULL, Gh, W, P, sched, scratch, bf16, bf16_tile, NULL, NULL, T, p / C, (int)(p % C));
}

XT void XSFX_BLOCKS(rbe_cols_backward_f32)(float* dx, const float* Gh, const rbe_weight_f32* W,
                                           const rbe_plan_f32* P, float* scratch, long T, long p0, long p1) {
    cols_backward(dx, Gh, W, P, NULL, scratch, NULL, NULL, T, p0, p1);
}

XT void XSFX(rbe_cols_backward_f32)(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                    const rbe_sched_f32* sched, float* scratch, long T, long p0, long p1) {
    cols_backward(dx, Gh, W, P, sched, scratch, NULL, NULL, T, p0, p1);
}

// The input gradient and the coefficient gradient in one pass over the transposed schedule
// (rbe.h): block columns j in [p0, p1), each over every tile in order, so each entry's sum over
// the tiles is that of params_sched (in the transposed schedule's order, in its acc), then
// scattered to coefficient order; with next, dx handed on, its bias sums in token order as well.
XT void XSFX(rbe_cols_coeffs_backward_f32)(float* dx, float* dcoeffs, const rbe_grad_next_f32* next, const float* Gh,
                                           const float* Xh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                           const rbe_sched_f32* sched, int accumulate, float* scratch, long T,
                                           long p0, long p1) {
    const int b = W->b, k = W->k, rows = b + P->nf;
    const int R = (W->out + b - 1) / b, C = (W->in + b - 1) / b;
    const long ntiles = (T + TL - 1) / TL, e0 = p0 * R * (long)k, e1 = p1 * R * (long)k;
    float* sacc = sched->acc;
    start_sums(sacc, accumulate, e0, e1);
    for (long j = p0; j < p1; j++)
        for (long tile = 0; tile < ntiles; tile++)
            cols_item(dx, next, Gh, W, P, sched, scratch, NULL, NULL, sacc, Xh + ((size_t)tile * C + j) * rows * TL,
                      T, tile, (int)j);
    scatter_sums(dcoeffs, sacc, sched->pos, accumulate, e0, e1);
}

// db[k] += the tile's contribution to dL/dbasis_k of one block, G[g] . E[f] over the pattern
// rows of its output gradient (G) and input (E): [nf][TL] each
XT static void basis_grad_tile(float* restrict db, const float* restrict G, const float* restrict E, int nd, int nl) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        db[term[0]] += dot_lanes(G + (size_t)term[1] * TL, E + (size_t)term[2] * TL, nl);
    }
    float d1 = 0;
    for (int m = 0; m < nd; m++)
        d1 += dot_lanes(G + (size_t)(RBE_NFIX + m) * TL, E + (size_t)(RBE_NFIX + m) * TL, nl);
    db[1] += d1;
}

// A single tile of tokens (T <= TL), block by block with no schedule (building one would cost
// about as much as the sums): dcoeffs[ij][q] = Gh_i[u] . Xh_j[v], dbasis from the pattern rows.
XT void XSFX_BLOCKS(rbe_params_backward_f32)(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                             const rbe_weight_f32* W, const rbe_plan_f32* P, int accumulate, long T,
                                             long p0, long p1) {
    const int in = W->in, b = W->b, k = W->k, nf = P->nf, wide = W->wide;
    const void* index = W->index;
    const int C = (in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const int nl = lanes(T < TL ? (int)T : TL);
    for (long i = p0; i < p1; i++) {
        const float* G = Gh + (size_t)i * rows * TL;
        for (int j = 0; j < C; j++) {
            const long blk = i * C + j;
            const float* X = Xh + (size_t)j * rows * TL;
            if (dcoeffs) {
                const int16_t* i16 = (const int16_t*)index + blk * k;
                const int32_t* i32 = (const int32_t*)index + blk * k;
                float* dc = dcoeffs + blk * k;
                for (int q = 0; q < k; q++) {
                    const int idx = wide ? i32[q] : i16[q], u = idx / b, v = idx - u * b;
                    const float d = dot_lanes(G + (size_t)u * TL, X + (size_t)v * TL, nl);
                    dc[q] = accumulate ? dc[q] + d : d;
                }
            }
            if (dbasis) {
                float* db = dbasis + blk * RBE_NPAT;
                if (!accumulate)
                    for (int q = 0; q < RBE_NPAT; q++) db[q] = 0;
                basis_grad_tile(db, G + (size_t)b * TL, X + (size_t)b * TL, nd, nl);
            }
        }
    }
}

// The scheduled parameter gradient. bf16 (NULL: float32 dot products): scratch of
// rbe_bf16_scratch(C, b, nf) elements; each tile's DCT rows of Xh, then each block row's of Gh, are
// rounded to bfloat16 into it and the coefficients' dot products run on those
// (coeff_grads_bf16, which the including file defines when XBF16 is set; only its entry
// point passes bf16).
XT static void params_sched(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh, uint16_t* bf16,
                            const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                            int accumulate, long T, long p0, long p1) {
#ifndef XBF16
    (void)bf16;  // no bfloat16 dot products at this width: its entry point passes NULL
#endif
    const int out = W->out, in = W->in, b = W->b, k = W->k, nf = P->nf;
    // the schedule is read only for dcoeffs (dbasis alone takes none)
    const int32_t *sstart = dcoeffs ? sched->start : NULL, *soff = dcoeffs ? sched->off : NULL;
    float* sacc = dcoeffs ? sched->acc : NULL;
    // work items are block rows [p0, p1); dcoeffs is summed in schedule order in sacc (sequential
    // access) and scattered to coefficient order once at the end
    const int R = (out + b - 1) / b, C = (in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const long ntiles = (T + TL - 1) / TL;
    const long e0 = p0 * C * (long)k, e1 = p1 * C * (long)k;
    if (dcoeffs) start_sums(sacc, accumulate, e0, e1);
    for (long i = p0; i < p1 && !(accumulate & 1) && dbasis; i++)
        for (long q = i * C * RBE_NPAT; q < (i + 1) * C * RBE_NPAT; q++) dbasis[q] = 0;
    for (long tile = 0; tile < ntiles; tile++) {
        const float* Xt = Xh + (size_t)tile * C * rows * TL;
        // Gh's lanes past the tile's tokens are zero (analysis of zero-padded gradients), so a
        // tile of at most 16 tokens sums 16 lanes: the same sums, a quarter of the work
        const int nl = lanes(T - tile * TL < TL ? (int)(T - tile * TL) : TL);
#ifdef XBF16
        uint16_t* Gb = bf16 ? bf16 + (size_t)C * rows * TL : NULL;  // [b][TL] after the tile's [C][rows][TL]
        if (bf16 && dcoeffs) to_bf16_rows(bf16, Xt, C, rows, b);
#endif
        for (long i = p0; i < p1; i++) {
            const float* G = Gh + ((size_t)tile * R + i) * rows * TL;
            if (dcoeffs) {
                const int32_t* st = sstart + (size_t)i * (b + 1);
#ifdef XBF16
                if (bf16) {
                    rbe_to_bf16(Gb, G, (long)b * TL);
                    for (int u = 0; u < b; u++)
                        if (st[u] < st[u + 1])
                            coeff_grads_bf16(sacc, Gb + (size_t)u * TL, bf16, soff, st[u], st[u + 1], nl);
                } else
#endif
                    for (int u = 0; u < b; u++)
                        if (st[u] < st[u + 1]) coeff_grads(sacc, G + (size_t)u * TL, Xt, soff, st[u], st[u + 1], nl);
            }
            if (dbasis)
                for (int j = 0; j < C; j++)
                    basis_grad_tile(dbasis + ((size_t)i * C + j) * RBE_NPAT, G + (size_t)b * TL,
                                    Xt + ((size_t)j * rows + b) * TL, nd, nl);
        }
    }
    if (dcoeffs) scatter_sums(dcoeffs, sacc, sched->pos, accumulate, e0, e1);
}

XT void XSFX(rbe_params_backward_f32)(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                                      const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                                      int accumulate, long T, long p0, long p1) {
    params_sched(dbasis, dcoeffs, Gh, Xh, NULL, W, P, sched, accumulate, T, p0, p1);
}


// ---- few tokens (rbe.h): token-minor transforms with stride T, vectorized along features ----
// Every output element is one chain of fused multiply-adds from zero, in the same order at any
// vector width (the scalar tails use the same fma), so these give the same bits with AVX2 and
// AVX-512, and a token's results do not depend on T.

// out[r] = sum_p M[p*ldm + r] v[p*vs] for r < nout (p < nin, ascending)
XT static void few_matvec(float* restrict out, const float* restrict M, int ldm, const float* restrict v, long vs,
                          int nin, int nout) {
    int r = 0;
    for (; r + 4 * VW <= nout; r += 4 * VW) {
        VF a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0;
        for (int p = 0; p < nin; p++) {
            const VF w = VSET1(v[(size_t)p * vs]);
            const float* m = M + (size_t)p * ldm + r;
            a0 = VFMA(VLOAD(m), w, a0), a1 = VFMA(VLOAD(m + VW), w, a1);
            a2 = VFMA(VLOAD(m + 2 * VW), w, a2), a3 = VFMA(VLOAD(m + 3 * VW), w, a3);
        }
        VSTORE(out + r, a0), VSTORE(out + r + VW, a1), VSTORE(out + r + 2 * VW, a2), VSTORE(out + r + 3 * VW, a3);
    }
    for (; r + VW <= nout; r += VW) {
        VF a0 = VZERO();
        for (int p = 0; p < nin; p++) a0 = VFMA(VLOAD(M + (size_t)p * ldm + r), VSET1(v[(size_t)p * vs]), a0);
        VSTORE(out + r, a0);
    }
    for (; r < nout; r++) {
        float a = 0;
        for (int p = 0; p < nin; p++) a = __builtin_fmaf(M[(size_t)p * ldm + r], v[(size_t)p * vs], a);
        out[r] = a;
    }
}

XT void XSFX(rbe_few_analysis_f32)(float* Xf, const float* x, const float* At, int b, int nf, long T, int n, long p0,
                                   long p1) {
    const int rows = b + nf, nseg = (n + b - 1) / b;
    float tmp[2 * RBE_MAX_B + RBE_NFIX];  // rows <= 2b + RBE_NFIX
    for (long j = p0; j < p1; j++) {
        const int nc = n - (int)j * b < b ? n - (int)j * b : b;
        float* Xj = Xf + (size_t)j * rows * T;
        for (long t = 0; t < T; t++) {
            few_matvec(tmp, At, rows, x + (size_t)t * n + (size_t)j * b, 1, nc, rows);
            for (int m = 0; m < rows; m++) Xj[(size_t)m * T + t] = tmp[m];
        }
        if (j == nseg - 1)
            for (int e = 0; e < RBE_FEW_SLACK; e++) Xf[(size_t)nseg * rows * T + e] = 0;
    }
}

// The lanes of a few-token accumulator row (yh's row stride): 1 for one token, 8 for 2..8 tokens,
// 16 for 9..16 (RBE_FEW_MAX). The lanes past T read neighbouring values or the slack and land in
// the padding of yh's rows.
static inline int few_lanes(long T) { return T == 1 ? 1 : T <= 8 ? 8 : 16; }

// Y[0, L) = fma(c, E[0, L), Y[0, L)) for L = few_lanes(T) > 1: one 8-lane vector, or 16 lanes (one
// AVX-512 vector, two AVX2 ones); every lane the same fused multiply-add
XT static INLINE_ALWAYS void few_fma_lanes(float* restrict Y, float c, const float* restrict E, int L) {
    if (L == 8) {
        _mm256_storeu_ps(Y, _mm256_fmadd_ps(_mm256_set1_ps(c), _mm256_loadu_ps(E), _mm256_loadu_ps(Y)));
    } else {
        for (int h = 0; h < 16; h += VW) VSTORE(Y + h, VFMA(VSET1(c), VLOAD(E + h), VLOAD(Y + h)));
    }
}

// The sparse product of blocks over the few-token transform (stride T) into yh (row stride
// L = few_lanes(T)): yh[u] = fma(c, X[v], yh[u]) in coefficient order, with no branch on the row
// runs (their lengths are random: a branch per run mispredicts). One token: scalar; else a vector
// of L lanes per coefficient. RBE_FEW_STREAMS consecutive blocks at a time, each into its own
// accumulator, so that the store-to-load chains of the streams overlap; `pow2`: b is a power of
// two (shifts).
XT static INLINE_ALWAYS void few_term(float* restrict y, const float* restrict X, float c, long idx, int b, int sh,
                                      long T, int L, int pow2) {
    static const uint64_t one = 1;
    long u, v;
    if (pow2) u = idx >> sh, v = idx & (b - 1);
    else u = (long)(((uint64_t)idx * ((one << 40) / (uint64_t)b + 1)) >> 40), v = idx - u * b;  // idx / b, idx < 2^24
    if (L == 1) y[u] = __builtin_fmaf(c, X[v], y[u]);
    else few_fma_lanes(y + u * L, c, X + v * T, L);
}

// ns blocks (1 or RBE_FEW_STREAMS): block s has coefficients c + s k, index from base + s k, source
// X + s xs and accumulator y + s yst
XT static INLINE_ALWAYS void few_sparse_w(float* restrict y, long yst, const float* restrict X, long xs,
                                          const float* restrict c, const void* index, long base, int ns, int k,
                                          int b, int sh, long T, int L, int wide, int pow2) {
    const int16_t* i16 = (const int16_t*)index + base;
    const int32_t* i32 = (const int32_t*)index + base;
    for (long q = 0; q < k; q++)
        for (int s = 0; s < ns; s++)
            few_term(y + s * yst, X + s * xs, c[s * k + q], wide ? i32[s * k + q] : i16[s * k + q], b, sh, T, L,
                     pow2);
}

// the constants of the inner loop (streams, lanes, index width, power of two) as separate
// instantiations
XT static void few_sparse(float* restrict y, long yst, const float* restrict X, long xs, const float* restrict c,
                          const void* index, int wide, long base, int ns, int k, int b, long T) {
    const int sh = rbe_pos_shift(b), pow2 = sh >= 0;
#define RBE_FEW_SPARSE(N_, T_, L_, W_, P_) \
    few_sparse_w(y, yst, X, xs, c, index, base, N_, k, b, sh, T_, L_, W_, P_)
#define RBE_FEW_SPARSE_L(N_, T_, L_)                                                    \
    if (pow2) wide ? RBE_FEW_SPARSE(N_, T_, L_, 1, 1) : RBE_FEW_SPARSE(N_, T_, L_, 0, 1); \
    else wide ? RBE_FEW_SPARSE(N_, T_, L_, 1, 0) : RBE_FEW_SPARSE(N_, T_, L_, 0, 0);
#define RBE_FEW_SPARSE_N(N_)                  \
    if (T == 1) {                             \
        RBE_FEW_SPARSE_L(N_, 1, 1)            \
    } else if (few_lanes(T) == 8) {           \
        RBE_FEW_SPARSE_L(N_, T, 8)            \
    } else {                                  \
        RBE_FEW_SPARSE_L(N_, T, 16)           \
    }
    if (ns == RBE_FEW_STREAMS) {
        RBE_FEW_SPARSE_N(RBE_FEW_STREAMS)
    } else {
        RBE_FEW_SPARSE_N(1)
    }
#undef RBE_FEW_SPARSE_N
#undef RBE_FEW_SPARSE_L
#undef RBE_FEW_SPARSE
}

// Y[g] += p E[f] for one term: Y's lanes L = few_lanes(T), E stride T
XT static inline void few_axpy(float* restrict Y, float p, const float* restrict E, int L) {
    if (L == 1) *Y = __builtin_fmaf(p, *E, *Y);
    else few_fma_lanes(Y, p, E, L);
}

// The streams' accumulators of one output added in a fixed order, a[0] + ((a[1] + a[2]) + a[3]) for
// RBE_FEW_STREAMS = 4 (stream s at a + s * stride): the one definition the few-token kernel and both
// packed walks use, so that their bits agree
static inline float few_stream_sum(const float* a, long stride) {
    float t = a[stride];
    for (int s = 2; s < RBE_FEW_STREAMS; s++) t += a[s * stride];
    return a[0] + t;
}

// After the sparse products of block row i (yh[0, b) set, the pattern rows zero): the pattern
// terms, the synthesis, bias, pre, activation, y and Xnext, token by token. v: [b], tmp: [rows].
XT static void few_rows_finish(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                               const rbe_plan_f32* P, const float* At, const float* bias, int act, float* yh,
                               float* v, float* tmp, long T, long i) {
    const int out = W->out, b = W->b, nf = P->nf;
    const int R = (out + b - 1) / b, C = (W->in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const int nr = out - (int)i * b < b ? out - (int)i * b : b;
    const int ys = few_lanes(T);  // yh's row stride: lanes past T are padding
    if (T == 1) {  // the same chain for each target, held in registers (through memory, each term
                   // waited for the previous one's store: 7% of a packed one-token call)
        float a[RBE_NFIX];  // the rank-1 terms' targets (term[1] < RBE_NFIX)
        for (int g = 0; g < RBE_NFIX; g++) a[g] = yh[b + g];
        for (int j = 0; j < C; j++) {
            const float* X = Xf + (size_t)j * rows;
            const float* pk = W->basis + (size_t)(i * C + j) * RBE_NPAT;
            for (int q = 0; q < RBE_NTERMS; q++) {
                const int* term = rbe_pattern_terms[q];
                a[term[1]] = __builtin_fmaf(pk[term[0]], X[b + term[2]], a[term[1]]);
            }
        }
        for (int g = 0; g < RBE_NFIX; g++) yh[b + g] = a[g];
        for (int m = RBE_NFIX; m < RBE_NFIX + nd; m += 8) {  // the d term's rows, 8 lanes at a time (masked)
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(RBE_NFIX + nd - m), lane);
            __m256 acc = _mm256_maskload_ps(yh + b + m, mask);
            for (int j = 0; j < C; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(W->basis[(size_t)(i * C + j) * RBE_NPAT + 1]),
                                      _mm256_maskload_ps(Xf + (size_t)j * rows + b + m, mask), acc);
            _mm256_maskstore_ps(yh + b + m, mask, acc);
        }
    }
    for (int j = 0; j < C && T > 1; j++) {  // the pattern terms
        const long blk = i * C + j;
        const float* X = Xf + (size_t)j * rows * T;
        const float* pk = W->basis + (size_t)blk * RBE_NPAT;
        for (int q = 0; q < RBE_NTERMS; q++) {
            const int* term = rbe_pattern_terms[q];
            few_axpy(yh + (size_t)(b + term[1]) * ys, pk[term[0]], X + (size_t)(b + term[2]) * T, ys);
        }
        for (int m = RBE_NFIX; m < RBE_NFIX + nd; m++)
            few_axpy(yh + (size_t)(b + m) * ys, pk[1], X + (size_t)(b + m) * T, ys);
    }
    for (long t = 0; t < T; t++) {
        few_matvec(v, P->S, b, yh + t, ys, rows, b);
        if (bias)
            for (int r = 0; r < nr; r++) v[r] += bias[i * b + r];
        if (pre) memcpy(pre + (size_t)t * out + (size_t)i * b, v, sizeof(float) * nr);
        if (act != RBE_ACT_NONE) rbe_act_forward_f32(v, v, nr, act);
        if (y) memcpy(y + (size_t)t * out + (size_t)i * b, v, sizeof(float) * nr);
        if (Xnext) {
            few_matvec(tmp, At, rows, v, 1, nr, rows);
            for (int m = 0; m < rows; m++) Xnext[((size_t)i * rows + m) * T + t] = tmp[m];
        }
    }
    if (Xnext && i == R - 1)
        for (int e = 0; e < RBE_FEW_SLACK; e++) Xnext[(size_t)R * rows * T + e] = 0;
}

XT void XSFX(rbe_few_rows_forward_f32)(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                       const rbe_plan_f32* P, const float* At, const float* bias, int act,
                                       float* scratch, long T, long p0, long p1) {
    const int b = W->b, k = W->k, nf = P->nf;
    const int C = (W->in + b - 1) / b, rows = b + nf;
    const long ys = few_lanes(T);  // yh's row stride: lanes past T are padding
    const long yst = (long)rows * RBE_FEW_MAX;
    float* yh = scratch;  // [rows][ys], then the other streams' accumulators y1 = yh + yst, ...
    float* v = scratch + (size_t)yst * RBE_FEW_STREAMS + RBE_FEW_SLACK;  // [b]
    float* tmp = v + b;                                                  // [rows]
    for (long i = p0; i < p1; i++) {
        for (size_t e = 0; e < (size_t)rows * ys; e++) yh[e] = 0;
        // the sparse products: each group of ns blocks into yh and the ns - 1 other accumulators
        // (the last C % ns blocks into yh), then those added to yh in a fixed order (every token alike)
        const int ns = RBE_FEW_STREAMS;
        for (int s = 1; s < ns; s++)
            for (size_t e = 0; e < (size_t)b * ys; e++) yh[s * yst + e] = 0;
        int js = 0;
        for (; js + ns <= C; js += ns)
            few_sparse(yh, yst, Xf + (size_t)js * rows * T, (long)rows * T, W->coeffs + (size_t)(i * C + js) * k,
                       W->index, W->wide, (i * C + js) * k, ns, k, b, T);
        for (; js < C; js++)
            few_sparse(yh, 0, Xf + (size_t)js * rows * T, 0, W->coeffs + (size_t)(i * C + js) * k, W->index, W->wide,
                       (i * C + js) * k, 1, k, b, T);
        for (size_t e = 0; e < (size_t)b * ys; e++) yh[e] = few_stream_sum(yh + e, yst);
        few_rows_finish(y, pre, Xnext, Xf, W, P, At, bias, act, yh, v, tmp, T, i);
    }
}

// ---- one token from packed coefficients (rbe.h) ----
// yh[0, b) = the sparse products of block row i at one token, streams and order as in
// rbe_few_rows_forward (the including file defines it: AVX-512 vectors, AVX2 scalars); -1 if K is
// corrupted. Xf: the one-token analysis (rbe_few_analysis at T = 1).
XT static int one_sparse(float* restrict yh, const float* restrict Xf, const rbe_packed_f32* K, int rows, long i);

// The step walk of one block of a pack, one coefficient at a time: the reference of one_sparse's
// vector walk, and AVX2's. acc: the block's stream accumulator [b]. Returns -1 if corrupted.
XT static INLINE_ALWAYS int one_block_scalar(float* restrict acc, const float* restrict X, const rbe_packed_f32* K,
                                             long blk) {
    const int b = K->b, k = K->k, G = rbe_pack_groups(b);
    long step = K->first[blk], pos = 0;
    const long end = K->first[blk + 1];
    if (step < 0 || end > K->steps) return -1;
    const float* val = K->val + (size_t)blk * k;
    for (int g = 0; g < G; g++)
        for (int d = 0, n = K->nstep[blk * G + g]; d < n; d++, step++) {
            if (step >= end) return -1;
            for (unsigned m = K->mask[step]; m; m &= m - 1) {
                const int l = __builtin_ctz(m), u = g * RBE_PACK_LANES + l;
                if (pos >= k || u >= b) return -1;
                const int c = K->col[step * RBE_PACK_LANES + l];  // read once: checked as used
                if (c >= b) return -1;
                acc[u] = __builtin_fmaf(val[pos], X[c], acc[u]);
                pos++;
            }
        }
    return pos == k && step == end ? 0 : -1;
}

XT __attribute__((unused)) static int one_sparse_scalar(float* restrict yh, const float* restrict Xf,
                                                        const rbe_packed_f32* K, int rows, long i) {
    const int b = K->b, C = (K->in + b - 1) / b, ns = RBE_FEW_STREAMS;
    if (b < 1 || b > RBE_PACK_MAX_B) return -1;  // acc holds RBE_PACK_MAX_B rows
    float acc[RBE_FEW_STREAMS * RBE_PACK_MAX_B];  // stream s at acc + s * RBE_PACK_MAX_B
    for (int s = 0; s < ns; s++)
        for (int u = 0; u < b; u++) acc[s * RBE_PACK_MAX_B + u] = 0;
    int bad = 0;
    for (int j = 0; j < C; j++) {
        const int s = j < C - C % ns ? j % ns : 0;  // the last C % ns blocks into the first stream
        bad |= one_block_scalar(acc + s * RBE_PACK_MAX_B, Xf + (size_t)j * rows, K, i * C + j);
    }
    for (int u = 0; u < b; u++) yh[u] = few_stream_sum(acc + u, RBE_PACK_MAX_B);
    return bad;
}

// RBE_PACK_ROWS: the sources of one step (8 entries) from Xc, the compact DCT rows of the input
// (Xc[j*b + v]) with a zero at Xc[top]; sources past top read that zero and raise *hi past top,
// which the walk reports after its steps; *pad counts each lane's padding entries (source top)
XT static INLINE_ALWAYS __m256 rows_pick(const float* restrict Xc, const uint16_t* restrict src, __m128i top,
                                        __m128i* hi, __m128i* pad) {
    __m128i o = _mm_loadu_si128((const __m128i*)src);
    *hi = _mm_max_epu16(*hi, o);
    *pad = _mm_sub_epi16(*pad, _mm_cmpeq_epi16(o, top));
    o = _mm_min_epu16(o, top);
    uint16_t t[RBE_PACK_ROW_LANES];
    _mm_storeu_si128((__m128i*)t, o);
    const __m128 lo = _mm_setr_ps(Xc[t[0]], Xc[t[1]], Xc[t[2]], Xc[t[3]]);
    const __m128 up = _mm_setr_ps(Xc[t[4]], Xc[t[5]], Xc[t[6]], Xc[t[7]]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), up, 1);
}

// the sum of 8 unsigned 16-bit counts
XT static INLINE_ALWAYS long rows_count(__m128i c) {
    const __m128i t = _mm_add_epi32(_mm_unpacklo_epi16(c, _mm_setzero_si128()),
                                    _mm_unpackhi_epi16(c, _mm_setzero_si128()));  // 4 sums of two, below 2^17
    return (long)_mm_extract_epi32(t, 0) + _mm_extract_epi32(t, 1) + _mm_extract_epi32(t, 2) + _mm_extract_epi32(t, 3);
}

// The lanes of one group's accumulator to their rows of acc (a stream's [RBE_PACK_MAX_B]), each row
// once per stream (*seen: the rows stored so far); a lane without a row (RBE_PACK_NO_ROW) may hold
// padding only (src: the group's n steps). 1 if a lane names a row past b, or one seen before,
// or a lane without a row holds an entry.
XT static INLINE_ALWAYS int rows_store(float* restrict acc, uint64_t* seen, __m256 a, const uint8_t* restrict lane_row,
                                       const uint16_t* restrict src, long n, int b, int top) {
    float t[RBE_PACK_ROW_LANES];
    int bad = 0;
    _mm256_storeu_ps(t, a);
    for (int l = 0; l < RBE_PACK_ROW_LANES; l++) {
        const int u = lane_row[l];
        if (u < b) {
            bad |= (int)(*seen >> u & 1);
            *seen |= (uint64_t)1 << u;
            acc[u] = t[l];
        } else if (u != RBE_PACK_NO_ROW) {
            bad = 1;
        } else {  // (only where b is not a multiple of 8: the last group's lanes past b)
            for (long d = 0; d < n; d++) bad |= src[d * RBE_PACK_ROW_LANES + l] != top;
        }
    }
    return bad;
}

// steps that one_sparse_rows prefetches ahead (the addresses may lie past the pack: prefetches do not fault)
#define RBE_ROWS_AHEAD 64
// yh[0, b) = the sparse products of block row i from an RBE_PACK_ROWS pack (rbe.h): each group of 8
// rows is one chain of multiply-adds per lane, two groups at a time; -1 if K is corrupted: an offset
// past its arrays, a lane naming a row past b or twice in a stream (or no row of the block missing),
// an entry in a lane without a row, or a block row that does not hold C*k entries
XT static int one_sparse_rows(float* restrict yh, const float* restrict Xc, const rbe_packed_f32* K, long i) {
    const int b = K->b, C = (K->in + b - 1) / b, ns = RBE_FEW_STREAMS, L = RBE_PACK_ROW_LANES;
    const int gr = rbe_pack_row_groups(b), top = C * b;  // (b <= RBE_PACK_MAX_B, top < 65536: checked)
    const uint64_t all = b == 64 ? ~(uint64_t)0 : ((uint64_t)1 << b) - 1;
    const long begin = K->first[i], end = K->first[i + 1];
    if (begin < 0 || end < begin || end > K->steps) return -1;
    float acc[RBE_FEW_STREAMS * RBE_PACK_MAX_B];  // stream s at acc + s * RBE_PACK_MAX_B
    for (int s = 0; s < ns; s++)
        for (int u = 0; u < b; u++) acc[s * RBE_PACK_MAX_B + u] = 0;
    const __m128i vtop = _mm_set1_epi16((short)top);
    __m128i hi = _mm_setzero_si128();
    long step = begin;
    int bad = 0;
    long pad = 0;  // padding entries
    for (int s = 0; s < ns; s++) {
        const long grp = (i * ns + s) * gr;
        uint64_t seen = 0;
        for (int g = 0; g < gr; g += 2) {
            const int two = g + 1 < gr;
            const long n0 = K->gsteps[grp + g], n1 = two ? K->gsteps[grp + g + 1] : 0;
            if (n0 + n1 > end - step) return -1;
            const float* v0 = K->val + step * L;
            const uint16_t* s0 = K->src + step * L;
            const float* v1 = v0 + n0 * L;
            const uint16_t* s1 = s0 + n0 * L;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            __m128i c0 = _mm_setzero_si128(), c1 = c0;  // padding entries of each lane (at most 65535 a group)
            const long nc = n0 < n1 ? n0 : n1;
            long d = 0;
            for (; d < nc; d++) {
                if (!(d & 1)) {  // 2 KB ahead in both streams of both groups (a cache line holds 2 steps'
                                 // values, 4 steps' sources): a call from memory 12-20% faster
                    _mm_prefetch((const char*)(v0 + (d + RBE_ROWS_AHEAD) * L), _MM_HINT_T0);
                    _mm_prefetch((const char*)(v1 + (d + RBE_ROWS_AHEAD) * L), _MM_HINT_T0);
                    if (!(d & 3)) {
                        _mm_prefetch((const char*)(s0 + (d + 2 * RBE_ROWS_AHEAD) * L), _MM_HINT_T0);
                        _mm_prefetch((const char*)(s1 + (d + 2 * RBE_ROWS_AHEAD) * L), _MM_HINT_T0);
                    }
                }
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v0 + d * L), rows_pick(Xc, s0 + d * L, vtop, &hi, &c0), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v1 + d * L), rows_pick(Xc, s1 + d * L, vtop, &hi, &c1), a1);
            }
            for (long e = d; e < n0; e++)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v0 + e * L), rows_pick(Xc, s0 + e * L, vtop, &hi, &c0), a0);
            for (long e = d; e < n1; e++)
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v1 + e * L), rows_pick(Xc, s1 + e * L, vtop, &hi, &c1), a1);
            bad |= rows_store(acc + s * RBE_PACK_MAX_B, &seen, a0, K->lane_row + (grp + g) * L, s0, n0, b, top);
            if (two)
                bad |= rows_store(acc + s * RBE_PACK_MAX_B, &seen, a1, K->lane_row + (grp + g + 1) * L, s1, n1, b, top);
            pad += rows_count(c0) + rows_count(c1);
            step += n0 + n1;
        }
        bad |= seen != all;
    }
    // a source past top: some lane's maximum is above it (unsigned: max(hi, top) != top)
    const __m128i over = _mm_xor_si128(_mm_max_epu16(hi, vtop), vtop);
    if (bad || step != end || !_mm_testz_si128(over, over) || (end - begin) * L - pad != (long)C * K->k) return -1;
    for (int u = 0; u < b; u++) yh[u] = few_stream_sum(acc + u, RBE_PACK_MAX_B);
    return 0;
}

XT int XSFX(rbe_one_rows_forward_f32)(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                                      const rbe_packed_f32* K, const rbe_plan_f32* P, const float* At,
                                      const float* bias, int act, float* scratch, long p0, long p1) {
    const int b = W->b, rows = b + P->nf;
    float* yh = scratch;  // [rows], as rbe_few_rows_forward lays out its scratch at T = 1
    float* v = scratch + (size_t)rows * RBE_FEW_MAX * RBE_FEW_STREAMS + RBE_FEW_SLACK;  // [b]
    float* tmp = v + b;                                                               // [rows]
    float* Xc = scratch + rbe_few_scratch(b, P->nf);  // RBE_PACK_ROWS: [C*b + 8]
    const int rowpack = K->layout == RBE_PACK_ROWS;
    if (K->layout != RBE_PACK_STEPS && !rowpack) return -1;
    if (rowpack) {
        const int C = (K->in + K->b - 1) / K->b;
        if (K->b != b || b < 1 || b > RBE_PACK_MAX_B || (long)C * b > 65535) return -1;
        for (int j = 0; j < C; j++) memcpy(Xc + (size_t)j * b, Xf + (size_t)j * rows, sizeof(float) * b);
        for (int e = 0; e < RBE_PACK_ROW_LANES; e++) Xc[(size_t)C * b + e] = 0;
    }
    int bad = 0;
    for (long i = p0; i < p1; i++) {
        for (int e = 0; e < rows; e++) yh[e] = 0;
        bad |= rowpack ? one_sparse_rows(yh, Xc, K, i) : one_sparse(yh, Xf, K, rows, i);
        few_rows_finish(y, pre, Xnext, Xf, W, P, At, bias, act, yh, v, tmp, 1, i);
    }
    return bad;
}
