"""The demo. `PINNED_NUMERICS` must be in the environment before torch loads (the `alignkd-demo`
script sets it first thing): without it the teacher's accuracy moved by 8 points between machines,
because CPU kernels and BLAS reduce in an order that depends on the thread count and the CPU's
vector width, and 1500 training steps amplify last-bit differences."""

PINNED_NUMERICS = {
    "OMP_NUM_THREADS": "1",  # one thread: on 2 cores these tiny models run no slower than on two
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own kernels: AVX2 code even on AVX-512 machines
    "MKL_CBWR": "AVX2",  # MKL's reproducible AVX2 code path; honoured on Intel CPUs only
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
