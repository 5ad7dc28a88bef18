//! Times the CPU forward scan on `(outer, len, inner)` (default 12288 x 4096 x 1, f32):
//! `cargo run --release --example cpu_scan_timing -- [outer len inner]`.

use std::time::Instant;

use ferroscan::cpu::scan::{scan_forward, ScanInputs, ScanOutputs};
use ferroscan::{ScanProblem, ScanShape};

fn main() -> Result<(), ferroscan::Error> {
    let dims: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (outer, len, inner) = match dims[..] {
        [o, l, i] => (o, l, i),
        _ => (12288, 4096, 1),
    };
    let problem = ScanProblem {
        shape: ScanShape::new(outer, len, inner)?,
        reverse: false,
    };
    let n = problem.shape.numel();
    let gates: Vec<f32> = (0..n)
        .map(|i| 0.9 + 0.1 * ((i * 7919 % 1000) as f32 / 1000.0))
        .collect();
    let tokens: Vec<f32> = (0..n)
        .map(|i| ((i * 104_729 % 2001) as f32 / 1000.0) - 1.0)
        .collect();
    let mut hidden = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        scan_forward(
            &problem,
            ScanInputs {
                gates: &gates[..],
                tokens: &tokens[..],
                initial: None,
            },
            ScanOutputs {
                hidden: &mut hidden[..],
                final_state: None,
            },
        )?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    let gbps = 3.0 * n as f64 * 4.0 / best / 1e9;
    println!(
        "({outer}, {len}, {inner}) f32 forward: best {:.1} ms, {gbps:.1} GB/s",
        best * 1e3
    );
    Ok(())
}
