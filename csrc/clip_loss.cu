// CUDA kernels of the CLIP loss primitives (the signatures and semantics of fastclip/ops/clip_loss_torch.py):
//
//   clip_loss_fwd_kernel     one pass over S = scale * I @ T.T + bias -> row and column softmax partials
//   stats_merge_kernel       fixed-order merge of those partials into row_lse / col_lse (and E[log p])
//   clip_loss_grad_kernel    G = dL/dS for a chunk of rows, into the bounded workspace, and per-tile
//                            partials of sum_ij G_ij x_ij (the logit_scale gradient, log-softmax form)
//
// binding.cpp chains them (chunk_driver.h), runs the two backward GEMMs dI = s G T, dT = s G^T I on
// cuBLAS and sums the per-tile partials in a fixed order into d scale. The per-tile math is
// tile_programs.h's, shared with the host build the CPU tests drive; this file holds the kernel entry
// points and their launchers only.
#include "device_tile.cuh"
#include "launch.h"

namespace fastclip {
namespace {

// clip_loss_fwd_kernel: row and column softmax statistics from ONE computation of each S tile.
//   Math (S = scale * x + bias, x = I_i . T_j): for rows, online over the block's column tiles,
//   m_i = max_j S_ij, l_i = sum_j exp(S_ij - m_i), w_i = sum_j exp(S_ij - m_i) (S_ij - m_i) (w only
//   with kExpectations, in log form: tile_math.h); for columns, per 128-row block, c_j = max_i S_ij,
//   s_j = sum_i exp(S_ij - c_j), v_j = sum_i exp(S_ij - c_j) (S_ij - c_j). Natural units: S - max is
//   formed before any exponential.
//   Tiling: grid (row blocks of the chunk, column splits); block (b, s) owns rows [128 b, +128) and
//   the columns [s * cols_per_split, +cols_per_split), walked in 64-column tiles (device_tile.cuh:
//   WMMA fp16/bf16/TF32 or FMA, fp32 accumulate; D in 32-element slices).
//   Saved: row partials at [s][row] of (splits, rows) arrays, column partials at [b][col] of
//   (row blocks, n_cols) arrays, fp32; stats_merge_kernel reduces both in a fixed order (bitwise
//   repeatable). Nothing B x B is written.
template <TilePath P, bool kExpectations>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<P>)
    clip_loss_fwd_kernel(ClipForwardArgs args, FeatureMatrix image, FeatureMatrix text, index_t dim) {
  run_block_program<P>(image, text, dim, nullptr,
                       [&](auto& block) { clip_forward_block<kExpectations>(args, block, blockIdx.x, blockIdx.y); });
}

// stats_merge_kernel: lse = m + log l (and E[log p] = w / l - log l) from n_parts partials per index.
//   Math: m = max_k m_k, l = sum_k l_k exp(m_k - m), w likewise (merge_partials_at), the running state
//   of earlier row chunks merged first. Tiling: one thread per index, a sequential loop over the parts
//   (fixed order). Saved: lse / E[log p] when finalizing, else the merged running state.
__global__ void __launch_bounds__(kThreads) stats_merge_kernel(MergeArgs args) {
  const index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < args.length) merge_partials_at(args, i);
}

// clip_loss_grad_kernel: G for one 128 x 64 tile of a row chunk, and the tile's sum of G x.
//   Math: x = I_i . T_j (the tile product), S = scale * x + bias, P = exp(S - row_lse),
//   Q = exp(S - col_lse), positives j = i + positive_offset,
//   G_ij = row_coef_i (P_ij - [pos]) + col_coef_j (Q_ij - [pos]), stored times headroom / max|coef| in
//   the path's Grad type (the input dtype on tensor-core paths; fp32 on sm7x bf16 and fp32 inputs).
//   d scale = sum_ij G_ij x_ij is summed beside G from the same fp32 G values (before rounding to the
//   workspace dtype), in log-softmax form: (sum R log P + C log Q) / scale with G = R + C, equal over
//   whole rows and columns and free of sum G S's |S|-sized cancellation (tile_math.h); each thread
//   over its 32 elements of the tile, then the 256 thread sums by a fixed pairwise tree. Forming it
//   here, instead of sum_i I_i . dI_i / scale afterwards, keeps the digits that the GEMM outputs'
//   rounding and the division would cost. A block of a larger S gets its share of the whole sum.
//   Tiling: grid (column tiles, row blocks of the chunk), one S tile per block, D in 32-element slices.
//   Saved: nothing; G is a transient workspace of at most FASTCLIP_WORKSPACE_MB, consumed by the two
//   cuBLAS GEMMs before the next chunk. The tile's sum of G x (still times the multiplier) goes to
//   scale_partials[b * col_tiles + c], b counted over all rows, so the partials do not depend on the
//   chunking; the launcher sums them in fp64 in a fixed order and undoes the multiplier.
template <TilePath P>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<P>)
    clip_loss_grad_kernel(ClipGradArgs args, FeatureMatrix image, FeatureMatrix text, index_t dim, void* grad) {
  run_block_program<P>(image, text, dim, grad, [&](auto& block) { clip_grad_block(args, block, blockIdx.y, blockIdx.x); });
}

}  // namespace

cudaError_t launch_clip_forward(TilePath path, bool expectations, const ClipForwardArgs& args,
                                const FeatureMatrix& image_rows, const FeatureMatrix& text, index_t dim,
                                index_t row_blocks, index_t splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  return with_path(path, [&](auto tile_path) {
    constexpr TilePath kPath = decltype(tile_path)::value;
    if (expectations) {
      clip_loss_fwd_kernel<kPath, true><<<grid, kThreads, 0, stream>>>(args, image_rows, text, dim);
    } else {
      clip_loss_fwd_kernel<kPath, false><<<grid, kThreads, 0, stream>>>(args, image_rows, text, dim);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_stats_merge(const MergeArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(args.length, kThreads)));
  stats_merge_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_clip_grad(TilePath path, const ClipGradArgs& args, const FeatureMatrix& image_rows,
                             const FeatureMatrix& text, index_t dim, void* grad, index_t row_blocks,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n_cols, kBlockCols)), static_cast<unsigned>(row_blocks));
  return with_path(path, [&](auto tile_path) {
    constexpr TilePath kPath = decltype(tile_path)::value;
    clip_loss_grad_kernel<kPath><<<grid, kThreads, 0, stream>>>(args, image_rows, text, dim, grad);
    return cudaGetLastError();
  });
}

cudaError_t kernel_code_arch(int* arch) {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, stats_merge_kernel);
  if (status == cudaSuccess) *arch = attributes.ptxVersion * 10;
  return status;
}

#define FASTCLIP_STRINGIFY_LIST(...) #__VA_ARGS__
#define FASTCLIP_STRINGIFY(...) FASTCLIP_STRINGIFY_LIST(__VA_ARGS__)

const char* compiled_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
  return FASTCLIP_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

const char* compiled_ptx_arch() {
#if defined(FASTCLIP_PTX_ARCH)
  return FASTCLIP_STRINGIFY(FASTCLIP_PTX_ARCH);
#else
  return "";
#endif
}

}  // namespace fastclip
