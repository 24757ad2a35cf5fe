//! Device-to-device copy: the simplest kernel through the whole path, and the run's
//! measured copy bandwidth (the report's ceiling for memory-bound work).
//!
//! Bytes moved = 2 x size (read + write). Memory model: source + destination.

use crate::backend::{Backend, BackendKind, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, Bounds, Case, CaseInfo, Comparison, Instance, Profile, Readback, Tamper,
    Validation,
};

pub struct CopyCase {
    info: CaseInfo,
    len: usize,
}

impl CopyCase {
    pub fn new(len: usize) -> Self {
        let mut info = CaseInfo::new("copy", "vec16", DType::F32, format!("n{len}"));
        let bytes = (len * 4) as u64;
        info.bytes_moved = 2.0 * bytes as f64;
        info.predicted_peak_bytes = 2 * bytes;
        info.tolerance = 0.0;
        CopyCase { info, len }
    }
}

struct CopyInstance {
    src: Tensor,
    dst: Tensor,
    values: Vec<f32>,
}

impl Case for CopyCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }
    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let (src, values) = random_tensor(be, rng, DType::F32, self.len, 1.0, "copy source")?;
        let dst = be.alloc(DType::F32, self.len, "copy destination")?;
        Ok(Box::new(CopyInstance { src, dst, values }))
    }
}

impl Instance for CopyInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        be.copy(&mut self.dst, &self.src)
    }
    fn validate(
        &mut self,
        be: &dyn Backend,
        _rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        be.poison(&mut self.dst)?;
        self.run(be)?;
        let mut out = be.read(&self.dst)?;
        tamper(Readback {
            name: "dst",
            values: &mut out,
            row: 1,
        });
        // A copy is exact: every element bit for bit.
        let mut c = Comparison::new(DType::F32);
        c.bounds("dst", Bounds::EXACT);
        c.all_finite("dst", &out);
        for (i, (o, r)) in out.iter().zip(&self.values).enumerate() {
            c.add("dst", &|| format!("dst[{i}]"), *o, *r as f64);
        }
        Ok(c.finish())
    }
}

/// 1 GiB per buffer on a GPU (far beyond any L2), 16 MiB on the CPU.
pub fn cases(_profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let len = match kind {
        BackendKind::Cuda | BackendKind::Dry => 1 << 28,
        BackendKind::Cpu => 1 << 22,
    };
    vec![Box::new(CopyCase::new(len))]
}

/// Odd lengths exercise the byte tail and the unaligned path.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    vec![
        Box::new(CopyCase::new(1)),
        Box::new(CopyCase::new(1_000_003)),
    ]
}
