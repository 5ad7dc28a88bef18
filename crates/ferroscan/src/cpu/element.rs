//! Element and accumulator types of the CPU backend.

use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::layout::DType;

/// The arithmetic type a scan accumulates in (`f32` or `f64`).
pub trait Accumulator:
    Copy + Send + Sync + Add<Output = Self> + Mul<Output = Self> + PartialEq + std::fmt::Debug
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;

    /// `self · a + b` in one rounding. Fast only where the CPU's FMA instructions are enabled
    /// (see [`crate::cpu::fused`]); elsewhere it is a library call.
    fn mul_add(self, a: Self, b: Self) -> Self;

    /// `product · s`, where `product` is a product of gates: when it underflowed to zero, an
    /// infinite `s` stays infinite (signed), as a step-by-step loop keeps it.
    fn scale_by_product(product: Self, s: Self) -> Self;
}

/// `Accumulator` for a primitive float type (`f32`, `f64`): the same code for both.
macro_rules! float_accumulator {
    ($t:ty) => {
        impl Accumulator for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn scale_by_product(product: Self, s: Self) -> Self {
                if product == 0.0 && s.is_infinite() {
                    if product.is_sign_negative() {
                        -s
                    } else {
                        s
                    }
                } else {
                    product * s
                }
            }
        }
    };
}

float_accumulator!(f32);
float_accumulator!(f64);

/// An accumulator with the transcendental functions the selective scan needs (`f32`, `f64`).
pub trait Real:
    Accumulator + Sub<Output = Self> + Div<Output = Self> + Neg<Output = Self> + PartialOrd
{
    /// `e^self`.
    fn exp(self) -> Self;
    /// `ln(1 + self)`, accurate near zero.
    fn ln_1p(self) -> Self;
    /// `(sin self, cos self)`.
    fn sin_cos(self) -> (Self, Self);
    /// The nearest value to `v`.
    fn from_f32(v: f32) -> Self;
}

/// `Real` for a primitive float type: the standard library's functions.
macro_rules! float_real {
    ($t:ty) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn sin_cos(self) -> (Self, Self) {
                <$t>::sin_cos(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
        }
    };
}

float_real!(f32);
float_real!(f64);

/// A storage element type: converts to and from its accumulator type.
pub trait Element: Copy + Send + Sync + 'static {
    /// What this element accumulates in.
    type Acc: Real;
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to the accumulator type.
    fn to_acc(self) -> Self::Acc;
    /// Rounds from the accumulator type (round to nearest even).
    fn from_acc(value: Self::Acc) -> Self;
}

impl Element for f32 {
    type Acc = f32;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        value
    }
}

impl Element for f64 {
    type Acc = f64;
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(value: f64) -> Self {
        value
    }
}

impl Element for half::f16 {
    type Acc = f32;
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        half::f16::from_f32(value)
    }
}

impl Element for half::bf16 {
    type Acc = f32;
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
}
