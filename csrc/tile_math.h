// Per-tile math of the CUDA loss kernels, shared by the device kernels (clip_loss.cu, siglip_loss.cu)
// and the host build (host_reference.cpp) that the CPU tests drive. Plain C++17: no CUDA or torch header.
//
//   SoftmaxStats, segment_stats, merge_into   online log-sum-exp: one segment of a tile row/column, and
//                                             the merge of partials (max, sum exp(S - max), sum exp(S - max) x)
//   merge_partials_at                         the fixed-order merge of per-block partials into lse / E[log p]
//   clip_grad_value, siglip_*                 dL/dS and the SigLIP terms of one element
//   is_positive, element_offset               the positives j = i + offset and 64-bit index arithmetic
//   ChunkPlan, for_each_row_chunk, plan_column_splits   how rows are cut to fit the workspace, and columns split
//   TilePath, choose_path, path_compiled      which tile product runs for an arch / dtype / fp32 setting
//
// Every offset that scales with the batch is an int64 (index_t).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTCLIP_HD __host__ __device__ __forceinline__
#define FASTCLIP_UNROLL _Pragma("unroll")
#define FASTCLIP_NO_UNROLL _Pragma("unroll 1")
#else
#define FASTCLIP_NO_UNROLL
#define FASTCLIP_HD inline
#define FASTCLIP_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define FASTCLIP_CODE_ARCH __CUDA_ARCH__  // the virtual arch this device pass compiles for (700, 750, 800...)
#else
#define FASTCLIP_CODE_ARCH 0              // host pass / host build
#endif

namespace fastclip {

using index_t = int64_t;

// ---- Tiling (one thread block = one BLOCK_ROWS x BLOCK_COLS tile of S at a time) --------------------
// 128 x 64 tiles with 8 warps (4 x 2 warps of 32 x 32): the fp32 tile (128 x 68 floats, 34.8 KB) aliases
// the operand slices, so a block needs ~42 KB of static shared memory, under the 48 KB every arch from
// sm70 gives without opt-in and under T4's 64 KB per SM. The epilogue gives each of the 256 threads
// one 32-element segment of a row (2 per row) and one of a column (4 per column).
constexpr int kBlockRows = 128;
constexpr int kBlockCols = 64;
constexpr int kSliceDim = 32;  // D elements per operand slice in shared memory
constexpr int kThreads = 256;
constexpr int kSegment = 32;  // elements one thread reduces in registers
constexpr int kTileLd = kBlockCols + 4;  // fp32 tile row pitch: a multiple of 4 floats, as WMMA stores need
constexpr int kRowSegments = kBlockCols / kSegment;  // 2
constexpr int kColSegments = kBlockRows / kSegment;  // 4
constexpr int kStatsScratch = kBlockRows + kRowSegments * kBlockRows + kColSegments * kBlockCols;
// float scratch: the CLIP backward's row/column vectors (2 x (128 + 64)), then kThreads lanes of a tile sum.
// It shares its shared memory with the stats scratch (the larger of the two), so it costs nothing extra.
constexpr int kFloatScratch = 2 * (kBlockRows + kBlockCols) + kThreads;
constexpr index_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y (row blocks of one backward launch)
static_assert(kRowSegments * kBlockRows == kThreads && kColSegments * kBlockCols == kThreads,
              "one row segment and one column segment per thread");

FASTCLIP_HD index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
FASTCLIP_HD index_t min_index(index_t a, index_t b) { return a < b ? a : b; }
FASTCLIP_HD index_t max_index(index_t a, index_t b) { return a > b ? a : b; }

// ---- Elementary functions ------------------------------------------------------------------------
// On the device exp is the hardware ex2 path (__expf, as Triton's tl.exp); its arguments here are
// always differences S - max <= 0 or bounded logits, where its relative error stays ~1e-6.
FASTCLIP_HD float natural_exp(float value) {
#if defined(__CUDA_ARCH__)
  return __expf(value);
#else
  return std::exp(value);
#endif
}

FASTCLIP_HD float natural_log(float value) {
#if defined(__CUDA_ARCH__)
  return logf(value);
#else
  return std::log(value);
#endif
}

FASTCLIP_HD float log_one_plus(float value) {
#if defined(__CUDA_ARCH__)
  return log1pf(value);
#else
  return std::log1p(value);
#endif
}

FASTCLIP_HD float absolute(float value) {
#if defined(__CUDA_ARCH__)
  return fabsf(value);
#else
  return std::fabs(value);
#endif
}

// max that keeps a NaN in its first argument's place from vanishing: a NaN in `candidate` wins.
FASTCLIP_HD float larger(float current, float candidate) { return current > candidate ? current : candidate; }

constexpr float kMinusInfinity = -HUGE_VALF;

// ---- Online log-sum-exp ---------------------------------------------------------------------------
// A partial over some set of logits S: max m, l = sum exp(S - m) and, in log form, w = sum exp(S - m)
// (S - m). lse = m + log l and E[log p] = w / l - log l (minus the entropy). The log form keeps the
// local loss's d/d scale = (E[log p] + CE) / scale free of |S|-sized cancellation (E[x] - x_ii lost
// ~|x| eps per merge). An empty set is (-inf, 0, 0).
struct SoftmaxStats {
  float max;
  float sum;
  float weighted;
};

FASTCLIP_HD SoftmaxStats empty_stats() { return SoftmaxStats{kMinusInfinity, 0.f, 0.f}; }

// A shift that is finite for the empty set: exp(-inf - 0) = 0 instead of exp(NaN).
FASTCLIP_HD float safe_shift(float max) { return max == kMinusInfinity ? 0.f : max; }

// The gap m - shift (<= 0) of a partial's max below the merged shift; 0 for an empty partial, whose
// l = w = 0 must not meet -inf.
FASTCLIP_HD float max_gap(float max, float shift) { return max == kMinusInfinity ? 0.f : max - shift; }

// into <- into merged with part (both in natural units, so rounding is relative to S - max). Moving a
// log-form w to the shift M: w' = (w + l (m - M)) e^(m - M); every term of it keeps its sign.
FASTCLIP_HD void merge_into(SoftmaxStats& into, const SoftmaxStats& part) {
  const float max = larger(into.max, part.max);
  const float shift = safe_shift(max);
  const float into_factor = natural_exp(into.max - shift);
  const float part_factor = natural_exp(part.max - shift);
  into.weighted = (into.weighted + into.sum * max_gap(into.max, shift)) * into_factor +
                  (part.weighted + part.sum * max_gap(part.max, shift)) * part_factor;
  into.sum = into.sum * into_factor + part.sum * part_factor;
  into.max = max;
}

// Stats of one kSegment-long segment of the fp32 product tile: element i is products[i * step], valid
// for i < count (masked elements count as S = -inf). The segment is read once into registers; `rotate`
// only changes the order the elements are visited in (a shared-memory bank trick: row segments of 32
// consecutive rows start at different banks), never which elements are summed.
template <bool kExpectations>
FASTCLIP_HD SoftmaxStats segment_stats(const float* products, index_t step, int rotate, int count, float scale,
                                       float bias) {
  float logits[kSegment];
  float max = kMinusInfinity;
  FASTCLIP_UNROLL
  for (int k = 0; k < kSegment; ++k) {
    const int i = (k + rotate) & (kSegment - 1);
    logits[k] = i < count ? scale * products[i * step] + bias : kMinusInfinity;
    max = larger(max, logits[k]);
  }
  const float shift = safe_shift(max);
  SoftmaxStats stats{max, 0.f, 0.f};
  FASTCLIP_UNROLL
  for (int k = 0; k < kSegment; ++k) {
    const float weight = natural_exp(logits[k] - shift);
    stats.sum += weight;
    if (kExpectations && logits[k] != kMinusInfinity) stats.weighted += weight * (logits[k] - shift);
  }
  return stats;
}

// Merge of n_parts partials of index i (part k at k * part_stride + i), in order k = 0, 1, ...: the
// result is bitwise repeatable. With has_running the running state (run_*) is merged first. finalize
// writes lse = m + log l (and E[log p] = w / l - log l when expectation_out is set); otherwise the merged state
// goes back to run_*.
struct MergeArgs {
  const float* part_max;
  const float* part_sum;
  const float* part_weighted;  // null without expectations
  index_t n_parts;
  index_t part_stride;
  index_t length;
  float* run_max;  // null for a single chunk
  float* run_sum;
  float* run_weighted;
  bool has_running;
  bool finalize;
  float* lse_out;
  float* expectation_out;  // null without expectations
};

FASTCLIP_HD void merge_partials_at(const MergeArgs& a, index_t i) {
  const bool expectations = a.part_weighted != nullptr;
  SoftmaxStats state = empty_stats();
  if (a.has_running) {
    state = SoftmaxStats{a.run_max[i], a.run_sum[i], expectations ? a.run_weighted[i] : 0.f};
  }
  for (index_t k = 0; k < a.n_parts; ++k) {
    const index_t at = k * a.part_stride + i;
    merge_into(state, SoftmaxStats{a.part_max[at], a.part_sum[at], expectations ? a.part_weighted[at] : 0.f});
  }
  if (a.finalize) {
    const float sum = state.sum > 0.f ? state.sum : 1.f;  // only an all-masked index has sum 0
    const float log_sum = natural_log(sum);
    a.lse_out[i] = state.max + log_sum;
    if (a.expectation_out != nullptr) a.expectation_out[i] = state.weighted / sum - log_sum;
  } else {
    a.run_max[i] = state.max;
    a.run_sum[i] = state.sum;
    if (expectations) a.run_weighted[i] = state.weighted;
  }
}

// ---- Positives, offsets ----------------------------------------------------------------------------
FASTCLIP_HD bool is_positive(index_t row, index_t col, index_t positive_offset) { return col == row + positive_offset; }

FASTCLIP_HD index_t element_offset(index_t row, index_t col, index_t stride_row, index_t stride_col) {
  return row * stride_row + col * stride_col;
}

// ---- Element math of the backward and of SigLIP --------------------------------------------------------
// CLIP: G = row_coef (P - [pos]) + col_coef (Q - [pos]), P = exp(S - row_lse), Q = exp(S - col_lse).
// The coefficients arrive already multiplied by the storage multiplier of the G workspace.
// scale_term: this element's share of scale * sum_ij G_ij x_ij in log-softmax form, R log P + C log Q
// (G = R + C, the row and column parts): equal over every whole row / column (S - log P = row_lse is
// constant along a row and R's rows sum to zero; likewise C's columns) and free of the |S|-sized
// cancellation of sum G (S - bias), which multiplies the fp32 lse rounding by |S| (issue 18).
FASTCLIP_HD float clip_grad_value(float logit, float row_lse, float col_lse, float row_coef, float col_coef,
                                  bool positive, float& scale_term) {
  const float row_log = logit - row_lse;
  const float col_log = logit - col_lse;
  float row_part = row_coef * natural_exp(row_log);
  float col_part = col_coef * natural_exp(col_log);
  if (positive) {
    row_part -= row_coef;
    col_part -= col_coef;
  }
  scale_term = row_part * row_log + col_part * col_log;
  return row_part + col_part;
}

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|): exact for large |z| of either sign.
FASTCLIP_HD float softplus(float z) { return larger(z, 0.f) + log_one_plus(natural_exp(-absolute(z))); }

// -log sigmoid(y S) = softplus(-y S), y = +1 on the positive, -1 elsewhere.
FASTCLIP_HD float siglip_loss_term(float logit, bool positive) { return softplus(positive ? -logit : logit); }

// d softplus(-y S) / dS = sigmoid(S) - [pos]; the positive is -sigmoid(-S), never 1 - sigmoid(S).
FASTCLIP_HD float siglip_grad_value(float logit, bool positive) {
  return positive ? -1.f / (1.f + natural_exp(logit)) : 1.f / (1.f + natural_exp(-logit));
}

// ---- Chunks of rows (bounded workspace) and column splits ----------------------------------------------
struct ChunkPlan {
  index_t n_rows;
  index_t rows_per_chunk;  // a multiple of kBlockRows, or n_rows
  index_t count;
};

struct RowChunk {
  index_t index;
  index_t start;       // first row
  index_t rows;
  index_t row_blocks;  // ceil(rows / kBlockRows)
  index_t first_block; // start / kBlockRows (chunks start on block boundaries)
  bool first;
  bool last;
};

// The most whole row blocks whose workspace (bytes_per_row_block each) fits workspace_bytes, at least one
// block and at most max_row_blocks per chunk.
FASTCLIP_HD ChunkPlan plan_row_chunks(index_t n_rows, index_t bytes_per_row_block, index_t workspace_bytes,
                                      index_t max_row_blocks) {
  index_t blocks = workspace_bytes / max_index(1, bytes_per_row_block);
  blocks = min_index(max_index(1, blocks), max_index(1, max_row_blocks));
  const index_t rows = min_index(n_rows, blocks * kBlockRows);
  return ChunkPlan{n_rows, rows, ceil_div(n_rows, rows)};
}

FASTCLIP_HD RowChunk row_chunk(const ChunkPlan& plan, index_t index) {
  const index_t start = index * plan.rows_per_chunk;
  const index_t rows = min_index(plan.rows_per_chunk, plan.n_rows - start);
  return RowChunk{index, start, rows, ceil_div(rows, kBlockRows), start / kBlockRows, index == 0,
                  index == plan.count - 1};
}

// The chunk loop of every driver (chunk_driver.h), on the device path and in the host build alike.
template <class Body>
void for_each_row_chunk(const ChunkPlan& plan, Body&& body) {
  for (index_t index = 0; index < plan.count; ++index) body(row_chunk(plan, index));
}

struct SplitPlan {
  index_t count;           // column splits (gridDim.y of a forward launch)
  index_t cols_per_split;  // a multiple of kBlockCols
};

// Enough column splits that row_blocks x splits reaches target_programs (about two per SM): a rank's
// few local rows against the global columns would otherwise leave most SMs idle.
FASTCLIP_HD SplitPlan plan_column_splits(index_t row_blocks, index_t n_cols, index_t target_programs) {
  const index_t col_tiles = ceil_div(n_cols, kBlockCols);
  index_t splits = min_index(col_tiles, max_index(1, ceil_div(target_programs, row_blocks)));
  splits = min_index(splits, kMaxGridY);
  const index_t cols_per_split = ceil_div(col_tiles, splits) * kBlockCols;
  return SplitPlan{ceil_div(n_cols, cols_per_split), cols_per_split};
}

// ---- Which tile product runs ------------------------------------------------------------------------
// arch is the CUDA arch as __CUDA_ARCH__ writes it: 700 (V100), 750 (T4), 800 (A100), 900 (H100)...
enum class TilePath : int {
  kHalfMma = 0,   // fp16 WMMA 16x16x16, fp32 accumulate: sm70+
  kBf16Mma = 1,   // bf16 WMMA 16x16x16: sm80+
  kTf32Mma = 2,   // fp32 inputs on TF32 WMMA 16x16x8: sm80+, FASTCLIP_FP32_PRECISION=tf32
  kFloatFma = 3,  // fp32 inputs, exact fp32 FMA: every arch
  kBf16Fma = 4,   // bf16 inputs on archs without bf16 tensor cores (sm70, sm75): fp32 FMA of exact products
};
constexpr int kTilePathCount = 5;

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

FASTCLIP_HD constexpr bool has_bf16_tensor_cores(int arch) { return arch >= 800; }
FASTCLIP_HD constexpr bool has_tf32_tensor_cores(int arch) { return arch >= 800; }

// Whether a device pass for `arch` carries the real body of `path` (the others trap if ever launched).
FASTCLIP_HD constexpr bool path_compiled(int arch, TilePath path) {
  return arch >= 700 && (path == TilePath::kHalfMma || path == TilePath::kFloatFma ||
                         (path == TilePath::kBf16Mma && has_bf16_tensor_cores(arch)) ||
                         (path == TilePath::kTf32Mma && has_tf32_tensor_cores(arch)) ||
                         (path == TilePath::kBf16Fma && !has_bf16_tensor_cores(arch)));
}

// The path for inputs of `dtype` on code compiled for `arch` (the kernels' PTX arch on this GPU).
FASTCLIP_HD constexpr TilePath choose_path(int arch, Dtype dtype, bool allow_tf32) {
  return dtype == Dtype::kFloat16    ? TilePath::kHalfMma
         : dtype == Dtype::kBFloat16 ? (has_bf16_tensor_cores(arch) ? TilePath::kBf16Mma : TilePath::kBf16Fma)
         : (allow_tf32 && has_tf32_tensor_cores(arch)) ? TilePath::kTf32Mma
                                                       : TilePath::kFloatFma;
}

// The G workspace holds the input dtype on tensor-core paths; the sm7x bf16 path keeps G (and the
// backward GEMMs) in fp32, since those GPUs have no bf16 GEMM units either.
FASTCLIP_HD constexpr bool grad_in_fp32(TilePath path) {
  return path == TilePath::kBf16Fma || path == TilePath::kFloatFma || path == TilePath::kTf32Mma;
}

// fp16 G is stored times 2^8 so softmax values ~1/B stay out of fp16's subnormals.
constexpr float kFp16Headroom = 256.f;
constexpr float kMinCoefNorm = 1e-30f;

// CLIP's G is stored times multiplier = headroom / max |coef| (the normal range of fp16/bf16 even for
// coefficients ~1/B); the GEMM products are scaled back by scale * max |coef| / headroom. Templates so
// the launcher can apply the same formula to 0-dim device tensors (no host sync).
template <class Value>
FASTCLIP_HD Value grad_storage_multiplier(const Value& coef_norm, float headroom) { return headroom / coef_norm; }
// grad_scale_undo_factor: the factor for sum_ij G_ij x_ij (d loss / d scale), which carries no scale.
template <class Value>
FASTCLIP_HD Value grad_scale_undo_factor(const Value& coef_norm, float headroom) { return coef_norm / headroom; }
template <class Value>
FASTCLIP_HD Value grad_undo_factor(const Value& scale, const Value& coef_norm, float headroom) {
  return scale * grad_scale_undo_factor(coef_norm, headroom);
}

}  // namespace fastclip
