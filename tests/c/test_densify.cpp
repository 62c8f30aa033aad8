// test_densify.cpp - the densify CUDA kernel's body (cuda/rbe_densify.h) run on the CPU, thread by
// thread and phase by phase as a thread block would, for every thread block of the grid, against a
// naive layout of Chat. Integer-valued data, so every sum is exact. Built and run by `make ctest`
// under ASan/UBSan (exact-size buffers: any access past them is reported).
#include <cstdio>
#include <random>
#include <vector>

#include "kernel_body_test.h"
#include "rbe_densify.h"

namespace {

int failures = 0;

struct Store {
    void operator()(float* p, double v) const { *p = (float)v; }
};

template <typename I>
void run_case(std::mt19937& rng, int R, int C, int b, int k, int nthreads, bool corrupt) {
    const int nblk = R * C, bb = b * b;
    const std::vector<double> phihat = small_ints(rng, (size_t)RBE_NPAT * bb),
                              basis = small_ints(rng, (size_t)nblk * RBE_NPAT), coeffs = small_ints(rng, (size_t)nblk * k);
    const std::vector<I> index = random_index<I>(rng, nblk, k, b, corrupt);  // bad values skipped below too
    const size_t rows = (size_t)R * b, cols = (size_t)C * b;
    std::vector<double> want(rows * cols, 0.0);
    for (int p = 0; p < nblk; p++) {
        const int i = p / C, j = p % C;
        for (int e = 0; e < bb; e++) {
            double s = 0;
            for (int kk = 0; kk < RBE_NPAT; kk++) s += basis[(size_t)p * RBE_NPAT + kk] * phihat[(size_t)kk * bb + e];
            want[((size_t)i * b + e / b) * cols + (size_t)j * b + e % b] = s;
        }
        for (int q = 0; q < k; q++) {
            const long long pos = index[(size_t)p * k + q];
            if (pos < 0 || pos >= bb) continue;
            want[((size_t)i * b + pos / b) * cols + (size_t)j * b + pos % b] += coeffs[(size_t)p * k + q];
        }
    }
    std::vector<float> big(rows * cols, -999.0f);
    for (long long p = 0; p < nblk; p++) {
        std::vector<double> acc(bb, -777.0);  // phase 1 must write every element
        for (int tid = 0; tid < nthreads; tid++)
            rbe_densify::pattern(acc.data(), phihat.data(), basis.data(), p, b, tid, nthreads, Load());
        for (int tid = 0; tid < nthreads; tid++)
            rbe_densify::coefficients(acc.data(), coeffs.data(), index.data(), sizeof(I) == 4, p, k, b, tid, nthreads,
                                      Load(), Add());
        for (int tid = 0; tid < nthreads; tid++)
            rbe_densify::write(big.data(), acc.data(), p, C, b, tid, nthreads, Store());
    }
    for (size_t e = 0; e < big.size(); e++) {
        if ((double)big[e] != want[e]) {
            std::printf("FAIL R=%d C=%d b=%d k=%d threads=%d wide=%d: element %zu %g != %g\n", R, C, b, k, nthreads,
                        (int)(sizeof(I) == 4), e, (double)big[e], want[e]);
            failures++;
            return;
        }
    }
}

}  // namespace

int main() {
    std::mt19937 rng(11);
    int cases = 0;
    const int shapes[][4] = {{1, 1, 8, 5}, {1, 7, 16, 40}, {5, 3, 4, 16}, {3, 9, 8, 0}, {2, 1, 32, 100}, {3, 4, 64, 300}};
    for (const auto& sh : shapes)
        for (int nthreads : {1, 7, 256})
            for (bool corrupt : {false, true}) {
                run_case<short>(rng, sh[0], sh[1], sh[2], sh[3], nthreads, corrupt);
                run_case<int>(rng, sh[0], sh[1], sh[2], sh[3], nthreads, corrupt);
                cases += 2;
            }
    std::printf("densify kernel body: %d cases, %d failed\n", cases, failures);
    return failures ? 1 : 0;
}
