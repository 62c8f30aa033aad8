// rbe_densify.h - the body of the densify kernel (rbe_cuda_densify in rbe_kernels.cu): one thread's
// share of one thread block's work, host and device code, so that tests/c/test_densify.cpp runs it
// on the CPU thread by thread, phase by phase (the kernel runs the phases with barriers between).
//
// Thread block p of R*C builds block (i, j) = (p / C, p % C) of Chat in shared memory, acc [b*b]
// (compute type), then writes it once, in the output dtype, into the dense [R*b, C*b] layout:
//   1. pattern: acc[e] = sum_k basis[p][k] * phihat[k][e]            (every element written)
//   2. coefficients: acc[index[p][q]] += coeffs[p][q]               (`add`: atomic on the device;
//      positions outside [0, b*b) are skipped, so any index is memory-safe)
//   3. write: big[(i*b + u) * C*b + j*b + v] = acc[u*b + v]          (`store` rounds once)
#ifndef RBE_DENSIFY_H
#define RBE_DENSIFY_H

#include "rbe_math.h"  // RBE_HD, RBE_NPAT

namespace rbe_densify {

// phihat: [8][b*b]; Load(basis, flat) -> Cc
template <typename Cc, typename V, typename Load>
RBE_HD void pattern(Cc* acc, const Cc* phihat, const V* basis, long long p, int b, int tid, int nthreads, Load load) {
    const int bb = b * b;
    Cc w[RBE_NPAT];
    for (int k = 0; k < RBE_NPAT; k++) w[k] = load(basis, p * RBE_NPAT + k);
    for (int e = tid; e < bb; e += nthreads) {
        Cc s = 0;
        for (int k = 0; k < RBE_NPAT; k++) s += w[k] * phihat[(long long)k * bb + e];
        acc[e] = s;
    }
}

// Add(Cc* p, Cc v): *p += v (atomically on the device: a corrupted index may repeat a position)
template <typename Cc, typename V, typename Load, typename Add>
RBE_HD void coefficients(Cc* acc, const V* coeffs, const void* index, int wide, long long p, int k, int b, int tid,
                         int nthreads, Load load, Add add) {
    const long long bb = (long long)b * b, base = p * k;
    for (int q = tid; q < k; q += nthreads) {
        const long long pos = wide ? (long long)((const int*)index)[base + q] : (long long)((const short*)index)[base + q];
        if (pos < 0 || pos >= bb) continue;
        add(&acc[pos], load(coeffs, base + q));
    }
}

// Store(O* dst, Cc v): *dst = v rounded to O
template <typename Cc, typename O, typename Store>
RBE_HD void write(O* big, const Cc* acc, long long p, int C, int b, int tid, int nthreads, Store store) {
    const long long i = p / C, j = p % C, row = (long long)C * b;
    for (int e = tid; e < b * b; e += nthreads) store(&big[(i * b + e / b) * row + j * b + e % b], acc[e]);
}

}  // namespace rbe_densify

#endif
