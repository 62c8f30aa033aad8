// rbe_few_rows.h - the body of the few-token coefficient kernel (rbe_cuda_few_rows in
// rbe_kernels.cu): one thread's share of one thread block's work, written for host and device so
// that tests/c/test_few_rows.cpp runs it on the CPU, thread by thread, phase by phase (the kernel
// runs the same phases with a barrier between them). C++; no CUDA header needed on the host.
//
// Thread block `blk` of R*nsplit handles block row i = blk / nsplit and the block columns of
// split s = blk % nsplit, [C*s/nsplit, C*(s+1)/nsplit): those blocks are contiguous in coeffs and
// index ([R*C, k]). Phase 1 (accumulate): thread tid of nthreads takes coefficients tid,
// tid + nthreads, ... (consecutive threads, consecutive coefficients) and adds c * xa[j][v][t] to
// acc[u][t] (acc: [b][T], zeroed before; `add` is an atomic add on the device). Phase 2 (store):
// acc goes to out[s][t][i][u] (out: [nsplit, T, R, b]). Positions outside [0, b*b) are skipped.
#ifndef RBE_FEW_ROWS_H
#define RBE_FEW_ROWS_H

#include "rbe_math.h"  // RBE_HD

namespace rbe_few {

struct Part {
    int i, s, j0, j1;
};

RBE_HD Part part_of(int blk, int C, int nsplit) {
    const int i = blk / nsplit, s = blk % nsplit;
    return Part{i, s, (int)((long long)C * s / nsplit), (int)((long long)C * (s + 1) / nsplit)};
}

// Load(coeffs, flat) -> Cc; Add(Cc* p, Cc v): *p += v (atomically on the device)
template <typename Cc, typename V, typename Load, typename Add>
RBE_HD void accumulate(Cc* acc, const Cc* xa, const V* coeffs, const void* index, int wide, Part p, int C, int k,
                       int b, int rows, int T, int tid, int nthreads, Load load, Add add) {
    const long long bb = (long long)b * b, n = (long long)(p.j1 - p.j0) * k;
    const long long base = ((long long)p.i * C + p.j0) * k;
    for (long long e = tid; e < n; e += nthreads) {
        const long long pos = wide ? (long long)((const int*)index)[base + e] : (long long)((const short*)index)[base + e];
        if (pos < 0 || pos >= bb) continue;  // never read or write outside, whatever the index holds
        const int u = (int)(pos / b), v = (int)(pos % b), j = p.j0 + (int)(e / k);
        const Cc c = load(coeffs, base + e);
        const Cc* src = xa + ((long long)j * rows + v) * T;
        for (int t = 0; t < T; t++) add(&acc[u * T + t], c * src[t]);
    }
}

template <typename Cc>
RBE_HD void store(Cc* out, const Cc* acc, Part p, int R, int b, int T, int tid, int nthreads) {
    Cc* dst = out + ((long long)p.s * T * R + p.i) * b;  // out[s][t][i][u] = dst[t*R*b + u]
    for (int e = tid; e < b * T; e += nthreads) dst[(long long)(e % T) * R * b + e / T] = acc[e];
}

}  // namespace rbe_few

#endif
