// The DLPack ABI (https://dmlc.github.io/dlpack/latest/), written from the specification:
// just the structs a consumer of "dltensor" / "dltensor_versioned" capsules reads.
// Only layout matters here; the enum values are the specification's.
#pragma once

#include <cstdint>

extern "C" {

struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};

// DLDeviceType values used here (the specification lists more).
enum : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13 };

struct DLDevice {
  int32_t device_type;  // a C enum in the specification: int-sized
  int32_t device_id;
};

// DLDataTypeCode values: 7..14 are the 8-bit float formats (e3m4, e4m3, e4m3b11fnuz,
// e4m3fn, e4m3fnuz, e5m2, e5m2fnuz, e8m0fnu).
enum : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLFloat8First = 7,
                 kDLFloat8Last = 14 };

struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;            // add byte_offset before use
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;        // ndim entries
  int64_t* strides;      // ndim entries, in elements; NULL means compact row-major
  uint64_t byte_offset;
};

// Capsule name "dltensor"; a consumer renames it "used_dltensor" and calls deleter when done.
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);  // may be NULL
};

// Capsule name "dltensor_versioned" (DLPack >= 1.0); renamed "used_dltensor_versioned".
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);  // may be NULL
  uint64_t flags;
  DLTensor dl_tensor;
};

}  // extern "C"

constexpr uint64_t kDLPackFlagReadOnly = 1ULL << 0;
