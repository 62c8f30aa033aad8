// rbe_dct_path.h - the DCT-domain paths of the linear and feed-forward operators (docs/DESIGN.md
// section 5.1): the GPU paths in preparation, a dense product for many tokens and a sparse one for
// few, written with ATen operations (but for the few-token coefficient product, which a device may
// replace with its kernel) so that the same code runs, and is tested, on CPU tensors.
//
// Block (i, j) of W is Psi^T Chat_ij Psi with Chat_ij = (the kept coefficients) + sum_k
// p_ijk Phihat_k and Phihat_k = Psi Phi_k Psi^T. With every b-long segment of the input
// transformed (xhat_j = Psi x_j), y_i = Psi^T sum_j Chat_ij xhat_j: one dense product with Chat
// laid out as an [R*b, C*b] matrix ("densified"), between two per-segment transforms that cost
// about b/out of it. Backward: dChat = ghat^T xhat is the product a dense layer runs for dW;
// the coefficient gradients are dChat gathered at the index, the pattern ones <dChat_ij, Phihat_k>.
//
// The callers check every argument first (csrc/rbe_ops_common.h) and, on CUDA, validate the
// index; the functions here take the checked structs. Whatever the index holds, nothing is
// read or written out of bounds: positions outside [0, b*b) are sent to element 0 with the
// value 0 (and gather 0).
#pragma once

#include <array>
#include <tuple>

#include "rbe_ops_common.h"

namespace rbe {

// The process-wide switch (rbe_ffn._C.set_dct_path): when on, the linear and feed-forward
// operators of every device take this path. Off by default: the CPU has its own kernels and the
// CUDA default stays the decode path until this one has been measured and checked on a GPU.
bool dct_path_enabled();
bool set_dct_path(bool on);  // returns the previous setting

// Forward calls of at most n tokens (n = 0: none, the default) take the few-token sparse product
// instead of the densified one: the input transformed with the plan's analysis rows (DCT and
// pattern projections), each block's kept coefficients applied to it (no dense tensor of any
// kind), the pattern from its rank-1 terms, then the synthesis rows. Returns the previous n.
int64_t set_dct_few_tokens(int64_t n);

// The tables of a block size for inputs of dtype dt on dev (built at their first use, with a
// synchronous host-to-device copy, which a CUDA-graph capture forbids): whether they exist, and
// building them.
bool dct_tables_ready(int64_t b, at::ScalarType dt, at::Device dev);
void dct_prepare_tables(int64_t b, at::ScalarType dt, at::Device dev);

// The few-token coefficient product on one device: out [T, R, b] (a view, compute type) from
// xa [C, b+nf, T] (contiguous, compute type) and W's coefficients and index. The pure-ATen model
// serves every device unless a device registers a kernel (CUDA: cuda/rbe_ops_cuda.cpp).
using FewRowsFn = void (*)(at::Tensor& out, const at::Tensor& xa, const Weight& W);
void set_few_rows_cuda(FewRowsFn fn);

// Chat of W densified [R*b, C*b] in W's dtype by a device's kernel, from phihat [8, b*b] (compute
// type); an undefined tensor when the kernel cannot take this block size (then ATen does it).
using DensifyFn = at::Tensor (*)(const Weight& W, const at::Tensor& phihat);
void set_densify_cuda(DensifyFn fn);

// W holds the numbers passed in, sc their scales (the operators' coeff_scale, pattern_scale);
// the parameter gradients returned are those of the numbers passed in
Tensor dct_linear(const Tensor& x, const Tensor& x2, const Weight& W, const Scales& sc,
                  const c10::optional<Tensor>& bias);

std::tuple<Tensor, Tensor, Tensor, Tensor> dct_linear_backward(const Tensor& x, const Tensor& x2, const Tensor& g2,
                                                               const Weight& W, const Scales& sc,
                                                               std::array<bool, 4> mask);

std::tuple<Tensor, Tensor> dct_ffn(const Tensor& x, const FFNArgs& a, bool keep_pre);

// pre2: the saved pre-activation [T, d_ff] (undefined: checkpointed, recomputed per chunk)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dct_ffn_backward(const Tensor& x, const Tensor& g2,
                                                                                    const Tensor& pre2,
                                                                                    const FFNArgs& a,
                                                                                    std::array<bool, 7> mask);

}  // namespace rbe
