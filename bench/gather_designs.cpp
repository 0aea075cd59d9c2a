// Batch-1 row dots, one design per function: sum over a row's entries of VALUES[e] * X[COLS[e]] with
// 16-bit COLS, the inner loop of sparsec_rows_spmm's gather path (kernels/cpu/rows.cpp.jinja) at batch 1.
// Built and timed by bench/probe_gather_designs.py; not part of the package.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

typedef float vec4 __attribute__((vector_size(16)));

static inline vec4 load4(const float* p) {
    vec4 v;
    std::memcpy(&v, p, 16);
    return v;
}

// the shipped design: four indices per 64-bit load, two chains of four lanes
static inline vec4 gather4(const float* x, const uint16_t* p) {
    uint64_t q;
    std::memcpy(&q, p, 8);
    return vec4{x[q & 0xffff], x[(q >> 16) & 0xffff], x[(q >> 32) & 0xffff], x[q >> 48]};
}
static float packed64(const float* v, const uint16_t* c, const float* x, int64_t e0, int64_t e1) {
    vec4 a0{}, a1{};
    int64_t e = e0;
    for (; e + 8 <= e1; e += 8) {
        a0 += load4(v + e) * gather4(x, c + e);
        a1 += load4(v + e + 4) * gather4(x, c + e + 4);
    }
    const vec4 a = a0 + a1;
    float s = (a[0] + a[1]) + (a[2] + a[3]);
    for (; e < e1; ++e) s += v[e] * x[c[e]];
    return s;
}

// one 16-bit load per index, eight scalar chains
static float scalar8(const float* v, const uint16_t* c, const float* x, int64_t e0, int64_t e1) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = e0;
    for (; e + 8 <= e1; e += 8)
        for (int i = 0; i < 8; ++i) s[i] += v[e + i] * x[c[e + i]];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; e < e1; ++e) r += v[e] * x[c[e]];
    return r;
}

// AVX2 vgatherdps, eight lanes, two chains
static float gather_avx2(const float* v, const uint16_t* c, const float* x, int64_t e0, int64_t e1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t e = e0;
    for (; e + 16 <= e1; e += 16) {
        const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(c + e)));
        const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(c + e + 8)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + e), _mm256_i32gather_ps(x, i0, 4), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + e + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(a0, a1));
    float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (; e < e1; ++e) s += v[e] * x[c[e]];
    return s;
}

#ifdef __AVX512F__
// AVX-512 vgatherdps, sixteen lanes, two chains, a masked tail
static float gather_avx512(const float* v, const uint16_t* c, const float* x, int64_t e0, int64_t e1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t e = e0;
    for (; e + 32 <= e1; e += 32) {
        const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + e)));
        const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + e + 16)));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + e), _mm512_i32gather_ps(i0, x, 4), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + e + 16), _mm512_i32gather_ps(i1, x, 4), a1);
    }
    for (; e < e1; e += 16) {
        const int64_t n = e1 - e < 16 ? e1 - e : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, c + e));
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, v + e), g, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

typedef float (*design_t)(const float*, const uint16_t*, const float*, int64_t, int64_t);
static const design_t DESIGNS[] = {
    packed64, scalar8, gather_avx2,
#ifdef __AVX512F__
    gather_avx512,
#endif
};

extern "C" {

int probe_designs() { return sizeof(DESIGNS) / sizeof(DESIGNS[0]); }

// Best seconds per pass over all rows (one thread) of design D, in REPEATS timings of ITERS passes;
// OUT holds the last pass's row dots.
double probe_time(int d, const float* values, const uint16_t* cols, const int64_t* offsets, const float* x,
                  float* out, int64_t rows, int iters, int repeats) {
    const design_t f = DESIGNS[d];
    double best = 1e30;
    for (int t = 0; t < repeats; ++t) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
            for (int64_t r = 0; r < rows; ++r) out[r] = f(values, cols, x, offsets[r], offsets[r + 1]);
            asm volatile("" ::: "memory");
        }
        const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
        best = std::min(best, dt.count() / iters);
    }
    return best;
}
}
