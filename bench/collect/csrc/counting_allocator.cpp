// torch's CPU allocator with CUDA's counters: the bytes of live blocks and their peak.
//
// c10 keeps no allocation counter for CPU tensors (CUDA's caching allocator has
// memory_allocated / max_memory_allocated). This allocator wraps the one installed (c10's
// DefaultCPUAllocator), registers itself with c10::SetCPUAllocator, and counts the bytes each
// allocation asked for, until the block's deleter runs. Blocks keep the base allocator's
// layout (data pointer == context), so raw_allocate / raw_deleter work as before.
// Loaded with ctypes from collect/allocated.py (plain C symbols, no pybind11).
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::mutex g_mutex;
std::unordered_map<void*, size_t>* g_sizes = new std::unordered_map<void*, size_t>();  // never destroyed: frees may run at exit
c10::DeleterFnPtr g_base_delete = nullptr;

void counting_delete(void* ptr) {
  if (ptr != nullptr) {
    size_t n = 0;
    {
      std::lock_guard<std::mutex> guard(g_mutex);
      auto it = g_sizes->find(ptr);
      if (it != g_sizes->end()) {
        n = it->second;
        g_sizes->erase(it);
      }
    }
    g_current.fetch_sub(static_cast<int64_t>(n));
  }
  g_base_delete(ptr);
}

struct CountingAllocator final : c10::Allocator {
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr dp = base_->allocate(n);
    void* ptr = dp.get();
    if (ptr == nullptr || dp.get_context() != ptr || dp.get_deleter() != g_base_delete) {
      return dp;  // not the base's plain block (none of c10's CPU blocks today): left uncounted
    }
    dp.release_context();
    {
      std::lock_guard<std::mutex> guard(g_mutex);
      (*g_sizes)[ptr] = n;
    }
    int64_t now = g_current.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t seen = g_peak.load();
    while (now > seen && !g_peak.compare_exchange_weak(seen, now)) {
    }
    return c10::DataPtr(ptr, ptr, &counting_delete, dp.device());
  }

  c10::DeleterFnPtr raw_deleter() const override { return &counting_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

}  // namespace

extern "C" {

// Installs the counting allocator over the current CPU allocator; 1 if it is (now) installed.
int llmbench_install() {
  static CountingAllocator* installed = nullptr;
  static std::mutex once;
  std::lock_guard<std::mutex> guard(once);
  if (installed == nullptr) {
    c10::Allocator* base = c10::GetCPUAllocator();
    g_base_delete = base->raw_deleter();
    if (g_base_delete == nullptr) {
      return 0;  // a base without a raw deleter: its blocks cannot be freed from their pointer alone
    }
    installed = new CountingAllocator(base);
    c10::SetCPUAllocator(installed, /*priority=*/100);
  }
  return c10::GetCPUAllocator() == installed ? 1 : 0;
}

int64_t llmbench_current() { return g_current.load(); }
int64_t llmbench_peak() { return g_peak.load(); }
void llmbench_reset_peak() { g_peak.store(g_current.load()); }

}
