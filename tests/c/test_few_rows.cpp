// test_few_rows.cpp - the few-token CUDA kernel's body (cuda/rbe_few_rows.h) run on the CPU, thread
// by thread and phase by phase as a thread block would, for every thread block of the grid, against
// a naive sum. Integer-valued data, so every sum is exact whatever its order. Built and run by
// `make ctest` under ASan/UBSan (exact-size buffers: any read or write past them is reported).
#include <cstdio>
#include <random>
#include <vector>

#include "kernel_body_test.h"
#include "rbe_few_rows.h"

namespace {

int failures = 0;

// one case: sizes, how many threads per block, int16 or int32 index, some positions out of range
template <typename I>
void run_case(std::mt19937& rng, int R, int C, int b, int k, int nf, int T, int nsplit, int nthreads, bool corrupt) {
    const int rows = b + nf, nblk = R * C;
    const std::vector<double> xa = small_ints(rng, (size_t)C * rows * T), coeffs = small_ints(rng, (size_t)nblk * k);
    const std::vector<I> index = random_index<I>(rng, nblk, k, b, corrupt);  // bad values skipped below too
    // the naive sum: want[t][i][u]
    std::vector<double> want((size_t)T * R * b, 0.0);
    for (int p = 0; p < nblk; p++) {
        const int i = p / C, j = p % C;
        for (int q = 0; q < k; q++) {
            const long long pos = index[(size_t)p * k + q];
            if (pos < 0 || pos >= (long long)b * b) continue;
            const int u = (int)(pos / b), v = (int)(pos % b);
            for (int t = 0; t < T; t++)
                want[((size_t)t * R + i) * b + u] += coeffs[(size_t)p * k + q] * xa[((size_t)j * rows + v) * T + t];
        }
    }
    // the grid, emulated: exact-size buffers (ASan sees any access past them)
    std::vector<double> out((size_t)nsplit * T * R * b, -999.0);
    for (int blk = 0; blk < R * nsplit; blk++) {
        const rbe_few::Part p = rbe_few::part_of(blk, C, nsplit);
        std::vector<double> acc((size_t)b * T, 0.0);
        for (int tid = 0; tid < nthreads; tid++)
            rbe_few::accumulate(acc.data(), xa.data(), coeffs.data(), index.data(), sizeof(I) == 4, p, C, k, b, rows,
                                T, tid, nthreads, Load(), Add());
        for (int tid = 0; tid < nthreads; tid++) rbe_few::store(out.data(), acc.data(), p, R, b, T, tid, nthreads);
    }
    std::vector<double> got((size_t)T * R * b, 0.0);  // the caller's sum over the splits
    for (int s = 0; s < nsplit; s++)
        for (size_t e = 0; e < got.size(); e++) got[e] += out[(size_t)s * got.size() + e];
    for (size_t e = 0; e < got.size(); e++) {
        if (got[e] != want[e]) {
            std::printf("FAIL R=%d C=%d b=%d k=%d nf=%d T=%d nsplit=%d threads=%d wide=%d: element %zu %g != %g\n", R,
                        C, b, k, nf, T, nsplit, nthreads, (int)(sizeof(I) == 4), e, got[e], want[e]);
            failures++;
            return;
        }
    }
}

}  // namespace

int main() {
    std::mt19937 rng(7);
    int cases = 0;
    // sizes: one block; one block row; more splits than block rows; a single column; b = 4 .. 64
    const int shapes[][4] = {{1, 1, 8, 5}, {1, 7, 16, 40}, {5, 3, 4, 16}, {3, 9, 8, 0}, {2, 1, 32, 100}, {4, 6, 64, 300}};
    for (const auto& sh : shapes) {
        const int R = sh[0], C = sh[1], b = sh[2], k = sh[3];
        for (int T : {1, 3, 16})
            for (int nsplit : {1, 2, C})
                for (int nthreads : {1, 7, 256}) {
                    if (nsplit > C) continue;
                    for (bool corrupt : {false, true}) {
                        run_case<short>(rng, R, C, b, k, 5, T, nsplit, nthreads, corrupt);
                        run_case<int>(rng, R, C, b, k, 0, T, nsplit, nthreads, corrupt);
                        cases += 2;
                    }
                }
    }
    std::printf("few-token kernel body: %d cases, %d failed\n", cases, failures);
    return failures ? 1 : 0;
}
