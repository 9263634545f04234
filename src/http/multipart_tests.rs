use super::*;

const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

fn boundary() -> Boundary {
    Boundary::of_content_type(CT).unwrap().unwrap()
}

/// A form of `(Content-Disposition, value)` parts, as clients write it.
fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (disposition, value) in parts {
        out.extend_from_slice(b"--XyZ\r\nContent-Disposition: ");
        out.extend_from_slice(disposition.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--XyZ--\r\n");
    out
}

fn model(body: &[u8]) -> Result<Option<String>, u16> {
    extract_model(body, &boundary())
        .map(|m| m.map(str::to_owned))
        .map_err(|e| e.status())
}

/// A transcription request as `curl -F` writes it: the audio first, its bytes holding what
/// looks like the boundary but is not one.
fn transcription() -> Vec<u8> {
    let audio = b"RIFF\r\n--XyZ-not-a-boundary\r\n--XyZ\rX\x00\xff--XyZ\r\n\r\n--XyZz";
    let mut body =
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
        Content-Type: audio/wav\r\n\r\n"
            .to_vec();
    body.extend_from_slice(audio);
    body.extend_from_slice(
        b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nacme/whisper-lora\
          \r\n--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--XyZ--\r\n",
    );
    body
}

#[test]
fn reads_the_model_of_a_transcription() {
    assert_eq!(
        model(&transcription()),
        Ok(Some("acme/whisper-lora".into()))
    );
}

#[test]
fn content_types() {
    let of = |ct: &str| Boundary::of_content_type(ct.as_bytes()).map_err(|e| e.status());
    let delimiter = |b: &str| Ok(Some(Boundary(format!("\r\n--{b}").into_bytes())));
    assert_eq!(of("multipart/form-data; boundary=XyZ"), delimiter("XyZ"));
    assert_eq!(
        of(" Multipart/Form-Data ;\tBoundary = \"a b:c=d\" ; charset=UTF-8"),
        delimiter("a b:c=d")
    );
    for other in [
        "multipart/mixed; boundary=x",
        "application/json; x=multipart/form-data",
        "",
    ] {
        assert_eq!(of(other), Ok(None), "{other}");
    }
    for refused in [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=\"\"",
        "multipart/form-data; boundary=\"ends with space \"",
        "multipart/form-data; boundary=a; boundary=b",
        "multipart/form-data; boundary=\"a\\\"b\"",
        "multipart/form-data; boundary=x; charset=latin-1",
        "multipart/form-data; boundary=x;",
        "multipart/form-data; boundary=x y",
        &format!("multipart/form-data; boundary={}", "b".repeat(71)),
    ] {
        assert_eq!(of(refused), Err(400), "{refused}");
    }
}

#[test]
fn content_disposition_as_python_multipart_reads_it() {
    let read = |cd: &str| model(&form(&[(cd, b"acme/x")]));
    // Keys are case-insensitive, values quoted or not, whitespace around `=` and `;`.
    for cd in [
        "form-data; name=\"model\"",
        "form-data; NAME=model",
        "attachment ;name = \"model\" ",
        // RFC 7578 forbids `name*`; python-multipart ignores it and keeps `name`.
        "form-data; name*=utf-8''other; name=\"model\"",
        "form-data; x=\"a;b\"; name=\"model\"",
    ] {
        assert_eq!(read(cd), Ok(Some("acme/x".into())), "{cd}");
    }
    // Not the model field (a naive search for `name=` would find one).
    for cd in [
        "form-data; filename=\"a; name=model\"; name=\"file\"",
        "form-data; name=\"model2\"",
        "form-data; name=\"x name=model\"",
    ] {
        assert_eq!(read(cd), Ok(None), "{cd}");
    }
    for cd in [
        "form-data",
        "form-data; filename=\"x\"",
        "form-data; name*=utf-8''model",
        "form-data; name=\"model\"; name=\"other\"",
        "form-data; name=\"mo\\\"del\"",
        "form-data; name=\"model\"x",
        "name=\"model\"",
        "form-data;; name=model",
        "form-data; flag; name=model",
        "form-data; name=\"model\"; filename=\"m.txt\"",
    ] {
        assert_eq!(read(cd), Err(400), "{cd}");
    }
}

#[test]
fn fields() {
    assert_eq!(
        model(&form(&[("form-data; name=\"language\"", b"en")])),
        Ok(None)
    );
    assert_eq!(model(&form(&[])), Ok(None));
    assert_eq!(model(b""), Ok(None));
    assert_eq!(
        model(&form(&[("form-data; name=model", b"")])),
        Ok(Some(String::new()))
    );
    let twice = form(&[
        ("form-data; name=model", b"a"),
        ("form-data; name=model", b"b"),
    ]);
    assert_eq!(model(&twice), Err(400));
    assert_eq!(
        model(&form(&[("form-data; name=model", b"\xff")])),
        Err(400)
    );
}

#[test]
fn structure() {
    let good = form(&[("form-data; name=model", b"m")]);
    let refused: Vec<Vec<u8>> = vec![
        [b"preamble\r\n".as_slice(), &good].concat(),
        [b"\r\n".as_slice(), &good].concat(),
        good[..good.len() - 9].to_vec(),
        b"--XyZ\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--XyZ \r\n--XyZ--"
            .to_vec(),
        b"--XyZ\r\nContent-Disposition: form-data; name=model\r\n\r\nm".to_vec(),
        b"--XyZ\r\nContent-Disposition: form-data; name=model\n\r\nm\r\n--XyZ--".to_vec(),
        b"--XyZ\r\nContent-Disposition form-data; name=model\r\n\r\nm\r\n--XyZ--".to_vec(),
        b"--XyZ\r\nContent-Disposition: form-data;\rname=model\r\n\r\nm\r\n--XyZ--".to_vec(),
        b"--XyZ\r\nX Y: z\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--XyZ--"
            .to_vec(),
        b"--XyZ\r\nContent-Disposition: form-data; name=a\r\nContent-Disposition: form-data; \
          name=model\r\n\r\nm\r\n--XyZ--"
            .to_vec(),
        b"--XyZ\r\n\r\nm\r\n--XyZ--".to_vec(),
        b"--XyZx\r\n".to_vec(),
        b"--XyZ".to_vec(),
    ];
    for body in refused {
        assert_eq!(model(&body), Err(400), "{}", String::from_utf8_lossy(&body));
    }
    // The epilogue is ignored, whatever it holds; eight headers are fine, nine are not.
    let epilogue = [
        good.as_slice(),
        b"--XyZ\r\nContent-Disposition: form-data; name=model\r\n\r\nx",
    ]
    .concat();
    assert_eq!(model(&epilogue), Ok(Some("m".into())));
    let headers = |n: usize| {
        let extra = "X-A: 1\r\n".repeat(n);
        format!("--XyZ\r\n{extra}Content-Disposition: form-data; name=model\r\n\r\nm\r\n--XyZ--")
    };
    assert_eq!(model(headers(7).as_bytes()), Ok(Some("m".into())));
    assert_eq!(model(headers(8).as_bytes()), Err(400));
}

#[test]
fn rewrite_changes_the_model_field_only() {
    let body = transcription();
    let out = rewrite_model(&body, &boundary(), "base").unwrap();
    assert_eq!(model(&out), Ok(Some("base".into())));
    let at = memmem::find(&body, b"acme/whisper-lora").unwrap();
    assert_eq!(&out[..at], &body[..at]);
    assert_eq!(&out[at + 4..], &body[at + "acme/whisper-lora".len()..]);

    // A form without one gets a model part first; the rest is kept as it was.
    let without = form(&[("form-data; name=\"language\"", b"en")]);
    let out = rewrite_model(&without, &boundary(), "base").unwrap();
    assert_eq!(model(&out), Ok(Some("base".into())));
    assert!(out.ends_with(&without));
    let out = rewrite_model(b"", &boundary(), "base").unwrap();
    assert_eq!(model(&out), Ok(Some("base".into())));

    assert_eq!(
        rewrite_model(b"--XyZ\r\n", &boundary(), "b")
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        rewrite_model(&body, &boundary(), "a\r\nb")
            .unwrap_err()
            .status(),
        500
    );
}
