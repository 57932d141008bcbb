// Python entry point of the cpu sampler (sampling_cpu.cpp): argument checks, then the race with the
// GIL released. Tensors arrive as DLPack capsules like every entry point of _C; an optional
// parameter is None when no row uses it.
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "dlpack_arg.h"
#include "sampling.h"

namespace lepton {
namespace {

void check_vector(const DLPackArg& a, int64_t rows, uint8_t code, int bits, const char* dtype) {
  check_ndim(a, 1);
  check_dim(a, 0, rows, "probs.shape[0] (rows)");
  if (a.dtype().code != code || a.dtype().bits != bits || a.dtype().lanes != 1) {
    throw py::value_error(a.name() + " must be " + dtype);
  }
  if (a.size(0) > 1 && a.stride(0) != 1) throw py::value_error(a.name() + " must be contiguous");
  if (a.device().device_type != kDLCPU) throw py::value_error(a.name() + " must be a cpu tensor");
}

// An optional [rows] vector: nullptr for None, else its data (kept alive by `holder`).
template <typename T>
const T* optional_vector(py::handle obj, const char* name, int64_t rows, uint8_t code, int bits,
                         const char* dtype, std::unique_ptr<DLPackArg>& holder) {
  if (obj.is_none()) return nullptr;
  holder = std::make_unique<DLPackArg>(obj, name);
  check_vector(*holder, rows, code, bits, dtype);
  return reinterpret_cast<const T*>(holder->data());
}

void sample_from_probs(py::handle probs_obj, py::handle top_k_obj, py::handle top_p_obj, py::handle min_p_obj,
                       py::handle keys_obj, py::handle out_obj) {
  DLPackArg probs(probs_obj, "probs"), keys(keys_obj, "keys"), out(out_obj, "out");
  check_ndim(probs, 2);
  if (probs.dtype().code != kDLFloat || probs.dtype().bits != 32 || probs.dtype().lanes != 1) {
    throw py::value_error("probs must be float32");
  }
  if (probs.device().device_type != kDLCPU) throw py::value_error("probs must be a cpu tensor");
  if (probs.size(1) > 1 && probs.stride(1) != 1) throw py::value_error("probs rows must be contiguous");
  if (probs.size(1) == 0 || probs.size(1) > (int64_t{1} << 31) - 1) {
    throw py::value_error("probs must have between 1 and 2^31 - 1 columns (the vocabulary)");
  }
  const int64_t rows = probs.size(0);
  check_vector(keys, rows, kDLInt, 64, "int64");
  check_vector(out, rows, kDLInt, 64, "int64");
  if (out.read_only()) throw py::value_error("out must be writable");
  std::unique_ptr<DLPackArg> top_k_arg, top_p_arg, min_p_arg;
  SampleFromProbsArgs a;
  a.probs = reinterpret_cast<const float*>(probs.data());
  a.rows = rows;
  a.vocab = probs.size(1);
  a.row_stride = probs.stride(0);
  a.top_k = optional_vector<int64_t>(top_k_obj, "top_k", rows, kDLInt, 64, "int64", top_k_arg);
  a.top_p = optional_vector<float>(top_p_obj, "top_p", rows, kDLFloat, 32, "float32", top_p_arg);
  a.min_p = optional_vector<float>(min_p_obj, "min_p", rows, kDLFloat, 32, "float32", min_p_arg);
  a.keys = reinterpret_cast<const int64_t*>(keys.data());
  a.out = reinterpret_cast<int64_t*>(out.data());
  py::gil_scoped_release nogil;
  sample_from_probs_cpu(a);
}

}  // namespace

void register_sampling(py::module_& m) {
  m.def("sample_from_probs", &sample_from_probs, py::arg("probs"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"), py::arg("keys"), py::arg("out"),
        "out[r] = the token of row r drawn by lepton_kernels.sample_from_probs (cpu float32 tensors).");
  m.def("exponential_noise", &exponential_noise, py::arg("key"), py::arg("token"),
        "The race's Exp(1) noise of one token in the stream `key` (for tests).");
}

}  // namespace lepton
