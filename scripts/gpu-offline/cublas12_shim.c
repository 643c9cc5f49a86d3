/* libcublas.so.12 for a machine that has only CUDA 13's libcublas.so.13 (and no network).
 *
 * faiss's GPU wheels on PyPI (faiss-gpu-cu12) import eight cuBLAS functions, versioned
 * "libcublas.so.12". Their cuBLAS 12 wheel is ~600 MB; this shim exports those eight under that
 * version and forwards each to the same function of libcublas.so.13 (the argument types are the
 * same in both: handles, enums, ints, pointers). Built by scripts/gpu-offline/prepare.sh:
 *   gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=cublas12.map ... -ldl
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int status_t;
typedef void *handle_t;

static void *forward(const char *name) {
    static void *lib;
    if (!lib && !(lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL))) {
        fprintf(stderr, "cublas12 shim: %s\n", dlerror());
        abort();
    }
    void *f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "cublas12 shim: libcublas.so.13 has no %s\n", name);
        abort();
    }
    return f;
}

#define FWD(name, params, args)                                        \
    status_t name params {                                             \
        static status_t(*f) params;                                    \
        if (!f) f = (status_t(*) params)forward(#name);                \
        return f args;                                                 \
    }

FWD(cublasCreate_v2, (handle_t *h), (h))
FWD(cublasDestroy_v2, (handle_t h), (h))
FWD(cublasSetStream_v2, (handle_t h, void *stream), (h, stream))
FWD(cublasGetMathMode, (handle_t h, int *mode), (h, mode))
FWD(cublasSetMathMode, (handle_t h, int mode), (h, mode))
FWD(cublasSgemmEx,
    (handle_t h, int ta, int tb, int m, int n, int k, const float *alpha, const void *A, int at, int lda,
     const void *B, int bt, int ldb, const float *beta, void *C, int ct, int ldc),
    (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc))
FWD(cublasGemmEx,
    (handle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at, int lda,
     const void *B, int bt, int ldb, const void *beta, void *C, int ct, int ldc, int compute, int algo),
    (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo))
FWD(cublasGemmStridedBatchedEx,
    (handle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at, int lda,
     long long sa, const void *B, int bt, int ldb, long long sb, const void *beta, void *C, int ct, int ldc,
     long long sc, int batch, int compute, int algo),
    (h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute, algo))
