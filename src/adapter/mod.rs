//! An adapter as loraplex, its origins and vLLM see it: a validated [`AdapterName`] (also the
//! directory it is stored under), the files of a PEFT adapter directory, and loraplex's own
//! `.loraplex_meta` beside them ([`meta`]).

pub mod meta;
pub mod name;

pub use self::name::AdapterName;

/// The file vLLM reads first; every adapter has one.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Weights, preferred.
pub const SAFETENSORS_FILE: &str = "adapter_model.safetensors";
/// Weights, legacy pickle format, used when there is no safetensors file.
pub const BIN_FILE: &str = "adapter_model.bin";
/// loraplex's own record of where an adapter came from, inside its directory (hidden: vLLM
/// ignores it, and no origin may deliver a file of that name).
pub const META_FILE: &str = ".loraplex_meta";
