/* rbe_avx2.c - float32 linear kernels with AVX2 + FMA intrinsics.
 *
 * The kernels are rbe_x86_impl.h at 8 floats a vector; this file holds what is particular to
 * the width: the register blocking of gemm_tile (6 rows x 16 tokens of accumulators), the lane
 * sum and the reductions of the parameter gradient (two entries share one hadd reduction).
 * Compiled with per-function target attributes, so the file builds everywhere and
 * rbe_linear.c picks these at run time when the CPU has AVX2 and FMA (and, where the CPU
 * has AVX-512, when RBE_FFN_ISA=avx2 asks for them).
 */
#include "rbe_variants.h"

#ifdef RBE_X86_KERNELS

#define XT __attribute__((target("avx2,fma")))
#define XSFX(name) name##_avx2
#define XSFX_BLOCKS(name) name##_avx2_blocks
#define VF __m256
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSET1(x) _mm256_set1_ps(x)
#define VBCAST(p) _mm256_broadcast_ss(p)
#include "rbe_x86_impl.h"

int rbe_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

XT static void gemm_tile(float* restrict out, long ldo, int acc, const float* restrict L, long li, long lp,
                         const float* restrict Rm, long ldr, int n_out, int P, int nl) {
    int i = 0;
    for (; i + 6 <= n_out; i += 6) {
        const float* l = L + (long)i * li;
        for (int t = 0; t < nl; t += 16) {
            float* o = out + (long)i * ldo + t;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
            __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
            if (acc) {
                a00 = _mm256_loadu_ps(o), a01 = _mm256_loadu_ps(o + 8);
                a10 = _mm256_loadu_ps(o + ldo), a11 = _mm256_loadu_ps(o + ldo + 8);
                a20 = _mm256_loadu_ps(o + 2 * ldo), a21 = _mm256_loadu_ps(o + 2 * ldo + 8);
                a30 = _mm256_loadu_ps(o + 3 * ldo), a31 = _mm256_loadu_ps(o + 3 * ldo + 8);
                a40 = _mm256_loadu_ps(o + 4 * ldo), a41 = _mm256_loadu_ps(o + 4 * ldo + 8);
                a50 = _mm256_loadu_ps(o + 5 * ldo), a51 = _mm256_loadu_ps(o + 5 * ldo + 8);
            }
            for (int p = 0; p < P; p++) {
                const float* r = Rm + (long)p * ldr + t;
                __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + 8), w;
                const float* lp0 = l + (long)p * lp;
                w = _mm256_broadcast_ss(lp0);
                a00 = _mm256_fmadd_ps(w, r0, a00), a01 = _mm256_fmadd_ps(w, r1, a01);
                w = _mm256_broadcast_ss(lp0 + li);
                a10 = _mm256_fmadd_ps(w, r0, a10), a11 = _mm256_fmadd_ps(w, r1, a11);
                w = _mm256_broadcast_ss(lp0 + 2 * li);
                a20 = _mm256_fmadd_ps(w, r0, a20), a21 = _mm256_fmadd_ps(w, r1, a21);
                w = _mm256_broadcast_ss(lp0 + 3 * li);
                a30 = _mm256_fmadd_ps(w, r0, a30), a31 = _mm256_fmadd_ps(w, r1, a31);
                w = _mm256_broadcast_ss(lp0 + 4 * li);
                a40 = _mm256_fmadd_ps(w, r0, a40), a41 = _mm256_fmadd_ps(w, r1, a41);
                w = _mm256_broadcast_ss(lp0 + 5 * li);
                a50 = _mm256_fmadd_ps(w, r0, a50), a51 = _mm256_fmadd_ps(w, r1, a51);
            }
            _mm256_storeu_ps(o, a00), _mm256_storeu_ps(o + 8, a01);
            _mm256_storeu_ps(o + ldo, a10), _mm256_storeu_ps(o + ldo + 8, a11);
            _mm256_storeu_ps(o + 2 * ldo, a20), _mm256_storeu_ps(o + 2 * ldo + 8, a21);
            _mm256_storeu_ps(o + 3 * ldo, a30), _mm256_storeu_ps(o + 3 * ldo + 8, a31);
            _mm256_storeu_ps(o + 4 * ldo, a40), _mm256_storeu_ps(o + 4 * ldo + 8, a41);
            _mm256_storeu_ps(o + 5 * ldo, a50), _mm256_storeu_ps(o + 5 * ldo + 8, a51);
        }
    }
    for (; i < n_out; i++) {
        const float* l = L + (long)i * li;
        int t = 0;
        for (; t + 32 <= nl; t += 32) {
            float* o = out + (long)i * ldo + t;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            if (acc) a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8), a2 = _mm256_loadu_ps(o + 16),
                     a3 = _mm256_loadu_ps(o + 24);
            for (int p = 0; p < P; p++) {
                const float* r = Rm + (long)p * ldr + t;
                __m256 w = _mm256_broadcast_ss(l + (long)p * lp);
                a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 8), a1);
                a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 16), a2);
                a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 24), a3);
            }
            _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1), _mm256_storeu_ps(o + 16, a2),
                _mm256_storeu_ps(o + 24, a3);
        }
        if (t < nl) {  // 16 lanes left
            float* o = out + (long)i * ldo + t;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            if (acc) a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8);
            for (int p = 0; p < P; p++) {
                const float* r = Rm + (long)p * ldr + t;
                __m256 w = _mm256_broadcast_ss(l + (long)p * lp);
                a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 8), a1);
            }
            _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1);
        }
    }
}


// one_sparse (rbe_x86_impl.h): the scalar walk (8-lane vectors cannot pick from 64 source values)
XT static int one_sparse(float* restrict yh, const float* restrict Xf, const rbe_packed_f32* K, int rows, long i) {
    return one_sparse_scalar(yh, Xf, K, rows, i);
}

XT static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// the lane sum of one vector as coeff_grads sums a pair of entries (hadd pairs, fold the halves,
// hadd again), so an entry's sum does not depend on whether it was paired: the one-pass backward
// (run_product_dots) pairs the entries of other runs than params_sched, with the same bits
XT static inline float hsum_pairs(__m256 v) {
    const __m256 h = _mm256_hadd_ps(v, v);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}

// The parameter gradient's dot products of one output row u: g = Gh_i[u] against the rows
// Xt[off[e]], two entries at a time sharing one reduction. A 16-lane tile sums its two vectors;
// a full tile its eight in two chains (the same sums when lanes past 16 are zero). ahead: prefetch
// the rows RBE_PREFETCH entries on (0 where the caller has just read them: run_product_dots).
XT static INLINE_ALWAYS void coeff_grads_w(float* restrict sacc, const float* restrict g, const float* restrict Xt,
                                           const int32_t* restrict soff, int e, int e1, int nl, int ahead) {
    if (nl < TL) {
        const __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8);
        for (; e + 2 <= e1; e += 2) {  // the full-width reduction below, on 16 lanes
            const float* xa = Xt + soff[e];
            const float* xb = Xt + soff[e + 1];
            __m256 a = _mm256_add_ps(_mm256_mul_ps(g0, _mm256_loadu_ps(xa)),
                                     _mm256_mul_ps(g1, _mm256_loadu_ps(xa + 8)));
            __m256 bb = _mm256_add_ps(_mm256_mul_ps(g0, _mm256_loadu_ps(xb)),
                                      _mm256_mul_ps(g1, _mm256_loadu_ps(xb + 8)));
            __m256 h = _mm256_hadd_ps(a, bb);
            __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            q = _mm_hadd_ps(q, q);
            __m128 cur = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i_u*)(sacc + e)));
            _mm_storel_epi64((__m128i_u*)(sacc + e), _mm_castps_si128(_mm_add_ps(cur, q)));
        }
        for (; e < e1; e++) {
            const float* x = Xt + soff[e];
            __m256 s0 = _mm256_mul_ps(g0, _mm256_loadu_ps(x));
            __m256 s1 = _mm256_mul_ps(g1, _mm256_loadu_ps(x + 8));
            sacc[e] += hsum_pairs(_mm256_add_ps(s0, s1));
        }
        return;
    }
    __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8), g2 = _mm256_loadu_ps(g + 16),
           g3 = _mm256_loadu_ps(g + 24), g4 = _mm256_loadu_ps(g + 32), g5 = _mm256_loadu_ps(g + 40),
           g6 = _mm256_loadu_ps(g + 48), g7 = _mm256_loadu_ps(g + 56);
    for (; e + 2 <= e1; e += 2) {  // two entries at a time: one shared reduction
        const float* xa = Xt + soff[e];
        const float* xb = Xt + soff[e + 1];
        if (ahead) {
            const int ea = e + RBE_PREFETCH < e1 ? e + RBE_PREFETCH : e;
            const int eb = e + 1 + RBE_PREFETCH < e1 ? e + 1 + RBE_PREFETCH : e + 1;
            const char* pa = (const char*)(Xt + soff[ea]);
            const char* pb = (const char*)(Xt + soff[eb]);
            _mm_prefetch(pa, _MM_HINT_T0), _mm_prefetch(pa + 64, _MM_HINT_T0);
            _mm_prefetch(pa + 128, _MM_HINT_T0), _mm_prefetch(pa + 192, _MM_HINT_T0);
            _mm_prefetch(pb, _MM_HINT_T0), _mm_prefetch(pb + 64, _MM_HINT_T0);
            _mm_prefetch(pb + 128, _MM_HINT_T0), _mm_prefetch(pb + 192, _MM_HINT_T0);
        }
        __m256 a0 = _mm256_mul_ps(g0, _mm256_loadu_ps(xa));
        __m256 a1 = _mm256_mul_ps(g1, _mm256_loadu_ps(xa + 8));
        __m256 b0 = _mm256_mul_ps(g0, _mm256_loadu_ps(xb));
        __m256 b1 = _mm256_mul_ps(g1, _mm256_loadu_ps(xb + 8));
        a0 = _mm256_fmadd_ps(g2, _mm256_loadu_ps(xa + 16), a0);
        a1 = _mm256_fmadd_ps(g3, _mm256_loadu_ps(xa + 24), a1);
        b0 = _mm256_fmadd_ps(g2, _mm256_loadu_ps(xb + 16), b0);
        b1 = _mm256_fmadd_ps(g3, _mm256_loadu_ps(xb + 24), b1);
        a0 = _mm256_fmadd_ps(g4, _mm256_loadu_ps(xa + 32), a0);
        a1 = _mm256_fmadd_ps(g5, _mm256_loadu_ps(xa + 40), a1);
        b0 = _mm256_fmadd_ps(g4, _mm256_loadu_ps(xb + 32), b0);
        b1 = _mm256_fmadd_ps(g5, _mm256_loadu_ps(xb + 40), b1);
        a0 = _mm256_fmadd_ps(g6, _mm256_loadu_ps(xa + 48), a0);
        a1 = _mm256_fmadd_ps(g7, _mm256_loadu_ps(xa + 56), a1);
        b0 = _mm256_fmadd_ps(g6, _mm256_loadu_ps(xb + 48), b0);
        b1 = _mm256_fmadd_ps(g7, _mm256_loadu_ps(xb + 56), b1);
        // [a, b] lane sums: hadd pairs, fold the halves, hadd again
        __m256 h = _mm256_hadd_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1));
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        q = _mm_hadd_ps(q, q);  // [a, b, a, b]
        __m128 cur = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i_u*)(sacc + e)));  // 2 floats
        _mm_storel_epi64((__m128i_u*)(sacc + e), _mm_castps_si128(_mm_add_ps(cur, q)));
    }
    for (; e < e1; e++) {
        const float* x = Xt + soff[e];
        __m256 s0 = _mm256_mul_ps(g0, _mm256_loadu_ps(x));
        __m256 s1 = _mm256_mul_ps(g1, _mm256_loadu_ps(x + 8));
        s0 = _mm256_fmadd_ps(g2, _mm256_loadu_ps(x + 16), s0);
        s1 = _mm256_fmadd_ps(g3, _mm256_loadu_ps(x + 24), s1);
        s0 = _mm256_fmadd_ps(g4, _mm256_loadu_ps(x + 32), s0);
        s1 = _mm256_fmadd_ps(g5, _mm256_loadu_ps(x + 40), s1);
        s0 = _mm256_fmadd_ps(g6, _mm256_loadu_ps(x + 48), s0);
        s1 = _mm256_fmadd_ps(g7, _mm256_loadu_ps(x + 56), s1);
        sacc[e] += hsum_pairs(_mm256_add_ps(s0, s1));
    }
}

XT static void coeff_grads(float* restrict sacc, const float* restrict g, const float* restrict Xt,
                           const int32_t* restrict soff, int e, int e1, int nl) {
    coeff_grads_w(sacc, g, Xt, soff, e, e1, nl, 1);
}

// run_product_dots in pieces of RBE_DOT_PIECE entries: a piece's rows are read from L2 for the
// product (which prefetches them), then again from L1 for the dot products, with no prefetch
// (eight registers a row leave too few for both at once)
#ifndef RBE_DOT_PIECE
#define RBE_DOT_PIECE 32
#endif
XT static INLINE_ALWAYS void run_product_dots(__m256* a, float* restrict sacc, const float* restrict xrow,
                                              const float* restrict src, const int32_t* restrict off,
                                              const float* restrict val, int e, int e1, int nv) {
    while (e < e1) {
        const int pe = e + RBE_DOT_PIECE < e1 ? e + RBE_DOT_PIECE : e1;
        run_product(a, src, off, val, e, pe, e1, nv);
        coeff_grads_w(sacc, xrow, src, off, e, pe, nv * VW, 0);
        e = pe;
    }
}

#else
int rbe_cpu_has_avx2(void) { return 0; }
#endif
