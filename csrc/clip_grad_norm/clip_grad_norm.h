// Math and work split shared by the CPU and CUDA kernels of the multi-tensor norm and scale.
//
// Every tensor is cut into chunks of kChunkSize elements; chunk (tensor k, offset o) covers
// elements [o, min(o + kChunkSize, numel_k)). One CUDA block (one Triton program) reduces
// one chunk to a partial; a finishing step combines each tensor's chunks, then the tensors,
// in a fixed order (tensor_finish_thread, total_finish_thread). The CPU kernel uses the same chunks, one per parallel task, so its result
// does not depend on the thread count.
#pragma once

#include <ganops/block.h>
#include <ganops/checks.h>
#include <ganops/common.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace ganops::clip_grad_norm {

// Elements per chunk, 16384: 32 per thread at 512 threads. Written once, as
// WORK_SPLIT in triton_kernels/clip_grad_norm.py; setup.py passes it in (see its docstring).
#ifndef GANOPS_CLIP_GRAD_NORM_CHUNK_SIZE
#error "GANOPS_CLIP_GRAD_NORM_CHUNK_SIZE undefined: setup.py reads it from triton_kernels/clip_grad_norm.py"
#endif
constexpr int64_t kChunkSize = GANOPS_CLIP_GRAD_NORM_CHUNK_SIZE;
constexpr int kThreads = 512;

enum NormKind : int { kL1 = 0, kL2 = 1, kLInf = 2, kLp = 3 };

struct NormSpec {
  NormKind kind;
  double p;
};

inline NormSpec make_norm_spec(double norm_type) {
  if (std::isinf(norm_type)) return {kLInf, norm_type};
  if (norm_type == 1.0) return {kL1, norm_type};
  if (norm_type == 2.0) return {kL2, norm_type};
  return {kLp, norm_type};
}

// One element's contribution: |x|, x^2, |x| (for the max) or |x|^p.
template <typename Acc>
GANOPS_HD Acc norm_term(Acc x, NormSpec s) {
  Acc ax = x < Acc(0) ? -x : x;
  switch (s.kind) {
    case kL1: return ax;
    case kL2: return x * x;
    case kLInf: return ax;
    default: return ::pow(ax, Acc(s.p));
  }
}

// Combines two partials: a sum, or a NaN-propagating max for the infinity norm.
template <typename Acc>
GANOPS_HD Acc norm_combine(Acc a, Acc b, NormSpec s) {
  return s.kind == kLInf ? nan_max(a, b) : a + b;
}

// The norm from a combined partial: the p-th root of the sum (nothing for L1 and L-inf).
template <typename Acc>
GANOPS_HD Acc norm_finish(Acc total, NormSpec s) {
  switch (s.kind) {
    case kL2: return ::sqrt(total);
    case kLp: return ::pow(total, Acc(1.0 / s.p));
    default: return total;
  }
}

// A double argument in the kernels' arithmetic type. Doubles past float32's range become
// +-inf for float (what the hardware conversion gives; a plain cast of such a value is
// undefined behaviour in C++): max_norm = 1e300 or inf then clips by a coefficient of 1.
template <typename Acc>
GANOPS_HD Acc to_acc(double v) {
  if constexpr (std::is_same_v<Acc, float>) {
    constexpr double kFloatOverflow = 3.4028235677973366e38;  // rounds to inf in float32
    if (v >= kFloatOverflow) return Acc(INFINITY);
    if (v <= -kFloatOverflow) return Acc(-INFINITY);
  }
  return static_cast<Acc>(v);
}

// torch.nn.utils.clip_grads_with_norm_'s coefficient: max_norm / (total + 1e-6), clamped
// to 1, computed in the norm's dtype. Written so that a NaN norm gives a NaN coefficient,
// as torch.clamp does, rather than 1.
template <typename Acc>
GANOPS_HD Acc clip_coefficient(Acc total_norm, double max_norm) {
  Acc coef = to_acc<Acc>(max_norm) / (total_norm + Acc(1e-6));
  return coef > Acc(1) ? Acc(1) : coef;
}

// The in-place chunk updates (the apex pattern: one chunk walk, a small functor per op).
// An op binds, once per block (per chunk on the CPU), to an elementwise function in the
// gradient's accumulation type; identity() lets a chunk be skipped unread and unwritten.
template <typename Acc>
struct ScaleBy {
  Acc coef;
  GANOPS_HD bool identity() const { return coef == Acc(1); }  // x * 1 changes no value
  GANOPS_HD Acc operator()(Acc x) const { return x * coef; }
};

// Scale by a clip coefficient that lives in the kernel's memory, computed once before the
// scale (by the finish, or from a given norm), not by every block.
template <typename Tot>
struct ScaleOp {
  const Tot* coef;
  template <typename Acc>
  GANOPS_HD ScaleBy<Acc> bind() const {
    return {static_cast<Acc>(*coef)};
  }
};

// clip_grad_value_: clamp_min to lo, then clamp_max to hi, as torch does it. NaN fails both
// comparisons and stays NaN; with hi < lo every element becomes hi, as in torch.
template <typename Acc>
struct ClampTo {
  Acc lo, hi;
  GANOPS_HD bool identity() const { return false; }
  GANOPS_HD Acc operator()(Acc x) const {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
  }
};

struct ClampOp {
  double clip_value;
  template <typename Acc>
  GANOPS_HD ClampTo<Acc> bind() const { return {to_acc<Acc>(-clip_value), to_acc<Acc>(clip_value)}; }
};

// One element of an in-place update, in the accumulation type and back.
template <typename T, typename F>
GANOPS_HD void update_element(T* x, const F& f) {
  *x = static_cast<T>(f(static_cast<acc_t<T>>(*x)));
}

// The partial one thread makes from its elements of a chunk.
template <typename T, typename Acc>
GANOPS_HD Acc thread_partial(const T* chunk, int64_t chunk_len, int tid, int nthreads,
                             NormSpec s) {
  Acc acc = Acc(0);
  for_each_thread_element(chunk_len, tid, nthreads,
                          [&](int64_t i) { acc = norm_combine(acc, norm_term(Acc(chunk[i]), s), s); });
  return acc;
}

// norm_combine as a function object, for ganops::block_reduce, its CPU emulation and the CPU
// kernel's lane_reduce.
struct NormCombine {
  NormSpec s;
  template <typename Acc>
  GANOPS_HD Acc operator()(Acc a, Acc b) const { return norm_combine(a, b, s); }
};

// Device-side tables, one int64 buffer: for each of n tensors its data pointer, first chunk
// and chunk count; then for each chunk its tensor, element offset and length.
struct TableView {
  const int64_t* ptrs;
  const int64_t* first_chunk;
  const int64_t* num_chunks;
  const int64_t* chunk_tensor;
  const int64_t* chunk_offset;
  const int64_t* chunk_len;
};

GANOPS_HD TableView table_view(const int64_t* buf, int64_t n_tensors, int64_t n_chunks) {
  return {buf, buf + n_tensors, buf + 2 * n_tensors, buf + 3 * n_tensors,
          buf + 3 * n_tensors + n_chunks, buf + 3 * n_tensors + 2 * n_chunks};
}

GANOPS_HD int64_t table_size(int64_t n_tensors, int64_t n_chunks) {
  return 3 * n_tensors + 3 * n_chunks;
}

GANOPS_HD int64_t chunks_for(int64_t numel) { return ceil_div(numel, kChunkSize); }

// The finish, in two launches so that no thread walks a long list alone (one huge tensor has
// thousands of chunks): first one block per tensor, whose threads split that tensor's
// chunks; then one block whose threads split the tensors. Each combines in a fixed order
// (strided per thread, then the block's tree), so the result is deterministic. The CPU
// calls both with one thread: every chunk in order, then every tensor in order.
//
// Stage 1, block k: thread tid combines chunks tid, tid + nthreads, ... of tensor k.
template <typename Acc>
GANOPS_HD Acc tensor_finish_thread(TableView t, const Acc* partials, int64_t k, int tid, int nthreads,
                                   NormSpec s) {
  Acc acc = Acc(0);
  const int64_t first = t.first_chunk[k];
  for (int64_t c = tid; c < t.num_chunks[k]; c += nthreads) acc = norm_combine(acc, partials[first + c], s);
  return acc;
}

// Stage 2: thread tid combines the tensor sums (stage 1's block results) tid, tid + nthreads, ...
template <typename Acc>
GANOPS_HD Acc total_finish_thread(const Acc* tensor_sums, int64_t n_tensors, int tid, int nthreads, NormSpec s) {
  Acc acc = Acc(0);
  for (int64_t k = tid; k < n_tensors; k += nthreads) acc = norm_combine(acc, tensor_sums[k], s);
  return acc;
}

// Host side: lays out the tables. Chunks are numbered group by group (a group is one
// dtype, one kernel launch), so each launch covers one contiguous range of chunks.
struct TensorEntry {
  int64_t ptr;
  int64_t numel;
  int group;
};

// Launch groups, one per grad dtype, in a fixed order.
constexpr int kNumGroups = 4;

inline int dtype_group(c10::ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 0;
    case ScalarType::Double: return 1;
    case ScalarType::Half: return 2;
    default: return 3;
  }
}

// The norm's dtype: the widest accumulation dtype of the tensors (float64 if any tensor is
// float64, else float32).
inline c10::ScalarType result_dtype(const TensorList& tensors) {
  for (const auto& t : tensors) {
    if (acc_dtype(t.scalar_type()) == ScalarType::Double) return ScalarType::Double;
  }
  return ScalarType::Float;
}

struct Tables {
  std::vector<int64_t> buffer;
  std::vector<int64_t> group_first_chunk;  // size n_groups + 1
  int64_t n_chunks = 0;
};

// Checks shared by the CPU and CUDA host code; Python reports these errors again with the
// user's argument names.
inline void check_norm_type(double norm_type) {
  STD_TORCH_CHECK(norm_type > 0, "norm_type must be positive, got ", norm_type);
}

inline void check_grad_tensor(const Tensor& t, const Device& device) {
  STD_TORCH_CHECK(t.layout() == torch::headeronly::Layout::Strided, "gradients must be dense (strided) tensors, got layout ",
                  layout_text(t.layout()));
  check_float(t, "every gradient");
  STD_TORCH_CHECK(t.device() == device, "gradients must all be on one device, got ", device_text(device), " and ", device_text(t));
}

// Every tensor dense, floating and on one device, of type `device`.
inline void check_grad_tensors(const TensorList& tensors, DeviceType device) {
  for (const auto& t : tensors) check_grad_tensor(t, tensors[0].device());
  if (!tensors.empty()) {
    STD_TORCH_CHECK(tensors[0].device().type() == device, "expected ", device_type_text(device), " tensors, got ",
                device_text(tensors[0]));
  }
}

inline void check_total_norm(const Tensor& total_norm, const Device& device) {
  STD_TORCH_CHECK(total_norm.numel() == 1, "total_norm must hold one value, got shape ", shape_text(total_norm));
  STD_TORCH_CHECK(total_norm.device() == device, "total_norm must be on ", device_text(device), ", got ", device_text(total_norm));
  STD_TORCH_CHECK(total_norm.scalar_type() == ScalarType::Float || total_norm.scalar_type() == ScalarType::Double,
              "total_norm must be float32 or float64, got ", total_norm.scalar_type());
}

// Table entries for contiguous tensors; by_dtype puts each dtype in its own group.
inline std::vector<TensorEntry> entries_of(const std::vector<Tensor>& tensors, bool by_dtype) {
  std::vector<TensorEntry> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    out.push_back({reinterpret_cast<int64_t>(t.data_ptr()), t.numel(),
                   by_dtype ? dtype_group(t.scalar_type()) : 0});
  }
  return out;
}

inline Tables build_tables(const std::vector<TensorEntry>& tensors, int n_groups) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  Tables out;
  out.group_first_chunk.assign(n_groups + 1, 0);
  for (const auto& e : tensors) out.n_chunks += chunks_for(e.numel);
  out.buffer.assign(table_size(n, out.n_chunks), 0);
  int64_t* ptrs = out.buffer.data();
  int64_t* first_chunk = ptrs + n;
  int64_t* num_chunks = ptrs + 2 * n;
  int64_t* chunk_tensor = ptrs + 3 * n;
  int64_t* chunk_offset = chunk_tensor + out.n_chunks;
  int64_t* chunk_len = chunk_offset + out.n_chunks;
  int64_t next = 0;
  for (int g = 0; g < n_groups; ++g) {
    out.group_first_chunk[g] = next;
    for (int64_t k = 0; k < n; ++k) {
      if (tensors[k].group != g) continue;
      ptrs[k] = tensors[k].ptr;
      first_chunk[k] = next;
      num_chunks[k] = chunks_for(tensors[k].numel);
      for (int64_t c = 0; c < num_chunks[k]; ++c, ++next) {
        chunk_tensor[next] = k;
        chunk_offset[next] = c * kChunkSize;
        chunk_len[next] = std::min(kChunkSize, tensors[k].numel - c * kChunkSize);
      }
    }
  }
  out.group_first_chunk[n_groups] = next;
  return out;
}

}  // namespace ganops::clip_grad_norm
