use ferroscan::cuda::compile::*;
use ferroscan::DType;
fn main() {
    let dtypes: Vec<DType> = std::env::args()
        .skip(1)
        .map(|a| DType::parse(&a).unwrap())
        .collect();
    std::env::set_var("FERROSCAN_CACHE_DIR", "/tmp/fs-nvrtc-tmp");
    let _ = std::fs::remove_dir_all("/tmp/fs-nvrtc-tmp");
    for src in [
        SELECTIVE_FWD_REAL_SOURCE,
        SELECTIVE_FWD_COMPLEX_SOURCE,
        SELECTIVE_BWD_REAL_SOURCE,
        SELECTIVE_BWD_COMPLEX_SOURCE,
    ] {
        for &dt in &dtypes {
            let t = std::time::Instant::now();
            match compile_cubin(&src, dt, (9, 0)) {
                Ok(c) => println!(
                    "{} {:?}: ok {} bytes in {:.1}s",
                    src.file,
                    dt,
                    c.len(),
                    t.elapsed().as_secs_f32()
                ),
                Err(e) => {
                    println!("{} {:?}: {e}", src.file, dt);
                }
            }
        }
    }
}
