// TRAINOPS_BOX(fn): the boxed form of an op entry point for STABLE_TORCH_LIBRARY_IMPL, as
// torch's TORCH_BOX, except that `str` arguments (std::string_view parameters) are read
// straight from the string handle torch passes and the handle is freed. (TORCH_BOX's
// conversion of a string argument, torch/csrc/stable/stableivalue_conversions.h of torch
// 2.10-2.13, copies it into a heap std::string that is never freed: a leak on every call.)
#pragma once

#include <torch/csrc/stable/library.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "errors.h"

namespace trainops {
namespace boxing {

template <typename T>
struct Unbox {
  using type = T;
  static T get(StableIValue v) { return torch::stable::detail::to<T>(v); }
};

template <>
struct Unbox<std::string_view> {
  using type = std::string;
  static std::string get(StableIValue v) {
    auto handle = torch::stable::detail::to<StringHandle>(v);
    size_t length = 0;
    const char* chars = nullptr;
    const bool ok = torch_string_length(handle, &length) == AOTI_TORCH_SUCCESS &&
                    torch_string_c_str(handle, &chars) == AOTI_TORCH_SUCCESS;
    std::string out = ok ? std::string(chars, length) : std::string();
    torch_delete_string(handle);
    TRAINOPS_CHECK(ok, "trainops: reading a str argument failed");
    return out;
  }
};

template <typename T>
using plain_t = std::remove_cv_t<std::remove_reference_t<T>>;

template <typename R, typename... Args>
struct Signature {};

template <typename F>
struct Traits;
template <typename R, typename... Args>
struct Traits<R(Args...)> {
  using ret = R;
  static constexpr size_t n_args = sizeof...(Args);
};

template <typename T>
struct Returns {
  static constexpr uint64_t count = 1;
  static void put(StableIValue* stack, T value) { stack[0] = torch::stable::detail::from(std::move(value)); }
};
template <>
struct Returns<void> {
  static constexpr uint64_t count = 0;
};
template <typename... T>
struct Returns<std::tuple<T...>> {
  static constexpr uint64_t count = sizeof...(T);
  static void put(StableIValue* stack, std::tuple<T...> values) {
    std::apply([&](auto&... v) {
      size_t i = 0;
      ((stack[i++] = torch::stable::detail::from(std::move(v))), ...);
    }, values);
  }
};

template <typename Fn, Fn* fn>
struct Boxer;

template <typename R, typename... Args, R (*fn)(Args...)>
struct Boxer<R(Args...), fn> {
  template <size_t... I>
  static R call(StableIValue* stack, std::index_sequence<I...>) {
    // Every argument is converted (and owns its value) before the call.
    std::tuple<typename Unbox<plain_t<Args>>::type...> args{Unbox<plain_t<Args>>::get(stack[I])...};
    return fn(std::get<I>(args)...);
  }

  static void boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
    TRAINOPS_CHECK(num_args == sizeof...(Args) && num_outputs == Returns<R>::count,
                   "trainops: the registered schema has ", num_args, " arguments and ", num_outputs,
                   " returns, the kernel ", sizeof...(Args), " and ", Returns<R>::count);
    if constexpr (std::is_void_v<R>) {
      call(stack, std::index_sequence_for<Args...>());
    } else {
      Returns<R>::put(stack, call(stack, std::index_sequence_for<Args...>()));
    }
  }
};

}  // namespace boxing
}  // namespace trainops

#define TRAINOPS_BOX(func) (&::trainops::boxing::Boxer<std::remove_pointer_t<decltype(func)>, (func)>::boxed)
