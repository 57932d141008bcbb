// CUDA implementation of the KV-cache copies. One thread block per token (reshape_and_cache) or
// per (block pair, layer) (copy_blocks); threads stride over 16-byte vectors when every address
// and stride allows it, else over the widest width that does. Launched on the caller's stream.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cache_ops.h"

namespace lepton {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lepton_kernels._C: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

bool aligned(int64_t value, int64_t width) { return value % width == 0; }
bool aligned(const void* p, int64_t width) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(width) == 0;
}

struct ReshapeParams {
  const char* k;
  const char* v;
  char* k_cache;
  char* v_cache;
  const int64_t* slot_mapping;
  int64_t slot_stride, num_slots, row_bytes, head_chunks;
  int64_t k_token, k_head, k_chunk;  // byte strides; k_chunk is the stride of one V in a head
  int64_t v_token, v_head, v_chunk;
};

template <typename V>
__global__ void reshape_and_cache_kernel(ReshapeParams p, int64_t chunks) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t * p.slot_stride];
  if (slot < 0 || slot >= p.num_slots) return;  // -1 is padding; anything else was not validated
  V* kd = reinterpret_cast<V*>(p.k_cache + slot * p.row_bytes);
  V* vd = reinterpret_cast<V*>(p.v_cache + slot * p.row_bytes);
  const char* ks = p.k + t * p.k_token;
  const char* vs = p.v + t * p.v_token;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) {
    const int64_t h = i / p.head_chunks, c = i % p.head_chunks;
    kd[i] = *reinterpret_cast<const V*>(ks + h * p.k_head + c * p.k_chunk);
    vd[i] = *reinterpret_cast<const V*>(vs + h * p.v_head + c * p.v_chunk);
  }
}

constexpr int kLayersPerLaunch = 32;

struct CopyParams {
  char* k[kLayersPerLaunch];
  char* v[kLayersPerLaunch];
  const int64_t* block_mapping;
  int64_t mapping_stride0, mapping_stride1, num_blocks, block_bytes;
};

template <typename V>
__global__ void copy_blocks_kernel(CopyParams p) {
  const int64_t pair = blockIdx.x;
  const int layer = blockIdx.y;
  const int64_t src = p.block_mapping[pair * p.mapping_stride0];
  const int64_t dst = p.block_mapping[pair * p.mapping_stride0 + p.mapping_stride1];
  if (src < 0 || src >= p.num_blocks || dst < 0 || dst >= p.num_blocks || src == dst) return;
  const int64_t chunks = p.block_bytes / sizeof(V);
  const V* ks = reinterpret_cast<const V*>(p.k[layer] + src * p.block_bytes);
  const V* vs = reinterpret_cast<const V*>(p.v[layer] + src * p.block_bytes);
  V* kd = reinterpret_cast<V*>(p.k[layer] + dst * p.block_bytes);
  V* vd = reinterpret_cast<V*>(p.v[layer] + dst * p.block_bytes);
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

// Calls launch(V{}) with the vector type of `width` bytes.
template <typename F>
void with_vector(int64_t width, const F& launch) {
  switch (width) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{}); break;
  }
}

unsigned threads_for(int64_t chunks) {
  return static_cast<unsigned>(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, 256));
}

}  // namespace

std::string cuda_unusable_reason() {
  static const std::string reason = [] {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    }
    return count == 0 ? std::string("no CUDA device found") : std::string();
  }();
  return reason;
}

void reshape_and_cache_cuda(const ReshapeAndCacheArgs& a, int device, std::intptr_t stream) {
  if (a.num_tokens == 0) return;
  const int64_t head_bytes = a.head_size * a.itemsize;
  const bool k_inner = a.k_stride[2] == a.itemsize, v_inner = a.v_stride[2] == a.itemsize;
  int64_t width = a.itemsize;
  if (k_inner && v_inner) {
    for (int64_t w : {16, 8, 4, 2, 1}) {
      if (aligned(head_bytes, w) && aligned(a.k, w) && aligned(a.v, w) && aligned(a.k_cache, w) &&
          aligned(a.v_cache, w) && aligned(a.k_stride[0], w) && aligned(a.k_stride[1], w) &&
          aligned(a.v_stride[0], w) && aligned(a.v_stride[1], w)) {
        width = w;
        break;
      }
    }
  }
  ReshapeParams p{a.k, a.v, a.k_cache, a.v_cache, a.slot_mapping, a.slot_stride, a.num_slots,
                  a.num_heads * head_bytes, head_bytes / width,
                  a.k_stride[0], a.k_stride[1], k_inner ? width : a.k_stride[2],
                  a.v_stride[0], a.v_stride[1], v_inner ? width : a.v_stride[2]};
  const int64_t chunks = a.num_heads * p.head_chunks;
  DeviceGuard guard(device);
  with_vector(width, [&](auto v) {
    reshape_and_cache_kernel<decltype(v)><<<static_cast<unsigned>(a.num_tokens), threads_for(chunks),
                                             0, reinterpret_cast<cudaStream_t>(stream)>>>(p, chunks);
  });
  check(cudaGetLastError(), "reshape_and_cache kernel launch");
}

void copy_blocks_cuda(const CopyBlocksArgs& a, int device, std::intptr_t stream) {
  const int64_t layers = static_cast<int64_t>(a.k_caches.size());
  if (a.num_pairs == 0 || layers == 0) return;
  int64_t width = 1;
  for (int64_t w : {16, 8, 4, 2}) {
    bool ok = aligned(a.block_bytes, w);
    for (int64_t l = 0; ok && l < layers; ++l) ok = aligned(a.k_caches[l], w) && aligned(a.v_caches[l], w);
    if (ok) {
      width = w;
      break;
    }
  }
  DeviceGuard guard(device);
  for (int64_t first = 0; first < layers; first += kLayersPerLaunch) {
    const int64_t count = std::min<int64_t>(kLayersPerLaunch, layers - first);
    CopyParams p{};
    for (int64_t l = 0; l < count; ++l) {
      p.k[l] = a.k_caches[first + l];
      p.v[l] = a.v_caches[first + l];
    }
    p.block_mapping = a.block_mapping;
    p.mapping_stride0 = a.mapping_stride[0];
    p.mapping_stride1 = a.mapping_stride[1];
    p.num_blocks = a.num_blocks;
    p.block_bytes = a.block_bytes;
    const dim3 grid(static_cast<unsigned>(a.num_pairs), static_cast<unsigned>(count));
    with_vector(width, [&](auto v) {
      copy_blocks_kernel<decltype(v)><<<grid, threads_for(a.block_bytes / width), 0,
                                        reinterpret_cast<cudaStream_t>(stream)>>>(p);
    });
    check(cudaGetLastError(), "copy_blocks kernel launch");
  }
}

}  // namespace lepton
