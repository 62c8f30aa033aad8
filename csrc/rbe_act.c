/* rbe_act.c - the activations of DESIGN.md section 4 over arrays. The definitions are
 * rbe_act_value / rbe_act_grad of rbe_math.h (shared with the CUDA kernels).
 *
 * Float values are computed in double and rounded once, so they are within half an ulp of
 * the exact value. gelu with AVX-512 gives the scalar definition's bits (rbe_gelu_avx512 below);
 * the other vectorized float paths compute the same formulas in double with libmvec and round
 * once: they agree with the scalar definition to 1 ulp (almost always bitwise; the
 * double-precision erfc/exp differ in their last bits).
 */
#include "rbe_variants.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---- float32 evaluation (RBE_ACT_F32): rbe_act_f32.h at 1, 8 and 16 lanes ---- */
#define AT
#define ASFX(name) name##_1
#define F float
#define M int
#define F1(c) (c)
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define MUL(a, b) ((a) * (b))
#define DIV(a, b) ((a) / (b))
#define FMA(a, b, c) fmaf(a, b, c)
#define ABS(a) fabsf(a)
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define LT(a, b) ((a) < (b))
#define SEL(m, a, b) ((m) ? (a) : (b))
#define LANES 1
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
static inline float pow2_1(float n) {
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
#define POW2(n) pow2_1(n)
#include "rbe_act_f32.h"

// the activations rbe_act_f32.h evaluates (relu and none are exact in float anyway)
static int f32_act(int act) { return act == RBE_ACT_GELU || act == RBE_ACT_GELU_TANH || act == RBE_ACT_SILU; }

double rbe_act_scalar_f64(double x, int act) { return rbe_act_value(x, act & ~RBE_ACT_F32); }
double rbe_act_grad_scalar_f64(double x, int act) { return rbe_act_grad(x, act & ~RBE_ACT_F32); }
float rbe_act_scalar_f32(float x, int act) {
    if ((act & RBE_ACT_F32) && f32_act(act & ~RBE_ACT_F32)) return act_f32_1(x, act & ~RBE_ACT_F32);
    return (float)rbe_act_value((double)x, act & ~RBE_ACT_F32);
}
float rbe_act_grad_scalar_f32(float x, int act) {
    if ((act & RBE_ACT_F32) && f32_act(act & ~RBE_ACT_F32)) {
        float y, g;
        act_grad_f32_1(x, act & ~RBE_ACT_F32, &y, &g);
        return g;
    }
    return (float)rbe_act_grad((double)x, act & ~RBE_ACT_F32);
}

void rbe_act_forward_f64(double* y, const double* x, long n, int act) {
    act &= ~RBE_ACT_F32;
    for (long i = 0; i < n; i++) y[i] = rbe_act_value(x[i], act);
}

void rbe_act_backward_f64(double* dx, const double* dy, const double* x, long n, int act) {
    act &= ~RBE_ACT_F32;
    if (act == RBE_ACT_RELU) {  // dy * 0 would turn an infinite dy into NaN; torch passes 0
        for (long i = 0; i < n; i++) dx[i] = x[i] <= 0.0 ? 0.0 : dy[i];
        return;
    }
    for (long i = 0; i < n; i++) dx[i] = dy[i] * rbe_act_grad(x[i], act);
}

/* float32 arrays: four values at a time through glibc's vector math library
 * (libmvec's AVX2 erfc/exp in double), rounded to float once, as the scalar
 * definition does; used when libmvec was linked (weak symbols) and the float32 kernels
 * are x86 ones (rbe_cpu_isa_level: AVX2 or AVX-512). Elsewhere, and for the tail, the scalar
 * definition itself. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RBE_VEC_ACT 1
#define AVX2 __attribute__((target("avx2,fma")))
extern __m256d _ZGVdN4v_erfc(__m256d) __attribute__((weak));
extern __m256d _ZGVdN4v_exp(__m256d) __attribute__((weak));

static int vec_act_ok(int act) {
    if (rbe_cpu_isa_level() < RBE_ISA_AVX2) return 0;  // no AVX2, or RBE_FFN_ISA=portable
    switch (act) {
    case RBE_ACT_GELU: return _ZGVdN4v_erfc != 0 && _ZGVdN4v_exp != 0;
    case RBE_ACT_GELU_TANH: return _ZGVdN4v_exp != 0;
    case RBE_ACT_SILU: return _ZGVdN4v_exp != 0;
    case RBE_ACT_RELU: return 1;
    default: return 0;
    }
}

// The transcendental an activation's value and derivative share: gelu erfc(-x / sqrt 2); gelu_tanh
// and silu the sigmoid's denominator 1 + exp(.). value4 / grad4 finish each from it, so act4,
// act_grad4 and act_and_grad4 run the same double operations (the same bits); not relu.
AVX2 static __m256d shared4(__m256d x, int act) {
    const __m256d one = _mm256_set1_pd(1.0);
    switch (act) {
    case RBE_ACT_GELU: return _ZGVdN4v_erfc(_mm256_mul_pd(x, _mm256_set1_pd(-RBE_SQRT1_2)));
    case RBE_ACT_GELU_TANH: {
        __m256d u2 = _mm256_mul_pd(_mm256_set1_pd(-2.0 * RBE_SQRT_2_OVER_PI),
                                   _mm256_add_pd(x, _mm256_mul_pd(_mm256_set1_pd(RBE_GELU_TANH_C),
                                                                  _mm256_mul_pd(_mm256_mul_pd(x, x), x))));
        return _mm256_add_pd(one, _ZGVdN4v_exp(u2));
    }
    default: return _mm256_add_pd(one, _ZGVdN4v_exp(_mm256_sub_pd(_mm256_setzero_pd(), x)));  // silu
    }
}

AVX2 static __m256d value4(__m256d x, __m256d sh, int act) {
    if (act == RBE_ACT_GELU) return _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), x), sh);
    return _mm256_div_pd(x, sh);  // gelu_tanh, silu: x * sigmoid
}

AVX2 static __m256d grad4(__m256d x, __m256d sh, int act) {
    const __m256d one = _mm256_set1_pd(1.0);
    switch (act) {
    case RBE_ACT_GELU: {
        __m256d cdf = _mm256_mul_pd(_mm256_set1_pd(0.5), sh);
        __m256d pdf = _ZGVdN4v_exp(_mm256_mul_pd(_mm256_set1_pd(-0.5), _mm256_mul_pd(x, x)));
        return _mm256_add_pd(cdf, _mm256_mul_pd(_mm256_mul_pd(x, _mm256_set1_pd(RBE_INV_SQRT_2PI)), pdf));
    }
    case RBE_ACT_GELU_TANH: {
        __m256d x2 = _mm256_mul_pd(x, x);
        __m256d s = _mm256_div_pd(one, sh);
        __m256d d = _mm256_mul_pd(_mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(2.0), x), _mm256_mul_pd(s, _mm256_sub_pd(one, s))),
                                  _mm256_mul_pd(_mm256_set1_pd(RBE_SQRT_2_OVER_PI),
                                                _mm256_add_pd(one, _mm256_mul_pd(_mm256_set1_pd(3.0 * RBE_GELU_TANH_C), x2))));
        return _mm256_add_pd(s, d);
    }
    default: {  // silu
        __m256d s = _mm256_div_pd(one, sh);
        return _mm256_mul_pd(s, _mm256_add_pd(one, _mm256_mul_pd(x, _mm256_sub_pd(one, s))));
    }
    }
}

AVX2 static __m256d act4(__m256d x, int act) {
    if (act != RBE_ACT_RELU) return value4(x, shared4(x, act), act);
    // relu: x if x > 0 or x is NaN, else +0
    __m256d keep = _mm256_or_pd(_mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_GT_OQ), _mm256_cmp_pd(x, x, _CMP_UNORD_Q));
    return _mm256_and_pd(keep, x);
}

AVX2 static __m256d act_grad4(__m256d x, int act) { return grad4(x, shared4(x, act), act); }  // not relu

// y = act(x), g = act'(x) with one shared4: gelu, gelu_tanh and silu only
AVX2 static void act_and_grad4(__m256d x, int act, __m256d* y, __m256d* g) {
    const __m256d sh = shared4(x, act);
    *y = value4(x, sh, act);
    *g = grad4(x, sh, act);
}

AVX2 static long act_forward_grad_avx2(float* y, float* g, const float* x, long n, int act) {
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d yv, gv;
        act_and_grad4(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), act, &yv, &gv);
        _mm_storeu_ps(y + i, _mm256_cvtpd_ps(yv));
        _mm_storeu_ps(g + i, _mm256_cvtpd_ps(gv));
    }
    return i;
}

AVX2 static long act_forward_avx2(float* y, const float* x, long n, int act) {
    long i = 0;
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, _mm256_cvtpd_ps(act4(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), act)));
    return i;
}

AVX2 static long act_backward_avx2(float* dx, const float* dy, const float* x, long n, int act) {
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        __m128 g = _mm256_cvtpd_ps(act_grad4(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), act));  // rounded like the scalar
        _mm_storeu_ps(dx + i, _mm_mul_ps(_mm_loadu_ps(dy + i), g));
    }
    return i;
}

// rbe_act_f32.h at 8 lanes (AVX2 + FMA) and 16 lanes (AVX-512)
#define AT AVX2
#define ASFX(name) name##_8
#define F __m256
#define M __m256
#define F1(c) _mm256_set1_ps(c)
#define ADD(a, b) _mm256_add_ps(a, b)
#define SUB(a, b) _mm256_sub_ps(a, b)
#define MUL(a, b) _mm256_mul_ps(a, b)
#define DIV(a, b) _mm256_div_ps(a, b)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ABS(a) _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))
#define MIN(a, b) _mm256_min_ps(a, b) /* a < b ? a : b */
#define MAX(a, b) _mm256_max_ps(a, b) /* a > b ? a : b */
#define LT(a, b) _mm256_cmp_ps(a, b, _CMP_LT_OQ)
#define SEL(m, a, b) _mm256_blendv_ps(b, a, m)
#define LANES 8
#define LOAD(p) _mm256_loadu_ps(p)
#define STORE(p, v) _mm256_storeu_ps(p, v)
#define POW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#include "rbe_act_f32.h"

#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define AT AVX512
#define ASFX(name) name##_16
#define F __m512
#define M __mmask16
#define F1(c) _mm512_set1_ps(c)
#define ADD(a, b) _mm512_add_ps(a, b)
#define SUB(a, b) _mm512_sub_ps(a, b)
#define MUL(a, b) _mm512_mul_ps(a, b)
#define DIV(a, b) _mm512_div_ps(a, b)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ABS(a) _mm512_abs_ps(a)
#define MIN(a, b) _mm512_min_ps(a, b) /* a < b ? a : b */
#define MAX(a, b) _mm512_max_ps(a, b) /* a > b ? a : b */
#define LT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define SEL(m, a, b) _mm512_mask_blend_ps(m, b, a)
#define LANES 16
#define LOAD(p) _mm512_loadu_ps(p)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define POW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#include "rbe_act_f32.h"

/* ---- gelu with AVX-512, eight doubles at a time: the scalar definition, bitwise ----
 * Phi(x) = phi(x) R(|x|) for x < 0 and 1 - phi(x) R(|x|) for x >= 0, where phi(x) = exp(-x^2/2) /
 * sqrt(2 pi) and R is the normal distribution's Mills ratio: a polynomial of degree 11 on each
 * sixteenth of [0, 12] (rbe_gelu_mills, written by gen_gelu_table.py: relative error below
 * 4e-14). x^2/2 is exact in double for a float x. The value alone, where all eight x lie in
 * [-3, 5), takes Phi from a polynomial of its own (rbe_gelu_cdf: no exp). Value x Phi, derivative
 * Phi + x phi: each within GELU_SLACK of the double the scalar definition computes, relative to the
 * magnitude of its terms. Where the whole interval [v - slack, v + slack] rounds to one float, that
 * float is the definition's. The other lanes (|x| > 12, NaN, a value near a rounding boundary:
 * about 1 in 10^4, mostly subnormal x) take the scalar definition itself. */
#include "rbe_gelu_table.h"
#define GELU_SLACK 1e-12

// exp(-h) for 0 <= h <= 72: n = round(8 h / ln 2), r = -h + n ln2 / 8 (|r| <= ln2 / 16, Cody-Waite
// with fdlibm's split of ln 2), exp(-h) = 2^(n/8) e^r, e^r by Taylor to r^7 (error 3e-16)
AVX512 static inline __m512d gelu_exp_neg8(__m512d h) {
    const __m512d magic = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52: rounds to an integer
    const __m512d nb = _mm512_fmadd_pd(h, _mm512_set1_pd(-8.0 / 0.69314718055994530942), magic);
    const __m512d n = _mm512_sub_pd(nb, magic);  // -round(8 h / ln 2)
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01 / 8), _mm512_sub_pd(_mm512_setzero_pd(), h));
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10 / 8), r);
    __m512d p = _mm512_set1_pd(1.0 / 5040);
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 720));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 120));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 24));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 6));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0.5));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    // n = 8 m + j, 0 <= j < 8: 2^(j/8) from the table (the index's low 3 bits), 2^m into the exponent
    const __m512i ni = _mm512_sub_epi64(_mm512_castpd_si512(nb), _mm512_castpd_si512(magic));
    p = _mm512_mul_pd(p, _mm512_permutexvar_pd(ni, _mm512_loadu_pd(rbe_gelu_pow2_8th)));
    return _mm512_castsi512_pd(_mm512_add_epi64(_mm512_castpd_si512(p), _mm512_slli_epi64(_mm512_srai_epi64(ni, 3), 52)));
}

// the piecewise polynomial tab (16 intervals of width w from lo, rbe_gelu_table.h) at t, for
// lo <= t < lo + 16 w (other lanes, NaN too: a polynomial of an interval at an end, finite)
AVX512 static inline __m512d gelu_poly8(const double (*tab)[16], __m512d t, double lo, double w) {
    __m512d i = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_sub_pd(t, _mm512_set1_pd(lo)), _mm512_set1_pd(1.0 / w)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    i = _mm512_min_pd(_mm512_max_pd(i, _mm512_setzero_pd()), _mm512_set1_pd(15.0));
    const __m512d u = _mm512_sub_pd(t, _mm512_fmadd_pd(_mm512_add_pd(i, _mm512_set1_pd(0.5)), _mm512_set1_pd(w), _mm512_set1_pd(lo)));
    const __m512i idx = _mm512_castpd_si512(_mm512_add_pd(i, _mm512_set1_pd(4503599627370496.0)));  // 2^52: i in the low bits
#define GELU_COEF(j) _mm512_permutex2var_pd(_mm512_loadu_pd(tab[j]), idx, _mm512_loadu_pd(tab[j] + 8))
    __m512d p = GELU_COEF(RBE_GELU_DEGREE);
    for (int j = RBE_GELU_DEGREE - 1; j >= 0; j--) p = _mm512_fmadd_pd(p, u, GELU_COEF(j));
#undef GELU_COEF
    return p;
}

// Phi(x) and phi(x) for |x| <= 12 (other lanes: finite garbage, which the caller replaces)
AVX512 static inline void gelu_parts8(__m512d x, __m512d* cdf, __m512d* pdf) {
    const __m512d t = _mm512_min_pd(_mm512_abs_pd(x), _mm512_set1_pd(RBE_GELU_MILLS_TOP));
    *pdf = _mm512_mul_pd(gelu_exp_neg8(_mm512_mul_pd(_mm512_mul_pd(t, t), _mm512_set1_pd(0.5))),
                         _mm512_set1_pd(RBE_INV_SQRT_2PI));
    const __m512d tail = _mm512_mul_pd(*pdf, gelu_poly8(rbe_gelu_mills, t, 0.0, RBE_GELU_MILLS_TOP / 16));  // 1 - Phi(|x|)
    const __mmask8 neg = _mm512_cmp_pd_mask(x, _mm512_setzero_pd(), _CMP_LT_OQ);
    *cdf = _mm512_mask_blend_pd(neg, _mm512_sub_pd(_mm512_set1_pd(1.0), tail), tail);
}

// the lanes whose [v - d, v + d] rounds to one float, as a bit mask
AVX512 static inline int gelu_settled8(__m512d v, __m512d d) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_sub_pd(v, d)), hi = _mm512_cvtpd_ps(_mm512_add_pd(v, d));
    return _mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_EQ_OQ));
}

// rbe_variants.h
AVX512 long rbe_gelu_avx512(float* y, float* g, const float* dy, const float* x, long n, long* slow) {
    const __m512d slack = _mm512_set1_pd(GELU_SLACK);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xf = _mm256_loadu_ps(x + i);
        const __m512d xd = _mm512_cvtps_pd(xf);
        __m512d cdf, pdf;
        const int central = !g && (_mm512_cmp_pd_mask(xd, _mm512_set1_pd(RBE_GELU_CDF_LO), _CMP_GE_OQ) &
                                   _mm512_cmp_pd_mask(xd, _mm512_set1_pd(RBE_GELU_CDF_HI), _CMP_LT_OQ)) == 0xff;
        if (central) cdf = gelu_poly8(rbe_gelu_cdf, xd, RBE_GELU_CDF_LO, (RBE_GELU_CDF_HI - RBE_GELU_CDF_LO) / 16);
        else gelu_parts8(xd, &cdf, &pdf);
        int ok = _mm512_cmp_pd_mask(_mm512_abs_pd(xd), _mm512_set1_pd(RBE_GELU_MILLS_TOP), _CMP_LE_OQ);
        __m256 yf = _mm256_setzero_ps(), gf = _mm256_setzero_ps();
        if (y) {
            const __m512d v = _mm512_mul_pd(xd, cdf);
            ok &= gelu_settled8(v, _mm512_mul_pd(_mm512_abs_pd(v), slack));
            yf = _mm512_cvtpd_ps(v);
        }
        if (g) {
            const __m512d xp = _mm512_mul_pd(xd, pdf);
            const __m512d v = _mm512_add_pd(cdf, xp);
            ok &= gelu_settled8(v, _mm512_mul_pd(_mm512_add_pd(cdf, _mm512_abs_pd(xp)), slack));
            gf = _mm512_cvtpd_ps(v);
        }
        if (ok != 0xff) {  // the scalar definition in the other lanes
            float xs[8], ys[8], gs[8];
            _mm256_storeu_ps(xs, xf);
            _mm256_storeu_ps(ys, yf);
            _mm256_storeu_ps(gs, gf);
            if (slow) *slow += 8 - __builtin_popcount((unsigned)ok);
            for (int l = 0; l < 8; l++)
                if (!(ok >> l & 1)) {
                    if (y) ys[l] = rbe_act_scalar_f32(xs[l], RBE_ACT_GELU);
                    if (g) gs[l] = rbe_act_grad_scalar_f32(xs[l], RBE_ACT_GELU);
                }
            yf = _mm256_loadu_ps(ys);
            gf = _mm256_loadu_ps(gs);
        }
        if (y) _mm256_storeu_ps(y + i, yf);
        if (g) _mm256_storeu_ps(g + i, dy ? _mm256_mul_ps(_mm256_loadu_ps(dy + i), gf) : gf);
    }
    return i;
}

static int gelu8_ok(int act) { return act == RBE_ACT_GELU && rbe_cpu_isa_level() >= RBE_ISA_AVX512; }

#endif
#ifndef RBE_VEC_ACT
long rbe_gelu_avx512(float* y, float* g, const float* dy, const float* x, long n, long* slow) {
    (void)y, (void)g, (void)dy, (void)x, (void)n, (void)slow;
    return 0;
}
#endif

/* RBE_ACT_F32 (rbe_variants.h): vectors of `lanes` (16: AVX-512, 8: AVX2, 1), then one lane at a
 * time for the tail */
void rbe_act_f32_lanes(float* y, float* g, const float* dy, const float* x, long n, int act, int lanes) {
    long i = 0;
#ifdef RBE_VEC_ACT
    if (lanes == 16) i = arrays_16(y, g, dy, x, n, act);
    else if (lanes == 8) i = arrays_8(y, g, dy, x, n, act);
#endif
    arrays_1(y ? y + i : NULL, g ? g + i : NULL, dy ? dy + i : NULL, x + i, n - i, act);
}

/* RBE_ACT_F32: y = act(x) (y may be x); g (if not NULL) = act'(x), times dy if dy is not NULL.
 * The widest vectors the chosen kernels allow: the same bits at every width. */
static void f32_arrays(float* y, float* g, const float* dy, const float* x, long n, int act) {
    const int isa = rbe_cpu_isa_level();
    rbe_act_f32_lanes(y, g, dy, x, n, act, isa >= RBE_ISA_AVX512 ? 16 : isa >= RBE_ISA_AVX2 ? 8 : 1);
}

void rbe_act_forward_f32(float* y, const float* x, long n, int act) {
    if (act & RBE_ACT_F32) {
        act &= ~RBE_ACT_F32;
        if (f32_act(act)) {
            f32_arrays(y, NULL, NULL, x, n, act);
            return;
        }
    }
    long i = 0;
#ifdef RBE_VEC_ACT
    if (gelu8_ok(act)) i = rbe_gelu_avx512(y, NULL, NULL, x, n, NULL);
    else if (act != RBE_ACT_NONE && vec_act_ok(act)) i = act_forward_avx2(y, x, n, act);
#endif
    for (; i < n; i++) y[i] = rbe_act_scalar_f32(x[i], act);
}

void rbe_act_backward_f32(float* dx, const float* dy, const float* x, long n, int act) {
    if (act & RBE_ACT_F32) {
        act &= ~RBE_ACT_F32;
        if (f32_act(act)) {
            f32_arrays(NULL, dx, dy, x, n, act);
            return;
        }
    }
    if (act == RBE_ACT_RELU) {
        for (long i = 0; i < n; i++) dx[i] = x[i] <= 0.0f ? 0.0f : dy[i];
        return;
    }
    long i = 0;
#ifdef RBE_VEC_ACT
    if (gelu8_ok(act)) i = rbe_gelu_avx512(NULL, dx, dy, x, n, NULL);
    else if (act != RBE_ACT_NONE && vec_act_ok(act)) i = act_backward_avx2(dx, dy, x, n, act);
#endif
    for (; i < n; i++) dx[i] = dy[i] * rbe_act_grad_scalar_f32(x[i], act);
}

/* y = act(x) and g = act'(x) in one pass (rbe.h): what rbe_act_forward and rbe_act_backward with
 * dy = 1 give, bitwise, for about the cost of the backward alone (gelu: one erfc per value instead
 * of two). relu and none: the two separate passes (nothing to share). */
void rbe_act_forward_grad_f32(float* y, float* g, const float* x, long n, int act) {
    if (act & RBE_ACT_F32) {
        act &= ~RBE_ACT_F32;
        if (f32_act(act)) {
            f32_arrays(y, g, NULL, x, n, act);
            return;
        }
    }
    long i = 0;
#ifdef RBE_VEC_ACT
    if (gelu8_ok(act)) i = rbe_gelu_avx512(y, g, NULL, x, n, NULL);
    else if ((act == RBE_ACT_GELU || act == RBE_ACT_GELU_TANH || act == RBE_ACT_SILU) && vec_act_ok(act))
        i = act_forward_grad_avx2(y, g, x, n, act);
#endif
    for (; i < n; i++) {
        const float v = x[i];  // y may alias x
        y[i] = rbe_act_scalar_f32(v, act);
        g[i] = rbe_act_grad_scalar_f32(v, act);
    }
}

void rbe_act_forward_grad_f64(double* y, double* g, const double* x, long n, int act) {
    act &= ~RBE_ACT_F32;
    for (long i = 0; i < n; i++) {
        const double v = x[i];
        y[i] = rbe_act_value(v, act);
        g[i] = rbe_act_grad(v, act);
    }
}
