//! Small contracts of the operations, shown on the CPU backend (the CUDA launchers refuse the
//! same inputs in `kernels/matmul.cu`'s `prepare`).

use headroom::backend::cpu::CpuBackend;
use headroom::backend::{Backend, Epi, Matmul, MatmulKernel};
use headroom::{DType, Error};

/// A batched matmul whose C stride is 0 would have every batch entry write the same C (a
/// write race on a GPU): it is refused with one sentence, while broadcasting B is fine.
#[test]
fn a_shared_output_across_a_batch_is_refused() {
    let be = CpuBackend::new(None, None);
    let a = be.alloc(DType::F32, 3 * 4 * 5, "A").unwrap();
    let b = be.alloc(DType::F32, 5 * 6, "B").unwrap();
    let mut c = be.alloc(DType::F32, 3 * 4 * 6, "C").unwrap();
    let mut mm = Matmul::new(4, 6, 5).batched(3);
    mm.stride_b = 0;
    be.matmul(MatmulKernel::Simt, &mm, &a, &b, Epi::none(), &mut c)
        .expect("a broadcast B is a shared input");
    mm.stride_c = 0;
    match be.matmul(MatmulKernel::Simt, &mm, &a, &b, Epi::none(), &mut c) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("stride_c 0"), "{msg}"),
        other => panic!("{other:?}"),
    }
}
