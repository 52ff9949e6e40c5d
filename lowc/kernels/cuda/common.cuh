// Shared by lowc's CUDA kernels; the host puts it after its #defines and before a kernel file (NVRTC compiles
// them as one source, without include paths). LOWC_HALF selects the 16-bit type of activations and outputs:
// 1 = fp16, else bf16.

#ifndef LOWC_HALF
#define LOWC_HALF 0
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

static __device__ __forceinline__ float lowc_to_float(u16 v) {
#if LOWC_HALF
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return __uint_as_float(((u32)v) << 16);
#endif
}

static __device__ __forceinline__ u16 lowc_from_float(float f) {
    u16 v;
#if LOWC_HALF
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
    return v;
}

// Weights are read once: stream them past L1.
static __device__ __forceinline__ uint4 lowc_ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// Other CTAs' split-K partials: read through L2 (never a stale L1 line).
static __device__ __forceinline__ float lowc_ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}
