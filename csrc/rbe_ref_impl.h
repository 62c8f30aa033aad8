/* rbe_ref_impl.h - body of rbe_ref.c, included once per value type. */

// w: [out, in] in double, straight from the formula (one cosine product per coefficient and entry)
static void RBE_SFX(decode_naive)(double* w, const RBE_T* basis, const RBE_T* coeffs, const void* index, int wide,
                                  const double* tabs, int out, int in, int b, int k) {
    const long R = (out + b - 1) / b, C = (in + b - 1) / b, bb = (long)b * b;
    const double* psi = tabs;
    const double* phi = tabs + bb;
    for (long p = 0; p < R * C; p++) {
        int i = (int)(p / C), j = (int)(p % C);
        int nr = out - i * b < b ? out - i * b : b, nc = in - j * b < b ? in - j * b : b;
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++) {
                double s = 0.0;
                for (int q = 0; q < RBE_NPAT; q++) s += (double)basis[p * RBE_NPAT + q] * phi[q * bb + r * b + c];
                for (int q = 0; q < k; q++) {
                    long o = wide ? (long)((const int32_t*)index)[p * k + q] : (long)((const int16_t*)index)[p * k + q];
                    s += (double)coeffs[p * k + q] * psi[(o / b) * b + r] * psi[(o % b) * b + c];
                }
                w[(size_t)(i * b + r) * in + j * b + c] = s;
            }
    }
}

// y, pre: [T, out]; x: [T, in]; work: out*in
void RBE_SFX(rbe_linear_forward_ref)(RBE_T* y, RBE_T* pre, const RBE_T* x, const RBE_WEIGHT* W, const RBE_T* bias,
                                     int act, const double* tabs, double* work, long T) {
    const RBE_T *basis = W->basis, *coeffs = W->coeffs;
    const void* index = W->index;
    const int wide = W->wide, out = W->out, in = W->in, b = W->b, k = W->k;
    double* w = work;
    RBE_SFX(decode_naive)(w, basis, coeffs, index, wide, tabs, out, in, b, k);
    for (long t = 0; t < T; t++)
        for (int o = 0; o < out; o++) {
            double s = bias ? (double)bias[o] : 0.0;
            for (int c = 0; c < in; c++) s += (double)x[(size_t)t * in + c] * w[(size_t)o * in + c];
            if (pre) pre[(size_t)t * out + o] = (RBE_T)s;
            y[(size_t)t * out + o] = (RBE_T)rbe_act_value(s, act & ~RBE_ACT_F32);  // the exact definition
        }
}

// dx: [T, in]; dbasis: [R*C, 8]; dcoeffs: [R*C, k]; dbias: [out]; g: [T, out]; work: 2*out*in
// (any output may be NULL)
void RBE_SFX(rbe_linear_backward_ref)(RBE_T* dx, RBE_T* dbasis, RBE_T* dcoeffs, RBE_T* dbias, const RBE_T* g,
                                      const RBE_T* x, const RBE_WEIGHT* W, const double* tabs, double* work, long T) {
    const RBE_T *basis = W->basis, *coeffs = W->coeffs;
    const void* index = W->index;
    const int wide = W->wide, out = W->out, in = W->in, b = W->b, k = W->k;
    const long R = (out + b - 1) / b, C = (in + b - 1) / b, bb = (long)b * b;
    const double* psi = tabs;
    const double* phi = tabs + bb;
    double* w = work;
    double* dw = work + (size_t)out * in;
    RBE_SFX(decode_naive)(w, basis, coeffs, index, wide, tabs, out, in, b, k);
    if (dx)
        for (long t = 0; t < T; t++)
            for (int c = 0; c < in; c++) {
                double s = 0.0;
                for (int o = 0; o < out; o++) s += (double)g[(size_t)t * out + o] * w[(size_t)o * in + c];
                dx[(size_t)t * in + c] = (RBE_T)s;
            }
    if (dbias)
        for (int o = 0; o < out; o++) {
            double s = 0.0;
            for (long t = 0; t < T; t++) s += (double)g[(size_t)t * out + o];
            dbias[o] = (RBE_T)s;
        }
    for (int o = 0; o < out; o++)
        for (int c = 0; c < in; c++) {
            double s = 0.0;
            for (long t = 0; t < T; t++) s += (double)g[(size_t)t * out + o] * (double)x[(size_t)t * in + c];
            dw[(size_t)o * in + c] = s;
        }
    // chain rule through W_block[r][c] = sum_k p_k Phi_k[r][c] + sum_q c_q psi_u[r] psi_v[c] (real entries only)
    for (long p = 0; p < R * C; p++) {
        int i = (int)(p / C), j = (int)(p % C);
        int nr = out - i * b < b ? out - i * b : b, nc = in - j * b < b ? in - j * b : b;
        for (int q = 0; q < RBE_NPAT && dbasis; q++) {
            double s = 0.0;
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < nc; c++) s += dw[(size_t)(i * b + r) * in + j * b + c] * phi[q * bb + r * b + c];
            dbasis[p * RBE_NPAT + q] = (RBE_T)s;
        }
        for (int q = 0; q < k && dcoeffs; q++) {
            long o = wide ? (long)((const int32_t*)index)[p * k + q] : (long)((const int16_t*)index)[p * k + q];
            long u = o / b, v = o % b;
            double s = 0.0;
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < nc; c++)
                    s += dw[(size_t)(i * b + r) * in + j * b + c] * psi[u * b + r] * psi[v * b + c];
            dcoeffs[p * k + q] = (RBE_T)s;
        }
    }
}
