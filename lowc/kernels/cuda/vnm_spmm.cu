// lowc V:N:M sparse GEMM on sparse tensor cores: Y[T, R] = X[T, K] . W^T (+ bias), W V:N:M sparse.
//
// Computes Y^T = W . X^T with W as the 2:4-sparse operand A of
//   mma.sp{::ordered_metadata}.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
// Per V-row block, the block's kept columns of X (4 of every M, K' = 4*Kb "gathered" columns) are gathered into
// shared memory, token-major ([token][gathered column], the "col" B operand), and over them every row of W is
// exactly 2:4 sparse. The weight comes in the kernel layout of lowc/kernels/vnm_layout.py:
//   vals  [Rp/16][KP][32 lanes] uint4: lane 4g+t's A registers {a0a1 row g, a2a3 row g+8} of two k16 steps
//   meta  [Rp/16][KP][8] uint2: the metadata words (sparsity selector 0) of the two k16 steps for quad g
//   cols  [Rp/V][32*KP] int32: absolute gathered column indices (>= K reads as 0)
// with KP = kb_pad/8 pairs of k16 steps (32 gathered columns each).
//
// CTA: WR x WT warps. Warp (wr, wt) owns rows 16*(blockIdx.x*WR + wr) .. +15 and tokens
// blockIdx.y*BT + wt*8*NT .. +8*NT-1 (NT n-tiles of 8 tokens). All WR*16 rows of a CTA lie in one V-row block
// (the host picks WR so that 16*WR divides V), so the CTA gathers one X tile [BT][KC] per K chunk and every warp
// reuses it. K is walked in chunks of KC = 32*KCP gathered columns, software-pipelined through registers: the
// weight fragments (one coalesced 16-byte load per lane per 2 k16 steps, in fragment order, past L1) and the
// gathered x values of chunk c+1 are in flight while chunk c computes. blockIdx.z splits the chunks (split-K);
// the last CTA of a tile to finish sums the fp32 partials of the others (see the epilogue).
//
// Two ways to stage X (LOWC_XT):
//   0: x is X [T, K] (row stride ldx); the gather reads 4 scalar 16-bit values per column block and stores the
//      tile token-major, sx[token][gathered column]; B fragments are two 32-bit shared loads (decode path).
//   1: x is X^T [K, ldx] (tokens contiguous, ldx >= T a multiple of 8, columns T..ldx-1 zero), transposed by the
//      host; the gather copies 16-byte runs of 8 tokens of each kept row, sxt[gathered column][token], and
//      ldmatrix.x4.trans turns them into the B fragments of two n-tiles (prefill path, needs NT even).
//
// Compile-time parameters (the host prepends #defines): LOWC_HALF (1 = fp16, else bf16), LOWC_WR, LOWC_WT,
// LOWC_NT, LOWC_KCP, LOWC_XT, LOWC_MINB, LOWC_ORDERED (1: mma.sp::ordered_metadata, PTX ISA >= 8.5; lowc's metadata is
// ascending so both forms read it the same). No headers: the host prepends common.cuh (types, conversions) and
// NVRTC compiles the whole without include paths.

#ifndef LOWC_WR
#define LOWC_WR 4
#endif
#ifndef LOWC_WT
#define LOWC_WT 1
#endif
#ifndef LOWC_NT
#define LOWC_NT 2
#endif
#ifndef LOWC_KCP
#define LOWC_KCP 4
#endif
#ifndef LOWC_ORDERED
#define LOWC_ORDERED 1
#endif
#ifndef LOWC_XT
#define LOWC_XT 0
#endif
#ifndef LOWC_MINB
#define LOWC_MINB 1  // __launch_bounds__ min blocks per SM: caps registers at 64K / (threads * MINB)
#endif


#define LOWC_STR2(x) #x
#define LOWC_STR(x) LOWC_STR2(x)
#if LOWC_HALF
#define LOWC_AB "f16"
#else
#define LOWC_AB "bf16"
#endif
#if LOWC_ORDERED
#define LOWC_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k16.row.col.f32." LOWC_AB "." LOWC_AB ".f32 "
#else
#define LOWC_MMA_SP "mma.sp.sync.aligned.m16n8k16.row.col.f32." LOWC_AB "." LOWC_AB ".f32 "
#endif

// D += A(16x16, 2:4 sparse: a0a1 / a2a3 compressed) * B(16x8), metadata e, sparsity selector 0.
static __device__ __forceinline__ void lowc_mma_sp(float* d, u32 a0, u32 a1, u32 b0, u32 b1, u32 e) {
    asm volatile(LOWC_MMA_SP "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
}

#define WR LOWC_WR
#define WT LOWC_WT
#define NT LOWC_NT
#define KCP LOWC_KCP
#define KC (32 * KCP)         // gathered columns per chunk
#define BT (8 * NT * WT)      // tokens per CTA
#define LDS (KC + 8)          // token-major row stride (16-bit elements): 4g + t bank pattern, no conflicts
#define LDT (BT + 8)          // column-major (XT) row stride: 8 ldmatrix rows hit distinct 16-byte bank groups
#if LOWC_XT
#define SX_ELEMS (KC * LDT)
#if NT % 2
#error "LOWC_XT needs an even LOWC_NT"
#endif
#else
#define SX_ELEMS (BT * LDS)
#endif

#if LOWC_XT
static __device__ __forceinline__ void lowc_ldmatrix_x4_trans(u32* r, const u16* p) {
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
#endif

#ifndef LOWC_INT8
#define LOWC_INT8 0
#endif

#if !LOWC_INT8
extern "C" __global__ void __launch_bounds__(WR * WT * 32, LOWC_MINB)
lowc_vnm_spmm(const u16* __restrict__ x,      // X [T, K] (row stride ldx), or X^T [K, ldx] when LOWC_XT
              const uint4* __restrict__ vals,  // [Rp/16, KP, 32]
              const uint2* __restrict__ meta,  // [Rp/16, KP, 8]
              const int* __restrict__ cols,    // [Rp/V, 32*KP]
              const u16* __restrict__ bias,    // [R] or unused
              u16* __restrict__ y,             // [T, R], row stride ldy
              float* __restrict__ ws,          // split-K: [gridDim.z, T, R] fp32 partial sums (no init needed)
              int* __restrict__ counters,      // split-K: [gridDim.x * gridDim.y], zero; left zero on exit
              i64 T_, i64 K_, i64 R_, i64 V_, i64 KP_, i64 ldx_, i64 ldy_, i64 chunks_per_split_,
              i64 has_bias_) {
    const int T = (int)T_, K = (int)K_, R = (int)R_, V = (int)V_, KP = (int)KP_;
    const int chunks_per_split = (int)chunks_per_split_;
    __shared__ __align__(16) u16 sx[SX_ELEMS];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp % WR, wt = warp / WR;
    const int g = lane >> 2, t = lane & 3;
    const int rt = blockIdx.x * WR + wr;                 // this warp's 16-row tile
    const int vb = (blockIdx.x * WR * 16) / V;           // the CTA's V-row block
    const int tok0 = blockIdx.y * BT;
    const int nchunks = KP / KCP;
    const int c_begin = blockIdx.z * chunks_per_split;
    const int c_end = min(c_begin + chunks_per_split, nchunks);

    const int* colv = cols + (size_t)vb * (32 * KP);
    const uint4* vrow = vals + (size_t)rt * KP * 32 + lane;
    const uint2* mrow = meta + (size_t)rt * KP * 8 + g;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

    // Software pipeline over K chunks: the weight fragments and the gathered x values of chunk c+1 are loaded
    // into registers while chunk c computes, so global latency overlaps the MMAs; shared memory holds one chunk.
    constexpr int NTH = WR * WT * 32;
#if LOWC_XT
    constexpr int G_ITEMS = KC * (BT / 8);  // 16 bytes (8 tokens of one kept column) per item
    typedef uint4 gvec;
#else
    constexpr int G_ITEMS = BT * (KC / 4);  // 4 gathered columns (one column block) of one token per item
    typedef uint2 gvec;
#endif
    constexpr int GI = (G_ITEMS + NTH - 1) / NTH;

    auto load_weights = [&](int c, uint4* a, uint2* e) {
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
            a[p] = lowc_ld_stream(vrow + (size_t)(c * KCP + p) * 32);
            e[p] = __ldg(mrow + (size_t)(c * KCP + p) * 8);
        }
    };
    auto gather_load = [&](int c, gvec* gv) {
#pragma unroll
        for (int j = 0; j < GI; ++j) {
            const int i = threadIdx.x + j * NTH;
#if LOWC_XT
            uint4 v = make_uint4(0, 0, 0, 0);
            if (i < G_ITEMS) {
                const int kk = i / (BT / 8), vq = i % (BT / 8);
                const int col = __ldg(colv + c * KC + kk);
                const int tok = tok0 + 8 * vq;
                if (col < K && tok + 8 <= (int)ldx_)
                    v = __ldg(reinterpret_cast<const uint4*>(x + (size_t)col * (size_t)ldx_ + tok));
            }
            gv[j] = v;
#else
            u32 v0 = 0, v1 = 0, v2 = 0, v3 = 0;
            if (i < G_ITEMS) {
                const int tk = i / (KC / 4), q = i % (KC / 4);
                const int tok = tok0 + tk;
                if (tok < T) {
                    const int4 ci = __ldg(reinterpret_cast<const int4*>(colv + c * KC + 4 * q));
                    const u16* xr = x + (size_t)tok * (size_t)ldx_;
                    if (ci.x < K) v0 = __ldg(xr + ci.x);
                    if (ci.y < K) v1 = __ldg(xr + ci.y);
                    if (ci.z < K) v2 = __ldg(xr + ci.z);
                    if (ci.w < K) v3 = __ldg(xr + ci.w);
                }
            }
            gv[j] = make_uint2(v0 | (v1 << 16), v2 | (v3 << 16));
#endif
        }
    };
    auto gather_store = [&](const gvec* gv) {
#pragma unroll
        for (int j = 0; j < GI; ++j) {
            const int i = threadIdx.x + j * NTH;
            if (i < G_ITEMS) {
#if LOWC_XT
                const int kk = i / (BT / 8), vq = i % (BT / 8);
                *reinterpret_cast<uint4*>(sx + kk * LDT + 8 * vq) = gv[j];
#else
                const int tk = i / (KC / 4), q = i % (KC / 4);
                *reinterpret_cast<uint2*>(sx + tk * LDS + 4 * q) = gv[j];
#endif
            }
        }
    };

    uint4 a[KCP], an[KCP];
    uint2 e[KCP], en[KCP];
    gvec gv[GI];
#pragma unroll
    for (int p = 0; p < KCP; ++p) {
        an[p] = make_uint4(0, 0, 0, 0);
        en[p] = make_uint2(0, 0);
    }
    if (c_begin < c_end) {
        load_weights(c_begin, a, e);
        gather_load(c_begin, gv);
    }
    for (int c = c_begin; c < c_end; ++c) {
        __syncthreads();  // every warp is done reading the previous chunk's tile
        gather_store(gv);
        __syncthreads();
        if (c + 1 < c_end) {  // next chunk's loads fly while this one computes
            load_weights(c + 1, an, en);
            gather_load(c + 1, gv);
        }
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
#pragma unroll
            for (int ktl = 0; ktl < 2; ++ktl) {
                const u32 a01 = ktl ? a[p].z : a[p].x;
                const u32 a23 = ktl ? a[p].w : a[p].y;
                const u32 em = ktl ? e[p].y : e[p].x;
#if LOWC_XT
                // lane l addresses row (l & 7) of matrix l >> 3: matrices (k 0-7, n), (k 8-15, n), (k 0-7, n+1),
                // (k 8-15, n+1) -> registers {b0b1, b2b3} of n-tile n, then of n-tile n+1
                const int krow = p * 32 + ktl * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    u32 b[4];
                    lowc_ldmatrix_x4_trans(b, sx + krow * LDT + (wt * NT + n + (lane >> 4)) * 8);
                    lowc_mma_sp(acc[n], a01, a23, b[0], b[1], em);
                    lowc_mma_sp(acc[n + 1], a01, a23, b[2], b[3], em);
                }
#else
                const int kcol = p * 32 + ktl * 16 + 2 * t;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const u16* sb = sx + ((wt * NT + n) * 8 + g) * LDS + kcol;
                    const u32 b0 = *reinterpret_cast<const u32*>(sb);
                    const u32 b1 = *reinterpret_cast<const u32*>(sb + 8);
                    lowc_mma_sp(acc[n], a01, a23, b0, b1, em);
                }
#endif
            }
        }
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
            a[p] = an[p];
            e[p] = en[p];
        }
    }

    // epilogue: acc[n][i] is row 16*rt + g + 8*(i >> 1), token tok0 + (wt*NT + n)*8 + 2t + (i & 1).
    // Split-K: every CTA stores its partial sums to ws[blockIdx.z]; the last CTA of a tile to finish (counted
    // with an atomic after a fence) adds the others' partials to its own, then writes the output and resets
    // the tile's counter for the next launch (the threadFenceReduction pattern: no zeroing pass, no extra launch).
    const int splits = gridDim.z;
    if (splits > 1) {
        const size_t plane = (size_t)T * (size_t)R;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rt * 16 + g + 8 * (i >> 1);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
                if (row < R && tok < T) ws[blockIdx.z * plane + (size_t)tok * R + row] = acc[n][i];
            }
        }
        __threadfence();
        __syncthreads();
        __shared__ int s_last;
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) s_last = (atomicAdd(counters + tile, 1) == splits - 1);
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rt * 16 + g + 8 * (i >> 1);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
                if (row >= R || tok >= T) continue;
                for (int z = 0; z < splits; ++z)
                    if (z != (int)blockIdx.z) acc[n][i] += lowc_ld_cg(ws + z * plane + (size_t)tok * R + row);
            }
        }
        if (threadIdx.x == 0) counters[tile] = 0;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = rt * 16 + g + 8 * (i >> 1);
        if (row >= R) continue;
        const float b = has_bias_ ? lowc_to_float(bias[row]) : 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
            if (tok >= T) continue;
            y[(size_t)tok * (size_t)ldy_ + row] = lowc_from_float(acc[n][i] + b);
        }
    }
}
#endif  // !LOWC_INT8

#if LOWC_INT8
// INT8 variant: Y = diag(xs) . (Xq . Wq^T) . diag(ws) (+ bias) with int8 activation codes Xq [T, K] (per-token
// scales xs) and int8 weight codes (per-row scales ws), on
//   mma.sp{::ordered_metadata}.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (int32 accumulation).
// Layout (vnm_layout.to_vnm_int8_layout): vals [Rp/16][KP][32 lanes] uint4 = {row g, row g+8} A registers of two
// k32 steps; meta [Rp/16][KP][8 quads][2 lanes 4g+h] uint2 = the two steps' words for that lane; KP = kb_pad/16
// pairs of k32 steps (64 gathered columns). X is gathered token-major as bytes; B registers are the 4 codes at
// gathered columns 4t..4t+3 and 4t+16..4t+19 of token g. Same CTA / split-K / pipelining scheme as above.
// LOWC_GP > 0: group-wise weight scales instead of per-row ones, one per LOWC_GP k32-step pairs (32*GP kept values
// of a row) in wsc [groups][Rp]: the int32 sums of a group are scaled into fp32 accumulators when the group (or
// the CTA's share of it) ends, and split-K partials are fp32.
#if LOWC_ORDERED
#define LOWC_MMA_SP_S8 "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
#else
#define LOWC_MMA_SP_S8 "mma.sp.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
#endif
#ifndef LOWC_GP
#define LOWC_GP 0
#endif
#if LOWC_GP
typedef float part_t;
#else
typedef int part_t;
#endif
#define KC8 (64 * KCP)   // gathered columns (bytes) per chunk
#define LDS8 (KC8 + 16)  // byte stride of a token row: (KC8 + 16) / 4 words = 4 (mod 32) -> 4g + t banks

static __device__ __forceinline__ void lowc_mma_sp_s8(int* d, u32 a0, u32 a1, u32 b0, u32 b1, u32 e) {
    asm volatile(LOWC_MMA_SP_S8 "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
}

static __device__ __forceinline__ int lowc_ld_part(const int* p) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ float lowc_ld_part(const float* p) { return lowc_ld_cg(p); }

extern "C" __global__ void __launch_bounds__(WR * WT * 32, LOWC_MINB)
lowc_vnm_spmm_s8(const unsigned char* __restrict__ x,  // Xq [T, K] int8 codes, row stride ldx
                 const uint4* __restrict__ vals,        // [Rp/16, KP, 32]
                 const uint2* __restrict__ meta,        // [Rp/16, KP, 8, 2]
                 const int* __restrict__ cols,          // [Rp/V, 64*KP]
                 const float* __restrict__ xs,          // [T] token scales
                 const float* __restrict__ wsc,         // [Rp] row scales, or [groups][Rp] with LOWC_GP
                 const u16* __restrict__ bias,          // [R] or unused
                 u16* __restrict__ y,                   // [T, R], row stride ldy
                 part_t* __restrict__ ws,               // split-K: [gridDim.z, T, R] partial sums
                 int* __restrict__ counters,            // split-K: [gridDim.x * gridDim.y], zero; left zero
                 i64 T_, i64 K_, i64 R_, i64 V_, i64 KP_, i64 ldx_, i64 ldy_, i64 chunks_per_split_,
                 i64 has_bias_, i64 R_pad_) {
    const int T = (int)T_, K = (int)K_, R = (int)R_, V = (int)V_, KP = (int)KP_;
    const int chunks_per_split = (int)chunks_per_split_;
    __shared__ __align__(16) unsigned char sx[BT * LDS8];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wr = warp % WR, wt = warp / WR;
    const int g = lane >> 2, t = lane & 3;
    const int rt = blockIdx.x * WR + wr;
    const int vb = (blockIdx.x * WR * 16) / V;
    const int tok0 = blockIdx.y * BT;
    const int nchunks = KP / KCP;
    const int c_begin = blockIdx.z * chunks_per_split;
    const int c_end = min(c_begin + chunks_per_split, nchunks);

    const int* colv = cols + (size_t)vb * (64 * KP);
    const uint4* vrow = vals + (size_t)rt * KP * 32 + lane;
    const uint2* mrow = meta + ((size_t)rt * KP * 8 + g) * 2 + (t & 1);

    int acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0;
#if LOWC_GP
    float accf[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) accf[n][i] = 0.f;
    const int rg = rt * 16 + g;  // this lane's rows rg, rg + 8 (< Rp: scales are padded)
    const int p_end = c_end * KCP;  // the CTA's last pair + 1: a group cut by the split is flushed here
    auto flush = [&](int pair) {  // scale the int32 sums of the group holding `pair` into accf
        const float* sg = wsc + (size_t)(pair / LOWC_GP) * (size_t)R_pad_ + rg;
        const float s0 = __ldg(sg), s1 = __ldg(sg + 8);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                accf[n][i] += (float)acc[n][i] * (i < 2 ? s0 : s1);
                acc[n][i] = 0;
            }
    };
#endif

    constexpr int NTH = WR * WT * 32;
    constexpr int G_ITEMS = BT * (KC8 / 4);
    constexpr int GI = (G_ITEMS + NTH - 1) / NTH;

    auto load_weights = [&](int c, uint4* a, uint2* e) {
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
            a[p] = lowc_ld_stream(vrow + (size_t)(c * KCP + p) * 32);
            e[p] = __ldg(mrow + (size_t)(c * KCP + p) * 16);
        }
    };
    auto gather_load = [&](int c, u32* gv) {
#pragma unroll
        for (int j = 0; j < GI; ++j) {
            const int i = threadIdx.x + j * NTH;
            u32 v = 0;
            if (i < G_ITEMS) {
                const int tk = i / (KC8 / 4), q = i % (KC8 / 4);
                const int tok = tok0 + tk;
                if (tok < T) {
                    const int4 ci = __ldg(reinterpret_cast<const int4*>(colv + c * KC8 + 4 * q));
                    const unsigned char* xr = x + (size_t)tok * (size_t)ldx_;
                    const u32 v0 = ci.x < K ? (u32)__ldg(xr + ci.x) : 0u;
                    const u32 v1 = ci.y < K ? (u32)__ldg(xr + ci.y) : 0u;
                    const u32 v2 = ci.z < K ? (u32)__ldg(xr + ci.z) : 0u;
                    const u32 v3 = ci.w < K ? (u32)__ldg(xr + ci.w) : 0u;
                    v = v0 | (v1 << 8) | (v2 << 16) | (v3 << 24);
                }
            }
            gv[j] = v;
        }
    };
    auto gather_store = [&](const u32* gv) {
#pragma unroll
        for (int j = 0; j < GI; ++j) {
            const int i = threadIdx.x + j * NTH;
            if (i < G_ITEMS) {
                const int tk = i / (KC8 / 4), q = i % (KC8 / 4);
                *reinterpret_cast<u32*>(sx + tk * LDS8 + 4 * q) = gv[j];
            }
        }
    };

    uint4 a[KCP], an[KCP];
    uint2 e[KCP], en[KCP];
    u32 gv[GI];
#pragma unroll
    for (int p = 0; p < KCP; ++p) {
        an[p] = make_uint4(0, 0, 0, 0);
        en[p] = make_uint2(0, 0);
    }
    if (c_begin < c_end) {
        load_weights(c_begin, a, e);
        gather_load(c_begin, gv);
    }
    for (int c = c_begin; c < c_end; ++c) {
        __syncthreads();
        gather_store(gv);
        __syncthreads();
        if (c + 1 < c_end) {
            load_weights(c + 1, an, en);
            gather_load(c + 1, gv);
        }
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
#pragma unroll
            for (int stl = 0; stl < 2; ++stl) {
                const u32 a0 = stl ? a[p].z : a[p].x;  // row g
                const u32 a1 = stl ? a[p].w : a[p].y;  // row g + 8
                const u32 em = stl ? e[p].y : e[p].x;
                const int kcol = p * 64 + stl * 32 + 4 * t;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const unsigned char* sb = sx + ((wt * NT + n) * 8 + g) * LDS8 + kcol;
                    const u32 b0 = *reinterpret_cast<const u32*>(sb);
                    const u32 b1 = *reinterpret_cast<const u32*>(sb + 16);
                    lowc_mma_sp_s8(acc[n], a0, a1, b0, b1, em);
                }
            }
#if LOWC_GP
            const int pair = c * KCP + p;
            if ((pair + 1) % LOWC_GP == 0 || pair + 1 == p_end) flush(pair);
#endif
        }
#pragma unroll
        for (int p = 0; p < KCP; ++p) {
            a[p] = an[p];
            e[p] = en[p];
        }
    }

#if LOWC_GP
    part_t (&tot)[NT][4] = accf;
#else
    part_t (&tot)[NT][4] = acc;
#endif
    const int splits = gridDim.z;
    if (splits > 1) {
        const size_t plane = (size_t)T * (size_t)R;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rt * 16 + g + 8 * (i >> 1);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
                if (row < R && tok < T) ws[blockIdx.z * plane + (size_t)tok * R + row] = tot[n][i];
            }
        }
        __threadfence();
        __syncthreads();
        __shared__ int s_last;
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) s_last = (atomicAdd(counters + tile, 1) == splits - 1);
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rt * 16 + g + 8 * (i >> 1);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
                if (row >= R || tok >= T) continue;
                for (int z = 0; z < splits; ++z)
                    if (z != (int)blockIdx.z) tot[n][i] += lowc_ld_part(ws + z * plane + (size_t)tok * R + row);
            }
        }
        if (threadIdx.x == 0) counters[tile] = 0;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = rt * 16 + g + 8 * (i >> 1);
        if (row >= R) continue;
        const float b = has_bias_ ? lowc_to_float(bias[row]) : 0.f;
#if LOWC_GP
        const float sr = 1.f;  // applied per group
#else
        const float sr = wsc[row];
#endif
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int tok = tok0 + (wt * NT + n) * 8 + 2 * t + (i & 1);
            if (tok >= T) continue;
            y[(size_t)tok * (size_t)ldy_ + row] = lowc_from_float((float)tot[n][i] * xs[tok] * sr + b);
        }
    }
}
#endif  // LOWC_INT8
