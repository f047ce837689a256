// Native CPU vector quantization (forward + backward), registered in csrc/ops.cpp as
// torch.ops.svq_fast.vq_forward / vq_backward.
//
// Forward: rows of z are split into blocks of `block_n`; each block is handled by one OpenMP thread (dynamic
// schedule).
// For every codebook block of `block_k` codes the thread computes S = z_blk @ e_blk^T with a single-threaded
// BLAS call into a private (block_n, block_k) scratch buffer and reduces it immediately into a running
// min / argmin of ||e||^2 - 2 z.e, so the (N, K) distance matrix never exists: extra memory is
// threads * block_n * block_k floats (1 MiB per thread with the defaults) instead of N * K.
// The epilogue gathers e[idx] into z_q (bit-exact copy in the input dtype) and recomputes the exact squared
// distance ||z - e[idx]||^2 in the compute dtype (fp32, or fp64 for fp64 inputs), which is also the per-row
// loss term.
//
// Backward: dL/dz = g_zq + coef_z * (z - e[idx]) row-parallel; dL/de_k = coef_e * (count_k e_k - sum_{idx_n=k} z_n)
// with a counting sort of the indices (stable: rows in increasing order) and a code-parallel segment sum, so
// the result is deterministic and independent of the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>  // per-thread D-length accumulators in the backward

namespace svq_fast {
namespace {

constexpr int kLanes = 16;

// Reduce rows of s (rows, kb), row stride kb, into running (best, best_idx):
//   v[i, k] = esq[k] - 2 * s[i, k];  best[i] = min(best[i], min_k v[i, k]) with first-index tie-break.
// Lane-parallel running minima (kLanes independent lanes) keep the loop branch-free so it vectorizes.
template <typename T>
__attribute__((always_inline)) inline void reduce_block_impl(const T* __restrict s, const T* __restrict esq,
                                                             int64_t rows, int64_t kb, int64_t k0,
                                                             T* __restrict best, int64_t* __restrict best_idx) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict si = s + i * kb;
    T bv[kLanes];
    int32_t bi[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      bv[l] = inf;
      bi[l] = 0;
    }
    int64_t k = 0;
    for (; k + kLanes <= kb; k += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const T v = esq[k + l] - T(2) * si[k + l];
        const bool m = v < bv[l];
        bv[l] = m ? v : bv[l];
        bi[l] = m ? static_cast<int32_t>(k + l) : bi[l];
      }
    }
    T b = best[i];
    int64_t bidx = best_idx[i];
    // Lanes hold candidates from this block (indices >= k0 > any index in b): ties with b keep b,
    // ties between lanes keep the smaller index.
    T cb = inf;
    int64_t cidx = -1;
    for (int l = 0; l < kLanes; ++l) {
      const int64_t idx = k0 + bi[l];
      if (bv[l] < cb || (bv[l] == cb && bv[l] != inf && idx < cidx)) {
        cb = bv[l];
        cidx = idx;
      }
    }
    if (cidx >= 0 && cb < b) {
      b = cb;
      bidx = cidx;
    }
    for (; k < kb; ++k) {  // tail: indices larger than every lane index
      const T v = esq[k] - T(2) * si[k];
      if (v < b) {
        b = v;
        bidx = k0 + k;
      }
    }
    best[i] = b;
    best_idx[i] = bidx;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void reduce_block(const float* s, const float* esq,
                                                                               int64_t rows, int64_t kb, int64_t k0,
                                                                               float* best, int64_t* best_idx) {
  reduce_block_impl<float>(s, esq, rows, kb, k0, best, best_idx);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void reduce_block(const double* s, const double* esq,
                                                                               int64_t rows, int64_t kb, int64_t k0,
                                                                               double* best, int64_t* best_idx) {
  reduce_block_impl<double>(s, esq, rows, kb, k0, best, best_idx);
}

// Runs fn(thread_id, block) for block in [0, n_blocks) on n_threads OpenMP threads with dynamic scheduling
// (a thread slowed by other processes on a shared machine does not hold the others up), thread_id in
// [0, n_threads). Worker threads get the autograd-skipping dispatch guard (thread-local state is not inherited);
// the first exception is rethrown on the calling thread.
template <typename F>
void parallel_blocks(int64_t n_blocks, int64_t n_threads, const F& fn) {
#ifdef _OPENMP
  if (n_threads > 1 && n_blocks > 1 && !omp_in_parallel()) {
    std::exception_ptr error;
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(static_cast<int>(std::min(n_threads, n_blocks)))
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      const int64_t tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n_blocks; ++b) {
        if (failed.load(std::memory_order_relaxed)) continue;
        try {
          fn(tid, b);
        } catch (...) {
#pragma omp critical(svq_fast_error)
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  at::AutoDispatchBelowADInplaceOrView guard;
  for (int64_t b = 0; b < n_blocks; ++b) fn(0, b);
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, op, ": expected z (N, D) and codebook (K, D), got z ",
              z.sizes(), " and codebook ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z has D=", z.size(1), " but the codebook has D=",
              codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, op, ": empty codebook");
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), op, ": CPU tensors only (got ", z.device(),
              " and ", codebook.device(), ")");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op, ": z and codebook dtypes differ (", z.scalar_type(),
              " vs ", codebook.scalar_type(), "); cast them to one dtype first");
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": unsupported dtype ", st, " (float32, float64, float16, bfloat16)");
}

void check_out(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(),
              "svq_fast: output ", name, " must be a contiguous CPU tensor of shape ", sizes, " and dtype ", dtype,
              ", got shape ", t.sizes(), ", dtype ", t.scalar_type());
}

}  // namespace

// z (N, D), codebook (K, D) -> writes indices (N,) int64, min_dist (N,) compute dtype, z_q (N, D) dtype of z.
void vq_forward_out_cpu(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& min_dist,
                        at::Tensor& z_q, int64_t block_n, int64_t block_k) {
  check_inputs(z, codebook, "svq_fast::vq_forward");
  at::AutoDispatchBelowADInplaceOrView guard;  // internal ATen calls are not recorded by autograd
  TORCH_CHECK(block_n >= 1 && block_k >= 1, "svq_fast::vq_forward: block_n and block_k must be >= 1");
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const auto ct = compute_type(z.scalar_type());
  check_out(indices, {N}, at::kLong, "indices");
  check_out(min_dist, {N}, ct, "min_dist");
  check_out(z_q, {N, D}, z.scalar_type(), "z_q");
  if (N == 0) return;
  // detach: worker threads of parallel_for do not inherit the caller's grad mode / dispatch guards
  const at::Tensor zc = z.detach().to(ct).contiguous();         // (N, D) no copy for contiguous fp32/fp64
  const at::Tensor ec = codebook.detach().to(ct).contiguous();  // (K, D)
  const at::Tensor cb = codebook.detach().contiguous();         // (K, D) source of the bit-exact z_q gather
  block_k = std::min(block_k, K);
  block_n = std::min(block_n, N);
  const int64_t n_blocks = (N + block_n - 1) / block_n;
  const size_t row_bytes = static_cast<size_t>(D) * cb.element_size();

  AT_DISPATCH_FLOATING_TYPES(ct, "svq_fast::vq_forward", [&] {
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    const char* cbp = static_cast<const char*>(cb.const_data_ptr());
    char* zqp = static_cast<char*>(z_q.mutable_data_ptr());
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    scalar_t* dp = min_dist.mutable_data_ptr<scalar_t>();

    at::Tensor esq_t = at::empty({K}, zc.options());  // (K,) ||e_k||^2
    scalar_t* esq = esq_t.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K, 256, [&](int64_t k_begin, int64_t k_end) {
      for (int64_t k = k_begin; k < k_end; ++k) {
        const scalar_t* e = ep + k * D;
        scalar_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += e[d] * e[d];
        esq[k] = acc;
      }
    });

    // Per-thread scratch, allocated here on the calling thread through the c10 allocator (so memory profilers
    // see it): (threads, block_n, block_k) scores + (threads, block_n) running min / argmin.
    const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blocks));
    at::Tensor scratch_all = at::empty({n_threads, block_n * block_k + block_n}, zc.options());
    at::Tensor best_idx_all = at::empty({n_threads, block_n}, z.options().dtype(at::kLong));
    parallel_blocks(n_blocks, n_threads, [&](int64_t tid, int64_t b) {
      scalar_t* scratch = scratch_all.mutable_data_ptr<scalar_t>() + tid * (block_n * block_k + block_n);
      scalar_t* best = scratch + block_n * block_k;                                 // (block_n,)
      int64_t* best_idx = best_idx_all.mutable_data_ptr<int64_t>() + tid * block_n;  // (block_n,)
      const auto opts = zc.options();
      {
        const int64_t r0 = b * block_n;
        const int64_t rows = std::min(block_n, N - r0);
        const at::Tensor zb = zc.narrow(0, r0, rows);  // (rows, D)
        std::fill(best, best + block_n, std::numeric_limits<scalar_t>::infinity());
        std::fill(best_idx, best_idx + block_n, 0);
        for (int64_t k0 = 0; k0 < K; k0 += block_k) {
          const int64_t kb = std::min(block_k, K - k0);
          at::Tensor s = at::from_blob(scratch, {rows, kb}, opts);  // (rows, kb) view of this thread's scratch
          at::mm_out(s, zb, ec.narrow(0, k0, kb).t());             // single-threaded inside the parallel region
          TORCH_INTERNAL_ASSERT(s.const_data_ptr() == scratch);
          reduce_block(scratch, esq + k0, rows, kb, k0, best, best_idx);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t n = r0 + i;
          const int64_t k = best_idx[i];
          ip[n] = k;
          std::memcpy(zqp + n * row_bytes, cbp + k * row_bytes, row_bytes);
          const scalar_t* zr = zp + n * D;
          const scalar_t* er = ep + k * D;
          scalar_t acc = 0;
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t diff = zr[d] - er[d];
            acc += diff * diff;
          }
          dp[n] = acc;
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_forward_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                              int64_t block_n, int64_t block_k) {
  check_inputs(z, codebook, "svq_fast::vq_forward");
  const int64_t N = z.size(0), D = z.size(1);
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor min_dist = at::empty({N}, z.options().dtype(compute_type(z.scalar_type())));
  at::Tensor z_q = at::empty({N, D}, z.options());
  vq_forward_out_cpu(z, codebook, indices, min_dist, z_q, block_n, block_k);
  return {indices, min_dist, z_q};
}

// grad_z (N, D) dtype of z:          dL/dz   = grad_zq + coef_z * (z - e[idx])
// grad_codebook (K, D) its dtype:    dL/de_k = coef_e * (count_k * e_k - sum_{n: idx_n = k} z_n)
// Each output is written only when given.
void vq_backward_out_cpu(const std::optional<at::Tensor>& grad_zq, const at::Tensor& z, const at::Tensor& codebook,
                         const at::Tensor& indices, double coef_z, double coef_e,
                         const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_codebook) {
  check_inputs(z, codebook, "svq_fast::vq_backward");
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == N && indices.scalar_type() == at::kLong,
              "svq_fast::vq_backward: indices must be (N,) int64 with N=", N);
  const bool has_g = grad_zq.has_value() && grad_zq->defined();
  if (has_g) {
    TORCH_CHECK(grad_zq->sizes() == z.sizes(), "svq_fast::vq_backward: grad_zq must have the shape of z");
  }
  const bool need_z = grad_z.has_value() && grad_z->defined();
  const bool need_e = grad_codebook.has_value() && grad_codebook->defined();
  if (need_z) check_out(*grad_z, z.sizes(), z.scalar_type(), "grad_z");
  if (need_e) check_out(*grad_codebook, codebook.sizes(), codebook.scalar_type(), "grad_codebook");
  if (!need_z && !need_e) return;
  const auto ct = compute_type(z.scalar_type());
  const at::Tensor zc = z.detach().to(ct).contiguous();
  const at::Tensor ec = codebook.detach().to(ct).contiguous();
  const at::Tensor ic = indices.contiguous();
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(ip[n] >= 0 && ip[n] < K, "svq_fast::vq_backward: index ", ip[n], " at row ", n,
                " is outside the codebook [0, ", K, ")");
  }

  AT_DISPATCH_FLOATING_TYPES(ct, "svq_fast::vq_backward", [&] {
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* ep = ec.const_data_ptr<scalar_t>();
    if (need_z) {
      // compute-dtype result: written in place when the output already has that dtype
      at::Tensor gz = grad_z->scalar_type() == ct ? *grad_z : at::empty({N, D}, zc.options());
      at::Tensor gc;
      const scalar_t* gp = nullptr;
      if (has_g) {
        gc = grad_zq->detach().to(ct).contiguous();
        gp = gc.const_data_ptr<scalar_t>();
      }
      scalar_t* op = gz.mutable_data_ptr<scalar_t>();
      const scalar_t cz = static_cast<scalar_t>(coef_z);
      at::parallel_for(0, N, 64, [&](int64_t n_begin, int64_t n_end) {
        for (int64_t n = n_begin; n < n_end; ++n) {
          const scalar_t* zr = zp + n * D;
          const scalar_t* er = ep + ip[n] * D;
          scalar_t* o = op + n * D;
          if (gp != nullptr) {
            const scalar_t* g = gp + n * D;
            for (int64_t d = 0; d < D; ++d) o[d] = g[d] + cz * (zr[d] - er[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) o[d] = cz * (zr[d] - er[d]);
          }
        }
      });
      if (!gz.is_same(*grad_z)) grad_z->copy_(gz);
    }
    if (need_e) {
      // Counting sort of rows by code (stable: increasing row order inside a code).
      at::Tensor sort_buf = at::zeros({2 * K + 1 + N}, ic.options());  // start (K+1), fill (K), order (N)
      int64_t* start = sort_buf.mutable_data_ptr<int64_t>();
      int64_t* fill = start + K + 1;
      int64_t* order = fill + K;
      for (int64_t n = 0; n < N; ++n) start[ip[n] + 1]++;
      for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
      std::copy(start, start + K, fill);
      for (int64_t n = 0; n < N; ++n) order[fill[ip[n]]++] = n;
      at::Tensor ge = grad_codebook->scalar_type() == ct ? *grad_codebook : at::empty({K, D}, ec.options());
      scalar_t* op = ge.mutable_data_ptr<scalar_t>();
      const scalar_t ce = static_cast<scalar_t>(coef_e);
      at::parallel_for(0, K, 16, [&](int64_t k_begin, int64_t k_end) {
        std::vector<scalar_t> acc(D);
        for (int64_t k = k_begin; k < k_end; ++k) {
          std::fill(acc.begin(), acc.end(), scalar_t(0));
          for (int64_t j = start[k]; j < start[k + 1]; ++j) {
            const scalar_t* zr = zp + order[j] * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += zr[d];
          }
          const scalar_t cnt = static_cast<scalar_t>(start[k + 1] - start[k]);
          const scalar_t* er = ep + k * D;
          scalar_t* o = op + k * D;
          for (int64_t d = 0; d < D; ++d) o[d] = ce * (cnt * er[d] - acc[d]);
        }
      });
      if (!ge.is_same(*grad_codebook)) grad_codebook->copy_(ge);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vq_backward_cpu(const std::optional<at::Tensor>& grad_zq, const at::Tensor& z,
                                                   const at::Tensor& codebook, const at::Tensor& indices,
                                                   double coef_z, double coef_e, bool need_grad_z,
                                                   bool need_grad_e) {
  check_inputs(z, codebook, "svq_fast::vq_backward");
  at::Tensor grad_z = need_grad_z ? at::empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor grad_e = need_grad_e ? at::empty(codebook.sizes(), codebook.options()) : at::empty({0}, codebook.options());
  vq_backward_out_cpu(grad_zq, z, codebook, indices, coef_z, coef_e,
                      need_grad_z ? std::optional<at::Tensor>(grad_z) : std::nullopt,
                      need_grad_e ? std::optional<at::Tensor>(grad_e) : std::nullopt);
  return {grad_z, grad_e};
}

}  // namespace svq_fast
