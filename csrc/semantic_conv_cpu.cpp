// Native CPU convolution over the one-hot of a semantic map, without the one-hot; registered in csrc/ops.cpp as
// torch.ops.svq_fast.semantic_conv_forward / semantic_conv_backward.
//
//   out[b, o, y, x] = bias[o] + sum_{dy, dx} weight[o, s[b, y + dy - p, x + dx - p], dy, dx]
//   over in-bounds taps whose label is not ignore_index (p = k / 2): conv2d(onehot(s), weight, bias, padding=p).
//
// Setup: the weight is transposed once into a table (C * k * k, Cout) in the accumulation dtype (fp32; fp64 for
// fp64 weights), row c * k * k + dy * k + dx, so each tap is one contiguous Cout-vector; the labels are copied into
// an int32 map padded by p on each side with -1 at ignore pixels and in the border, so the hot loops have no bounds
// or ignore tests beyond `label >= 0`. Building that map validates the ids (outside [0, C) and not ignore: error).
//
// Forward: parallel over image rows (b, y) with at::parallel_for. For each pixel the table rows of its valid taps
// are added (contiguous Cout-vectors, SIMD via target_clones avx512f / avx2 / default) onto the bias in a per-thread
// channels-last (W, Cout) row buffer that stays in L1/L2; the row is then transposed into the (B, Cout, H, W)
// output (8 x 8 AVX2 register transposes for fp32, a scalar loop otherwise), converting to the weight dtype.
// Work: k * k * Cout adds per pixel, against 2 * C * k * k * Cout flops for the conv over the one-hot.
//
// Backward: each dout row (Cout, W) is transposed into a (W, Cout) buffer, then
// dW_table[c * k * k + t, :] += dout[b, :, y, x] for every pixel and valid tap t whose label is c;
// dbias = sum of dout. The rows are split into `num_partitions` fixed contiguous ranges (default: the torch thread
// count), each partition accumulates into its own (C * k * k + 1, Cout) buffer (the extra row is dbias) and the
// partitions are summed in partition order: the result depends only on num_partitions, not on thread scheduling.
// Memory: num_partitions * (C * k * k + 1) * Cout accumulators (1.1 MiB each for C=243, k=3, Cout=128).
// All scratch is allocated through torch's allocator on the calling thread, so memory profilers see it.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// SIMD variants picked at load time on x86-64; a plain build elsewhere.
#if defined(__x86_64__)
#define SVQ_SC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SVQ_SC_CLONES
#endif

namespace svq_fast {
namespace {

// dst[0:n] += src[0:n]
template <typename T>
__attribute__((always_inline)) inline void add_vec(T* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// One output pixel: acc[0:cout] = init[0:cout] (or 0) + sum_{i < nv} rows[i][0:cout]. The accumulator row
// (Cout values) stays in L1 across the taps.
template <typename T>
__attribute__((always_inline)) inline void gather_pixel_impl(const T* const* rows, int nv, const T* __restrict init,
                                                             T* __restrict acc, int64_t cout) {
  if (init != nullptr) {
    std::copy(init, init + cout, acc);
  } else {
    std::fill(acc, acc + cout, T(0));
  }
  for (int i = 0; i < nv; ++i) add_vec(acc, rows[i], cout);
}

// Forward over one image row: lrows[dy] are the k padded label rows (length W + 2p), acc is (W, cout).
template <typename T>
__attribute__((always_inline)) inline void forward_row_impl(const int32_t* const* lrows, int64_t k, int64_t W,
                                                            const T* __restrict table, const T* __restrict bias,
                                                            int64_t cout, const T** rows, T* __restrict acc) {
  const int64_t kk = k * k;
  for (int64_t x = 0; x < W; ++x) {
    int nv = 0;
    for (int64_t dy = 0; dy < k; ++dy) {
      const int32_t* lr = lrows[dy] + x;
      for (int64_t dx = 0; dx < k; ++dx) {
        const int32_t l = lr[dx];
        if (l >= 0) rows[nv++] = table + (static_cast<int64_t>(l) * kk + dy * k + dx) * cout;
      }
    }
    gather_pixel_impl<T>(rows, nv, bias, acc + x * cout, cout);
  }
}

SVQ_SC_CLONES void forward_row(const int32_t* const* lrows, int64_t k,
                                                                               int64_t W, const float* table,
                                                                               const float* bias, int64_t cout,
                                                                               const float** rows, float* acc) {
  forward_row_impl<float>(lrows, k, W, table, bias, cout, rows, acc);
}

SVQ_SC_CLONES void forward_row(const int32_t* const* lrows, int64_t k,
                                                                               int64_t W, const double* table,
                                                                               const double* bias, int64_t cout,
                                                                               const double** rows, double* acc) {
  forward_row_impl<double>(lrows, k, W, table, bias, cout, rows, acc);
}

// Backward over one image row: g is (W, cout) channels-last; part is this partition's (C * k * k + 1, cout)
// accumulator (last row: dbias).
template <typename T>
__attribute__((always_inline)) inline void backward_row_impl(const int32_t* const* lrows, int64_t k, int64_t W,
                                                             const T* __restrict g, int64_t cout, int64_t num_rows,
                                                             bool need_w, bool need_b, T* __restrict part) {
  const int64_t kk = k * k;
  if (need_b) {
    T* __restrict gb = part + (num_rows - 1) * cout;
    for (int64_t x = 0; x < W; ++x) add_vec(gb, g + x * cout, cout);
  }
  if (!need_w) return;
  for (int64_t x = 0; x < W; ++x) {
    const T* gx = g + x * cout;
    for (int64_t dy = 0; dy < k; ++dy) {
      const int32_t* lr = lrows[dy] + x;
      for (int64_t dx = 0; dx < k; ++dx) {
        const int32_t l = lr[dx];
        if (l >= 0) add_vec(part + (static_cast<int64_t>(l) * kk + dy * k + dx) * cout, gx, cout);
      }
    }
  }
}

SVQ_SC_CLONES void backward_row(const int32_t* const* lrows, int64_t k,
                                                                                int64_t W, const float* g,
                                                                                int64_t cout, int64_t num_rows,
                                                                                bool need_w, bool need_b, float* part) {
  backward_row_impl<float>(lrows, k, W, g, cout, num_rows, need_w, need_b, part);
}

SVQ_SC_CLONES void backward_row(const int32_t* const* lrows, int64_t k,
                                                                                int64_t W, const double* g,
                                                                                int64_t cout, int64_t num_rows,
                                                                                bool need_w, bool need_b,
                                                                                double* part) {
  backward_row_impl<double>(lrows, k, W, g, cout, num_rows, need_w, need_b, part);
}

#if defined(__x86_64__)
// dst[o * ld + x] = src[x * ls + o] for an 8 x 8 fp32 block, in AVX2 registers.
__attribute__((target("avx2"))) inline void transpose8x8_avx2(const float* src, int64_t ls, float* dst, int64_t ld) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * ls), r1 = _mm256_loadu_ps(src + 1 * ls);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ls), r3 = _mm256_loadu_ps(src + 3 * ls);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ls), r5 = _mm256_loadu_ps(src + 5 * ls);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ls), r7 = _mm256_loadu_ps(src + 7 * ls);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

// dst[o * ld + x] = src[x * ls + o] for x < nx, o < no: channels-last row -> channel-major row, and back.
template <typename S, typename D>
void transpose_rows(const S* src, int64_t ls, int64_t nx, int64_t no, D* dst, int64_t ld) {
  int64_t x0 = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    if (avx2) {
      for (; x0 + 8 <= nx; x0 += 8) {
        int64_t o0 = 0;
        for (; o0 + 8 <= no; o0 += 8) transpose8x8_avx2(src + x0 * ls + o0, ls, dst + o0 * ld + x0, ld);
        for (; o0 < no; ++o0) {
          for (int64_t x = x0; x < x0 + 8; ++x) dst[o0 * ld + x] = src[x * ls + o0];
        }
      }
    }
  }
#endif
  for (; x0 < nx; x0 += 16) {  // generic: 16 pixels at a time so the strided reads stay in L1
    const int64_t x1 = std::min(nx, x0 + 16);
    for (int64_t o = 0; o < no; ++o) {
      D* d = dst + o * ld;
      for (int64_t x = x0; x < x1; ++x) d[x] = static_cast<D>(src[x * ls + o]);
    }
  }
}

void check_inputs(const at::Tensor& labels, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (B, H, W), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be (Cout, C, k, k), got ", weight.sizes());
  TORCH_CHECK(weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1, op,
              ": square odd kernels only, got ", weight.size(2), "x", weight.size(3));
  TORCH_CHECK(labels.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only (got ", labels.device(),
              " and ", weight.device(), ")");
  const auto st = weight.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": unsupported dtype ", st, " (float32, float64, float16, bfloat16)");
  TORCH_CHECK(weight.size(1) < (int64_t{1} << 31), op, ": too many classes");
}

// labels (B, H, W) int64 -> (B, H + 2p, W + 2p) int32: the class id, or -1 at ignore pixels and in the border.
// Raises when a label is outside [0, C) and not ignore_index.
at::Tensor padded_labels(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index, int64_t pad,
                         const char* op) {
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  const at::Tensor lc = labels.contiguous();
  at::Tensor out = at::full({B, Hp, Wp}, -1, lc.options().dtype(at::kInt));
  const int64_t* src = lc.const_data_ptr<int64_t>();
  int32_t* dst = out.mutable_data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_id{0};
  at::parallel_for(0, B * H, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, y = r % H;
      const int64_t* s = src + r * W;
      int32_t* d = dst + (b * Hp + y + pad) * Wp + pad;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t l = s[x];
        if (l == ignore_index) continue;
        if (l < 0 || l >= num_classes) {
          if (!bad.exchange(true)) bad_id.store(l);
          continue;
        }
        d[x] = static_cast<int32_t>(l);
      }
    }
  });
  TORCH_CHECK(!bad.load(), op, ": semantic map holds class id ", bad_id.load(), " outside [0, ", num_classes,
              ") (ignore id ", ignore_index, ")");
  return out;
}

}  // namespace

// labels (B, H, W) int64, weight (Cout, C, k, k), bias (Cout,) or None -> (B, Cout, H, W) in weight's dtype.
at::Tensor semantic_conv_forward_cpu(const at::Tensor& labels, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t ignore_index) {
  const char* op = "svq_fast::semantic_conv_forward";
  check_inputs(labels, weight, op);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t Cout = weight.size(0), C = weight.size(1), k = weight.size(2), pad = k / 2;
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == weight.scalar_type(), op,
                ": bias must be (", Cout, ",) of the weight's dtype, got ", bias->sizes(), " ", bias->scalar_type());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  at::Tensor out = at::empty({B, Cout, H, W}, weight.options());
  if (B * H * W == 0 || Cout == 0) return out;
  const at::Tensor pl = padded_labels(labels, C, ignore_index, pad, op);  // (B, Hp, Wp) int32
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  const auto acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // (C * k * k, Cout) table in the accumulation dtype: row c * k * k + dy * k + dx
  const at::Tensor table = weight.detach().permute({1, 2, 3, 0}).to(acc_type).contiguous();
  const at::Tensor bias_acc = has_bias ? bias->detach().to(acc_type).contiguous() : at::Tensor();
  const int64_t n_threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor scratch = at::empty({n_threads, W * Cout}, table.options());  // per-thread (W, Cout) row buffer

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "svq_fast::semantic_conv_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* tp = table.const_data_ptr<acc_t>();
    const acc_t* bp = has_bias ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    const int32_t* lp = pl.const_data_ptr<int32_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < n_threads);
      acc_t* acc = scratch.mutable_data_ptr<acc_t>() + tid * W * Cout;  // (W, Cout)
      std::vector<const acc_t*> rows(k * k);
      std::vector<const int32_t*> lrows(k);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, y = r % H;
        for (int64_t dy = 0; dy < k; ++dy) lrows[dy] = lp + (b * Hp + y + dy) * Wp;
        forward_row(lrows.data(), k, W, tp, bp, Cout, rows.data(), acc);
        transpose_rows(acc, Cout, W, Cout, op_ + (b * Cout * H + y) * W, H * W);  // (W, Cout) -> out[b, :, y, :]
      }
    });
  });
  return out;
}

// grad_out (B, Cout, H, W) -> (grad_weight (Cout, C, k, k) or empty, grad_bias (Cout,) or empty), weight's dtype.
// num_partitions: how many fixed row ranges are accumulated separately and summed in order (0: the thread count).
std::tuple<at::Tensor, at::Tensor> semantic_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& labels,
                                                              const at::Tensor& weight, int64_t ignore_index,
                                                              bool need_weight, bool need_bias,
                                                              int64_t num_partitions) {
  const char* op = "svq_fast::semantic_conv_backward";
  check_inputs(labels, weight, op);
  const int64_t Cout = weight.size(0), C = weight.size(1), k = weight.size(2), pad = k / 2, kk = k * k;
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == Cout && grad_out.size(2) == H &&
                  grad_out.size(3) == W,
              op, ": grad_out must be (", B, ", ", Cout, ", ", H, ", ", W, "), got ", grad_out.sizes());
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_w = at::empty({0}, weight.options());
  at::Tensor grad_b = at::empty({0}, weight.options());
  if (!need_weight && !need_bias) return {grad_w, grad_b};
  const int64_t R = B * H;
  const int64_t num_rows = C * kk + 1;  // table rows + the dbias row
  if (num_partitions <= 0) num_partitions = std::max<int64_t>(1, at::get_num_threads());
  num_partitions = std::max<int64_t>(1, std::min(num_partitions, R));
  at::Tensor parts = at::zeros({num_partitions, num_rows, Cout}, weight.options().dtype(acc_type));
  if (R * W > 0 && Cout > 0) {
    const at::Tensor pl = padded_labels(labels, C, ignore_index, pad, op);  // (B, Hp, Wp) int32
    const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
    const at::Tensor gc = grad_out.detach().to(weight.scalar_type()).contiguous();  // (B, Cout, H, W)
    const int64_t n_threads = std::max<int64_t>(1, at::get_num_threads());
    at::Tensor scratch = at::empty({n_threads, W * Cout}, parts.options());  // per-thread (W, Cout) gradient row
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "svq_fast::semantic_conv_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = gc.const_data_ptr<scalar_t>();
      const int32_t* lp = pl.const_data_ptr<int32_t>();
      acc_t* pp = parts.mutable_data_ptr<acc_t>();
      at::parallel_for(0, num_partitions, 1, [&](int64_t p0, int64_t p1) {
        const int64_t tid = at::get_thread_num();
        TORCH_INTERNAL_ASSERT(tid >= 0 && tid < n_threads);
        acc_t* gbuf = scratch.mutable_data_ptr<acc_t>() + tid * W * Cout;  // (W, Cout)
        std::vector<const int32_t*> lrows(k);
        for (int64_t p = p0; p < p1; ++p) {
          acc_t* part = pp + p * num_rows * Cout;
          const int64_t r_begin = R * p / num_partitions, r_end = R * (p + 1) / num_partitions;
          for (int64_t r = r_begin; r < r_end; ++r) {
            const int64_t b = r / H, y = r % H;
            // grad_out[b, :, y, :] (Cout, W) -> gbuf (W, Cout) in the accumulation dtype
            transpose_rows(gp + (b * Cout * H + y) * W, H * W, Cout, W, gbuf, Cout);
            for (int64_t dy = 0; dy < k; ++dy) lrows[dy] = lp + (b * Hp + y + dy) * Wp;
            backward_row(lrows.data(), k, W, gbuf, Cout, num_rows, need_weight, need_bias, part);
          }
        }
      });
    });
  }
  // Sum the partitions in order (deterministic), then table (C * k * k, Cout) -> (Cout, C, k, k).
  at::Tensor total = parts[0];
  for (int64_t p = 1; p < num_partitions; ++p) total = total + parts[p];
  if (need_weight) {
    grad_w = total.narrow(0, 0, C * kk).view({C, k, k, Cout}).permute({3, 0, 1, 2}).to(weight.scalar_type())
                 .contiguous();
  }
  if (need_bias) grad_b = total[num_rows - 1].to(weight.scalar_type()).contiguous();
  return {grad_w, grad_b};
}

}  // namespace svq_fast
