/* rbe_pack.c - the packed layout of a weight's coefficients for one-token calls (rbe.h,
 * "one token from packed coefficients"): built from a validated index, and undone.
 *
 * Block by block: count the coefficients of each output row u (the index is sorted by u*b + v, so
 * row u's coefficients are one run, in column order), then for each group of 16 rows take step
 * d = 0, 1, ... up to the group's longest row, each step holding the d-th coefficient of every
 * row of the group that has one.
 */
#include "rbe.h"

static int index_at(const void* index, int wide, long pos) {
    return wide ? ((const int32_t*)index)[pos] : ((const int16_t*)index)[pos];
}

// counts[u] = coefficients of row u of block blk
static void row_counts(int32_t* counts, const void* index, int wide, long blk, int k, int b) {
    for (int u = 0; u < b; u++) counts[u] = 0;
    for (int q = 0; q < k; q++) counts[index_at(index, wide, blk * k + q) / b]++;
}

static int group_steps(const int32_t* counts, int g, int b) {
    int n = 0;
    for (int u = g * RBE_PACK_LANES; u < b && u < (g + 1) * RBE_PACK_LANES; u++) n = counts[u] > n ? counts[u] : n;
    return n;
}

long rbe_pack_steps(int32_t* work, const void* index, int wide, long nblk, int k, int b) {
    int32_t* counts = work;
    long steps = 0;
    for (long blk = 0; blk < nblk; blk++) {
        row_counts(counts, index, wide, blk, k, b);
        for (int g = 0; g < rbe_pack_groups(b); g++) steps += group_steps(counts, g, b);
    }
    return steps;
}

void rbe_pack_f32(int32_t* first, uint8_t* nstep, uint16_t* mask, float* val, uint8_t* col, int32_t* work,
                  const float* coeffs, const void* index, int wide, long nblk, int k, int b) {
    int32_t* counts = work;         // [b]
    int32_t* start = work + b;      // [b + 1]: row u's run is [start[u], start[u + 1])
    const int G = rbe_pack_groups(b);
    long step = 0;
    for (long blk = 0; blk < nblk; blk++) {
        first[blk] = (int32_t)step;
        row_counts(counts, index, wide, blk, k, b);
        start[0] = 0;
        for (int u = 0; u < b; u++) start[u + 1] = start[u] + counts[u];
        long e = blk * k;
        for (int g = 0; g < G; g++) {
            const int n = group_steps(counts, g, b);
            nstep[blk * G + g] = (uint8_t)n;
            for (int d = 0; d < n; d++, step++) {
                uint16_t m = 0;
                for (int l = 0; l < RBE_PACK_LANES; l++) col[step * RBE_PACK_LANES + l] = 0;
                for (int l = 0; l < RBE_PACK_LANES; l++) {
                    const int u = g * RBE_PACK_LANES + l;
                    if (u >= b || counts[u] <= d) continue;
                    const long q = blk * k + start[u] + d;
                    m |= (uint16_t)(1u << l);
                    val[e] = coeffs[q];
                    col[step * RBE_PACK_LANES + l] = (uint8_t)(index_at(index, wide, q) - u * b);
                    e++;
                }
                mask[step] = m;
            }
        }
    }
    first[nblk] = (int32_t)step;
}

int rbe_unpack_f32(float* coeffs, int32_t* index, const rbe_packed_f32* K, long p0, long p1) {
    const int b = K->b, k = K->k, G = rbe_pack_groups(b);
    if (b < 1 || b > RBE_PACK_MAX_B || k < 0) return -1;  // the row tables below hold RBE_PACK_MAX_B
    for (long blk = p0; blk < p1; blk++) {
        const long begin = K->first[blk], end = K->first[blk + 1];
        if (begin < 0 || end < begin || end > K->steps) return -1;
        // two walks of the steps: count each row's coefficients, then place row u's d-th one in
        // its d-th slot. Every value is read once per walk and checked where it is used, so a
        // pack rewritten between the walks gives an error, never a write out of the block.
        int32_t seen[RBE_PACK_MAX_B] = {0}, start[RBE_PACK_MAX_B + 1];
        for (int walk = 0; walk < 2; walk++) {
            long step = begin;
            int e = 0;
            for (int g = 0; g < G; g++)
                for (int d = 0, n = K->nstep[blk * G + g]; d < n; d++, step++) {
                    if (step >= end) return -1;
                    for (unsigned m = K->mask[step]; m; m &= m - 1) {
                        const int l = __builtin_ctz(m), u = g * RBE_PACK_LANES + l;
                        if (e >= k || u >= b) return -1;
                        const int c = K->col[step * RBE_PACK_LANES + l];
                        if (c >= b) return -1;
                        if (walk == 0) {
                            seen[u]++;
                        } else {
                            if (seen[u] >= start[u + 1] - start[u]) return -1;
                            const long q = blk * k + start[u] + seen[u]++;
                            coeffs[q] = K->val[blk * k + e];
                            index[q] = u * b + c;
                        }
                        e++;
                    }
                }
            if (step != end || e != k) return -1;
            if (walk == 0) {
                start[0] = 0;
                for (int u = 0; u < b; u++) start[u + 1] = start[u] + seen[u], seen[u] = 0;
            }
        }
    }
    return 0;
}
