// The product of a few vectors on the sliced layout that jaxsparse.pack builds for float32 CSR
// matrices (isa.h, SellProblem): y [M, N] = A x with x [K, N] (layout kn) or y [N, M] = x A^T
// with x [N, K] (nk). The layout is checked in O(size) before it is read through: the offsets
// arrays on the calling thread, each part's windows and columns on the thread that computes the
// part.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

constexpr const char* kWhat = "sell_spmv";

// The first group of [g0, g1) holding a column of 64 or more (sell_rows reported one), or -1.
int64_t FirstWideColumn(const SellProblem& p, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t q = static_cast<int64_t>(p.group_ptr[g]) * kSellLanes;
         q < static_cast<int64_t>(p.group_ptr[g + 1]) * kSellLanes; ++q) {
      if (p.columns[q] >= kSellStride) return g;
    }
  }
  return -1;
}

ffi::Error SellSpmv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values,
                    ffi::Buffer<ffi::U8> columns, ffi::Buffer<ffi::S32> group_window,
                    ffi::Buffer<ffi::S32> group_ptr, ffi::Buffer<ffi::S32> slice_ptr,
                    ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> x,
                    ffi::Result<ffi::Buffer<ffi::F32>> y, bool nk) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || (nk ? xd[0] != yd[0] : xd[1] != yd[1])) {
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": x and y must be 2-D with the same number of vectors (" +
        (nk ? "x [N, K], y [N, M]" : "x [K, N], y [M, N]") + ")");
  }
  const int64_t n = nk ? xd[0] : xd[1], k = nk ? xd[1] : xd[0], m = nk ? yd[1] : yd[0];
  const int64_t slices = (m + kSellLanes - 1) / kSellLanes;
  const int64_t groups = group_window.element_count();
  if (static_cast<int64_t>(slice_ptr.element_count()) != slices + 1 ||
      static_cast<int64_t>(group_ptr.element_count()) != groups + 1) {
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": slice_ptr must have ceil(M / 16) + 1 = " +
        std::to_string(slices + 1) + " entries and group_ptr len(group_window) + 1 = " +
        std::to_string(groups + 1) + "; got " + std::to_string(slice_ptr.element_count()) +
        " and " + std::to_string(group_ptr.element_count()));
  }
  if (static_cast<int64_t>(rows.element_count()) != m) {
    return ffi::Error::InvalidArgument(std::string(kWhat) + ": rows must have M = " +
                                       std::to_string(m) + " entries, got " +
                                       std::to_string(rows.element_count()));
  }
  if (auto err = ValidateIndptr(slice_ptr.typed_data(), slices, groups, kWhat, "slice_ptr",
                                "len(group_window)");
      err.failure()) {
    return err;
  }
  const int64_t n_slots = values.element_count() / kSellLanes;
  if (static_cast<int64_t>(values.element_count()) != n_slots * kSellLanes ||
      columns.element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument(std::string(kWhat) +
                                       ": values and columns must hold the same multiple of 16 "
                                       "entries");
  }
  if (auto err = ValidateIndptr(group_ptr.typed_data(), groups, n_slots, kWhat, "group_ptr",
                                "len(values) / 16");
      err.failure()) {
    return err;
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  // Each vector of x in windows of 63 columns, each followed by zeros up to 64 floats: the
  // kernels load each window whole, and padding lanes read its zero.
  const int64_t windows = (k + kSellWindow - 1) / kSellWindow;
  const int64_t x_stride = windows * kSellStride;
  Scratch xpad = AlignedScratch(n * x_stride * sizeof(float));
  float* xp = reinterpret_cast<float*>(xpad.get());
  const float* xs = x.typed_data();
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t w = 0; w < windows; ++w) {
      float* dst = xp + j * x_stride + w * kSellStride;
      const int64_t width = std::min(kSellWindow, k - w * kSellWindow);
      if (nk || n == 1) {  // vector j's columns are contiguous, from xs + j * k (j = 0 in kn)
        std::memcpy(dst, xs + j * k + w * kSellWindow, width * sizeof(float));
      } else {
        for (int64_t c = 0; c < width; ++c) dst[c] = xs[(w * kSellWindow + c) * n + j];
      }
      std::fill(dst + width, dst + kSellStride, 0.0f);
    }
  }

  SellProblem p{values.typed_data(), columns.typed_data(), group_window.typed_data(),
                group_ptr.typed_data(), slice_ptr.typed_data(), rows.typed_data(), xp, x_stride,
                y->typed_data(), nk ? 1 : n, nk ? m : 1, m, 0};
  // Parts of equal work (slots per slice, as an offsets array for Partition) made of whole blocks.
  std::vector<int32_t> work(slices + 1);
  for (int64_t s = 0; s <= slices; ++s) work[s] = p.group_ptr[p.slice_ptr[s]];
  const std::vector<int64_t> parts =
      Partition(work.data(), slices, NumThreads(pool), kSellBlock, 8);
  const int64_t n_parts = static_cast<int64_t>(parts.size()) - 1;
  const IsaKernels& kern = SelectKernels(kF32);
  FirstBad first_bad, first_bad_block;
  ParallelFor(pool, n_parts, [&](int64_t q) {
    for (int64_t b = parts[q] / kSellBlock; b * kSellBlock < parts[q + 1]; ++b) {
      if (!kern.sell_block_rows_valid(p, b)) {
        first_bad_block.Report(b);
        return;
      }
    }
    const int64_t g0 = p.slice_ptr[parts[q]], g1 = p.slice_ptr[parts[q + 1]];
    int64_t bad = kern.sell_first_bad_group(p, g0, g1, k);
    uint8_t seen = 0;
    // The vectors in passes of up to kSellMaxN, each over the part's slices (in cache by then).
    for (int64_t j0 = 0; bad < 0 && j0 < n; j0 += kSellMaxN) {
      SellProblem pass = p;
      pass.x += j0 * x_stride;
      pass.y += j0 * p.y_vec;
      pass.n = std::min(kSellMaxN, n - j0);
      seen |= kern.sell_rows(pass, parts[q], parts[q + 1]);
    }
    if (bad < 0 && seen >= kSellStride) bad = FirstWideColumn(p, g0, g1);
    if (bad >= 0) first_bad.Report(bad);
  });
  if (const int64_t b = first_bad_block.Get(); b >= 0) {
    constexpr int64_t kRows = kSellBlock * kSellLanes;
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": rows[" + std::to_string(b * kRows) + ":" +
        std::to_string(std::min(m, (b + 1) * kRows)) + "] must hold each of the rows " +
        std::to_string(b * kRows) + " to " + std::to_string(std::min(m, (b + 1) * kRows) - 1) +
        " once (rows are reordered within blocks of " + std::to_string(kRows) + ")");
  }
  if (const int64_t g = first_bad.Get(); g >= 0) {
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": group " + std::to_string(g) + " (window " +
        std::to_string(p.group_window[g]) + ") reaches past K=" + std::to_string(k) +
        ": group_window must be < ceil(K / 63) and every column of its slots < 63 and "
        "< K - 63 * window, or 63 (padding)");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSellSpmv, SellSpmv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values [slots * 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // columns [slots * 16]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_window [groups]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_ptr [groups + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr [slices + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [K, N] or [N, K] (nk)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N] or [N, M] (nk)
                                  .Attr<bool>("nk"));

}  // namespace jaxsparse
