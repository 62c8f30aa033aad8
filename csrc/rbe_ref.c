/* rbe_ref.c - naive references for the fast linear kernels: decode the whole
 * weight, then plain dense loops in double. Slow and obviously right; the C
 * unit tests compare the transform-domain kernels with these. */
#include "rbe.h"

#include <math.h>
#include <string.h>

#define RBE_T float
#define RBE_SFX(name) name##_f32
#define RBE_WEIGHT rbe_weight_f32
#include "rbe_ref_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_WEIGHT

#define RBE_T double
#define RBE_SFX(name) name##_f64
#define RBE_WEIGHT rbe_weight_f64
#include "rbe_ref_impl.h"
#undef RBE_T
#undef RBE_SFX
#undef RBE_WEIGHT
