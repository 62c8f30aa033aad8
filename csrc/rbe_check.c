/* rbe_check.c - validation of what the kernels will read: index tensors (and private,
 * validated copies of them), non-finite counts and magnitudes of dense inputs. */
#include "rbe.h"

#include <math.h>
#include <string.h>

long rbe_index_check(const void* index, int wide, long nblocks, int k, int b) {
    const int16_t* i16 = (const int16_t*)index;
    const int32_t* i32 = (const int32_t*)index;
    const long lim = (long)b * b;
    for (long blk = 0; blk < nblocks; blk++) {
        long prev = -1;
        for (int q = 0; q < k; q++) {
            const long pos = blk * k + q;
            const long v = wide ? (long)i32[pos] : (long)i16[pos];
            if (v <= prev || v >= lim) return pos;
            prev = v;
        }
    }
    return -1;
}

// 1 when every row of index [nblocks, k] is strictly increasing in [0, lim): branch-free over a
// row, so the compiler vectorizes it (the rows are sorted, so the range check is first and last),
// once per instruction set, chosen when the library loads (it runs on every CPU call: at one token
// it was a tenth of a 768/3072 feed-forward call with SSE2's 8 lanes; AVX2 has 16, AVX-512 32)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RBE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define RBE_ISA_CLONES
#endif
#define RBE_INDEX_OK(T)                                                                 \
    RBE_ISA_CLONES static int index_ok_##T(const T* ix, long nblocks, int k, long lim) { \
        int bad = 0;                                                                    \
        for (long blk = 0; blk < nblocks; blk++) {                                      \
            const T* r = ix + blk * k;                                                  \
            for (int q = 1; q < k; q++) bad |= r[q] <= r[q - 1];                        \
            bad |= (r[0] < 0) | ((long)r[k - 1] >= lim);                                \
        }                                                                               \
        return !bad;                                                                    \
    }
RBE_INDEX_OK(int16_t)
RBE_INDEX_OK(int32_t)

long rbe_index_snapshot(void* dst, const void* src, int wide, long nblocks, int k, int b) {
    if (nblocks <= 0 || k <= 0) return -1;
    // the source is read once, by the copy; everything after reads only the private copy
    memcpy(dst, src, (size_t)nblocks * k * (wide ? sizeof(int32_t) : sizeof(int16_t)));
    const long lim = (long)b * b;
    if (wide ? index_ok_int32_t((const int32_t*)dst, nblocks, k, lim) : index_ok_int16_t((const int16_t*)dst, nblocks, k, lim))
        return -1;
    return rbe_index_check(dst, wide, nblocks, k, b);  // where: the first bad position
}

// non-finite count and max |x| (NaN if any x is NaN) of a float or double array. max |x| works
// on the bit patterns: with the sign bit cleared, IEEE order is unsigned integer order, with the
// infinity's pattern above every finite one and every NaN's above it; an integer max vectorizes
// (a float max with NaN checks does not), once per instruction set: SSE2 has no unsigned max, and
// with its emulation the scans of a 1024-token 768 -> 3072 linear forward's input and output took
// 4.3% of perf's samples; with AVX-512 2.7%, the memory traffic.
#define RBE_SCAN(T, SFX, U, ABSMASK, INFBITS)                          \
    long rbe_count_nonfinite_##SFX(const T* x, long n) {               \
        long bad = 0;                                                  \
        for (long i = 0; i < n; i++) bad += !isfinite(x[i]);           \
        return bad;                                                    \
    }                                                                  \
    RBE_ISA_CLONES double rbe_max_abs_##SFX(const T* x, long n) {      \
        U m = 0;                                                       \
        for (long i = 0; i < n; i++) {                                 \
            U u;                                                       \
            memcpy(&u, x + i, sizeof u);                               \
            u &= ABSMASK;                                              \
            m = u > m ? u : m;                                         \
        }                                                              \
        if (m > INFBITS) return NAN;                                   \
        T r;                                                           \
        memcpy(&r, &m, sizeof r);                                      \
        return (double)r;                                              \
    }
RBE_SCAN(float, f32, uint32_t, 0x7fffffffu, 0x7f800000u)
RBE_SCAN(double, f64, uint64_t, 0x7fffffffffffffffull, 0x7ff0000000000000ull)
