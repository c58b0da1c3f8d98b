/* CPU kernels for excitation's hot backward passes, float32, contiguous.
 *
 * Built at first use by excitation/kernels/native.py with the system C compiler
 * (-O3 -march=native) and loaded with ctypes; every function here has a plain-torch
 * twin in excitation/kernels/torch_paths.py and a contract in reference.py, and is
 * tested against both.  Plain C, no headers beyond libc: it compiles in well under a
 * second, so the JIT build costs the user nothing noticeable.
 *
 * Every function honours the contract's two rules (reference.py): a soft gate or window
 * weight below 2^-64 is exactly 0, and a result below FLT_MIN in magnitude is exactly 0.
 * No arithmetic here ever touches a subnormal float, so it runs at full speed on cores
 * where subnormals take a microcode assist.
 *
 * Parallelism is the caller's: each function works on a range [begin, end) of elements
 * or planes, and native.py runs ranges on torch.get_num_threads() Python threads (ctypes
 * releases the GIL).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* min and max as selects, abs as the builtin: GCC 12 will not vectorise loops that call
 * fminf / fmaxf / floorf (even with -fno-math-errno), nor an abs written as a select next
 * to other selects ("control flow in loop"); it vectorises these. */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ABS(a) __builtin_fabsf(a)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define FLOOR_EXPONENT (-64.0f)           /* log2 of the gate floor 2^-64 */
#define SIGMOID_FLOOR_LOGIT (-44.3614196f) /* sigmoid(u) < 2^-64 exactly below this */

/* 2^t for t in [-64, 0]: Cephes' exp2f polynomial on the fraction, the exponent by bits.
 * Relative error below 2e-7; never subnormal.  Branch-free, so loops over it vectorise.
 * n = t rounded to the nearest integer by the 1.5 * 2^23 trick (exact for |t| < 2^22). */
static inline float exp2_nonpositive(float t) {
    float n = (t + 12582912.0f) - 12582912.0f;
    float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    union { int32_t bits; float value; } scale;
    scale.bits = ((int32_t)n + 127) << 23;
    return p * scale.value;
}

static inline float flush(float v) { return ABS(v) < FLT_MIN ? 0.0f : v; }

/* sigmoid(u), exactly 0 where it is below 2^-64. */
static inline float sigmoid_floored(float u) {
    float a = MIN(ABS(u), -SIGMOID_FLOOR_LOGIT);
    float e = exp2_nonpositive(-a * LOG2E);
    float s = 1.0f / (1.0f + e);
    float gate = u >= 0.0f ? s : e * s;
    return u < SIGMOID_FLOOR_LOGIT ? 0.0f : gate;
}

/* out[i] = flush(g[i] * sigmoid(z[i] * inv_temp)); out may be z (in place). */
void exc_relu_sigmoid_backward(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                               float inv_temp) {
    for (int64_t i = begin; i < end; ++i) out[i] = flush(g[i] * sigmoid_floored(z[i] * inv_temp));
}

/* The fused BatchNorm -> ReLU pullback in one pass, in place on the recomputed pre-activation z
 * (contiguous N, C, inner): z = flush(flush(g * sigmoid(z / temp)) * scale[c]), scale = weight * invstd. */
void exc_bn_relu_sigmoid_backward_(const float *g, float *z, const float *scale, int64_t channels, int64_t inner,
                                   int64_t begin_plane, int64_t end_plane, float inv_temp) {
    for (int64_t plane = begin_plane; plane < end_plane; ++plane) {
        const float c = scale[plane % channels];
        const float *gp = g + plane * inner;
        float *zp = z + plane * inner;
        for (int64_t i = 0; i < inner; ++i) zp[i] = flush(flush(gp[i] * sigmoid_floored(zp[i] * inv_temp)) * c);
    }
}

/* The 2-D soft max-pool backward (reference.soft_max_pool2d_backward) for planes [begin, end).
 * dx must be zero-filled; scale2 = log2(e) / temp.
 *
 * Layout, so that every pass is one long contiguous (or evenly strided) loop that vectorises,
 * whatever the pool: for each kernel row a, R_a holds the input rows that output row oh reads
 * at that kernel row (input row oh * sh - ph + a * dh), padded to Wp = sw * Wq columns with a
 * finite floor, in base-2 units of the temperature.  Output (oh, ow) is then column j =
 * oh * Wq + ow of an "extended" output of M = OH * Wq columns, and its window element (a, b)
 * is R_a[sw * j + b * dw]: a strided view of one buffer.  The extended columns ow >= OW are
 * junk windows whose incoming gradient is set to 0, so they add exactly 0.  Gradients go the
 * same way into TR_a, whose rows are then added into dx.  (Per output row, with OW = 28,
 * loop overheads made the first version of this kernel 3.5-5 ns per window element.) */
int exc_soft_max_pool2d_backward(const float *g, const float *x, float *dx, int64_t begin, int64_t end,
                                 int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw,
                                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                 float scale2, int weights_only) {
    const int64_t K = kh * kw;
    const float big = FLT_MAX / 4.0f, outside = -FLT_MAX / 2.0f;
    int64_t Wp = (OW - 1) * sw + (kw - 1) * dw + 1; /* padded columns any window reads */
    Wp = (Wp + sw - 1) / sw * sw;
    const int64_t Wq = Wp / sw, M = OH * Wq;
    const int64_t row_buffer = OH * Wp + (kw - 1) * dw + sw; /* junk columns of the last row stay inside */
    const size_t floats = (size_t)(2 * kh * row_buffer + 2 * K * M + 5 * M);
    float *buffer = (float *)malloc(sizeof(float) * floats);
    if (buffer == NULL) return 1;
    float *R = buffer, *TR = R + kh * row_buffer, *D = TR + kh * row_buffer, *E = D + K * M;
    float *peak = E + K * M, *total = peak + M, *weighted = total + M, *factor = weighted + M, *G = factor + M;
    const int64_t first = MIN(MAX(pw, 0), Wp), last = MIN(pw + W, Wp); /* padded columns holding input */
    for (int64_t plane = begin; plane < end; ++plane) {
        const float *xp = x + plane * H * W, *gp = g + plane * OH * OW;
        float *dxp = dx + plane * H * W;
        for (int64_t a = 0; a < kh; ++a) {
            float *Ra = R + a * row_buffer;
            for (int64_t oh = 0; oh < OH; ++oh) {
                const int64_t h = oh * sh - ph + a * dh;
                float *row = Ra + oh * Wp;
                if (h < 0 || h >= H) {
                    for (int64_t c = 0; c < Wp; ++c) row[c] = outside;
                    continue;
                }
                const float *xr = xp + h * W - pw;
                for (int64_t c = 0; c < first; ++c) row[c] = outside;
                for (int64_t c = first; c < last; ++c) row[c] = MIN(MAX(xr[c] * scale2, -big), big);
                for (int64_t c = MAX(last, first); c < Wp; ++c) row[c] = outside;
            }
            for (int64_t c = OH * Wp; c < row_buffer; ++c) Ra[c] = outside;
        }
        for (int64_t oh = 0; oh < OH; ++oh) {
            for (int64_t ow = 0; ow < OW; ++ow) G[oh * Wq + ow] = gp[oh * OW + ow];
            for (int64_t ow = OW; ow < Wq; ++ow) G[oh * Wq + ow] = 0.0f;
        }
        /* Strided gathers and scatters stay in loops of their own: GCC vectorises the arithmetic
         * only over contiguous buffers ("not suitable for strided load" with a run-time stride). */
        for (int64_t k = 0; k < K; ++k) {
            const float *src = R + (k / kw) * row_buffer + (k % kw) * dw;
            float *Dk = D + k * M;
            if (sw == 1)
                memcpy(Dk, src, sizeof(float) * (size_t)M);
            else
                for (int64_t j = 0; j < M; ++j) Dk[j] = src[sw * j];
            if (k == 0)
                memcpy(peak, Dk, sizeof(float) * (size_t)M);
            else
                for (int64_t j = 0; j < M; ++j) peak[j] = MAX(peak[j], Dk[j]);
        }
        for (int64_t j = 0; j < M; ++j) total[j] = weighted[j] = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            float *Dk = D + k * M, *Ek = E + k * M;
            for (int64_t j = 0; j < M; ++j) {
                const float diff = MAX(Dk[j] - peak[j], FLOOR_EXPONENT - 1.0f);
                const float weight = exp2_nonpositive(MAX(diff, FLOOR_EXPONENT));
                const float e = diff < FLOOR_EXPONENT ? 0.0f : weight;
                Dk[j] = diff;
                Ek[j] = e;
                total[j] += e;
                weighted[j] += e * diff;
            }
        }
        if (weights_only) {
            for (int64_t j = 0; j < M; ++j) factor[j] = G[j] / total[j];
        } else {
            /* g * p_k * (1 + ln2 * (d_k - SD / S)) = e_k * (g ln2 / S) * (d_k + 1/ln2 - SD / S) */
            for (int64_t j = 0; j < M; ++j) {
                weighted[j] = 1.0f / LN2 - weighted[j] / total[j];
                factor[j] = G[j] * LN2 / total[j];
            }
        }
        for (int64_t i = 0; i < kh * row_buffer; ++i) TR[i] = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            float *dst = TR + (k / kw) * row_buffer + (k % kw) * dw;
            float *Dk = D + k * M;
            const float *Ek = E + k * M;
            if (weights_only)
                for (int64_t j = 0; j < M; ++j) Dk[j] = Ek[j] * factor[j];
            else
                for (int64_t j = 0; j < M; ++j) Dk[j] = Ek[j] * factor[j] * (Dk[j] + weighted[j]);
            if (sw == 1)
                for (int64_t j = 0; j < M; ++j) dst[j] += Dk[j];
            else
                for (int64_t j = 0; j < M; ++j) dst[sw * j] += Dk[j];
        }
        for (int64_t a = 0; a < kh; ++a) {
            const float *TRa = TR + a * row_buffer;
            for (int64_t oh = 0; oh < OH; ++oh) {
                const int64_t h = oh * sh - ph + a * dh;
                if (h < 0 || h >= H) continue;
                const float *row = TRa + oh * Wp + pw; /* row[w]: input column w, padded column w + pw */
                float *dxr = dxp + h * W;
                const int64_t w_end = MIN(W, Wp - pw);
                for (int64_t w = MAX(0, -pw); w < w_end; ++w) dxr[w] += row[w];
            }
        }
        for (int64_t i = 0; i < H * W; ++i) dxp[i] = flush(dxp[i]);
    }
    free(buffer);
    return 0;
}
