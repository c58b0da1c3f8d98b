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
 * Parallelism.  Each kernel works on a range [begin, end) of elements or planes; the exported
 * functions at the end split their range over `threads` OpenMP threads.  native.py builds with
 * -fopenmp where torch's own parallel backend is OpenMP: the library then needs libgomp.so.1,
 * which the loader finds already loaded by torch, so these regions run on the very thread team
 * ATen's operators use (its threads are awake after the previous operator, and nothing
 * oversubscribes the cores).  A Python thread pool did the splitting before: its hand-off cost
 * 100-250 us per call on a 2-core box between ATen operators, more than the work of most calls.
 * Built without OpenMP, the functions run their range on the calling thread and native.py keeps
 * a Python pool.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* min and max as selects, abs as the builtin: GCC 12 will not vectorise loops that call
 * fminf / fmaxf / floorf (even with -fno-math-errno), nor an abs written as a select next
 * to other selects ("control flow in loop"); it vectorises these. */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ABS(a) __builtin_fabsf(a)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define FLOOR_EXPONENT (-64.0f)           /* log2 of the gate floor 2^-64 */
#define GATE_FLOOR 5.421010862427522e-20f  /* 2^-64: a gate or window weight below it is exactly 0 */
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

/* e^(-w^2 / 2) for w in [0, 9.2] (w^2 / 2 <= 42.4, so the result is >= 2^-62: never subnormal),
 * relative error a few ulp.  Why not exp(-(w * w) / 2): in Phi's tail the result's relative error
 * is w^2 times its argument's, so rounding w^2 (or w / sqrt 2 first) cost 5e-6 at w = 9.  Instead
 * w = h + (w - h) with h = w's top 12 mantissa bits: h * h is exact and w^2 - h^2 = (w - h)(w + h)
 * is small (< 0.01); Cody-Waite reduction of -h^2 / 2 by n ln 2 (ln 2 split so that n * LN2_HI is
 * exact for |n| < 2^15), then Cephes' expf polynomial on the remainder r (|r| < 0.36), 2^n by bits. */
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
static inline float exp_minus_half_square(float w) {
    union { float value; int32_t bits; } top = {w};
    top.bits &= ~0xfff;
    const float h = top.value;
    const float x = -0.5f * (h * h); /* exact */
    const float n = (x * LOG2E + 12582912.0f) - 12582912.0f;
    const float r = ((x - n * LN2_HI) - n * LN2_LO) - 0.5f * ((w - h) * (w + h));
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t bits; float value; } scale;
    scale.bits = ((int32_t)n + 127) << 23;
    return p * scale.value;
}

#define SQRT1_2 0.70710678118654752f
#define NORMAL_CDF_FLOOR_LOGIT (-9.080155124873613f) /* Phi(u) < 2^-64 below this (gates.NORMAL_CDF_FLOOR_LOGIT) */

/* Phi(u) = erfc(-u / sqrt 2) / 2, the standard normal CDF, exactly 0 where it is below 2^-64;
 * relative error below 1e-6 (tests/test_native.py checks it against float64 erfc).  Branch-free:
 * both forms are computed and one selected, so loops over it vectorise.  With a = |u| / sqrt 2:
 *   a < 1/2: 1/2 + erf(v) / 2, v = u / sqrt 2, erf's odd Taylor series to v^15 (next term < 2e-11);
 *   a >= 1/2: erfc(a) / 2 = e^(-a^2) t P(t), t = 1 / (1 + a / 2), P a degree-8 least-squares fit on
 *   Chebyshev nodes of [1/2, 6.5] (fit error 2e-9), and Phi = erfc(a) / 2 or 1 - erfc(a) / 2.
 * |u| is clamped to 9.19 (a = 6.5, past the floor; above, 1 - erfc / 2 is 1 in float32) with a
 * comparison that keeps a NaN, which then propagates as in the contract. */
static inline float normal_cdf_floored(float u) {
    float w = ABS(u);
    w = w > 9.19f ? 9.19f : w;
    const float a = w * SQRT1_2;
    const float t = 1.0f / (1.0f + 0.5f * a);
    float p = -3.643332533e-02f;
    p = p * t + 1.715752021e-01f;
    p = p * t - 2.963889361e-01f;
    p = p * t + 1.916512020e-01f;
    p = p * t - 4.494894213e-02f;
    p = p * t + 1.130631458e-01f;
    p = p * t + 1.189446872e-01f;
    p = p * t + 1.415057426e-01f;
    p = p * t + 1.410269124e-01f; /* P(t) = erfc(a) e^(a^2) / (2 t): Phi's 1/2 folded in */
    const float half_erfc = exp_minus_half_square(w) * t * p; /* e^(-a^2) = e^(-u^2 / 2) */
    const float tail = u < 0.0f ? half_erfc : 1.0f - half_erfc;
    const float v = u * SQRT1_2, v2 = v * v;
    float q = -1.492565036e-05f;
    q = q * v2 + 1.205533298e-04f;
    q = q * v2 - 8.548327023e-04f;
    q = q * v2 + 5.223977625e-03f;
    q = q * v2 - 2.686617065e-02f;
    q = q * v2 + 1.128379167e-01f;
    q = q * v2 - 3.761263890e-01f;
    q = q * v2 + 1.128379167e+00f;
    const float phi = a < 0.5f ? 0.5f + 0.5f * (v * q) : tail;
    return (u < NORMAL_CDF_FLOOR_LOGIT || phi < GATE_FLOOR) ? 0.0f : phi;
}

/* out[i] = flush(g[i] * Phi(z[i] * inv_temp)) (floored at 2^-64); out may be z (in place). */
static void relu_normal_cdf_backward_range(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                           float inv_temp) {
    for (int64_t i = begin; i < end; ++i) out[i] = flush(g[i] * normal_cdf_floored(z[i] * inv_temp));
}

/* out[i] = flush(g[i] * sigmoid(z[i] * inv_temp)); out may be z (in place). */
static void relu_sigmoid_backward_range(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                        float inv_temp) {
    for (int64_t i = begin; i < end; ++i) out[i] = flush(g[i] * sigmoid_floored(z[i] * inv_temp));
}

/* out[i] = flush(g[i] * floor(scale * (sigmoid((z - lo) / temp) - sigmoid((z - hi) / temp)))): the soft window
 * of Hardtanh / ReLU6 (gates.hardtanh_gate; scale 1) and of Hardsigmoid (relu6(z + 3) / 6: lo = -3, hi = 3,
 * scale 1/6), each sigmoid and the gate floored at 2^-64.  Above the
 * window's middle both sigmoids are near 1 and their float32 difference cancels; there the same
 * window is sigmoid((hi - z) / temp) - sigmoid((lo - z) / temp), a difference of small numbers. */
static void hardtanh_sigmoid_backward_range(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                            float inv_temp, float lo, float hi, float scale) {
    const float middle = 0.5f * (lo + hi);
    for (int64_t i = begin; i < end; ++i) {
        const float u_lo = (z[i] - lo) * inv_temp, u_hi = (z[i] - hi) * inv_temp;
        const float window = z[i] > middle ? sigmoid_floored(-u_hi) - sigmoid_floored(-u_lo)
                                           : sigmoid_floored(u_lo) - sigmoid_floored(u_hi);
        const float gate = window * scale; /* scale 1: the window itself, bit for bit */
        out[i] = flush(g[i] * (gate < GATE_FLOOR ? 0.0f : gate));
    }
}

/* out[i] = flush(g[i] * floor(clamp(z[i] / (6 temp) + 1/2, 0, 1))): Hardswish's gate (gates.hard_sigmoid_gate).
 * Written with comparisons, not MIN / MAX, so a NaN in z stays NaN as in the contract's clamp. */
static void hardswish_backward_range(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                     float inv_six_temp) {
    for (int64_t i = begin; i < end; ++i) {
        const float v = z[i] * inv_six_temp + 0.5f;
        const float gate = v < GATE_FLOOR ? 0.0f : (v > 1.0f ? 1.0f : v);
        out[i] = flush(g[i] * gate);
    }
}

/* The fused BatchNorm -> ReLU pullback in one pass over BatchNorm's input x (contiguous N, C, inner):
 *   z = x * alpha[c] + beta[c] (+ residual),  dz = flush(g * gate(z / temp)),  dx = flush(dz * alpha[c]),
 * the gate sigmoid or Phi (each floored at 2^-64),
 * with eval-mode BatchNorm's alpha = weight / sqrt(var + eps) and beta = bias - mean * alpha computed per
 * channel in ATen's own order (batch_norm_cpu_collect_linear_and_constant_terms), so z is BatchNorm's
 * output to the rounding of one multiply-add (ATen may contract it into an FMA, -std=c99 here does not).
 * Recomputing z here rather than by torch.batch_norm saves a call (~20 us at batch 1) and a pass over
 * the tensor.  weight, bias, residual and dz_out may be NULL; dz_out receives dz (the residual's gradient).
 * g's planes are contiguous but may sit at any batch and channel strides: the gradient of a slice of a
 * channel concatenation (every inception branch of googlenet) arrives that way. */
/* gate(u): GATE_SIGMOID sigmoid_floored, GATE_NORMAL_CDF normal_cdf_floored (excitation.gates.GATES). */
#define GATE_SIGMOID 0
#define GATE_NORMAL_CDF 1
static inline __attribute__((always_inline)) float gate_of(float u, const int gate) {
    return gate == GATE_NORMAL_CDF ? normal_cdf_floored(u) : sigmoid_floored(u);
}

/* One body for both gates; `gate` is a literal at each call below, so each copy's loops are
 * compiled (and vectorised) for one gate, with no test inside them. */
static inline __attribute__((always_inline)) void bn_relu_backward_planes(
    const float *g, const float *x, const float *residual, const float *mean, const float *var, const float *weight,
    const float *bias, float eps, float *dx, float *dz_out, int64_t channels, int64_t inner, int64_t begin_plane,
    int64_t end_plane, float inv_temp, int64_t g_batch_stride, int64_t g_channel_stride, const int gate) {
    for (int64_t plane = begin_plane; plane < end_plane; ++plane) {
        const int64_t channel = plane % channels;
        const float invstd = 1.0f / __builtin_sqrtf(var[channel] + eps);
        const float alpha = weight != NULL ? invstd * weight[channel] : invstd;
        const float beta = (bias != NULL ? bias[channel] : 0.0f) - mean[channel] * alpha;
        const float *gp = g + (plane / channels) * g_batch_stride + channel * g_channel_stride;
        const float *xp = x + plane * inner;
        float *dxp = dx + plane * inner;
        if (residual == NULL && dz_out == NULL) { /* the common case, in a loop of its own so it vectorises */
            for (int64_t i = 0; i < inner; ++i)
                dxp[i] = flush(flush(gp[i] * gate_of((xp[i] * alpha + beta) * inv_temp, gate)) * alpha);
        } else {
            const float *rp = residual != NULL ? residual + plane * inner : NULL;
            float *dzp = dz_out != NULL ? dz_out + plane * inner : NULL;
            for (int64_t i = 0; i < inner; ++i) {
                const float z = rp != NULL ? (xp[i] * alpha + beta) + rp[i] : xp[i] * alpha + beta;
                const float dz = flush(gp[i] * gate_of(z * inv_temp, gate));
                if (dzp != NULL) dzp[i] = dz;
                dxp[i] = flush(dz * alpha);
            }
        }
    }
}

static void bn_relu_backward_range(const float *g, const float *x, const float *residual, const float *mean,
                                   const float *var, const float *weight, const float *bias, float eps, float *dx,
                                   float *dz_out, int64_t channels, int64_t inner, int64_t begin_plane,
                                   int64_t end_plane, float inv_temp, int gate, int64_t g_batch_stride,
                                   int64_t g_channel_stride) {
    if (gate == GATE_NORMAL_CDF)
        bn_relu_backward_planes(g, x, residual, mean, var, weight, bias, eps, dx, dz_out, channels, inner, begin_plane,
                                end_plane, inv_temp, g_batch_stride, g_channel_stride, GATE_NORMAL_CDF);
    else
        bn_relu_backward_planes(g, x, residual, mean, var, weight, bias, eps, dx, dz_out, channels, inner, begin_plane,
                                end_plane, inv_temp, g_batch_stride, g_channel_stride, GATE_SIGMOID);
}

/* bn_relu_backward_planes for channels-last tensors ([N, H, W, C] in memory, what Inductor lays out for
 * convolutions on the CPU): rows of `channels` contiguous values, row r of g at g + r * g_row_stride (a
 * channel slice of a concatenation's gradient has a longer row), x, residual, dx and dz dense.  The
 * per-channel alpha, beta live in `scratch` (2 * channels floats) so the loop over a row vectorises. */
static inline __attribute__((always_inline)) void bn_relu_backward_rows_gate(
    const float *g, const float *x, const float *residual, const float *alpha, const float *beta, float *dx,
    float *dz_out, int64_t channels, int64_t begin_row, int64_t end_row, float inv_temp, int64_t g_row_stride,
    const int gate) {
    for (int64_t row = begin_row; row < end_row; ++row) {
        const float *gp = g + row * g_row_stride;
        const float *xp = x + row * channels;
        float *dxp = dx + row * channels;
        if (residual == NULL && dz_out == NULL) {
            for (int64_t c = 0; c < channels; ++c)
                dxp[c] = flush(flush(gp[c] * gate_of((xp[c] * alpha[c] + beta[c]) * inv_temp, gate)) * alpha[c]);
        } else {
            const float *rp = residual != NULL ? residual + row * channels : NULL;
            float *dzp = dz_out != NULL ? dz_out + row * channels : NULL;
            for (int64_t c = 0; c < channels; ++c) {
                const float z = rp != NULL ? (xp[c] * alpha[c] + beta[c]) + rp[c] : xp[c] * alpha[c] + beta[c];
                const float dz = flush(gp[c] * gate_of(z * inv_temp, gate));
                if (dzp != NULL) dzp[c] = dz;
                dxp[c] = flush(dz * alpha[c]);
            }
        }
    }
}

static int bn_relu_backward_rows(const float *g, const float *x, const float *residual, const float *mean,
                                 const float *var, const float *weight, const float *bias, float eps, float *dx,
                                 float *dz_out, int64_t channels, int64_t begin_row, int64_t end_row, float inv_temp,
                                 int gate, int64_t g_row_stride) {
    float *alpha = (float *)malloc(2 * (size_t)channels * sizeof(float));
    if (alpha == NULL) return 1;
    float *beta = alpha + channels;
    for (int64_t c = 0; c < channels; ++c) { /* the same per-channel arithmetic as bn_relu_backward_planes */
        const float invstd = 1.0f / __builtin_sqrtf(var[c] + eps);
        alpha[c] = weight != NULL ? invstd * weight[c] : invstd;
        beta[c] = (bias != NULL ? bias[c] : 0.0f) - mean[c] * alpha[c];
    }
    if (gate == GATE_NORMAL_CDF)
        bn_relu_backward_rows_gate(g, x, residual, alpha, beta, dx, dz_out, channels, begin_row, end_row, inv_temp,
                                   g_row_stride, GATE_NORMAL_CDF);
    else
        bn_relu_backward_rows_gate(g, x, residual, alpha, beta, dx, dz_out, channels, begin_row, end_row, inv_temp,
                                   g_row_stride, GATE_SIGMOID);
    free(alpha);
    return 0;
}

/* The window arithmetic of the soft-pool backward for the extended output columns [0, M):
 * given src[k] (window element k of output j is src[k][j]), D[k * stride + j] = the contribution
 * of output j to its window element k.  Generic version: any kernel size, one pass per step. */
static void window_pass(const float *const *src, float *D, float *E, const float *G, float *peak, float *total,
                        float *weighted, float *factor, int64_t M, int64_t K, int64_t sw, int weights_only,
                        int64_t stride) {
    /* Strided gathers stay in loops of their own: GCC vectorises the arithmetic only over
     * contiguous buffers ("not suitable for strided load" with a run-time stride). */
    for (int64_t k = 0; k < K; ++k) {
        float *Dk = D + k * stride;
        for (int64_t j = 0; j < M; ++j) Dk[j] = src[k][sw * j];
    }
    memcpy(peak, D, sizeof(float) * (size_t)M);
    for (int64_t k = 1; k < K; ++k)
        for (int64_t j = 0; j < M; ++j) peak[j] = MAX(peak[j], D[k * stride + j]);
    for (int64_t j = 0; j < M; ++j) total[j] = weighted[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        float *Dk = D + k * stride, *Ek = E + k * stride;
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
    for (int64_t k = 0; k < K; ++k) {
        float *Dk = D + k * stride;
        const float *Ek = E + k * stride;
        if (weights_only)
            for (int64_t j = 0; j < M; ++j) Dk[j] = Ek[j] * factor[j];
        else
            for (int64_t j = 0; j < M; ++j) Dk[j] = Ek[j] * factor[j] * (Dk[j] + weighted[j]);
    }
}

/* The same for K window elements known at compile time (the pools of the common models): one
 * pass over the columns with every window element in registers, read at a constant stride SW.
 * Inlined with constant K and SW, so each caller is its own specialisation; ivdep because D never
 * overlaps src. */
static inline __attribute__((always_inline)) void window_pass_constant(const float *const *src, float *D,
                                                                      const float *G, int64_t M, const int K,
                                                                      const int SW, int weights_only,
                                                                      int64_t stride) {
    enum { KMAX = 9 };
    float *dst[KMAX];
    for (int k = 0; k < K; ++k) dst[k] = D + k * stride;
#pragma GCC ivdep
    for (int64_t j = 0; j < M; ++j) {
        float v[KMAX], e[KMAX];
        float peak = src[0][SW * j];
#pragma GCC unroll 9
        for (int k = 0; k < K; ++k) {
            v[k] = src[k][SW * j];
            peak = MAX(peak, v[k]);
        }
        float total = 0.0f, weighted = 0.0f;
#pragma GCC unroll 9
        for (int k = 0; k < K; ++k) {
            const float diff = MAX(v[k] - peak, FLOOR_EXPONENT - 1.0f);
            const float weight = exp2_nonpositive(MAX(diff, FLOOR_EXPONENT));
            e[k] = diff < FLOOR_EXPONENT ? 0.0f : weight;
            v[k] = diff;
            total += e[k];
            weighted += e[k] * diff;
        }
        if (weights_only) {
            const float factor = G[j] / total;
#pragma GCC unroll 9
            for (int k = 0; k < K; ++k) dst[k][j] = e[k] * factor;
        } else {
            const float factor = G[j] * LN2 / total, shift = 1.0f / LN2 - weighted / total;
#pragma GCC unroll 9
            for (int k = 0; k < K; ++k) dst[k][j] = e[k] * factor * (v[k] + shift);
        }
    }
}

/* Column-phase columns c whose input column c * sw + q - pw lies in [0, w_end). */
static int64_t column_start(int64_t q, int64_t pw, int64_t sw) {
    const int64_t need = pw - q; /* c * sw >= pw - q */
    return need <= 0 ? 0 : (need + sw - 1) / sw;
}

static int64_t column_stop(int64_t q, int64_t pw, int64_t sw, int64_t w_end) {
    const int64_t limit = w_end + pw - q; /* c * sw < w_end + pw - q */
    return limit <= 0 ? 0 : (limit + sw - 1) / sw;
}

/* The 2-D soft max-pool backward (reference.soft_max_pool2d_backward) for planes [begin, end).
 * dx must be zero-filled; scale2 = log2(e) / temp.
 *
 * Layout, so that every pass is one long loop that vectorises, whatever the pool (per output
 * row, with OW = 28, loop overheads made a first version 3.5-5 ns per window element; a
 * column de-interleave for stride 2 cost as much again, on 7-column rows).  The padded input
 * planes of a chunk (a finite floor in the padding, base-2 units of the temperature) are split
 * by row into sh phase buffers, planes stacked: phase p holds padded rows p, p + sh, ..., Hq rows
 * of Wp = sw * Wq columns per plane.  Output (oh, ow) of plane b is column j = (b Hq + oh) Wq + ow
 * of an "extended" output of M = chunk Hq Wq columns, and its window element (a, b') lies in
 * phase (a dh) % sh at sw j + ((a dh) / sh) Wp + b' dw: a view at a constant stride sw.  Extended
 * columns that are no output (ow >= OW, oh >= OH) are junk windows whose incoming gradient is 0,
 * so they add exactly 0.  Gradients go back into phase buffers of the padded gradient split by
 * row and by column (sh * sw of them, Wq columns per row), where each window element's
 * contributions land contiguously (j + ((a dh) / sh) Wq + (b' dw) / sw in phase ((a dh) % sh,
 * (b' dw) % sw)), and are then interleaved into dx: one strided pass, where strided adds per
 * window element took a quarter of the kernel's time for 3x3/2 pools. */
static int soft_max_pool2d_backward_range(const float *g, const float *x, float *dx, int64_t begin, int64_t end,
                                          int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw,
                                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                 float scale2, int weights_only) {
    enum { KMAX = 64 };
    const int64_t K = kh * kw;
    if (K > KMAX) return 2;
    const float big = FLT_MAX / 4.0f, outside = -FLT_MAX / 2.0f;
    const int64_t Hp = (OH - 1) * sh + (kh - 1) * dh + 1;
    const int64_t Wq = ((OW - 1) * sw + (kw - 1) * dw + 1 + sw - 1) / sw, Wp = sw * Wq;
    const int64_t Hq = (Hp + sh - 1) / sh, per_plane = Hq * Wq;
    /* ~8 Ki extended columns per chunk: long loops, and the K rows of D stay in L2. */
    const int64_t chunk = MAX(1, MIN(end - begin, 8192 / MAX(1, per_plane)));
    const int64_t M = chunk * per_plane;
    const int64_t tail = ((kh - 1) * dh / sh + 1) * Wp + (kw - 1) * dw + sw; /* junk reads stay inside */
    const int64_t phase = chunk * Hq * Wp + tail;                        /* one row phase of the input */
    const int64_t gphase = chunk * Hq * Wq + ((kh - 1) * dh / sh + 1) * Wq + (kw - 1) * dw / sw + 1;
    const int64_t gphases = sh * sw;                                    /* row x column phases of the gradient */
    float *buffer = (float *)malloc(sizeof(float) * (size_t)(sh * phase + gphases * gphase + 2 * K * M + 5 * M));
    if (buffer == NULL) return 1;
    float *P = buffer, *T = P + sh * phase, *D = T + gphases * gphase, *E = D + K * M;
    float *peak = E + K * M, *total = peak + M, *weighted = total + M, *factor = weighted + M, *G = factor + M;
    const float *src[KMAX];
    int64_t target[KMAX]; /* element k of extended output j: input P[offset + sw j], gradient T[target[k] + j] */
    for (int64_t k = 0; k < K; ++k) {
        const int64_t ra = (k / kw) * dh, cb = (k % kw) * dw;
        src[k] = P + (ra % sh) * phase + (ra / sh) * Wp + cb;
        target[k] = ((ra % sh) * sw + cb % sw) * gphase + (ra / sh) * Wq + cb / sw;
    }
    const int64_t w_end = MIN(W, Wp - pw); /* input columns any window reads */
    for (int64_t first = begin; first < end; first += chunk) {
        const int64_t count = MIN(chunk, end - first), n = count * per_plane;
        for (int64_t i = 0; i < sh * phase; ++i) P[i] = outside;
        for (int64_t b = 0; b < count; ++b) {
            const float *xp = x + (first + b) * H * W;
            for (int64_t r = ph; r < MIN(Hp, H + ph); ++r) { /* padded row r is input row r - ph */
                const float *xr = xp + (r - ph) * W;
                float *row = P + (r % sh) * phase + (b * Hq + r / sh) * Wp + pw;
                for (int64_t w = 0; w < w_end; ++w) row[w] = MIN(MAX(xr[w] * scale2, -big), big);
            }
        }
        memset(G, 0, sizeof(float) * (size_t)M);
        for (int64_t b = 0; b < count; ++b)
            for (int64_t oh = 0; oh < OH; ++oh)
                memcpy(G + (b * Hq + oh) * Wq, g + ((first + b) * OH + oh) * OW, sizeof(float) * (size_t)OW);
        if (K == 9 && sw == 1)
            window_pass_constant(src, D, G, n, 9, 1, weights_only, M);
        else if (K == 9 && sw == 2)
            window_pass_constant(src, D, G, n, 9, 2, weights_only, M);
        else if (K == 4 && sw == 2)
            window_pass_constant(src, D, G, n, 4, 2, weights_only, M);
        else if (K == 4 && sw == 1)
            window_pass_constant(src, D, G, n, 4, 1, weights_only, M);
        else
            window_pass(src, D, E, G, peak, total, weighted, factor, n, K, sw, weights_only, M);
        /* D holds each window element's contributions; add them up, element by element. */
        memset(T, 0, sizeof(float) * (size_t)(gphases * gphase));
        for (int64_t k = 0; k < K; ++k) {
            float *dst = T + target[k];
            const float *Dk = D + k * M;
            for (int64_t j = 0; j < n; ++j) dst[j] += Dk[j];
        }
        for (int64_t b = 0; b < count; ++b) {
            float *dxp = dx + (first + b) * H * W;
            for (int64_t h = 0; h < H && h + ph < Hp; ++h) {
                const int64_t r = h + ph, row_index = (b * Hq + r / sh) * Wq;
                float *dxr = dxp + h * W;
                for (int64_t q = 0; q < sw; ++q) { /* padded column c * sw + q is input column c * sw + q - pw */
                    const float *row = T + ((r % sh) * sw + q) * gphase + row_index;
                    const int64_t c0 = column_start(q, pw, sw), c1 = column_stop(q, pw, sw, w_end);
                    /* A constant stride lets GCC vectorise the interleave (a run-time one stays scalar). */
                    if (sw == 1)
                        for (int64_t c = c0; c < c1; ++c) dxr[c - pw] = flush(row[c]);
                    else if (sw == 2)
                        for (int64_t c = c0; c < c1; ++c) dxr[2 * c + q - pw] = flush(row[c]);
                    else
                        for (int64_t c = c0; c < c1; ++c) dxr[c * sw + q - pw] = flush(row[c]);
                }
            }
        }
    }
    free(buffer);
    return 0;
}

/* The 2-D max-pool forward with indices for planes [begin, end), bit-identical to ATen's CPU kernel
 * (aten/src/ATen/native/cpu/MaxPoolKernel.cpp, cpu_max_pool): scanning each window row-major, an
 * element replaces the running max when it is greater or NaN; the running max starts at -inf with
 * the window's first in-bounds position as its index; the value written is the input element at
 * that index, so every bit (NaN payloads, the sign of zero) is the input's.  ATen's NCHW loop is
 * scalar (resnet50's stem pool at batch 8: ~90 ms on a 2-core Xeon); this one runs the same
 * comparisons as selects over a row-phase buffer (the layout of the backward below), so they vectorise. */
static int max_pool2d_forward_range(const float *x, float *out, int64_t *indices, int64_t begin, int64_t end, int64_t H,
                           int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
    enum { KMAX = 64 };
    const int64_t K = kh * kw;
    if (K > KMAX) return 2;
    const int64_t Hp = (OH - 1) * sh + (kh - 1) * dh + 1;
    const int64_t Wq = ((OW - 1) * sw + (kw - 1) * dw + 1 + sw - 1) / sw, Wp = sw * Wq;
    const int64_t Hq = (Hp + sh - 1) / sh, per_plane = Hq * Wq;
    const int64_t tail = ((kh - 1) * dh / sh + 1) * Wp + (kw - 1) * dw + sw;
    const int64_t phase = per_plane * sw + tail; /* one plane at a time: planes are the parallel unit */
    float *P = (float *)malloc(sizeof(float) * (size_t)(sh * phase));
    int32_t *first = (int32_t *)malloc(sizeof(int32_t) * (size_t)(3 * per_plane));
    float *best = (float *)malloc(sizeof(float) * (size_t)per_plane);
    if (P == NULL || first == NULL || best == NULL) {
        free(P);
        free(first);
        free(best);
        return 1;
    }
    int32_t *index = first + per_plane, *arg = index + per_plane;
    const float minus_inf = -__builtin_inff();
    int32_t element[KMAX];
    const float *src[KMAX];
    for (int64_t k = 0; k < K; ++k) {
        const int64_t ra = (k / kw) * dh, cb = (k % kw) * dw;
        src[k] = P + (ra % sh) * phase + (ra / sh) * Wp + cb;
        element[k] = (int32_t)(ra * W + cb); /* input index of element k, from the window's corner */
    }
    /* Per extended column: the input index of its window's corner, and of its first in-bounds element. */
    for (int64_t j = 0; j < per_plane; ++j) {
        const int64_t oh = j / Wq, ow = j % Wq, h0 = oh * sh - ph, w0 = ow * sw - pw;
        int64_t hf = h0, wf = w0;
        while (hf < 0) hf += dh;
        while (wf < 0) wf += dw;
        index[j] = (int32_t)(h0 * W + w0);
        first[j] = (int32_t)(MIN(hf, H - 1) * W + MIN(wf, W - 1));
    }
    const int64_t w_end = MIN(W, Wp - pw);
    for (int64_t plane = begin; plane < end; ++plane) {
        const float *xp = x + plane * H * W;
        for (int64_t i = 0; i < sh * phase; ++i) P[i] = minus_inf; /* padding never wins: v > max is false */
        for (int64_t r = ph; r < MIN(Hp, H + ph); ++r) {
            float *row = P + (r % sh) * phase + (r / sh) * Wp + pw;
            memcpy(row, xp + (r - ph) * W, sizeof(float) * (size_t)w_end);
        }
        for (int64_t j = 0; j < per_plane; ++j) {
            best[j] = minus_inf;
            arg[j] = first[j]; /* the running argmax starts at the window's first in-bounds element */
        }
        for (int64_t k = 0; k < K; ++k) {
            const float *sk = src[k];
            const int32_t offset = element[k];
            /* A constant stride lets GCC vectorise the strided reads (a run-time one stays scalar). */
            if (sw == 1) {
                for (int64_t j = 0; j < per_plane; ++j) {
                    const float v = sk[j], m = best[j];
                    const int take = v > m || v != v;
                    best[j] = take ? v : m;
                    arg[j] = take ? index[j] + offset : arg[j];
                }
            } else if (sw == 2) {
                for (int64_t j = 0; j < per_plane; ++j) {
                    const float v = sk[2 * j], m = best[j];
                    const int take = v > m || v != v;
                    best[j] = take ? v : m;
                    arg[j] = take ? index[j] + offset : arg[j];
                }
            } else {
                for (int64_t j = 0; j < per_plane; ++j) {
                    const float v = sk[sw * j], m = best[j];
                    const int take = v > m || v != v;
                    best[j] = take ? v : m;
                    arg[j] = take ? index[j] + offset : arg[j];
                }
            }
        }
        float *op = out + plane * OH * OW;
        int64_t *ip = indices + plane * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
            const int32_t *ar = arg + oh * Wq;
            for (int64_t ow = 0; ow < OW; ++ow) {
                op[oh * OW + ow] = xp[ar[ow]];
                ip[oh * OW + ow] = ar[ow];
            }
        }
    }
    free(P);
    free(first);
    free(best);
    return 0;
}

/* ---- Exported entry points: [begin, end) split into `threads` contiguous parts. ---- */

/* Whether this build runs its parallel regions on OpenMP (1) or on the calling thread only (0). */
int exc_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Part `part` of `parts` of [begin, end): contiguous, in order, sizes differing by at most one. */
static inline void part_of(int64_t begin, int64_t end, int64_t part, int64_t parts, int64_t *lo, int64_t *hi) {
    const int64_t n = end - begin;
    *lo = begin + n * part / parts;
    *hi = begin + n * (part + 1) / parts;
}

#ifdef _OPENMP
#define THREAD_INDEX() ((int64_t)omp_get_thread_num())
#define THREAD_COUNT() ((int64_t)omp_get_num_threads())
#define PARALLEL _Pragma("omp parallel num_threads(threads > 1 ? threads : 1) if (threads > 1)")
#define PARALLEL_STATUS _Pragma("omp parallel num_threads(threads > 1 ? threads : 1) if (threads > 1) reduction(max : status)")
#else
#define THREAD_INDEX() ((int64_t)0)
#define THREAD_COUNT() ((int64_t)1)
#define PARALLEL
#define PARALLEL_STATUS
#endif

/* Runs `call` (an expression of lo and hi) on each thread's part of [begin, end); returns the largest
 * status any part returned. */
#define SPLIT_KEEPING_STATUS(begin, end, call)                                    \
    int status = 0;                                                              \
    PARALLEL_STATUS                                                              \
    {                                                                            \
        int64_t lo, hi;                                                          \
        part_of(begin, end, THREAD_INDEX(), THREAD_COUNT(), &lo, &hi);           \
        if (lo < hi) {                                                           \
            const int part = (call);                                             \
            status = MAX(status, part);                                          \
        }                                                                        \
    }                                                                            \
    return status

/* Runs `call`, which reads part_begin and part_end, over this thread's part of [begin, end). */
#define SPLIT(begin, end, call)                                                        \
    PARALLEL                                                                           \
    {                                                                                  \
        int64_t part_begin, part_end;                                                  \
        part_of(begin, end, THREAD_INDEX(), THREAD_COUNT(), &part_begin, &part_end);   \
        call;                                                                          \
    }

void exc_relu_sigmoid_backward(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                               float inv_temp, int threads) {
    SPLIT(begin, end, relu_sigmoid_backward_range(g, z, out, part_begin, part_end, inv_temp));
}

void exc_relu_normal_cdf_backward(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                  float inv_temp, int threads) {
    SPLIT(begin, end, relu_normal_cdf_backward_range(g, z, out, part_begin, part_end, inv_temp));
}

void exc_hardtanh_sigmoid_backward(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                                   float inv_temp, float lo, float hi, float scale, int threads) {
    SPLIT(begin, end, hardtanh_sigmoid_backward_range(g, z, out, part_begin, part_end, inv_temp, lo, hi, scale));
}

void exc_hardswish_backward(const float *g, const float *z, float *out, int64_t begin, int64_t end,
                            float inv_six_temp, int threads) {
    SPLIT(begin, end, hardswish_backward_range(g, z, out, part_begin, part_end, inv_six_temp));
}

void exc_bn_relu_backward(const float *g, const float *x, const float *residual, const float *mean, const float *var,
                          const float *weight, const float *bias, float eps, float *dx, float *dz_out, int64_t channels,
                          int64_t inner, int64_t begin_plane, int64_t end_plane, float inv_temp, int gate,
                          int64_t g_batch_stride, int64_t g_channel_stride, int threads) {
    SPLIT(begin_plane, end_plane,
          bn_relu_backward_range(g, x, residual, mean, var, weight, bias, eps, dx, dz_out, channels, inner, part_begin,
                                 part_end, inv_temp, gate, g_batch_stride, g_channel_stride));
}

/* Returns 0, or 1 if a part could not allocate its per-channel scratch. */
int exc_bn_relu_backward_channels_last(const float *g, const float *x, const float *residual, const float *mean,
                                       const float *var, const float *weight, const float *bias, float eps, float *dx,
                                       float *dz_out, int64_t channels, int64_t begin_row, int64_t end_row,
                                       float inv_temp, int gate, int64_t g_row_stride, int threads) {
    SPLIT_KEEPING_STATUS(begin_row, end_row,
                         bn_relu_backward_rows(g, x, residual, mean, var, weight, bias, eps, dx, dz_out, channels, lo,
                                               hi, inv_temp, gate, g_row_stride));
}

/* Returns 0, or the largest failure of any part: 1 (a buffer could not be allocated), 2 (window too large). */
int exc_soft_max_pool2d_backward(const float *g, const float *x, float *dx, int64_t begin, int64_t end, int64_t H,
                                 int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                 int64_t ph, int64_t pw, int64_t dh, int64_t dw, float scale2, int weights_only,
                                 int threads) {
    SPLIT_KEEPING_STATUS(begin, end, soft_max_pool2d_backward_range(g, x, dx, lo, hi, H, W, OH, OW, kh, kw, sh, sw,
                                                                    ph, pw, dh, dw, scale2, weights_only));
}

int exc_max_pool2d_forward(const float *x, float *out, int64_t *indices, int64_t begin, int64_t end, int64_t H,
                           int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads) {
    SPLIT_KEEPING_STATUS(begin, end, max_pool2d_forward_range(x, out, indices, lo, hi, H, W, OH, OW, kh, kw, sh, sw,
                                                              ph, pw, dh, dw));
}
