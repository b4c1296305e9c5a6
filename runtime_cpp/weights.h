// Where the weights sit in memory on the CPU: each in its own buffer, its data starting at a
// different offset within a 4 KiB page.
//
// Why: TVM's reader (and its allocator, for the activations) puts every large tensor at the
// same page offset (64: glibc mmaps it, the 16-byte chunk header rounded up to the 64-byte
// alignment). Kernels that walk a weight and an activation with power-of-two strides then
// touch the same L1/L2 cache sets with both, and evict their own data: measured on Zen 4, 2
// threads, ResNet-50 fp32, the 1x1 stride-2 conv 1024->2048 @7x7 took 4.2 ms in the model and
// 1.1-1.9 ms with only its weight moved to another page offset (all else equal, alternating).
// The same rule is in pipeline/runtime/params.py (staggered_weights): the Python VM and this
// app place the weights alike, so they time and compute alike.
#ifndef ONNX2DEPLOY_WEIGHTS_H_
#define ONNX2DEPLOY_WEIGHTS_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace weight_memory {

namespace ffi = tvm::ffi;

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 64;  // TVM's kernels assume 64-byte aligned data

/*!
 * \brief Page offset (bytes) of weight `index`: a multiple of 64 in [128, 4096), never the 0 or
 * 64 of TVM's own tensors; successive weights 17 slots apart, so 62 in a row all differ.
 */
inline size_t page_offset(int64_t index) {
  return static_cast<size_t>(((index * 17) % 62 + 2) * kAlign);
}

/*! \brief Allocates one tensor's data at a given offset into page-aligned memory. */
struct OffsetAlloc {
  size_t offset;
  void* base = nullptr;

  void AllocData(DLTensor* tensor) {
    const size_t bytes = offset + ffi::GetDataSize(*tensor);
    base = std::aligned_alloc(kPage, (bytes + kPage - 1) / kPage * kPage);
    if (base == nullptr) throw std::bad_alloc();
    tensor->data = static_cast<char*>(base) + offset;
  }
  void FreeData(DLTensor*) { std::free(base); }
};

/*! \brief The float32 value of the IEEE half-precision bits `h` (exact: every half is a float). */
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {  // inf, nan (payload kept)
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // +-0
    bits = sign;
  } else {  // subnormal half: normalize (a normal float)
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

/*!
 * \brief A float32 CPU tensor of the float16 CPU tensor `narrow`: a weight the params file
 * stores as float16 (pipeline/runtime/params.py: "param_NNNN.widen") that main takes as float32.
 */
inline ffi::Tensor widened_float32(const ffi::Tensor& narrow) {
  const DLDataType f16{kDLFloat, 16, 1}, f32{kDLFloat, 32, 1};
  if (narrow.device().device_type != kDLCPU || narrow.dtype().code != f16.code ||
      narrow.dtype().bits != f16.bits || narrow.dtype().lanes != 1) {
    throw std::invalid_argument("widened_float32: not a float16 CPU tensor");
  }
  ffi::Tensor wide = ffi::Tensor::FromNDAlloc(OffsetAlloc{0}, narrow.shape(), f32, narrow.device());
  const auto* src = reinterpret_cast<const uint16_t*>(static_cast<const char*>(narrow.data_ptr()) + narrow.byte_offset());
  float* dst = static_cast<float*>(wide.data_ptr());
  const size_t n = ffi::GetDataSize(narrow) / sizeof(uint16_t);
  for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
  return wide;
}

/*! \brief A copy of the CPU tensor `host` at weight `index`'s page offset. */
inline ffi::Tensor staggered_copy(const ffi::Tensor& host, int64_t index) {
  if (host.device().device_type != kDLCPU) throw std::invalid_argument("staggered_copy: not a CPU tensor");
  ffi::Tensor placed = ffi::Tensor::FromNDAlloc(OffsetAlloc{page_offset(index)}, host.shape(), host.dtype(),
                                                host.device());
  std::memcpy(placed.data_ptr(), static_cast<const char*>(host.data_ptr()) + host.byte_offset(),
              ffi::GetDataSize(host));
  return placed;
}

}  // namespace weight_memory

#endif  // ONNX2DEPLOY_WEIGHTS_H_
