/* rbe_math.h - the scalar definitions of the format, written once for the CPU (C11) and the
 * GPU (CUDA C++): the DCT-II entries, the block grid, the 8 pattern functions and the
 * activations with their derivatives. Every kernel family evaluates these, so the CPU and
 * CUDA code cannot drift apart; everything is static inline, in double.
 *
 * No other dependency than <math.h>; under nvcc the functions are __host__ __device__.
 */
#ifndef RBE_MATH_H
#define RBE_MATH_H

#ifdef __CUDACC__
#define RBE_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define RBE_HD static inline
#endif

#define RBE_NPAT 8 /* pattern functions per block */
#define RBE_PI 3.14159265358979323846
#define RBE_SQRT1_2 0.70710678118654752440
#define RBE_SQRT_2_OVER_PI 0.79788456080286535588
#define RBE_INV_SQRT_2PI 0.39894228040143267794
#define RBE_GELU_TANH_C 0.044715

enum rbe_act { RBE_ACT_NONE = 0, RBE_ACT_GELU = 1, RBE_ACT_GELU_TANH = 2, RBE_ACT_RELU = 3, RBE_ACT_SILU = 4 };

/* psi_u[n] = a_u cos(pi (n + 1/2) u / b), a_0 = sqrt(1/b), a_u = sqrt(2/b): the orthonormal DCT-II */
RBE_HD double rbe_dct_entry(int u, int n, int b) {
    const double a = u == 0 ? sqrt(1.0 / b) : sqrt(2.0 / b);
    return a * cos(RBE_PI * (n + 0.5) * u / b);
}

/* the block's local coordinate of row or column n: 2n/(b-1) - 1, in [-1, 1] */
RBE_HD double rbe_grid(int n, int b) { return 2.0 * n / (double)(b - 1) - 1.0; }

/* Phi_k at row r, column c of a block (x: column coordinate, y: row coordinate, d = |(x, y)|):
 * [1, d, d^2, cos(pi x), cos(pi y), cos(2 pi x), cos(2 pi y), cos(pi x) cos(pi y)] */
RBE_HD double rbe_pattern_value(int k, int r, int c, int b) {
    const double x = rbe_grid(c, b), y = rbe_grid(r, b), d2 = x * x + y * y;
    switch (k) {
    case 0: return 1.0;
    case 1: return sqrt(d2);
    case 2: return d2;
    case 3: return cos(RBE_PI * x);
    case 4: return cos(RBE_PI * y);
    case 5: return cos(2.0 * RBE_PI * x);
    case 6: return cos(2.0 * RBE_PI * y);
    default: return cos(RBE_PI * x) * cos(RBE_PI * y);
    }
}

/* The activations, named as PyTorch names them:
 *   gelu       x * Phi(x) = 0.5 x erfc(-x / sqrt 2)                  (F.gelu)
 *   gelu_tanh  0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)  (F.gelu(approximate="tanh")),
 *              evaluated as x * sigmoid(2u) (the same function; 1 + tanh(u) cancels
 *              catastrophically for u << 0, the sigmoid form does not)
 *   relu       max(x, 0), NaN propagates; derivative 0 where x <= 0, else 1 (NaN -> 1, as torch)
 *   silu       x * sigmoid(x)
 * Non-finite inputs give what the formula gives (gelu(-inf) = NaN, as torch). */
RBE_HD double rbe_act_value(double x, int act) {
    switch (act) {
    case RBE_ACT_GELU: return 0.5 * x * erfc(-x * RBE_SQRT1_2);
    case RBE_ACT_GELU_TANH: return x / (1.0 + exp(-2.0 * RBE_SQRT_2_OVER_PI * (x + RBE_GELU_TANH_C * x * x * x)));
    case RBE_ACT_RELU: return x > 0.0 || x != x ? x : 0.0;
    case RBE_ACT_SILU: return x / (1.0 + exp(-x));
    default: return x;
    }
}

RBE_HD double rbe_act_grad(double x, int act) {
    switch (act) {
    case RBE_ACT_GELU: return 0.5 * erfc(-x * RBE_SQRT1_2) + x * RBE_INV_SQRT_2PI * exp(-0.5 * x * x);
    case RBE_ACT_GELU_TANH: {  // s = 0.5 (1 + tanh u) = sigmoid(2u); 0.5 (1 - tanh^2 u) = 2 s (1 - s)
        const double s = 1.0 / (1.0 + exp(-2.0 * RBE_SQRT_2_OVER_PI * (x + RBE_GELU_TANH_C * x * x * x)));
        return s + 2.0 * x * s * (1.0 - s) * RBE_SQRT_2_OVER_PI * (1.0 + 3.0 * RBE_GELU_TANH_C * x * x);
    }
    case RBE_ACT_RELU: return x <= 0.0 ? 0.0 : 1.0;
    case RBE_ACT_SILU: {
        const double s = 1.0 / (1.0 + exp(-x));
        return s * (1.0 + x * (1.0 - s));
    }
    default: return 1.0;
    }
}

#endif
