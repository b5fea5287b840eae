// A caching CPU allocator that serves fastblock's CPU op calls (PoolScope in fastblock.h) and nothing else.
//
// Why: inside one fwd+bwd, oneDNN (through ATen) allocates every buffer it works in -- the blocked copies of
// the activations and of the per-sample kernels, the weight-gradient outputs -- and ATen allocates each op's
// outputs. glibc serves multi-MB requests with fresh mmaps and hands them back to the kernel on free, so every
// call page-faults its whole working set in again (~0.5 ms per MB on the measured VM): in oneDNN's verbose log
// of one fwd+bwd at N=32, C=64, 16x16, K=4, the reorders into such fresh buffers took 5.3 of ~16.5 ms, 2.9 ms
// with this pool. CUDA tensors have PyTorch's caching allocator for this; CPU tensors have none, and ATen's
// convolutions take no output buffers, so the op cannot hand them reused memory itself.
//
// How: installed once as c10's CPU allocator, it forwards every request to the allocator it replaced -- the
// rest of the process sees no change -- except on a thread inside a PoolScope, where requests of at least
// kMinPooledBytes are served from a cache of freed blocks of the same size (sizes repeat exactly from one
// training step to the next). A pooled block freed anywhere, on any thread and at any later time, goes back to
// the cache; when the cache would grow past its limit (FASTBLOCK_EXT_POOL_BYTES, default 256 MiB; 0 turns the
// pool off), other cached blocks are returned to the system first. Allocations are reported to the profiler
// like the default allocator's. (c10 has the same scoped design for mobile builds -- CPUCachingAllocator with
// WithCPUCachingAllocatorGuard -- which desktop builds do not consult.)
// One deviation from c10::Allocator's contract: raw_deleter() is the pool's deleter, while requests outside a
// scope return the replaced allocator's DataPtr with its own deleter. raw_deallocate() handles both (ATen's
// oneDNN glue allocates through raw_allocate/raw_deallocate); code that decides ownership by comparing a CPU
// tensor's deleter with raw_deleter() would see such tensors as foreign, the conservative answer.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#ifndef _WIN32
#include <pthread.h>
#endif

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fastblock.h"

namespace fastblock {
namespace {

constexpr size_t kMinPooledBytes = size_t(64) << 10;  // smaller blocks: malloc's own free lists do the job

thread_local int scope_depth = 0;

class PoolingCPUAllocator final : public c10::Allocator {
 public:
  PoolingCPUAllocator(c10::Allocator* fallback, size_t limit) : fallback_(fallback), limit_(limit) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (scope_depth == 0 || nbytes < kMinPooledBytes) return fallback_->allocate(nbytes);
    std::unique_lock<std::mutex> lock(mutex_);
    if (limit_ == 0) {  // pool off
      lock.unlock();
      return fallback_->allocate(nbytes);
    }
    void* ptr = nullptr;
    auto it = cached_.find(nbytes);
    if (it != cached_.end()) {
      ptr = it->second.back();
      it->second.pop_back();
      if (it->second.empty()) cached_.erase(it);
      cached_bytes_ -= nbytes;
      ++hits_;
    } else {
      ++misses_;
      lock.unlock();  // the system allocation runs outside the lock
      ptr = c10::alloc_cpu(nbytes);
      lock.lock();
    }
    live_.emplace(ptr, nbytes);
    lock.unlock();
    c10::profiledCPUMemoryReporter().New(ptr, nbytes);
    return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate (oneDNN's allocations go through them) must free blocks of either origin.
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Returns false for a block the pool does not own.
  bool release(void* ptr) {
    size_t nbytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it == live_.end()) return false;
      nbytes = it->second;
      live_.erase(it);
      c10::profiledCPUMemoryReporter().Delete(ptr);
      if (nbytes <= limit_) {
        evict_until_fits(limit_ - nbytes);
        cached_[nbytes].push_back(ptr);
        cached_bytes_ += nbytes;
        return true;
      }
    }
    c10::free_cpu(ptr);
    return true;
  }

  void set_limit(size_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
    evict_until_fits(limit_);
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    evict_until_fits(0);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(live_.size()), hits_, misses_,
            static_cast<int64_t>(limit_)};
  }

  c10::Allocator* fallback() const { return fallback_; }
  std::mutex& mutex() { return mutex_; }

  static void free_block(void* ptr);

 private:
  // Returns cached blocks to the system, in no particular order, until at most `bytes` stay cached.
  void evict_until_fits(size_t bytes) {
    for (auto it = cached_.begin(); cached_bytes_ > bytes && it != cached_.end();) {
      while (!it->second.empty() && cached_bytes_ > bytes) {
        c10::free_cpu(it->second.back());
        it->second.pop_back();
        cached_bytes_ -= it->first;
      }
      it = it->second.empty() ? cached_.erase(it) : std::next(it);
    }
  }

  c10::Allocator* const fallback_;
  size_t limit_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;                 // pooled blocks in use, by address
  std::unordered_map<size_t, std::vector<void*>> cached_;  // freed pooled blocks, by exact size
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

PoolingCPUAllocator* g_pool = nullptr;

void PoolingCPUAllocator::free_block(void* ptr) {
  if (ptr == nullptr || g_pool->release(ptr)) return;
  const auto fallback_deleter = g_pool->fallback()->raw_deleter();
  TORCH_INTERNAL_ASSERT(fallback_deleter != nullptr, "fastblock CPU pool: a raw block of unknown origin");
  fallback_deleter(ptr);
}

size_t limit_from_env() {
  if (const char* env = std::getenv("FASTBLOCK_EXT_POOL_BYTES")) return static_cast<size_t>(std::atoll(env));
  return size_t(256) << 20;
}

// Installed on first use and never removed: tensors anywhere may still carry its deleter. A null result means
// another allocator with a higher priority owns the CPU slot, and the op runs unpooled.
PoolingCPUAllocator* pool() {
  static PoolingCPUAllocator* installed = [] {
    g_pool = new PoolingCPUAllocator(c10::GetCPUAllocator(), limit_from_env());
    c10::SetCPUAllocator(g_pool, /*priority=*/0);
#ifndef _WIN32
    // a fork() while another thread holds the lock must not leave the child's copy locked
    pthread_atfork([] { g_pool->mutex().lock(); }, [] { g_pool->mutex().unlock(); },
                   [] { g_pool->mutex().unlock(); });
#endif
    return g_pool;
  }();
  return c10::GetCPUAllocator() == installed ? installed : nullptr;
}

}  // namespace

PoolScope::PoolScope() : active_(pool() != nullptr) {
  if (active_) ++scope_depth;
}
PoolScope::~PoolScope() {
  if (active_) --scope_depth;
}

std::vector<int64_t> cpu_pool_stats() {
  auto* p = pool();
  return p ? p->stats() : std::vector<int64_t>{0, 0, 0, 0, 0};
}

void cpu_pool_empty_cache() {
  if (auto* p = pool()) p->empty_cache();
}

void cpu_pool_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastblock: the CPU pool limit must be >= 0 bytes, got ", bytes);
  if (auto* p = pool()) p->set_limit(static_cast<size_t>(bytes));
}

}  // namespace fastblock
