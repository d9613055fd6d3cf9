// Fused block-sparse attention on the CPU (jaxsparse.attention on a BSR pattern): for every batch
// element b, head h and query row i, out[b, i, h] = sum_t p_t v[b, t, h] over the keys t of the
// blocks that row i's block row of the pattern stores, p = softmax_t(scale * q[b, i, h] .
// k[b, t, h]) with the keys that keep[b] (or keep[0]) marks 0 left out. q, k, v and out keep the
// [batch, seq, heads, dim] layout of jax.nn.dot_product_attention, so no transposes run around
// the call, and the scores of a tile of rows never leave the cache: the unfused path (SDDMM ->
// row softmax -> SpMM) writes and reads them back per head through memory, and XLA's dense
// attention does the same for the [heads, seq, seq] scores.
//
// Work comes in units of (batch, head, block row, tile of up to kAttnRows rows). A task takes a
// run of units of one (batch, head); for each block row it gathers the keys of the row's blocks
// into a compact copy (transposed, with a 0 / -inf bias per key) and finds their values (read in
// place, or from a copy padded to whole vectors), and keeps both while the next block row stores
// the same blocks (a dense pattern: one gather per task). The indices are validated in
// O(blocks) before anything is read through them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

constexpr const char* kWhat = "bsr_attention";

int64_t PadTo(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::U8>& keep,
                       ffi::Result<ffi::Buffer<ffi::F32>>& out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             od = out->dimensions(), md = keep.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4 || kd[0] != qd[0] ||
      vd[0] != qd[0] || kd[2] != qd[2] || vd[2] != qd[2] || kd[3] != qd[3] || vd[1] != kd[1] ||
      od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[2] || od[3] != vd[3]) {
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] and out "
        "[B, Sq, H, Dv] expected");
  }
  if (md.size() != 2 || (md[0] != 1 && md[0] != qd[0]) || md[1] != kd[1]) {
    return ffi::Error::InvalidArgument(std::string(kWhat) +
                                       ": keep must be [1, Sk] or [B, Sk] (Sk=" +
                                       std::to_string(kd[1]) + ")");
  }
  return ffi::Error::Success();
}

ffi::Error BsrAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> indptr,
                        ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::U8> keep,
                        ffi::Result<ffi::Buffer<ffi::F32>> out, float scale, int64_t block_k) {
  if (auto err = CheckShapes(q, k, v, keep, out); err.failure()) return err;
  const auto qd = q.dimensions();
  const int64_t batch = qd[0], sq = qd[1], heads = qd[2], d = qd[3];
  const int64_t sk = k.dimensions()[1], dv = v.dimensions()[3];
  const int64_t block_rows = static_cast<int64_t>(indptr.element_count()) - 1;
  if (block_rows < 1 || sq % block_rows != 0) {
    return ffi::Error::InvalidArgument(
        std::string(kWhat) + ": indptr must have Sq / block_rows + 1 entries with block_rows "
        "dividing Sq=" + std::to_string(sq) + "; got " + std::to_string(indptr.element_count()));
  }
  if (block_k < 1 || sk % block_k != 0) {
    return ffi::Error::InvalidArgument(std::string(kWhat) + ": block_k=" +
                                       std::to_string(block_k) + " must divide Sk=" +
                                       std::to_string(sk));
  }
  const int64_t blocks = indices.element_count(), block_cols = sk / block_k;
  const int32_t* ip = indptr.typed_data();
  const int32_t* idx = indices.typed_data();
  if (auto err = ValidateIndptr(ip, block_rows, blocks, kWhat, "indptr", "len(indices)");
      err.failure()) {
    return err;
  }
  if (const int64_t p = FirstOutOfRange(idx, 0, blocks, block_cols); p >= 0) {
    return IndexError(kWhat, "indices", idx, p, block_cols);
  }
  if (batch == 0 || sq == 0 || heads == 0 || dv == 0) return ffi::Error::Success();

  const int64_t bm = sq / block_rows;
  const int64_t tiles = (bm + kAttnRows - 1) / kAttnRows;  // per block row
  const int64_t units = block_rows * tiles;                 // per (batch, head)
  int64_t most = 0;
  for (int64_t r = 0; r < block_rows; ++r) most = std::max<int64_t>(most, ip[r + 1] - ip[r]);
  const int64_t ldk = PadTo(std::max<int64_t>(1, most * block_k), kAttnPad);
  const int64_t dv_pad = PadTo(dv, kAttnPad);
  const int64_t threads = NumThreads(pool);
  const int64_t chunks = std::min(units, std::max<int64_t>(
                                             1, (4 * threads + batch * heads - 1) / (batch * heads)));
  const IsaKernels& kern = SelectKernels(kF32);
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const uint8_t* keeps = keep.typed_data();
  const bool keep_per_batch = keep.dimensions()[0] == batch && batch > 1;
  float* os = out->typed_data();

  // Values are read where they are when their rows fill whole vectors (dv a multiple of
  // kAttnPad), else from a compact copy padded with zeros (reading past a row in place could run
  // past the end of v).
  const bool copy_v = dv != dv_pad;
  ParallelFor(pool, batch * heads * chunks, [&](int64_t task) {
    const int64_t bh = task / chunks, c = task % chunks;
    const int64_t b = bh / heads, h = bh % heads;
    const int64_t u0 = c * units / chunks, u1 = (c + 1) * units / chunks;
    // kt [d, ldk] | kbias [ldk] | scores [kAttnRows, ldk] | inv_sum [kAttnRows] | the copy of v
    // [ldk, dv_pad], if any | v_at [ldk]
    const int64_t floats =
        PadTo(d * ldk + ldk + kAttnRows * ldk + kAttnRows + (copy_v ? ldk * dv_pad : 0), 16);
    Scratch buf = AlignedScratch(floats * sizeof(float) + ldk * sizeof(int64_t));
    float* kt = reinterpret_cast<float*>(buf.get());
    float* kbias = kt + d * ldk;
    float* scores = kbias + ldk;
    float* inv_sum = scores + kAttnRows * ldk;
    float* vc = inv_sum + kAttnRows;
    int64_t* v_at = reinterpret_cast<int64_t*>(kt + floats);
    if (copy_v) std::fill(vc, vc + ldk * dv_pad, 0.0f);  // value columns past dv stay zero
    const uint8_t* keep_row = keeps + (keep_per_batch ? b * sk : 0);
    int64_t cached = -1, nk = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = u / tiles, tile = u % tiles;
      const bool same = cached >= 0 && ip[r + 1] - ip[r] == ip[cached + 1] - ip[cached] &&
                        std::equal(idx + ip[r], idx + ip[r + 1], idx + ip[cached]);
      if (!same) {  // gather the keys (and find the values) of block row r
        nk = (ip[r + 1] - ip[r]) * block_k;
        for (int64_t e = ip[r]; e < ip[r + 1]; ++e) {
          const int64_t t0 = (e - ip[r]) * block_k, key0 = static_cast<int64_t>(idx[e]) * block_k;
          const int64_t at = (b * sk + key0) * heads + h;
          kern.transpose(kF32, ks + at * d, block_k, d, heads * d, kt + t0, ldk, false);
          for (int64_t j = 0; j < block_k; ++j) {
            const int64_t from = (at + j * heads) * dv;
            if (copy_v) {
              std::memcpy(vc + (t0 + j) * dv_pad, vs + from, dv * sizeof(float));
              v_at[t0 + j] = (t0 + j) * dv_pad;
            } else {
              v_at[t0 + j] = from;
            }
            kbias[t0 + j] = keep_row[key0 + j] ? 0.0f : -INFINITY;
          }
        }
        for (int64_t e = 0; e < d; ++e) std::fill(kt + e * ldk + nk, kt + (e + 1) * ldk, 0.0f);
        std::fill(kbias + nk, kbias + ldk, -INFINITY);
        cached = r;
      }
      const int64_t i0 = r * bm + tile * kAttnRows;
      AttentionTile t;
      t.q = qs + ((b * sq + i0) * heads + h) * d;
      t.ldq = heads * d;
      t.kt = kt;
      t.ldk = ldk;
      t.v = copy_v ? vc : vs;
      t.v_at = v_at;
      t.kbias = kbias;
      t.scores = scores;
      t.inv_sum = inv_sum;
      t.out = os + ((b * sq + i0) * heads + h) * dv;
      t.ldo = heads * dv;
      t.rows = std::min(kAttnRows, bm - tile * kAttnRows);
      t.d = d;
      t.dv = dv;
      t.nk = nk;
      t.nk_pad = PadTo(nk, kAttnPad);
      t.dv_pad = dv_pad;
      t.scale = scale;
      kern.attention_tile(t);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBsrAttention, BsrAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, Sq, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, Sk, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, Sk, H, Dv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [Sq / bm + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [blocks]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // keep [1 or B, Sk]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, Sq, H, Dv]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_k"));

}  // namespace jaxsparse
