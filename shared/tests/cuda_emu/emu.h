// Just enough of CUDA to run kernels.cu on the CPU: a fiber per CUDA thread, one block at a
// time (so `static` stands in for __shared__), barriers for __syncthreads and for each warp
// shuffle. It checks the kernels' indexing, masking, shuffles and merges, not the
// hardware's timing or memory model. See cuda_emulated.rs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <csetjmp>
#include <ucontext.h>
#include <vector>

struct dim3e {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3e threadIdx, blockIdx;
inline int emu_tid;
inline dim3e blockDim, gridDim;
inline char *emu_dyn_smem = nullptr;
inline size_t emu_dyn_bytes = 0;
// The shared address of the dynamic shared memory: not 1024-aligned, as it need not be on the
// GPU (a kernel that needs alignment pads).
constexpr unsigned EMU_SMEM_BASE = 16;

#define GROK_CUDA_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// CUDA's vector types, with its alignments (a sanitizer build then flags misaligned loads).
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(4))) char4 {
    signed char x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

using std::max;
using std::min;

inline float __int_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
// prmt.b32 in its default mode: selector nibble i picks result byte i from the 8 bytes of
// (y:x); its top bit replicates the picked byte's sign.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned char b[8];
    std::memcpy(b, &x, 4);
    std::memcpy(b + 4, &y, 4);
    unsigned r = 0;
    for (int i = 0; i < 4; i++) {
        unsigned sel = (s >> (4 * i)) & 0xf;
        unsigned char v = b[sel & 7];
        if (sel & 8) v = (v & 0x80) ? 0xff : 0;
        r |= (unsigned)v << (8 * i);
    }
    return r;
}
template <class T>
inline T __ldg(const T *p) {
    return *p;
}
template <class T>
inline T __ldcg(const T *p) {
    return *p;
}

// The block being run, its threads as fibers of one OS thread (a switch at each barrier is
// far cheaper than waking OS threads): the block's barrier, and per warp a barrier and two
// sets of exchange slots (shuffles alternate between them, so one barrier per shuffle is
// enough: a lane can only overwrite a set once every lane has passed the shuffle after the
// one that read it).
struct EmuBar {
    int live = 0, arrived = 0;
    unsigned gen = 0;
};
// A cp.async copy waiting for its group's wait_group (16 bytes, or zeros when !ok).
struct EmuCopy {
    char *dst;
    const char *src;
    bool ok;
    int group;
};
// A wgmma waiting for a wait_group: this thread's accumulators, B's descriptor and width (N),
// its sequence number in the warpgroup (where the A fragments' addresses are) and its group
// (-1 until committed).
struct EmuWgmma {
    float *d;
    uint64_t desc;
    int n, seq, group;
};
struct EmuFiber {
    ucontext_t ctx;
    std::jmp_buf jb;
    bool started = false;
    char *stack = nullptr;
    bool done = false;
    unsigned phase = 0;  // this lane's next slot set
    std::vector<EmuCopy> copies;
    int cp_groups = 0;
    std::vector<EmuWgmma> wgmmas;
    int wg_seq = 0, wg_groups = 0;
};
struct EmuBlock {
    EmuBar bar;
    std::vector<EmuBar> warp_bar;
    std::vector<uint64_t> slots;  // [warps][2][32]
    std::vector<unsigned> frags;  // [warps][2][32][6]: mma_bf16's a and b fragments
    std::vector<EmuBar> wg_bar;   // per warpgroup (128 threads)
    // Per warpgroup, [wgmma sequence number][thread]: where each thread's A fragment is.
    std::vector<std::vector<const unsigned *>> wg_a;
    std::vector<EmuFiber> fibers;
    ucontext_t sched;
    std::jmp_buf sched_jb;
    int cur = 0;
};
inline EmuBlock *emu_block = nullptr;

// A fiber is entered the first time through its ucontext and after that by _longjmp, which
// unlike swapcontext makes no system call (swapcontext saves and restores the signal mask:
// most of the time of a run with many barriers). Under AddressSanitizer, which follows
// swapcontext but not jumps between stacks, every switch is a swapcontext.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool EMU_JUMPS = false;
#else
constexpr bool EMU_JUMPS = true;
#endif
inline void emu_yield() {
    EmuBlock *b = emu_block;
    EmuFiber &f = b->fibers[b->cur];
    if (!EMU_JUMPS)
        swapcontext(&f.ctx, &b->sched);
    else if (!_setjmp(f.jb))
        _longjmp(b->sched_jb, 1);
}
inline void emu_resume(EmuBlock &b, int t) {
    EmuFiber &f = b.fibers[t];
    if (!EMU_JUMPS) {
        swapcontext(&b.sched, &f.ctx);
    } else if (!_setjmp(b.sched_jb)) {
        if (f.started) _longjmp(f.jb, 1);
        f.started = true;
        swapcontext(&b.sched, &f.ctx);
    }
}
inline void emu_wait(EmuBar &bar) {
    unsigned g = bar.gen;
    if (++bar.arrived == bar.live) {
        bar.arrived = 0;
        bar.gen++;
        return;
    }
    while (bar.gen == g) emu_yield();
}
inline void emu_leave(EmuBar &bar) {
    bar.live--;
    if (bar.arrived > 0 && bar.arrived == bar.live) {
        bar.arrived = 0;
        bar.gen++;
    }
}

inline void __syncthreads() { emu_wait(emu_block->bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(emu_block->warp_bar[emu_tid / 32]); }
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned *p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    EmuBlock *b = emu_block;
    int w = emu_tid / 32, lane = emu_tid % 32;
    unsigned &phase = b->fibers[emu_tid].phase;
    uint64_t *s = b->slots.data() + (w * 2 + phase) * 32;
    phase ^= 1;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s[lane] = bits;
    emu_wait(b->warp_bar[w]);
    uint64_t got = s[lane ^ o];
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

// mma.sync.m16n8k16 (bf16 in, f32 accumulate) for one lane: every lane posts its fragments,
// then computes its four outputs from the whole A and B (layouts as in mma_bf16's comment).
inline void emu_mma_bf16(float *d, const unsigned *a, const unsigned *b) {
    EmuBlock *blk = emu_block;
    int w = emu_tid / 32, lane = emu_tid % 32;
    unsigned &phase = blk->fibers[emu_tid].phase;
    unsigned *f = blk->frags.data() + (size_t)(w * 2 + phase) * 32 * 6;
    phase ^= 1;
    for (int i = 0; i < 4; i++) f[lane * 6 + i] = a[i];
    for (int i = 0; i < 2; i++) f[lane * 6 + 4 + i] = b[i];
    emu_wait(blk->warp_bar[w]);
    auto half = [](unsigned reg, int hi) { return __int_as_float((hi ? reg >> 16 : reg & 0xffff) << 16); };
    auto A = [&](int r, int k) {
        return half(f[((r % 8) * 4 + (k % 8) / 2) * 6 + (r >= 8) + 2 * (k >= 8)], k % 2);
    };
    auto B = [&](int k, int n) { return half(f[(n * 4 + (k % 8) / 2) * 6 + 4 + (k >= 8)], k % 2); };
    int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; e++) {
        int row = g + 8 * (e >= 2), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
        d[e] = acc;
    }
}

[[noreturn]] inline void emu_fault(const char *what) {
    std::fprintf(stderr, "emulator: %s\n", what);
    std::abort();
}

inline unsigned emu_smem_addr(const void *p) {
    ptrdiff_t off = (const char *)p - emu_dyn_smem;
    if (off < 0 || (size_t)off > emu_dyn_bytes)
        emu_fault("a shared address outside dynamic shared memory");
    return EMU_SMEM_BASE + (unsigned)off;
}
inline char *emu_smem_ptr(unsigned addr, unsigned bytes) {
    if (addr < EMU_SMEM_BASE || addr - EMU_SMEM_BASE + bytes > emu_dyn_bytes)
        emu_fault("a shared access past the dynamic shared memory");
    return emu_dyn_smem + (addr - EMU_SMEM_BASE);
}

// cp.async: the copy happens at the wait_group that covers it, so a kernel that reads a stage
// before waiting for it reads stale bytes, as it may on the GPU; or, with emu_cp_eager, at
// once, so that one that overwrites a stage still in use spoils it (the GPU may do either).
inline bool emu_cp_eager = false;
inline void emu_cp_land(const EmuCopy &c) {
    if (c.ok)
        std::memcpy(c.dst, c.src, 16);
    else
        std::memset(c.dst, 0, 16);
}
inline void emu_cp_async16(unsigned dst, const void *src, bool ok) {
    EmuFiber &f = emu_block->fibers[emu_tid];
    EmuCopy c{emu_smem_ptr(dst, 16), (const char *)src, ok, f.cp_groups};
    if (emu_cp_eager)
        emu_cp_land(c);
    else
        f.copies.push_back(c);
}
inline void emu_cp_commit() { emu_block->fibers[emu_tid].cp_groups++; }
inline void emu_cp_wait(int pending) {
    EmuFiber &f = emu_block->fibers[emu_tid];
    std::vector<EmuCopy> left;
    for (auto &c : f.copies) {
        if (c.group < f.cp_groups - pending)
            emu_cp_land(c);
        else
            left.push_back(c);
    }
    f.copies.swap(left);
}

// wgmma.mma_async m64nNk16 (bf16, f32 accumulate, A from registers, B K-major with the
// 128-byte swizzle): recorded at issue, computed at the wait_group that covers it from the A
// fragments and shared memory as they are then, so that a kernel that refills either too
// early gets wrong sums, as it would on the GPU.
inline void emu_wgmma_m64(int n, float *d, const unsigned *a, uint64_t desc) {
    EmuBlock *b = emu_block;
    EmuFiber &f = b->fibers[emu_tid];
    auto &tab = b->wg_a[emu_tid / 128];
    if (tab.size() < (size_t)(f.wg_seq + 1) * 128) tab.resize((size_t)(f.wg_seq + 1) * 128);
    tab[(size_t)f.wg_seq * 128 + emu_tid % 128] = a;
    f.wgmmas.push_back({d, desc, n, f.wg_seq, -1});
    f.wg_seq++;
}
inline void emu_wgmma_commit() {
    EmuFiber &f = emu_block->fibers[emu_tid];
    for (auto &op : f.wgmmas)
        if (op.group < 0) op.group = f.wg_groups;
    f.wg_groups++;
}
inline void emu_wgmma_run(const EmuWgmma &op) {
    auto &tab = emu_block->wg_a[emu_tid / 128];
    const unsigned *const *A = tab.data() + (size_t)op.seq * 128;
    unsigned start = (unsigned)(op.desc & 0x3fff) << 4, lbo = (op.desc >> 16) & 0x3fff;
    unsigned sbo = (unsigned)((op.desc >> 32) & 0x3fff) << 4;
    unsigned base_offset = (op.desc >> 49) & 7, swizzle = (unsigned)(op.desc >> 62);
    if (swizzle != 1 || lbo != 1 || base_offset != 0 || sbo != 1024)
        emu_fault("a wgmma descriptor other than K-major, 128-byte swizzle, SBO 1024");
    auto half = [](unsigned reg, int hi) {
        return __int_as_float((hi ? reg >> 16 : reg & 0xffff) << 16);
    };
    // A row r, column k: thread (r / 16) * 32 + (r % 8) * 4 + (k % 8) / 2, register
    // (r % 16 >= 8) + 2 (k >= 8), as mma_bf16's A per warp.
    auto Aval = [&](int r, int k) {
        int owner = (r / 16) * 32 + (r % 8) * 4 + (k % 8) / 2;
        return half(A[owner][(r % 16 >= 8) + 2 * (k >= 8)], k % 2);
    };
    // B column n, row k: byte 2k of row n of the 8-row groups SBO apart, swizzled (the 16-byte
    // chunk index, address bits 4-6, XOR the row in the group, bits 7-9).
    auto Bval = [&](int k, int n) {
        unsigned addr = start + (n / 8) * sbo + (n % 8) * 128 + 2 * k;
        addr ^= ((addr >> 7) & 7) << 4;
        uint16_t bits;
        std::memcpy(&bits, emu_smem_ptr(addr, 2), 2);
        return __int_as_float((unsigned)bits << 16);
    };
    int w = (emu_tid % 128) / 32, lane = emu_tid % 32, g = lane / 4, t = lane % 4;
    for (int e = 0; e < op.n / 2; e++) {
        int row = 16 * w + g + 8 * ((e >> 1) & 1), col = 8 * (e / 4) + 2 * t + (e & 1);
        float acc = op.d[e];
        for (int k = 0; k < 16; k++) acc += Aval(row, k) * Bval(k, col);
        op.d[e] = acc;
    }
}
inline void emu_wgmma_wait(int pending) {
    EmuBlock *b = emu_block;
    EmuFiber &f = b->fibers[emu_tid];
    EmuBar &bar = b->wg_bar[emu_tid / 128];
    emu_wait(bar);  // every thread's fragments of the ops are posted
    std::vector<EmuWgmma> left;
    for (auto &op : f.wgmmas) {
        if (op.group >= 0 && op.group < f.wg_groups - pending)
            emu_wgmma_run(op);
        else
            left.push_back(op);
    }
    f.wgmmas.swap(left);
    emu_wait(bar);  // no thread refills its fragments while another still reads them
}

inline std::function<void()> emu_body;
inline void emu_fiber_main() {
    EmuBlock *b = emu_block;
    int t = b->cur;
    emu_body();
    b->fibers[t].done = true;
    if (!b->fibers[t].copies.empty() || !b->fibers[t].wgmmas.empty())
        emu_fault("a thread ended with copies or wgmmas not waited for");
    emu_leave(b->warp_bar[t / 32]);
    emu_leave(b->wg_bar[t / 128]);
    emu_leave(b->bar);
    // Back to the scheduler: by uc_link on return, or by a jump to where it last resumed.
    if (EMU_JUMPS) _longjmp(b->sched_jb, 1);
}

// The fibers' stacks, kept from launch to launch (a 1024-thread block's are 64 MiB).
constexpr size_t EMU_STACK = 64 * 1024;
inline std::vector<std::unique_ptr<char[]>> emu_stacks;

// Runs kernel k on the grid, a block at a time; a thread that returns leaves the block's
// barriers (as an exited CUDA thread no longer holds a barrier up).
template <class F, class... A>
void emu_launch(F k, dim3e grid, dim3e block, size_t dyn_smem, A... args) {
    gridDim = grid;
    blockDim = block;
    std::vector<float4> dyn(dyn_smem / sizeof(float4) + 1);
    emu_dyn_smem = (char *)dyn.data();
    emu_dyn_bytes = dyn_smem;
    int n = block.x * block.y * block.z, warps = (n + 31) / 32;
    EmuBlock b;
    b.fibers.resize(n);
    while (emu_stacks.size() < (size_t)n) emu_stacks.emplace_back(new char[EMU_STACK]);
    for (int i = 0; i < n; i++) b.fibers[i].stack = emu_stacks[i].get();
    emu_block = &b;
    emu_body = [&] { k(args...); };
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                b.bar = EmuBar{n, 0, 0};
                b.warp_bar.assign(warps, EmuBar{});
                for (int w = 0; w < warps; w++) b.warp_bar[w].live = std::min(32, n - 32 * w);
                b.slots.assign(warps * 64, 0);
                b.frags.assign((size_t)warps * 2 * 32 * 6, 0);
                int groups = (n + 127) / 128;
                b.wg_bar.assign(groups, EmuBar{});
                for (int i = 0; i < groups; i++) b.wg_bar[i].live = std::min(128, n - 128 * i);
                b.wg_a.assign(groups, {});
                for (auto &f : b.fibers) {
                    f.done = false;
                    f.started = false;
                    f.phase = 0;
                    f.copies.clear();
                    f.cp_groups = 0;
                    f.wgmmas.clear();
                    f.wg_seq = f.wg_groups = 0;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = EMU_STACK;
                    f.ctx.uc_link = &b.sched;
                    makecontext(&f.ctx, emu_fiber_main, 0);
                }
                blockIdx = {bx, by, bz};
                // Threads run to their next wait in thread order, then in reverse order, by
                // turns (starting with the block's parity): a thread that reads what another
                // writes without a barrier between them sees a stale value one way round.
                int turn = (int)(bx + grid.x * (by + grid.y * bz));
                for (bool running = true; running; turn++) {
                    running = false;
                    for (int i = 0; i < n; i++) {
                        int t = turn % 2 ? n - 1 - i : i;
                        if (b.fibers[t].done) continue;
                        running = true;
                        b.cur = emu_tid = t;
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        emu_resume(b, t);
                    }
                }
            }
}
