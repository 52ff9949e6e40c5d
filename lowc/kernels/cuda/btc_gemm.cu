// lowc BTC GEMM (binary tensor cores): Y[T, N] = (Xq[T, K] . Wq[N, K]^T per scale group * w_scale) * x_scale (+ bias)
// for arbitrary weight / activation bit widths, on
//   mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc
// Both operands come as two's-complement bit planes (lowc/kernels/btc_layout.py): q = -2^(B-1) p_(B-1) + sum_(b<B-1)
// 2^b p_b, so Wq . Xq = sum_(i,j) c_i c_j popc(W_i AND X_j) with c_b = 2^b, negative for the top (sign) plane. One
// binary MMA per (weight plane, activation plane) pair and 128 K; the int32 results are weighted and summed in
// registers, then converted to float and scaled once per scale group.
//
// Layout: planes [BITS][rows][KW] u32 (KW = k_pad/32, k_pad a multiple of 512; bit k%32 of word k/32, zero past
// K). Within each 512-column chunk the 16 words are stored transposed 4 x 4: storage word 4*w + s holds word w of
// the chunk's 128-column sub-group s. Lane (g, t) of a warp loads storage words 4t..4t+3 of a chunk as one uint4 and
// feeds component s to the MMA of sub-group s, so one MMA covers exactly one 128-column sub-group (scale groups
// of 128 columns never straddle an MMA) while every load is 16 bytes.
//
// CTA: WN x WK warps. Warp (wn, wk) owns weight rows 16*(blockIdx.x*WN + wn) .. +15 and tokens
// 8*NT*blockIdx.y .. +8*NT-1, and walks the chunks wk, wk+WK, ...; the WK partial sums meet in shared memory.
// Weight rows are padded to a multiple of 16 with zero planes; tokens past T load as zero and are not stored.
//
// Compile-time parameters (prepended #defines): LOWC_HALF (1: fp16 out, else bf16), LOWC_WBITS, LOWC_ABITS (2..8),
// LOWC_WN, LOWC_WK, LOWC_NT, LOWC_GSTEPS (scale group / 128; 0 = one scale per row). No headers: the host prepends
// common.cuh (types, conversions) and NVRTC compiles the whole without include paths.

#ifndef LOWC_WBITS
#define LOWC_WBITS 6
#endif
#ifndef LOWC_ABITS
#define LOWC_ABITS 8
#endif
#ifndef LOWC_WN
#define LOWC_WN 1
#endif
#ifndef LOWC_WK
#define LOWC_WK 4
#endif
#ifndef LOWC_NT
#define LOWC_NT 1
#endif
#ifndef LOWC_GSTEPS
#define LOWC_GSTEPS 1
#endif

// steps (128-column sub-groups) summed in int32 before a conversion: one scale group, at most one chunk
#define LOWC_SEG ((LOWC_GSTEPS == 0 || LOWC_GSTEPS >= 4) ? 4 : LOWC_GSTEPS)

// d = popc(A AND B) + c over one 16 x 8 x 128 binary tile
static __device__ __forceinline__ void btc_mma(int* d, u32 a0, u32 a1, u32 b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

static __device__ __forceinline__ uint4 btc_ld(const uint4* p) {  // streamed once: skip L1
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

static __device__ __forceinline__ u32 btc_word(const uint4& v, int s) {
    return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

extern "C" __global__ void __launch_bounds__(32 * LOWC_WN * LOWC_WK)
lowc_btc_gemm(const uint4* __restrict__ wplanes, const uint4* __restrict__ xplanes,
              const float* __restrict__ wscales, const float* __restrict__ xscales, const u16* __restrict__ bias,
              u16* __restrict__ out, i64 T, i64 N, i64 n_pad, i64 kw, i64 t_pad, i64 ld_out, i64 has_bias) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % LOWC_WN, wk = warp / LOWC_WN;
    const int g = lane >> 2, t = lane & 3;
    const i64 r0 = (i64(blockIdx.x) * LOWC_WN + wn) * 16;
    const i64 t0 = i64(blockIdx.y) * 8 * LOWC_NT;
    const i64 kq = kw / 4;                 // uint4 per plane row
    const i64 chunks = kw / 16;

    float accf[LOWC_NT][4];
    int part[LOWC_NT][4];
#pragma unroll
    for (int n = 0; n < LOWC_NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) { accf[n][r] = 0.f; part[n][r] = 0; }

    const bool rows_in = r0 < n_pad;
    for (i64 c = wk; c < chunks && rows_in; c += LOWC_WK) {
        uint4 a[LOWC_WBITS][2];
        uint4 b[LOWC_ABITS][LOWC_NT];
#pragma unroll
        for (int i = 0; i < LOWC_WBITS; ++i) {
            const uint4* base = wplanes + (i64(i) * n_pad + r0 + g) * kq + c * 4 + t;
            a[i][0] = btc_ld(base);
            a[i][1] = btc_ld(base + 8 * kq);
        }
#pragma unroll
        for (int j = 0; j < LOWC_ABITS; ++j)
#pragma unroll
            for (int n = 0; n < LOWC_NT; ++n) {
                const i64 tok = t0 + n * 8 + g;
                b[j][n] = tok < t_pad ? btc_ld(xplanes + (i64(j) * t_pad + tok) * kq + c * 4 + t)
                                      : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int s0 = 0; s0 < 4; s0 += LOWC_SEG) {
#pragma unroll
            for (int i = 0; i < LOWC_WBITS; ++i)
#pragma unroll
                for (int j = 0; j < LOWC_ABITS; ++j) {
                    const int coef = ((i == LOWC_WBITS - 1) != (j == LOWC_ABITS - 1) ? -1 : 1) << (i + j);
#pragma unroll
                    for (int n = 0; n < LOWC_NT; ++n) {
                        int d[4] = {0, 0, 0, 0};
#pragma unroll
                        for (int s = s0; s < s0 + LOWC_SEG; ++s)
                            btc_mma(d, btc_word(a[i][0], s), btc_word(a[i][1], s), btc_word(b[j][n], s));
#pragma unroll
                        for (int r = 0; r < 4; ++r) part[n][r] += coef * d[r];
                    }
                }
#if LOWC_GSTEPS > 0
            // one scale group (or a chunk's share of one) ends here: scale and keep in float
            const i64 grp = (c * 4 + s0) / LOWC_GSTEPS;
            const float s_lo = wscales[grp * N + min(r0 + g, N - 1)];
            const float s_hi = wscales[grp * N + min(r0 + g + 8, N - 1)];
#pragma unroll
            for (int n = 0; n < LOWC_NT; ++n) {
                accf[n][0] += float(part[n][0]) * s_lo;
                accf[n][1] += float(part[n][1]) * s_lo;
                accf[n][2] += float(part[n][2]) * s_hi;
                accf[n][3] += float(part[n][3]) * s_hi;
#pragma unroll
                for (int r = 0; r < 4; ++r) part[n][r] = 0;
            }
#endif
        }
    }

#if LOWC_WK > 1
    // the WK warps of a row tile meet in shared memory (int32 sums for one scale per row: exact, like the reference)
    __shared__ float red[LOWC_WK - 1][LOWC_WN][32][LOWC_NT * 4];
    if (wk > 0) {
#pragma unroll
        for (int n = 0; n < LOWC_NT; ++n)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                red[wk - 1][wn][lane][n * 4 + r] = LOWC_GSTEPS > 0 ? accf[n][r] : __int_as_float(part[n][r]);
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int w = 0; w < LOWC_WK - 1; ++w)
#pragma unroll
        for (int n = 0; n < LOWC_NT; ++n)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (LOWC_GSTEPS > 0) accf[n][r] += red[w][wn][lane][n * 4 + r];
                else part[n][r] += __float_as_int(red[w][wn][lane][n * 4 + r]);
            }
#endif
    if (!rows_in) return;
#if LOWC_GSTEPS == 0
    {
        const float s_lo = wscales[min(r0 + g, N - 1)], s_hi = wscales[min(r0 + g + 8, N - 1)];
#pragma unroll
        for (int n = 0; n < LOWC_NT; ++n) {
            accf[n][0] = float(part[n][0]) * s_lo;
            accf[n][1] = float(part[n][1]) * s_lo;
            accf[n][2] = float(part[n][2]) * s_hi;
            accf[n][3] = float(part[n][3]) * s_hi;
        }
    }
#endif
    // accumulator (n, r): row r0 + g + 8*(r >= 2), token t0 + 8n + 2t + (r & 1)
#pragma unroll
    for (int n = 0; n < LOWC_NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const i64 row = r0 + g + (r >= 2 ? 8 : 0);
            const i64 tok = t0 + n * 8 + 2 * t + (r & 1);
            if (row < N && tok < T) {
                float v = accf[n][r] * xscales[tok];
                if (has_bias) v += lowc_to_float(bias[row]);
                out[tok * ld_out + row] = lowc_from_float(v);
            }
        }
}
