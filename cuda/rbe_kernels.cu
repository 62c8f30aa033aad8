// rbe_kernels.cu - the CUDA kernels of rbe_ffn (declarations and conventions: rbe_cuda.h).
// Plain CUDA C with templates over the element type; no torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rbe.h"
#include "rbe_cuda.h"
#include "rbe_densify.h"
#include "rbe_few_rows.h"

namespace {

constexpr int kThreads = 256;

// grid of a grid-stride loop over n items
unsigned grid_for(long long n) {
    long long g = (n + kThreads - 1) / kThreads;
    if (g > (1LL << 20)) g = 1LL << 20;
    return (unsigned)(g < 1 ? 1 : g);
}

// ---- element access: every type goes through double (one rounding when stored) ----
__device__ __forceinline__ double ld(const float* p, long long i) { return (double)p[i]; }
__device__ __forceinline__ double ld(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ double ld(const __half* p, long long i) { return (double)__half2float(p[i]); }
__device__ __forceinline__ double ld(const __nv_bfloat16* p, long long i) { return (double)__bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void st(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, long long i, double v) { p[i] = __double2half(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, long long i, double v) { p[i] = __double2bfloat16(v); }

__device__ __forceinline__ long long ld_index(const void* index, int wide, long long i) {
    return wide ? (long long)((const int* )index)[i] : (long long)((const short*)index)[i];
}

__device__ __forceinline__ int reflect(int n, int len) {
    int m = n % (2 * len);
    return m < len ? m : 2 * len - 1 - m;
}

// the activations, the DCT entries and the pattern functions are csrc/rbe_math.h (shared with the CPU)

// ---- kernels ----

// psi: [b, b], phi: [8, b*b]
template <typename C>
__global__ void tables_kernel(C* psi, C* phi, int b) {
    const long long bb = (long long)b * b;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < bb; o += (long long)gridDim.x * blockDim.x) {
        const int u = (int)(o / b), n = (int)(o % b);
        st(psi, o, rbe_dct_entry(u, n, b));
        for (int k = 0; k < RBE_NPAT; k++)  // the same flat position read as (row u, column n) of a block
            st(phi, k * bb + o, rbe_pattern_value(k, u, n, b));
    }
}

// index: [nblk, k]
__global__ void index_check_kernel(unsigned long long* bad, const void* index, int wide, long long nblk, int k, int b) {
    const long long n = nblk * k, bb = (long long)b * b;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long v = ld_index(index, wide, i);
        const bool first = i % k == 0;
        if (v < 0 || v >= bb || (!first && v <= ld_index(index, wide, i - 1))) atomicMin(bad, (unsigned long long)i);
    }
}

// chat: [nblk, b*b] (zeroed by the launcher), coeffs/index: [nblk, k]
template <typename C, typename V>
__global__ void scatter_kernel(C* chat, const V* coeffs, const void* index, int wide, long long nblk, int k, int b) {
    const long long n = nblk * k, bb = (long long)b * b;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long v = ld_index(index, wide, i);
        if (v >= 0 && v < bb) st(chat, (i / k) * bb + v, ld(coeffs, i));  // index validated; never write outside
    }
}

// vals/index: [nblk, k], hat: [nblk, b*b]
template <typename V, typename C>
__global__ void gather_kernel(V* vals, const C* hat, const void* index, int wide, long long nblk, int k, int b) {
    const long long n = nblk * k, bb = (long long)b * b;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long v = ld_index(index, wide, i);
        st(vals, i, v >= 0 && v < bb ? ld(hat, (i / k) * bb + v) : 0.0);
    }
}

// w: [out, in], blk: [R*C, b, b], phi: [8, b*b], basis: [R*C, 8]
template <typename W, typename C, typename V>
__global__ void assemble_kernel(W* w, const C* blk, const C* phi, const V* basis, int out, int in, int b) {
    const long long n = (long long)out * in, bb = (long long)b * b;
    const int nc = (in + b - 1) / b;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n; o += (long long)gridDim.x * blockDim.x) {
        const int row = (int)(o / in), col = (int)(o % in);
        const long long p = (long long)(row / b) * nc + col / b;
        const long long e = (long long)(row % b) * b + col % b;
        double acc = ld(blk, p * bb + e);
        for (int q = 0; q < RBE_NPAT; q++) acc += ld(basis, p * RBE_NPAT + q) * ld(phi, q * bb + e);
        st(w, o, acc);
    }
}

// blk: [R*C, b, b], w: [out, in]
template <typename C, typename W>
__global__ void split_kernel(C* blk, const W* w, int out, int in, int b, int do_reflect) {
    const int nr_blocks = (out + b - 1) / b, nc_blocks = (in + b - 1) / b;
    const long long bb = (long long)b * b, n = (long long)nr_blocks * nc_blocks * bb;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n; o += (long long)gridDim.x * blockDim.x) {
        const long long p = o / bb;
        const int e = (int)(o % bb), r = e / b, c = e % b;
        const int i = (int)(p / nc_blocks), j = (int)(p % nc_blocks);
        const int nr = out - i * b < b ? out - i * b : b, ncol = in - j * b < b ? in - j * b : b;
        double v = 0.0;
        if (do_reflect)
            v = ld(w, (long long)(i * b + reflect(r, nr)) * in + j * b + reflect(c, ncol));
        else if (r < nr && c < ncol)
            v = ld(w, (long long)(i * b + r) * in + j * b + c);
        st(blk, o, v);
    }
}

// err, dct_energy: [R*C], rec: [R*C, b, b]; one thread block per weight block
__global__ void block_error_kernel(double* err, const double* rec, const double* dct_energy, int out, int in, int b) {
    __shared__ double part[kThreads];
    const long long p = blockIdx.x;
    const int nc_blocks = (in + b - 1) / b;
    const int i = (int)(p / nc_blocks), j = (int)(p % nc_blocks);
    const int nr = out - i * b < b ? out - i * b : b, nc = in - j * b < b ? in - j * b : b;
    if (nr == b && nc == b) {
        if (threadIdx.x == 0) err[p] = dct_energy[p];
        return;
    }
    double s = 0.0;
    for (int e = threadIdx.x; e < nr * nc; e += blockDim.x) {
        const double v = rec[p * b * b + (long long)(e / nc) * b + e % nc];
        s += v * v;
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h /= 2) {
        if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) err[p] = part[0];
}

template <typename T>
__global__ void act_forward_kernel(T* y, const T* x, long long n, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        st(y, i, rbe_act_value(ld(x, i), act));
}

// the few-token coefficient product (rbe_few_rows.h holds its body, shared with a host test)
template <typename Cc, typename V>
struct LoadCoeff {
    __device__ Cc operator()(const V* p, long long i) const { return (Cc)ld(p, i); }
};

template <typename Cc>
struct SharedAdd {
    __device__ void operator()(Cc* p, Cc v) const { atomicAdd(p, v); }
};

// Chat of one block per thread block, written once in the parameters' dtype (rbe_densify.h)
template <typename V, typename Cc>
struct StoreRounded {
    __device__ void operator()(V* p, Cc v) const { st(p, 0, (double)v); }
};

template <typename Cc, typename V>
__global__ void densify_kernel(V* big, const Cc* phihat, const V* basis, const V* coeffs, const void* index, int wide,
                               int C, int k, int b) {
    extern __shared__ unsigned char smem[];
    Cc* acc = reinterpret_cast<Cc*>(smem);  // [b*b]
    const long long p = blockIdx.x;
    rbe_densify::pattern(acc, phihat, basis, p, b, threadIdx.x, blockDim.x, LoadCoeff<Cc, V>());
    __syncthreads();
    rbe_densify::coefficients(acc, coeffs, index, wide, p, k, b, threadIdx.x, blockDim.x, LoadCoeff<Cc, V>(),
                              SharedAdd<Cc>());
    __syncthreads();
    rbe_densify::write(big, acc, p, C, b, threadIdx.x, blockDim.x, StoreRounded<V, Cc>());
}

template <typename Cc, typename V>
__global__ void few_rows_kernel(Cc* out, const Cc* xa, const V* coeffs, const void* index, int wide, int R, int C, int k,
                                int b, int rows, int T, int nsplit) {
    extern __shared__ unsigned char smem[];
    Cc* acc = reinterpret_cast<Cc*>(smem);  // [b][T]
    const rbe_few::Part p = rbe_few::part_of(blockIdx.x, C, nsplit);
    for (int e = threadIdx.x; e < b * T; e += blockDim.x) acc[e] = 0;
    __syncthreads();
    rbe_few::accumulate(acc, xa, coeffs, index, wide, p, C, k, b, rows, T, threadIdx.x, blockDim.x,
                        LoadCoeff<Cc, V>(), SharedAdd<Cc>());
    __syncthreads();
    rbe_few::store(out, acc, p, R, b, T, threadIdx.x, blockDim.x);
}

template <typename T>
__global__ void act_backward_kernel(T* dx, const T* dy, const T* x, long long n, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double xv = ld(x, i);
        // relu: pass dy where x > 0 and 0 elsewhere (dy * 0 would turn an infinite dy into NaN)
        const double g = act == RBE_ACT_RELU ? (xv <= 0.0 ? 0.0 : ld(dy, i)) : ld(dy, i) * rbe_act_grad(xv, act);
        st(dx, i, g);
    }
}

}  // namespace

// dispatch on an element type code: T is the C type of code dt
#define RBE_CASE(code, type, T, ...) \
    case code: {                     \
        typedef type T;              \
        __VA_ARGS__;                 \
        break;                       \
    }
#define RBE_DISPATCH_ANY(dt, T, ...)                      \
    switch (dt) {                                         \
        RBE_CASE(RBE_CUDA_F32, float, T, __VA_ARGS__)     \
        RBE_CASE(RBE_CUDA_F64, double, T, __VA_ARGS__)    \
        RBE_CASE(RBE_CUDA_F16, __half, T, __VA_ARGS__)    \
        RBE_CASE(RBE_CUDA_BF16, __nv_bfloat16, T, __VA_ARGS__) \
    default:                                              \
        return cudaErrorInvalidValue;                     \
    }
#define RBE_DISPATCH_COMPUTE(dt, T, ...)               \
    switch (dt) {                                      \
        RBE_CASE(RBE_CUDA_F32, float, T, __VA_ARGS__)  \
        RBE_CASE(RBE_CUDA_F64, double, T, __VA_ARGS__) \
    default:                                           \
        return cudaErrorInvalidValue;                  \
    }

static size_t elem_size(int dt) { return dt == RBE_CUDA_F64 ? 8 : dt == RBE_CUDA_F32 ? 4 : 2; }

extern "C" cudaError_t rbe_cuda_tables(void* psi, void* phi, int dt, int b, cudaStream_t s) {
    RBE_DISPATCH_COMPUTE(dt, C, tables_kernel<C><<<grid_for((long long)b * b), kThreads, 0, s>>>((C*)psi, (C*)phi, b))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_index_check(unsigned long long* bad, const void* index, int wide, long long nblk, int k,
                                            int b, cudaStream_t s) {
    cudaError_t e = cudaMemsetAsync(bad, 0xFF, sizeof(unsigned long long), s);
    if (e != cudaSuccess || nblk * k == 0) return e;
    index_check_kernel<<<grid_for(nblk * k), kThreads, 0, s>>>(bad, index, wide, nblk, k, b);
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_scatter(void* chat, int ct, const void* coeffs, int vt, const void* index, int wide,
                                        long long nblk, int k, int b, cudaStream_t s) {
    if (ct != RBE_CUDA_F32 && ct != RBE_CUDA_F64) return cudaErrorInvalidValue;
    cudaError_t e = cudaMemsetAsync(chat, 0, (size_t)nblk * b * b * elem_size(ct), s);
    if (e != cudaSuccess || nblk * k == 0) return e;
    RBE_DISPATCH_COMPUTE(ct, C, RBE_DISPATCH_ANY(vt, V, scatter_kernel<C, V><<<grid_for(nblk * k), kThreads, 0, s>>>(
                                                           (C*)chat, (const V*)coeffs, index, wide, nblk, k, b)))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_gather(void* vals, int vt, const void* hat, int ct, const void* index, int wide,
                                       long long nblk, int k, int b, cudaStream_t s) {
    if (nblk * k == 0) return cudaSuccess;
    RBE_DISPATCH_COMPUTE(ct, C, RBE_DISPATCH_ANY(vt, V, gather_kernel<V, C><<<grid_for(nblk * k), kThreads, 0, s>>>(
                                                           (V*)vals, (const C*)hat, index, wide, nblk, k, b)))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_assemble(void* w, int wt, const void* blk, const void* phi, int ct, const void* basis,
                                         int vt, int out, int in, int b, cudaStream_t s) {
    if (wt != vt) return cudaErrorInvalidValue;  // the weight comes out in its parameters' type
    const long long n = (long long)out * in;
    if (n == 0) return cudaSuccess;
    RBE_DISPATCH_COMPUTE(ct, C, RBE_DISPATCH_ANY(vt, V, assemble_kernel<V, C, V><<<grid_for(n), kThreads, 0, s>>>(
                                                           (V*)w, (const C*)blk, (const C*)phi, (const V*)basis, out, in, b)))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_split(void* blk, int ct, const void* w, int wt, int out, int in, int b, int do_reflect,
                                      cudaStream_t s) {
    const long long n = (long long)((out + b - 1) / b) * ((in + b - 1) / b) * b * b;
    if (n == 0) return cudaSuccess;
    RBE_DISPATCH_COMPUTE(ct, C, RBE_DISPATCH_ANY(wt, W, split_kernel<C, W><<<grid_for(n), kThreads, 0, s>>>(
                                                           (C*)blk, (const W*)w, out, in, b, do_reflect)))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_block_error(double* err, const double* rec, const double* dct_energy, int out, int in,
                                            int b, cudaStream_t s) {
    const long long nblk = (long long)((out + b - 1) / b) * ((in + b - 1) / b);
    if (nblk == 0) return cudaSuccess;
    block_error_kernel<<<(unsigned)nblk, kThreads, 0, s>>>(err, rec, dct_energy, out, in, b);
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_act_forward(void* y, const void* x, long long n, int act, int dt, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    RBE_DISPATCH_ANY(dt, T, act_forward_kernel<T><<<grid_for(n), kThreads, 0, s>>>((T*)y, (const T*)x, n, act))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_act_backward(void* dx, const void* dy, const void* x, long long n, int act, int dt,
                                             cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    RBE_DISPATCH_ANY(dt, T, act_backward_kernel<T><<<grid_for(n), kThreads, 0, s>>>((T*)dx, (const T*)dy, (const T*)x, n,
                                                                                    act))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_few_rows(void* out, const void* xa, int ct, const void* coeffs, int vt,
                                         const void* index, int wide, int R, int C, int k, int b, int rows, int T,
                                         int nsplit, cudaStream_t s) {
    if (T < 1 || T > RBE_CUDA_FEW_MAX || nsplit < 1 || nsplit > C || b < 1 || b > RBE_MAX_B || rows < b)
        return cudaErrorInvalidValue;
    const long long blocks = (long long)R * nsplit;
    if (blocks == 0) return cudaSuccess;
    if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidValue;
    const size_t shared = (size_t)b * T * elem_size(ct);
    RBE_DISPATCH_COMPUTE(ct, Cc, RBE_DISPATCH_ANY(vt, V, few_rows_kernel<Cc, V><<<(unsigned)blocks, kThreads, shared, s>>>(
                                                        (Cc*)out, (const Cc*)xa, (const V*)coeffs, index, wide, R, C,
                                                        k, b, rows, T, nsplit)))
    return cudaGetLastError();
}

extern "C" cudaError_t rbe_cuda_densify(void* big, int vt, const void* phihat, int ct, const void* basis,
                                        const void* coeffs, const void* index, int wide, int R, int C, int k, int b,
                                        cudaStream_t s) {
    const size_t shared = (size_t)b * b * elem_size(ct);
    if (b < 1 || b > RBE_MAX_B || k < 0 || k > b * b || shared > RBE_CUDA_DENSIFY_SHARED) return cudaErrorInvalidValue;
    const long long blocks = (long long)R * C;
    if (blocks == 0) return cudaSuccess;
    if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidValue;
    RBE_DISPATCH_COMPUTE(ct, Cc, RBE_DISPATCH_ANY(vt, V, densify_kernel<Cc, V><<<(unsigned)blocks, kThreads, shared, s>>>(
                                                       (V*)big, (const Cc*)phihat, (const V*)basis, (const V*)coeffs,
                                                       index, wide, C, k, b)))
    return cudaGetLastError();
}
