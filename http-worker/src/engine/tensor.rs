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
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, String> {
        let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
        if want != data.len() {
            return Err(format!("shape {shape:?} needs {want} elements, got {}", data.len()));
        }
        Ok(Tensor { shape, data })
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }
}

#[cfg(test)]
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
    fn shape_must_fit_the_data() {
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 6])).is_ok());
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 5])).is_err());
        assert!(Tensor::new(vec![usize::MAX, 3], TensorData::F32(vec![])).is_err());
    }
}
