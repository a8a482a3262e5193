//! Fuzzes the HTTP request path into the engine: any body (JSON tensors, or a
//! JSON header plus binary tensor data) must decode into tensors that fit
//! their shapes, or fail with a 4xx, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_engine_worker::engine::tensor::DataType;
use tandem_engine_worker::engine::TensorMeta;
use tandem_engine_worker::infer::{decode_body, decode_inputs, NoSharedMemory};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the body is split (JSON only, or JSON + binary).
    let Some((&split, body)) = data.split_first() else { return };
    let json_len = (split as usize * body.len()) / 255;
    let header = json_len.to_string();
    for header_len in [None, Some(header.as_str())] {
        let Ok((req, binary)) = decode_body(body, header_len) else { continue };
        // The model takes what the request names after a datatype ("fp32", "bytes", ...),
        // with every dimension free, so decoding (not the name check) is what runs.
        let mut metas: Vec<TensorMeta> = Vec::new();
        for input in &req.inputs {
            if let Some(d) = DataType::parse(&input.name.to_uppercase()) {
                if !metas.iter().any(|m| m.name == input.name) {
                    metas.push(TensorMeta {
                        name: input.name.clone(),
                        datatype: d,
                        shape: vec![-1; input.shape.len()],
                    });
                }
            }
        }
        for batch in [0, 4] {
            match decode_inputs(&metas, batch, &req, binary, &NoSharedMemory) {
                Ok(tensors) => {
                    for t in tensors {
                        assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
                    }
                }
                Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
            }
        }
    }
});
