// Run-time choice of the wide CPU kernels. The library is compiled for a portable
// baseline (setup.py); kernels for wider instruction sets are compiled with a target
// attribute (TRAINOPS_TARGET_AVX2_FMA_BEGIN/END around them) and called only when the CPU
// running the process reports the features, as ATen's CPU dispatch does. A build with
// -march=native (TRAINOPS_CPU_ARCH=native) gets the same kernels and the same checks.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TRAINOPS_X86_DISPATCH 1

// Everything between BEGIN and END is compiled for AVX2 + FMA whatever the baseline.
#if defined(__clang__)
#define TRAINOPS_TARGET_AVX2_FMA_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define TRAINOPS_TARGET_AVX2_FMA_END _Pragma("clang attribute pop")
#else
#define TRAINOPS_TARGET_AVX2_FMA_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define TRAINOPS_TARGET_AVX2_FMA_END _Pragma("GCC pop_options")
#endif

namespace trainops {
namespace cpu_isa {

// True when the running CPU (and OS) support AVX2 and FMA. __builtin_cpu_supports reads
// CPUID results that libgcc caches at load time, so this is cheap enough to call per op.
inline bool has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace cpu_isa
}  // namespace trainops

#endif  // __x86_64__
