/* rbe.h - plain C11 kernels of the RBE (residual block encoding) feed-forward.
 *
 * Everything here takes pointers and sizes, allocates nothing, keeps no
 * globals (but the instruction set chosen once, rbe_cpu_isa) and knows nothing of torch. The math is docs/DESIGN.md:
 *
 *   W block (i, j) = sum_k basis[ij][k] Phi_k + sum_q coeffs[ij][q] psi_u psi_v^T
 *   with (u, v) = (index[ij][q] / b, index[ij][q] % b).
 *
 * Conventions used by every kernel:
 *   - a weight W is [out, in]; R = ceil(out/b) block rows, C = ceil(in/b) block
 *     columns, block (i, j) has linear index i*C + j; it travels as an rbe_weight_*;
 *   - the "plan" of a block size b is [3, b+nf, b]: plan[0] = the analysis
 *     rows A = [psi_0..psi_{b-1}; f_0..f_{nf-1}] and plan[1] = the synthesis rows
 *     S = [psi_0..psi_{b-1}; g_0..g_{nf-1}], where the pattern is factored as
 *     a sum of rank-1 terms g_a f_e^T (rbe_plan.c); plan[2] = the tables of the fast
 *     DCT; it travels as an rbe_plan_* (rbe_plan_view_* cuts a plan buffer into its parts);
 *   - activations of a token tile are kept feature-major: Xh[m][t] for
 *     m < b+nf and t < RBE_TILE, so each kept coefficient is one contiguous
 *     axpy over the tile's tokens;
 *   - index tensors are int16 (wide = 0) or int32 (wide = 1), validated by the caller
 *     (rbe_index_snapshot) before any kernel reads them;
 *   - outputs first, then inputs, then sizes; [p0, p1) is the range of independent work
 *     items a call processes, so that the caller (torch's thread pool) owns threading.
 * Each fast kernel has a naive reference (rbe_ref.c) that the tests compare it with.
 * The scalar definitions (DCT, pattern functions, activations) are rbe_math.h, shared
 * with the CUDA kernels.
 */
#ifndef RBE_H
#define RBE_H

#include <stddef.h>
#include <stdint.h>

#include "rbe_math.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RBE_NFIX 4        /* separable pattern vectors: 1, z^2, cos(pi z), cos(2 pi z) */
#define RBE_TILE 64       /* tokens per tile in the fast kernels */
#define RBE_MAX_B 256     /* the largest block size (the operators check it; kernels size arrays by it) */

/* A compressed weight W [out, in] at block size b (DESIGN.md section 2):
 * basis [R*C, 8], coeffs [R*C, k], index [R*C, k] (flat u*b + v, strictly increasing per block). */
typedef struct {
    const float* basis;
    const float* coeffs;
    const void* index;
    int wide; /* index is int32 (1) or int16 (0) */
    int out, in, b, k;
} rbe_weight_f32;
typedef struct {
    const double* basis;
    const double* coeffs;
    const void* index;
    int wide;
    int out, in, b, k;
} rbe_weight_f64;

/* The tables of a block size: A = plan[0], S = plan[1] ([b+nf, b] each), dct = plan[2]. */
typedef struct {
    const float* A;
    const float* S;
    const float* dct;
    int b, nf;
} rbe_plan_f32;
typedef struct {
    const double* A;
    const double* S;
    const double* dct;
    int b, nf;
} rbe_plan_f64;

/* the parts of a plan buffer [3, b+nf, b] */
static inline rbe_plan_f32 rbe_plan_view_f32(const float* plan, int b, int nf) {
    const size_t slab = (size_t)(b + nf) * b;
    rbe_plan_f32 p = {plan, plan + slab, plan + 2 * slab, b, nf};
    return p;
}
static inline rbe_plan_f64 rbe_plan_view_f64(const double* plan, int b, int nf) {
    const size_t slab = (size_t)(b + nf) * b;
    rbe_plan_f64 p = {plan, plan + slab, plan + 2 * slab, b, nf};
    return p;
}

/* ---- tables of a block size (double; computed once per b by the caller) ---- */

/* psi: [b, b], psi[u*b + n] = rbe_dct_entry(u, n, b), the orthonormal DCT-II */
void rbe_dct_matrix(double* psi, int b);
/* phi: [8, b*b], phi[k*b*b + r*b + c] = rbe_pattern_value(k, r, c, b) */
void rbe_pattern_images(double* phi, int b);
/* pinv: [8, b*b], the Moore-Penrose pseudo-inverse of the [b*b, 8] basis matrix
 * (rank-deficient for tiny b, e.g. b = 4). work: 8*b*b + 200 doubles */
void rbe_pattern_pinv(double* pinv, double* work, int b);
/* plan: [3, b+nf, b] (layout above); returns nf = 4 + rank of the d-term kept at
 * relative eigenvalue tolerance tol. plan must hold 3*(2b+4)*b doubles,
 * work 3*b*b + b doubles. */
int rbe_plan_build(double* plan, double* work, int b, double tol);
/* symmetric eigen-decomposition by cyclic Jacobi: a [n, n] (destroyed),
 * vecs [n, n] (column m = eigenvector of vals[m]) */
void rbe_jacobi_eig(double* vals, double* vecs, double* a, int n);

/* ---- validation (rbe_check.c) ---- */

/* index: [nblocks, k]; each row must be strictly increasing in [0, b*b).
 * Returns -1 when valid, else the flat position (block*k + q) of the first bad entry. */
long rbe_index_check(const void* index, int wide, long nblocks, int k, int b);
/* The same check on a private copy: dst (same layout as src) receives a copy of src, read
 * once, and the check runs on dst. A concurrent writer to src can tear the copy but cannot
 * make an invalid copy pass, so kernels that read only dst stay in bounds. Returns -1 when
 * dst is valid, else the first bad flat position. */
long rbe_index_snapshot(void* dst, const void* src, int wide, long nblocks, int k, int b);

/* number of non-finite values in x: [n] */
long rbe_count_nonfinite_f32(const float* x, long n);
long rbe_count_nonfinite_f64(const double* x, long n);
/* max |x_i| over x: [n]: NaN if any x_i is NaN, infinity if any is infinite; 0 for n = 0 */
double rbe_max_abs_f32(const float* x, long n);
double rbe_max_abs_f64(const double* x, long n);

/* ---- codec ---- */

/* Encode blocks [p0, p1) of a dense w: [out, in] (row-major).
 * basis: [R*C, 8], coeffs: [R*C, k], index: [R*C, k] (sorted ascending),
 * err: [R*C] squared error of each block over its real entries.
 * tabs: psi [b*b] then phi [8*b*b] then pinv [8*b*b] (double).
 * work: rbe_encode_work(b) doubles. */
size_t rbe_encode_work(int b);
void rbe_encode_f32(float* basis, float* coeffs, void* index, int wide, double* err,
                    const float* w, const double* tabs, double* work,
                    int out, int in, int b, int k, long p0, long p1);
void rbe_encode_f64(double* basis, double* coeffs, void* index, int wide, double* err,
                    const double* w, const double* tabs, double* work,
                    int out, int in, int b, int k, long p0, long p1);

/* Decode blocks [p0, p1) of W into w: [out, in]. tabs: psi then phi (double).
 * work: 3*b*b doubles. */
void rbe_decode_f32(float* w, const rbe_weight_f32* W, const double* tabs, double* work, long p0, long p1);
void rbe_decode_f64(double* w, const rbe_weight_f64* W, const double* tabs, double* work, long p0, long p1);

/* ---- activations ---- */

/* act | RBE_ACT_F32 (gelu, gelu_tanh, silu; float32 functions only, ignored by the double ones):
 * evaluated in float32 (rbe_act_f32.h: within 1e-6 relative for values of 1e-6 and more, 2e-6
 * for gelu_tanh; the same bits at every vector width) instead of in double rounded once; what a
 * 16-bit result asks for. The float32 kernels that take `act` pass the flag on to these
 * functions; the naive references ignore it (they evaluate the definitions). */
#define RBE_ACT_F32 0x200
/* y = act(x), elementwise, n values */
void rbe_act_forward_f32(float* y, const float* x, long n, int act);
void rbe_act_forward_f64(double* y, const double* x, long n, int act);
/* dx = dy * act'(x), elementwise */
void rbe_act_backward_f32(float* dx, const float* dy, const float* x, long n, int act);
void rbe_act_backward_f64(double* dx, const double* dy, const double* x, long n, int act);
/* y = act(x) and g = act'(x) at once (y may be x; g not): bitwise what forward and backward with
 * dy = 1 give; the backward of a standard block needs both, and they share erfc / exp */
void rbe_act_forward_grad_f32(float* y, float* g, const float* x, long n, int act);
void rbe_act_forward_grad_f64(double* y, double* g, const double* x, long n, int act);
/* rbe_act_value / rbe_act_grad of rbe_math.h rounded once (the vectorized paths must agree) */
float rbe_act_scalar_f32(float x, int act);
double rbe_act_scalar_f64(double x, int act);
float rbe_act_grad_scalar_f32(float x, int act);
double rbe_act_grad_scalar_f64(double x, int act);

/* ---- schedules of the sparse products (float32, for the AVX2 and AVX-512 kernels) ----
 * The coefficients of a weight regrouped so that each output row of a block-row
 * (transpose = 0; key u, source rows (j, v)) or of a block-column (transpose = 1;
 * key v, source rows (i, u)) is one run: entries [start[g*(b+1)+key], start[g*(b+1)+key+1]),
 * off = (block-in-group * (b+nf) + source row) * RBE_TILE, val = coefficient times `scale` (1, or
 * the weight's coefficient scale: the values are copied anyway), pos = its flat position in coeffs
 * (may be NULL). start: [groups, b+1]; off/val/pos: [R*C*k].
 * Built per call (the values change every optimizer step); groups [g0, g1). */
typedef struct {
    const int32_t* start;
    const int32_t* off;
    const float* val;
    const int32_t* pos;
    float* acc; /* [R*C*k] work for the parameter gradient (schedule order), or NULL */
} rbe_sched_f32;
void rbe_schedule_f32(int32_t* start, int32_t* off, float* val, int32_t* pos, const rbe_weight_f32* W, int nf,
                      int transpose, float scale, long g0, long g1);

/* ---- compressed linear: y = x W^T + bias, computed in the transform domain ----
 * scratch: rbe_rows_scratch(b, nf) elements per calling thread (every kernel below). */
size_t rbe_rows_scratch(int b, int nf);

/* Transform token tiles: for work items p in [p0, p1), p = tile*nseg + j,
 * Xh[p][m][t] = sum_c M[m][c] x[tile*TILE + t][j*b + c] (zero past the real sizes).
 * Xh: [ntiles, nseg, b+nf, TILE], x: [T, n], M: P->A (inputs) or P->S (output gradients);
 * the x86 float kernels use P->dct for the DCT rows. */
void rbe_analysis_f32(float* Xh, const float* x, const float* M, const rbe_plan_f32* P, float* scratch, long T,
                      int n, long p0, long p1);
void rbe_analysis_f64(double* Xh, const double* x, const double* M, const rbe_plan_f64* P, double* scratch, long T,
                      int n, long p0, long p1);

/* Rows of the output: for work items p = tile*R + i in [p0, p1),
 * Yh = sum_j (sparse product + pattern combination of block (i, j)) over Xh,
 * y[t][i*b + r] = act(sum_m S[m][r] Yh[m][t] + bias[i*b + r]); pre (may be NULL)
 * receives the value before the activation; y may be NULL. Xnext (may be NULL) receives the
 * analysis (P->A) of the activated output tile, laid out as the Xh of a next layer whose
 * input is this output: [ntiles, R, b+nf, TILE] (the feed-forward block's fc2 then skips its
 * own analysis; lanes past T are unspecified).
 * y, pre: [T, out], Xh: [ntiles, C, b+nf, TILE], bias: [out] or NULL.
 * sched (float only; may be NULL): the x86 kernels' schedule (transpose = 0); without
 * one they work block by block (cheaper for a single tile of tokens).
 * act | RBE_ACT_PRE_GRAD: pre receives act'(the value before the activation) instead, computed
 * with the activation (rbe_act_forward_grad): what a checkpointed backward needs of it.
 * act | RBE_ACT_PRE_GRAD | RBE_ACT_PRE_TILES: and pre is laid out in tiles, feature-major,
 * [ntiles, R, b, TILE]: act' at token t0 + t and output feature i*b + r at
 * pre[((tile * R + i) * b + r) * TILE + t], zero past the tile's tokens and the weight's rows (what
 * rbe_grad_next_f32 reads; no transposed store). */
#define RBE_ACT_PRE_GRAD 0x100
#define RBE_ACT_PRE_TILES 0x400
void rbe_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                          const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                          float* scratch, long T, long p0, long p1);
void rbe_rows_forward_f64(double* y, double* pre, double* Xnext, const double* Xh, const rbe_weight_f64* W,
                          const rbe_plan_f64* P, const double* bias, int act, double* scratch, long T, long p0,
                          long p1);

/* ---- few tokens (T <= RBE_FEW_MAX): the forward vectorized along features ----
 * A tile of 64 (or 16) token lanes wastes most of its work on one token, so a call with few
 * tokens keeps its transforms token-minor with stride T instead: Xf[(j*(b+nf) + m)*T + t]
 * (segment j, transform row m, token t), every buffer followed by RBE_FEW_SLACK elements that
 * vector loads may read past its end (the kernels set them; their values never reach a result).
 * The analysis and synthesis are matrix-vector products along the feature rows of one token,
 * over At = A transposed ([b, b+nf], rbe_few_at); the sparse product walks each block's sorted
 * coefficients, one output row run at a time, over all T tokens at once. Each token's
 * arithmetic is the same for any T <= RBE_FEW_MAX (a token's results do not depend on the
 * others), and the work items are segments or block rows, so results do not depend on how
 * the caller splits them between threads. */
#define RBE_FEW_MAX 16
#define RBE_FEW_SLACK 16
/* blocks whose sparse products the x86 few-token forward interleaves, each into its own accumulator */
#define RBE_FEW_STREAMS 4
/* elements of a few-token transform of n features: ceil(n/b)*(b+nf)*T + RBE_FEW_SLACK */
size_t rbe_few_size(int n, int b, int nf, long T);
/* scratch of rbe_few_rows_forward per calling thread, in elements (any T <= RBE_FEW_MAX) */
size_t rbe_few_scratch(int b, int nf);
/* At[c*(b+nf) + m] = P->A[m*b + c]: the analysis rows transposed, [b, b+nf] */
void rbe_few_at_f32(float* At, const rbe_plan_f32* P);
void rbe_few_at_f64(double* At, const rbe_plan_f64* P);
/* Segments j in [p0, p1): Xf[(j*(b+nf) + m)*T + t] = sum_c A[m][c] x[t][j*b + c] (zero past n);
 * Xf: rbe_few_size(n, b, nf, T) elements (its slack is set by the call that has the last segment). */
void rbe_few_analysis_f32(float* Xf, const float* x, const float* At, int b, int nf, long T, int n, long p0, long p1);
void rbe_few_analysis_f64(double* Xf, const double* x, const double* At, int b, int nf, long T, int n, long p0,
                          long p1);
/* Block rows i in [p0, p1): the contract of rbe_rows_forward (y, pre, bias, act) for T <= RBE_FEW_MAX
 * tokens, from Xf (the few-token analysis of x); Xnext (may be NULL) receives the few-token analysis
 * of the activated output, [R segments] as rbe_few_analysis would lay it out (slack included).
 * scratch: rbe_few_scratch(b, nf) elements. */
void rbe_few_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                              const rbe_plan_f32* P, const float* At, const float* bias, int act, float* scratch,
                              long T, long p0, long p1);
void rbe_few_rows_forward_f64(double* y, double* pre, double* Xnext, const double* Xf, const rbe_weight_f64* W,
                              const rbe_plan_f64* P, const double* At, const double* bias, int act, double* scratch,
                              long T, long p0, long p1);

/* ---- one token from packed coefficients ----
 * At one token the few-token product is a scalar chain per coefficient (a load, a multiply-add
 * and a store each). A pack regroups a weight's coefficients for vector walks, in one of two
 * layouts; each output row receives its coefficients in the same order and into the same
 * accumulator (of RBE_FEW_STREAMS) as in rbe_few_rows_forward, so the results are bitwise those of
 * the x86 few-token kernels with either layout.
 *
 * RBE_PACK_STEPS (AVX-512's): a block's rows in groups of 16 (lanes), step d of a group holds the
 * d-th coefficient of each of the group's rows that has one (a 16-bit lane mask); the values are
 * stored compactly in step order, the columns lane by lane (16 bytes a step). The AVX-512 kernel
 * keeps the block's source values in registers, picks them by column with two-source permutes,
 * expands the step's values into its lanes and applies the step with one masked multiply-add
 * (AVX2 walks this layout with scalar multiply-adds).
 *
 * RBE_PACK_ROWS (AVX2's, which cannot pick from 64 values in registers): per block row i and
 * stream s, the list of each output row u: its coefficients in the stream's blocks j, ascending j,
 * in column order within a block (the few-token kernel's order). The rows are sorted by the
 * length of their list (longest first, ties by row) and taken 8 at a time (lanes); step d of
 * such a group holds the d-th entry of each lane's list: its value and its source j*b + v (the
 * column v of the input's segment j), 8 of each a step; a lane whose list has ended holds the
 * value -0 and the source C*b, which the walk reads as +0: fma(-0, +0, a) = a + (-0) = a for every
 * a, so the padding changes no bit. The walk loads the 8 sources of a step with scalar loads into
 * a vector and applies the step with one multiply-add. It reads the sources from a compact copy
 * of the input's DCT rows, so sources must fit 16 bits: weights with C*b > 65535 are packed in
 * RBE_PACK_STEPS.
 *
 * b <= RBE_PACK_MAX_B. Built by rbe_pack_f32 / rbe_pack_rows_f32 from a validated index; the
 * kernels check every offset they follow, so a corrupted pack gives an error, not a read out of
 * bounds, and its structure (STEPS: k coefficients a block, lanes and columns within b; ROWS:
 * each row in one lane of each stream, entries only in lanes with a row, C*k entries a block
 * row); values, and columns or sources moved within range, are taken as they are. */
#define RBE_PACK_MAX_B 64
#define RBE_PACK_LANES 16
#define RBE_PACK_ROW_LANES 8
#define RBE_PACK_STEPS 0
#define RBE_PACK_ROWS 1
#define RBE_PACK_NO_ROW 0xFF /* RBE_PACK_ROWS: a lane past the block's rows */
typedef struct {
    int out, in, b, k;
    long steps;            /* steps over all blocks */
    /* RBE_PACK_STEPS: */
    const int32_t* first;  /* [R*C + 1] each block's first step (first[0] = 0, first[R*C] = steps);
                            * RBE_PACK_ROWS: [R + 1] each block row's */
    const uint8_t* nstep;  /* [R*C * groups] steps of each group of 16 rows, groups = ceil(b / 16) */
    const uint16_t* mask;  /* [steps] the rows (lanes) each step holds */
    const float* val;      /* [R*C * k] the coefficients in step order; RBE_PACK_ROWS: [steps * 8] */
    const uint8_t* col;    /* [steps * 16] their columns v, by step and lane (0 in empty lanes) */
    int layout;            /* RBE_PACK_STEPS (0) or RBE_PACK_ROWS */
    /* RBE_PACK_ROWS (groups g of 8 rows, gr = ceil(b / 8), group (i, s, g) at (i*RBE_FEW_STREAMS + s)*gr + g): */
    const uint16_t* gsteps;  /* [R * RBE_FEW_STREAMS * gr] steps of each group */
    const uint8_t* lane_row; /* [R * RBE_FEW_STREAMS * gr * 8] the row u of each lane, or RBE_PACK_NO_ROW */
    const uint16_t* src;     /* [steps * 8] each entry's j*b + v, or C*b (padding) */
} rbe_packed_f32;
/* the groups of 16 rows of a block */
static inline int rbe_pack_groups(int b) { return (b + RBE_PACK_LANES - 1) / RBE_PACK_LANES; }
/* RBE_PACK_ROWS: the groups of 8 rows of a block row's stream */
static inline int rbe_pack_row_groups(int b) { return (b + RBE_PACK_ROW_LANES - 1) / RBE_PACK_ROW_LANES; }
/* steps of the packed layout of blocks [0, nblk) (index validated, b <= RBE_PACK_MAX_B);
 * work: b ints */
long rbe_pack_steps(int32_t* work, const void* index, int wide, long nblk, int k, int b);
/* Fill the packed layout's arrays (sizes as in rbe_packed_f32, steps = rbe_pack_steps);
 * work: 2b + 1 ints */
void rbe_pack_f32(int32_t* first, uint8_t* nstep, uint16_t* mask, float* val, uint8_t* col, int32_t* work,
                  const float* coeffs, const void* index, int wide, long nblk, int k, int b);
/* RBE_PACK_ROWS: steps of an out x in weight (index validated, b <= RBE_PACK_MAX_B,
 * ceil(in/b)*b <= 65535); work: rbe_pack_rows_work(in, b) ints */
size_t rbe_pack_rows_work(int in, int b);
long rbe_pack_rows_steps(int32_t* work, const void* index, int wide, int out, int in, int k, int b);
/* RBE_PACK_ROWS: fill first, gsteps, lane_row, val, src (sizes as in rbe_packed_f32) */
void rbe_pack_rows_f32(int32_t* first, uint16_t* gsteps, uint8_t* lane_row, float* val, uint16_t* src,
                       int32_t* work, const float* coeffs, const void* index, int wide, int out, int in, int k, int b);
/* The inverse: coeffs and index (int32, flat u*b + v, ascending) of blocks [p0, p1) from a pack
 * (the portable kernels' path, and the tests' round trip); returns -1 if the pack is corrupted
 * (b past RBE_PACK_MAX_B, an offset past its arrays, a lane or column past b, or a block whose
 * steps do not hold exactly k coefficients). RBE_PACK_STEPS only (-1 for the other layout). */
int rbe_unpack_f32(float* coeffs, int32_t* index, const rbe_packed_f32* K, long p0, long p1);
/* RBE_PACK_ROWS' inverse, of block rows [i0, i1) (blocks [i0*C, i1*C)); -1 if the pack is
 * corrupted (as above, or a stream whose lanes do not name each row once, an entry in a lane
 * without a row, a source outside its stream's blocks, or a block's positions not strictly
 * ascending after the undoing); work: rbe_pack_rows_work(in, b) ints. */
int rbe_unpack_rows_f32(float* coeffs, int32_t* index, int32_t* work, const rbe_packed_f32* K, long i0, long i1);
/* scratch of rbe_one_rows_forward per calling thread, in elements (in: the weight's in) */
size_t rbe_one_scratch(int in, int b, int nf);
/* Block rows i in [p0, p1) of rbe_few_rows_forward_f32 at T = 1 (y, pre, Xnext, bias, act alike),
 * the sparse products from K in either layout (W: basis, out, in, b, k; its coeffs and index are
 * not read). x86 kernels only (AVX-512, else AVX2; the caller unpacks for the portable ones).
 * scratch: rbe_one_scratch(in, b, nf) elements. Returns 0, or -1 if K is corrupted (then the
 * outputs are unspecified), -2 with the portable kernels. */
int rbe_one_rows_forward_f32(float* y, float* pre, float* Xnext, const float* Xf, const rbe_weight_f32* W,
                             const rbe_packed_f32* K, const rbe_plan_f32* P, const float* At, const float* bias,
                             int act, float* scratch, long p0, long p1);

/* Input gradient: for work items p = tile*C + j in [p0, p1),
 * DX = sum_i (transposed sparse product + transposed pattern of block (i, j)) over Gh,
 * dx[t][j*b + c] = sum_m A[m][c] DX[m][t].
 * dx: [T, in], Gh: [ntiles, R, b+nf, TILE] (g analysed with P->S).
 * W: the weight as stored; its coeffs/index are not read when sched is given to the x86 kernels
 * (rbe_cpu_isa_level() >= RBE_ISA_AVX2; the portable ones take no schedule). Without a schedule
 * each term is added to its column's row in coefficient order, so every row takes its terms in
 * ascending row order.
 * sched (float only; may be NULL): the x86 kernels' schedule (transpose = 1). */
void rbe_cols_backward_f32(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                           const rbe_sched_f32* sched, float* scratch, long T, long p0, long p1);
void rbe_cols_backward_f64(double* dx, const double* Gh, const rbe_weight_f64* W, const rbe_plan_f64* P,
                           double* scratch, long T, long p0, long p1);

/* In a block's backward, what the second layer's input gradient dx becomes for the first layer,
 * instead of being stored: dh = dx * act'(h) (the first layer's output gradient; the product
 * rounded once, as rbe_act_backward's fused activations give it), then
 *   Gh    [ntiles, ceil(in/b), b+nf, TILE] = dh analysed with P->S, as rbe_analysis_f32 gives it;
 *   dbias [in] (or NULL) = rbe_bias_backward_f32 of dh: its sums in token order, continuing the
 *         sums dbias holds when accumulate != 0.
 * dact: act'(h) in tiles, [ntiles, ceil(in/b), b, TILE] (RBE_ACT_PRE_TILES' layout; only the
 * tile's tokens and features are read). */
typedef struct {
    const float* dact;
    float* Gh;
    float* dbias;
    int accumulate;
} rbe_grad_next_f32;

/* The input gradient of rbe_cols_backward_f32 and the coefficient gradient of
 * rbe_params_backward_f32 (dcoeffs; the same bits as both) in one pass: block columns j in [p0, p1),
 * each over all tiles; Xh as for rbe_params_backward_f32. sched: the transposed schedule with
 * pos and acc (transpose = 1). next (may be NULL): dx is not written (it may be NULL) but handed
 * on as rbe_grad_next_f32 says. x86 kernels only: returns 0, or -2 with the portable ones (then
 * nothing is written). */
int rbe_cols_coeffs_backward_f32(float* dx, float* dcoeffs, const rbe_grad_next_f32* next, const float* Gh,
                                 const float* Xh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                                 const rbe_sched_f32* sched, int accumulate, float* scratch, long T, long p0, long p1);

/* Parameter gradients of block rows [p0, p1) (blocks i*C + j), summed over all tokens:
 * dcoeffs[ij][q] = sum_t Gh_i[u][t] Xh_j[v][t], dbasis[ij][k] from the pattern rows.
 * Either output may be NULL; accumulate & 1 adds to what they hold.
 * sched (float only; may be NULL): the schedule with pos and acc (transpose = 0); not read
 * when dcoeffs is NULL.
 * With a schedule (here, in rbe_cols_coeffs_backward_f32 and rbe_params_backward_bf16) each
 * coefficient's sum runs over the tiles in order in the schedule's acc, then goes to dcoeffs.
 * Calls over consecutive token ranges (chunks of one call, sharing one schedule) may continue
 * one sum: RBE_SUMS_HOLD in accumulate leaves the sums in acc and writes no dcoeffs,
 * RBE_SUMS_CONTINUE continues the sums acc holds instead of starting at zero. A chunked call
 * then gives each coefficient the sum an unchunked one gives. */
#define RBE_SUMS_CONTINUE 2
#define RBE_SUMS_HOLD 4
void rbe_params_backward_f32(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh,
                             const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                             int accumulate, long T, long p0, long p1);
void rbe_params_backward_f64(double* dbasis, double* dcoeffs, const double* Gh, const double* Xh,
                             const rbe_weight_f64* W, const rbe_plan_f64* P, int accumulate, long T, long p0,
                             long p1);
/* The scheduled float32 kernels (rows forward, columns backward, parameter gradient; sched
 * required, whole tiles) with their sparse products and coefficient dot products on bfloat16
 * operands: per tile, the DCT rows of the source tile are rounded to bfloat16 (rbe_to_bf16)
 * into bf16 / scratch, rbe_bf16_scratch(segments, b, nf) elements per thread (segments: the
 * source tile's, C = in / b for rows and parameters, R = out / b for columns), the values too;
 * products in pairs with AVX-512 BF16 vdpbf16ps (half the bytes), sums in float32. Everything
 * else (pattern terms, transforms, dbasis) as in the float32 kernels. Only when
 * rbe_bf16_sparse_available(): the CPU has the instructions, the AVX-512 kernels are chosen and
 * the compiler knew them (GCC 10, clang 9); elsewhere these are the float32 kernels. What a
 * bfloat16 result asks for (each operand rounded by up to 2^-9 relative). */
int rbe_bf16_sparse_available(void);
size_t rbe_bf16_scratch(int segments, int b, int nf);
void rbe_to_bf16(uint16_t* out, const float* in, long n); /* round to nearest even */
/* rounded (rows forward and columns backward; may be NULL): the tile whose rows bf16 holds, -1 for
 * none. A caller handing one thread's items of a source to these kernels in several calls keeps it
 * between the calls on the same bf16 scratch (-1 before the first), so each tile is rounded once
 * per thread; with NULL each call rounds its own tiles. The results do not depend on it. */
void rbe_rows_forward_bf16(float* y, float* pre, float* Xnext, const float* Xh, const rbe_weight_f32* W,
                           const rbe_plan_f32* P, const rbe_sched_f32* sched, const float* bias, int act,
                           float* scratch, uint16_t* bf16, long* rounded, long T, long p0, long p1);
void rbe_cols_backward_bf16(float* dx, const float* Gh, const rbe_weight_f32* W, const rbe_plan_f32* P,
                            const rbe_sched_f32* sched, float* scratch, uint16_t* bf16, long* rounded, long T,
                            long p0, long p1);
void rbe_params_backward_bf16(float* dbasis, float* dcoeffs, const float* Gh, const float* Xh, uint16_t* scratch,
                              const rbe_weight_f32* W, const rbe_plan_f32* P, const rbe_sched_f32* sched,
                              int accumulate, long T, long p0, long p1);

/* dbias[o] (+)= sum_t g[t][o] for o in [o0, o1); accumulate != 0 adds to dbias. g: [T, out] */
void rbe_bias_backward_f32(float* dbias, const float* g, long T, int out, int accumulate, long o0, long o1);
void rbe_bias_backward_f64(double* dbias, const double* g, long T, int out, int accumulate, long o0, long o1);

/* ---- instruction sets of the float32 kernels ----
 * The float32 entry points run the best kernels this CPU has: AVX-512 (F, VL, DQ, BW), then
 * AVX2 + FMA, then portable C. The environment variable RBE_FFN_ISA (avx512, avx2 or portable)
 * caps the choice, e.g. to compare paths in one build; it is read once, at the first call
 * (a process-wide cache; any other value is ignored, with one line on stderr). The schedules
 * above are for the AVX2 and AVX-512 kernels (rbe_cpu_isa_level() >= RBE_ISA_AVX2). */
#define RBE_ISA_PORTABLE 0
#define RBE_ISA_AVX2 1
#define RBE_ISA_AVX512 2
int rbe_cpu_isa_level(void);   /* the chosen kernels: one of RBE_ISA_* */
const char* rbe_cpu_isa(void); /* their name: "avx512", "avx2" or "portable" */
/* 1 when the CPU (and OS) has the instructions, whatever RBE_FFN_ISA says */
int rbe_cpu_has_avx2(void);
int rbe_cpu_has_avx512(void);
int rbe_cpu_has_avx512bf16(void); /* and AVX-512 BF16 (0 if the compiler did not know it) */

/* ---- naive references (decode, then dense arithmetic in double) ---- */

/* y = act(x W^T + bias) with W decoded; pre (may be NULL) gets the value before act.
 * tabs: psi then phi (double); work: out*in doubles */
void rbe_linear_forward_ref_f32(float* y, float* pre, const float* x, const rbe_weight_f32* W, const float* bias,
                                int act, const double* tabs, double* work, long T);
void rbe_linear_forward_ref_f64(double* y, double* pre, const double* x, const rbe_weight_f64* W,
                                const double* bias, int act, const double* tabs, double* work, long T);
/* dx = g W, dW = g^T x projected on the block's stored numbers, dbias = sum_t g
 * (any output may be NULL). work: 2*out*in doubles */
void rbe_linear_backward_ref_f32(float* dx, float* dbasis, float* dcoeffs, float* dbias, const float* g,
                                 const float* x, const rbe_weight_f32* W, const double* tabs, double* work, long T);
void rbe_linear_backward_ref_f64(double* dx, double* dbasis, double* dcoeffs, double* dbias, const double* g,
                                 const double* x, const rbe_weight_f64* W, const double* tabs, double* work, long T);

#ifdef __cplusplus
}
#endif
#endif
