// lowc W4A16 / W6A16 decode GEMM on tensor cores: Y[T, N] = X[T, K] . W^T (+ bias) for 1..16 tokens, W in the
// kernel layout of lowc/kernels/lowbit_layout.py (read as it is; no layout of its own):
//   codes [N][k_pad/2] uint8: biased code u = c + 2^(b-1), low 4 bits, column 2i in the low nibble of byte i
//   high  [N][k_pad/4] uint8 (INT6 only): the top 2 bits, column 4i+j at bits 2j of byte i
//   scales [groups][lds] fp16 (row g = group g of every output row), or one row for a per-channel weight
//
// Decode is memory-bound, so the design goal is bytes in flight and few instructions per weight byte. The weight
// is operand A of mma.sync m16n8k16 (16 rows x 16 K) and the tokens are operand B (8 tokens; lanes of absent
// tokens hold zeros and load nothing). A dot product does not care in which order K is summed, as long as A and
// B agree; so instead of shuffling weight bytes into the fragment order, each lane keeps the 16 contiguous code
// bytes (32 columns) of its row that one coalesced 16-byte load brings, and the *activations* are permuted to
// match. Four lanes (t = 0..3) of a row cover a 128-column chunk = one scale group of 128, consumed in 8 MMAs.
// Within a 32-bit word of 8 nibbles, the mask 0x000F000F picks nibbles i and i+4 into the two 16-bit halves
// that one A register holds; OR 0x4300 (bf16 128 + u) or 0x6400 (fp16 1024 + u) makes them exact floats, and one
// packed FMA removes the offset and the code bias. So step (q, h) of word q uses nibble pairs (2h, 2h+4) and
// (2h+1, 2h+5), i.e. K slots {2t, 2t+1} <- columns (8q+2h, 8q+2h+4) and {2t+8, 2t+9} <- (8q+2h+1, 8q+2h+5) of
// the lane's 32 columns, and the B registers take x at the same columns (one PRMT each).
//
// CTA: WARPS warps over the same 16*R rows; the 128-column chunks of the CTA's K range (blockIdx.y splits K
// across CTAs) are dealt to the warps round-robin; each warp loads DEPTH chunks (R x 2 rows x 16 bytes per lane,
// plus the INT6 high plane) before it unpacks any, and the many warps per SM keep HBM busy while others compute.
// Partial sums meet in shared memory, then across split-K CTAs through a workspace and a tile counter (the last
// CTA of a tile sums the others', writes Y and resets the counter): no zero fill, no extra launch.
//
// Compile-time parameters (the host prepends #defines): LOWC_HALF (1 = fp16, else bf16), LOWC_BITS (4 or 6),
// LOWC_R (16-row tiles per CTA), LOWC_NT (8-token tiles), LOWC_WARPS, LOWC_DEPTH, LOWC_PER_CHANNEL,
// LOWC_CODE_OFFSET (the packed 16-bit pair that turns "0x4300|u" into the signed code: -(128 + bias) in bf16,
// -(1024 + bias) in fp16, both halves).

#ifndef LOWC_BITS
#define LOWC_BITS 4
#endif
#ifndef LOWC_R
#define LOWC_R 1
#endif
#ifndef LOWC_NT
#define LOWC_NT 1
#endif
#ifndef LOWC_WARPS
#define LOWC_WARPS 4
#endif
#ifndef LOWC_DEPTH
#define LOWC_DEPTH 2
#endif
#ifndef LOWC_PER_CHANNEL
#define LOWC_PER_CHANNEL 0
#endif
#ifndef LOWC_A8
#define LOWC_A8 0  // 1: int8 activation codes with per-token scales, mma.sync m16n8k32 s8, int32 per chunk
#endif

#if LOWC_HALF
#define LOWC_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#define LOWC_FMA2 "fma.rn.f16x2 "
#define LOWC_MAGIC 0x64006400u
#define LOWC_ONE2 0x3C003C00u
#ifndef LOWC_CODE_OFFSET
#define LOWC_CODE_OFFSET 0xE408E408u  // -1032 = -(1024 + 8), INT4
#endif
#else
#define LOWC_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#define LOWC_FMA2 "fma.rn.bf16x2 "
#define LOWC_MAGIC 0x43004300u
#define LOWC_ONE2 0x3F803F80u
#ifndef LOWC_CODE_OFFSET
#define LOWC_CODE_OFFSET 0xC308C308u  // -136 = -(128 + 8), INT4
#endif
#endif

#define R_TILES LOWC_R
#define NT LOWC_NT
#define WARPS LOWC_WARPS
#define DEPTH LOWC_DEPTH

static __device__ __forceinline__ void lowc_mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(LOWC_MMA "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (a & mask) | c in one LOP3 (truth table 0xEA = (A & B) | C)
static __device__ __forceinline__ u32 lowc_and_or(u32 a, u32 mask, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(c));
    return d;
}

static __device__ __forceinline__ u32 lowc_prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// two exact 16-bit floats 128 + u (bf16) / 1024 + u (fp16) -> the signed codes u - bias
static __device__ __forceinline__ u32 lowc_unbias(u32 v) {
    u32 d;
    asm(LOWC_FMA2 "%0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(LOWC_ONE2), "r"(LOWC_CODE_OFFSET));
    return d;
}

static __device__ __forceinline__ float lowc_f16_to_float(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

#if LOWC_BITS == 6
static __device__ __forceinline__ uint2 lowc_ld_stream2(const uint2* p) {
    uint2 r;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}
#endif

// every element of a register array set to v / the elements of b added (unrolled: the arrays stay in registers)
template <typename T, int A, int B, int C>
static __device__ __forceinline__ void lowc_fill(T (&a)[A][B][C], T v) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int k = 0; k < C; ++k) a[i][j][k] = v;
}

template <typename T, int A, int B, int C, int D>
static __device__ __forceinline__ void lowc_fill(T (&a)[A][B][C][D], T v) {
#pragma unroll
    for (int i = 0; i < A; ++i) lowc_fill(a[i], v);
}

template <int A, int B, int C, int D>
static __device__ __forceinline__ void lowc_add(float (&a)[A][B][C][D], const int (&b)[A][B][C][D]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int k = 0; k < C; ++k)
#pragma unroll
                for (int l = 0; l < D; ++l) a[i][j][k][l] += (float)b[i][j][k][l];
}

// W 32-bit words (64 or 32 bytes) of x per 8-token tile: token 8n + g's row from p (row stride ldx bytes), zeros
// for tokens >= T (their lanes load nothing)
template <int W>
static __device__ __forceinline__ void lowc_load_x(u32 (&xr)[NT][W], const unsigned char* p, i64 ldx, int T, int g) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int tok = 8 * n + g;
        if (tok < T) {
            const uint4* xp = reinterpret_cast<const uint4*>(p + (size_t)tok * (size_t)ldx);
#pragma unroll
            for (int v = 0; v < W / 4; ++v) {
                const uint4 xv = __ldg(xp + v);
                xr[n][4 * v] = xv.x; xr[n][4 * v + 1] = xv.y; xr[n][4 * v + 2] = xv.z; xr[n][4 * v + 3] = xv.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < W; ++j) xr[n][j] = 0u;
        }
    }
}

static __device__ __forceinline__ u32 lowc_word(const uint4& v, int q) {
    return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

// A registers of step (q, h) for one row from its code word (and INT6 high crumbs): nibble pairs (2h, 2h+4)
// -> K slots {2t, 2t+1}, (2h+1, 2h+5) -> {2t+8, 2t+9}.
static __device__ __forceinline__ void lowc_unpack_pairs(u32 w, u32 hp, int h, u32& lo, u32& hi) {
    const u32 m = 0x000F000Fu;
    u32 p0 = lowc_and_or(w >> (8 * h), m, LOWC_MAGIC);
    u32 p1 = lowc_and_or(w >> (8 * h + 4), m, LOWC_MAGIC);
#if LOWC_BITS == 6
    // hp holds this word's 8 high crumbs as bytes 0 (columns 0-3) and 2 (columns 4-7) of a 32-bit word, the
    // others zero: crumb i of a byte sits at bits 2i and must land at bits 4-5 of its 16-bit half
    const u32 mh = 0x00300030u;
    p0 = lowc_and_or(h ? hp : hp << 4, mh, p0);
    p1 = lowc_and_or(h ? hp >> 2 : hp << 2, mh, p1);
#endif
    lo = lowc_unbias(p0);
    hi = lowc_unbias(p1);
}

#if LOWC_A8
// D += A(16x32 s8) * B(32x8 s8), int32
static __device__ __forceinline__ void lowc_mma_s8(int* d, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// signed int8 codes of one word (8 columns) of one row: even columns 2i -> byte i of `even`, odd -> `odd`.
// hn (INT6): byte i = the high crumbs of columns 2i (bits 0-1) and 2i+1 (bits 2-3). Biased u <= 63 + bias: adding
// 128 - bias per byte never carries, and XOR 0x80 turns u + 128 - bias into the two's complement of u - bias.
static __device__ __forceinline__ void lowc_unpack_bytes(u32 w, u32 hn, u32& even, u32& odd) {
    const u32 m = 0x0F0F0F0Fu;
#if LOWC_BITS == 6
    const u32 lo = lowc_and_or(hn << 4, 0x30303030u, w & m);
    const u32 hi = lowc_and_or(hn << 2, 0x30303030u, (w >> 4) & m);
    const u32 add = 0x60606060u;  // 128 - 32
#else
    const u32 lo = w & m, hi = (w >> 4) & m;
    const u32 add = 0x78787878u;  // 128 - 8
#endif
    even = (lo + add) ^ 0x80808080u;
    odd = (hi + add) ^ 0x80808080u;
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32)
lowc_wa16_decode(const void* __restrict__ x_,     // X [T, >= k_pad] 16-bit (A8: int8 codes), row stride ldx
                 const float* __restrict__ xs,     // A8: per-token scales [T]
                 const uint4* __restrict__ codes,  // [N, k_pad/2] bytes, row stride ldc bytes
                 const uint2* __restrict__ high,   // INT6: [N, k_pad/4] bytes, row stride ldh bytes
                 const u16* __restrict__ scales,   // fp16 [groups, lds]
                 const u16* __restrict__ bias,     // [N] or unused
                 u16* __restrict__ y,              // [T, N], row stride ldy
                 float* __restrict__ ws,           // split-K: [gridDim.y, T, N] fp32 partials (no init needed)
                 int* __restrict__ counters,       // split-K: [gridDim.x], zero; left zero on exit
                 i64 T_, i64 N_, i64 nchunks_, i64 ldx_, i64 ldc_, i64 ldh_, i64 lds_, i64 ldy_,
                 i64 group_chunks_, i64 chunks_per_split_, i64 has_bias_) {
    const int T = (int)T_, N = (int)N_, nchunks = (int)nchunks_;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * (16 * R_TILES);
    const int c_begin = blockIdx.y * (int)chunks_per_split_;
    const int c_end = min(c_begin + (int)chunks_per_split_, nchunks);

    // this lane's rows: row0 + 16r + g + 8s (s = 0, 1); absent rows read row 0 and are never stored
    const unsigned char* crow[R_TILES][2];
#if LOWC_BITS == 6
    const unsigned char* hrow[R_TILES][2];
#endif
    bool row_ok[R_TILES][2];
#pragma unroll
    for (int r = 0; r < R_TILES; ++r)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int row = row0 + 16 * r + g + 8 * s;
            row_ok[r][s] = row < N;
            const int rr = row < N ? row : 0;
            crow[r][s] = reinterpret_cast<const unsigned char*>(codes) + (size_t)rr * (size_t)ldc_ + 16 * t;
#if LOWC_BITS == 6
            hrow[r][s] = reinterpret_cast<const unsigned char*>(high) + (size_t)rr * (size_t)ldh_ + 8 * t;
#endif
        }

    float acc[R_TILES][NT][4];
    lowc_fill(acc, 0.f);

    for (int c0 = c_begin + warp; c0 < c_end; c0 += WARPS * DEPTH) {
        uint4 wc[DEPTH][R_TILES][2];
#if LOWC_BITS == 6
        uint2 wh[DEPTH][R_TILES][2];
#endif
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int c = c0 + d * WARPS;
#pragma unroll
            for (int r = 0; r < R_TILES; ++r)
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    if (c < c_end) {
                        wc[d][r][s] = lowc_ld_stream(reinterpret_cast<const uint4*>(crow[r][s] + (size_t)c * 64));
#if LOWC_BITS == 6
                        wh[d][r][s] = lowc_ld_stream2(reinterpret_cast<const uint2*>(hrow[r][s] + (size_t)c * 32));
#endif
                    } else {
                        wc[d][r][s] = make_uint4(0, 0, 0, 0);
#if LOWC_BITS == 6
                        wh[d][r][s] = make_uint2(0, 0);
#endif
                    }
                }
        }
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int c = c0 + d * WARPS;
            if (c >= c_end) break;
#if LOWC_A8
            // int8 codes of token 8n + g at this lane's 32 columns: xr[n][j] = columns 4j .. 4j+3
            u32 xr[NT][8];
            lowc_load_x<8>(xr, reinterpret_cast<const unsigned char*>(x_) + c * 128 + 32 * t, ldx_, T, g);
            int ipart[R_TILES][NT][2][4];  // int32 sums of the chunk, two chains (even / odd words)
            lowc_fill(ipart, 0);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // one k32 step per code word: even columns 8q + 2i -> K slots 4t + i, odd ones -> 4t + 16 + i
                u32 b0[NT], b1[NT];
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    b0[n] = lowc_prmt(xr[n][2 * q], xr[n][2 * q + 1], 0x6420u);
                    b1[n] = lowc_prmt(xr[n][2 * q], xr[n][2 * q + 1], 0x7531u);
                }
#pragma unroll
                for (int r = 0; r < R_TILES; ++r) {
                    u32 a[4];
#pragma unroll
                    for (int s2 = 0; s2 < 2; ++s2) {
#if LOWC_BITS == 6
                        const u32 hw = (q < 2) ? wh[d][r][s2].x : wh[d][r][s2].y;
                        const u32 hb = lowc_prmt(hw, 0u, (q & 1) ? 0x3322u : 0x1100u);  // bytes b0 b0 b1 b1
                        const u32 hn = lowc_and_or(hb, 0x000F000Fu, (hb >> 4) & 0x0F000F00u);  // byte i = nibble i
#else
                        const u32 hn = 0u;
#endif
                        lowc_unpack_bytes(lowc_word(wc[d][r][s2], q), hn, a[s2], a[2 + s2]);
                    }
#pragma unroll
                    for (int n = 0; n < NT; ++n) lowc_mma_s8(ipart[r][n][q & 1], a, b0[n], b1[n]);
                }
            }
            float part[R_TILES][NT][2][4];
            lowc_fill(part, 0.f);
            lowc_add(part, ipart);
#else
            // x of token 8n + g at this lane's 32 columns: xr[n][j] = columns (2j, 2j+1)
            u32 xr[NT][16];
            lowc_load_x<16>(xr, reinterpret_cast<const unsigned char*>(x_) + 2 * (c * 128 + 32 * t), 2 * ldx_, T, g);
            float part[R_TILES][NT][2][4];  // two accumulators per tile (steps h = 0 / 1): shorter MMA chains
            lowc_fill(part, 0.f);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                u32 hq[R_TILES][2];
#pragma unroll
                for (int r = 0; r < R_TILES; ++r)
#pragma unroll
                    for (int s = 0; s < 2; ++s) {
#if LOWC_BITS == 6
                        // word q's crumbs: bytes 2q, 2q+1 of the lane's 8 high bytes -> bytes 0 and 2
                        const u32 hw = (q < 2) ? wh[d][r][s].x : wh[d][r][s].y;
                        hq[r][s] = lowc_prmt(hw, 0u, (q & 1) ? 0x4342u : 0x4140u);
#else
                        hq[r][s] = 0u;
#endif
                    }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // B: x at columns (8q+2h, 8q+2h+4) and (8q+2h+1, 8q+2h+5)
                    u32 b0[NT], b1[NT];
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        b0[n] = lowc_prmt(xr[n][4 * q + h], xr[n][4 * q + 2 + h], 0x5410u);
                        b1[n] = lowc_prmt(xr[n][4 * q + h], xr[n][4 * q + 2 + h], 0x7632u);
                    }
#pragma unroll
                    for (int r = 0; r < R_TILES; ++r) {
                        u32 a[4];
                        lowc_unpack_pairs(lowc_word(wc[d][r][0], q), hq[r][0], h, a[0], a[2]);
                        lowc_unpack_pairs(lowc_word(wc[d][r][1], q), hq[r][1], h, a[1], a[3]);
#pragma unroll
                        for (int n = 0; n < NT; ++n) lowc_mma(part[r][n][h], a, b0[n], b1[n]);
                    }
                }
            }
#endif
#if LOWC_PER_CHANNEL
#pragma unroll
            for (int r = 0; r < R_TILES; ++r)
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[r][n][i] += part[r][n][0][i] + part[r][n][1][i];
#else
            const u16* srow = scales + (size_t)(c / (int)group_chunks_) * (size_t)lds_ + row0 + g;
#pragma unroll
            for (int r = 0; r < R_TILES; ++r) {
                const float s0 = row_ok[r][0] ? lowc_f16_to_float(__ldg(srow + 16 * r)) : 0.f;
                const float s1 = row_ok[r][1] ? lowc_f16_to_float(__ldg(srow + 16 * r + 8)) : 0.f;
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        acc[r][n][i] += (part[r][n][0][i] + part[r][n][1][i]) * (i < 2 ? s0 : s1);
            }
#endif
        }
    }

    // acc[r][n][i] is row row0 + 16r + g + 8(i >> 1), token 8n + 2t + (i & 1): sum over the warps in shared memory
    constexpr int E = R_TILES * NT * 4;
    __shared__ float red[WARPS][E][32];
#pragma unroll
    for (int r = 0; r < R_TILES; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][(r * NT + n) * 4 + i][lane] = acc[r][n][i];
    __syncthreads();
    const int splits = gridDim.y;
    const size_t plane = (size_t)T * (size_t)N;
    float out[(E * 32 + WARPS * 32 - 1) / (WARPS * 32)];
#pragma unroll
    for (int j = 0; j < (int)(sizeof(out) / sizeof(float)); ++j) {
        const int idx = threadIdx.x + j * WARPS * 32;
        float v = 0.f;
        if (idx < E * 32) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) v += red[w][idx >> 5][idx & 31];
        }
        out[j] = v;
    }
    // element idx = threadIdx.x + j * blockDim.x of the reduced tile -> (row, token), valid inside Y
    constexpr int J = (E * 32 + WARPS * 32 - 1) / (WARPS * 32);
    int rows[J], toks[J];
    bool ok[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int idx = threadIdx.x + j * WARPS * 32;
        const int e = idx >> 5, l = idx & 31;
        const int i = e & 3, n = (e >> 2) % NT, r = (e >> 2) / NT;
        rows[j] = row0 + 16 * r + (l >> 2) + 8 * (i >> 1);
        toks[j] = 8 * n + 2 * (l & 3) + (i & 1);
        ok[j] = idx < E * 32 && rows[j] < N && toks[j] < T;
    }
    if (splits > 1) {
#pragma unroll
        for (int j = 0; j < J; ++j)
            if (ok[j]) ws[blockIdx.y * plane + (size_t)toks[j] * N + rows[j]] = out[j];
        __threadfence();
        __syncthreads();
        __shared__ int s_last;
        if (threadIdx.x == 0) s_last = (atomicAdd(counters + blockIdx.x, 1) == splits - 1);
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int j = 0; j < J; ++j) {
            if (!ok[j]) continue;
            for (int z = 0; z < splits; ++z)
                if (z != (int)blockIdx.y) out[j] += lowc_ld_cg(ws + z * plane + (size_t)toks[j] * N + rows[j]);
        }
        if (threadIdx.x == 0) counters[blockIdx.x] = 0;
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
        if (!ok[j]) continue;
        float v = out[j];
#if LOWC_PER_CHANNEL
        v *= lowc_f16_to_float(scales[rows[j]]);
#endif
#if LOWC_A8
        v *= xs[toks[j]];
#endif
        if (has_bias_) v += lowc_to_float(bias[rows[j]]);
        y[(size_t)toks[j] * (size_t)ldy_ + rows[j]] = lowc_from_float(v);
    }
}
