// sample_from_probs on cpu: per row, the kept set {i : p_i >= t} and the exponential race over it,
// computed exactly as the eager spec does (lepton_kernels/ops/sample_from_probs.py): the same
// thresholds on the same float32 probabilities, float64 running masses summed in the same order,
// the same noise. The speed comes from doing per row what the spec does with batched tensor ops:
// one pass over the vocabulary to cut the candidates, a sort of the few that survive, and noise for
// the kept ones only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "sampling.h"

namespace lepton {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // splitmix64's increment
constexpr uint64_t kMul1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMul2 = 0x94D049BB133111EBULL;
constexpr double kCutShare = 16.0;                   // candidates.CUT_SHARE
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * kMul1;
  x = (x ^ (x >> 27)) * kMul2;
  return x ^ (x >> 31);
}

// Token ids of one row sorted by probability, descending; ties in any order (the spec keeps every
// token tied with a threshold, so their order never changes the kept set).
void sort_desc(std::vector<int32_t>& ids, const float* p) {
  std::sort(ids.begin(), ids.end(), [p](int32_t a, int32_t b) { return p[a] > p[b]; });
}

// The threshold t of one row from its candidates `ids` (sorted descending): the top_k-th largest
// probability, and p of the token that ends the shortest prefix whose float64 mass reaches top_p
// (of the top_k tokens' mass when top_k is on). `settled` is false when the candidates cannot
// decide it (fewer than top_k of them, or their mass falls short of the target).
float threshold(const std::vector<int32_t>& ids, const float* p, int64_t k, float top_p, bool all,
                bool& settled) {
  settled = true;
  const int64_t n = static_cast<int64_t>(ids.size());
  float t = kNegInf;
  float kth = kNegInf;
  int64_t kept_by_k = n;
  if (k > 0) {
    if (k > n) {
      settled = all;  // every token is a candidate: top_k keeps them all
      k = n;
    }
    kth = p[ids[k - 1]];
    t = kth;
    kept_by_k = k;
    while (kept_by_k < n && p[ids[kept_by_k]] >= kth) ++kept_by_k;  // ties with the k-th stay
  }
  if (top_p < 1.0f) {
    double target = top_p;
    if (k > 0) {
      double mass = 0.0;
      for (int64_t j = 0; j < kept_by_k; ++j) mass += p[ids[j]];
      target = mass * static_cast<double>(top_p);
    }
    double mass = 0.0;
    int64_t last = kept_by_k - 1;
    bool reached = false;
    for (int64_t j = 0; j < kept_by_k; ++j) {
      mass += p[ids[j]];
      if (mass >= target) {
        last = j;
        reached = true;
        break;
      }
    }
    if (!reached && !all) settled = false;
    if (last >= 0) t = std::max(t, p[ids[last]]);
  }
  return t;
}

int64_t race_row(const float* p, int64_t vocab, int64_t top_k, float top_p, float min_p, int64_t key,
                 std::vector<int32_t>& ids) {
  float pmax = kNegInf;
  for (int64_t i = 0; i < vocab; ++i) pmax = std::max(pmax, p[i]);
  const float floor = min_p > 0.0f ? pmax * min_p : kNegInf;
  const bool by_k = top_k > 0 && top_k < vocab;
  const bool by_p = top_p < 1.0f;
  int64_t best = 0;
  float best_w = -1.0f;
  auto race = [&](int32_t i) {
    const float w = p[i] / exponential_noise(key, i);
    if (w > best_w) {
      best_w = w;
      best = i;
    }
  };
  if (!by_k && !by_p) {  // min_p alone, or no filter: one pass over the vocabulary
    for (int64_t i = 0; i < vocab; ++i) {
      if (p[i] >= floor) race(static_cast<int32_t>(i));
    }
    return best;
  }
  // First guess: the tokens a top_p row can plausibly keep (p >= CUT_SHARE (1 - top_p) / V,
  // capped at 1 / V so the top token is one); a top_k-only row starts from its min_p floor.
  ids.clear();
  bool all = false;
  if (by_p) {
    const float share = static_cast<float>(
        std::min((1.0 - top_p) * (kCutShare / static_cast<double>(vocab)), 1.0 / static_cast<double>(vocab)));
    for (int64_t i = 0; i < vocab; ++i) {
      if (p[i] >= share) ids.push_back(static_cast<int32_t>(i));
    }
  } else {
    for (int64_t i = 0; i < vocab; ++i) {
      if (p[i] >= floor) ids.push_back(static_cast<int32_t>(i));
    }
    all = floor == kNegInf;
    if (all && top_k < vocab / 4) {  // keep the top_k (and their ties) only, then sort those
      std::nth_element(ids.begin(), ids.begin() + (top_k - 1), ids.end(),
                       [p](int32_t a, int32_t b) { return p[a] > p[b]; });
      const float kth = p[ids[top_k - 1]];
      ids.erase(std::remove_if(ids.begin(), ids.end(), [p, kth](int32_t i) { return p[i] < kth; }), ids.end());
    }
  }
  if (!by_p && !all && top_k > static_cast<int64_t>(ids.size())) {
    // Fewer than top_k tokens reach the floor: the k-th largest lies under it, the floor decides.
    for (int32_t i : ids) race(i);
    return best;
  }
  sort_desc(ids, p);
  bool settled;
  float t = threshold(ids, p, by_k ? top_k : 0, top_p, all, settled);
  if (!settled) {  // the guess missed: every token, sorted
    ids.resize(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    sort_desc(ids, p);
    t = threshold(ids, p, by_k ? top_k : 0, top_p, true, settled);
  }
  t = std::max(t, floor);
  for (int32_t i : ids) {
    if (p[i] < t) break;  // sorted: the kept tokens are a prefix
    race(i);
  }
  return best;
}

}  // namespace

float exponential_noise(int64_t key, int64_t token) {
  const uint64_t bits = mix64(static_cast<uint64_t>(key) + static_cast<uint64_t>(token) * kGolden) &
                        ((uint64_t{1} << 52) - 1);
  // (bits + 1/2) / 2^52 is exact in double, never 0 or 1: E is finite and positive.
  const double u = static_cast<double>(bits) * 0x1p-52 + 0x1p-53;
  return static_cast<float>(-std::log(u));
}

void sample_from_probs_cpu(const SampleFromProbsArgs& a) {
  std::vector<int32_t> ids;
  ids.reserve(1024);
  for (int64_t r = 0; r < a.rows; ++r) {
    a.out[r] = race_row(a.probs + r * a.row_stride, a.vocab, a.top_k ? a.top_k[r] : 0,
                        a.top_p ? a.top_p[r] : 1.0f, a.min_p ? a.min_p[r] : 0.0f, a.keys[r], ids);
  }
}

}  // namespace lepton
