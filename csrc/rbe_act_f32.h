/* rbe_act_f32.h - gelu, gelu_tanh and silu with their derivatives evaluated in float32
 * (RBE_ACT_F32 of rbe.h: what a bfloat16 computation asks for), written once over a lane type
 * and included by rbe_act.c three times: 16 lanes (AVX-512), 8 lanes (AVX2 + FMA) and 1 lane
 * (plain C, with fmaf). Every lane runs the same sequence of correctly rounded operations and
 * fused multiply-adds, so the three give the same bits.
 *
 * The including file defines, before the #include:
 *   AT                     the target attribute of every function (empty for plain C)
 *   ASFX(name)             the functions' names for this width
 *   F, M                   the lane type and the comparison-mask type
 *   F1(c)                  c in every lane
 *   ADD SUB MUL DIV        correctly rounded arithmetic;  FMA(a, b, c) = a*b + c, rounded once
 *   ABS(a)                 |a|;  MIN(a, b) = a < b ? a : b;  MAX(a, b) = a > b ? a : b
 *                          (a NaN a gives b: every formula below multiplies by x last, so a NaN
 *                          input still gives NaN, as the double definitions do)
 *   LT(a, b)               the mask a < b;  SEL(m, a, b) = m ? a : b
 *   POW2(n)                2^n for integral n in [-126, 127] held in a float lane
 *   LANES, LOAD(p), STORE(p, v)   the width, an unaligned load and store of LANES floats
 * and this file undefines them all at its end.
 *
 * Accuracy (relative to the double definitions of rbe_math.h, measured by tests/c over
 * [-20, 20] and the extremes): for values of magnitude 1e-6 and more within 5e-7 (gelu, silu)
 * and 2e-6 (gelu_tanh: the rounding of its exponent 2u, about |2u| 2^-24); down to 1e-30 within
 * 1.1e-5; derivatives within 2.4e-7 absolute. Below that values underflow to zero, as float
 * does. Special values give what the double definitions give (gelu(-inf) = NaN, and so on).
 */

// exp(x) for x <= 0 (every caller's argument is): Cephes' expf polynomial after the usual
// reduction x = n ln 2 + r, |r| <= ln 2 / 2; below -87.33 (where 2^n stops being normal) 0.
AT static inline F ASFX(exp_neg)(F x) {
    const M under = LT(x, F1(-87.33f));
    x = MAX(x, F1(-87.33f));
    const F n = SUB(FMA(x, F1(1.44269504f), F1(12582912.0f)), F1(12582912.0f));  // round to nearest
    F r = FMA(n, F1(-0.693359375f), x);
    r = FMA(n, F1(2.12194440e-4f), r);
    F p = F1(1.9875691500e-4f);
    p = FMA(p, r, F1(1.3981999507e-3f));
    p = FMA(p, r, F1(8.3334519073e-3f));
    p = FMA(p, r, F1(4.1665795894e-2f));
    p = FMA(p, r, F1(1.6666665459e-1f));
    p = FMA(p, r, F1(5.0000001201e-1f));
    p = FMA(MUL(p, r), r, ADD(r, F1(1.0f)));
    return SEL(under, F1(0.0f), MUL(p, POW2(n)));
}

// gelu's Phi(x) = 0.5 erfc(-x / sqrt 2) and e = exp(-x^2 / 2). erfc(z) = t exp(P(t)) exp(-z^2),
// t = 1 / (1 + z/2), z = |x| / sqrt 2 (Numerical Recipes' erfcc: relative error below 1.2e-7 for
// every z >= 0); x^2 / 2 is split into hi + lo (exact) so that the large exponent loses nothing.
// |x| is capped at 14.2 (Phi and e are 0 or 1 in float beyond it).
AT static inline void ASFX(gelu_parts)(F x, F* phi, F* e) {
    const F a = MIN(ABS(x), F1(14.2f));
    const F sq = MUL(a, a);
    const F hi = MUL(sq, F1(0.5f)), lo = MUL(FMA(a, a, SUB(F1(0.0f), sq)), F1(0.5f));
    const F e0 = ASFX(exp_neg)(SUB(F1(0.0f), hi));
    *e = FMA(SUB(F1(0.0f), e0), lo, e0);  // exp(-hi - lo) = exp(-hi) (1 - lo), |lo| <= 2^-18
    const F t = DIV(F1(1.0f), FMA(a, F1(0.35355339f), F1(1.0f)));  // z/2 = |x| / (2 sqrt 2)
    F p = F1(0.17087277f);
    p = FMA(p, t, F1(-0.82215223f));
    p = FMA(p, t, F1(1.48851587f));
    p = FMA(p, t, F1(-1.13520398f));
    p = FMA(p, t, F1(0.27886807f));
    p = FMA(p, t, F1(-0.18628806f));
    p = FMA(p, t, F1(0.09678418f));
    p = FMA(p, t, F1(0.37409196f));
    p = FMA(p, t, F1(1.00002368f));
    p = FMA(p, t, F1(-1.26551223f));
    const F half_erfc = MUL(MUL(F1(0.5f), t), MUL(ASFX(exp_neg)(p), *e));  // p(t) <= 0 for t in (0, 1]
    *phi = SEL(LT(x, F1(0.0f)), half_erfc, SUB(F1(1.0f), half_erfc));
}

// sigmoid(w) and 1 - sigmoid(w) without cancellation: with e = exp(-|w|) and q = 1 / (1 + e),
// sigmoid = q and its complement e q for w >= 0, the other way round below.
AT static inline void ASFX(sigmoid_parts)(F w, F* s, F* sc) {
    const F e = ASFX(exp_neg)(SUB(F1(0.0f), ABS(w)));
    const F q = DIV(F1(1.0f), ADD(F1(1.0f), e));
    const F eq = MUL(e, q);
    const M neg = LT(w, F1(0.0f));
    *s = SEL(neg, eq, q);
    *sc = SEL(neg, q, eq);
}

// gelu_tanh's sigmoid argument 2u = 2 sqrt(2/pi) (x + c x^3), with x capped at 1e4 in magnitude
// (the sigmoid is 0 or 1 in float far before), so x^3 cannot overflow
AT static inline F ASFX(gelu_tanh_arg)(F xc) {
    return MUL(F1(1.59576912f), FMA(MUL(F1(0.044715f), MUL(xc, xc)), xc, xc));
}

AT static inline F ASFX(act_f32)(F x, int act) {
    if (act == RBE_ACT_GELU) {
        F phi, e;
        ASFX(gelu_parts)(x, &phi, &e);
        return MUL(x, phi);
    }
    F s, sc;
    const F w = act == RBE_ACT_SILU ? x : ASFX(gelu_tanh_arg)(MAX(MIN(x, F1(1e4f)), F1(-1e4f)));
    ASFX(sigmoid_parts)(w, &s, &sc);
    return MUL(x, s);
}

// act(x) and act'(x): gelu Phi + x phi(x); gelu_tanh s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 c x^2);
// silu s (1 + x (1 - s))
AT static inline void ASFX(act_grad_f32)(F x, int act, F* y, F* g) {
    if (act == RBE_ACT_GELU) {
        F phi, e;
        ASFX(gelu_parts)(x, &phi, &e);
        *y = MUL(x, phi);
        *g = FMA(MUL(x, F1(0.39894228f)), e, phi);
        return;
    }
    F s, sc;
    if (act == RBE_ACT_SILU) {
        ASFX(sigmoid_parts)(x, &s, &sc);
        *y = MUL(x, s);
        *g = MUL(s, FMA(x, sc, F1(1.0f)));
        return;
    }
    const F xc = MAX(MIN(x, F1(1e4f)), F1(-1e4f));
    ASFX(sigmoid_parts)(ASFX(gelu_tanh_arg)(xc), &s, &sc);
    *y = MUL(x, s);
    const F poly = MUL(F1(1.59576912f), FMA(MUL(F1(3.0f * 0.044715f), xc), xc, F1(1.0f)));  // 2 sqrt(2/pi) (..)
    *g = FMA(MUL(MUL(x, s), sc), poly, s);  // x s first: 2 x could overflow where s (1 - s) = 0
}

// y = act(x) (y may be x), and g = act'(x) when g is not NULL, times dy when dy is not NULL (the
// backward); whole vectors only: returns how many values were done
AT static long ASFX(arrays)(float* y, float* g, const float* dy, const float* x, long n, int act) {
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
        const F v = LOAD(x + i);
        if (!g) {
            STORE(y + i, ASFX(act_f32)(v, act));
            continue;
        }
        F yv, gv;
        ASFX(act_grad_f32)(v, act, &yv, &gv);
        if (y) STORE(y + i, yv);
        STORE(g + i, dy ? MUL(LOAD(dy + i), gv) : gv);
    }
    return i;
}

#undef LANES
#undef LOAD
#undef STORE
#undef AT
#undef ASFX
#undef F
#undef M
#undef F1
#undef ADD
#undef SUB
#undef MUL
#undef DIV
#undef FMA
#undef ABS
#undef MIN
#undef MAX
#undef LT
#undef SEL
#undef POW2
