// Quantised GEMM for CPU decoding: y[m, n] = sum_k x[m, k] w[n, k] with w in 32-value blocks (llama.cpp's q8_0
// and q4_0/q4_1 layouts), built by llamalab/inference/kernels.py with the host's compiler (-march=native).
//
// The activations are quantised per 32-block into two int8 planes (x = d * (hi + lo / 254), see quantize_rows), so
// a block's dot product is two integer instruction sequences (AVX-512 VNNI / AVX-VNNI vpdpbusd, else AVX2
// maddubs + madd) and two fp32 FMAs with the product of the two scales. q4 weights carry a per-block offset c,
// whose term c * sum(x) uses the sum of the quantised x (as llama.cpp's q8_1 does). From FROWS rows of x on, the
// weight blocks are widened to fp32 once and every row multiplied exactly instead (f32_row).
//
// Threads: OpenMP over output rows, with the count the caller passes (torch.get_num_threads()); the library links
// libgomp.so.1, the same soname torch loads, so both share one thread pool.
#include <stdint.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

int qdot_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return 3;  // AVX-512 VNNI
#elif defined(__AVXVNNI__)
  return 2;  // AVX-VNNI
#else
  return 1;  // AVX2
#endif
}

// x per 32-block as d * (hi + lo / 254): hi = round(x / d) with d = max|x| / 127, lo the rounded remainder in
// 1/254ths; both int8, so each block's dot product is two integer ones. The error is ~max|x| / 65000 per block,
// finer than bf16's 8-bit mantissa (one int8 plane alone cost SmolLM2 1.5 points of top-1 agreement).
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xh, int8_t* xl, float* sx, float* sumx) {
  const int64_t nb = K / 32;
  for (int64_t i = 0; i < M * nb; i++) {
    const float* xb = x + i * 32;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < 32; j++) { float a = fabsf(xb[j]); amax = a > amax ? a : amax; sum += xb[j]; }
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    if (!isfinite(sum)) { d = NAN; id = 0.f; }  // NaN or inf in the block: the outputs it feeds become NaN
    int32_t hsum_ = 0, lsum = 0;
    for (int j = 0; j < 32; j++) {
      const float v = xb[j] * id, h = rintf(v);
      const int8_t hi = (int8_t)h, lo = (int8_t)lrintf((v - h) * 254.f);
      xh[i * 32 + j] = hi;
      xl[i * 32 + j] = lo;
      hsum_ += hi;
      lsum += lo;
    }
    sx[i] = d;
    // NOTE: the sum of the quantised x, not of x: q4's offset term then sees the same x as its nibble term
    sumx[i] = d * ((float)hsum_ + (float)lsum * (1.f / 254.f));
  }
}

// int32 lanes holding partial sums of a (unsigned) * b (signed) over 32 bytes
static inline __m256i dot_us(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}


// One weight row against MM activation rows (MM a compile-time constant so the accumulators stay in registers);
// two accumulators per row (the hi and lo planes' sums), so consecutive FMAs do not wait on each other.
#define ALWAYS static inline __attribute__((always_inline))

ALWAYS void q8_row(const int8_t* qr, const float* sr, const int8_t* xh, const int8_t* xl, const float* sx,
                   int64_t nb, int MM, float* out) {
  __m256 a0[4], a1[4];  // the hi and lo planes' sums
  for (int i = 0; i < MM; i++) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
  for (int64_t b = 0; b < nb; b++) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
    const __m256i aw = _mm256_sign_epi8(w, w);  // |w|, and x takes w's sign: a u8 x s8 product
    for (int i = 0; i < MM; i++) {
      const int64_t r = i * nb + b;
      const __m256i h = _mm256_loadu_si256((const __m256i*)(xh + r * 32));
      const __m256i l = _mm256_loadu_si256((const __m256i*)(xl + r * 32));
      const __m256 sc = _mm256_set1_ps(sr[b] * sx[r]);
      a0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(aw, _mm256_sign_epi8(h, w))), sc, a0[i]);
      a1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(aw, _mm256_sign_epi8(l, w))), sc, a1[i]);
    }
  }
  for (int i = 0; i < MM; i++) out[i] = hsum(a0[i]) + hsum(a1[i]) * (1.f / 254.f);
}

ALWAYS void q4_row(const uint8_t* qr, const float* sr, const float* cr, const int8_t* xh, const int8_t* xl,
                   const float* sx, const float* sumx, int64_t nb, int MM, float* out) {
  const __m256i lo4 = _mm256_set1_epi8(15);
  __m256 a0[4], a1[4];
  for (int i = 0; i < MM; i++) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
  for (int64_t b = 0; b < nb; b++) {
    const __m128i p = _mm_loadu_si128((const __m128i*)(qr + b * 16));
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), lo4);
    for (int i = 0; i < MM; i++) {
      const int64_t r = i * nb + b;
      const __m256 sc = _mm256_set1_ps(sr[b] * sx[r]);
      a0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(w, _mm256_loadu_si256((const __m256i*)(xh + r * 32)))), sc, a0[i]);
      a1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(w, _mm256_loadu_si256((const __m256i*)(xl + r * 32)))), sc, a1[i]);
    }
  }
  // the offsets' term sum_b c[b] sum(x)[b], 8 blocks per FMA (a scalar running sum per block would be a serial chain)
  for (int i = 0; i < MM; i++) {
    const float* sxr = sumx + i * nb;
    __m256 o = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) o = _mm256_fmadd_ps(_mm256_loadu_ps(cr + b), _mm256_loadu_ps(sxr + b), o);
    float off = hsum(o);
    for (; b < nb; b++) off += cr[b] * sxr[b];
    out[i] = hsum(a0[i]) + hsum(a1[i]) * (1.f / 254.f) + off;
  }
}

// NOTE: one thread streams weights from DRAM at ~10 GB/s on the hardware prefetcher alone; asking for the row 8
// ahead too made SmolLM2-135M's whole decode 11-14% faster at 1 thread, 6-11% at 2 (4 rows: +11%, 32: +7%).
#define AHEAD 8

ALWAYS void prefetch_row(const char* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// Several activation rows: the weight block widened to fp32 once (scale and offset applied), then plain FMAs per
// row with x as it is (exact, no activation rounding). Cheaper per row than the integer path, whose two planes cost
// ~9 instructions per row and block, once the widening is shared by 4+ rows (batch-8 decode, prefill).
#define MAXF 8

ALWAYS void widen8(const int8_t* p, __m256 sc, __m256* w) {  // 32 int8 -> 4 x 8 floats, times the scale
  for (int j = 0; j < 4; j++)
    w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * j)))), sc);
}

ALWAYS void widen4(const uint8_t* p, __m256 sc, __m256 cc, __m256* w) {  // 16 bytes of nibbles -> 4 x 8 floats
  const __m256i lo4 = _mm256_set1_epi32(15);
  const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, lo4)), sc, cc);  // elements 0-7
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, lo4)), sc, cc);  // 8-15
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), sc, cc);   // 16-23
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), sc, cc);   // 24-31
}

ALWAYS void f32_row(const void* qr, int q4, const float* sr, const float* cr, const float* x, int64_t K,
                    int64_t nb, int MM, float* out) {
  __m256 a[MAXF];
  for (int i = 0; i < MM; i++) a[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256 w[4];
    if (q4) widen4((const uint8_t*)qr + b * 16, _mm256_set1_ps(sr[b]), _mm256_set1_ps(cr[b]), w);
    else widen8((const int8_t*)qr + b * 32, _mm256_set1_ps(sr[b]), w);
    for (int i = 0; i < MM; i++) {
      const float* xr = x + i * K + b * 32;
      __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
      t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), t);
      t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), t);
      a[i] = _mm256_add_ps(a[i], _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), t));
    }
  }
  for (int i = 0; i < MM; i++) out[i] = hsum(a[i]);
}

#define DISPATCH8(MMV, CALL) switch (MMV) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
                                            case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
                                            case 7: CALL(7); break; default: CALL(8); }

static void f32_gemm(const float* x, int64_t M, int64_t K, const void* q, const float* s, const float* c, float* y,
                     int64_t N, int threads) {
  const int64_t nb = K / 32, rowbytes = c ? K / 2 : K;
  #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < N; n++) {
    const char* qr = (const char*)q + n * rowbytes;
    prefetch_row(qr + AHEAD * rowbytes, n + AHEAD < N ? rowbytes : 0);
    for (int64_t m0 = 0; m0 < M; m0 += MAXF) {
      const int mm = M - m0 < MAXF ? (int)(M - m0) : MAXF;
      float out[MAXF];
#define F4(MMC) f32_row(qr, 1, s + n * nb, c + n * nb, x + m0 * K, K, nb, MMC, out)
#define F8(MMC) f32_row(qr, 0, s + n * nb, NULL, x + m0 * K, K, nb, MMC, out)
      if (c) { DISPATCH8(mm, F4) } else { DISPATCH8(mm, F8) }
      for (int i = 0; i < mm; i++) y[(m0 + i) * N + n] = out[i];
    }
  }
}

#define DISPATCH(MMV, CALL) switch (MMV) { case 1: CALL(1); break; case 2: CALL(2); break; \
                                           case 3: CALL(3); break; default: CALL(4); }

// Fewer than FROWS rows: x quantised into two int8 planes (quantize_rows), integer dot products per block. Weights q8
// (c NULL): int8 (N, K); q4: 16 bytes per block (element j in the low nibble of byte j, j + 16 in its high nibble),
// value q * s + c with q in 0..15. Scales (and offsets) (N, K/32). xq, sx, sumx: scratch of 2*M*K bytes and M*K/32
// floats each.
static void int_gemm(const float* x, int64_t M, int64_t K, const void* q, const float* s, const float* c, float* y,
                     int64_t N, int8_t* xq, float* sx, float* sumx, int threads) {
  const int64_t nb = K / 32, rowbytes = c ? K / 2 : K;
  int8_t* xl = xq + M * K;
  quantize_rows(x, M, K, xq, xl, sx, sumx);
  #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < N; n++) {
    const char* qr = (const char*)q + n * rowbytes;
    prefetch_row(qr + AHEAD * rowbytes, n + AHEAD < N ? rowbytes : 0);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mm = M - m0 < 4 ? (int)(M - m0) : 4;
      float out[4];
#define Q8(MMC) q8_row((const int8_t*)qr, s + n * nb, xq + m0 * K, xl + m0 * K, sx + m0 * nb, nb, MMC, out)
#define Q4(MMC) q4_row((const uint8_t*)qr, s + n * nb, c + n * nb, xq + m0 * K, xl + m0 * K, sx + m0 * nb, \
                       sumx + m0 * nb, nb, MMC, out)
      if (c) { DISPATCH(mm, Q4) } else { DISPATCH(mm, Q8) }
      for (int i = 0; i < mm; i++) y[(m0 + i) * N + n] = out[i];
    }
  }
}

// The entry point: q8 weights when c is NULL, else q4. The decode step's neighbours of a matmul are fused in (each
// optional): g: RMSNorm the rows of x first (weight g, epsilon eps); swiglu: x rows hold [gate | up] (2K values)
// and the input is silu(gate) * up; res: add res (M, N) to the result (the residual stream).
// Returns 0, or -1 when scratch memory is not available.
#ifndef FROWS
#define FROWS 4  // from this many rows on, the fp32 path (see f32_row)
#endif

int qgemm(const float* x, int64_t M, int64_t K, const void* q, const float* s, const float* c, float* y,
          int64_t N, int threads, const float* g, float eps, int swiglu, const float* res) {
  const int64_t nb = K / 32;
  const int integer = M < FROWS;  // the fp32 path needs no quantised copy of x
  const size_t planes = integer ? (size_t)(2 * M * K) : 0;
  const size_t scales = integer ? (size_t)(2 * M * nb) * sizeof(float) : 0;
  const size_t pre = (g || swiglu) ? (size_t)(M * K) * sizeof(float) : 0;
  int8_t* xq = NULL;
  if (planes + scales + pre && !(xq = (int8_t*)malloc(planes + scales + pre))) return -1;
  float* sx = integer ? (float*)(xq + planes) : NULL;  // 2 M K is a multiple of 64, so this stays float-aligned
  float* sumx = integer ? sx + M * nb : NULL;
  const float* xin = x;
  if (pre) {
    float* xf = (float*)(xq + planes + scales);
    for (int64_t m = 0; m < M; m++) {
      const float* xr = x + m * (swiglu ? 2 * K : K);
      float* o = xf + m * K;
      if (swiglu)
        for (int64_t k = 0; k < K; k++) o[k] = xr[k] / (1.f + expf(-xr[k])) * xr[K + k];
      else
        for (int64_t k = 0; k < K; k++) o[k] = xr[k];
      if (g) {
        float ss = 0.f;
        for (int64_t k = 0; k < K; k++) ss += o[k] * o[k];
        const float r = 1.f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++) o[k] = o[k] * r * g[k];
      }
    }
    xin = xf;
  }
  if (integer) int_gemm(xin, M, K, q, s, c, y, N, xq, sx, sumx, threads);
  else f32_gemm(xin, M, K, q, s, c, y, N, threads);
  if (res)
    for (int64_t i = 0; i < M * N; i++) y[i] += res[i];
  free(xq);
  return 0;
}

#else
int qdot_isa(void) { return 0; }  // no AVX2 + FMA: llamalab keeps PyTorch's kernels
#endif
