//! NVRTC: finding the library, compiling a kernel source to a CUBIN for one exact
//! architecture, and caching the result in memory and on disk.
//!
//! CUBIN, never PTX: PTX from an NVRTC newer than the driver fails to load, CUBIN does not.
//! The disk cache (`$FERROSCAN_CACHE_DIR`, else `$XDG_CACHE_HOME/ferroscan`, else
//! `~/.cache/ferroscan`) is keyed by a hash of source, options, architecture and NVRTC
//! version; entries carry a checksum, are written atomically, and a corrupt one is recompiled.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::error::{Error, Result};
use crate::layout::DType;

/// The common header every kernel includes; spliced in because NVRTC gets no include path.
const COMMON_HEADER: &str = include_str!("../../kernels/common.cuh");

/// A kernel source file of `kernels/`. Compared and hashed by file name only: lookups happen on
/// every launch and must not hash the whole text.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name, for messages and cache keys.
    pub file: &'static str,
    /// The file's text.
    pub text: &'static str,
    /// The oldest architecture `(major, minor)` it compiles for (what its kernels use: e.g.
    /// thread-block clusters need sm_90).
    pub min_arch: (i32, i32),
}

/// `kernels/scan.cu`: the first-order scan.
pub const SCAN_SOURCE: KernelSource = KernelSource {
    file: "scan.cu",
    text: include_str!("../../kernels/scan.cu"),
    min_arch: ANY_ARCH,
};

/// The `min_arch` of sources that compile for every architecture ferroscan supports.
pub const ANY_ARCH: (i32, i32) = (0, 0);

/// `kernels/gated_scan.cu` with leading `#define`s: the build's identity in the caches is `$file`.
macro_rules! gated_source {
    ($file:literal, $defines:literal) => {
        gated_source!($file, $defines, ANY_ARCH)
    };
    ($file:literal, $defines:literal, $min_arch:expr) => {
        KernelSource {
            file: $file,
            text: concat!($defines, include_str!("../../kernels/gated_scan.cu")),
            min_arch: $min_arch,
        }
    };
}

/// `kernels/gated_scan.cu`: the fused gated scan, blocks of 8 warps (the launcher picks a build
/// of 4, 8 or 16 warps per pass and shape: `gated_scan::warps`).
pub const GATED_SCAN_SOURCE: KernelSource = gated_source!("gated_scan.cu", "");
/// [`GATED_SCAN_SOURCE`] with blocks of 4 warps (`FS_GATED_WARPS` 4).
pub const GATED_SCAN_4_WARPS_SOURCE: KernelSource =
    gated_source!("gated_scan_4_warps.cu", "#define FS_GATED_WARPS 4\n");
/// [`GATED_SCAN_SOURCE`] with blocks of 16 warps (`FS_GATED_WARPS` 16).
pub const GATED_SCAN_16_WARPS_SOURCE: KernelSource =
    gated_source!("gated_scan_16_warps.cu", "#define FS_GATED_WARPS 16\n");
/// [`GATED_SCAN_16_WARPS_SOURCE`] whose forwards copy their inputs into two stages of shared
/// memory asynchronously, a window ahead (`FS_GATED_STAGES` 2; cp.async on sm_80 and newer): for
/// 16-bit problems of one block per multiprocessor at most (see `gated_scan::staged_forward`).
pub const GATED_SCAN_STAGED_SOURCE: KernelSource = gated_source!(
    "gated_scan_staged.cu",
    "#define FS_GATED_WARPS 16\n#define FS_GATED_STAGES 2\n"
);
/// `kernels/gated_scan.cu` with one state per lane whatever the type (`FS_GATED_LANE_STATES` 1)
/// and blocks of 16 warps: for 16-bit problems with too few states to keep half the GPU busy at
/// two per lane (see `gated_scan::lane_states`), whose groups then also fit one block of 16
/// warps per multiprocessor.
pub const GATED_SCAN_ONE_STATE_SOURCE: KernelSource = gated_source!(
    "gated_scan_one_state.cu",
    "#define FS_GATED_LANE_STATES 1\n#define FS_GATED_WARPS 16\n"
);
/// `kernels/gated_scan.cu` with a thread-block cluster of four blocks of 4 warps per group
/// (`FS_GATED_CLUSTER` 4; sm_90 and newer): a group's time axis on four multiprocessors, for
/// problems whose groups would leave over half the multiprocessors idle (see
/// `gated_scan::cluster_candidate`).
pub const GATED_SCAN_CLUSTER_SOURCE: KernelSource = gated_source!(
    "gated_scan_cluster.cu",
    "#define FS_GATED_CLUSTER 4\n#define FS_GATED_WARPS 4\n",
    (9, 0)
);

/// The builds of `kernels/selective_scan.cu` for one number kind (real or complex `A`): one
/// module per configuration of `P` lanes per channel and `S` states per lane, and pass. A first
/// call then compiles the one configuration it runs (a complex backward: about 20 s of NVRTC
/// instead of 130 s for all five).
#[derive(Clone, Copy, Debug)]
pub struct SelectiveBuilds {
    /// The configurations `(P, S)`, in the order of `forward` and `backward`.
    pub configs: &'static [(usize, usize)],
    /// The forward kernel of each configuration.
    pub forward: &'static [KernelSource],
    /// The backward kernels (plain, chunked, carry) and the two reductions of each configuration.
    pub backward: &'static [KernelSource],
}

/// `kernels/selective_scan.cu` with `FS_SEL_COMPLEX`, `FS_SEL_PASS` and `FS_SEL_CONFIGS` (its one
/// configuration) defined; the file name is the module's identity in the caches.
macro_rules! selective_source {
    ($pass_name:literal, $kind:literal, $complex:literal, $pass:literal, $p:literal, $s:literal) => {
        KernelSource {
            file: concat!(
                "selective_scan_",
                $pass_name,
                "_",
                $kind,
                "_p",
                $p,
                "_s",
                $s,
                ".cu"
            ),
            min_arch: ANY_ARCH,
            text: concat!(
                "#define FS_SEL_COMPLEX ",
                $complex,
                "\n#define FS_SEL_PASS ",
                $pass,
                "\n#define FS_SEL_CONFIGS(X) X(",
                $p,
                ", ",
                $s,
                ")\n",
                include_str!("../../kernels/selective_scan.cu")
            ),
        }
    };
}

/// The [`SelectiveBuilds`] of one number kind from its list of configurations (the one list of
/// them: the launcher's choices and the kernel names derive from it).
macro_rules! selective_builds {
    ($kind:literal, $complex:literal, [$(($p:literal, $s:literal)),* $(,)?]) => {
        SelectiveBuilds {
            configs: &[$(($p, $s)),*],
            forward: &[$(selective_source!("fwd", $kind, $complex, "0", $p, $s)),*],
            backward: &[$(selective_source!("bwd", $kind, $complex, "1", $p, $s)),*],
        }
    };
}

/// The selective scan's builds for real `A`.
pub const SELECTIVE_REAL: SelectiveBuilds = selective_builds!(
    "real",
    "0",
    [(4, 4), (8, 4), (16, 4), (32, 4), (8, 2), (32, 8)]
);
/// The selective scan's builds for complex `A` (no 8-state lanes: complex states need twice the
/// registers).
pub const SELECTIVE_COMPLEX: SelectiveBuilds =
    selective_builds!("complex", "1", [(4, 4), (8, 4), (16, 4), (32, 4), (8, 2)]);

/// The builds of `kernels/gated_scan.cu` (every one holds every kernel of the file).
pub const GATED_SCAN_SOURCES: [KernelSource; 6] = [
    GATED_SCAN_SOURCE,
    GATED_SCAN_4_WARPS_SOURCE,
    GATED_SCAN_16_WARPS_SOURCE,
    GATED_SCAN_STAGED_SOURCE,
    GATED_SCAN_ONE_STATE_SOURCE,
    GATED_SCAN_CLUSTER_SOURCE,
];

/// Every build of `kernels/selective_scan.cu`: [`SELECTIVE_REAL`], then [`SELECTIVE_COMPLEX`],
/// forwards before backwards.
pub const SELECTIVE_SOURCES: [KernelSource;
    2 * (SELECTIVE_REAL.configs.len() + SELECTIVE_COMPLEX.configs.len())] = {
    let mut all =
        [SCAN_SOURCE; 2 * (SELECTIVE_REAL.configs.len() + SELECTIVE_COMPLEX.configs.len())];
    let lists = [
        SELECTIVE_REAL.forward,
        SELECTIVE_REAL.backward,
        SELECTIVE_COMPLEX.forward,
        SELECTIVE_COMPLEX.backward,
    ];
    let (mut at, mut list) = (0, 0);
    while list < lists.len() {
        let mut i = 0;
        while i < lists[list].len() {
            all[at] = lists[list][i];
            at += 1;
            i += 1;
        }
        list += 1;
    }
    all
};

/// Every kernel source of the crate: [`SCAN_SOURCE`], [`GATED_SCAN_SOURCES`],
/// [`SELECTIVE_SOURCES`].
pub const ALL_SOURCES: [KernelSource; 1 + GATED_SCAN_SOURCES.len() + SELECTIVE_SOURCES.len()] = {
    let mut all = [SCAN_SOURCE; 1 + GATED_SCAN_SOURCES.len() + SELECTIVE_SOURCES.len()];
    let mut i = 0;
    while i < GATED_SCAN_SOURCES.len() {
        all[1 + i] = GATED_SCAN_SOURCES[i];
        i += 1;
    }
    let mut j = 0;
    while j < SELECTIVE_SOURCES.len() {
        all[1 + GATED_SCAN_SOURCES.len() + j] = SELECTIVE_SOURCES[j];
        j += 1;
    }
    all
};

impl PartialEq for KernelSource {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for KernelSource {}

impl std::hash::Hash for KernelSource {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.file.hash(state);
    }
}

impl KernelSource {
    /// The text NVRTC compiles: the source with `common.cuh` spliced in.
    pub fn full_text(&self) -> String {
        self.text
            .replace("#include \"common.cuh\"", COMMON_HEADER)
            .replace("#pragma once", "")
    }
}

/// The `FS_DTYPE` value a kernel is specialized for (see `common.cuh`).
fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        DType::F32 => 2,
        DType::F64 => 3,
    }
}

/// Extra `-D` options for every kernel, from `$FERROSCAN_KERNEL_DEFINES` (space-separated
/// `NAME=VALUE`): a tuning hook for trying kernel constants without rebuilding the library (e.g.
/// `FS_SEL_FWD_MIN_BLOCKS=4`). Part of the options, hence of the cache key.
pub const KERNEL_DEFINES_ENV: &str = "FERROSCAN_KERNEL_DEFINES";

/// The value `$FERROSCAN_KERNEL_DEFINES` gives `name` (`NAME=VALUE`; `NAME` alone: "1"), for
/// launchers whose plan must agree with a kernel constant the hook overrides.
pub fn kernel_define(name: &str) -> Option<String> {
    let defines = std::env::var(KERNEL_DEFINES_ENV).ok()?;
    defines
        .split_whitespace()
        .find_map(|d| match d.split_once('=') {
            Some((n, v)) if n == name => Some(v.to_string()),
            None if d == name => Some("1".to_string()),
            _ => None,
        })
}

/// NVRTC options for one specialization.
fn options(dtype: DType, arch: (i32, i32)) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        format!("-DFS_DTYPE={}", dtype_code(dtype)),
    ];
    if let Ok(defines) = std::env::var(KERNEL_DEFINES_ENV) {
        opts.extend(defines.split_whitespace().map(|d| format!("-D{d}")));
    }
    opts
}

const INSTALL_HINT: &str =
    "install NVRTC for CUDA 13 (`pip install nvidia-cuda-nvrtc==13.0.88`, or the CUDA toolkit), \
     or point FERROSCAN_NVRTC at libnvrtc.so.13";

/// Loads libnvrtc from `path`, and the libnvrtc-builtins beside it that NVRTC opens by name
/// at compile time (its folder is on no search path when it comes from a Python wheel).
fn load_nvrtc_from(path: &Path) -> std::result::Result<(), String> {
    if let Some(Ok(entries)) = path.parent().map(std::fs::read_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
                dlopen_global(&entry.path())?;
            }
        }
    }
    dlopen_global(path)
}

fn dlopen_global(path: &Path) -> std::result::Result<(), String> {
    // SAFETY: loading a shared library runs its initializers; libnvrtc's are benign. The handle
    // is leaked on purpose so the library stays loaded (RTLD_GLOBAL) for cudarc's lookup by soname.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    };
    lib.map(std::mem::forget).map_err(|e| e.to_string())
}

/// Folders of the active Python's site-packages (`$FERROSCAN_PYTHON`, else `python3`).
fn python_site_dirs() -> Vec<PathBuf> {
    let python = std::env::var("FERROSCAN_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import site,sysconfig;print('\\n'.join(site.getsitepackages()+[sysconfig.get_paths()['purelib']]))";
    std::process::Command::new(python)
        .args(["-c", script])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// `nvidia/*/lib/libnvrtc.so.N` under the given site-packages folders.
fn wheel_nvrtc_candidates(site_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for site in site_dirs {
        let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(libs) = std::fs::read_dir(entry.path().join("lib")) else {
                continue;
            };
            for lib in libs.flatten() {
                let name = lib.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc.so") && !name.contains(".alt.") {
                    found.push(lib.path());
                }
            }
        }
    }
    found.sort();
    found.reverse(); // newest major version first
    found
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { nvrtc_sys::is_culib_present() }
}

fn locate_nvrtc() -> Result<()> {
    if let Ok(path) = std::env::var("FERROSCAN_NVRTC") {
        return load_nvrtc_from(Path::new(&path)).map_err(|e| {
            Error::CudaUnavailable(format!("FERROSCAN_NVRTC={path} could not be loaded: {e}"))
        });
    }
    if nvrtc_present() {
        return Ok(());
    }
    for candidate in wheel_nvrtc_candidates(&python_site_dirs()) {
        if load_nvrtc_from(&candidate).is_ok() && nvrtc_present() {
            return Ok(());
        }
    }
    Err(Error::CudaUnavailable(format!(
        "NVRTC (libnvrtc.so) was not found: {INSTALL_HINT}"
    )))
}

/// Makes NVRTC loadable (once per process), or says what to install.
pub fn ensure_nvrtc() -> Result<()> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| locate_nvrtc().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// The NVRTC version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (ensure_nvrtc); the out-pointers are valid for the call.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::CudaUnavailable(format!(
            "nvrtcVersion failed: {status:?}"
        )));
    }
    Ok((major, minor))
}

/// 64-bit FNV-1a: a hash that is stable across builds and Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in part.iter().chain(b"\x1f") {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Where cached CUBINs live.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FERROSCAN_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("ferroscan"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("ferroscan"))
}

const CACHE_MAGIC: &[u8; 8] = b"FSCUBIN1";

/// A cache file: magic, checksum of the CUBIN (8 bytes little-endian), CUBIN.
fn read_cache_entry(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let body = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    let (sum, cubin) = body.split_at_checked(8)?;
    let expected = u64::from_le_bytes(sum.try_into().ok()?);
    (fnv1a(&[cubin]) == expected && !cubin.is_empty()).then(|| cubin.to_vec())
}

fn write_cache_entry(path: &Path, cubin: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut bytes = CACHE_MAGIC.to_vec();
    bytes.extend_from_slice(&fnv1a(&[cubin]).to_le_bytes());
    bytes.extend_from_slice(cubin);
    // A cache that cannot be written only costs a recompile next time.
    if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn log_of(prog: nvrtc_sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is a live program; the log is NUL-terminated.
    unsafe { nvrtc_result::get_program_log(prog) }
        .map(|raw: Vec<c_char>| {
            // SAFETY: NVRTC returns a NUL-terminated buffer.
            unsafe { CStr::from_ptr(raw.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

/// Runs NVRTC once: source to CUBIN.
fn nvrtc_compile(source: &KernelSource, text: &str, opts: &[String]) -> Result<Vec<u8>> {
    let fail = |log: String| Error::Compile {
        kernel: source.file.into(),
        log,
    };
    let src = CString::new(text).map_err(|e| fail(e.to_string()))?;
    let name = CString::new(source.file).map_err(|e| fail(e.to_string()))?;
    let prog = nvrtc_result::create_program(&src, Some(&name)).map_err(|e| fail(e.to_string()))?;
    // SAFETY: `prog` was created above and is destroyed before returning.
    let compiled = unsafe { nvrtc_result::compile_program(prog, opts) };
    let result = match compiled {
        Err(e) => Err(fail(format!("{e}\n{}", log_of(prog)))),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
            let status = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) };
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds `size` bytes, as NVRTC asked.
            let status2 = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) };
            if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
                || status2 != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
                || size == 0
            {
                Err(fail(format!("no CUBIN produced ({status:?}, {status2:?})")))
            } else {
                Ok(cubin)
            }
        }
    };
    // SAFETY: `prog` is live and not used afterwards.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    result
}

type CubinKey = (KernelSource, DType, (i32, i32));

/// Compiles `source` for `dtype` and the exact architecture `arch` = (major, minor), through the
/// in-memory and on-disk caches.
pub fn compile_cubin(
    source: &KernelSource,
    dtype: DType,
    arch: (i32, i32),
) -> Result<Arc<Vec<u8>>> {
    static MEMORY: OnceLock<Mutex<HashMap<CubinKey, Arc<Vec<u8>>>>> = OnceLock::new();
    let memory = MEMORY.get_or_init(Default::default);
    if arch < source.min_arch {
        return Err(Error::CudaUnavailable(format!(
            "{} needs compute capability {}.{} or newer, this device has {}.{}",
            source.file, source.min_arch.0, source.min_arch.1, arch.0, arch.1
        )));
    }
    let key = (*source, dtype, arch);
    if let Some(hit) = memory.lock().map_err(|_| poisoned())?.get(&key) {
        return Ok(hit.clone());
    }
    let version = nvrtc_version()?;
    let text = source.full_text();
    let opts = options(dtype, arch);
    let version_text = format!("nvrtc {}.{}", version.0, version.1);
    let mut parts: Vec<&[u8]> = vec![text.as_bytes(), version_text.as_bytes()];
    parts.extend(opts.iter().map(|o| o.as_bytes()));
    let file_name = format!(
        "{}-{}-sm{}{}-{:016x}.cubin",
        source.file.trim_end_matches(".cu"),
        dtype.name(),
        arch.0,
        arch.1,
        fnv1a(&parts)
    );
    let disk_path = cache_dir().map(|d| d.join(file_name));
    let cubin = match disk_path.as_deref().and_then(read_cache_entry) {
        Some(cubin) => cubin,
        None => {
            let cubin = nvrtc_compile(source, &text, &opts)?;
            if let Some(path) = &disk_path {
                write_cache_entry(path, &cubin);
            }
            cubin
        }
    };
    let cubin = Arc::new(cubin);
    memory
        .lock()
        .map_err(|_| poisoned())?
        .insert(key, cubin.clone());
    Ok(cubin)
}

fn poisoned() -> Error {
    Error::CudaUnavailable("an earlier kernel compilation panicked; restart the process".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entry_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("ferroscan-cache-test-{}", std::process::id()));
        let path = dir.join("entry.cubin");
        write_cache_entry(&path, b"\x7fELF pretend cubin");
        assert_eq!(
            read_cache_entry(&path).as_deref(),
            Some(&b"\x7fELF pretend cubin"[..])
        );
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_cache_entry(&path),
            None,
            "a corrupt entry must be rejected"
        );
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read_cache_entry(&path), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hash_is_stable() {
        // Fixed value: a change here would silently orphan every user's cache.
        // FNV-1a of "abc" followed by the 0x1f part separator, computed independently.
        assert_eq!(fnv1a(&[b"abc"]), 0xfc17_c483_ee07_63bc);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
