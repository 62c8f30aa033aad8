/* rbe_codec_impl.h - codec body, included by rbe_codec.c once per value type
 * (RBE_T = float / double, RBE_SFX adds the _f32 / _f64 suffix). */

// Encode blocks [p0, p1): basis [R*C, 8], coeffs/index [R*C, k], err [R*C]; w: [out, in]
void RBE_SFX(rbe_encode)(RBE_T* basis, RBE_T* coeffs, void* index, int wide, double* err,
                         const RBE_T* w, const double* tabs, double* work,
                         int out, int in, int b, int k, long p0, long p1) {
    const int bb = b * b, C = (in + b - 1) / b;
    const double* psi = tabs;
    const double* phi = tabs + bb;
    const double* pinv = phi + 8 * bb;
    double* blk = work;            // padded block, then the pattern residual E
    double* tmp = blk + bb;        // Psi E
    double* hat = tmp + bb;        // Ehat = Psi E Psi^T
    double* psit = hat + bb;       // Psi^T
    double* mag = psit + bb;       // |Ehat|
    double* rec = mag + bb;        // dropped residual in the spatial domain (edge blocks)
    int* ord = (int*)(rec + bb);   // selection order (bb ints in 2*bb doubles of room)
    unsigned char* kept = (unsigned char*)(ord + bb);
    transpose(psit, psi, b);
    for (long p = p0; p < p1; p++) {
        int i = (int)(p / C), j = (int)(p % C);
        int nr = out - i * b < b ? out - i * b : b;
        int nc = in - j * b < b ? in - j * b : b;
        for (int r = 0; r < b; r++) {
            const RBE_T* wr = w + (size_t)(i * b + reflect(r, nr)) * in + (size_t)j * b;
            for (int c = 0; c < b; c++) blk[r * b + c] = (double)wr[reflect(c, nc)];
        }
        for (int q = 0; q < 8; q++) {
            double s = 0.0;
            for (int o = 0; o < bb; o++) s += pinv[(size_t)q * bb + o] * blk[o];
            basis[p * 8 + q] = (RBE_T)s;
        }
        // the residual is taken against the stored (rounded) pattern numbers
        for (int q = 0; q < 8; q++) {
            double s = (double)basis[p * 8 + q];
            for (int o = 0; o < bb; o++) blk[o] -= s * phi[(size_t)q * bb + o];
        }
        mat_mul(tmp, psi, blk, b);
        mat_mul_t(hat, tmp, psit, b);
        for (int o = 0; o < bb; o++) {
            mag[o] = fabs(hat[o]);
            ord[o] = o;
            kept[o] = 0;
        }
        if (k > 0 && k < bb) select_top(ord, mag, bb, k);
        for (int q = 0; q < k; q++) kept[ord[q]] = 1;
        int q = 0;
        for (int o = 0; o < bb; o++) {
            if (!kept[o]) continue;
            coeffs[p * k + q] = (RBE_T)hat[o];
            if (wide) ((int32_t*)index)[p * k + q] = o;
            else ((int16_t*)index)[p * k + q] = (int16_t)o;
            q++;
        }
        // squared error over real entries, against the stored (rounded) values
        q = 0;
        for (int o = 0; o < bb; o++) {
            if (kept[o]) { hat[o] -= (double)coeffs[p * k + q]; q++; }
        }
        double e2 = 0.0;
        if (nr == b && nc == b) {
            for (int o = 0; o < bb; o++) e2 += hat[o] * hat[o];
        } else {
            mat_mul(tmp, psit, hat, b);   // Psi^T Dhat
            mat_mul(rec, tmp, psi, b);    // Psi^T Dhat Psi
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < nc; c++) e2 += rec[r * b + c] * rec[r * b + c];
        }
        err[p] = e2;
    }
}

// Decode blocks [p0, p1) into w: [out, in]; work: 3*b*b doubles
void RBE_SFX(rbe_decode)(RBE_T* w, const RBE_WEIGHT* W, const double* tabs, double* work, long p0, long p1) {
    const RBE_T *basis = W->basis, *coeffs = W->coeffs;
    const void* index = W->index;
    const int wide = W->wide, out = W->out, in = W->in, b = W->b, k = W->k;
    const int bb = b * b, C = (in + b - 1) / b;
    const double* psi = tabs;
    const double* phi = tabs + bb;
    double* chat = work;
    double* tmp = chat + bb;
    double* rec = tmp + bb;
    for (long p = p0; p < p1; p++) {
        int i = (int)(p / C), j = (int)(p % C);
        int nr = out - i * b < b ? out - i * b : b;
        int nc = in - j * b < b ? in - j * b : b;
        memset(chat, 0, sizeof(double) * bb);
        for (int q = 0; q < k; q++) {
            long o = wide ? (long)((const int32_t*)index)[p * k + q] : (long)((const int16_t*)index)[p * k + q];
            chat[o] += (double)coeffs[p * k + q];
        }
        // rec = Psi^T Chat Psi: tmp[n][v] = sum_u psi[u][n] chat[u][v]
        memset(tmp, 0, sizeof(double) * bb);
        for (int u = 0; u < b; u++)
            for (int n = 0; n < b; n++) {
                double s = psi[u * b + n];
                for (int v = 0; v < b; v++) tmp[n * b + v] += s * chat[u * b + v];
            }
        mat_mul(rec, tmp, psi, b);
        for (int q = 0; q < 8; q++) {
            double s = (double)basis[p * 8 + q];
            for (int o = 0; o < bb; o++) rec[o] += s * phi[(size_t)q * bb + o];
        }
        for (int r = 0; r < nr; r++) {
            RBE_T* wr = w + (size_t)(i * b + r) * in + (size_t)j * b;
            for (int c = 0; c < nc; c++) wr[c] = (RBE_T)rec[r * b + c];
        }
    }
}
