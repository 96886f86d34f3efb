// See buffer_pool.h.
#include "buffer_pool.h"

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

namespace trainops {
namespace {

constexpr int64_t kMinBytes = 64 << 10;
constexpr size_t kAlignment = 64;  // as c10's CPU allocator

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
    TORCH_CHECK(p != nullptr, "trainops: out of memory allocating ", bytes, " bytes");
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

// DataPtr deleter: ctx holds the block and its byte size.
void return_block(void* ctx) {
  auto* block = static_cast<std::pair<void*, int64_t>*>(ctx);
  pool().give_back(block->first, block->second);
  delete block;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes < kMinBytes || pool_limit_bytes() == 0) return at::empty(sizes, options);
  void* p = pool().take(bytes);
  // The block and its size ride in the DataPtr's context, and the storage keeps the CPU
  // allocator, so the tensor resizes like any other (a larger resize allocates anew and
  // hands this block back).
  auto* context = new std::pair<void*, int64_t>(p, bytes);
  c10::DataPtr data(p, context, &return_block, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  // Built directly rather than by at::empty + set_: two dispatched ops fewer on every
  // router call.
  at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                            options.dtype());
  out.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return out;
}

int64_t pool_cached_bytes() { return pool().cached(); }

void pool_empty() { pool().empty(); }

TORCH_LIBRARY_IMPL(trainops, CompositeExplicitAutograd, m) {
  m.impl("cpu_pool_cached_bytes", &pool_cached_bytes);
  m.impl("cpu_pool_empty", &pool_empty);
}

}  // namespace trainops
