// Decode-step attention over a cached per-image context (forward only): the CUDA backend of
// blip_fast.ops.decode_attention. Semantics are those of the SDPA reference:
//
//   out[c, h] = softmax(q[c, h] @ k[c, h]^T * scale + mask[c]) @ v[c, h]
//
// q [C, H, M, Dh] holds the M = rows_per_image * new_tokens query rows of image c (beams/samples are extra rows,
// never copies of the context); k/v [C, H, N, Dh] are the cross-attention cache (N = 577 at 384 px). Reading that
// cache is ~94% of a decode step's bytes (DESIGN.md §3), so one block owns one (image, head, key split, row block)
// and streams each K/V tile into shared memory exactly once for all of its (up to kRows) query rows.
//
// Per tile of kBlockN keys: (1) K/V -> shared memory as fp32 (16-byte vector loads when aligned), (2) logits,
// one thread per key, for its share of the rows, (3) online softmax, one warp per row (fp32 statistics, base-2
// logits so every exponential is one exp2f), (4) P @ V into per-thread fp32 accumulators, one thread per
// (row, dim). The work is tiny next to the memory traffic; several resident blocks per SM hide the load latency.
//
// Split-K: with few (image, head) pairs (batch 1: 12 blocks for ~132 SMs) the keys are split into chunks; each
// block writes its unnormalised partial (max, sum, acc) and a second kernel merges the splits in a fixed order
// (log-sum-exp merge): deterministic, no atomics. Splits are never empty, so every tile and every split has a
// valid key and a finite maximum. Additive masks are clamped to -1e30 so finfo(float32).min stays finite in base 2.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace blip_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 16;  // query rows per block; decoding has 1..5, a prompt prefill a few tens (row blocks)
constexpr int kMaxHeadDim = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMaskFloor = -1e30f;

// Shapes and strides (in elements) of one launch. Strides of the last dim are 1 (checked on the host).
struct Params {
  const void* query;
  const void* key;
  const void* value;
  const void* mask;  // additive, query dtype, [C, N] through its strides; nullptr when absent
  void* out;         // [C, H, M, Dh] through o_stride (unit last stride): callers pick the layout they read next
  float* part_acc;   // [C * H, splits, M, Dh]
  float* part_max;   // [C * H, splits, M]
  float* part_sum;   // [C * H, splits, M]
  int pairs, heads, rows, keys, head_dim, tiles_per_split, splits;  // pairs = C * H
  float scale_log2;  // scale * log2(e)
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  int64_t mask_stride_c, mask_stride_n;
  bool vector_loads;  // key/value rows are 16-byte aligned and Dh fills whole vectors
};

// Tile geometry for a head dim padded to kDim (32, 64 or 128): K/V tiles of kBlockN keys are 16 KiB as fp32.
template <int kDim>
struct Tile {
  static constexpr int kBlockN = (4096 / kDim) < 128 ? (4096 / kDim) : 128;
  static constexpr int kKeyGroups = kThreads / kBlockN;         // threads sharing one key in the logits step
  static constexpr int kRowsPerKeyThread = kRows / kKeyGroups;  // rows each of them computes
  static constexpr int kRowGroups = kThreads / kDim;            // threads sharing one dim in the P @ V step
  static constexpr int kAccPerThread = kRows / kRowGroups;
  static constexpr int kKStride = kDim + 4;  // fp32 row padding: float4 reads of 8 consecutive keys hit all banks
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Copy keys [n_begin, n_begin + kBlockN) of one [N, Dh] head into a fp32 shared tile of row stride `stride`,
// zero-filling keys >= n_end and dims >= Dh (so padded products are 0 and padded values never poison P @ V).
template <typename scalar_t, int kDim>
__device__ void load_tile(float* tile, int stride, const scalar_t* src, int64_t row_stride, int n_begin, int n_end,
                          int head_dim, bool vector_loads) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kChunks = kDim / kVec;
  for (int unit = threadIdx.x; unit < Tile<kDim>::kBlockN * kChunks; unit += kThreads) {
    const int n = unit / kChunks;
    const int d = (unit % kChunks) * kVec;
    float values[kVec];
    const scalar_t* row = src + (n_begin + n) * row_stride;
    if (n_begin + n < n_end && vector_loads && d < head_dim) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + d);
      const scalar_t* elements = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) values[e] = to_float(elements[e]);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        values[e] = (n_begin + n < n_end && d + e < head_dim) ? to_float(row[d + e]) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) tile[n * stride + d + e] = values[e];
  }
}

// Logits of this thread's key for its rows, written to `logits [kRows, kBlockN]` in base 2 (masked keys -inf).
template <typename scalar_t, int kDim>
__device__ void tile_logits(const Params& p, const float* q_tile, const float* k_tile, float* logits,
                            const scalar_t* mask_row, int n_begin, int n_end, int rows_here) {
  using G = Tile<kDim>;
  const int n = threadIdx.x % G::kBlockN;
  const int group = threadIdx.x / G::kBlockN;
  const bool valid = n_begin + n < n_end;
  float bias = 0.f;
  if (mask_row != nullptr && valid) {
    bias = fmaxf(to_float(mask_row[(n_begin + n) * p.mask_stride_n]), kMaskFloor) * kLog2e;
  }
  float dots[G::kRowsPerKeyThread] = {};
  const float4* k4 = reinterpret_cast<const float4*>(k_tile + n * G::kKStride);
#pragma unroll 4
  for (int d4 = 0; d4 < kDim / 4; ++d4) {
    const float4 k = k4[d4];
#pragma unroll
    for (int i = 0; i < G::kRowsPerKeyThread; ++i) {
      const int m = group + i * G::kKeyGroups;
      if (m < rows_here) {  // uniform per warp: a warp's threads share `group`
        const float4 q = reinterpret_cast<const float4*>(q_tile + m * kDim)[d4];
        dots[i] += q.x * k.x + q.y * k.y + q.z * k.z + q.w * k.w;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < G::kRowsPerKeyThread; ++i) {
    const int m = group + i * G::kKeyGroups;
    if (m < rows_here) {
      logits[m * G::kBlockN + n] = valid ? dots[i] * p.scale_log2 + bias : -INFINITY;
    }
  }
}

// Online-softmax update, one warp per row: logits -> probabilities in place; running max/sum and this tile's
// rescale factor of the old accumulator in shared memory.
template <int kBlockN>
__device__ void tile_softmax(float* logits, float* row_max, float* row_sum, float* row_rescale, int rows_here) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int m = warp; m < rows_here; m += kThreads / 32) {
    float* row = logits + m * kBlockN;
    float tile_max = -INFINITY;
    for (int n = lane; n < kBlockN; n += 32) tile_max = fmaxf(tile_max, row[n]);
    const float old_max = row_max[m];
    const float new_max = fmaxf(old_max, warp_max(tile_max));  // finite: every tile has a valid key
    float tile_sum = 0.f;
    for (int n = lane; n < kBlockN; n += 32) {
      const float prob = exp2f(row[n] - new_max);
      row[n] = prob;
      tile_sum += prob;
    }
    tile_sum = warp_sum(tile_sum);
    if (lane == 0) {
      const float rescale = exp2f(old_max - new_max);  // 0 on the first tile (old_max = -inf)
      row_rescale[m] = rescale;
      row_sum[m] = row_sum[m] * rescale + tile_sum;
      row_max[m] = new_max;
    }
  }
}

// Main kernel: grid (C * H, row blocks, splits).
template <typename scalar_t, int kDim>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const Params p) {
  using G = Tile<kDim>;
  __shared__ __align__(16) float q_tile[kRows * kDim];
  __shared__ __align__(16) float k_tile[G::kBlockN * G::kKStride];
  __shared__ __align__(16) float v_tile[G::kBlockN * kDim];
  __shared__ float logits[kRows * G::kBlockN];
  __shared__ float row_max[kRows], row_sum[kRows], row_rescale[kRows];

  const int bh = blockIdx.x;
  const int image = bh / p.heads;
  const int head = bh % p.heads;
  const int row_begin = blockIdx.y * kRows;
  const int rows_here = min(kRows, p.rows - row_begin);
  const int split = blockIdx.z;

  const scalar_t* query = static_cast<const scalar_t*>(p.query) + image * p.q_stride[0] + head * p.q_stride[1];
  for (int i = threadIdx.x; i < kRows * kDim; i += kThreads) {
    const int m = i / kDim, d = i % kDim;
    q_tile[i] = (m < rows_here && d < p.head_dim) ? to_float(query[(row_begin + m) * p.q_stride[2] + d]) : 0.f;
  }
  if (threadIdx.x < kRows) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.f;
  }
  const scalar_t* key = static_cast<const scalar_t*>(p.key) + image * p.k_stride[0] + head * p.k_stride[1];
  const scalar_t* value = static_cast<const scalar_t*>(p.value) + image * p.v_stride[0] + head * p.v_stride[1];
  const scalar_t* mask_row =
      p.mask == nullptr ? nullptr : static_cast<const scalar_t*>(p.mask) + image * p.mask_stride_c;

  // P @ V ownership: thread -> one dim, rows row_group + i * kRowGroups.
  const int dim = threadIdx.x % kDim;
  const int row_group = threadIdx.x / kDim;
  float acc[G::kAccPerThread] = {};

  const int n_first = split * p.tiles_per_split * G::kBlockN;
  const int n_end = min(p.keys, n_first + p.tiles_per_split * G::kBlockN);
  for (int n_begin = n_first; n_begin < n_end; n_begin += G::kBlockN) {
    load_tile<scalar_t, kDim>(k_tile, G::kKStride, key, p.k_stride[2], n_begin, n_end, p.head_dim, p.vector_loads);
    load_tile<scalar_t, kDim>(v_tile, kDim, value, p.v_stride[2], n_begin, n_end, p.head_dim, p.vector_loads);
    __syncthreads();
    tile_logits<scalar_t, kDim>(p, q_tile, k_tile, logits, mask_row, n_begin, n_end, rows_here);
    __syncthreads();
    tile_softmax<G::kBlockN>(logits, row_max, row_sum, row_rescale, rows_here);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < G::kAccPerThread; ++i) {
      const int m = row_group + i * G::kRowGroups;
      if (m < rows_here) {  // uniform per warp (kDim >= 32)
        const float* probs = logits + m * G::kBlockN;
        float sum = acc[i] * row_rescale[m];
#pragma unroll 8
        for (int n = 0; n < G::kBlockN; ++n) sum += probs[n] * v_tile[n * kDim + dim];
        acc[i] = sum;
      }
    }
    __syncthreads();  // the next tile overwrites k/v/logits
  }

  if (dim >= p.head_dim) return;
#pragma unroll
  for (int i = 0; i < G::kAccPerThread; ++i) {
    const int m = row_group + i * G::kRowGroups;
    if (m >= rows_here) continue;
    const int row = row_begin + m;
    if (p.splits == 1) {
      scalar_t* out = static_cast<scalar_t*>(p.out) + (bh / p.heads) * p.o_stride[0] +
                      (bh % p.heads) * p.o_stride[1] + row * p.o_stride[2];
      out[dim] = static_cast<scalar_t>(acc[i] / row_sum[m]);
    } else {
      const int64_t partial_row = (static_cast<int64_t>(bh) * p.splits + split) * p.rows + row;
      p.part_acc[partial_row * p.head_dim + dim] = acc[i];
      if (dim == 0) {
        p.part_max[partial_row] = row_max[m];
        p.part_sum[partial_row] = row_sum[m];
      }
    }
  }
}

// Merge kernel: one thread per (image * head, row, dim); splits merged in order (deterministic).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const Params p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.pairs) * p.rows * p.head_dim;
  if (index >= total) return;
  const int64_t row = index / p.head_dim;  // (image * head) * rows + row
  const int dim = index % p.head_dim;
  const int64_t bh = row / p.rows;
  const int64_t first = bh * p.splits * p.rows + row % p.rows;  // partial row of split 0; split s adds s * rows
  float top = -INFINITY;
  for (int s = 0; s < p.splits; ++s) top = fmaxf(top, p.part_max[first + s * p.rows]);
  float total_sum = 0.f, total_acc = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const int64_t partial_row = first + s * p.rows;
    const float weight = exp2f(p.part_max[partial_row] - top);
    total_sum += weight * p.part_sum[partial_row];
    total_acc += weight * p.part_acc[partial_row * p.head_dim + dim];
  }
  const int64_t out_index = (bh / p.heads) * p.o_stride[0] + (bh % p.heads) * p.o_stride[1] +
                            (row % p.rows) * p.o_stride[2] + dim;
  static_cast<scalar_t*>(p.out)[out_index] = static_cast<scalar_t>(total_acc / total_sum);
}

// ------------------------------------------------------------------------------------------------ host side
// (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers that a bare toolkit may lack.)
int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

int padded_head_dim(int head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : 128;
}

int block_keys(int padded_dim) {
  return std::min(128, 4096 / padded_dim);
}

// Key splits: enough blocks for ~4 per SM, never an empty split. `forced` > 0 overrides the heuristic (tests).
void choose_splits(Params& p, int blocks, int device, int64_t forced) {
  const int tile_keys = block_keys(padded_head_dim(p.head_dim));
  const int tiles = (p.keys + tile_keys - 1) / tile_keys;
  int splits = forced > 0 ? static_cast<int>(forced) : std::max(1, (4 * sm_count(device) + blocks - 1) / blocks);
  splits = std::min(splits, tiles);
  p.tiles_per_split = (tiles + splits - 1) / splits;
  p.splits = (tiles + p.tiles_per_split - 1) / p.tiles_per_split;
}

bool aligned16(const at::Tensor& t) {
  const int64_t bytes = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * bytes) % 16 == 0 &&
         (t.stride(1) * bytes) % 16 == 0 && (t.stride(2) * bytes) % 16 == 0;
}

// The last dim must have unit stride; other dims are addressed by stride (a strided cache view is not copied).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const std::optional<at::Tensor>& mask, const at::Tensor& out) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && key.sizes() == value.sizes(),
              "blip_fast::decode_attention: expected query [C, H, M, Dh] and key/value [C, H, N, Dh]; got ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(1) == query.size(1) && key.size(3) == query.size(3) &&
                  key.size(2) > 0,
              "blip_fast::decode_attention: key/value ", key.sizes(), " do not match query ", query.sizes());
  TORCH_CHECK(query.size(3) >= 1 && query.size(3) <= kMaxHeadDim, "blip_fast::decode_attention: head dim ",
              query.size(3), " is not in 1..", kMaxHeadDim);
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && key.scalar_type() == dtype &&
                  value.scalar_type() == dtype,
              "blip_fast::decode_attention: query/key/value must share one of fp16/bf16/fp32; got ", dtype, ", ",
              key.scalar_type(), ", ", value.scalar_type());
  TORCH_CHECK(query.is_cuda() && key.device() == query.device() && value.device() == query.device(),
              "blip_fast::decode_attention: query/key/value must be on one CUDA device");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.stride(3) == 1 &&
                  out.device() == query.device(),
              "blip_fast::decode_attention: out must be a tensor like query ", query.sizes(), " with unit last stride");
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == query.device(), "blip_fast::decode_attention: mask must be on the query's device");
  }
}

// Additive mask in the query's dtype, viewed as [C, 1, 1, N] (broadcast dims keep stride 0). A bool mask keeps
// True; its -inf is clamped to kMaskFloor in the kernel like any other very negative value.
at::Tensor additive_mask(const at::Tensor& mask, const at::Tensor& query, int64_t keys) {
  at::Tensor additive = mask;
  if (mask.scalar_type() == at::kBool) {
    additive = at::where(mask, at::zeros({}, query.options()), at::full({}, -INFINITY, query.options()));
  } else if (mask.scalar_type() != query.scalar_type()) {
    additive = mask.to(query.scalar_type());
  }
  return additive.expand({query.size(0), 1, 1, keys});
}

template <typename scalar_t, int kDim>
void launch(const Params& p, dim3 grid, cudaStream_t stream) {
  decode_attention_kernel<scalar_t, kDim><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const int64_t outputs = static_cast<int64_t>(p.pairs) * p.rows * p.head_dim;
    merge_splits_kernel<scalar_t><<<static_cast<unsigned>((outputs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_for_head_dim(const Params& p, dim3 grid, cudaStream_t stream) {
  switch (padded_head_dim(p.head_dim)) {
    case 32: launch<scalar_t, 32>(p, grid, stream); break;
    case 64: launch<scalar_t, 64>(p, grid, stream); break;
    default: launch<scalar_t, 128>(p, grid, stream); break;
  }
}

}  // namespace

// Writes attention into `out` (query's shape, any strides with a unit last one: e.g. a [C, M, H, Dh] buffer viewed
// as [C, H, M, Dh], the layout the output projection reads). `splits` > 0 forces the number of key splits (tests).
void decode_attention_out_cuda(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                               const std::optional<at::Tensor>& mask, double scale, int64_t splits,
                               const at::Tensor& out) {
  check_inputs(query_in, key_in, value_in, mask, out);
  const c10::cuda::CUDAGuard guard(query_in.device());
  if (query_in.size(2) == 0 || query_in.size(0) * query_in.size(1) == 0) return;
  const at::Tensor query = unit_last_stride(query_in);
  const at::Tensor key = unit_last_stride(key_in);
  const at::Tensor value = unit_last_stride(value_in);
  const int64_t keys = key.size(2);
  at::Tensor mask_view;
  Params p{};
  if (mask.has_value()) {
    mask_view = additive_mask(*mask, query, keys);
    p.mask = mask_view.data_ptr();
    p.mask_stride_c = mask_view.stride(0);
    p.mask_stride_n = mask_view.stride(3);
  }
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.out = out.data_ptr();
  p.heads = static_cast<int>(query.size(1));
  p.rows = static_cast<int>(query.size(2));
  p.keys = static_cast<int>(keys);
  p.head_dim = static_cast<int>(query.size(3));
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = query.stride(i);
    p.k_stride[i] = key.stride(i);
    p.v_stride[i] = value.stride(i);
    p.o_stride[i] = out.stride(i);
  }
  p.vector_loads = aligned16(key) && aligned16(value) && (p.head_dim * key.element_size()) % 16 == 0;

  const int64_t pairs = query.size(0) * query.size(1);
  TORCH_CHECK(pairs < (int64_t{1} << 31) - 1, "blip_fast::decode_attention: too many (image, head) pairs: ", pairs);
  p.pairs = static_cast<int>(pairs);
  const int row_blocks = (p.rows + kRows - 1) / kRows;
  TORCH_CHECK(row_blocks < 65536, "blip_fast::decode_attention: too many query rows: ", p.rows);
  choose_splits(p, p.pairs * row_blocks, query.get_device(), splits);
  at::Tensor partials;
  if (p.splits > 1) {
    // acc [C*H, splits, M, Dh], then max and sum [C*H, splits, M] each, in one fp32 allocation.
    const int64_t partial_rows = pairs * p.splits * p.rows;
    partials = at::empty({partial_rows * (p.head_dim + 2)}, query.options().dtype(at::kFloat));
    p.part_acc = partials.data_ptr<float>();
    p.part_max = p.part_acc + partial_rows * p.head_dim;
    p.part_sum = p.part_max + partial_rows;
  }
  const dim3 grid(static_cast<unsigned>(pairs), row_blocks, p.splits);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (query.scalar_type()) {  // check_inputs admitted only these three
    case at::kHalf: launch_for_head_dim<at::Half>(p, grid, stream); break;
    case at::kBFloat16: launch_for_head_dim<at::BFloat16>(p, grid, stream); break;
    default: launch_for_head_dim<float>(p, grid, stream); break;
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& mask, double scale) {
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  decode_attention_out_cuda(query, key, value, mask, scale, 0, out);
  return out;
}

TORCH_LIBRARY_IMPL(blip_fast, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("decode_attention_out", &decode_attention_out_cuda);
}

}  // namespace blip_fast
