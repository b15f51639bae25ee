//! Value types: an element dtype and a shape whose dimensions may be symbolic.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Element type of a value. Floats narrower than f32 only appear as stored weights or
/// after an explicit `cast`; every op computes in f32 or wider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    I64,
    I8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::I32,
        DType::I64,
        DType::I8,
        DType::Bool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::I8 => "i8",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64 | DType::I8)
    }

    /// Bytes per element in memory (bool is stored as one byte).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a fixed extent, or a named symbol bound when the graph runs
/// (`T`, the token count of a prefill graph).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dim {
    Fixed(u64),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::Fixed(n)
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Fixed(n as u64)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A shape, outermost dimension first. The empty shape is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }

    /// Product of the fixed dimensions and the sorted list of symbols: two shapes hold the
    /// same number of elements for every binding exactly when these agree.
    pub fn volume(&self) -> (u64, Vec<String>) {
        let mut product = 1u64;
        let mut symbols = Vec::new();
        for d in &self.0 {
            match d {
                Dim::Fixed(n) => product = product.saturating_mul(*n),
                Dim::Sym(s) => symbols.push(s.clone()),
            }
        }
        symbols.sort();
        (product, symbols)
    }
}

impl<D: Into<Dim>, const N: usize> From<[D; N]> for Shape {
    fn from(dims: [D; N]) -> Shape {
        Shape(dims.into_iter().map(Into::into).collect())
    }
}

impl From<Vec<Dim>> for Shape {
    fn from(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of one value: dtype and shape, printed `f32[T,64]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValueType {
    pub dtype: DType,
    pub shape: Shape,
}

impl ValueType {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> ValueType {
        ValueType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn scalar(dtype: DType) -> ValueType {
        ValueType {
            dtype,
            shape: Shape::scalar(),
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_types() {
        let t = ValueType::new(DType::F32, vec![Dim::sym("T"), Dim::Fixed(64)]);
        assert_eq!(t.to_string(), "f32[T,64]");
        assert_eq!(ValueType::scalar(DType::I32).to_string(), "i32[]");
    }

    #[test]
    fn volume_compares_symbolic_shapes() {
        let a = Shape(vec![Dim::sym("T"), Dim::Fixed(64)]);
        let b = Shape(vec![Dim::sym("T"), Dim::Fixed(4), Dim::Fixed(16)]);
        assert_eq!(a.volume(), b.volume());
        let c = Shape(vec![Dim::Fixed(4), Dim::Fixed(16)]);
        assert_ne!(a.volume(), c.volume());
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
    }
}
