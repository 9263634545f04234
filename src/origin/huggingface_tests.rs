//! Tests of the Hugging Face origin's pure parts: which files make an adapter, and where the
//! token may go. The HTTP behaviour is tested against the stand-in Hub (`tests/origins.rs`).

use super::*;
use crate::origin::OriginErrorKind;

fn sib(name: &str, size: u64, lfs: bool) -> Sibling {
    Sibling {
        rfilename: name.into(),
        size: Some(size),
        lfs: lfs.then(|| LfsInfo {
            sha256: "ab".repeat(32),
            size,
        }),
    }
}

fn names(files: &[FileSpec]) -> Vec<&str> {
    files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn selects_config_weights_and_small_companions() {
    let repo = [
        sib("adapter_config.json", 500, false),
        sib("adapter_model.bin", 9 << 20, true),
        sib("adapter_model.safetensors", 8 << 20, true),
        sib("tokenizer.json", 3 << 20, false),
        sib("tokenizer.model", 500_000, true),
        sib("chat_template.jinja", 900, false),
        sib("huge.json", 100 << 20, true),
        sib("README.md", 100, false),
        sib(".gitattributes", 100, false),
        sib("model.safetensors", 5 << 30, true),
        sib("training_args.bin", 5000, true),
        sib("checkpoint-5/adapter_config.json", 500, false),
        sib("weird name.json", 10, false),
    ];
    let files = select_files(&repo).unwrap();
    assert_eq!(
        names(&files),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer.model",
            "chat_template.jinja",
        ]
    );
    assert_eq!(files[1].size, Some(8 << 20));
    assert_eq!(files[1].sha256, Some([0xab; 32]));
    assert_eq!(files[0].sha256, None, "git files have no sha256");
}

#[test]
fn bin_weights_when_no_safetensors_and_refusals() {
    let repo = [
        sib("adapter_config.json", 5, false),
        sib("adapter_model.bin", 9, true),
    ];
    assert_eq!(
        names(&select_files(&repo).unwrap()),
        ["adapter_config.json", "adapter_model.bin"]
    );
    let no_weights = [sib("adapter_config.json", 5, false)];
    assert_eq!(
        select_files(&no_weights).unwrap_err().kind,
        OriginErrorKind::Invalid
    );
    let nested = [
        sib("sub/adapter_config.json", 5, false),
        sib("adapter_model.bin", 9, true),
    ];
    assert_eq!(
        select_files(&nested).unwrap_err().kind,
        OriginErrorKind::NotFound
    );
    let mut bad_sha = sib("adapter_model.bin", 9, true);
    bad_sha.lfs.as_mut().unwrap().sha256 = "xyz".into();
    let repo = [sib("adapter_config.json", 5, false), bad_sha];
    assert_eq!(
        select_files(&repo).unwrap_err().kind,
        OriginErrorKind::Invalid
    );
}

#[test]
fn token_only_for_the_hub_origin() {
    let t = TransferConfig::default();
    let c = HubClient::new("https://hub.example:443/", Some("t".into()), &t).unwrap();
    for (url, same) in [
        ("https://hub.example/org/x/resolve/abc/f", true),
        ("https://hub.example:443/x", true),
        ("http://hub.example/x", false),
        ("https://hub.example:8443/x", false),
        ("https://cdn-lfs.hub.example/x", false),
        ("https://other.example/x", false),
    ] {
        assert_eq!(c.same_origin(&Url::parse(url).unwrap()), same, "{url}");
    }
    assert_eq!(
        c.url(&["org/x", "resolve", "main", "a b.json"]).as_str(),
        "https://hub.example/org/x/resolve/main/a%20b.json"
    );
    assert!(HubClient::new("ftp://x", None, &t).is_err());
    assert!(HubClient::new("not a url", None, &t).is_err());
}
