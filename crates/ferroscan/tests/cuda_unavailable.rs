//! Without an NVIDIA driver, asking for a CUDA device is an error that says what to install,
//! never a panic. (On a machine with a driver this checks the device comes up instead.)

use ferroscan::{cuda, Error};

#[test]
fn missing_driver_is_an_error_with_a_fix() {
    match cuda::device(0) {
        Err(Error::CudaUnavailable(message)) => {
            assert!(
                message.contains("install"),
                "the message must say what to install: {message}"
            );
        }
        Err(Error::InvalidArgument { arg, .. }) => {
            assert_eq!(arg, "device", "a driver without GPUs")
        }
        Err(other) => panic!("unexpected error kind: {other}"),
        Ok(device) => assert!(device.sm_count() > 0),
    }
}

#[test]
fn bad_ordinal_is_an_invalid_argument_or_unavailable() {
    match cuda::device(1 << 20) {
        Err(Error::CudaUnavailable(_)) | Err(Error::InvalidArgument { arg: "device", .. }) => {}
        other => panic!("expected an error for device 2^20, got {other:?}"),
    }
}
