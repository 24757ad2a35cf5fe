// copy.cu - device-to-device copy: the harness's bandwidth probe (the report's copy-bandwidth
// ceiling) and the simplest kernel that proves the whole build/launch/measure path.
//
// Versions:
//   copy_kernel_vec16: grid-stride loop of 16-byte loads/stores (uint4) when both pointers
//                      and the byte count are 16-byte aligned; a byte tail loop otherwise.
// Bytes moved = 2 * bytes (one read, one write).
#include "common.cuh"

// ------------------------------------------------------------------------------------
__global__ void copy_kernel_vec16(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
                                  uint64_t n_vec) {
    uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (; i < n_vec; i += stride) dst[i] = src[i];
}

__global__ void copy_kernel_bytes(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst,
                                  uint64_t n) {
    uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) dst[i] = src[i];
}

// ------------------------------------------------------------------------------------
extern "C" int hr_copy(const hr_copy_params *p, hr_stream_t stream) {
    if (p->bytes == 0) return 0;
    int device = 0, sms = 0;
    HR_TRY(cudaGetDevice(&device));
    HR_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int threads = 256;
    const uintptr_t both = (uintptr_t)p->src | (uintptr_t)p->dst;
    const uint64_t n_vec = p->bytes / 16;
    const uint64_t head = n_vec * 16;
    if ((both % 16) == 0 && n_vec > 0) {
        // Enough blocks to fill every SM several times; the grid-stride loop does the rest.
        uint64_t blocks = hr::ceil_div((int64_t)n_vec, threads);
        if (blocks > (uint64_t)sms * 8) blocks = (uint64_t)sms * 8;
        copy_kernel_vec16<<<(unsigned)blocks, threads, 0, stream>>>(
            (const uint4 *)p->src, (uint4 *)p->dst, n_vec);
        HR_TRY(cudaGetLastError());
        if (head == p->bytes) return 0;
        copy_kernel_bytes<<<1, threads, 0, stream>>>((const uint8_t *)p->src + head,
                                                     (uint8_t *)p->dst + head, p->bytes - head);
    } else {
        uint64_t blocks = hr::ceil_div((int64_t)p->bytes, threads);
        if (blocks > (uint64_t)sms * 8) blocks = (uint64_t)sms * 8;
        copy_kernel_bytes<<<(unsigned)blocks, threads, 0, stream>>>(
            (const uint8_t *)p->src, (uint8_t *)p->dst, p->bytes);
    }
    HR_RETURN_LAUNCH_STATUS();
}

extern "C" const char *hr_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
