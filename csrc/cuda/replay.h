// C launchers of the CUDA replay kernels (csrc/cuda/replay_sample.cu, replay_update.cu).
// Torch-free: raw pointers, sizes and a cudaStream_t. csrc/cuda/bindings/replay.cpp turns
// tensors into these structs, allocates the workspace and registers the ops for CUDA.
// Every launcher only enqueues work on `stream` (no host synchronization) and returns the
// cudaError_t of the launches as an int (0: success).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#define TRAINOPS_REPLAY_MAX_FIELDS 16

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* src;     // [capacity or n, row] storage (sample) or batch (insert) rows
  void* dst;           // [rows, row] output (sample) or storage (insert)
  int64_t row_bytes;   // bytes of one row
  int64_t elem_bytes;  // bytes of one element (ragged rows count elements)
  int32_t ragged;      // 1: copy lengths[slot] elements, zero the rest
} TrainopsReplayField;

typedef struct {
  int32_t n_fields;
  TrainopsReplayField fields[TRAINOPS_REPLAY_MAX_FIELDS];
  const int32_t* lengths;      // [capacity] or NULL
  int64_t mode;                // 0 uniform, 1 weights, 2 recency, 3 table
  const float* weights;        // [capacity] (mode 1)
  const double* block_stats;   // [2, block_stride] maintained sums / minima (mode 1)
  int64_t block_stride;
  const int64_t* slot_key;     // [capacity] (modes 2, 3)
  const double* table;         // [table_size] (mode 3)
  int64_t table_size;
  int64_t capacity, size, n_fresh, n_replay, now;
  double beta;
  int32_t batch_max, replacement;
  uint64_t seed, offset;
  int64_t* indices;            // [n_fresh + n_replay] outputs
  float* is_weights;
  bool* is_replay;
} TrainopsReplaySampleArgs;

typedef struct {
  int32_t n_fields;
  TrainopsReplayField fields[TRAINOPS_REPLAY_MAX_FIELDS];  // src: batch rows, dst: storage
  int64_t* generations;        // [capacity]
  int64_t* stamps;             // [capacity]
  double* keys;                // [capacity]
  int64_t mode;                // 0 fifo, 1 reservoir
  int64_t capacity, n, size, cursor, step;
  uint64_t seed;
  int64_t* slots;              // [n] output
} TrainopsReplayInsertArgs;

typedef struct {
  float* priorities;           // [capacity]
  float* weights;              // [capacity]
  double* block_stats;         // [2, block_stride]
  int64_t block_stride;
  int32_t* winner;             // [capacity] scratch, -1 on entry and on exit
  const int64_t* generations;  // [capacity]
  const int64_t* indices;      // [n]
  const float* values;         // [n]
  const int64_t* expected;     // [n] or NULL
  int64_t n, capacity, size;
  double alpha, eps;
  bool* applied;               // [n] output
} TrainopsReplayUpdateArgs;

size_t trainops_replay_sample_workspace(const TrainopsReplaySampleArgs* args);
int trainops_replay_sample(const TrainopsReplaySampleArgs* args, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

size_t trainops_replay_insert_workspace(const TrainopsReplayInsertArgs* args);
int trainops_replay_insert(const TrainopsReplayInsertArgs* args, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

int trainops_replay_update_priorities(const TrainopsReplayUpdateArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
