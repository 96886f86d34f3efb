// Tensors of torch's stable ABI (torch::stable::Tensor, the C shim underneath) as the op
// entry points use them: allocation, typed data pointers, names of dtypes, devices and
// shapes for error messages, and a dispatch over the floating dtypes. Host-only.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include "errors.h"

namespace trainops {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

namespace st {

inline int32_t shim_dtype(ScalarType dtype) {
  return torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
}

// An uninitialized contiguous tensor on (device_type, device_index), by the shim's
// empty_strided: one direct call, no boxed dispatch (this is on every op's path).
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, int32_t device_type,
                    int32_t device_index) {
  int64_t strides[8];
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  int64_t stride = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    const int64_t s = sizes.begin()[d];
    stride *= s > 1 ? s : 1;
  }
  AtenTensorHandle handle = nullptr;
  TRAINOPS_CHECK(aoti_torch_empty_strided(ndim, sizes.begin(), strides, shim_dtype(dtype), device_type, device_index,
                                          &handle) == AOTI_TORCH_SUCCESS,
                 "trainops: allocating a tensor failed");
  return Tensor(handle);
}

inline Tensor empty_cpu(std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return empty(sizes, dtype, aoti_torch_device_type_cpu(), 0);
}

// On the device of `like`.
inline Tensor empty_on(std::initializer_list<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  int32_t type = 0, index = 0;
  TRAINOPS_CHECK(aoti_torch_get_device_type(like.get(), &type) == AOTI_TORCH_SUCCESS &&
                     aoti_torch_get_device_index(like.get(), &index) == AOTI_TORCH_SUCCESS,
                 "trainops: reading a tensor's device failed");
  return empty(sizes, dtype, type, index);
}

template <typename T>
T* data(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
const T* cdata(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

inline std::string device_str(const Tensor& t) {
  const torch::stable::Device d = t.device();
  if (d.is_cpu()) return "cpu";
  if (d.is_cuda()) return "cuda:" + std::to_string(d.index());
  return "device type " + std::to_string(static_cast<int>(d.type())) + ":" + std::to_string(d.index());
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline std::string sizes_str(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

inline bool same_sizes(const Tensor& a, const Tensor& b, int64_t from_dim = 0) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = from_dim; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

inline int64_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char: return 1;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    default: TRAINOPS_CHECK(false, "trainops: element size of dtype ", t, " is not known here");
  }
  return 0;
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

}  // namespace st
}  // namespace trainops

// Runs the lambda __VA_ARGS__ with scalar_t the C++ type of dtype (float, double, Half,
// BFloat16); another dtype is a TypeError naming `what`.
#define TRAINOPS_DISPATCH_FLOATING(dtype, what, ...)                                               \
  switch (dtype) {                                                                                  \
    case ::trainops::ScalarType::Float: { using scalar_t = float; __VA_ARGS__(); break; }           \
    case ::trainops::ScalarType::Double: { using scalar_t = double; __VA_ARGS__(); break; }         \
    case ::trainops::ScalarType::Half: { using scalar_t = torch::headeronly::Half; __VA_ARGS__(); break; } \
    case ::trainops::ScalarType::BFloat16: {                                                        \
      using scalar_t = torch::headeronly::BFloat16;                                                 \
      __VA_ARGS__();                                                                                \
      break;                                                                                        \
    }                                                                                               \
    default: TRAINOPS_CHECK_TYPE(false, "trainops: ", what, " has unsupported dtype ", dtype);     \
  }
