//! NVRTC compiles every kernel variant to a CUBIN for sm_80 and sm_90 (those of its architectures
//! the variant supports: the cluster build needs sm_90), and every kernel name the launchers ask
//! for is in it.
//!
//! Needs NVRTC (no GPU): `pip install nvidia-cuda-nvrtc==13.0.88` or set FERROSCAN_NVRTC.
//! Ignored by a plain `cargo test` (reported as ignored, i.e. skipped); the project's test
//! command runs it with `--ignored`, where a missing NVRTC is a failure.

use ferroscan::cuda::compile::{
    compile_cubin, nvrtc_version, KernelSource, ALL_SOURCES, GATED_SCAN_CLUSTER_SOURCE,
    GATED_SCAN_SOURCES, SCAN_SOURCE,
};
use ferroscan::cuda::{gated_scan, scan, selective_scan};
use ferroscan::DType;

const ARCHES: [(i32, i32); 2] = [(8, 0), (9, 0)];

/// The kernel names the launchers ask for in `source`.
fn launched_names(source: &KernelSource) -> Vec<String> {
    if *source == SCAN_SOURCE {
        scan::all_kernel_names()
    } else if GATED_SCAN_SOURCES.contains(source) {
        gated_scan::all_kernel_names()
    } else {
        selective_scan::all_kernel_names()
            .into_iter()
            .find(|(s, _)| s == source)
            .map(|(_, names)| names)
            .unwrap_or_else(|| panic!("no kernel-name list for {}", source.file))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Compiles one variant and checks that every kernel the launchers ask for is in it.
fn check_variant(source: KernelSource, dtype: DType, arch: (i32, i32)) {
    let cubin = compile_cubin(&source, dtype, arch)
        .unwrap_or_else(|e| panic!("{} {dtype:?} sm_{}{}: {e}", source.file, arch.0, arch.1));
    assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
    for name in launched_names(&source) {
        assert!(
            contains(&cubin, name.as_bytes()),
            "kernel {name} missing from the {} {dtype:?} sm_{}{} CUBIN",
            source.file,
            arch.0,
            arch.1
        );
    }
}

#[test]
#[ignore = "needs NVRTC; run with --ignored"]
fn every_kernel_variant_compiles_to_cubin() {
    let version = nvrtc_version().expect("NVRTC must be installed for this test");
    println!("NVRTC {}.{}", version.0, version.1);
    let cache = std::env::temp_dir().join(format!("ferroscan-compile-test-{}", std::process::id()));
    // A fresh cache directory so the compiler really runs.
    std::env::set_var("FERROSCAN_CACHE_DIR", &cache);
    let mut jobs = Vec::new();
    for source in ALL_SOURCES {
        for dtype in DType::ALL {
            for arch in ARCHES.into_iter().filter(|&arch| arch >= source.min_arch) {
                jobs.push((source, dtype, arch));
            }
        }
    }
    // One compilation per job, on as many threads as the machine has (NVRTC compiles independent
    // programs concurrently); the slowest sources first.
    jobs.sort_by_key(|(source, _, _)| std::cmp::Reverse(source.text.len()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(jobs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(source, dtype, arch)) = jobs.get(i) else {
                    break;
                };
                check_variant(source, dtype, arch);
            });
        }
    });
    let cached = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cached, jobs.len(), "one disk cache entry per variant");
    assert!(
        jobs.len() > ALL_SOURCES.len() * DType::ALL.len(),
        "most sources compile for both architectures"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// A source asked for an architecture older than it supports is refused with an error naming
/// both, before NVRTC is involved (so no GPU or NVRTC is needed here).
#[test]
fn a_source_refuses_architectures_older_than_it_supports() {
    let err = compile_cubin(&GATED_SCAN_CLUSTER_SOURCE, DType::BF16, (8, 0))
        .expect_err("the cluster build needs sm_90");
    let message = err.to_string();
    assert!(
        message.contains("gated_scan_cluster.cu")
            && message.contains("9.0")
            && message.contains("8.0"),
        "{message}"
    );
}
