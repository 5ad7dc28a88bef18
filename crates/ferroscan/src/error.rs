//! The one error type of the crate: every fallible call returns [`Result`].

/// Everything that can go wrong in ferroscan, with a message that names the
/// offending argument (or the missing piece of software) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied value does not satisfy the operation's contract.
    #[error("invalid argument `{arg}`: expected {expected}")]
    InvalidArgument {
        /// Name of the argument as the caller knows it.
        arg: &'static str,
        /// What a valid value looks like (and, where useful, what was received).
        expected: String,
    },
    /// The CUDA driver or NVRTC is missing or unusable on this machine.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// NVRTC rejected a kernel (a bug in ferroscan: please report it with the log).
    #[error("NVRTC failed to compile `{kernel}`: {log}")]
    Compile {
        /// The kernel source file.
        kernel: String,
        /// The compiler's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call failed while {during}: {message}")]
    Driver {
        /// What ferroscan was doing.
        during: &'static str,
        /// The driver's message.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, expected: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            expected: expected.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
