//! How the stand-in vLLM finds and loads an adapter: the same decisions as vLLM's
//! `lora_filesystem_resolver` plugin followed by the engine's `add_lora`.
//!
//! Resolver (vLLM `plugins/lora_resolvers/filesystem_resolver.py`): `{dir}/{name}` must exist,
//! then `{dir}/{name}/adapter_config.json`; the config is parsed (a parse error raises, HTTP
//! 500); `peft_type` and `base_model_name_or_path` are indexed (a missing key raises, HTTP 500);
//! the adapter is a candidate only if `peft_type == "LORA"` and the base model equals `--model`
//! exactly, otherwise "not found".
//!
//! Load (`add_lora`): the weights are `adapter_model.safetensors`, else `adapter_model.bin`.
//! A candidate that fails to load is answered 400 `BadRequestError` "LoRA adapter 'X' was found
//! but could not be loaded." (vLLM `OpenAIServingModels.resolve_lora`). Here "fails" means: no
//! weights file, a safetensors file that is not whole ([`check_safetensors`]), an empty `.bin`,
//! or a config without a positive integer `r` (PEFT's config would not build).
//!
//! Unlike vLLM, a name that is not a plain relative path (`..`, absolute) is "not found" without
//! touching the disk: the stand-in never reads outside its directory.

use std::path::{Path, PathBuf};

use super::adapters::{
    BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, check_safetensors, checked_rel_path, file_hash,
};

/// An adapter vLLM holds in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedAdapter {
    pub name: String,
    /// The adapter directory (`lora_path`).
    pub path: PathBuf,
    /// The weights file read at load time.
    pub weights_file: PathBuf,
    /// xxh3-64 of the weights file as loaded.
    pub weights_hash: u64,
    /// Loaded through the resolver (`true`) or `POST /v1/load_lora_adapter` (`false`).
    pub resolved: bool,
}

/// The outcome of resolving a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Loaded(LoadedAdapter),
    /// No directory, no config, not LORA, or another base model: vLLM's 404.
    NotFound,
    /// Found but the load failed: vLLM's 400.
    Unloadable(String),
    /// The resolver itself raised (bad JSON, a missing key): vLLM's 500.
    Crashed(String),
}

/// Resolve `name` under `dir` for base model `base` (blocking file I/O).
pub fn resolve(dir: &Path, name: &str, base: &str) -> Resolution {
    let Ok(rel) = checked_rel_path(name) else {
        return Resolution::NotFound;
    };
    let path = dir.join(rel);
    let config_path = path.join(CONFIG_FILE);
    if !path.exists() || !config_path.exists() {
        return Resolution::NotFound;
    }
    let config = match read_config(&config_path) {
        Ok(config) => config,
        Err(why) => return Resolution::Crashed(why),
    };
    // Python indexes both keys before comparing, so a missing key raises even when the other
    // comparison would fail.
    let (Some(peft_type), Some(base_model)) = (
        config.get("peft_type"),
        config.get("base_model_name_or_path"),
    ) else {
        let key = if config.get("peft_type").is_none() {
            "peft_type"
        } else {
            "base_model_name_or_path"
        };
        return Resolution::Crashed(format!("KeyError: '{key}'"));
    };
    if peft_type.as_str() != Some("LORA") || base_model.as_str() != Some(base) {
        return Resolution::NotFound;
    }
    match load(name, &path, &config) {
        Ok(mut loaded) => {
            loaded.resolved = true;
            Resolution::Loaded(loaded)
        }
        Err(why) => Resolution::Unloadable(why),
    }
}

/// Load the adapter at `path` as `name`, as `add_lora` would (blocking file I/O). Used by the
/// resolver and by `POST /v1/load_lora_adapter` (which checks neither `peft_type` nor the base).
pub fn load_from_path(name: &str, path: &Path) -> Result<LoadedAdapter, LoadError> {
    let config_path = path.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(LoadError::NotFound);
    }
    let config = read_config(&config_path).map_err(LoadError::Broken)?;
    load(name, path, &config).map_err(LoadError::Broken)
}

/// Why an explicit load failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// No adapter at that path (vLLM: `LoRAAdapterNotFoundError`, 404).
    NotFound,
    /// There, but not loadable (vLLM: 500 `InternalServerError`).
    Broken(String),
}

fn read_config(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read(path).map_err(|e| format!("OSError: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("JSONDecodeError: {e}"))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err("TypeError: adapter_config.json is not an object".into())
    }
}

fn load(name: &str, path: &Path, config: &serde_json::Value) -> Result<LoadedAdapter, String> {
    if config
        .get("r")
        .and_then(|r| r.as_u64())
        .is_none_or(|r| r == 0)
    {
        return Err("adapter_config.json has no positive integer `r`".into());
    }
    let (weights_file, weights_hash) = read_weights(path)?;
    Ok(LoadedAdapter {
        name: name.to_owned(),
        path: path.to_path_buf(),
        weights_file,
        weights_hash,
        resolved: false,
    })
}

/// Find, check and hash the weights vLLM would read from `path`.
pub fn read_weights(path: &Path) -> Result<(PathBuf, u64), String> {
    let safetensors = path.join(SAFETENSORS_FILE);
    let bin = path.join(BIN_FILE);
    let file = if safetensors.is_file() {
        check_safetensors(&safetensors)
            .map_err(|why| format!("{SAFETENSORS_FILE} is not whole: {why}"))?;
        safetensors
    } else if bin.is_file() {
        let len = bin.metadata().map_err(|e| e.to_string())?.len();
        if len == 0 {
            return Err(format!("{BIN_FILE} is empty"));
        }
        bin
    } else {
        return Err(format!(
            "no {SAFETENSORS_FILE} or {BIN_FILE} in {}",
            path.display()
        ));
    };
    let hash = file_hash(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((file, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::adapters::{AdapterSpec, Defect, Weights, write_adapter};

    #[test]
    fn mirrors_the_filesystem_resolver() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let spec = AdapterSpec::new("base", 4000, 1);
        write_adapter(d, "org/ok", &spec).unwrap();
        write_adapter(d, "org/bin", &spec.clone().weights(Weights::Bin)).unwrap();
        write_adapter(d, "org/other", &AdapterSpec::new("other", 4000, 1)).unwrap();
        write_adapter(d, "org/nw", &spec.clone().weights(Weights::Missing)).unwrap();
        for (name, defect) in [
            ("d/trunc", Defect::TruncatedWeights),
            ("d/offs", Defect::OffsetsMismatch),
            ("d/ia3", Defect::NotLora),
            ("d/nobase", Defect::MissingBaseModel),
            ("d/nopeft", Defect::MissingPeftType),
            ("d/json", Defect::InvalidConfigJson),
        ] {
            write_adapter(d, name, &spec.clone().defect(defect)).unwrap();
        }
        let kind = |name: &str| match resolve(d, name, "base") {
            Resolution::Loaded(l) => format!(
                "loaded:{}",
                l.weights_file.file_name().unwrap().to_string_lossy()
            ),
            Resolution::NotFound => "404".into(),
            Resolution::Unloadable(_) => "400".into(),
            Resolution::Crashed(_) => "500".into(),
        };
        assert_eq!(kind("org/ok"), "loaded:adapter_model.safetensors");
        assert_eq!(kind("org/bin"), "loaded:adapter_model.bin");
        assert_eq!(kind("org/other"), "404");
        assert_eq!(kind("org/missing"), "404");
        assert_eq!(kind("org"), "404");
        assert_eq!(kind("../etc"), "404");
        assert_eq!(kind("org/nw"), "400");
        assert_eq!(kind("d/trunc"), "400");
        assert_eq!(kind("d/offs"), "400");
        assert_eq!(kind("d/ia3"), "404");
        assert_eq!(kind("d/nobase"), "500");
        assert_eq!(kind("d/nopeft"), "500");
        assert_eq!(kind("d/json"), "500");
    }
}
