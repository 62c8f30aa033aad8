/* rbe_act.c - the activations of DESIGN.md section 4, named as PyTorch names them.
 *
 *   gelu       x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))        (F.gelu)
 *   gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (F.gelu(approximate="tanh"))
 *   relu       max(x, 0), NaN propagates; derivative 0 where x <= 0, else 1 (NaN -> 1, as torch)
 *   silu       x * sigmoid(x)
 *
 * The scalar functions are the definitions; float values are computed in
 * double and rounded once, so they are within half an ulp of the exact value.
 * Non-finite inputs give what the formula gives (gelu(-inf) = NaN, as torch).
 */
#include "rbe.h"

#include <math.h>

#define SQRT_2_OVER_PI 0.79788456080286535588
#define INV_SQRT_2PI 0.39894228040143267794
#define GELU_TANH_C 0.044715

double rbe_act_scalar_f64(double x, int act) {
    switch (act) {
    case RBE_ACT_GELU:
        return 0.5 * x * erfc(-x * RBE_SQRT1_2);
    case RBE_ACT_GELU_TANH:
        return 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x)));
    case RBE_ACT_RELU:
        return x > 0.0 || x != x ? x : 0.0;
    case RBE_ACT_SILU:
        return x / (1.0 + exp(-x));
    default:
        return x;
    }
}

double rbe_act_grad_scalar_f64(double x, int act) {
    switch (act) {
    case RBE_ACT_GELU:
        return 0.5 * erfc(-x * RBE_SQRT1_2) + x * INV_SQRT_2PI * exp(-0.5 * x * x);
    case RBE_ACT_GELU_TANH: {
        double t = tanh(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x));
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x);
    }
    case RBE_ACT_RELU:
        return x <= 0.0 ? 0.0 : 1.0;
    case RBE_ACT_SILU: {
        double s = 1.0 / (1.0 + exp(-x));
        return s * (1.0 + x * (1.0 - s));
    }
    default:
        return 1.0;
    }
}

float rbe_act_scalar_f32(float x, int act) { return (float)rbe_act_scalar_f64((double)x, act); }
float rbe_act_grad_scalar_f32(float x, int act) { return (float)rbe_act_grad_scalar_f64((double)x, act); }

void rbe_act_forward_f64(double* y, const double* x, long n, int act) {
    for (long i = 0; i < n; i++) y[i] = rbe_act_scalar_f64(x[i], act);
}

void rbe_act_backward_f64(double* dx, const double* dy, const double* x, long n, int act) {
    if (act == RBE_ACT_RELU) {  // dy * 0 would turn an infinite dy into NaN; torch passes 0
        for (long i = 0; i < n; i++) dx[i] = x[i] <= 0.0 ? 0.0 : dy[i];
        return;
    }
    for (long i = 0; i < n; i++) dx[i] = dy[i] * rbe_act_grad_scalar_f64(x[i], act);
}

void rbe_act_forward_f32(float* y, const float* x, long n, int act) {
    for (long i = 0; i < n; i++) y[i] = rbe_act_scalar_f32(x[i], act);
}

void rbe_act_backward_f32(float* dx, const float* dy, const float* x, long n, int act) {
    if (act == RBE_ACT_RELU) {
        for (long i = 0; i < n; i++) dx[i] = x[i] <= 0.0f ? 0.0f : dy[i];
        return;
    }
    for (long i = 0; i < n; i++) dx[i] = dy[i] * rbe_act_grad_scalar_f32(x[i], act);
}
