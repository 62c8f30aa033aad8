/* rbe_pack.c - the packed layouts of a weight's coefficients for one-token calls (rbe.h,
 * "one token from packed coefficients"): built from a validated index, and undone.
 *
 * RBE_PACK_STEPS, block by block: count the coefficients of each output row u (the index is sorted
 * by u*b + v, so row u's coefficients are one run, in column order), then for each group of 16
 * rows take step d = 0, 1, ... up to the group's longest row, each step holding the d-th
 * coefficient of every row of the group that has one.
 * RBE_PACK_ROWS, block row by block row: the same runs, joined per stream into each row's list;
 * the rows sorted by list length, 8 at a time, step d holding the d-th entry of each list.
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
    if (K->layout != RBE_PACK_STEPS || b < 1 || b > RBE_PACK_MAX_B || k < 0) return -1;  // the row tables below hold RBE_PACK_MAX_B
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

/* ---- RBE_PACK_ROWS ---- */

// the stream of block column j (rbe_few_rows_forward: groups of RBE_FEW_STREAMS blocks, the last
// C % RBE_FEW_STREAMS blocks into the first)
static int stream_of(int j, int C) { return j < C - C % RBE_FEW_STREAMS ? j % RBE_FEW_STREAMS : 0; }

size_t rbe_pack_rows_work(int in, int b) {
    const size_t C = (size_t)((in + b - 1) / b);
    return 2 * C * (size_t)(b + 1) + 2 * (size_t)RBE_FEW_STREAMS * (size_t)b;
}

// Block row i: start[j*(b+1) + u] .. start[j*(b+1) + u + 1] is row u's run in block (i, j) (offsets
// in the block's k), len[s*b + u] the length of row u's list in stream s, ord[s*b + 0..b) the rows
// of stream s longest list first (ties: lower row first).
static void row_lists(int32_t* start, int32_t* len, int32_t* ord, const void* index, int wide, long i, int C, int k,
                      int b) {
    const int ns = RBE_FEW_STREAMS;
    for (int e = 0; e < ns * b; e++) len[e] = 0;
    for (int j = 0; j < C; j++) {
        int32_t* st = start + (size_t)j * (b + 1);
        for (int u = 0; u <= b; u++) st[u] = 0;
        for (int q = 0; q < k; q++) st[index_at(index, wide, ((long)i * C + j) * k + q) / b + 1]++;
        for (int u = 0; u < b; u++) {
            len[stream_of(j, C) * b + u] += st[u + 1];
            st[u + 1] += st[u];
        }
    }
    for (int s = 0; s < ns; s++) {  // insertion sort, stable: rows of equal length stay in row order
        int32_t* o = ord + s * b;
        const int32_t* l = len + s * b;
        for (int u = 0; u < b; u++) {
            int p = u;
            while (p > 0 && l[o[p - 1]] < l[u]) o[p] = o[p - 1], p--;
            o[p] = u;
        }
    }
}

long rbe_pack_rows_steps(int32_t* work, const void* index, int wide, int out, int in, int k, int b) {
    const int R = (out + b - 1) / b, C = (in + b - 1) / b, ns = RBE_FEW_STREAMS, L = RBE_PACK_ROW_LANES;
    int32_t *start = work, *len = start + (size_t)C * (b + 1), *ord = len + ns * b;
    long steps = 0;
    for (long i = 0; i < R; i++) {
        row_lists(start, len, ord, index, wide, i, C, k, b);
        for (int s = 0; s < ns; s++)
            for (int g = 0; g * L < b; g++) steps += len[s * b + ord[s * b + g * L]];  // the group's longest
    }
    return steps;
}

void rbe_pack_rows_f32(int32_t* first, uint16_t* gsteps, uint8_t* lane_row, float* val, uint16_t* src,
                       int32_t* work, const float* coeffs, const void* index, int wide, int out, int in, int k, int b) {
    const int R = (out + b - 1) / b, C = (in + b - 1) / b, ns = RBE_FEW_STREAMS, L = RBE_PACK_ROW_LANES;
    const int gr = rbe_pack_row_groups(b);
    int32_t *start = work, *len = start + (size_t)C * (b + 1), *ord = len + ns * b;
    long step = 0;
    for (long i = 0; i < R; i++) {
        first[i] = (int32_t)step;
        row_lists(start, len, ord, index, wide, i, C, k, b);
        for (int s = 0; s < ns; s++)
            for (int g = 0; g < gr; g++) {
                const long grp = (i * ns + s) * gr + g;
                const int n = len[s * b + ord[s * b + g * L]];
                gsteps[grp] = (uint16_t)n;
                for (int l = 0; l < L; l++) {
                    const int has = g * L + l < b, u = has ? ord[s * b + g * L + l] : 0;
                    lane_row[grp * L + l] = has ? (uint8_t)u : RBE_PACK_NO_ROW;
                    long d = 0;
                    for (int j = 0; has && j < C; j++) {
                        if (stream_of(j, C) != s) continue;
                        const int32_t* st = start + (size_t)j * (b + 1);
                        for (int q = st[u]; q < st[u + 1]; q++, d++) {
                            const long e = ((long)i * C + j) * k + q;
                            val[(step + d) * L + l] = coeffs[e];
                            src[(step + d) * L + l] = (uint16_t)(j * b + index_at(index, wide, e) - u * b);
                        }
                    }
                    for (; d < n; d++) {  // padding: the value -0 at the source that reads +0
                        val[(step + d) * L + l] = -0.0f;
                        src[(step + d) * L + l] = (uint16_t)(C * b);
                    }
                }
                step += n;
            }
    }
    first[R] = (int32_t)step;
}

int rbe_unpack_rows_f32(float* coeffs, int32_t* index, int32_t* work, const rbe_packed_f32* K, long i0, long i1) {
    const int b = K->b, k = K->k, ns = RBE_FEW_STREAMS, L = RBE_PACK_ROW_LANES;
    if (K->layout != RBE_PACK_ROWS || b < 1 || b > RBE_PACK_MAX_B || k < 0 || K->in < 1 || K->out < 1) return -1;
    const int R = (K->out + b - 1) / b, C = (K->in + b - 1) / b, gr = rbe_pack_row_groups(b);
    const long zero = (long)C * b;
    if (i0 < 0 || i1 > R || zero > 65535) return -1;
    // two walks of the entries: count those of each (block j, row u), then place them. Every value
    // is read once per walk and checked where it is used, so a pack rewritten between the walks
    // gives an error, never a write out of the block row.
    int32_t* lim = work;                     // [C*b] walk 0: counts; then the end of (j, u)'s slots
    int32_t* next = work + (size_t)C * b;    // [C*b] walk 1: the next slot of (j, u)
    for (long i = i0; i < i1; i++) {
        const long begin = K->first[i], end = K->first[i + 1];
        if (begin < 0 || end < begin || end > K->steps) return -1;
        for (int walk = 0; walk < 2; walk++) {
            if (walk == 0)
                for (long e = 0; e < zero; e++) lim[e] = 0;
            long step = begin;
            for (int s = 0; s < ns; s++) {
                uint64_t seen = 0;  // each row in one lane of the stream's groups
                for (int g = 0; g < gr; g++) {
                    const long grp = (i * ns + s) * gr + g;
                    const long n = K->gsteps[grp];
                    if (n > end - step) return -1;
                    for (int l = 0; l < L; l++) {
                        const int u = K->lane_row[grp * L + l];
                        if (u < b) {
                            if (seen >> u & 1) return -1;
                            seen |= (uint64_t)1 << u;
                        } else if (u != RBE_PACK_NO_ROW) {
                            return -1;
                        }
                        for (long d = 0; d < n; d++) {
                            const long e = (step + d) * L + l, o = K->src[e];
                            if (o == zero) continue;  // padding
                            if (u >= b || o > zero) return -1;
                            const int j = (int)(o / b), v = (int)(o % b);
                            if (stream_of(j, C) != s) return -1;
                            if (walk == 0) {
                                lim[j * b + u]++;
                            } else {
                                const int32_t q = next[j * b + u]++;
                                if (q >= lim[j * b + u]) return -1;
                                coeffs[((long)i * C + j) * k + q] = K->val[e];
                                index[((long)i * C + j) * k + q] = u * b + v;
                            }
                        }
                    }
                    step += n;
                }
                if (seen != (b == 64 ? ~(uint64_t)0 : ((uint64_t)1 << b) - 1)) return -1;
            }
            if (step != end) return -1;
            for (int j = 0; j < C; j++) {
                int32_t t = 0;
                for (int u = 0; u < b; u++) {
                    if (walk == 0) {  // lim: counts -> ends; next: starts
                        next[j * b + u] = t;
                        t += lim[j * b + u];
                        lim[j * b + u] = t;
                    } else if (next[j * b + u] != lim[j * b + u]) {
                        return -1;
                    }
                }
                if (walk == 0 && t != k) return -1;
            }
        }
        for (int j = 0; j < C; j++) {  // strictly ascending positions: a sound index
            const int32_t* ix = index + ((long)i * C + j) * k;
            for (int q = 1; q < k; q++)
                if (ix[q] <= ix[q - 1]) return -1;
        }
    }
    return 0;
}
