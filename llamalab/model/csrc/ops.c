/* Fused forward and backward of the training step's elementwise work, fp32 on the CPU (llamalab/model/fused.py).
 *
 * Each function reads its inputs once and writes its outputs once, where PyTorch's eager ops make one pass (and
 * one temporary tensor) per operation: RMSNorm is 6 ops forward and ~10 backward, SwiGLU's silu(a) * b 2 and 4,
 * RoPE in real arithmetic ~8 and ~12. All are memory-bound, so the pass count is the cost.
 * Threads: OpenMP over rows (or 4096-element chunks), `nt` of them, static schedule: the same thread count gives
 * the same bits (the RMSNorm weight gradient is summed per thread, then over threads in order).
 */
/* NOTE: without it GCC cannot if-convert the exp clamps on AVX2 (a compare may trap), and SwiGLU ran scalar there:
 * 1.5x slower than PyTorch's instead of faster. It allows no reassociation: results are unchanged. */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PAR_MIN 32768 /* elements below which one thread does the work (a parallel region costs ~2-5 us) */

int ops_abi(void) { return 1; }

/* exp(x) in float, vectorisable: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (ln2 split in two for exactness),
 * p Cephes' degree-7 expf polynomial; relative error ~1e-7 on [-87.3, 88.37], clamped outside (exp(-87.3) ~ 1e-38;
 * 88.37 keeps n <= 127, a finite result). NaN in, NaN out (selected around the integer conversion, which would be
 * undefined for a NaN). */
static inline float fexp(float x) {
    const int nan = x != x;
    float y = nan ? 0.f : (x < -87.3f ? -87.3f : (x > 88.37f ? 88.37f : x));
    /* round to nearest by the 1.5 * 2^23 trick: vectorises on AVX2 too, where rintf stays a call */
    float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = y - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t e = (uint32_t)((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return nan ? x : p * s;
}

/* y = x / sqrt(mean(x^2) + eps) * w over rows of D; rstd[i] = the row's 1 / sqrt(mean + eps), kept for backward */
void rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t M, int64_t D, float eps, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (M * D >= PAR_MIN)
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * D;
        float *yi = y + i * D;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < D; j++) ss += xi[j] * xi[j];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[i] = r;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) yi[j] = (xi[j] * r) * w[j];
    }
}

/* gx = r * (gy*w - xhat * mean(gy*w*xhat)) with xhat = x*r; gw = sum over rows of gy * xhat (gw_part: nt x D scratch) */
void rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *gy, float *gx, float *gw,
                 float *gw_part, int64_t M, int64_t D, int nt) {
    if (M * D < PAR_MIN) nt = 1;
    memset(gw_part, 0, sizeof(float) * (size_t)(nt * D));
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *gwp = gw_part + t * D;
        int64_t lo = M * t / T, hi = M * (t + 1) / T;
        for (int64_t i = lo; i < hi; i++) {
            const float *xi = x + i * D, *gi = gy + i * D;
            float *o = gx + i * D;
            float r = rstd[i], dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t j = 0; j < D; j++) dot += gi[j] * w[j] * xi[j];
            float c = dot * r * r / (float)D;
            #pragma omp simd
            for (int64_t j = 0; j < D; j++) {
                o[j] = r * (gi[j] * w[j] - xi[j] * c);
                gwp[j] += gi[j] * (xi[j] * r);
            }
        }
    }
    for (int64_t j = 0; j < D; j++) gw[j] = gw_part[j];
    for (int t = 1; t < nt; t++)
        for (int64_t j = 0; j < D; j++) gw[j] += gw_part[t * D + j];
}

/* h = silu(a) * b = a * sigmoid(a) * b, elementwise over n */
void swiglu_fwd(const float *a, const float *b, float *h, int64_t n, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (n >= PAR_MIN)
    for (int64_t c = 0; c < n; c += 4096) {
        int64_t e = c + 4096 < n ? c + 4096 : n;
        #pragma omp simd
        for (int64_t j = c; j < e; j++) {
            float s = 1.f / (1.f + fexp(-a[j]));
            h[j] = a[j] * s * b[j];
        }
    }
}

/* ga = gh * b * silu'(a), silu'(a) = s (1 + a (1 - s)); gb = gh * silu(a) */
void swiglu_bwd(const float *a, const float *b, const float *gh, float *ga, float *gb, int64_t n, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (n >= PAR_MIN)
    for (int64_t c = 0; c < n; c += 4096) {
        int64_t e = c + 4096 < n ? c + 4096 : n;
        #pragma omp simd
        for (int64_t j = c; j < e; j++) {
            float s = 1.f / (1.f + fexp(-a[j])), g = gh[j];
            gb[j] = g * (a[j] * s);
            ga[j] = g * b[j] * (s * (1.f + a[j] * (1.f - s)));
        }
    }
}

/* One head's adjacent pairs (x[2j], x[2j+1]) rotated by c[j] = (cos, sin): y0 = x0 cos - x1 sin, y1 = x0 sin + x1 cos;
 * sign = -1 applies the transposed rotation (the gradient). y may be x (each pair is read before it is written). */
static inline void rotate_head(const float *x, const float *c, float *y, int64_t D, float sign) {
    #pragma omp simd
    for (int64_t j = 0; j < D / 2; j++) {
        float co = c[2 * j], si = sign * c[2 * j + 1], x0 = x[2 * j], x1 = x[2 * j + 1];
        y[2 * j] = x0 * co - x1 * si;
        y[2 * j + 1] = x0 * si + x1 * co;
    }
}

/* RoPE over x (B*T rows of H heads of D) with cs[t] = (cos, sin) pairs for t = row % T (rotate_head) */
void rope(const float *x, const float *cs, float *y, int64_t B, int64_t T, int64_t H, int64_t D, float sign, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (B * T * H * D >= PAR_MIN)
    for (int64_t r = 0; r < B * T; r++)
        for (int64_t h = 0; h < H; h++)
            rotate_head(x + (r * H + h) * D, cs + (r % T) * D, y + (r * H + h) * D, D, sign);
}

/* One decode step's attention for n sequences (one new token each), in place of ~15 tensor ops per layer.
 * qkv: (n, H + 2 Hk, D) this step's projections, q heads then k then v; row b belongs to cache slot b at position
 * pos[b]. Rotates q and k by cs[pos[b]] ((S, D/2, 2) = cos, sin), writes k and v into the caches kc, vc (slots, Hk,
 * S, D) at pos[b], and writes softmax(q k^T * scale) v over positions [0, pos[b]] to out (n, H * D).
 * NOTE: qkv is modified (its q and k are rotated in place). */
void attn_decode(float *qkv, const float *cs, const int64_t *pos, float *kc, float *vc, float *out, int64_t n,
                 int64_t H, int64_t Hk, int64_t D, int64_t S, float scale, int nt) {
    int64_t W = (H + 2 * Hk) * D, rep = H / Hk;
    for (int64_t b = 0; b < n; b++) {
        float *row = qkv + b * W;
        for (int64_t h = 0; h < H + Hk; h++) rotate_head(row + h * D, cs + pos[b] * D, row + h * D, D, 1.f);
        for (int64_t g = 0; g < Hk; g++) {
            memcpy(kc + ((b * Hk + g) * S + pos[b]) * D, row + (H + g) * D, sizeof(float) * D);
            memcpy(vc + ((b * Hk + g) * S + pos[b]) * D, row + (H + Hk + g) * D, sizeof(float) * D);
        }
    }
    int64_t work = 0;
    for (int64_t b = 0; b < n; b++) work += (pos[b] + 1) * H * D;
    #pragma omp parallel num_threads(nt) if (work >= PAR_MIN)
    {
        float sbuf[1024];
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < n * H; u++) {
            int64_t b = u / H, h = u % H, g = h / rep, L = pos[b] + 1;
            const float *q = qkv + b * W + h * D, *K = kc + (b * Hk + g) * S * D, *V = vc + (b * Hk + g) * S * D;
            float *o = out + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            float m = -INFINITY, l = 0.f;
            for (int64_t j0 = 0; j0 < L; j0 += 1024) {  /* blocks of 1024 positions, online softmax across them */
                int64_t nb = L - j0 < 1024 ? L - j0 : 1024;
                float mx = m;
                for (int64_t j = 0; j < nb; j++) {
                    const float *k = K + (j0 + j) * D;
                    float s = 0.f;
                    #pragma omp simd reduction(+:s)
                    for (int64_t d = 0; d < D; d++) s += q[d] * k[d];
                    s *= scale;
                    sbuf[j] = s;
                    mx = s > mx ? s : mx;
                }
                float alpha = fexp(m - mx), sum = 0.f;
                #pragma omp simd reduction(+:sum)
                for (int64_t j = 0; j < nb; j++) { sbuf[j] = fexp(sbuf[j] - mx); sum += sbuf[j]; }
                l = l * alpha + sum;
                m = mx;
                if (alpha != 1.f)
                    for (int64_t d = 0; d < D; d++) o[d] *= alpha;
                for (int64_t j = 0; j < nb; j++) {
                    const float *v = V + (j0 + j) * D;
                    float p = sbuf[j];
                    #pragma omp simd
                    for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
                }
            }
            float inv = 1.f / l;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    }
}

/* Cross-entropy over rows of logits (n, V), in place, for the fused output head (llamalab/train/fused_ce.py):
 * loss[i] = logsumexp(row) - row[t[i]]; the row becomes its gradient softmax(row) - onehot(t[i]) when grad != 0
 * (zeros and loss 0 where t[i] == ignore). One pass over each row while it sits in L1/L2, where the tensor ops make
 * six over the whole chunk. */
void xent_rows(float *logits, const int64_t *t, float *loss, int64_t n, int64_t V, int64_t ignore, int grad, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (n * V >= PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        float *r = logits + i * V;
        int64_t ti = t[i];
        if (ti == ignore || ti < 0 || ti >= V) {  /* out-of-range targets are the caller's to refuse */
            loss[i] = 0.f;
            if (grad) memset(r, 0, sizeof(float) * (size_t)V);
            continue;
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < V; j++) mx = r[j] > mx ? r[j] : mx;
        float picked = r[ti], sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < V; j++) { float e = fexp(r[j] - mx); r[j] = e; sum += e; }
        loss[i] = mx + logf(sum) - picked;
        if (grad) {
            float inv = 1.f / sum;
            #pragma omp simd
            for (int64_t j = 0; j < V; j++) r[j] *= inv;
            r[ti] -= 1.f;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Causal self-attention for training (forward and backward, flash-style: blocks of BQ queries x BK keys, an online
 * softmax, the log-sum-exp kept for backward instead of the T x T probabilities). q (B, T, H, D) and k, v (B, T,
 * Hk, D) are read in the projections' own layout (no transposes, no repeated K/V for GQA: query head h reads key
 * head h / (H / Hk)); out (B, T, H, D) is what the output projection reads. Block products are register-blocked
 * loops the compiler vectorises (MR rows x NC keys, or MR rows x D for D = 32, 48, 64); they beat PyTorch's CPU flash
 * kernel 1.2-1.5x forward + backward at head sizes 32-64 (llamalab/model/fused.py). */
#define BQ 32
#define BK 64

/* Register blocks: MR rows x NC columns of fp32 accumulators. AVX-512 has 32 vector registers (4 x 64 = 16 of
 * them), AVX2 16 (2 x 32 = 8 of them: 4 x 64 would spill). */
#ifdef __AVX512F__
#define MR 4
#define NC 64
#else
#define MR 2
#define NC 32
#endif

/* S[i][0..BK) = sum_d A[i][d] Bt[d][0..BK) for i < rows <= BQ; A rows of stride lda, Bt rows of stride ldb */
static inline void mm_abt(const float *restrict A, int64_t lda, const float *restrict Bt, int64_t ldb, int64_t D,
                          int rows, float *restrict S) {
    int i = 0;
    for (; i + MR <= rows; i += MR)
        for (int c0 = 0; c0 < BK; c0 += NC) {
            float acc[MR][NC];
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < NC; c++) acc[r][c] = 0.f;
            for (int64_t d = 0; d < D; d++) {
                const float *b = Bt + d * ldb + c0;
                float a[MR];
                for (int r = 0; r < MR; r++) a[r] = A[(i + r) * lda + d];
                #pragma GCC unroll 4
                for (int r = 0; r < MR; r++) {
                    #pragma omp simd
                    for (int c = 0; c < NC; c++) acc[r][c] += a[r] * b[c];
                }
            }
            for (int r = 0; r < MR; r++) memcpy(S + (i + r) * BK + c0, acc[r], sizeof acc[r]);
        }
    for (; i < rows; i++) {
        float acc[BK];
        for (int c = 0; c < BK; c++) acc[c] = 0.f;
        for (int64_t d = 0; d < D; d++) {
            const float *b = Bt + d * ldb;
            float a = A[i * lda + d];
            #pragma omp simd
            for (int c = 0; c < BK; c++) acc[c] += a * b[c];
        }
        memcpy(S + i * BK, acc, sizeof acc);
    }
}

/* O[i][0..DD) += sum_{j < ncols} A(i, j) B[j][0..DD) for i < rows, A(i, j) = A[i * ars + j * acs] (a row-major or a
 * transposed block); MR rows at a time with the MR x DD accumulators in registers when DD is a constant */
static inline __attribute__((always_inline)) void acc_rows(const float *restrict A, int64_t ars, int64_t acs,
        int rows, int ncols, const float *restrict B, int64_t ldb, float *restrict O, int64_t ldo, const int64_t DD) {
    int i = 0;
    for (; i + MR <= rows; i += MR) {
        float acc[MR][DD];
        for (int r = 0; r < MR; r++)
            for (int64_t d = 0; d < DD; d++) acc[r][d] = O[(i + r) * ldo + d];
        for (int j = 0; j < ncols; j++) {
            const float *b = B + j * ldb;
            float a[MR];
            for (int r = 0; r < MR; r++) a[r] = A[(i + r) * ars + j * acs];
            #pragma GCC unroll 4
            for (int r = 0; r < MR; r++) {
                #pragma omp simd
                for (int64_t d = 0; d < DD; d++) acc[r][d] += a[r] * b[d];
            }
        }
        for (int r = 0; r < MR; r++)
            for (int64_t d = 0; d < DD; d++) O[(i + r) * ldo + d] = acc[r][d];
    }
    for (; i < rows; i++) {
        float *o = O + i * ldo;
        for (int j = 0; j < ncols; j++) {
            const float *b = B + j * ldb;
            float a = A[i * ars + j * acs];
            #pragma omp simd
            for (int64_t d = 0; d < DD; d++) o[d] += a * b[d];
        }
    }
}

static void acc_block(const float *A, int64_t ars, int64_t acs, int rows, int ncols, const float *B, int64_t ldb,
                      float *O, int64_t ldo, int64_t D) {
    switch (D) {
        case 32: acc_rows(A, ars, acs, rows, ncols, B, ldb, O, ldo, 32); break;
        case 48: acc_rows(A, ars, acs, rows, ncols, B, ldb, O, ldo, 48); break;
        case 64: acc_rows(A, ars, acs, rows, ncols, B, ldb, O, ldo, 64); break;
        default: acc_rows(A, ars, acs, rows, ncols, B, ldb, O, ldo, D);
    }
}

/* Xt[d][c] = X[c][d] for c < n (X rows of stride ldx), zero for n <= c < BK; Xt rows of stride ldt */
static inline void transpose_block(const float *X, int64_t ldx, int n, int64_t D, float *Xt, int64_t ldt) {
    for (int64_t d = 0; d < D; d++) {
        for (int c = 0; c < n; c++) Xt[d * ldt + c] = X[c * ldx + d];
        for (int c = n; c < BK; c++) Xt[d * ldt + c] = 0.f;
    }
}

/* out = softmax(q k^T * scale, causal) v; lse (B, H, T) = each row's log-sum-exp, kept for backward.
 * Returns 0, or -1 when memory for the transposed keys or the scratch is not available. */
int attn_fwd(const float *q, const float *k, const float *v, float *out, float *lse, int64_t B, int64_t T, int64_t H,
             int64_t Hk, int64_t D, float scale, int nt) {
    const int64_t nq = (T + BQ - 1) / BQ, rep = H / Hk, nkb = (T + BK - 1) / BK, Tp = nkb * BK;
    const int64_t ldq = H * D, ldk = Hk * D;
    float *KT = malloc(sizeof(float) * (size_t)(B * Hk * D * Tp));  /* keys transposed once: (B, Hk, D, Tp) */
    if (!KT) return -1;
    int failed = 0;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * Hk * nkb; u++) {
        int64_t bh = u / nkb, j0 = (u % nkb) * BK, b = bh / Hk, g = bh % Hk;
        transpose_block(k + ((b * T + j0) * Hk + g) * D, ldk, (int)(T - j0 < BK ? T - j0 : BK), D,
                        KT + bh * D * Tp + j0, Tp);
    }
    #pragma omp parallel num_threads(nt)
    {
        float *S = malloc(sizeof(float) * BQ * BK), *acc = malloc(sizeof(float) * (size_t)(BQ * D));
        float m[BQ], l[BQ];
        if (!S || !acc) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < B * H * nq; u++) {
            if (!S || !acc) continue;
            int64_t qb = nq - 1 - u % nq, bh = u / nq, b = bh / H, h = bh % H, g = h / rep;  /* long rows first */
            int64_t i0 = qb * BQ;
            int rows = (int)(T - i0 < BQ ? T - i0 : BQ);
            const float *Q = q + ((b * T + i0) * H + h) * D, *V = v + (b * T * Hk + g) * D;
            const float *KTh = KT + (b * Hk + g) * D * Tp;
            for (int r = 0; r < rows; r++) { m[r] = -INFINITY; l[r] = 0.f; }
            memset(acc, 0, sizeof(float) * (size_t)(BQ * D));
            for (int64_t j0 = 0; j0 < i0 + rows; j0 += BK) {  /* keys [0, i0 + rows) */
                int n = (int)(i0 + rows - j0 < BK ? i0 + rows - j0 : BK);
                mm_abt(Q, ldq, KTh + j0, Tp, D, rows, S);
                for (int r = 0; r < rows; r++) {
                    float *s = S + r * BK;
                    int lim = (int)(i0 + r - j0 + 1);  /* row r sees keys j0 .. i0 + r */
                    if (lim > n) lim = n;
                    float mx = m[r], sum = 0.f;
                    #pragma omp simd reduction(max:mx)
                    for (int c = 0; c < BK; c++) { float x = c < lim ? s[c] * scale : -INFINITY; mx = x > mx ? x : mx; }
                    #pragma omp simd reduction(+:sum)
                    for (int c = 0; c < BK; c++) { float e = c < lim ? fexp(s[c] * scale - mx) : 0.f; s[c] = e; sum += e; }
                    float alpha = fexp(m[r] - mx);  /* rescale what earlier key blocks accumulated */
                    l[r] = l[r] * alpha + sum;
                    m[r] = mx;
                    if (alpha != 1.f)
                        for (int64_t d = 0; d < D; d++) acc[r * D + d] *= alpha;
                }
                acc_block(S, BK, 1, rows, n, V + j0 * ldk, ldk, acc, D, D);
            }
            for (int r = 0; r < rows; r++) {
                float inv = 1.f / l[r], *o = out + ((b * T + i0 + r) * H + h) * D;
                for (int64_t d = 0; d < D; d++) o[d] = acc[r * D + d] * inv;
                lse[(b * H + h) * T + i0 + r] = m[r] + logf(l[r]);
            }
        }
        free(S);
        free(acc);
    }
    free(KT);
    return failed ? -1 : 0;
}

/* The gradients dq (B, T, H, D), dk, dv (B, T, Hk, D) (written, not accumulated) of attn_fwd's output given its
 * gradient gout, from q, k, v, out and lse: per key block (a thread owns all query heads of one key head, so dk/dv
 * need no atomics), P is recomputed from lse, dS = P (dP - rowsum(gout * out)) * scale. Returns 0 or -1 (memory). */
int attn_bwd(const float *q, const float *k, const float *v, const float *out, const float *lse, const float *gout,
             float *dq, float *dk, float *dv, int64_t B, int64_t T, int64_t H, int64_t Hk, int64_t D, float scale,
             int nt) {
    const int64_t rep = H / Hk, ldq = H * D, ldk = Hk * D;
    float *delta = malloc(sizeof(float) * (size_t)(B * H * T));
    if (!delta) return -1;
    memset(dq, 0, sizeof(float) * (size_t)(B * T * H * D));
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++)
        for (int64_t h = 0; h < H; h++) {
            const float *a = out + (bt * H + h) * D, *g = gout + (bt * H + h) * D;
            float s = 0.f;
            #pragma omp simd reduction(+:s)
            for (int64_t d = 0; d < D; d++) s += a[d] * g[d];
            delta[((bt / T) * H + h) * T + bt % T] = s;
        }
    int failed = 0;
    #pragma omp parallel num_threads(nt)
    {
        float *Kt = malloc(sizeof(float) * (size_t)(D * BK)), *Vt = malloc(sizeof(float) * (size_t)(D * BK));
        float *P = malloc(sizeof(float) * BQ * BK), *dP = malloc(sizeof(float) * BQ * BK);
        float *dS = malloc(sizeof(float) * BQ * BK);
        int ok = Kt && Vt && P && dP && dS;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < B * Hk; u++) {
            if (!ok) continue;
            int64_t b = u / Hk, g = u % Hk;
            for (int64_t j0 = 0; j0 < T; j0 += BK) {
                int n = (int)(T - j0 < BK ? T - j0 : BK);
                const float *K = k + ((b * T + j0) * Hk + g) * D, *V = v + ((b * T + j0) * Hk + g) * D;
                float *dK = dk + ((b * T + j0) * Hk + g) * D, *dV = dv + ((b * T + j0) * Hk + g) * D;
                for (int c = 0; c < n; c++) {
                    memset(dK + c * ldk, 0, sizeof(float) * (size_t)D);
                    memset(dV + c * ldk, 0, sizeof(float) * (size_t)D);
                }
                transpose_block(K, ldk, n, D, Kt, BK);
                transpose_block(V, ldk, n, D, Vt, BK);
                for (int64_t h = g * rep; h < (g + 1) * rep; h++)
                    for (int64_t i0 = j0 / BQ * BQ; i0 < T; i0 += BQ) {  /* query blocks that see this key block */
                        int rows = (int)(T - i0 < BQ ? T - i0 : BQ);
                        const float *Q = q + ((b * T + i0) * H + h) * D, *G = gout + ((b * T + i0) * H + h) * D;
                        const float *L = lse + (b * H + h) * T + i0, *Dl = delta + (b * H + h) * T + i0;
                        mm_abt(Q, ldq, Kt, BK, D, rows, P);   /* scores */
                        mm_abt(G, ldq, Vt, BK, D, rows, dP);  /* gout v^T */
                        for (int r = 0; r < rows; r++) {
                            int lim = (int)(i0 + r - j0 + 1);
                            if (lim > n) lim = n;
                            float *p = P + r * BK, *dp = dP + r * BK, *ds = dS + r * BK;
                            const float Lr = L[r], Dr = Dl[r];
                            #pragma omp simd
                            for (int c = 0; c < BK; c++) {
                                float pv = c < lim ? fexp(p[c] * scale - Lr) : 0.f;
                                ds[c] = pv * (dp[c] - Dr) * scale;
                                p[c] = pv;
                            }
                        }
                        acc_block(P, 1, BK, n, rows, G, ldq, dV, ldk, D);               /* dV += P^T gout */
                        acc_block(dS, 1, BK, n, rows, Q, ldq, dK, ldk, D);              /* dK += dS^T q */
                        acc_block(dS, BK, 1, rows, n, K, ldk, dq + ((b * T + i0) * H + h) * D, ldq, D);  /* dq += dS k */
                    }
            }
        }
        free(Kt); free(Vt); free(P); free(dP); free(dS);
    }
    free(delta);
    return failed ? -1 : 0;
}
