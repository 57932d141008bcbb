// The exponential race of lepton_kernels.sample_from_probs on cpu (see the op's Python file for
// the math). Plain pointers, no Python: bindings in sampling_bindings.cpp.
#pragma once

#include <cstdint>

namespace lepton {

struct SampleFromProbsArgs {
  const float* probs;       // [rows, vocab], row r at probs + r * row_stride
  int64_t rows, vocab, row_stride;
  const int64_t* top_k;     // [rows] 0 = off, or nullptr: no row uses it
  const float* top_p;       // [rows] 1 = off, or nullptr
  const float* min_p;       // [rows] 0 = off, or nullptr
  const int64_t* keys;      // [rows] each row's noise key
  int64_t* out;             // [rows] the drawn token ids
};

// The race's Exp(1) noise of token `token` in the stream `key` (splitmix64, as the eager spec).
float exponential_noise(int64_t key, int64_t token);

void sample_from_probs_cpu(const SampleFromProbsArgs& a);

}  // namespace lepton
