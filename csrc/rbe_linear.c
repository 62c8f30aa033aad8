/* rbe_linear.c - y = x W^T + bias computed in the transform domain (DESIGN.md section 3).
 *
 * Forward, per tile of RBE_TILE tokens:
 *   1. analysis: Xh_j = A x_j^T  (DCT of every input segment, plus its projections
 *      on the pattern's analysis vectors), feature-major;
 *   2. rows: Yh_i = sum_j (sparse product c_uv Xh_j[v] -> Yh_i[u]) + pattern combination;
 *      y_i = S^T Yh_i (inverse DCT + pattern synthesis), bias and activation on write.
 * Backward: Gh_i = S g_i^T, then dx_j = A^T (sum_i transposed products), and
 * dcoeffs / dbasis as dot products over tokens of Gh and Xh rows.
 */
#include "rbe.h"

size_t rbe_rows_scratch(int b, int nf) { return (size_t)(2 * b + nf) * RBE_TILE; }

#define RBE_T float
#define RBE_SFX(name) name##_f32
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX

#define RBE_T double
#define RBE_SFX(name) name##_f64
#include "rbe_linear_impl.h"
#undef RBE_T
#undef RBE_SFX
