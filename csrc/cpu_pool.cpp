// An opt-in caching CPU allocator that serves fastblock's CPU op calls (PoolScope in fastblock.h), and whatever a
// caller wraps in a scope of its own (cpu_pool_enter/exit: the trainer's steps), and nothing else.
//
// Off by default: switching it on (fastblock.extension.set_cpu_pool_limit(bytes > 0), or FASTBLOCK_EXT_POOL_BYTES
// > 0 at the first op call) installs it as c10's CPU allocator for the rest of the process, a process-wide change
// a library must not make unasked. Why one might: glibc serves multi-MB requests with fresh mmaps and hands them
// back on free, so oneDNN's and ATen's buffers inside each call page-fault their whole working set in again;
// CUDA tensors have a caching allocator for this, CPU tensors have none (measurements: bench/RESULTS.md).
//
// How: once installed it forwards every request to the allocator it replaced -- the rest of the process sees no
// change -- except on a thread inside a PoolScope, where requests of at least kMinPooledBytes are served from a
// cache of freed blocks of the same size (sizes repeat exactly from one training step to the next). A pooled block
// freed anywhere, on any thread and at any later time, goes back to the cache; when the cache would grow past its
// limit, other cached blocks are returned to the system first, those of the sizes requested longest ago first
// (when the sizes change -- smaller training images, an evaluation's batch -- the blocks nobody asks for any more
// go, not the ones the next step needs). Allocations are reported to the profiler like the
// default allocator's.
// The contract it bends: c10::Allocator's raw_deleter() is the pool's deleter, while requests outside a scope
// return the replaced allocator's DataPtr with its own deleter. raw_deallocate() handles both (ATen's oneDNN glue
// allocates through raw_allocate/raw_deallocate); code that decides ownership by comparing a CPU tensor's deleter
// with raw_deleter() would see such tensors as foreign, the conservative answer. It is never uninstalled (tensors
// anywhere may still carry its deleter); limit 0 makes it forward everything.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#ifndef _WIN32
#include <pthread.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "fastblock.h"

namespace fastblock {
namespace {

constexpr size_t kMinPooledBytes = size_t(64) << 10;  // smaller blocks: malloc's own free lists do the job
constexpr size_t kTrackedSizesSlack = 256;             // sizes with no block held, remembered before a clean-up

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
    last_request_[nbytes] = ++requests_;
    live_.emplace(ptr, nbytes);
    // sizes that come and go (evaluation batches, odd shapes) must not grow the map for ever: amortised O(1)
    if (last_request_.size() > 2 * (cached_.size() + live_.size()) + kTrackedSizesSlack) forget_unheld_sizes();
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
            static_cast<int64_t>(limit_), static_cast<int64_t>(last_request_.size())};
  }

  c10::Allocator* fallback() const { return fallback_; }
  std::mutex& mutex() { return mutex_; }

  static void free_block(void* ptr);

 private:
  // Returns cached blocks to the system until at most `bytes` stay cached: first those of the sizes that were
  // requested longest ago.
  void evict_until_fits(size_t bytes) {
    if (cached_bytes_ <= bytes) return;
    std::vector<std::pair<int64_t, size_t>> by_age;  // (last request, size), oldest first
    by_age.reserve(cached_.size());
    for (const auto& entry : cached_) by_age.emplace_back(last_request_[entry.first], entry.first);
    std::sort(by_age.begin(), by_age.end());
    for (const auto& age_size : by_age) {
      auto it = cached_.find(age_size.second);
      while (!it->second.empty() && cached_bytes_ > bytes) {
        c10::free_cpu(it->second.back());
        it->second.pop_back();
        cached_bytes_ -= it->first;
      }
      if (it->second.empty()) cached_.erase(it);
      if (cached_bytes_ <= bytes) return;
    }
  }

  // Drops the last request of every size the pool holds no block of (cached or in use): its next request
  // records it again, and only held blocks are ever ordered for eviction.
  void forget_unheld_sizes() {
    std::unordered_set<size_t> held;
    held.reserve(cached_.size() + live_.size());
    for (const auto& entry : cached_) held.insert(entry.first);
    for (const auto& entry : live_) held.insert(entry.second);
    for (auto it = last_request_.begin(); it != last_request_.end();) {
      it = held.count(it->first) ? std::next(it) : last_request_.erase(it);
    }
  }

  c10::Allocator* const fallback_;
  size_t limit_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;                 // pooled blocks in use, by address
  std::unordered_map<size_t, std::vector<void*>> cached_;  // freed pooled blocks, by exact size
  std::unordered_map<size_t, int64_t> last_request_;       // per size pooled (held ones at least): the count of
                                                           // requests at its last
  int64_t requests_ = 0;
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
  if (const char* env = std::getenv("FASTBLOCK_EXT_POOL_BYTES")) return static_cast<size_t>(std::max(0LL, std::atoll(env)));
  return 0;
}

// Installs the pool with `limit` (once; later calls only return it). Null when another allocator with a higher
// priority owns the CPU slot: the op then runs unpooled.
PoolingCPUAllocator* install(size_t limit) {
  static PoolingCPUAllocator* installed = [limit] {
    g_pool = new PoolingCPUAllocator(c10::GetCPUAllocator(), limit);
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

std::atomic<bool> g_installed{false};

// The pool when it is on, else null. FASTBLOCK_EXT_POOL_BYTES > 0 switches it on at the first op call.
PoolingCPUAllocator* pool() {
  static const bool from_env = [] {
    const size_t limit = limit_from_env();
    if (limit > 0 && install(limit) != nullptr) g_installed.store(true);
    return true;
  }();
  (void)from_env;
  return g_installed.load(std::memory_order_acquire) ? install(0) : nullptr;
}

}  // namespace

PoolScope::PoolScope() : active_(pool() != nullptr) {
  if (active_) ++scope_depth;
}
PoolScope::~PoolScope() {
  if (active_) --scope_depth;
}

void cpu_pool_enter() {
  if (pool() != nullptr) ++scope_depth;
}

void cpu_pool_exit() {
  if (scope_depth > 0) --scope_depth;
}

std::vector<int64_t> cpu_pool_stats() {
  auto* p = pool();
  return p ? p->stats() : std::vector<int64_t>{0, 0, 0, 0, 0, 0};
}

void cpu_pool_empty_cache() {
  if (auto* p = pool()) p->empty_cache();
}

void cpu_pool_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastblock: the CPU pool limit must be >= 0 bytes, got ", bytes);
  if (auto* p = pool()) {
    p->set_limit(static_cast<size_t>(bytes));
  } else if (bytes > 0) {
    TORCH_CHECK(install(static_cast<size_t>(bytes)) != nullptr,
                "fastblock: cannot switch the CPU pool on: another CPU allocator has a higher priority");
    g_installed.store(true, std::memory_order_release);
  }
}

}  // namespace fastblock
