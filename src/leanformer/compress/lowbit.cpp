// Fused low-bit linear layers for the CPU: y = x Ŵᵀ (+ b) straight from a QuantizedLinear's in-memory codes
// and its stored metadata, without building the float weight. Built on first use by native.py
// (torch.utils.cpp_extension); each function has a plain-torch twin in its method's file, which the tests
// compare it with.
//
// Codes are in packing.runtime_codes' layout: for bits ≤ 4 two per byte (the low nibble holds the even
// flat index), else one per byte; the flat index runs row-major over the (out, in) weight. Where every
// piece read starts on a byte (even widths), the inner loops read 8 bytes (16 codes) per step against the
// input's even and odd entries, split out once per call (AVX2 + FMA; a portable scalar loop otherwise).
// Both methods are linear in what the codes stand for, so the codes multiply the input directly:
//   RTN / HQQ    y_o = Σ_g s_g Σ_{k∈g} q_k x_k + m_g Σ_{k∈g} x_k
//   Kashin       y_o = Σ_k A_v[q_k] x_c,k + B_v[q_k] u_k, u = Pᵀ x_c: per-vector tables of the values per code
//                (AVX2), or one masked sum per step, Σ_i c_i (2 Σ_k bit_i(q_k) z_k − Σ_k z_k) (portable); for
//                more tokens, A and B written out a block of rows at a time and multiplied by torch's matmul

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace {

inline int code_at(const uint8_t* codes, int64_t i, bool nibbles) {
  return nibbles ? (codes[i >> 1] >> ((i & 1) << 2)) & 15 : codes[i];
}

// Σ_j q_j x_j, q_j = the code (bit < 0) or its bit `bit`, as partial sums the caller scales and reduces once.
// nibble_lanes: byte j holds q_2j (low) and q_2j+1 (high), read against x's even and odd entries xe, xo.
#if defined(__AVX2__) && defined(__FMA__)
using Lanes = __m256;
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
inline Lanes lanes_scalar(float v) { return _mm256_setr_ps(v, 0, 0, 0, 0, 0, 0, 0); }
inline Lanes lanes_fma(float s, Lanes a, Lanes acc) { return _mm256_fmadd_ps(_mm256_set1_ps(s), a, acc); }
inline Lanes lanes_add(Lanes a, Lanes b) { return _mm256_add_ps(a, b); }
inline float lanes_sum(Lanes a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
inline __m256i eight_bytes(const uint8_t* c) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
}
inline Lanes nibble_lanes(const uint8_t* c, const float* xe, const float* xo, int64_t half, int bit) {
  const __m128i shift_lo = _mm_cvtsi32_si128(bit < 0 ? 0 : bit), shift_hi = _mm_cvtsi32_si128(bit < 0 ? 4 : bit + 4);
  const __m256i mask = _mm256_set1_epi32(bit < 0 ? 15 : 1);
  auto lo = [&](__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(b, shift_lo), mask)); };
  auto hi = [&](__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(b, shift_hi), mask)); };
  // four independent chains (FMA latency, not throughput, bounds one chain)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= half; j += 16) {
    const __m256i b0 = eight_bytes(c + j), b1 = eight_bytes(c + j + 8);
    s0 = _mm256_fmadd_ps(lo(b0), _mm256_loadu_ps(xe + j), s0);
    s1 = _mm256_fmadd_ps(hi(b0), _mm256_loadu_ps(xo + j), s1);
    s2 = _mm256_fmadd_ps(lo(b1), _mm256_loadu_ps(xe + j + 8), s2);
    s3 = _mm256_fmadd_ps(hi(b1), _mm256_loadu_ps(xo + j + 8), s3);
  }
  if (j + 8 <= half) {
    const __m256i b0 = eight_bytes(c + j);
    s0 = _mm256_fmadd_ps(lo(b0), _mm256_loadu_ps(xe + j), s0);
    s1 = _mm256_fmadd_ps(hi(b0), _mm256_loadu_ps(xo + j), s1);
    j += 8;
  }
  float tail = 0.f;
  for (; j < half; ++j) {
    const int b = c[j];
    tail += float(bit < 0 ? b & 15 : (b >> bit) & 1) * xe[j] + float(bit < 0 ? b >> 4 : (b >> (bit + 4)) & 1) * xo[j];
  }
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)), lanes_scalar(tail));
}
inline Lanes byte_lanes(const uint8_t* c, const float* x, int64_t n, int bit) {
  const __m128i shift = _mm_cvtsi32_si128(bit < 0 ? 0 : bit);
  const __m256i mask = _mm256_set1_epi32(bit < 0 ? 255 : 1);
  auto q = [&](const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(eight_bytes(p), shift), mask)); };
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    s0 = _mm256_fmadd_ps(q(c + j), _mm256_loadu_ps(x + j), s0);
    s1 = _mm256_fmadd_ps(q(c + j + 8), _mm256_loadu_ps(x + j + 8), s1);
  }
  if (j + 8 <= n) {
    s0 = _mm256_fmadd_ps(q(c + j), _mm256_loadu_ps(x + j), s0);
    j += 8;
  }
  float tail = 0.f;
  for (; j < n; ++j) tail += float(bit < 0 ? c[j] : (c[j] >> bit) & 1) * x[j];
  return _mm256_add_ps(_mm256_add_ps(s0, s1), lanes_scalar(tail));
}
// Σ_j T[q_j] x_j for nibble codes q against x's even and odd entries: the 16-entry table T (Kashin's values
// of one vector per code) sits in two registers and every 8 codes are looked up with one or two permutes.
constexpr bool kTableLookup = true;
inline __m256 lookup(__m256i idx, __m256 t_lo, __m256 t_hi, bool wide) {
  const __m256 v = _mm256_permutevar8x32_ps(t_lo, idx);  // reads idx's low 3 bits
  if (!wide) return v;
  return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t_hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline Lanes table_lanes(const uint8_t* c, const float* xe, const float* xo, int64_t half, const float* table, bool wide) {
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = wide ? _mm256_loadu_ps(table + 8) : t_lo;
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const __m256i b = eight_bytes(c + j);
    s0 = _mm256_fmadd_ps(lookup(_mm256_and_si256(b, mask), t_lo, t_hi, wide), _mm256_loadu_ps(xe + j), s0);
    s1 = _mm256_fmadd_ps(lookup(_mm256_srli_epi32(b, 4), t_lo, t_hi, wide), _mm256_loadu_ps(xo + j), s1);
  }
  float tail = 0.f;
  for (; j < half; ++j) tail += table[c[j] & 15] * xe[j] + table[c[j] >> 4] * xo[j];
  return _mm256_add_ps(_mm256_add_ps(s0, s1), lanes_scalar(tail));
}
// Σ_j A[q_j] x_j + B[q_j] u_j for two vectors whose plain and P-domain steps read the same codes and that read the
// same input piece (the same segment of two rows): both tables are looked up from one load and split of each 8
// bytes (12-19 % faster than two table_lanes passes on MiniLM's 384-1536 wide rows), the x and u loads are
// shared, and the two vectors' dependency chains interleave; their two sums, reduced together. Same-process A/B
// at one token against one vector per call: 9-22 % faster from 64 x 64 to 1024 x 384.
inline void table_lanes_ab_pair(const uint8_t* c0, const uint8_t* c1, const float* xe, const float* xo,
                                const float* ue, const float* uo, int64_t half, const float* table_a0,
                                const float* table_b0, const float* table_a1, const float* table_b1, bool wide,
                                float& y0, float& y1) {
  const __m256 a0_lo = _mm256_loadu_ps(table_a0), a0_hi = wide ? _mm256_loadu_ps(table_a0 + 8) : a0_lo;
  const __m256 b0_lo = _mm256_loadu_ps(table_b0), b0_hi = wide ? _mm256_loadu_ps(table_b0 + 8) : b0_lo;
  const __m256 a1_lo = _mm256_loadu_ps(table_a1), a1_hi = wide ? _mm256_loadu_ps(table_a1 + 8) : a1_lo;
  const __m256 b1_lo = _mm256_loadu_ps(table_b1), b1_hi = wide ? _mm256_loadu_ps(table_b1 + 8) : b1_lo;
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const __m256 x_e = _mm256_loadu_ps(xe + j), x_o = _mm256_loadu_ps(xo + j);
    const __m256 u_e = _mm256_loadu_ps(ue + j), u_o = _mm256_loadu_ps(uo + j);
    const __m256i p = eight_bytes(c0 + j), p_lo = _mm256_and_si256(p, mask), p_hi = _mm256_srli_epi32(p, 4);
    const __m256i q = eight_bytes(c1 + j), q_lo = _mm256_and_si256(q, mask), q_hi = _mm256_srli_epi32(q, 4);
    s0 = _mm256_fmadd_ps(lookup(p_lo, a0_lo, a0_hi, wide), x_e, s0);
    s1 = _mm256_fmadd_ps(lookup(p_lo, b0_lo, b0_hi, wide), u_e, s1);
    s2 = _mm256_fmadd_ps(lookup(q_lo, a1_lo, a1_hi, wide), x_e, s2);
    s3 = _mm256_fmadd_ps(lookup(q_lo, b1_lo, b1_hi, wide), u_e, s3);
    s0 = _mm256_fmadd_ps(lookup(p_hi, a0_lo, a0_hi, wide), x_o, s0);
    s1 = _mm256_fmadd_ps(lookup(p_hi, b0_lo, b0_hi, wide), u_o, s1);
    s2 = _mm256_fmadd_ps(lookup(q_hi, a1_lo, a1_hi, wide), x_o, s2);
    s3 = _mm256_fmadd_ps(lookup(q_hi, b1_lo, b1_hi, wide), u_o, s3);
  }
  float tail0 = 0.f, tail1 = 0.f;
  for (; j < half; ++j) {
    tail0 += table_a0[c0[j] & 15] * xe[j] + table_a0[c0[j] >> 4] * xo[j] + table_b0[c0[j] & 15] * ue[j] +
             table_b0[c0[j] >> 4] * uo[j];
    tail1 += table_a1[c1[j] & 15] * xe[j] + table_a1[c1[j] >> 4] * xo[j] + table_b1[c1[j] & 15] * ue[j] +
             table_b1[c1[j] >> 4] * uo[j];
  }
  __m256 h = _mm256_hadd_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));  // (0 0 1 1 | 0 0 1 1) pairs
  h = _mm256_hadd_ps(h, h);                                                  // (0 1 0 1 | 0 1 0 1)
  const __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  y0 = _mm_cvtss_f32(v) + tail0;
  y1 = _mm_cvtss_f32(_mm_movehdup_ps(v)) + tail1;
}
// Kashin's per-code values of one vector (bits ≤ 4) split by domain, table_a[q] = Σ_{i plain} c_i (2 bit_i(q) − 1)
// and table_b over the P-domain steps: summed in registers and stored once (a table summed in memory step by
// step stalls on store forwarding). Entries from 2^bits on are never read.
inline void kashin_tables16(const float* step, const uint8_t* domains, int64_t v, int64_t bits, float* table_a,
                            float* table_b, bool& has_a, bool& has_b) {
  alignas(32) static const float sign[4][16] = {
      {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1}, {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
      {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1}, {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1}};
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int in_a = 0, in_b = 0;
  for (int64_t i = 0; i < bits; ++i) {  // branch-free: a vector's domain bits are as good as random
    const int64_t flat = v * bits + i;
    const int d = (domains[flat >> 3] >> (flat & 7)) & 1;
    const float st = step[i];
    const __m256 st_a = _mm256_set1_ps(d ? 0.f : st), st_b = _mm256_set1_ps(d ? st : 0.f);
    const __m256 s0 = _mm256_load_ps(sign[i]), s1 = _mm256_load_ps(sign[i] + 8);
    a0 = _mm256_fmadd_ps(st_a, s0, a0), a1 = _mm256_fmadd_ps(st_a, s1, a1);
    b0 = _mm256_fmadd_ps(st_b, s0, b0), b1 = _mm256_fmadd_ps(st_b, s1, b1);
    in_a |= d ^ 1, in_b |= d;
  }
  has_a = in_a, has_b = in_b;
  _mm256_storeu_ps(table_a, a0), _mm256_storeu_ps(table_a + 8, a1);
  _mm256_storeu_ps(table_b, b0), _mm256_storeu_ps(table_b + 8, b1);
}
#else  // portable fallback: the same sums, one lane
using Lanes = float;
inline Lanes lanes_zero() { return 0.f; }
inline Lanes lanes_scalar(float v) { return v; }
inline Lanes lanes_fma(float s, Lanes a, Lanes acc) { return s * a + acc; }
inline Lanes lanes_add(Lanes a, Lanes b) { return a + b; }
inline float lanes_sum(Lanes a) { return a; }
inline Lanes nibble_lanes(const uint8_t* c, const float* xe, const float* xo, int64_t half, int bit) {
  float acc = 0.f;
  for (int64_t j = 0; j < half; ++j) {
    const int b = c[j];
    acc += float(bit < 0 ? b & 15 : (b >> bit) & 1) * xe[j] + float(bit < 0 ? b >> 4 : (b >> (bit + 4)) & 1) * xo[j];
  }
  return acc;
}
constexpr bool kTableLookup = false;  // not reached below: kTableLookup is false
inline Lanes table_lanes(const uint8_t*, const float*, const float*, int64_t, const float*, bool) { return 0.f; }
inline void table_lanes_ab_pair(const uint8_t*, const uint8_t*, const float*, const float*, const float*,
                                const float*, int64_t, const float*, const float*, const float*, const float*, bool,
                                float&, float&) {}
inline void kashin_tables16(const float*, const uint8_t*, int64_t, int64_t, float*, float*, bool&, bool&) {}
inline Lanes byte_lanes(const uint8_t* c, const float* x, int64_t n, int bit) {
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) acc += float(bit < 0 ? c[j] : (c[j] >> bit) & 1) * x[j];
  return acc;
}
#endif

// A kernel call's temporaries: one buffer per thread, reused from call to call (a decode step's layer call then
// allocates nothing but its output), or past kReusedFloats a buffer of the call's own (no large one kept alive).
// One at a time on a thread: nothing that runs while a call holds it takes another.
constexpr int64_t kReusedFloats = int64_t(1) << 16;
struct Scratch {
  std::vector<float> own;
  float* data;
  explicit Scratch(int64_t floats) {
    thread_local std::vector<float> reused;
    std::vector<float>& buffer = floats > kReusedFloats ? own : reused;
    if (int64_t(buffer.size()) < floats) buffer.resize(floats);
    data = buffer.data();
  }
};

// Tokens × width float32 inputs (multiplied by per-column scales when given), their sums over consecutive
// pieces of `piece` entries, and, for nibble codes whose pieces all start on a byte, the even and odd
// entries split out; in `storage`, Input::floats(…) of them.
struct Input {
  int64_t tokens, width, piece, pieces;
  bool nibbles, split;
  float *x, *even, *odd, *sums;  // x, then (split) its even and odd entries, then the piece sums
  static bool splits(int64_t width, int64_t piece, bool nibbles) { return nibbles && width % 2 == 0 && piece % 2 == 0; }
  static int64_t floats(int64_t tokens, int64_t width, int64_t piece, bool nibbles) {
    return tokens * width * (splits(width, piece, nibbles) ? 2 : 1) + tokens * (width / piece);
  }
  Input(const float* x_, const float* col, int64_t tokens_, int64_t width_, int64_t piece_, bool nibbles_,
        float* storage)
      : tokens(tokens_), width(width_), piece(piece_), pieces(width_ / piece_), nibbles(nibbles_),
        split(splits(width_, piece_, nibbles_)) {
    x = storage, even = x + tokens * width, odd = even + tokens * (width / 2);
    sums = x + tokens * width * (split ? 2 : 1);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t k = 0; k < width; ++k) x[t * width + k] = col ? x_[t * width + k] * col[k] : x_[t * width + k];
    const int64_t half = width / 2;
    if (split)
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < half; ++j) {
          even[t * half + j] = x[t * width + 2 * j];
          odd[t * half + j] = x[t * width + 2 * j + 1];
        }
    for (int64_t t = 0; t < tokens; ++t)  // (no division per entry: at one token it cost 0.9 % of stories260K's
      for (int64_t p = 0; p < pieces; ++p) {  // generation, more than the u transform)
        float sum = 0.f;
        for (int64_t k = p * piece; k < (p + 1) * piece; ++k) sum += x[t * width + k];
        sums[t * pieces + p] = sum;
      }
  }
  // Σ_k x[t, p · piece + k], the sum over piece p
  float sum(int64_t t, int64_t p) const { return sums[t * pieces + p]; }
  // Σ_j q_j x[t, offset + j] for the n codes from flat index `start` (q_j = the code, or its bit `bit` ≥ 0)
  Lanes dot(const uint8_t* codes, int64_t start, int64_t n, int64_t t, int64_t offset, int bit) const {
    if (!nibbles) return byte_lanes(codes + start, x + t * width + offset, n, bit);
    if (split) {
      const int64_t at = (t * width + offset) >> 1;
      return nibble_lanes(codes + start / 2, even + at, odd + at, n / 2, bit);
    }
    float acc = 0.f;  // pieces that do not start on a byte (odd widths)
    for (int64_t j = 0; j < n; ++j) {
      const int q = code_at(codes, start + j, true);
      acc += float(bit < 0 ? q : (q >> bit) & 1) * x[t * width + offset + j];
    }
    return lanes_scalar(acc);
  }
};

void check_codes(const torch::Tensor& codes) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(),
              "lowbit: codes must be a contiguous uint8 CPU tensor");
}

// x (…, in_f) as a contiguous float32 CPU tensor (tokens = numel / in_f rows), and an optional per-column
// float32 vector
torch::Tensor checked_input(const torch::Tensor& x, int64_t in_f, const c10::optional<torch::Tensor>& col,
                            const float** col_ptr) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() >= 1,
              "lowbit: x must be a float32 CPU tensor");
  TORCH_CHECK(x.size(-1) == in_f, "lowbit: the input's last dimension is ", x.size(-1),
              ", it must be the layer's input width ", in_f);
  const torch::Tensor x2 = x.contiguous();  // read as (tokens, in_f) rows; no reshape (a new tensor per call)
  *col_ptr = nullptr;
  if (col.has_value()) {
    TORCH_CHECK(col->scalar_type() == torch::kFloat32 && col->is_contiguous() && col->numel() == in_f,
                "lowbit: col must hold one contiguous float32 value per input column");
    *col_ptr = col->data_ptr<float>();
  }
  return x2;
}

// y (…, out) for x (…, in)
torch::Tensor output(const torch::Tensor& x, int64_t out_f, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat32 && bias->numel() == out_f),
              "lowbit: bias must be out_features float32 values");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_f;
  return torch::empty(shape, x.options());
}

struct Affine {  // RTN / HQQ metadata: m_g = zero_g (RTN, a float minimum) or −zero_g s_g (HQQ, a zero point)
  const at::Half *scale, *zero;
  int64_t groups;
  bool zero_in_codes;
  float s(int64_t i) const { return static_cast<float>(scale[i]); }
  float m(int64_t i) const {
    const float z = static_cast<float>(zero[i]);
    return zero_in_codes ? -z * s(i) : z;
  }
};

Affine affine(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero, int64_t out_f,
              int64_t in_f, int64_t group, bool zero_in_codes) {
  check_codes(codes);
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              zero.is_contiguous(), "lowbit: scale and zero must be contiguous float16");
  TORCH_CHECK(group > 0 && in_f % group == 0 && scale.numel() == out_f * (in_f / group) &&
              zero.numel() == out_f * (in_f / group), "lowbit: group size / metadata do not match the layer");
  return {scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(), in_f / group, zero_in_codes};
}

void add_bias(float* y, int64_t tokens, int64_t out_f, const c10::optional<torch::Tensor>& bias) {
  if (!bias.has_value()) return;
  const float* b = bias->data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out_f; ++o) y[t * out_f + o] += b[o];
}

// Kashin's closed-codebook step sizes of vectors first … first + n − 1 (k each, times the vector's scale when
// the step sizes are shared): stored float16, or uint8 log codes read through log_values, the 256 values the
// codes stand for (packing.log8_decode of every code, computed once when a layer binds its kernel).
std::vector<float> kashin_steps(const torch::Tensor& steps, const c10::optional<torch::Tensor>& scale,
                                const c10::optional<torch::Tensor>& log_values, int64_t n_vec, int64_t bits,
                                int64_t first, int64_t n) {
  const bool shared = steps.numel() == bits;
  TORCH_CHECK(shared || steps.numel() == n_vec * bits, "lowbit: steps do not match the layer");
  TORCH_CHECK(!scale.has_value() || scale->numel() == n_vec, "lowbit: scale does not match the layer");
  TORCH_CHECK(!log_values.has_value() || (log_values->scalar_type() == torch::kFloat32 &&
                                          log_values->is_contiguous() && log_values->numel() == 256),
              "lowbit: log_values must be the 256 float32 values of the log codes");
  const float* table = log_values.has_value() ? log_values->data_ptr<float>() : nullptr;
  struct Numbers {
    const at::Half* half = nullptr;
    const uint8_t* log = nullptr;
  };
  auto numbers = [&](const torch::Tensor& t) -> Numbers {
    TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == torch::kHalf ||
                                      (t.scalar_type() == torch::kUInt8 && table)),
                "lowbit: step sizes and scales are float16 or uint8 log codes (with log_values)");
    return t.scalar_type() == torch::kHalf ? Numbers{t.data_ptr<at::Half>(), nullptr} : Numbers{nullptr, t.data_ptr<uint8_t>()};
  };
  // decoded run by run (tight loops: this runs on every call of the activation route)
  auto decode = [&](const Numbers& num, int64_t from, int64_t count, float* out) {
    if (num.half) {
      int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(num.half + from + i))));
#endif
      for (; i < count; ++i) out[i] = static_cast<float>(num.half[from + i]);
    } else
      for (int64_t i = 0; i < count; ++i) out[i] = table[num.log[from + i]];
  };
  std::vector<float> out(n * bits);
  if (!shared) {
    decode(numbers(steps), first * bits, n * bits, out.data());
  } else {
    float shared_steps[64];
    TORCH_CHECK(bits <= 64, "lowbit: at most 64 steps");
    decode(numbers(steps), 0, bits, shared_steps);
    for (int64_t v = 0; v < n; ++v) std::copy(shared_steps, shared_steps + bits, out.begin() + v * bits);
  }
  if (scale.has_value()) {
    std::vector<float> sv(n);
    decode(numbers(*scale), first, n, sv.data());
    for (int64_t v = 0; v < n; ++v)
      for (int64_t i = 0; i < bits; ++i) out[v * bits + i] *= sv[v];
  }
  return out;
}

// The values of one Kashin vector per code, split by domain: table_a[q] = Σ_{i plain} c_i (2 bit_i(q) − 1), table_b
// the same over the P-domain steps (2^bits entries each); whether each has any step.
inline void kashin_tables(const float* step, const uint8_t* domains, int64_t v, int64_t bits, float* table_a, float* table_b,
                   bool& has_a, bool& has_b) {
  struct Signs {  // sign[i][q] = ±1 by bit i of code q (contiguous in q: the loops below vectorise)
    float sign[8][256];
    Signs() {
      for (int i = 0; i < 8; ++i)
        for (int q = 0; q < 256; ++q) sign[i][q] = float(((q >> i) & 1) * 2 - 1);
    }
  };
  static const Signs signs;
  const int entries = 1 << bits;
  std::fill(table_a, table_a + entries, 0.f);
  std::fill(table_b, table_b + entries, 0.f);
  has_a = has_b = false;
  for (int64_t i = 0; i < bits; ++i) {
    const int64_t flat = v * bits + i;
    const bool in_p = (domains[flat >> 3] >> (flat & 7)) & 1;
    float* table = in_p ? table_b : table_a;
    (in_p ? has_b : has_a) = true;
    const float st = step[i];
    const float* sign = signs.sign[i];
    for (int q = 0; q < entries; ++q) table[q] += st * sign[q];
  }
}

// What the activation routes read of a layer's step sizes on every call, decoded once: the float step sizes
// and, for the table and middle routes, each vector's A and B per code (`entries` values each: 8 up to 3 bits, 16 at 4)
// with whether it has any plain (bit 0) or P-domain (bit 1) step. Building the tables on every call cost 14 %
// of a one-token call on stories260K's 64 x 172 gate_proj (same-process A/B); kept, they take 2 · entries
// floats per vector (64 B at 3 bits: 1 B per weight on 64-wide vectors, 0.17 B on 384-wide ones).
struct KashinDecoded {
  std::vector<float> step, tables;
  std::vector<uint8_t> has;
  int64_t entries = 0;  // 0: no tables (more than 4 bits)
  bool any_b = false;   // some vector has a P-domain step
};

}  // namespace

// The RTN / HQQ weight (out, in) in one pass over the codes: for many tokens one matmul against the rebuilt
// weight beats a pass over the codes per token.
torch::Tensor affine_decode(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                            const c10::optional<torch::Tensor>& col, int64_t out_f, int64_t in_f, int64_t group,
                            int64_t bits, bool zero_in_codes);

// RTN / HQQ: y = x Ŵᵀ (+ b), Ŵ[o, k] = (s_g q + m_g) col_k per group g of `group` inputs of a row. Up to
// max_tokens tokens the column scales go on x and, per group, y_o += s_g Σ q_k x_k + m_g Σ x_k, so no weight is
// ever formed; above, the weight is rebuilt in one pass and multiplied (affine_decode). A layer binds the rest once
// (AffineLayer).
torch::Tensor affine_linear(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                            const c10::optional<torch::Tensor>& col, const c10::optional<torch::Tensor>& bias,
                            int64_t out_f, int64_t in_f, int64_t group, int64_t bits, bool zero_in_codes,
                            int64_t max_tokens, const torch::Tensor& x_in) {
  const float* colp;
  const torch::Tensor x = checked_input(x_in, in_f, col, &colp);
  const int64_t tokens = x.numel() / in_f;
  if (tokens > max_tokens) {
    const torch::Tensor w = affine_decode(codes, scale, zero, col, out_f, in_f, group, bits, zero_in_codes);
    return at::linear(x_in, w, bias);
  }
  const Affine meta = affine(codes, scale, zero, out_f, in_f, group, zero_in_codes);
  Scratch scratch(Input::floats(tokens, in_f, group, bits <= 4));
  const Input input(x.data_ptr<float>(), colp, tokens, in_f, group, bits <= 4, scratch.data);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  auto y = output(x_in, out_f, bias);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_f, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t t = 0; t < tokens; ++t) {
        Lanes acc = lanes_zero();
        float offsets = 0.f;
        for (int64_t g = 0; g < meta.groups; ++g) {
          const int64_t i = o * meta.groups + g;
          acc = lanes_fma(meta.s(i), input.dot(c, o * in_f + g * group, group, t, g * group, -1), acc);
          offsets += meta.m(i) * input.sum(t, g);
        }
        yp[t * out_f + o] = lanes_sum(acc) + offsets;
      }
  });
  add_bias(yp, tokens, out_f, bias);
  return y;
}

torch::Tensor affine_decode(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                            const c10::optional<torch::Tensor>& col, int64_t out_f, int64_t in_f, int64_t group,
                            int64_t bits, bool zero_in_codes) {
  const Affine meta = affine(codes, scale, zero, out_f, in_f, group, zero_in_codes);
  TORCH_CHECK(!col.has_value() || (col->scalar_type() == torch::kFloat32 && col->numel() == in_f),
              "lowbit: col must hold in_features float32 values");
  const float* colp = col.has_value() ? col->data_ptr<float>() : nullptr;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const bool nibbles = bits <= 4, bytewise = !nibbles || (in_f % 2 == 0 && group % 2 == 0);
  auto w = torch::empty({out_f, in_f}, torch::dtype(torch::kFloat32));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out_f, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float* row = wp + o * in_f;
      for (int64_t g = 0; g < meta.groups; ++g) {
        const float s = meta.s(o * meta.groups + g), m = meta.m(o * meta.groups + g);
        float* out = row + g * group;
        const int64_t start = o * in_f + g * group;
        if (nibbles && bytewise) {
          const uint8_t* cb = c + start / 2;
          for (int64_t j = 0; j < group / 2; ++j) {
            out[2 * j] = s * float(cb[j] & 15) + m;
            out[2 * j + 1] = s * float(cb[j] >> 4) + m;
          }
        } else {
          for (int64_t j = 0; j < group; ++j) out[j] = s * float(code_at(c, start + j, nibbles)) + m;
        }
      }
      if (colp)
        for (int64_t k = 0; k < in_f; ++k) row[k] *= colp[k];
    }
  });
  return w;
}

// out[k] = Σ_{n < count} e[n] M[n, k] for k < g (M row-major, g columns): P's rows weighted by the input.
// R × 8 outputs stay in registers across all n, so M streams through once and no output is stored twice.
#if defined(__AVX2__) && defined(__FMA__)
template <int R>
inline void weighted_rows_block(const float* e, const float* m, int64_t count, int64_t g, int64_t k, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t n = 0; n < count; ++n) {
    const __m256 en = _mm256_set1_ps(e[n]);
    const float* row = m + n * g + k;
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(en, _mm256_loadu_ps(row + 8 * r), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + k + 8 * r, acc[r]);
}
#endif
inline void weighted_rows(const float* e, const float* m, int64_t count, int64_t g, float* out) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; k + 64 <= g; k += 64) weighted_rows_block<8>(e, m, count, g, k, out);
  switch ((g - k) / 8) {  // the rest in one pass, as many registers as it needs
    case 7: weighted_rows_block<7>(e, m, count, g, k, out); break;
    case 6: weighted_rows_block<6>(e, m, count, g, k, out); break;
    case 5: weighted_rows_block<5>(e, m, count, g, k, out); break;
    case 4: weighted_rows_block<4>(e, m, count, g, k, out); break;
    case 3: weighted_rows_block<3>(e, m, count, g, k, out); break;
    case 2: weighted_rows_block<2>(e, m, count, g, k, out); break;
    case 1: weighted_rows_block<1>(e, m, count, g, k, out); break;
    default: break;
  }
  k += (g - k) / 8 * 8;
#endif
  for (; k < g; ++k) {
    float acc = 0.f;
    for (int64_t n = 0; n < count; ++n) acc += e[n] * m[n * g + k];
    out[k] = acc;
  }
}

// P applied to one vector of length n, for the table routes (one token at a time). Either P's dense matrix M, read
// as out[k] = Σ_j z_j M[j, k] (weighted_rows: Mᵀ z), or, for kashin.py's symmetric "dct" P = IDCT·diag(ε)·DCT, its
// even/odd split (kashin.py `_butterfly`): with s = z_top + reversed z_bottom and d = z_top − reversed z_bottom,
// P z = [E s + O d ; reversed (E s − O d)], E and O symmetric (n/2)², E the same kind of map again (the DCT's even
// rows are the half-length DCT), split while its length is even and at least kashin.py's BUTTERFLY_MIN. `blocks`
// holds O of each level, then the last level's dense map: 86² + 43² multiply-adds for n = 172 instead of 172², and
// that much less of P to read from cache per token.
struct PMap {
  const float* dense = nullptr;   // (n, n), or
  const float* blocks = nullptr;  // O per level, then (last, last)
  int64_t n = 0, last = 0;

  PMap() = default;
  PMap(const torch::Tensor& m, const c10::optional<torch::Tensor>& butterfly, int64_t n_) : n(n_) {
    TORCH_CHECK(m.scalar_type() == torch::kFloat32 && m.is_contiguous() && m.numel() == n * n,
                "lowbit: transform must be a contiguous g x g float32 matrix");
    dense = m.data_ptr<float>();
    if (!butterfly.has_value()) return;
    TORCH_CHECK(butterfly->scalar_type() == torch::kFloat32 && butterfly->is_contiguous(),
                "lowbit: butterfly must be contiguous float32");
    int64_t size = n, left = butterfly->numel();
    while (left != size * size) {  // the levels the blocks hold: O of (size / 2)², until the last dense map
      TORCH_CHECK(size % 2 == 0 && left > (size / 2) * (size / 2), "lowbit: butterfly does not fit the length ", n);
      left -= (size / 2) * (size / 2), size /= 2;
    }
    blocks = butterfly->data_ptr<float>(), last = size;
  }
  explicit operator bool() const { return dense != nullptr; }
  int64_t scratch() const { return 4 * n; }  // floats `apply` may use at `work`
  // out = P z, z the `count` entries e placed at `offset` (zeros elsewhere)
  void apply(const float* e, int64_t count, int64_t offset, float* out, float* work) const {
    if (!blocks) return weighted_rows(e, dense + offset * n, count, n, out);
    const float* z = e;
    if (count != n) {
      std::fill(work, work + n, 0.f);
      std::copy(e, e + count, work + offset);
      z = work, work += n;
    }
    split(blocks, n, z, out, work);
  }
  void split(const float* b, int64_t size, const float* z, float* out, float* work) const {
    if (size == last) return weighted_rows(z, b, size, size, out);
    const int64_t h = size / 2;
    float *s = work, *d = s + h, *od = d + h;
    for (int64_t i = 0; i < h; ++i) s[i] = z[i] + z[size - 1 - i], d[i] = z[i] - z[size - 1 - i];
    weighted_rows(d, b, h, h, od);
    split(b + h * h, h, s, out, od + h);  // E s into out's first half
    for (int64_t i = 0; i < h; ++i) {
      const float es = out[i];
      out[i] = es + od[i], out[size - 1 - i] = es - od[i];
    }
  }
};

// Kashin, closed codebook (kashin.py): a vector of g weights is Ŵ_v = Σ_i c_i s_i (times P when step i is in
// the P domain), s_i = ±1 the bit i of each code, c_i its step size; the input columns are scaled by col.
// With P on the activations, u = Pᵀ x_c per vector, each step is one masked sum over the vector's codes.
//   decoded: the step sizes (and tables) KashinLayer decoded from the stored ones; domains: the 1-bit stream
//   of the (vectors, k) domain flags.
//   u: given (tokens, u_width), or computed here from `transform`, P's dense (g, g) matrix M (P z = M z).
//   A vector is a group of g inputs of one row (u: (tokens, in)), or r whole rows (g = r · in; u: (tokens,
//   r, g), u[t, j] = Pᵀ of the input placed at slot j, and output row j of the block reads its own slot).
torch::Tensor kashin_linear(const c10::optional<torch::Tensor>& u_given, const torch::Tensor& codes,
                            const KashinDecoded& decoded, const torch::Tensor& domains,
                            const c10::optional<torch::Tensor>& col, const PMap& transform,
                            const c10::optional<torch::Tensor>& bias, int64_t out_f, int64_t in_f, int64_t group,
                            int64_t bits, const torch::Tensor& x_in) {
  const float* colp;
  const torch::Tensor x = checked_input(x_in, in_f, col, &colp);
  check_codes(codes);
  const int64_t tokens = x.numel() / in_f;
  TORCH_CHECK(group > 0 && (in_f % group == 0 || (group % in_f == 0 && out_f % (group / in_f) == 0)),
              "lowbit: the vector length does not tile the layer");
  const int64_t rows = group > in_f ? group / in_f : 1, seg = rows > 1 ? in_f : group;
  const float* xp = x.data_ptr<float>();
  const int64_t n_vec = out_f * in_f / group, u_width = rows > 1 ? rows * group : in_f;
  TORCH_CHECK(domains.scalar_type() == torch::kUInt8 && domains.numel() * 8 >= n_vec * bits, "lowbit: domains");
  TORCH_CHECK(u_given.has_value() != bool(transform), "lowbit: give u or the transform, not both");
  const bool nibbles = bits <= 4;
  const int64_t plain_floats = Input::floats(tokens, in_f, seg, nibbles), u_floats = tokens * u_width;
  const int64_t spec_floats = Input::floats(tokens, u_width, group, nibbles);
  Scratch scratch(plain_floats + u_floats + spec_floats + (u_given.has_value() ? 0 : transform.scratch()));
  const Input plain(xp, colp, tokens, in_f, seg, nibbles, scratch.data);
  float* u = scratch.data + plain_floats;  // then spec's storage, then P's scratch
  float* spec_storage = u + u_floats;
  if (u_given.has_value()) {
    TORCH_CHECK(u_given->scalar_type() == torch::kFloat32 && u_given->is_contiguous() &&
                u_given->numel() == u_floats, "lowbit: u has the wrong shape");
    std::copy(u_given->data_ptr<float>(), u_given->data_ptr<float>() + u_floats, u);
  } else {  // u = Pᵀ e (P symmetric where it is split), e holding x_c where the vector covers it
    TORCH_CHECK(transform.n == group, "lowbit: the transform's length is not the vector length");
    const int64_t pieces = rows > 1 ? rows : in_f / group;
    float* work = spec_storage + spec_floats;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t p = 0; p < pieces; ++p) {
        const float* e = plain.x + t * in_f + (rows > 1 ? 0 : p * group);
        // rows > 1: x sits at slot p of the vector
        transform.apply(e, seg, rows > 1 ? p * in_f : 0, u + t * u_width + p * group, work);
      }
  }
  const Input spec(u, nullptr, tokens, u_width, group, nibbles, spec_storage);
  const float* step = decoded.step.data();
  const int64_t entries = decoded.entries;
  const uint8_t* dom = domains.data_ptr<uint8_t>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  auto y = output(x_in, out_f, bias);
  float* yp = y.data_ptr<float>();
  // up to 4 bits with nibble-aligned pieces: each vector's A and B as tables, read with the codes;
  // otherwise (and in the portable build) one masked sum per step (bit-sliced)
  const bool tables = kTableLookup && entries > 0 && plain.split && spec.split;
  const float* table_of = decoded.tables.data();  // vector v: A at table_of + 2 v entries, then B
  at::parallel_for(0, out_f, 16, [&](int64_t begin, int64_t end) {
    float y_few[48];  // y_row then y_pair: on the stack for a few tokens (Scratch is the caller's)
    std::vector<float> y_many(3 * tokens > 48 ? 3 * tokens : 0);
    float* y_row = 3 * tokens > 48 ? y_many.data() : y_few;
    if (tables && rows == 1) {  // rows in pairs (table_lanes_ab_pair); an odd last row is paired with itself
      float* y_pair = y_row + tokens;
      for (int64_t o = begin; o < end; o += 2) {
        const int64_t o1 = std::min(o + 1, end - 1);
        std::fill(y_pair, y_pair + 2 * tokens, 0.f);
        for (int64_t s = 0; s < in_f / seg; ++s) {
          const int64_t v = o * (in_f / group) + s, v1 = o1 * (in_f / group) + s;
          const int64_t own = o * in_f + s * seg, own1 = o1 * in_f + s * seg;
          const float *table_a = table_of + 2 * v * entries, *table_a1 = table_of + 2 * v1 * entries;
          for (int64_t t = 0; t < tokens; ++t) {
            const int64_t x_at = (t * in_f + s * seg) >> 1, u_half = (t * u_width + s * group) >> 1;
            float y0, y1;
            table_lanes_ab_pair(c + own / 2, c + own1 / 2, plain.even + x_at, plain.odd + x_at, spec.even + u_half,
                            spec.odd + u_half, group / 2, table_a, table_a + entries, table_a1, table_a1 + entries,
                                bits == 4, y0, y1);
            y_pair[t] += y0, y_pair[tokens + t] += y1;
          }
        }
        for (int64_t t = 0; t < tokens; ++t) yp[t * out_f + o] = y_pair[t], yp[t * out_f + o1] = y_pair[tokens + t];
      }
      return;
    }
    for (int64_t o = begin; o < end; ++o) {
      std::fill(y_row, y_row + tokens, 0.f);
      for (int64_t s = 0; s < in_f / seg; ++s) {
        const int64_t v = rows > 1 ? o / rows : o * (in_f / group) + s;
        const int64_t own = o * in_f + s * seg;                 // this row's codes (plain steps)
        const int64_t whole = rows > 1 ? v * group : own;       // the whole vector's codes (P steps)
        const int64_t u_piece = rows > 1 ? o % rows : s, u_at = u_piece * group;
        if (tables) {  // A and B of this vector per code, once for every token
          const bool has_a = decoded.has[v] & 1, has_b = decoded.has[v] & 2;
          const float *table_a = table_of + 2 * v * entries, *table_b = table_a + entries;
          for (int64_t t = 0; t < tokens; ++t) {  // vectors of several rows: A and B read different codes
            const int64_t x_at = (t * in_f + s * seg) >> 1, u_half = (t * u_width + u_at) >> 1;
            Lanes acc = lanes_zero();
            if (has_a)
              acc = lanes_add(acc, table_lanes(c + own / 2, plain.even + x_at, plain.odd + x_at, seg / 2, table_a,
                                               bits == 4));
            if (has_b)
              acc = lanes_add(acc, table_lanes(c + whole / 2, spec.even + u_half, spec.odd + u_half, group / 2,
                                               table_b, bits == 4));
            y_row[t] += lanes_sum(acc);
          }
          continue;
        }
        for (int64_t t = 0; t < tokens; ++t) {  // one masked sum per step
          Lanes acc = lanes_zero();
          float offsets = 0.f;
          for (int64_t i = 0; i < bits; ++i) {
            const int64_t flat = v * bits + i;
            const float st = step[flat];
            if ((dom[flat >> 3] >> (flat & 7)) & 1) {
              acc = lanes_fma(2.f * st, spec.dot(c, whole, group, t, u_at, int(i)), acc);
              offsets -= st * spec.sum(t, u_piece);
            } else {
              acc = lanes_fma(2.f * st, plain.dot(c, own, seg, t, s * seg, int(i)), acc);
              offsets -= st * plain.sum(t, s);
            }
          }
          y_row[t] += lanes_sum(acc) + offsets;
        }
      }
      for (int64_t t = 0; t < tokens; ++t) yp[t * out_f + o] = y_row[t];
    }
  });
  add_bias(yp, tokens, out_f, bias);
  return y;
}

// Kashin's weight route (closed codebook), for vectors first … first + n − 1 of the layer: `kashin_lookup`
// writes B of each (its values per code in the P domain), in Makhoul's order when asked (the order P's FFT
// form works in, kashin.py `_even_odd_order`: v[m] = z[2m], v[g − 1 − m] = z[2m + 1]), so that the caller
// applies P without reordering anything; `kashin_combine` writes the weight Ŵ = (A + P B)·diag(col) in the
// natural order, A read from the codes again and P B from the caller (in Makhoul's order or the natural one).
// A is never stored: one write and one read of a weight-sized block fewer. With nibble codes the even and odd
// positions are a byte's low and high nibbles, so both orders are read with the same table permutes.
namespace {

struct KashinVectors {
  const uint8_t* codes;
  const uint8_t* domains;
  std::vector<float> step;
  int64_t n_vec, group, bits, first, n;
  bool nibbles;
  KashinVectors(const torch::Tensor& codes_t, const torch::Tensor& steps, const c10::optional<torch::Tensor>& scale,
                const c10::optional<torch::Tensor>& log_values, const torch::Tensor& domains_t, int64_t n_vec_,
                int64_t group_, int64_t bits_, int64_t first_, int64_t n_)
      : n_vec(n_vec_), group(group_), bits(bits_), first(first_), n(n_), nibbles(bits_ <= 4) {
    check_codes(codes_t);
    TORCH_CHECK(first >= 0 && n >= 0 && first + n <= n_vec &&
                codes_t.numel() >= (nibbles ? (n_vec * group + 1) / 2 : n_vec * group),
                "lowbit: the block of vectors lies outside the layer");
    TORCH_CHECK(domains_t.scalar_type() == torch::kUInt8 && domains_t.numel() * 8 >= n_vec * bits, "lowbit: domains");
    step = kashin_steps(steps, scale, log_values, n_vec, bits, first, n);
    codes = codes_t.data_ptr<uint8_t>();
    domains = domains_t.data_ptr<uint8_t>();
  }
  // vector v's (of the block) per-code values of A and B
  void tables(int64_t v, float* table_a, float* table_b) const {
    bool has_a, has_b;
    if (kTableLookup && bits <= 4)
      kashin_tables16(step.data() + v * bits, domains, first + v, bits, table_a, table_b, has_a, has_b);
    else
      kashin_tables(step.data() + v * bits, domains, first + v, bits, table_a, table_b, has_a, has_b);
  }
  int code(int64_t v, int64_t j) const { return code_at(codes, (first + v) * group + j, nibbles); }
  // the permutes below read 8 bytes = 16 codes: a nibble-aligned vector of even length
  bool paired(int64_t v) const { return kTableLookup && nibbles && group % 2 == 0 && ((first + v) * group) % 2 == 0; }
  const uint8_t* bytes(int64_t v) const { return codes + (first + v) * group / 2; }
};

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 reversed(__m256 v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)); }
// even = z[2m … 2m + 14 step 2], odd = z[2m + 1 … 2m + 15 step 2] → z[2m … 2m + 15] at out
inline void store_interleaved(float* out, __m256 even, __m256 odd, const float* col) {
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20), second = _mm256_permute2f128_ps(lo, hi, 0x31);
  if (col) first = _mm256_mul_ps(first, _mm256_loadu_ps(col)), second = _mm256_mul_ps(second, _mm256_loadu_ps(col + 8));
  _mm256_storeu_ps(out, first);
  _mm256_storeu_ps(out + 8, second);
}
#endif

// out[j] = table[q_j] for the 2·half nibble codes at c (q_2m is the low nibble of c[m]), in their order
inline void lookup_codes(const uint8_t* c, int64_t half, const float* table, bool wide, float* out) {
  int64_t m = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = wide ? _mm256_loadu_ps(table + 8) : t_lo;
  const __m256i mask = _mm256_set1_epi32(15);
  for (; m + 8 <= half; m += 8) {
    const __m256i b = eight_bytes(c + m);
    store_interleaved(out + 2 * m, lookup(_mm256_and_si256(b, mask), t_lo, t_hi, wide),
                      lookup(_mm256_srli_epi32(b, 4), t_lo, t_hi, wide), nullptr);
  }
#endif
  for (; m < half; ++m) out[2 * m] = table[c[m] & 15], out[2 * m + 1] = table[c[m] >> 4];
}

// even[m] += s · T[q_2m], odd[m] += s · T[q_2m+1] over the 2·half nibble codes at c, for each of the one or two
// tables T (A and B of one vector, read with the same codes: one load and split of each 8 bytes serves both).
// The outputs stay split into even and odd entries until the caller's last input (no interleave per input).
inline void add_codes(const uint8_t* c, int64_t half, float s, bool wide, const float* table_a, float* a_even,
                      float* a_odd, const float* table_b, float* b_even, float* b_odd) {
  int64_t m = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i mask = _mm256_set1_epi32(15);
  auto scaled = [&](const float* t, int at) { return t ? _mm256_mul_ps(sv, _mm256_loadu_ps(t + at)) : sv; };
  const __m256 a_lo = scaled(table_a, 0), a_hi = wide ? scaled(table_a, 8) : a_lo;
  const __m256 b_lo = scaled(table_b, 0), b_hi = wide ? scaled(table_b, 8) : b_lo;
  auto add = [](float* out, __m256 v) { _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), v)); };
  for (; m + 8 <= half; m += 8) {
    const __m256i b = eight_bytes(c + m);
    const __m256i even = _mm256_and_si256(b, mask), odd = _mm256_srli_epi32(b, 4);
    if (table_a) add(a_even + m, lookup(even, a_lo, a_hi, wide)), add(a_odd + m, lookup(odd, a_lo, a_hi, wide));
    if (table_b) add(b_even + m, lookup(even, b_lo, b_hi, wide)), add(b_odd + m, lookup(odd, b_lo, b_hi, wide));
  }
#endif
  for (; m < half; ++m) {
    if (table_a) a_even[m] += s * table_a[c[m] & 15], a_odd[m] += s * table_a[c[m] >> 4];
    if (table_b) b_even[m] += s * table_b[c[m] & 15], b_odd[m] += s * table_b[c[m] >> 4];
  }
}

// out = table[q] over vector v's codes, in the natural order or Makhoul's
void kashin_values(const KashinVectors& vec, int64_t v, const float* table, bool makhoul, float* out) {
  const int64_t g = vec.group;
  if (!makhoul && vec.paired(v)) return lookup_codes(vec.bytes(v), g / 2, table, vec.bits == 4, out);
  int64_t m = 0;  // codes 2m, 2m + 1 done
#if defined(__AVX2__) && defined(__FMA__)
  if (vec.paired(v)) {  // Makhoul's order: the even codes forwards, the odd ones backwards from the end
    const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
    const __m256i mask = _mm256_set1_epi32(15);
    const uint8_t* c = vec.bytes(v);
    for (; 2 * m + 16 <= g; m += 8) {
      const __m256i b = eight_bytes(c + m);
      _mm256_storeu_ps(out + m, lookup(_mm256_and_si256(b, mask), t_lo, t_hi, vec.bits == 4));
      _mm256_storeu_ps(out + g - 8 - m, reversed(lookup(_mm256_srli_epi32(b, 4), t_lo, t_hi, vec.bits == 4)));
    }
  }
#endif
  for (int64_t j = 2 * m; j < g; ++j) {
    const float value = table[vec.code(v, j)];
    out[!makhoul ? j : (j % 2 == 0 ? j / 2 : g - 1 - j / 2)] = value;
  }
}

}  // namespace

void kashin_lookup(const torch::Tensor& codes, const torch::Tensor& steps, const c10::optional<torch::Tensor>& scale,
                   const c10::optional<torch::Tensor>& log_values, const torch::Tensor& domains, int64_t n_vec,
                   int64_t group, int64_t bits, int64_t first, bool makhoul, torch::Tensor out_b) {
  const KashinVectors vec(codes, steps, scale, log_values, domains, n_vec, group, bits, first, out_b.size(0));
  TORCH_CHECK(out_b.scalar_type() == torch::kFloat32 && out_b.is_contiguous() && out_b.numel() == vec.n * group,
              "lowbit: out_b must be a contiguous float32 (vectors, g) block");
  float* b = out_b.data_ptr<float>();
  at::parallel_for(0, vec.n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> table_a(std::max(16, 1 << bits)), table_b(std::max(16, 1 << bits));
    for (int64_t v = begin; v < end; ++v) {
      vec.tables(v, table_a.data(), table_b.data());
      kashin_values(vec, v, table_b.data(), makhoul, b + v * group);
    }
  });
}

void kashin_combine(const torch::Tensor& codes, const torch::Tensor& steps, const c10::optional<torch::Tensor>& scale,
                    const c10::optional<torch::Tensor>& log_values, const torch::Tensor& domains, int64_t n_vec,
                    int64_t group, int64_t bits, const c10::optional<torch::Tensor>& col, int64_t in_f, int64_t first,
                    const c10::optional<torch::Tensor>& pb, bool makhoul, torch::Tensor w) {
  const KashinVectors vec(codes, steps, scale, log_values, domains, n_vec, group, bits, first, w.size(0));
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&w, pb.has_value() ? &*pb : &w})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == vec.n * group,
                "lowbit: w and pb must be contiguous float32 (vectors, g) blocks");
  TORCH_CHECK(!makhoul || pb.has_value(), "lowbit: Makhoul's order without P B");
  TORCH_CHECK(in_f > 0 && (in_f % group == 0 || group % in_f == 0), "lowbit: the vector length does not tile the layer");
  TORCH_CHECK(!col.has_value() || (col->scalar_type() == torch::kFloat32 && col->is_contiguous() &&
                                   col->numel() == in_f), "lowbit: col must be in_f contiguous float32 scales");
  const float* colp = col.has_value() ? col->data_ptr<float>() : nullptr;
  std::vector<float> col_tiled;  // vectors of whole rows: the scales repeat every in_f weights
  if (colp && group > in_f) {
    col_tiled.resize(group);
    for (int64_t j = 0; j < group; ++j) col_tiled[j] = colp[j % in_f];
  }
  const float* pbp = pb.has_value() ? pb->data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, vec.n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> table_a(std::max(16, 1 << bits)), table_b(std::max(16, 1 << bits));
    for (int64_t v = begin; v < end; ++v) {
      vec.tables(v, table_a.data(), table_b.data());
      float* wv = wp + v * group;
      const float* pv = pbp ? pbp + v * group : nullptr;
      const float* cv = !colp ? nullptr : group > in_f ? col_tiled.data() : colp + ((first + v) * group) % in_f;
      const int64_t g = group;
      if (!makhoul) {  // P B (if any) in the natural order: A, plus P B, times the scales
        kashin_values(vec, v, table_a.data(), false, wv);
        if (pv)
          for (int64_t j = 0; j < g; ++j) wv[j] += pv[j];
        if (cv)
          for (int64_t j = 0; j < g; ++j) wv[j] *= cv[j];
        continue;
      }
      int64_t m = 0;  // positions 2m, 2m + 1 done
#if defined(__AVX2__) && defined(__FMA__)
      if (vec.paired(v)) {  // A's even and odd positions from the nibbles, P B's from both ends
        const __m256 t_lo = _mm256_loadu_ps(table_a.data()), t_hi = _mm256_loadu_ps(table_a.data() + 8);
        const __m256i mask = _mm256_set1_epi32(15);
        const uint8_t* c = vec.bytes(v);
        for (; 2 * m + 16 <= g; m += 8) {
          const __m256i b = eight_bytes(c + m);
          const __m256 even = _mm256_add_ps(lookup(_mm256_and_si256(b, mask), t_lo, t_hi, bits == 4),
                                            _mm256_loadu_ps(pv + m));
          const __m256 odd = _mm256_add_ps(lookup(_mm256_srli_epi32(b, 4), t_lo, t_hi, bits == 4),
                                           reversed(_mm256_loadu_ps(pv + g - 8 - m)));
          store_interleaved(wv + 2 * m, even, odd, cv ? cv + 2 * m : nullptr);
        }
      }
#endif
      for (int64_t j = 2 * m; j < g; ++j) {
        const float value = table_a[vec.code(v, j)] + pv[j % 2 == 0 ? j / 2 : g - 1 - j / 2];
        wv[j] = cv ? value * cv[j] : value;
      }
    }
  });
}

// P's middle step (kashin.py Transform.apply_reordered) on the half spectrum V of each vector, in place:
// H_k = c_k · (V_k or conj V_k) is a real 2 × 2 map of (Re V_k, Im V_k) per bin k, `map` (bins, 4) =
// (m00, m01, m10, m11) with Re H = m00 Re V + m01 Im V, Im H = m10 Re V + m11 Im V. One pass instead of
// torch's two (a sign on the imaginary parts, then a complex multiply).
void spectral_map(torch::Tensor spectrum, const torch::Tensor& map) {
  TORCH_CHECK(spectrum.scalar_type() == torch::kComplexFloat && spectrum.is_contiguous() &&
              map.scalar_type() == torch::kFloat32 && map.is_contiguous() && map.dim() == 2 && map.size(1) == 4 &&
              spectrum.size(-1) == map.size(0), "lowbit: spectrum (…, bins) complex64 and map (bins, 4) float32");
  const int64_t bins = map.size(0), rows = spectrum.numel() / std::max<int64_t>(bins, 1);
  // per bin pair the two registers' patterns: H = A ⊙ (Re, Im) + B ⊙ (Im, Re)
  std::vector<float> a(2 * bins), b(2 * bins);
  const float* m = map.data_ptr<float>();
  for (int64_t k = 0; k < bins; ++k) {
    a[2 * k] = m[4 * k], a[2 * k + 1] = m[4 * k + 3];
    b[2 * k] = m[4 * k + 1], b[2 * k + 1] = m[4 * k + 2];
  }
  float* v = reinterpret_cast<float*>(spectrum.data_ptr<c10::complex<float>>());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = v + r * 2 * bins;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; j + 8 <= 2 * bins; j += 8) {
        const __m256 x = _mm256_loadu_ps(row + j), swapped = _mm256_permute_ps(x, 0xB1);
        _mm256_storeu_ps(row + j, _mm256_fmadd_ps(_mm256_loadu_ps(a.data() + j), x,
                                                  _mm256_mul_ps(_mm256_loadu_ps(b.data() + j), swapped)));
      }
#endif
      for (; j < 2 * bins; j += 2) {
        const float re = row[j], im = row[j + 1];
        row[j] = a[j] * re + b[j] * im;
        row[j + 1] = b[j + 1] * re + a[j + 1] * im;
      }
    }
  });
}

// What a kernel object needs to stand in for its QuantizedLinear's forward (quantization.py `_bind_native` makes it
// the module's forward: a decode step then runs no Python between Module.__call__ and the kernel). The inputs the
// kernels take (float32 on the CPU, no gradient wanted) run in the kernel; any other goes to the module's path
// without kernels (`rest`). Once the module has dropped this binding (its codes, cache or placement changed) every
// call goes to the module's own forward, which binds afresh: a stale object someone kept (a wrapper that captured
// the forward) never computes with what the module no longer holds. Both are weak references to bound methods
// (weakref.WeakMethod): the module holds this object, and a strong reference back would make a cycle through a C++
// object, which the garbage collector cannot see. Unbound (None), an input elsewhere returns None to the caller.
struct ModuleHandle {
  pybind11::object forward = pybind11::none(), rest = pybind11::none();
  bool detached = false;
  bool takes(const torch::Tensor& x) const {
    return !detached && x.is_cpu() && x.scalar_type() == torch::kFloat32 &&
           !(x.requires_grad() && at::GradMode::is_enabled());
  }
  pybind11::object elsewhere(const torch::Tensor& x) const {
    const pybind11::object& weak = detached ? forward : rest;
    if (weak.is_none()) return pybind11::none();
    pybind11::object method = weak();
    TORCH_CHECK(!method.is_none(), "lowbit: the layer this kernel was bound to is gone");
    return method(x);
  }
};

template <class Layer>
void def_module_handle(pybind11::class_<Layer>& cls) {
  cls.def("bind_module", [](Layer& layer, pybind11::object forward, pybind11::object rest) {
        layer.module.forward = std::move(forward), layer.module.rest = std::move(rest);
      }, pybind11::arg("forward"), pybind11::arg("rest"), "the module's forward and its path without kernels, as "
      "weakref.WeakMethod")
      .def("detach", [](Layer& layer) { layer.module.detached = true; },
           "from now on every call goes to the module's forward");
}

// One layer's kernel with everything but x bound once: a call converts one argument instead of sixteen (on
// stories260K's 64-wide layers the conversions cost about as much as the multiply). The step sizes and tables
// are decoded on the first call that takes the activation route, so a layer that only ever rebuilds its
// weight (long inputs) never holds them; the once-flag makes concurrent first calls safe. Which route a call
// takes is the caller's choice (kashin.py native_linear): layer.table(x, u) is the table route, layer.middle(x, u)
// the middle one; layer(x) routes by itself (bind_route) and stands in for the module's forward (bind_module).
struct KashinLayer {
  c10::optional<torch::Tensor> scale, log_values, col, transform, bias;
  torch::Tensor codes, steps, domains;
  int64_t out_f, in_f, group, bits;
  c10::optional<torch::Tensor> butterfly;  // P's even/odd split (PMap), for the table routes
  PMap p_map;                              // transform (and butterfly) as the table routes read them
  // bind_route: calls of up to direct_tokens tokens (× rows per vector) take the table route (or, for a layer of
  // column vectors, `columns`) here; any other call goes to `fallback`, the caller's router. A decode step then
  // costs no Python between the module and the kernel (2 % of stories260K's batch-1 generation, same process).
  int64_t direct_tokens = 0;
  bool direct_columns = false;
  pybind11::object fallback;
  ModuleHandle module;
  struct Lazy {
    std::once_flag once;
    KashinDecoded decoded;
  };
  std::shared_ptr<Lazy> lazy = std::make_shared<Lazy>();

  const KashinDecoded& decoded() const {
    std::call_once(lazy->once, [this] {
      KashinDecoded& d = lazy->decoded;
      const int64_t n_vec = out_f * in_f / group;
      d.step = kashin_steps(steps, scale, log_values, n_vec, bits, 0, n_vec);
      if (bits > 4) return;
      TORCH_CHECK(domains.scalar_type() == torch::kUInt8 && domains.numel() * 8 >= n_vec * bits, "lowbit: domains");
      d.entries = bits <= 3 ? 8 : 16;
      d.tables.resize(2 * n_vec * d.entries);
      d.has.resize(n_vec);
      float table_a[256] = {}, table_b[256] = {};
      for (int64_t v = 0; v < n_vec; ++v) {
        bool has_a, has_b;
        kashin_tables(d.step.data() + v * bits, domains.data_ptr<uint8_t>(), v, bits, table_a, table_b, has_a, has_b);
        std::copy(table_a, table_a + d.entries, d.tables.begin() + 2 * v * d.entries);
        std::copy(table_b, table_b + d.entries, d.tables.begin() + (2 * v + 1) * d.entries);
        d.has[v] = uint8_t(has_a) | uint8_t(has_b) << 1;
        d.any_b |= has_b;
      }
    });
    return lazy->decoded;
  }
  // The middle route's weights, rows first … first + n − 1 into out (n, in_f), or (n, 2 in_f) for A and B side by
  // side: row o's A_v[q_k] (and B_v[q_k]), so that y = [x_c | u] [A | B]ᵀ in one matmul. A pass of table reads, no
  // P: vectors within a row (g ≤ in_f, g even, so every piece starts on a byte) of up to 4 bits.
  void ab_rows(int64_t first, const torch::Tensor& out) const {
    const KashinDecoded& d = decoded();
    TORCH_CHECK(d.entries > 0 && group <= in_f && group % 2 == 0, "lowbit: ab_rows needs vectors within a row, "
                "an even length and at most 4 bits");
    TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 &&
                (out.size(1) == in_f || out.size(1) == 2 * in_f) && first >= 0 && first + out.size(0) <= out_f,
                "lowbit: ab_rows writes (rows, in) or (rows, 2 in) contiguous float32 rows of the layer");
    const bool with_b = out.size(1) == 2 * in_f, wide = d.entries == 16;
    const int64_t pieces = in_f / group, width = out.size(1);
    const uint8_t* c = codes.data_ptr<uint8_t>();
    float* o = out.data_ptr<float>();
    for (int64_t r = 0; r < out.size(0); ++r)
      for (int64_t s = 0; s < pieces; ++s) {
        const int64_t row = first + r, v = row * pieces + s;
        const float* table_a = d.tables.data() + 2 * v * d.entries;
        const uint8_t* cv = c + (row * in_f + s * group) / 2;
        float* a = o + r * width + s * group;
        lookup_codes(cv, group / 2, table_a, wide, a);
        if (with_b) lookup_codes(cv, group / 2, table_a + d.entries, wide, a + in_f);
      }
  }
  // The middle route, y = [x_c | u] [A | B]ᵀ (+ b): u = Pᵀ x_c by P's dense matrix (one matmul over every token's
  // pieces) or given (P by FFT, the caller's), then ab_rows a block of rows at a time (A and B stay in cache) and
  // torch's matmul. One call: on stories260K's 64-172 wide layers the same steps as torch ops from Python cost
  // more in per-op overhead than in arithmetic.
  torch::Tensor middle(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& u_given) const {
    const float* colp;
    const torch::Tensor x = checked_input(x_in, in_f, col, &colp);
    const KashinDecoded& d = decoded();
    const int64_t tokens = x.numel() / in_f, pieces = in_f / group;
    torch::Tensor xc = x.reshape({tokens, in_f});
    if (colp) xc = xc * *col;
    torch::Tensor u;
    if (d.any_b) {
      if (u_given.has_value()) {
        TORCH_CHECK(u_given->scalar_type() == torch::kFloat32 && u_given->numel() == tokens * in_f,
                    "lowbit: u has the wrong shape");
        u = u_given->reshape({tokens, in_f}).contiguous();
      } else {
        TORCH_CHECK(transform.has_value(), "lowbit: the middle route needs u or P's dense matrix");
        u = at::mm(xc.reshape({tokens * pieces, group}), *transform).view({tokens, in_f});  // u_m = Σ_n M[n, m] e_n
      }
    }
    const torch::Tensor xu = d.any_b ? at::cat({xc, u}, 1) : xc.contiguous();
    const int64_t width = xu.size(1);
    torch::Tensor y = output(x_in, out_f, bias);
    torch::Tensor y2 = y.view({tokens, out_f});
    const int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(out_f, (int64_t(1) << 17) / width));
    torch::Tensor block = torch::empty({block_rows, width}, x.options());
    for (int64_t first = 0; first < out_f; first += block_rows) {
      const int64_t n = std::min(block_rows, out_f - first);
      torch::Tensor part = block.narrow(0, 0, n);
      ab_rows(first, part);
      if (n == out_f)
        at::mm_out(y2, xu, part.t());
      else
        y2.narrow(1, first, n).copy_(at::mm(xu, part.t()));
    }
    add_bias(y.data_ptr<float>(), tokens, out_f, bias);
    return y;
  }
  // Vectors along Ŵ's columns (kashin_gptq.py): this layer is bound to Ŵᵀ (out_f = Ŵ's inputs, in_f = group = its
  // outputs), whose row v is A_v + P B_v, so y = Σ_v x_v A_v + P Σ_v x_v B_v: per input its two tables scaled by
  // x_v and read with the codes of its row, summed over the outputs, then P once per token. With P's dense matrix
  // bound (given transposed: P z = Σ_n z_n M[n, ·]) y is returned; without (long columns: P by FFT in the caller)
  // the two sums (A part + b, B part), as (2, …, outputs).
  torch::Tensor columns(const torch::Tensor& x_in, bool parts) const {
    const float* colp;
    const torch::Tensor x = checked_input(x_in, out_f, c10::nullopt, &colp);
    TORCH_CHECK(group == in_f && in_f % 2 == 0 && bits <= 4 && !col.has_value(), "lowbit: columns needs one vector "
                "per row of an even length, at most 4 bits and no column scales");
    TORCH_CHECK(parts || transform.has_value(), "lowbit: columns needs P's dense matrix (else columns_parts)");
    const KashinDecoded& d = decoded();
    const int64_t tokens = x.numel() / out_f, half = in_f / 2;
    const bool wide = d.entries == 16;
    torch::Tensor y = parts ? torch::empty({2, tokens, in_f}, x.options()) : output(x_in, in_f, bias);
    float* yp = y.data_ptr<float>();
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const float* xp = x.data_ptr<float>();
    TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat32 && bias->numel() == in_f),
                "lowbit: bias must be one float32 value per output");
    // the four split sums, B and P B of one token, then P's scratch
    Scratch scratch(8 * half + (parts ? 0 : p_map.scratch()));
    float* b = scratch.data + 4 * half;
    float* pb = b + in_f;
    float* work = pb + in_f;
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(scratch.data, scratch.data + 4 * half, 0.f);
      float *a_even = scratch.data, *a_odd = a_even + half, *b_even = a_odd + half, *b_odd = b_even + half;
      for (int64_t v = 0; v < out_f; ++v) {
        const float s = xp[t * out_f + v];
        if (s == 0.f) continue;
        const float* table = d.tables.data() + 2 * v * d.entries;
        add_codes(c + v * half, half, s, wide, d.has[v] & 1 ? table : nullptr, a_even, a_odd,
                  d.has[v] & 2 ? table + d.entries : nullptr, b_even, b_odd);
      }
      float* yt = yp + t * in_f;
      float* bt = parts ? yp + (tokens + t) * in_f : b;
      for (int64_t m = 0; m < half; ++m)
        yt[2 * m] = a_even[m], yt[2 * m + 1] = a_odd[m], bt[2 * m] = b_even[m], bt[2 * m + 1] = b_odd[m];
      if (parts || !d.any_b) continue;
      p_map.apply(b, in_f, 0, pb, work);
      for (int64_t m = 0; m < in_f; ++m) yt[m] += pb[m];
    }
    add_bias(yp, tokens, in_f, bias);
    return y;
  }
  torch::Tensor operator()(const torch::Tensor& x, const c10::optional<torch::Tensor>& u) const {
    return kashin_linear(u, codes, decoded(), domains, col, u.has_value() ? PMap() : p_map, bias, out_f,
                         in_f, group, bits, x);
  }
  // The middle route of a layer of column vectors (bound to Ŵᵀ as for `columns`): [x A | x B] summed over blocks of
  // inputs, A and B decoded a block at a time by ab_rows (they stay in cache; no weight-sized buffer), one matmul
  // per block; then y = x A + P (x B) (+ b) with P's dense matrix, or without it the two sums as for columns_parts.
  torch::Tensor columns_middle(const torch::Tensor& x_in, bool parts) const {
    const float* colp;
    const torch::Tensor x = checked_input(x_in, out_f, c10::nullopt, &colp);
    TORCH_CHECK(parts || transform.has_value(), "lowbit: columns_middle needs P's dense matrix (or parts)");
    const int64_t tokens = x.numel() / out_f;
    const torch::Tensor x2 = x.reshape({tokens, out_f});
    torch::Tensor sums = torch::zeros({tokens, 2 * in_f}, x.options());
    const int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(out_f, (int64_t(1) << 17) / (2 * in_f)));
    torch::Tensor block = torch::empty({block_rows, 2 * in_f}, x.options());
    for (int64_t first = 0; first < out_f; first += block_rows) {
      const int64_t n = std::min(block_rows, out_f - first);
      torch::Tensor part = block.narrow(0, 0, n);
      ab_rows(first, part);
      sums.addmm_(x2.narrow(1, first, n), part);
    }
    torch::Tensor y_a = sums.narrow(1, 0, in_f), y_b = sums.narrow(1, in_f, in_f);
    if (parts) {
      torch::Tensor out = at::stack({y_a, y_b});
      if (bias.has_value()) out[0].add_(*bias);
      return out;
    }
    torch::Tensor y = at::addmm(y_a, y_b, *transform);  // P z = Σ_n z_n M[n, ·] (M: P's matrix transposed)
    if (bias.has_value()) y.add_(*bias);
    std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
    shape.back() = in_f;
    return y.view(shape);
  }
  pybind11::object routed(const torch::Tensor& x) const {
    if (!module.takes(x)) return module.elsewhere(x);
    const int64_t width = direct_columns ? out_f : in_f, rows = group > in_f ? group / in_f : 1;
    if (transform.has_value() && x.dim() >= 1 && x.size(-1) == width && x.numel() / width * rows <= direct_tokens)
      return pybind11::cast(direct_columns ? columns(x, false) : operator()(x, c10::nullopt));
    TORCH_CHECK(fallback && !fallback.is_none(), "lowbit: this layer has no route for the input (bind_route)");
    pybind11::object y = fallback(x);
    return y.is_none() ? module.elsewhere(x) : y;
  }
};

struct AffineLayer {
  torch::Tensor codes, scale, zero;
  c10::optional<torch::Tensor> col, bias;
  int64_t out_f, in_f, group, bits;
  bool zero_in_codes;
  int64_t max_tokens;
  ModuleHandle module;
  pybind11::object operator()(const torch::Tensor& x) const {
    if (!module.takes(x)) return module.elsewhere(x);
    return pybind11::cast(
        affine_linear(codes, scale, zero, col, bias, out_f, in_f, group, bits, zero_in_codes, max_tokens, x));
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // module_local: the AVX2 and portable builds may both be loaded in one process (the tests compare them)
  pybind11::class_<KashinLayer> kashin(m, "KashinLayer", pybind11::module_local(),
                                       "kashin_linear bound to one layer: layer.table(x, u=None), layer.middle(x, "
                                       "u=None), layer.columns(x); layer(x) routes (bind_route, bind_module)");
  kashin.def(pybind11::init([](torch::Tensor codes, torch::Tensor steps, c10::optional<torch::Tensor> scale,
                             c10::optional<torch::Tensor> log_values, torch::Tensor domains,
                             c10::optional<torch::Tensor> col, c10::optional<torch::Tensor> transform,
                             c10::optional<torch::Tensor> butterfly, c10::optional<torch::Tensor> bias, int64_t out_f,
                             int64_t in_f, int64_t group, int64_t bits) {
        TORCH_CHECK(transform.has_value() || !butterfly.has_value(), "lowbit: a butterfly needs P's dense matrix");
        KashinLayer layer{scale, log_values, col, transform, bias, codes, steps, domains, out_f, in_f, group, bits,
                          butterfly};
        if (transform.has_value()) layer.p_map = PMap(*transform, butterfly, group);
        return layer;
      }))
      .def("table", &KashinLayer::operator(), pybind11::arg("x"), pybind11::arg("u") = pybind11::none())
      .def("__call__", &KashinLayer::routed, pybind11::arg("x"))
      .def("bind_route", [](KashinLayer& layer, int64_t direct_tokens, bool columns, pybind11::object fallback) {
        layer.direct_tokens = direct_tokens, layer.direct_columns = columns, layer.fallback = std::move(fallback);
      }, pybind11::arg("direct_tokens"), pybind11::arg("columns"), pybind11::arg("fallback"))
      .def("ab_rows", &KashinLayer::ab_rows, pybind11::arg("first"), pybind11::arg("out"))
      .def("middle", &KashinLayer::middle, pybind11::arg("x"), pybind11::arg("u") = pybind11::none())
      .def("columns", [](const KashinLayer& layer, const torch::Tensor& x) { return layer.columns(x, false); })
      .def("columns_parts", [](const KashinLayer& layer, const torch::Tensor& x) { return layer.columns(x, true); })
      .def("columns_middle", [](const KashinLayer& layer, const torch::Tensor& x) {
        return layer.columns_middle(x, false); })
      .def("columns_middle_parts", [](const KashinLayer& layer, const torch::Tensor& x) {
        return layer.columns_middle(x, true); });
  def_module_handle(kashin);
  pybind11::class_<AffineLayer> affine(m, "AffineLayer", pybind11::module_local(),
                                       "affine_linear bound to one layer: layer(x) (bind_module)");
  affine.def(pybind11::init([](torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                             c10::optional<torch::Tensor> col, c10::optional<torch::Tensor> bias, int64_t out_f,
                             int64_t in_f, int64_t group, int64_t bits, bool zero_in_codes, int64_t max_tokens) {
        return AffineLayer{codes, scale, zero, col, bias, out_f, in_f, group, bits, zero_in_codes, max_tokens};
      }))
      .def("__call__", &AffineLayer::operator(), pybind11::arg("x"));
  def_module_handle(affine);
  m.def("kashin_combine", &kashin_combine, "Kashin (closed codebook): the weight (A + P B) diag(col) of a block of vectors");
  m.def("kashin_lookup", &kashin_lookup, "Kashin (closed codebook): B of a block of vectors from the codes");
  m.def("affine_decode", &affine_decode, "RTN / HQQ: the float32 weight from the codes in one pass");
  m.def("spectral_map", &spectral_map, "P's middle step on the half spectrum: a real 2x2 map per bin, in place");
}
