// The kernel launchers of clip_loss.cu and siglip_loss.cu, called by binding.cpp: plain C++ with raw
// pointers and a stream, so the kernel files never include a torch header (each arch compiles fast).
// Every function returns the launch's cudaError_t (cudaSuccess when the grid was queued).
#pragma once

#include <cuda_runtime_api.h>

#include "tile_programs.h"

namespace fastclip {

// Grid (row_blocks, splits) of clip_forward_block over the chunk's image rows.
cudaError_t launch_clip_forward(TilePath path, bool expectations, const ClipForwardArgs& args,
                                const FeatureMatrix& image_rows, const FeatureMatrix& text, index_t dim,
                                index_t row_blocks, index_t splits, cudaStream_t stream);

// merge_partials_at for every index of args.length.
cudaError_t launch_stats_merge(const MergeArgs& args, cudaStream_t stream);

// Grid (column tiles, row_blocks) of clip_grad_block writing G (the path's Grad type) at `grad`.
cudaError_t launch_clip_grad(TilePath path, const ClipGradArgs& args, const FeatureMatrix& image_rows,
                             const FeatureMatrix& text, index_t dim, void* grad, index_t row_blocks, cudaStream_t stream);

cudaError_t launch_siglip_forward(TilePath path, const SiglipForwardArgs& args, const FeatureMatrix& image,
                                  const FeatureMatrix& text, index_t dim, index_t row_blocks, cudaStream_t stream);

cudaError_t launch_siglip_grad(TilePath path, const SiglipGradArgs& args, const FeatureMatrix& image_rows,
                               const FeatureMatrix& text, index_t dim, void* grad, index_t row_blocks,
                               cudaStream_t stream);

// The arch the kernels run as on the current device (their PTX arch x 10, e.g. 800 for an sm_80 cubin on
// an sm_86 GPU), or the error when this build has no kernel image for the device.
cudaError_t kernel_code_arch(int* arch);

// __CUDA_ARCH_LIST__ of the kernel build ("750,800,900"), and the PTX arch embedded for newer GPUs ("900", or "").
const char* compiled_arch_list();
const char* compiled_ptx_arch();

}  // namespace fastclip
