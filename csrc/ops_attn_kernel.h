/*
 * ops_attn_kernel.h: the inner loop of kvb_cpu_attention, instantiated once
 * per vector width by ops_attn.c (never included anywhere else).
 *
 * Before each inclusion ops_attn.c defines:
 *   KVB_VW      floats per vector (16, 8 or 4)
 *   KVB_QK_R    query rows per QK / PV micro-kernel step (divides 4)
 *   KVB_SFX(x)  pastes the instantiation's suffix onto a name
 *   KVB_TARGET  the function attributes of this instantiation (ISA target
 *               and floating-point contraction), possibly empty
 * and the types/constants kvb_attn_ctx, KVB_ATTN_BK, KVB_ATTN_DBLK,
 * kvb_attn_scratch_layout().  The code uses GCC vector extensions, which
 * lower to whatever the target offers, so one source serves every ISA.
 */

typedef float KVB_SFX(kvb_vf) __attribute__((vector_size(KVB_VW * 4)));
typedef int32_t KVB_SFX(kvb_vi) __attribute__((vector_size(KVB_VW * 4)));

/* Vector loads and stores are memcpy so that no alignment or aliasing
 * assumption is made; the compiler emits one unaligned move. */
#define KVB_VLD(x, p) memcpy(&(x), (p), sizeof(x))
#define KVB_VST(p, x) memcpy((p), &(x), sizeof(x))
/* Fully unrolls the tiny register-block loops so that the accumulator
 * arrays are kept in registers. */
#define KVB_UNROLL _Pragma("GCC unroll 16")

/* 2^x for x <= 0, lane-wise (x is clamped at -126, so the smallest result
 * is 2^-126 rather than 0; callers zero masked lanes themselves).  Range
 * reduction x = n + f with |f| <= 1/2 and a degree-7 Taylor polynomial of
 * 2^f: relative error below 1e-7, about one fp32 ulp. */
#define KVB_EXP2V(out, xin)                                                  \
    do {                                                                     \
        KVB_SFX(kvb_vf) x_ = (xin);                                          \
        const KVB_SFX(kvb_vf) lo_ = (KVB_SFX(kvb_vf)){0} - 126.0f;                        \
        KVB_SFX(kvb_vi) under_ = x_ < lo_;                                   \
        x_ = (KVB_SFX(kvb_vf))(((KVB_SFX(kvb_vi))x_ & ~under_) |             \
                               ((KVB_SFX(kvb_vi))lo_ & under_));             \
        const KVB_SFX(kvb_vf) magic_ = (KVB_SFX(kvb_vf)){0} + 12582912.0f;                \
        KVB_SFX(kvb_vf) t_ = x_ + magic_;                                    \
        KVB_SFX(kvb_vf) n_ = t_ - magic_;                                    \
        KVB_SFX(kvb_vf) f_ = x_ - n_;                                        \
        KVB_SFX(kvb_vf) p_ = f_ * 1.5252733804059840e-05f + 1.5403530393381608e-04f; \
        p_ = p_ * f_ + 1.3333558146428443e-03f;                              \
        p_ = p_ * f_ + 9.6181291076284772e-03f;                              \
        p_ = p_ * f_ + 5.5504108664821580e-02f;                              \
        p_ = p_ * f_ + 2.4022650695910071e-01f;                              \
        p_ = p_ * f_ + 6.9314718055994531e-01f;                              \
        p_ = p_ * f_ + 1.0f;                                                 \
        KVB_SFX(kvb_vi) e_ = ((KVB_SFX(kvb_vi))t_ -                          \
                              (KVB_SFX(kvb_vi))magic_ + 127) << 23;          \
        (out) = p_ * (KVB_SFX(kvb_vf))e_;                                    \
    } while (0)

/*
 * Computes one work item of kvb_cpu_attention: the block of sorted queries
 * `item / num_kv_heads` counted from the end (longest rows first, for load
 * balance) against KV head `item % num_kv_heads`, for all the query heads
 * that share that KV head.  Flash-style: key tiles of KVB_ATTN_BK keys (in
 * position order) are converted to fp32 once (K transposed, V padded), and
 * each query row keeps a running max, a running sum and an fp32 output
 * accumulator.  `scr` is this worker's scratch (see
 * kvb_attn_scratch_layout).  Writes the item's output rows; a row that sees
 * no key is written as zeros.  Results depend only on the item, never on
 * which thread runs it.
 */
static KVB_TARGET void KVB_SFX(kvb_attn_item)(const kvb_attn_ctx *c,
                                              int64_t item, float *scr)
{
    enum { BK = KVB_ATTN_BK, NC = KVB_ATTN_BK / KVB_VW,
           ND = KVB_ATTN_DBLK / KVB_VW, R = KVB_QK_R };
    typedef KVB_SFX(kvb_vf) vf;
    typedef KVB_SFX(kvb_vi) vi;
    const int64_t Hkv = c->num_kv_heads, G = c->group, D = c->head_size;
    const int64_t Dp = c->head_pad;
    const int64_t blk = c->num_blocks - 1 - item / Hkv;
    const int64_t h = item % Hkv;
    const int64_t q0 = blk * c->block_q;
    const int64_t nb = c->nq - q0 < c->block_q ? c->nq - q0 : c->block_q;
    const int64_t M = nb * G;
    const int64_t Mp = (M + 3) & ~(int64_t)3;
    kvb_attn_scratch sp;
    kvb_attn_scratch_layout(c, scr, &sp);
    float *restrict Qf = sp.q, *restrict O = sp.o, *restrict P = sp.p;
    float *restrict Kt = sp.kt, *restrict Vt = sp.vt;
    float *restrict mrow = sp.m, *restrict lrow = sp.l;
    int64_t *restrict vis = sp.vis;

    /* Query rows, pre-scaled by scale*log2(e) so the softmax uses 2^x. */
    memset(Qf, 0, (size_t)(Mp * Dp) * sizeof(float));
    memset(O, 0, (size_t)(Mp * Dp) * sizeof(float));
    for (int64_t r = 0; r < Mp; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
        vis[r] = 0;
    }
    for (int64_t qi = 0; qi < nb; qi++) {
        int64_t src = c->q_order[q0 + qi];
        for (int64_t g = 0; g < G; g++) {
            int64_t r = qi * G + g;
            int64_t off = (src * c->num_q_heads + h * G + g) * D;
            for (int64_t d = 0; d < D; d++) {
                Qf[r * Dp + d] = kvb_load(c->q, off + d, c->dtype) * c->qscale;
            }
            vis[r] = c->q_vis[q0 + qi];
        }
    }
    int64_t maxvis = nb > 0 ? c->q_vis[q0 + nb - 1] : 0;

    for (int64_t j0 = 0; j0 < maxvis; j0 += BK) {
        int64_t jn = maxvis - j0 < BK ? maxvis - j0 : BK;
        /* Load the tile: Kt[d][j] (transposed) and Vt[j][d], fp32. */
        for (int64_t j = 0; j < jn; j++) {
            int64_t kj = c->k_order ? c->k_order[j0 + j] : j0 + j;
            int64_t off = (kj * Hkv + h) * D;
            if (c->dtype == KVB_DTYPE_F32) {
                const float *kr = (const float *)c->k + off;
                const float *vr = (const float *)c->v + off;
                for (int64_t d = 0; d < D; d++) {
                    Kt[d * BK + j] = kr[d];
                }
                memcpy(Vt + j * Dp, vr, (size_t)D * sizeof(float));
            } else {
                for (int64_t d = 0; d < D; d++) {
                    Kt[d * BK + j] = kvb_load(c->k, off + d, c->dtype);
                    Vt[j * Dp + d] = kvb_load(c->v, off + d, c->dtype);
                }
            }
        }
        for (int64_t j = jn; j < BK; j++) {
            for (int64_t d = 0; d < D; d++) {
                Kt[d * BK + j] = 0.0f;
            }
            memset(Vt + j * Dp, 0, (size_t)Dp * sizeof(float));
        }

        for (int64_t rg = 0; rg < Mp; rg += 4) {
            int64_t lim[4];
            int64_t jmax = 0;
            for (int r = 0; r < 4; r++) {
                int64_t l = vis[rg + r] - j0;
                lim[r] = l < 0 ? 0 : l > jn ? jn : l;
                jmax = lim[r] > jmax ? lim[r] : jmax;
            }
            if (jmax == 0) {
                continue; /* no row of this group sees a key of the tile */
            }
            /* Scores: P[r][j] = Qf[r] . K[j] for the 4 rows. */
            for (int rr = 0; rr < 4; rr += R) {
                vf acc[R][NC];
                KVB_UNROLL
                for (int r = 0; r < R; r++) {
                    KVB_UNROLL
                    for (int k = 0; k < NC; k++) {
                        acc[r][k] = (vf){0};
                    }
                }
                const float *qrow = Qf + (rg + rr) * Dp;
                for (int64_t d = 0; d < D; d++) {
                    vf kv[NC];
                    KVB_UNROLL
                    for (int k = 0; k < NC; k++) {
                        KVB_VLD(kv[k], Kt + d * BK + k * KVB_VW);
                    }
                    KVB_UNROLL
                    for (int r = 0; r < R; r++) {
                        float qd = qrow[r * Dp + d];
                        KVB_UNROLL
                        for (int k = 0; k < NC; k++) {
                            acc[r][k] += qd * kv[k];
                        }
                    }
                }
                KVB_UNROLL
                for (int r = 0; r < R; r++) {
                    KVB_UNROLL
                    for (int k = 0; k < NC; k++) {
                        KVB_VST(P + (rg + rr + r) * BK + k * KVB_VW,
                                acc[r][k]);
                    }
                }
            }
            /* Online softmax: mask, running max, probabilities; the
             * accumulator rescale by alpha is folded into the PV step. */
            float alpha[4];
            for (int r = 0; r < 4; r++) {
                float *prow = P + (rg + r) * BK;
                alpha[r] = 1.0f;
                if (lim[r] == 0) {
                    memset(prow, 0, BK * sizeof(float));
                    continue;
                }
                const vi limv = (vi){0} + (int32_t)lim[r];
                const vf ninf = (vf){0} - INFINITY;
                vi lane;
                for (int e = 0; e < KVB_VW; e++) {
                    lane[e] = e;
                }
                vf s[NC];
                vi keep[NC];
                vf vmax = ninf;
                KVB_UNROLL
                for (int k = 0; k < NC; k++) {
                    KVB_VLD(s[k], prow + k * KVB_VW);
                    keep[k] = (lane + k * KVB_VW) < limv;
                    vf sk = (vf)(((vi)s[k] & keep[k]) | ((vi)ninf & ~keep[k]));
                    vi gt = sk > vmax;
                    vmax = (vf)(((vi)sk & gt) | ((vi)vmax & ~gt));
                }
                float mt = vmax[0];
                for (int e = 1; e < KVB_VW; e++) {
                    mt = vmax[e] > mt ? vmax[e] : mt;
                }
                float mold = mrow[rg + r];
                float mnew = mold > mt ? mold : mt;
                alpha[r] = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
                vf vsum = (vf){0};
                KVB_UNROLL
                for (int k = 0; k < NC; k++) {
                    vf pk;
                    KVB_EXP2V(pk, s[k] - mnew);
                    pk = (vf)((vi)pk & keep[k]);
                    KVB_VST(prow + k * KVB_VW, pk);
                    vsum += pk;
                }
                float sum = 0.0f;
                for (int e = 0; e < KVB_VW; e++) {
                    sum += vsum[e];
                }
                mrow[rg + r] = mnew;
                lrow[rg + r] = lrow[rg + r] * alpha[r] + sum;
            }
            /* O[r] += sum_j P[r][j] * V[j] for the 4 rows. */
            for (int rr = 0; rr < 4; rr += R) {
                for (int64_t dc = 0; dc < Dp; dc += KVB_ATTN_DBLK) {
                    vf acc[R][ND];
                    KVB_UNROLL
                    for (int r = 0; r < R; r++) {
                        KVB_UNROLL
                        for (int k = 0; k < ND; k++) {
                            KVB_VLD(acc[r][k], O + (rg + rr + r) * Dp + dc +
                                                   k * KVB_VW);
                            acc[r][k] *= alpha[rr + r];
                        }
                    }
                    for (int64_t j = 0; j < jmax; j++) {
                        vf vv[ND];
                        KVB_UNROLL
                        for (int k = 0; k < ND; k++) {
                            KVB_VLD(vv[k], Vt + j * Dp + dc + k * KVB_VW);
                        }
                        KVB_UNROLL
                        for (int r = 0; r < R; r++) {
                            float pj = P[(rg + rr + r) * BK + j];
                            KVB_UNROLL
                            for (int k = 0; k < ND; k++) {
                                acc[r][k] += pj * vv[k];
                            }
                        }
                    }
                    KVB_UNROLL
                    for (int r = 0; r < R; r++) {
                        KVB_UNROLL
                        for (int k = 0; k < ND; k++) {
                            KVB_VST(O + (rg + rr + r) * Dp + dc + k * KVB_VW,
                                    acc[r][k]);
                        }
                    }
                }
            }
        }
    }

    /* Normalise and store; rows that saw no key are zeros. */
    for (int64_t qi = 0; qi < nb; qi++) {
        int64_t dst = c->q_order[q0 + qi];
        for (int64_t g = 0; g < G; g++) {
            int64_t r = qi * G + g;
            int64_t off = (dst * c->num_q_heads + h * G + g) * D;
            float inv = vis[r] > 0 ? 1.0f / lrow[r] : 0.0f;
            for (int64_t d = 0; d < D; d++) {
                kvb_store_elem(c->out, off + d, c->dtype, O[r * Dp + d] * inv);
            }
        }
    }
}

#undef KVB_VLD
#undef KVB_VST
#undef KVB_UNROLL
#undef KVB_EXP2V
