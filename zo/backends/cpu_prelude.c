/* Noise and storage conversions shared by every generated CPU sweep kernel (zo_cpu.py emits the sweeps and
 * #defines the float32 constants of zo_noise above this file).  Every floating-point step is one IEEE-754 operation:
 * compiled with -ffp-contract=off so no multiply-add is fused, and checked against zo_noise at load. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#define ZO_INLINE static inline __attribute__((always_inline))

ZO_INLINE uint64_t zo_hash(uint64_t key, uint64_t i) {   /* splitmix64 output i+1 of seed key */
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
/* bit casts through memcpy: defined behaviour, compiled to register moves */
ZO_INLINE float zo_i2f(int32_t b) { float f; memcpy(&f, &b, 4); return f; }
ZO_INLINE float zo_u2f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
ZO_INLINE int32_t zo_f2i(float f) { int32_t b; memcpy(&b, &f, 4); return b; }
ZO_INLINE uint32_t zo_f2u(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
ZO_INLINE float zo_bf2f(uint16_t h) { return zo_u2f((uint32_t)h << 16); }   /* bfloat16 -> float, exact */
ZO_INLINE uint16_t zo_f2bf(float f) {   /* round to nearest even, as c10::BFloat16; NaN stays NaN */
    uint32_t u = zo_f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)r;
}
ZO_INLINE float zo_h2f(uint16_t h) {   /* IEEE half -> float, exact; branch-free so the loops vectorise */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t r = em >= 0x7C00u ? ((em << 13) | 0x7F800000u) : (em << 13) + 0x38000000u;
    r = em < 0x0400u ? zo_f2u((float)(int32_t)em * 0x1p-24f) : r;          /* subnormal: mant * 2^-24 */
    return zo_u2f(r | sign);
}
ZO_INLINE uint16_t zo_f2h(float f) {   /* float -> IEEE half, round to nearest even */
    uint32_t x = zo_f2u(f), sign = x & 0x80000000u;
    x ^= sign;
    uint32_t special = x > 0x7F800000u ? 0x7E00u : 0x7C00u;                   /* NaN / overflow to inf */
    uint32_t sub = zo_f2u(zo_u2f(x) + 0.5f) - 0x3F000000u;                  /* |f| < 2^-14: align to 2^-24 */
    uint32_t nrm = (x + 0xC8000FFFu + ((x >> 13) & 1u)) >> 13;              /* rebias, round half to even */
    uint32_t o = x >= 0x47800000u ? special : (x < 0x38800000u ? sub : nrm);
    return (uint16_t)(o | (sign >> 16));
}
/* stochastic rounding of an updated weight (zo_noise.stochastic_round, step by step): r = the element's 32 random
 * bits, the low half of h(j / 2) for even j, the high half for odd j */
ZO_INLINE uint32_t zo_rbits(uint64_t key, uint64_t j) { return (uint32_t)(zo_hash(key, j >> 1) >> ((j & 1) << 5)); }
ZO_INLINE uint16_t zo_sr_bf16(float f, uint32_t r) {   /* the bits plus 16 random ones, cut: a carry rounds up */
    uint32_t o = (zo_f2u(f) + (r >> 16)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)o;
}
ZO_INLINE uint16_t zo_sr_f16(float f, uint32_t r) {
    uint32_t x = zo_f2u(f), sign = x & 0x80000000u;
    x ^= sign;
    uint32_t special = x > 0x7F800000u ? 0x7E00u : 0x7C00u;
    uint32_t nrm = (x + 0xC8000000u + (r >> 19)) >> 13;                   /* rebias, 13 random bits, cut */
    float w = zo_u2f(x < 0x38800000u ? x : 0u) * 0x1p24f;                  /* subnormal: |f|·2^24 < 2^10, exact */
    /* w < 2^10 always; the test that says so lets gcc vectorise the conversion (else "control flow in loop") */
    int32_t whole = (int32_t)(w < 1024.0f ? w : 0.0f);
    /* (int32_t): the 24-bit value converts exactly either way, and a signed conversion vectorises (AVX2 has no
     * unsigned one) */
    uint32_t sub = (uint32_t)whole + ((float)(int32_t)((r >> 8) ^ 0xFFFFFFu) * 0x1p-24f < w - (float)whole);
    uint32_t o = x >= 0x47800000u ? special : (x < 0x38800000u ? sub : nrm);
    return (uint16_t)(o | (sign >> 16));
}
ZO_INLINE float zo_quadrant(int32_t q, int32_t swap, float r, float S, float C) {
    /* cos(q·π/2 + πt'/2) from the sine and cosine of the reduced angle, by bit selection (no branch) */
    int32_t mask = -((swap ^ q) & 1);
    int32_t vb = (zo_f2i(S) & mask) | (zo_f2i(C) & ~mask);
    vb ^= (int32_t)((uint32_t)(((q + 1) >> 1) & 1) << 31);
    return r * zo_i2f(vb);
}
ZO_INLINE void zo_gauss2(uint64_t key, uint64_t p, float* z) {   /* elements 2p, 2p+1: zo_noise.box_muller */
    uint64_t h = zo_hash(key, p);
    int32_t m = (int32_t)(h >> 40) + 1;
    int32_t k = (int32_t)((h >> 16) & 0xFFFFFF);
    int32_t b = zo_f2i((float)m);
    int32_t mant = (b & 0x7FFFFF) | 0x3F800000;
    int32_t big = ((0x3FB504F3 - mant) >> 31) & 1;
    int32_t e = ((b >> 23) - 127) + big - 24;
    float f = zo_i2f(mant - (big << 23));
    float s = (f - 1.0f) / (f + 1.0f);
    float s2 = s * s;
    float p_ = s2 * ZO_LN3; p_ = p_ + ZO_LN2; p_ = p_ * s2; p_ = p_ + ZO_LN1; p_ = p_ * s2; p_ = p_ + ZO_LN0;
    float lnf = s * p_;
    float L = (float)e * ZO_LNTWO; L = L + lnf;
    float r = sqrtf(L * -2.0f);
    int32_t q = k >> 22, j = k & 0x3FFFFF;
    int32_t swap = ((0x200000 - j) >> 31) & 1;
    float t = (float)(j + swap * (0x400000 - 2 * j)) * 0x1p-22f;
    float t2 = t * t;
    float S = t2 * ZO_SN3; S = S + ZO_SN2; S = S * t2; S = S + ZO_SN1; S = S * t2; S = S + ZO_SN0; S = S * t;
    float C = t2 * ZO_CS4; C = C + ZO_CS3; C = C * t2; C = C + ZO_CS2; C = C * t2; C = C + ZO_CS1; C = C * t2;
    C = C + ZO_CS0;
    z[0] = zo_quadrant(q, swap, r, S, C);
    z[1] = zo_quadrant((q + 3) & 3, swap, r, S, C);
}
ZO_INLINE float zo_sign(uint64_t h, uint32_t b) {   /* bit b of h set: -1, else +1 */
    return zo_u2f(0x3F800000u | ((uint32_t)((h >> b) & 1u) << 31));
}
ZO_INLINE void zo_rad2(uint64_t key, uint64_t p, float* z) {
    /* elements 2p, 2p+1 are bits 2(p mod 32) and +1 of h(2p div 64); hashing per pair keeps the loop body the
     * same for every pair, which is what lets it vectorise */
    uint64_t h = zo_hash(key, p >> 5);
    uint32_t b = (uint32_t)(p & 31) << 1;
    z[0] = zo_sign(h, b);
    z[1] = zo_sign(h, b + 1);
}

/* Pair loop over elements [pos, pos+n) of the counter streams: BODY(j, s) handles element j of the chunk, which is
 * half s of its Box–Muller pair; GEN(p) draws the pairs p of every stream the body reads. */
#define ZO_PAIR_LOOP(GEN, BODY) do { \
    int64_t i0_ = 0; \
    if ((pos & 1) && n > 0) { GEN((uint64_t)pos >> 1) BODY(0, 1) i0_ = 1; } \
    int64_t np_ = (n - i0_) >> 1; uint64_t p0_ = (uint64_t)(pos + i0_) >> 1; \
    for (int64_t k_ = 0; k_ < np_; k_++) { GEN(p0_ + (uint64_t)k_) BODY(i0_ + 2 * k_, 0) BODY(i0_ + 2 * k_ + 1, 1) } \
    if ((n - i0_) & 1) { GEN((uint64_t)(pos + n - 1) >> 1) BODY(n - 1, 0) } \
} while (0)

/* whole noise streams (the load-time self-test, zo_cpu.fill) and 16-bit conversions (zo_cpu.convert) */
void zo_fill_g(float* restrict out, int64_t n, uint64_t key, int64_t pos) {
#define ZO_GEN_(p) float z[2]; zo_gauss2(key, p, z);
#define ZO_BODY_(j, s) out[j] = z[s];
    ZO_PAIR_LOOP(ZO_GEN_, ZO_BODY_);
#undef ZO_GEN_
}
void zo_fill_r(float* restrict out, int64_t n, uint64_t key, int64_t pos) {
#define ZO_GEN_(p) float z[2]; zo_rad2(key, p, z);
    ZO_PAIR_LOOP(ZO_GEN_, ZO_BODY_);
#undef ZO_GEN_
#undef ZO_BODY_
}
void zo_bf16_to_f32(const uint16_t* restrict a, float* restrict b, int64_t n) { for (int64_t j = 0; j < n; j++) b[j] = zo_bf2f(a[j]); }
void zo_f32_to_bf16(const float* restrict a, uint16_t* restrict b, int64_t n) { for (int64_t j = 0; j < n; j++) b[j] = zo_f2bf(a[j]); }
void zo_f16_to_f32(const uint16_t* restrict a, float* restrict b, int64_t n) { for (int64_t j = 0; j < n; j++) b[j] = zo_h2f(a[j]); }
void zo_f32_to_f16(const float* restrict a, uint16_t* restrict b, int64_t n) { for (int64_t j = 0; j < n; j++) b[j] = zo_f2h(a[j]); }
