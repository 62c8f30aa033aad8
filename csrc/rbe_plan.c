/* rbe_plan.c - the tables of one block size b, computed once in double.
 *
 * The 8 pattern functions on a block's grid (x: column, y: row coordinate,
 * both 2n/(b-1) - 1, d = sqrt(x^2 + y^2)):
 *   Phi = [1, d, d^2, cos(pi x), cos(pi y), cos(2 pi x), cos(2 pi y), cos(pi x) cos(pi y)]
 * factor into rank-1 terms g_a(r) f_e(c). With the 1-D vectors
 *   v0 = 1, v1 = z^2, v2 = cos(pi z), v3 = cos(2 pi z)
 * and the eigen-decomposition D = sum_m lam_m U_m U_m^T of the symmetric
 * matrix D[r][c] = sqrt(z_r^2 + z_c^2), the terms are
 *   Phi_0 = v0 v0^T   Phi_2 = v0 v1^T + v1 v0^T   Phi_3 = v0 v2^T   Phi_4 = v2 v0^T
 *   Phi_5 = v0 v3^T   Phi_6 = v3 v0^T   Phi_7 = v2 v2^T   Phi_1 = sum_m (lam_m U_m) U_m^T
 * so the analysis vectors are f = [v0..v3, U_m] and the synthesis vectors
 * g = [v0..v3, lam_m U_m]. Slab 2 of the plan holds the fast-DCT tables.
 * Eigenvalues below tol * max|lam| are dropped
 * (D has numerical rank ~10 at 1e-7, ~19 at 1e-15 for b = 64).
 */
#include "rbe.h"

#include <math.h>
#include <string.h>

void rbe_dct_matrix(double* psi, int b) {
    for (int u = 0; u < b; u++)
        for (int n = 0; n < b; n++) psi[u * b + n] = rbe_dct_entry(u, n, b);
}

void rbe_pattern_images(double* phi, int b) {
    const size_t bb = (size_t)b * b;
    for (int k = 0; k < RBE_NPAT; k++)
        for (int r = 0; r < b; r++)
            for (int c = 0; c < b; c++) phi[k * bb + (size_t)r * b + c] = rbe_pattern_value(k, r, c, b);
}

// vals: [n], vecs: [n, n] (column m is the eigenvector of vals[m]), a: [n, n] symmetric (destroyed)
void rbe_jacobi_eig(double* vals, double* vecs, double* a, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) vecs[i * n + j] = i == j;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, diag = 0.0;
        for (int i = 0; i < n; i++) {
            diag += a[i * n + i] * a[i * n + i];
            for (int j = i + 1; j < n; j++) off += a[i * n + j] * a[i * n + j];
        }
        if (off <= 1e-34 * diag || off == 0.0) break;
        for (int p = 0; p < n; p++) {
            for (int q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (apq == 0.0) continue;
                double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) {  // columns p, q
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) {  // rows p, q
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    double vkp = vecs[k * n + p], vkq = vecs[k * n + q];
                    vecs[k * n + p] = c * vkp - s * vkq;
                    vecs[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    for (int i = 0; i < n; i++) vals[i] = a[i * n + i];
}

// pinv: [8, b*b]; work: 8*b*b + 200
void rbe_pattern_pinv(double* pinv, double* work, int b) {
    size_t bb = (size_t)b * b;
    double* phi = work;            // [8, bb]
    double* g = phi + 8 * bb;      // [8, 8] Gram matrix
    double* vecs = g + 64;         // [8, 8]
    double* vals = vecs + 64;      // [8]
    double* ginv = vals + 8;       // [8, 8]
    rbe_pattern_images(phi, b);
    for (int k = 0; k < 8; k++)
        for (int l = 0; l < 8; l++) {
            double s = 0.0;
            for (size_t o = 0; o < bb; o++) s += phi[k * bb + o] * phi[l * bb + o];
            g[k * 8 + l] = s;
        }
    rbe_jacobi_eig(vals, vecs, g, 8);
    double vmax = 0.0;
    for (int m = 0; m < 8; m++) vmax = fmax(vmax, fabs(vals[m]));
    for (int k = 0; k < 8; k++)
        for (int l = 0; l < 8; l++) {
            double s = 0.0;
            for (int m = 0; m < 8; m++)
                if (fabs(vals[m]) > 1e-12 * vmax) s += vecs[k * 8 + m] * vecs[l * 8 + m] / vals[m];
            ginv[k * 8 + l] = s;
        }
    for (int k = 0; k < 8; k++)
        for (size_t o = 0; o < bb; o++) {
            double s = 0.0;
            for (int l = 0; l < 8; l++) s += ginv[k * 8 + l] * phi[l * bb + o];
            pinv[k * bb + o] = s;
        }
}

// Tables of the fast DCT of rbe_avx2.c, scale factors folded in: for N = b, b/2, ... while N is
// even and > 2: M_N [N/2][N/2] = s cos(pi (n + 1/2)(2k + 1) / N); then C_N0 [N0][N0] =
// s_u cos(pi (n + 1/2) u / N0), with s = sqrt(2/b) and s_0 = sqrt(1/b). At most b*b values.
static void fast_dct_tables(double* tab, int b) {
    const double s = sqrt(2.0 / b);
    int N = b;
    while (N % 2 == 0 && N > 2) {
        int h = N / 2;
        for (int k = 0; k < h; k++)
            for (int n = 0; n < h; n++) tab[k * h + n] = s * cos(RBE_PI * (n + 0.5) * (2 * k + 1) / N);
        tab += (size_t)h * h;
        N = h;
    }
    for (int u = 0; u < N; u++)
        for (int n = 0; n < N; n++) tab[u * N + n] = (u == 0 ? sqrt(1.0 / b) : s) * cos(RBE_PI * (n + 0.5) * u / N);
}

// v[n] and v[b-1-n] both set to their mean
static void mirror_mean(double* v, int b) {
    for (int n = 0; n < b / 2; n++) v[n] = v[b - 1 - n] = 0.5 * (v[n] + v[b - 1 - n]);
}

// plan: [3, b+nf, b]; work: 3*b*b + b
int rbe_plan_build(double* plan, double* work, int b, double tol) {
    double* dmat = work;              // [b, b]
    double* vecs = dmat + b * b;      // [b, b]
    double* vals = vecs + b * b;      // [b]
    double* fix = vals + b;           // [4, b]
    for (int r = 0; r < b; r++)
        for (int c = 0; c < b; c++) {
            double y = rbe_grid(r, b), x = rbe_grid(c, b);
            dmat[r * b + c] = sqrt(x * x + y * y);
        }
    rbe_jacobi_eig(vals, vecs, dmat, b);
    double vmax = 0.0;
    for (int m = 0; m < b; m++) vmax = fmax(vmax, fabs(vals[m]));
    int rank = 0;
    for (int m = 0; m < b; m++) rank += fabs(vals[m]) > tol * vmax;
    int nf = RBE_NFIX + rank, rows = b + nf;
    for (int n = 0; n < b; n++) {
        double z = rbe_grid(n, b);
        fix[0 * b + n] = 1.0;
        fix[1 * b + n] = z * z;
        fix[2 * b + n] = cos(RBE_PI * z);
        fix[3 * b + n] = cos(2.0 * RBE_PI * z);
    }
    double* A = plan;
    double* S = plan + (size_t)rows * b;
    rbe_dct_matrix(A, b);
    memcpy(S, A, sizeof(double) * b * b);
    memcpy(A + b * b, fix, sizeof(double) * RBE_NFIX * b);
    memcpy(S + b * b, fix, sizeof(double) * RBE_NFIX * b);
    // kept eigenpairs in order of decreasing |lambda|
    int row = b + RBE_NFIX;
    for (int kept = 0; kept < rank; kept++) {
        int best = -1;
        for (int m = 0; m < b; m++) {
            if (vals[m] != vals[m]) continue;
            if (fabs(vals[m]) > tol * vmax && (best < 0 || fabs(vals[m]) > fabs(vals[best]))) best = m;
        }
        for (int n = 0; n < b; n++) {
            A[(size_t)row * b + n] = vecs[n * b + best];
            S[(size_t)row * b + n] = vals[best] * vecs[n * b + best];
        }
        vals[best] = NAN;  // taken
        row++;
    }
    // The pattern's vectors are mirror-symmetric, v[n] = v[b-1-n]: z_{b-1-n} = -z_n, and D's
    // columns c and b-1-c are equal, so its eigenvectors of nonzero eigenvalue are symmetric.
    // The computed ones are so only to rounding (an eigenvector near the cut can carry some of
    // D's antisymmetric null space); the x86 tile kernels rely on it exactly (rbe_x86_impl.h:
    // they project the half sums x[n] + x[b-1-n]), so each mirrored pair takes its mean.
    for (int r = b; r < rows; r++) {
        mirror_mean(A + (size_t)r * b, b);
        mirror_mean(S + (size_t)r * b, b);
    }
    double* F = S + (size_t)rows * b;
    memset(F, 0, sizeof(double) * rows * b);
    fast_dct_tables(F, b);
    return nf;
}
