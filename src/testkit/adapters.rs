//! Generated PEFT LoRA adapters: what a fine-tuning job leaves on the Hub or in a bucket.
//!
//! An adapter is `adapter_config.json` (the keys PEFT writes, sorted, indented like
//! `save_pretrained`) plus `adapter_model.safetensors` written by the `safetensors` crate, the
//! reference implementation that the Python package wraps, so the header (8-byte LE length, JSON
//! with `dtype`/`shape`/`data_offsets`, `__metadata__ {"format":"pt"}`, space padding to 8 bytes)
//! is byte-for-byte what PEFT produces for the same tensors. Tensors are F32 LoRA A/B pairs
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...) filled with small
//! deterministic pseudo-random values from the spec's seed, so two seeds give different files
//! and a test can recompute any byte.
//!
//! [`Defect`] makes the broken variants the store and the stand-in vLLM must refuse, and
//! [`check_safetensors`] is the stand-in's own wholeness check (header parses, offsets tile the
//! data, `8 + header + data == file size`), independent of the store's validation.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read},
    path::{Component, Path, PathBuf},
};

use safetensors::{Dtype, tensor::Metadata, tensor::TensorView};
use serde_json::json;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const SAFETENSORS_FILE: &str = "adapter_model.safetensors";
pub const BIN_FILE: &str = "adapter_model.bin";

/// Which weights file the adapter has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    Safetensors,
    /// `adapter_model.bin`: opaque deterministic bytes of the requested size, not a real torch
    /// pickle (nothing here can load one; the stand-in vLLM only checks it is there).
    Bin,
    /// Config only (a half-uploaded adapter).
    Missing,
}

/// A deliberate flaw, for the refusal paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// The weights file cut to two thirds of its length.
    TruncatedWeights,
    /// 64 stray bytes after the last tensor: the header's offsets no longer match the file size.
    OffsetsMismatch,
    /// `peft_type` is `"IA3"`.
    NotLora,
    /// No `base_model_name_or_path` key (vLLM's resolver raises: HTTP 500).
    MissingBaseModel,
    /// No `peft_type` key (vLLM's resolver raises: HTTP 500).
    MissingPeftType,
    /// `adapter_config.json` cut in the middle of an object.
    InvalidConfigJson,
}

/// What adapter to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSpec {
    /// `base_model_name_or_path`; must equal vLLM's `--model` to resolve.
    pub base_model: String,
    /// Approximate size of the weights file in bytes (the data part; the header adds a little).
    pub size: u64,
    pub seed: u64,
    pub weights: Weights,
    pub rank: u32,
    pub target_modules: Vec<String>,
    pub defect: Option<Defect>,
    /// Exact model dimensions (then `size` is ignored), for a real vLLM to load the adapter.
    pub dims: Option<ModelDims>,
}

/// The dimensions of the model an adapter targets, for the attention projections
/// (`q_proj`/`o_proj`: hidden → hidden, `k_proj`/`v_proj`: hidden → kv_dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    pub layers: usize,
    pub hidden: usize,
    /// `num_key_value_heads * head_dim`.
    pub kv_dim: usize,
}

impl ModelDims {
    /// The tiny Llama of `scripts/vllm/make_tiny_model.py` (2 layers, hidden 256, 2 KV heads
    /// of 64): adapters with these dims and `q/k/v/o_proj` load in the real CPU vLLM.
    pub const TINY_LLAMA: ModelDims = ModelDims {
        layers: 2,
        hidden: 256,
        kv_dim: 128,
    };
}

impl AdapterSpec {
    /// A valid safetensors adapter of about `size` bytes, rank 8, on `q_proj` and `v_proj`.
    pub fn new(base_model: impl Into<String>, size: u64, seed: u64) -> AdapterSpec {
        AdapterSpec {
            base_model: base_model.into(),
            size,
            seed,
            weights: Weights::Safetensors,
            rank: 8,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            defect: None,
            dims: None,
        }
    }

    /// Shape the tensors for a real model (see [`ModelDims`]); `size` no longer applies.
    pub fn dims(mut self, dims: ModelDims) -> AdapterSpec {
        self.dims = Some(dims);
        self
    }

    pub fn target_modules(mut self, modules: &[&str]) -> AdapterSpec {
        self.target_modules = modules.iter().map(|m| m.to_string()).collect();
        self
    }

    pub fn weights(mut self, weights: Weights) -> AdapterSpec {
        self.weights = weights;
        self
    }

    pub fn defect(mut self, defect: Defect) -> AdapterSpec {
        self.defect = Some(defect);
        self
    }

    pub fn rank(mut self, rank: u32) -> AdapterSpec {
        self.rank = rank.max(1);
        self
    }
}

/// `adapter_config.json` as PEFT writes it (keys sorted, two-space indent).
pub fn config_json(spec: &AdapterSpec) -> Vec<u8> {
    let mut config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": spec.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": spec.rank * 2,
        "lora_dropout": 0.05,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": spec.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    });
    let map = config.as_object_mut().expect("a json! object");
    match spec.defect {
        Some(Defect::NotLora) => {
            map.insert("peft_type".into(), json!("IA3"));
        }
        Some(Defect::MissingBaseModel) => {
            map.remove("base_model_name_or_path");
        }
        Some(Defect::MissingPeftType) => {
            map.remove("peft_type");
        }
        _ => {}
    }
    let mut text = serde_json::to_vec_pretty(&config).expect("a Value always serializes");
    if spec.defect == Some(Defect::InvalidConfigJson) {
        text.truncate(text.len() / 2);
    }
    text
}

/// SplitMix64: tiny, fast and deterministic; good enough to make bytes differ.
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Bytes drawn per call; longer outputs are slices of this pool at random offsets, because a
/// per-word loop is slow in debug builds (100 MB took 2 s) and tests only need bytes that are
/// deterministic and differ between seeds, not statistical quality.
const POOL: usize = 256 * 1024;

/// Copy slices of `pool` (each at least half of it, from a random 4-aligned offset) until `len`.
fn tile(rng: &mut SplitMix, pool: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let starts = (pool.len() / 2 / 4).max(1) as u64;
    while out.len() < len {
        let start = (rng.next_u64() % starts) as usize * 4;
        let take = (len - out.len()).min(pool.len() - start);
        out.extend_from_slice(&pool[start..start + take]);
    }
    out
}

/// `len` deterministic pseudo-random bytes from `seed`.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix::new(seed);
    let mut pool = Vec::with_capacity(POOL.min(len) + 8);
    while pool.len() < POOL.min(len) {
        pool.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    tile(&mut rng, &pool, len)
}

/// Small finite F32 values, little-endian: random sign and mantissa under a fixed exponent,
/// so |v| is in [2^-7, 2^-6). Made once per adapter; tensors are tiled from it.
fn f32_pool(rng: &mut SplitMix) -> Vec<u8> {
    const KEEP: u32 = 0x807F_FFFF; // sign and mantissa
    const EXP: u32 = 0x3C00_0000; // exponent 120: 2^-7
    let mut out = Vec::with_capacity(POOL);
    while out.len() < POOL {
        let r = rng.next_u64();
        out.extend_from_slice(&((r as u32 & KEEP) | EXP).to_le_bytes());
        out.extend_from_slice(&(((r >> 32) as u32 & KEEP) | EXP).to_le_bytes());
    }
    out
}

fn module_path(module: &str) -> &'static str {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn.",
        "gate_proj" | "up_proj" | "down_proj" => "mlp.",
        _ => "",
    }
}

/// `adapter_model.safetensors` for `spec` (whole: defects are applied by [`adapter_files`]).
pub fn safetensors_bytes(spec: &AdapterSpec) -> Vec<u8> {
    let rank = spec.rank.max(1) as usize;
    let modules = spec.target_modules.len().max(1);
    // Without dims: few layers for small files, at most 32 so the header stays small for large
    // ones, and a square size that reaches `spec.size`.
    let layers = match spec.dims {
        Some(d) => d.layers,
        None => (spec.size / (256 * 1024)).clamp(1, 32) as usize,
    };
    let square = ((spec.size as usize) / (layers * modules * 2 * rank * 4)).max(1);
    // (in, out) of a module.
    let dims = |module: &str| match (spec.dims, module) {
        (Some(d), "k_proj" | "v_proj") => (d.hidden, d.kv_dim),
        (Some(d), _) => (d.hidden, d.hidden),
        (None, _) => (square, square),
    };

    let mut rng = SplitMix::new(spec.seed);
    let pool = f32_pool(&mut rng);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(layers * modules * 2);
    for layer in 0..layers {
        for module in spec.target_modules.iter().take(modules) {
            let prefix = format!(
                "base_model.model.model.layers.{layer}.{}{module}",
                module_path(module)
            );
            let (input, output) = dims(module);
            let a = tile(&mut rng, &pool, rank * input * 4);
            let b = tile(&mut rng, &pool, output * rank * 4);
            tensors.push((format!("{prefix}.lora_A.weight"), vec![rank, input], a));
            tensors.push((format!("{prefix}.lora_B.weight"), vec![output, rank], b));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .expect("shape and data length agree by construction");
            (name.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(metadata)).expect("a few hundred tensors always serialize")
}

/// Every file of the adapter, defects applied: `(file name, bytes)`.
pub fn adapter_files(spec: &AdapterSpec) -> Vec<(&'static str, Vec<u8>)> {
    let mut files = vec![(CONFIG_FILE, config_json(spec))];
    let weights = match spec.weights {
        Weights::Safetensors => Some((SAFETENSORS_FILE, safetensors_bytes(spec))),
        Weights::Bin => Some((
            BIN_FILE,
            pseudo_random_bytes(spec.seed, spec.size.max(1) as usize),
        )),
        Weights::Missing => None,
    };
    if let Some((name, mut data)) = weights {
        match spec.defect {
            Some(Defect::TruncatedWeights) => data.truncate(data.len() * 2 / 3),
            Some(Defect::OffsetsMismatch) => data.extend_from_slice(&[0xAB; 64]),
            _ => {}
        }
        files.push((name, data));
    }
    files
}

/// `name` as a relative path that stays under its parent (nested directories for `/`).
pub fn checked_rel_path(name: &str) -> io::Result<PathBuf> {
    let path = Path::new(name);
    let normal = !name.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if normal {
        Ok(path.to_path_buf())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("adapter name {name:?} is not a plain relative path"),
        ))
    }
}

/// Write the adapter into `dir/name/` (replacing files of the same names) and return that path.
pub fn write_adapter(dir: &Path, name: &str, spec: &AdapterSpec) -> io::Result<PathBuf> {
    let adapter_dir = dir.join(checked_rel_path(name)?);
    fs::create_dir_all(&adapter_dir)?;
    for (file, data) in adapter_files(spec) {
        fs::write(adapter_dir.join(file), data)?;
    }
    Ok(adapter_dir)
}

/// Check a safetensors file is whole: the header parses, offsets tile the data exactly and
/// `8 + header length + data length == file size`. Reads only the header.
pub fn check_safetensors(path: &Path) -> Result<(), String> {
    let mut file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| format!("{size} bytes: shorter than the 8-byte header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > size {
        return Err(format!(
            "header length {header_len} does not fit a {size}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("reading the header: {e}"))?;
    check_header(&header, header_len, size)
}

/// [`check_safetensors`] on bytes in memory.
pub fn check_safetensors_bytes(bytes: &[u8]) -> Result<(), String> {
    let size = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!(
            "{size} bytes: shorter than the 8-byte header length"
        ));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > 100_000_000 || 8 + header_len > size {
        return Err(format!(
            "header length {header_len} does not fit a {size}-byte file"
        ));
    }
    check_header(&bytes[8..8 + header_len as usize], header_len, size)
}

fn check_header(header: &[u8], header_len: u64, size: u64) -> Result<(), String> {
    // `Metadata`'s deserializer validates dtype sizes and that offsets tile from 0 without gaps.
    let metadata: Metadata =
        serde_json::from_slice(header).map_err(|e| format!("bad safetensors header: {e}"))?;
    let expected = 8 + header_len + metadata.data_len() as u64;
    if expected != size {
        return Err(format!(
            "header says 8 + {header_len} + {} = {expected} bytes, file has {size}",
            metadata.data_len()
        ));
    }
    Ok(())
}

/// The weights file vLLM would read from `adapter_dir`: safetensors first, then bin.
pub fn weights_file(adapter_dir: &Path) -> Option<PathBuf> {
    [SAFETENSORS_FILE, BIN_FILE]
        .iter()
        .map(|f| adapter_dir.join(f))
        .find(|p| p.is_file())
}

/// xxh3-64 of a file, streamed.
pub fn file_hash(path: &Path) -> io::Result<u64> {
    let mut file = fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.digest());
        }
        hasher.update(&buf[..n]);
    }
}

/// A hash as the 16 hex digits the stand-ins print.
pub fn hash16(hash: u64) -> String {
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_is_whole_and_sized() {
        for size in [0, 1000, 300_000, 3_000_000] {
            let bytes = safetensors_bytes(&AdapterSpec::new("base", size, 7));
            check_safetensors_bytes(&bytes).unwrap();
            let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert!(parsed.names().iter().all(|n| n.contains(".lora_")));
            if size >= 300_000 {
                let ratio = bytes.len() as f64 / size as f64;
                assert!(
                    (0.95..1.05).contains(&ratio),
                    "size {size}: {}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn dims_shape_the_tensors_for_a_real_model() {
        let spec = AdapterSpec::new("base", 0, 1)
            .target_modules(&["q_proj", "k_proj", "v_proj", "o_proj"])
            .dims(ModelDims::TINY_LLAMA);
        let bytes = safetensors_bytes(&spec);
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(parsed.len(), 2 * 4 * 2);
        let shape = |n: &str| parsed.tensor(n).unwrap().shape().to_vec();
        let k = "base_model.model.model.layers.1.self_attn.k_proj";
        assert_eq!(shape(&format!("{k}.lora_A.weight")), vec![8, 256]);
        assert_eq!(shape(&format!("{k}.lora_B.weight")), vec![128, 8]);
        let o = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight";
        assert_eq!(shape(o), vec![256, 8]);
    }

    #[test]
    fn seed_decides_the_bytes() {
        let a = safetensors_bytes(&AdapterSpec::new("base", 10_000, 1));
        let b = safetensors_bytes(&AdapterSpec::new("base", 10_000, 2));
        assert_eq!(a, safetensors_bytes(&AdapterSpec::new("base", 10_000, 1)));
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);
    }

    #[test]
    fn defects_are_caught() {
        let spec = AdapterSpec::new("base", 10_000, 3);
        for defect in [Defect::TruncatedWeights, Defect::OffsetsMismatch] {
            let files = adapter_files(&spec.clone().defect(defect));
            let err = check_safetensors_bytes(&files[1].1).unwrap_err();
            assert!(!err.is_empty(), "{defect:?}");
        }
        let cfg = |d| -> Result<serde_json::Value, _> {
            serde_json::from_slice(&config_json(&spec.clone().defect(d)))
        };
        assert_eq!(cfg(Defect::NotLora).unwrap()["peft_type"], "IA3");
        assert!(cfg(Defect::MissingBaseModel).unwrap()["base_model_name_or_path"].is_null());
        assert!(
            cfg(Defect::MissingPeftType)
                .unwrap()
                .get("peft_type")
                .is_none()
        );
        assert!(cfg(Defect::InvalidConfigJson).is_err());
    }

    #[test]
    fn writes_nested_names_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AdapterSpec::new("base", 5000, 4);
        let path = write_adapter(dir.path(), "acme/a", &spec).unwrap();
        assert_eq!(path, dir.path().join("acme").join("a"));
        check_safetensors(&path.join(SAFETENSORS_FILE)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(path.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["base_model_name_or_path"], "base");
        assert_eq!(config["r"], 8);
        for bad in ["../x", "/abs", "a/../../b", ""] {
            assert!(write_adapter(dir.path(), bad, &spec).is_err(), "{bad}");
        }
        let truncated = spec.defect(Defect::TruncatedWeights);
        let path = write_adapter(dir.path(), "acme/t", &truncated).unwrap();
        assert!(check_safetensors(&path.join(SAFETENSORS_FILE)).is_err());
    }
}
