// Direct sparse convolution over a batch-blocked layout (SparseProp-style).
//
// Activations are packed as [batch tile][channel][row][column][T], T = two SIMD vectors of batch
// elements, so every kernel below is a loop over the nonzeros of the sparse weight doing SIMD
// axpys or dot products over T images at once, for any stride, dilation or padding (padding is
// materialised as zeros by pack). Offsets of each nonzero into a packed buffer are computed on
// the Python side. Plain C ABI over raw pointers (called through ctypes): no torch headers, so
// the JIT build takes seconds.
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kVecBytes = 32;

template <typename S>
struct Vec {
  typedef S type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(S);
  static constexpr int tile = 2 * lanes;  // T: batch elements per packed pixel
};

template <typename S>
inline typename Vec<S>::type load(const S* p) {
  typename Vec<S>::type v;
  std::memcpy(&v, p, kVecBytes);
  return v;
}

template <typename S>
inline void store(S* p, typename Vec<S>::type v) {
  std::memcpy(p, &v, kVecBytes);
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

constexpr int kBlock = 16;  // pixels per transposed block in pack and unpack

// dst[b][c][y][x][t] = src[b*T + t][c][y - top][x - left], zero outside src. Blocks of kBlock
// pixels are transposed through a small local array: reads run along image rows, writes along
// the packed buffer, and only the local array is accessed with a stride.
template <typename S>
void pack(const S* src, S* dst, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn,
          int64_t sc, int64_t sh, int64_t sw, int64_t nb, int64_t hb, int64_t wb, int64_t top,
          int64_t left, int threads) {
  constexpr int T = Vec<S>::tile;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t ch = 0; ch < c; ++ch) {
      S* d = dst + (b * c + ch) * hb * wb * T;
      const int64_t images = n - b * T < T ? n - b * T : T;
      // Zero padding: whole rows above and below the image, columns left and right of it.
      std::memset(d, 0, sizeof(S) * top * wb * T);
      std::memset(d + (top + h) * wb * T, 0, sizeof(S) * (hb - top - h) * wb * T);
      for (int64_t y = top; y < top + h; ++y) {
        std::memset(d + y * wb * T, 0, sizeof(S) * left * T);
        std::memset(d + (y * wb + left + w) * T, 0, sizeof(S) * (wb - left - w) * T);
      }
      S block[kBlock][T] = {};  // images beyond n stay zero
      for (int64_t y = 0; y < h; ++y) {
        S* row = d + ((y + top) * wb + left) * T;
        for (int64_t x0 = 0; x0 < w; x0 += kBlock) {
          const int64_t count = w - x0 < kBlock ? w - x0 : kBlock;
          for (int64_t t = 0; t < images; ++t) {
            const S* from = src + (b * T + t) * sn + ch * sc + y * sh + x0 * sw;
            for (int64_t p = 0; p < count; ++p) block[p][t] = from[p * sw];
          }
          std::memcpy(row + x0 * T, block, sizeof(S) * count * T);
        }
      }
    }
}

// dst[b*T + t][c][y][x] = src[b][c][y + top][x + left][t] for the images that exist, by blocks
// of kBlock pixels as in pack.
template <typename S>
void unpack(const S* src, S* dst, int64_t n, int64_t c, int64_t h, int64_t w, int64_t dn,
            int64_t dc, int64_t dh, int64_t dw, int64_t nb, int64_t hs, int64_t ws, int64_t top,
            int64_t left, int threads) {
  constexpr int T = Vec<S>::tile;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t images = n - b * T < T ? n - b * T : T;
      const S* plane = src + (b * c + ch) * hs * ws * T;
      for (int64_t y = 0; y < h; ++y) {
        const S* row = plane + ((y + top) * ws + left) * T;
        for (int64_t x0 = 0; x0 < w; x0 += kBlock) {
          const int64_t count = w - x0 < kBlock ? w - x0 : kBlock;
          const S* block = row + x0 * T;
          for (int64_t t = 0; t < images; ++t) {
            S* to = dst + (b * T + t) * dn + ch * dc + y * dh + x0 * dw;
            for (int64_t p = 0; p < count; ++p) to[p * dw] = block[p * T + t];
          }
        }
      }
    }
}

// out[b][r][y][x][:] = bias[r] + sum over nonzeros k of row r: vals[k] * in[b][offs[k] +
// (y*sy) * in_row + (x*sx) * T][:]. The forward (rows: output channels) and, at stride 1, the
// input gradient (rows: input channels, over the padded output gradient). Each output pixel
// block stays in registers across the row's nonzeros; threads split the (tile, output row)
// pairs, so each reads a few input rows of every channel from its own cache.
template <typename S, int P>
inline void gather_block(const S* src, S* dst, const int64_t* offs, const S* vals, int64_t k0,
                         int64_t k1, int64_t step, S init) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::lanes, T = Vec<S>::tile;
  V acc[P][2];
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = V{} + init;
  for (int64_t k = k0; k < k1; ++k) {
    const S* s = src + offs[k];
    const S v = vals[k];
    for (int p = 0; p < P; ++p) {
      acc[p][0] += v * load(s + p * step);
      acc[p][1] += v * load(s + p * step + L);
    }
  }
  for (int p = 0; p < P; ++p) {
    store(dst + p * T, acc[p][0]);
    store(dst + p * T + L, acc[p][1]);
  }
}

template <typename S>
void gather(const S* in, S* out, const int64_t* rowptr, const int64_t* offs, const S* vals,
            const S* bias, int64_t nb, int64_t rows, int64_t oh, int64_t ow, int64_t sy,
            int64_t sx, int64_t in_row, int64_t in_tile, int threads) {
  constexpr int T = Vec<S>::tile, P = 4;
  const int64_t plane = oh * ow * T, step = sx * T;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t y = 0; y < oh; ++y) {
      const S* src = in + b * in_tile + y * sy * in_row;
      for (int64_t r = 0; r < rows; ++r) {
        S* dst = out + (b * rows + r) * plane + y * ow * T;
        const S init = bias ? bias[r] : S(0);
        int64_t x = 0;
        for (; x + P <= ow; x += P)
          gather_block<S, P>(src + x * step, dst + x * T, offs, vals, rowptr[r], rowptr[r + 1],
                             step, init);
        for (; x < ow; ++x)
          gather_block<S, 1>(src + x * step, dst + x * T, offs, vals, rowptr[r], rowptr[r + 1],
                             step, init);
      }
    }
}

// dx[b][r][(y*sy)*dx_row + (x*sx)*T + dx_offs[k]][:] += vals[k] * dy[b][dy_offs[k] + (y*ow +
// x)*T][:] for the nonzeros k of row r (an input channel): the input gradient at any stride.
// Threads split the (tile, input channel) pairs, so no two write the same plane.
template <typename S>
void scatter(const S* dy, S* dx, const int64_t* rowptr, const int64_t* dy_offs,
             const int64_t* dx_offs, const S* vals, int64_t nb, int64_t rows, int64_t oh,
             int64_t ow, int64_t sy, int64_t sx, int64_t dy_tile, int64_t dx_row,
             int64_t dx_plane, int threads) {
  constexpr int L = Vec<S>::lanes, T = Vec<S>::tile;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      S* plane = dx + (b * rows + r) * dx_plane;
      const S* g = dy + b * dy_tile;
      for (int64_t y = 0; y < oh; ++y)
        for (int64_t x = 0; x < ow; ++x) {
          S* d = plane + y * sy * dx_row + x * sx * T;
          const S* s = g + (y * ow + x) * T;
          for (int64_t k = rowptr[r]; k < rowptr[r + 1]; ++k) {
            S* e = d + dx_offs[k];
            const S* f = s + dy_offs[k];
            store(e, load(e) + vals[k] * load(f));
            store(e + L, load(e + L) + vals[k] * load(f + L));
          }
        }
    }
}

// acc[j] += sum over x of dot(dy[x*T..], in[offs[k + j] + x*step..]) for J nonzeros at once,
// sharing each load of the output gradient.
template <typename S, int J>
inline void dot_block(const S* src, const S* d, const int64_t* offs, int64_t k, int64_t ow,
                      int64_t step, S* acc) {
  using V = typename Vec<S>::type;
  constexpr int L = Vec<S>::lanes, T = Vec<S>::tile;
  V sum[J][2];
  for (int j = 0; j < J; ++j) sum[j][0] = sum[j][1] = V{};
  for (int64_t x = 0; x < ow; ++x) {
    const V d0 = load(d + x * T), d1 = load(d + x * T + L);
    for (int j = 0; j < J; ++j) {
      const S* s = src + offs[k + j] + x * step;
      sum[j][0] += d0 * load(s);
      sum[j][1] += d1 * load(s + L);
    }
  }
  for (int j = 0; j < J; ++j) {
    const V v = sum[j][0] + sum[j][1];
    S total = S(0);
    for (int l = 0; l < L; ++l) total += v[l];
    acc[k + j] += total;
  }
}

// gw[k] = sum over tiles and output pixels of dot(dy[b][r][y][x][:], in[b][offs[k] + ...][:])
// for the nonzeros k of row r (an output channel): the weight gradient at the kept positions
// only. Threads split the (tile, output row) pairs into private sums, added in thread order.
template <typename S>
void grad_weight(const S* in, const S* dy, const int64_t* rowptr, const int64_t* offs, S* gw,
                 int64_t nb, int64_t rows, int64_t oh, int64_t ow, int64_t sy, int64_t sx,
                 int64_t in_row, int64_t in_tile, int64_t dy_base, int64_t dy_row,
                 int64_t dy_plane, int64_t dy_tile, int threads) {
  constexpr int T = Vec<S>::tile;
  const int64_t nnz = rowptr[rows], step = sx * T;
  std::vector<S> partial(static_cast<size_t>(threads) * nnz, S(0));
#pragma omp parallel num_threads(threads)
  {
    S* acc = partial.data() + thread_id() * nnz;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t y = 0; y < oh; ++y) {
        const S* src = in + b * in_tile + y * sy * in_row;
        for (int64_t r = 0; r < rows; ++r) {
          const S* d = dy + dy_base + b * dy_tile + r * dy_plane + y * dy_row;
          int64_t k = rowptr[r];
          const int64_t end = rowptr[r + 1];
          for (; k + 4 <= end; k += 4) dot_block<S, 4>(src, d, offs, k, ow, step, acc);
          for (; k < end; ++k) dot_block<S, 1>(src, d, offs, k, ow, step, acc);
        }
      }
  }
  for (int64_t k = 0; k < nnz; ++k) {
    S total = S(0);
    for (int t = 0; t < threads; ++t) total += partial[t * nnz + k];
    gw[k] = total;
  }
}

}  // namespace

#define SPARSETRAIN_EXPORT(S, suffix)                                                          \
  extern "C" int64_t st_tile_##suffix() { return Vec<S>::tile; }                               \
  extern "C" void st_pack_##suffix(const S* src, S* dst, int64_t n, int64_t c, int64_t h,      \
                                   int64_t w, int64_t sn, int64_t sc, int64_t sh, int64_t sw,  \
                                   int64_t nb, int64_t hb, int64_t wb, int64_t top,            \
                                   int64_t left, int threads) {                                \
    pack(src, dst, n, c, h, w, sn, sc, sh, sw, nb, hb, wb, top, left, threads);                \
  }                                                                                            \
  extern "C" void st_unpack_##suffix(const S* src, S* dst, int64_t n, int64_t c, int64_t h,    \
                                     int64_t w, int64_t dn, int64_t dc, int64_t dh,            \
                                     int64_t dw, int64_t nb, int64_t hs, int64_t ws,           \
                                     int64_t top, int64_t left, int threads) {                 \
    unpack(src, dst, n, c, h, w, dn, dc, dh, dw, nb, hs, ws, top, left, threads);              \
  }                                                                                            \
  extern "C" void st_gather_##suffix(const S* in, S* out, const int64_t* rowptr,               \
                                     const int64_t* offs, const S* vals, const S* bias,        \
                                     int64_t nb, int64_t rows, int64_t oh, int64_t ow,         \
                                     int64_t sy, int64_t sx, int64_t in_row, int64_t in_tile,  \
                                     int threads) {                                            \
    gather(in, out, rowptr, offs, vals, bias, nb, rows, oh, ow, sy, sx, in_row, in_tile,       \
           threads);                                                                           \
  }                                                                                            \
  extern "C" void st_scatter_##suffix(const S* dy, S* dx, const int64_t* rowptr,               \
                                      const int64_t* dy_offs, const int64_t* dx_offs,          \
                                      const S* vals, int64_t nb, int64_t rows, int64_t oh,     \
                                      int64_t ow, int64_t sy, int64_t sx, int64_t dy_tile,     \
                                      int64_t dx_row, int64_t dx_plane, int threads) {         \
    scatter(dy, dx, rowptr, dy_offs, dx_offs, vals, nb, rows, oh, ow, sy, sx, dy_tile,         \
            dx_row, dx_plane, threads);                                                        \
  }                                                                                            \
  extern "C" void st_grad_weight_##suffix(                                                     \
      const S* in, const S* dy, const int64_t* rowptr, const int64_t* offs, S* gw, int64_t nb, \
      int64_t rows, int64_t oh, int64_t ow, int64_t sy, int64_t sx, int64_t in_row,            \
      int64_t in_tile, int64_t dy_base, int64_t dy_row, int64_t dy_plane, int64_t dy_tile,     \
      int threads) {                                                                           \
    grad_weight(in, dy, rowptr, offs, gw, nb, rows, oh, ow, sy, sx, in_row, in_tile, dy_base,  \
                dy_row, dy_plane, dy_tile, threads);                                           \
  }

SPARSETRAIN_EXPORT(float, f32)
SPARSETRAIN_EXPORT(double, f64)
