//! Is this a usable LoRA adapter? Checked before publishing (while streaming, so nothing is
//! read back from disk) and again at startup for what is already on disk.
//!
//! - `adapter_config.json` parses, `peft_type` is `LORA`, `base_model_name_or_path` is a
//!   string (vLLM's resolver raises on a missing key and compares it exactly with `--model`,
//!   hence the optional rewrite to the served base model);
//! - `adapter_model.safetensors`: the header parses, every tensor's `data_offsets` lie inside
//!   the data, are contiguous, agree with dtype × shape, and end exactly at the end of the file
//!   (a truncated download fails here);
//! - `adapter_model.bin` (pickle, not parsed): not empty.

use std::{fs, io::Read, path::Path};

use serde_json::Value;

use crate::adapter::{BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE};

/// Largest `adapter_config.json` accepted (they are ~1 KB).
pub const MAX_CONFIG: usize = 4 << 20;
/// Largest safetensors header accepted (the safetensors library's own limit).
pub const MAX_HEADER: u64 = 100 << 20;

/// Check a config; returns the bytes to store when the base model had to be rewritten.
pub fn check_config(
    bytes: &[u8],
    rewrite_base_to: Option<&str>,
) -> Result<Option<Vec<u8>>, String> {
    let mut v: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("{CONFIG_FILE} is not valid JSON: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| format!("{CONFIG_FILE} is not a JSON object"))?;
    match obj.get("peft_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("lora") => {}
        Some(t) => return Err(format!("{CONFIG_FILE}: peft_type is {t:?}, not \"LORA\"")),
        None => return Err(format!("{CONFIG_FILE}: no peft_type")),
    }
    let base = obj
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{CONFIG_FILE}: no base_model_name_or_path"))?;
    match rewrite_base_to {
        Some(to) if to != base => {
            obj.insert("base_model_name_or_path".into(), Value::String(to.into()));
            Ok(Some(
                serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?,
            ))
        }
        _ => Ok(None),
    }
}

/// Bytes per element of a safetensors dtype; `None` for ones we don't size (sub-byte floats).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Check a parsed safetensors header against the size of the data section.
pub fn check_safetensors_header(header: &[u8], data_len: u64) -> Result<(), String> {
    let bad = |why: String| Err(format!("{SAFETENSORS_FILE}: {why}"));
    let v: Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => return bad(format!("header is not valid JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return bad("header is not a JSON object".into());
    };
    let mut spans = Vec::with_capacity(obj.len());
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let offsets = t.get("data_offsets").and_then(Value::as_array);
        let (Some([b, e]), Some(dtype), Some(shape)) = (
            offsets.map(|o| o.as_slice()),
            t.get("dtype").and_then(Value::as_str),
            t.get("shape").and_then(Value::as_array),
        ) else {
            return bad(format!(
                "tensor {name:?}: missing dtype, shape or data_offsets"
            ));
        };
        let (Some(b), Some(e)) = (b.as_u64(), e.as_u64()) else {
            return bad(format!("tensor {name:?}: offsets are not integers"));
        };
        if b > e {
            return bad(format!("tensor {name:?}: offsets [{b}, {e}] are reversed"));
        }
        if let Some(size) = dtype_size(dtype) {
            let elems = shape
                .iter()
                .try_fold(1u64, |acc, d| d.as_u64().and_then(|d| acc.checked_mul(d)));
            if elems.and_then(|n| n.checked_mul(size)) != Some(e - b) {
                return bad(format!(
                    "tensor {name:?}: {dtype} {shape:?} does not fit [{b}, {e}]"
                ));
            }
        }
        spans.push((b, e));
    }
    spans.sort_unstable();
    let mut end = 0;
    for (b, e) in spans {
        if b != end {
            return bad(format!("tensor data is not contiguous at byte {end}"));
        }
        end = e;
    }
    if end != data_len {
        return bad(format!(
            "tensors end at byte {end} of the data but the data is {data_len} bytes (truncated or padded)"
        ));
    }
    Ok(())
}

/// Collects the safetensors header from a stream of chunks, then checks it at the end.
#[derive(Default)]
pub struct SafetensorsProbe {
    head: Vec<u8>,
    header_len: Option<u64>,
    total: u64,
}

impl SafetensorsProbe {
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.total += chunk.len() as u64;
        let mut rest = chunk;
        loop {
            let want = match self.header_len {
                Some(n) => 8 + n as usize,
                None => 8,
            };
            if self.head.len() >= want || rest.is_empty() {
                return Ok(());
            }
            let take = (want - self.head.len()).min(rest.len());
            self.head.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.header_len.is_none() && self.head.len() == 8 {
                let n = u64::from_le_bytes(self.head[..8].try_into().expect("8 bytes"));
                if n > MAX_HEADER {
                    return Err(format!(
                        "{SAFETENSORS_FILE}: header of {n} bytes is too large"
                    ));
                }
                self.header_len = Some(n);
            }
        }
    }

    pub fn finish(&self) -> Result<(), String> {
        let Some(n) = self.header_len else {
            return Err(format!(
                "{SAFETENSORS_FILE}: shorter than its 8-byte header length"
            ));
        };
        if self.head.len() < 8 + n as usize {
            return Err(format!("{SAFETENSORS_FILE}: file ends inside its header"));
        }
        check_safetensors_header(&self.head[8..], self.total - 8 - n)
    }
}

/// Check a safetensors file on disk (startup).
fn check_safetensors_file(path: &Path) -> Result<(), String> {
    let mut f = fs::File::open(path).map_err(|e| format!("{SAFETENSORS_FILE}: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| format!("{SAFETENSORS_FILE}: shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > len {
        return Err(format!(
            "{SAFETENSORS_FILE}: header length {n} does not fit the file ({len} bytes)"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    check_safetensors_header(&header, len - 8 - n)
}

/// Check an adapter directory on disk.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let config = fs::read(dir.join(CONFIG_FILE)).map_err(|e| format!("{CONFIG_FILE}: {e}"))?;
    check_config(&config, None)?;
    let st = dir.join(SAFETENSORS_FILE);
    if st.exists() {
        return check_safetensors_file(&st);
    }
    match fs::metadata(dir.join(BIN_FILE)) {
        Ok(m) if m.len() > 0 => Ok(()),
        Ok(_) => Err(format!("{BIN_FILE} is empty")),
        Err(_) => Err("adapter has no weights".into()),
    }
}

/// A valid safetensors file with one F32 tensor of `floats` elements (tests and benches).
pub fn tiny_safetensors(floats: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"lora_A":{{"dtype":"F32","shape":[{floats}],"data_offsets":[0,{}]}}}}"#,
        floats * 4
    );
    let mut out = Vec::with_capacity(8 + header.len() + floats * 4);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend((0..floats * 4).map(|i| (i % 251) as u8));
    out
}

/// A valid adapter config for `base` (tests and benches).
pub fn tiny_config(base: &str) -> Vec<u8> {
    format!(r#"{{"peft_type":"LORA","base_model_name_or_path":"{base}","r":8,"lora_alpha":16,"target_modules":["q_proj"]}}"#).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs() {
        assert_eq!(check_config(&tiny_config("m"), None), Ok(None));
        assert_eq!(check_config(&tiny_config("m"), Some("m")), Ok(None));
        let re = check_config(&tiny_config("m"), Some("served"))
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&re).unwrap();
        assert_eq!(v["base_model_name_or_path"], "served");
        assert_eq!(v["r"], 8);
        for (bad, why) in [
            (&b"{"[..], "not valid JSON"),
            (b"[]", "not a JSON object"),
            (
                br#"{"peft_type":"IA3","base_model_name_or_path":"m"}"#,
                "not \"LORA\"",
            ),
            (br#"{"peft_type":"LORA"}"#, "no base_model_name_or_path"),
        ] {
            let e = check_config(bad, None).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn probe_accepts_whole_file_in_any_chunking() {
        let file = tiny_safetensors(100);
        for step in [1, 3, 8, 9, 64, file.len()] {
            let mut p = SafetensorsProbe::default();
            for c in file.chunks(step) {
                p.feed(c).unwrap();
            }
            p.finish().unwrap_or_else(|e| panic!("step {step}: {e}"));
        }
    }

    #[test]
    fn probe_rejects_truncation_padding_and_garbage() {
        let file = tiny_safetensors(100);
        let check = |bytes: &[u8]| {
            let mut p = SafetensorsProbe::default();
            p.feed(bytes).and_then(|_| p.finish())
        };
        assert!(
            check(&file[..file.len() - 1])
                .unwrap_err()
                .contains("truncated")
        );
        let mut padded = file.clone();
        padded.push(0);
        assert!(check(&padded).is_err());
        assert!(check(&file[..5]).is_err());
        assert!(
            check(&file[..20])
                .unwrap_err()
                .contains("inside its header")
        );
        assert!(
            check(&u64::MAX.to_le_bytes())
                .unwrap_err()
                .contains("too large")
        );
        let shape_lie = br#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(
            check_safetensors_header(shape_lie, 8)
                .unwrap_err()
                .contains("does not fit")
        );
        let gap = br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
        assert!(
            check_safetensors_header(gap, 5)
                .unwrap_err()
                .contains("contiguous")
        );
    }

    #[test]
    fn dirs_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::write(p.join(CONFIG_FILE), tiny_config("m")).unwrap();
        assert_eq!(check_dir(p).unwrap_err(), "adapter has no weights");
        fs::write(p.join(BIN_FILE), b"").unwrap();
        assert!(check_dir(p).unwrap_err().contains("empty"));
        let st = tiny_safetensors(10);
        fs::write(p.join(SAFETENSORS_FILE), &st[..st.len() - 3]).unwrap();
        assert!(check_dir(p).is_err());
        fs::write(p.join(SAFETENSORS_FILE), &st).unwrap();
        check_dir(p).unwrap();
    }
}
