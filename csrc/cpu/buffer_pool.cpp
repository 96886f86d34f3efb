// See buffer_pool.h.
#include "buffer_pool.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

namespace trainops {
namespace {

constexpr int64_t kMinBytes = 64 << 10;
constexpr size_t kAlignment = 64;  // as torch's CPU allocator

int64_t pool_limit_bytes() {
  const char* env = std::getenv("TRAINOPS_CPU_POOL_MB");
  const int64_t mb = env != nullptr ? std::atoll(env) : 256;
  return mb > 0 ? mb << 20 : 0;
}

class BufferPool {
 public:
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->first == bytes) {
          void* p = it->second;
          free_.erase(it);
          cached_ -= bytes;
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kAlignment, static_cast<size_t>((bytes + kAlignment - 1) / kAlignment * kAlignment));
    TRAINOPS_CHECK(p != nullptr, "trainops: out of memory allocating ", bytes, " bytes");
    return p;
  }

  // Keeps p unless it is larger than the limit, evicting the oldest blocks to stay within
  // it (a lowered limit takes effect here).
  void give_back(void* p, int64_t bytes) { trim(pool_limit_bytes(), p, bytes); }

  void empty() { trim(0, nullptr, 0); }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  void trim(int64_t limit, void* p, int64_t bytes) {
    std::deque<std::pair<int64_t, void*>> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const bool keep = p != nullptr && bytes <= limit;
      if (p != nullptr && !keep) evicted.emplace_back(bytes, p);
      while (!free_.empty() && cached_ + (keep ? bytes : 0) > limit) {  // oldest first
        evicted.push_back(free_.front());
        cached_ -= free_.front().first;
        free_.pop_front();
      }
      if (keep) {
        free_.emplace_back(bytes, p);
        cached_ += bytes;
      }
    }
    for (auto& block : evicted) std::free(block.second);  // outside the lock
  }

  std::mutex mutex_;
  std::deque<std::pair<int64_t, void*>> free_;  // (bytes, block), oldest first
  int64_t cached_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static
// destructors would have run.
BufferPool& pool() {
  static BufferPool* instance = new BufferPool();
  return *instance;
}

}  // namespace

Tensor pooled_empty(std::initializer_list<int64_t> sizes, ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * st::element_size(dtype);
  if (bytes < kMinBytes || pool_limit_bytes() == 0) return st::empty_cpu(sizes, dtype);
  void* p = pool().take(bytes);
  int64_t strides[8];
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes.begin()[d];
  }
  // The deleter captures the block's size: the pool matches blocks by exact byte size.
  return torch::stable::from_blob(
      p, torch::headeronly::IntHeaderOnlyArrayRef(sizes.begin(), sizes.size()),
      torch::headeronly::IntHeaderOnlyArrayRef(strides, sizes.size()),
      torch::stable::Device(torch::headeronly::DeviceType::CPU),
      dtype, [bytes](void* block) { pool().give_back(block, bytes); });
}

int64_t pool_cached_bytes() { return pool().cached(); }

void pool_empty() { pool().empty(); }

// The CPU buffer pool: bytes of free blocks it holds; give them all back to the system (as
// torch.cuda.empty_cache). No tensor arguments, so they dispatch to CompositeExplicitAutograd.
STABLE_TORCH_LIBRARY_IMPL(trainops, CompositeExplicitAutograd, m) {
  m.impl("cpu_pool_cached_bytes", TORCH_BOX(&pool_cached_bytes));
  m.impl("cpu_pool_empty", TORCH_BOX(&pool_empty));
}

}  // namespace trainops
