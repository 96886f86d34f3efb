// CPU kernels of the blockwise quantization ops (trainops::quantize, dequantize,
// dequantize_accumulate, quantize_error_feedback).
//
// One task per group of blocks (torch::stable::parallel_for); inside a block the loops are
// branch-free float arithmetic the compiler vectorizes. The format and the rounding
// mode are template parameters so the per-element switch folds away.
// Semantics and code tables: csrc/common/quant_format.h.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/boxing.h"
#include "../common/op_checks.h"
#include "../common/quant_format.h"
#include "quantize_dequant_avx2.h"
#include "quantize_fp4_avx2.h"

namespace trainops {
namespace {

using quant::Format;

Format parse_format(const std::string& fmt) {
  if (fmt == "int8") return Format::INT8;
  if (fmt == "int4") return Format::INT4;
  if (fmt == "fp8_e4m3") return Format::FP8_E4M3;
  if (fmt == "fp4_e3m0") return Format::FP4_E3M0;
  if (fmt == "fp4_e2m1") return Format::FP4_E2M1;
  TRAINOPS_CHECK_VALUE(false, "trainops: unknown fmt '", fmt,
                       "'; expected one of int8, int4, fp8_e4m3, fp4_e3m0, fp4_e2m1");
  return Format::INT8;  // not reached
}

void check_block_size(int64_t block_size) {
  TRAINOPS_CHECK_VALUE(block_size >= 16 && block_size <= 8192 && (block_size & (block_size - 1)) == 0,
                       "trainops: block_size must be a power of two in [16, 8192], got ", block_size);
}

int64_t packed_bytes(Format f, int64_t numel) {
  return quant::bits_of(f) == 4 ? (numel + 1) / 2 : numel;
}

int64_t num_blocks(int64_t numel, int64_t block_size) { return (numel + block_size - 1) / block_size; }

uint32_t seed_key(int64_t seed) {
  uint64_t s = static_cast<uint64_t>(seed);
  return quant::lowbias32(static_cast<uint32_t>(s) ^ quant::lowbias32(static_cast<uint32_t>(s >> 32)));
}

int64_t grain_for(int64_t block_size) { return std::max<int64_t>(1, 32768 / block_size); }

// Signed values of every raw code, so decoding is one table look-up.
std::vector<float> decode_table(Format f) {
  std::vector<float> table(quant::bits_of(f) == 4 ? 16 : 256);
  for (size_t c = 0; c < table.size(); ++c) table[c] = quant::decode(f, static_cast<uint32_t>(c));
  return table;
}

// The AVX2 kernels (FP4 encoder, decoder) run where the CPU has AVX2 + FMA, unless
// TRAINOPS_QUANTIZE_PORTABLE=1 (read at each call, so the tests run the portable kernels
// too on such a CPU). Both produce the same bytes.
bool use_avx2() {
#if defined(TRAINOPS_X86_DISPATCH)
  const char* env = std::getenv("TRAINOPS_QUANTIZE_PORTABLE");
  return cpu_isa::has_avx2_fma() && (env == nullptr || std::strcmp(env, "1") != 0);
#else
  return false;
#endif
}

template <Format F, bool Stochastic>
inline uint8_t encode_at(const float* values, int64_t i, int64_t start, float scale, uint32_t key) {
  const float u = Stochastic ? quant::uniform01(start + i, key) : 0.0f;
  return static_cast<uint8_t>(quant::encode<F, Stochastic>(values[i], scale, u));
}

template <Format F, bool Stochastic, typename scalar_t>
void quantize_kernel(const scalar_t* x, float* error, int64_t n, int64_t block_size, uint32_t key,
                     uint8_t* data, float* scales) {
  constexpr bool kFour = (F == Format::INT4 || F == Format::FP4_E3M0 || F == Format::FP4_E2M1);
  // fp32 input without error feedback is encoded straight from x; otherwise the block's
  // fp32 values (x converted, plus the residual) are staged in a small buffer.
  constexpr bool kDirect = std::is_same_v<scalar_t, float>;
  const float max_code = quant::max_code_of(F);
  const std::vector<float> table = decode_table(F);
  const bool avx2 = use_avx2();
  torch::stable::parallel_for(0, num_blocks(n, block_size), grain_for(block_size), [&](int64_t b0, int64_t b1) {
    std::vector<float> staged(block_size + 1);
    std::vector<uint8_t> codes(block_size + 2);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      const bool direct = kDirect && error == nullptr;
      const float* values = direct ? reinterpret_cast<const float*>(x) + start : staged.data();
      // absmax over the bit patterns of |v|: for non-negative floats integer order is float
      // order, and NaN/Inf patterns sort above every finite one, so one integer max
      // reduction (which vectorizes, unlike a NaN-aware float max) gives both.
      uint32_t absmax_bits = 0;
      if (direct) {
        for (int64_t i = 0; i < len; ++i) {
          const uint32_t a = quant::float_bits(values[i]) & 0x7FFFFFFFu;
          absmax_bits = a > absmax_bits ? a : absmax_bits;
        }
      } else {
        for (int64_t i = 0; i < len; ++i) {
          float v = static_cast<float>(x[start + i]);
          if (error != nullptr) v += error[start + i];
          staged[i] = v;
          const uint32_t a = quant::float_bits(v) & 0x7FFFFFFFu;
          absmax_bits = a > absmax_bits ? a : absmax_bits;
        }
      }
      const bool finite = absmax_bits < 0x7F800000u;
      float scale = quant::block_scale(quant::bits_float(absmax_bits), max_code);
      uint8_t* out = kFour ? data + start / 2 : data + start;
      const int64_t out_len = kFour ? (len + 1) / 2 : len;
      if (!finite || scale == 0.0f) {
        // A non-finite block decodes to NaN (NaN scale, zero codes); its error-feedback
        // residual is left as it was so one bad step does not poison the buffer forever.
        if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
        std::fill(out, out + out_len, 0);
        scales[b] = scale;
        if (error != nullptr && finite) {
          for (int64_t i = 0; i < len; ++i) error[start + i] = values[i];
        }
        continue;
      }
      scales[b] = scale;
      int64_t residual_done = 0;  // elements whose error-feedback residual is already written
      if (kFour) {
        // Encode into bytes first, then pack pairs: two simple loops vectorize better
        // than one loop over interleaved pairs.
        int64_t done = 0;  // elements already encoded and packed
#if defined(TRAINOPS_QUANTIZE_FP4_AVX2)
        if constexpr ((F == Format::FP4_E3M0 || F == Format::FP4_E2M1) && !Stochastic) {
          if (avx2) {
            done = len & ~int64_t{15};
            const float* mids = F == Format::FP4_E3M0 ? quant::kE3M0Mids : quant::kE2M1Mids;
            if (error != nullptr) {
              quant_avx2::encode_fp4_nearest<true>(values, done, scale, mids, table.data(), out, error + start);
              residual_done = done;
            } else {
              quant_avx2::encode_fp4_nearest<false>(values, done, scale, mids, table.data(), out, nullptr);
            }
          }
        }
#endif
        for (int64_t i = done; i < len; ++i) codes[i] = encode_at<F, Stochastic>(values, i, start, scale, key);
        codes[len] = 0;
        for (int64_t j = done / 2; j < out_len; ++j) out[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
      } else {
        for (int64_t i = 0; i < len; ++i) out[i] = encode_at<F, Stochastic>(values, i, start, scale, key);
      }
      if (error != nullptr) {
        for (int64_t i = residual_done; i < len; ++i) {
          const uint32_t code = kFour ? (out[i >> 1] >> ((i & 1) * 4)) & 0xF : out[i];
          error[start + i] = values[i] - table[code] * scale;
        }
      }
    }
  });
}

// out[i] (+)= sum over chunks c of decode(data[c][i]) * scales[c][block(i)], in chunk order.
// Per block, chunk by chunk into a small fp32 accumulator, so the inner loops are
// straight table look-ups and adds over contiguous elements. With an fp32 output on an
// AVX2 CPU, quant_avx2::dequantize_range decodes 16 elements at a time instead and keeps
// them in registers over the chunks (the same operations in the same order).
template <Format F, bool Accumulate, typename out_t>
void dequantize_kernel(const uint8_t* data, int64_t data_stride, const float* scales,
                       int64_t scale_stride, int64_t chunks, int64_t n, int64_t block_size, out_t* out) {
  constexpr bool kFour = (F == Format::INT4 || F == Format::FP4_E3M0 || F == Format::FP4_E2M1);
  const std::vector<float> table_storage = decode_table(F);
  const float* table = table_storage.data();
#if defined(TRAINOPS_DEQUANTIZE_AVX2)
  if constexpr (std::is_same_v<out_t, float>) {
    if (use_avx2()) {
      int block_log2 = 0;
      while ((int64_t{1} << block_log2) < block_size) ++block_log2;
      // Tasks over 16-element steps (as many elements per task as the portable kernel's
      // grain); the last partial step of the tensor is done one element at a time.
      const int64_t grain = grain_for(block_size) * block_size / 16;
      torch::stable::parallel_for(0, (n + 15) / 16, grain, [&](int64_t s0, int64_t s1) {
        const int64_t e0 = s0 * 16;
        const int64_t e1 = std::min(s1 * 16, n);
        const int64_t v1 = e0 + ((e1 - e0) & ~int64_t{15});
        quant_avx2::dequantize_range<F, Accumulate>(data, data_stride, scales, scale_stride, chunks, block_log2, e0,
                                                    v1, out);
        for (int64_t e = v1; e < e1; ++e) {
          const int64_t b = e >> block_log2;
          float v = Accumulate ? out[e] : 0.0f;
          for (int64_t c = 0; c < chunks; ++c) {
            const uint8_t* d = data + c * data_stride;
            const uint32_t code = kFour ? (d[e >> 1] >> ((e & 1) * 4)) & 0xF : d[e];
            const float term = table[code] * scales[c * scale_stride + b];
            v = (!Accumulate && c == 0) ? term : v + term;
          }
          out[e] = v;
        }
      });
      return;
    }
  }
#endif
  torch::stable::parallel_for(0, num_blocks(n, block_size), grain_for(block_size), [&](int64_t b0, int64_t b1) {
    std::vector<float> acc_storage(block_size + 1);
    float* acc = acc_storage.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      for (int64_t c = 0; c < chunks; ++c) {
        const float s = scales[c * scale_stride + b];
        const uint8_t* d = data + c * data_stride;
        // The first term is assigned (not added to 0) so a decoded -0.0 stays -0.0.
        const bool assign = !Accumulate && c == 0;
        if (Accumulate && c == 0) {
          for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<float>(out[start + i]);
        }
        if (kFour) {
          const uint8_t* bytes = d + start / 2;
          const int64_t pairs = (len + 1) / 2;
          if (assign) {
            for (int64_t j = 0; j < pairs; ++j) {
              acc[2 * j] = table[bytes[j] & 0xF] * s;
              acc[2 * j + 1] = table[bytes[j] >> 4] * s;
            }
          } else {
            for (int64_t j = 0; j < pairs; ++j) {
              acc[2 * j] = acc[2 * j] + table[bytes[j] & 0xF] * s;
              acc[2 * j + 1] = acc[2 * j + 1] + table[bytes[j] >> 4] * s;
            }
          }
        } else {
          const uint8_t* codes = d + start;
          if (assign) {
            for (int64_t i = 0; i < len; ++i) acc[i] = table[codes[i]] * s;
          } else {
            for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + table[codes[i]] * s;
          }
        }
      }
      for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<out_t>(acc[i]);
    }
  });
}

#define TRAINOPS_DISPATCH_FORMAT(fmt, F, ...)                          \
  switch (fmt) {                                                       \
    case Format::INT8: { constexpr Format F = Format::INT8; __VA_ARGS__(); break; }         \
    case Format::INT4: { constexpr Format F = Format::INT4; __VA_ARGS__(); break; }         \
    case Format::FP8_E4M3: { constexpr Format F = Format::FP8_E4M3; __VA_ARGS__(); break; } \
    case Format::FP4_E3M0: { constexpr Format F = Format::FP4_E3M0; __VA_ARGS__(); break; } \
    case Format::FP4_E2M1: { constexpr Format F = Format::FP4_E2M1; __VA_ARGS__(); break; } \
  }

// numel up to 2^62: packed sizes and block counts stay far from int64 overflow.
constexpr int64_t kMaxNumel = int64_t{1} << 62;

void check_input(const Tensor& x, const char* name) {
  TRAINOPS_CHECK_VALUE(x.is_cpu(), "trainops: '", name, "' must be a CPU tensor here, got ", st::device_str(x));
  TRAINOPS_CHECK_TYPE(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16 ||
                       x.scalar_type() == ScalarType::Half,
                      "trainops: '", name, "' must be float32, bfloat16 or float16, got ", x.scalar_type());
  TRAINOPS_CHECK_VALUE(x.is_contiguous() && x.dim() == 1, "trainops: '", name,
                       "' must be a contiguous 1-D tensor (the wrappers flatten it)");
}

std::tuple<Tensor, Tensor> quantize_impl(const Tensor& x, const Tensor* error,
                                                 const std::string& fmt, int64_t block_size,
                                                 bool stochastic, int64_t seed) {
  const Format f = parse_format(fmt);
  check_block_size(block_size);
  check_input(x, "x");
  const int64_t n = x.numel();
  Tensor data = st::empty_cpu({packed_bytes(f, n)}, ScalarType::Byte);
  Tensor scales = st::empty_cpu({num_blocks(n, block_size)}, ScalarType::Float);
  float* err = nullptr;
  if (error != nullptr) {
    checks::on_device_of(*error, x, "quantize_error_feedback", "error");
    TRAINOPS_CHECK_TYPE(error->scalar_type() == ScalarType::Float, "trainops: 'error' must be float32, got ",
                        error->scalar_type());
    TRAINOPS_CHECK_VALUE(error->is_contiguous() && error->numel() == n,
                         "trainops: 'error' must be contiguous with as many elements as 'x' (", n, "), got ",
                         error->numel());
    err = st::data<float>(*error);
  }
  const uint32_t key = seed_key(seed);
  TRAINOPS_DISPATCH_FLOATING(x.scalar_type(), "'x'", [&] {
    TRAINOPS_DISPATCH_FORMAT(f, F, [&] {
      if (stochastic) {
        quantize_kernel<F, true>(st::cdata<scalar_t>(x), err, n, block_size, key, st::data<uint8_t>(data),
                                 st::data<float>(scales));
      } else {
        quantize_kernel<F, false>(st::cdata<scalar_t>(x), err, n, block_size, key, st::data<uint8_t>(data),
                                  st::data<float>(scales));
      }
    });
  });
  return {data, scales};
}

std::tuple<Tensor, Tensor> quantize_cpu(const Tensor& x, std::string_view fmt, int64_t block_size, bool stochastic,
                                        int64_t seed) {
  return quantize_impl(x, nullptr, std::string(fmt), block_size, stochastic, seed);
}

std::tuple<Tensor, Tensor> quantize_error_feedback_cpu(const Tensor& x, const Tensor& error, std::string_view fmt,
                                                       int64_t block_size, bool stochastic, int64_t seed) {
  return quantize_impl(x, &error, std::string(fmt), block_size, stochastic, seed);
}

void check_packed(const Tensor& data, const Tensor& scales, Format f, int64_t n, int64_t block_size, int64_t chunks) {
  TRAINOPS_CHECK_VALUE(data.is_cpu(), "trainops: 'data' must be a CPU tensor here, got ", st::device_str(data));
  TRAINOPS_CHECK_VALUE(st::same_device(scales, data), "trainops: 'scales' is on ", st::device_str(scales),
                       " but 'data' is on ", st::device_str(data));
  TRAINOPS_CHECK_TYPE(data.scalar_type() == ScalarType::Byte, "trainops: 'data' must be uint8, got ", data.scalar_type());
  TRAINOPS_CHECK_TYPE(scales.scalar_type() == ScalarType::Float, "trainops: 'scales' must be float32, got ",
                      scales.scalar_type());
  TRAINOPS_CHECK_VALUE(data.is_contiguous() && scales.is_contiguous(),
                       "trainops: 'data' and 'scales' must be contiguous");
  TRAINOPS_CHECK_VALUE(data.numel() == chunks * packed_bytes(f, n), "trainops: 'data' holds ", data.numel(),
                       " bytes; expected ", chunks, " x ", packed_bytes(f, n), " for ", n, " elements");
  TRAINOPS_CHECK_VALUE(scales.numel() == chunks * num_blocks(n, block_size), "trainops: 'scales' holds ",
                       scales.numel(), " values; expected ", chunks, " x ", num_blocks(n, block_size));
}

Tensor dequantize_cpu(const Tensor& data, const Tensor& scales, std::string_view fmt, int64_t block_size, int64_t numel,
                      ScalarType dtype) {
  const Format f = parse_format(std::string(fmt));
  check_block_size(block_size);
  TRAINOPS_CHECK_VALUE(numel >= 0 && numel <= kMaxNumel, "trainops: 'numel' must be in [0, 2^62], got ", numel);
  TRAINOPS_CHECK_TYPE(dtype == ScalarType::Float || dtype == ScalarType::BFloat16 || dtype == ScalarType::Half,
                      "trainops: 'dtype' must be float32, bfloat16 or float16, got ", dtype);
  check_packed(data, scales, f, numel, block_size, 1);
  Tensor out = st::empty_cpu({numel}, dtype);
  TRAINOPS_DISPATCH_FLOATING(dtype, "'dtype'", [&] {
    TRAINOPS_DISPATCH_FORMAT(f, F, [&] {
      dequantize_kernel<F, false>(st::cdata<uint8_t>(data), 0, st::cdata<float>(scales), 0, 1, numel, block_size,
                                  st::data<scalar_t>(out));
    });
  });
  return out;
}

void dequantize_accumulate_cpu(const Tensor& out, const Tensor& data, const Tensor& scales, std::string_view fmt,
                               int64_t block_size) {
  const Format f = parse_format(std::string(fmt));
  check_block_size(block_size);
  TRAINOPS_CHECK_VALUE(out.is_cpu(), "trainops: 'out' must be a CPU tensor here, got ", st::device_str(out));
  TRAINOPS_CHECK_TYPE(out.scalar_type() == ScalarType::Float, "trainops: 'out' must be float32, got ", out.scalar_type());
  TRAINOPS_CHECK_VALUE(out.is_contiguous(), "trainops: 'out' must be contiguous");
  TRAINOPS_CHECK_VALUE(data.dim() == 2 && scales.dim() == 2 && data.size(0) == scales.size(0),
                       "trainops: 'data' and 'scales' must be 2-D [chunks, ...] with the same number of chunks, got ",
                       st::sizes_str(data), " and ", st::sizes_str(scales));
  const int64_t n = out.numel();
  const int64_t chunks = data.size(0);
  TRAINOPS_CHECK_VALUE(data.size(1) == packed_bytes(f, n) && scales.size(1) == num_blocks(n, block_size),
                       "trainops: 'data' / 'scales' must be [chunks, ", packed_bytes(f, n), "] / [chunks, ",
                       num_blocks(n, block_size), "] for ", n, " elements, got ", st::sizes_str(data), " / ",
                       st::sizes_str(scales));
  check_packed(data, scales, f, n, block_size, chunks);
  // out + (a sum over no chunks) is out: left untouched (the kernel loads out into its
  // accumulator at the first chunk; with none it would write zeros).
  if (chunks == 0) return;
  TRAINOPS_DISPATCH_FORMAT(f, F, [&] {
    dequantize_kernel<F, true>(st::cdata<uint8_t>(data), packed_bytes(f, n), st::cdata<float>(scales),
                               num_blocks(n, block_size), chunks, n, block_size, st::data<float>(out));
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(trainops, CPU, m) {
  m.impl("quantize", TRAINOPS_BOX(&quantize_cpu));
  m.impl("quantize_error_feedback", TRAINOPS_BOX(&quantize_error_feedback_cpu));
  m.impl("dequantize", TRAINOPS_BOX(&dequantize_cpu));
  m.impl("dequantize_accumulate", TRAINOPS_BOX(&dequantize_accumulate_cpu));
}

}  // namespace trainops
