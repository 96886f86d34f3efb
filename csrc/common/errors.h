// Argument errors of the op entry points, raised as the Python exception that names their
// kind: ValueError (bad value or shape), TypeError (bad dtype), IndexError (an index out of
// range), RuntimeError (anything else).
//
// The kernels are built against torch's stable ABI, which has no c10::Error (its types live
// in libc10, whose C++ ABI changes between torch releases). What reaches Python instead is
// the C++ exception itself, translated by the pybind11 layer torch calls ops through:
// std::invalid_argument -> ValueError, std::out_of_range -> IndexError, std::exception ->
// RuntimeError. pybind11 has no standard exception for TypeError; it raises whatever
// pybind11::builtin_exception::set_error() sets, a class pybind11 has kept unchanged (a
// std::runtime_error with one virtual set_error()) since its 2.0. TypeError below derives
// from a declaration of that class. Should a torch build ever not match it, the error
// still derives from std::runtime_error and reaches Python as a RuntimeError with the same
// message (tests/test_stable_abi.py checks the TypeError on every build it runs on).
#pragma once

#include <Python.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace pybind11 __attribute__((visibility("hidden"))) {
class builtin_exception : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  virtual void set_error() const = 0;
};
}  // namespace pybind11

namespace trainops {
namespace err {

class __attribute__((visibility("hidden"))) TypeError final : public pybind11::builtin_exception {
 public:
  using pybind11::builtin_exception::builtin_exception;
  void set_error() const override { PyErr_SetString(PyExc_TypeError, what()); }
};

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

}  // namespace err
}  // namespace trainops

#define TRAINOPS_CHECK_VALUE(cond, ...)                                               \
  do {                                                                                \
    if (!(cond)) [[unlikely]] throw std::invalid_argument(::trainops::err::str(__VA_ARGS__)); \
  } while (0)
#define TRAINOPS_CHECK_INDEX(cond, ...)                                            \
  do {                                                                             \
    if (!(cond)) [[unlikely]] throw std::out_of_range(::trainops::err::str(__VA_ARGS__)); \
  } while (0)
#define TRAINOPS_CHECK_TYPE(cond, ...)                                                     \
  do {                                                                                     \
    if (!(cond)) [[unlikely]] throw ::trainops::err::TypeError(::trainops::err::str(__VA_ARGS__)); \
  } while (0)
#define TRAINOPS_CHECK(cond, ...)                                                     \
  do {                                                                                \
    if (!(cond)) [[unlikely]] throw std::runtime_error(::trainops::err::str(__VA_ARGS__)); \
  } while (0)
