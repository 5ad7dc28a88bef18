use cudarc::nvrtc::result as r;
use ferroscan::cuda::compile::*;
use std::ffi::{CStr, CString};
fn main() {
    ensure_nvrtc().unwrap();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = &args[0];
    let code = match dtype.as_str() {
        "float16" => 0,
        "bfloat16" => 1,
        "float32" => 2,
        _ => 3,
    };
    for src in [
        SELECTIVE_FWD_REAL_SOURCE,
        SELECTIVE_FWD_COMPLEX_SOURCE,
        SELECTIVE_BWD_REAL_SOURCE,
        SELECTIVE_BWD_COMPLEX_SOURCE,
    ] {
        if args.len() > 1 && !src.file.contains(&args[1]) {
            continue;
        }
        let text = CString::new(src.full_text()).unwrap();
        let prog = r::create_program(&text, None).unwrap();
        let opts = vec![
            "--gpu-architecture=sm_90".to_string(),
            "--std=c++17".into(),
            format!("-DFS_DTYPE={code}"),
            "--ptxas-options=-v".into(),
        ];
        let res = unsafe { r::compile_program(prog, &opts) };
        let log: Vec<std::ffi::c_char> = unsafe { r::get_program_log(prog) }.unwrap();
        let log = unsafe { CStr::from_ptr(log.as_ptr()) }.to_string_lossy();
        println!("== {} {:?}", src.file, res.is_ok());
        for line in log.lines() {
            if line.contains("registers")
                || line.contains("spill")
                || line.contains("Compiling entry")
                || line.contains("error")
                || line.contains("warning")
            {
                println!("{line}");
            }
        }
    }
}
