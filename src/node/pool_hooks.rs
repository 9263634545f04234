//! The store's vLLM hooks with base-model pools: `storage.rewrite_base_model` writes the
//! `--model` of this node's vLLM serving the adapter's base model (known from
//! `routing.base_models` or its config, `crate::origin::base`), so an adapter of the second
//! base model of a node is not rewritten to the first's. Unknown base, or no local vLLM of it:
//! the first backend's, as with one base model.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::{
    adapter::AdapterName,
    error::Error,
    origin::base::{Base, BaseModels},
    store::VllmHooks,
    vllm::Backends,
};

pub struct PoolHooks {
    pub inner: Arc<dyn VllmHooks>,
    pub backends: Arc<Backends>,
    pub bases: Arc<BaseModels>,
}

impl VllmHooks for PoolHooks {
    fn unload(&self, name: &str) -> BoxFuture<'static, Result<(), Error>> {
        self.inner.unload(name)
    }

    fn base_model(&self) -> Option<String> {
        self.inner.base_model()
    }

    fn base_model_for(&self, name: &AdapterName) -> Option<String> {
        if let Some(Base::Known(base)) = self.bases.known(name.as_str())
            && let Some(model) = self
                .backends
                .all()
                .iter()
                .filter_map(|b| b.base_model())
                .find(|m| m.is_base(&base))
        {
            return Some(model.root.to_string());
        }
        self.inner.base_model()
    }
}
