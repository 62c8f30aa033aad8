/* rbe_cuda.h - CUDA kernels of rbe_ffn: extern "C" launchers taking raw device
 * pointers, sizes and the stream to run on. No torch here: these compile with
 * nvcc alone (CI compiles them on machines without a GPU); cuda/rbe_ops_cuda.cpp
 * registers the torch operators that call them, always on torch's current stream.
 *
 * The GPU path decodes each weight block by block into a transient dense matrix
 * for the duration of one operator call and multiplies it with cuBLAS (the
 * "decode path" of DESIGN.md section 3); nothing dense outlives the call and
 * nothing dense is saved for backward. The kernels here are the parts around the
 * products: the tables of a block size, index validation, coefficient scatter
 * and gather, block <-> matrix layout (with the pattern added while writing),
 * the activations, and the encoder's per-block error; and the few-token coefficient product of
 * the opt-in DCT-domain path (csrc/rbe_dct_path.h).
 *
 * Conventions are those of csrc/rbe.h: W [out, in], R = ceil(out/b) block rows,
 * C = ceil(in/b) block columns, block (i, j) is p = i*C + j; a block-major
 * buffer is [R*C, b, b]; index is int16 (wide = 0) or int32 (wide = 1), flat u*b + v.
 * Every launcher returns the cudaError_t of its launch (cudaSuccess when there was
 * nothing to do).
 */
#ifndef RBE_CUDA_H
#define RBE_CUDA_H

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

/* element types of the buffers the launchers take */
enum rbe_cuda_dtype { RBE_CUDA_F32 = 0, RBE_CUDA_F64 = 1, RBE_CUDA_F16 = 2, RBE_CUDA_BF16 = 3 };

/* psi: [b, b] orthonormal DCT-II rows, psi[u*b + n] = a_u cos(pi (n + 1/2) u / b);
 * phi: [8, b*b] the pattern images (csrc/rbe_plan.c); both of type dt (F32 or F64),
 * evaluated in double and rounded once */
cudaError_t rbe_cuda_tables(void* psi, void* phi, int dt, int b, cudaStream_t s);

/* bad: one unsigned long long, set to the smallest flat position p*k + q whose index
 * value is outside [0, b*b) or not above its predecessor in the block (~0ULL if none).
 * index: [nblk, k] */
cudaError_t rbe_cuda_index_check(unsigned long long* bad, const void* index, int wide, long long nblk, int k, int b,
                                 cudaStream_t s);

/* chat: [nblk, b*b] of type ct (F32/F64), zero except chat[p][index[p][q]] = coeffs[p][q];
 * coeffs: [nblk, k] of type vt */
cudaError_t rbe_cuda_scatter(void* chat, int ct, const void* coeffs, int vt, const void* index, int wide,
                             long long nblk, int k, int b, cudaStream_t s);

/* vals: [nblk, k] of type vt, vals[p][q] = hat[p][index[p][q]]; hat: [nblk, b*b] of type ct */
cudaError_t rbe_cuda_gather(void* vals, int vt, const void* hat, int ct, const void* index, int wide, long long nblk,
                            int k, int b, cudaStream_t s);

/* w: [out, in] of type wt, w[i*b + r][j*b + c] = blk[p][r][c] + sum_k basis[p][k] phi[k][r*b + c]
 * for the real entries; blk: [R*C, b, b] and phi [8, b*b] of type ct; basis: [R*C, 8] of type vt */
cudaError_t rbe_cuda_assemble(void* w, int wt, const void* blk, const void* phi, int ct, const void* basis, int vt,
                              int out, int in, int b, cudaStream_t s);

/* blk: [R*C, b, b] of type ct from w: [out, in] of type wt. reflect = 0: entries past the
 * matrix are zero (the gradient of a padded entry); reflect = 1: they repeat the real entries
 * by even reflection (the encoder's padding, csrc/rbe_codec.c) */
cudaError_t rbe_cuda_split(void* blk, int ct, const void* w, int wt, int out, int in, int b, int reflect,
                           cudaStream_t s);

/* err[p] = squared error of block p over its real entries: full blocks take dct_energy[p]
 * (Parseval), edge blocks sum rec[p][r][c]^2 over r < rows, c < cols. All double;
 * rec: [R*C, b, b], dct_energy / err: [R*C] */
cudaError_t rbe_cuda_block_error(double* err, const double* rec, const double* dct_energy, int out, int in, int b,
                                 cudaStream_t s);

/* y = act(x), n elements of type dt (act: enum rbe_act of csrc/rbe.h), computed in double */
cudaError_t rbe_cuda_act_forward(void* y, const void* x, long long n, int act, int dt, cudaStream_t s);
/* dx = dy * act'(x) (relu: 0 where x <= 0, else dy), computed in double; dx may alias dy */
cudaError_t rbe_cuda_act_backward(void* dx, const void* dy, const void* x, long long n, int act, int dt,
                                  cudaStream_t s);

/* The few-token coefficient product of the DCT-domain path (csrc/rbe_dct_path.h):
 * out[s][t][i][u] = sum over blocks (i, j) with j in split s's range [C*s/nsplit, C*(s+1)/nsplit)
 * and their kept coefficients (u, v, c) of c * xa[(j*rows + v)*T + t]; the caller sums the
 * nsplit partial results. out: [nsplit, T, R, b] and xa: [C, rows, T] of the compute type ct
 * (F32/F64); coeffs: [R*C, k] of type vt; index: [R*C, k]. Positions outside [0, b*b) are skipped.
 * 1 <= T <= RBE_CUDA_FEW_MAX, 1 <= nsplit <= C. */
#define RBE_CUDA_FEW_MAX 16
cudaError_t rbe_cuda_few_rows(void* out, const void* xa, int ct, const void* coeffs, int vt, const void* index,
                              int wide, int R, int C, int k, int b, int rows, int T, int nsplit, cudaStream_t s);

/* Chat of the DCT-domain dense path, laid out as one dense [R*b, C*b] matrix of the parameters'
 * type vt (csrc/rbe_dct_path.h): block (i, j) = sum_k basis[p][k] phihat[k] plus the kept
 * coefficients at their positions (outside [0, b*b): skipped), summed in the compute type ct
 * (F32/F64) and rounded once. One thread block per block p = i*C + j (body: rbe_densify.h).
 * phihat: [8, b*b] of type ct; basis [R*C, 8] and coeffs [R*C, k] of type vt; index [R*C, k].
 * Needs b*b*sizeof(ct) <= RBE_CUDA_DENSIFY_SHARED (float32 up to b = 110, float64 up to b = 78;
 * the callers take another way beyond). */
#define RBE_CUDA_DENSIFY_SHARED (48 * 1024)
cudaError_t rbe_cuda_densify(void* big, int vt, const void* phihat, int ct, const void* basis, const void* coeffs,
                             const void* index, int wide, int R, int C, int k, int b, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
