/* rbe_linear_impl.h - portable transform-domain linear kernels, included by
 * rbe_linear.c once per value type (RBE_T = float / double, RBE_SFX suffix).
 * Tiles are zero-padded to RBE_TILE tokens, so every inner loop runs over the
 * full, fixed tile width and the compiler vectorizes it. */

#define TL RBE_TILE

// dst[t] (+)= a * src[t] over one tile
static inline void RBE_SFX(axpy)(RBE_T* restrict dst, RBE_T a, const RBE_T* restrict src) {
    for (int t = 0; t < TL; t++) dst[t] += a * src[t];
}

static inline RBE_T RBE_SFX(dot)(const RBE_T* restrict a, const RBE_T* restrict b) {
    RBE_T s[8] = {0};
    for (int t = 0; t < TL; t += 8)
        for (int l = 0; l < 8; l++) s[l] += a[t + l] * b[t + l];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// out[row][:] += cf[q] * in[col][:] for (row, col) = (idx / b, idx % b), idx ascending
static void RBE_SFX(sparse_rows)(RBE_T* restrict out, const RBE_T* restrict in, const RBE_T* restrict cf,
                                 const void* index, int wide, long base, int k, int b) {
    int row = 0;
    for (int q = 0; q < k; q++) {
        long pos = base + q;
        int idx = wide ? ((const int32_t*)index)[pos] : ((const int16_t*)index)[pos];
        while (idx >= (row + 1) * b) row++;
        RBE_SFX(axpy)(out + (size_t)row * TL, cf[q], in + (size_t)(idx - row * b) * TL);
    }
}

// the transposed product: out[col][:] += cf[q] * in[row][:] for (row, col) = (idx / b, idx % b),
// idx ascending, so each output row takes its terms in ascending row order
static void RBE_SFX(sparse_cols)(RBE_T* restrict out, const RBE_T* restrict in, const RBE_T* restrict cf,
                                 const void* index, int wide, long base, int k, int b) {
    const int sh = rbe_pos_shift(b);
    for (int q = 0; q < k; q++) {
        long pos = base + q;
        int idx = wide ? ((const int32_t*)index)[pos] : ((const int16_t*)index)[pos];
        const int row = rbe_pos_row(idx, b, sh);
        RBE_SFX(axpy)(out + (size_t)(idx - row * b) * TL, cf[q], in + (size_t)row * TL);
    }
}

// out[m][t] = sum_c M[m][c] xt[c][t] for m < rows; M: [rows, b], xt: [b, TL], out: [rows, TL]
static void RBE_SFX(tile_gemm)(RBE_T* restrict out, const RBE_T* restrict M, const RBE_T* restrict xt,
                               int rows, int b) {
    for (int m = 0; m < rows; m++) {
        RBE_T acc[TL];
        for (int t = 0; t < TL; t++) acc[t] = 0;
        const RBE_T* mr = M + (size_t)m * b;
        for (int c = 0; c < b; c++) RBE_SFX(axpy)(acc, mr[c], xt + (size_t)c * TL);
        for (int t = 0; t < TL; t++) out[(size_t)m * TL + t] = acc[t];
    }
}

// out[r][t] = sum_m M[m][r] h[m][t] for r < b; M: [rows, b], h: [rows, TL], out: [b, TL]
static void RBE_SFX(tile_gemm_t)(RBE_T* restrict out, const RBE_T* restrict M, const RBE_T* restrict h,
                                 int rows, int b) {
    for (int r = 0; r < b; r++) {
        RBE_T acc[TL];
        for (int t = 0; t < TL; t++) acc[t] = 0;
        for (int m = 0; m < rows; m++) RBE_SFX(axpy)(acc, M[(size_t)m * b + r], h + (size_t)m * TL);
        for (int t = 0; t < TL; t++) out[(size_t)r * TL + t] = acc[t];
    }
}

// The pattern of a block (rbe_variants.h's rank-1 terms), over one tile:
// forward Y[g] += p_k E[f] (Y, E: the nf pattern rows of the output / input transform)
static void RBE_SFX(pattern_forward)(RBE_T* restrict Y, const RBE_T* restrict E, const RBE_T* pk, int nd) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        RBE_SFX(axpy)(Y + (size_t)term[1] * TL, pk[term[0]], E + (size_t)term[2] * TL);
    }
    for (int m = 0; m < nd; m++) RBE_SFX(axpy)(Y + (size_t)(RBE_NFIX + m) * TL, pk[1], E + (size_t)(RBE_NFIX + m) * TL);
}

// transposed: D[f] += p_k G[g]
static void RBE_SFX(pattern_backward)(RBE_T* restrict D, const RBE_T* restrict G, const RBE_T* pk, int nd) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        RBE_SFX(axpy)(D + (size_t)term[2] * TL, pk[term[0]], G + (size_t)term[1] * TL);
    }
    for (int m = 0; m < nd; m++) RBE_SFX(axpy)(D + (size_t)(RBE_NFIX + m) * TL, pk[1], G + (size_t)(RBE_NFIX + m) * TL);
}

// gradient: db[k] += G[g] . E[f]
static void RBE_SFX(pattern_grad)(RBE_T* restrict db, const RBE_T* restrict G, const RBE_T* restrict E, int nd) {
    for (int q = 0; q < RBE_NTERMS; q++) {
        const int* term = rbe_pattern_terms[q];
        db[term[0]] += RBE_SFX(dot)(G + (size_t)term[1] * TL, E + (size_t)term[2] * TL);
    }
    RBE_T d1 = 0;
    for (int m = 0; m < nd; m++) d1 += RBE_SFX(dot)(G + (size_t)(RBE_NFIX + m) * TL, E + (size_t)(RBE_NFIX + m) * TL);
    db[1] += d1;
}

// Xh: [ntiles, nseg, b+nf, TL]; x: [T, n]; M: [b+nf, b]; scratch: b*TL
// (RBE_KSFX names the portable variants: _f32_portable beside the AVX2 ones, _f64;
// they use the dense matrices of the plan, not its fast-DCT tables)
void RBE_KSFX(rbe_analysis)(RBE_T* Xh, const RBE_T* x, const RBE_T* M, const RBE_PLAN* P, RBE_T* scratch,
                           long T, int n, long p0, long p1) {
    const int b = P->b, nseg = (n + b - 1) / b, rows = b + P->nf;
    RBE_T* xt = scratch;
    for (long p = p0; p < p1; p++) {
        long tile = p / nseg;
        int j = (int)(p % nseg);
        long t0 = tile * TL;
        int nt = T - t0 < TL ? (int)(T - t0) : TL;
        int nc = n - j * b < b ? n - j * b : b;
        for (int c = 0; c < b; c++)
            for (int t = 0; t < TL; t++)
                xt[(size_t)c * TL + t] = (c < nc && t < nt) ? x[(size_t)(t0 + t) * n + (size_t)j * b + c] : 0;
        RBE_SFX(tile_gemm)(Xh + (size_t)p * rows * TL, M, xt, rows, b);
    }
}

// y, pre: [T, out]; Xh: [ntiles, C, b+nf, TL]
void RBE_KSFX(rbe_rows_forward)(RBE_T* y, RBE_T* pre, RBE_T* Xnext, const RBE_T* Xh, const RBE_WEIGHT* W,
                               const RBE_PLAN* P, const RBE_T* bias, int act, RBE_T* scratch, long T, long p0,
                               long p1) {
    const int out = W->out, b = W->b, k = W->k, nf = P->nf;
    const int R = (out + b - 1) / b, C = (W->in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const int pre_grad = pre && (act & RBE_ACT_PRE_GRAD), pre_tiles = pre_grad && (act & RBE_ACT_PRE_TILES);
    act &= ~(RBE_ACT_PRE_GRAD | RBE_ACT_PRE_TILES);
    RBE_T* yh = scratch;                     // [rows, TL]
    RBE_T* yt = scratch + (size_t)rows * TL; // [b, TL]
    for (long p = p0; p < p1; p++) {
        long tile = p / R;
        int i = (int)(p % R);
        long t0 = tile * TL;
        int nt = T - t0 < TL ? (int)(T - t0) : TL;
        int nr = out - i * b < b ? out - i * b : b;
        for (size_t e = 0; e < (size_t)rows * TL; e++) yh[e] = 0;
        for (int j = 0; j < C; j++) {
            long blk = (long)i * C + j;
            const RBE_T* X = Xh + ((size_t)tile * C + j) * rows * TL;
            RBE_SFX(sparse_rows)(yh, X, W->coeffs + (size_t)blk * k, W->index, W->wide, blk * k, k, b);
            RBE_SFX(pattern_forward)(yh + (size_t)b * TL, X + (size_t)b * TL, W->basis + (size_t)blk * RBE_NPAT, nd);
        }
        RBE_SFX(tile_gemm_t)(yt, P->S, yh, rows, b);
        for (int r = 0; r < nr; r++) {
            RBE_T bv = bias ? bias[i * b + r] : 0;
            for (int t = 0; t < TL; t++) yt[(size_t)r * TL + t] += bv;
        }
        // pre_grad: act and act' at once, act' into yh (free after the synthesis)
        if (pre_grad) RBE_SFX(rbe_act_forward_grad)(yt, yh, yt, (long)nr * TL, act);
        if (pre_tiles)
            for (int r = 0; r < b; r++)
                for (int t = 0; t < TL; t++)
                    pre[(((size_t)tile * R + i) * b + r) * TL + t] = r < nr && t < nt ? yh[(size_t)r * TL + t] : 0;
        else if (pre)
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < nr; r++)
                    pre[(size_t)(t0 + t) * out + (size_t)i * b + r] = (pre_grad ? yh : yt)[(size_t)r * TL + t];
        if (act != RBE_ACT_NONE && !pre_grad) RBE_SFX(rbe_act_forward)(yt, yt, (long)nr * TL, act);
        if (y)
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < nr; r++) y[(size_t)(t0 + t) * out + (size_t)i * b + r] = yt[(size_t)r * TL + t];
        if (Xnext) {  // the next layer's analysis of this (activated) tile; rows past nr are padding
            for (size_t e = (size_t)nr * TL; e < (size_t)b * TL; e++) yt[e] = 0;
            RBE_SFX(tile_gemm)(Xnext + ((size_t)tile * R + i) * rows * TL, P->A, yt, rows, b);
        }
    }
}

// dx: [T, in]; Gh: [ntiles, R, b+nf, TL]
void RBE_KSFX(rbe_cols_backward)(RBE_T* dx, const RBE_T* Gh, const RBE_WEIGHT* W, const RBE_PLAN* P,
                                RBE_T* scratch, long T, long p0, long p1) {
    const int in = W->in, b = W->b, k = W->k, nf = P->nf;
    const int R = (W->out + b - 1) / b, C = (in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    RBE_T* dh = scratch;                     // [rows, TL]
    RBE_T* dt = scratch + (size_t)rows * TL; // [b, TL]
    for (long p = p0; p < p1; p++) {
        long tile = p / C;
        int j = (int)(p % C);
        long t0 = tile * TL;
        int nt = T - t0 < TL ? (int)(T - t0) : TL;
        int nc = in - j * b < b ? in - j * b : b;
        for (size_t e = 0; e < (size_t)rows * TL; e++) dh[e] = 0;
        for (int i = 0; i < R; i++) {
            long blk = (long)i * C + j;
            const RBE_T* G = Gh + ((size_t)tile * R + i) * rows * TL;
            RBE_SFX(sparse_cols)(dh, G, W->coeffs + (size_t)blk * k, W->index, W->wide, blk * k, k, b);
            RBE_SFX(pattern_backward)(dh + (size_t)b * TL, G + (size_t)b * TL, W->basis + (size_t)blk * RBE_NPAT, nd);
        }
        RBE_SFX(tile_gemm_t)(dt, P->A, dh, rows, b);
        for (int t = 0; t < nt; t++) {
            RBE_T* xr = dx + (size_t)(t0 + t) * in + (size_t)j * b;
            for (int c = 0; c < nc; c++) xr[c] = dt[(size_t)c * TL + t];
        }
    }
}

// dbasis: [R*C, 8], dcoeffs: [R*C, k] (either may be NULL), blocks [p0, p1)
void RBE_KSFX(rbe_params_backward)(RBE_T* dbasis, RBE_T* dcoeffs, const RBE_T* Gh, const RBE_T* Xh,
                                  const RBE_WEIGHT* W, const RBE_PLAN* P, int accumulate, long T, long p0, long p1) {
    const int b = W->b, k = W->k, nf = P->nf, wide = W->wide;
    const void* index = W->index;
    const int R = (W->out + b - 1) / b, C = (W->in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    const long ntiles = (T + TL - 1) / TL;
    p0 *= C, p1 *= C;  // work items are block rows; blocks [p0*C, p1*C)
    for (long p = p0; p < p1 && !accumulate; p++) {
        if (dcoeffs) for (int q = 0; q < k; q++) dcoeffs[(size_t)p * k + q] = 0;
        if (dbasis) for (int q = 0; q < RBE_NPAT; q++) dbasis[(size_t)p * RBE_NPAT + q] = 0;
    }
    for (long tile = 0; tile < ntiles; tile++) {
        for (long p = p0; p < p1; p++) {
            int i = (int)(p / C), j = (int)(p % C);
            const RBE_T* G = Gh + ((size_t)tile * R + i) * rows * TL;
            const RBE_T* X = Xh + ((size_t)tile * C + j) * rows * TL;
            if (dcoeffs) {
                RBE_T* dc = dcoeffs + (size_t)p * k;
                int u = 0;
                for (int q = 0; q < k; q++) {
                    long pos = (size_t)p * k + q;
                    int idx = wide ? ((const int32_t*)index)[pos] : ((const int16_t*)index)[pos];
                    while (idx >= (u + 1) * b) u++;
                    dc[q] += RBE_SFX(dot)(G + (size_t)u * TL, X + (size_t)(idx - u * b) * TL);
                }
            }
            if (dbasis)
                RBE_SFX(pattern_grad)(dbasis + (size_t)p * RBE_NPAT, G + (size_t)b * TL, X + (size_t)b * TL, nd);
        }
    }
}

void RBE_SFX(rbe_bias_backward)(RBE_T* dbias, const RBE_T* g, long T, int out, int accumulate, long o0, long o1) {
    if (!accumulate)
        for (long o = o0; o < o1; o++) dbias[o] = 0;
    for (long t = 0; t < T; t++) {
        const RBE_T* gr = g + (size_t)t * out;
        for (long o = o0; o < o1; o++) dbias[o] += gr[o];
    }
}

// ---- few tokens (rbe.h): token-minor transforms with stride T, vectorized along features ----

void RBE_SFX(rbe_few_at)(RBE_T* At, const RBE_PLAN* P) {
    const int b = P->b, rows = b + P->nf;
    for (int m = 0; m < rows; m++)
        for (int c = 0; c < b; c++) At[(size_t)c * rows + m] = P->A[(size_t)m * b + c];
}

// out[r] = sum_p M[p*ldm + r] v[p*vs] for r < nout (p < nin, ascending): one token's matrix-vector
// product along the feature rows (the analysis over At, the synthesis over S)
static void RBE_SFX(few_matvec)(RBE_T* restrict out, const RBE_T* restrict M, int ldm, const RBE_T* restrict v,
                                long vs, int nin, int nout) {
    for (int r = 0; r < nout; r++) out[r] = 0;
    for (int p = 0; p < nin; p++) {
        const RBE_T a = v[(size_t)p * vs];
        const RBE_T* mr = M + (size_t)p * ldm;
        for (int r = 0; r < nout; r++) out[r] += a * mr[r];
    }
}

// Xf[(m*T + t)] of one segment from the token-major features xs (token t at xs + t*ld, nc of them)
static void RBE_SFX(few_analyse_seg)(RBE_T* restrict Xf, const RBE_T* restrict xs, long ld, int nc,
                                     const RBE_T* restrict At, int rows, long T, RBE_T* restrict tmp) {
    for (long t = 0; t < T; t++) {
        RBE_SFX(few_matvec)(tmp, At, rows, xs + (size_t)t * ld, 1, nc, rows);
        for (int m = 0; m < rows; m++) Xf[(size_t)m * T + t] = tmp[m];
    }
}

void RBE_KSFX(rbe_few_analysis)(RBE_T* Xf, const RBE_T* x, const RBE_T* At, int b, int nf, long T, int n,
                               long p0, long p1) {
    const int rows = b + nf, nseg = (n + b - 1) / b;
    RBE_T tmp[2 * RBE_MAX_B + RBE_NFIX];  // rows <= b + (b + RBE_NFIX) <= 516
    for (long j = p0; j < p1; j++) {
        const int nc = n - (int)j * b < b ? n - (int)j * b : b;
        RBE_SFX(few_analyse_seg)(Xf + (size_t)j * rows * T, x + (size_t)j * b, n, nc, At, rows, T, tmp);
        if (j == nseg - 1)
            for (int e = 0; e < RBE_FEW_SLACK; e++) Xf[(size_t)nseg * rows * T + e] = 0;
    }
}

void RBE_KSFX(rbe_few_rows_forward)(RBE_T* y, RBE_T* pre, RBE_T* Xnext, const RBE_T* Xf, const RBE_WEIGHT* W,
                                   const RBE_PLAN* P, const RBE_T* At, const RBE_T* bias, int act, RBE_T* scratch,
                                   long T, long p0, long p1) {
    const int out = W->out, b = W->b, k = W->k, nf = P->nf, wide = W->wide;
    const int R = (out + b - 1) / b, C = (W->in + b - 1) / b, rows = b + nf, nd = nf - RBE_NFIX;
    RBE_T* yh = scratch;                                           // [rows][T]
    RBE_T* v = scratch + (size_t)rows * RBE_FEW_MAX + RBE_FEW_SLACK; // [b]: one token's output segment
    RBE_T* tmp = v + b;                                       // [rows]
    for (long i = p0; i < p1; i++) {
        const int nr = out - (int)i * b < b ? out - (int)i * b : b;
        for (size_t e = 0; e < (size_t)rows * T; e++) yh[e] = 0;
        for (int j = 0; j < C; j++) {
            const long blk = i * C + j;
            const RBE_T* X = Xf + (size_t)j * rows * T;
            const RBE_T* cf = W->coeffs + (size_t)blk * k;
            for (int q = 0; q < k; q++) {
                const long pos = blk * k + q;
                const int idx = wide ? ((const int32_t*)W->index)[pos] : ((const int16_t*)W->index)[pos];
                const int u = idx / b, c = idx - u * b;
                for (long t = 0; t < T; t++) yh[(size_t)u * T + t] += cf[q] * X[(size_t)c * T + t];
            }
            const RBE_T* pk = W->basis + (size_t)blk * RBE_NPAT;
            for (int q = 0; q < RBE_NTERMS; q++) {
                const int* term = rbe_pattern_terms[q];
                for (long t = 0; t < T; t++)
                    yh[(size_t)(b + term[1]) * T + t] += pk[term[0]] * X[(size_t)(b + term[2]) * T + t];
            }
            for (int m = 0; m < nd; m++)
                for (long t = 0; t < T; t++)
                    yh[(size_t)(b + RBE_NFIX + m) * T + t] += pk[1] * X[(size_t)(b + RBE_NFIX + m) * T + t];
        }
        for (long t = 0; t < T; t++) {
            RBE_SFX(few_matvec)(v, P->S, b, yh + t, T, rows, b);
            for (int r = 0; r < nr; r++) v[r] += bias ? bias[i * b + r] : 0;
            if (pre)
                for (int r = 0; r < nr; r++) pre[(size_t)t * out + (size_t)i * b + r] = v[r];
            if (act != RBE_ACT_NONE) RBE_SFX(rbe_act_forward)(v, v, nr, act);
            if (y)
                for (int r = 0; r < nr; r++) y[(size_t)t * out + (size_t)i * b + r] = v[r];
            if (Xnext) {
                RBE_SFX(few_matvec)(tmp, At, rows, v, 1, nr, rows);
                for (int m = 0; m < rows; m++) Xnext[((size_t)i * rows + m) * T + t] = tmp[m];
            }
        }
        if (Xnext && i == R - 1)
            for (int e = 0; e < RBE_FEW_SLACK; e++) Xnext[(size_t)R * rows * T + e] = 0;
    }
}

#undef TL
