// Math and work split shared by the CPU and CUDA kernels of spectral normalization.
//
// The weight (any rank >= 2, contiguous) is read in place as the matrix torch builds with
// weight.permute(dim, ...).flatten(1), without that copy: with
//   outer = prod(sizes before dim), rows = size(dim), inner = prod(sizes after dim),
// matrix element (i, j), j = a * inner + b, lives at offset (a * rows + i) * inner + b: slab a
// of the weight is the rows x inner block (a, :, :). For dim = 0, outer = 1 and the matrix is
// the weight's own row-major layout. With inner = 1 and several slabs (a 2-D weight read with
// dim = 1, as the hook API reads it) the matrix is stored transposed: the (outer x rows)
// matrix in memory has W's columns as its rows (stored_shape).
//
// One power iteration: t = W v, u = t / max(|t|, eps); s = W^T u, v = s / max(|s|, eps).
// Then sigma = u^T W v = s . s / max(|s|, eps): the norm already computed stands in for the
// third matrix-vector product torch spends.
//
// A matrix-vector product is one of two passes over the stored matrix, each reading it in
// its own memory order: row dots (the stored rows) or column sums (row-chunk partials of
// every column, combined in chunk order). W v and W^T u are the row dots and the column sums
// of W, or, stored transposed, the column sums and the row dots of the stored matrix.
//
// CUDA launches (the per-thread work of each lives here, so a CPU test can run it for every
// block and thread, see spectral_norm_launch_check.cpp):
//   row_dot_kernel     grid rows,                        block b: t[b] = row b . x
//   col_partial_kernel grid (ceil(cols/kThreads), ceil(rows/kRowsPerChunk)):
//                      thread (bx, r, tid): partial[r][j] of column j = bx * kThreads + tid
//                      over rows [r * kRowsPerChunk, ...)
//   combine_kernel     grid ceil(n/kChunkSize): the partials of chunk c's entries added in
//                      chunk order (none after row dots), and chunk c's sum of squares
//   normalize_kernel   grid ceil(n/kChunkSize): every block adds the chunks' sums of squares in
//                      the same order, and scales its chunk by the clamped norm
//   elementwise        grid-stride over the weight's elements, chunk per block
#pragma once


#include <optional>
#include <tuple>
#include <ganops/checks.h>
#include <ganops/block.h>
#include <ganops/common.h>
#include <ganops/contiguous.h>

namespace ganops::spectral_norm {

constexpr int kThreads = 256;
// The work split is written once, as WORK_SPLIT in triton_kernels/spectral_norm.py; setup.py
// passes each entry in (see its docstring).
#if !defined(GANOPS_SPECTRAL_NORM_ROWS_PER_CHUNK) || !defined(GANOPS_SPECTRAL_NORM_CHUNK_SIZE)
#error "GANOPS_SPECTRAL_NORM_ROWS_PER_CHUNK or _CHUNK_SIZE undefined: setup.py reads them from triton_kernels/spectral_norm.py"
#endif
// Rows per column-partial block, 64: with cols = 18432 and rows = 2048 that is 72 x 32
// blocks, enough to fill a GPU, and the finishing pass reads only 32 partials per column.
constexpr int64_t kRowsPerChunk = GANOPS_SPECTRAL_NORM_ROWS_PER_CHUNK;
// Elements per block of the elementwise and dot-product kernels, 4096.
constexpr int64_t kChunkSize = GANOPS_SPECTRAL_NORM_CHUNK_SIZE;

struct MatrixShape {
  int64_t outer;
  int64_t rows;
  int64_t inner;

  GANOPS_HD int64_t cols() const { return outer * inner; }
  GANOPS_HD int64_t numel() const { return outer * rows * inner; }
  // Offset of column j's element in row 0: the column's elements follow at steps of inner.
  GANOPS_HD int64_t column_offset(int64_t j) const { return (j / inner) * rows * inner + j % inner; }
  // Row of the weight's k-th element.
  // Index: the integer type of the division. The CUDA kernels use uint32_t whenever the
  // weight has fewer than 2^32 elements: 64-bit division is a subroutine call, around which
  // ptxas spilled registers in the half-precision sm_80 kernels.
  template <typename Index = int64_t>
  GANOPS_HD int64_t row_of(int64_t k) const {
    return static_cast<int64_t>((Index(k) / Index(inner)) % Index(rows));
  }
  // Column of the weight's k-th element.
  template <typename Index = int64_t>
  GANOPS_HD int64_t col_of(int64_t k) const {
    const Index kk = Index(k), in = Index(inner);
    return static_cast<int64_t>((kk / (Index(rows) * in)) * in + kk % in);
  }
};

// torch.nn.functional.normalize's divisor: the norm clamped below at eps. A NaN norm stays
// NaN, as in torch's clamp_min: `norm > eps` alone would turn it into eps and leave the
// other entries finite (and huge), hiding the NaN from every later step.
template <typename Acc>
GANOPS_HD Acc clamped_norm(Acc sum_sq, double eps) {
  const Acc norm = ::sqrt(sum_sq);
  return (norm > Acc(eps) || norm != norm) ? norm : Acc(eps);
}

// sigma = u^T W v with v = s / max(|s|, eps) and s = W^T u: |s|^2 / max(|s|, eps).
template <typename Acc>
GANOPS_HD Acc sigma_from_sum_sq(Acc sum_sq, double eps) {
  return sum_sq / clamped_norm(sum_sq, eps);
}

// Whether the matrix is stored transposed (inner = 1, several slabs), and the matrix as
// stored: W itself, or the (outer x rows) matrix whose rows are W's columns.
GANOPS_HD bool stored_transposed(MatrixShape s) { return s.inner == 1 && s.outer > 1; }
GANOPS_HD MatrixShape stored_shape(MatrixShape s) {
  return stored_transposed(s) ? MatrixShape{1, s.outer, s.rows} : s;
}

// Columns of row i that thread tid of nthreads visits: tid, tid + nthreads, ... (coalesced
// for dim 0); f(j, offset of element (i, j)). j = a * inner + b is stepped as (a, b): one
// division per thread, none per element.
template <typename F>
GANOPS_HD void for_each_row_element(MatrixShape s, int64_t i, int tid, int nthreads, F&& f) {
  const int64_t step_a = nthreads / s.inner, step_b = nthreads % s.inner;
  int64_t a = tid / s.inner, b = tid % s.inner;
  for (int64_t j = tid; j < s.cols(); j += nthreads) {
    f(j, (a * s.rows + i) * s.inner + b);
    a += step_a;
    b += step_b;
    if (b >= s.inner) {
      b -= s.inner;
      ++a;
    }
  }
}

// Rows of column j's row-chunk r: [r * kRowsPerChunk, min((r + 1) * kRowsPerChunk, rows)).
template <typename F>
GANOPS_HD void for_each_chunk_row(MatrixShape s, int64_t r, F&& f) {
  const int64_t begin = r * kRowsPerChunk;
  const int64_t end = begin + kRowsPerChunk < s.rows ? begin + kRowsPerChunk : s.rows;
  for (int64_t i = begin; i < end; ++i) f(i);
}

// Thread tid's part of (W x)[i].
template <typename T, typename Acc>
GANOPS_HD Acc row_dot_thread(const T* w, const T* x, MatrixShape s, int64_t i, int tid, int nthreads) {
  Acc acc = Acc(0);
  for_each_row_element(s, i, tid, nthreads, [&](int64_t j, int64_t k) { acc += Acc(w[k]) * Acc(x[j]); });
  return acc;
}

// Row-chunk r's part of (W^T x)[j], in row order.
template <typename T, typename Acc>
GANOPS_HD Acc col_partial_thread(const T* w, const T* x, MatrixShape s, int64_t j, int64_t r) {
  const T* column = w + s.column_offset(j);
  Acc acc = Acc(0);
  for_each_chunk_row(s, r, [&](int64_t i) { acc += Acc(column[i * s.inner]) * Acc(x[i]); });
  return acc;
}

GANOPS_HD int64_t row_chunks(int64_t rows) { return ceil_div(rows, kRowsPerChunk); }

// Column j of W^T x: its row-chunk partials combined in order.
template <typename Acc>
GANOPS_HD Acc combine_col_partials(const Acc* partials, int64_t cols, int64_t n_chunks, int64_t j) {
  Acc acc = Acc(0);
  for (int64_t r = 0; r < n_chunks; ++r) acc += partials[r * cols + j];
  return acc;
}

// Thread tid's share of a length-n sum (the backward's chunk partials).
template <typename Acc>
GANOPS_HD Acc sum_thread(const Acc* x, int64_t n, int tid, int nthreads) {
  Acc acc = Acc(0);
  for (int64_t k = tid; k < n; k += nthreads) acc += x[k];
  return acc;
}

// Thread tid's share of x . y with x of type T and y of Acc (eval mode's sigma = u . W v).
template <typename T, typename Acc>
GANOPS_HD Acc dot_thread(const T* x, const Acc* y, int64_t n, int tid, int nthreads) {
  Acc acc = Acc(0);
  for (int64_t k = tid; k < n; k += nthreads) acc += Acc(x[k]) * y[k];
  return acc;
}

// Elements of chunk c that thread tid visits in the elementwise and dot kernels.
template <typename F>
GANOPS_HD void for_each_chunk_element(int64_t numel, int64_t c, int tid, int nthreads, F&& f) {
  const int64_t begin = c * kChunkSize;
  const int64_t end = begin + kChunkSize < numel ? begin + kChunkSize : numel;
  for (int64_t k = begin + tid; k < end; k += nthreads) f(k);
}

// Thread tid's part of <G, W> over chunk c (the backward's first pass).
template <typename T, typename Acc>
GANOPS_HD Acc grad_dot_thread(const T* g, const T* w, int64_t numel, int64_t c, int tid, int nthreads) {
  Acc acc = Acc(0);
  for_each_chunk_element(numel, c, tid, nthreads, [&](int64_t k) { acc += Acc(g[k]) * Acc(w[k]); });
  return acc;
}

// Thread tid's part of the combining pass over chunk c of a length-n vector: out[j] = column
// j's n_row_chunks partials added in chunk order (n_row_chunks = 1, out = partials: the
// vector as it is); returns the sum of squares of its entries.
template <typename Acc>
GANOPS_HD Acc combine_thread(const Acc* partials, int64_t n_row_chunks, int64_t n, Acc* out, int64_t c, int tid,
                             int nthreads) {
  Acc acc = Acc(0);
  for_each_chunk_element(n, c, tid, nthreads, [&](int64_t j) {
    const Acc value = combine_col_partials(partials, n, n_row_chunks, j);
    out[j] = value;
    acc += value * value;
  });
  return acc;
}

// Thread tid's part of normalising chunk c: out = x / denom.
template <typename T, typename Acc>
GANOPS_HD void normalize_thread(const Acc* x, int64_t n, Acc denom, T* out, int64_t c, int tid, int nthreads) {
  for_each_chunk_element(n, c, tid, nthreads, [&](int64_t j) { out[j] = static_cast<T>(x[j] / denom); });
}

// The backward's coefficient of u v^T: <G, W> / sigma^2 - grad_sigma, so that
//   dW = G / sigma - coef * u v^T = (G - <G, W_sn> u v^T) / sigma + grad_sigma * u v^T.
template <typename Acc>
GANOPS_HD Acc outer_coefficient(Acc grad_dot_weight, Acc sigma, Acc grad_sigma) {
  return grad_dot_weight / (sigma * sigma) - grad_sigma;
}

// One element of dW.
template <typename T, typename Acc, typename Index = int64_t>
GANOPS_HD T grad_weight_element(const T* g, const T* u, const T* v, MatrixShape s, int64_t k,
                                Acc inv_sigma, Acc coef) {
  return static_cast<T>(Acc(g[k]) * inv_sigma -
                        coef * Acc(u[s.template row_of<Index>(k)]) * Acc(v[s.template col_of<Index>(k)]));
}

// Host side: the matrix view of a contiguous weight, and the checks every backend's
// kernels make (Python checks first, naming the public arguments).
inline MatrixShape matrix_shape(const Tensor& weight, int64_t dim) {
  MatrixShape s{1, weight.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) s.outer *= weight.size(d);
  for (int64_t d = dim + 1; d < weight.dim(); ++d) s.inner *= weight.size(d);
  return s;
}

inline MatrixShape check_weight_u_v(const Tensor& weight, const Tensor& u, const Tensor& v,
                                    int64_t dim) {
  check_float(weight, "weight");
  STD_TORCH_CHECK(weight.dim() >= 2, "weight must have at least 2 dimensions, got shape ", shape_text(weight));
  STD_TORCH_CHECK(dim >= 0 && dim < weight.dim(), "dim must be in [0, ", weight.dim(), "), got ", dim);
  STD_TORCH_CHECK(weight.numel() > 0, "weight must not be empty, got shape ", shape_text(weight));
  const MatrixShape s = matrix_shape(weight, dim);
  STD_TORCH_CHECK(u.dim() == 1 && u.numel() == s.rows, "u must be 1-D with ", s.rows, " elements, got shape ",
              shape_text(u));
  STD_TORCH_CHECK(v.dim() == 1 && v.numel() == s.cols(), "v must be 1-D with ", s.cols(),
              " elements, got shape ", shape_text(v));
  STD_TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(),
              "u and v must have the weight's dtype ", weight.scalar_type(), ", got ", u.scalar_type(),
              " and ", v.scalar_type());
  check_same_device(u, "u", weight, "weight");
  check_same_device(v, "v", weight, "weight");
  return s;
}

inline void check_sigma(const Tensor& sigma, const Tensor& weight) {
  STD_TORCH_CHECK(sigma.dim() == 0, "sigma must be 0-D, got shape ", shape_text(sigma));
  STD_TORCH_CHECK(sigma.scalar_type() == acc_dtype(weight.scalar_type()), "sigma must be ",
              acc_dtype(weight.scalar_type()), " for a ", weight.scalar_type(), " weight, got ",
              sigma.scalar_type());
  check_same_device(sigma, "sigma", weight, "weight");
}

// The forward's inputs, checked alike by the CPU and CUDA kernels, and contiguous: the power
// iteration updates these u and v in place (copies when the buffers were not contiguous).
struct ForwardInputs {
  MatrixShape s;
  Tensor w, u, v;
};

inline ForwardInputs forward_inputs(const Tensor& weight, const Tensor& u, const Tensor& v, int64_t dim,
                                    int64_t n_power_iterations) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  STD_TORCH_CHECK(n_power_iterations >= 0, "n_power_iterations must be >= 0, got ", n_power_iterations);
  return {s, as_contiguous(weight), as_contiguous(u), as_contiguous(v)};
}

// The forward's outputs, alike for the CPU and CUDA kernels. The buffers u, v were iterated
// in place in ForwardInputs' u, v (passed here as uc, vc); write those back. The vectors this
// step used are returned as copies: autograd keeps them while the buffers move on.
inline std::tuple<Tensor, Tensor, Tensor, Tensor> forward_result(
    Tensor& u, const Tensor& uc, Tensor& v, const Tensor& vc, const Tensor& out,
    const Tensor& sigma) {
  copy_back(u, uc);
  copy_back(v, vc);
  return {out, sigma, ganops::clone(uc), ganops::clone(vc)};
}

// The backward's inputs, checked alike by the CPU and CUDA kernels, and contiguous.
struct BackwardInputs {
  MatrixShape s;
  Tensor w, g, u, v;
  bool has_grad_sigma;
};

inline BackwardInputs backward_inputs(const Tensor& grad, const std::optional<Tensor>& grad_sigma,
                                      const Tensor& weight, const Tensor& u, const Tensor& v,
                                      const Tensor& sigma, int64_t dim) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  check_sigma(sigma, weight);
  check_like(weight, "weight", grad, "grad");
  const bool has_grad_sigma = grad_sigma.has_value() && grad_sigma->defined();
  if (has_grad_sigma) check_sigma(*grad_sigma, weight);
  return {s, as_contiguous(weight), as_contiguous(grad), as_contiguous(u), as_contiguous(v), has_grad_sigma};
}

}  // namespace ganops::spectral_norm
