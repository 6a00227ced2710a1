// Host build of the CUDA loss primitives: the block programs (tile_programs.h) and chunk loops
// (chunk_driver.h) of the device path, run by a HostBlock with one "thread" and fp32 dot-loop tile
// products, for the tests on machines without a GPU (tests/cuda_host.py compiles this file with the
// system C++ compiler and calls it through ctypes). Only the tile product, the block primitives and
// the two backward GEMMs are written here; every other line of math is the device's.
//
// Inputs are fp32 arrays with any strides (in elements); outputs are contiguous fp32.
#include <cstring>
#include <limits>
#include <vector>

#include "chunk_driver.h"

namespace fastclip {
namespace {

class HostBlock {
 public:
  HostBlock(const FeatureMatrix& image, const FeatureMatrix& text, index_t dim, float* grad)
      : image_(image), text_(text), dim_(dim), grad_(grad), tile_(kBlockRows * kTileLd, 0.f),
        stats_(kStatsScratch), floats_(kFloatScratch) {}

  int thread() const { return 0; }
  int threads() const { return 1; }
  void sync() {}
  const float* tile() const { return tile_.data(); }
  SoftmaxStats* stats_scratch() { return stats_.data(); }
  float* float_scratch() { return floats_.data(); }
  void store_grad(index_t offset, float value) { grad_[offset] = value; }

  // Products accumulated in fp64 and rounded once (the device's tensor cores accumulate in fp32, in their
  // own order), zeros outside the matrices as the device's masked loads.
  void multiply_tile(index_t row0, index_t col0) {
    const float* image = static_cast<const float*>(image_.data);
    const float* text = static_cast<const float*>(text_.data);
    for (int r = 0; r < kBlockRows; ++r) {
      for (int c = 0; c < kBlockCols; ++c) {
        double product = 0.0;
        if (row0 + r < image_.rows && col0 + c < text_.rows) {
          for (index_t d = 0; d < dim_; ++d) {
            product += image[element_offset(row0 + r, d, image_.stride_row, image_.stride_dim)] *
                       text[element_offset(col0 + c, d, text_.stride_row, text_.stride_dim)];
          }
        }
        tile_[r * kTileLd + c] = static_cast<float>(product);
      }
    }
  }

 private:
  FeatureMatrix image_, text_;
  index_t dim_;
  float* grad_;
  std::vector<float> tile_;
  std::vector<SoftmaxStats> stats_;
  std::vector<float> floats_;
};

// Partials start as NaN, as the device's poisoned buffers do in the tests: a tile no program wrote shows up.
constexpr float kNotWritten = std::numeric_limits<float>::quiet_NaN();

// The per-block partials summed in fp64, in index order (the launcher, binding.cpp sum_partials, also sums
// them in fp64, in torch's fixed order).
float sum_partials(const std::vector<float>& partials) {
  double total = 0.0;
  for (float partial : partials) total += partial;
  return static_cast<float>(total);
}

FeatureMatrix host_matrix(const float* data, index_t rows, index_t stride_row, index_t stride_dim) {
  return FeatureMatrix{data, rows, stride_row, stride_dim, static_cast<int>(sizeof(float))};
}

StatsBuffers stats_of(std::vector<float>& storage, index_t per_stat, bool expectations) {
  return StatsBuffers{storage.data(), storage.data() + per_stat, expectations ? storage.data() + 2 * per_stat : nullptr};
}

struct HostForwardOps {
  FeatureMatrix image, text;
  index_t dim;
  bool expectations;
  index_t target_programs;
  std::vector<float> col_storage, running_storage, row_storage;

  index_t n_stats() const { return expectations ? 3 : 2; }
  StatsBuffers column_partials(index_t blocks, index_t n_cols) {
    col_storage.assign(n_stats() * blocks * n_cols, 0.f);
    return stats_of(col_storage, blocks * n_cols, expectations);
  }
  StatsBuffers running_state(index_t n_cols) {
    running_storage.assign(n_stats() * n_cols, 0.f);
    return stats_of(running_storage, n_cols, expectations);
  }
  SplitPlan column_splits(index_t row_blocks, index_t n_cols) const {
    return plan_column_splits(row_blocks, n_cols, target_programs);
  }
  StatsBuffers row_partials(index_t splits, index_t rows) {
    row_storage.assign(n_stats() * splits * rows, 0.f);
    return stats_of(row_storage, splits * rows, expectations);
  }
  void forward_blocks(const ClipForwardArgs& args, const RowChunk& chunk, const SplitPlan& splits) {
    const FeatureMatrix rows = rows_of(image, chunk.start, chunk.rows);
    for (index_t block_row = 0; block_row < chunk.row_blocks; ++block_row) {
      for (index_t split = 0; split < splits.count; ++split) {
        HostBlock block(rows, text, dim, nullptr);
        if (expectations) {
          clip_forward_block<true>(args, block, block_row, split);
        } else {
          clip_forward_block<false>(args, block, block_row, split);
        }
      }
    }
  }
  void merge(const MergeArgs& args) {
    for (index_t i = 0; i < args.length; ++i) merge_partials_at(args, i);
  }
};

// Backward shared by both losses: G chunk from a block program, then the two GEMMs
// grad_image[chunk] = G @ text and grad_text += G.T @ image[chunk] (stand-ins for cuBLAS, fp64 accumulation).
template <class GradBlocks>
struct HostGradOps {
  FeatureMatrix image, text;
  index_t dim;
  float* grad_image;  // (n_rows, dim)
  float* grad_text;   // (n_cols, dim), zeroed by the caller
  GradBlocks run_blocks;
  std::vector<float> workspace;

  void allocate(const ChunkPlan& plan) { workspace.assign(plan.rows_per_chunk * text.rows, 0.f); }
  void grad_blocks(const RowChunk& chunk) { run_blocks(*this, chunk); }
  void feature_grads(const RowChunk& chunk) {
    const float* image_data = static_cast<const float*>(image.data);
    const float* text_data = static_cast<const float*>(text.data);
    const index_t n_cols = text.rows;
    for (index_t r = 0; r < chunk.rows; ++r) {
      for (index_t d = 0; d < dim; ++d) {
        double sum = 0.0;
        for (index_t c = 0; c < n_cols; ++c) {
          sum += workspace[r * n_cols + c] * text_data[element_offset(c, d, text.stride_row, text.stride_dim)];
        }
        grad_image[(chunk.start + r) * dim + d] = static_cast<float>(sum);
      }
    }
    for (index_t c = 0; c < n_cols; ++c) {
      for (index_t d = 0; d < dim; ++d) {
        double sum = 0.0;
        for (index_t r = 0; r < chunk.rows; ++r) {
          sum += workspace[r * n_cols + c] *
                 image_data[element_offset(chunk.start + r, d, image.stride_row, image.stride_dim)];
        }
        grad_text[c * dim + d] += static_cast<float>(sum);
      }
    }
  }
};

template <class Program>
void for_each_grad_block(const FeatureMatrix& image, const FeatureMatrix& text, index_t dim, const RowChunk& chunk,
                         float* workspace, Program&& program) {
  const FeatureMatrix rows = rows_of(image, chunk.start, chunk.rows);
  const index_t col_tiles = ceil_div(text.rows, kBlockCols);
  for (index_t block_row = 0; block_row < chunk.row_blocks; ++block_row) {
    for (index_t block_col = 0; block_col < col_tiles; ++block_col) {
      HostBlock block(rows, text, dim, workspace);
      program(block, block_row, block_col, chunk);
    }
  }
}

// Both losses' backward: G per chunk from program(block, row, col, chunk), the GEMMs, then both feature
// gradients times `undo`. Returns the chunk count.
template <class Program>
index_t host_backward(const FeatureMatrix& image, const FeatureMatrix& text, index_t dim, index_t workspace_bytes,
                      float undo, float* grad_image, float* grad_text, Program&& program) {
  auto run_blocks = [&](auto& ops, const RowChunk& chunk) {
    for_each_grad_block(image, text, dim, chunk, ops.workspace.data(), program);
  };
  std::memset(grad_text, 0, sizeof(float) * text.rows * dim);
  HostGradOps<decltype(run_blocks)> ops{image, text, dim, grad_image, grad_text, run_blocks, {}};
  const index_t chunks = run_grad_chunks(image.rows, text.rows, sizeof(float), workspace_bytes, ops).count;
  for (index_t i = 0; i < image.rows * dim; ++i) grad_image[i] *= undo;
  for (index_t i = 0; i < text.rows * dim; ++i) grad_text[i] *= undo;
  return chunks;
}

}  // namespace
}  // namespace fastclip

using fastclip::index_t;

extern "C" {

// Returns the number of row chunks the forward used.
index_t fastclip_host_clip_loss_fwd(const float* image, index_t image_stride_row, index_t image_stride_dim,
                                    const float* text, index_t text_stride_row, index_t text_stride_dim,
                                    index_t n_rows, index_t n_cols, index_t dim, float scale, float bias,
                                    int with_expectations, index_t workspace_bytes, index_t target_programs,
                                    float* row_lse, float* col_lse, float* row_expect, float* col_expect,
                                    index_t positive_offset, float* positive_logit) {
  using namespace fastclip;
  HostForwardOps ops{host_matrix(image, n_rows, image_stride_row, image_stride_dim),
                     host_matrix(text, n_cols, text_stride_row, text_stride_dim), dim, with_expectations != 0,
                     target_programs, {}, {}, {}};
  const ClipForwardProblem problem{n_rows, n_cols, with_expectations != 0, workspace_bytes, &scale, &bias,
                                   row_lse, col_lse, row_expect, col_expect, positive_offset, positive_logit};
  return run_clip_forward(problem, ops).count;
}

// G is stored fp32 here; `headroom` exercises the storage multiplier of the fp16 path. grad_scale gets
// sum_ij G_ij x_ij from the G program's per-tile partials. Returns the chunk count.
index_t fastclip_host_clip_loss_bwd(const float* image, index_t image_stride_row, index_t image_stride_dim,
                                    const float* text, index_t text_stride_row, index_t text_stride_dim,
                                    index_t n_rows, index_t n_cols, index_t dim, float scale, float bias,
                                    const float* row_lse, const float* col_lse, const float* row_coef,
                                    const float* col_coef, index_t positive_offset, float headroom,
                                    index_t workspace_bytes, float* grad_image, float* grad_text,
                                    float* grad_scale) {
  using namespace fastclip;
  float coef_norm = kMinCoefNorm;
  for (index_t i = 0; i < n_rows; ++i) coef_norm = larger(coef_norm, absolute(row_coef[i]));
  for (index_t j = 0; j < n_cols; ++j) coef_norm = larger(coef_norm, absolute(col_coef[j]));
  const index_t col_tiles = ceil_div(n_cols, kBlockCols);
  std::vector<float> scale_partials(ceil_div(n_rows, kBlockRows) * col_tiles, kNotWritten);
  const ClipGradArgs whole{&scale, &bias, &coef_norm, headroom, row_lse, col_lse, row_coef, col_coef,
                           n_rows, n_cols, positive_offset, n_cols, col_tiles, scale_partials.data()};
  const index_t chunks = host_backward(
      host_matrix(image, n_rows, image_stride_row, image_stride_dim),
      host_matrix(text, n_cols, text_stride_row, text_stride_dim), dim, workspace_bytes,
      grad_undo_factor(scale, coef_norm, headroom), grad_image, grad_text,
      [&](HostBlock& block, index_t row, index_t col, const RowChunk& chunk) {
        clip_grad_block(clip_grad_args_for_chunk(whole, chunk), block, row, col);
      });
  *grad_scale = sum_partials(scale_partials) * grad_scale_undo_factor(coef_norm, headroom);
  return chunks;
}

void fastclip_host_siglip_loss_fwd(const float* image, index_t image_stride_row, index_t image_stride_dim,
                                   const float* text, index_t text_stride_row, index_t text_stride_dim,
                                   index_t n_rows, index_t n_cols, index_t dim, float scale, float bias,
                                   index_t positive_offset, index_t target_programs, float* loss_sum) {
  using namespace fastclip;
  const FeatureMatrix image_matrix = host_matrix(image, n_rows, image_stride_row, image_stride_dim);
  const FeatureMatrix text_matrix = host_matrix(text, n_cols, text_stride_row, text_stride_dim);
  const index_t row_blocks = ceil_div(n_rows, kBlockRows);
  const SplitPlan splits = plan_column_splits(row_blocks, n_cols, target_programs);
  std::vector<float> partials(row_blocks * splits.count, 0.f);
  const SiglipForwardArgs args{&scale, &bias, n_rows, n_cols, positive_offset, splits.cols_per_split,
                               splits.count, partials.data()};
  for (index_t block_row = 0; block_row < row_blocks; ++block_row) {
    for (index_t split = 0; split < splits.count; ++split) {
      HostBlock block(image_matrix, text_matrix, dim, nullptr);
      siglip_forward_block(args, block, block_row, split);
    }
  }
  *loss_sum = sum_partials(partials);
}

index_t fastclip_host_siglip_loss_bwd(const float* image, index_t image_stride_row, index_t image_stride_dim,
                                      const float* text, index_t text_stride_row, index_t text_stride_dim,
                                      index_t n_rows, index_t n_cols, index_t dim, float scale, float bias,
                                      index_t positive_offset, float grad_coef, float headroom,
                                      index_t workspace_bytes, float* grad_image, float* grad_text,
                                      float* grad_bias) {
  using namespace fastclip;
  const index_t col_tiles = ceil_div(n_cols, kBlockCols);
  std::vector<float> bias_partials(ceil_div(n_rows, kBlockRows) * col_tiles, kNotWritten);
  const SiglipGradArgs whole{&scale, &bias, headroom, n_rows, n_cols, positive_offset, n_cols, col_tiles,
                             bias_partials.data()};
  const index_t chunks = host_backward(
      host_matrix(image, n_rows, image_stride_row, image_stride_dim),
      host_matrix(text, n_cols, text_stride_row, text_stride_dim), dim, workspace_bytes, grad_coef * scale / headroom,
      grad_image, grad_text, [&](HostBlock& block, index_t row, index_t col, const RowChunk& chunk) {
        siglip_grad_block(siglip_grad_args_for_chunk(whole, chunk), block, row, col);
      });
  *grad_bias = sum_partials(bias_partials) * grad_coef;
  return chunks;
}

// ---- The index arithmetic and path choices, for the tests ------------------------------------------
index_t fastclip_host_element_offset(index_t row, index_t col, index_t stride_row, index_t stride_col) {
  return fastclip::element_offset(row, col, stride_row, stride_col);
}

index_t fastclip_host_row_byte_offset(index_t start, index_t stride_row, int element_bytes) {
  return fastclip::row_byte_offset(start, stride_row, element_bytes);
}

// out: start, rows, row_blocks, first_block, chunk count.
void fastclip_host_row_chunk(index_t n_rows, index_t bytes_per_row_block, index_t workspace_bytes,
                             index_t max_row_blocks, index_t index, index_t* out) {
  const fastclip::ChunkPlan plan = fastclip::plan_row_chunks(n_rows, bytes_per_row_block, workspace_bytes, max_row_blocks);
  const fastclip::RowChunk chunk = fastclip::row_chunk(plan, index);
  out[0] = chunk.start;
  out[1] = chunk.rows;
  out[2] = chunk.row_blocks;
  out[3] = chunk.first_block;
  out[4] = plan.count;
}

int fastclip_host_choose_path(int arch, int dtype, int allow_tf32) {
  return static_cast<int>(fastclip::choose_path(arch, static_cast<fastclip::Dtype>(dtype), allow_tf32 != 0));
}

int fastclip_host_path_compiled(int arch, int path) {
  return fastclip::path_compiled(arch, static_cast<fastclip::TilePath>(path)) ? 1 : 0;
}

int fastclip_host_grad_in_fp32(int path) { return fastclip::grad_in_fp32(static_cast<fastclip::TilePath>(path)) ? 1 : 0; }

}  // extern "C"
