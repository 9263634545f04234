//! Hash keys: the string a request is placed by, per `routing.hash_on`.
//!
//! The keys are the Go project's (`buildHashKey` in `internal/proxy/body.go`):
//!
//! | `hash_on`             | key                                                      |
//! |-----------------------|----------------------------------------------------------|
//! | `model` (default)     | the `model` field                                        |
//! | `tenant`              | the `X-Tenant-ID` header                                 |
//! | `tenant/model`        | `{tenant}/{model}`; the model alone without the header   |
//! | `header:<H>`          | header `H`                                               |
//! | `header:<H>/model`    | `{H value}/{model}`; the model alone without the header  |
//!
//! As in Go, an empty header value or `model` counts as missing, and a composite key with its
//! header but no model is `{value}/` (placed by the header alone).
//!
//! Our rules on top of Go's, all giving `None` (serve on this node, do not route):
//!
//! - **No key at all.** Go hashes the empty string like any other key, so every request
//!   without one (no tenant header under `tenant`, for instance) lands on the single node that
//!   owns `""`. Such requests are spread by whatever balances client connections instead.
//! - **The base model as the whole key.** Under `model`, Go serves base-model requests locally
//!   (every node serves the base model); we do the same, and extend it to the composite modes
//!   when they fall back to the model alone: Go would send all base-model traffic without the
//!   header to the one node owning the base model's name.
//!
//! With a header in the key (`tenant`, `tenant/model`, `header:…`), base-model requests are
//! routed like any other (as in Go): that pins a session or tenant to one node, where vLLM's
//! prefix cache already holds its earlier turns.
//!
//! Hashing on `model`, the hot path, never allocates: the key borrows the request's model.

use std::borrow::Cow;

use crate::config::HashOn;

/// The tenant header of `hash_on: tenant` and `tenant/model`.
pub const TENANT_HEADER: &str = "X-Tenant-ID";

/// The hash key of a request, or `None` when it is served locally.
///
/// - `model`: the request's `model` field, if any.
/// - `base_model`: the served base model, when known; requests for it are not routed by
///   model (`None` until it is learnt: the model name is then taken as an adapter's).
/// - `header`: looks a header up by name, case-insensitively (the caller's job), giving its
///   value; surrounding whitespace is ignored.
pub fn hash_key<'a>(
    hash_on: &HashOn,
    model: Option<&'a str>,
    base_model: Option<&str>,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Option<Cow<'a, str>> {
    let model = model.filter(|m| !m.is_empty());
    let by_model = || model.filter(|m| Some(*m) != base_model).map(Cow::Borrowed);
    let value = |name: &str| header(name).map(str::trim).filter(|v| !v.is_empty());
    let with_model = |v: &str| Cow::Owned(format!("{v}/{}", model.unwrap_or("")));
    match hash_on {
        HashOn::Model => by_model(),
        HashOn::Tenant => value(TENANT_HEADER).map(Cow::Borrowed),
        HashOn::TenantModel => value(TENANT_HEADER).map(with_model).or_else(by_model),
        HashOn::Header(name) => value(name).map(Cow::Borrowed),
        HashOn::HeaderModel(name) => value(name).map(with_model).or_else(by_model),
    }
}

/// The pool of a base-model name: xxh3 of its exact bytes, never 0 (0 means "any pool" in
/// `RouteRequest::pool`). Every backend's names and every request's base model hash with this.
pub fn pool_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Option<&str> = Some("meta-llama/Llama-3.1-8B");

    /// Headers as a request would carry them; names match case-insensitively.
    fn lookup<'a>(headers: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
    }

    fn key(hash_on: &HashOn, model: Option<&str>, headers: &[(&str, &str)]) -> Option<String> {
        hash_key(hash_on, model, BASE, lookup(headers)).map(Cow::into_owned)
    }

    fn header(name: &str) -> HashOn {
        HashOn::Header(name.to_string())
    }

    fn header_model(name: &str) -> HashOn {
        HashOn::HeaderModel(name.to_string())
    }

    #[test]
    fn model_mode_borrows_the_model_and_ignores_headers() {
        let tenant = [("X-Tenant-ID", "acme")];
        let k = hash_key(&HashOn::Model, Some("lora-a"), BASE, lookup(&tenant));
        assert!(matches!(k, Some(Cow::Borrowed("lora-a"))));
        assert_eq!(
            key(&HashOn::Model, Some("org/lora-b"), &[]).as_deref(),
            Some("org/lora-b")
        );
    }

    #[test]
    fn model_mode_serves_base_and_keyless_requests_locally() {
        assert_eq!(key(&HashOn::Model, BASE, &[]), None);
        assert_eq!(key(&HashOn::Model, None, &[]), None);
        assert_eq!(key(&HashOn::Model, Some(""), &[]), None);
        // Base model not known yet: the name is taken as an adapter's.
        let k = hash_key(&HashOn::Model, BASE, None, |_| None);
        assert_eq!(k.as_deref(), BASE);
    }

    #[test]
    fn tenant_mode() {
        let tenant = [("x-tenant-id", " acme ")];
        assert_eq!(
            key(&HashOn::Tenant, Some("lora-c"), &tenant).as_deref(),
            Some("acme")
        );
        // Base-model requests of a tenant are pinned to its node too.
        assert_eq!(key(&HashOn::Tenant, BASE, &tenant).as_deref(), Some("acme"));
        assert_eq!(key(&HashOn::Tenant, None, &tenant).as_deref(), Some("acme"));
        // No tenant: no key (Go would hash "" onto one node).
        assert_eq!(key(&HashOn::Tenant, Some("lora-d"), &[]), None);
        assert_eq!(
            key(&HashOn::Tenant, Some("lora-d"), &[("X-Tenant-ID", "")]),
            None
        );
    }

    #[test]
    fn tenant_model_mode_and_its_fallback() {
        let tenant = [("X-Tenant-ID", "acme")];
        let on = HashOn::TenantModel;
        assert_eq!(
            key(&on, Some("lora-e"), &tenant).as_deref(),
            Some("acme/lora-e")
        );
        assert_eq!(
            key(&on, BASE, &tenant).as_deref(),
            Some("acme/meta-llama/Llama-3.1-8B")
        );
        assert_eq!(key(&on, None, &tenant).as_deref(), Some("acme/"));
        // Without the tenant: the model alone, and the base model not at all.
        assert_eq!(key(&on, Some("lora-f"), &[]).as_deref(), Some("lora-f"));
        assert!(matches!(
            hash_key(&on, Some("lora-f"), BASE, |_| None),
            Some(Cow::Borrowed("lora-f"))
        ));
        assert_eq!(
            key(&on, Some("lora-f"), &[("X-Tenant-ID", "  ")]).as_deref(),
            Some("lora-f")
        );
        assert_eq!(key(&on, BASE, &[]), None);
        assert_eq!(key(&on, None, &[]), None);
    }

    #[test]
    fn header_mode() {
        let on = header("X-Session-ID");
        let session = [("x-session-id", "s-123")];
        assert_eq!(key(&on, Some("lora-g"), &session).as_deref(), Some("s-123"));
        // Session pinning covers base-model requests (vLLM prefix cache).
        assert_eq!(key(&on, BASE, &session).as_deref(), Some("s-123"));
        assert_eq!(key(&on, Some("lora-h"), &[]), None);
        // Another header is not the configured one.
        assert_eq!(key(&on, Some("lora-h"), &[("X-Tenant-ID", "acme")]), None);
    }

    #[test]
    fn header_model_mode_and_its_fallback() {
        let on = header_model("X-Region");
        let region = [("X-Region", "eu-west-1")];
        assert_eq!(
            key(&on, Some("lora-i"), &region).as_deref(),
            Some("eu-west-1/lora-i")
        );
        assert_eq!(
            key(&on, BASE, &region).as_deref(),
            Some("eu-west-1/meta-llama/Llama-3.1-8B")
        );
        assert_eq!(key(&on, None, &region).as_deref(), Some("eu-west-1/"));
        assert_eq!(key(&on, Some("lora-j"), &[]).as_deref(), Some("lora-j"));
        assert_eq!(key(&on, BASE, &[]), None);
        assert_eq!(key(&on, Some(""), &[]), None);
    }
}
