// The torch side of the CUDA loss primitives: the ops `fastclip_cuda::*` (TORCH_LIBRARY), whose launchers
// allocate the outputs and workspaces, run the chunk drivers of chunk_driver.h over the kernels of
// clip_loss.cu / siglip_loss.cu, and run the backward GEMMs on cuBLAS (torch.mm, fp32 accumulation).
// fastclip/ops/clip_loss_cuda.py and siglip_loss_cuda.py wrap these ops as custom ops with fake kernels.
// The only file that includes torch headers; built into fastclip._C (setup.py, with a Python module
// init) or into libfastclip_cuda (CMakeLists.txt, for C++ users).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "chunk_driver.h"
#include "launch.h"

namespace fastclip {
namespace {

const char* const kRebuild = "FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e .";

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fastclip CUDA kernels: ", what, " failed: ", cudaGetErrorString(status));
}

// The arch the kernels run as on this device, once per device; a clear error when the build lacks it.
int code_arch(const at::Tensor& tensor) {
  static std::mutex mutex;
  static std::unordered_map<int, int> arch_of_device;
  const int device = tensor.get_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto found = arch_of_device.find(device);
  if (found != arch_of_device.end()) return found->second;
  int arch = 0;
  const cudaError_t status = kernel_code_arch(&arch);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the "no kernel image" error
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    TORCH_CHECK(false, "fastclip's CUDA extension has no kernels for this GPU (sm_", major, minor,
                "); it was built for ", compiled_arch_list(), ". Rebuild it for this GPU: TORCH_CUDA_ARCH_LIST=\"",
                major, ".", minor, "\" ", kRebuild);
  }
  arch_of_device.emplace(device, arch);
  return arch;
}

Dtype dtype_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "fastclip CUDA kernels take float32/float16/bfloat16 features, got ", tensor.scalar_type());
  }
  return Dtype::kFloat32;
}

void check_features(const at::Tensor& image, const at::Tensor& text) {
  TORCH_CHECK(image.is_cuda() && text.is_cuda(), "fastclip CUDA kernels take CUDA tensors");
  TORCH_CHECK(image.dim() == 2 && text.dim() == 2 && image.size(1) == text.size(1) && image.size(1) > 0,
              "image and text features must be (b, D) and (n, D) with D >= 1");
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), "image and text features must share one dtype");
  TORCH_CHECK(image.device() == text.device(), "image and text features must be on one device");
  dtype_of(image);
}

// The kernels read 16-byte vectors: inputs whose rows do not allow them (a stride along D, unaligned rows,
// or a D that is not a multiple of the vector) are repacked once into a contiguous copy with D padded
// by zeros to `padded_dim`. O(rows x D), next to the O(b n D) of the loss.
int64_t padded_dim(const at::Tensor& image) {
  const int64_t per_vector = 16 / image.element_size();
  return (image.size(1) + per_vector - 1) / per_vector * per_vector;
}

at::Tensor vector_loadable(const at::Tensor& features, int64_t dim) {
  if (dim == features.size(1) &&
      vector_loads_ok(features.data_ptr(), features.stride(0), features.stride(1), dim, features.element_size())) {
    return features;
  }
  at::Tensor packed = at::zeros({features.size(0), dim}, features.options());
  packed.narrow(1, 0, features.size(1)).copy_(features);
  return packed;
}

FeatureMatrix feature_matrix(const at::Tensor& features) {
  return FeatureMatrix{features.data_ptr(), features.size(0), features.stride(0), features.stride(1),
                       static_cast<int>(features.element_size())};
}

// Outputs and workspaces: uninitialised, or NaN when a test asks to see that every element is written.
at::Tensor allocate(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  return poison ? at::full(shape, std::numeric_limits<float>::quiet_NaN(), options) : at::empty(shape, options);
}

at::Tensor scalar_fp32(const at::Tensor& value, const at::Tensor& like) {
  return value.to(like.device(), at::kFloat).reshape({}).contiguous();
}

float* fp32_data(const at::Tensor& tensor) { return tensor.numel() ? tensor.data_ptr<float>() : nullptr; }

StatsBuffers stats_of(const at::Tensor& storage, int64_t per_stat, bool expectations) {
  float* base = storage.data_ptr<float>();
  return StatsBuffers{base, base + per_stat, expectations ? base + 2 * per_stat : nullptr};
}

int multiprocessors(const at::Tensor& tensor) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, tensor.get_device()),
             "reading the SM count");
  return count;
}

// out (= or +=) left @ right in fp32 with fp32 accumulation; 16-bit operands use cuBLAS with an fp32
// output (torch.mm out_dtype, torch >= 2.8) so no partial product is rounded to 16 bits.
void matmul_fp32(at::Tensor out, const at::Tensor& left, const at::Tensor& right, bool accumulate) {
  if (left.scalar_type() == at::kFloat) {
    if (accumulate) {
      out.addmm_(left, right);
    } else {
      at::mm_out(out, left, right);
    }
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (!accumulate) {
    at::mm_out(out, left, right, at::kFloat);
    return;
  }
  out.add_(at::mm(left, right, at::kFloat));
#else
  at::Tensor product = at::mm(left, right).to(at::kFloat);  // older torch: a 16-bit product, upcast
  if (accumulate) {
    out.add_(product);
  } else {
    out.copy_(product);
  }
#endif
}

// What every op starts from: checked features on their device, the tile path for this GPU, the
// vector-loadable operands, fp32 scale and bias on the device, and the current stream.
struct OpContext {
  c10::cuda::CUDAGuard guard;
  TilePath path;
  int64_t n_rows, n_cols, dim;
  at::Tensor image_operand, text_operand, scale, bias;
  FeatureMatrix image, text;
  at::TensorOptions fp32;
  cudaStream_t stream;

  OpContext(const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale_value,
            const at::Tensor& bias_value, bool allow_tf32)
      : guard((check_features(image_features, text_features), image_features.device())) {
    path = choose_path(code_arch(image_features), dtype_of(image_features), allow_tf32);
    n_rows = image_features.size(0);
    n_cols = text_features.size(0);
    dim = padded_dim(image_features);
    image_operand = vector_loadable(image_features, dim);
    text_operand = vector_loadable(text_features, dim);
    scale = scalar_fp32(scale_value, image_features);
    bias = scalar_fp32(bias_value, image_features);
    image = feature_matrix(image_operand);
    text = feature_matrix(text_operand);
    fp32 = image_features.options().dtype(at::kFloat);
    stream = c10::cuda::getCurrentCUDAStream().stream();
  }
  const float* scale_data() const { return scale.data_ptr<float>(); }
  const float* bias_data() const { return bias.data_ptr<float>(); }
};

// ---- CLIP forward -------------------------------------------------------------------------------------
struct DeviceForwardOps {
  FeatureMatrix image, text;
  int64_t dim;
  TilePath path;
  bool expectations;
  bool poison;
  at::TensorOptions fp32;
  cudaStream_t stream;
  int sm_count;
  at::Tensor col_storage, running_storage, row_storage;  // alive until the op returns (stream-ordered reuse)

  int64_t n_stats() const { return expectations ? 3 : 2; }
  StatsBuffers column_partials(index_t blocks, index_t n_cols) {
    col_storage = allocate({n_stats(), blocks, n_cols}, fp32, poison);
    return stats_of(col_storage, blocks * n_cols, expectations);
  }
  StatsBuffers running_state(index_t n_cols) {
    running_storage = allocate({n_stats(), n_cols}, fp32, poison);
    return stats_of(running_storage, n_cols, expectations);
  }
  SplitPlan column_splits(index_t row_blocks, index_t n_cols) const {
    return plan_column_splits(row_blocks, n_cols, 2 * sm_count);
  }
  StatsBuffers row_partials(index_t splits, index_t rows) {
    row_storage = allocate({n_stats(), splits, rows}, fp32, poison);
    return stats_of(row_storage, splits * rows, expectations);
  }
  void forward_blocks(const ClipForwardArgs& args, const RowChunk& chunk, const SplitPlan& splits) {
    check_cuda(launch_clip_forward(path, expectations, args, rows_of(image, chunk.start, chunk.rows), text, dim,
                                   chunk.row_blocks, splits.count, stream),
               "clip_loss_fwd_kernel");
  }
  void merge(const MergeArgs& args) { check_cuda(launch_stats_merge(args, stream), "stats_merge_kernel"); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_loss_fwd(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    bool with_expectations, int64_t positive_offset, bool allow_tf32, int64_t workspace_bytes, bool poison) {
  const OpContext op(image, text, scale, bias, allow_tf32);
  at::Tensor row_lse = allocate({op.n_rows}, op.fp32, poison), col_lse = allocate({op.n_cols}, op.fp32, poison);
  at::Tensor row_expect = allocate({with_expectations ? op.n_rows : 0}, op.fp32, poison);
  at::Tensor col_expect = allocate({with_expectations ? op.n_cols : 0}, op.fp32, poison);
  at::Tensor positive_logit = at::zeros({op.n_rows}, op.fp32);  // 0 where the positive is not in these columns
  DeviceForwardOps ops{op.image, op.text, op.dim, op.path, with_expectations, poison, op.fp32, op.stream,
                       multiprocessors(image), {}, {}, {}};
  const ClipForwardProblem problem{op.n_rows, op.n_cols, with_expectations, workspace_bytes, op.scale_data(),
                                   op.bias_data(), row_lse.data_ptr<float>(), col_lse.data_ptr<float>(),
                                   fp32_data(row_expect), fp32_data(col_expect), positive_offset,
                                   positive_logit.data_ptr<float>()};
  run_clip_forward(problem, ops);
  return {row_lse, col_lse, row_expect, col_expect, positive_logit};
}

// ---- Backward of both losses: G chunks, then two GEMMs -------------------------------------------------
// GradBlocks: void(const RowChunk&, void* workspace) launching the loss's G grid for the chunk.
template <class GradBlocks>
struct DeviceGradOps {
  at::Tensor image_gemm, text_gemm;  // GEMM operands: the inputs, or fp32 copies when G is fp32 and they are not
  at::ScalarType grad_dtype;
  bool poison;
  GradBlocks run_blocks;
  at::Tensor grad_image, grad_text, workspace;

  void allocate(const ChunkPlan& plan) {
    workspace = fastclip::allocate({plan.rows_per_chunk, text_gemm.size(0)}, image_gemm.options().dtype(grad_dtype),
                                   poison);
  }
  void grad_blocks(const RowChunk& chunk) { run_blocks(chunk, workspace.data_ptr()); }
  void feature_grads(const RowChunk& chunk) {
    const at::Tensor grad = workspace.narrow(0, 0, chunk.rows);
    matmul_fp32(grad_image.narrow(0, chunk.start, chunk.rows), grad, text_gemm, false);
    matmul_fp32(grad_text, grad.t(), image_gemm.narrow(0, chunk.start, chunk.rows), !chunk.first);
  }
};

template <class GradBlocks>
DeviceGradOps<GradBlocks> grad_ops(const at::Tensor& image, const at::Tensor& text, TilePath path, bool poison,
                                   GradBlocks run_blocks) {
  const bool fp32_grad = grad_in_fp32(path);
  const auto gemm_operand = [&](const at::Tensor& t) { return fp32_grad ? t.to(at::kFloat) : t; };
  const at::TensorOptions fp32 = image.options().dtype(at::kFloat);
  return DeviceGradOps<GradBlocks>{gemm_operand(image), gemm_operand(text),
                                   fp32_grad ? at::kFloat : image.scalar_type(), poison, run_blocks,
                                   fastclip::allocate({image.size(0), image.size(1)}, fp32, poison),
                                   fastclip::allocate({text.size(0), text.size(1)}, fp32, poison), {}};
}

float grad_headroom(const at::Tensor& image, TilePath path) {
  return !grad_in_fp32(path) && image.scalar_type() == at::kHalf ? kFp16Headroom : 1.f;
}

// Sum of per-tile partials in fp64, in torch's fixed order for a given length (bitwise repeatable), as fp32.
at::Tensor sum_partials(const at::Tensor& partials) { return partials.to(at::kDouble).sum().to(at::kFloat); }

// (grad_image, grad_text, grad_scale): grad_scale = sum_ij G_ij x_ij from the G kernel's per-tile partials.
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_bwd(const at::Tensor& image, const at::Tensor& text,
                                                             const at::Tensor& scale, const at::Tensor& bias,
                                                             const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                             const at::Tensor& row_coef, const at::Tensor& col_coef,
                                                             int64_t positive_offset, bool allow_tf32,
                                                             int64_t workspace_bytes, bool poison) {
  const OpContext op(image, text, scale, bias, allow_tf32);
  const auto fp32_vector = [&](const at::Tensor& t) { return t.to(image.device(), at::kFloat).contiguous(); };
  const at::Tensor row_lse_value = fp32_vector(row_lse), col_lse_value = fp32_vector(col_lse);
  const at::Tensor row_coef_value = fp32_vector(row_coef), col_coef_value = fp32_vector(col_coef);
  TORCH_CHECK(row_lse_value.numel() == op.n_rows && row_coef_value.numel() == op.n_rows &&
                  col_lse_value.numel() == op.n_cols && col_coef_value.numel() == op.n_cols,
              "row_lse/row_coef must have one value per image row, col_lse/col_coef one per text row");
  const at::Tensor coef_norm =
      at::maximum(row_coef_value.abs().amax(), col_coef_value.abs().amax()).clamp_min(kMinCoefNorm).contiguous();
  const float headroom = grad_headroom(image, op.path);
  const index_t col_tiles = ceil_div(op.n_cols, kBlockCols);
  at::Tensor scale_partials = allocate({ceil_div(op.n_rows, kBlockRows) * col_tiles}, op.fp32, poison);
  const ClipGradArgs whole{op.scale_data(), op.bias_data(), coef_norm.data_ptr<float>(), headroom,
                           row_lse_value.data_ptr<float>(), col_lse_value.data_ptr<float>(),
                           row_coef_value.data_ptr<float>(), col_coef_value.data_ptr<float>(),
                           op.n_rows, op.n_cols, positive_offset, op.n_cols, col_tiles,
                           scale_partials.data_ptr<float>()};
  auto run_blocks = [&](const RowChunk& chunk, void* workspace) {
    check_cuda(launch_clip_grad(op.path, clip_grad_args_for_chunk(whole, chunk), rows_of(op.image, chunk.start, chunk.rows),
                                op.text, op.dim, workspace, chunk.row_blocks, op.stream),
               "clip_loss_grad_kernel");
  };
  auto ops = grad_ops(image, text, op.path, poison, run_blocks);
  run_grad_chunks(op.n_rows, op.n_cols, c10::elementSize(ops.grad_dtype), workspace_bytes, ops);
  const at::Tensor undo = grad_undo_factor(op.scale, coef_norm, headroom);
  return {ops.grad_image.mul_(undo), ops.grad_text.mul_(undo),
          sum_partials(scale_partials) * grad_scale_undo_factor(coef_norm, headroom)};
}

// ---- SigLIP --------------------------------------------------------------------------------------------
at::Tensor siglip_loss_fwd(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                           const at::Tensor& bias, int64_t positive_offset, bool allow_tf32, bool poison) {
  const OpContext op(image, text, scale, bias, allow_tf32);
  const index_t row_blocks = ceil_div(op.n_rows, kBlockRows);
  const SplitPlan splits = plan_column_splits(row_blocks, op.n_cols, 2 * multiprocessors(image));
  at::Tensor partials = allocate({row_blocks * splits.count}, op.fp32, poison);
  const SiglipForwardArgs args{op.scale_data(), op.bias_data(), op.n_rows, op.n_cols, positive_offset,
                               splits.cols_per_split, splits.count, partials.data_ptr<float>()};
  check_cuda(launch_siglip_forward(op.path, args, op.image, op.text, op.dim, row_blocks, op.stream),
             "siglip_loss_fwd_kernel");
  return sum_partials(partials);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_loss_bwd(const at::Tensor& image, const at::Tensor& text,
                                                               const at::Tensor& scale, const at::Tensor& bias,
                                                               int64_t positive_offset, const at::Tensor& grad_coef,
                                                               bool allow_tf32, int64_t workspace_bytes, bool poison) {
  const OpContext op(image, text, scale, bias, allow_tf32);
  const at::Tensor coef = scalar_fp32(grad_coef, image);
  const float headroom = grad_headroom(image, op.path);
  const index_t col_tiles = ceil_div(op.n_cols, kBlockCols);
  at::Tensor bias_partials = allocate({ceil_div(op.n_rows, kBlockRows) * col_tiles}, op.fp32, poison);
  const SiglipGradArgs whole{op.scale_data(), op.bias_data(), headroom, op.n_rows, op.n_cols, positive_offset,
                             op.n_cols, col_tiles, bias_partials.data_ptr<float>()};
  auto run_blocks = [&](const RowChunk& chunk, void* workspace) {
    check_cuda(launch_siglip_grad(op.path, siglip_grad_args_for_chunk(whole, chunk),
                                  rows_of(op.image, chunk.start, chunk.rows), op.text, op.dim, workspace,
                                  chunk.row_blocks, op.stream),
               "siglip_loss_grad_kernel");
  };
  auto ops = grad_ops(image, text, op.path, poison, run_blocks);
  run_grad_chunks(op.n_rows, op.n_cols, c10::elementSize(ops.grad_dtype), workspace_bytes, ops);
  const at::Tensor undo = coef * op.scale / headroom;
  return {ops.grad_image.mul_(undo), ops.grad_text.mul_(undo), sum_partials(bias_partials) * coef};
}

// "archs=750,800,900;ptx=900;cuda=13.0;torch=2.14.1" for `fastclip info`.
std::string build_info() {
  return std::string("archs=") + compiled_arch_list() + ";ptx=" + compiled_ptx_arch() +
         ";cuda=" + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
         ";torch=" + TORCH_VERSION;
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY(fastclip_cuda, m) {
  m.def("clip_loss_fwd(Tensor image, Tensor text, Tensor scale, Tensor bias, bool with_expectations, "
        "int positive_offset, bool allow_tf32, int workspace_bytes, bool poison=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("clip_loss_bwd(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor row_lse, Tensor col_lse, "
        "Tensor row_coef, Tensor col_coef, int positive_offset, bool allow_tf32, int workspace_bytes, "
        "bool poison=False) -> (Tensor, Tensor, Tensor)");
  m.def("siglip_loss_fwd(Tensor image, Tensor text, Tensor scale, Tensor bias, int positive_offset, "
        "bool allow_tf32, bool poison=False) -> Tensor");
  m.def("siglip_loss_bwd(Tensor image, Tensor text, Tensor scale, Tensor bias, int positive_offset, "
        "Tensor grad_coef, bool allow_tf32, int workspace_bytes, bool poison=False) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &fastclip::build_info);
}

TORCH_LIBRARY_IMPL(fastclip_cuda, CUDA, m) {
  m.impl("clip_loss_fwd", &fastclip::clip_loss_fwd);
  m.impl("clip_loss_bwd", &fastclip::clip_loss_bwd);
  m.impl("siglip_loss_fwd", &fastclip::siglip_loss_fwd);
  m.impl("siglip_loss_bwd", &fastclip::siglip_loss_bwd);
}

#if defined(FASTCLIP_PYTHON_MODULE)
// `import fastclip._C` loads this library, which registers the ops above in torch.ops.fastclip_cuda.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastclip CUDA kernels (torch.ops.fastclip_cuda)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
