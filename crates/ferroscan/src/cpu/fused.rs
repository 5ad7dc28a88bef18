//! Runtime dispatch of serial hot loops to a fused multiply-add build where the CPU has FMA.
//!
//! A first-order scan is a chain of dependent `s = a·s + x` steps, so its speed is the latency
//! of one step: a multiply then an add, or one fused multiply-add (about half). Portable builds
//! cannot assume FMA, so the loop is compiled twice and the FMA copy is chosen at run time.
//! The fused step rounds once instead of twice (it is at least as accurate).

/// Calls `$kernel::<T, true>(args)` inside an FMA-enabled function when the CPU has FMA, else
/// `$kernel::<T, false>(args)`.
macro_rules! dispatch {
    ($kernel:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "fma")]
            unsafe fn with_fma(f: impl FnOnce()) {
                f()
            }
            if std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports FMA (checked just above), the only requirement of
                // calling a function compiled with that target feature.
                unsafe { with_fma(|| $kernel::<T, true>($($arg),*)) }
            } else {
                $kernel::<T, false>($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $kernel::<T, false>($($arg),*)
        }
    }};
}

pub(crate) use dispatch;
