/* rbe_check.c - validation of what the kernels will read: index tensors (and private,
 * validated copies of them), non-finite counts and magnitudes of dense inputs. */
#include "rbe.h"

#include <math.h>

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

long rbe_index_snapshot(void* dst, const void* src, int wide, long nblocks, int k, int b) {
    // every value is read once through a volatile pointer (the source may change under us: the
    // compiler must not re-read it) and the value checked is the value written
    const volatile int16_t* s16 = (const volatile int16_t*)src;
    const volatile int32_t* s32 = (const volatile int32_t*)src;
    int16_t* d16 = (int16_t*)dst;
    int32_t* d32 = (int32_t*)dst;
    const long lim = (long)b * b;
    long bad = -1;
    for (long blk = 0; blk < nblocks; blk++) {
        long prev = -1;
        for (int q = 0; q < k; q++) {
            const long pos = blk * k + q;
            long v;
            if (wide) {
                const int32_t x = s32[pos];
                d32[pos] = x;
                v = x;
            } else {
                const int16_t x = s16[pos];
                d16[pos] = x;
                v = x;
            }
            if (bad < 0 && (v <= prev || v >= lim)) bad = pos;
            prev = v;
        }
    }
    return bad;
}

long rbe_count_nonfinite_f32(const float* x, long n) {
    long bad = 0;
    for (long i = 0; i < n; i++) bad += !isfinite(x[i]);
    return bad;
}

long rbe_count_nonfinite_f64(const double* x, long n) {
    long bad = 0;
    for (long i = 0; i < n; i++) bad += !isfinite(x[i]);
    return bad;
}

double rbe_max_abs_f32(const float* x, long n) {
    float m = 0.0f;
    int nan = 0;
    for (long i = 0; i < n; i++) {
        const float a = fabsf(x[i]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    return nan ? NAN : m;
}

double rbe_max_abs_f64(const double* x, long n) {
    double m = 0.0;
    int nan = 0;
    for (long i = 0; i < n; i++) {
        const double a = fabs(x[i]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    return nan ? NAN : m;
}
