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
#include <string.h>
#include <omp.h>

#define PAR_MIN 32768 /* elements below which one thread does the work (a parallel region costs ~2-5 us) */

int ops_abi(void) { return 1; }

/* exp(x) in float, vectorisable: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (ln2 split in two for exactness),
 * p Cephes' degree-7 expf polynomial; relative error ~1e-7 on [-87, 88], clamped outside (exp(-87.3) ~ 1e-38). */
static inline float fexp(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    /* round to nearest by the 1.5 * 2^23 trick: vectorises on AVX2 too, where rintf stays a call */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
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

/* Rotate each adjacent pair (x[2j], x[2j+1]) of x (B*T rows of H heads of D) by cs[t][j] = (cos, sin), t = row % T:
 * y0 = x0 cos - x1 sin, y1 = x0 sin + x1 cos. sign = -1 applies the transposed rotation (the gradient). */
void rope(const float *x, const float *cs, float *y, int64_t B, int64_t T, int64_t H, int64_t D, float sign, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (B * T * H * D >= PAR_MIN)
    for (int64_t r = 0; r < B * T; r++) {
        const float *c = cs + (r % T) * D;
        for (int64_t h = 0; h < H; h++) {
            const float *xi = x + (r * H + h) * D;
            float *yi = y + (r * H + h) * D;
            #pragma omp simd
            for (int64_t j = 0; j < D / 2; j++) {
                float co = c[2 * j], si = sign * c[2 * j + 1], x0 = xi[2 * j], x1 = xi[2 * j + 1];
                yi[2 * j] = x0 * co - x1 * si;
                yi[2 * j + 1] = x0 * si + x1 * co;
            }
        }
    }
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
        const float *c = cs + pos[b] * D;
        for (int64_t h = 0; h < H + Hk; h++) {
            float *x = row + h * D;
            #pragma omp simd
            for (int64_t j = 0; j < D / 2; j++) {
                float co = c[2 * j], si = c[2 * j + 1], x0 = x[2 * j], x1 = x[2 * j + 1];
                x[2 * j] = x0 * co - x1 * si;
                x[2 * j + 1] = x0 * si + x1 * co;
            }
        }
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
