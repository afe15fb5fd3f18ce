/* In-place softmax over the last axis of a contiguous bfloat16 matrix (rows x n), for the MAE's
 * attention on the CPU. volref compiles this file on first use (volref/models/kernels/__init__.py)
 * and calls it through ctypes; without a C compiler or AVX-512 it is not used.
 *
 * Why: in bf16 inference of the MAE, PyTorch's softmax takes ~45 % of a tile's time (its exp is
 * accurate to 1 ulp of fp32, far more than a bf16 result keeps). Here each row is read once
 * into an fp32 buffer (max), exponentiated with a degree-4 polynomial (relative error < 5e-5,
 * far below the 4e-3 of bf16's rounding) and written back rounded to nearest even. Rows are
 * independent and computed in a fixed order: a row's result does not depend on the others.
 *
 * exp(x), x <= 0: x = k ln2 + r, |r| <= ln2/2, exp(x) = 2^k p(r) (scalef). x is clamped at -110,
 * where 2^k p(r) underflows to exactly 0: -inf (masked keys) gives 0, as in PyTorch.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

int volref_softmax_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

TARGET static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693147182f), x);
    __m512 p = _mm512_set1_ps(1.0f / 24);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

TARGET static inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* Returns 0, or -1 when the row buffer cannot be allocated. */
TARGET int volref_softmax_bf16(uint16_t *data, int64_t n, int64_t rows) {
    float *buf = (float *)aligned_alloc(64, (size_t)((n + 15) / 16) * 64);
    if (buf == NULL) return -1;
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (int64_t row = 0; row < rows; ++row) {
        uint16_t *p = data + row * n;
        __m512 vmax = ninf;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = lanes(n - j);
            const __m256i h = _mm256_maskz_loadu_epi16(m, p + j);
            __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            f = _mm512_mask_mov_ps(ninf, m, f);
            _mm512_store_ps(buf + j, f);
            vmax = _mm512_max_ps(vmax, f);
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(buf + j), mx));
            _mm512_store_ps(buf + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < n; j += 16) {
            __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(buf + j), inv));
            u = _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            _mm256_mask_storeu_epi16(p + j, lanes(n - j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        }
    }
    free(buf);
    return 0;
}
