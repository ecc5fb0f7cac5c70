// An emulated GPU behind the CUDA driver, NVRTC and cuBLAS entry points the CUDA backend
// calls through cudarc: built as one shared library and found as libcuda.so, libnvrtc.so and
// libcublas.so, it lets the backend's own host code (Gpu, CudaShard: buffer sizes, launch
// arguments and grids, the order of kernels) run unchanged with the kernels of kernels.cu
// executed by emu.h on the CPU. It reports a Hopper (compute capability 9.0, 132 SMs) so that
// every path runs: tensor cores, wgmma, device routing. Memory is host memory; every call
// completes before it returns, so streams only need to exist and events read the host's
// clock. New allocations are filled with NaN bits: a kernel reading what nobody wrote shows
// in the results, as it may on a GPU. cuBLAS is a plain loop (bf16 operands, f32 sums).
// Built by cuda_emu/builder.rs, which writes kernel_table.inc (the kernels the backend looks
// up).
#include "emu.h"
#include "kernels_emu.cu"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

namespace {

using Run = void (*)(dim3e, dim3e, size_t, void **);
struct Kernel {
    const char *name;
    Run run;
};

// A kernel's parameters from cuLaunchKernel's array of pointers to each value, by the
// kernel's own signature.
template <class... A, size_t... I>
void call(void (*k)(A...), dim3e g, dim3e b, size_t smem, void **p, std::index_sequence<I...>) {
    emu_launch(k, g, b, smem, *static_cast<A *>(p[I])...);
}
template <class... A>
void call(void (*k)(A...), dim3e g, dim3e b, size_t smem, void **p) {
    call(k, g, b, smem, p, std::index_sequence_for<A...>{});
}

#define K(name) {#name, [](dim3e g, dim3e b, size_t s, void **p) { call(name, g, b, s, p); }},
const Kernel KERNELS[] = {
#include "kernel_table.inc"
};
#undef K

// The emulator's state (the block, the thread indexes) is global: one launch at a time, as
// ranks on threads of one process share the device.
std::mutex launching;
int dummy_ctx, dummy_stream, dummy_module, dummy_pool, dummy_program;

float bf(uint16_t b) { return __int_as_float((unsigned)b << 16); }

int alloc(uint64_t *p, size_t bytes) {
    size_t n = (bytes + 255) / 256 * 256;
    void *m = std::aligned_alloc(256, n ? n : 256);
    if (!m) return 2;  // out of memory
    std::memset(m, 0xff, n ? n : 256);  // NaN in every f32
    *p = (uint64_t)m;
    return 0;
}
// Column-major C = alpha op(A) op(B) + beta C, sums in f32 in K order.
template <class TA, class TB, class LA, class LB>
void gemm(int ta, int tb, int m, int n, int k, float alpha, const TA *a, int lda, const TB *b,
          int ldb, float beta, float *c, int ldc, LA la, LB lb) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.f;
            for (int p = 0; p < k; p++) {
                float x = la(ta ? a[(size_t)i * lda + p] : a[(size_t)p * lda + i]);
                float y = lb(tb ? b[(size_t)p * ldb + j] : b[(size_t)j * ldb + p]);
                s += x * y;
            }
            float &o = c[(size_t)j * ldc + i];
            o = alpha * s + (beta == 0.f ? 0.f : beta * o);
        }
}
}  // namespace

extern "C" {

// --- driver ---
int cuInit(unsigned) { return 0; }
int cuDriverGetVersion(int *v) { return *v = 13000, 0; }
int cuDeviceGetCount(int *n) { return *n = 1, 0; }
int cuDeviceGet(int *d, int ordinal) { return ordinal == 0 ? (*d = 0, 0) : 101; }
int cuDeviceGetName(char *name, int len, int) {
    std::snprintf(name, len, "emulated Hopper (cuda_emu, kernels on the CPU)");
    return 0;
}
int cuDeviceGetAttribute(int *v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;     // max threads per block
        case 10: *v = 32; break;      // warp size
        case 16: *v = 132; break;     // SMs
        case 38: *v = 50 << 20; break;  // L2 bytes
        case 75: *v = 9; break;       // compute capability
        case 76: *v = 0; break;
        case 97: *v = 227 * 1024; break;  // shared memory per block, opt-in
        case 115: *v = 1; break;      // memory pools
        default: *v = 0;
    }
    return 0;
}
int cuDeviceTotalMem_v2(size_t *b, int) { return *b = (size_t)80 << 30, 0; }
int cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    *free_b = (size_t)16 << 30;
    *total = (size_t)80 << 30;
    return 0;
}
int cuDevicePrimaryCtxRetain(void **ctx, int) { return *ctx = &dummy_ctx, 0; }
int cuDevicePrimaryCtxRelease_v2(int) { return 0; }
int cuCtxSetCurrent(void *) { return 0; }
int cuCtxGetCurrent(void **ctx) { return *ctx = &dummy_ctx, 0; }
int cuCtxSynchronize() { return 0; }
int cuStreamCreate(void **s, unsigned) { return *s = &dummy_stream, 0; }
int cuStreamCreateWithPriority(void **s, unsigned, int) { return *s = &dummy_stream, 0; }
int cuStreamSynchronize(void *) { return 0; }
int cuStreamDestroy_v2(void *) { return 0; }
int cuStreamWaitEvent(void *, void *, unsigned) { return 0; }
// An event holds the host's clock when recorded: every call completes before it returns, so
// the time between two events is the emulated kernels' (GROK_CUDA_PROFILE has figures to add).
using Clock = std::chrono::steady_clock;
int cuEventCreate(void **e, unsigned) { return *e = new Clock::time_point(Clock::now()), 0; }
int cuEventRecord(void *e, void *) { return *(Clock::time_point *)e = Clock::now(), 0; }
int cuEventSynchronize(void *) { return 0; }
int cuEventQuery(void *) { return 0; }
int cuEventElapsedTime(float *ms, void *a, void *b) {
    auto d = *(Clock::time_point *)b - *(Clock::time_point *)a;
    return *ms = std::chrono::duration<float, std::milli>(d).count(), 0;
}
int cuEventElapsedTime_v2(float *ms, void *a, void *b) { return cuEventElapsedTime(ms, a, b); }
int cuEventDestroy_v2(void *e) { return delete (Clock::time_point *)e, 0; }
int cuDeviceGetDefaultMemPool(void **p, int) { return *p = &dummy_pool, 0; }
int cuMemPoolSetAttribute(void *, int, void *) { return 0; }

int cuMemAlloc_v2(uint64_t *p, size_t bytes) { return alloc(p, bytes); }
int cuMemAllocAsync(uint64_t *p, size_t bytes, void *) { return alloc(p, bytes); }
int cuMemFree_v2(uint64_t p) { return std::free((void *)p), 0; }
int cuMemFreeAsync(uint64_t p, void *) { return std::free((void *)p), 0; }
int cuMemcpyHtoDAsync_v2(uint64_t d, const void *h, size_t n, void *) {
    return std::memcpy((void *)d, h, n), 0;
}
int cuMemcpyDtoHAsync_v2(void *h, uint64_t d, size_t n, void *) {
    return std::memcpy(h, (const void *)d, n), 0;
}
int cuMemcpyDtoDAsync_v2(uint64_t d, uint64_t s, size_t n, void *) {
    return std::memmove((void *)d, (const void *)s, n), 0;
}
int cuMemcpyHtoD_v2(uint64_t d, const void *h, size_t n) { return std::memcpy((void *)d, h, n), 0; }
int cuMemcpyDtoH_v2(void *h, uint64_t d, size_t n) { return std::memcpy(h, (const void *)d, n), 0; }
int cuMemsetD8Async(uint64_t d, unsigned char v, size_t n, void *) {
    return std::memset((void *)d, v, n), 0;
}
int cuMemsetD32Async(uint64_t d, unsigned v, size_t n, void *) {
    for (size_t i = 0; i < n; i++) std::memcpy((char *)d + 4 * i, &v, 4);
    return 0;
}

int cuModuleLoadData(void **m, const void *) { return *m = &dummy_module, 0; }
int cuModuleUnload(void *) { return 0; }
int cuModuleGetFunction(const void **f, void *, const char *name) {
    for (const Kernel &k : KERNELS)
        if (std::strcmp(k.name, name) == 0) return *f = &k, 0;
    return 500;  // not found
}
int cuFuncSetAttribute(const void *, int, int) { return 0; }
int cuFuncGetAttribute(int *v, int, const void *) { return *v = 0, 0; }
// Two blocks of any kernel per SM: what the heavier kernels get on an H100.
int cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *n, const void *, int, size_t,
                                                         unsigned) {
    return *n = 2, 0;
}
// GROK_EMU_BROKEN=prefix,prefix,...: launches of kernels whose names start so do nothing (and
// say so), as a kernel that writes no output would on a GPU: what the device check does when a
// kernel fails its canary can then be rehearsed.
static bool broken(const char *name) {
    const char *list = std::getenv("GROK_EMU_BROKEN");
    for (const char *p = list; p && *p;) {
        const char *end = std::strchr(p, ',');
        size_t n = end ? size_t(end - p) : std::strlen(p);
        if (n > 0 && std::strncmp(name, p, n) == 0) return true;
        p = end ? end + 1 : nullptr;
    }
    return false;
}

int cuLaunchKernel(const void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned smem, void *, void **params, void **extra) {
    if (extra) return 1;  // the backend passes its arguments as kernelParams
    const Kernel *k = (const Kernel *)f;
    if (gx == 0 || gy == 0 || gz == 0 || bx * by * bz == 0 || bx * by * bz > 1024 ||
        smem > 227 * 1024 || gy > 65535 || gz > 65535) {
        std::fprintf(stderr, "emulated launch of %s: grid %ux%ux%u, block %ux%ux%u, %u bytes\n",
                     k->name, gx, gy, gz, bx, by, bz, smem);
        return 1;  // an invalid launch, as the driver refuses it
    }
    if (broken(k->name)) {
        std::fprintf(stderr, "emulated launch of %s skipped (GROK_EMU_BROKEN)\n", k->name);
        return 0;
    }
    std::lock_guard<std::mutex> one_at_a_time(launching);
    k->run(dim3e{gx, gy, gz}, dim3e{bx, by, bz}, smem, params);
    return 0;
}
int cuGetErrorString(int e, const char **s) {
    *s = e == 500 ? "kernel not found in the emulator's table" : "emulated driver error";
    return 0;
}
int cuGetErrorName(int e, const char **s) {
    *s = e == 500 ? "CUDA_ERROR_NOT_FOUND" : e == 2 ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR";
    return 0;
}

// --- NVRTC: the "PTX" is a marker; the kernels were compiled into this library ---
int nvrtcVersion(int *major, int *minor) { return *major = 13, *minor = 0, 0; }
int nvrtcCreateProgram(void **p, const char *, const char *, int, const char *const *,
                       const char *const *) {
    return *p = &dummy_program, 0;
}
int nvrtcCompileProgram(void *, int, const char *const *) { return 0; }
static const char PTX[] = "// kernels compiled into the cuda_emu driver\n";
int nvrtcGetPTXSize(void *, size_t *n) { return *n = sizeof(PTX), 0; }
int nvrtcGetPTX(void *, char *out) { return std::memcpy(out, PTX, sizeof(PTX)), 0; }
int nvrtcGetProgramLogSize(void *, size_t *n) { return *n = 1, 0; }
int nvrtcGetProgramLog(void *, char *out) { return *out = 0, 0; }
int nvrtcDestroyProgram(void **) { return 0; }
const char *nvrtcGetErrorString(int) { return "emulated NVRTC error"; }

// --- cuBLAS: column-major C = op(A) op(B), alpha 1 and beta 0 as the backend calls it ---
int cublasCreate_v2(void **h) { return *h = new int(0), 0; }
int cublasDestroy_v2(void *h) { return delete (int *)h, 0; }
int cublasSetStream_v2(void *, void *) { return 0; }
int cublasSetWorkspace_v2(void *, void *, size_t) { return 0; }
int cublasSetMathMode(void *, int) { return 0; }

int cublasSgemm_v2(void *, int ta, int tb, int m, int n, int k, const float *alpha,
                   const float *a, int lda, const float *b, int ldb, const float *beta, float *c,
                   int ldc) {
    auto id = [](float v) { return v; };
    gemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, id, id);
    return 0;
}
// Types: 14 = CUDA_R_16BF, 0 = CUDA_R_32F; compute 68 = CUBLAS_COMPUTE_32F.
int cublasGemmEx(void *, int ta, int tb, int m, int n, int k, const void *alpha, const void *a,
                 int atype, int lda, const void *b, int btype, int ldb, const void *beta, void *c,
                 int ctype, int ldc, int compute, int) {
    if (atype != 14 || btype != 14 || ctype != 0 || compute != 68) return 7;  // not supported
    gemm(ta, tb, m, n, k, *(const float *)alpha, (const uint16_t *)a, lda, (const uint16_t *)b,
         ldb, *(const float *)beta, (float *)c, ldc, bf, bf);
    return 0;
}

}  // extern "C"
