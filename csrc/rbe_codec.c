/* rbe_codec.c - encode a dense matrix into RBE blocks and decode it back.
 *
 * Encoding one block (DESIGN.md section 2):
 *   1. p = pinv @ w (least squares on the 8 pattern images),
 *   2. E = w - sum_k p_k Phi_k, Ehat = Psi E Psi^T (orthonormal DCT-II),
 *   3. keep the k largest |Ehat| (ties: lower flat index first), stored in
 *      ascending index order.
 * Edge blocks (past the matrix's last row or column) are filled by even
 * reflection of the real entries, so the pattern fit and the DCT see a smooth
 * block. Interior blocks know their squared error exactly from the dropped
 * DCT energy (Parseval); edge blocks measure it over their real entries.
 * All block arithmetic is in double; values are rounded to T when stored.
 */
#include "rbe.h"

#include <math.h>
#include <string.h>

size_t rbe_encode_work(int b) { return (size_t)8 * b * b; }

static int reflect(int n, int len) {
    int m = n % (2 * len);
    return m < len ? m : 2 * len - 1 - m;
}

// out[u][c] = sum_n a[u][n] m[n][c]        (all [b, b])
static void mat_mul(double* out, const double* a, const double* m, int b) {
    memset(out, 0, sizeof(double) * b * b);
    for (int u = 0; u < b; u++)
        for (int n = 0; n < b; n++) {
            double s = a[u * b + n];
            const double* mr = m + n * b;
            double* orow = out + u * b;
            for (int c = 0; c < b; c++) orow[c] += s * mr[c];
        }
}

// out = m a^T  via  out[u][v] = sum_c m[u][c] at[c][v] with at = a^T   (all [b, b])
static void mat_mul_t(double* out, const double* m, const double* at, int b) { mat_mul(out, m, at, b); }

static void transpose(double* out, const double* a, int b) {
    for (int r = 0; r < b; r++)
        for (int c = 0; c < b; c++) out[c * b + r] = a[r * b + c];
}

// Heap-free selection of the k largest keys: after the call ord[0..k) hold them (any order).
// Key order: larger magnitude first, then smaller index.
static int key_before(const double* mag, int a, int b) { return mag[a] > mag[b] || (mag[a] == mag[b] && a < b); }

static void select_top(int* ord, const double* mag, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        // median of three to ord[mid]
        if (key_before(mag, ord[mid], ord[lo])) { int t = ord[mid]; ord[mid] = ord[lo]; ord[lo] = t; }
        if (key_before(mag, ord[hi], ord[lo])) { int t = ord[hi]; ord[hi] = ord[lo]; ord[lo] = t; }
        if (key_before(mag, ord[hi], ord[mid])) { int t = ord[hi]; ord[hi] = ord[mid]; ord[mid] = t; }
        int pivot = ord[mid];
        int i = lo, j = hi;
        while (i <= j) {
            while (key_before(mag, ord[i], pivot)) i++;
            while (key_before(mag, pivot, ord[j])) j--;
            if (i <= j) { int t = ord[i]; ord[i] = ord[j]; ord[j] = t; i++; j--; }
        }
        // [lo, j] before pivot-ish, [i, hi] after; k-th boundary is at index k-1
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

#define RBE_T float
#define RBE_SFX(name) name##_f32
#define RBE_WEIGHT rbe_weight_f32
#include "rbe_codec_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_WEIGHT

#define RBE_T double
#define RBE_SFX(name) name##_f64
#define RBE_WEIGHT rbe_weight_f64
#include "rbe_codec_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_WEIGHT
