// CPU implementation of the KV-cache copies: rows of whole heads are memcpy'd (the compiler and
// libc vectorize those), split over std::threads only when there is enough data to pay for them.
#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "cache_ops.h"

namespace lepton {
namespace {

// Starting a thread costs tens of microseconds, about what copying 1 MB takes: a thread is only
// worth its start for several MB (a decode step moves ~1 MB and stays on the calling thread).
constexpr int64_t kBytesPerThread = 4 << 20;

// Runs f(begin, end) over [0, n) on up to num_threads threads, the calling thread included.
template <typename F>
void parallel_for(int64_t n, int64_t bytes_per_item, int num_threads, const F& f) {
  int64_t by_work = std::max<int64_t>(1, n * bytes_per_item / kBytesPerThread);
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>({num_threads, by_work, n}));
  if (threads == 1) {
    f(0, n);
    return;
  }
  int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  int64_t begin = chunk;
  for (; begin < n; begin += chunk) {
    int64_t end = std::min(n, begin + chunk);
    try {
      pool.emplace_back([&f, begin, end] { f(begin, end); });
    } catch (...) {  // no more threads to be had: do the rest here
      f(begin, n);
      break;
    }
  }
  f(0, std::min(n, chunk));
  for (auto& t : pool) t.join();
}

template <typename T>
void strided_head_copy(char* dst, const char* src, int64_t head_size, int64_t src_stride) {
  T* out = reinterpret_cast<T*>(dst);
  for (int64_t d = 0; d < head_size; ++d) {
    std::memcpy(out + d, src + d * src_stride, sizeof(T));
  }
}

// One token's [Hk, D] from a strided source into a contiguous cache row.
void copy_token(char* dst, const char* src, const int64_t* stride, int64_t num_heads,
                int64_t head_size, int64_t itemsize) {
  const int64_t head_bytes = head_size * itemsize;
  if (stride[2] == itemsize && (stride[1] == head_bytes || num_heads == 1)) {
    std::memcpy(dst, src, num_heads * head_bytes);
    return;
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    char* out = dst + h * head_bytes;
    const char* in = src + h * stride[1];
    if (stride[2] == itemsize || head_size == 1) {
      std::memcpy(out, in, head_bytes);
    } else if (itemsize == 4) {
      strided_head_copy<uint32_t>(out, in, head_size, stride[2]);
    } else if (itemsize == 2) {
      strided_head_copy<uint16_t>(out, in, head_size, stride[2]);
    } else {
      strided_head_copy<uint8_t>(out, in, head_size, stride[2]);
    }
  }
}

}  // namespace

void reshape_and_cache_cpu(const ReshapeAndCacheArgs& a, int num_threads) {
  const int64_t row_bytes = a.num_heads * a.head_size * a.itemsize;
  parallel_for(a.num_tokens, 2 * row_bytes, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = a.slot_mapping[t * a.slot_stride];
      if (slot < 0) continue;  // padding token: nothing to cache
      copy_token(a.k_cache + slot * row_bytes, a.k + t * a.k_stride[0], a.k_stride,
                 a.num_heads, a.head_size, a.itemsize);
      copy_token(a.v_cache + slot * row_bytes, a.v + t * a.v_stride[0], a.v_stride,
                 a.num_heads, a.head_size, a.itemsize);
    }
  });
}

void copy_blocks_cpu(const CopyBlocksArgs& a, int num_threads) {
  const int64_t layers = static_cast<int64_t>(a.k_caches.size());
  parallel_for(layers * a.num_pairs, 2 * a.block_bytes, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t layer = i / a.num_pairs, pair = i % a.num_pairs;
      const int64_t src = a.block_mapping[pair * a.mapping_stride[0]];
      const int64_t dst = a.block_mapping[pair * a.mapping_stride[0] + a.mapping_stride[1]];
      if (src == dst) continue;
      std::memcpy(a.k_caches[layer] + dst * a.block_bytes, a.k_caches[layer] + src * a.block_bytes,
                  a.block_bytes);
      std::memcpy(a.v_caches[layer] + dst * a.block_bytes, a.v_caches[layer] + src * a.block_bytes,
                  a.block_bytes);
    }
  });
}

}  // namespace lepton
