// llama-mux-kernel.cpp - the two stages of loramux's fused CPU op (rank vector t = A x, then
// out += B t), shared by fixed mixes (llama-mux.cpp) and per-token routing (llama-mux-route.cpp).
// AVX2/FMA/F16C code is compiled with target attributes and chosen at run time, so a portable
// build keeps it.

#include "llama-mux-kernel.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MUX_X86_DISPATCH 1
// built with target attributes and picked at run time, so a portable build still uses AVX2
__attribute__((target("avx2,fma,f16c")))
static float mux_dot_f16_avx2(const ggml_fp16_t * a, const float * x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps();
    __m256 acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i))), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i + 8))), _mm256_loadu_ps(x + i + 8), acc1);
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float sum = _mm_cvtss_f32(h);
    for (; i < n; ++i) {
        sum += _cvtsh_ss(a[i]) * x[i];
    }
    return sum;
}

__attribute__((target("avx2,fma")))
static float mux_dot_f32_avx2(const float * a, const float * x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(x + i), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float sum = _mm_cvtss_f32(h);
    for (; i < n; ++i) {
        sum += a[i] * x[i];
    }
    return sum;
}

__attribute__((target("avx2,fma")))
static void mux_axpy_avx2(float * y, const float * b, float t, int64_t n) {
    const __m256 vt = _mm256_set1_ps(t);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vt, _mm256_loadu_ps(b + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; ++i) {
        y[i] += t * b[i];
    }
}

__attribute__((target("avx2,fma,f16c")))
static void mux_axpy_f16_avx2(float * y, const ggml_fp16_t * b, float t, int64_t n) {
    const __m256 vt = _mm256_set1_ps(t);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 vb = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (b + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vt, vb, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; ++i) {
        y[i] += t * _cvtsh_ss(b[i]);
    }
}

static bool mux_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return has;
}
#endif

static float mux_dot_f16(const ggml_fp16_t * a, const float * x, int64_t n, float * scratch) {
#ifdef MUX_X86_DISPATCH
    if (mux_has_avx2()) {
        return mux_dot_f16_avx2(a, x, n);
    }
#endif
    ggml_fp16_to_fp32_row(a, scratch, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        sum += scratch[i] * x[i];
    }
    return sum;
}

float llama_mux_dot_f32(const float * a, const float * x, int64_t n) {
#ifdef MUX_X86_DISPATCH
    if (mux_has_avx2()) {
        return mux_dot_f32_avx2(a, x, n);
    }
#endif
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        sum += a[i] * x[i];
    }
    return sum;
}

static void mux_axpy(float * y, const float * b, float t, int64_t n) {
#ifdef MUX_X86_DISPATCH
    if (mux_has_avx2()) {
        mux_axpy_avx2(y, b, t, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) {
        y[i] += t * b[i];
    }
}

static void mux_axpy_f16(float * y, const ggml_fp16_t * b, float t, int64_t n, float * scratch) {
#ifdef MUX_X86_DISPATCH
    if (mux_has_avx2()) {
        mux_axpy_f16_avx2(y, b, t, n);
        return;
    }
#endif
    ggml_fp16_to_fp32_row(b, scratch, n);
    mux_axpy(y, scratch, t, n);
}

void llama_mux_a_times_x(const llama_mux_cpu_args & args, int64_t sub, const float * xin, float * t) {
    const bool    a_f16 = args.A->type == GGML_TYPE_F16;
    const char *  a_sub = (const char *) args.A->data + sub * args.A->nb[2];
    for (int64_t r = 0; r < args.r_max; ++r) {
        const char * row = a_sub + r * args.A->nb[1];
        t[r] = a_f16 ? mux_dot_f16((const ggml_fp16_t *) row, xin, args.n_in, args.scratch)
                     : llama_mux_dot_f32((const float *) row, xin, args.n_in);
    }
}

void llama_mux_add_b(const llama_mux_cpu_args & args, int64_t sub, const float * t, float * out, int64_t o0, int64_t o1) {
    const char * b_sub = (const char *) args.BT->data + sub * args.BT->nb[2];
    const bool   b_f16 = args.BT->type == GGML_TYPE_F16;
    for (int64_t r = 0; r < args.r_max; ++r) {
        if (t[r] == 0.0f) {
            continue;
        }
        const char * row = b_sub + r * args.BT->nb[1];
        if (b_f16) {
            mux_axpy_f16(out + o0, (const ggml_fp16_t *) row + o0, t[r], o1 - o0, args.scratch);
        } else {
            mux_axpy(out + o0, (const float *) row + o0, t[r], o1 - o0);
        }
    }
}

