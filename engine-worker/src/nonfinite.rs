//! Non-finite numbers in the HTTP face's JSON, as Triton reads and writes
//! them (RapidJSON's NaN/Inf extension, which Python's `json` and
//! tritonclient's `rapidjson` speak too): a request may write `NaN`,
//! `Infinity`, `-Infinity` (or `Inf`, `-Inf`, `-NaN`) bare in a float
//! tensor's `data`, and an answer writes a float output's non-finite elements
//! as `NaN`, `Infinity` and `-Infinity`. Standard JSON has no such numbers, so
//! a request that uses them is rewritten before parsing: each bare token
//! becomes a marked string that only a float tensor's data accepts.

use serde::ser::{Serialize, SerializeStruct, Serializer};

/// The mark a rewritten token carries (a NUL, which a client's own string
/// could carry only escaped as `\u0000`; a body that holds that escape is
/// never rewritten).
const MARK: char = '\0';

/// The spellings read, longest first, and the value each stands for.
const SPELLINGS: [(&[u8], f64); 6] = [
    (b"-Infinity", f64::NEG_INFINITY),
    (b"Infinity", f64::INFINITY),
    (b"-Inf", f64::NEG_INFINITY),
    (b"Inf", f64::INFINITY),
    (b"-NaN", f64::NAN),
    (b"NaN", f64::NAN),
];

/// `json` with each bare non-finite token outside strings turned into a
/// marked string, or `None` when it has none (the common case, found by two
/// substring searches) or already holds a `\u0000` escape (then the tokens
/// stay what standard JSON makes them: a parse error).
pub fn quote_tokens(json: &[u8]) -> Option<Vec<u8>> {
    let has = |needle: &[u8]| memchr::memmem::find(json, needle).is_some();
    if !(has(b"NaN") || has(b"Inf")) || has(b"\\u0000") {
        return None;
    }
    let mut out = Vec::with_capacity(json.len() + 64);
    let (mut i, mut in_string, mut changed) = (0, false, false);
    while let Some(&b) = json.get(i) {
        if in_string {
            out.push(b);
            match b {
                b'\\' => {
                    // The escaped byte, whatever it is, is part of the string.
                    if let Some(&next) = json.get(i + 1) {
                        out.push(next);
                        i += 1;
                    }
                }
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if matches!(b, b'N' | b'I' | b'-') {
            if let Some((spelling, value)) = token_at(&json[i..]) {
                out.extend_from_slice(b"\"\\u0000");
                out.extend_from_slice(canonical(value).as_bytes());
                out.push(b'"');
                i += spelling.len();
                changed = true;
                continue;
            }
        }
        in_string = b == b'"';
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// The token `rest` starts with, whole (not the start of a longer word).
fn token_at(rest: &[u8]) -> Option<(&'static [u8], f64)> {
    SPELLINGS.iter().copied().find(|(spelling, _)| {
        rest.starts_with(spelling) && rest.get(spelling.len()).is_none_or(|c| !c.is_ascii_alphanumeric())
    })
}

/// The value of a string [`quote_tokens`] made, if `s` is one.
pub fn marked(s: &str) -> Option<f64> {
    match s.strip_prefix(MARK)? {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// A parser's message about a marked string, naming the token as written
/// (`invalid type: NaN`, not the string it was made into).
pub fn unquoted(message: String) -> String {
    if !message.contains("\\0") {
        return message;
    }
    ["NaN", "Infinity", "-Infinity"]
        .iter()
        .fold(message, |m, token| m.replace(&format!("string \"\\0{token}\""), token))
}

/// How a non-finite value is written: `NaN`, `Infinity` or `-Infinity`.
pub fn canonical(value: f64) -> &'static str {
    if value.is_nan() {
        "NaN"
    } else if value > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// A float element of an answer: a JSON number when finite, else its bare
/// token (written through serde_json's raw-value hook, as a `RawValue` is;
/// serde_json itself writes `null` for a non-finite float).
pub struct Element<T>(pub T);

/// The name serde_json's serializer recognises for text written as it is
/// (`serde_json::value::RawValue` serializes itself this way; the unit tests
/// pin it).
const RAW: &str = "$serde_json::private::RawValue";

impl<T: Serialize + Copy + Into<f64>> Serialize for Element<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let value: f64 = self.0.into();
        if value.is_finite() {
            return self.0.serialize(s);
        }
        let mut raw = s.serialize_struct(RAW, 1)?;
        raw.serialize_field(RAW, canonical(value))?;
        raw.end()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn quoted(json: &str) -> Option<String> {
        quote_tokens(json.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn bare_tokens_become_marked_strings_and_strings_are_left_alone() {
        let got = quoted(r#"{"data":[NaN, -Inf,Infinity,-Infinity ,Inf,-NaN,1.5],"s":"NaN Inf \" NaN"}"#).unwrap();
        let want = r#"{"data":["\u0000NaN", "\u0000-Infinity","\u0000Infinity","\u0000-Infinity" ,"\u0000Infinity","\u0000NaN",1.5],"s":"NaN Inf \" NaN"}"#;
        assert_eq!(got, want);
        let values: serde_json::Value = serde_json::from_str(&got).unwrap();
        let data = values["data"].as_array().unwrap();
        assert!(marked(data[0].as_str().unwrap()).unwrap().is_nan());
        assert_eq!(marked(data[1].as_str().unwrap()), Some(f64::NEG_INFINITY));
        assert_eq!(marked(data[2].as_str().unwrap()), Some(f64::INFINITY));
        assert_eq!(marked("NaN"), None, "only a marked string stands for a number");
    }

    #[test]
    fn bodies_without_tokens_or_with_their_own_nul_escapes_are_not_rewritten() {
        assert_eq!(quoted(r#"{"name":"INPUT0","data":[1,2]}"#), None);
        assert_eq!(quoted(r#"{"name":"NaN and Inf","data":["Infinity"]}"#), None, "only in strings");
        assert_eq!(quoted(r#"{"s":"\u0000NaN","data":[NaN]}"#), None);
        // A longer word is no token (and stays the parse error it is).
        assert_eq!(quoted(r#"[NaNa, Infinite]"#), None);
        // An escaped quote does not end the string.
        assert_eq!(quoted(r#"["a\"NaN", NaN]"#).unwrap(), r#"["a\"NaN", "\u0000NaN"]"#);
    }

    #[test]
    fn answers_write_non_finite_elements_as_bare_tokens() {
        let v = [1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0].map(Element);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[1.5,NaN,Infinity,-Infinity,0.0]");
        // An FP32 element keeps its own shortest form.
        let v = [0.1f32, f32::NAN].map(Element);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[0.1,NaN]");
    }
}
