// Tensors received through DLPack capsules, and the argument checks every entry point makes
// before it touches memory. Errors are ValueErrors (py::value_error) that name the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "dlpack.h"

namespace lepton {

namespace py = pybind11;

// Consumes a "dltensor" or "dltensor_versioned" capsule (an object with __dlpack__ is asked for
// one) and gives the producer its tensor back, through the deleter, when it goes out of scope.
class DLPackArg {
 public:
  DLPackArg(py::handle obj, std::string name) : name_(std::move(name)) {
    py::object capsule = py::reinterpret_borrow<py::object>(obj);
    if (!PyCapsule_CheckExact(capsule.ptr())) {
      if (!py::hasattr(obj, "__dlpack__")) {
        throw py::value_error(name_ + " must be a DLPack capsule or a tensor with __dlpack__, got " +
                              std::string(py::str(py::type::of(obj).attr("__name__"))));
      }
      capsule = obj.attr("__dlpack__")();
    }
    const char* kind = PyCapsule_GetName(capsule.ptr());
    if (kind != nullptr && std::strcmp(kind, "dltensor_versioned") == 0) {
      versioned_ = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule.ptr(), kind));
      if (versioned_ == nullptr) throw py::error_already_set();
      if (versioned_->version.major != 1) {
        versioned_ = nullptr;  // not ours to release: the producer's capsule still owns it
        throw py::value_error(name_ + ": unsupported DLPack major version");
      }
      PyCapsule_SetName(capsule.ptr(), "used_dltensor_versioned");
      t_ = &versioned_->dl_tensor;
      read_only_ = (versioned_->flags & kDLPackFlagReadOnly) != 0;
    } else if (kind != nullptr && std::strcmp(kind, "dltensor") == 0) {
      legacy_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), kind));
      if (legacy_ == nullptr) throw py::error_already_set();
      PyCapsule_SetName(capsule.ptr(), "used_dltensor");
      t_ = &legacy_->dl_tensor;
    } else {
      throw py::value_error(name_ + ": not an unused DLPack capsule (name " +
                            std::string(kind ? kind : "NULL") + "); a capsule can be consumed once");
    }
    if (t_->ndim < 0 || (t_->ndim > 0 && t_->shape == nullptr)) {
      release();  // a throwing constructor runs no destructor
      throw py::value_error(name_ + ": malformed DLPack tensor");
    }
  }
  ~DLPackArg() { release(); }
  DLPackArg(const DLPackArg&) = delete;
  DLPackArg& operator=(const DLPackArg&) = delete;

  const std::string& name() const { return name_; }
  int ndim() const { return t_->ndim; }
  int64_t size(int i) const { return t_->shape[i]; }
  int64_t itemsize() const { return (t_->dtype.bits + 7) / 8; }
  const DLDataType& dtype() const { return t_->dtype; }
  const DLDevice& device() const { return t_->device; }
  bool read_only() const { return read_only_; }
  char* data() const { return static_cast<char*>(t_->data) + t_->byte_offset; }

  // Stride of dimension i in elements (DLPack's NULL strides mean compact row-major).
  int64_t stride(int i) const {
    if (t_->strides != nullptr) return t_->strides[i];
    int64_t s = 1;
    for (int j = i + 1; j < t_->ndim; ++j) s *= t_->shape[j];
    return s;
  }
  int64_t stride_bytes(int i) const { return stride(i) * itemsize(); }

  bool contiguous() const {
    int64_t expected = 1;
    for (int i = t_->ndim - 1; i >= 0; --i) {
      if (size(i) != 1 && stride(i) != expected) return false;
      expected *= size(i);
    }
    return true;
  }

  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim(); ++i) s += (i ? ", " : "") + std::to_string(size(i));
    return s + "]";
  }

 private:
  void release() {
    if (versioned_ != nullptr && versioned_->deleter != nullptr) versioned_->deleter(versioned_);
    if (legacy_ != nullptr && legacy_->deleter != nullptr) legacy_->deleter(legacy_);
    versioned_ = nullptr;
    legacy_ = nullptr;
  }

  std::string name_;
  DLTensor* t_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
  DLManagedTensor* legacy_ = nullptr;
  bool read_only_ = false;
};

inline void check_ndim(const DLPackArg& a, int ndim) {
  if (a.ndim() != ndim) {
    throw py::value_error(a.name() + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          a.shape_str());
  }
}

inline void check_dim(const DLPackArg& a, int dim, int64_t expected, const std::string& what) {
  if (a.size(dim) != expected) {
    throw py::value_error(a.name() + ".shape[" + std::to_string(dim) + "] (" + std::to_string(a.size(dim)) +
                          ") must equal " + what + " (" + std::to_string(expected) + ")");
  }
}

// The element types a cache may hold: fp32, fp16, bf16, and 8-bit floats or bytes (raw copies).
inline void check_cache_dtype(const DLPackArg& a) {
  const DLDataType& d = a.dtype();
  bool ok = d.lanes == 1 && ((d.code == kDLFloat && (d.bits == 16 || d.bits == 32)) ||
                             (d.code == kDLBfloat && d.bits == 16) ||
                             (d.code >= kDLFloat8First && d.code <= kDLFloat8Last && d.bits == 8) ||
                             (d.code == kDLUInt && d.bits == 8));
  if (!ok) {
    throw py::value_error(a.name() + " must be float32, float16, bfloat16 or an 8-bit float, got DLPack dtype (code " +
                          std::to_string(d.code) + ", bits " + std::to_string(d.bits) + ", lanes " +
                          std::to_string(d.lanes) + ")");
  }
}

inline void check_same_dtype(const DLPackArg& a, const DLPackArg& ref) {
  const DLDataType &x = a.dtype(), &y = ref.dtype();
  if (x.code != y.code || x.bits != y.bits || x.lanes != y.lanes) {
    throw py::value_error(a.name() + " must have the dtype of " + ref.name());
  }
}

inline void check_index_dtype(const DLPackArg& a) {
  const DLDataType& d = a.dtype();
  if (d.code != kDLInt || d.bits != 64 || d.lanes != 1) {
    throw py::value_error(a.name() + " must be an int64 tensor");
  }
}

inline void check_same_device(const DLPackArg& a, const DLPackArg& ref) {
  if (a.device().device_type != ref.device().device_type || a.device().device_id != ref.device().device_id) {
    throw py::value_error(a.name() + " must be on the device of " + ref.name());
  }
}

inline void check_writable_cache(const DLPackArg& a) {
  if (!a.contiguous()) throw py::value_error(a.name() + " must be contiguous");
  if (a.read_only()) throw py::value_error(a.name() + " is read-only");
}

}  // namespace lepton
