// kernel_body_test.h - what the CPU tests of CUDA kernel bodies (test_few_rows.cpp, test_densify.cpp)
// share: integer-valued random data (every sum exact in any order), a valid random index with, on
// request, the values a corrupted one may hold, and the load/add the emulated threads use.
#ifndef KERNEL_BODY_TEST_H
#define KERNEL_BODY_TEST_H

#include <algorithm>
#include <random>
#include <vector>

// n values in {-3, ..., 3}
inline std::vector<double> small_ints(std::mt19937& rng, size_t n) {
    std::uniform_int_distribution<int> small(-3, 3);
    std::vector<double> v(n);
    for (double& e : v) e = small(rng);
    return v;
}

// [nblk, k]: k distinct ascending positions in [0, b*b) per block; corrupt: three values a
// corrupted index may hold (negative, b*b, the int16 maximum), which the kernels must skip
template <typename I>
std::vector<I> random_index(std::mt19937& rng, int nblk, int k, int b, bool corrupt) {
    std::vector<I> index((size_t)nblk * k);
    std::vector<int> all(b * b);
    for (int q = 0; q < b * b; q++) all[q] = q;
    for (int p = 0; p < nblk; p++) {
        std::shuffle(all.begin(), all.end(), rng);
        std::vector<int> pick(all.begin(), all.begin() + k);
        std::sort(pick.begin(), pick.end());
        for (int q = 0; q < k; q++) index[(size_t)p * k + q] = (I)pick[q];
    }
    if (corrupt && k > 0) {
        index[0] = (I)-1;
        index[index.size() - 1] = (I)(b * b);
        index[index.size() / 2] = (I)32767;
    }
    return index;
}

// the emulated threads run one after the other: a plain load and add stand for the device's
struct Load {
    double operator()(const double* p, long long i) const { return p[i]; }
};

struct Add {
    void operator()(double* p, double v) const { *p += v; }
};

#endif
