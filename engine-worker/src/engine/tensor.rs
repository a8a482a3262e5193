//! Backend-neutral tensors: the Open Inference Protocol's datatypes and a
//! typed buffer per datatype, so the API layer never sees a backend's types.

use std::fmt;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Tensor element types of the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs, reason = "the names are the protocol's")]
pub enum DataType {
    BOOL,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    INT8,
    INT16,
    INT32,
    INT64,
    FP16,
    BF16,
    FP32,
    FP64,
    BYTES,
}

impl DataType {
    /// Every datatype, in protocol order.
    pub const ALL: [DataType; 14] = [
        DataType::BOOL,
        DataType::UINT8,
        DataType::UINT16,
        DataType::UINT32,
        DataType::UINT64,
        DataType::INT8,
        DataType::INT16,
        DataType::INT32,
        DataType::INT64,
        DataType::FP16,
        DataType::BF16,
        DataType::FP32,
        DataType::FP64,
        DataType::BYTES,
    ];

    /// Parses a protocol name such as `FP32`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The protocol name.
    pub fn name(self) -> &'static str {
        use DataType::*;
        match self {
            BOOL => "BOOL",
            UINT8 => "UINT8",
            UINT16 => "UINT16",
            UINT32 => "UINT32",
            UINT64 => "UINT64",
            INT8 => "INT8",
            INT16 => "INT16",
            INT32 => "INT32",
            INT64 => "INT64",
            FP16 => "FP16",
            BF16 => "BF16",
            FP32 => "FP32",
            FP64 => "FP64",
            BYTES => "BYTES",
        }
    }

    /// Bytes per element in the binary encoding (BYTES is variable: 0).
    pub fn size(self) -> usize {
        use DataType::*;
        match self {
            BOOL | UINT8 | INT8 => 1,
            UINT16 | INT16 | FP16 | BF16 => 2,
            UINT32 | INT32 | FP32 => 4,
            UINT64 | INT64 | FP64 => 8,
            BYTES => 0,
        }
    }

    /// The datatype of an ONNX `TensorProto.DataType` code, if the protocol carries it.
    pub fn from_onnx(elem_type: i32) -> Option<Self> {
        use DataType::*;
        Some(match elem_type {
            1 => FP32,
            2 => UINT8,
            3 => INT8,
            4 => UINT16,
            5 => INT16,
            6 => INT32,
            7 => INT64,
            8 => BYTES,
            9 => BOOL,
            10 => FP16,
            11 => FP64,
            12 => UINT32,
            13 => UINT64,
            16 => BF16,
            _ => return None,
        })
    }

    /// Triton's `TYPE_*` name (`TYPE_STRING` for BYTES).
    pub fn triton_name(self) -> String {
        match self {
            DataType::BYTES => "TYPE_STRING".to_string(),
            other => format!("TYPE_{}", other.name()),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of a tensor, row-major, one variant per datatype.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs, reason = "one variant per datatype")]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Byte strings (ONNX string tensors).
    Bytes(Vec<Vec<u8>>),
}

/// Runs `$body` with `$v` bound to the vector inside any [`TensorData`].
#[macro_export]
#[doc(hidden)]
macro_rules! each_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::engine::tensor::TensorData::Bool($v) => $body,
            $crate::engine::tensor::TensorData::U8($v) => $body,
            $crate::engine::tensor::TensorData::U16($v) => $body,
            $crate::engine::tensor::TensorData::U32($v) => $body,
            $crate::engine::tensor::TensorData::U64($v) => $body,
            $crate::engine::tensor::TensorData::I8($v) => $body,
            $crate::engine::tensor::TensorData::I16($v) => $body,
            $crate::engine::tensor::TensorData::I32($v) => $body,
            $crate::engine::tensor::TensorData::I64($v) => $body,
            $crate::engine::tensor::TensorData::F16($v) => $body,
            $crate::engine::tensor::TensorData::BF16($v) => $body,
            $crate::engine::tensor::TensorData::F32($v) => $body,
            $crate::engine::tensor::TensorData::F64($v) => $body,
            $crate::engine::tensor::TensorData::Bytes($v) => $body,
        }
    };
}

impl TensorData {
    /// The datatype of these elements.
    pub fn datatype(&self) -> DataType {
        use TensorData as D;
        match self {
            D::Bool(_) => DataType::BOOL,
            D::U8(_) => DataType::UINT8,
            D::U16(_) => DataType::UINT16,
            D::U32(_) => DataType::UINT32,
            D::U64(_) => DataType::UINT64,
            D::I8(_) => DataType::INT8,
            D::I16(_) => DataType::INT16,
            D::I32(_) => DataType::INT32,
            D::I64(_) => DataType::INT64,
            D::F16(_) => DataType::FP16,
            D::BF16(_) => DataType::BF16,
            D::F32(_) => DataType::FP32,
            D::F64(_) => DataType::FP64,
            D::Bytes(_) => DataType::BYTES,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each_data!(self, v => v.len())
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `$body` with `$a` and `$b` bound to the vectors inside two
/// [`TensorData`] of the same type; `$other` when the types differ.
macro_rules! both_data {
    ($x:expr, $y:expr, $a:ident, $b:ident => $body:expr, $other:expr) => {{
        use TensorData as D;
        match ($x, $y) {
            (D::Bool($a), D::Bool($b)) => $body,
            (D::U8($a), D::U8($b)) => $body,
            (D::U16($a), D::U16($b)) => $body,
            (D::U32($a), D::U32($b)) => $body,
            (D::U64($a), D::U64($b)) => $body,
            (D::I8($a), D::I8($b)) => $body,
            (D::I16($a), D::I16($b)) => $body,
            (D::I32($a), D::I32($b)) => $body,
            (D::I64($a), D::I64($b)) => $body,
            (D::F16($a), D::F16($b)) => $body,
            (D::BF16($a), D::BF16($b)) => $body,
            (D::F32($a), D::F32($b)) => $body,
            (D::F64($a), D::F64($b)) => $body,
            (D::Bytes($a), D::Bytes($b)) => $body,
            _ => $other,
        }
    }};
}

/// Why tensors cannot be made, stacked or split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// The element count of the shape does not fit in memory's address space.
    #[error("shape overflows")]
    Overflows,
    /// The data holds another number of elements than the shape needs.
    #[error("shape {shape:?} needs {want} elements, got {got}")]
    Count {
        /// The shape.
        shape: Vec<usize>,
        /// Elements it needs.
        want: usize,
        /// Elements given.
        got: usize,
    },
    /// Stacking nothing.
    #[error("nothing to batch")]
    Empty,
    /// A tensor without a first dimension to stack along.
    #[error("a batched tensor has a batch dimension")]
    NoBatchDimension,
    /// Two tensors differ beyond their first dimension.
    #[error("shape {0:?} does not stack with {1:?}")]
    DoesNotStack(Vec<usize>, Vec<usize>),
    /// Two tensors hold different element types.
    #[error("element types differ")]
    TypesDiffer,
    /// A batched answer whose first dimension is not the batch.
    #[error("its shape {shape:?} does not start with the batch of {batch}")]
    NotTheBatch {
        /// Its shape.
        shape: Vec<usize>,
        /// The rows batched.
        batch: usize,
    },
}

/// Stacks tensors along their first (batch) dimension; the other dimensions
/// and the element types must agree.
pub fn concat_batch(parts: &[Tensor]) -> Result<Tensor, ShapeError> {
    let first = parts.first().ok_or(ShapeError::Empty)?;
    let rest_shape = first.shape.get(1..).ok_or(ShapeError::NoBatchDimension)?;
    let mut rows = 0usize;
    let mut data = first.data.clone();
    each_data!(&mut data, v => v.clear());
    for t in parts {
        if t.shape.get(1..) != Some(rest_shape) {
            return Err(ShapeError::DoesNotStack(t.shape.clone(), first.shape.clone()));
        }
        rows += t.shape[0];
        both_data!(&mut data, &t.data, a, b => a.extend_from_slice(b), return Err(ShapeError::TypesDiffer));
    }
    let mut shape = first.shape.clone();
    shape[0] = rows;
    Tensor::new(shape, data)
}

/// Splits a tensor along its first dimension into parts of `rows` rows each.
pub fn split_batch(t: Tensor, rows: &[usize]) -> Result<Vec<Tensor>, ShapeError> {
    let total: usize = rows.iter().sum();
    if t.shape.first() != Some(&total) {
        return Err(ShapeError::NotTheBatch { shape: t.shape, batch: total });
    }
    let per_row: usize = t.shape[1..].iter().product();
    let mut out = Vec::with_capacity(rows.len());
    let mut at = 0;
    for &n in rows {
        let mut shape = t.shape.clone();
        shape[0] = n;
        let range = at * per_row..(at + n) * per_row;
        let data = match &t.data {
            TensorData::Bool(v) => TensorData::Bool(v[range].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[range].to_vec()),
            TensorData::U16(v) => TensorData::U16(v[range].to_vec()),
            TensorData::U32(v) => TensorData::U32(v[range].to_vec()),
            TensorData::U64(v) => TensorData::U64(v[range].to_vec()),
            TensorData::I8(v) => TensorData::I8(v[range].to_vec()),
            TensorData::I16(v) => TensorData::I16(v[range].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[range].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[range].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[range].to_vec()),
            TensorData::BF16(v) => TensorData::BF16(v[range].to_vec()),
            TensorData::F32(v) => TensorData::F32(v[range].to_vec()),
            TensorData::F64(v) => TensorData::F64(v[range].to_vec()),
            TensorData::Bytes(v) => TensorData::Bytes(v[range].to_vec()),
        };
        out.push(Tensor { shape, data });
        at += n;
    }
    Ok(out)
}

/// A tensor: shape plus row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements; `data.len()` is the product of `shape`.
    pub data: TensorData,
}

impl Tensor {
    /// A tensor of `shape` holding `data`, or why they do not fit.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, ShapeError> {
        let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or(ShapeError::Overflows)?;
        if want != data.len() {
            return Err(ShapeError::Count { shape, want, got: data.len() });
        }
        Ok(Tensor { shape, data })
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.name()), Some(d));
        }
        assert_eq!(DataType::parse("FP33"), None);
        assert_eq!(DataType::BYTES.triton_name(), "TYPE_STRING");
        assert_eq!(DataType::BF16.triton_name(), "TYPE_BF16");
    }

    #[test]
    fn batches_stack_and_split_back() {
        let a = Tensor::new(vec![1, 2], TensorData::F32(vec![1.0, 2.0])).unwrap();
        let b = Tensor::new(vec![2, 2], TensorData::F32(vec![3.0, 4.0, 5.0, 6.0])).unwrap();
        let both = concat_batch(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(both.shape, [3, 2]);
        assert_eq!(split_batch(both, &[1, 2]).unwrap(), [a.clone(), b]);
        let c = Tensor::new(vec![1, 3], TensorData::F32(vec![0.0; 3])).unwrap();
        assert!(concat_batch(&[a.clone(), c]).is_err(), "other dims differ");
        let d = Tensor::new(vec![1, 2], TensorData::I32(vec![0; 2])).unwrap();
        assert!(concat_batch(&[a, d]).is_err(), "types differ");
    }

    #[test]
    fn shape_must_fit_the_data() {
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 6])).is_ok());
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 5])).is_err());
        assert!(Tensor::new(vec![usize::MAX, 3], TensorData::F32(vec![])).is_err());
    }
}
