/*
 * kvb_plan.h: the geometry rule of the planned per-layer load, shared by
 * the kernel (cuda/rope.cu) and the connector that plans it
 * (connector/connector.c).  Plain C, no CUDA headers: the connector
 * compiles it in CPU-only builds too.  Never installed.
 */
#pragma once

#include <stdint.h>

/* Returns 1 when the planned load handles elements of `esize` bytes with
 * this head and rotary geometry: whole 16-byte vectors per head, per
 * rotary chunk (NeoX: rotary_dim/2, GPT-J (style 1): rotary_dim) and in
 * the pass-through tail. */
static inline int kvb_load_plan_geom_ok(int32_t esize, int32_t head_size,
                                        int32_t rotary_dim, int32_t style)
{
    if (esize <= 0 || 16 % esize != 0 || rotary_dim <= 0 || rotary_dim % 2 != 0 ||
        rotary_dim > head_size) {
        return 0;
    }
    const int32_t v = 16 / esize;
    const int32_t chunk = style == 1 ? rotary_dim : rotary_dim / 2;
    return head_size % v == 0 && (head_size - rotary_dim) % v == 0 && chunk % v == 0;
}
