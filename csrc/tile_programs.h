// What one thread block does with its tiles of S = scale * image @ text.T + bias, written once for the
// device kernels (a DeviceBlock of device_tile.cuh: 256 threads, WMMA or FMA tile products) and for the
// host build (a HostBlock of host_reference.cpp: one "thread" that walks every item, fp32 dot loops).
//
// A Block provides:
//   int thread(), threads()                  this thread and the block size (host: 0 and 1)
//   void sync()                              barrier (host: nothing)
//   void multiply_tile(row0, col0)           x = image[row0 : +kBlockRows] . text[col0 : +kBlockCols]^T into
//                                            tile() (fp32, pitch kTileLd), zeros outside the matrices;
//                                            starts and ends with a barrier
//   SoftmaxStats* stats_scratch(), float* float_scratch()   block-shared scratch (kStatsScratch / kFloatScratch)
//   void store_grad(offset, value)           G workspace store, converting to its dtype
// Items (a row segment, a column segment, an element) are dealt to threads as item = thread + k * threads,
// so the host build runs every item of the same code in order. Sums over a tile go through kThreads
// "lanes" (lane = thread on the device) and a fixed pairwise tree (tree_sum): the host build adds in
// exactly the device's order.
#pragma once

#include "tile_math.h"

namespace fastclip {

// One (rows x D) feature matrix in global memory, any strides (in elements).
struct FeatureMatrix {
  const void* data;
  index_t rows;
  index_t stride_row;
  index_t stride_dim;
  int element_bytes;
};

FASTCLIP_HD index_t row_byte_offset(index_t start, index_t stride_row, int element_bytes) {
  return start * stride_row * static_cast<index_t>(element_bytes);
}

// The rows [start, start + rows) of m (a chunk of image rows).
FASTCLIP_HD FeatureMatrix rows_of(const FeatureMatrix& m, index_t start, index_t rows) {
  FeatureMatrix part = m;
  part.data = static_cast<const char*>(m.data) + row_byte_offset(start, m.stride_row, m.element_bytes);
  part.rows = rows;
  return part;
}

// The device kernels load 16-byte vectors: unit stride along D, 16-byte aligned rows, D a multiple of the vector.
FASTCLIP_HD bool vector_loads_ok(const void* data, index_t stride_row, index_t stride_dim, index_t dim,
                                 int element_bytes) {
  const index_t bytes_per_vector = 16;
  return stride_dim == 1 && (stride_row * element_bytes) % bytes_per_vector == 0 &&
         (dim * element_bytes) % bytes_per_vector == 0 &&
         reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(bytes_per_vector) == 0;
}

// Sum of lanes[0 : kThreads) by a fixed pairwise tree; every thread of the block must call it.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block>
FASTCLIP_HD float tree_sum(Block& block, float* lanes) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    block.sync();
    for (int lane = block.thread(); lane < stride; lane += block.threads()) lanes[lane] += lanes[lane + stride];
  }
  block.sync();
  return lanes[0];
}

// A tile's first row and column, and how many of its rows / columns are inside the matrix.
struct TileSpan {
  index_t row0;
  index_t col0;
  int valid_rows;
  int valid_cols;
};

FASTCLIP_HD TileSpan tile_span(index_t row0, index_t col0, index_t row_end, index_t col_end) {
  return TileSpan{row0, col0, static_cast<int>(min_index(kBlockRows, row_end - row0)),
                  static_cast<int>(min_index(kBlockCols, col_end - col0))};
}

// element(r, c) for the valid elements of items first, first + step, ... of a tile, row-major (so a warp
// reads consecutive columns of the fp32 tile and writes consecutive columns of G).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Element>
FASTCLIP_HD void for_tile_elements(const TileSpan& span, int first, int step, Element&& element) {
  FASTCLIP_NO_UNROLL
  for (int item = first; item < kBlockRows * kBlockCols; item += step) {
    const int r = item / kBlockCols;
    const int c = item % kBlockCols;
    if (r < span.valid_rows && c < span.valid_cols) element(r, c);
  }
}

// ---- CLIP forward --------------------------------------------------------------------------------
struct ClipForwardArgs {
  const float* scale;  // 0-dim fp32
  const float* bias;
  index_t n_rows;  // rows of this chunk
  index_t n_cols;
  index_t cols_per_split;
  float* row_max;  // [split][row] row partials (pitch n_rows)
  float* row_sum;
  float* row_weighted;  // null without expectations
  float* col_max;  // [row block][col] column partials (pitch n_cols)
  float* col_sum;
  float* col_weighted;
};

// Row and column softmax partials of the block's rows against its split of the columns, from ONE
// product per tile. Rows: each of the 2 segments of a tile row gives a partial, merged in order into
// the row's running state (stats_scratch). Columns: the 4 segments of a tile column are merged in order
// and stored as this row block's partial of the column.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <bool kExpectations, class Block>
FASTCLIP_HD void clip_forward_block(const ClipForwardArgs& a, Block& block, index_t block_row, index_t split) {
  const float scale = *a.scale;
  const float bias = *a.bias;
  const index_t row0 = block_row * kBlockRows;
  const index_t col_begin = split * a.cols_per_split;
  const index_t col_end = min_index(col_begin + a.cols_per_split, a.n_cols);
  const int valid_rows = tile_span(row0, col_begin, a.n_rows, col_end).valid_rows;
  SoftmaxStats* row_state = block.stats_scratch();
  SoftmaxStats* row_parts = row_state + kBlockRows;
  SoftmaxStats* col_parts = row_parts + kRowSegments * kBlockRows;
  for (int r = block.thread(); r < kBlockRows; r += block.threads()) row_state[r] = empty_stats();
  for (index_t col0 = col_begin; col0 < col_end; col0 += kBlockCols) {
    const int valid_cols = tile_span(row0, col0, a.n_rows, col_end).valid_cols;
    block.multiply_tile(row0, col0);
    const float* tile = block.tile();
    for (int item = block.thread(); item < kRowSegments * kBlockRows; item += block.threads()) {
      const int r = item % kBlockRows;
      const int segment = item / kBlockRows;
      row_parts[item] = segment_stats<kExpectations>(tile + r * kTileLd + segment * kSegment, 1, r,
                                                     valid_cols - segment * kSegment, scale, bias);
    }
    for (int item = block.thread(); item < kColSegments * kBlockCols; item += block.threads()) {
      const int c = item % kBlockCols;
      const int segment = item / kBlockCols;
      col_parts[item] = segment_stats<kExpectations>(tile + segment * kSegment * kTileLd + c, kTileLd, 0,
                                                     valid_rows - segment * kSegment, scale, bias);
    }
    block.sync();
    for (int r = block.thread(); r < valid_rows; r += block.threads()) {
      for (int segment = 0; segment < kRowSegments; ++segment) merge_into(row_state[r], row_parts[segment * kBlockRows + r]);
    }
    for (int c = block.thread(); c < valid_cols; c += block.threads()) {
      SoftmaxStats column = col_parts[c];
      for (int segment = 1; segment < kColSegments; ++segment) merge_into(column, col_parts[segment * kBlockCols + c]);
      const index_t at = block_row * a.n_cols + col0 + c;
      a.col_max[at] = column.max;
      a.col_sum[at] = column.sum;
      if (kExpectations) a.col_weighted[at] = column.weighted;
    }
    block.sync();  // the tile and the partials are reused by the next column tile
  }
  for (int r = block.thread(); r < valid_rows; r += block.threads()) {
    const index_t at = split * a.n_rows + row0 + r;
    a.row_max[at] = row_state[r].max;
    a.row_sum[at] = row_state[r].sum;
    if (kExpectations) a.row_weighted[at] = row_state[r].weighted;
  }
}

// ---- CLIP backward: G of one tile and its sum of G x (d loss / d scale) ------------------------------
struct ClipGradArgs {
  const float* scale;
  const float* bias;
  const float* coef_norm;   // 0-dim: max |coef| (>= kMinCoefNorm); G is stored times headroom / coef_norm
  float headroom;           // kFp16Headroom for an fp16 workspace, else 1
  const float* row_lse;     // of this chunk's rows
  const float* col_lse;
  const float* row_coef;
  const float* col_coef;
  index_t n_rows;           // rows of this chunk
  index_t n_cols;
  index_t positive_offset;  // positives j = i + positive_offset, i counted from the chunk's first row
  index_t grad_stride;      // row pitch of the G workspace
  index_t col_tiles;        // ceil(n_cols / kBlockCols): the pitch of scale_partials
  float* scale_partials;    // [row block][column tile]: sum of G_ij x_ij over the tile, G times its multiplier
};

// The chunk's view of arguments written for the whole row range (chunks start on row-block boundaries,
// so a tile's partial lands at the same place whatever the chunking).
FASTCLIP_HD ClipGradArgs clip_grad_args_for_chunk(ClipGradArgs whole, const RowChunk& chunk) {
  whole.row_lse += chunk.start;
  whole.row_coef += chunk.start;
  whole.n_rows = chunk.rows;
  whole.positive_offset += chunk.start;
  whole.scale_partials += chunk.first_block * whole.col_tiles;
  return whole;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block>
FASTCLIP_HD void clip_grad_block(const ClipGradArgs& a, Block& block, index_t block_row, index_t block_col) {
  const float scale = *a.scale;
  const float bias = *a.bias;
  const float multiplier = grad_storage_multiplier(*a.coef_norm, a.headroom);
  const TileSpan span = tile_span(block_row * kBlockRows, block_col * kBlockCols, a.n_rows, a.n_cols);
  float* row_lse = block.float_scratch();
  float* row_coef = row_lse + kBlockRows;
  float* col_lse = row_coef + kBlockRows;
  float* col_coef = col_lse + kBlockCols;
  for (int r = block.thread(); r < kBlockRows; r += block.threads()) {
    row_lse[r] = r < span.valid_rows ? a.row_lse[span.row0 + r] : 0.f;
    row_coef[r] = r < span.valid_rows ? a.row_coef[span.row0 + r] * multiplier : 0.f;
  }
  for (int c = block.thread(); c < kBlockCols; c += block.threads()) {
    col_lse[c] = c < span.valid_cols ? a.col_lse[span.col0 + c] : 0.f;
    col_coef[c] = c < span.valid_cols ? a.col_coef[span.col0 + c] * multiplier : 0.f;
  }
  float* lanes = col_coef + kBlockCols;  // lane l: sum of G x over the tile elements l, l + kThreads, ...
  block.multiply_tile(span.row0, span.col0);  // its barriers also publish the vectors above
  const float* tile = block.tile();
  for (int lane = block.thread(); lane < kThreads; lane += block.threads()) {
    float total = 0.f;
    for_tile_elements(span, lane, kThreads, [&](int r, int c) {
      const float product = tile[r * kTileLd + c];  // x_ij, the logit before scale and bias
      const bool positive = is_positive(span.row0 + r, span.col0 + c, a.positive_offset);
      float scale_term;
      const float grad = clip_grad_value(scale * product + bias, row_lse[r], col_lse[c], row_coef[r], col_coef[c],
                                         positive, scale_term);
      total += scale_term;  // scale * G x in log form, from the fp32 G before it is rounded to the workspace dtype
      block.store_grad(element_offset(span.row0 + r, span.col0 + c, a.grad_stride, 1), grad);
    });
    lanes[lane] = total;
  }
  const float tile_total = tree_sum(block, lanes);  // scale * sum G x over the tile (log form)
  if (block.thread() == 0) a.scale_partials[block_row * a.col_tiles + block_col] = tile_total / scale;
}

// ---- SigLIP forward -----------------------------------------------------------------------------------
struct SiglipForwardArgs {
  const float* scale;
  const float* bias;
  index_t n_rows;
  index_t n_cols;
  index_t positive_offset;
  index_t cols_per_split;
  index_t n_splits;
  float* partials;  // [row block][split]
};

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block>
FASTCLIP_HD void siglip_forward_block(const SiglipForwardArgs& a, Block& block, index_t block_row, index_t split) {
  const float scale = *a.scale;
  const float bias = *a.bias;
  const index_t col_begin = split * a.cols_per_split;
  const index_t col_end = min_index(col_begin + a.cols_per_split, a.n_cols);
  float* lanes = block.float_scratch();  // lane l sums the tile elements l, l + kThreads, ... of every tile
  for (int lane = block.thread(); lane < kThreads; lane += block.threads()) lanes[lane] = 0.f;
  for (index_t col0 = col_begin; col0 < col_end; col0 += kBlockCols) {
    const TileSpan span = tile_span(block_row * kBlockRows, col0, a.n_rows, col_end);
    block.multiply_tile(span.row0, span.col0);
    const float* tile = block.tile();
    for (int lane = block.thread(); lane < kThreads; lane += block.threads()) {
      float total = lanes[lane];
      for_tile_elements(span, lane, kThreads, [&](int r, int c) {
        const float logit = scale * tile[r * kTileLd + c] + bias;
        total += siglip_loss_term(logit, is_positive(span.row0 + r, span.col0 + c, a.positive_offset));
      });
      lanes[lane] = total;
    }
  }
  const float block_total = tree_sum(block, lanes);
  if (block.thread() == 0) a.partials[block_row * a.n_splits + split] = block_total;
}

// ---- SigLIP backward: G of one tile and its sum ---------------------------------------------------------
struct SiglipGradArgs {
  const float* scale;
  const float* bias;
  float multiplier;  // storage multiplier of G (2^8 for fp16, else 1)
  index_t n_rows;    // rows of this chunk
  index_t n_cols;
  index_t positive_offset;  // counted from the chunk's first row
  index_t grad_stride;
  index_t col_tiles;
  float* bias_partials;  // [row block][column tile], from the chunk's first row block
};

FASTCLIP_HD SiglipGradArgs siglip_grad_args_for_chunk(SiglipGradArgs whole, const RowChunk& chunk) {
  whole.n_rows = chunk.rows;
  whole.positive_offset += chunk.start;
  whole.bias_partials += chunk.first_block * whole.col_tiles;
  return whole;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block>
FASTCLIP_HD void siglip_grad_block(const SiglipGradArgs& a, Block& block, index_t block_row, index_t block_col) {
  const float scale = *a.scale;
  const float bias = *a.bias;
  const TileSpan span = tile_span(block_row * kBlockRows, block_col * kBlockCols, a.n_rows, a.n_cols);
  block.multiply_tile(span.row0, span.col0);
  const float* tile = block.tile();
  float* lanes = block.float_scratch();
  for (int lane = block.thread(); lane < kThreads; lane += block.threads()) {
    float total = 0.f;
    for_tile_elements(span, lane, kThreads, [&](int r, int c) {
      const float logit = scale * tile[r * kTileLd + c] + bias;
      const float grad = siglip_grad_value(logit, is_positive(span.row0 + r, span.col0 + c, a.positive_offset));
      total += grad;
      block.store_grad(element_offset(span.row0 + r, span.col0 + c, a.grad_stride, 1), grad * a.multiplier);
    });
    lanes[lane] = total;
  }
  const float block_total = tree_sum(block, lanes);
  if (block.thread() == 0) a.bias_partials[block_row * a.col_tiles + block_col] = block_total;
}

}  // namespace fastclip
