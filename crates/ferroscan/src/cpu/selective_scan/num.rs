//! Real and complex arithmetic of the selective scan's states, over the weight type `W`.

use crate::cpu::element::Real;

/// The arithmetic of one state: real (`Rl`) or complex (`Cx`) over the weight type `W`.
pub(super) trait Num<W: Real>: Copy + Send + Sync {
    /// Weight values per number.
    const PARTS: usize;
    const ZERO: Self;
    fn from_parts(re: W, im: W) -> Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn scale(self, w: W) -> Self;
    fn conj(self) -> Self;
    fn re(self) -> W;
    /// `exp(Δ·a)` for a real `Δ`.
    fn exp_scaled(delta: W, a: Self) -> Self;
    /// The factor of `Re(Σ C·h)` in `y`: 1 real, 2 complex.
    fn out_factor() -> W;

    /// Number `i` of an interleaved weight buffer.
    #[inline(always)]
    fn read(buf: &[W], i: usize) -> Self {
        if Self::PARTS == 1 {
            Self::from_parts(buf[i], W::ZERO)
        } else {
            Self::from_parts(buf[2 * i], buf[2 * i + 1])
        }
    }
    /// Adds `v` to number `i` of an interleaved weight buffer.
    #[inline(always)]
    fn add_into(self, buf: &mut [W], i: usize) {
        let v = Self::read(buf, i).add(self);
        v.write(buf, i);
    }
    fn write(self, buf: &mut [W], i: usize);
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Rl<W>(pub(super) W);

#[derive(Clone, Copy, Debug)]
pub(super) struct Cx<W> {
    re: W,
    im: W,
}

impl<W: Real> Num<W> for Rl<W> {
    const PARTS: usize = 1;
    const ZERO: Self = Rl(W::ZERO);
    #[inline(always)]
    fn from_parts(re: W, _: W) -> Self {
        Rl(re)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Rl(self.0 + o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Rl(self.0 * o.0)
    }
    #[inline(always)]
    fn scale(self, w: W) -> Self {
        Rl(self.0 * w)
    }
    #[inline(always)]
    fn conj(self) -> Self {
        self
    }
    #[inline(always)]
    fn re(self) -> W {
        self.0
    }
    #[inline(always)]
    fn exp_scaled(delta: W, a: Self) -> Self {
        Rl((delta * a.0).exp())
    }
    #[inline(always)]
    fn out_factor() -> W {
        W::ONE
    }
    #[inline(always)]
    fn write(self, buf: &mut [W], i: usize) {
        buf[i] = self.0;
    }
}

impl<W: Real> Num<W> for Cx<W> {
    const PARTS: usize = 2;
    const ZERO: Self = Cx {
        re: W::ZERO,
        im: W::ZERO,
    };
    #[inline(always)]
    fn from_parts(re: W, im: W) -> Self {
        Cx { re, im }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Cx {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Cx {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    #[inline(always)]
    fn scale(self, w: W) -> Self {
        Cx {
            re: self.re * w,
            im: self.im * w,
        }
    }
    #[inline(always)]
    fn conj(self) -> Self {
        Cx {
            re: self.re,
            im: -self.im,
        }
    }
    #[inline(always)]
    fn re(self) -> W {
        self.re
    }
    #[inline(always)]
    fn exp_scaled(delta: W, a: Self) -> Self {
        let magnitude = (delta * a.re).exp();
        let (sin, cos) = (delta * a.im).sin_cos();
        Cx {
            re: magnitude * cos,
            im: magnitude * sin,
        }
    }
    #[inline(always)]
    fn out_factor() -> W {
        W::ONE + W::ONE
    }
    #[inline(always)]
    fn write(self, buf: &mut [W], i: usize) {
        buf[2 * i] = self.re;
        buf[2 * i + 1] = self.im;
    }
}

#[inline(always)]
pub(super) fn sigmoid<W: Real>(x: W) -> W {
    W::ONE / (W::ONE + (-x).exp())
}
