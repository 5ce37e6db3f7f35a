//! JSON printed the way qemu-img prints it: indented by 4, empty lists and objects
//! opened and closed on lines of their own, strings with every byte outside printable
//! ASCII escaped (`\u001B`), and object keys in qemu's order — the iteration order of
//! its hash table of 512 buckets (`tdb_hash`), later insertions first within a bucket —
//! so that a diff against qemu-img's output shows only what really differs.

use std::fmt::Write;

use serde_json::{Map, Value};

/// qemu's hash of a dictionary key (`tdb_hash`), reduced to its 512 buckets.
fn bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// The entries of `m` in qemu's order; `m`'s own order stands for insertion order.
pub fn ordered(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<(usize, (&String, &Value))> = m.iter().enumerate().collect();
    v.sort_by_key(|(i, (k, _))| (bucket(k), std::cmp::Reverse(*i)));
    v.into_iter().map(|(_, e)| e).collect()
}

/// `v` as qemu-img prints JSON (no trailing newline).
pub fn to_string(v: &Value) -> String {
    let mut s = String::new();
    write_value_flushing(&mut s, v, 0, &mut |_, _, _, _| false, &mut |_| {});
    s
}

/// Writes a placeholder of the tree as a list built item by item (so that a long
/// list, such as 65535 snapshots, is never held whole as JSON values); returns false
/// for every value that is not a placeholder.
/// It writes through the sink it is given, as [`write_list`] does.
pub type Deferred<'a> = dyn FnMut(&Value, &mut String, usize, Sink) -> bool + 'a;

/// Takes the text gathered so far (and clears it).
pub type Sink<'a> = &'a mut dyn FnMut(&mut String);

/// Writes `v` as [`to_string`] does, with `deferred` standing in for its placeholders,
/// to `w` in pieces of about 64 KiB; ends with a newline.
pub fn write_to(
    w: &mut dyn std::io::Write,
    v: &Value,
    deferred: &mut Deferred,
) -> std::io::Result<()> {
    let mut s = String::new();
    let mut failed = None;
    let mut sink = |s: &mut String| {
        if failed.is_none() {
            if let Err(e) = w.write_all(s.as_bytes()) {
                failed = Some(e);
            }
        }
        s.clear();
    };
    write_value_flushing(&mut s, v, 0, deferred, &mut sink);
    s.push('\n');
    sink(&mut s);
    match failed {
        Some(e) => Err(e),
        None => w.flush(),
    }
}

/// Writes `items` as a JSON list at `level`, each built when written.
pub fn write_list(
    s: &mut String,
    items: impl ExactSizeIterator<Item = Value>,
    level: usize,
    sink: Sink,
) {
    let n = items.len();
    s.push_str("[\n");
    for (k, v) in items.enumerate() {
        pad(s, level + 1);
        write_value_flushing(s, &v, level + 1, &mut |_, _, _, _| false, sink);
        if k + 1 < n {
            s.push(',');
        }
        s.push('\n');
    }
    pad(s, level);
    s.push(']');
}

fn pad(s: &mut String, level: usize) {
    for _ in 0..level {
        s.push_str("    ");
    }
}

/// Writes `v`, handing the text to `sink` whenever more than 64 KiB have gathered.
fn write_value_flushing(
    s: &mut String,
    v: &Value,
    level: usize,
    deferred: &mut Deferred,
    sink: Sink,
) {
    if s.len() >= 1 << 16 {
        sink(s);
    }
    if deferred(v, s, level, sink) {
        return;
    }
    match v {
        Value::Object(m) => {
            s.push_str("{\n");
            let entries = ordered(m);
            for (n, (k, v)) in entries.iter().enumerate() {
                pad(s, level + 1);
                write_string(s, k);
                s.push_str(": ");
                write_value_flushing(s, v, level + 1, deferred, sink);
                if n + 1 < entries.len() {
                    s.push(',');
                }
                s.push('\n');
            }
            pad(s, level);
            s.push('}');
        }
        Value::Array(items) => {
            s.push_str("[\n");
            for (n, v) in items.iter().enumerate() {
                pad(s, level + 1);
                write_value_flushing(s, v, level + 1, deferred, sink);
                if n + 1 < items.len() {
                    s.push(',');
                }
                s.push('\n');
            }
            pad(s, level);
            s.push(']');
        }
        Value::String(x) => write_string(s, x),
        other => {
            let _ = write!(s, "{other}");
        }
    }
}

/// A JSON string with qemu's escapes: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, and
/// `\uXXXX` (upper-case hex, surrogate pairs) for every other character outside
/// printable ASCII — no control byte reaches a terminal.
pub fn write_string(s: &mut String, x: &str) {
    s.push('"');
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            ' '..='~' => s.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(s, "\\u{:04X}", u);
                }
            }
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_in_qemus_order() {
        // The order qemu-img 10 prints `info --output=json` of a qcow2 overlay in.
        let v = json!({
            "filename": "t", "format": "qcow2", "dirty-flag": false, "actual-size": 1,
            "virtual-size": 2, "cluster-size": 3, "backing-filename": "b",
            "full-backing-filename": "b", "backing-filename-format": "qcow2",
            "format-specific": {}, "children": []
        });
        let keys: Vec<&str> = ordered(v.as_object().unwrap())
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn laid_out_as_qemu() {
        let v = json!({"children": [], "format-specific": {"type": "file", "data": {}}});
        assert_eq!(
            to_string(&v),
            "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
        let mut s = String::new();
        write_string(&mut s, "a\u{1b}]0;x\u{7}\"é😀");
        assert_eq!(s, "\"a\\u001B]0;x\\u0007\\\"\\u00E9\\uD83D\\uDE00\"");
    }
}
