/*
 * Trilinear sampling of a float32 3-D field at arbitrary points, with border values outside.
 *
 * The arithmetic is that of PyTorch's CPU kernel for
 * grid_sample(mode="bilinear", padding_mode="border", align_corners=True) applied to the grid
 * 2 p - 1 (the CUBE -> [-1, 1] map of itk_gradicon.geometry.sample_cube_field): the same float32
 * operations in the same order, so that each value is bitwise the value grid_sample returns
 * (tests/test_native_sampling.py checks this). What differs is the cost: grid_sample's 3-D CPU
 * kernel is generic code that runs on one thread; this loop is small enough for the compiler to
 * keep everything in registers, and it releases the GIL, so that the Python caller can run it on
 * one range of points per core. sample_3d_backward does the same for grid_sample's backward
 * (the gradients with respect to the field and to the points, for instance optimisation).
 *
 * The same module holds the other loops of instance optimisation that PyTorch runs as many passes over
 * memory: filter_axis, one axis of a separable filter (the Gaussian windows of LNCC, see
 * itk_gradicon.network.separable), and filter_axis_replicate, the same with replicate padding (MIND-SSC's
 * box means); lncc_part, the pointwise parts of LNCC against a fixed image (itk_gradicon.pipeline.losses);
 * warp_voxels, an image warped by a displacement in voxels, zero outside, round_trip, the inverse-
 * consistency round trip of two such displacements, and diffusion_part, their diffusion penalty (field IO,
 * itk_gradicon.pipeline.instance); mind_part, the parts of MIND-SSC against a fixed image's descriptors (the
 * multimodal similarity of field IO, itk_gradicon.pipeline.losses); and grid_field_3d, a network map's WORLD displacement at every voxel of
 * an image grid (itk_gradicon.spatial.frames). With AVX2 (checked at run time) sample_3d and
 * sample_3d_backward take eight points of a one-channel field at a time, bitwise as the scalar loop.
 *
 * Built as an optional extension (setup.py): where it is missing, itk_gradicon uses grid_sample, banded
 * matrix products and autograd for the same functions.
 * Compile with -ffp-contract=off: fusing a multiply and an add would change the rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* grid_sampler_compute_source_index for align_corners=True and border padding, from a CUBE
 * coordinate p in [0, 1]: unnormalise 2 p - 1 to [0, size - 1], then clip into it. */
static inline float source_index(float p, int64_t size)
{
    const float g = p * 2.0f - 1.0f;
    const float x = ((g + 1.0f) / 2.0f) * (float)(size - 1);
    /* std::min(size - 1, std::max(x, 0)), comparisons in that order: a NaN coordinate becomes
     * size - 1, as in grid_sample (and never reaches the integer conversion below) */
    const float low = x < 0.0f ? 0.0f : x;
    const float high = (float)(size - 1);
    return low < high ? low : high;
}

typedef struct {
    const float *field;
    int64_t channels, depth, height, width;
    int64_t stride_c, stride_z, stride_y, stride_x; /* in elements */
    const float *points;                            /* 3 rows: z, y, x */
    int64_t points_row;                             /* elements between rows */
    float *out;                                     /* one row per channel */
    int64_t out_row;
} Sampling;

/* The cell of the field around a clipped point: its first node, the node coordinates on either
 * side, the eight corner weights (t/b = z0/z1, n/s = y0/y1, w/e = x0/x1: grid_sample's names,
 * computed in its order) and which far corners exist. After clipping only the far corners can lie
 * outside (at the last node, with weight 0); grid_sample skips them, and so do the loops below. */
typedef struct {
    int64_t x0, y0, z0, offset;   /* offset of node (z0, y0, x0) in the field, in elements */
    float fx0, fy0, fz0, fx1, fy1, fz1;
    float tnw, tne, tsw, tse, bnw, bne, bsw, bse;
    int east, south, bottom;
} Cell;

static inline Cell cell_of(const Sampling *s, float ix, float iy, float iz)
{
    Cell q;
    q.x0 = (int64_t)floorf(ix);
    q.y0 = (int64_t)floorf(iy);
    q.z0 = (int64_t)floorf(iz);
    q.offset = q.z0 * s->stride_z + q.y0 * s->stride_y + q.x0 * s->stride_x;
    q.fx0 = (float)q.x0, q.fy0 = (float)q.y0, q.fz0 = (float)q.z0;
    q.fx1 = (float)(q.x0 + 1), q.fy1 = (float)(q.y0 + 1), q.fz1 = (float)(q.z0 + 1);
    q.tnw = (q.fx1 - ix) * (q.fy1 - iy) * (q.fz1 - iz);
    q.tne = (ix - q.fx0) * (q.fy1 - iy) * (q.fz1 - iz);
    q.tsw = (q.fx1 - ix) * (iy - q.fy0) * (q.fz1 - iz);
    q.tse = (ix - q.fx0) * (iy - q.fy0) * (q.fz1 - iz);
    q.bnw = (q.fx1 - ix) * (q.fy1 - iy) * (iz - q.fz0);
    q.bne = (ix - q.fx0) * (q.fy1 - iy) * (iz - q.fz0);
    q.bsw = (q.fx1 - ix) * (iy - q.fy0) * (iz - q.fz0);
    q.bse = (ix - q.fx0) * (iy - q.fy0) * (iz - q.fz0);
    q.east = q.x0 + 1 < s->width;
    q.south = q.y0 + 1 < s->height;
    q.bottom = q.z0 + 1 < s->depth;
    return q;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one more copy of the loop for AVX2 machines, chosen when the library is loaded */
#define ITK_GRADICON_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ITK_GRADICON_CLONES
#endif

/* The value of one channel (f: its node (z0, y0, x0)) in cell q, grid_sample's sum in its order. */
static inline float cell_value(const Sampling *s, const Cell *q, const float *f)
{
    float v = 0.0f;
    v += f[0] * q->tnw;
    if (q->east) v += f[s->stride_x] * q->tne;
    if (q->south) v += f[s->stride_y] * q->tsw;
    if (q->south && q->east) v += f[s->stride_y + s->stride_x] * q->tse;
    if (q->bottom) {
        const float *g = f + s->stride_z;
        v += g[0] * q->bnw;
        if (q->east) v += g[s->stride_x] * q->bne;
        if (q->south) v += g[s->stride_y] * q->bsw;
        if (q->south && q->east) v += g[s->stride_y + s->stride_x] * q->bse;
    }
    return v;
}

/* The value at point m, every channel. */
static inline void sample_point(const Sampling *s, int64_t m)
{
    const float *zs = s->points, *ys = s->points + s->points_row, *xs = s->points + 2 * s->points_row;
    {
        const float iz = source_index(zs[m], s->depth);
        const float iy = source_index(ys[m], s->height);
        const float ix = source_index(xs[m], s->width);
        const Cell q = cell_of(s, ix, iy, iz);
        const float *base = s->field + q.offset;
        for (int64_t c = 0; c < s->channels; ++c)
            s->out[c * s->out_row + m] = cell_value(s, &q, base + c * s->stride_c);
    }
}

ITK_GRADICON_CLONES
static void sample_range(const Sampling *s, int64_t start, int64_t end)
{
    for (int64_t m = start; m < end; ++m)
        sample_point(s, m);
}

/* grid_sampler_compute_source_index_set_grad for align_corners=True and border padding: the
 * coordinate as source_index computes it, and in *grad its derivative with respect to the CUBE
 * coordinate's image 2 p - 1 ((size - 1) / 2 inside, 0 on and beyond the border nodes). */
static inline float source_index_grad(float p, int64_t size, float *grad)
{
    const float g = p * 2.0f - 1.0f;
    const float x = ((g + 1.0f) / 2.0f) * (float)(size - 1);
    const float high = (float)(size - 1);
    if (x <= 0.0f) {
        *grad = 0.0f;
        return 0.0f;
    }
    if (x >= high) {
        *grad = 0.0f;
        return high;
    }
    *grad = (float)(size - 1) / 2.0f;
    return x;
}

typedef struct {
    Sampling s;                 /* field, points; out unused */
    const float *grad_out;      /* one row per channel, grad_out_row elements apart */
    int64_t grad_out_row;
    float *grad_field;          /* NULL, or a zeroed contiguous [channels, depth, height, width] buffer */
    float *grad_points;         /* NULL, or three rows (z, y, x) points_row elements apart */
} Backward;

/* The gradients of point m (its own, and its contributions to the field's). */
static inline void backward_point(const Backward *k, int64_t m)
{
    const Sampling *s = &k->s;
    const float *zs = s->points, *ys = s->points + s->points_row, *xs = s->points + 2 * s->points_row;
    const int64_t gw = 1, gh = s->width, gd = s->width * s->height, gc = gd * s->depth;
    {
        float mz, my, mx;
        const float iz = source_index_grad(zs[m], s->depth, &mz);
        const float iy = source_index_grad(ys[m], s->height, &my);
        const float ix = source_index_grad(xs[m], s->width, &mx);
        if (ix != ix || iy != iy || iz != iz) {
            /* a NaN coordinate: grid_sample's backward finds every corner out of bounds */
            if (k->grad_points != NULL) {
                k->grad_points[m] = (mz * 0.0f) * 2.0f;
                k->grad_points[s->points_row + m] = (my * 0.0f) * 2.0f;
                k->grad_points[2 * s->points_row + m] = (mx * 0.0f) * 2.0f;
            }
            return;
        }
        const Cell q = cell_of(s, ix, iy, iz);
        const float fx0 = q.fx0, fy0 = q.fy0, fz0 = q.fz0, fx1 = q.fx1, fy1 = q.fy1, fz1 = q.fz1;
        const int east = q.east, south = q.south, bottom = q.bottom;
        const float *base = s->field + q.offset;
        float gx = 0.0f, gy = 0.0f, gz = 0.0f;
        for (int64_t c = 0; c < s->channels; ++c) {
            const float go = k->grad_out[c * k->grad_out_row + m];
            if (k->grad_field != NULL) {
                float *gf = k->grad_field + c * gc + q.z0 * gd + q.y0 * gh + q.x0 * gw;
                gf[0] += q.tnw * go;
                if (east) gf[gw] += q.tne * go;
                if (south) gf[gh] += q.tsw * go;
                if (south && east) gf[gh + gw] += q.tse * go;
                if (bottom) {
                    gf[gd] += q.bnw * go;
                    if (east) gf[gd + gw] += q.bne * go;
                    if (south) gf[gd + gh] += q.bsw * go;
                    if (south && east) gf[gd + gh + gw] += q.bse * go;
                }
            }
            if (k->grad_points == NULL)
                continue;
            /* derivative of the eight weights along x, y, z times each corner's value, in
             * grid_sample's order (corners absent outside the field contribute nothing) */
            const float *f = base + c * s->stride_c;
            const float v = f[0];
            gx -= v * (fy1 - iy) * (fz1 - iz) * go;
            gy -= v * (fx1 - ix) * (fz1 - iz) * go;
            gz -= v * (fx1 - ix) * (fy1 - iy) * go;
            if (east) {
                const float w = f[s->stride_x];
                gx += w * (fy1 - iy) * (fz1 - iz) * go;
                gy -= w * (ix - fx0) * (fz1 - iz) * go;
                gz -= w * (ix - fx0) * (fy1 - iy) * go;
            }
            if (south) {
                const float w = f[s->stride_y];
                gx -= w * (iy - fy0) * (fz1 - iz) * go;
                gy += w * (fx1 - ix) * (fz1 - iz) * go;
                gz -= w * (fx1 - ix) * (iy - fy0) * go;
            }
            if (south && east) {
                const float w = f[s->stride_y + s->stride_x];
                gx += w * (iy - fy0) * (fz1 - iz) * go;
                gy += w * (ix - fx0) * (fz1 - iz) * go;
                gz -= w * (ix - fx0) * (iy - fy0) * go;
            }
            if (bottom) {
                const float *g = f + s->stride_z;
                const float w = g[0];
                gx -= w * (fy1 - iy) * (iz - fz0) * go;
                gy -= w * (fx1 - ix) * (iz - fz0) * go;
                gz += w * (fx1 - ix) * (fy1 - iy) * go;
                if (east) {
                    const float u = g[s->stride_x];
                    gx += u * (fy1 - iy) * (iz - fz0) * go;
                    gy -= u * (ix - fx0) * (iz - fz0) * go;
                    gz += u * (ix - fx0) * (fy1 - iy) * go;
                }
                if (south) {
                    const float u = g[s->stride_y];
                    gx -= u * (iy - fy0) * (iz - fz0) * go;
                    gy += u * (fx1 - ix) * (iz - fz0) * go;
                    gz += u * (fx1 - ix) * (iy - fy0) * go;
                }
                if (south && east) {
                    const float u = g[s->stride_y + s->stride_x];
                    gx += u * (iy - fy0) * (iz - fz0) * go;
                    gy += u * (ix - fx0) * (iz - fz0) * go;
                    gz += u * (ix - fx0) * (iy - fy0) * go;
                }
            }
        }
        if (k->grad_points != NULL) {
            /* d/dp = d/d(2 p - 1) * 2 */
            k->grad_points[m] = (mz * gz) * 2.0f;
            k->grad_points[s->points_row + m] = (my * gy) * 2.0f;
            k->grad_points[2 * s->points_row + m] = (mx * gx) * 2.0f;
        }
    }
}

ITK_GRADICON_CLONES
static void sample_range_backward(const Backward *k, int64_t start, int64_t end)
{
    for (int64_t m = start; m < end; ++m)
        backward_point(k, m);
}


/* ------------------------------------------------------------------------------------------------
 * AVX2: eight points at a time, where all eight lie strictly inside the field (every corner present,
 * no clipping): the same float operations in the same order for each point, so each value is bitwise
 * the scalar loop's (and grid_sample's). A block of eight with any point on or beyond the border, or
 * NaN, goes through the scalar code point by point. Chosen at run time where the CPU has AVX2 and the
 * field's offsets fit 32-bit gather indices, for one-channel fields (an image warped by instance
 * optimisation: its values, and the gradient with respect to the points); with three channels the
 * scalar loop, which computes a cell once for all channels, was as fast on a 2-core AMD EPYC.
 * ------------------------------------------------------------------------------------------------ */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ITK_GRADICON_AVX2 1
#include <immintrin.h>

static int have_avx2(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}

/* The largest element offset a corner lookup can reach, for the 32-bit gather check. */
static int offsets_fit_int32(const Sampling *s)
{
    const double largest = (double)(s->channels - 1) * (double)s->stride_c
                           + (double)(s->depth - 1) * (double)s->stride_z
                           + (double)(s->height - 1) * (double)s->stride_y
                           + (double)(s->width - 1) * (double)s->stride_x;
    return s->stride_c >= 0 && s->stride_z >= 0 && s->stride_y >= 0 && s->stride_x >= 0 && largest < 2147483647.0;
}

/* source_index for eight coordinates: the same operations (x < 0 ? 0 : x, then low < high ? low : high,
 * so a NaN becomes high as in the scalar code). */
__attribute__((target("avx2"))) static inline __m256 source_index8(__m256 p, float high)
{
    const __m256 g = _mm256_sub_ps(_mm256_mul_ps(p, _mm256_set1_ps(2.0f)), _mm256_set1_ps(1.0f));
    const __m256 x = _mm256_mul_ps(_mm256_div_ps(_mm256_add_ps(g, _mm256_set1_ps(1.0f)), _mm256_set1_ps(2.0f)),
                                   _mm256_set1_ps(high));
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(high);
    const __m256 low = _mm256_blendv_ps(x, zero, _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
    return _mm256_blendv_ps(top, low, _mm256_cmp_ps(low, top, _CMP_LT_OQ));
}

/* Eight points' cells: the distances to the cell's sides along each axis (ax1 = x0 + 1 - ix, ax0 = ix - x0,
 * as cell_of computes them) and the offsets of the eight corners (grid_sample's order: nw, ne, sw, se on
 * the near plane, then on the far one). */
typedef struct {
    __m256 ax0, ax1, ay0, ay1, az0, az1;
    __m256i corner[8];
} Cell8;

/* The eight points' cells, and whether all of them lie strictly inside (0 < coordinate < size - 1 on
 * every axis: all corners present, and the coordinates' derivatives not clipped). */
__attribute__((target("avx2"))) static inline int cell8(const Sampling *s, int64_t m, Cell8 *q)
{
    const float hz = (float)(s->depth - 1), hy = (float)(s->height - 1), hx = (float)(s->width - 1);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 iz = source_index8(_mm256_loadu_ps(s->points + m), hz);
    const __m256 iy = source_index8(_mm256_loadu_ps(s->points + s->points_row + m), hy);
    const __m256 ix = source_index8(_mm256_loadu_ps(s->points + 2 * s->points_row + m), hx);
    const __m256 inside = _mm256_and_ps(
        _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(iz, zero, _CMP_GT_OQ), _mm256_cmp_ps(iz, _mm256_set1_ps(hz), _CMP_LT_OQ)),
                      _mm256_and_ps(_mm256_cmp_ps(iy, zero, _CMP_GT_OQ), _mm256_cmp_ps(iy, _mm256_set1_ps(hy), _CMP_LT_OQ))),
        _mm256_and_ps(_mm256_cmp_ps(ix, zero, _CMP_GT_OQ), _mm256_cmp_ps(ix, _mm256_set1_ps(hx), _CMP_LT_OQ)));
    if (_mm256_movemask_ps(inside) != 0xff)
        return 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 fz0 = _mm256_floor_ps(iz), fy0 = _mm256_floor_ps(iy), fx0 = _mm256_floor_ps(ix);
    q->az1 = _mm256_sub_ps(_mm256_add_ps(fz0, one), iz), q->az0 = _mm256_sub_ps(iz, fz0);
    q->ay1 = _mm256_sub_ps(_mm256_add_ps(fy0, one), iy), q->ay0 = _mm256_sub_ps(iy, fy0);
    q->ax1 = _mm256_sub_ps(_mm256_add_ps(fx0, one), ix), q->ax0 = _mm256_sub_ps(ix, fx0);
    const __m256i sx = _mm256_set1_epi32((int)s->stride_x), sy = _mm256_set1_epi32((int)s->stride_y),
                  sz = _mm256_set1_epi32((int)s->stride_z);
    const __m256i o = _mm256_add_epi32(_mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(fz0), sz),
                                                        _mm256_mullo_epi32(_mm256_cvttps_epi32(fy0), sy)),
                                       _mm256_mullo_epi32(_mm256_cvttps_epi32(fx0), sx));
    const __m256i b = _mm256_add_epi32(o, sz);
    q->corner[0] = o, q->corner[1] = _mm256_add_epi32(o, sx);
    q->corner[2] = _mm256_add_epi32(o, sy), q->corner[3] = _mm256_add_epi32(q->corner[2], sx);
    q->corner[4] = b, q->corner[5] = _mm256_add_epi32(b, sx);
    q->corner[6] = _mm256_add_epi32(b, sy), q->corner[7] = _mm256_add_epi32(q->corner[6], sx);
    return 1;
}

#define MUL _mm256_mul_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define GATHER(base, index) _mm256_i32gather_ps((base), (index), 4)

__attribute__((target("avx2"))) static void sample_range_avx2(const Sampling *s, int64_t start, int64_t end)
{
    int64_t m = start;
    for (; m + 8 <= end; m += 8) {
        Cell8 q;
        if (!cell8(s, m, &q)) {
            for (int64_t j = m; j < m + 8; ++j)
                sample_point(s, j);
            continue;
        }
        /* the weights as cell_of computes them, in grid_sample's order of the corners */
        const __m256 weight[8] = {MUL(MUL(q.ax1, q.ay1), q.az1), MUL(MUL(q.ax0, q.ay1), q.az1),
                                  MUL(MUL(q.ax1, q.ay0), q.az1), MUL(MUL(q.ax0, q.ay0), q.az1),
                                  MUL(MUL(q.ax1, q.ay1), q.az0), MUL(MUL(q.ax0, q.ay1), q.az0),
                                  MUL(MUL(q.ax1, q.ay0), q.az0), MUL(MUL(q.ax0, q.ay0), q.az0)};
        for (int64_t c = 0; c < s->channels; ++c) {
            const float *f = s->field + c * s->stride_c;
            __m256 v = _mm256_setzero_ps();
            for (int corner = 0; corner < 8; ++corner)
                v = ADD(v, MUL(GATHER(f, q.corner[corner]), weight[corner]));
            _mm256_storeu_ps(s->out + c * s->out_row + m, v);
        }
    }
    for (; m < end; ++m)
        sample_point(s, m);
}

/* The points' gradients only (no field gradient: the image warps of instance optimisation). */
__attribute__((target("avx2"))) static void sample_range_backward_avx2(const Backward *k, int64_t start, int64_t end)
{
    const Sampling *s = &k->s;
    const __m256 mz = _mm256_set1_ps((float)(s->depth - 1) / 2.0f), my = _mm256_set1_ps((float)(s->height - 1) / 2.0f),
                 mx = _mm256_set1_ps((float)(s->width - 1) / 2.0f), two = _mm256_set1_ps(2.0f);
    int64_t m = start;
    for (; m + 8 <= end; m += 8) {
        Cell8 q;
        if (!cell8(s, m, &q)) {
            for (int64_t j = m; j < m + 8; ++j)
                backward_point(k, j);
            continue;
        }
        const __m256 ax1 = q.ax1, ax0 = q.ax0, ay1 = q.ay1, ay0 = q.ay0, az1 = q.az1, az0 = q.az0;
        const __m256i o = q.corner[0], oe = q.corner[1], os = q.corner[2], ose = q.corner[3], ob = q.corner[4],
                      obe = q.corner[5], obs = q.corner[6], obse = q.corner[7];
        __m256 gx = _mm256_setzero_ps(), gy = _mm256_setzero_ps(), gz = _mm256_setzero_ps();
        for (int64_t c = 0; c < s->channels; ++c) {
            const float *f = s->field + c * s->stride_c;
            const __m256 go = _mm256_loadu_ps(k->grad_out + c * k->grad_out_row + m);
            __m256 w = GATHER(f, o);
            gx = SUB(gx, MUL(MUL(MUL(w, ay1), az1), go));
            gy = SUB(gy, MUL(MUL(MUL(w, ax1), az1), go));
            gz = SUB(gz, MUL(MUL(MUL(w, ax1), ay1), go));
            w = GATHER(f, oe);
            gx = ADD(gx, MUL(MUL(MUL(w, ay1), az1), go));
            gy = SUB(gy, MUL(MUL(MUL(w, ax0), az1), go));
            gz = SUB(gz, MUL(MUL(MUL(w, ax0), ay1), go));
            w = GATHER(f, os);
            gx = SUB(gx, MUL(MUL(MUL(w, ay0), az1), go));
            gy = ADD(gy, MUL(MUL(MUL(w, ax1), az1), go));
            gz = SUB(gz, MUL(MUL(MUL(w, ax1), ay0), go));
            w = GATHER(f, ose);
            gx = ADD(gx, MUL(MUL(MUL(w, ay0), az1), go));
            gy = ADD(gy, MUL(MUL(MUL(w, ax0), az1), go));
            gz = SUB(gz, MUL(MUL(MUL(w, ax0), ay0), go));
            w = GATHER(f, ob);
            gx = SUB(gx, MUL(MUL(MUL(w, ay1), az0), go));
            gy = SUB(gy, MUL(MUL(MUL(w, ax1), az0), go));
            gz = ADD(gz, MUL(MUL(MUL(w, ax1), ay1), go));
            w = GATHER(f, obe);
            gx = ADD(gx, MUL(MUL(MUL(w, ay1), az0), go));
            gy = SUB(gy, MUL(MUL(MUL(w, ax0), az0), go));
            gz = ADD(gz, MUL(MUL(MUL(w, ax0), ay1), go));
            w = GATHER(f, obs);
            gx = SUB(gx, MUL(MUL(MUL(w, ay0), az0), go));
            gy = ADD(gy, MUL(MUL(MUL(w, ax1), az0), go));
            gz = ADD(gz, MUL(MUL(MUL(w, ax1), ay0), go));
            w = GATHER(f, obse);
            gx = ADD(gx, MUL(MUL(MUL(w, ay0), az0), go));
            gy = ADD(gy, MUL(MUL(MUL(w, ax0), az0), go));
            gz = ADD(gz, MUL(MUL(MUL(w, ax0), ay0), go));
        }
        _mm256_storeu_ps(k->grad_points + m, MUL(MUL(mz, gz), two));
        _mm256_storeu_ps(k->grad_points + s->points_row + m, MUL(MUL(my, gy), two));
        _mm256_storeu_ps(k->grad_points + 2 * s->points_row + m, MUL(MUL(mx, gx), two));
    }
    for (; m < end; ++m)
        backward_point(k, m);
}

#undef MUL
#undef ADD
#undef SUB
#undef GATHER
#else
#define ITK_GRADICON_AVX2 0
#endif

PyDoc_STRVAR(sample_3d_doc,
"sample_3d(field, channels, depth, height, width, stride_c, stride_z, stride_y, stride_x,\n"
"          points, points_row, out, out_row, start, end)\n"
"--\n\n"
"Trilinear sampling with border values, for points start..end-1 (no checks: the caller owns the\n"
"memory). field, points and out are addresses of float32 data; strides are in elements. points\n"
"holds three rows (CUBE z, y, x in [0, 1]) points_row elements apart; out one row per channel.\n"
"The GIL is released while the points are sampled.");

static PyObject *sample_3d(PyObject *self, PyObject *args)
{
    unsigned long long field, points, out;
    long long channels, depth, height, width, stride_c, stride_z, stride_y, stride_x;
    long long points_row, out_row, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLKLKLLL", &field, &channels, &depth, &height, &width,
                          &stride_c, &stride_z, &stride_y, &stride_x, &points, &points_row, &out,
                          &out_row, &start, &end))
        return NULL;
    if (channels < 1 || depth < 1 || height < 1 || width < 1 || start < 0 || end < start) {
        PyErr_SetString(PyExc_ValueError, "sample_3d: empty field or bad range of points");
        return NULL;
    }
    const Sampling s = {(const float *)(uintptr_t)field, channels, depth, height, width,
                        stride_c, stride_z, stride_y, stride_x,
                        (const float *)(uintptr_t)points, points_row,
                        (float *)(uintptr_t)out, out_row};
    Py_BEGIN_ALLOW_THREADS
#if ITK_GRADICON_AVX2
    if (channels == 1 && have_avx2() && offsets_fit_int32(&s))  /* more channels: the scalar cell is shared */
        sample_range_avx2(&s, start, end);
    else
#endif
        sample_range(&s, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sample_3d_backward_doc,
"sample_3d_backward(field, channels, depth, height, width, stride_c, stride_z, stride_y, stride_x,\n"
"                   points, points_row, grad_out, grad_out_row, grad_field, grad_points, start, end)\n"
"--\n\n"
"Gradients of sample_3d for points start..end-1, grid_sample's backward arithmetic (no checks).\n"
"grad_out holds one row per channel. grad_field (0: not wanted) is the address of a zeroed,\n"
"contiguous float32 [channels, depth, height, width] buffer that the gradient is added to: give\n"
"each thread its own. grad_points (0: not wanted) receives three rows like points.\n"
"The GIL is released while the points are processed.");

static PyObject *sample_3d_backward(PyObject *self, PyObject *args)
{
    unsigned long long field, points, grad_out, grad_field, grad_points;
    long long channels, depth, height, width, stride_c, stride_z, stride_y, stride_x;
    long long points_row, grad_out_row, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLKLKLKKLL", &field, &channels, &depth, &height, &width,
                          &stride_c, &stride_z, &stride_y, &stride_x, &points, &points_row,
                          &grad_out, &grad_out_row, &grad_field, &grad_points, &start, &end))
        return NULL;
    if (channels < 1 || depth < 1 || height < 1 || width < 1 || start < 0 || end < start) {
        PyErr_SetString(PyExc_ValueError, "sample_3d_backward: empty field or bad range of points");
        return NULL;
    }
    const Backward k = {{(const float *)(uintptr_t)field, channels, depth, height, width,
                         stride_c, stride_z, stride_y, stride_x,
                         (const float *)(uintptr_t)points, points_row, NULL, 0},
                        (const float *)(uintptr_t)grad_out, grad_out_row,
                        (float *)(uintptr_t)grad_field, (float *)(uintptr_t)grad_points};
    Py_BEGIN_ALLOW_THREADS
#if ITK_GRADICON_AVX2
    if (k.grad_field == NULL && k.grad_points != NULL && have_avx2() && offsets_fit_int32(&k.s))
        sample_range_backward_avx2(&k, start, end);
    else
#endif
        sample_range_backward(&k, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* A 1-D correlation along one axis of a contiguous float32 array seen as [outer, n, inner]:
 *
 *     out[o, i, j] = sum over t = 0 .. taps - 1 of kernel[t] * x[o, i + t - half, j]
 *
 * with the terms whose index i + t - half falls outside 0 .. n - 1 left out (zero padding), added
 * in the order of t, from 0.0f. A separable Gaussian blur is one such pass per axis; its adjoint is
 * the same pass with the kernel reversed and half replaced by taps - 1 - half. Every output value is
 * the same whatever the split into units, so the result does not depend on the number of threads.
 * A unit is one row (o, i) of `inner` values where inner > 1 (the inner loop runs along contiguous
 * memory), one whole line o of n values where inner == 1 (the loop over i then runs along it). */
typedef struct {
    const float *x;
    float *out;
    int64_t n, inner;
    const float *kernel;
    int64_t taps, half;
} AxisFilter;

ITK_GRADICON_CLONES
static void filter_units(const AxisFilter *f, int64_t start, int64_t end)
{
    const int64_t n = f->n, inner = f->inner;
    if (inner == 1) {
        for (int64_t o = start; o < end; ++o) {
            const float *x = f->x + o * n;
            float *y = f->out + o * n;
            for (int64_t i = 0; i < n; ++i)
                y[i] = 0.0f;
            for (int64_t t = 0; t < f->taps; ++t) {
                const float k = f->kernel[t];
                const int64_t shift = t - f->half;
                const int64_t lo = shift < 0 ? -shift : 0;
                const int64_t hi = shift > 0 ? n - shift : n;
                for (int64_t i = lo; i < hi; ++i)
                    y[i] += k * x[i + shift];
            }
        }
        return;
    }
    for (int64_t u = start; u < end; ++u) {
        const int64_t o = u / n, i = u % n;
        float *y = f->out + u * inner;
        for (int64_t j = 0; j < inner; ++j)
            y[j] = 0.0f;
        for (int64_t t = 0; t < f->taps; ++t) {
            const int64_t source = i + t - f->half;
            if (source < 0 || source >= n)
                continue;
            const float k = f->kernel[t];
            const float *x = f->x + (o * n + source) * inner;
            for (int64_t j = 0; j < inner; ++j)
                y[j] += k * x[j];
        }
    }
}

PyDoc_STRVAR(filter_axis_doc,
"filter_axis(x, out, n, inner, kernel, taps, half, start, end)\n"
"--\n\n"
"One axis of a separable filter (no checks: the caller owns the memory). x and out are addresses of\n"
"contiguous float32 arrays [outer, n, inner], kernel of taps float32 values; computes\n"
"out[o, i, j] = sum_t kernel[t] x[o, i + t - half, j], terms outside 0..n-1 left out, for the units\n"
"start..end-1: the rows u = o n + i where inner > 1, the lines o where inner == 1.\n"
"The GIL is released while the units are computed.");

static PyObject *filter_axis(PyObject *self, PyObject *args)
{
    unsigned long long x, out, kernel;
    long long n, inner, taps, half, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLLKLLLL", &x, &out, &n, &inner, &kernel, &taps, &half, &start, &end))
        return NULL;
    if (n < 1 || inner < 1 || taps < 1 || half < 0 || half >= taps || start < 0 || end < start) {
        PyErr_SetString(PyExc_ValueError, "filter_axis: empty axis or kernel, or bad range of units");
        return NULL;
    }
    const AxisFilter f = {(const float *)(uintptr_t)x, (float *)(uintptr_t)out, n, inner,
                          (const float *)(uintptr_t)kernel, taps, half};
    Py_BEGIN_ALLOW_THREADS
    filter_units(&f, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The same filter with the axis padded by repeating its end values (replicate padding: MIND-SSC's box
 * means, itk_gradicon.pipeline.losses.box_mean): out[o, s, j] = sum_t kernel[t] x[o, clamp(s + t - half), j];
 * with adjoint set, its transpose: out[o, s, j] = sum over (i, t) with clamp(i + t - half) = s of
 * kernel[t] x[o, i, j] (the end values collect every term that the padding sent to them). Units as in
 * filter_units; every output value is a sum in a fixed order, whatever the split into units. */
static inline int64_t clamp_index(int64_t i, int64_t n)
{
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

/* The inputs i (first..last) whose padded shift by `shift` lands on output s, for the adjoint. */
static inline int adjoint_range(int64_t s, int64_t shift, int64_t n, int64_t *first, int64_t *last)
{
    if (n == 1) {
        *first = *last = 0;
    } else if (s == 0) {
        *first = 0, *last = -shift < n - 1 ? -shift : n - 1;
    } else if (s == n - 1) {
        *first = n - 1 - shift > 0 ? n - 1 - shift : 0, *last = n - 1;
    } else {
        *first = *last = s - shift;
    }
    return *first <= *last && *first >= 0 && *last <= n - 1;
}

/* One line of n values along the axis (inner == 1): y = the filter of x, or with adjoint set its transpose. */
static inline void replicate_row(const float *x, float *y, int64_t n, const float *kernel, int64_t taps, int64_t half,
                                 int adjoint)
{
    for (int64_t i = 0; i < n; ++i)
        y[i] = 0.0f;
    for (int64_t t = 0; t < taps; ++t) {
        const float k = kernel[t];
        const int64_t shift = t - half;
        if (!adjoint) {
            const int64_t lo = shift < 0 ? (-shift < n ? -shift : n) : 0;
            const int64_t hi = shift > 0 ? (n - shift > 0 ? n - shift : 0) : n;
            for (int64_t i = 0; i < lo; ++i)
                y[i] += k * x[0];
            for (int64_t i = lo; i < hi; ++i)
                y[i] += k * x[i + shift];
            for (int64_t i = hi > lo ? hi : lo; i < n; ++i)
                y[i] += k * x[n - 1];
        } else {
            /* interior outputs 1..n-2: one input each; the two ends: a run of inputs */
            const int64_t lo = shift > 1 ? shift : 1, hi = n + shift < n - 1 ? n + shift : n - 1;
            for (int64_t s = lo; s < hi; ++s) /* s in 1..n-2 with s - shift in 0..n-1 */
                y[s] += k * x[s - shift];
            const int64_t ends[2] = {0, n - 1};
            for (int e = 0; e < (n > 1 ? 2 : 1); ++e) {
                int64_t first, last;
                if (adjoint_range(ends[e], shift, n, &first, &last))
                    for (int64_t i = first; i <= last; ++i)
                        y[ends[e]] += k * x[i];
            }
        }
    }
}

ITK_GRADICON_CLONES
static void replicate_units(const AxisFilter *f, int adjoint, int64_t start, int64_t end)
{
    const int64_t n = f->n, inner = f->inner;
    if (inner == 1) {
        for (int64_t o = start; o < end; ++o)
            replicate_row(f->x + o * n, f->out + o * n, n, f->kernel, f->taps, f->half, adjoint);
        return;
    }
    for (int64_t u = start; u < end; ++u) {
        const int64_t o = u / n, s = u % n;
        float *y = f->out + u * inner;
        for (int64_t j = 0; j < inner; ++j)
            y[j] = 0.0f;
        for (int64_t t = 0; t < f->taps; ++t) {
            const int64_t shift = t - f->half;
            int64_t first, last;
            if (!adjoint)
                first = last = clamp_index(s + shift, n);
            else if (!adjoint_range(s, shift, n, &first, &last))
                continue;
            const float k = f->kernel[t];
            for (int64_t i = first; i <= last; ++i) {
                const float *x = f->x + (o * n + i) * inner;
                for (int64_t j = 0; j < inner; ++j)
                    y[j] += k * x[j];
            }
        }
    }
}

PyDoc_STRVAR(filter_axis_replicate_doc,
"filter_axis_replicate(x, out, n, inner, kernel, taps, half, adjoint, start, end)\n"
"--\n\n"
"filter_axis with the axis padded by its end values: out[o, i, j] = sum_t kernel[t] x[o, clamp(i + t - half),\n"
"j]; adjoint = 1 computes the transposed map (for the backward pass). Same units and conditions as\n"
"filter_axis; the GIL is released while the units are computed.");

static PyObject *filter_axis_replicate(PyObject *self, PyObject *args)
{
    unsigned long long x, out, kernel;
    long long n, inner, taps, half, start, end;
    int adjoint;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLLKLLiLL", &x, &out, &n, &inner, &kernel, &taps, &half, &adjoint, &start, &end))
        return NULL;
    if (n < 1 || inner < 1 || taps < 1 || half < 0 || half >= taps || start < 0 || end < start) {
        PyErr_SetString(PyExc_ValueError, "filter_axis_replicate: empty axis or kernel, or bad range of units");
        return NULL;
    }
    const AxisFilter f = {(const float *)(uintptr_t)x, (float *)(uintptr_t)out, n, inner,
                          (const float *)(uintptr_t)kernel, taps, half};
    Py_BEGIN_ALLOW_THREADS
    replicate_units(&f, adjoint != 0, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * LNCC against a fixed image, pointwise parts (itk_gradicon.pipeline.losses): n voxels, contiguous
 * float32. The moments m holds three rows of n: the windowed means of w, w t and w w (w the warped image,
 * t the fixed one); mu_j and var_j the fixed image's windowed mean and variance (eps added). Per voxel:
 *   cov = m1 - m0 mu_j,  v = max(m2 - m0 m0, 0) + eps,  r = cov / sqrt(v var_j)
 * lncc_moments writes the three rows w, w t, w w; lncc_map writes r; lncc_backward writes, for the
 * upstream gradient g of r, the gradients with respect to the three moments; lncc_combine adds the
 * three blurred-back rows into the gradient with respect to w: G0 + t G1 + 2 w G2.
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *w, *t, *m, *mu_j, *var_j, *g, *blurred;
    float *out;
    int64_t n;
    float eps;
} LNCCParts;

static void lncc_moments_range(const LNCCParts *p, int64_t start, int64_t end)
{
    for (int64_t i = start; i < end; ++i) {
        const float w = p->w[i];
        p->out[i] = w;
        p->out[p->n + i] = w * p->t[i];
        p->out[2 * p->n + i] = w * w;
    }
}

static void lncc_map_range(const LNCCParts *p, int64_t start, int64_t end)
{
    const float *m0 = p->m, *m1 = p->m + p->n, *m2 = p->m + 2 * p->n;
    for (int64_t i = start; i < end; ++i) {
        const float cov = m1[i] - m0[i] * p->mu_j[i];
        const float raw = m2[i] - m0[i] * m0[i];
        const float v = (raw > 0.0f ? raw : 0.0f) + p->eps;
        p->out[i] = cov / sqrtf(v * p->var_j[i]);
    }
}

static void lncc_backward_range(const LNCCParts *p, int64_t start, int64_t end)
{
    const float *m0 = p->m, *m1 = p->m + p->n, *m2 = p->m + 2 * p->n;
    float *g0 = p->out, *g1 = p->out + p->n, *g2 = p->out + 2 * p->n;
    for (int64_t i = start; i < end; ++i) {
        const float cov = m1[i] - m0[i] * p->mu_j[i];
        const float raw = m2[i] - m0[i] * m0[i];
        const float v = (raw > 0.0f ? raw : 0.0f) + p->eps;
        const float inverse = 1.0f / sqrtf(v * p->var_j[i]);
        const float g = p->g[i];
        const float g_cov = g * inverse;                                          /* dr/dcov = 1 / sqrt(v var_j) */
        const float g_v = raw > 0.0f ? -0.5f * g * cov * inverse / v : 0.0f;      /* dr/dv = -r / (2 v) */
        g0[i] = -g_cov * p->mu_j[i] - 2.0f * m0[i] * g_v;
        g1[i] = g_cov;
        g2[i] = g_v;
    }
}

static void lncc_combine_range(const LNCCParts *p, int64_t start, int64_t end)
{
    const float *b0 = p->blurred, *b1 = p->blurred + p->n, *b2 = p->blurred + 2 * p->n;
    for (int64_t i = start; i < end; ++i)
        p->out[i] = b0[i] + p->t[i] * b1[i] + 2.0f * p->w[i] * b2[i];
}

PyDoc_STRVAR(lncc_part_doc,
"lncc_part(which, w, t, m, mu_j, var_j, g, blurred, out, n, eps, start, end)\n"
"--\n\n"
"One pointwise part of LNCC against a fixed image for voxels start..end-1 (no checks: the caller owns\n"
"the memory; addresses of contiguous float32 arrays, 0 where a part does not read one): which = 0\n"
"(out = the three rows w, w t, w w), 1 (out = the LNCC map from the moments m), 2 (out = the three\n"
"rows of the gradients of the moments for the upstream g), 3 (out = blurred0 + t blurred1 + 2 w\n"
"blurred2). The GIL is released while the voxels are computed.");

static PyObject *lncc_part(PyObject *self, PyObject *args)
{
    int which;
    unsigned long long w, t, m, mu_j, var_j, g, blurred, out;
    long long n, start, end;
    float eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKLfLL", &which, &w, &t, &m, &mu_j, &var_j, &g, &blurred, &out, &n, &eps,
                          &start, &end))
        return NULL;
    if (which < 0 || which > 3 || n < 0 || start < 0 || end < start || end > n) {
        PyErr_SetString(PyExc_ValueError, "lncc_part: unknown part or bad range of voxels");
        return NULL;
    }
    const LNCCParts p = {(const float *)(uintptr_t)w, (const float *)(uintptr_t)t, (const float *)(uintptr_t)m,
                         (const float *)(uintptr_t)mu_j, (const float *)(uintptr_t)var_j,
                         (const float *)(uintptr_t)g, (const float *)(uintptr_t)blurred,
                         (float *)(uintptr_t)out, n, eps};
    Py_BEGIN_ALLOW_THREADS
    switch (which) {
    case 0: lncc_moments_range(&p, start, end); break;
    case 1: lncc_map_range(&p, start, end); break;
    case 2: lncc_backward_range(&p, start, end); break;
    default: lncc_combine_range(&p, start, end); break;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * An image warped by a displacement in voxels on its own grid, zero outside (field IO's warps of the
 * two images, itk_gradicon.pipeline.instance.warp_voxels): for node (z, y, x) of a contiguous float32
 * [D, H, W] image and a contiguous 3-channel float32 displacement v on the same grid, the trilinear value
 * at q = (z + v0, y + v1, x + v2), nodes outside the image counting 0 (so 0 beyond one node outside; a NaN
 * point gives 0). which = 0 writes the values; which = 1 writes the gradient of sum(g * value) with respect
 * to v (three rows of D H W values).
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *image, *v, *g;
    float *out;
    int64_t depth, height, width;
} VoxelWarp;

/* Linear interpolation in one cell from its eight corner values c (z, y, x order: 000, 001, 010, 011, 100, 101,
 * 110, 111) and the point's offsets dz, dy, dx from its first corner: the value (along x, then y, then z) and, with
 * `gradient`, its derivatives along z, y and x. The arithmetic of warp_voxels and round_trip. */
typedef struct {
    float value, dz, dy, dx;
} CellLinear;

static inline CellLinear cell_linear(const float c[8], float dz, float dy, float dx, int gradient)
{
    const float ez = 1.0f - dz, ey = 1.0f - dy, ex = 1.0f - dx;
    const float x00 = ex * c[0] + dx * c[1], x01 = ex * c[2] + dx * c[3];
    const float x10 = ex * c[4] + dx * c[5], x11 = ex * c[6] + dx * c[7];
    const float y0v = ey * x00 + dy * x01, y1v = ey * x10 + dy * x11;
    CellLinear r = {ez * y0v + dz * y1v, 0.0f, 0.0f, 0.0f};
    if (gradient) {
        r.dz = y1v - y0v;
        r.dy = ez * (x01 - x00) + dz * (x11 - x10);
        r.dx = ez * (ey * (c[1] - c[0]) + dy * (c[3] - c[2])) + dz * (ey * (c[5] - c[4]) + dy * (c[7] - c[6]));
    }
    return r;
}

static inline float node_or_zero(const VoxelWarp *w, int64_t z, int64_t y, int64_t x)
{
    if (z < 0 || y < 0 || x < 0 || z >= w->depth || y >= w->height || x >= w->width)
        return 0.0f;
    return w->image[(z * w->height + y) * w->width + x];
}

ITK_GRADICON_CLONES
static void voxel_warp_range(const VoxelWarp *w, int which, int64_t start, int64_t end)
{
    const int64_t D = w->depth, H = w->height, W = w->width, n = D * H * W, plane = H * W;
    int64_t z = start / plane, y = (start / W) % H, x = start % W;
    for (int64_t m = start; m < end; ++m) {
        const float qz = (float)z + w->v[m], qy = (float)y + w->v[n + m], qx = (float)x + w->v[2 * n + m];
        if (++x == W) { /* the next node */
            x = 0;
            if (++y == H)
                y = 0, ++z;
        }
        if (!(qz > -1.0f && qz < (float)D && qy > -1.0f && qy < (float)H && qx > -1.0f && qx < (float)W)) {
            if (which == 0)
                w->out[m] = 0.0f;
            else
                w->out[m] = w->out[n + m] = w->out[2 * n + m] = 0.0f;
            continue;
        }
        const float fz = floorf(qz), fy = floorf(qy), fx = floorf(qx);
        const int64_t z0 = (int64_t)fz, y0 = (int64_t)fy, x0 = (int64_t)fx;
        float c[8];
        if (z0 >= 0 && y0 >= 0 && x0 >= 0 && z0 + 1 < D && y0 + 1 < H && x0 + 1 < W) { /* the usual case */
            const float *a = w->image + (z0 * H + y0) * W + x0, *b = a + plane;
            c[0] = a[0], c[1] = a[1], c[2] = a[W], c[3] = a[W + 1];
            c[4] = b[0], c[5] = b[1], c[6] = b[W], c[7] = b[W + 1];
        } else {
            for (int corner = 0; corner < 8; ++corner)
                c[corner] = node_or_zero(w, z0 + (corner >> 2), y0 + ((corner >> 1) & 1), x0 + (corner & 1));
        }
        const CellLinear r = cell_linear(c, qz - fz, qy - fy, qx - fx, which == 1);
        if (which == 0) {
            w->out[m] = r.value;
            continue;
        }
        const float g = w->g[m];
        w->out[m] = g * r.dz;
        w->out[n + m] = g * r.dy;
        w->out[2 * n + m] = g * r.dx;
    }
}

PyDoc_STRVAR(warp_voxels_doc,
"warp_voxels(which, image, v, g, out, depth, height, width, start, end)\n"
"--\n\n"
"An image [depth, height, width] (contiguous float32) at node + v (v: contiguous float32 [3, depth, height,\n"
"width], in voxels), linear, zero outside, for the nodes start..end-1: which = 0 writes the values to out,\n"
"which = 1 the gradient of sum(g * value) with respect to v to out [3, depth, height, width] (no checks:\n"
"the caller owns the memory). The GIL is released meanwhile.");

static PyObject *warp_voxels(PyObject *self, PyObject *args)
{
    int which;
    unsigned long long image, v, g, out;
    long long depth, height, width, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKLLLLL", &which, &image, &v, &g, &out, &depth, &height, &width, &start, &end))
        return NULL;
    if (which < 0 || which > 1 || depth < 1 || height < 1 || width < 1 || start < 0 || end < start
        || end > depth * height * width) {
        PyErr_SetString(PyExc_ValueError, "warp_voxels: unknown part, empty grid or bad range of nodes");
        return NULL;
    }
    const VoxelWarp w = {(const float *)(uintptr_t)image, (const float *)(uintptr_t)v, (const float *)(uintptr_t)g,
                         (float *)(uintptr_t)out, depth, height, width};
    Py_BEGIN_ALLOW_THREADS
    voxel_warp_range(&w, which, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * Field IO's inverse-consistency round trip in voxels (itk_gradicon.pipeline.instance.round_trip_voxels):
 * for two contiguous float32 3-channel displacements a (first) and b (second) on one [D, H, W] grid, in
 * voxels, channel c along array axis c, at every node p
 *   c(p) = a(p) + b(q),  q = p + a(p) clipped into the grid (border values, as grid_sample's "border"),
 * b linear between nodes. which = 0 adds sum_p |c(p)|^2 (float64) into *sums; which = 1 writes, for the
 * gradient scale g (the upstream gradient times 2 / count), the gradient with respect to a at p,
 *   g (c + J_b(q)^T c)   (J's column c zero where q was clipped along axis c),
 * and adds g c(p) w into the buffer for b at each of q's corners (w their linear weights).
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *a, *b;
    float *grad_a, *grad_b;
    double *sums;
    float g;
    int64_t depth, height, width;
} RoundTrip;

/* q clipped into [0, size - 1]; *moves: whether the clip let it move (strictly inside). */
static inline float clip_node(float q, int64_t size, int *moves)
{
    const float high = (float)(size - 1);
    *moves = q > 0.0f && q < high;
    return q > 0.0f ? (q < high ? q : high) : 0.0f;
}

ITK_GRADICON_CLONES
static void round_trip_range(const RoundTrip *k, int which, int64_t start, int64_t end)
{
    const int64_t D = k->depth, H = k->height, W = k->width, plane = H * W, n = D * plane;
    int64_t z = start / plane, y = (start / W) % H, x = start % W;
    double total = 0.0;
    for (int64_t m = start; m < end; ++m) {
        const float a0 = k->a[m], a1 = k->a[n + m], a2 = k->a[2 * n + m];
        int mz, my, mx;
        const float qz = clip_node((float)z + a0, D, &mz), qy = clip_node((float)y + a1, H, &my),
                    qx = clip_node((float)x + a2, W, &mx);
        if (++x == W) {
            x = 0;
            if (++y == H)
                y = 0, ++z;
        }
        const int64_t z0 = (int64_t)qz, y0 = (int64_t)qy, x0 = (int64_t)qx;
        const int64_t z1 = z0 + 1 < D ? z0 + 1 : z0, y1 = y0 + 1 < H ? y0 + 1 : y0, x1 = x0 + 1 < W ? x0 + 1 : x0;
        const float dz = qz - (float)z0, dy = qy - (float)y0, dx = qx - (float)x0;
        const float ez = 1.0f - dz, ey = 1.0f - dy, ex = 1.0f - dx;
        const int64_t o[8] = {(z0 * H + y0) * W + x0, (z0 * H + y0) * W + x1, (z0 * H + y1) * W + x0,
                              (z0 * H + y1) * W + x1, (z1 * H + y0) * W + x0, (z1 * H + y0) * W + x1,
                              (z1 * H + y1) * W + x0, (z1 * H + y1) * W + x1};
        float comp[3], jz[3], jy[3], jx[3];
        const float a[3] = {a0, a1, a2};
        for (int c = 0; c < 3; ++c) {
            const float *f = k->b + c * n;
            const float corners[8] = {f[o[0]], f[o[1]], f[o[2]], f[o[3]], f[o[4]], f[o[5]], f[o[6]], f[o[7]]};
            const CellLinear r = cell_linear(corners, dz, dy, dx, which == 1);
            comp[c] = a[c] + r.value;
            jz[c] = r.dz, jy[c] = r.dy, jx[c] = r.dx;
        }
        if (which == 0) {
            total += (double)(comp[0] * comp[0] + comp[1] * comp[1] + comp[2] * comp[2]);
            continue;
        }
        const float g0 = k->g * comp[0], g1 = k->g * comp[1], g2 = k->g * comp[2];
        k->grad_a[m] = g0 + (mz ? g0 * jz[0] + g1 * jz[1] + g2 * jz[2] : 0.0f);
        k->grad_a[n + m] = g1 + (my ? g0 * jy[0] + g1 * jy[1] + g2 * jy[2] : 0.0f);
        k->grad_a[2 * n + m] = g2 + (mx ? g0 * jx[0] + g1 * jx[1] + g2 * jx[2] : 0.0f);
        const float w[8] = {ez * ey * ex, ez * ey * dx, ez * dy * ex, ez * dy * dx,
                            dz * ey * ex, dz * ey * dx, dz * dy * ex, dz * dy * dx};
        const float gc[3] = {g0, g1, g2};
        for (int c = 0; c < 3; ++c) {
            float *buffer = k->grad_b + c * n;
            for (int corner = 0; corner < 8; ++corner)
                buffer[o[corner]] += gc[c] * w[corner];
        }
    }
    if (which == 0)
        *k->sums += total;
}

PyDoc_STRVAR(round_trip_doc,
"round_trip(which, a, b, grad_a, grad_b, sums, g, depth, height, width, start, end)\n"
"--\n\n"
"Field IO's round trip a(p) + b(p + a(p)) (border values) of two contiguous float32 [3, depth, height, width]\n"
"displacements in voxels, nodes start..end-1: which = 0 adds the sum of its squared lengths to the float64 at\n"
"sums; which = 1 writes g times its gradient with respect to a to grad_a and adds the one with respect to b to\n"
"the zeroed buffer grad_b (no checks: the caller owns the memory). The GIL is released meanwhile.");

static PyObject *round_trip(PyObject *self, PyObject *args)
{
    int which;
    unsigned long long a, b, grad_a, grad_b, sums;
    float g;
    long long depth, height, width, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKKfLLLLL", &which, &a, &b, &grad_a, &grad_b, &sums, &g, &depth, &height, &width,
                          &start, &end))
        return NULL;
    if (which < 0 || which > 1 || depth < 1 || height < 1 || width < 1 || start < 0 || end < start
        || end > depth * height * width) {
        PyErr_SetString(PyExc_ValueError, "round_trip: unknown part, empty grid or bad range of nodes");
        return NULL;
    }
    const RoundTrip k = {(const float *)(uintptr_t)a, (const float *)(uintptr_t)b, (float *)(uintptr_t)grad_a,
                         (float *)(uintptr_t)grad_b, (double *)(uintptr_t)sums, g, depth, height, width};
    Py_BEGIN_ALLOW_THREADS
    round_trip_range(&k, which, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * The diffusion penalty of field IO (itk_gradicon.pipeline.instance.diffusion_penalty_voxels) on a contiguous
 * float32 displacement in voxels [3, D, H, W]: with d_a(x) = u[x + e_a] - u[x] the forward difference
 * along axis a (where x + e_a is inside), diffusion_sums adds, for the planes (c, z) start..end-1, the
 * squares of d_a into sums[a] (double); diffusion_gradient writes
 *   out[c, x] = sum_a weight[a] (d_a(x - e_a) - d_a(x))   (terms that do not exist left out)
 * for the same planes: the gradient of sum_a weight[a] / 2 sum d_a^2 (weight = 2 g / count_a).
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *u;
    float *out;
    double *sums;
    int64_t depth, height, width;
    float weight[3];
} Diffusion;

/* The sum of the squares of a[x] - b[x] over n values, in eight running partial sums (so that the
 * compiler can keep them in one vector register). */
static inline double squared_differences(const float *a, const float *b, int64_t n)
{
    float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t x = 0;
    for (; x + 8 <= n; x += 8)
        for (int j = 0; j < 8; ++j) {
            const float d = a[x + j] - b[x + j];
            partial[j] += d * d;
        }
    double total = 0.0;
    for (; x < n; ++x) {
        const float d = a[x] - b[x];
        total += (double)(d * d);
    }
    for (int j = 0; j < 8; ++j)
        total += (double)partial[j];
    return total;
}

ITK_GRADICON_CLONES
static void diffusion_sums_range(const Diffusion *k, int64_t start, int64_t end)
{
    const int64_t H = k->height, W = k->width, plane = H * W;
    double sz = 0.0, sy = 0.0, sx = 0.0;
    for (int64_t cz = start; cz < end; ++cz) {
        const int64_t z = cz % k->depth;
        const float *u = k->u + cz * plane;
        if (z + 1 < k->depth)
            sz += squared_differences(u + plane, u, plane);
        if (H > 1)
            sy += squared_differences(u + W, u, plane - W);
        for (int64_t y = 0; y < H && W > 1; ++y)
            sx += squared_differences(u + y * W + 1, u + y * W, W - 1);
    }
    k->sums[0] = sz, k->sums[1] = sy, k->sums[2] = sx;
}

/* One row of the gradient: neighbours along z and y given as rows (the row itself where the neighbour
 * does not exist: its difference is then 0); along x the ends are handled apart. */
static inline void gradient_row(const float *row, const float *zp, const float *zn, const float *yp,
                                const float *yn, float *out, int64_t W, float wz, float wy, float wx)
{
    for (int64_t x = 0; x < W; ++x) {
        const float here = row[x];
        float total = wz * (here - zp[x]);
        total -= wz * (zn[x] - here);
        total += wy * (here - yp[x]);
        total -= wy * (yn[x] - here);
        out[x] = total;
    }
    for (int64_t x = 1; x < W; ++x)
        out[x] += wx * (row[x] - row[x - 1]);
    for (int64_t x = 0; x + 1 < W; ++x)
        out[x] -= wx * (row[x + 1] - row[x]);
}

ITK_GRADICON_CLONES
static void diffusion_gradient_range(const Diffusion *k, int64_t start, int64_t end)
{
    const int64_t D = k->depth, H = k->height, W = k->width, plane = H * W;
    for (int64_t cz = start; cz < end; ++cz) {
        const int64_t z = cz % D;
        const float *u = k->u + cz * plane;
        float *o = k->out + cz * plane;
        for (int64_t y = 0; y < H; ++y) {
            const float *row = u + y * W;
            gradient_row(row, z > 0 ? row - plane : row, z + 1 < D ? row + plane : row, y > 0 ? row - W : row,
                         y + 1 < H ? row + W : row, o + y * W, W, k->weight[0], k->weight[1], k->weight[2]);
        }
    }
}

PyDoc_STRVAR(diffusion_part_doc,
"diffusion_part(which, u, out, sums, depth, height, width, weight_z, weight_y, weight_x, start, end)\n"
"--\n\n"
"Field IO's diffusion penalty on a contiguous float32 [3, depth, height, width] displacement in voxels for\n"
"the planes (c, z) start..end-1 (no checks: the caller owns the memory): which = 0 adds the squared\n"
"forward differences along z, y, x into three float64 values at sums; which = 1 writes the gradient\n"
"sum_a weight[a] (d_a(x - e_a) - d_a(x)) to out. The GIL is released meanwhile.");

static PyObject *diffusion_part(PyObject *self, PyObject *args)
{
    int which;
    unsigned long long u, out, sums;
    long long depth, height, width, start, end;
    float w0, w1, w2;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKLLLfffLL", &which, &u, &out, &sums, &depth, &height, &width, &w0, &w1, &w2,
                          &start, &end))
        return NULL;
    if (which < 0 || which > 1 || depth < 1 || height < 1 || width < 1 || start < 0 || end < start
        || end > 3 * depth) {
        PyErr_SetString(PyExc_ValueError, "diffusion_part: unknown part, empty grid or bad range of planes");
        return NULL;
    }
    const Diffusion k = {(const float *)(uintptr_t)u, (float *)(uintptr_t)out, (double *)(uintptr_t)sums,
                         depth, height, width, {w0, w1, w2}};
    Py_BEGIN_ALLOW_THREADS
    if (which == 0)
        diffusion_sums_range(&k, start, end);
    else
        diffusion_gradient_range(&k, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * MIND-SSC against a fixed image's descriptors, pointwise parts (itk_gradicon.pipeline.losses): a contiguous
 * float32 [D, H, W] image I, P pairs of voxel offsets (a_p, b_p) (int64, six per pair: a's z, y, x, then b's),
 * P-channel float32 buffers of D H W values each, rows (z, y) start..end-1 of the grid. Indices outside the
 * grid are clamped (replicate padding); box is the patch's 1-D kernel (taps values, replicate padding, as
 * filter_axis_replicate). Per voxel x, with D the box means of the differences (part 0's output filtered along
 * the two other axes by the caller), v their variance (part 1), c = clamp(v, low, high), m_p = D_p - min_q D_q and
 * Y = exp(E) the descriptors:
 *   which 0: out_p = the box along the row of (I(x + a_p) - I(x + b_p))^2   the patch differences
 *   which 1: out = mean_p m_p, its sum over the rows into sums[0]          the variance
 *   which 2: out_p = -m_p / c                                              the exponents E (the caller takes exp)
 *   which 3: out = mean_p (Y_p - T_p)^2                                    T: the target's descriptors
 *   which 4: out_p = the gradient of sum_x g(x) out(x) of part 3 with respect to D_p (c's bounds constant, the
 *            minimum's share to its first channel), then the box's transpose along the row
 *   which 5: out_p *= 2 (I(x + a_p) - I(x + b_p))                         in place: the differences' gradient
 *   which 6: out(y) = sum_p (sum over x with clamp(x + a_p) = y of G_p(x) - the same for b_p), the gradient with
 *            respect to I of sum_p G_p (I(x + a_p) - I(x + b_p))
 * Every loop runs along a row, so that the compiler keeps a row's voxels in vector registers.
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *image, *a, *b, *c, *g, *y, *box;
    float *out;
    double *sums;
    const int64_t *offsets;
    int64_t pairs, depth, height, width, taps;
    float low, high;
} MINDParts;

/* Row (z, y) of pair p's differences I(clamp(. + a)) - I(clamp(. + b)) into d[0..W). */
static inline void pair_row(const MINDParts *k, int64_t p, int64_t z, int64_t y, float *d)
{
    const int64_t *o = k->offsets + 6 * p, D = k->depth, H = k->height, W = k->width;
    const float *ra = k->image + (clamp_index(z + o[0], D) * H + clamp_index(y + o[1], H)) * W;
    const float *rb = k->image + (clamp_index(z + o[3], D) * H + clamp_index(y + o[4], H)) * W;
    const int64_t ax = o[2], bx = o[5];
    int64_t lo = 0, hi = W;                      /* x + ax and x + bx inside the row for lo <= x < hi */
    lo = -ax > lo ? -ax : lo, lo = -bx > lo ? -bx : lo;
    hi = W - ax < hi ? W - ax : hi, hi = W - bx < hi ? W - bx : hi;
    if (hi < lo)
        hi = lo;
    if (lo > W)
        lo = hi = W;
    for (int64_t x = 0; x < lo; ++x)
        d[x] = ra[clamp_index(x + ax, W)] - rb[clamp_index(x + bx, W)];
    for (int64_t x = lo; x < hi; ++x)
        d[x] = ra[x + ax] - rb[x + bx];
    for (int64_t x = hi; x < W; ++x)
        d[x] = ra[clamp_index(x + ax, W)] - rb[clamp_index(x + bx, W)];
}

/* min over the channels of row i0..i0+W-1 of the P-channel a (channel stride n) into lowest. */
static inline void lowest_row(const MINDParts *k, int64_t i0, int64_t n, float *lowest)
{
    const int64_t W = k->width;
    for (int64_t x = 0; x < W; ++x)
        lowest[x] = k->a[i0 + x];
    for (int64_t p = 1; p < k->pairs; ++p) {
        const float *a = k->a + p * n + i0;
        for (int64_t x = 0; x < W; ++x)
            lowest[x] = a[x] < lowest[x] ? a[x] : lowest[x];
    }
}

/* Row (z, y) of part 6: out(y) = sum_p (the G_p(x) with clamp(x + a_p) = y) - (those with clamp(x + b_p) = y). */
static inline void gather_row(const MINDParts *k, int64_t z, int64_t y, float *acc)
{
    const int64_t D = k->depth, H = k->height, W = k->width, n = D * H * W;
    for (int64_t x = 0; x < W; ++x)
        acc[x] = 0.0f;
    for (int64_t p = 0; p < k->pairs; ++p) {
        const int64_t *o = k->offsets + 6 * p;
        for (int side = 0; side < 2; ++side, o += 3) {
            const float sign = side == 0 ? 1.0f : -1.0f;
            int64_t z0, z1, y0, y1;    /* the rows whose clamped shift lands on this one (adjoint_range) */
            if (!adjoint_range(z, o[0], D, &z0, &z1) || !adjoint_range(y, o[1], H, &y0, &y1))
                continue;
            const int64_t ox = o[2];
            int64_t lo = ox > 1 ? ox : 1, hi = W - 1 < W + ox ? W - 1 : W + ox;   /* one source x - ox */
            if (hi < lo)
                hi = lo;
            if (lo > W)
                lo = hi = W;
            for (int64_t zz = z0; zz <= z1; ++zz)
                for (int64_t yy = y0; yy <= y1; ++yy) {
                    const float *row = k->a + p * n + (zz * H + yy) * W;
                    for (int64_t x = lo; x < hi; ++x)
                        acc[x] += sign * row[x - ox];
                    for (int64_t x = 0; x < W; ++x) {
                        if (x == lo)
                            x = hi;
                        if (x >= W)
                            break;
                        int64_t x0, x1;
                        if (adjoint_range(x, ox, W, &x0, &x1))
                            for (int64_t xx = x0; xx <= x1; ++xx)
                                acc[x] += sign * row[xx];
                    }
                }
        }
    }
}

ITK_GRADICON_CLONES
static void mind_rows(const MINDParts *k, int which, int64_t start, int64_t end, float *t0, float *t1, float *t2,
                      int64_t *index)
{
    const int64_t H = k->height, W = k->width, n = k->depth * H * W, P = k->pairs;
    double total = 0.0;
    for (int64_t row = start; row < end; ++row) {
        const int64_t z = row / H, y = row % H, i0 = row * W;
        if (which == 0 || which == 5) {
            for (int64_t p = 0; p < P; ++p) {
                float *out = k->out + p * n + i0;
                pair_row(k, p, z, y, t0);
                if (which == 0) {  /* squared, then the box along the row */
                    for (int64_t x = 0; x < W; ++x)
                        t1[x] = t0[x] * t0[x];
                    replicate_row(t1, out, W, k->box, k->taps, (k->taps - 1) / 2, 0);
                } else {
                    for (int64_t x = 0; x < W; ++x)
                        out[x] *= 2.0f * t0[x];
                }
            }
        } else if (which == 1) {
            lowest_row(k, i0, n, t0);
            for (int64_t x = 0; x < W; ++x)
                t1[x] = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                const float *a = k->a + p * n + i0;
                for (int64_t x = 0; x < W; ++x)
                    t1[x] += a[x] - t0[x];
            }
            for (int64_t x = 0; x < W; ++x) {
                const float v = t1[x] / (float)P;
                k->out[i0 + x] = v;
                total += (double)v;
            }
        } else if (which == 2 || which == 4) {
            lowest_row(k, i0, n, t0);
            const float *v = k->b + i0;
            for (int64_t x = 0; x < W; ++x)    /* the variance clamped */
                t1[x] = v[x] < k->low ? k->low : (v[x] > k->high ? k->high : v[x]);
            if (which == 2) {
                for (int64_t p = 0; p < P; ++p) {
                    const float *a = k->a + p * n + i0;
                    float *out = k->out + p * n + i0;
                    for (int64_t x = 0; x < W; ++x)
                        out[x] = -(a[x] - t0[x]) / t1[x];
                }
                continue;
            }
            for (int64_t x = 0; x < W; ++x)    /* the first channel holding the minimum */
                index[x] = 0;
            for (int64_t p = P - 1; p > 0; --p) {
                const float *a = k->a + p * n + i0;
                for (int64_t x = 0; x < W; ++x)
                    index[x] = a[x] == t0[x] ? p : index[x];
            }
            for (int64_t x = 0; x < W; ++x)
                t2[x] = 0.0f;
            const float *g = k->g + i0;
            for (int64_t p = 0; p < P; ++p) {  /* out_p holds the weighted gradient g_p y_p meanwhile */
                const float *a = k->a + p * n + i0, *t = k->c + p * n + i0, *d = k->y + p * n + i0;
                float *out = k->out + p * n + i0;
                for (int64_t x = 0; x < W; ++x) {
                    const float weighted = 2.0f * g[x] / (float)P * (d[x] - t[x]) * d[x];
                    out[x] = weighted;
                    t2[x] += weighted * (a[x] - t0[x]);
                }
            }
            for (int64_t x = 0; x < W; ++x) {
                const float unclamped = (v[x] >= k->low && v[x] <= k->high) ? 1.0f : 0.0f;
                t2[x] = t2[x] / (t1[x] * t1[x]) * unclamped / (float)P;
                t0[x] = 0.0f;                  /* now the sum of the channels' gradients */
            }
            for (int64_t p = 0; p < P; ++p) {
                float *out = k->out + p * n + i0;
                for (int64_t x = 0; x < W; ++x) {
                    const float grad = t2[x] - out[x] / t1[x];
                    out[x] = grad;
                    t0[x] += grad;
                }
            }
            for (int64_t x = 0; x < W; ++x)
                k->out[index[x] * n + i0 + x] -= t0[x];
            for (int64_t p = 0; p < P; ++p) {  /* the box's transpose along the row */
                float *out = k->out + p * n + i0;
                replicate_row(out, t1, W, k->box, k->taps, (k->taps - 1) / 2, 1);
                for (int64_t x = 0; x < W; ++x)
                    out[x] = t1[x];
            }
        } else if (which == 3) {
            for (int64_t x = 0; x < W; ++x)
                t0[x] = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                const float *d = k->y + p * n + i0, *t = k->c + p * n + i0;
                for (int64_t x = 0; x < W; ++x) {
                    const float difference = d[x] - t[x];
                    t0[x] += difference * difference;
                }
            }
            for (int64_t x = 0; x < W; ++x)
                k->out[i0 + x] = t0[x] / (float)P;
        } else {
            gather_row(k, z, y, t0);
            for (int64_t x = 0; x < W; ++x)
                k->out[i0 + x] = t0[x];
        }
    }
    if (which == 1)
        k->sums[0] = total;
}

PyDoc_STRVAR(mind_part_doc,
"mind_part(which, image, a, b, c, g, y, out, sums, offsets, pairs, depth, height, width, box, taps, low, high,\n"
"          start, end)\n"
"--\n\n"
"One part of MIND-SSC against a fixed image's descriptors c for the rows (z, y) start..end-1 (no checks: the\n"
"caller owns the memory; addresses of contiguous arrays, 0 where a part does not read one): which = 0 (out =\n"
"the squared pair differences of image, filtered by box along the rows), 1 (out = the variance of the distances a, its sum to sums[0]), 2 (out\n"
"= the exponents from a and the variance b), 3 (out = the mean squared difference of the descriptors y to c),\n"
"4 (out = its gradient with respect to a for the upstream g, then box's transpose along the rows), 5 (out *= twice the pair differences of image),\n"
"6 (out = the gradient with respect to image from the differences' gradient a). The GIL is released meanwhile.");

static PyObject *mind_part(PyObject *self, PyObject *args)
{
    int which;
    unsigned long long image, a, b, c, g, y, out, sums, offsets, box;
    long long pairs, depth, height, width, taps, start, end;
    float low, high;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKKLLLLKLffLL", &which, &image, &a, &b, &c, &g, &y, &out, &sums, &offsets,
                          &pairs, &depth, &height, &width, &box, &taps, &low, &high, &start, &end))
        return NULL;
    if (which < 0 || which > 6 || pairs < 1 || depth < 1 || height < 1 || width < 1 || taps < 1 || start < 0
        || end < start || end > depth * height) {
        PyErr_SetString(PyExc_ValueError, "mind_part: unknown part, empty grid or bad range of rows");
        return NULL;
    }
    const MINDParts k = {(const float *)(uintptr_t)image, (const float *)(uintptr_t)a, (const float *)(uintptr_t)b,
                         (const float *)(uintptr_t)c, (const float *)(uintptr_t)g, (const float *)(uintptr_t)y,
                         (const float *)(uintptr_t)box, (float *)(uintptr_t)out, (double *)(uintptr_t)sums,
                         (const int64_t *)(uintptr_t)offsets, pairs, depth, height, width, taps, low, high};
    const int64_t W = width;
    float *scratch = (float *)malloc((size_t)(3 * W) * sizeof(float));
    int64_t *index = (int64_t *)malloc((size_t)W * sizeof(int64_t));
    if (scratch == NULL || index == NULL) {
        free(scratch);
        free(index);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    mind_rows(&k, which, start, end, scratch, scratch + W, scratch + 2 * W, index);
    Py_END_ALLOW_THREADS
    free(scratch);
    free(index);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * A network map's WORLD displacement at every voxel centre of an image grid, one pass per voxel
 * (itk_gradicon.spatial.frames.displacement_on_grid): for the INDEX point p = (i, j, k) of voxel
 * [k, j, i] of an output [nk, nj, ni, 3], in float64,
 *   c = A p + a                 the CUBE point of the map's source frame,
 *   y = c + u(c)                u the 3-channel CUBE displacement, sampled at c rounded to float32
 *                               exactly as sample_3d samples it (border values outside),
 *   out = (B y + b) - (W p + w) stored as float32,
 * with A, B, W 3 x 4 row-major (the last column the translation): the arithmetic of the torch path,
 * each dot product summed in axis order.
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    Sampling s;                 /* the field; points and out unused */
    const double *to_cube, *to_out, *to_world;
    float *out;
    int64_t ni, nj;
} GridField;

static inline double affine_row(const double *m, const double *p)
{
    return m[0] * p[0] + m[1] * p[1] + m[2] * p[2] + m[3];
}

ITK_GRADICON_CLONES
static void grid_field_range(const GridField *g, int64_t start, int64_t end)
{
    const Sampling *s = &g->s;
    for (int64_t k = start; k < end; ++k)
        for (int64_t j = 0; j < g->nj; ++j) {
            float *o = g->out + (k * g->nj + j) * g->ni * 3;
            for (int64_t i = 0; i < g->ni; ++i, o += 3) {
                const double p[3] = {(double)i, (double)j, (double)k};
                double c[3];
                for (int r = 0; r < 3; ++r)
                    c[r] = affine_row(g->to_cube + 4 * r, p);
                const Cell q = cell_of(s, source_index((float)c[2], s->width), source_index((float)c[1], s->height),
                                       source_index((float)c[0], s->depth));
                const float *base = s->field + q.offset;
                double y[3];
                for (int r = 0; r < 3; ++r)
                    y[r] = c[r] + (double)cell_value(s, &q, base + r * s->stride_c);
                for (int r = 0; r < 3; ++r)
                    o[r] = (float)(affine_row(g->to_out + 4 * r, y) - affine_row(g->to_world + 4 * r, p));
            }
        }
}

PyDoc_STRVAR(grid_field_3d_doc,
"grid_field_3d(field, depth, height, width, stride_c, stride_z, stride_y, stride_x, to_cube, to_out,\n"
"              to_world, out, nk, nj, ni, start, end)\n"
"--\n\n"
"A 3-channel CUBE displacement (float32, channel stride stride_c) as the WORLD displacement at every voxel\n"
"of an [nk, nj, ni] grid, rows k = start..end-1 of the float32 output [nk, nj, ni, 3]: out = B (c + u(c)) + b\n"
"- (W p + w) with c = A p + a for the voxel's INDEX point p = (i, j, k); to_cube, to_out and to_world are\n"
"the addresses of three 3 x 4 float64 matrices [A | a], [B | b], [W | w] (no checks: the caller owns the\n"
"memory). The GIL is released meanwhile.");

static PyObject *grid_field_3d(PyObject *self, PyObject *args)
{
    unsigned long long field, to_cube, to_out, to_world, out;
    long long depth, height, width, stride_c, stride_z, stride_y, stride_x, nk, nj, ni, start, end;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLLLLLLKKKKLLLLL", &field, &depth, &height, &width, &stride_c, &stride_z,
                          &stride_y, &stride_x, &to_cube, &to_out, &to_world, &out, &nk, &nj, &ni, &start, &end))
        return NULL;
    if (depth < 1 || height < 1 || width < 1 || nk < 1 || nj < 1 || ni < 1 || start < 0 || end < start
        || end > nk) {
        PyErr_SetString(PyExc_ValueError, "grid_field_3d: empty field or grid, or bad range of rows");
        return NULL;
    }
    const GridField g = {{(const float *)(uintptr_t)field, 3, depth, height, width, stride_c, stride_z, stride_y,
                          stride_x, NULL, 0, NULL, 0},
                         (const double *)(uintptr_t)to_cube, (const double *)(uintptr_t)to_out,
                         (const double *)(uintptr_t)to_world, (float *)(uintptr_t)out, ni, nj};
    Py_BEGIN_ALLOW_THREADS
    grid_field_range(&g, start, end);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"grid_field_3d", grid_field_3d, METH_VARARGS, grid_field_3d_doc},
    {"sample_3d", sample_3d, METH_VARARGS, sample_3d_doc},
    {"sample_3d_backward", sample_3d_backward, METH_VARARGS, sample_3d_backward_doc},
    {"filter_axis", filter_axis, METH_VARARGS, filter_axis_doc},
    {"filter_axis_replicate", filter_axis_replicate, METH_VARARGS, filter_axis_replicate_doc},
    {"lncc_part", lncc_part, METH_VARARGS, lncc_part_doc},
    {"warp_voxels", warp_voxels, METH_VARARGS, warp_voxels_doc},
    {"round_trip", round_trip, METH_VARARGS, round_trip_doc},
    {"diffusion_part", diffusion_part, METH_VARARGS, diffusion_part_doc},
    {"mind_part", mind_part, METH_VARARGS, mind_part_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_linear",
    "Compiled loops of itk_gradicon: trilinear sampling (itk_gradicon.network.sampling), a separable filter's\n"
    "axis with zero or replicate padding (itk_gradicon.network.separable), LNCC's pointwise parts\n"
    "(itk_gradicon.pipeline.losses), MIND-SSC's parts against a fixed image (the same module), field IO's\n"
    "warps and round trips of voxel displacements\n"
    "(itk_gradicon.pipeline.instance),\n"
    "a network map as a WORLD displacement on an image grid (itk_gradicon.spatial.frames).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__linear(void)
{
#if ITK_GRADICON_AVX2
    (void)have_avx2(); /* asked once here, before any thread runs a kernel */
#endif
    return PyModule_Create(&module);
}
