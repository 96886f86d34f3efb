"""The schema of every ``torch.ops.trainops.*`` operator, declared once, here.

Nothing else declares a trainops schema: the C++ extensions (trainops._C, trainops._C_cuda)
only register kernels for these ops, so this module is imported before they load
(trainops._extension). It needs nothing but torch, so the ops, their fakes and their
Triton kernels exist whether or not a compiled extension loaded.

Where the rest of each op lives (one way per backend; docs/adding_an_op.md):
  CPU kernel   C++, csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL) — or a Python kernel registered with
               ``torch.library.register_kernel`` where the op has no C++ kernel (mora, counts)
  CUDA kernel  Triton, registered with ``torch.library.register_kernel(op, "cuda")`` in the
               op's module; or CUDA C++ in trainops._C_cuda (csrc/cuda/bindings)
  fake         ``torch.library.register_fake`` in the op's module, beside its argument checks
  autograd     ``torch.library.register_autograd`` in the op's module
The op's module: trainops/ops/<family>.py (nn/global_counts.py for the count ops).
"""
from __future__ import annotations

import torch

__all__ = ["LIBRARY", "NEEDS_CPP_ON_CPU", "define"]

LIBRARY = torch.library.Library("trainops", "DEF")

# Ops whose CPU kernel is C++ (trainops._C): without the extension, a CPU call raises a
# clear "needs the compiled extension" error (trainops._extension) instead of the
# dispatcher's "could not run ... with arguments from the 'CPU' backend".
NEEDS_CPP_ON_CPU: list[str] = []


def define(schema: str, *, cpp_cpu_kernel: bool) -> None:
    """Declare ``trainops::<schema>``; ``cpp_cpu_kernel``: its CPU kernel is in trainops._C."""
    LIBRARY.define(schema)
    if cpp_cpu_kernel:
        NEEDS_CPP_ON_CPU.append(schema.split("(", 1)[0])


# --- blockwise quantization (ops/quantize.py). x, error, out: flat. --------------------------
define("quantize(Tensor x, str fmt, int block_size, bool stochastic, int seed) -> (Tensor data, Tensor scales)",
       cpp_cpu_kernel=True)
define("quantize_error_feedback(Tensor x, Tensor(a!) error, str fmt, int block_size, bool stochastic, int seed)"
       " -> (Tensor data, Tensor scales)", cpp_cpu_kernel=True)
define("dequantize(Tensor data, Tensor scales, str fmt, int block_size, int numel, ScalarType dtype) -> Tensor",
       cpp_cpu_kernel=True)
define("dequantize_accumulate(Tensor(a!) out, Tensor data, Tensor scales, str fmt, int block_size) -> ()",
       cpp_cpu_kernel=True)

# --- fused MoE router (ops/router.py). Gate weights fp32 [T,k], expert indices int64 [T,k],
# selection counts int64 [E], sums of the score distribution fp32 [E], and the sum of
# logsumexp^2 fp32 [] over valid rows. The backward is its own op (one fused kernel).
define("router_topk(Tensor logits, int k, str score, bool renormalize, Tensor? expert_bias, Tensor? mask,"
       " bool with_z) -> (Tensor weights, Tensor indices, Tensor counts, Tensor prob_sum, Tensor z_sum)",
       cpp_cpu_kernel=True)
define("router_topk_backward(Tensor grad_weights, Tensor grad_prob_sum, Tensor grad_z_sum, Tensor logits,"
       " Tensor indices, Tensor? mask, str score, bool renormalize, bool with_z) -> Tensor", cpp_cpu_kernel=True)

# --- fused replay (ops/replay.py). Rules shared by the CPU and CUDA kernels:
# csrc/common/replay_common.h. weight_mode: 0 uniform, 1 stored weights with maintained
# block_stats, 2 recency (slot_key = insertion step), 3 table[slot_key] (tasks).
# eviction: 0 FIFO ring, 1 reservoir.
define("replay_sample(Tensor[] storage, Tensor(a!)[] out, Tensor? lengths, bool[] ragged, Tensor? weights,"
       " Tensor? block_stats, Tensor? slot_key, Tensor? table, int weight_mode, int size, int n_fresh, int n_replay,"
       " int now, float beta, bool batch_max, bool replacement, int seed, int offset)"
       " -> (Tensor indices, Tensor is_weights, Tensor is_replay)", cpp_cpu_kernel=True)
define("replay_insert(Tensor(a!)[] storage, Tensor[] batch, Tensor(b!) generations, Tensor(c!) stamps,"
       " Tensor(d!) keys, int eviction, int size, int cursor, int step, int seed) -> Tensor slots", cpp_cpu_kernel=True)
define("replay_update_priorities(Tensor(a!) priorities, Tensor(b!) weights, Tensor(c!) block_stats,"
       " Tensor(d!) winner, Tensor generations, Tensor indices, Tensor values, Tensor? expected_generations,"
       " float alpha, float eps, int size) -> Tensor applied", cpp_cpu_kernel=True)

# --- MoRA (ops/mora.py): CPU kernel in ATen (every device without its own kernel), Triton on CUDA.
define("mora_fwd(Tensor x, Tensor A_f, Tensor B_f, Tensor A, Tensor B, SymInt top_k, float temperature,"
       " float threshold, bool training, float scaling, float dropout_p, SymInt seed)"
       " -> (Tensor, Tensor, Tensor, Tensor)", cpp_cpu_kernel=False)
define("mora_bwd(Tensor dy, Tensor x, Tensor A_f, Tensor B_f, Tensor A, Tensor B, Tensor p, Tensor idx, Tensor rho,"
       " SymInt top_k, float temperature, float threshold, bool training, float scaling, float dropout_p, SymInt seed,"
       " bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)", cpp_cpu_kernel=False)

# --- load-balancing counts (nn/global_counts.py): Python kernels for every device.
define("lbl_accumulate_global(Tensor(a0!) acc_counts, Tensor(a1!) acc_tokens, Tensor(a2!) snap_counts,"
       " Tensor(a3!) snap_totals, Tensor(a4!) snap_len, Tensor counts, Tensor num_tokens, Tensor? reduced,"
       " str group) -> Tensor", cpp_cpu_kernel=False)
define("all_reduce_counts(Tensor flat, str group) -> Tensor", cpp_cpu_kernel=False)
define("add_unless_recomputing(Tensor(a0!) acc, Tensor x) -> ()", cpp_cpu_kernel=False)

# --- the CPU buffer pool (csrc/cpu/buffer_pool.h): bytes of the free blocks it holds; give
# them all back to the system (as torch.cuda.empty_cache). No tensor argument, so the C++
# kernels are registered for CompositeExplicitAutograd.
define("cpu_pool_cached_bytes() -> int", cpp_cpu_kernel=True)
define("cpu_pool_empty() -> ()", cpp_cpu_kernel=True)
