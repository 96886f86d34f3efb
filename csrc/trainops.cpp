// Schemas of every trainops operator, declared once. Implementations are registered
// per dispatch key: csrc/cpu/*.cpp (CPU), csrc/cuda/bindings (CUDA C++), and the
// Python package (Triton kernels on CUDA, fake tensors, autograd).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(trainops, m) {
  // Blockwise quantization (trainops.ops.quantize / dequantize). x, error, out: flat.
  m.def("quantize(Tensor x, str fmt, int block_size, bool stochastic, int seed) -> (Tensor data, Tensor scales)");
  m.def(
      "quantize_error_feedback(Tensor x, Tensor(a!) error, str fmt, int block_size, bool stochastic, int seed)"
      " -> (Tensor data, Tensor scales)");
  m.def("dequantize(Tensor data, Tensor scales, str fmt, int block_size, int numel, ScalarType dtype) -> Tensor");
  m.def("dequantize_accumulate(Tensor(a!) out, Tensor data, Tensor scales, str fmt, int block_size) -> ()");
  // Fused MoE router (trainops.ops.router_topk; global-batch load-balancing loss).
  // Returns gate weights fp32 [T,k], expert indices int64 [T,k], selection counts int64 [E],
  // sums of the score distribution fp32 [E] and the sum of logsumexp^2 fp32 [] over valid rows.
  m.def(
      "router_topk(Tensor logits, int k, str score, bool renormalize, Tensor? expert_bias, Tensor? mask, bool with_z)"
      " -> (Tensor weights, Tensor indices, Tensor counts, Tensor prob_sum, Tensor z_sum)");
  m.def(
      "router_topk_backward(Tensor grad_weights, Tensor grad_prob_sum, Tensor grad_z_sum, Tensor logits,"
      " Tensor indices, Tensor? mask, str score, bool renormalize, bool with_z) -> Tensor");

  // Fused replay (trainops.replay.ReplayBuffer, trainops.ops.replay). Rules shared by the CPU
  // and CUDA kernels: csrc/common/replay_common.h. weight_mode: 0 uniform, 1 stored weights with
  // maintained block_stats, 2 recency (slot_key = insertion step), 3 table[slot_key] (tasks).
  // eviction: 0 FIFO ring, 1 reservoir.
  m.def(
      "replay_sample(Tensor[] storage, Tensor(a!)[] out, Tensor? lengths, bool[] ragged, Tensor? weights,"
      " Tensor? block_stats, Tensor? slot_key, Tensor? table, int weight_mode, int size, int n_fresh, int n_replay,"
      " int now, float beta, bool batch_max, bool replacement, int seed, int offset)"
      " -> (Tensor indices, Tensor is_weights, Tensor is_replay)");
  m.def(
      "replay_insert(Tensor(a!)[] storage, Tensor[] batch, Tensor(b!) generations, Tensor(c!) stamps,"
      " Tensor(d!) keys, int eviction, int size, int cursor, int step, int seed) -> Tensor slots");
  m.def(
      "replay_update_priorities(Tensor(a!) priorities, Tensor(b!) weights, Tensor(c!) block_stats,"
      " Tensor(d!) winner, Tensor generations, Tensor indices, Tensor values, Tensor? expected_generations,"
      " float alpha, float eps, int size) -> Tensor applied");
}

// `import trainops._C` loads this shared object, which registers the library above.
static PyModuleDef trainops_module = {PyModuleDef_HEAD_INIT, "_C", "trainops operator library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&trainops_module); }
