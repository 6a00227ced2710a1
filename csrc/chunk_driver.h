// The chunk loops of the primitives, written once for the device launcher (binding.cpp: kernel launches,
// torch tensors, cuBLAS GEMMs) and the host build (host_reference.cpp: loops over the same block programs).
// An Ops object supplies the buffers and runs one grid or one merge; everything else happens here.
#pragma once

#include "tile_programs.h"

namespace fastclip {

struct StatsBuffers {
  float* max;
  float* sum;
  float* weighted;  // null without expectations
};

struct ClipForwardProblem {
  index_t n_rows;
  index_t n_cols;
  bool expectations;
  index_t workspace_bytes;
  const float* scale;
  const float* bias;
  float* row_lse;     // (n_rows,)
  float* col_lse;     // (n_cols,)
  float* row_expect;  // (n_rows,) or null
  float* col_expect;  // (n_cols,) or null
  index_t positive_offset;  // positives j = i + positive_offset
  float* positive_logit;    // (n_rows,): S_i,i+offset from the tiles; untouched where not in the columns
};

// The column partials of one chunk take n_stats fp32 per (row block, column): the chunk holds the most
// row blocks whose partials fit the workspace.
FASTCLIP_HD ChunkPlan plan_forward_chunks(const ClipForwardProblem& p) {
  const index_t n_stats = p.expectations ? 3 : 2;
  return plan_row_chunks(p.n_rows, n_stats * static_cast<index_t>(sizeof(float)) * p.n_cols, p.workspace_bytes,
                         index_t(1) << 40);
}

// Ops: StatsBuffers column_partials(blocks, n_cols); StatsBuffers running_state(n_cols);
//      SplitPlan column_splits(row_blocks, n_cols); StatsBuffers row_partials(splits, rows);
//      void forward_blocks(const ClipForwardArgs&, const RowChunk&, const SplitPlan&); void merge(const MergeArgs&).
template <class Ops>
ChunkPlan run_clip_forward(const ClipForwardProblem& p, Ops& ops) {
  const ChunkPlan plan = plan_forward_chunks(p);
  const StatsBuffers col_parts = ops.column_partials(ceil_div(plan.rows_per_chunk, kBlockRows), p.n_cols);
  const StatsBuffers running = plan.count > 1 ? ops.running_state(p.n_cols) : StatsBuffers{nullptr, nullptr, nullptr};
  for_each_row_chunk(plan, [&](const RowChunk& chunk) {
    const SplitPlan splits = ops.column_splits(chunk.row_blocks, p.n_cols);
    const StatsBuffers row_parts = ops.row_partials(splits.count, chunk.rows);
    const ClipForwardArgs args{p.scale, p.bias, chunk.rows, p.n_cols, splits.cols_per_split,
                               row_parts.max, row_parts.sum, row_parts.weighted,
                               col_parts.max, col_parts.sum, col_parts.weighted,
                               p.positive_offset + chunk.start, p.positive_logit + chunk.start};
    ops.forward_blocks(args, chunk, splits);
    ops.merge(MergeArgs{row_parts.max, row_parts.sum, row_parts.weighted, splits.count, chunk.rows, chunk.rows,
                        nullptr, nullptr, nullptr, false, true, p.row_lse + chunk.start,
                        p.expectations ? p.row_expect + chunk.start : nullptr});
    ops.merge(MergeArgs{col_parts.max, col_parts.sum, col_parts.weighted, chunk.row_blocks, p.n_cols, p.n_cols,
                        running.max, running.sum, running.weighted, !chunk.first, chunk.last, p.col_lse,
                        p.expectations ? p.col_expect : nullptr});
  });
  return plan;
}

// Backward of either loss: per chunk of rows, one grid writes G into the workspace (at most
// workspace_bytes: kBlockRows * n_cols elements per row block), then the feature-gradient GEMMs
// consume it. Ops: void allocate(const ChunkPlan&); void grad_blocks(const RowChunk&);
// void feature_grads(const RowChunk&).
template <class Ops>
ChunkPlan run_grad_chunks(index_t n_rows, index_t n_cols, index_t grad_element_bytes, index_t workspace_bytes,
                          Ops& ops) {
  const ChunkPlan plan = plan_row_chunks(n_rows, kBlockRows * n_cols * grad_element_bytes, workspace_bytes, kMaxGridY);
  ops.allocate(plan);
  for_each_row_chunk(plan, [&](const RowChunk& chunk) {
    ops.grad_blocks(chunk);
    ops.feature_grads(chunk);
  });
  return plan;
}

}  // namespace fastclip
