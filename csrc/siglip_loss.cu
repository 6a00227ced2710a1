// CUDA kernels of the SigLIP loss primitives (the signatures and semantics of fastclip/ops/siglip_loss_torch.py):
//
//   siglip_loss_fwd_kernel    sum_ij softplus(-y_ij S_ij) per block, S = scale * I @ T.T + bias
//   siglip_loss_grad_kernel   G = sigmoid(S) - [pos] for a chunk of rows, and per-tile sums of G
//
// binding.cpp sums the partials in a fixed order and runs the two backward GEMMs on cuBLAS, as for CLIP.
// The per-tile math is tile_programs.h's, shared with the host build the CPU tests drive.
#include "device_tile.cuh"
#include "launch.h"

namespace fastclip {
namespace {

// siglip_loss_fwd_kernel: partial sums of -log sigmoid(y S) = softplus(-y S), y = +1 on j = i + offset.
//   Math: softplus(z) = max(z, 0) + log1p(exp(-|z|)), exact for large |z| of either sign.
//   Tiling: grid (row blocks, column splits); block (b, s) walks its split's 64-column tiles, each
//   thread summing its elements; the block's total is a fixed-order reduction (warp butterfly, then
//   the 8 warp totals in order).
//   Saved: one fp32 partial per block at partials[b * splits + s], summed by the launcher.
template <TilePath P>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<P>)
    siglip_loss_fwd_kernel(SiglipForwardArgs args, FeatureMatrix image, FeatureMatrix text, index_t dim) {
  run_block_program<P>(image, text, dim, nullptr,
                       [&](auto& block) { siglip_forward_block(args, block, blockIdx.x, blockIdx.y); });
}

// siglip_loss_grad_kernel: G = d softplus(-y S) / dS for one 128 x 64 tile of a row chunk.
//   Math: negatives G = sigmoid(S); positives G = -sigmoid(-S) (never 1 - sigmoid(S), which cancels).
//   Stored times 2^8 for fp16 (sigmoid(-10) ~ 4.5e-5 stays out of fp16's subnormals), else as is.
//   Tiling: grid (column tiles, row blocks of the chunk), one S tile per block.
//   Saved: nothing; the tile's fp32 sum of G goes to bias_partials[b * col_tiles + c] for d logit_bias.
template <TilePath P>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<P>)
    siglip_loss_grad_kernel(SiglipGradArgs args, FeatureMatrix image, FeatureMatrix text, index_t dim, void* grad) {
  run_block_program<P>(image, text, dim, grad, [&](auto& block) { siglip_grad_block(args, block, blockIdx.y, blockIdx.x); });
}

}  // namespace

cudaError_t launch_siglip_forward(TilePath path, const SiglipForwardArgs& args, const FeatureMatrix& image,
                                  const FeatureMatrix& text, index_t dim, index_t row_blocks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(args.n_splits));
  return with_path(path, [&](auto tile_path) {
    constexpr TilePath kPath = decltype(tile_path)::value;
    siglip_loss_fwd_kernel<kPath><<<grid, kThreads, 0, stream>>>(args, image, text, dim);
    return cudaGetLastError();
  });
}

cudaError_t launch_siglip_grad(TilePath path, const SiglipGradArgs& args, const FeatureMatrix& image_rows,
                               const FeatureMatrix& text, index_t dim, void* grad, index_t row_blocks,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.col_tiles), static_cast<unsigned>(row_blocks));
  return with_path(path, [&](auto tile_path) {
    constexpr TilePath kPath = decltype(tile_path)::value;
    siglip_loss_grad_kernel<kPath><<<grid, kThreads, 0, stream>>>(args, image_rows, text, dim, grad);
    return cudaGetLastError();
  });
}

}  // namespace fastclip
