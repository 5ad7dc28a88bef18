//! One CUDA device: its primary context (the one PyTorch uses), properties, and the kernels
//! loaded on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{sys as driver_sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::compile::{compile_cubin, ensure_nvrtc, KernelSource};
use crate::error::{Error, Result};
use crate::layout::DType;

/// A CUDA device ready to run ferroscan kernels.
pub struct Device {
    ctx: Arc<CudaContext>,
    arch: (i32, i32),
    sm_count: usize,
    shared_per_multiprocessor: usize,
    shared_per_block: usize,
    modules: Mutex<HashMap<(KernelSource, DType), Arc<CudaModule>>>,
    functions: Mutex<HashMap<(KernelSource, DType, String), LoadedFunction>>,
}

/// A loaded kernel and what ptxas gave it (read once, at load: launchers that size blocks by it
/// would otherwise ask the driver on every launch).
#[derive(Clone)]
pub(crate) struct LoadedFunction {
    pub(crate) function: CudaFunction,
    /// Registers per thread.
    pub(crate) registers: usize,
    /// Bytes of static shared memory per block.
    pub(crate) static_shared: usize,
    /// Bytes of dynamic shared memory the driver has been told to allow (0: its default), shared
    /// by the clones so that [`Device::allow_dynamic_shared`] asks the driver once per size.
    dynamic_shared_allowed: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

pub(crate) fn driver_error(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver {
        during,
        message: e.to_string(),
    }
}

fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to open libcuda by its candidate names.
    if unsafe { driver_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "the NVIDIA driver library (libcuda.so) was not found: install the NVIDIA driver \
             (CUDA 13 or newer) on a machine with an NVIDIA GPU"
                .into(),
        ))
    }
}

/// The device with the given ordinal, created once per process.
pub fn device(ordinal: usize) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::CudaUnavailable("device registry poisoned".into()))?;
    if let Some(dev) = devices.get(&ordinal) {
        return Ok(dev.clone());
    }
    ensure_driver()?;
    let count = CudaContext::device_count().map_err(driver_error("counting devices"))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::invalid(
            "device",
            format!("a CUDA device ordinal below {count}, got {ordinal}"),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error("retaining the primary context"))?;
    let arch = ctx
        .compute_capability()
        .map_err(driver_error("reading the compute capability"))?;
    let sm_count = ctx
        .attribute(driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_error("reading the multiprocessor count"))?;
    let shared_per_multiprocessor = ctx
        .attribute(
            driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
        )
        .map_err(driver_error("reading the shared memory per multiprocessor"))?;
    let shared_per_block = ctx
        .attribute(
            driver_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(driver_error("reading the shared memory per block"))?;
    let dev = Arc::new(Device {
        ctx,
        arch,
        sm_count: sm_count.max(1) as usize,
        shared_per_multiprocessor: shared_per_multiprocessor.max(0) as usize,
        shared_per_block: shared_per_block.max(0) as usize,
        modules: Mutex::default(),
        functions: Mutex::default(),
    });
    devices.insert(ordinal, dev.clone());
    Ok(dev)
}

impl Device {
    /// The primary context of this device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compute capability `(major, minor)`.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Bytes of shared memory of one multiprocessor, for all its blocks together.
    pub fn shared_per_multiprocessor(&self) -> usize {
        self.shared_per_multiprocessor
    }

    /// Bytes of shared memory one block may have, static and dynamic together, when the kernel
    /// asks for more than the default ([`Device::allow_dynamic_shared`]).
    pub fn shared_per_block(&self) -> usize {
        self.shared_per_block
    }

    /// Wraps a stream owned by someone else (e.g. PyTorch's current stream).
    ///
    /// # Safety
    /// `raw` must be a live stream of this device's primary context (or 0, the legacy default
    /// stream), and must outlive the returned handle.
    pub unsafe fn borrowed_stream(&self, raw: u64) -> Arc<CudaStream> {
        // SAFETY: forwarded to the caller (see above).
        unsafe { self.ctx.wrap_borrowed_stream(raw as driver_sys::CUstream) }
    }

    /// The kernel `name` of `source`, specialized for `dtype`, compiled and loaded on first use.
    pub(crate) fn function(
        &self,
        source: KernelSource,
        dtype: DType,
        name: &str,
    ) -> Result<CudaFunction> {
        Ok(self.loaded(source, dtype, name)?.function)
    }

    /// Registers per thread of the kernel `name` of `source` for `dtype` (loaded on first use).
    pub(crate) fn registers(
        &self,
        source: KernelSource,
        dtype: DType,
        name: &str,
    ) -> Result<usize> {
        Ok(self.loaded(source, dtype, name)?.registers)
    }

    /// Lets `kernel` launch with `bytes` of dynamic shared memory: beyond 48 KiB per block
    /// (static and dynamic together) the driver must be told first; it is told once per size.
    pub(crate) fn allow_dynamic_shared(&self, kernel: &LoadedFunction, bytes: usize) -> Result<()> {
        const WITHOUT_ASKING: usize = 48 * 1024;
        if kernel.static_shared + bytes <= WITHOUT_ASKING
            || kernel.dynamic_shared_allowed.load(Ordering::Relaxed) >= bytes
        {
            return Ok(());
        }
        let value = i32::try_from(bytes)
            .map_err(|_| Error::invalid("shared memory", format!("below 2 GiB, got {bytes}")))?;
        kernel
            .function
            .set_attribute(
                driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                value,
            )
            .map_err(driver_error("allowing a kernel more shared memory"))?;
        kernel
            .dynamic_shared_allowed
            .fetch_max(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The kernel `name` of `source` for `dtype` with its resources (loaded on first use).
    pub(crate) fn loaded(
        &self,
        source: KernelSource,
        dtype: DType,
        name: &str,
    ) -> Result<LoadedFunction> {
        let key = (source, dtype, name.to_string());
        if let Some(f) = self.functions.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(f.clone());
        }
        let module = self.module(source, dtype)?;
        let function = module
            .load_function(name)
            .map_err(driver_error("looking up a kernel"))?;
        let registers = function
            .num_regs()
            .map_err(driver_error("reading a kernel's registers"))?
            .max(1) as usize;
        let static_shared = function
            .shared_size_bytes()
            .map_err(driver_error("reading a kernel's shared memory"))?
            .max(0) as usize;
        let loaded = LoadedFunction {
            function,
            registers,
            static_shared,
            dynamic_shared_allowed: Arc::default(),
        };
        self.functions
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, loaded.clone());
        Ok(loaded)
    }

    fn module(&self, source: KernelSource, dtype: DType) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().map_err(|_| poisoned())?;
        if let Some(m) = modules.get(&(source, dtype)) {
            return Ok(m.clone());
        }
        ensure_nvrtc()?;
        let cubin = compile_cubin(&source, dtype, self.arch)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(driver_error("loading a compiled kernel module"))?;
        modules.insert((source, dtype), module.clone());
        Ok(module)
    }
}

fn poisoned() -> Error {
    Error::CudaUnavailable("kernel registry poisoned by an earlier panic".into())
}
