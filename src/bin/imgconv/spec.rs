//! Image specifications beyond a plain file name, as qemu-img takes them: `json:{...}`
//! file names, `--image-opts` option strings and `--object` definitions.
//!
//! Only what names a local file and, optionally, its format is taken: the `file`
//! protocol driver (`json:{"file":{"driver":"file","filename":"x"}}`, or flat keys
//! `"file.driver"`, `"file.filename"`, as KubeVirt CDI writes them), a format driver
//! over it (`"driver":"qcow2"`), and options that only tune how qemu does I/O (cache
//! modes, AIO, locking). Every other key is refused with an error naming it: nothing
//! that could change the result is silently dropped.

use std::collections::BTreeMap;

use imgconv::{Error, Format};

/// What an image argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The argument as given (for messages).
    pub arg: String,
    /// The file to open.
    pub filename: String,
    /// Its format, when the specification names one.
    pub format: Option<Format>,
}

/// Options of the `file` protocol driver that change nothing but how I/O is done.
const FILE_IO_OPTIONS: &[&str] = &[
    "aio",
    "aio-max-batch",
    "locking",
    "drop-cache",
    "x-check-cache-dropped",
    "pr-manager",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
    "node-name",
];

/// Options of a format driver that change nothing but caching and I/O.
const FORMAT_IO_OPTIONS: &[&str] = &[
    "cache.direct",
    "cache.no-flush",
    "cache.writeback",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
    "node-name",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-size",
    "cache-clean-interval",
    // Proxmox's target for `convert -n`: how qemu frees clusters on discard.
    "discard-no-unref",
];

/// Reads an image argument: a plain file name, a `json:{...}` specification, or (with
/// `image_opts`) a `key=value,…` option string. `format` is `-f`.
pub fn parse(arg: &str, format: Option<Format>, image_opts: bool) -> imgconv::Result<ImageSpec> {
    let shown = match imgconv::io::remote::classify(arg) {
        Some(_) => imgconv::io::remote::redact(arg),
        None => arg.to_string(),
    };
    let fail = |why: String| Error::Format(format!("Could not open '{shown}': {why}"));
    let opts = if image_opts {
        if format.is_some() {
            return Err(Error::invalid(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        parse_option_string(arg, Some("file")).map_err(fail)?
    } else if let Some(json) = arg.strip_prefix("json:") {
        let v: serde_json::Value = serde_json::from_str(json.trim())
            .map_err(|e| fail(format!("Could not parse the JSON options: {e}")))?;
        let serde_json::Value::Object(m) = v else {
            return Err(fail("Invalid JSON object given".into()));
        };
        let mut flat = BTreeMap::new();
        flatten("", &serde_json::Value::Object(m), &mut flat).map_err(fail)?;
        flat
    } else {
        return Ok(ImageSpec {
            arg: arg.to_string(),
            filename: arg.to_string(),
            format,
        });
    };
    let spec = from_options(&opts).map_err(fail)?;
    let format = match (format, spec.1) {
        (Some(f), Some(g)) if f != g => {
            return Err(fail(format!(
                "Cannot use format '{f}' for an image whose driver is '{g}'"
            )))
        }
        (f, g) => f.or(g),
    };
    Ok(ImageSpec {
        arg: arg.to_string(),
        filename: spec.0,
        format,
    })
}

/// Flattens nested objects into dotted keys (`{"file":{"driver":"file"}}` →
/// `file.driver=file`), as qemu does.
fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        serde_json::Value::Bool(b) => {
            out.insert(prefix.to_string(), if *b { "on" } else { "off" }.into());
        }
        serde_json::Value::Number(n) => {
            out.insert(prefix.to_string(), n.to_string());
        }
        serde_json::Value::Null => {
            return Err(format!("Option '{prefix}': null is not supported"));
        }
        serde_json::Value::Array(_) => {
            return Err(format!("Option '{prefix}': lists are not supported"));
        }
    }
    Ok(())
}

/// Splits a qemu option string (`a=b,c=d`, `,,` for a comma). A first item without
/// `=` is the value of `implied` (qemu's implied key).
pub fn parse_option_string(
    s: &str,
    implied: Option<&str>,
) -> Result<BTreeMap<String, String>, String> {
    let items = imgconv::writer::split_options(s);
    let mut out = BTreeMap::new();
    for (i, item) in items.into_iter().enumerate() {
        if item.is_empty() {
            continue;
        }
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match implied {
                Some(key) if i == 0 => (key.to_string(), item),
                _ => (item, "on".to_string()),
            },
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// The file name and format a flat option set names.
fn from_options(o: &BTreeMap<String, String>) -> Result<(String, Option<Format>), String> {
    let driver = o.get("driver").map(String::as_str);
    let has_file = o.keys().any(|k| k == "file" || k.starts_with("file."));
    let protocol = |d: &str| matches!(d, "file" | "host_device");
    match driver {
        None if !has_file => Err("Must specify either driver or file".into()),
        Some(d) if protocol(d) => {
            check_keys(o, FILE_IO_OPTIONS, &["driver", "filename"], d)?;
            let f = o
                .get("filename")
                .ok_or_else(|| format!("The '{d}' block driver requires a file name"))?;
            Ok((f.clone(), Some(Format::Raw)))
        }
        _ => {
            let format = match driver {
                Some(d) => Some(d.parse::<Format>().map_err(|_| {
                    format!("Unknown driver '{d}' (imgconv reads raw, qcow2, vmdk, vdi)")
                })?),
                None => None,
            };
            if let Some(name) = o.get("file") {
                return Err(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ));
            }
            let fmt_name = driver.unwrap_or("(probed)");
            let own: Vec<&str> = o
                .keys()
                .filter(|k| !k.starts_with("file."))
                .map(String::as_str)
                .collect();
            for k in own {
                if k != "driver" && !FORMAT_IO_OPTIONS.contains(&k) {
                    return Err(format!(
                        "Block format '{fmt_name}' does not support the option '{k}' in imgconv"
                    ));
                }
            }
            let file: BTreeMap<String, String> = o
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("file.").map(|k| (k.to_string(), v.clone())))
                .collect();
            let d = file.get("driver").map(String::as_str).unwrap_or("file");
            if !protocol(d) {
                return Err(format!(
                    "Unknown protocol driver '{d}': imgconv reads local files only"
                ));
            }
            check_keys(&file, FILE_IO_OPTIONS, &["driver", "filename"], d)?;
            let f = file
                .get("filename")
                .ok_or_else(|| format!("The '{d}' block driver requires a file name"))?;
            Ok((f.clone(), format))
        }
    }
}

/// Fails naming the first key of `o` that is neither in `allowed` nor in `required`.
fn check_keys(
    o: &BTreeMap<String, String>,
    allowed: &[&str],
    required: &[&str],
    driver: &str,
) -> Result<(), String> {
    for k in o.keys().map(String::as_str) {
        if !allowed.contains(&k) && !required.contains(&k) {
            return Err(format!(
                "Block protocol '{driver}' doesn't support the option '{k}'"
            ));
        }
    }
    Ok(())
}

/// Checks `--object` definitions. imgconv reads no encrypted image and runs no QEMU
/// objects: a `secret` (keys for LUKS or AES images) and every other object type are
/// refused with an error naming the type.
pub fn check_objects(objects: &[String]) -> imgconv::Result<()> {
    let Some(def) = objects.first() else {
        return Ok(());
    };
    let o = parse_option_string(def, Some("qom-type")).map_err(Error::invalid)?;
    let ty = o.get("qom-type").map(String::as_str).unwrap_or("");
    Err(match ty {
        "secret" | "secret_keyring" => Error::unsupported(
            "object",
            format!(
                "'{ty}' (id={}): imgconv reads and writes no encrypted image, so it takes no keys",
                o.get("id").map(String::as_str).unwrap_or("")
            ),
        ),
        "" => Error::invalid(format!("--object '{def}': no object type given")),
        other => Error::unsupported(
            "object",
            format!("'{other}': imgconv creates no QEMU objects"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arg: &str, image_opts: bool) -> imgconv::Result<ImageSpec> {
        parse(arg, None, image_opts)
    }

    #[test]
    fn json_file_names() {
        let s = spec(
            r#"json:{"file":{"driver":"file","filename":"a.img"}}"#,
            false,
        )
        .unwrap();
        assert_eq!((s.filename.as_str(), s.format), ("a.img", None));
        let s = spec(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            (s.filename.as_str(), s.format),
            ("a.qcow2", Some(Format::Qcow2))
        );
        let s = spec(
            r#"json: {"file.driver": "file", "file.filename": "b", "file.aio": "threads"}"#,
            false,
        )
        .unwrap();
        assert_eq!(s.filename, "b");
        let s = spec(r#"json:{"driver":"file","filename":"c"}"#, false).unwrap();
        assert_eq!((s.filename.as_str(), s.format), ("c", Some(Format::Raw)));
    }

    #[test]
    fn refusals_name_the_key() {
        let e = spec(
            r#"json:{"file":{"driver":"file","filename":"a","bogus":1}}"#,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'bogus'"), "{e}");
        let e = spec(
            r#"json:{"file.driver":"http","file.url":"http://x/"}"#,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'http'"), "{e}");
        let e = spec(
            r#"json:{"driver":"qcow2","encrypt.key-secret":"s","file.filename":"a"}"#,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("encrypt.key-secret"), "{e}");
        assert!(spec("json:[1]", false).is_err());
        assert!(spec("json:{", false).is_err());
        assert!(spec(r#"json:{"filename":"a"}"#, false).is_err());
    }

    #[test]
    fn image_opts() {
        let s = spec(
            "driver=qcow2,file.driver=file,file.filename=x,,y.qcow2",
            true,
        )
        .unwrap();
        assert_eq!(
            (s.filename.as_str(), s.format),
            ("x,y.qcow2", Some(Format::Qcow2))
        );
        let s = spec("file.filename=z", true).unwrap();
        assert_eq!((s.filename.as_str(), s.format), ("z", None));
        assert!(spec("plain.qcow2", true).is_err());
        assert!(parse("file.filename=z", Some(Format::Raw), true).is_err());
        assert_eq!(spec("plain.qcow2", false).unwrap().filename, "plain.qcow2");
    }

    #[test]
    fn objects_are_refused_by_type() {
        check_objects(&[]).unwrap();
        let e = check_objects(&["secret,id=sec0,data=x".into()]).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }));
        assert!(e.to_string().contains("secret"));
        let e = check_objects(&["throttle-group,id=t".into()]).unwrap_err();
        assert!(e.to_string().contains("throttle-group"));
    }
}
