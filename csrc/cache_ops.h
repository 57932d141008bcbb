// Validated, framework-free descriptions of the two KV-cache copies, shared by the CPU (.cpp)
// and CUDA (.cu) implementations. Everything is in bytes: the ops move elements without looking
// at them, so one code path serves fp32, fp16, bf16 and fp8 caches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lepton {

// reshape_and_cache: for every token t with slot s = slot_mapping[t] >= 0,
//   k_cache.view(NB*BS, Hk, D)[s] = k[t]   and the same for v.
struct ReshapeAndCacheArgs {
  const char* k;
  const char* v;
  char* k_cache;                 // contiguous [NB, BS, Hk, D]
  char* v_cache;
  const int64_t* slot_mapping;   // [T], element stride slot_stride
  int64_t slot_stride;
  int64_t num_tokens;            // T
  int64_t num_heads;             // Hk
  int64_t head_size;             // D
  int64_t num_slots;             // NB * BS
  int64_t itemsize;              // bytes per element: 1, 2 or 4
  int64_t k_stride[3];           // byte strides of k over (T, Hk, D)
  int64_t v_stride[3];
};

// copy_blocks: for every layer l and pair (src, dst) of block_mapping,
//   k_caches[l][dst] = k_caches[l][src]   and the same for v.
struct CopyBlocksArgs {
  std::vector<char*> k_caches;   // one contiguous [NB, BS, Hk, D] cache per layer
  std::vector<char*> v_caches;
  const int64_t* block_mapping;  // [N, 2]
  int64_t mapping_stride[2];     // element strides of block_mapping
  int64_t num_pairs;             // N
  int64_t num_blocks;            // NB
  int64_t block_bytes;           // BS * Hk * D * itemsize
};

// CPU implementations (cache_ops_cpu.cpp); indices must already be range-checked.
void reshape_and_cache_cpu(const ReshapeAndCacheArgs& a, int num_threads);
void copy_blocks_cpu(const CopyBlocksArgs& a, int num_threads);

// CUDA implementations (cache_ops_cuda.cu), launched on `stream` of `device`. Indices live in
// device memory and are not read on the host: the kernels skip any slot or block that is out of
// range instead of writing out of bounds. Errors are thrown as std::runtime_error.
void reshape_and_cache_cuda(const ReshapeAndCacheArgs& a, int device, std::intptr_t stream);
void copy_blocks_cuda(const CopyBlocksArgs& a, int device, std::intptr_t stream);
// Empty when a CUDA device can be used, else why not (no driver, no device, ...).
std::string cuda_unusable_reason();

}  // namespace lepton
