/*
 * attention.cu: attention of a subset of queries over all keys with the
 * exact causal mask by position (query i sees key j iff k_pos[j] <=
 * q_pos[i]; key positions need not be sorted), GQA, fp32 softmax and
 * accumulators, online softmax over key tiles (flash-attention-2 style).
 * A query that sees no key gets zeros.  Head sizes 64 and 128 are
 * dispatched at compile time.
 *
 * Two kernels:
 *   - kvb_attn_mma: fp16/bf16 on tensor cores (mma.sync m16n8k16, fp32
 *     accumulate).  A block is 4 warps over 64 queries of one query head;
 *     each warp owns 16 query rows and keeps their Q fragments, S = QK^T
 *     tile and O accumulator in registers.  Key tiles of 64 keys are staged
 *     in shared memory (K row-major, V transposed, both padded so fragment
 *     loads are bank-conflict free); P is re-packed from the S accumulator
 *     layout straight into the A operand of P*V.  Tiles whose smallest key
 *     position exceeds every query position of the block are skipped.
 *   - kvb_attn_simt: CUDA cores, any storage type (fp32 uses it; fp16/bf16
 *     fall back to it when the pointers are not 16-byte aligned).  A block
 *     is 4 warps over 16 queries of one head; lanes own keys when scoring
 *     and dims when accumulating.
 */
#include <type_traits>
#include <climits>

#include "common.cuh"

#define KVB_LOG2E 1.4426950408889634f

/* ------------------------------------------------------------------------ */
/* CUDA-core kernel                                                         */
/* ------------------------------------------------------------------------ */

#define KVB_SIMT_WARPS 4
#define KVB_SIMT_QW 4                                   /* queries per warp */
#define KVB_SIMT_BQ (KVB_SIMT_WARPS * KVB_SIMT_QW)       /* queries per block */
#define KVB_SIMT_BK 32                                  /* keys per tile */

/* Stages the positions of keys [k0, k0 + bk) into kp (LLONG_MAX past nk)
 * and returns whether any query of the block (the latest at qmax) sees any
 * of them, so a tile nobody sees is skipped.  Called by every thread of the
 * block (it synchronises). */
static __device__ __forceinline__ bool kvb_tile_positions(const int64_t *k_pos, int64_t k0,
                                                          int64_t nk, int bk, long long qmax,
                                                          long long *kp)
{
    const int tid = threadIdx.x;
    long long my_kp = LLONG_MAX;
    if (tid < bk) {
        const int64_t kj = k0 + tid;
        my_kp = kj < nk ? (long long)k_pos[kj] : LLONG_MAX;
        kp[tid] = my_kp;
    }
    return __syncthreads_or(tid < bk && my_kp <= qmax) != 0;
}

/*
 *   q      [nq, Hq, D]     q_pos [nq]
 *   k, v   [nk, Hkv, D]    k_pos [nk]
 *   out    [nq, Hq, D]
 * Grid: (ceil(nq / 16), Hq).  Block: 128 threads (4 warps x 4 queries).
 */
template <typename T, int D>
static __global__ void __launch_bounds__(KVB_SIMT_WARPS * 32)
kvb_attn_simt(const T *__restrict__ q, const int64_t *__restrict__ q_pos, int64_t nq,
              const T *__restrict__ k, const T *__restrict__ v,
              const int64_t *__restrict__ k_pos, int64_t nk, int Hq, int Hkv,
              float scale_log2, T *__restrict__ out)
{
    constexpr int DJ = D / 32;
    __shared__ float qs[KVB_SIMT_BQ][D];
    __shared__ float ks[KVB_SIMT_BK][D + 1];
    __shared__ float vs[KVB_SIMT_BK][D];
    __shared__ long long kp[KVB_SIMT_BK];
    __shared__ long long qp[KVB_SIMT_BQ];
    __shared__ long long qmax;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int h = blockIdx.y;
    const int hk = h / (Hq / Hkv);
    const int64_t q0 = (int64_t)blockIdx.x * KVB_SIMT_BQ;

    if (tid == 0) qmax = LLONG_MIN;
    __syncthreads();
    for (int e = tid; e < KVB_SIMT_BQ * D; e += blockDim.x) {
        const int r = e / D, d = e % D;
        const int64_t qi = q0 + r;
        qs[r][d] = qi < nq ? kvb_to_f32(q[(qi * Hq + h) * D + d]) * scale_log2 : 0.0f;
    }
    if (tid < KVB_SIMT_BQ) {
        const int64_t qi = q0 + tid;
        qp[tid] = qi < nq ? (long long)q_pos[qi] : LLONG_MIN;
        atomicMax(&qmax, qp[tid]);
    }
    float m[KVB_SIMT_QW], l[KVB_SIMT_QW], acc[KVB_SIMT_QW][DJ];
#pragma unroll
    for (int i = 0; i < KVB_SIMT_QW; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < DJ; j++) acc[i][j] = 0.0f;
    }
    __syncthreads();

    for (int64_t k0 = 0; k0 < nk; k0 += KVB_SIMT_BK) {
        for (int e = tid; e < KVB_SIMT_BK * D; e += blockDim.x) {
            const int r = e / D, d = e % D;
            const int64_t kj = k0 + r;
            const bool in = kj < nk;
            ks[r][d] = in ? kvb_to_f32(k[(kj * Hkv + hk) * D + d]) : 0.0f;
            vs[r][d] = in ? kvb_to_f32(v[(kj * Hkv + hk) * D + d]) : 0.0f;
        }
        if (!kvb_tile_positions(k_pos, k0, nk, KVB_SIMT_BK, qmax, kp)) {
            continue;
        }
#pragma unroll
        for (int i = 0; i < KVB_SIMT_QW; i++) {
            const int r = warp * KVB_SIMT_QW + i;
            float s = 0.0f;
#pragma unroll 16
            for (int d = 0; d < D; d++) s = fmaf(qs[r][d], ks[lane][d], s);
            const bool visible = kp[lane] <= qp[r];
            s = visible ? s : -INFINITY;
            float mt = s;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            const float m_new = fmaxf(m[i], mt);
            if (m_new == -INFINITY) {
                continue; /* warp-uniform: nothing visible yet */
            }
            const float alpha = exp2f(m[i] - m_new);
            const float p = visible ? exp2f(s - m_new) : 0.0f;
            l[i] = l[i] * alpha + kvb_warp_sum(p);
#pragma unroll
            for (int j = 0; j < DJ; j++) acc[i][j] *= alpha;
            for (int key = 0; key < KVB_SIMT_BK; key++) {
                const float pk = __shfl_sync(0xffffffffu, p, key);
#pragma unroll
                for (int j = 0; j < DJ; j++) acc[i][j] = fmaf(pk, vs[key][lane + 32 * j], acc[i][j]);
            }
            m[i] = m_new;
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < KVB_SIMT_QW; i++) {
        const int64_t qi = q0 + warp * KVB_SIMT_QW + i;
        if (qi >= nq) continue;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
        for (int j = 0; j < DJ; j++) {
            out[(qi * Hq + h) * D + lane + 32 * j] = kvb_from_f32<T>(acc[i][j] * inv);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Tensor-core kernel                                                       */
/* ------------------------------------------------------------------------ */

#define KVB_MMA_WARPS 4
#define KVB_MMA_BQ (KVB_MMA_WARPS * 16) /* queries per block */
#define KVB_MMA_BK 64                   /* keys per tile */
#define KVB_MMA_PAD 8                   /* shared row padding, elements */

/* D = A * B + D for one m16n8k16 tile, fp32 accumulate; T selects the f16
 * or bf16 instruction. */
#define KVB_MMA_ASM(ty)                                                          \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ty "." ty ".f32 "      \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"       \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
static __device__ __forceinline__ void kvb_mma(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1)
{
    if constexpr (std::is_same<T, __half>::value) {
        KVB_MMA_ASM("f16");
    } else {
        KVB_MMA_ASM("bf16");
    }
}
#undef KVB_MMA_ASM

/* Packs two elements into one 32-bit register, `lo` in the low half (the
 * lower column index of an mma fragment pair). */
template <typename T>
static __device__ __forceinline__ uint32_t kvb_pack(T lo, T hi)
{
    const uint32_t a = *reinterpret_cast<const uint16_t *>(&lo);
    const uint32_t b = *reinterpret_cast<const uint16_t *>(&hi);
    return a | (b << 16);
}

/* Loads two consecutive 16-bit elements (4-byte aligned) as one register. */
static __device__ __forceinline__ uint32_t kvb_ld2(const void *p)
{
    return *reinterpret_cast<const uint32_t *>(p);
}

/*
 * Tensor-core attention for T = __half or __nv_bfloat16.  Fragment layout of
 * m16n8k16 (g = lane / 4, t = lane % 4): A regs hold (row g | g+8, cols
 * 2t..2t+1 | 2t+8..2t+9), B regs (k rows 2t..2t+1 | 2t+8..2t+9, col g),
 * C holds (row g | g+8, cols 2t, 2t+1).  Arguments as kvb_attn_simt's,
 * with q, k, v and out 16-byte aligned.
 * Grid: (ceil(nq / 64), Hq).  Block: 128 threads (4 warps x 16 queries).
 */
template <typename T, int D>
static __global__ void __launch_bounds__(KVB_MMA_WARPS * 32)
kvb_attn_mma(const T *__restrict__ q, const int64_t *__restrict__ q_pos, int64_t nq,
             const T *__restrict__ k, const T *__restrict__ v, const int64_t *__restrict__ k_pos,
             int64_t nk, int Hq, int Hkv, float scale_log2, T *__restrict__ out)
{
    constexpr int BK = KVB_MMA_BK;
    constexpr int KS = D + KVB_MMA_PAD;  /* ks row stride */
    constexpr int VS = BK + KVB_MMA_PAD; /* vt row stride */
    constexpr int NT = BK / 8;           /* S n-tiles */
    constexpr int DT = D / 8;            /* O n-tiles */
    constexpr int KD = D / 16;           /* k-steps of QK^T */
    constexpr int V8 = 8;                /* elements per 16-byte vector */
    __shared__ __align__(16) T ks[BK * KS];
    __shared__ __align__(16) T vt[D * VS];
    __shared__ long long kp[BK];
    __shared__ long long qmax;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;
    const int h = blockIdx.y;
    const int hk = h / (Hq / Hkv);
    const int64_t r0 = (int64_t)blockIdx.x * KVB_MMA_BQ + warp * 16 + g; /* row g */
    const int64_t r1 = r0 + 8;                                             /* row g+8 */

    if (tid == 0) qmax = LLONG_MIN;
    __syncthreads();
    const long long qp0 = r0 < nq ? (long long)q_pos[r0] : LLONG_MIN;
    const long long qp1 = r1 < nq ? (long long)q_pos[r1] : LLONG_MIN;
    if (t == 0) {
        atomicMax(&qmax, qp0 > qp1 ? qp0 : qp1);
    }

    /* Q fragments for all k-steps (rows beyond nq are zero). */
    uint32_t qa[KD][4];
    {
        const T *q0p = q + (r0 * Hq + h) * D;
        const T *q1p = q + (r1 * Hq + h) * D;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            const int c = kk * 16 + 2 * t;
            qa[kk][0] = r0 < nq ? kvb_ld2(q0p + c) : 0u;
            qa[kk][1] = r1 < nq ? kvb_ld2(q1p + c) : 0u;
            qa[kk][2] = r0 < nq ? kvb_ld2(q0p + c + 8) : 0u;
            qa[kk][3] = r1 < nq ? kvb_ld2(q1p + c + 8) : 0u;
        }
    }
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    __syncthreads();

    for (int64_t k0 = 0; k0 < nk; k0 += BK) {
        /* Stage the tile: 16-byte vectors of K rows and of V rows (V
         * transposed into vt[dim][key]). */
        for (int e = tid; e < BK * (D / V8); e += blockDim.x) {
            const int r = e / (D / V8), c = (e % (D / V8)) * V8;
            const int64_t kj = k0 + r;
            kvb_vec<T, V8> kv, vv;
            if (kj < nk) {
                kv = *reinterpret_cast<const kvb_vec<T, V8> *>(k + (kj * Hkv + hk) * D + c);
                vv = *reinterpret_cast<const kvb_vec<T, V8> *>(v + (kj * Hkv + hk) * D + c);
            } else {
#pragma unroll
                for (int j = 0; j < V8; j++) kv.e[j] = vv.e[j] = kvb_from_f32<T>(0.0f);
            }
            *reinterpret_cast<kvb_vec<T, V8> *>(&ks[r * KS + c]) = kv;
#pragma unroll
            for (int j = 0; j < V8; j++) vt[(c + j) * VS + r] = vv.e[j];
        }
        if (!kvb_tile_positions(k_pos, k0, nk, BK, qmax, kp)) {
            continue;
        }

        /* S = Q K^T for this warp's 16 rows x 64 keys. */
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const T *kr = &ks[(nt * 8 + g) * KS + 2 * t];
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                kvb_mma<T>(s[nt], qa[kk], kvb_ld2(kr + kk * 16), kvb_ld2(kr + kk * 16 + 8));
            }
        }
        /* Mask, scale into the log2 domain, row maxima. */
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int c = nt * 8 + 2 * t;
            const long long kpa = kp[c], kpb = kp[c + 1];
            s[nt][0] = kpa <= qp0 ? s[nt][0] * scale_log2 : -INFINITY;
            s[nt][1] = kpb <= qp0 ? s[nt][1] * scale_log2 : -INFINITY;
            s[nt][2] = kpa <= qp1 ? s[nt][2] * scale_log2 : -INFINITY;
            s[nt][3] = kpb <= qp1 ? s[nt][3] * scale_log2 : -INFINITY;
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* A row that has seen nothing keeps exponent base 0: its p are 0. */
        const float base0 = mn0 == -INFINITY ? 0.0f : mn0;
        const float base1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = exp2f(s[nt][0] - base0);
            s[nt][1] = exp2f(s[nt][1] - base0);
            s[nt][2] = exp2f(s[nt][2] - base1);
            s[nt][3] = exp2f(s[nt][3] - base1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * alpha0 + ps0; /* per-lane partial sums; reduced at the end */
        l1 = l1 * alpha1 + ps1;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            o[dt][0] *= alpha0;
            o[dt][1] *= alpha0;
            o[dt][2] *= alpha1;
            o[dt][3] *= alpha1;
        }
        /* O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A
         * fragment of k-step kk. */
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t pa[4];
            pa[0] = kvb_pack<T>(kvb_from_f32<T>(s[2 * kk][0]), kvb_from_f32<T>(s[2 * kk][1]));
            pa[1] = kvb_pack<T>(kvb_from_f32<T>(s[2 * kk][2]), kvb_from_f32<T>(s[2 * kk][3]));
            pa[2] = kvb_pack<T>(kvb_from_f32<T>(s[2 * kk + 1][0]), kvb_from_f32<T>(s[2 * kk + 1][1]));
            pa[3] = kvb_pack<T>(kvb_from_f32<T>(s[2 * kk + 1][2]), kvb_from_f32<T>(s[2 * kk + 1][3]));
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const T *vr = &vt[(dt * 8 + g) * VS + kk * 16 + 2 * t];
                kvb_mma<T>(o[dt], pa, kvb_ld2(vr), kvb_ld2(vr + 8));
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
        const int c = dt * 8 + 2 * t;
        if (r0 < nq) {
            T *p = out + (r0 * Hq + h) * D + c;
            *reinterpret_cast<uint32_t *>(p) =
                kvb_pack<T>(kvb_from_f32<T>(o[dt][0] * inv0), kvb_from_f32<T>(o[dt][1] * inv0));
        }
        if (r1 < nq) {
            T *p = out + (r1 * Hq + h) * D + c;
            *reinterpret_cast<uint32_t *>(p) =
                kvb_pack<T>(kvb_from_f32<T>(o[dt][2] * inv1), kvb_from_f32<T>(o[dt][3] * inv1));
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Launchers                                                                */
/* ------------------------------------------------------------------------ */

extern "C" int kvb_cuda_attention_supported(int32_t head_size)
{
    return head_size == 64 || head_size == 128;
}

/* Launches the tensor-core kernel (MMA, 16-bit T) or the CUDA-core one for
 * head size D. */
template <typename T, int D, bool MMA>
static void kvb_attn_go(const T *q, const int64_t *q_pos, int64_t nq, const T *k, const T *v,
                        const int64_t *k_pos, int64_t nk, int Hq, int Hkv, float scale_log2,
                        T *out, cudaStream_t stream)
{
    constexpr int BQ = MMA ? KVB_MMA_BQ : KVB_SIMT_BQ;
    const dim3 grid((unsigned)((nq + BQ - 1) / BQ), (unsigned)Hq);
    if constexpr (MMA) {
        kvb_attn_mma<T, D><<<grid, KVB_MMA_WARPS * 32, 0, stream>>>(q, q_pos, nq, k, v, k_pos,
                                                                    nk, Hq, Hkv, scale_log2, out);
    } else {
        kvb_attn_simt<T, D><<<grid, KVB_SIMT_WARPS * 32, 0, stream>>>(q, q_pos, nq, k, v, k_pos,
                                                                      nk, Hq, Hkv, scale_log2, out);
    }
}

/* Picks the kernel: tensor cores for 16-bit types when q/k/v/out are
 * 16-byte aligned (rows of 64 or 128 elements keep every row aligned),
 * else CUDA cores. */
template <typename T>
static cudaError_t kvb_attention_go(const void *q, const int64_t *q_pos, int64_t nq,
                                    const void *k, const void *v, const int64_t *k_pos,
                                    int64_t nk, int Hq, int Hkv, int D, float scale,
                                    void *out, cudaStream_t stream)
{
    if (!kvb_cuda_attention_supported(D)) {
        return cudaErrorInvalidValue;
    }
    if (nq <= 0) {
        return cudaSuccess;
    }
    const T *tq = static_cast<const T *>(q), *tk = static_cast<const T *>(k),
            *tv = static_cast<const T *>(v);
    T *to = static_cast<T *>(out);
    const float sl = scale * KVB_LOG2E;
    const bool mma = sizeof(T) == 2 && kvb_aligned(q, 16) && kvb_aligned(k, 16) &&
                     kvb_aligned(v, 16) && kvb_aligned(out, 16);
    if constexpr (sizeof(T) == 2) {
        if (mma && D == 64) {
            kvb_attn_go<T, 64, true>(tq, q_pos, nq, tk, tv, k_pos, nk, Hq, Hkv, sl, to, stream);
        } else if (mma) {
            kvb_attn_go<T, 128, true>(tq, q_pos, nq, tk, tv, k_pos, nk, Hq, Hkv, sl, to, stream);
        }
    }
    if (!mma && D == 64) {
        kvb_attn_go<T, 64, false>(tq, q_pos, nq, tk, tv, k_pos, nk, Hq, Hkv, sl, to, stream);
    } else if (!mma) {
        kvb_attn_go<T, 128, false>(tq, q_pos, nq, tk, tv, k_pos, nk, Hq, Hkv, sl, to, stream);
    }
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

#define KVB_ATTN_LAUNCHER(suffix, T)                                                          \
    extern "C" cudaError_t kvb_launch_attention_##suffix(                                     \
        const void *q, const int64_t *q_pos, int64_t nq, const void *k, const void *v,        \
        const int64_t *k_pos, int64_t nk, int32_t num_q_heads, int32_t num_kv_heads,          \
        int32_t head_size, float scale, void *out, cudaStream_t stream)                       \
    {                                                                                         \
        return kvb_attention_go<T>(q, q_pos, nq, k, v, k_pos, nk, num_q_heads, num_kv_heads,  \
                                   head_size, scale, out, stream);                            \
    }

KVB_ATTN_LAUNCHER(f32, float)
KVB_ATTN_LAUNCHER(f16, __half)
KVB_ATTN_LAUNCHER(bf16, __nv_bfloat16)
