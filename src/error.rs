//! Errors are values with a sentence a user can act on; panics are for bugs.

use std::fmt;

use crate::memory::OutOfMemory;

/// Everything that can go wrong while building, validating or measuring a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An allocation did not fit the budget or the device (the case is recorded as `oom`).
    OutOfMemory(OutOfMemory),
    /// A CUDA call or kernel launch failed.
    Cuda(String),
    /// A user-supplied value (size, budget, file, setting) is not acceptable.
    Invalid(String),
    /// The operation exists but not on this backend or build (recorded as `skipped`).
    Unsupported(String),
    /// Reading or writing a file failed.
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfMemory(oom) => write!(f, "{oom}"),
            Error::Cuda(msg) => write!(f, "CUDA error: {msg}"),
            Error::Invalid(msg) | Error::Unsupported(msg) | Error::Io(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

impl From<OutOfMemory> for Error {
    fn from(e: OutOfMemory) -> Self {
        Error::OutOfMemory(e)
    }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// `Error::Invalid` from anything printable.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
