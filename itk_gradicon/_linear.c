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
 * Built as an optional extension (setup.py): where it is missing, itk_gradicon uses grid_sample.
 * Compile with -ffp-contract=off: fusing a multiply and an add would change the rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

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

ITK_GRADICON_CLONES
static void sample_range(const Sampling *s, int64_t start, int64_t end)
{
    const float *zs = s->points, *ys = s->points + s->points_row, *xs = s->points + 2 * s->points_row;
    for (int64_t m = start; m < end; ++m) {
        const float iz = source_index(zs[m], s->depth);
        const float iy = source_index(ys[m], s->height);
        const float ix = source_index(xs[m], s->width);
        const Cell q = cell_of(s, ix, iy, iz);
        const float *base = s->field + q.offset;
        for (int64_t c = 0; c < s->channels; ++c) {
            const float *f = base + c * s->stride_c;
            float v = 0.0f;
            v += f[0] * q.tnw;
            if (q.east) v += f[s->stride_x] * q.tne;
            if (q.south) v += f[s->stride_y] * q.tsw;
            if (q.south && q.east) v += f[s->stride_y + s->stride_x] * q.tse;
            if (q.bottom) {
                const float *g = f + s->stride_z;
                v += g[0] * q.bnw;
                if (q.east) v += g[s->stride_x] * q.bne;
                if (q.south) v += g[s->stride_y] * q.bsw;
                if (q.south && q.east) v += g[s->stride_y + s->stride_x] * q.bse;
            }
            s->out[c * s->out_row + m] = v;
        }
    }
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

ITK_GRADICON_CLONES
static void sample_range_backward(const Backward *k, int64_t start, int64_t end)
{
    const Sampling *s = &k->s;
    const float *zs = s->points, *ys = s->points + s->points_row, *xs = s->points + 2 * s->points_row;
    const int64_t gw = 1, gh = s->width, gd = s->width * s->height, gc = gd * s->depth;
    for (int64_t m = start; m < end; ++m) {
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
            continue;
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

static PyMethodDef methods[] = {
    {"sample_3d", sample_3d, METH_VARARGS, sample_3d_doc},
    {"sample_3d_backward", sample_3d_backward, METH_VARARGS, sample_3d_backward_doc},
    {"filter_axis", filter_axis, METH_VARARGS, filter_axis_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_linear",
    "Trilinear sampling kernel of itk_gradicon (see itk_gradicon.network.sampling).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__linear(void)
{
    return PyModule_Create(&module);
}
