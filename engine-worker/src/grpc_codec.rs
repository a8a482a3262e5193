//! The gRPC face's message decoding, bounded in what it may allocate. prost
//! turns a two-byte empty entry of a repeated field into a struct of
//! hundreds of bytes, so a message within `MAX_REQUEST_BYTES` could decode
//! into gigabytes and take its engine worker down. Before prost runs, a walk
//! of the wire format (no allocation) adds up what the decoded message will
//! hold; past twice `MAX_REQUEST_BYTES` (what the memory budget charges a
//! whole message), or twice the message's own size and a little when that is
//! more, the call is refused with RESOURCE_EXHAUSTED.
//! `ModelInferRequest`, which carries tensors, is walked by its schema; any
//! other message counts every field at any depth as an entry.

use std::any::TypeId;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

use crate::engine::config::pb;

/// What a decoded message may hold beyond twice its own size.
const ALLOWANCE: usize = 64 << 10;

/// What any message may hold decoded: twice `MAX_REQUEST_BYTES` (set by [`hold_at_most`]).
static CEILING: AtomicUsize = AtomicUsize::new(2 * (64 << 20));

/// Lets a decoded message hold up to twice `max_request_bytes`, however small
/// it was on the wire (typed INT64 contents widen one-byte numbers to eight).
pub fn hold_at_most(max_request_bytes: usize) {
    CEILING.store(max_request_bytes.saturating_mul(2), Ordering::Relaxed);
}

/// What one entry of a message other than `ModelInferRequest` may cost decoded.
const ENTRY_BYTES: usize = 256;

/// Other messages are walked field by field at any depth: they are small
/// (settings, names), so a larger one is refused before the walk.
const OTHER_MESSAGE_BYTES: usize = 4 << 20;

/// How deep the walk of other messages looks for nested entries.
const DEPTH: u32 = 8;

/// prost's codec with the bound; tonic's generated services use it (`build.rs`).
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// Decodes a message with prost once its walk says it fits.
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = src.remaining();
        // A message is one contiguous buffer here; were it not, prost alone decides.
        if let Some(wire) = src.chunk().get(..len) {
            let is_infer = TypeId::of::<U>() == TypeId::of::<pb::ModelInferRequest>();
            if !is_infer && len > OTHER_MESSAGE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "a {len}-byte message is refused: only ModelInfer and ModelStreamInfer take more than {OTHER_MESSAGE_BYTES}"
                )));
            }
            let holds =
                if is_infer { infer_request(wire) } else { entries(wire, 0).map(|n| n.saturating_mul(ENTRY_BYTES)) };
            // A message the walk cannot read is left to prost, which says what is wrong.
            if let Some(holds) = holds {
                let allowed = len.saturating_mul(2).saturating_add(ALLOWANCE).max(CEILING.load(Ordering::Relaxed));
                if holds > allowed {
                    return Err(Status::resource_exhausted(format!(
                        "a {len}-byte message that would take about {holds} bytes decoded is refused (at most {allowed}): too many entries, or typed contents that widen (send tensors in raw_input_contents)"
                    )));
                }
            }
        }
        U::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// One field's value on the wire.
enum Wire<'a> {
    Varint,
    Fixed,
    Len(&'a [u8]),
}

/// Calls `each` with every field of `wire` in order; `None` when the bytes
/// are not a well-formed message (or `each` says so).
fn fields<'a>(mut wire: &'a [u8], mut each: impl FnMut(u32, Wire<'a>) -> Option<()>) -> Option<()> {
    while !wire.is_empty() {
        let key = varint(&mut wire)?;
        let field = u32::try_from(key >> 3).ok().filter(|&f| f > 0)?;
        let value = match key & 7 {
            0 => {
                varint(&mut wire)?;
                Wire::Varint
            }
            1 => {
                wire = wire.get(8..)?;
                Wire::Fixed
            }
            5 => {
                wire = wire.get(4..)?;
                Wire::Fixed
            }
            2 => {
                let n = usize::try_from(varint(&mut wire)?).ok()?;
                let value = wire.get(..n)?;
                wire = &wire[n..];
                Wire::Len(value)
            }
            _ => return None,
        };
        each(field, value)?;
    }
    Some(())
}

fn varint(wire: &mut &[u8]) -> Option<u64> {
    let mut x = 0u64;
    for i in 0..10 {
        let b = *wire.get(i)?;
        x |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *wire = &wire[i + 1..];
            return Some(x);
        }
    }
    None
}

/// How many values a packed run of varints holds.
fn varints_in(packed: &[u8]) -> usize {
    packed.iter().filter(|&&b| b < 0x80).count()
}

/// `base` plus what `each` says every field of `wire` holds decoded; `None`
/// when the bytes are not a well-formed message.
fn holds<'a>(wire: &'a [u8], base: usize, mut each: impl FnMut(u32, Wire<'a>) -> Option<usize>) -> Option<usize> {
    let mut total = base;
    fields(wire, |field, value| {
        total += each(field, value)?;
        Some(())
    })?;
    Some(total)
}

/// Every field of a message other than `ModelInferRequest`, at any depth: a
/// length-delimited value that reads as a message counts its own fields too.
fn entries(wire: &[u8], depth: u32) -> Option<usize> {
    holds(wire, 0, |_, value| {
        Some(match value {
            Wire::Len(inner) if depth < DEPTH => 1 + entries(inner, depth + 1).unwrap_or(0),
            _ => 1,
        })
    })
}

/// A repeated entry of a `T`: the struct, twice for the vector's growth.
fn entry_of<T>() -> usize {
    2 * size_of::<T>()
}

/// What a `ModelInferRequest` holds decoded.
fn infer_request(wire: &[u8]) -> Option<usize> {
    holds(wire, size_of::<pb::ModelInferRequest>(), |field, value| {
        Some(match (field, value) {
            (4, Wire::Len(v)) => parameter(v),
            (5, Wire::Len(v)) => input(v)?,
            (6, Wire::Len(v)) => output(v)?,
            // A raw tensor is a slice of the received message, not a copy.
            (7, Wire::Len(_)) => entry_of::<bytes::Bytes>(),
            (_, Wire::Len(v)) => v.len(),
            _ => 0,
        })
    })
}

/// A map entry of parameters: its key and value (a string at most as long as the entry).
fn parameter(entry: &[u8]) -> usize {
    entry_of::<(String, pb::InferParameter)>() + entry.len()
}

fn input(wire: &[u8]) -> Option<usize> {
    holds(wire, entry_of::<pb::model_infer_request::InferInputTensor>(), |field, value| {
        Some(match (field, value) {
            (3, Wire::Len(v)) => varints_in(v) * size_of::<i64>(),
            (3, _) => size_of::<i64>() * 2,
            (4, Wire::Len(v)) => parameter(v),
            (5, Wire::Len(v)) => contents(v)?,
            (_, Wire::Len(v)) => v.len(),
            _ => 0,
        })
    })
}

fn output(wire: &[u8]) -> Option<usize> {
    holds(wire, entry_of::<pb::model_infer_request::InferRequestedOutputTensor>(), |field, value| {
        Some(match (field, value) {
            (2, Wire::Len(v)) => parameter(v),
            (_, Wire::Len(v)) => v.len(),
            _ => 0,
        })
    })
}

/// Typed tensor contents: packed numbers at their decoded width, strings with their vectors.
fn contents(wire: &[u8]) -> Option<usize> {
    holds(wire, size_of::<pb::InferTensorContents>(), |field, value| {
        Some(match (field, value) {
            (1, Wire::Len(v)) => varints_in(v),
            (2 | 4, Wire::Len(v)) => varints_in(v) * 4,
            (3 | 5, Wire::Len(v)) => varints_in(v) * 8,
            (6 | 7, Wire::Len(v)) => v.len(),
            (8, Wire::Len(v)) => entry_of::<Vec<u8>>() + v.len(),
            (_, Wire::Len(v)) => v.len(),
            // An unpacked number: at most 8 bytes, twice for the vector's growth.
            _ => 16,
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn request(inputs: usize, empty_entries: usize) -> Vec<u8> {
        let mut r = pb::ModelInferRequest { model_name: "m".into(), ..Default::default() };
        for i in 0..inputs {
            r.inputs.push(pb::model_infer_request::InferInputTensor {
                name: format!("x{i}"),
                datatype: "FP32".into(),
                shape: vec![1, 64],
                ..Default::default()
            });
            r.raw_input_contents.push(bytes::Bytes::from(vec![0u8; 256]));
        }
        let mut wire = r.encode_to_vec();
        // Empty InferInputTensor entries: field 5, length 0.
        for _ in 0..empty_entries {
            wire.extend_from_slice(&[0x2a, 0x00]);
        }
        wire
    }

    #[test]
    fn an_ordinary_request_fits_and_empty_entries_by_the_million_do_not() {
        let ok = request(4, 0);
        let holds = infer_request(&ok).unwrap();
        assert!(holds <= ok.len() * 2 + ALLOWANCE, "{holds}");
        let bomb = request(1, 1_000_000);
        let holds = infer_request(&bomb).unwrap();
        assert!(
            holds > bomb.len() * 2 + ALLOWANCE && holds > CEILING.load(Ordering::Relaxed),
            "{holds} for {} bytes",
            bomb.len()
        );
    }

    #[test]
    fn large_tensors_in_contents_or_raw_fit() {
        let mut r = pb::ModelInferRequest::default();
        r.inputs.push(pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1 << 20],
            contents: Some(pb::InferTensorContents { fp32_contents: vec![1.5; 1 << 20], ..Default::default() }),
            ..Default::default()
        });
        let wire = r.encode_to_vec();
        assert!(infer_request(&wire).unwrap() <= wire.len() * 2 + ALLOWANCE);
        // INT8 values as int32 varints of one byte: four times their wire size, still within twice plus the allowance for a small tensor.
        let mut r = pb::ModelInferRequest::default();
        r.inputs.push(pb::model_infer_request::InferInputTensor {
            contents: Some(pb::InferTensorContents { int_contents: vec![1; 4096], ..Default::default() }),
            ..Default::default()
        });
        let wire = r.encode_to_vec();
        assert!(infer_request(&wire).unwrap() <= wire.len() * 2 + ALLOWANCE);
    }

    #[test]
    fn other_messages_count_nested_entries_and_malformed_ones_are_left_to_prost() {
        // A map entry holding a message of many empty repeated strings, two levels down.
        let mut inner = Vec::new();
        for _ in 0..1000 {
            inner.extend_from_slice(&[0x0a, 0x00]);
        }
        let mut wire = vec![0x1a];
        let mut len = inner.len();
        while len >= 0x80 {
            wire.push((len as u8) | 0x80);
            len >>= 7;
        }
        wire.push(len as u8);
        wire.extend_from_slice(&inner);
        assert!(entries(&wire, 0).unwrap() > 1000);
        assert_eq!(entries(&[0x0a, 0x05, 0x01], 0), None, "a length past the end");
        assert_eq!(infer_request(&[0x2b]), None, "a group");
    }
}
