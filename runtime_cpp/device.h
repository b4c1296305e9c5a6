// Tensors on the CPU or a CUDA device through the TVM runtime's registered functions.
//
// Only tvm-ffi headers are used (the wheel's tvm/include is incomplete); allocation, copies
// and synchronization go through the global functions libtvm_runtime registers, so the same
// code serves every device whose runtime library is loaded.
#ifndef ONNX2DEPLOY_DEVICE_H_
#define ONNX2DEPLOY_DEVICE_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace device {

namespace ffi = tvm::ffi;

inline DLDevice make(DLDeviceType type, int id = 0) {
  DLDevice dev;
  dev.device_type = type;
  dev.device_id = id;
  return dev;
}

inline std::string name(DLDevice dev) {
  switch (dev.device_type) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
      return "cuda:" + std::to_string(dev.device_id);
    default:
      return "device" + std::to_string(static_cast<int>(dev.device_type)) + ":" +
             std::to_string(dev.device_id);
  }
}

/*! \brief Runtime functions looked up once: timed loops should not pay for name lookups. */
struct Api {
  ffi::Function alloc, copy_from_bytes, copy_to_bytes, stream_sync, device_attr;

  static const Api& get() {
    static const Api api = {
        ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope"),
        ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes"),
        ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes"),
        ffi::Function::GetGlobalRequired("runtime.Device_StreamSync"),
        ffi::Function::GetGlobalRequired("runtime.GetDeviceAttr"),
    };
    return api;
  }
};

/*! \brief Whether the runtime can see the device (its runtime library loaded, hardware present). */
inline bool exists(DLDevice dev) {
  // Device attribute 0 is kExist in TVM's DeviceAttrKind.
  const ffi::Any ret = Api::get().device_attr(static_cast<int>(dev.device_type), dev.device_id, 0);
  const auto value = ret.try_cast<int64_t>();
  return value.has_value() && *value != 0;
}

/*! \brief Uninitialized tensor on `dev`, allocated by that device's TVM DeviceAPI. */
inline ffi::Tensor empty(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice dev) {
  return Api::get()
      .alloc(ffi::Shape(shape), dtype, dev, ffi::Optional<ffi::String>())
      .cast<ffi::Tensor>();
}

inline size_t nbytes(const ffi::Tensor& t) { return ffi::GetDataSize(t); }

/*! \brief Host -> tensor; the runtime synchronizes before returning. */
inline void copy_from_host(const ffi::Tensor& dst, const void* src, size_t size) {
  if (size != nbytes(dst)) {
    throw std::invalid_argument("copy_from_host: " + std::to_string(size) + " bytes given, tensor holds " +
                                std::to_string(nbytes(dst)));
  }
  Api::get().copy_from_bytes(dst, const_cast<void*>(src), static_cast<int64_t>(size));
}

/*! \brief Tensor -> host; the runtime synchronizes before returning. */
inline void copy_to_host(const ffi::Tensor& src, void* dst, size_t size) {
  if (size != nbytes(src)) {
    throw std::invalid_argument("copy_to_host: buffer of " + std::to_string(size) + " bytes, tensor holds " +
                                std::to_string(nbytes(src)));
  }
  Api::get().copy_to_bytes(src, dst, static_cast<int64_t>(size));
}

/*! \brief Wait for all work queued on the device's current (default) stream. */
inline void sync(DLDevice dev) {
  // The registered signature takes the stream as an integer handle; 0 is the default stream.
  Api::get().stream_sync(dev, static_cast<int64_t>(0));
}

}  // namespace device

#endif  // ONNX2DEPLOY_DEVICE_H_
