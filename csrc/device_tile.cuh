// The device Block of the tile programs (tile_programs.h): 256 threads, the S-tile product on tensor cores
// (WMMA, fp32 accumulate) or exact fp32 FMA, in the shared memory layout described below. Included by
// clip_loss.cu and siglip_loss.cu only; no torch header.
//
// Tile product x = image[row0 : +128] . text[col0 : +64]^T, D walked in 32-element slices:
//   global -> registers (16-byte vectors; binding.cpp repacks inputs whose rows do not allow them)
//   -> shared memory (padded rows, one slice) -> tensor cores. The next slice's global loads are
//   issued before the current slice's MMAs, so their latency hides behind the math.
//   WMMA paths: 8 warps as 4 x 2, each 32 x 32 of the tile (2 x 2 fragments of 16 x 16); fp16/bf16 take
//   16-deep k steps (HMMA on sm70 and up), TF32 takes 8-deep steps (sm80+).
//   FMA paths: thread (tr, tc) of a 16 x 16 grid owns rows tr + 16i (i < 8) and columns tc + 16j (j < 4).
//   The fp32 result goes to a 128 x 68 tile that aliases the operand slices.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "tile_programs.h"

namespace fastclip {

template <TilePath P>
struct PathTraits;
template <>
struct PathTraits<TilePath::kHalfMma> {
  using Element = __half;
  using Grad = __half;
  static constexpr int kPad = 8;  // 40-half rows: 80 B, 16-byte aligned, conflict-light WMMA loads
};
template <>
struct PathTraits<TilePath::kBf16Mma> {
  using Element = __nv_bfloat16;
  using Grad = __nv_bfloat16;
  static constexpr int kPad = 8;
};
template <>
struct PathTraits<TilePath::kTf32Mma> {
  using Element = float;
  using Grad = float;
  static constexpr int kPad = 4;  // 36-float rows: fragment pointers stay 32-byte aligned
};
template <>
struct PathTraits<TilePath::kFloatFma> {
  using Element = float;
  using Grad = float;
  static constexpr int kPad = 1;  // 33-float rows: the 16 text rows a warp reads hit 16 different banks
};
template <>
struct PathTraits<TilePath::kBf16Fma> {
  using Element = __nv_bfloat16;
  using Grad = float;
  static constexpr int kPad = 2;
};

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <class T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

template <TilePath P>
struct SharedTiles {
  using Element = typename PathTraits<P>::Element;
  static constexpr int kLd = kSliceDim + PathTraits<P>::kPad;
  static constexpr int kOperandBytes = (kBlockRows + kBlockCols) * kLd * static_cast<int>(sizeof(Element));
  static constexpr int kTileBytes = kBlockRows * kTileLd * static_cast<int>(sizeof(float));
  static constexpr int kMainBytes = kOperandBytes > kTileBytes ? kOperandBytes : kTileBytes;
  static constexpr int kStatsBytes = kStatsScratch * static_cast<int>(sizeof(SoftmaxStats));
  static constexpr int kFloatBytes = kFloatScratch * static_cast<int>(sizeof(float));
  static constexpr int kScratchBytes = kStatsBytes > kFloatBytes ? kStatsBytes : kFloatBytes;
  alignas(128) unsigned char main[kMainBytes];  // operand slices, then the fp32 tile
  alignas(16) unsigned char scratch[kScratchBytes];
};

// Blocks per SM the kernels are compiled for (__launch_bounds__): two 256-thread blocks leave 128 registers
// a thread, enough for every path but TF32, whose fp32 slices and fragments would spill there.
template <TilePath P>
constexpr int kMinBlocksPerSm = P == TilePath::kTf32Mma ? 1 : 2;

constexpr int kImagePerThread = kBlockRows * kSliceDim / kThreads;  // 16 elements of a slice
constexpr int kTextPerThread = kBlockCols * kSliceDim / kThreads;   // 8

// One thread's part of a (rows x kSliceDim) slice at rows [row0, ...), columns [d0, d0 + kSliceDim), in
// 16-byte vectors (the launcher guarantees unit stride along D, 16-byte aligned rows, and a D that is a
// multiple of the vector, repacking the rare inputs that are not). Rows past the matrix and vectors past
// D load zeros.
template <class E, int kCount>
__device__ __forceinline__ void fetch_slice(const FeatureMatrix& m, index_t row0, index_t d0, index_t dim,
                                            E (&stage)[kCount]) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(E));
  constexpr int kVectorsPerRow = kSliceDim / kVector;
  const E* base = static_cast<const E*>(m.data);
  FASTCLIP_UNROLL
  for (int i = 0; i < kCount / kVector; ++i) {
    const int v = static_cast<int>(threadIdx.x) + i * kThreads;
    const index_t row = row0 + v / kVectorsPerRow;
    const index_t d = d0 + (v % kVectorsPerRow) * kVector;
    uint4 bits = make_uint4(0u, 0u, 0u, 0u);
    if (row < m.rows && d < dim) bits = *reinterpret_cast<const uint4*>(base + row * m.stride_row + d);
    *reinterpret_cast<uint4*>(&stage[i * kVector]) = bits;
  }
}

template <int kLd, class E, int kCount>
__device__ __forceinline__ void store_slice(const E (&stage)[kCount], E* shared) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(E));
  constexpr int kVectorsPerRow = kSliceDim / kVector;
  FASTCLIP_UNROLL
  for (int i = 0; i < kCount / kVector; ++i) {
    const int v = static_cast<int>(threadIdx.x) + i * kThreads;
    E* to = shared + (v / kVectorsPerRow) * kLd + (v % kVectorsPerRow) * kVector;
    if constexpr ((kLd * sizeof(E)) % 16 == 0) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(&stage[i * kVector]);
    } else {
      FASTCLIP_UNROLL
      for (int j = 0; j < kVector; ++j) to[j] = stage[i * kVector + j];
    }
  }
}

// ---- Tile products ------------------------------------------------------------------------------------
// WMMA: Operand is the fragments' element type (__half, __nv_bfloat16, or wmma::precision::tf32 for
// fp32 slices, whose elements are rounded to TF32 after each load); kStep is the fragment depth.
template <TilePath P, class Operand, int kStep>
struct WmmaProduct {
  using E = typename PathTraits<P>::Element;
  static constexpr int kLd = SharedTiles<P>::kLd;
  static constexpr bool kRoundToTf32 = std::is_same<E, float>::value;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kStep, float> acc[2][2];

  __device__ void clear() {
    FASTCLIP_UNROLL
    for (int i = 0; i < 2; ++i) {
      FASTCLIP_UNROLL
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
    }
  }

  __device__ void accumulate(const E* image, const E* text) {
    using namespace nvcuda;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int warp_row = (warp / 2) * 32;
    const int warp_col = (warp % 2) * 32;
    // TF32 k steps stay rolled: unrolled, their fp32 fragments would be loaded ahead and hold ~100 registers.
#pragma unroll(kRoundToTf32 ? 1 : kSliceDim / kStep)
    for (int k = 0; k < kSliceDim; k += kStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStep, Operand, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kStep, Operand, wmma::col_major> b[2];
      FASTCLIP_UNROLL
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], image + (warp_row + 16 * i) * kLd + k, kLd);
        wmma::load_matrix_sync(b[i], text + (warp_col + 16 * i) * kLd + k, kLd);
        if constexpr (kRoundToTf32) {
          round_to_tf32(a[i]);
          round_to_tf32(b[i]);
        }
      }
      FASTCLIP_UNROLL
      for (int i = 0; i < 2; ++i) {
        FASTCLIP_UNROLL
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  template <class Fragment>
  __device__ static void round_to_tf32(Fragment& fragment) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FASTCLIP_UNROLL
    for (int t = 0; t < fragment.num_elements; ++t) fragment.x[t] = nvcuda::wmma::__float_to_tf32(fragment.x[t]);
#endif
  }

  __device__ void store(float* tile) {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int warp_row = (warp / 2) * 32;
    const int warp_col = (warp % 2) * 32;
    FASTCLIP_UNROLL
    for (int i = 0; i < 2; ++i) {
      FASTCLIP_UNROLL
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(tile + (warp_row + 16 * i) * kTileLd + warp_col + 16 * j, acc[i][j], kTileLd,
                                        nvcuda::wmma::mem_row_major);
      }
    }
  }
};

// Exact fp32 FMA of (converted) operands: fp32 inputs under FASTCLIP_FP32_PRECISION=ieee or below sm80,
// bf16 inputs below sm80 (a bf16 x bf16 product is exact in fp32).
template <TilePath P>
struct FmaProduct {
  using E = typename PathTraits<P>::Element;
  static constexpr int kLd = SharedTiles<P>::kLd;
  float acc[8][4];

  __device__ void clear() {
    FASTCLIP_UNROLL
    for (int i = 0; i < 8; ++i) {
      FASTCLIP_UNROLL
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
  }

  __device__ void accumulate(const E* image, const E* text) {
    const int tr = static_cast<int>(threadIdx.x) / 16;
    const int tc = static_cast<int>(threadIdx.x) % 16;
    FASTCLIP_UNROLL
    for (int k = 0; k < kSliceDim; ++k) {
      float a[8];
      float b[4];
      FASTCLIP_UNROLL
      for (int i = 0; i < 8; ++i) a[i] = to_float(image[(tr + 16 * i) * kLd + k]);
      FASTCLIP_UNROLL
      for (int j = 0; j < 4; ++j) b[j] = to_float(text[(tc + 16 * j) * kLd + k]);
      FASTCLIP_UNROLL
      for (int i = 0; i < 8; ++i) {
        FASTCLIP_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ void store(float* tile) {
    const int tr = static_cast<int>(threadIdx.x) / 16;
    const int tc = static_cast<int>(threadIdx.x) % 16;
    FASTCLIP_UNROLL
    for (int i = 0; i < 8; ++i) {
      FASTCLIP_UNROLL
      for (int j = 0; j < 4; ++j) tile[(tr + 16 * i) * kTileLd + tc + 16 * j] = acc[i][j];
    }
  }
};

// The product of each path. bf16 and TF32 fragments exist only in sm80+ device passes; elsewhere those
// paths get no product (their kernels trap, see path_compiled) and an FMA stand-in keeps the code parsing.
template <TilePath P>
struct TileProductOf {
  using type = FmaProduct<P>;
};
template <>
struct TileProductOf<TilePath::kHalfMma> {
  using type = WmmaProduct<TilePath::kHalfMma, __half, 16>;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
struct TileProductOf<TilePath::kBf16Mma> {
  using type = WmmaProduct<TilePath::kBf16Mma, __nv_bfloat16, 16>;
};
template <>
struct TileProductOf<TilePath::kTf32Mma> {
  using type = WmmaProduct<TilePath::kTf32Mma, nvcuda::wmma::precision::tf32, 8>;
};
#endif
template <TilePath P>
using TileProduct = typename TileProductOf<P>::type;

// ---- The Block --------------------------------------------------------------------------------------
template <TilePath P>
class DeviceBlock {
 public:
  using E = typename PathTraits<P>::Element;
  using Grad = typename PathTraits<P>::Grad;
  static constexpr int kLd = SharedTiles<P>::kLd;

  __device__ DeviceBlock(SharedTiles<P>& shared, const FeatureMatrix& image, const FeatureMatrix& text, index_t dim,
                         void* grad)
      : shared_(shared), image_(image), text_(text), dim_(dim), grad_(static_cast<Grad*>(grad)) {}

  __device__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ int threads() const { return kThreads; }
  __device__ void sync() { __syncthreads(); }
  __device__ const float* tile() const { return reinterpret_cast<const float*>(shared_.main); }
  __device__ SoftmaxStats* stats_scratch() { return reinterpret_cast<SoftmaxStats*>(shared_.scratch); }
  __device__ float* float_scratch() { return reinterpret_cast<float*>(shared_.scratch); }
  __device__ void store_grad(index_t offset, float value) { grad_[offset] = from_float<Grad>(value); }

  __device__ void multiply_tile(index_t row0, index_t col0) {
    E* image_slice = reinterpret_cast<E*>(shared_.main);
    E* text_slice = image_slice + kBlockRows * kLd;
    alignas(16) E image_stage[kImagePerThread];
    alignas(16) E text_stage[kTextPerThread];
    TileProduct<P> product;
    product.clear();
    fetch_slice(image_, row0, 0, dim_, image_stage);
    fetch_slice(text_, col0, 0, dim_, text_stage);
    for (index_t d0 = 0; d0 < dim_; d0 += kSliceDim) {
      __syncthreads();  // the previous slice (or the previous tile's epilogue) is done with shared memory
      store_slice<kLd>(image_stage, image_slice);
      store_slice<kLd>(text_stage, text_slice);
      __syncthreads();
      if (d0 + kSliceDim < dim_) {
        fetch_slice(image_, row0, d0 + kSliceDim, dim_, image_stage);
        fetch_slice(text_, col0, d0 + kSliceDim, dim_, text_stage);
      }
      product.accumulate(image_slice, text_slice);
    }
    __syncthreads();  // every warp is done reading the operands the tile overwrites
    product.store(reinterpret_cast<float*>(shared_.main));
    __syncthreads();
  }

 private:
  SharedTiles<P>& shared_;
  FeatureMatrix image_, text_;
  index_t dim_;
  Grad* grad_;
};

// Runs program(block) for the calling thread block with path P's tile product, or traps where this device
// pass lacks P (the launcher never picks such a path: it chooses on the kernels' own arch).
template <TilePath P, class Program>
__device__ __forceinline__ void run_block_program(const FeatureMatrix& image, const FeatureMatrix& text, index_t dim,
                                                  void* grad, Program&& program) {
  if constexpr (path_compiled(FASTCLIP_CODE_ARCH, P)) {
    __shared__ SharedTiles<P> shared;
    DeviceBlock<P> block(shared, image, text, dim, grad);
    program(block);
  } else {
    __trap();
  }
}

// Calls fn(std::integral_constant<TilePath, P>) for the runtime path: one switch for every launcher.
template <class Fn>
cudaError_t with_path(TilePath path, Fn&& fn) {
  switch (path) {
    case TilePath::kHalfMma: return fn(std::integral_constant<TilePath, TilePath::kHalfMma>{});
    case TilePath::kBf16Mma: return fn(std::integral_constant<TilePath, TilePath::kBf16Mma>{});
    case TilePath::kTf32Mma: return fn(std::integral_constant<TilePath, TilePath::kTf32Mma>{});
    case TilePath::kFloatFma: return fn(std::integral_constant<TilePath, TilePath::kFloatFma>{});
    case TilePath::kBf16Fma: return fn(std::integral_constant<TilePath, TilePath::kBf16Fma>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastclip
