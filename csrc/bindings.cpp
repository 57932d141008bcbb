// lepton_kernels._C: the KV-cache copies behind the `ext` implementations of reshape_and_cache
// and copy_blocks. No torch headers: tensors arrive as DLPack capsules, so one build serves every
// torch version. Every entry point validates shapes, dtypes, devices and cache layout, and for cpu
// tensors every slot / block index, before it writes a byte; errors are ValueErrors naming the
// argument, as the eager spec raises them. On cuda the indices stay on the device (checking them
// would sync every step): the kernels skip out-of-range ones rather than write out of bounds.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache_ops.h"
#include "dlpack_arg.h"

namespace lepton {
void register_sampling(py::module_& m);  // sampling_bindings.cpp
}  // namespace lepton

// Set by setup.py; the defaults describe a build without CUDA.
#ifndef LEPTON_CUDA_ARCHS
#define LEPTON_CUDA_ARCHS ""
#endif
#ifndef LEPTON_CUDA_VERSION
#define LEPTON_CUDA_VERSION ""
#endif
#ifndef LEPTON_CUDA_WHY_NOT
#define LEPTON_CUDA_WHY_NOT "built without CUDA"
#endif

namespace lepton {
namespace {

#ifdef LEPTON_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

// Empty when cuda tensors can be handled here, else why not.
std::string cuda_problem() {
#ifdef LEPTON_WITH_CUDA
  return cuda_unusable_reason();
#else
  return std::string("lepton_kernels._C was built without CUDA (") + LEPTON_CUDA_WHY_NOT + ")";
#endif
}

// True for cuda tensors, false for cpu ones; other devices are refused.
bool on_cuda(const DLPackArg& a, const char* op) {
  if (a.device().device_type == kDLCPU) return false;
  if (a.device().device_type != kDLCUDA) {
    throw py::value_error(a.name() + " must be on a cpu or cuda device, got DLPack device type " +
                          std::to_string(a.device().device_type));
  }
  std::string why = cuda_problem();
  if (!why.empty()) throw std::runtime_error(std::string("lepton_kernels._C.") + op + " got cuda tensors, but " + why);
  return true;
}

int64_t read_index(const DLPackArg& a, int64_t offset) {
  return reinterpret_cast<const int64_t*>(a.data())[offset];
}

// Every slot in range (negative ones are padding and skipped) and no slot written twice, as the
// eager spec requires. Runs before any write, on cpu tensors only (a cuda check would sync).
void check_slots(const DLPackArg& slots, const ReshapeAndCacheArgs& a) {
  std::vector<int64_t> used;
  used.reserve(static_cast<size_t>(a.num_tokens));
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    const int64_t slot = read_index(slots, t * a.slot_stride);
    if (slot >= a.num_slots) {
      throw py::value_error("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slot) +
                            " is out of range: the caches have " + std::to_string(a.num_slots) +
                            " slots (num_blocks * block_size)");
    }
    if (slot >= 0) used.push_back(slot);
  }
  std::sort(used.begin(), used.end());
  auto twice = std::adjacent_find(used.begin(), used.end());
  if (twice != used.end()) {
    throw py::value_error("slot_mapping assigns slot " + std::to_string(*twice) + " to two tokens");
  }
}

// Blocks in range, no destination named twice or also used as a source: the copies may then run
// in any order. Same rules as the eager spec; cpu tensors only.
void check_block_mapping(const DLPackArg& mapping, const CopyBlocksArgs& a) {
  std::vector<int64_t> src, dst;
  for (int64_t i = 0; i < a.num_pairs; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t block = read_index(mapping, i * a.mapping_stride[0] + j * a.mapping_stride[1]);
      if (block < 0 || block >= a.num_blocks) {
        throw py::value_error("block_mapping[" + std::to_string(i) + ", " + std::to_string(j) + "] = " +
                              std::to_string(block) + " is out of range: the caches have " +
                              std::to_string(a.num_blocks) + " blocks");
      }
      (j == 0 ? src : dst).push_back(block);
    }
  }
  std::sort(src.begin(), src.end());
  std::sort(dst.begin(), dst.end());
  auto twice = std::adjacent_find(dst.begin(), dst.end());
  if (twice != dst.end()) {
    throw py::value_error("block_mapping names destination block " + std::to_string(*twice) + " twice");
  }
  for (int64_t block : dst) {
    if (std::binary_search(src.begin(), src.end(), block)) {
      throw py::value_error("block_mapping uses block " + std::to_string(block) +
                            " both as a destination and as a source");
    }
  }
}

void reshape_and_cache(py::handle k_obj, py::handle v_obj, py::handle k_cache_obj, py::handle v_cache_obj,
                       py::handle slot_mapping_obj, uint64_t stream, int num_threads) {
  DLPackArg k(k_obj, "k"), v(v_obj, "v"), k_cache(k_cache_obj, "k_cache"), v_cache(v_cache_obj, "v_cache"),
      slots(slot_mapping_obj, "slot_mapping");
  check_ndim(k, 3);
  check_ndim(v, 3);
  check_ndim(k_cache, 4);
  check_ndim(v_cache, 4);
  check_ndim(slots, 1);
  check_cache_dtype(k);
  for (const DLPackArg* a : {&v, &k_cache, &v_cache}) check_same_dtype(*a, k);
  check_index_dtype(slots);
  for (const DLPackArg* a : {&v, &k_cache, &v_cache, &slots}) check_same_device(*a, k);
  for (int d = 0; d < 3; ++d) check_dim(v, d, k.size(d), "k.shape[" + std::to_string(d) + "]");
  check_dim(k_cache, 2, k.size(1), "k.shape[1] (num_kv_heads)");
  check_dim(k_cache, 3, k.size(2), "k.shape[2] (head_size)");
  for (int d = 0; d < 4; ++d) check_dim(v_cache, d, k_cache.size(d), "k_cache.shape[" + std::to_string(d) + "]");
  check_dim(slots, 0, k.size(0), "k.shape[0] (num_tokens)");
  check_writable_cache(k_cache);
  check_writable_cache(v_cache);

  ReshapeAndCacheArgs a{};
  a.k = k.data();
  a.v = v.data();
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.slot_mapping = reinterpret_cast<const int64_t*>(slots.data());
  a.slot_stride = slots.stride(0);
  a.num_tokens = k.size(0);
  a.num_heads = k.size(1);
  a.head_size = k.size(2);
  a.num_slots = k_cache.size(0) * k_cache.size(1);
  a.itemsize = k.itemsize();
  for (int d = 0; d < 3; ++d) {
    a.k_stride[d] = k.stride_bytes(d);
    a.v_stride[d] = v.stride_bytes(d);
  }
  if (on_cuda(k, "reshape_and_cache")) {
    py::gil_scoped_release nogil;
#ifdef LEPTON_WITH_CUDA  // on_cuda() has thrown otherwise
    reshape_and_cache_cuda(a, k.device().device_id, static_cast<std::intptr_t>(stream));
#endif
    return;
  }
  check_slots(slots, a);
  py::gil_scoped_release nogil;
  reshape_and_cache_cpu(a, num_threads);
}

void copy_blocks(py::sequence k_caches_obj, py::sequence v_caches_obj, py::handle block_mapping_obj,
                 uint64_t stream, int num_threads) {
  if (py::len(k_caches_obj) != py::len(v_caches_obj)) {
    throw py::value_error("k_caches (" + std::to_string(py::len(k_caches_obj)) + " layers) and v_caches (" +
                          std::to_string(py::len(v_caches_obj)) + " layers) must have the same length");
  }
  DLPackArg mapping(block_mapping_obj, "block_mapping");
  check_ndim(mapping, 2);
  check_dim(mapping, 1, 2, "2 (src, dst)");
  check_index_dtype(mapping);
  std::vector<std::unique_ptr<DLPackArg>> caches;
  for (size_t i = 0; i < py::len(k_caches_obj); ++i) {
    caches.push_back(std::make_unique<DLPackArg>(k_caches_obj[i], "k_caches[" + std::to_string(i) + "]"));
    caches.push_back(std::make_unique<DLPackArg>(v_caches_obj[i], "v_caches[" + std::to_string(i) + "]"));
  }
  if (caches.empty()) return;  // no layers: nothing to copy
  const DLPackArg& ref = *caches[0];
  check_cache_dtype(ref);
  for (const auto& c : caches) {
    check_ndim(*c, 4);
    check_same_dtype(*c, ref);
    check_same_device(*c, ref);
    for (int d = 0; d < 4; ++d) check_dim(*c, d, ref.size(d), ref.name() + ".shape[" + std::to_string(d) + "]");
    check_writable_cache(*c);
  }
  check_same_device(mapping, ref);

  CopyBlocksArgs a{};
  for (size_t i = 0; i < caches.size(); i += 2) {
    a.k_caches.push_back(caches[i]->data());
    a.v_caches.push_back(caches[i + 1]->data());
  }
  a.block_mapping = reinterpret_cast<const int64_t*>(mapping.data());
  a.mapping_stride[0] = mapping.stride(0);
  a.mapping_stride[1] = mapping.stride(1);
  a.num_pairs = mapping.size(0);
  a.num_blocks = ref.size(0);
  a.block_bytes = ref.size(1) * ref.size(2) * ref.size(3) * ref.itemsize();
  if (on_cuda(ref, "copy_blocks")) {
    py::gil_scoped_release nogil;
#ifdef LEPTON_WITH_CUDA  // on_cuda() has thrown otherwise
    copy_blocks_cuda(a, ref.device().device_id, static_cast<std::intptr_t>(stream));
#endif
    return;
  }
  check_block_mapping(mapping, a);
  py::gil_scoped_release nogil;
  copy_blocks_cpu(a, num_threads);
}

}  // namespace
}  // namespace lepton

PYBIND11_MODULE(_C, m) {
  using namespace lepton;
  m.doc() = "lepton_kernels native ops: KV-cache copies, the cpu sampler (pybind11 + DLPack, no torch headers)";
  m.def("reshape_and_cache", &reshape_and_cache, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("stream") = 0, py::arg("num_threads") = 1,
        "k_cache.view(-1, Hk, D)[slot_mapping[t]] = k[t] (same for v) for every t with slot >= 0. "
        "Tensors are DLPack capsules (or objects with __dlpack__); stream is a cudaStream_t as an int.");
  m.def("copy_blocks", &copy_blocks, py::arg("k_caches"), py::arg("v_caches"), py::arg("block_mapping"),
        py::arg("stream") = 0, py::arg("num_threads") = 1,
        "caches[l][dst] = caches[l][src] for every layer l and (src, dst) row of block_mapping.");
  register_sampling(m);
  m.def("has_cuda", [] { return kHasCuda; }, "True when the CUDA kernels were compiled in.");
  m.def("cuda_problem", &cuda_problem, "Empty when cuda tensors can be handled here, else why not.");
  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = kHasCuda;
    info["cuda_archs"] = LEPTON_CUDA_ARCHS;
    info["cuda_version"] = LEPTON_CUDA_VERSION;
    info["cuda_why_not"] = kHasCuda ? "" : LEPTON_CUDA_WHY_NOT;
    return info;
  }, "How this module was built: cuda (bool), cuda_archs, cuda_version, cuda_why_not.");
}
