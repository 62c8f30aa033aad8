/* rbe_avx512.c - float32 linear kernels with AVX-512 (F, VL, DQ) intrinsics.
 *
 * The kernels are rbe_x86_impl.h at 16 floats a vector: an output row of a tile (64 tokens)
 * is 4 zmm registers instead of 8 ymm, so the sparse products and the pattern terms issue
 * half the loads and multiply-adds per coefficient, and a 16-lane tile (at most 16 tokens)
 * is a single register. This file holds what is particular to the width: gemm_tile's
 * register blocking, the lane sum and the parameter gradient's reductions (four entries
 * share one), and the scheduled kernels on bfloat16 operands (AVX-512 BF16: sparse_sched_bf16,
 * coeff_grads_bf16 and their entry points, for 16-bit results). Every lane runs the same chain of fused
 * multiply-adds as in the AVX2 kernels, so the products (forward, input gradient) give the same
 * bits; the lane sums of the parameter gradient are associated differently (within float
 * rounding).
 *
 * Compiled with per-function target attributes, so the file builds everywhere;
 * rbe_linear.c picks these at run time when the CPU has AVX-512 F/VL/DQ/BW (and AVX2 + FMA),
 * unless RBE_FFN_ISA caps the choice.
 */
#include "rbe_variants.h"

#ifdef RBE_X86_KERNELS

#define XT __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define XSFX(name) name##_avx512
#define XSFX_BLOCKS(name) name##_avx512_blocks
#define VF __m512
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSET1(x) _mm512_set1_ps(x)
#define VBCAST(p) _mm512_set1_ps(*(p))
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define XBF16 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")))
#endif /* older compilers know no AVX-512 BF16: float32 operands only */
#include "rbe_x86_impl.h"

int rbe_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") && rbe_cpu_has_avx2();
}

// mr rows x 16 nv tokens of gemm_tile in registers (mr <= 8, nv <= 4; constants at each call)
XT static INLINE_ALWAYS void gemm_block(float* restrict o, long ldo, int acc, const float* restrict l, long li,
                                        long lp, const float* restrict r, long ldr, int P, int mr, int nv) {
    __m512 a[8][4];
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) a[m][v] = acc ? _mm512_loadu_ps(o + m * ldo + 16 * v) : _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        __m512 x[4];
        for (int v = 0; v < nv; v++) x[v] = _mm512_loadu_ps(r + (long)p * ldr + 16 * v);
        for (int m = 0; m < mr; m++) {
            const __m512 w = _mm512_set1_ps(l[m * li + p * lp]);
            for (int v = 0; v < nv; v++) a[m][v] = _mm512_fmadd_ps(w, x[v], a[m][v]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(o + m * ldo + 16 * v, a[m][v]);
}

// the rows of gemm_tile in blocks of mr, then 2, then 1, each 16 nv tokens wide
XT static INLINE_ALWAYS void gemm_rows(float* restrict out, long ldo, int acc, const float* restrict L, long li,
                                       long lp, const float* restrict Rm, long ldr, int n_out, int P, int mr,
                                       int nv) {
    int i = 0;
    for (; i + mr <= n_out; i += mr) gemm_block(out + i * ldo, ldo, acc, L + i * li, li, lp, Rm, ldr, P, mr, nv);
    for (; i + 2 <= n_out; i += 2) gemm_block(out + i * ldo, ldo, acc, L + i * li, li, lp, Rm, ldr, P, 2, nv);
    for (; i < n_out; i++) gemm_block(out + i * ldo, ldo, acc, L + i * li, li, lp, Rm, ldr, P, 1, nv);
}

// A whole tile: 6 rows x 64 tokens (24 accumulators; 4 loads and 6 broadcasts per 24 FMAs);
// a 16-lane tile: 8 rows x 16 tokens.
XT static void gemm_tile(float* restrict out, long ldo, int acc, const float* restrict L, long li, long lp,
                         const float* restrict Rm, long ldr, int n_out, int P, int nl) {
    if (nl == TL) gemm_rows(out, ldo, acc, L, li, lp, Rm, ldr, n_out, P, 6, TL / 16);
    else gemm_rows(out, ldo, acc, L, li, lp, Rm, ldr, n_out, P, 8, 1);
}

XT static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// one_sparse (rbe_x86_impl.h): block (i, j)'s b source values in four registers (lanes past b
// zero), each step's columns picked from them by two two-source permutes and a blend on bit 5,
// its values expanded from their compact order into its lanes, one masked multiply-add per step
// into the 16-row accumulator of the step's group. Every check of the scalar walk is made too
// (offsets, lanes past b, columns past b), on masks.
XT static INLINE_ALWAYS int one_block(__m512 acc[4], const float* restrict X, const rbe_packed_f32* K, long blk,
                                      const __mmask16 valid[4]) {
    const int b = K->b, k = K->k, G = rbe_pack_groups(b);
    const __m512 x0 = _mm512_maskz_loadu_ps(valid[0], X), x1 = _mm512_maskz_loadu_ps(valid[1], X + 16);
    const __m512 x2 = _mm512_maskz_loadu_ps(valid[2], X + 32), x3 = _mm512_maskz_loadu_ps(valid[3], X + 48);
    const __m512i hi_bit = _mm512_set1_epi32(32);
    // the block's steps and masks read once, into locals, and checked before the walk: the
    // values the expand-loads take must add up to k (the walk itself then needs no checks)
    const long begin = K->first[blk], end = K->first[blk + 1];
    if (begin < 0 || end < begin || end > K->steps || end - begin > RBE_PACK_LANES * RBE_PACK_MAX_B) return -1;
    int ns[4] = {0, 0, 0, 0}, total = 0;
    for (int g = 0; g < G; g++) total += ns[g] = K->nstep[blk * G + g];
    if (total != end - begin) return -1;
    uint16_t masks[RBE_PACK_LANES * RBE_PACK_MAX_B];
    long count = 0;
    for (int s = 0; s < total; s++) count += __builtin_popcount(masks[s] = K->mask[begin + s]);
    if (count != k) return -1;
    const float* val = K->val + (size_t)blk * k;
    const uint8_t* col = K->col + (size_t)begin * RBE_PACK_LANES;
    __m512i vmax = _mm512_setzero_si512();  // the largest column taken, checked against b at the end
    unsigned stray = 0;                     // lanes past b taken
    long pos = 0;
    const uint16_t* m = masks;
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {  // unrolled: acc[g] and valid[g] are registers
        __m512 a = acc[g];
        for (int d = 0; d < ns[g]; d++, m++, col += RBE_PACK_LANES) {
            const __mmask16 mk = *m;
            const __m512 cv = _mm512_maskz_expandloadu_ps(mk, val + pos);
            pos += __builtin_popcount(mk);
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)col));
            const __m512 lo = _mm512_permutex2var_ps(x0, v, x1), hi = _mm512_permutex2var_ps(x2, v, x3);
            const __m512 xv = _mm512_mask_blend_ps(_mm512_test_epi32_mask(v, hi_bit), lo, hi);
            a = _mm512_mask3_fmadd_ps(cv, xv, a, mk);
            vmax = _mm512_mask_max_epu32(vmax, mk, vmax, v);
            stray |= mk & (unsigned)~valid[g];
        }
        acc[g] = a;
    }
    return stray || _mm512_reduce_max_epu32(vmax) >= (unsigned)b ? -1 : 0;
}

#if RBE_FEW_STREAMS != 4
#error "one_sparse keeps four streams' accumulators"
#endif
XT static int one_sparse(float* restrict yh, const float* restrict Xf, const rbe_packed_f32* K, int rows, long i) {
    const int b = K->b, C = (K->in + b - 1) / b, ns = RBE_FEW_STREAMS;
    if (b < 1 || b > RBE_PACK_MAX_B) return -1;  // four registers of 16 rows, and a[][64] below
    __mmask16 valid[4];
    for (int g = 0; g < 4; g++) {
        const int n = b - 16 * g;
        valid[g] = n >= 16 ? 0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
    }
    __m512 acc[RBE_FEW_STREAMS][4];
    for (int s = 0; s < ns; s++)
        for (int g = 0; g < 4; g++) acc[s][g] = _mm512_setzero_ps();
    int bad = 0, j = 0;
    const float* X = Xf;
    for (; j + ns <= C; j += ns, X += (size_t)ns * rows) {  // stream s takes block j + s
        bad |= one_block(acc[0], X, K, i * C + j, valid);
        bad |= one_block(acc[1], X + rows, K, i * C + j + 1, valid);
        bad |= one_block(acc[2], X + 2 * rows, K, i * C + j + 2, valid);
        bad |= one_block(acc[3], X + 3 * rows, K, i * C + j + 3, valid);
    }
    for (; j < C; j++, X += rows) bad |= one_block(acc[0], X, K, i * C + j, valid);  // the last C % ns blocks
    float a[RBE_FEW_STREAMS * 4 * 16];  // stream s at a + s * 64
    for (int s = 0; s < ns; s++)
        for (int g = 0; g < 4; g++) _mm512_storeu_ps(a + s * 64 + 16 * g, acc[s][g]);
    for (int u = 0; u < b; u++) yh[u] = few_stream_sum(a + u, 4 * 16);
    return bad;
}

// the lane sums of four vectors: [sum a, sum b, sum c, sum d]
XT static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    // fold 512 -> 256 bits pairwise: ab = [a0+a2, a1+a3, b0+b2, b1+b3] (128-bit quarters)
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    // then to one quarter each: [a | b | c | d], four partial sums in each
    __m512 f = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    f = _mm512_add_ps(f, _mm512_permute_ps(f, 0x4E));  // within quarters: [x0+x2, x1+x3, ...]
    f = _mm512_add_ps(f, _mm512_permute_ps(f, 0xB1));  // every lane of a quarter: its total
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                          0, 0, 0, 0), f));
}

// one entry of dots_w: the chain g[0]*x[0] + g[1]*x[1] + ... over nv registers of the row x,
// and with a (else NULL) the same loaded registers into the product a[:nv] += c * x
XT static INLINE_ALWAYS __m512 entry_dot(const __m512* gv, const float* restrict x, int nv, __m512* a,
                                         const float* c) {
    const __m512 cv = a ? _mm512_set1_ps(*c) : _mm512_setzero_ps();
    __m512 s = _mm512_setzero_ps();
    for (int v = 0; v < nv; v++) {
        const __m512 xv = _mm512_loadu_ps(x + 16 * v);
        if (a) a[v] = _mm512_fmadd_ps(cv, xv, a[v]);
        s = v ? _mm512_fmadd_ps(gv[v], xv, s) : _mm512_mul_ps(gv[0], xv);
    }
    return s;
}

// sacc[e] += g . Xt[soff[e]] for e in [e, e1) over nv = nl / 16 registers (the extra lanes of a
// full tile add exact zeros when only 16 hold tokens), four entries sharing one reduction, the
// rest one at a time: coeff_grads. With a (else NULL; a constant at each call) every row loaded
// also goes into the sparse product a[:nv] += val[e] * Xt[soff[e]]: run_product_dots, one read
// of each row for both, the same chains and sums as coeff_grads (so the same bits as the
// parameter gradient's own pass); the output row, the held row, the loaded row and four dot sums
// take 3 nv + 4 registers
XT static INLINE_ALWAYS void dots_w(float* restrict sacc, const float* restrict g, const float* restrict Xt,
                                    const int32_t* restrict soff, int e, int e1, int nv, __m512* a,
                                    const float* restrict val) {
    __m512 gv[4];
    for (int v = 0; v < nv; v++) gv[v] = _mm512_loadu_ps(g + 16 * v);
    for (; e + 4 <= e1; e += 4) {
        __m512 s[4];
        for (int q = 0; q < 4; q++) {
            if (a || nv == TL / 16) {  // rows from L2/L3 in schedule order
                const int ea = e + q + RBE_PREFETCH < e1 ? e + q + RBE_PREFETCH : e + q;
                const char* pa = (const char*)(Xt + soff[ea]);
                for (int line = 0; line < nv; line++) _mm_prefetch(pa + 64 * line, _MM_HINT_T0);
            }
            s[q] = entry_dot(gv, Xt + soff[e + q], nv, a, a ? val + e + q : NULL);
        }
        _mm_storeu_ps(sacc + e, _mm_add_ps(_mm_loadu_ps(sacc + e), hsum4(s[0], s[1], s[2], s[3])));
    }
    for (; e < e1; e++) sacc[e] += hsum(entry_dot(gv, Xt + soff[e], nv, a, a ? val + e : NULL));
}

XT static void coeff_grads(float* restrict sacc, const float* restrict g, const float* restrict Xt,
                           const int32_t* restrict soff, int e, int e1, int nl) {
    if (nl == TL) dots_w(sacc, g, Xt, soff, e, e1, TL / 16, NULL, NULL);
    else dots_w(sacc, g, Xt, soff, e, e1, 1, NULL, NULL);
}

XT static INLINE_ALWAYS void run_product_dots(__m512* a, float* restrict sacc, const float* restrict xrow,
                                              const float* restrict src, const int32_t* restrict off,
                                              const float* restrict val, int e, int e1, int nv) {
    dots_w(sacc, xrow, src, off, e, e1, nv, a, val);
}

// ---- the scheduled kernels on bfloat16 rows (AVX-512 BF16) ----
#ifdef XBF16
// vdpbf16ps adds the products of 32 bfloat16 pairs into 16 float32 lanes (two per lane). In the
// coefficient gradients a 64-token row is two instructions on 128 bytes instead of four
// multiply-adds on 256, and which two tokens share a lane does not matter (g and the rows are laid
// out alike); in the sparse products a lane pairs two entries of a run (sparse_sched_bf16).
#define BF16 XBF16

// 32 bfloat16 of a row (nv = 2 per row: whole tiles), or its first 16 and zeros (nv = 1: tiles of
// at most 16 tokens, whose lanes past 16 are zero anyway)
BF16 static INLINE_ALWAYS __m512bh bf16_row(const uint16_t* p, int v, int nv) {
    return (__m512bh)(nv == 2 ? _mm512_loadu_si512(p + 32 * v) : _mm512_maskz_loadu_epi16(0xFFFF, p));
}

BF16 static INLINE_ALWAYS void coeff_grads_bf16_w(float* restrict sacc, const uint16_t* restrict g,
                                                 const uint16_t* restrict Xt, const int32_t* restrict soff, int e,
                                                 int e1, int nv) {
    __m512bh gv[2];
    for (int v = 0; v < nv; v++) gv[v] = bf16_row(g, v, nv);
    for (; e + 4 <= e1; e += 4) {
        __m512 s[4];
        for (int q = 0; q < 4; q++) {
            if (nv == 2) {  // whole tiles: rows come from L2/L3 in schedule order
                const int ea = e + q + RBE_PREFETCH < e1 ? e + q + RBE_PREFETCH : e + q;
                const char* pa = (const char*)(Xt + soff[ea]);
                _mm_prefetch(pa, _MM_HINT_T0);
                _mm_prefetch(pa + 64, _MM_HINT_T0);
            }
            const uint16_t* x = Xt + soff[e + q];
            s[q] = _mm512_dpbf16_ps(_mm512_setzero_ps(), gv[0], bf16_row(x, 0, nv));
            if (nv == 2) s[q] = _mm512_dpbf16_ps(s[q], gv[1], bf16_row(x, 1, nv));
        }
        _mm_storeu_ps(sacc + e, _mm_add_ps(_mm_loadu_ps(sacc + e), hsum4(s[0], s[1], s[2], s[3])));
    }
    for (; e < e1; e++) {
        const uint16_t* x = Xt + soff[e];
        __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), gv[0], bf16_row(x, 0, nv));
        if (nv == 2) s = _mm512_dpbf16_ps(s, gv[1], bf16_row(x, 1, nv));
        sacc[e] += hsum(s);
    }
}

BF16 static void coeff_grads_bf16(float* restrict sacc, const uint16_t* restrict g, const uint16_t* restrict Xt,
                                  const int32_t* restrict soff, int e, int e1, int nl) {
    if (nl == TL) coeff_grads_bf16_w(sacc, g, Xt, soff, e, e1, 2);
    else coeff_grads_bf16_w(sacc, g, Xt, soff, e, e1, 1);
}

// out[key][:] = sum over the key's entries of val[e] * src[off[e]][:] on whole tiles, the rows in
// bfloat16 and the values rounded to bfloat16: two entries per vdpbf16ps, their rows interleaved
// token by token (vpunpck[lh]wd), so each lane adds c1 x1[t] + c2 x2[t]; the unpacks leave the
// tokens of each 32 in the order [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31], put back
// by two permutes per 32 tokens before the store.
BF16 static void sparse_sched_bf16(float* restrict out, const uint16_t* restrict src, const int32_t* restrict start,
                                   const int32_t* restrict off, const float* restrict val, int b) {
    const __m512i back0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i back1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int key = 0; key < b; key++) {
        __m512 a[4];
        for (int v = 0; v < 4; v++) a[v] = _mm512_setzero_ps();
        const int e1 = start[key + 1];
        int e = start[key];
        for (; e < e1; e += 2) {
            const int two = e + 1 < e1;
            const uint16_t* x1 = src + off[e];
            const uint16_t* x2 = two ? src + off[e + 1] : NULL;
            const int ea = e + RBE_PREFETCH < e1 ? e + RBE_PREFETCH : e;
            _mm_prefetch((const char*)(src + off[ea]), _MM_HINT_T0);
            _mm_prefetch((const char*)(src + off[ea]) + 64, _MM_HINT_T0);
            if (ea + 1 < e1) {
                _mm_prefetch((const char*)(src + off[ea + 1]), _MM_HINT_T0);
                _mm_prefetch((const char*)(src + off[ea + 1]) + 64, _MM_HINT_T0);
            }
            const __m128bh cp = _mm_cvtneps_pbh(_mm_setr_ps(val[e], two ? val[e + 1] : 0.0f, 0.0f, 0.0f));
            const __m512bh c = (__m512bh)_mm512_set1_epi32(_mm_cvtsi128_si32((__m128i)cp));
            for (int h = 0; h < 2; h++) {
                const __m512i r1 = _mm512_loadu_si512(x1 + 32 * h);
                const __m512i r2 = two ? _mm512_loadu_si512(x2 + 32 * h) : _mm512_setzero_si512();
                a[2 * h] = _mm512_dpbf16_ps(a[2 * h], c, (__m512bh)_mm512_unpacklo_epi16(r1, r2));
                a[2 * h + 1] = _mm512_dpbf16_ps(a[2 * h + 1], c, (__m512bh)_mm512_unpackhi_epi16(r1, r2));
            }
        }
        float* o = out + (long)key * TL;
        for (int h = 0; h < 2; h++) {
            _mm512_storeu_ps(o + 32 * h, _mm512_permutex2var_ps(a[2 * h], back0, a[2 * h + 1]));
            _mm512_storeu_ps(o + 32 * h + 16, _mm512_permutex2var_ps(a[2 * h], back1, a[2 * h + 1]));
        }
    }
}

XT void rbe_rows_forward_bf16(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                              const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                              float* scratch, uint16_t* bf16, long* rounded, long T, long p0, long p1) {
    rows_body(y, pre, Xnext, Xh, W, P, sched, bias, act, scratch, bf16, rounded, T, p0, p1);
}

XT void rbe_cols_backward_bf16(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                               const rbe_sched_f32* sched, float* scratch, uint16_t* bf16, long* rounded, long T,
                               long p0, long p1) {
    cols_backward(dx, Gh, W, P, sched, scratch, bf16, rounded, T, p0, p1);
}

int rbe_cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return rbe_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

// round to nearest even, as vcvtne2ps2bf16 does (NaN stays NaN; denormals become zero there)
BF16 void rbe_to_bf16(uint16_t* out, const float* in, long n) {
    long i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i)));
    for (; i < n; i++) {
        const __m128bh h = _mm_cvtneps_pbh(_mm_set_ss(in[i]));
        memcpy(out + i, &h, sizeof(uint16_t));
    }
}

XT void rbe_params_backward_bf16(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh, uint16_t* scratch,
                                 const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                                 int accumulate, long T, long p0, long p1) {
    params_sched(dbasis, dcoeffs, Gh, Xh, scratch, W, P, sched, accumulate, T, p0, p1);
}
#else
int rbe_cpu_has_avx512bf16(void) { return 0; }
#endif

#else
int rbe_cpu_has_avx512(void) { return 0; }
int rbe_cpu_has_avx512bf16(void) { return 0; }
#endif

#if !defined(RBE_X86_KERNELS) || !defined(XBF16)
// no AVX-512 BF16 in this build: rbe_bf16_sparse_available() is 0, so the operators never call
// these; they still do what rbe.h says (round to nearest even; the float32 kernels)
void rbe_to_bf16(uint16_t* out, const float* in, long n) {
    for (long i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, in + i, sizeof u);
        out[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((u >> 16) | 0x40u)
                                                 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}
void rbe_params_backward_bf16(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh, uint16_t* scratch,
                              const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                              int accumulate, long T, long p0, long p1) {
    (void)scratch;
    rbe_params_backward_f32(dbasis, dcoeffs, Gh, Xh, W, P, sched, accumulate, T, p0, p1);
}
void rbe_rows_forward_bf16(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                           const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                           float* scratch, uint16_t* bf16, long* rounded, long T, long p0, long p1) {
    (void)bf16, (void)rounded;
    rbe_rows_forward_f32(y, pre, Xnext, Xh, W, P, sched, bias, act, scratch, T, p0, p1);
}
void rbe_cols_backward_bf16(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                            const rbe_sched_f32* sched, float* scratch, uint16_t* bf16, long* rounded, long T,
                            long p0, long p1) {
    (void)bf16, (void)rounded;
    rbe_cols_backward_f32(dx, Gh, W, P, sched, scratch, T, p0, p1);
}
#endif

int rbe_bf16_sparse_available(void) { return rbe_cpu_isa_level() == RBE_ISA_AVX512 && rbe_cpu_has_avx512bf16(); }

size_t rbe_bf16_scratch(int segments, int b, int nf) {
    return ((size_t)segments * (size_t)(b + nf) + (size_t)b) * RBE_TILE;
}
