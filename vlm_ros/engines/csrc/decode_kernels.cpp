// One-row CPU decode kernels for float32: a GEMV and a one-query attention that read their
// operands at the pace of a plain sum of the same bytes (vlm_ros/engines/native.py says why
// and how this is built; docs/performance.md has the measurements).
//
// Written with ATen's at::vec::Vectorized, so the same source builds for AVX-512, AVX2 and
// ARM NEON: the build passes the CPU_CAPABILITY macro and flags inductor picks for this CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

float horizontal_sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// dot(a, b) over n floats with four independent accumulators: one dependency chain of
// multiply-adds (what inductor's one-row reduction makes) holds a core below the memory's
// pace; four keep several cache lines in flight.
float dot(const float* a, const float* b, int64_t n) {
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t k = 0;
  for (; k + 4 * kLanes <= n; k += 4 * kLanes) {
    s0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + k + kLanes), Vec::loadu(b + k + kLanes), s1);
    s2 = at::vec::fmadd(Vec::loadu(a + k + 2 * kLanes), Vec::loadu(b + k + 2 * kLanes), s2);
    s3 = at::vec::fmadd(Vec::loadu(a + k + 3 * kLanes), Vec::loadu(b + k + 3 * kLanes), s3);
  }
  for (; k + kLanes <= n; k += kLanes) {
    s0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), s0);
  }
  float total = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; k < n; ++k) {
    total += a[k] * b[k];
  }
  return total;
}

// y [.., N] = x [.., K] (one row) @ weight [N, K]^T (+ bias): rows split across ATen's threads,
// each a contiguous run of the row-major weight, read once.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "vlm_ros::gemv takes float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1) && x.numel() == weight.size(1),
              "vlm_ros::gemv takes one row [.., K] and a weight [N, K]");
  auto w = weight.contiguous();
  auto row = x.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty(sizes, x.options());
  const float* wp = w.const_data_ptr<float>();
  const float* xp = row.const_data_ptr<float>();
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == n, "vlm_ros::gemv: bias must be float32 [N]");
    bp = b.const_data_ptr<float>();
  }
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float s = dot(wp + i * k, xp, k);
      yp[i] = bp == nullptr ? s : s + bp[i];
    }
  });
  return y;
}

// One head's share of attend_one: its query, its key/value head's rows (``k_pos``/``v_pos``
// floats apart), ``live`` slots, the scores' scratch and the output row.
struct Head {
  const float* q;
  const float* keys;
  int64_t k_pos;
  const float* values;
  int64_t v_pos;
  int64_t live;
  int64_t dim;
  float scale;
  float* scores;
  float* out;
};

// scores <- exp(scores - max), returns their sum: the softmax's numerators and denominator.
float exp_in_place(float* s, int64_t n) {
  const float top = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
  at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, s, s, n);
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s, n);
}

// Any head_dim: runtime loops, the accumulators in a stack array.
void attend_head(const Head& a) {
  constexpr int64_t kMaxVecs = 64;
  for (int64_t t = 0; t < a.live; ++t) {
    a.scores[t] = dot(a.keys + t * a.k_pos, a.q, a.dim) * a.scale;
  }
  const float total = exp_in_place(a.scores, a.live);
  Vec acc[kMaxVecs];
  const int64_t full = a.dim / kLanes, tail = a.dim - full * kLanes;
  for (int64_t j = 0; j <= full; ++j) acc[j] = Vec(0.f);
  for (int64_t t = 0; t < a.live; ++t) {
    const float* row = a.values + t * a.v_pos;
    const Vec p(a.scores[t]);
    for (int64_t j = 0; j < full; ++j) {
      acc[j] = at::vec::fmadd(Vec::loadu(row + j * kLanes), p, acc[j]);
    }
    if (tail > 0) {
      acc[full] = at::vec::fmadd(Vec::loadu(row + full * kLanes, tail), p, acc[full]);
    }
  }
  const Vec inv(1.f / total);
  for (int64_t j = 0; j < full; ++j) (acc[j] * inv).store(a.out + j * kLanes);
  if (tail > 0) (acc[full] * inv).store(a.out + full * kLanes, tail);
}

// head_dim = N vectors (Phi-2's 80 is 5 with AVX-512, 10 with AVX2): the query and the value
// accumulators stay in registers and the loops unroll, which the runtime form's stack array
// prevents (cache-resident it ran at half a plain sum's pace: compute-bound).
template <int N>
void attend_head_fixed(const Head& a) {
  Vec qv[N];
  for (int j = 0; j < N; ++j) qv[j] = Vec::loadu(a.q + j * kLanes);
  for (int64_t t = 0; t < a.live; ++t) {
    const float* row = a.keys + t * a.k_pos;
    Vec even(0.f), odd(0.f);  // two short chains; keys are independent, so several in flight
    for (int j = 0; j + 1 < N; j += 2) {
      even = at::vec::fmadd(Vec::loadu(row + j * kLanes), qv[j], even);
      odd = at::vec::fmadd(Vec::loadu(row + (j + 1) * kLanes), qv[j + 1], odd);
    }
    if (N % 2 == 1) even = at::vec::fmadd(Vec::loadu(row + (N - 1) * kLanes), qv[N - 1], even);
    a.scores[t] = horizontal_sum(even + odd) * a.scale;
  }
  const float total = exp_in_place(a.scores, a.live);
  Vec acc[N];
  for (int j = 0; j < N; ++j) acc[j] = Vec(0.f);
  for (int64_t t = 0; t < a.live; ++t) {
    const float* row = a.values + t * a.v_pos;
    const Vec p(a.scores[t]);
    for (int j = 0; j < N; ++j) acc[j] = at::vec::fmadd(Vec::loadu(row + j * kLanes), p, acc[j]);
  }
  const Vec inv(1.f / total);
  for (int j = 0; j < N; ++j) (acc[j] * inv).store(a.out + j * kLanes);
}

using HeadKernel = void (*)(const Head&);

// The unrolled form for head_dim a multiple of the vector width up to 16 vectors, else the
// runtime one.
HeadKernel head_kernel(int64_t dim) {
  if (dim % kLanes != 0) return attend_head;
  switch (dim / kLanes) {
    case 1: return attend_head_fixed<1>;
    case 2: return attend_head_fixed<2>;
    case 3: return attend_head_fixed<3>;
    case 4: return attend_head_fixed<4>;
    case 5: return attend_head_fixed<5>;
    case 6: return attend_head_fixed<6>;
    case 7: return attend_head_fixed<7>;
    case 8: return attend_head_fixed<8>;
    case 10: return attend_head_fixed<10>;
    case 12: return attend_head_fixed<12>;
    case 16: return attend_head_fixed<16>;
    default: return attend_head;
  }
}

// The decode step's attention for one new token: its key and value rows k, v [1, KVH, 1, D]
// written into the static cache keys, values [1, KVH, S, D] at slot ``position``, then
// softmax(q . K[:live] / sqrt(D)) @ V[:live] over the live = position + 1 slots, for the query
// q [1, H, 1, D] (H a multiple of KVH: grouped-query heads share a key/value head; no mask:
// one query sees every earlier slot). Per head: the scores (a dot product per key), a
// vectorised softmax, then the value rows summed into D/lanes accumulators: each live key
// and value is read once; the slots past ``live`` are never read.
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                      at::Tensor& values, int64_t position) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &keys, &values}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "vlm_ros::attend_one takes float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == 1, "vlm_ros::attend_one takes [1, heads, slots, head_dim] tensors");
  }
  TORCH_CHECK(q.size(2) == 1 && k.size(2) == 1 && v.size(2) == 1, "vlm_ros::attend_one takes one token's q, k, v");
  TORCH_CHECK(keys.sizes() == values.sizes(), "vlm_ros::attend_one: keys and values differ in shape");
  const int64_t heads = q.size(1), dim = q.size(3), kv_heads = keys.size(1), slots = keys.size(2);
  TORCH_CHECK(keys.size(3) == dim && k.size(1) == kv_heads && v.size(1) == kv_heads && k.size(3) == dim &&
                  v.size(3) == dim && heads % kv_heads == 0,
              "vlm_ros::attend_one: head shapes differ");
  TORCH_CHECK(position >= 0 && position < slots, "vlm_ros::attend_one: position ", position, " outside the cache's ",
              slots, " slots");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "vlm_ros::attend_one: a cache row must be contiguous");
  TORCH_CHECK(dim <= 64 * kLanes, "vlm_ros::attend_one: head_dim ", dim, " too large");
  keys.select(2, position).copy_(k.select(2, 0));
  values.select(2, position).copy_(v.select(2, 0));
  const int64_t live = position + 1;
  auto query = q.contiguous();
  auto out = at::empty_like(query);
  const float* qp = query.const_data_ptr<float>();
  const float* kp = keys.const_data_ptr<float>();
  const float* vp = values.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const int64_t k_head = keys.stride(1), k_pos = keys.stride(2);
  const int64_t v_head = values.stride(1), v_pos = values.stride(2);
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const HeadKernel kernel = head_kernel(dim);
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(live));
    for (int64_t h = begin; h < end; ++h) {
      const int64_t kv = h / group;
      kernel(Head{qp + h * dim, kp + kv * k_head, k_pos, vp + kv * v_head, v_pos, live, dim, scale, scores.data(),
                  op + h * dim});
    }
  });
  return out;
}

at::Tensor gemv_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return at::empty(sizes, x.options());
}

at::Tensor attend_one_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t) {
  return at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

TORCH_LIBRARY(vlm_ros, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, int position) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlm_ros, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("attend_one", &attend_one);
}

TORCH_LIBRARY_IMPL(vlm_ros, Meta, m) {
  m.impl("gemv", &gemv_meta);
  m.impl("attend_one", &attend_one_meta);
}
