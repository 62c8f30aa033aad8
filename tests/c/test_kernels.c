/* test_kernels.c - C unit tests of the RBE kernels (the csrc C files), no torch.
 *
 * Built and run by `make ctest` under AddressSanitizer and UndefinedBehaviorSanitizer.
 * Every buffer is allocated with exactly the size rbe.h documents, so an
 * out-of-bounds access in a kernel is caught by ASan. Expected values come from
 * closed-form formulas written here (DESIGN.md section 2), from mathematical
 * identities (orthonormality, A v = lambda v, Parseval), or from the naive
 * references rbe_linear_*_ref_* (decode, then dense double loops).
 *
 * Prints one line per failed check and ends with exactly "N passed, N failed";
 * exits non-zero when anything failed.
 */
#include "rbe_variants.h" /* rbe.h and the portable / AVX2 / AVX-512 variants */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long n_pass, n_fail;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (cond) {                                              \
            n_pass++;                                            \
        } else {                                                 \
            n_fail++;                                            \
            printf("FAIL %s:%d: ", __func__, __LINE__);          \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
        }                                                        \
    } while (0)

/* ---------------------------------------------------------------- helpers */

static void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p) {
        printf("out of memory\n");
        exit(2);
    }
    return p;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_u64(void) {  // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static double rng_unit(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) {
    double u1 = rng_unit(), u2 = rng_unit();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * RBE_PI * u2);
}
static void fill_normal(double* a, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = rng_normal();
}

static double max_abs(const double* a, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}
static double max_diff(const double* a, const double* b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (d != d) return INFINITY;
        m = fmax(m, d);
    }
    return m;
}

static int cdiv(int a, int b) { return (a + b - 1) / b; }
static double grid(int n, int b) { return 2.0 * n / (double)(b - 1) - 1.0; }

/* closed-form DCT-II entry and pattern image entry, written here from DESIGN.md */
static double psi_cf(int u, int n, int b) {
    double a = u == 0 ? sqrt(1.0 / b) : sqrt(2.0 / b);
    return a * cos(RBE_PI * (n + 0.5) * u / b);
}
static double phi_cf(int k, int r, int c, int b) {
    double x = grid(c, b), y = grid(r, b), d = sqrt(x * x + y * y);
    switch (k) {
    case 0: return 1.0;
    case 1: return d;
    case 2: return d * d;
    case 3: return cos(RBE_PI * x);
    case 4: return cos(RBE_PI * y);
    case 5: return cos(2.0 * RBE_PI * x);
    case 6: return cos(2.0 * RBE_PI * y);
    default: return cos(RBE_PI * x) * cos(RBE_PI * y);
    }
}

/* values stored as float (f32 != 0) or double */
static size_t esize(int f32) { return f32 ? sizeof(float) : sizeof(double); }
static void* to_t(const double* src, size_t n, int f32) {
    void* p = xmalloc(n * esize(f32));
    for (size_t i = 0; i < n; i++) {
        if (f32) ((float*)p)[i] = (float)src[i];
        else ((double*)p)[i] = src[i];
    }
    return p;
}
static void from_t(double* dst, const void* src, size_t n, int f32) {
    for (size_t i = 0; i < n; i++) dst[i] = f32 ? (double)((const float*)src)[i] : ((const double*)src)[i];
}

/* random sorted index of k distinct positions in [0, b*b) per block */
static void* random_index(long nblk, int k, int b, int wide) {
    int bb = b * b;
    void* ix = xmalloc((size_t)nblk * k * (wide ? 4 : 2) + 1);
    int* perm = xmalloc(sizeof(int) * bb);
    unsigned char* take = xmalloc(bb);
    for (long p = 0; p < nblk; p++) {
        for (int o = 0; o < bb; o++) perm[o] = o, take[o] = 0;
        for (int q = 0; q < k; q++) {  // partial Fisher-Yates
            int r = q + (int)(rng_u64() % (uint64_t)(bb - q));
            int t = perm[q];
            perm[q] = perm[r];
            perm[r] = t;
            take[perm[q]] = 1;
        }
        int q = 0;
        for (int o = 0; o < bb; o++)
            if (take[o]) {
                if (wide) ((int32_t*)ix)[p * k + q] = o;
                else ((int16_t*)ix)[p * k + q] = (int16_t)o;
                q++;
            }
    }
    free(perm);
    free(take);
    return ix;
}

/* codec tables psi [bb] | phi [8bb] | pinv [8bb], as the C++ layer builds them */
static double* codec_tables(int b) {
    size_t bb = (size_t)b * b;
    double* tabs = xmalloc(sizeof(double) * 17 * bb);
    double* work = xmalloc(sizeof(double) * (8 * bb + 200));
    rbe_dct_matrix(tabs, b);
    rbe_pattern_images(tabs + bb, b);
    rbe_pattern_pinv(tabs + 9 * bb, work, b);
    free(work);
    return tabs;
}

/* ---------------------------------------------------------------- DCT and pattern tables */

static void test_dct(void) {
    const int bs[] = {4, 5, 8, 16, 64, 256};
    for (size_t t = 0; t < sizeof bs / sizeof bs[0]; t++) {
        int b = bs[t];
        double* psi = xmalloc(sizeof(double) * b * b);
        rbe_dct_matrix(psi, b);
        double e_orth = 0.0, e_cf = 0.0;
        for (int u = 0; u < b; u++) {
            for (int v = 0; v < b; v++) {  // (psi psi^T)[u][v]
                double s = 0.0;
                for (int n = 0; n < b; n++) s += psi[u * b + n] * psi[v * b + n];
                e_orth = fmax(e_orth, fabs(s - (u == v)));
            }
            for (int n = 0; n < b; n++) e_cf = fmax(e_cf, fabs(psi[u * b + n] - psi_cf(u, n, b)));
        }
        double e_cols = 0.0;  // psi^T psi = I too (square orthonormal)
        for (int m = 0; m < b; m++)
            for (int n = 0; n < b; n++) {
                double s = 0.0;
                for (int u = 0; u < b; u++) s += psi[u * b + m] * psi[u * b + n];
                e_cols = fmax(e_cols, fabs(s - (m == n)));
            }
        CHECK(e_orth < 1e-13, "b=%d: |psi psi^T - I| = %.3e", b, e_orth);
        CHECK(e_cols < 1e-13, "b=%d: |psi^T psi - I| = %.3e", b, e_cols);
        CHECK(e_cf < 1e-15, "b=%d: psi differs from the closed form by %.3e", b, e_cf);
        // u = 0 row is the constant 1/sqrt(b); row u has the parity (-1)^u about the centre
        double e_sym = 0.0;
        for (int u = 0; u < b; u++)
            for (int n = 0; n < b; n++)
                e_sym = fmax(e_sym, fabs(psi[u * b + b - 1 - n] - ((u & 1) ? -1 : 1) * psi[u * b + n]));
        // (cos of an argument up to ~pi b is off by ~ulp(pi b), times a_u = sqrt(2/b): ~sqrt(b) 1e-15)
        CHECK(fabs(psi[0] - 1.0 / sqrt((double)b)) < 1e-16 && e_sym < 4e-15 * sqrt((double)b), "b=%d: DCT row 0 / parity %.3e", b,
              e_sym);
        free(psi);
    }
}

static void test_pattern_images(void) {
    const int bs[] = {4, 8, 17, 64};
    for (size_t t = 0; t < sizeof bs / sizeof bs[0]; t++) {
        int b = bs[t];
        size_t bb = (size_t)b * b;
        double* phi = xmalloc(sizeof(double) * 8 * bb);
        rbe_pattern_images(phi, b);
        double e = 0.0;
        for (int k = 0; k < 8; k++)
            for (int r = 0; r < b; r++)
                for (int c = 0; c < b; c++) e = fmax(e, fabs(phi[k * bb + r * b + c] - phi_cf(k, r, c, b)));
        CHECK(e < 1e-15, "b=%d: pattern images differ from DESIGN.md formulas by %.3e", b, e);
        // orientation: Phi_3 varies along columns (x), Phi_4 along rows (y)
        CHECK(phi[3 * bb + 0] == phi[3 * bb + (size_t)(b - 1) * b] && fabs(phi[3 * bb] + 1.0) < 1e-15 &&
                  fabs(phi[4 * bb + b - 1] + 1.0) < 1e-15,
              "b=%d: x must be the column coordinate, y the row coordinate", b);
        free(phi);
    }
}

static void test_pattern_pinv(void) {
    const int bs[] = {4, 8, 16, 64};
    for (size_t t = 0; t < sizeof bs / sizeof bs[0]; t++) {
        int b = bs[t];
        size_t bb = (size_t)b * b;
        double* pinv = xmalloc(sizeof(double) * 8 * bb);
        double* work = xmalloc(sizeof(double) * (8 * bb + 200));
        double* phi = xmalloc(sizeof(double) * 8 * bb);
        double* blk = xmalloc(sizeof(double) * bb);
        rbe_pattern_pinv(pinv, work, b);
        rbe_pattern_images(phi, b);
        for (int trial = 0; trial < 3; trial++) {
            double p[8], q[8];
            for (int k = 0; k < 8; k++) p[k] = rng_normal();
            for (size_t o = 0; o < bb; o++) {
                blk[o] = 0.0;
                for (int k = 0; k < 8; k++) blk[o] += p[k] * phi[k * bb + o];
            }
            for (int k = 0; k < 8; k++) {
                q[k] = 0.0;
                for (size_t o = 0; o < bb; o++) q[k] += pinv[k * bb + o] * blk[o];
            }
            double e_mat = 0.0, scale = max_abs(blk, bb);
            for (size_t o = 0; o < bb; o++) {
                double s = 0.0;
                for (int k = 0; k < 8; k++) s += q[k] * phi[k * bb + o];
                e_mat = fmax(e_mat, fabs(s - blk[o]));
            }
            // the fitted pattern reproduces the pattern matrix at every b (b = 4 is rank-deficient)
            CHECK(e_mat < 1e-10 * fmax(1.0, scale), "b=%d: pattern matrix not reproduced, err %.3e", b, e_mat);
            if (b >= 8) {  // full rank: the coefficients themselves come back
                double e_p = 0.0;
                for (int k = 0; k < 8; k++) e_p = fmax(e_p, fabs(q[k] - p[k]));
                CHECK(e_p < 1e-8, "b=%d: pattern coefficients not reproduced, err %.3e", b, e_p);
            }
        }
        if (b == 4) {  // the minimum-norm property: pinv * phi^T is a symmetric projector
            double e_sym = 0.0, e_idem = 0.0, P[64];
            for (int k = 0; k < 8; k++)
                for (int l = 0; l < 8; l++) {
                    double s = 0.0;
                    for (size_t o = 0; o < bb; o++) s += pinv[k * bb + o] * phi[l * bb + o];
                    P[k * 8 + l] = s;
                }
            for (int k = 0; k < 8; k++)
                for (int l = 0; l < 8; l++) {
                    double s = 0.0;
                    for (int m = 0; m < 8; m++) s += P[k * 8 + m] * P[m * 8 + l];
                    e_idem = fmax(e_idem, fabs(s - P[k * 8 + l]));
                    e_sym = fmax(e_sym, fabs(P[k * 8 + l] - P[l * 8 + k]));
                }
            CHECK(e_sym < 1e-10 && e_idem < 1e-10, "b=4: pinv*Phi not a symmetric projector (%.3e, %.3e)", e_sym,
                  e_idem);
        }
        free(pinv);
        free(work);
        free(phi);
        free(blk);
    }
}

static void check_eig(const double* a0, int n, const char* what) {
    double* a = xmalloc(sizeof(double) * n * n);
    double* vecs = xmalloc(sizeof(double) * n * n);
    double* vals = xmalloc(sizeof(double) * n);
    memcpy(a, a0, sizeof(double) * n * n);
    rbe_jacobi_eig(vals, vecs, a, n);
    double scale = max_abs(a0, (size_t)n * n), e_av = 0.0, e_orth = 0.0, tr = 0.0, sv = 0.0;
    for (int m = 0; m < n; m++) {
        for (int i = 0; i < n; i++) {
            double s = 0.0;
            for (int j = 0; j < n; j++) s += a0[i * n + j] * vecs[j * n + m];
            e_av = fmax(e_av, fabs(s - vals[m] * vecs[i * n + m]));
        }
        for (int l = 0; l < n; l++) {
            double s = 0.0;
            for (int i = 0; i < n; i++) s += vecs[i * n + m] * vecs[i * n + l];
            e_orth = fmax(e_orth, fabs(s - (m == l)));
        }
        tr += a0[m * n + m];
        sv += vals[m];
    }
    CHECK(e_av < 1e-12 * fmax(1.0, scale), "%s: |A v - lambda v| = %.3e", what, e_av);
    CHECK(e_orth < 1e-12, "%s: eigenvectors not orthonormal (%.3e)", what, e_orth);
    CHECK(fabs(tr - sv) < 1e-12 * fmax(1.0, fabs(tr) + scale), "%s: sum of eigenvalues %.17g != trace %.17g", what,
          sv, tr);
    free(a);
    free(vecs);
    free(vals);
}

static void test_jacobi(void) {
    // known spectrum: [[2,1],[1,2]] -> {1, 3}; [[0,1],[1,0]] -> {-1, 1}
    {
        double a[4] = {2, 1, 1, 2}, v[4], l[2];
        rbe_jacobi_eig(l, v, a, 2);
        double lo = fmin(l[0], l[1]), hi = fmax(l[0], l[1]);
        CHECK(fabs(lo - 1.0) < 1e-14 && fabs(hi - 3.0) < 1e-14, "[[2,1],[1,2]]: eigenvalues %g %g", l[0], l[1]);
        double b[4] = {0, 1, 1, 0};
        rbe_jacobi_eig(l, v, b, 2);
        lo = fmin(l[0], l[1]), hi = fmax(l[0], l[1]);
        CHECK(fabs(lo + 1.0) < 1e-14 && fabs(hi - 1.0) < 1e-14, "[[0,1],[1,0]]: eigenvalues %g %g", l[0], l[1]);
    }
    {
        double a[1] = {-4.5}, v[1], l[1];
        rbe_jacobi_eig(l, v, a, 1);
        CHECK(l[0] == -4.5 && v[0] == 1.0, "n=1: %g %g", l[0], v[0]);
    }
    const int ns[] = {3, 6, 10};
    for (size_t t = 0; t < sizeof ns / sizeof ns[0]; t++) {
        int n = ns[t];
        double* a = xmalloc(sizeof(double) * n * n);
        for (int i = 0; i < n; i++)
            for (int j = 0; j <= i; j++) a[i * n + j] = a[j * n + i] = rng_normal();
        char what[64];
        snprintf(what, sizeof what, "random symmetric %dx%d", n, n);
        check_eig(a, n, what);
        // repeated eigenvalue: 3 I + w w^T
        double w[16];
        for (int i = 0; i < n; i++) w[i] = rng_normal();
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) a[i * n + j] = 3.0 * (i == j) + w[i] * w[j];
        snprintf(what, sizeof what, "3I + ww^T %dx%d", n, n);
        check_eig(a, n, what);
        free(a);
    }
}

// rows [b, rows) of both slabs mirror-symmetric, exactly (the x86 tile kernels rely on it)
static int pattern_mirrored(const double* plan, int b, int nf) {
    for (int r = b; r < 2 * (b + nf); r++) {
        if (r >= b + nf && r < b + nf + b) continue;  // the synthesis slab's DCT rows
        for (int n = 0; n < b / 2; n++)
            if (plan[(size_t)r * b + n] != plan[(size_t)r * b + b - 1 - n]) return 0;
    }
    return 1;
}

static void test_plan(void) {
    const int bs[] = {8, 9, 64};
    for (size_t t = 0; t < sizeof bs / sizeof bs[0]; t++) {
        int b = bs[t];
        size_t bb = (size_t)b * b;
        double* plan = xmalloc(sizeof(double) * 3 * (2 * b + 4) * b);
        double* work = xmalloc(sizeof(double) * (3 * bb + b));
        int nf = rbe_plan_build(plan, work, b, 1e-15);
        CHECK(nf > RBE_NFIX && nf <= RBE_NFIX + b, "b=%d: nf = %d", b, nf);
        int rows = b + nf;
        const double* A = plan;
        const double* S = plan + (size_t)rows * b;
        double e_psi = 0.0, e_fix = 0.0, e_d = 0.0;
        for (int u = 0; u < b; u++)
            for (int n = 0; n < b; n++) {
                e_psi = fmax(e_psi, fabs(A[u * b + n] - psi_cf(u, n, b)));
                e_psi = fmax(e_psi, fabs(S[u * b + n] - psi_cf(u, n, b)));
            }
        for (int n = 0; n < b; n++) {
            double z = grid(n, b);
            double f[4] = {1.0, z * z, cos(RBE_PI * z), cos(2.0 * RBE_PI * z)};
            for (int m = 0; m < RBE_NFIX; m++) {
                e_fix = fmax(e_fix, fabs(A[(b + m) * b + n] - f[m]));
                e_fix = fmax(e_fix, fabs(S[(b + m) * b + n] - f[m]));
            }
        }
        // the d-pattern sqrt(x^2 + y^2) = sum over pattern rows m >= 4 of S[b+m] (row r) A[b+m] (column c)
        for (int r = 0; r < b; r++)
            for (int c = 0; c < b; c++) {
                double s = 0.0;
                for (int m = RBE_NFIX; m < nf; m++) s += S[(size_t)(b + m) * b + r] * A[(size_t)(b + m) * b + c];
                double x = grid(c, b), y = grid(r, b);
                e_d = fmax(e_d, fabs(s - sqrt(x * x + y * y)));
            }
        CHECK(e_psi < 1e-15, "b=%d: plan's DCT rows off by %.3e", b, e_psi);
        CHECK(e_fix < 1e-15, "b=%d: plan's separable rows off by %.3e", b, e_fix);
        CHECK(e_d < 1e-12, "b=%d: d-pattern from the plan off by %.3e (nf=%d)", b, e_d, nf);
        CHECK(pattern_mirrored(plan, b, nf), "b=%d: pattern rows not mirror-symmetric", b);
        // a looser tolerance keeps fewer (or as many) rows, still a good approximation
        int nf9 = rbe_plan_build(plan, work, b, 1e-9);
        CHECK(nf9 >= RBE_NFIX + 1 && nf9 <= nf, "b=%d: nf at 1e-9 = %d vs %d at 1e-15", b, nf9, nf);
        rows = b + nf9;
        A = plan;
        S = plan + (size_t)rows * b;
        e_d = 0.0;
        for (int r = 0; r < b; r++)
            for (int c = 0; c < b; c++) {
                double s = 0.0;
                for (int m = RBE_NFIX; m < nf9; m++) s += S[(size_t)(b + m) * b + r] * A[(size_t)(b + m) * b + c];
                double x = grid(c, b), y = grid(r, b);
                e_d = fmax(e_d, fabs(s - sqrt(x * x + y * y)));
            }
        CHECK(e_d < 1e-7, "b=%d: d-pattern at tol 1e-9 off by %.3e", b, e_d);
        CHECK(pattern_mirrored(plan, b, nf9), "b=%d: pattern rows at tol 1e-9 not mirror-symmetric", b);
        free(plan);
        free(work);
    }
}

/* ---------------------------------------------------------------- index validation */

/* rbe_index_check, and rbe_index_snapshot into an exact-size copy: both must report the same
 * first bad position, and the copy must hold the source's bytes */
static long index_check_both(const void* ix, int wide, long nblk, int k, int b) {
    const long r = rbe_index_check(ix, wide, nblk, k, b);
    const size_t n = (size_t)nblk * k * (wide ? 4 : 2);
    void* copy = xmalloc(n);
    const long s = rbe_index_snapshot(copy, ix, wide, nblk, k, b);
    CHECK(s == r, "index_snapshot reports %ld, index_check %ld (wide=%d)", s, r, wide);
    CHECK(!n || !memcmp(copy, ix, n), "index_snapshot's copy differs from its source (wide=%d)", wide);
    free(copy);
    return r;
}

static void test_index_check(void) {
    const int b = 8, k = 4;
    const long nblk = 3;
    for (int wide = 0; wide <= 1; wide++) {
        int base[12] = {0, 5, 9, 63, 1, 2, 3, 4, 10, 20, 30, 40};
        int32_t i32[12];
        int16_t i16[12];
        void* ix = wide ? (void*)i32 : (void*)i16;
#define SET(pos, v) (wide ? (void)(i32[pos] = (v)) : (void)(i16[pos] = (int16_t)(v)))
#define RESET() \
    for (int q = 0; q < 12; q++) SET(q, base[q])
        RESET();
        CHECK(index_check_both(ix, wide, nblk, k, b) == -1, "wide=%d: valid index rejected", wide);
        CHECK(index_check_both(ix, wide, 0, k, b) == -1 && index_check_both(ix, wide, nblk, 0, b) == -1,
              "wide=%d: empty index rejected", wide);
        SET(3, 64);  // out of range (b*b = 64)
        CHECK(index_check_both(ix, wide, nblk, k, b) == 3, "wide=%d: out of range -> %ld", wide,
              index_check_both(ix, wide, nblk, k, b));
        RESET();
        SET(8, -1);  // negative
        CHECK(index_check_both(ix, wide, nblk, k, b) == 8, "wide=%d: negative -> %ld", wide,
              index_check_both(ix, wide, nblk, k, b));
        RESET();
        SET(6, 2);  // duplicate of slot 5
        CHECK(index_check_both(ix, wide, nblk, k, b) == 6, "wide=%d: duplicate -> %ld", wide,
              index_check_both(ix, wide, nblk, k, b));
        RESET();
        SET(9, 5);  // unsorted: 10, 5, 30, 40
        CHECK(index_check_both(ix, wide, nblk, k, b) == 9, "wide=%d: unsorted -> %ld", wide,
              index_check_both(ix, wide, nblk, k, b));
        RESET();
        // a new block may restart low: 63 then 1 across the block boundary is fine
        CHECK(index_check_both(ix, wide, nblk, k, b) == -1, "wide=%d: block boundary", wide);
#undef SET
#undef RESET
    }
    // int32 at b = 256: 65535 is the last valid position, 65536 is out of range
    int32_t big[2] = {7, 65535};
    CHECK(index_check_both(big, 1, 1, 2, 256) == -1, "b=256: 65535 rejected");
    big[1] = 65536;
    CHECK(index_check_both(big, 1, 1, 2, 256) == 1, "b=256: 65536 accepted");
}

/* ---------------------------------------------------------------- codec */

static void encode_t(int f32, void* basis, void* coeffs, void* ix, int wide, double* err, const void* w,
                     const double* tabs, double* work, int out, int in, int b, int k, long p0, long p1) {
    if (f32) rbe_encode_f32(basis, coeffs, ix, wide, err, w, tabs, work, out, in, b, k, p0, p1);
    else rbe_encode_f64(basis, coeffs, ix, wide, err, w, tabs, work, out, in, b, k, p0, p1);
}
/* the weight structs of rbe.h over untyped buffers */
static rbe_weight_f32 w32(const void* basis, const void* coeffs, const void* ix, int wide, int out, int in, int b,
                          int k) {
    rbe_weight_f32 W = {basis, coeffs, ix, wide, out, in, b, k};
    return W;
}
static rbe_weight_f64 w64(const void* basis, const void* coeffs, const void* ix, int wide, int out, int in, int b,
                          int k) {
    rbe_weight_f64 W = {basis, coeffs, ix, wide, out, in, b, k};
    return W;
}
static void decode_t(int f32, void* w, const void* basis, const void* coeffs, const void* ix, int wide,
                     const double* tabs, double* work, int out, int in, int b, int k, long p0, long p1) {
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    if (f32) rbe_decode_f32(w, &W32, tabs, work, p0, p1);
    else rbe_decode_f64(w, &W64, tabs, work, p0, p1);
}

/* Encode then decode W [out, in]; checks layout, the per-block error against the decoded
 * matrix (evaluated exactly, in double, from the stored numbers), losslessness at k = b*b,
 * and that splitting the block range gives bitwise the same result. */
static void roundtrip(int f32, int out, int in, int b, int k, int wide) {
    const int R = cdiv(out, b), C = cdiv(in, b);
    const long nblk = (long)R * C;
    const size_t n = (size_t)out * in, es = esize(f32);
    double* wd = xmalloc(sizeof(double) * n);
    fill_normal(wd, n);
    void* w = to_t(wd, n, f32);
    from_t(wd, w, n, f32);  // the exact values encoded
    double* tabs = codec_tables(b);
    double* work = xmalloc(sizeof(double) * rbe_encode_work(b));
    double* dwork = xmalloc(sizeof(double) * 3 * b * b);
    void* basis = xmalloc(nblk * 8 * es);
    void* coeffs = xmalloc(nblk * k * es + 1);
    void* ix = xmalloc(nblk * k * (wide ? 4 : 2) + 1);
    double* err = xmalloc(sizeof(double) * nblk);
    encode_t(f32, basis, coeffs, ix, wide, err, w, tabs, work, out, in, b, k, 0, nblk);

    CHECK(rbe_index_check(ix, wide, nblk, k, b) == -1, "f32=%d %dx%d b=%d k=%d: encoder wrote an invalid index",
          f32, out, in, b, k);

    // decode in the value type, and exactly (double) from the stored numbers
    void* dec = xmalloc(n * es);
    decode_t(f32, dec, basis, coeffs, ix, wide, tabs, dwork, out, in, b, k, 0, nblk);
    double* decd = xmalloc(sizeof(double) * n);
    double* exact = xmalloc(sizeof(double) * n);
    from_t(decd, dec, n, f32);
    {
        double* bd = xmalloc(sizeof(double) * nblk * 8);
        double* cd = xmalloc(sizeof(double) * nblk * k + 1);
        from_t(bd, basis, nblk * 8, f32);
        from_t(cd, coeffs, nblk * k, f32);
        const rbe_weight_f64 Wd = w64(bd, cd, ix, wide, out, in, b, k);
        rbe_decode_f64(exact, &Wd, tabs, dwork, 0, nblk);
        free(bd);
        free(cd);
    }
    double e_round = max_diff(decd, exact, n), scale = max_abs(exact, n);
    CHECK(e_round <= (f32 ? 1e-6 : 1e-15) * fmax(1.0, scale), "f32=%d: decode in T vs exact decode %.3e", f32,
          e_round);

    // per-block squared error = measured over real entries. Both sides are double arithmetic on the
    // same stored numbers; each decoded entry carries a rounding of about 1e-14 |W_block|, which moves
    // the measured squared error by up to 2 sqrt(s) delta + delta^2 (it matters when s is tiny, e.g. an
    // almost lossless block).
    double e_blk = 0.0;
    for (long p = 0; p < nblk; p++) {
        int i = (int)(p / C), j = (int)(p % C);
        double s = 0.0, wn = 0.0;
        for (int r = i * b; r < out && r < (i + 1) * b; r++)
            for (int c = j * b; c < in && c < (j + 1) * b; c++) {
                double d = wd[(size_t)r * in + c] - exact[(size_t)r * in + c];
                s += d * d;
                wn += wd[(size_t)r * in + c] * wd[(size_t)r * in + c];
            }
        double delta = 1e-14 * sqrt(wn);
        double bound = 1e-9 * s + 2.0 * sqrt(s) * delta + delta * delta;
        e_blk = fmax(e_blk, fabs(err[p] - s) / bound);
    }
    CHECK(e_blk <= 1.0, "f32=%d %dx%d b=%d k=%d: reported block error off by %.3g x its rounding bound", f32, out, in,
          b, k, e_blk);
    if (k == b * b) {
        double e = max_diff(wd, decd, n);
        CHECK(e < (f32 ? 1e-5 : 1e-12) * fmax(1.0, max_abs(wd, n)), "f32=%d %dx%d b=%d: k=b*b not lossless (%.3e)",
              f32, out, in, b, e);
    }

    // block ranges are independent: two halves give the same bytes
    void* basis2 = xmalloc(nblk * 8 * es);
    void* coeffs2 = xmalloc(nblk * k * es + 1);
    void* ix2 = xmalloc(nblk * k * (wide ? 4 : 2) + 1);
    double* err2 = xmalloc(sizeof(double) * nblk);
    long mid = nblk / 2;
    encode_t(f32, basis2, coeffs2, ix2, wide, err2, w, tabs, work, out, in, b, k, mid, nblk);
    encode_t(f32, basis2, coeffs2, ix2, wide, err2, w, tabs, work, out, in, b, k, 0, mid);
    CHECK(!memcmp(basis, basis2, nblk * 8 * es) && !memcmp(coeffs, coeffs2, nblk * k * es) &&
              !memcmp(ix, ix2, nblk * k * (wide ? 4 : 2)) && !memcmp(err, err2, sizeof(double) * nblk),
          "f32=%d %dx%d b=%d k=%d: split encode differs", f32, out, in, b, k);
    void* dec2 = xmalloc(n * es);
    memset(dec2, 0, n * es);
    decode_t(f32, dec2, basis, coeffs, ix, wide, tabs, dwork, out, in, b, k, mid, nblk);
    decode_t(f32, dec2, basis, coeffs, ix, wide, tabs, dwork, out, in, b, k, 0, mid);
    CHECK(!memcmp(dec, dec2, n * es), "f32=%d %dx%d b=%d k=%d: split decode differs", f32, out, in, b, k);

    free(wd), free(w), free(tabs), free(work), free(dwork), free(basis), free(coeffs), free(ix), free(err);
    free(dec), free(decd), free(exact), free(basis2), free(coeffs2), free(ix2), free(err2), free(dec2);
}

static void test_codec_roundtrip(void) {
    for (int f32 = 0; f32 <= 1; f32++) {
        roundtrip(f32, 37, 10, 8, 64, 0);   // k = b*b, edge blocks
        roundtrip(f32, 37, 10, 8, 5, 0);
        roundtrip(f32, 37, 10, 8, 0, 0);
        roundtrip(f32, 16, 32, 16, 256, 1);  // int32 index at a small b works too
        roundtrip(f32, 16, 32, 16, 40, 0);
        roundtrip(f32, 5, 3, 4, 16, 0);
        roundtrip(f32, 1, 1, 4, 3, 0);
        roundtrip(f32, 70, 65, 64, 300, 0);
    }
    roundtrip(0, 9, 260, 256, 7, 1);  // b = 256: int32 index
}

/* The kept set is the k largest |Ehat| (ties: lower flat index), Ehat read off the k = b*b encode. */
static void test_codec_selection(void) {
    const int b = 8, bb = 64, out = 16, in = 8;  // two blocks
    const long nblk = 2;
    double w[16 * 8];
    fill_normal(w, 16 * 8);
    for (int c = 0; c < in; c++) w[8 * in + c] = 0.0;  // block 1 has one zero row: still fine
    double* tabs = codec_tables(b);
    double* work = xmalloc(sizeof(double) * rbe_encode_work(b));
    double basis[16], all[2 * 64], cf[2 * 64], err[2];
    int16_t ixall[2 * 64], ix[2 * 64];
    rbe_encode_f64(basis, all, ixall, 0, err, w, tabs, work, out, in, b, bb, 0, nblk);
    int bad = 0;
    for (int k = 1; k < bb; k++) {
        rbe_encode_f64(basis, cf, ix, 0, err, w, tabs, work, out, in, b, k, 0, nblk);
        for (long p = 0; p < nblk && !bad; p++) {
            // rank of each position by (|value| desc, index asc)
            for (int q = 0; q < k; q++) {
                int o = ix[p * k + q];
                int better = 0;
                for (int o2 = 0; o2 < bb; o2++) {
                    double m1 = fabs(all[p * bb + o2]), m0 = fabs(all[p * bb + o]);
                    better += m1 > m0 || (m1 == m0 && o2 < o);
                }
                if (better >= k || cf[p * k + q] != all[p * bb + o]) {
                    bad = 1;
                    printf("  k=%d block %ld slot %d: position %d has %d better ones\n", k, p, q, o, better);
                }
            }
        }
    }
    CHECK(!bad, "kept coefficients are not the k largest");
    // all-zero residual (a zero block): every magnitude ties, the lowest positions win
    double z[8 * 8] = {0};
    rbe_encode_f64(basis, cf, ix, 0, err, z, tabs, work, 8, 8, b, 5, 0, 1);
    CHECK(ix[0] == 0 && ix[1] == 1 && ix[2] == 2 && ix[3] == 3 && ix[4] == 4 && err[0] == 0.0,
          "zero block: index %d %d %d %d %d err %g", ix[0], ix[1], ix[2], ix[3], ix[4], err[0]);
    free(tabs);
    free(work);
}

/* ---------------------------------------------------------------- transform-domain linear vs the references */

static int g_portable;                   // mode 1: call the portable float32 kernels directly
static const rbe_x86_kernels_f32* g_x86; // modes 2, 3: these x86 kernels directly (NULL: the entry points)
/* The kernels over untyped buffers: plan is the [3, b+nf, b] plan of the value type (cut by
 * rbe_plan_view_*), which = 0 / 1 analyses with its A / S rows. */
static void analysis_t(int f32, void* Xh, const void* x, const void* plan, int which, void* s, long T, int n, int b,
                       int nf, long p0, long p1) {
    if (f32) {
        const rbe_plan_f32 P = rbe_plan_view_f32(plan, b, nf);
        (g_portable ? rbe_analysis_f32_portable : g_x86 ? g_x86->analysis : rbe_analysis_f32)(
            Xh, x, which ? P.S : P.A, &P, s, T, n, p0, p1);
    } else {
        const rbe_plan_f64 P = rbe_plan_view_f64(plan, b, nf);
        rbe_analysis_f64(Xh, x, which ? P.S : P.A, &P, s, T, n, p0, p1);
    }
}
static void rows_t(int f32, const rbe_sched_f32* sc, void* y, void* pre, void* Xn, const void* Xh, const void* plan,
                   const void* basis, const void* coeffs, const void* ix, int wide, const void* bias, int act, void* s,
                   long T, int out, int in, int b, int nf, int k, long p0, long p1) {
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_plan_f32 P32 = rbe_plan_view_f32(plan, b, nf);
    const rbe_plan_f64 P64 = rbe_plan_view_f64(plan, b, nf);
    if (f32 && g_portable) rbe_rows_forward_f32_portable(y, pre, Xn, Xh, &W32, &P32, bias, act, s, T, p0, p1);
    else if (f32 && g_x86) g_x86->rows_forward(y, pre, Xn, Xh, &W32, &P32, sc, bias, act, s, T, p0, p1);
    else if (f32) rbe_rows_forward_f32(y, pre, Xn, Xh, &W32, &P32, sc, bias, act, s, T, p0, p1);
    else rbe_rows_forward_f64(y, pre, Xn, Xh, &W64, &P64, bias, act, s, T, p0, p1);
}
static void cols_t(int f32, const rbe_sched_f32* sc, void* dx, const void* Gh, const void* plan, const void* basis,
                   const void* coeffs, const void* ix, int wide, void* s, long T, int out, int in, int b, int nf, int k,
                   long p0, long p1) {
    // with a schedule the x86 kernels read no coefficients (NULL proves it); the entry point capped to
    // the portable kernels (RBE_FFN_ISA=portable) reads them whatever it is given
    const int x86_reads_sched = sc && !g_portable && (g_x86 || rbe_cpu_isa_level() >= RBE_ISA_AVX2);
    const rbe_weight_f32 W32 =
        w32(basis, x86_reads_sched ? NULL : coeffs, x86_reads_sched ? NULL : ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_plan_f32 P32 = rbe_plan_view_f32(plan, b, nf);
    const rbe_plan_f64 P64 = rbe_plan_view_f64(plan, b, nf);
    if (f32 && g_portable) rbe_cols_backward_f32_portable(dx, Gh, &W32, &P32, s, T, p0, p1);
    else if (f32 && g_x86 && sc) g_x86->cols_backward(dx, Gh, &W32, &P32, sc, s, T, p0, p1);
    else if (f32 && g_x86) g_x86->cols_backward_blocks(dx, Gh, &W32, &P32, s, T, p0, p1);
    else if (f32) rbe_cols_backward_f32(dx, Gh, &W32, &P32, sc, s, T, p0, p1);
    else rbe_cols_backward_f64(dx, Gh, &W64, &P64, s, T, p0, p1);
}
static void params_t(int f32, const rbe_sched_f32* sc, void* db, void* dc, const void* Gh, const void* Xh,
                     const void* ix, int wide, int acc, long T, int out, int in, int b, int nf, int k, long p0,
                     long p1) {
    const rbe_weight_f32 W32 = w32(NULL, NULL, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(NULL, NULL, ix, wide, out, in, b, k);
    const rbe_plan_f32 P32 = {NULL, NULL, NULL, b, nf};
    const rbe_plan_f64 P64 = {NULL, NULL, NULL, b, nf};
    if (f32 && g_portable) rbe_params_backward_f32_portable(db, dc, Gh, Xh, &W32, &P32, acc, T, p0, p1);
    else if (f32 && g_x86 && sc) g_x86->params_backward(db, dc, Gh, Xh, &W32, &P32, sc, acc, T, p0, p1);
    else if (f32 && g_x86 && T <= RBE_TILE) g_x86->params_backward_blocks(db, dc, Gh, Xh, &W32, &P32, acc, T, p0, p1);
    else if (f32 && g_x86) rbe_params_backward_f32_portable(db, dc, Gh, Xh, &W32, &P32, acc, T, p0, p1);
    else if (f32) rbe_params_backward_f32(db, dc, Gh, Xh, &W32, &P32, sc, acc, T, p0, p1);
    else rbe_params_backward_f64(db, dc, Gh, Xh, &W64, &P64, acc, T, p0, p1);
}
static void bias_t(int f32, void* db, const void* g, long T, int out, int acc, long o0, long o1) {
    if (f32) rbe_bias_backward_f32(db, g, T, out, acc, o0, o1);
    else rbe_bias_backward_f64(db, g, T, out, acc, o0, o1);
}
static void fwd_ref_t(int f32, void* y, void* pre, const void* x, const void* basis, const void* coeffs,
                      const void* ix, int wide, const void* bias, int act, const double* tabs, double* work, long T,
                      int out, int in, int b, int k) {
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    if (f32) rbe_linear_forward_ref_f32(y, pre, x, &W32, bias, act, tabs, work, T);
    else rbe_linear_forward_ref_f64(y, pre, x, &W64, bias, act, tabs, work, T);
}
static void bwd_ref_t(int f32, void* dx, void* db, void* dc, void* dbias, const void* g, const void* x,
                      const void* basis, const void* coeffs, const void* ix, int wide, const double* tabs, double* work,
                      long T, int out, int in, int b, int k) {
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    if (f32) rbe_linear_backward_ref_f32(dx, db, dc, dbias, g, x, &W32, tabs, work, T);
    else rbe_linear_backward_ref_f64(dx, db, dc, dbias, g, x, &W64, tabs, work, T);
}

/* relative max error of got vs ref (both read as double) */
static double rel_err(const void* got, const void* ref, size_t n, int f32) {
    double* a = xmalloc(sizeof(double) * n + 8);
    double* r = xmalloc(sizeof(double) * n + 8);
    from_t(a, got, n, f32);
    from_t(r, ref, n, f32);
    double e = max_diff(a, r, n) / fmax(1.0, max_abs(r, n));
    free(a);
    free(r);
    return e;
}

/* The parameter gradient with bfloat16 dot products (rbe_params_backward_bf16), where the CPU has
 * AVX-512 BF16: rbe_to_bf16 rounds to nearest even (against a scalar rounding of the bits);
 * dcoeffs are the sums, in double, of the products of the rounded operands, to float32 summation
 * accuracy (float32 operands would be off by bfloat16's rounding, ~1e-3); dbasis is the float32
 * kernel's, bit for bit; accumulate = 1 adds. db32, dc32: the float32 kernel's gradients. */
static float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static void bf16_grads_case(const char* tag, const rbe_sched_f32* sc, const float* db32, const float* dc32,
                           const float* Gh, const float* Xh, const void* ix, int wide, long T, int out, int in, int b,
                           int nf, int k) {
    static int reported;
    if (!rbe_bf16_sparse_available()) {
        if (!reported++)
            printf("  (bfloat16 operands: not available here (CPU, RBE_FFN_ISA or compiler), not tested)\n");
        return;
    }
    const int R = cdiv(out, b), C = cdiv(in, b), rows = b + nf;
    const long nblk = (long)R * C, ntiles = (T + RBE_TILE - 1) / RBE_TILE;
    const size_t ng = (size_t)ntiles * R * rows * RBE_TILE, nx = (size_t)ntiles * C * rows * RBE_TILE;
    uint16_t* Gb = xmalloc(sizeof(uint16_t) * ng);  // the rounded operands of the reference sums
    uint16_t* Xb = xmalloc(sizeof(uint16_t) * nx);
    rbe_to_bf16(Gb, Gh, (long)ng);
    rbe_to_bf16(Xb, Xh, (long)nx);
    int bad_round = 0;
    for (size_t i = 0; i < ng + nx; i++) {
        const float v = i < ng ? Gh[i] : Xh[i - ng];
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        const uint16_t want = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        bad_round += (i < ng ? Gb[i] : Xb[i - ng]) != want;
    }
    CHECK(!bad_round, "%s: rbe_to_bf16 differs from rounding to nearest even in %d values", tag, bad_round);
    float* db = xmalloc(sizeof(float) * nblk * 8);
    float* dc = xmalloc(sizeof(float) * nblk * k);
    double* ref = xmalloc(sizeof(double) * nblk * k);
    const rbe_weight_f32 W = w32(NULL, NULL, ix, wide, out, in, b, k);
    const rbe_plan_f32 P = {NULL, NULL, NULL, b, nf};
    uint16_t* scr = xmalloc(sizeof(uint16_t) * rbe_bf16_scratch(C, b, nf));  // exact size (ASan)
    rbe_params_backward_bf16(db, dc, Gh, Xh, scr, &W, &P, sc, 0, T, 0, R / 2);  // two ranges of block rows
    rbe_params_backward_bf16(db, dc, Gh, Xh, scr, &W, &P, sc, 0, T, R / 2, R);
    for (long blk = 0; blk < nblk; blk++)
        for (int q = 0; q < k; q++) {
            const long i = blk / C, j = blk % C;
            const int idx = wide ? ((const int32_t*)ix)[blk * k + q] : ((const int16_t*)ix)[blk * k + q];
            double sum = 0;
            for (long tile = 0; tile < ntiles; tile++)
                for (int t = 0; t < RBE_TILE; t++)
                    sum += (double)bf16_value(Gb[((tile * R + i) * rows + idx / b) * RBE_TILE + t]) *
                           bf16_value(Xb[((tile * C + j) * rows + idx % b) * RBE_TILE + t]);
            ref[blk * k + q] = sum;
        }
    double* got = xmalloc(sizeof(double) * nblk * k);
    from_t(got, dc, nblk * k, 1);
    const double e = max_diff(got, ref, nblk * k) / fmax(1.0, max_abs(ref, nblk * k));
    CHECK(e < 2e-6, "%s: bfloat16 dot products off the sums of the rounded operands by %.3e", tag, e);
    CHECK(!memcmp(db, db32, sizeof(float) * nblk * 8), "%s: bfloat16 dot products changed dbasis", tag);
    const double e32 = rel_err(dc, dc32, nblk * k, 1);
    CHECK(e32 < 3e-2, "%s: bfloat16 dot products off the float32 ones by %.3e", tag, e32);
    rbe_params_backward_bf16(NULL, dc, Gh, Xh, scr, &W, &P, sc, 1, T, 0, R);  // accumulate: twice the sums
    for (long e2 = 0; e2 < nblk * k; e2++) ref[e2] *= 2;
    from_t(got, dc, nblk * k, 1);
    const double ea = max_diff(got, ref, nblk * k) / fmax(1.0, max_abs(ref, nblk * k));
    CHECK(ea < 4e-6, "%s: bfloat16 dot products, accumulate: off by %.3e", tag, ea);
    free(Gb), free(Xb), free(scr), free(db), free(dc), free(ref), free(got);
}

/* The sparse products on bfloat16 operands (rbe_rows_forward_bf16, rbe_cols_backward_bf16):
 * against the AVX-512 float32 kernels run on the same operands rounded to bfloat16 values (the
 * DCT rows of the source tile, the schedule's values), to float32 summation accuracy; a wrong
 * pairing or token order would be off by the size of the values. */
static void round_bf16(float* v, size_t n) {  // to bfloat16 values, in place
    for (size_t e = 0; e < n; e++) {
        uint16_t h;
        rbe_to_bf16(&h, v + e, 1);
        v[e] = bf16_value(h);
    }
}
static void round_bf16_rows(float* t, long tiles, int segs, int rows, int b) {  // the DCT rows, in place
    for (long s = 0; s < tiles * segs; s++) round_bf16(t + (size_t)s * rows * RBE_TILE, (size_t)b * RBE_TILE);
}
static void bf16_products_case(const char* tag, const rbe_sched_f32* rsc, const rbe_sched_f32* csc, const void* plan,
                               const void* basis, const void* bias, const float* Gh, const float* Xh, long T, int out,
                               int in, int b, int nf, int k) {
    if (!rbe_bf16_sparse_available()) return;  // bf16_grads_case said so
    const int R = cdiv(out, b), C = cdiv(in, b), rows = b + nf;
    const long nblk = (long)R * C, ntiles = (T + RBE_TILE - 1) / RBE_TILE;
    const size_t ng = (size_t)ntiles * R * rows * RBE_TILE, nx = (size_t)ntiles * C * rows * RBE_TILE;
    float* Gr = xmalloc(sizeof(float) * ng);
    float* Xr = xmalloc(sizeof(float) * nx);
    memcpy(Gr, Gh, sizeof(float) * ng), memcpy(Xr, Xh, sizeof(float) * nx);
    round_bf16_rows(Gr, ntiles, R, rows, b);
    round_bf16_rows(Xr, ntiles, C, rows, b);
    float* rv = xmalloc(sizeof(float) * nblk * k);
    float* cv = xmalloc(sizeof(float) * nblk * k);
    memcpy(rv, rsc->val, sizeof(float) * nblk * k), memcpy(cv, csc->val, sizeof(float) * nblk * k);
    round_bf16(rv, (size_t)nblk * k);
    round_bf16(cv, (size_t)nblk * k);
    rbe_sched_f32 rr = *rsc, cr = *csc;
    rr.val = rv, cr.val = cv;
    const rbe_plan_f32 P = rbe_plan_view_f32(plan, b, nf);
    const rbe_weight_f32 W = w32(basis, NULL, NULL, 1, out, in, b, k);
    float* s = xmalloc(sizeof(float) * rbe_rows_scratch(b, nf));
    uint16_t* sr = xmalloc(sizeof(uint16_t) * rbe_bf16_scratch(C, b, nf));  // exact sizes (ASan)
    uint16_t* sc = xmalloc(sizeof(uint16_t) * rbe_bf16_scratch(R, b, nf));
    const long nr = ntiles * R, nc = ntiles * C;
    float *y1 = xmalloc(sizeof(float) * T * out), *y2 = xmalloc(sizeof(float) * T * out);
    float *p1 = xmalloc(sizeof(float) * T * out), *p2 = xmalloc(sizeof(float) * T * out);
    rbe_x86_avx512.rows_forward(y1, p1, NULL, Xr, &W, &P, &rr, bias, RBE_ACT_GELU, s, T, 0, nr);
    rbe_rows_forward_bf16(y2, p2, NULL, Xh, &W, &P, rsc, bias, RBE_ACT_GELU, s, sr, NULL, T, 0, nr);
    const double ey = rel_err(y2, y1, (size_t)T * out, 1), ep = rel_err(p2, p1, (size_t)T * out, 1);
    CHECK(ey < 1e-5 && ep < 1e-5, "%s: bfloat16 rows forward off the rounded operands' by %.3e / %.3e", tag, ey, ep);
    // ranges split inside a tile give the same bits (each range converts its own tiles)
    rbe_rows_forward_bf16(y1, p1, NULL, Xh, &W, &P, rsc, bias, RBE_ACT_GELU, s, sr, NULL, T, nr / 2 + 1, nr);
    rbe_rows_forward_bf16(y1, p1, NULL, Xh, &W, &P, rsc, bias, RBE_ACT_GELU, s, sr, NULL, T, 0, nr / 2 + 1);
    CHECK(!memcmp(y1, y2, sizeof(float) * T * out), "%s: bfloat16 rows forward depends on the ranges", tag);
    // one item a call, as a thread takes them (its own share from the front, then another's from the
    // back), the rounded tile kept between the calls (rbe.h): the same bits
    long rounded = -1;
    memset(y1, 0, sizeof(float) * T * out);
    for (long p = 0; p < nr / 2; p++)
        rbe_rows_forward_bf16(y1, p1, NULL, Xh, &W, &P, rsc, bias, RBE_ACT_GELU, s, sr, &rounded, T, p, p + 1);
    for (long p = nr - 1; p >= nr / 2; p--)
        rbe_rows_forward_bf16(y1, p1, NULL, Xh, &W, &P, rsc, bias, RBE_ACT_GELU, s, sr, &rounded, T, p, p + 1);
    CHECK(!memcmp(y1, y2, sizeof(float) * T * out), "%s: bfloat16 rows forward item by item differs", tag);
    float *d1 = xmalloc(sizeof(float) * T * in), *d2 = xmalloc(sizeof(float) * T * in);
    rbe_x86_avx512.cols_backward(d1, Gr, &W, &P, &cr, s, T, 0, nc);
    rbe_cols_backward_bf16(d2, Gh, &W, &P, csc, s, sc, NULL, T, 0, nc);
    const double ed = rel_err(d2, d1, (size_t)T * in, 1);
    CHECK(ed < 1e-5, "%s: bfloat16 columns backward off the rounded operands' by %.3e", tag, ed);
    rbe_cols_backward_bf16(d1, Gh, &W, &P, csc, s, sc, NULL, T, nc / 2 + 1, nc);
    rbe_cols_backward_bf16(d1, Gh, &W, &P, csc, s, sc, NULL, T, 0, nc / 2 + 1);
    CHECK(!memcmp(d1, d2, sizeof(float) * T * in), "%s: bfloat16 columns backward depends on the ranges", tag);
    rounded = -1;
    memset(d1, 0, sizeof(float) * T * in);
    for (long p = 0; p < nc / 2; p++) rbe_cols_backward_bf16(d1, Gh, &W, &P, csc, s, sc, &rounded, T, p, p + 1);
    for (long p = nc - 1; p >= nc / 2; p--) rbe_cols_backward_bf16(d1, Gh, &W, &P, csc, s, sc, &rounded, T, p, p + 1);
    CHECK(!memcmp(d1, d2, sizeof(float) * T * in), "%s: bfloat16 columns backward item by item differs", tag);
    free(Gr), free(Xr), free(rv), free(cv), free(s), free(sr), free(sc), free(y1), free(y2), free(p1), free(p2);
    free(d1), free(d2);
}

// mode 0: float64; 1: float32, the portable kernels; 2: float32 without schedules (the x86 kernels'
// block-by-block paths); 3: with the run-grouped schedules. Modes 2 and 3 call the x86 kernels
// g_x86 directly, or (g_x86 NULL) the dispatching entry points.
static void linear_case(int mode, long T, int out, int in, int b, int k, int wide) {
    const int f32 = mode > 0;
    g_portable = mode == 1;
    const int R = cdiv(out, b), C = cdiv(in, b);
    const long nblk = (long)R * C, ntiles = (T + RBE_TILE - 1) / RBE_TILE;
    const size_t es = esize(f32), bb = (size_t)b * b;
    const double tol = f32 ? 1e-4 : 1e-10;
    char tag[128];
    snprintf(tag, sizeof tag, "%s%s%s T=%ld out=%d in=%d b=%d k=%d wide=%d",
             mode == 0 ? "f64" : mode == 1 ? "f32 portable" : mode == 2 ? "f32 unscheduled" : "f32 scheduled",
             mode >= 2 ? " " : "", mode >= 2 ? (g_x86 ? g_x86->name : "dispatch") : "", T, out, in, b, k, wide);

    // plan as the Python layer builds it: tol 1e-15 for float64, 1e-9 for float32
    double* pland = xmalloc(sizeof(double) * 3 * (2 * b + 4) * b);
    double* pwork = xmalloc(sizeof(double) * (3 * bb + b));
    const int nf = rbe_plan_build(pland, pwork, b, f32 ? 1e-9 : 1e-15);
    const int rows = b + nf;
    void* plan = to_t(pland, 3 * (size_t)rows * b, f32);
    double* tabs = codec_tables(b);

    // random weight, inputs, bias, upstream gradient
    double* tmp = xmalloc(sizeof(double) * ((size_t)T * (out > in ? out : in) + nblk * (8 + k) + out + 8));
    fill_normal(tmp, nblk * 8);
    void* basis = to_t(tmp, nblk * 8, f32);
    fill_normal(tmp, nblk * k);
    void* coeffs = to_t(tmp, nblk * k, f32);
    void* ix = random_index(nblk, k, b, wide);
    fill_normal(tmp, (size_t)T * in);
    void* x = to_t(tmp, (size_t)T * in, f32);
    fill_normal(tmp, out);
    void* bias = to_t(tmp, out, f32);
    fill_normal(tmp, (size_t)T * out);
    void* g = to_t(tmp, (size_t)T * out, f32);

    const size_t nscr = rbe_rows_scratch(b, nf);
    void* scratch = xmalloc(nscr * es);
    void* Xh = xmalloc((size_t)ntiles * C * rows * RBE_TILE * es);
    void* Gh = xmalloc((size_t)ntiles * R * rows * RBE_TILE * es);
    double* rwork = xmalloc(sizeof(double) * 2 * (size_t)out * in);
    void* y = xmalloc((size_t)T * out * es);
    void* pre = xmalloc((size_t)T * out * es);
    // the run schedules (mode 3)
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    int32_t* rs_start = xmalloc(sizeof(int32_t) * R * (b + 1));
    int32_t* cs_start = xmalloc(sizeof(int32_t) * C * (b + 1));
    int32_t* rs_off = xmalloc(sizeof(int32_t) * nblk * k + 4);
    int32_t* cs_off = xmalloc(sizeof(int32_t) * nblk * k + 4);
    int32_t* rs_pos = xmalloc(sizeof(int32_t) * nblk * k + 4);
    float* rs_val = xmalloc(sizeof(float) * nblk * k + 4);
    float* cs_val = xmalloc(sizeof(float) * nblk * k + 4);
    float* rs_acc = xmalloc(sizeof(float) * nblk * k + 4);
    rbe_sched_f32 rsched = {rs_start, rs_off, rs_val, rs_pos, rs_acc}, csched = {cs_start, cs_off, cs_val, NULL, NULL};
    const rbe_sched_f32 *rsc = NULL, *csc = NULL;
    if (mode == 3) {
        rbe_schedule_f32(rs_start, rs_off, rs_val, rs_pos, &W32, nf, 0, 1.0f, 0, R);
        rbe_schedule_f32(cs_start, cs_off, cs_val, NULL, &W32, nf, 1, 1.0f, 0, C);
        rsc = &rsched, csc = &csched;
    }
    void* yr = xmalloc((size_t)T * out * es);
    void* prer = xmalloc((size_t)T * out * es);

    // forward, every activation, with and without bias / pre
    analysis_t(f32, Xh, x, plan, 0, scratch, T, in, b, nf, 0, ntiles * C);
    for (int act = RBE_ACT_NONE; act <= RBE_ACT_SILU; act++) {
        const void* bs = act % 2 ? bias : NULL;
        rows_t(f32, rsc, y, pre, NULL, Xh, plan, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k, 0, ntiles * R);
        fwd_ref_t(f32, yr, prer, x, basis, coeffs, ix, wide, bs, act, tabs, rwork, T, out, in, b, k);
        double ey = rel_err(y, yr, (size_t)T * out, f32), ep = rel_err(pre, prer, (size_t)T * out, f32);
        CHECK(ey < tol, "%s act=%d: forward (post-activation) off by %.3e", tag, act, ey);
        CHECK(ep < tol, "%s act=%d: forward pre-activation off by %.3e", tag, act, ep);
        // pre = NULL gives the same y; split work ranges give the same bytes
        void* y2 = xmalloc((size_t)T * out * es);
        long items = ntiles * R, mid = items / 2 + (items > 1);
        rows_t(f32, rsc, y2, NULL, NULL, Xh, plan, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k, mid, items);
        rows_t(f32, rsc, y2, NULL, NULL, Xh, plan, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k, 0, mid);
        CHECK(!memcmp(y, y2, (size_t)T * out * es), "%s act=%d: split / pre=NULL forward differs", tag, act);
        // RBE_ACT_PRE_GRAD: the same y, and pre = act'(the pre-activation above), bitwise
        {
            void* g = xmalloc((size_t)T * out * es);
            void* gr = xmalloc((size_t)T * out * es);
            void* ones = xmalloc((size_t)T * out * es);
            for (size_t e = 0; e < (size_t)T * out; e++) {
                if (f32) ((float*)ones)[e] = 1.0f;
                else ((double*)ones)[e] = 1.0;
            }
            rows_t(f32, rsc, y2, g, NULL, Xh, plan, basis, coeffs, ix, wide, bs, act | RBE_ACT_PRE_GRAD, scratch, T,
                   out, in, b, nf, k, 0, items);
            if (f32) rbe_act_backward_f32(gr, ones, pre, (long)T * out, act);
            else rbe_act_backward_f64(gr, ones, pre, (long)T * out, act);
            CHECK(!memcmp(y, y2, (size_t)T * out * es), "%s act=%d: forward with RBE_ACT_PRE_GRAD differs", tag, act);
            CHECK(!memcmp(g, gr, (size_t)T * out * es), "%s act=%d: RBE_ACT_PRE_GRAD pre is not act'(pre)", tag, act);
            // and with Xnext instead of y (the checkpointed backward's recompute): the same Xnext
            const size_t nxn = (size_t)ntiles * R * rows * RBE_TILE;
            void* Xa = xmalloc(nxn * es);
            void* Xb = xmalloc(nxn * es);
            memset(Xa, 0, nxn * es), memset(Xb, 0, nxn * es);
            rows_t(f32, rsc, NULL, NULL, Xa, Xh, plan, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k,
                   0, items);
            rows_t(f32, rsc, NULL, g, Xb, Xh, plan, basis, coeffs, ix, wide, bs, act | RBE_ACT_PRE_GRAD, scratch, T,
                   out, in, b, nf, k, 0, items);
            CHECK(!memcmp(Xa, Xb, nxn * es), "%s act=%d: Xnext with RBE_ACT_PRE_GRAD differs", tag, act);
            CHECK(!memcmp(g, gr, (size_t)T * out * es), "%s act=%d: RBE_ACT_PRE_GRAD pre (with Xnext) differs", tag, act);
            // RBE_ACT_PRE_TILES: the same act' in tiles [ntiles, R, b, TILE], zero past T and out; the
            // same Xnext
            const size_t ntl = (size_t)ntiles * R * b * RBE_TILE;
            void* gt = xmalloc(ntl * es);
            memset(gt, 0xff, ntl * es);  // NaN: every number must be written
            memset(Xb, 0, nxn * es);
            rows_t(f32, rsc, NULL, gt, Xb, Xh, plan, basis, coeffs, ix, wide, bs,
                   act | RBE_ACT_PRE_GRAD | RBE_ACT_PRE_TILES, scratch, T, out, in, b, nf, k, 0, items);
            CHECK(!memcmp(Xa, Xb, nxn * es), "%s act=%d: Xnext with RBE_ACT_PRE_TILES differs", tag, act);
            int same = 1;
            for (long tile = 0; tile < ntiles; tile++)
                for (int i = 0; i < R; i++)
                    for (int r = 0; r < b; r++)
                        for (int t = 0; t < RBE_TILE; t++) {
                            const size_t o = (((size_t)tile * R + i) * b + r) * RBE_TILE + t;
                            const long tok = tile * RBE_TILE + t;
                            const int f = i * b + r;
                            const int inside = tok < T && f < out;
                            const size_t src = (size_t)tok * out + f;
                            if (f32) same &= inside ? ((float*)gt)[o] == ((float*)g)[src] || ((float*)g)[src] != ((float*)g)[src]
                                                    : ((float*)gt)[o] == 0.0f;
                            else same &= inside ? ((double*)gt)[o] == ((double*)g)[src] || ((double*)g)[src] != ((double*)g)[src]
                                                : ((double*)gt)[o] == 0.0;
                        }
            CHECK(same, "%s act=%d: RBE_ACT_PRE_TILES pre is not act' in tiles", tag, act);
            free(gt);
            free(Xa), free(Xb);
            free(g), free(gr), free(ones);
        }
        // Xnext (y = NULL): the next layer's analysis of the activated output, as if y were analysed
        void* Xn = xmalloc((size_t)ntiles * R * rows * RBE_TILE * es);
        void* Xy = xmalloc((size_t)ntiles * R * rows * RBE_TILE * es);
        rows_t(f32, rsc, NULL, NULL, Xn, Xh, plan, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k, 0,
               items);
        analysis_t(f32, Xy, y, plan, 0, scratch, T, out, b, nf, 0, ntiles * R);
        double exn = 0.0, sxn = 0.0;
        for (long p = 0; p < ntiles * R; p++)
            for (int m = 0; m < rows; m++)
                for (int t = 0; t < RBE_TILE && (p / R) * RBE_TILE + t < T; t++) {  // real tokens only
                    size_t o = ((size_t)p * rows + m) * RBE_TILE + t;
                    double a = f32 ? ((float*)Xn)[o] : ((double*)Xn)[o], r = f32 ? ((float*)Xy)[o] : ((double*)Xy)[o];
                    exn = fmax(exn, fabs(a - r)), sxn = fmax(sxn, fabs(r));
                }
        CHECK(exn <= (f32 ? 1e-5 : 1e-12) * fmax(1.0, sxn), "%s act=%d: Xnext differs from the analysis of y by %.3e",
              tag, act, exn);
        free(Xn), free(Xy);
        free(y2);
    }

    // backward
    void* dx = xmalloc((size_t)T * in * es);
    void* db = xmalloc(nblk * 8 * es);
    void* dc = xmalloc(nblk * k * es + 1);
    void* dbias = xmalloc(out * es);
    void* dxr = xmalloc((size_t)T * in * es);
    void* dbr = xmalloc(nblk * 8 * es);
    void* dcr = xmalloc(nblk * k * es + 1);
    void* dbiasr = xmalloc(out * es);
    analysis_t(f32, Gh, g, plan, 1, scratch, T, out, b, nf, 0, ntiles * R);
    cols_t(f32, csc, dx, Gh, plan, basis, coeffs, ix, wide, scratch, T, out, in, b, nf, k, 0, ntiles * C);
    params_t(f32, rsc, db, dc, Gh, Xh, ix, wide, 0, T, out, in, b, nf, k, 0, R);
    bias_t(f32, dbias, g, T, out, 0, 0, out);
    bwd_ref_t(f32, dxr, dbr, dcr, dbiasr, g, x, basis, coeffs, ix, wide, tabs, rwork, T, out, in, b, k);
    double edx = rel_err(dx, dxr, (size_t)T * in, f32), edb = rel_err(db, dbr, nblk * 8, f32);
    double edc = rel_err(dc, dcr, nblk * k, f32), edbias = rel_err(dbias, dbiasr, out, f32);
    CHECK(edx < tol, "%s: dx off by %.3e", tag, edx);
    CHECK(edb < tol, "%s: dbasis off by %.3e", tag, edb);
    CHECK(edc < tol, "%s: dcoeffs off by %.3e", tag, edc);
    CHECK(edbias < tol, "%s: dbias off by %.3e", tag, edbias);
    if (mode == 3 && rsc) {
        bf16_grads_case(tag, rsc, db, dc, Gh, Xh, ix, wide, T, out, in, b, nf, k);
        bf16_products_case(tag, rsc, csc, plan, basis, bias, Gh, Xh, T, out, in, b, nf, k);
    }

    // the input gradient and the coefficient gradient in one pass (cols_coeffs_backward: block
    // columns, every tile): dx and dcoeffs the two-pass bytes (each entry's chain and lane sum are
    // params_sched's, whichever entries share a reduction); split ranges give the same bytes, and
    // accumulate = 1 adds (exactly twice)
    if (mode == 3 && g_x86 && rsc) {
        int32_t* cp_pos = xmalloc(sizeof(int32_t) * nblk * k + 4);
        float* cp_acc = xmalloc(sizeof(float) * nblk * k + 4);
        const rbe_sched_f32 cps = {cs_start, cs_off, cs_val, cp_pos, cp_acc};
        rbe_schedule_f32(cs_start, cs_off, cs_val, cp_pos, &W32, nf, 1, 1.0f, 0, C);
        const rbe_weight_f32 Ws = w32(basis, NULL, NULL, 1, out, in, b, k);  // coefficients from the schedule
        const rbe_plan_f32 P32 = rbe_plan_view_f32(plan, b, nf);
        float* dx3 = xmalloc((size_t)T * in * es);
        float* dc3 = xmalloc(nblk * k * es + 1);
        float* dc4 = xmalloc(nblk * k * es + 1);
        g_x86->cols_coeffs_backward(dx3, dc3, NULL, Gh, Xh, &Ws, &P32, &cps, 0, scratch, T, C / 2, C);
        g_x86->cols_coeffs_backward(dx3, dc3, NULL, Gh, Xh, &Ws, &P32, &cps, 0, scratch, T, 0, C / 2);
        CHECK(!memcmp(dx3, dx, (size_t)T * in * es), "%s: one-pass dx differs from cols_backward's", tag);
        CHECK(!memcmp(dc3, dc, nblk * k * es), "%s: one-pass dcoeffs differ from params_backward's", tag);
        memcpy(dc4, dc3, nblk * k * es);
        g_x86->cols_coeffs_backward(dx3, dc4, NULL, Gh, Xh, &Ws, &P32, &cps, 1, scratch, T, 0, C);
        int twice = 1;
        for (long q = 0; q < nblk * k; q++) twice &= dc4[q] == 2 * dc3[q];
        CHECK(twice, "%s: one-pass dcoeffs with accumulate = 1 are not twice", tag);
        // dx handed on (rbe_grad_next_f32) instead of stored: the bits of dh = dx * dact, its bias
        // sums (fresh, and continuing given sums) and its analysis with the S rows, as the separate
        // kernels give them; the same dcoeffs; NULL dbias skipped; split ranges give the same bytes
        {
            const size_t nd = (size_t)T * in, ngh = (size_t)ntiles * C * rows * RBE_TILE;
            const size_t nat = (size_t)ntiles * C * b * RBE_TILE;
            float* dact = xmalloc(nat * es);  // act'(h) in tiles: [ntiles, C, b, TILE]
            float* dh = xmalloc(nd * es);
            float* Ghr = xmalloc(ngh * es);
            float* Ghn = xmalloc(ngh * es);
            float* dbr = xmalloc(in * es);
            float* dbn = xmalloc(in * es);
            for (size_t e = 0; e < nat; e++) dact[e] = (float)rng_normal();  // (past T and in: not read)
            for (long t = 0; t < T; t++)
                for (int f = 0; f < in; f++)
                    dh[(size_t)t * in + f] = dx3[(size_t)t * in + f] *
                        dact[((((size_t)(t / RBE_TILE) * C + f / b) * b) + f % b) * RBE_TILE + t % RBE_TILE];
            analysis_t(1, Ghr, dh, plan, 1, scratch, T, in, b, nf, 0, ntiles * C);
            for (int fresh = 0; fresh < 2; fresh++) {
                for (int c = 0; c < in; c++) dbr[c] = dbn[c] = fresh ? NAN : (float)rng_normal();
                bias_t(1, dbr, dh, T, in, !fresh, 0, in);
                memset(Ghn, 0xff, ngh * es);  // NaN: every number must be written
                const rbe_grad_next_f32 nx = {dact, Ghn, dbn, !fresh};
                g_x86->cols_coeffs_backward(NULL, dc4, &nx, Gh, Xh, &Ws, &P32, &cps, 0, scratch, T, C / 2, C);
                g_x86->cols_coeffs_backward(NULL, dc4, &nx, Gh, Xh, &Ws, &P32, &cps, 0, scratch, T, 0, C / 2);
                CHECK(!memcmp(Ghn, Ghr, ngh * es), "%s: dx handed on (fresh=%d): its analysis differs", tag, fresh);
                CHECK(!memcmp(dbn, dbr, in * es), "%s: dx handed on (fresh=%d): its bias sums differ", tag, fresh);
                CHECK(!memcmp(dc4, dc3, nblk * k * es), "%s: dx handed on (fresh=%d): dcoeffs differ", tag, fresh);
            }
            memset(Ghn, 0xff, ngh * es);
            const rbe_grad_next_f32 nb = {dact, Ghn, NULL, 0};
            g_x86->cols_coeffs_backward(NULL, dc4, &nb, Gh, Xh, &Ws, &P32, &cps, 0, scratch, T, 0, C);
            CHECK(!memcmp(Ghn, Ghr, ngh * es), "%s: dx handed on without dbias: its analysis differs", tag);
            free(dact), free(dh), free(Ghr), free(Ghn), free(dbr), free(dbn);
        }
        // the token range in two calls (a chunked call's chunks: whole tiles, then the rest) with the
        // sums held after the first and continued by the second (RBE_SUMS_*): dcoeffs of one call, and
        // the same for the scheduled parameter gradient (params_sched)
        if (ntiles > 1) {
            const long T1 = (ntiles / 2) * RBE_TILE;
            const size_t gs = (size_t)T1 / RBE_TILE * R * rows * RBE_TILE, xs = (size_t)T1 / RBE_TILE * C * rows * RBE_TILE;
            memset(dc4, 0, nblk * k * es);
            g_x86->cols_coeffs_backward(dx3, dc4, NULL, Gh, Xh, &Ws, &P32, &cps, RBE_SUMS_HOLD, scratch, T1, 0, C);
            g_x86->cols_coeffs_backward(dx3 + (size_t)T1 * in, dc4, NULL, (float*)Gh + gs, (float*)Xh + xs, &Ws, &P32,
                                        &cps, 1 | RBE_SUMS_CONTINUE, scratch, T - T1, 0, C);
            CHECK(!memcmp(dc4, dc3, nblk * k * es), "%s: one-pass dcoeffs over two held calls differ", tag);
            CHECK(!memcmp(dx3, dx, (size_t)T * in * es), "%s: one-pass dx over two calls differs", tag);
            const rbe_weight_f32 Wr = w32(NULL, NULL, ix, wide, out, in, b, k);
            const rbe_plan_f32 Pr = {NULL, NULL, NULL, b, nf};
            float* db5 = xmalloc(nblk * 8 * es);
            memset(dc4, 0, nblk * k * es);
            g_x86->params_backward(db5, dc4, Gh, Xh, &Wr, &Pr, rsc, RBE_SUMS_HOLD, T1, 0, R);
            g_x86->params_backward(db5, dc4, (float*)Gh + gs, (float*)Xh + xs, &Wr, &Pr, rsc, 1 | RBE_SUMS_CONTINUE,
                                   T - T1, 0, R);
            CHECK(!memcmp(dc4, dc, nblk * k * es), "%s: scheduled dcoeffs over two held calls differ", tag);
            free(db5);
        }
        free(cp_pos), free(cp_acc), free(dx3), free(dc3), free(dc4);
    }

    // accumulate = 1 adds to what is there (twice the gradient), NULL outputs are skipped, ranges split
    params_t(f32, rsc, db, NULL, Gh, Xh, ix, wide, 1, T, out, in, b, nf, k, 0, R / 2);  // block rows
    params_t(f32, rsc, db, NULL, Gh, Xh, ix, wide, 1, T, out, in, b, nf, k, R / 2, R);
    params_t(f32, rsc, NULL, dc, Gh, Xh, ix, wide, 1, T, out, in, b, nf, k, 0, R);
    bias_t(f32, dbias, g, T, out, 1, 0, out / 2);
    bias_t(f32, dbias, g, T, out, 1, out / 2, out);
    {
        double* t1 = xmalloc(sizeof(double) * (nblk * (8 + k) + out));
        double* t2 = xmalloc(sizeof(double) * (nblk * (8 + k) + out));
        from_t(t1, db, nblk * 8, f32);
        from_t(t1 + nblk * 8, dc, nblk * k, f32);
        from_t(t1 + nblk * (8 + k), dbias, out, f32);
        from_t(t2, dbr, nblk * 8, f32);
        from_t(t2 + nblk * 8, dcr, nblk * k, f32);
        from_t(t2 + nblk * (8 + k), dbiasr, out, f32);
        size_t nt = nblk * (8 + k) + out;
        for (size_t i = 0; i < nt; i++) t2[i] *= 2.0;
        double e = max_diff(t1, t2, nt) / fmax(1.0, max_abs(t2, nt));
        CHECK(e < 2 * tol, "%s: accumulate=1 does not add (%.3e)", tag, e);
        free(t1);
        free(t2);
    }
    // dx over split ranges is the same bytes
    {
        void* dx2 = xmalloc((size_t)T * in * es);
        long items = ntiles * C, mid = items / 2 + (items > 1);
        cols_t(f32, csc, dx2, Gh, plan, basis, coeffs, ix, wide, scratch, T, out, in, b, nf, k, mid, items);
        cols_t(f32, csc, dx2, Gh, plan, basis, coeffs, ix, wide, scratch, T, out, in, b, nf, k, 0, mid);
        CHECK(!memcmp(dx, dx2, (size_t)T * in * es), "%s: split dx differs", tag);
        free(dx2);
    }

    // The x86 kernels' lanes (rbe_x86_impl.h): a tile of T <= 16 tokens runs on 16 lanes, the same
    // tokens followed by zero tokens (up to 20) on all 64, with the same bits for the real tokens;
    // and the AVX-512 products give the AVX2 bits (each lane the same chain), their lane sums
    // (the parameter gradient) the same values within rounding.
    if (f32 && g_x86) {
        const rbe_x86_kernels_f32* ks = g_x86;
        const int dead = T <= 16, cross = ks == &rbe_x86_avx512 && rbe_cpu_has_avx2();
        const long T2 = dead ? 20 : T, nt2 = (T2 + RBE_TILE - 1) / RBE_TILE;
        float* x2 = calloc((size_t)T2 * in + 1, sizeof(float));
        float* g2 = calloc((size_t)T2 * out + 1, sizeof(float));
        memcpy(x2, x, (size_t)T * in * es), memcpy(g2, g, (size_t)T * out * es);
        float* Xh2 = xmalloc((size_t)nt2 * C * rows * RBE_TILE * es);
        float* Gh2 = xmalloc((size_t)nt2 * R * rows * RBE_TILE * es);
        float *y1 = xmalloc((size_t)T * out * es), *y2 = xmalloc((size_t)T2 * out * es);
        float *dx1 = xmalloc((size_t)T * in * es), *dx2 = xmalloc((size_t)T2 * in * es);
        float *db1 = xmalloc(nblk * 8 * es), *db2 = xmalloc(nblk * 8 * es);
        float *dc1 = xmalloc(nblk * k * es + 1), *dc2 = xmalloc(nblk * k * es + 1);
        const int act = RBE_ACT_GELU;
        // reference outputs: these kernels on T tokens; then, on T2 tokens (dead) or with AVX2 (cross)
        rows_t(1, rsc, y1, NULL, NULL, Xh, plan, basis, coeffs, ix, wide, bias, act, scratch, T, out, in, b, nf, k, 0,
               ntiles * R);
        cols_t(1, csc, dx1, Gh, plan, basis, coeffs, ix, wide, scratch, T, out, in, b, nf, k, 0, ntiles * C);
        params_t(1, rsc, db1, dc1, Gh, Xh, ix, wide, 0, T, out, in, b, nf, k, 0, R);
        for (int pass = 0; pass < 2; pass++) {
            if (pass == 0 && !dead) continue;
            if (pass == 1 && !cross) continue;
            const long Tp = pass == 0 ? T2 : T, ntp = (Tp + RBE_TILE - 1) / RBE_TILE;
            g_x86 = pass == 0 ? ks : &rbe_x86_avx2;
            analysis_t(1, Xh2, pass == 0 ? x2 : x, plan, 0, scratch, Tp, in, b, nf, 0, ntp * C);
            analysis_t(1, Gh2, pass == 0 ? g2 : g, plan, 1, scratch, Tp, out, b, nf, 0, ntp * R);
            rows_t(1, rsc, y2, NULL, NULL, Xh2, plan, basis, coeffs, ix, wide, bias, act, scratch, Tp, out, in, b, nf, k,
                   0, ntp * R);
            cols_t(1, csc, dx2, Gh2, plan, basis, coeffs, ix, wide, scratch, Tp, out, in, b, nf, k, 0, ntp * C);
            params_t(1, rsc, db2, dc2, Gh2, Xh2, ix, wide, 0, Tp, out, in, b, nf, k, 0, R);
            const char* what = pass == 0 ? "16 lanes vs 64 (zero tokens appended)" : "avx512 vs avx2";
            CHECK(!memcmp(y1, y2, (size_t)T * out * es), "%s: %s: forward differs", tag, what);
            CHECK(!memcmp(dx1, dx2, (size_t)T * in * es), "%s: %s: dx differs", tag, what);
            if (pass == 0) {
                CHECK(!memcmp(db1, db2, nblk * 8 * es), "%s: %s: dbasis differs", tag, what);
                CHECK(!memcmp(dc1, dc2, nblk * k * es), "%s: %s: dcoeffs differs", tag, what);
            } else {
                double eb = rel_err(db1, db2, nblk * 8, 1), ec = rel_err(dc1, dc2, nblk * k, 1);
                CHECK(eb < 1e-5 && ec < 1e-5, "%s: %s: dbasis off by %.3e, dcoeffs by %.3e", tag, what, eb, ec);
            }
        }
        g_x86 = ks;
        free(x2), free(g2), free(Xh2), free(Gh2), free(y1), free(y2), free(dx1), free(dx2);
        free(db1), free(db2), free(dc1), free(dc2);
    }

    free(pland), free(pwork), free(plan), free(tabs), free(tmp), free(basis), free(coeffs), free(ix), free(x);
    free(bias), free(g), free(scratch), free(Xh), free(Gh), free(rwork), free(y), free(pre), free(yr), free(prer);
    free(dx), free(db), free(dc), free(dbias), free(dxr), free(dbr), free(dcr), free(dbiasr);
    free(rs_start), free(cs_start), free(rs_off), free(cs_off), free(rs_pos);
    free(rs_val), free(cs_val), free(rs_acc);
}

static void linear_cases(int mode) {
    linear_case(mode, 5, 37, 10, 8, 5, 0);
    linear_case(mode, 70, 20, 33, 16, 40, 0);    // two token tiles
    linear_case(mode, 1, 9, 6, 4, 16, 1);        // b = 4, every coefficient, int32 index
    linear_case(mode, 64, 8, 8, 8, 0, 0);        // k = 0: pattern only, exactly one tile
    linear_case(mode, 130, 70, 65, 64, 300, 0);  // b = 64, three tiles, edge blocks
    linear_case(mode, 66, 40, 100, 48, 30, 0);   // b = 48: the fast DCT recurses 48 -> 24 -> 12 -> 6 -> 3
    linear_case(mode, 64, 24, 24, 24, 20, 0);    // b = 24, full tile (vector transposes)
    linear_case(mode, 16, 70, 65, 64, 300, 0);   // 16 tokens: the 16-lane tile
    linear_case(mode, 17, 70, 65, 64, 300, 0);   // 17: a full-width tile again
    linear_case(mode, 80, 40, 100, 48, 30, 0);   // a full tile, then a 16-lane one
    linear_case(mode, 7, 200, 130, 32, 90, 0);   // many rows per block in gemm_tile's remainders
    linear_case(mode, 70, 23, 19, 9, 12, 0);     // b = 9: odd, the pattern rows project whole vectors
}

// Every float32 variant this CPU has, each called directly (the portable and AVX2 kernels stay
// tested where the entry points choose AVX-512), then the entry points themselves.
static void test_linear(void) {
    const rbe_x86_kernels_f32* sets[2];
    int nsets = 0;
#ifdef RBE_X86_KERNELS
    if (rbe_cpu_has_avx2()) sets[nsets++] = &rbe_x86_avx2;
    if (rbe_cpu_has_avx512()) sets[nsets++] = &rbe_x86_avx512;
#endif
    printf("  (float32 kernels tested: portable%s%s%s; the entry points run %s)\n", nsets ? ", " : "",
           nsets ? sets[0]->name : "", nsets > 1 ? ", avx512" : "", rbe_cpu_isa());
    for (int mode = 0; mode <= 1; mode++) linear_cases(mode);
    for (int s = 0; s < nsets; s++) {
        g_x86 = sets[s];
        linear_cases(2);
        linear_cases(3);
        linear_case(2, 3, 20, 260, 256, 50, 1);  // b = 256 (int32 index), wide edge, on 16 lanes
        linear_case(3, 3, 20, 260, 256, 50, 1);
        linear_case(3, 65, 20, 260, 256, 50, 1);
        linear_case(2, 65, 20, 260, 256, 50, 1);
    }
    g_x86 = NULL;  // the entry points (whatever they choose here)
    linear_case(0, 3, 20, 260, 256, 50, 1);
    linear_case(2, 5, 37, 10, 8, 5, 0);
    linear_case(3, 70, 20, 33, 16, 40, 0);
    linear_case(2, 130, 70, 65, 64, 300, 0);
    linear_case(3, 130, 70, 65, 64, 300, 0);
}

/* ---------------------------------------------------------------- few tokens vs the references */

// variant 0: float64; 1: float32 portable; 2: the x86 kernels g_x86 directly; 3: the entry points
static void few_analysis_t(int variant, void* Xf, const void* x, const void* At, int b, int nf, long T, int n,
                           long p0, long p1) {
    if (variant == 0) rbe_few_analysis_f64(Xf, x, At, b, nf, T, n, p0, p1);
    else if (variant == 1) rbe_few_analysis_f32_portable(Xf, x, At, b, nf, T, n, p0, p1);
#ifdef RBE_X86_KERNELS
    else if (variant == 2) g_x86->few_analysis(Xf, x, At, b, nf, T, n, p0, p1);
#endif
    else rbe_few_analysis_f32(Xf, x, At, b, nf, T, n, p0, p1);
}
static void few_rows_t(int variant, void* y, void* pre, void* Xn, const void* Xf, const void* plan, const void* At,
                       const void* basis, const void* coeffs, const void* ix, int wide, const void* bias, int act,
                       void* s, long T, int out, int in, int b, int nf, int k, long p0, long p1) {
    const rbe_weight_f32 W32 = w32(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_weight_f64 W64 = w64(basis, coeffs, ix, wide, out, in, b, k);
    const rbe_plan_f32 P32 = rbe_plan_view_f32(plan, b, nf);
    const rbe_plan_f64 P64 = rbe_plan_view_f64(plan, b, nf);
    if (variant == 0) rbe_few_rows_forward_f64(y, pre, Xn, Xf, &W64, &P64, At, bias, act, s, T, p0, p1);
    else if (variant == 1) rbe_few_rows_forward_f32_portable(y, pre, Xn, Xf, &W32, &P32, At, bias, act, s, T, p0, p1);
#ifdef RBE_X86_KERNELS
    else if (variant == 2) g_x86->few_rows_forward(y, pre, Xn, Xf, &W32, &P32, At, bias, act, s, T, p0, p1);
#endif
    else rbe_few_rows_forward_f32(y, pre, Xn, Xf, &W32, &P32, At, bias, act, s, T, p0, p1);
}

// The few-token forward (rbe.h) against the naive reference: every activation, bias on and off,
// pre; split work ranges give the same bytes; Xnext is the few-token analysis of y; each token's
// results are those of a call with that token alone (bitwise); the slack is set; AVX-512 gives
// the AVX2 bits.
static void few_case(int variant, long T, int out, int in, int b, int k, int wide) {
    const int f32 = variant > 0;
    g_portable = 0;
    const int R = cdiv(out, b), C = cdiv(in, b);
    const long nblk = (long)R * C;
    const size_t es = esize(f32), bb = (size_t)b * b;
    const double tol = f32 ? 1e-4 : 1e-10;
    char tag[128];
    snprintf(tag, sizeof tag, "few %s T=%ld out=%d in=%d b=%d k=%d wide=%d",
             variant == 0 ? "f64" : variant == 1 ? "f32 portable" : variant == 2 ? g_x86->name : "f32 dispatch", T,
             out, in, b, k, wide);
    double* pland = xmalloc(sizeof(double) * 3 * (2 * b + 4) * b);
    double* pwork = xmalloc(sizeof(double) * (3 * bb + b));
    const int nf = rbe_plan_build(pland, pwork, b, f32 ? 1e-9 : 1e-15);
    const int rows = b + nf;
    void* plan = to_t(pland, 3 * (size_t)rows * b, f32);
    void* At = xmalloc((size_t)b * rows * es);
    if (f32) {
        const rbe_plan_f32 P = rbe_plan_view_f32(plan, b, nf);
        rbe_few_at_f32(At, &P);
    } else {
        const rbe_plan_f64 P = rbe_plan_view_f64(plan, b, nf);
        rbe_few_at_f64(At, &P);
    }
    double* tabs = codec_tables(b);
    double* tmp = xmalloc(sizeof(double) * ((size_t)T * (out > in ? out : in) + nblk * (8 + k) + out + 8));
    fill_normal(tmp, nblk * 8);
    void* basis = to_t(tmp, nblk * 8, f32);
    fill_normal(tmp, nblk * k);
    void* coeffs = to_t(tmp, nblk * k, f32);
    void* ix = random_index(nblk, k, b, wide);
    fill_normal(tmp, (size_t)T * in);
    void* x = to_t(tmp, (size_t)T * in, f32);
    fill_normal(tmp, out);
    void* bias = to_t(tmp, out, f32);
    const size_t nx = rbe_few_size(in, b, nf, T), ny = rbe_few_size(out, b, nf, T);
    void* Xf = xmalloc(nx * es);
    void* Xf2 = xmalloc(nx * es);
    void* Xn = xmalloc(ny * es);
    void* Xy = xmalloc(ny * es);
    void* scratch = xmalloc(rbe_few_scratch(b, nf) * es);
    double* rwork = xmalloc(sizeof(double) * (size_t)out * in);
    void *y = xmalloc((size_t)T * out * es), *pre = xmalloc((size_t)T * out * es);
    void *y2 = xmalloc((size_t)T * out * es), *yr = xmalloc((size_t)T * out * es), *prer = xmalloc((size_t)T * out * es);
    memset(Xf, 0x7f, nx * es);  // garbage in the slack: the analysis must set it
    few_analysis_t(variant, Xf, x, At, b, nf, T, in, 0, C);
    int slack0 = 1;
    for (size_t e = nx - RBE_FEW_SLACK; e < nx; e++) slack0 &= f32 ? ((float*)Xf)[e] == 0 : ((double*)Xf)[e] == 0;
    CHECK(slack0, "%s: the analysis left its slack unset", tag);
    few_analysis_t(variant, Xf2, x, At, b, nf, T, in, C / 2, C);  // split segments: the same bytes
    few_analysis_t(variant, Xf2, x, At, b, nf, T, in, 0, C / 2);
    CHECK(!memcmp(Xf, Xf2, nx * es), "%s: split analysis differs", tag);
    for (int act = RBE_ACT_NONE; act <= RBE_ACT_SILU; act++) {
        const void* bs = act % 2 ? bias : NULL;
        few_rows_t(variant, y, pre, NULL, Xf, plan, At, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf, k,
                   0, R);
        fwd_ref_t(f32, yr, prer, x, basis, coeffs, ix, wide, bs, act, tabs, rwork, T, out, in, b, k);
        double ey = rel_err(y, yr, (size_t)T * out, f32), ep = rel_err(pre, prer, (size_t)T * out, f32);
        CHECK(ey < tol, "%s act=%d: forward off by %.3e", tag, act, ey);
        CHECK(ep < tol, "%s act=%d: pre-activation off by %.3e", tag, act, ep);
        few_rows_t(variant, y2, NULL, NULL, Xf, plan, At, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf,
                   k, R / 2, R);
        few_rows_t(variant, y2, NULL, NULL, Xf, plan, At, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf,
                   k, 0, R / 2);
        CHECK(!memcmp(y, y2, (size_t)T * out * es), "%s act=%d: split / pre=NULL forward differs", tag, act);
        memset(Xn, 0x7f, ny * es);
        few_rows_t(variant, NULL, NULL, Xn, Xf, plan, At, basis, coeffs, ix, wide, bs, act, scratch, T, out, in, b, nf,
                   k, 0, R);
        few_analysis_t(variant, Xy, y, At, b, nf, T, out, 0, R);
        CHECK(!memcmp(Xn, Xy, ny * es), "%s act=%d: Xnext is not the analysis of y", tag, act);
    }
    // token t alone gives token t's bytes (gelu, bias)
    {
        void* x1 = xmalloc((size_t)in * es);
        void* y1 = xmalloc((size_t)out * es);
        void* X1 = xmalloc(rbe_few_size(in, b, nf, 1) * es);
        few_rows_t(variant, y, NULL, NULL, Xf, plan, At, basis, coeffs, ix, wide, bias, RBE_ACT_GELU, scratch, T, out,
                   in, b, nf, k, 0, R);
        int same = 1;
        for (long t = 0; t < T; t++) {
            memcpy(x1, (char*)x + (size_t)t * in * es, (size_t)in * es);
            few_analysis_t(variant, X1, x1, At, b, nf, 1, in, 0, C);
            few_rows_t(variant, y1, NULL, NULL, X1, plan, At, basis, coeffs, ix, wide, bias, RBE_ACT_GELU, scratch, 1,
                       out, in, b, nf, k, 0, R);
            same &= !memcmp(y1, (char*)y + (size_t)t * out * es, (size_t)out * es);
        }
        CHECK(same, "%s: a token's results depend on the other tokens", tag);
#ifdef RBE_X86_KERNELS
        if (variant == 2 && g_x86 == &rbe_x86_avx512 && rbe_cpu_has_avx2()) {
            g_x86 = &rbe_x86_avx2;
            few_analysis_t(2, Xf2, x, At, b, nf, T, in, 0, C);
            few_rows_t(2, y2, NULL, NULL, Xf2, plan, At, basis, coeffs, ix, wide, bias, RBE_ACT_GELU, scratch, T, out,
                       in, b, nf, k, 0, R);
            g_x86 = &rbe_x86_avx512;
            CHECK(!memcmp(y, y2, (size_t)T * out * es), "%s: avx512 vs avx2: forward differs", tag);
        }
#endif
        free(x1), free(y1), free(X1);
    }
    free(pland), free(pwork), free(plan), free(At), free(tabs), free(tmp), free(basis), free(coeffs), free(ix);
    free(x), free(bias), free(Xf), free(Xf2), free(Xn), free(Xy), free(scratch), free(rwork), free(y), free(pre);
    free(y2), free(yr), free(prer);
}

static void few_cases(int variant) {
    for (long T = 1; T <= RBE_FEW_MAX; T++) few_case(variant, T, 70, 65, 64, 300, 0);  // b = 64, edge blocks
    few_case(variant, 1, 37, 10, 8, 5, 0);
    few_case(variant, 3, 9, 6, 4, 16, 1);       // b = 4, every coefficient, int32 index
    few_case(variant, 2, 8, 8, 8, 0, 0);        // k = 0: pattern only
    few_case(variant, 5, 40, 100, 48, 30, 0);   // b = 48
    few_case(variant, 12, 40, 100, 48, 30, 0);  // b = 48, 16 lanes
    few_case(variant, 8, 200, 130, 32, 90, 0);  // many block rows, matvec remainders
    few_case(variant, 16, 200, 130, 32, 90, 1); // the same at 16 lanes, int32 index
    few_case(variant, 1, 20, 260, 256, 50, 1);  // b = 256, int32 index
    few_case(variant, 7, 20, 260, 256, 50, 1);
    few_case(variant, 1, 40, 300, 32, 60, 0);   // ten block columns: streams of RBE_FEW_STREAMS, then a tail
    few_case(variant, 6, 40, 300, 32, 60, 0);
    few_case(variant, 1, 40, 250, 48, 30, 1);   // b = 48, six block columns, int32 index
}

static void test_few(void) {
    few_cases(0);
    few_cases(1);
#ifdef RBE_X86_KERNELS
    if (rbe_cpu_has_avx2()) g_x86 = &rbe_x86_avx2, few_cases(2);
    if (rbe_cpu_has_avx512()) g_x86 = &rbe_x86_avx512, few_cases(2);
    g_x86 = NULL;
#endif
    few_case(3, 1, 70, 65, 64, 300, 0);  // the entry points
    few_case(3, 6, 70, 65, 64, 300, 0);
}

/* ---------------------------------------------------------------- one token from a pack */

// the packed layout of a weight (rbe.h), either one: its arrays, and the view the kernels take
typedef struct {
    int32_t* first;
    uint8_t* nstep;
    uint16_t* mask;
    float* val;
    uint8_t* col;
    uint16_t* gsteps;  // RBE_PACK_ROWS
    uint8_t* lane_row;
    uint16_t* src;
    rbe_packed_f32 K;
} pack_buf;

static pack_buf pack_new(int layout, const float* coeffs, const void* ix, int wide, int out, int in, int b, int k) {
    const long R = cdiv(out, b), nblk = R * cdiv(in, b);
    pack_buf p = {0};
    if (layout == RBE_PACK_ROWS) {
        int32_t* work = xmalloc(sizeof(int32_t) * rbe_pack_rows_work(in, b));
        const long steps = rbe_pack_rows_steps(work, ix, wide, out, in, k, b);
        const long groups = R * RBE_FEW_STREAMS * rbe_pack_row_groups(b);
        p.first = xmalloc(sizeof(int32_t) * (R + 1)), p.gsteps = xmalloc(sizeof(uint16_t) * groups);
        p.lane_row = xmalloc((size_t)groups * RBE_PACK_ROW_LANES);
        p.val = xmalloc(sizeof(float) * (steps * RBE_PACK_ROW_LANES + 1));
        p.src = xmalloc(sizeof(uint16_t) * (steps * RBE_PACK_ROW_LANES + 1));
        rbe_pack_rows_f32(p.first, p.gsteps, p.lane_row, p.val, p.src, work, coeffs, ix, wide, out, in, k, b);
        rbe_packed_f32 K = {out, in, b, k, steps, p.first, NULL, NULL, p.val, NULL,
                            RBE_PACK_ROWS, p.gsteps, p.lane_row, p.src};
        p.K = K;
        free(work);
        return p;
    }
    int32_t* work = xmalloc(sizeof(int32_t) * (2 * b + 1));
    const long steps = rbe_pack_steps(work, ix, wide, nblk, k, b);
    p.first = xmalloc(sizeof(int32_t) * (nblk + 1)), p.nstep = xmalloc(nblk * rbe_pack_groups(b));
    p.mask = xmalloc(sizeof(uint16_t) * steps), p.val = xmalloc(sizeof(float) * nblk * k);
    p.col = xmalloc((size_t)steps * RBE_PACK_LANES);
    rbe_pack_f32(p.first, p.nstep, p.mask, p.val, p.col, work, coeffs, ix, wide, nblk, k, b);
    rbe_packed_f32 K = {out, in, b, k, steps, p.first, p.nstep, p.mask, p.val, p.col, RBE_PACK_STEPS, NULL, NULL, NULL};
    p.K = K;
    free(work);
    return p;
}
static void pack_free(pack_buf* p) {
    free(p->first), free(p->nstep), free(p->mask), free(p->val), free(p->col), free(p->gsteps), free(p->lane_row),
        free(p->src);
}
// undo block row i's blocks (RBE_PACK_ROWS) or the last block (RBE_PACK_STEPS) of a pack
static int pack_undo(float* c2, int32_t* i2, const rbe_packed_f32* K, long i0, long i1) {
    if (K->layout != RBE_PACK_ROWS) return rbe_unpack_f32(c2, i2, K, i0, i1);
    int32_t* work = xmalloc(sizeof(int32_t) * rbe_pack_rows_work(K->in, K->b < 1 ? 1 : K->b));
    const int rc = rbe_unpack_rows_f32(c2, i2, work, K, i0, i1);
    free(work);
    return rc;
}

// RBE_PACK_ROWS: a copy of p's arrays, corrupted by kind c (0..9) in its last block row; the
// walk and the undoing must both report every kind but 5, the undoing 5 too
static pack_buf rows_corrupt(const pack_buf* p, int c, int R, int C, int b) {
    const long steps = p->K.steps, n = steps * RBE_PACK_ROW_LANES, groups = (long)R * RBE_FEW_STREAMS *
                                                                            rbe_pack_row_groups(b);
    pack_buf q = *p;
    q.first = xmalloc(sizeof(int32_t) * (R + 1)), memcpy(q.first, p->first, sizeof(int32_t) * (R + 1));
    q.gsteps = xmalloc(sizeof(uint16_t) * groups), memcpy(q.gsteps, p->gsteps, sizeof(uint16_t) * groups);
    q.lane_row = xmalloc(groups * RBE_PACK_ROW_LANES), memcpy(q.lane_row, p->lane_row, groups * RBE_PACK_ROW_LANES);
    q.src = xmalloc(sizeof(uint16_t) * n), memcpy(q.src, p->src, sizeof(uint16_t) * n);
    const long e0 = (long)p->first[R - 1] * RBE_PACK_ROW_LANES;  // the last block row's first entry
    const long g0 = (long)(R - 1) * RBE_FEW_STREAMS * rbe_pack_row_groups(b);
    if (c == 0) q.src[e0] = (uint16_t)(C * b + 1);           // a source past the zero
    if (c == 1) q.first[R] = (int32_t)steps + 1;              // past the steps
    if (c == 2) q.first[R - 1] = -1;
    if (c == 3) q.gsteps[g0]++;                                // one step too many
    if (c == 4) q.lane_row[g0 * RBE_PACK_ROW_LANES] = (uint8_t)b;  // a lane past the rows
    if (c == 5) q.src[e0] = (uint16_t)((q.src[e0] + b) % (C * b));  // another stream's block (when C > 1)
    if (c == 6) q.lane_row[g0 * RBE_PACK_ROW_LANES] = RBE_PACK_NO_ROW;  // a lane with entries loses its row
    if (c == 7) q.lane_row[g0 * RBE_PACK_ROW_LANES + 1] = q.lane_row[g0 * RBE_PACK_ROW_LANES];  // a row twice
    if (c == 8) q.src[e0] = (uint16_t)(C * b);  // a coefficient dropped (made padding)
    if (c == 9) {  // a lane past the rows (b not a multiple of 8) names a row another lane has
        const long gl = g0 + rbe_pack_row_groups(b) - 1;  // the stream's last group
        q.lane_row[gl * RBE_PACK_ROW_LANES + RBE_PACK_ROW_LANES - 1] = q.lane_row[gl * RBE_PACK_ROW_LANES];
    }
    q.K.first = q.first, q.K.gsteps = q.gsteps, q.K.lane_row = q.lane_row, q.K.src = q.src;
    q.nstep = NULL, q.mask = NULL, q.col = NULL, q.val = NULL;
    return q;
}

// A pack (either layout) undoes to the weight's own coefficients and index; the one-token forward
// from it gives the bytes of the x86 few-token forward at T = 1 (y, pre, Xnext; split block rows
// alike) with each x86 kernel set, the AVX-512 one's vector walk included; a corrupted pack is
// reported.
static void pack_case(int out, int in, int b, int k, int wide) {
    const int R = cdiv(out, b), C = cdiv(in, b);
    const long nblk = (long)R * C;
    char tag[112];
    double* pland = xmalloc(sizeof(double) * 3 * (2 * b + 4) * b);
    double* pwork = xmalloc(sizeof(double) * (3 * (size_t)b * b + b));
    const int nf = rbe_plan_build(pland, pwork, b, 1e-9), rows = b + nf;
    float* plan = to_t(pland, 3 * (size_t)rows * b, 1);
    const rbe_plan_f32 P = rbe_plan_view_f32(plan, b, nf);
    float* At = xmalloc(sizeof(float) * b * rows);
    rbe_few_at_f32(At, &P);
    double* tmp = xmalloc(sizeof(double) * (nblk * (8 + k) + in + out + 8));
    fill_normal(tmp, nblk * 8);
    float* basis = to_t(tmp, nblk * 8, 1);
    fill_normal(tmp, nblk * k);
    float* coeffs = to_t(tmp, nblk * k, 1);
    void* ix = random_index(nblk, k, b, wide);
    fill_normal(tmp, in + out);
    float* x = to_t(tmp, in, 1);
    float* bias = to_t(tmp + in, out, 1);
    float* c2 = xmalloc(sizeof(float) * nblk * k);
    int32_t* i2 = xmalloc(sizeof(int32_t) * nblk * k);
    for (int layout = RBE_PACK_STEPS; layout <= RBE_PACK_ROWS; layout++) {
        snprintf(tag, sizeof tag, "pack out=%d in=%d b=%d k=%d wide=%d layout=%d", out, in, b, k, wide, layout);
        pack_buf p = pack_new(layout, coeffs, ix, wide, out, in, b, k);
        const int rowpack = layout == RBE_PACK_ROWS;
        // the round trip
        int same = pack_undo(c2, i2, &p.K, 0, rowpack ? R : nblk) == 0 &&
                   !memcmp(c2, coeffs, sizeof(float) * nblk * k);
        for (long e = 0; e < nblk * k; e++) same &= i2[e] == (wide ? ((int32_t*)ix)[e] : ((int16_t*)ix)[e]);
        CHECK(same, "%s: the pack does not undo to the weight", tag);
        if (rowpack) {  // no step of padding only: each group as long as its longest list, groups longest first
            const int gr = rbe_pack_row_groups(b);
            int tight = 1;
            long step = 0;
            for (long grp = 0; grp < (long)R * RBE_FEW_STREAMS * gr; grp++) {
                const long n = p.gsteps[grp];
                int last = n == 0;
                for (int l = 0; l < RBE_PACK_ROW_LANES && n > 0; l++)
                    last |= p.src[(step + n - 1) * RBE_PACK_ROW_LANES + l] != C * b;
                tight &= last && (grp % gr == 0 || n <= p.gsteps[grp - 1]);
                step += n;
            }
            CHECK(tight && step == p.K.steps, "%s: a group longer than its longest list", tag);
        }
#ifdef RBE_X86_KERNELS
        const rbe_weight_f32 W = w32(basis, coeffs, ix, wide, out, in, b, k);
        const size_t nx = rbe_few_size(in, b, nf, 1), ny = rbe_few_size(out, b, nf, 1);
        float* Xf = xmalloc(sizeof(float) * nx);
        float* scratch = xmalloc(sizeof(float) * rbe_one_scratch(in, b, nf));
        float *y = xmalloc(sizeof(float) * out), *pre = xmalloc(sizeof(float) * out), *Xn = xmalloc(sizeof(float) * ny);
        float *y2 = xmalloc(sizeof(float) * out), *pre2 = xmalloc(sizeof(float) * out),
              *Xn2 = xmalloc(sizeof(float) * ny);
        rbe_few_analysis_f32_portable(Xf, x, At, b, nf, 1, in, 0, C);
        const rbe_x86_kernels_f32* sets[2] = {rbe_cpu_has_avx2() ? &rbe_x86_avx2 : NULL,
                                              rbe_cpu_has_avx512() ? &rbe_x86_avx512 : NULL};
        for (int v = 0; v < 2; v++) {
            const rbe_x86_kernels_f32* ks = sets[v];
            if (!ks) continue;
            const int act = RBE_ACT_GELU;
            ks->few_rows_forward(y, pre, NULL, Xf, &W, &P, At, bias, act, scratch, 1, 0, R);
            ks->few_rows_forward(NULL, NULL, Xn, Xf, &W, &P, At, bias, act, scratch, 1, 0, R);
            memset(y2, 0x7f, sizeof(float) * out), memset(Xn2, 0x7f, sizeof(float) * ny);
            int rc = ks->one_rows_forward(y2, pre2, NULL, Xf, &W, &p.K, &P, At, bias, act, scratch, R / 2, R);
            rc |= ks->one_rows_forward(y2, pre2, NULL, Xf, &W, &p.K, &P, At, bias, act, scratch, 0, R / 2);
            rc |= ks->one_rows_forward(NULL, NULL, Xn2, Xf, &W, &p.K, &P, At, bias, act, scratch, 0, R);
            CHECK(rc == 0, "%s %s: a sound pack reported as corrupted", tag, ks->name);
            CHECK(!memcmp(y, y2, sizeof(float) * out) && !memcmp(pre, pre2, sizeof(float) * out),
                  "%s %s: the packed forward differs from the few-token one", tag, ks->name);
            CHECK(!memcmp(Xn, Xn2, sizeof(float) * ny), "%s %s: the packed Xnext differs", tag, ks->name);
            if (k == 0) continue;
            // corruptions: each must be reported by both walks and by the round trip
            int reported = 1;
            if (rowpack) {
                for (int c = 0; c < 10; c++) {
                    if (c == 5 && C == 1) continue;  // one block column: every source is in its stream
                    if (c == 9 && b % RBE_PACK_ROW_LANES == 0) continue;  // no lane past the rows
                    pack_buf q = rows_corrupt(&p, c, R, C, b);
                    if (c != 5)  // (a source moved within range: only the undoing sees it)
                        reported &= ks->one_rows_forward(y2, NULL, NULL, Xf, &W, &q.K, &P, At, bias, act, scratch,
                                                         R - 1, R) == -1;
                    reported &= pack_undo(c2, i2, &q.K, R - 1, R) == -1;
                    free(q.first), free(q.gsteps), free(q.lane_row), free(q.src);
                }
            } else {
                const long s0 = p.K.first[nblk - 1];
                for (int c = 0; c < 4; c++) {
                    pack_buf q = p;
                    uint16_t* mask = xmalloc(sizeof(uint16_t) * (p.K.steps + 1));
                    int32_t* first = xmalloc(sizeof(int32_t) * (nblk + 1));
                    uint8_t* col = xmalloc((size_t)p.K.steps * RBE_PACK_LANES);
                    memcpy(mask, p.mask, sizeof(uint16_t) * p.K.steps);
                    memcpy(first, p.first, sizeof(int32_t) * (nblk + 1));
                    memcpy(col, p.col, (size_t)p.K.steps * RBE_PACK_LANES);
                    if (c == 0) mask[s0] ^= (uint16_t)(mask[s0] & 1 ? 2 : 1);  // one coefficient too many or too few
                    if (c == 1) first[nblk] = (int32_t)p.K.steps + 1;          // past the steps
                    if (c == 2) col[s0 * RBE_PACK_LANES + __builtin_ctz(mask[s0])] = (uint8_t)b;  // past the block
                    if (c == 3) first[nblk - 1] = -1;
                    q.K.mask = mask, q.K.first = first, q.K.col = col;
                    reported &= ks->one_rows_forward(y2, NULL, NULL, Xf, &W, &q.K, &P, At, bias, act, scratch, R - 1,
                                                     R) == -1;
                    reported &= rbe_unpack_f32(c2, i2, &q.K, nblk - 1, nblk) == -1;
                    free(mask), free(first), free(col);
                }
            }
            CHECK(reported, "%s %s: a corrupted pack went unreported", tag, ks->name);
            rbe_packed_f32 big = p.K;
            big.b = RBE_PACK_MAX_B + 1;  // past the walks' row tables: refused before anything is read
            CHECK(ks->one_rows_forward(y2, NULL, NULL, Xf, &W, &big, &P, At, bias, act, scratch, 0, 1) == -1 &&
                      pack_undo(c2, i2, &big, 0, 1) == -1,
                  "%s %s: a pack claiming b = %d was walked", tag, ks->name, big.b);
            rbe_packed_f32 other = p.K;
            other.layout = 2;  // no such layout
            int32_t* work = xmalloc(sizeof(int32_t) * rbe_pack_rows_work(in, b));
            const int other_rows = rbe_unpack_rows_f32(c2, i2, work, &other, 0, 1);
            free(work);
            CHECK(ks->one_rows_forward(y2, NULL, NULL, Xf, &W, &other, &P, At, bias, act, scratch, 0, 1) == -1 &&
                      rbe_unpack_f32(c2, i2, &other, 0, 1) == -1 && other_rows == -1,
                  "%s %s: a pack of an unknown layout was walked", tag, ks->name);
        }
        free(Xf), free(scratch), free(y), free(pre), free(Xn), free(y2), free(pre2), free(Xn2);
#endif
        pack_free(&p);
    }
    free(pland), free(pwork), free(plan), free(At), free(tmp), free(basis), free(coeffs), free(ix), free(x), free(bias);
    free(c2), free(i2);
}

static void test_pack(void) {
    pack_case(70, 65, 64, 300, 0);     // edge blocks
    pack_case(200, 770, 64, 300, 0);   // 13 block columns: three groups of streams and a tail
    pack_case(64, 64, 64, 4096, 1);    // every coefficient: 64 steps a group
    pack_case(40, 300, 32, 60, 0);     // b = 32: ten block columns, streams then a tail
    pack_case(40, 250, 48, 30, 1);     // b = 48: three groups, the last one short of lanes
    pack_case(37, 10, 8, 5, 0);        // b = 8: one group of eight rows
    pack_case(9, 6, 4, 16, 1);         // b = 4, every coefficient
    pack_case(8, 8, 8, 0, 0);          // k = 0: pattern only
    pack_case(130, 64, 64, 300, 0);    // one block column (streams 1-3 empty)
    pack_case(20, 150, 10, 40, 1);     // b = 10: a group of 2 rows past 8
}

/* ---------------------------------------------------------------- activations */

// the same bits, or both NaN: which NaN (sign, payload) an operation returns is not specified, and the
// vectorized and scalar paths may differ there (silu's derivative at NaN does) as torch's own do
static int same_bits_f64(double a, double b) { return (isnan(a) && isnan(b)) || !memcmp(&a, &b, sizeof a); }
static int same_bits_f32(float a, float b) { return (isnan(a) && isnan(b)) || !memcmp(&a, &b, sizeof a); }

static void test_activations(void) {
    const double base[] = {0.0, -0.0, 1e-3, -1e-3, 3.0, -3.0, 10.0, -10.0, 20.0, -20.0, 100.0, -100.0,
                           INFINITY, -INFINITY, NAN, 0.5, -0.5, 1.0, -1.0, 5.5, -5.5, 1e-30, -1e-30,
                           1e30, -1e30, 4e-320, 8.0, -8.0, 40.0, -40.0, 3.4e38, -3.4e38, 0.75};
    const int nb = (int)(sizeof base / sizeof base[0]);
    const int n = 3 * nb + 5;  // several lengths' worth, not a multiple of any vector width
    double* x = xmalloc(sizeof(double) * n);
    double* y = xmalloc(sizeof(double) * n);
    double* dy = xmalloc(sizeof(double) * n);
    double* dx = xmalloc(sizeof(double) * n);
    float* xf = xmalloc(sizeof(float) * n);
    float* yf = xmalloc(sizeof(float) * n);
    float* dyf = xmalloc(sizeof(float) * n);
    float* dxf = xmalloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) {
        x[i] = i < nb ? base[i] : base[i % nb] * (1.0 + 0.01 * (i / nb)) + (i >= 3 * nb ? 0.3 : 0.0);
        xf[i] = (float)x[i];
    }
    static const char* names[] = {"none", "gelu", "gelu_tanh", "relu", "silu"};
    for (int act = RBE_ACT_NONE; act <= RBE_ACT_SILU; act++) {
        int bad_f = 0, bad_b = 0, bad_ff = 0, bad_bf = 0, bad_dy = 0;
        rbe_act_forward_f64(y, x, n, act);
        rbe_act_forward_f32(yf, xf, n, act);
        for (int i = 0; i < n; i++) {
            if (!same_bits_f64(y[i], rbe_act_scalar_f64(x[i], act)) && bad_f++ < 3)
                printf("  %s f64 forward x=%.17g: array %.17g scalar %.17g\n", names[act], x[i], y[i],
                       rbe_act_scalar_f64(x[i], act));
            if (!same_bits_f32(yf[i], rbe_act_scalar_f32(xf[i], act)) && bad_ff++ < 3)
                printf("  %s f32 forward x=%.9g: array %.9g scalar %.9g\n", names[act], xf[i], yf[i],
                       rbe_act_scalar_f32(xf[i], act));
        }
        // in place (the linear kernel applies the activation in place)
        memcpy(y, x, sizeof(double) * n);
        rbe_act_forward_f64(y, y, n, act);
        memcpy(yf, xf, sizeof(float) * n);
        rbe_act_forward_f32(yf, yf, n, act);
        for (int i = 0; i < n; i++) {
            bad_f += !same_bits_f64(y[i], rbe_act_scalar_f64(x[i], act));
            bad_ff += !same_bits_f32(yf[i], rbe_act_scalar_f32(xf[i], act));
        }
        // backward with dy = 1: dx is the derivative itself
        for (int i = 0; i < n; i++) dy[i] = 1.0, dyf[i] = 1.0f;
        rbe_act_backward_f64(dx, dy, x, n, act);
        rbe_act_backward_f32(dxf, dyf, xf, n, act);
        for (int i = 0; i < n; i++) {
            if (!same_bits_f64(dx[i], rbe_act_grad_scalar_f64(x[i], act)) && bad_b++ < 3)
                printf("  %s f64 backward x=%.17g: array %.17g scalar %.17g\n", names[act], x[i], dx[i],
                       rbe_act_grad_scalar_f64(x[i], act));
            if (!same_bits_f32(dxf[i], rbe_act_grad_scalar_f32(xf[i], act)) && bad_bf++ < 3)
                printf("  %s f32 backward x=%.9g: array %.9g scalar %.9g\n", names[act], xf[i], dxf[i],
                       rbe_act_grad_scalar_f32(xf[i], act));
        }
        // act and act' at once: the same bits as the two above (and y may be x)
        {
            double* g = xmalloc(sizeof(double) * n);
            float* gf = xmalloc(sizeof(float) * n);
            int bad_fg = 0;
            rbe_act_forward_grad_f64(y, g, x, n, act);
            memcpy(yf, xf, sizeof(float) * n);
            rbe_act_forward_grad_f32(yf, gf, yf, n, act);
            for (int i = 0; i < n; i++) {
                bad_fg += !same_bits_f64(y[i], rbe_act_scalar_f64(x[i], act)) +
                          !same_bits_f64(g[i], rbe_act_grad_scalar_f64(x[i], act));
                if ((!same_bits_f32(yf[i], rbe_act_scalar_f32(xf[i], act)) ||
                     !same_bits_f32(gf[i], rbe_act_grad_scalar_f32(xf[i], act))) && bad_fg++ < 3)
                    printf("  %s f32 forward_grad x=%.9g: %.9g %.9g, separately %.9g %.9g\n", names[act], xf[i], yf[i],
                           gf[i], rbe_act_scalar_f32(xf[i], act), rbe_act_grad_scalar_f32(xf[i], act));
            }
            CHECK(bad_fg == 0, "%s: rbe_act_forward_grad differs from forward + backward in %d values", names[act],
                  bad_fg);
            free(g), free(gf);
        }
        // general dy (including infinite): dx = dy * act'(x); relu passes exactly +0 where x <= 0 (as torch's
        // threshold_backward), even for an infinite or negative dy
        for (int i = 0; i < n; i++) {
            dy[i] = (i % 7 == 3) ? INFINITY : (i % 5 == 1 ? -2.5 : 0.5 + i * 0.125);
            dyf[i] = (float)dy[i];
        }
        rbe_act_backward_f64(dx, dy, x, n, act);
        rbe_act_backward_f32(dxf, dyf, xf, n, act);
        for (int i = 0; i < n; i++) {
            double e64;
            float e32;
            if (act == RBE_ACT_RELU) {
                e64 = x[i] <= 0.0 ? 0.0 : dy[i];
                e32 = xf[i] <= 0.0f ? 0.0f : dyf[i];
            } else {
                e64 = dy[i] * rbe_act_grad_scalar_f64(x[i], act);
                e32 = dyf[i] * rbe_act_grad_scalar_f32(xf[i], act);
            }
            if ((!same_bits_f64(dx[i], e64) || !same_bits_f32(dxf[i], e32)) && bad_dy++ < 3)
                printf("  %s backward x=%.9g dy=%g: f64 %.17g (want %.17g) f32 %.9g (want %.9g)\n", names[act], x[i],
                       dy[i], dx[i], e64, dxf[i], e32);
        }
        CHECK(!bad_f, "%s: f64 array forward != scalar (%d values)", names[act], bad_f);
        CHECK(!bad_ff, "%s: f32 array forward != scalar (%d values)", names[act], bad_ff);
        CHECK(!bad_b, "%s: f64 array backward != scalar derivative (%d values)", names[act], bad_b);
        CHECK(!bad_bf, "%s: f32 array backward != scalar derivative (%d values)", names[act], bad_bf);
        CHECK(!bad_dy, "%s: backward with general dy (%d values)", names[act], bad_dy);
    }
    // RBE_ACT_F32: evaluated in float32 (rbe_act_f32.h). The arrays (the widest vectors the chosen
    // kernels allow) give the bits of the one-lane scalar, in forward, forward_grad and backward;
    // values within ~1e-6 of the double definitions; special and huge inputs give exactly what the
    // double definitions give; relu and none ignore the flag.
    {
        const int ns = 40001, nt = nb + ns + 1000;
        float* xs = xmalloc(sizeof(float) * nt);
        float* ys = xmalloc(sizeof(float) * nt);
        float* gs = xmalloc(sizeof(float) * nt);
        float* ds = xmalloc(sizeof(float) * nt);
        for (int i = 0; i < nb; i++) xs[i] = (float)base[i];
        for (int i = 0; i < ns; i++) xs[nb + i] = -20.0f + 0.001f * (float)i;  // a sweep of [-20, 20]
        uint32_t st = 12345;
        for (int i = nb + ns; i < nt; i++) {  // and values near 0, where most pre-activations are
            st = st * 1664525u + 1013904223u;
            xs[i] = ((float)(st >> 8) / 16777216.0f - 0.5f) * 8.0f;
        }
        for (int act = RBE_ACT_NONE; act <= RBE_ACT_SILU; act++) {
            const int fa = act | RBE_ACT_F32;
            int bad_w = 0, bad_s = 0;
            double err_y = 0, err_tail = 0, err_g = 0;
            rbe_act_forward_f32(ys, xs, nt, fa);
            rbe_act_forward_grad_f32(ds, gs, xs, nt, fa);
            for (int i = 0; i < nt; i++) {
                const float y1 = rbe_act_scalar_f32(xs[i], fa), g1 = rbe_act_grad_scalar_f32(xs[i], fa);
                if ((!same_bits_f32(ys[i], y1) || !same_bits_f32(ds[i], y1) || !same_bits_f32(gs[i], g1)) &&
                    bad_w++ < 3)
                    printf("  %s f32 x=%.9g: arrays %.9g %.9g %.9g, one lane %.9g %.9g\n", names[act], xs[i], ys[i],
                           ds[i], gs[i], y1, g1);
                const double ye = rbe_act_scalar_f64(xs[i], act), ge = rbe_act_grad_scalar_f64(xs[i], act);
                if (!isfinite(xs[i]) || fabsf(xs[i]) >= 1e6f || act == RBE_ACT_NONE || act == RBE_ACT_RELU) {
                    // exactly the float32 value of the double definition
                    if ((!same_bits_f32(ys[i], (float)ye) || !same_bits_f32(gs[i], (float)ge)) && bad_s++ < 3)
                        printf("  %s f32 special x=%.9g: %.9g %.9g, want %.9g %.9g\n", names[act], xs[i], ys[i],
                               gs[i], (float)ye, (float)ge);
                    continue;
                }
                const double rel = fabs(ye) > 0 ? fabs(ys[i] - ye) / fabs(ye) : fabs(ys[i]);
                if (fabs(ye) >= 1e-6) err_y = fmax(err_y, rel);
                else if (fabs(ye) >= 1e-30) err_tail = fmax(err_tail, rel);
                err_g = fmax(err_g, fabs(gs[i] - ge));
            }
            // backward: dx = dy * act'(x), with the one-lane derivative
            for (int i = 0; i < nt; i++) ds[i] = (i % 7 == 3) ? -2.5f : 0.5f + 0.125f * (float)(i % 13);
            rbe_act_backward_f32(gs, ds, xs, nt, fa);
            int bad_b = 0;
            for (int i = 0; i < nt; i++)
                bad_b += !same_bits_f32(gs[i], act == RBE_ACT_RELU ? (xs[i] <= 0.0f ? 0.0f : ds[i])
                                                                   : ds[i] * rbe_act_grad_scalar_f32(xs[i], fa));
            // every width this CPU has, called directly (the entry points take only the widest)
            for (int lanes = 8; lanes <= 16 && act != RBE_ACT_NONE && act != RBE_ACT_RELU; lanes += 8) {
                if ((lanes == 8 && !rbe_cpu_has_avx2()) || (lanes == 16 && !rbe_cpu_has_avx512())) continue;
                rbe_act_f32_lanes(ys, gs, NULL, xs, nt, act, lanes);
                for (int i = 0; i < nt; i++)
                    if ((!same_bits_f32(ys[i], rbe_act_scalar_f32(xs[i], fa)) ||
                         !same_bits_f32(gs[i], rbe_act_grad_scalar_f32(xs[i], fa))) && bad_w++ < 3)
                        printf("  %s f32 %d lanes x=%.9g: %.9g %.9g, one lane %.9g %.9g\n", names[act], lanes, xs[i],
                               ys[i], gs[i], rbe_act_scalar_f32(xs[i], fa), rbe_act_grad_scalar_f32(xs[i], fa));
            }
            CHECK(!bad_w, "%s: float32 evaluation, arrays differ from one lane (%d values)", names[act], bad_w);
            CHECK(!bad_s, "%s: float32 evaluation of special inputs (%d values)", names[act], bad_s);
            CHECK(!bad_b, "%s: float32 evaluation, backward != dy * derivative (%d values)", names[act], bad_b);
            // measured on this sweep: values of magnitude 1e-6 and more within 5.1e-7 relative (gelu),
            // 2.2e-7 (silu), 1.9e-6 (gelu_tanh: the rounding of its exponent 2u, about |2u| 2^-24); the
            // tail down to 1e-30 within 1.1e-5; derivatives within 2.4e-7 absolute (they are at most 1.13)
            const double tol_y = act == RBE_ACT_GELU_TANH ? 4e-6 : 1e-6;
            CHECK(err_y <= tol_y && err_tail <= 3e-5 && err_g <= 5e-7,
                  "%s: float32 evaluation off the definition: rel %.3g, tail %.3g, abs grad %.3g", names[act], err_y,
                  err_tail, err_g);
            if (act != RBE_ACT_NONE && act != RBE_ACT_RELU)
                printf("  float32 %s: max rel error %.3g (tail %.3g), derivative abs %.3g\n", names[act], err_y,
                       err_tail, err_g);
        }
        free(xs), free(ys), free(gs), free(ds);
    }
    // the scalar definitions themselves at a few known points (DESIGN.md section 4)
    CHECK(fabs(rbe_act_scalar_f64(1.0, RBE_ACT_GELU) - 0.8413447460685429) < 1e-15, "gelu(1)");
    CHECK(fabs(rbe_act_scalar_f64(-1.0, RBE_ACT_GELU) + 0.15865525393145707) < 1e-15, "gelu(-1)");
    CHECK(fabs(rbe_act_scalar_f64(1.0, RBE_ACT_GELU_TANH) - 0.8411919906082768) < 1e-15, "gelu_tanh(1)");
    CHECK(fabs(rbe_act_scalar_f64(1.0, RBE_ACT_SILU) - 0.7310585786300049) < 1e-15, "silu(1)");
    CHECK(rbe_act_scalar_f64(-3.0, RBE_ACT_RELU) == 0.0 && rbe_act_scalar_f64(3.0, RBE_ACT_RELU) == 3.0, "relu");
    CHECK(isnan(rbe_act_scalar_f64(NAN, RBE_ACT_RELU)) && isnan(rbe_act_scalar_f64(NAN, RBE_ACT_GELU)) &&
              isnan(rbe_act_scalar_f64(NAN, RBE_ACT_SILU)) && isnan(rbe_act_scalar_f64(NAN, RBE_ACT_GELU_TANH)),
          "NaN must propagate");
    CHECK(rbe_act_scalar_f64(INFINITY, RBE_ACT_GELU) == INFINITY &&
              rbe_act_scalar_f64(INFINITY, RBE_ACT_GELU_TANH) == INFINITY &&
              rbe_act_scalar_f64(INFINITY, RBE_ACT_SILU) == INFINITY,
          "act(+inf) = +inf");
    CHECK(rbe_act_scalar_f64(-100.0, RBE_ACT_GELU_TANH) == 0.0 && fabs(rbe_act_scalar_f64(-20.0, RBE_ACT_SILU)) < 1e-7,
          "large negative inputs go to 0");
    CHECK(fabs(rbe_act_scalar_f32(1.0f, RBE_ACT_GELU) - 0.84134475f) < 1e-7f, "gelu f32(1)");
    // derivatives against central differences
    int bad_g = 0;
    for (int act = RBE_ACT_GELU; act <= RBE_ACT_SILU; act++)
        for (double t = -6.0; t <= 6.0; t += 0.37) {
            double h = 1e-6;
            double fd = (rbe_act_scalar_f64(t + h, act) - rbe_act_scalar_f64(t - h, act)) / (2 * h);
            if (fabs(fd - rbe_act_grad_scalar_f64(t, act)) > 1e-8 && bad_g++ < 3)
                printf("  act=%d x=%g: derivative %.12g, central difference %.12g\n", act, t,
                       rbe_act_grad_scalar_f64(t, act), fd);
        }
    CHECK(!bad_g, "scalar derivatives disagree with central differences (%d points)", bad_g);
    free(x), free(y), free(dy), free(dx), free(xf), free(yf), free(dyf), free(dxf);
}

/* gelu with AVX-512 (rbe_gelu_avx512): the scalar definition's bits, for the value alone (the
 * polynomial of Phi between -3 and 5, the Mills ratio elsewhere), the backward with a general dy
 * and the value with its derivative; called directly, so the portable pass of the tests checks it
 * too. Inputs: every 4093rd float of [-13, 13] by bit pattern (all exponents and mantissas there),
 * the interval ends, random bit patterns (NaN, infinities, subnormals) and values around 0. The
 * scalar definition takes over near a rounding boundary and outside [-12, 12]; that it does so
 * rarely is checked on the normal floats of [-12, 12] (else the vectors would do nothing). */
static void test_gelu_avx512(void) {
    if (!rbe_cpu_has_avx512()) {
        printf("  gelu AVX-512: no AVX-512 on this CPU, not run\n");
        return;
    }
    long n = 0, cap = 1 << 21;
    float* x = xmalloc(sizeof(float) * cap);
    for (uint32_t sign = 0; sign < 2; sign++)
        for (uint32_t b = 0; b <= 0x41500000u && n < cap; b += 4093) {  // 0x41500000 = 13.0f
            const uint32_t v = b | sign << 31;
            memcpy(&x[n++], &v, sizeof v);
        }
    const long grid = n;
    const float ends[] = {-3.0f, 5.0f, -12.0f, 12.0f, 0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f};
    for (int e = 0; e < (int)(sizeof ends / sizeof ends[0]) && n + 3 <= cap; e++) {
        x[n++] = ends[e];
        x[n++] = nextafterf(ends[e], INFINITY);
        x[n++] = nextafterf(ends[e], -INFINITY);
    }
    uint32_t st = 777;
    while (n < cap) {
        st = st * 1664525u + 1013904223u;
        if (n & 1) memcpy(&x[n], &st, sizeof st);
        else x[n] = ((float)(st >> 8) / 16777216.0f - 0.5f) * 12.0f;
        n++;
    }
    float* y = xmalloc(sizeof(float) * n);
    float* g = xmalloc(sizeof(float) * n);
    float* dy = xmalloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) dy[i] = (i % 11 == 3) ? INFINITY : (i % 7 == 2 ? 0.0f : 0.25f * (float)(i % 9) - 1.0f);
    int bad_y = 0, bad_b = 0, bad_yg = 0;
    long slow = 0, done = rbe_gelu_avx512(y, NULL, NULL, x, n, &slow);
    CHECK(done == n - n % 8, "gelu AVX-512: %ld of %ld values done", done, n);
    long slow_grid = 0, normal_grid = 0;
    {
        long s2 = 0;
        float* yy = xmalloc(sizeof(float) * grid);
        rbe_gelu_avx512(yy, NULL, NULL, x, grid - grid % 8, &s2);
        long out = 0;
        for (long i = 0; i < grid - grid % 8; i++) {
            const int normal = fabsf(x[i]) <= 12.0f && fabsf(x[i]) >= 1.1754944e-38f;
            normal_grid += normal;
            out += !normal;
        }
        slow_grid = s2 - out;  // the lanes that were not already bound for the scalar definition
        free(yy);
    }
    for (long i = 0; i < done; i++)
        if (!same_bits_f32(y[i], rbe_act_scalar_f32(x[i], RBE_ACT_GELU)) && bad_y++ < 3)
            printf("  gelu AVX-512 value x=%.9g: %.9g, scalar %.9g\n", x[i], y[i], rbe_act_scalar_f32(x[i], RBE_ACT_GELU));
    rbe_gelu_avx512(NULL, g, dy, x, n, NULL);
    for (long i = 0; i < done; i++) {
        const float want = dy[i] * rbe_act_grad_scalar_f32(x[i], RBE_ACT_GELU);
        if (!same_bits_f32(g[i], want) && bad_b++ < 3)
            printf("  gelu AVX-512 backward x=%.9g dy=%g: %.9g, scalar %.9g\n", x[i], dy[i], g[i], want);
    }
    memcpy(y, x, sizeof(float) * n);
    rbe_gelu_avx512(y, g, NULL, y, n, NULL);  // in place, as the rows kernels call it
    for (long i = 0; i < done; i++)
        if ((!same_bits_f32(y[i], rbe_act_scalar_f32(x[i], RBE_ACT_GELU)) ||
             !same_bits_f32(g[i], rbe_act_grad_scalar_f32(x[i], RBE_ACT_GELU))) && bad_yg++ < 3)
            printf("  gelu AVX-512 value and derivative x=%.9g: %.9g %.9g, scalar %.9g %.9g\n", x[i], y[i], g[i],
                   rbe_act_scalar_f32(x[i], RBE_ACT_GELU), rbe_act_grad_scalar_f32(x[i], RBE_ACT_GELU));
    CHECK(!bad_y && !bad_b && !bad_yg, "gelu AVX-512 differs from the scalar definition: %d values, %d backward, %d both",
          bad_y, bad_b, bad_yg);
    CHECK(slow_grid >= 0 && slow_grid * 1000 <= normal_grid,
          "gelu AVX-512: %ld of %ld normal floats in [-12, 12] took the scalar definition", slow_grid, normal_grid);
    printf("  gelu AVX-512: %ld values, %ld by the scalar definition (%ld of %ld normal ones in [-12, 12] of the grid)\n",
           done, slow, slow_grid, normal_grid);
    free(x), free(y), free(g), free(dy);
}

static void test_nonfinite_count(void) {
    double d[6] = {0.0, NAN, 1.0, INFINITY, -INFINITY, 1e308};
    float f[5] = {0.0f, NAN, 3.4e38f, -INFINITY, 1.0f};
    CHECK(rbe_count_nonfinite_f64(d, 6) == 3 && rbe_count_nonfinite_f64(d, 1) == 0, "count_nonfinite_f64");
    CHECK(rbe_count_nonfinite_f32(f, 5) == 2 && rbe_count_nonfinite_f32(f, 0) == 0, "count_nonfinite_f32");
    // max |x|: a NaN anywhere gives NaN, else an infinity wins; 0 for nothing
    double dd[4] = {0.5, -INFINITY, 2.0, -3.0};
    float ff[4] = {-2.5f, 1.0f, 3.4e38f, -1e38f};
    CHECK(isnan(rbe_max_abs_f64(d, 6)) && rbe_max_abs_f64(dd, 4) == INFINITY && rbe_max_abs_f64(dd + 2, 2) == 3.0 &&
              rbe_max_abs_f64(d, 0) == 0.0,
          "max_abs_f64");
    CHECK(isnan(rbe_max_abs_f32(f, 3)) && rbe_max_abs_f32(ff, 4) == (double)3.4e38f && rbe_max_abs_f32(ff, 2) == 2.5 &&
              rbe_max_abs_f32(f, 0) == 0.0,
          "max_abs_f32");
}

/* ---------------------------------------------------------------- concurrent index writes */

/* A writer thread keeps rewriting a weight's index, element by element (as a concurrent
 * load_state_dict would, here alternating a valid index and an out-of-range one), while this
 * thread does what the operators do: take a private snapshot, and run the kernels on it only
 * when it is valid. Under AddressSanitizer any out-of-bounds access is fatal (the kernels run
 * on the live index instead of the snapshot fail at once); the race on the source is deliberate. */
typedef struct {
    int16_t* live;
    const int16_t* a;
    const int16_t* b;
    long n;
    volatile int stop;
    long flips;
} index_writer;

static void* write_index(void* arg) {
    index_writer* w = arg;
    volatile int16_t* live = w->live;
    while (!w->stop) {
        const int16_t* src = w->flips % 2 ? w->a : w->b;
        for (long i = 0; i < w->n; i++) live[i] = src[i];
        w->flips++;
        for (volatile int spin = 0; spin < 20000; spin++) {  // a pause: some copies see a whole index
        }
    }
    return NULL;
}

static void test_concurrent_index_writes(void) {
    const int out = 40, in = 72, b = 16, k = 60, R = cdiv(out, b), C = cdiv(in, b);
    const long nblk = (long)R * C, T = 80, ntiles = cdiv((int)T, RBE_TILE);
    // one valid index, and one whose every value lies out of range (b*b and past it): whatever
    // the source holds when the copy is taken, the kernels must never see it unchecked
    int16_t* a = random_index(nblk, k, b, 0);
    int16_t* bx = random_index(nblk, k, b, 0);
    for (long i = 0; i < nblk * k; i++) bx[i] = (int16_t)(bx[i] + b * b);
    int16_t* live = xmalloc(sizeof(int16_t) * nblk * k);
    memcpy(live, a, sizeof(int16_t) * nblk * k);
    int16_t* snap = xmalloc(sizeof(int16_t) * nblk * k);  // exact size: ASan sees any overrun
    double* pland = xmalloc(sizeof(double) * 3 * (2 * b + 4) * b);
    double* pwork = xmalloc(sizeof(double) * (3 * b * b + b));
    const int nf = rbe_plan_build(pland, pwork, b, 1e-9), rows = b + nf;
    float* plan = to_t(pland, 3 * (size_t)rows * b, 1);
    const rbe_plan_f32 P = rbe_plan_view_f32(plan, b, nf);
    double* tmp = xmalloc(sizeof(double) * (nblk * k + T * in + 8));
    fill_normal(tmp, nblk * 8);
    float* basis = to_t(tmp, nblk * 8, 1);
    fill_normal(tmp, nblk * k);
    float* coeffs = to_t(tmp, nblk * k, 1);
    fill_normal(tmp, T * in);
    float* x = to_t(tmp, T * in, 1);
    float* Xh = xmalloc(sizeof(float) * ntiles * C * rows * RBE_TILE);
    float* y = xmalloc(sizeof(float) * T * out);
    float* scratch = xmalloc(sizeof(float) * rbe_rows_scratch(b, nf));
    int32_t* st = xmalloc(sizeof(int32_t) * R * (b + 1));
    int32_t* off = xmalloc(sizeof(int32_t) * nblk * k);
    float* val = xmalloc(sizeof(float) * nblk * k);
    float* Gh = xmalloc(sizeof(float) * ntiles * R * rows * RBE_TILE);
    float* dx = xmalloc(sizeof(float) * T * in);
    rbe_analysis_f32(Xh, x, P.A, &P, scratch, T, in, 0, ntiles * C);
    rbe_analysis_f32(Gh, x, P.S, &P, scratch, T, out, 0, ntiles * R);  // x's first T * out values as a gradient

    index_writer w = {live, a, bx, nblk * k, 0, 0};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, write_index, &w) == 0, "pthread_create");
    long valid = 0, refused = 0;
    for (long it = 0; it < 1000000 && (valid < 50 || refused < 50); it++) {
        if (rbe_index_snapshot(snap, live, 0, nblk, k, b) >= 0) {
            refused++;
            continue;
        }
        valid++;
        const rbe_weight_f32 W = {basis, coeffs, snap, 0, out, in, b, k};
        rbe_schedule_f32(st, off, val, NULL, &W, nf, 0, 1.0f, 0, R);
        const rbe_sched_f32 sc = {st, off, val, NULL, NULL};
        rbe_rows_forward_f32(y, NULL, NULL, Xh, &W, &P, &sc, NULL, RBE_ACT_NONE, scratch, T, 0, ntiles * R);
        rbe_rows_forward_f32(y, NULL, NULL, Xh, &W, &P, NULL, NULL, RBE_ACT_GELU, scratch, T, 0, ntiles * R);
        rbe_cols_backward_f32(dx, Gh, &W, &P, NULL, scratch, T, 0, ntiles * C);
    }
    w.stop = 1;
    pthread_join(th, NULL);
    CHECK(valid >= 50 && refused >= 50 && w.flips > 0, "concurrent index writes: %ld valid, %ld refused, %ld flips", valid,
          refused, w.flips);
    printf("  (concurrent index writes: %ld snapshots used, %ld refused (torn or out of range), %ld rewrites)\n", valid, refused,
           w.flips);
    free(a), free(bx), free(live), free(snap), free(pland), free(pwork), free(plan), free(tmp), free(basis);
    free(coeffs), free(x), free(Xh), free(y), free(scratch), free(st), free(off), free(val), free(Gh), free(dx);
}

int main(void) {
    test_dct();
    test_pattern_images();
    test_pattern_pinv();
    test_jacobi();
    test_plan();
    test_index_check();
    test_nonfinite_count();
    test_codec_roundtrip();
    test_codec_selection();
    test_linear();
    test_few();
    test_pack();
    test_activations();
    test_gelu_avx512();
    test_concurrent_index_writes();
    printf("%ld passed, %ld failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
